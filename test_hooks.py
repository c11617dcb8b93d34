"""Hooks: commands at each opening and after it (fwknop's command cycles, issue 14 section 1).

A stanza's cmd_cycle_open runs when a knock opens a port and its cmd_cycle_close
cmd_cycle_timer seconds later, as cmd_cycle_user, without a shell, fwknop's variables
($IP, $PORT...) replaced inside the arguments.  Pending closes are kept in a file, so they
run across a restart and after a crash.  With firewall = none the hooks do all the work.

What is tested, for real (real processes, real users, real nftables in network
namespaces, the real fwknop client and fwknopd):
1. The config: the four options, their errors, firewall = none without hooks, access.conf's
   CMD_CYCLE_* (which fwknopd reads too: its expansion of the variables is spa.py's).
2. In one process with a real HookRunner: the variables, one hook a port, as nobody with
   no_new_privs and PATH alone, the close after the timer, root only when written, a hook
   that hangs killed, its output bounded.
3. A real server in a namespace: the close after SIGKILL of the server and a restart (on
   time, and at once when overdue); firewall = none with hooks that run nft to open a real
   TCP service; the real fwknop client knocking on a server whose hooks come from an
   access.conf.
"""

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import netns_lab
import spa
from netns_lab import Lab, FwknopdServer, need_lab, tcp_connect_ok, wait_for_line, wait_tcp_open
from test_spa import (HMAC_KEY, KEY, SERVICE_PORT, SPA, Lines, client_knock, knock,
                      lab_server_config, need_nft, server_config, write_private)

ME = "198.18.0.1"
SRC = "198.18.0.2"
PREFIX = "hk"
ARGS = "$IP $SRC $PKT_SRC $DST $PORT $PROTO $TIMEOUT $CLIENT_TIMEOUT"


@pytest.fixture
def hookdir():
    """A folder every user may write to (tmp_path is root's alone), with `record`, a hook
    that writes what it was given and as whom to a file of its own: EVENT.PID."""
    path = tempfile.mkdtemp(prefix="hk-hooks-")
    os.chmod(path, 0o777)
    script = os.path.join(path, "record")
    with open(script, "w") as f:
        f.write("#!/bin/sh\n"
                "out=\"%s/$1.$$\"\n"
                "{ id -u; grep NoNewPrivs /proc/self/status | tr -d ' \\t'; "
                "echo \"PATH=$PATH HOME=$HOME\"; printf '%%s\\n' \"$@\"; } > \"$out.tmp\" "
                "&& mv \"$out.tmp\" \"$out\"\n"
                "printf 'hook %%s ran\\033[2J\\n' \"$1\"\n" % path)
    os.chmod(script, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def runs(hookdir, event):
    """What each run of the `record` hook for `event` saw: [{uid, nnp, env, argv, time}]."""
    found = []
    for name in sorted(os.listdir(hookdir)):
        if name.startswith(event + ".") and not name.endswith(".tmp"):
            path = os.path.join(hookdir, name)
            with open(path) as f:
                lines = f.read().splitlines()
            found.append({"uid": int(lines[0]), "nnp": lines[1], "env": lines[2],
                          "argv": lines[3:], "time": os.stat(path).st_mtime,
                          "owner": os.stat(path).st_uid})
    return found


def pending_in(path):
    """The closes the journal at `path` holds pending (read only: the server keeps it)."""
    pending = {}
    with open(path) as f:
        for line in f:
            entry = json.loads(line)
            if "done" in entry:
                pending.pop(entry["done"], None)
            else:
                pending[entry["id"]] = entry
    return list(pending.values())


def hook_stanza(hookdir, **options):
    stanza = {"cmd_cycle_open": "%s/record open %s" % (hookdir, ARGS),
              "cmd_cycle_close": "%s/record close %s" % (hookdir, ARGS),
              "cmd_cycle_user": "nobody", "cmd_cycle_timer": "1"}
    stanza.update(options)
    return stanza


def hook_gate(tmp_path, stanza, **server):
    """An in-process gatekeeper, firewall = none, its hooks real."""
    server.setdefault("firewall", "none")
    tmp_path.mkdir(exist_ok=True)
    config = server_config(tmp_path, {"alice": stanza}, **server)
    replay = spa.ReplayCache(config.replay_cache, config.max_packet_age)
    log = Lines()
    return spa.Gatekeeper(config, spa.make_firewall(config, False, log), replay, log, {ME},
                          closes=spa.PendingCloses(config.pending_closes))


def tick_until(gate, pred, seconds=6.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        gate.tick()
        if pred():
            return True
        time.sleep(0.05)
    return False


def need_root():
    netns_lab.need(os.geteuid() == 0, "needs root (hooks run as another user)")


# ---------------------------------------------------------------------------
# 1. The config
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"cmd_cycle_open": "/bin/true"}, r"cmd_cycle_open needs cmd_cycle_close \(NONE"),
    ({"cmd_cycle_close": "/bin/true"}, "need cmd_cycle_open"),
    ({"cmd_cycle_timer": "5"}, "need cmd_cycle_open"),
    ({"cmd_cycle_open": "/bin/true", "cmd_cycle_close": "NONE"},
     "cmd_cycle_open needs cmd_cycle_user, an existing user"),
    ({"cmd_cycle_open": "/bin/true $IPADDR", "cmd_cycle_close": "NONE",
      "cmd_cycle_user": "nobody"}, r"\$IPADDR is not a variable"),
    ({"cmd_cycle_open": "$IP", "cmd_cycle_close": "NONE", "cmd_cycle_user": "nobody"},
     "the program .* may not be a variable"),
    ({"cmd_cycle_open": "/bin/echo 'unclosed", "cmd_cycle_close": "NONE",
      "cmd_cycle_user": "nobody"}, "No closing quotation"),
    ({"cmd_cycle_open": "/bin/true", "cmd_cycle_close": "/bin/true", "cmd_cycle_timer": "0",
      "cmd_cycle_user": "nobody"}, "cmd_cycle_timer = 0: must be from 1"),
    ({"cmd_cycle_open": "/bin/true", "cmd_cycle_close": "NONE", "cmd_cycle_user": "0"},
     "needs cmd_cycle_user"),
])
def test_hook_options_and_their_errors(tmp_path, options, message):
    with pytest.raises(spa.SpaError, match=message):
        server_config(tmp_path, {"a": options})


def test_hooks_are_argument_lists_and_root_must_be_written(tmp_path, monkeypatch):
    stanza = server_config(tmp_path, {"a": {
        "cmd_cycle_open": "/usr/sbin/ipset add 'knocked ones' $IP,$PROTO:$PORT timeout "
                          "$CLIENT_TIMEOUT |&`x`", "cmd_cycle_close": "none",
        "cmd_cycle_user": "root"}}).stanzas[0]
    assert stanza.cmd_cycle_open == ["/usr/sbin/ipset", "add", "knocked ones",
                                     "$IP,$PROTO:$PORT", "timeout", "$CLIENT_TIMEOUT", "|&`x`"]
    assert stanza.cmd_cycle_close is None and stanza.cmd_cycle_user == "root"
    values = {"IP": "198.18.0.2", "PROTO": "6", "PORT": "22", "CLIENT_TIMEOUT": "30"}
    assert spa.expand_hook(stanza.cmd_cycle_open, values)[2:6] == [
        "knocked ones", "198.18.0.2,6:22", "timeout", "30"]
    with pytest.raises(ValueError, match=r"\$NAT_IP has no value"):
        spa.expand_hook(["/bin/x", "$NAT_IP"], values)
    # A user of group 0 is refused, as root is under any other name.
    real = pwd.getpwnam
    monkeypatch.setattr(pwd, "getpwnam", lambda name: pwd.struct_passwd(
        real(name)[:3] + (0,) + real(name)[4:]) if name == "nobody" else real(name))
    with pytest.raises(spa.SpaError, match="cmd_cycle_user nobody is root or of group 0: write "
                                           "cmd_cycle_user = root"):
        server_config(tmp_path, {"a": {"cmd_cycle_open": "/bin/true", "cmd_cycle_close": "NONE",
                                       "cmd_cycle_user": "nobody"}})
    runner = spa.HookRunner(Lines())
    assert runner.run(["/bin/true"], "nobody", "x") == "cmd_cycle_user nobody is root or of group 0"


def test_firewall_none_needs_hooks_in_every_stanza(tmp_path):
    with pytest.raises(spa.SpaError, match=r"firewall = none, and \[client b\] has no "
                                           "cmd_cycle_open: its knocks would open nothing"):
        server_config(tmp_path, {"a": {"cmd_cycle_open": "/bin/true", "cmd_cycle_close": "NONE",
                                       "cmd_cycle_user": "nobody"}, "b": {}}, firewall="none")
    config = server_config(tmp_path, {"a": {"cmd_cycle_open": "/bin/true",
                                            "cmd_cycle_close": "NONE",
                                            "cmd_cycle_user": "nobody"}}, firewall="none")
    none = spa.make_firewall(config, False)
    assert isinstance(none, spa.NoFirewall) and none.name == "none" and not none.steer
    for name in ("setup", "open", "open_many", "open_nat", "close", "list", "list_nat",
                 "expire", "restore", "flush", "reconfigure"):
        assert callable(getattr(none, name))
    assert none.open_nat(SRC, "tcp", 22, ME, 2222, 1, True, now=0) and none.list() == []
    assert none.expire(now=2) == 0 and none.ends == {}
    assert isinstance(spa.make_firewall(config, True), spa.DryRunFirewall)
    assert config.pending_closes == str(tmp_path / "pending-closes")


ACCESS_CONF = """SOURCE ANY
KEY_BASE64 {key}
HMAC_KEY_BASE64 {hmac}
CMD_CYCLE_OPEN {dir}/record open {args}
CMD_CYCLE_CLOSE {dir}/record close {args}
CMD_CYCLE_TIMER 2
{extra}
"""


def test_access_conf_command_cycles_load(tmp_path):
    """fwknopd's CMD_CYCLE_* load (they were left out before); they run as nobody unless
    CMD_CYCLE_USER (spa.py's own) names a user, root too; fwknopd's errors are ours."""
    path = write_private(tmp_path / "access.conf", ACCESS_CONF.format(
        key=KEY, hmac=HMAC_KEY, dir="/opt/hooks", args="$IP $PORT", extra=""))
    stanzas, notes = spa.read_access_conf(path, [("tcp", 22)])
    assert len(stanzas) == 1, notes
    stanza = stanzas[0]
    assert stanza.cmd_cycle_open == ["/opt/hooks/record", "open", "$IP", "$PORT"]
    assert (stanza.cmd_cycle_timer, stanza.cmd_cycle_user) == (2, "nobody")
    assert any("run as nobody (fwknopd runs them as root): name their user with "
               "CMD_CYCLE_USER" in note for note in notes), notes
    write_private(path, ACCESS_CONF.format(key=KEY, hmac=HMAC_KEY, dir="/opt/hooks",
                                           args="$IP", extra="CMD_CYCLE_USER root"))
    stanzas, notes = spa.read_access_conf(path, [("tcp", 22)])
    assert stanzas[0].cmd_cycle_user == "root" and notes == []
    write_private(path, "SOURCE ANY\nKEY_BASE64 %s\nHMAC_KEY_BASE64 %s\nCMD_CYCLE_OPEN /bin/true\n"
                  % (KEY, HMAC_KEY))
    stanzas, notes = spa.read_access_conf(path, [("tcp", 22)])
    assert stanzas == [] and "cmd_cycle_open needs cmd_cycle_close" in notes[-1]
    # Through the server's --access-conf, with firewall = none: the stanza loads.
    write_private(path, ACCESS_CONF.format(key=KEY, hmac=HMAC_KEY, dir="/opt/hooks",
                                           args="$IP", extra=""))
    conf = write_private(tmp_path / "spa.conf", "[server]\nprotect = tcp/22\nfirewall = none\n"
                         "replay_cache = %s\n" % (tmp_path / "r" / "replay.cache"))
    assert len(spa.ServerConfig(conf, str(path)).stanzas) == 1
    done = subprocess.run([sys.executable, SPA, "check-config", "-c", conf, "--access-conf",
                           str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)
    assert "hooks: cmd_cycle_open /opt/hooks/record open $IP" in done.stdout, done.stdout


# ---------------------------------------------------------------------------
# 2. In one process, with a real HookRunner
# ---------------------------------------------------------------------------

def test_open_then_close_after_the_timer_with_fwknop_s_variables(tmp_path, hookdir):
    need_root()
    gate = hook_gate(tmp_path, hook_stanza(hookdir, cmd_cycle_timer="1"),
                     protect="tcp/22, udp/53")
    now = time.time()
    wire = knock([("tcp", 22), ("udp", 53)], timestamp=int(now))
    d = gate.knock(SRC, ME, wire, now=now)
    assert d.accepted, d.reason
    assert "(by its hooks: firewall = none)" in gate.log.text()
    assert tick_until(gate, lambda: len(runs(hookdir, "open")) == 2)
    opens = sorted(runs(hookdir, "open"), key=lambda r: r["argv"][5])
    stamp = str(int(now) + 1)
    assert [r["argv"] for r in opens] == [
        ["open", SRC, SRC, SRC, ME, "22", "6", stamp, "1"],
        ["open", SRC, SRC, SRC, ME, "53", "17", stamp, "1"]]
    nobody = pwd.getpwnam("nobody").pw_uid
    for run in opens:
        assert run["uid"] == nobody and run["nnp"] == "NoNewPrivs:1"
        assert run["env"] == "PATH=%s HOME=" % spa.HookRunner.PATH
    assert runs(hookdir, "close") == []
    pending = pending_in(gate.closes.path)
    assert sorted(p["argv"][6] for p in pending) == ["22", "53"]
    assert tick_until(gate, lambda: len(runs(hookdir, "close")) == 2)
    closes = runs(hookdir, "close")
    assert all(r["time"] >= now + 1 - 0.05 for r in closes)
    assert sorted(r["argv"][1:] for r in closes) == sorted(r["argv"][1:] for r in opens)
    assert pending_in(gate.closes.path) == [] and gate.closes.entries == []
    assert tick_until(gate, lambda: "exited with status 0; its output: hook close ran"
                      in gate.log.text())


def test_the_client_s_timeout_and_allow_ip_reach_the_hooks(tmp_path, hookdir):
    need_root()
    gate = hook_gate(tmp_path, hook_stanza(hookdir, cmd_cycle_timer="50", max_fw_timeout="7",
                                           cmd_cycle_close="NONE"))
    wire = knock(allow_ip="198.18.5.5", timeout=600)
    assert gate.knock(SRC, ME, wire).accepted
    assert tick_until(gate, lambda: runs(hookdir, "open"))
    argv = runs(hookdir, "open")[0]["argv"]
    assert argv[1:4] == ["198.18.5.5", "198.18.5.5", SRC] and argv[8] == "7"  # capped at max_fw
    assert gate.closes.entries == []                            # NONE: no close
    # A NAT variable in a hook of a stanza that gets a plain knock refuses the knock.
    gate = hook_gate(tmp_path, hook_stanza(hookdir, cmd_cycle_open="/bin/true $NAT_IP"))
    d = gate.knock(SRC, ME, knock())
    assert not d.accepted and "$NAT_IP has no value for this request" in d.reason


def test_a_knock_again_keeps_one_close_for_the_later_time(tmp_path, hookdir):
    need_root()
    gate = hook_gate(tmp_path, hook_stanza(hookdir, cmd_cycle_timer="30"))
    now = time.time()
    assert gate.knock(SRC, ME, knock(timestamp=int(now)), now=now).accepted
    assert gate.knock(SRC, ME, knock(timestamp=int(now) + 1), now=now + 1).accepted
    # (the $TIMEOUT argument differs: fwknop counts it from each packet's timestamp)
    assert len(gate.closes.entries) == 2
    gate = hook_gate(tmp_path / "b", hook_stanza(hookdir, cmd_cycle_timer="30",
                                                 cmd_cycle_close="%s/record close $IP" % hookdir))
    assert gate.knock(SRC, ME, knock(timestamp=int(now)), now=now).accepted
    assert gate.knock(SRC, ME, knock(timestamp=int(now) + 1), now=now + 5).accepted
    assert [e["due"] for e in gate.closes.entries] == [now + 35]


def test_a_hook_that_hangs_is_killed_and_its_output_bounded(tmp_path, hookdir):
    need_root()
    gate = hook_gate(tmp_path, hook_stanza(hookdir, cmd_cycle_open="/bin/sh -c 'sleep 60 & "
                                           "head -c 100000 /dev/zero | tr \"\\\\0\" x; sleep 60'"))
    gate.hooks = spa.HookRunner(gate.log, limit=1.0)
    assert gate.knock(SRC, ME, knock()).accepted
    group = gate.hooks.running[0].proc.pid
    assert tick_until(gate, lambda: not gate.hooks.running, 8)
    text = gate.log.text()
    assert "hook 'cmd_cycle_open of [client alice] %s tcp/22' ran over 1 s: killed" % SRC in text
    line = [l for l in gate.log.lines if "exited with status -9" in l][0]
    assert "x" * spa.HOOK_OUTPUT_KEPT + " (more left out)" in line
    assert len(line) < spa.HOOK_OUTPUT_KEPT + 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and spa.CommandRunner._group_alive(group):
        time.sleep(0.02)
    assert not spa.CommandRunner._group_alive(group)       # the background sleep too


def test_root_only_when_written_and_the_test_mode_runs_nothing(tmp_path, hookdir):
    need_root()
    gate = hook_gate(tmp_path, hook_stanza(hookdir, cmd_cycle_user="root"))
    assert gate.knock(SRC, ME, knock()).accepted
    assert tick_until(gate, lambda: runs(hookdir, "open"))
    run = runs(hookdir, "open")[0]
    assert run["uid"] == 0 and run["owner"] == 0 and run["nnp"] == "NoNewPrivs:1"
    # server --test: the hooks are said, not run, and no close is recorded.
    (tmp_path / "t").mkdir()
    config = server_config(tmp_path / "t", {"alice": hook_stanza(hookdir)}, firewall="none")
    gate = spa.Gatekeeper(config, spa.make_firewall(config, True), spa.ReplayCache(None, 120),
                          Lines(), {ME})
    before = len(os.listdir(hookdir))
    assert gate.knock(SRC, ME, knock()).accepted
    assert "test mode: cmd_cycle_open of [client alice] %s tcp/22 not run: %s/record open" % (
        SRC, hookdir) in gate.log.text()
    time.sleep(0.3)
    assert len(os.listdir(hookdir)) == before and gate.closes.entries == []


def test_a_close_that_cannot_be_recorded_refuses_the_knock(tmp_path, hookdir):
    need_root()
    gate = hook_gate(tmp_path, hook_stanza(hookdir))
    os.close(gate.closes.fd)
    gate.closes.fd = os.open("/dev/full", os.O_WRONLY)      # every write: ENOSPC
    d = gate.knock(SRC, ME, knock())
    assert not d.accepted and d.reason == "its cmd_cycle_close could not be recorded"
    assert "cannot write the pending closes to %s: No space left on device" % gate.closes.path \
        in gate.log.text()
    time.sleep(0.3)
    assert runs(hookdir, "open") == [] and gate.closes.entries == []   # its open never ran
    # The next knock writes the journal anew, and is accepted.
    assert gate.knock(SRC, ME, knock()).accepted
    assert len(pending_in(gate.closes.path)) == 1
    assert tick_until(gate, lambda: runs(hookdir, "open"))


# ---------------------------------------------------------------------------
# 3. A real server in network namespaces
# ---------------------------------------------------------------------------

def spawn_server(lab, conf, *extra):
    proc = lab.spawn("srv", [sys.executable, SPA, "server", "-c", conf, "-v"] + list(extra))
    wait_for_line(proc, r"listening on", 15)
    return proc


def kill_hard(proc):
    """SIGKILL the server we started (its process group: it and its packet reader)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(5)


def wait_for(pred, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("overdue", [False, True])
def test_the_close_runs_after_a_crash_and_a_restart(tmp_path, hookdir, overdue):
    """SIGKILL of the server between the open and the close: the restarted server runs the
    close on time, or at once when its time passed while no server ran."""
    need_lab()
    need_nft()
    with Lab(clients=1, prefix=PREFIX) as lab:
        dest = lab.srv4(1)
        conf = lab_server_config(tmp_path, {"alice": hook_stanza(hookdir, cmd_cycle_timer="4")},
                                 firewall="none")
        server = spawn_server(lab, conf)
        start = time.time()
        client_knock(lab, "cli1", dest)
        assert wait_for(lambda: runs(hookdir, "open"), 5), server.log.text()
        listed = lab.run("srv", [sys.executable, SPA, "server", "-c", conf, "--list"]).stdout
        assert re.match(r"%s +tcp/%d +[0-4] s left\n$" % (re.escape(lab.cli4(1)), SERVICE_PORT),
                        listed), listed
        kill_hard(server)
        assert runs(hookdir, "close") == []
        assert [e["argv"][1] for e in pending_in(tmp_path / "pending-closes")] == ["close"]
        if overdue:
            time.sleep(max(0, start + 5 - time.time()))
        server = spawn_server(lab, conf)
        restarted = time.time()
        assert "1 hook close(s) pending from before the start" in server.log.text()
        assert wait_for(lambda: runs(hookdir, "close"), 8), server.log.text()
        ran = runs(hookdir, "close")[0]
        assert ran["argv"][1:3] == [lab.cli4(1)] * 2 and ran["uid"] != 0
        if overdue:
            assert ran["time"] - restarted < 1.5
        else:
            assert ran["time"] >= start + 4 - 0.1
        assert wait_for(lambda: pending_in(tmp_path / "pending-closes") == [], 3)
        assert wait_for(lambda: "cmd_cycle_close of [client alice] %s tcp/%d%s" % (
            lab.cli4(1), SERVICE_PORT, " (" if overdue else ": running") in server.log.text(), 3)
        assert len(runs(hookdir, "close")) == 1            # once, not again
        # A server stopped while a close is pending says so.
        client_knock(lab, "cli1", dest)
        assert wait_for(lambda: len(runs(hookdir, "open")) == 2, 5), server.log.text()
        Lab.stop_process(server)
        assert "1 hook close(s) pending: they run when the server starts again" in \
            server.log.text()
        # The hook's output in the log, its control characters escaped.
        assert wait_for(lambda: "exited with status 0; its output: hook close ran\\x1b[2J"
                        in server.log.text(), 3), server.log.text()


def test_pending_closes_read_what_they_can_and_drop_what_can_never_run(tmp_path, hookdir):
    need_root()
    path = str(tmp_path / "pending-closes")
    good = {"id": "g", "due": time.time() - 1, "user": "nobody",
            "argv": [hookdir + "/record", "close"], "what": "[client a] 198.18.0.2 tcp/22",
            "key": ["a", "198.18.0.2", "tcp", 22]}
    gone = dict(good, id="b", user="no-such-user-hk", what="[client b] 198.18.0.3 tcp/22",
                key=["b", "198.18.0.3", "tcp", 22])
    with open(path, "w") as f:
        f.write("\n".join([json.dumps(dict(good, due=1)), json.dumps(dict(good, id="x")),
                           "{not json", json.dumps(dict(good, id="y", argv=[])), json.dumps(gone),
                           json.dumps({"due": 1}), json.dumps({"done": "x"}), json.dumps(good),
                           "7"]) + "\n")
    closes = spa.PendingCloses(path)
    assert closes.skipped == 4 and [(e["id"], e["due"]) for e in closes.entries] == [
        ("g", good["due"]), ("b", good["due"])]
    assert sorted(e["id"] for e in pending_in(path)) == ["b", "g"]      # compacted at start
    gate = hook_gate(tmp_path / "g", hook_stanza(hookdir))
    gate.closes = closes
    gate.run_closes()
    assert "cmd_cycle_close of [client b] 198.18.0.3 tcp/22 not run: no user no-such-user-hk" \
        in gate.log.text()
    assert closes.entries == [] and pending_in(path) == []
    assert spa.PendingCloses(path).entries == [] and open(path).read() == ""   # compacted
    assert tick_until(gate, lambda: runs(hookdir, "close"))


NFT_TABLE = """table inet gate {
    set knocked { type ipv4_addr . inet_service; }
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport %d ip saddr . tcp dport @knocked accept
        tcp dport %d reject with tcp reset
    }
}
""" % (SERVICE_PORT, SERVICE_PORT)


def readme_hooks():
    """The hooks of README.md's guide "Run commands at open and close", as written there."""
    with open(os.path.join(os.path.dirname(SPA), "README.md")) as f:
        guide = f.read().split("### Run commands at open and close (hooks)\n", 1)[1]
    block = guide.split("```ini\n", 1)[1].split("```", 1)[0]
    return dict(line.split(" = ", 1) for line in block.splitlines()
                if line.startswith("cmd_cycle_"))


def test_firewall_none_with_hooks_that_run_nft_opens_a_real_service(tmp_path):
    """firewall = none: spa.py changes no firewall; README's hooks (as root, written so) add
    and remove an element of a set in the host's own table, and a real TCP service opens
    and closes with them."""
    need_lab("nft")
    need_nft()
    with Lab(clients=1, prefix=PREFIX) as lab:
        dest = lab.srv4(1)
        lab.run("srv", ["nft", "-f", "-"], input=NFT_TABLE)
        lab.tcp_service("srv", dest, SERVICE_PORT)
        hooks = readme_hooks()
        assert hooks["cmd_cycle_user"] == "root"
        hooks["cmd_cycle_timer"] = "3"
        conf = lab_server_config(tmp_path, {"alice": hooks}, firewall="none")
        server = spawn_server(lab, conf)
        assert not tcp_connect_ok(lab.name("cli1"), dest, SERVICE_PORT, 0.3)
        assert "table inet spa" not in lab.run("srv", ["nft", "list", "tables"]).stdout
        start = time.monotonic()
        client_knock(lab, "cli1", dest)
        sent = time.monotonic()
        opened = wait_tcp_open(lab.name("cli1"), dest, SERVICE_PORT, 3.0, poll_ms=2)
        assert opened is not None, server.log.text()
        print("\nthrough an nft hook: the client ran %.0f ms; the port was open %.0f ms after "
              "it ended" % (1000 * (sent - start), 1000 * opened))
        assert wait_for(lambda: not tcp_connect_ok(lab.name("cli1"), dest, SERVICE_PORT, 0.3),
                        6), server.log.text()
        assert "table inet spa" not in lab.run("srv", ["nft", "list", "tables"]).stdout
        log = server.log.text()
        assert "(by its hooks: firewall = none)" in log
        assert "cmd_cycle_close of [client alice] %s tcp/%d: running nft delete element inet " \
            "gate knocked { %s . %d } as root" % (lab.cli4(1), SERVICE_PORT, lab.cli4(1),
                                                SERVICE_PORT) in log, log


def test_the_fwknop_client_knocks_on_hooks_from_an_access_conf_as_fwknopd_runs_them(
        tmp_path, hookdir):
    """The real fwknop client knocks on spa.py, whose hooks come from an access.conf; and
    fwknopd, given the same access.conf, runs its CMD_CYCLE_OPEN with the same arguments."""
    need_lab("fwknop", "fwknopd")
    need_nft()
    argv = [hookdir + "/record", "open", "$IP", "$SRC", "$PKT_SRC", "$DST", "$PORT", "$PROTO",
            "$CLIENT_TIMEOUT"]
    text = ("SOURCE ANY\nKEY_BASE64 %s\nHMAC_KEY_BASE64 %s\nHMAC_DIGEST_TYPE sha256\n"
            "CMD_CYCLE_OPEN %s\nCMD_CYCLE_CLOSE %s\nCMD_CYCLE_TIMER 2\n"
            % (KEY, HMAC_KEY, " ".join(argv), " ".join(argv).replace(" open ", " close ")))
    access = write_private(tmp_path / "access.conf", text + "CMD_CYCLE_USER nobody\n")
    with Lab(clients=1, prefix=PREFIX) as lab:
        dest = lab.srv4(1)
        conf = write_private(tmp_path / "spa.conf",
                             "[server]\nprotect = tcp/%d\ninterface = any\nfirewall = none\n"
                             "replay_cache = %s\n" % (SERVICE_PORT, tmp_path / "replay.cache"))
        server = spawn_server(lab, conf, "--access-conf", str(access))
        fwknop = netns_lab.fwknop_client_argv(dest, "tcp/%d" % SERVICE_PORT, KEY, HMAC_KEY)
        lab.run("cli1", fwknop)
        assert wait_for(lambda: runs(hookdir, "open"), 5), server.log.text()
        ours = runs(hookdir, "open")[0]
        assert ours["argv"] == ["open"] + [lab.cli4(1)] * 3 + [dest, str(SERVICE_PORT), "6", "2"]
        assert ours["uid"] != 0
        assert wait_for(lambda: runs(hookdir, "close"), 5), server.log.text()
        Lab.stop_process(server)
        for name in os.listdir(hookdir):
            if name != "record":
                os.unlink(os.path.join(hookdir, name))
        # fwknopd, the same stanza (it runs its hooks as root and knows no CMD_CYCLE_USER).
        srv_dir = tmp_path / "fwknopd"
        srv_dir.mkdir()
        stanza = {"SOURCE": "ANY", "KEY_BASE64": KEY, "HMAC_KEY_BASE64": HMAC_KEY,
                  "HMAC_DIGEST_TYPE": "sha256", "CMD_CYCLE_OPEN": " ".join(argv),
                  "CMD_CYCLE_CLOSE": "NONE", "CMD_CYCLE_TIMER": "2"}
        with FwknopdServer(lab, "srv", lab.srv_if[1], stanza, srv_dir) as fwknopd:
            lab.run("cli1", fwknop)
            assert wait_for(lambda: runs(hookdir, "open"), 5), fwknopd.log.text()
            assert fwknopd.rules() == []        # it opens nothing itself for a command cycle
            # Debian 13's fwknopd, built without libpcap, reads knocks from a UDP socket
            # ("forcing UDP server mode"), which does not tell it where a knock was sent:
            # its $DST is then 0.0.0.0.
            udp_server = "forcing UDP server mode" in fwknopd.log.text()
        theirs = runs(hookdir, "open")[0]
        if udp_server:
            assert theirs["argv"][4] == "0.0.0.0"
            theirs["argv"][4] = ours["argv"][4]
        assert theirs["argv"] == ours["argv"]


def test_nat_variables_and_how_many_hooks_run_at_once(tmp_path, hookdir):
    """A local NAT knock gives $NAT_IP and $NAT_PORT; past the most hooks at once a knock is
    refused; a close waits while its own open still runs."""
    need_root()
    gate = hook_gate(tmp_path, hook_stanza(
        hookdir, enable_nat="yes", cmd_cycle_timer="1",
        cmd_cycle_open="%s/record open $IP $PORT $NAT_IP $NAT_PORT" % hookdir,
        cmd_cycle_close="%s/record close $NAT_IP $NAT_PORT" % hookdir),
        protect="tcp/22022", enable_local_nat="yes")
    msg = spa.Message("alice", "0.0.0.0", [("tcp", 55000)], msg_type=spa.MSG_LOCAL_NAT,
                      nat_access=ME + ",22022")
    wire = spa.seal(msg.encode(), spa.b64decode(KEY), spa.b64decode(HMAC_KEY))
    d = gate.knock(SRC, ME, wire)
    assert d.accepted, d.reason
    assert "opened tcp/55000 forwarded to %s:22022 for %s" % (ME, SRC) in gate.log.text()
    assert tick_until(gate, lambda: runs(hookdir, "close"))
    assert runs(hookdir, "open")[0]["argv"] == ["open", SRC, "55000", ME, "22022"]
    assert runs(hookdir, "close")[0]["argv"] == ["close", ME, "22022"]
    # One hook at most, and an open that takes 2 s: the next knock is refused, and the
    # close (due after 1 s) waits for the open to end.
    gate = hook_gate(tmp_path / "slow", hook_stanza(
        hookdir, cmd_cycle_open="/bin/sleep 2", cmd_cycle_close="%s/record late" % hookdir))
    gate.hooks.most = 1
    start = time.time()
    assert gate.knock(SRC, ME, knock()).accepted
    d = gate.knock("198.18.0.3", ME, knock(access=[("tcp", 22)]))
    assert not d.accepted and d.reason == "cmd_cycle_open not run: 1 hooks run already, the " \
        "most at once"
    assert tick_until(gate, lambda: runs(hookdir, "late"), 8)
    assert runs(hookdir, "late")[0]["time"] >= start + 2
    assert gate.firewall.close(SRC, "tcp", 22) and not gate.firewall.close(SRC, "tcp", 22)
