"""single_use with NAT (issue 15, the missing part): a single-use NAT opening admits one new
connection through the DNAT and forward path, taken away in the kernel by the DNAT of that
connection's first packet; a grace period for the knock's own source port, as for plain
single-use openings.

The unit tests need nothing.  The others run the real nft and iptables (both flavours),
IPv4 and IPv6, in network namespaces of their own (netns_lab, prefix "sn"; 198.18.0.0/15 and
2001:db8::/32 only): client 1 knocks, client 2 is the internal host behind the server (which
forwards, with a forward chain that drops what it does not allow), with real TCP services.
"""

import os
import re
import socket
import sys
import time

import pytest

import netns_lab
import spa
from spa import NatMode, PLAIN_NAT
from netns_lab import InNetns, Lab, ns_socket, sleep_until, tcp_try, udp_try, wait_for_line
from test_spa import HMAC_KEY, KEY, server_config
from test_single_use import connect_from
from test_nat_modes import (INNER_PORT, KINDS, NAT_PORT, OTHER_PORT, banner, families,
                            gatekeeper, inner_services, need, router, spa_server)

HERE = os.path.dirname(os.path.abspath(__file__))
SPA = os.path.join(HERE, "spa.py")
SPORT = 50321
ME = "198.18.0.1"


# ----------------------------------------------------- unit tests, no root

def test_single_use_loads_with_the_nat_modes_that_have_a_dnat(tmp_path):
    for stanza in ({"enable_nat": "yes", "nat_destinations": "198.18.2.2:22"},
                   {"force_nat": "198.18.2.2:22", "force_snat": "198.18.2.9"},
                   {"force_nat": "198.18.2.2:22", "force_masquerade": "yes",
                    "destination": "198.18.0.1"}):
        config = server_config(tmp_path, {"a": dict(stanza, single_use="yes",
                                                    open_ports="tcp/5022")},
                               enable_forwarding="yes", enable_local_nat="yes",
                               enable_snat="yes")
        assert config.single_use and config.stanzas[0].single_use


@pytest.mark.parametrize("option, why", [
    ("disable_dnat", "single_use = yes with disable_dnat: a single-use NAT opening is taken "
                     "by its connection's DNAT, and disable_dnat has none"),
    ("forward_all", "single_use = yes with forward_all: .* forwards everything from the "
                    "address")])
def test_single_use_is_refused_with_the_nat_modes_that_have_no_dnat(tmp_path, option, why):
    with pytest.raises(spa.SpaError, match=why):
        server_config(tmp_path, {"a": {"single_use": "yes", "force_nat": "198.18.2.2:22",
                                       option: "yes", "open_ports": "tcp/5022"}},
                      enable_forwarding="yes")


def test_the_gatekeeper_opens_single_use_nat_with_the_knocks_connect_port(tmp_path):
    gate = gatekeeper(tmp_path, {"a": {"force_nat": "198.18.2.2:22", "open_ports": "tcp/5022",
                                       "single_use": "yes", "force_snat": "198.18.2.9"}},
                      enable_forwarding="yes")
    now = time.time()
    msg = spa.Message("alice", "0.0.0.0", [("tcp", 5022)], timestamp=int(now))
    d = gate.knock("198.18.1.2", ME, spa.seal(msg.encode(), spa.b64decode(KEY),
                                              spa.b64decode(HMAC_KEY)), now)
    assert d.accepted, d.reason
    assert gate.firewall.opened == [("198.18.1.2", "tcp", 5022, 30, "198.18.2.2", 22, False,
                                     NatMode(True, "198.18.2.9", False),
                                     spa.connect_port(msg.rand), "single use")]
    assert "forwarded to 198.18.2.2:22 for 198.18.1.2 for 30 s, SNAT to 198.18.2.9, for one " \
        "connection (single_use)" in "\n".join(gate.log.lines)


def test_nft_single_use_nat_rules_take_the_opening_with_the_dnat():
    fw = spa.NftFirewall([("tcp", 22)], nat=True)
    assert not any("natonce" in c for c in fw.commands())
    fw.once = True
    commands = fw.commands()
    text = "\n".join(commands)
    assert "add map inet spa dnatonce6 { type ipv6_addr . inet_proto . inet_service : " \
        "ipv6_addr . inet_service; flags timeout; }" in text
    assert "add set inet spa natonce4 { type ipv4_addr . inet_proto . inet_service; size " \
        "65535; flags dynamic,timeout; }" in text
    pre = [c for c in commands if c.startswith("add rule inet spa prerouting ")]
    key = "ip saddr . meta l4proto . th dport"
    take = "@natonce4 add @gate4 { %s %s } delete @natonce4 { %s } dnat ip to %s map " \
        "@dnatonce4" % (key, spa.ONCE_GATE, key, key)
    ready = "ct state new %s @ready4 %s" % (key, key)
    assert pre[:3] == ["add rule inet spa prerouting " + r for r in (
        "%s . th sport @oncep4 %s %s" % (ready, key, take),
        "%s @grace4 %s @natonce4 drop" % (ready, key),
        "%s %s" % (ready, take))]
    assert pre[6].endswith("map @dnat4")          # the plain DNATs after both families'


def test_nft_single_use_nat_is_ready_only_after_its_elements_are_committed():
    fw = spa.NftFirewall([("tcp", 22)], nat=True)
    fw.once = True
    commits = []
    fw.kernel = type("Kernel", (), {"commit": lambda self, batch: commits.append(batch)})()
    assert fw.open_nat("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, 30, False, None,
                       NatMode(True, "masquerade", False), 50000)
    first, second = commits
    names = lambda phase: sorted(place[2] for place, _, _, _ in phase)     # noqa: E731
    assert names(first.last) == ["dnatonce4", "fwd4", "grace4", "masq4", "natonce4", "oncep4"]
    assert "ready4" in names(first.deletes) and "dnat4" not in names(first.last)
    assert (names(second.first), names(second.last)) == ([], ["ready4"])
    with pytest.raises(spa.SpaError, match="need a DNAT"):
        fw.open_nat("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, 30, False, None,
                    NatMode(False, None, False), 50000)


def test_iptables_single_use_nat_rules_are_never_read_back_as_a_nat_opening():
    fw = spa.IptablesFirewall([("tcp", 22)], nat=True)
    fw.once = True
    key = spa.NatOpening("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, False)
    rules = fw._once_nat_rules(key, 1893456001, SPORT, NatMode(True, "masquerade", False))
    assert [(t, c, w[-1] if w[-2] == "-j" else w[-3]) for t, c, w in rules] == [
        ("nat", "SPA_PREROUTING", "DNAT")] * 3 + [("filter", "SPA_FORWARD", "DROP"),
                                                  ("filter", "SPA_FORWARD", "ACCEPT"),
                                                  ("nat", "SPA_POSTROUTING", "MASQUERADE")]
    first = rules[0][2]
    assert first[first.index("--sport") + 1] == str(SPORT)
    assert first.index("--remove") > first.index("--comment") and "spa_ntcp5022" in first
    assert "spa_ngtcp5022" in rules[1][2] and "--remove" not in rules[1][2]
    for _, _, words in rules:
        assert "spa nat once expires 1893456001" in words
        assert spa._parse_nat_mode(words) is None and spa._parse_opening(words) is None


def test_server_list_marks_unused_single_use_nat_openings(tmp_path, monkeypatch, capsys):
    class Listed(spa.DryRunFirewall):
        def list_nat(self):
            return [("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, False, 25, "single use"),
                    ("198.18.1.3", "tcp", 5022, "198.18.2.2", 22, False, 12)]
    config = server_config(tmp_path, {"a": {"single_use": "yes"}})
    monkeypatch.setattr(spa, "make_firewall", lambda config, test, log=None:
                        Listed(config.protect))
    assert spa.main(["server", "-c", config.path, "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("198.18.1.2") and \
        out[0].endswith("25 s left, forwarded to 198.18.2.2:22, single use, unused")
    assert out[1].endswith("12 s left, forwarded to 198.18.2.2:22")


# ------------------------------------------------------------ in namespaces

def firewall(lab, kind):
    if kind == "nft":
        fw = spa.NftFirewall([("tcp", 8022)], table="spa_sn", nat=True)
    else:
        fw = spa.IptablesFirewall([("tcp", 8022)], command=kind, nat=True)
    fw.once = True
    f = InNetns(lab.name("srv"), fw)
    f.setup()
    return f


def unused(fw):
    return sorted(row[:3] + row[3:5] for row in fw.list_nat() if row[7:] == ("single use",))


def one_family(fw, lab, family, c1, s1, c2, mode):
    """A single-use NAT opening of one family, used by the knock's port: it lets that one
    connection in, which keeps working; none after it."""
    cli1 = lab.name("cli1")
    now = float(int(time.time()))        # iptables' end: the next whole second, not later
    fw.open_nat(c1, "tcp", NAT_PORT, c2, INNER_PORT, 3, False, now, mode, SPORT)
    # A second one, never used: it ends at its timeout.
    fw.open_nat(c1, "tcp", NAT_PORT + 1, c2, OTHER_PORT, 3, False, now, mode, SPORT)
    assert [(c1, "tcp", NAT_PORT, c2, INNER_PORT), (c1, "tcp", NAT_PORT + 1, c2, OTHER_PORT)] \
        == [row for row in unused(fw) if row[0] == c1]
    # In the grace period another source port is dropped, never refused nor forwarded...
    assert connect_from(cli1, s1, NAT_PORT) == "timeout"
    # ...and the knock's own port gets through to the inner host, which takes the opening.
    conn = connect_from(cli1, s1, NAT_PORT, SPORT)
    assert not isinstance(conn, str), (family, conn)
    assert conn.recv(64) == banner(family, INNER_PORT)
    assert [row for row in unused(fw) if row[0] == c1] == [
        (c1, "tcp", NAT_PORT + 1, c2, OTHER_PORT)]
    # A second new connection: not forwarded (the server's own port answers), nor to the
    # inner host at its own address; the one that got in keeps working.
    assert tcp_try(cli1, s1, NAT_PORT) == "refused"
    assert tcp_try(cli1, c2, INNER_PORT) == "timeout"
    conn.sendall(b"both ways")
    assert conn.recv(64) == b"both ways"
    return conn, time.time()


@pytest.mark.parametrize("kind", KINDS)
def test_a_single_use_nat_opening_admits_one_connection_and_keeps_it(kind):
    need(kind)
    with Lab(clients=2, prefix="sn") as lab:
        router(lab, kind)
        inner_services(lab)
        fw = firewall(lab, kind)
        cli1 = lab.name("cli1")
        conns = []
        for (family, c1, s1, c2, s2), mode in zip(families(lab), (
                PLAIN_NAT, NatMode(True, "masquerade", False))):
            assert tcp_try(cli1, s1, NAT_PORT) == "refused"                  # fail closed
            conns.append(one_family(fw, lab, family, c1, s1, c2, mode))
        sleep_until(conns[-1][1] + 3.2)
        # The unused ones ended at their timeout (past the grace period the first comer
        # would have got in); the used connections still work.
        assert unused(fw) == []
        for (family, c1, s1, c2, s2), (conn, _) in zip(families(lab), conns):
            assert tcp_try(cli1, s1, NAT_PORT + 1) == "refused"
            conn.sendall(b"after its end")
            assert conn.recv(64) == b"after its end"
            conn.close()
        fw.expire()
        assert fw.list_nat() == []
        # Without single_use (the same firewall): a second connection gets through too.
        for family, c1, s1, c2, s2 in families(lab):
            assert fw.open_nat(c1, "tcp", NAT_PORT, c2, INNER_PORT, 30, False, None, PLAIN_NAT)
            for _ in range(2):
                assert tcp_try(cli1, s1, NAT_PORT) == banner(family, INNER_PORT)
        fw.flush()


def test_nft_single_use_nat_passes_the_gate_where_its_delete_came_too_late():
    """As for a plain opening (test_single_use_versions): the natonce element put back by
    hand after its connection took it (as a second CPU that found it saw it) forwards no
    second connection, as the DNAT rule's gate decides; a fresh knock forwards one again."""
    need("nft")
    with Lab(clients=2, prefix="sn") as lab:
        router(lab, "nft")
        inner_services(lab)
        fw = firewall(lab, "nft")
        cli1 = lab.name("cli1")
        for family, c1, s1, c2, s2 in families(lab):
            v = 6 if ":" in c1 else 4
            fw.open_nat(c1, "tcp", NAT_PORT, c2, INNER_PORT, 5, False, None, PLAIN_NAT, SPORT)
            first = connect_from(cli1, s1, NAT_PORT, SPORT)
            assert not isinstance(first, str), (family, first)
            assert first.recv(64) == banner(family, INNER_PORT)
            element = "{ %s . tcp . %d timeout 5s }" % (c1, NAT_PORT)
            for name in ("natonce", "ready"):
                lab.run("srv", ["nft", "add", "element", "inet", "spa_sn", "%s%d" % (name, v),
                                element])
            time.sleep(spa.ONCE_GRACE + 0.2)                 # the first comer's, now
            assert tcp_try(cli1, s1, NAT_PORT) == "refused"  # not forwarded: the gate
            fw.open_nat(c1, "tcp", NAT_PORT, c2, INNER_PORT, 5, False, None, PLAIN_NAT,
                        SPORT + 2)                               # a fresh knock
            second = connect_from(cli1, s1, NAT_PORT, SPORT + 2)
            assert not isinstance(second, str), (family, second)
            assert second.recv(64) == banner(family, INNER_PORT)
            assert tcp_try(cli1, s1, NAT_PORT) == "refused"
            first.close()
            second.close()
        fw.flush()


@pytest.mark.parametrize("kind", KINDS)
def test_spa_client_connect_through_a_single_use_force_nat_stanza(tmp_path, kind):
    """End to end: the real server (force_nat, single_use) and `spa.py client --connect`,
    IPv4 and IPv6: the client's connection reaches the inner host and relays both ways, a
    second one is refused; a knock left unused shows in --list as single use."""
    need(kind)
    with Lab(clients=2, prefix="sn") as lab:
        router(lab, kind)
        inner_services(lab)
        server = spa_server(lab, tmp_path, {
            "v4": {"source": "198.18.0.0/15", "open_ports": "tcp/%d" % NAT_PORT,
                   "fw_access_timeout": "5", "single_use": "yes",
                   "force_nat": "%s:%d" % (Lab.cli4(2), OTHER_PORT)},
            "v6": {"source": "2001:db8::/32", "open_ports": "tcp/%d" % NAT_PORT,
                   "fw_access_timeout": "5", "single_use": "yes", "force_masquerade": "yes",
                   "force_nat": "[%s]:%d" % (Lab.cli6(2), OTHER_PORT)}}, kind)
        cli1 = lab.name("cli1")
        client = [sys.executable, SPA, "client", "-A", "tcp/%d" % NAT_PORT, "--key-base64",
                  KEY, "--hmac-key-base64", HMAC_KEY]
        for family, c1, s1, c2, s2 in families(lab):
            done = lab.run("cli1", client + ["-D", s1, "--connect", spa.format_endpoint(
                s1, NAT_PORT)], input="through the relay\n", timeout=20)
            assert done.stdout == (banner(family, OTHER_PORT) + b"through the relay\n").decode()
            wait_for_line(server, r"opened tcp/%d forwarded to %s for %s for 5 s.*for one "
                          r"connection \(single_use\)" % (NAT_PORT, re.escape(
                              spa.format_endpoint(c2, OTHER_PORT)), re.escape(c1)), 3)
            assert tcp_try(cli1, s1, NAT_PORT) == "refused"
        since = server.log.mark()
        lab.run("cli1", client + ["-D", Lab.srv4(1)])
        wait_for_line(server, r"opened tcp/%d forwarded to .* for %s " % (
            NAT_PORT, re.escape(Lab.cli4(1))), 3, since)
        listed = lab.run("srv", [sys.executable, SPA, "server", "-c", str(tmp_path / "spa.conf"),
                                 "--list"]).stdout.splitlines()
        assert [line.split()[0] for line in listed] == [Lab.cli4(1)], listed
        assert listed[0].endswith("forwarded to %s:%d, single use, unused"
                                  % (Lab.cli4(2), OTHER_PORT)), listed
        lab.stop_process(server)


LOCAL_PORT, SERVICE_PORT, UDP_PORT = 55000, 8022, 53


@pytest.mark.parametrize("kind", KINDS)
def test_single_use_local_nat_and_a_udp_flow(kind):
    """Local NAT (to a port of the server) is single-use too; so is a forwarded UDP opening:
    its flow keeps its replies and may send more, a new flow is not forwarded."""
    need(kind)
    with Lab(clients=2, prefix="sn") as lab:
        router(lab, kind)
        lab.tcp_service("srv", "::", SERVICE_PORT)
        lab.tcp_service("srv", "::", SERVICE_PORT + 1, b"other\n")
        lab.udp_echo("cli2", UDP_PORT, "::", tell_peer=True)
        fw = firewall(lab, kind)
        cli1 = lab.name("cli1")
        for family, c1, s1, c2, s2 in families(lab):
            assert tcp_try(cli1, s1, SERVICE_PORT) == "refused"
            fw.open_nat(c1, "tcp", LOCAL_PORT, s1, SERVICE_PORT, 5, True, None, PLAIN_NAT, SPORT)
            fw.open_nat(c1, "udp", UDP_PORT, c2, UDP_PORT, 5, False, None, PLAIN_NAT, SPORT)
            assert sorted(row[1:3] + row[5:6] for row in fw.list_nat() if row[0] == c1) == [
                ("tcp", LOCAL_PORT, True), ("udp", UDP_PORT, False)]
            conn = connect_from(cli1, s1, LOCAL_PORT, SPORT)
            assert not isinstance(conn, str), (family, conn)
            assert conn.recv(64) == b"netns-lab\n"
            assert tcp_try(cli1, s1, LOCAL_PORT) == "refused"
            assert tcp_try(cli1, s1, SERVICE_PORT) == "refused"
            with ns_socket(cli1, socket.AF_INET6 if family == 6 else socket.AF_INET,
                           socket.SOCK_DGRAM) as u:
                u.bind(("", SPORT))
                u.settimeout(1)
                for text in (b"one", b"two"):
                    u.sendto(text, (s1, UDP_PORT))
                    got, _, peer = u.recv(64).partition(b" from ")
                    assert (got, peer.replace(b"::ffff:", b"")) == (text, c1.encode())
            assert udp_try(cli1, s1, UDP_PORT) == "refused"          # the server's own port
            assert [row for row in fw.list_nat() if row[0] == c1] == []
            conn.sendall(b"still here")
            assert conn.recv(64) == b"still here"
            conn.close()
            # Knocks again, the second for another target: the DNAT leads there.
            for target in (SERVICE_PORT, SERVICE_PORT + 1):
                fw.open_nat(c1, "tcp", LOCAL_PORT, s1, target, 5, True, None, PLAIN_NAT,
                            SPORT + 1)
            conn = connect_from(cli1, s1, LOCAL_PORT, SPORT + 1)
            assert not isinstance(conn, str) and conn.recv(64) == b"other\n", (family, conn)
            conn.close()
        fw.flush()


@pytest.mark.parametrize("kind", KINDS)
def test_a_server_that_dies_half_way_leaves_nothing_reachable(kind):
    """Fail closed: the server made a single-use NAT opening's first part and died before
    the rest (nft: the transaction that makes it ready; iptables: the addresses into the
    lists): no connection is forwarded, from the knock's port or any other."""
    need(kind)
    with Lab(clients=2, prefix="sn") as lab:
        router(lab, kind)
        inner_services(lab)
        fw = firewall(lab, kind)
        back_end, commits = fw.firewall, []
        if kind == "nft":
            real = back_end.kernel.commit

            def first_only(batch):             # the first of each knock's two transactions
                commits.append(batch)
                if len(commits) % 2:
                    real(batch)
            back_end.kernel.commit = first_only
        else:
            back_end._recent = lambda *args, **kwargs: commits.append(args)
        cli1 = lab.name("cli1")
        for family, c1, s1, c2, s2 in families(lab):
            fw.open_nat(c1, "tcp", NAT_PORT, c2, INNER_PORT, 5, False, None, PLAIN_NAT, SPORT)
            assert connect_from(cli1, s1, NAT_PORT, SPORT) == "refused"
            assert tcp_try(cli1, s1, NAT_PORT) == "refused"
            assert tcp_try(cli1, c2, INNER_PORT) == "timeout"
            assert unused(fw) == []
        assert len(commits) == 4
        fw.flush()


def test_the_fwknop_client_asks_for_single_use_nat_access(tmp_path):
    """The real fwknop client's NAT request (-N) to a single_use stanza with enable_nat:
    a connect typed right after it is dropped in the grace period and forwarded when the
    kernel sends its SYN again; a second connection is not forwarded."""
    netns_lab.need_lab("nft", "fwknop")
    with Lab(clients=2, prefix="sn") as lab:
        router(lab, "nft")
        inner_services(lab)
        server = spa_server(lab, tmp_path, {"alice": {
            "source": "198.18.0.0/15", "open_ports": "tcp/%d" % NAT_PORT, "enable_nat": "yes",
            "nat_destinations": "%s:%d" % (Lab.cli4(2), INNER_PORT), "single_use": "yes"}}, "nft")
        lab.run("cli1", netns_lab.fwknop_client_argv(
            Lab.srv4(1), "tcp/%d" % NAT_PORT, KEY, HMAC_KEY, "-N",
            "%s:%d" % (Lab.cli4(2), INNER_PORT)), env=dict(os.environ, HOME=str(tmp_path)))
        wait_for_line(server, r"forwarded to %s:%d .*for one connection \(single_use\)"
                      % (re.escape(Lab.cli4(2)), INNER_PORT), 5)
        began = time.monotonic()
        conn = connect_from(lab.name("cli1"), Lab.srv4(1), NAT_PORT, timeout=4)
        assert not isinstance(conn, str), conn
        assert time.monotonic() - began > 0.5            # the SYN sent again after 1 s
        assert conn.recv(64) == banner(4, INNER_PORT)
        assert tcp_try(lab.name("cli1"), Lab.srv4(1), NAT_PORT) == "refused"
        conn.close()
        lab.stop_process(server)
