"""single_use (issue 15): openings that admit one connection, ended by the kernel.

The unit tests need nothing.  The others run the real firewall (nft, iptables-nft and
iptables-legacy), IPv4 and IPv6, in throwaway network namespaces (netns_lab, prefix "su";
198.18.0.0/15 and 2001:db8::/32 only), with a real TCP and UDP service behind it, and the
real fwknop client for what fwknop's users see.  The NAT measurement is test_piggyback.py.
"""

import os
import socket
import sys
import time

import pytest

import netns_lab
import spa
from netns_lab import InNetns, Lab, ip6, ns_socket, tcp_try, udp_try, wait_for_line
from test_spa import HMAC_KEY, KEY, Lines, knock, server_config, write_private
from test_gatekeeper import gatekeeper, ME, SRC

HERE = os.path.dirname(os.path.abspath(__file__))
SPA = os.path.join(HERE, "spa.py")
FIREWALLS = ("nft", "iptables-nft", "iptables-legacy")
TCP_PORT, UDP_PORT, SPORT = 2222, 5353, 50123


# ----------------------------------------------------- unit tests, no root

def test_single_use_is_a_yes_no_stanza_option_off_by_default(tmp_path):
    config = server_config(tmp_path, {"a": {}, "b": {"single_use": "yes"}})
    assert [s.single_use for s in config.stanzas] == [False, True]
    assert config.single_use
    assert not server_config(tmp_path, {"a": {"single_use": "no"}}).single_use
    with pytest.raises(spa.SpaError, match="single_use"):
        server_config(tmp_path, {"a": {"single_use": "maybe"}})


def test_single_use_is_refused_where_spa_py_has_no_single_use_openings(tmp_path):
    with pytest.raises(spa.SpaError, match="single_use = yes with forward_all"):
        server_config(tmp_path, {"a": {"single_use": "yes", "enable_nat": "yes",
                                       "forward_all": "yes"}}, enable_forwarding="yes")
    with pytest.raises(spa.SpaError, match="firewall = none, and .client a. has single_use"):
        server_config(tmp_path, {"a": {"single_use": "yes", "cmd_cycle_open": "/bin/true $IP",
                                       "cmd_cycle_close": "NONE", "cmd_cycle_user": "nobody"}},
                      firewall="none")
    with pytest.raises(spa.SpaError, match="bind_interface = yes with a single_use stanza"):
        server_config(tmp_path, {"a": {"single_use": "yes"}}, bind_interface="yes",
                      interface="eth0")


def test_connect_port_is_a_dynamic_port_the_packet_decides():
    ports = {spa.connect_port(spa.random_digits(16)) for _ in range(200)}
    assert all(49152 <= p <= 65535 for p in ports) and len(ports) > 150
    assert spa.connect_port("1234567890123456") == spa.connect_port("1234567890123456")


def test_the_gatekeeper_opens_single_use_openings_with_the_knocks_connect_port(tmp_path):
    gate = gatekeeper(tmp_path, {"once": {"single_use": "yes", "open_ports": "tcp/22, udp/53"}})
    msg = spa.Message("alice", "0.0.0.0", [("tcp", 22), ("udp", 53)])
    payload = spa.seal(msg.encode(), spa.b64decode(KEY), spa.b64decode(HMAC_KEY))
    d = gate.knock(SRC, ME, payload)
    assert d.accepted, d.reason
    port = spa.connect_port(msg.rand)
    assert gate.firewall.opened == [(SRC, "tcp", 22, 30, port, "single use"),
                                    (SRC, "udp", 53, 30, port, "single use")]
    assert "for one connection (single_use)" in gate.log.text()
    # A stanza without it: plain openings, as before.
    (tmp_path / "p").mkdir()
    plain = gatekeeper(tmp_path / "p")
    assert plain.knock(SRC, ME, knock()).accepted
    assert plain.firewall.opened == [(SRC, "tcp", 22, 30)]


def test_nft_rules_of_single_use_openings_only_where_a_stanza_asks():
    fw = spa.NftFirewall([("tcp", 22)])
    assert not any("once" in c or "confirmed" in c for c in fw.commands())
    fw.once = True
    text = "\n".join(fw.commands())
    assert "add set inet spa once4 { type ipv4_addr . inet_proto . inet_service; size 65535; " \
        "flags dynamic,timeout; }" in text
    assert "oncep6 { type ipv6_addr . inet_proto . inet_service . inet_service" in text
    assert "add set inet spa ready6 { type ipv6_addr . inet_proto . inet_service; " in text
    rules = [c for c in fw.commands() if " input " in c and "once" in c]
    # The preferred port, then the grace period's drop, then the first comer, each only for
    # an opening that is ready; each takes the opening away; the confirmed flow's own
    # packets before all of them.
    ready = "ct state new ip saddr . meta l4proto . th dport @ready4 "
    # (Only one can: the gate's limit; test_single_use_versions.py.)
    take = ("@once4 add @gate4 { ip saddr . meta l4proto . th dport timeout 10s limit rate "
            "1/hour burst 1 packets } delete @once4 { ip saddr . meta l4proto . th dport } "
            "accept")
    assert rules[0].endswith(ready + "ip saddr . meta l4proto . th dport . th sport "
                             "@oncep4 ip saddr . meta l4proto . th dport " + take)
    assert rules[1].endswith(ready + "ip saddr . meta l4proto . th dport @grace4 "
                             "ip saddr . meta l4proto . th dport @once4 drop")
    assert rules[2].endswith(ready + "ip saddr . meta l4proto . th dport " + take)
    assert text.index("ct status confirmed accept") < text.index("@once4")
    assert "ip saddr . meta l4proto . th dport @once4 return" in text      # not steered


def test_nft_makes_an_opening_ready_only_after_its_once_element_is_committed():
    """The packet path sees the elements of a transaction being committed before it can
    delete them: ready4 comes in a transaction of its own, after once4's."""
    fw = spa.NftFirewall([("tcp", 22)])
    fw.once = True
    commits = []
    fw.kernel = type("Kernel", (), {"commit": lambda self, batch: commits.append(batch)})()
    assert fw.open_once([("198.18.0.9", "tcp", 22, 30, 50000)]) == 1
    first, second = commits
    names = lambda phase: sorted(place[2] for place, _, _, _ in phase)     # noqa: E731
    assert names(first.last) == ["grace4", "once4", "oncep4"]
    assert names(first.deletes) == ["gate4", "grace4", "once4", "oncep4", "ready4"]
    assert (names(second.first), names(second.deletes), names(second.last)) == \
        ([], [], ["ready4"])
    assert second.last[0][3] == 30


def test_iptables_rules_of_single_use_openings_parse_back():
    fw = spa.IptablesFirewall([("tcp", 22)])
    assert not any("CONFIRMED" in r for r in fw._protect_rules(4))
    fw.once = True
    assert fw._protect_rules(4)[1] == ["-m", "conntrack", "--ctstate", "NEW", "--ctstatus",
                                       "CONFIRMED", "-j", "ACCEPT"]
    key = ("198.18.1.2", "tcp", 22)
    first, grace, anyone = fw._once_rules(key, 1893456001, SPORT)
    assert first[first.index("--sport") + 1] == str(SPORT) and first[-1] == "ACCEPT"
    assert first.index("--remove") > first.index("--comment")        # the last match
    assert grace[-1] == "DROP" and "--seconds" in grace and "spa_gtcp22" in grace
    assert "--sport" not in anyone and "--remove" in anyone
    for words in (first, grace, anyone):
        verdict = words[-1]
        assert spa._parse_opening(words, verdict, spa.IPT_ONCE_COMMENT) == (key, 1893456001)
        assert spa._parse_opening(words, verdict) is None       # not a plain opening
    ret = fw._once_rules(key, 1893456001, 0, "RETURN")
    assert len(ret) == 1 and "--rcheck" in ret[0] and "--remove" not in ret[0]


def test_the_client_connects_from_the_knocks_port_and_knocks_again_only_between_attempts(
        monkeypatch):
    """--connect against a port that refuses: every attempt from the knock's port, a fresh
    knock now and then (each naming its own port), never one while an attempt is under way."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.close()                                   # nothing listens: every attempt refused
    knocks, used = [], []
    real = spa._connect_attempt

    def attempt(info, sport=None):
        used.append(sport)
        return real(info, sport)
    monkeypatch.setattr(spa, "_connect_attempt", attempt)

    def knock_again():
        knocks.append(time.monotonic())
        return 50000 + len(knocks)
    with pytest.raises(spa.SpaError, match="did not open"):
        spa.connect_when_open("127.0.0.1", port, knock_again, wait=0.5, sport=50000)
    assert 2 <= len(knocks) <= 5                    # 0.05, 0.15, 0.35 s...
    assert used[0] == 50000 and set(used) <= {50000 + i for i in range(len(knocks) + 1)}
    assert used[-1] == 50000 + len(knocks)


# ------------------------------------------------------------ in namespaces

def need(firewall):
    if firewall == "nft":
        netns_lab.need_lab("nft")
    else:
        netns_lab.need_lab(firewall, ip6(firewall), firewall + "-restore",
                           ip6(firewall) + "-restore")


def make(lab, firewall, protect=((("tcp", TCP_PORT)), ("udp", UDP_PORT))):
    if firewall == "nft":
        fw = spa.NftFirewall(list(protect), table="spa_su")
    else:
        fw = spa.IptablesFirewall(list(protect), command=firewall)
    fw.once = True
    f = InNetns(lab.ns["srv"], fw)
    f.setup()
    return f


def connect_from(ns, addr, port, sport=None, timeout=0.4):
    """A connected socket from `sport` (any if None), or 'refused' / 'timeout'."""
    s = ns_socket(ns, socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sport:
        s.bind(("", sport))
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
        return s
    except ConnectionRefusedError:
        s.close()
        return "refused"
    except socket.timeout:
        s.close()
        return "timeout"


def pairs(lab):
    return [(lab.cli4(1), lab.srv4(1)), (lab.cli6(1), lab.srv6(1))]


@pytest.mark.parametrize("firewall", FIREWALLS)
def test_a_single_use_opening_admits_one_connection_and_keeps_it(firewall):
    need(firewall)
    with Lab(clients=1, prefix="su") as lab:
        lab.tcp_service("srv", "::", TCP_PORT)
        lab.udp_echo("srv", UDP_PORT)
        fw = make(lab, firewall)
        cli = lab.ns["cli1"]
        for mine, server in pairs(lab):
            assert tcp_try(cli, server, TCP_PORT) == "refused"           # fail closed
            fw.open_once([(mine, "tcp", TCP_PORT, 3, SPORT), (mine, "udp", UDP_PORT, 3, SPORT)])
            assert sorted(r[:3] + r[5:] for r in fw.list()) == [
                (mine, "tcp", TCP_PORT, "single use"), (mine, "udp", UDP_PORT, "single use")]
            # In the grace period another source port is dropped, never refused...
            assert connect_from(cli, server, TCP_PORT) == "timeout"
            # ...and the knock's own port gets in, which ends the opening.
            conn = connect_from(cli, server, TCP_PORT, SPORT)
            assert not isinstance(conn, str), conn
            assert conn.recv(64) == b"netns-lab\n"
            assert [r[1] for r in fw.list()] == ["udp"]
            assert tcp_try(cli, server, TCP_PORT) == "refused"
            # The connection that used it keeps working, past the opening's end too.
            conn.sendall(b"still here")
            assert conn.recv(64) == b"still here"
            # UDP: the flow that used it gets its replies, and may send more; a new one not.
            with ns_socket(cli, socket.AF_INET6 if ":" in server else socket.AF_INET,
                           socket.SOCK_DGRAM) as u:
                u.bind(("", SPORT))
                u.settimeout(1)
                for text in (b"one", b"two"):
                    u.sendto(text, (server, UDP_PORT))
                    assert u.recv(64) == text
            assert udp_try(cli, server, UDP_PORT) == "refused"
            assert fw.list() == []
            time.sleep(3.2)
            conn.sendall(b"after its end")
            assert conn.recv(64) == b"after its end"
            conn.close()
            fw.expire()


@pytest.mark.parametrize("firewall", FIREWALLS)
def test_after_the_grace_period_the_first_comer_takes_it_and_a_knock_makes_a_new_one(firewall):
    need(firewall)
    with Lab(clients=1, prefix="su") as lab:
        lab.tcp_service("srv", "::", TCP_PORT)
        fw = make(lab, firewall)
        cli = lab.ns["cli1"]
        mine, server = pairs(lab)[0]
        fw.open_once([(mine, "tcp", TCP_PORT, 5, SPORT)])
        time.sleep(spa.ONCE_GRACE + 0.2)
        first = connect_from(cli, server, TCP_PORT)              # any port, after the grace
        assert not isinstance(first, str), first
        assert tcp_try(cli, server, TCP_PORT) == "refused"
        assert connect_from(cli, server, TCP_PORT, SPORT) in ("refused", "timeout")
        fw.open_once([(mine, "tcp", TCP_PORT, 5, SPORT + 1)])    # a fresh knock
        second = connect_from(cli, server, TCP_PORT, SPORT + 1)
        assert not isinstance(second, str), second
        assert tcp_try(cli, server, TCP_PORT) == "refused"
        first.close()
        second.close()


@pytest.mark.parametrize("firewall", FIREWALLS)
def test_a_reload_of_the_firewall_does_not_bring_back_a_single_use_opening(firewall):
    need(firewall)
    with Lab(clients=1, prefix="su") as lab:
        lab.tcp_service("srv", "::", TCP_PORT)
        log = Lines()
        fw = make(lab, firewall)
        fw.firewall.log = log
        cli = lab.ns["cli1"]
        mine, server = pairs(lab)[0]
        fw.open_once([(mine, "tcp", TCP_PORT, 30, SPORT)])
        fw.open_many([(lab.cli6(1), "tcp", TCP_PORT, 30)])          # a plain one comes back
        if firewall == "nft":
            lab.run("srv", ["nft", "delete", "table", "inet", "spa_su"])
        else:
            for family in (4, 6):
                cmd = ip6(firewall) if family == 6 else firewall
                lab.run("srv", [cmd, "-w", "-F", "INPUT"])
                lab.run("srv", [cmd, "-w", "-F", "SPA_INPUT"])
        assert fw.restore()
        assert "single-use openings are not put back" in log.text()
        assert connect_from(cli, server, TCP_PORT, SPORT) in ("refused", "timeout")
        assert tcp_try(cli, lab.srv6(1), TCP_PORT) == b"netns-lab\n"
        assert [r[0] for r in fw.list()] == [lab.cli6(1)]


def test_fwknop_clients_get_in_after_the_grace_period_with_the_syn_sent_again(tmp_path):
    """fwknop's client knocks a single_use stanza of the real server: a connect right after
    is dropped in the grace period and gets in when the kernel sends its SYN again; a
    second connection is refused."""
    netns_lab.need_lab("nft", "fwknop")
    conf = tmp_path / "spa.conf"
    write_private(conf, "[server]\ninterface = any\nprotect = tcp/%d\nfirewall = nft\n"
                  "saved_firewall = none\nreplay_cache = %s\n[client alice]\nkey_base64 = %s\n"
                  "hmac_key_base64 = %s\nopen_ports = tcp/%d\nsingle_use = yes\n"
                  % (TCP_PORT, tmp_path / "replay", KEY, HMAC_KEY, TCP_PORT))
    with Lab(clients=1, prefix="su") as lab:
        lab.tcp_service("srv", "::", TCP_PORT)
        server = lab.spawn("srv", [sys.executable, SPA, "server", "-c", str(conf), "-v"])
        wait_for_line(server, r"listening on", 15)
        lab.run("cli1", netns_lab.fwknop_client_argv(
            Lab.srv4(1), "tcp/%d" % TCP_PORT, KEY, HMAC_KEY), env=dict(os.environ, HOME=str(tmp_path)))
        wait_for_line(server, r"for one connection \(single_use\)", 5)
        began = time.monotonic()
        conn = connect_from(lab.ns["cli1"], Lab.srv4(1), TCP_PORT, timeout=4)
        assert not isinstance(conn, str), conn
        assert time.monotonic() - began > 0.5            # the SYN sent again after 1 s
        assert conn.recv(64) == b"netns-lab\n"
        assert tcp_try(lab.ns["cli1"], Lab.srv4(1), TCP_PORT) == "refused"
        conn.close()
        out = lab.run("srv", [sys.executable, SPA, "server", "-c", str(conf), "--list"]).stdout
        assert out.strip() == "no open authorizations"


def test_server_list_says_which_openings_are_single_use_and_unused(tmp_path, monkeypatch, capsys):
    class Listed(spa.DryRunFirewall):
        def list(self):
            return [("198.18.1.2", "tcp", 22, 25, "", "single use"),
                    ("198.18.1.3", "tcp", 22, 12, "")]
    config = server_config(tmp_path, {"a": {"single_use": "yes"}})
    made = []

    def make_firewall(config, test, log=None):
        made.append(config.single_use)
        return Listed(config.protect)
    monkeypatch.setattr(spa, "make_firewall", make_firewall)
    assert spa.main(["server", "-c", config.path, "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert made == [True]
    assert out[0].startswith("198.18.1.2") and out[0].endswith("25 s left, single use, unused")
    assert out[1].startswith("198.18.1.3") and out[1].endswith("12 s left")
