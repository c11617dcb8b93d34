"""Operating spa.py's server (issue 13, sections 2, 3 and 5): the README's systemd unit,
signals that fail, a full disk, broken replay files, safe temporary files, `install`.

- The unit: the server runs under exactly the capabilities README.md's unit gives it
  (setpriv, with the unit's bounding set read from README.md) through a reload, SIGUSR1,
  a knock, a command that outruns its time limit and a stop; with CAP_KILL taken away
  as well, every signal that fails is logged and nothing crashes.  The unit file passes
  `systemd-analyze verify`, and runs under a real systemd: the machine's own, booted as
  PID 1 of a throwaway container (PID, mount and cgroup namespaces, an overlay of / that
  takes every write) in a test network namespace, so that it runs whether or not the
  machine boots with systemd (this one does not), and changes nothing on the host.
- Disk and files: a tmpfs of a few KB, filled up, under the replay cache.

Namespace tests need root, ip and nft: outside CI they skip when one is missing, with
CI=true that is a failure (netns_lab.need).  They use only 198.18.0.0/15 and
2001:db8::/32, inside namespaces they made and delete.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import netns_lab
import spa
from netns_lab import Lab, need_lab, wait_for_line
from test_spa import HMAC_KEY, KEY, SERVICE_PORT, closed, packet, timed_knock, write_private

HERE = os.path.dirname(os.path.abspath(__file__))
SPA = os.path.join(HERE, "spa.py")


def need_server():
    need_lab("nft")
    try:
        spa.aes_module()
    except spa.SpaError:
        netns_lab.need(False, "pycryptodome is not installed")


def readme_unit():
    """The text of the unit file that README.md's "Run under systemd" gives."""
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    section = readme.split("### Run under systemd", 1)[1]
    return re.search(r"```ini\n(.*?)```", section, re.S).group(1)


def unit_settings(text):
    """{key: [values]} of a unit file's settings (comments left out)."""
    settings = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_capabilities():
    """The capabilities the unit leaves a root service: its bounding set, lower case."""
    caps = " ".join(unit_settings(readme_unit())["CapabilityBoundingSet"]).split()
    return sorted(c.lower().replace("cap_", "", 1) for c in caps)


def setpriv_argv(caps, no_new_privs):
    """setpriv as systemd sets up a root service: this bounding set, nothing inheritable or
    ambient, and no_new_privs if the unit says NoNewPrivileges=yes."""
    argv = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all",
            "--bounding-set=-all," + ",".join("+" + c for c in caps)]
    return argv + (["--no-new-privs"] if no_new_privs else [])


# A server whose command messages may run 1.5 s instead of 60: otherwise the one in spa.py.
QUICK_COMMANDS = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import spa; "
                  "spa.COMMAND_TIME_LIMIT = 1.5; sys.exit(spa.main(sys.argv[1:]))")


def server_conf(tmp_path, replay_dir=None, **stanza):
    options = {"key_base64": KEY, "hmac_key_base64": HMAC_KEY, "fw_access_timeout": "5"}
    options.update(stanza)
    text = "[server]\nprotect = tcp/%d\nreplay_cache = %s/replay.cache\n[client alice]\n%s" % (
        SERVICE_PORT, replay_dir or tmp_path, "".join("%s = %s\n" % kv for kv in options.items()))
    return write_private(tmp_path / "spa.conf", text)


def alive(pid):
    """True while the process runs (a zombie has ended)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def reader_dropped(server_pid, timeout=3.0):
    """Wait until the server's packet reader runs as its own user (spa.READER_USER); its pid."""
    import pwd
    nobody = str(pwd.getpwnam(spa.READER_USER).pw_uid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in children(server_pid):
            try:
                with open("/proc/%d/status" % pid) as f:
                    uids = re.search(r"^Uid:\s*(.*)$", f.read(), re.M).group(1).split()
            except FileNotFoundError:
                continue
            if uids == [nobody] * 4:
                return pid
        time.sleep(0.005)
    raise TimeoutError("the packet reader did not become %s" % spa.READER_USER)


def send_command(lab, command):
    lab.run("cli1", [sys.executable, SPA, "client", "-D", Lab.srv4(1), "-C", command,
                     "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY])


# ---------------------------------------------------------------------------
# Section 2: signals under exactly the unit's capabilities
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("without_kill", [False, True], ids=["unit", "unit-without-CAP_KILL"])
def test_server_under_the_unit_s_capabilities(tmp_path, without_kill):
    """Reload, SIGUSR1, a knock, a command over its time limit and a stop, under the unit's
    capability set; with CAP_KILL taken away too, each failed signal is logged, not fatal."""
    need_server()
    need_lab("setpriv")
    caps = unit_capabilities()
    assert "kill" in caps, "the unit must keep CAP_KILL: the reader and commands are other users"
    if without_kill:
        caps.remove("kill")
    no_new_privs = unit_settings(readme_unit()).get("NoNewPrivileges") == ["yes"]
    conf = server_conf(tmp_path, enable_cmd_exec="yes", cmd_exec_user="nobody")
    with Lab(clients=1, prefix="ops") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        server = lab.spawn("srv", setpriv_argv(caps, no_new_privs) + [
            sys.executable, "-c", QUICK_COMMANDS, HERE, "server", "-c", conf, "-v"])
        wait_for_line(server, r"listening on", 15)
        status = open("/proc/%d/status" % server.pid).read()
        bounding = int(re.search(r"CapBnd:\s*(\w+)", status).group(1), 16)
        assert bounding == cap_mask(caps)
        os.kill(server.pid, signal.SIGHUP)             # at once: signals are caught by now
        wait_for_line(server, r"reloaded .*spa.conf: 1 client stanza", 3)
        reader_dropped(server.pid)           # before that, the reader is root, and may be signalled
        mark = server.log.mark()
        os.kill(server.pid, signal.SIGUSR1)
        if without_kill:
            wait_for_line(server, r"cannot send signal 10 to the packet reader \(pid \d+\): "
                          r"Operation not permitted \(the server lacks CAP_KILL\)", 3, since=mark)
        else:
            wait_for_line(server, r"stats: received 0, passed on 0", 3, since=mark)
        assert closed(lab, "cli1", Lab.srv4(1))
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None
        send_command(lab, "/bin/sleep 30")
        pid = int(wait_for_line(server, r"running '/bin/sleep 30' as nobody \(pid (\d+)\)", 3).group(1))
        try:
            if without_kill:
                wait_for_line(server, r"cannot send signal 9 to command '/bin/sleep 30'", 4)
                wait_for_line(server, r"ran over 1 s and could not be killed: left running", 1)
                assert alive(pid)
            else:
                wait_for_line(server, r"command '/bin/sleep 30' ran over 1 s: killed", 4)
                wait_for_line(server, r"'/bin/sleep 30' \(pid %d\) exited with status -9" % pid, 2)
                assert not alive(pid)
            assert server.poll() is None
            readers = [p for p in children(server.pid) if p != pid]
            assert len(readers) == 1
            start = time.monotonic()
            os.kill(server.pid, signal.SIGTERM)
            assert server.wait(5) == 0
            stopped = time.monotonic() - start
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        server.log.wait_eof(2)
        text = server.log.text()
        assert "Traceback" not in text and "crashed" not in text, text
        assert "stopping: protected ports stay closed" in text
        assert not any(alive(p) for p in readers)
        assert stopped < 1.0, "the server took %.2f s to stop" % stopped
        assert ("cannot send signal" in text) == without_kill


# linux/capability.h, in order of their numbers.
CAPABILITIES = (
    "chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap linux_immutable "
    "net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner sys_module sys_rawio "
    "sys_chroot sys_ptrace sys_pacct sys_admin sys_boot sys_nice sys_resource sys_time "
    "sys_tty_config mknod lease audit_write audit_control setfcap mac_override mac_admin syslog "
    "wake_alarm block_suspend audit_read perfmon bpf checkpoint_restore").split()


def cap_mask(caps):
    return sum(1 << CAPABILITIES.index(c) for c in caps)


def children(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
        return [int(p) for p in f.read().split()]


# ---------------------------------------------------------------------------
# Section 5: the count of unlogged rejections is not lost at shutdown
# ---------------------------------------------------------------------------

def test_unlogged_rejections_are_counted_at_exit(tmp_path):
    """Rejections past the log's rate limit are summed up every 10 s; a stop before the
    next summary logs the count too (it was lost)."""
    need_server()
    import base64
    conf = server_conf(tmp_path)
    with Lab(clients=1, prefix="ops") as lab:
        server = lab.spawn("srv", [sys.executable, SPA, "server", "-c", conf])
        wait_for_line(server, r"listening on", 15)
        reader_dropped(server.pid)
        sent = 60
        for i in range(sent):            # SPA-shaped garbage: authenticated by nobody
            netns_lab.udp_send(lab.name("cli1"), Lab.srv4(1), spa.DEFAULT_PORT,
                               base64.b64encode(os.urandom(150)).rstrip(b"="))
        wait_for_line(server, r"rejected packet from 198\.18\.1\.2: HMAC", 2)
        time.sleep(0.3)                  # the reader has handled them all
        assert Lab.stop_process(server) == 0
        text = server.log.text()
        logged = len(re.findall(r"rejected packet from 198\.18\.1\.2", text))
        unlogged = re.search(r"(\d+) more rejected packets were not logged \(rate limit\)", text)
        assert unlogged, text
        assert logged + int(unlogged.group(1)) == sent and logged < sent


# ---------------------------------------------------------------------------
# Section 3: a full disk, unreadable replay files, temporary files, the directory
# ---------------------------------------------------------------------------

class SmallDisk(object):
    """A tmpfs of `size` bytes (whole pages) mounted on `path`, mode 0700; fill() takes its
    last free byte, free() gives the space back.  Unmounted on exit."""

    def __init__(self, path, size=20480):
        netns_lab.need(os.geteuid() == 0 and shutil.which("mount"), "mounting a tmpfs needs root")
        self.path = str(path)
        os.makedirs(self.path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d,mode=0700" % size, "tmpfs",
                        self.path], check=True)
        self.filler = os.path.join(self.path, "filler")

    def fill(self):
        with open(self.filler, "ab", buffering=0) as f:
            for block in (4096, 512, 16, 1):
                try:
                    while True:
                        f.write(b"x" * block)
                except OSError as e:
                    assert e.errno == 28
        with pytest.raises(OSError):
            with open(os.path.join(self.path, "probe"), "wb", buffering=0) as f:
                f.write(b"x")

    def free(self):
        os.unlink(self.filler)
        if os.path.exists(os.path.join(self.path, "probe")):
            os.unlink(os.path.join(self.path, "probe"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        subprocess.run(["umount", "-l", self.path], check=True)


def digest(i):
    import hashlib
    return spa.b64encode(hashlib.sha256(b"%d" % i).digest()).decode()


def test_replay_cache_on_a_full_disk_refuses_then_recovers(tmp_path):
    """A write that fails (ENOSPC, partly written) makes add() say False and leaves no
    temporary file; once there is space the whole cache is written anew, clean, with the
    digests of the failed attempts too.  Starting on a full disk works, in that state."""
    now = 1800000000
    with SmallDisk(tmp_path / "disk") as disk:
        path = os.path.join(disk.path, "replay.cache")
        cache = spa.ReplayCache(path, 120, now)
        disk.fill()
        added = 0
        while cache.add(digest(added), now, now):       # the file's last page fills up
            added += 1
            assert added < 500
        assert cache.failure == "No space left on device"
        assert not cache.add(digest(added + 1), now, now)
        assert sorted(os.listdir(disk.path)) == ["filler", "probe", "replay.cache"]
        assert digest(added) in cache                    # remembered, though not durable
        disk.free()
        assert cache.add(digest(added + 2), now, now) and cache.failure is None
        cache.add(digest(added + 3), now, now)
        cache.close()
        with open(path) as f:
            lines = f.read().splitlines()
        assert lines[0].startswith("# spa.py replay cache") and all(
            len(line.split()) == 3 for line in lines[1:])
        again = spa.ReplayCache(path, 120, now)
        assert again.skipped == 0
        assert all(digest(i) in again for i in range(added + 4))
        again.close()
        disk.fill()
        full = spa.ReplayCache(path, 120, now)          # was: "cannot write the replay cache"
        assert full.failure == "No space left on device"
        assert all(digest(i) in full for i in range(added + 4))
        assert not full.add(digest(9999), now, now)
        disk.free()
        assert full.retry() and full.add(digest(10000), now, now)
        full.close()


def test_unreadable_replay_lines_are_skipped(tmp_path):
    """Non-UTF-8 bytes (a traceback at start, before) and malformed lines are skipped and
    counted; the rest is read."""
    now = 1800000000
    path = str(tmp_path / "replay.cache")
    with open(path, "wb") as f:
        f.write(b"# spa.py replay cache\n%s %d %d\n\xff\xfe\x00 garbage \xc3\n%s 12 x\n\n"
                b"%s %d %d\nshort line\n" % (digest(1).encode(), now, now, digest(2).encode(),
                                             digest(3).encode(), now, now))
    cache = spa.ReplayCache(path, 120, now)
    assert digest(1) in cache and digest(3) in cache and digest(2) not in cache
    assert cache.skipped == 3
    cache.close()
    with open(path, "rb") as f:
        assert b"\xff" not in f.read()                  # the file is written anew, clean


def test_replay_cache_temporary_file_follows_no_symlink(tmp_path):
    """The temporary file had a fixed name (replay.cache.tmp) and was opened with O_TRUNC,
    following symlinks: one planted there made root overwrite any file."""
    now = 1800000000
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    path = str(directory / "replay.cache")
    os.symlink(str(victim), path + ".tmp")
    cache = spa.ReplayCache(path, 120, now)
    cache.add(digest(1), now, now)
    for _ in range(3):
        cache.rewrite()
    cache.close()
    assert victim.read_text() == "precious\n"
    assert os.path.islink(path + ".tmp") and not os.path.islink(path)
    assert sorted(os.listdir(str(directory))) == ["replay.cache", "replay.cache.tmp"]
    assert digest(1) in spa.ReplayCache(path, 120, now)


def test_replay_cache_directory_must_be_root_s_alone(tmp_path):
    """A directory others may write to (or that another user owns) is refused, at start
    and by check-config, with a one-line reason."""
    import pwd
    directory = tmp_path / "state"
    directory.mkdir()
    os.chmod(str(directory), 0o777)
    path = str(directory / "replay.cache")
    with pytest.raises(spa.SpaError, match=r"^replay cache: .*/state is writable by group or "
                       r"others \(mode 0777\): run 'chmod go-w .*/state'$"):
        spa.ReplayCache(path, 120)
    os.chmod(str(directory), 0o1733)                  # sticky, like /tmp: refused too
    with pytest.raises(spa.SpaError, match="writable by group or others"):
        spa.ReplayCache(path, 120)
    conf = write_private(tmp_path / "spa.conf", "[server]\ninterface = lo\nprotect = tcp/22\n"
                         "replay_cache = %s\n[client alice]\nkey_base64 = %s\n"
                         "hmac_key_base64 = %s\n" % (path, KEY, HMAC_KEY))
    done = subprocess.run([sys.executable, SPA, "check-config", "-c", conf], stdout=subprocess.PIPE,
                          universal_newlines=True)
    assert done.returncode == 1
    assert re.search(r"FAIL  replay cache .*/replay.cache: .*/state is writable by group or others "
                     r"\(mode 1733\)", done.stdout), done.stdout
    os.chmod(str(directory), 0o700)
    if os.geteuid() == 0:
        os.chown(str(directory), pwd.getpwnam("nobody").pw_uid, -1)
        with pytest.raises(spa.SpaError, match=r"state belongs to uid \d+, not to root"):
            spa.ReplayCache(path, 120)
        done = subprocess.run([sys.executable, SPA, "check-config", "-c", conf],
                              stdout=subprocess.PIPE, universal_newlines=True)
        assert re.search(r"FAIL  replay cache .*: .*/state belongs to uid \d+, not to root",
                         done.stdout), done.stdout
        os.chown(str(directory), 0, -1)
    spa.ReplayCache(path, 120).close()
    done = subprocess.run([sys.executable, SPA, "check-config", "-c", conf], stdout=subprocess.PIPE,
                          universal_newlines=True)
    assert "ok    replay cache %s\n" % path in done.stdout


def test_server_on_a_full_disk_refuses_knocks_and_recovers(tmp_path):
    """The disk under the replay cache fills while the server runs: it keeps running and
    refuses knocks with a log line (nothing opens without a durable digest), and accepts
    them again by itself once there is space.  Restarted on a full disk (with a replay file
    holding non-UTF-8 bytes), it starts, refuses, and recovers the same way."""
    need_server()
    with SmallDisk(tmp_path / "disk") as disk, Lab(clients=2, prefix="ops") as lab:
        for k in (1, 2):
            lab.tcp_service("srv", Lab.srv4(k), SERVICE_PORT)
        conf = server_conf(tmp_path, replay_dir=disk.path, fw_access_timeout="30")
        server = lab.spawn("srv", [sys.executable, SPA, "server", "-c", conf])
        wait_for_line(server, r"listening on", 15)
        disk.fill()
        for i in range(300):           # knocks until the replay file's last page is full
            netns_lab.udp_send(lab.name("cli1"), Lab.srv4(1), spa.DEFAULT_PORT, packet())
            if "cannot be written" in server.log.text():
                break
            time.sleep(0.002)
        wait_for_line(server, r"replay cache .*replay.cache cannot be written \(No space left on "
                      r"device\): knocks are refused until it can", 2)
        assert timed_knock(lab, "cli2", Lab.srv4(2)) is None
        wait_for_line(server, r"rejected packet from 198\.18\.2\.2 \[client alice\]: no durable "
                      r"replay record \(No space left on device\)", 1)
        assert server.poll() is None and closed(lab, "cli2", Lab.srv4(2))
        disk.free()
        wait_for_line(server, r"replay cache .* can be written again: knocks are accepted again", 2)
        assert timed_knock(lab, "cli2", Lab.srv4(2)) is not None
        assert Lab.stop_process(server) == 0
        assert "Traceback" not in server.log.text()

        lab.run("srv", ["nft", "flush", "set", "inet", "spa", "allow4"])
        with open(os.path.join(disk.path, "replay.cache"), "ab") as f:
            f.write(b"\xff\xfe not UTF-8 \xc3(\n")
        disk.fill()
        server = lab.spawn("srv", [sys.executable, SPA, "server", "-c", conf])
        wait_for_line(server, r"listening on", 15)
        wait_for_line(server, r"replay cache .*: skipped 1 line\(s\) that could not be read", 1)
        wait_for_line(server, r"cannot be written \(No space left on device\): knocks are refused", 1)
        assert timed_knock(lab, "cli2", Lab.srv4(2)) is None
        wait_for_line(server, r"rejected packet from 198\.18\.2\.2 \[client alice\]: no durable", 1)
        disk.free()
        assert timed_knock(lab, "cli2", Lab.srv4(2)) is not None
        assert Lab.stop_process(server) == 0
        assert "Traceback" not in server.log.text()


# ---------------------------------------------------------------------------
# Section 3: install
# ---------------------------------------------------------------------------

def install(prefix, *extra, umask=None):
    def child():
        if umask is not None:
            os.umask(umask)
    return subprocess.run([sys.executable, SPA, "install", "--prefix", str(prefix)] + list(extra),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          preexec_fn=child)


def modes(top):
    """{path under top: mode} of everything there, symlinks not followed."""
    out = {}
    for root, dirs, files in os.walk(str(top)):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, str(top))] = oct(os.lstat(path).st_mode & 0o7777)
    return out


def test_install_sets_modes_whatever_the_umask(tmp_path):
    """With umask 000, lib/ and __pycache__/ came out 0777: anyone could swap the code root
    runs.  Modes are set explicitly now; a directory an old install left writable by others
    is refused (what is in it may have been changed), and set right once it is not."""
    prefix = tmp_path / "prefix"
    done = install(prefix, umask=0)
    assert done.returncode == 0, done.stderr
    pyc = [p for p in modes(prefix) if p.endswith(".pyc")]
    assert len(pyc) == 1
    expected = {"bin": "0o755", "bin/spa": "0o755", "bin/spa.py": "0o777",     # (a symlink)
                "lib": "0o755", "lib/spa": "0o755",
                "lib/spa/spa.py": "0o644", "lib/spa/__pycache__": "0o755", pyc[0]: "0o644"}
    assert modes(prefix) == expected
    for where in ("lib/spa", "lib/spa/__pycache__"):
        os.chmod(str(prefix / where), 0o777)                # as the old install left it
        done = install(prefix, umask=0)
        assert done.returncode == 1 and "%s is writable by others (mode 0777)" % where in done.stderr
        os.chmod(str(prefix / where), 0o775)
    assert install(prefix, umask=0).returncode == 0
    assert modes(prefix) == expected


def test_install_follows_no_planted_symlink(tmp_path):
    """A symlink planted at bin/spa.new (the old fixed temporary name), at bin/spa or at
    lib/spa/spa.py was followed: root overwrote its target."""
    prefix = tmp_path / "prefix"
    assert install(prefix).returncode == 0
    victims = []
    for where in ("bin/spa.new", "bin/spa", "lib/spa/spa.py"):
        victim = tmp_path / ("victim-" + where.replace("/", "-"))
        victim.write_text("precious\n")
        victims.append(victim)
        path = prefix / where
        if path.exists():
            path.unlink()
        os.symlink(str(victim), str(path))
    done = install(prefix)
    assert done.returncode == 0, done.stderr
    assert all(v.read_text() == "precious\n" for v in victims)
    assert not os.path.islink(str(prefix / "bin" / "spa"))
    assert not os.path.islink(str(prefix / "lib" / "spa" / "spa.py"))
    assert os.path.islink(str(prefix / "bin" / "spa.new"))            # left alone
    assert sorted(os.listdir(str(prefix / "bin"))) == ["spa", "spa.new", "spa.py"]
    assert os.readlink(str(prefix / "bin" / "spa.py")) == "spa"


def test_install_refuses_directories_others_may_change(tmp_path):
    """A prefix, lib or bin writable by others, or owned by another user, is refused with
    one line; so is a symlink where lib/spa goes."""
    import pwd
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    os.chmod(str(prefix), 0o777)
    done = install(prefix)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert re.search(r"error: .*/prefix is writable by others \(mode 0777\): run 'chmod o-w ",
                     done.stderr), done.stderr
    os.chmod(str(prefix), 0o755)
    (prefix / "bin").mkdir(mode=0o755)
    os.chmod(str(prefix / "bin"), 0o1777)
    assert "bin is writable by others" in install(prefix).stderr
    os.chmod(str(prefix / "bin"), 0o775)                # group-writable: Debian's staff
    assert install(prefix).returncode == 0
    if os.geteuid() == 0:
        os.chown(str(prefix / "lib"), pwd.getpwnam("nobody").pw_uid, -1)
        done = install(prefix)
        assert done.returncode == 1 and re.search(r"lib belongs to uid \d+, not to root", done.stderr)
        os.chown(str(prefix / "lib"), 0, -1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(str(prefix / "lib" / "spa"))
    os.symlink(str(elsewhere), str(prefix / "lib" / "spa"))
    done = install(prefix)
    assert done.returncode == 1 and "lib/spa is a symlink" in done.stderr
    assert os.listdir(str(elsewhere)) == []


def test_launcher_runs_python_isolated(tmp_path):
    """The launcher runs its Python with -I: a module on PYTHONPATH (or in the user's
    site-packages, or the current directory) named like one spa.py imports is not run;
    it still finds spa (its own lib directory) and pycryptodome."""
    prefix = tmp_path / "prefix"
    done = install(prefix)
    assert done.returncode == 0, done.stderr
    launcher = str(prefix / "bin" / "spa")
    with open(launcher) as f:
        first = f.readline().rstrip("\n")
    python = first[2:].rsplit(" ", 1)[0]
    assert first == "#!%s -I" % python
    assert re.search(r"the launcher runs %s -I \(isolated\): " % re.escape(python), done.stdout)
    evil = tmp_path / "evil"
    evil.mkdir()
    for name in ("argparse", "spa", "socket"):
        (evil / (name + ".py")).write_text("print('EVIL %s')\n" % name)
    env = dict(os.environ, PYTHONPATH=str(evil), PYTHONUSERBASE=str(evil), PYTHONSTARTUP="")
    out = subprocess.run([launcher, "client", "-D", "198.18.0.1", "-A", "tcp/22", "--key-base64",
                          KEY, "--hmac-key-base64", HMAC_KEY, "--test"], cwd=str(evil), env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True)
    assert out.returncode == 0 and "EVIL" not in out.stdout, out.stdout
    from test_spa import server_config, decide
    assert decide(server_config(tmp_path), out.stdout.strip().encode()).accepted   # AES: found


def test_install_pins_a_python_root_can_trust_and_says_why(tmp_path):
    """The system's /usr/bin/python3 when it can run spa.py with AES, else the installing
    one; --python chooses; one that another user could change is refused."""
    import pwd
    prefix = tmp_path / "prefix"
    system_ok = os.path.exists("/usr/bin/python3") and subprocess.run(
        ["/usr/bin/python3", "-I", "-B", "-c", spa._CAN_RUN_SPA, HERE],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    done = install(prefix)
    assert done.returncode == 0, done.stderr
    if system_ok:
        assert "runs /usr/bin/python3 -I (isolated): the system's Python" in done.stdout
    else:
        assert "runs %s -I (isolated): the Python running this install" % sys.executable in done.stdout
    done = install(prefix, "--python", sys.executable)
    assert "runs %s -I (isolated): given with --python" % sys.executable in done.stdout
    with open(str(prefix / "bin" / "spa")) as f:
        assert f.readline() == "#!%s -I\n" % sys.executable
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        fake = theirs / "python3"
        fake.write_text("#!/bin/sh\nexit 0\n")
        os.chmod(str(fake), 0o755)
        os.chown(str(fake), pwd.getpwnam("nobody").pw_uid, -1)
        done = install(prefix, "--python", str(fake))
        assert done.returncode == 1 and re.search(
            r"no Python to run spa.py with: .*python3 belongs to uid \d+ \(mode 0755\): root would "
            r"run what that user may change; name one with --python", done.stderr), done.stderr


# ---------------------------------------------------------------------------
# Section 2: the unit under a real systemd
# ---------------------------------------------------------------------------

# Run by sh as PID 1 of new PID, mount, cgroup, UTS and IPC namespaces, inside a test's
# network namespace: the root becomes an overlay of / whose writes all go to a tmpfs, with
# its own /proc, /dev, /run, /tmp and cgroup2 (the container's own cgroup as its root);
# the files of $2 are laid over it, $3 runs in it (chroot), and systemd boots there.
BOOT = r"""
set -e
S=$1 R=$1/root
mount -t tmpfs -o mode=0755 tmpfs "$S"
mkdir "$S/upper" "$S/work" "$R"
mount -t overlay overlay -o "lowerdir=/,upperdir=$S/upper,workdir=$S/work" "$R"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=0755 tmpfs "$R/dev"
for d in null zero full random urandom tty; do touch "$R/dev/$d"; mount --bind "/dev/$d" "$R/dev/$d"; done
touch "$R/dev/console"; mount --bind /dev/null "$R/dev/console"
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"; ln -s /proc/self/fd "$R/dev/fd"
mount -t tmpfs tmpfs "$R/dev/shm"
mount -t tmpfs -o mode=0755 tmpfs "$R/run"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
cp -a "$2/." "$R/"
hostname spa-test
chroot "$R" /bin/sh -c "$3"
cd "$R"
mkdir -p oldroot
pivot_root . oldroot
umount -l /oldroot
exec env -i container=spa-test /lib/systemd/systemd --unit="$4"
"""


def cgroup2_mount():
    """Where this machine mounts the cgroup2 hierarchy, or None."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                return fields[4]
    return None


def systemd_missing():
    """Why this machine cannot boot a systemd in a container, or None."""
    with open("/proc/filesystems") as f:
        kinds = f.read().split()
    if "overlay" not in kinds:
        return "the kernel has no overlayfs"
    if cgroup2_mount() is None:
        return "no cgroup2 hierarchy is mounted"
    if not os.path.exists("/proc/self/ns/cgroup"):
        return "the kernel has no cgroup namespaces"
    return None


class SystemdContainer(object):
    """A real systemd (the machine's /lib/systemd/systemd) booted as PID 1 of a throwaway
    container in network namespace `ns`; see BOOT.  `files` {path in the container: (text,
    mode)} are put in its root, then `setup` runs there (chroot), then systemd boots with
    `unit` as its target.  run(argv) runs a command inside (nsenter).  Leaving the `with`
    block powers it off (or kills it) and removes its cgroup: nothing of the host changed."""

    def __init__(self, lab, ns, tmp_path, files, setup="true", unit="multi-user.target"):
        self.lab, self.ns = lab, lab.name(ns)
        self.state = str(tmp_path / "container")
        self.payload = str(tmp_path / "payload")
        os.makedirs(self.state)
        os.makedirs(self.payload)
        for path, (text, mode) in files.items():
            full = os.path.join(self.payload, path.lstrip("/"))
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(text)
            os.chmod(full, mode)
        self.cgroup = os.path.join(cgroup2_mount(), "spa-test-%d-%d" % (os.getpid(), id(self) % 10000))
        self.setup, self.unit = setup, unit
        self.proc = self.pid = None

    def __enter__(self):
        os.mkdir(self.cgroup)
        procs = os.path.join(self.cgroup, "cgroup.procs")

        def join():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        try:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, "unshare", "--cgroup", "--mount", "--pid",
                 "--fork", "--uts", "--ipc", "--propagation", "private", "sh", "-c", BOOT, "boot",
                 self.state, self.payload, self.setup, self.unit],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                preexec_fn=join, universal_newlines=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.poll() is None:
                kids = children(self.proc.pid)
                if kids and os.readlink("/proc/%d/exe" % kids[0]).endswith("/systemd"):
                    self.pid = kids[0]
                    break
                time.sleep(0.01)
            if self.pid is None:
                raise RuntimeError("systemd did not start:\n%s" % self.output())
            while time.monotonic() < deadline:
                state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return self
                time.sleep(0.05)
            raise RuntimeError("systemd did not finish booting (%s)" % state)
        except BaseException:
            self.close()
            raise

    def output(self):
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stdout.read()

    def run(self, argv, check=True, timeout=30):
        done = subprocess.run(["nsenter", "-t", str(self.pid), "-a", "-r", "-w"] + list(argv),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError("%s: exit %d\n%s%s" % (" ".join(argv), done.returncode,
                                                         done.stdout, done.stderr))
        return done

    def journal(self, unit="spa"):
        return self.run(["journalctl", "-u", unit, "-o", "cat", "--no-pager"]).stdout

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            if self.pid is not None:
                self.run(["systemctl", "poweroff"], check=False)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                if self.pid is not None:
                    os.kill(self.pid, signal.SIGKILL)      # PID 1: its namespace ends with it
                self.proc.wait(10)
        for _ in range(200):
            try:
                for root, dirs, _ in os.walk(self.cgroup, topdown=False):
                    for d in dirs:
                        os.rmdir(os.path.join(root, d))
                os.rmdir(self.cgroup)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)

    def __exit__(self, *exc):
        self.close()


def need_systemd():
    """Skip (even in CI, saying why) only where this machine cannot run a systemd at all;
    a missing package is a failure in CI, as for every other tool (setup.sh installs it)."""
    need_server()
    need_lab("nsenter", "unshare", "systemd-analyze", "journalctl", "systemctl")
    netns_lab.need(os.path.exists("/lib/systemd/systemd"), "systemd is not installed")
    why = systemd_missing()
    if why:
        pytest.skip("this machine cannot run systemd, even in a container: %s" % why)
    netns_lab.need(subprocess.run(["/usr/bin/python3", "-I", "-B", "-c", spa._CAN_RUN_SPA, HERE],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0,
                   "/usr/bin/python3 cannot load pycryptodome (apt install python3-pycryptodome)")


def spa_container(lab, tmp_path, conf):
    """A systemd with README.md's unit as /etc/systemd/system/spa.service, spa.py installed
    with `spa.py install` (/usr/local) and `conf` as /etc/spa/spa.conf; booted to basic.target."""
    with open(SPA) as f:
        code = f.read()
    files = {"/etc/systemd/system/spa.service": (readme_unit(), 0o644),
             "/etc/spa/spa.conf": (conf, 0o600), "/root/spa.py": (code, 0o644)}
    return SystemdContainer(lab, "srv", tmp_path, files, unit="basic.target",
                            setup="/usr/bin/python3 /root/spa.py install >/dev/null")


def main_pid(box):
    return int(box.run(["systemctl", "show", "-p", "MainPID", "--value", "spa"]).stdout)


def test_the_unit_under_a_real_systemd(tmp_path):
    """README.md's unit, as it is, under a real systemd (in a container): it passes `systemd-analyze verify`; the server starts with the
    unit's capabilities and sandbox, survives `systemctl reload` and SIGUSR1, opens for a
    knock, runs a command message, and stops at once with `systemctl stop` (a command still
    running goes with it); and the same with the iptables-legacy back end and syslog."""
    need_systemd()
    conf = ("[server]\nprotect = tcp/%d\n[client alice]\nkey_base64 = %s\nhmac_key_base64 = %s\n"
            "fw_access_timeout = 30\nenable_cmd_exec = yes\ncmd_exec_user = nobody\n"
            % (SERVICE_PORT, KEY, HMAC_KEY))
    caps = unit_capabilities()
    with Lab(clients=1, prefix="ops") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        with spa_container(lab, tmp_path, conf) as box:
            verify = box.run(["systemd-analyze", "verify", "/etc/systemd/system/spa.service"],
                             check=False)
            assert verify.returncode == 0 and "spa.service" not in verify.stderr, verify.stderr
            box.run(["systemctl", "start", "spa"])        # Type=notify: returns once it listens
            assert any("listening on any udp/62201" in line for line in journal_lines(box))
            pid = main_pid(box)
            status = box.run(["cat", "/proc/%d/status" % pid]).stdout
            assert int(re.search(r"CapBnd:\s*(\w+)", status).group(1), 16) == cap_mask(caps)
            assert re.search(r"NoNewPrivs:\s*1", status) and re.search(r"Seccomp:\s*2", status)
            mounts = {line.split()[4]: line.split()[5].split(",")[0] for line in
                      box.run(["cat", "/proc/%d/mountinfo" % pid]).stdout.splitlines()}
            assert (mounts["/"], mounts["/run"], mounts["/var/lib/spa"], mounts["/run/xtables.lock"],
                    mounts["/tmp"]) == ("ro", "ro", "rw", "rw", "rw"), mounts
            mark = len(journal_lines(box))
            box.run(["systemctl", "reload", "spa"])
            wait_journal(box, r"reloaded /etc/spa/spa.conf: 1 client stanza", mark)
            reader = int(box.run(["cat", "/proc/%d/task/%d/children" % (pid, pid)]).stdout.split()[0])
            wait_uid(box, reader, spa.READER_USER)
            mark = len(journal_lines(box))
            box.run(["systemctl", "kill", "--kill-who=main", "-s", "USR1", "spa"])
            wait_journal(box, r"stats: received 0, passed on 0, rejected 0", mark)
            assert closed(lab, "cli1", Lab.srv4(1))
            assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None
            for command in ("/bin/true", "/bin/sleep 30"):
                send_command(lab, command)
                sleeping = wait_journal(box, r"running %s as nobody \(pid (\d+)\)"
                                        % re.escape(repr(command)), mark).group(1)
            wait_journal(box, r"'/bin/true' \(pid \d+\) exited with status 0", mark)
            mark = len(journal_lines(box))
            start = time.monotonic()
            box.run(["systemctl", "stop", "spa"])
            stopped = time.monotonic() - start
            print("systemctl stop: %.3f s" % stopped)
            after = journal_lines(box)[mark:]
            assert any(line.startswith("stats: ") or " stats: " in line for line in after), after
            assert any("stopping: protected ports stay closed" in line for line in after), after
            journal = "\n".join(journal_lines(box))
            assert not re.search(r"Traceback|crashed|cannot send signal|ermission|denied", journal), journal
            assert box.run(["systemctl", "show", "-p", "Result", "--value", "spa"]).stdout.strip() == "success"
            assert box.run(["test", "-e", "/proc/" + sleeping], check=False).returncode == 1  # gone too
            assert stopped < 2.0, "systemctl stop took %.2f s" % stopped
            listed = box.run(["nft", "list", "table", "inet", "spa"]).stdout
            assert "reject with tcp reset" in listed                  # dark while stopped
            # The back end that needs a file (its lock), and syslog through /dev/log.
            box.run(["sed", "-i", r"s/^\[server\]$/[server]\nfirewall = iptables-legacy\nlog = syslog/",
                     "/etc/spa/spa.conf"])
            box.run(["nft", "delete", "table", "inet", "spa"])
            lab.run("srv", ["nft", "flush", "ruleset"])
            mark = len(journal_lines(box))
            box.run(["systemctl", "start", "spa"])
            wait_journal(box, r"listening on any udp/62201", mark)
            assert closed(lab, "cli1", Lab.srv4(1))
            assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None
            wait_journal(box, r"accepted packet from 198\.18\.1\.2 \[client alice\]", mark)
            assert "--reject-with tcp-reset" in lab.run("srv", ["iptables-legacy", "-S", "SPA_INPUT"]).stdout
            box.run(["systemctl", "stop", "spa"])
            assert box.run(["systemctl", "show", "-p", "Result", "--value", "spa"]).stdout.strip() == "success"
            # Through /dev/log, a line is the message alone (on stderr it has a time stamp).
            assert any(line.startswith("listening on any udp/62201")
                       for line in journal_lines(box)[mark:]), journal_lines(box)[mark:]
            lab.run("srv", ["iptables-legacy", "-F"])
            assert "Traceback" not in "\n".join(journal_lines(box))
            # A config it cannot run with: `systemctl start` says so (Type=simple said "ok").
            box.run(["sed", "-i", "s/^protect = .*/protect = tcp\\/0/", "/etc/spa/spa.conf"])
            mark = len(journal_lines(box))
            assert box.run(["systemctl", "start", "spa"], check=False).returncode != 0
            wait_journal(box, r"spa.py server: error: .*protect", mark)


def journal_lines(box):
    return box.run(["journalctl", "-u", "spa", "-o", "cat", "--no-pager"]).stdout.splitlines()


def wait_journal(box, pattern, since=0, timeout=5.0):
    """The first match of `pattern` in the spa unit's journal lines from index `since` on."""
    deadline = time.monotonic() + timeout
    while True:
        lines = journal_lines(box)[since:]
        for line in lines:
            m = re.search(pattern, line)
            if m:
                return m
        if time.monotonic() > deadline:
            raise TimeoutError("no %r in the journal:\n%s" % (pattern, "\n".join(lines[-30:])))
        time.sleep(0.05)


def wait_uid(box, pid, user, timeout=3.0):
    import pwd
    uid = str(pwd.getpwnam(user).pw_uid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = box.run(["cat", "/proc/%d/status" % pid], check=False).stdout
        if re.search(r"^Uid:\s+%s\s" % uid, status, re.M):
            return
        time.sleep(0.01)
    raise TimeoutError("pid %d is not %s" % (pid, user))


class ListLog(object):
    """A stand-in for spa.Log that keeps the lines."""

    def __init__(self):
        self.lines = []

    def error(self, text, *args):
        self.lines.append(text % args)
    info = warning = debug = error


def stubborn_reader():
    """(pid, read end) of a child that keeps its end of the pipe and ignores SIGTERM."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(30)
        os._exit(0)
    os.close(w)
    return pid, r


def test_a_reader_that_does_not_end_is_killed_or_left_logged(tmp_path, monkeypatch):
    """The reader ends when its pipe closes; one that does not is killed after `wait`; if
    even that is refused (no CAP_KILL), it is logged and left, never waited for forever."""
    log = ListLog()
    sup = spa.ReaderProcess(None, log)
    sup.pid, sup.fd = stubborn_reader()
    start = time.monotonic()
    sup.stop(wait=0.3)
    assert 0.3 <= time.monotonic() - start < 1.0
    assert sup.pid is None and sup.strays == [] and log.lines == []
    pid, sup.fd = stubborn_reader()
    sup.pid = pid
    refused = []
    monkeypatch.setattr(spa, "send_signal", lambda *args: refused.append(args[1:3]) or False)
    try:
        sup.stop(wait=0.2)
        assert refused == [(pid, signal.SIGKILL)]
        assert log.lines == ["the packet reader (pid %d) did not stop; left behind" % pid]
        assert sup.strays == [pid] and alive(pid)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
