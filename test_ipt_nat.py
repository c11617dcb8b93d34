"""Tests of NAT access for the iptables back end (spa.IptablesFirewall: open_nat and friends).

The unit tests replace run_command and need nothing.  The others run the real iptables, both
flavours, IPv4 and IPv6, in throwaway network namespaces (netns_lab, prefix "nat";
198.18.0.0/15 and 2001:db8::/32 only): client 1 knocks, client 2 is the internal host
behind the server (which forwards), with real TCP services.  Nothing iptables-related runs
outside a namespace we created: each firewall call runs in a thread that entered the
namespace with setns(2) (netns_lab.in_netns), and its iptables processes inherit it.
"""

import math
import shlex
import socket
import time

import pytest

import netns_lab
import spa
from spa import IptablesFirewall as IptablesNat, _parse_nat
from netns_lab import FakeCommands, InNetns, ip6, sleep_until, tcp_try, udp_try, Lab, ns_socket, ns_sysctl

FLAVOURS = ("iptables-legacy", "iptables-nft")
NAT_PORT, INNER_PORT = 5022, 22            # knock for 5022 on the server -> client 2's 22
LOCAL_NAT_PORT, LOCAL_PORT = 55000, 8022   # local NAT: 55000 -> the server's own 8022


# ------------------------------------------------------------------- helpers

def need_iptables(command):
    netns_lab.need_lab(command, ip6(command), command + "-restore", ip6(command) + "-restore",
                       command + "-save", ip6(command) + "-save")


def iptables(lab, command, family, *args, check=True):
    """iptables (or ip6tables) of one flavour inside the server namespace."""
    argv = [ip6(command) if family == 6 else command, "-w"] + list(args)
    return lab.run("srv", argv, check=check)


def rules(lab, command, family, chain, table="filter"):
    """The `-S` rules of `chain` as word lists ([] when the chain does not exist)."""
    res = iptables(lab, command, family, "-t", table, "-S", chain, check=False)
    return [shlex.split(line)[2:] for line in res.stdout.splitlines() if line.startswith("-A ")]


def ours(rule_list):
    return [r for r in rule_list if _parse_nat(r) is not None]


def save(lab, command, family):
    """iptables-save of one flavour, every table; it must succeed."""
    res = lab.run("srv", [(ip6(command) if family == 6 else command) + "-save"], check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def connected(ns, addr, port):
    """An established connection (banner read), for checking it outlives its opening."""
    s = ns_socket(ns, socket.AF_INET6 if ":" in addr else socket.AF_INET)
    s.settimeout(2)
    s.connect((addr, port))
    assert s.recv(64)
    return s


def still_alive(s):
    s.sendall(b"still there?")
    alive = s.recv(64) == b"still there?"
    s.close()
    return alive


def families(lab):
    """(family, client 1, server on link 1, client 2 = the internal host, server on link 2)."""
    return [(4, lab.cli4(1), lab.srv4(1), lab.cli4(2), lab.srv4(2)),
            (6, lab.cli6(1), lab.srv6(1), lab.cli6(2), lab.srv6(2))]


def forwarding(lab):
    ns_sysctl(lab.ns["srv"], "net.ipv4.ip_forward", 1)
    ns_sysctl(lab.ns["srv"], "net.ipv6.conf.all.forwarding", 1)


def inner_services(lab):
    """Client 2's service on its own addresses, one banner per family: {family: service}."""
    return {4: lab.tcp_service("cli2", lab.cli4(2), INNER_PORT, b"inner v4\n"),
            6: lab.tcp_service("cli2", lab.cli6(2), INNER_PORT, b"inner v6\n")}


HOST_RULES = {   # the host's own rules, which setup() and flush() must leave as they are
    ("filter", "INPUT"): {4: ["-s", "198.19.255.1/32", "-j", "ACCEPT"],
                          6: ["-s", "2001:db8:ffff::1/128", "-j", "ACCEPT"]},
    ("filter", "FORWARD"): {4: ["-s", "198.19.255.2/32", "-j", "ACCEPT"],
                            6: ["-s", "2001:db8:ffff::2/128", "-j", "ACCEPT"]},
    ("nat", "PREROUTING"): {4: ["-s", "198.19.255.3/32", "-j", "ACCEPT"],
                            6: ["-s", "2001:db8:ffff::3/128", "-j", "ACCEPT"]},
}
JUMPS = {("filter", "INPUT"): "SPA_INPUT", ("filter", "FORWARD"): "SPA_FORWARD",
         ("nat", "PREROUTING"): "SPA_PREROUTING"}


def add_host_rules(lab, command):
    for (table, chain), by_family in HOST_RULES.items():
        for family, rule in by_family.items():
            iptables(lab, command, family, "-t", table, "-A", chain, *rule)


# ----------------------------------------------------- unit tests, no root

DNAT4 = ('-s 198.18.1.2 -p tcp --dport 5022 -m time --datestop 1970-01-01T00:17:10 '
         '-m comment --comment "spa nat expires 1031" -j DNAT --to-destination 198.18.2.2:22')
ACCEPT4 = ('-s 198.18.1.2 -d 198.18.2.2 -p tcp --dport 22 -m conntrack --ctstate DNAT '
           '--ctorigdstport 5022 -m time --datestop 1970-01-01T00:17:10 '
           '-m comment --comment "spa nat expires 1031" -j ACCEPT')


def test_open_nat_writes_both_rules_in_one_run(monkeypatch):
    fake = FakeCommands()
    monkeypatch.setattr(spa, "run_command", fake)
    fw = IptablesNat([("tcp", 22)], command="iptables-nft", nat=True)
    assert fw.open_nat("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, 30, False, now=1000.2)
    assert fake.calls == [(["iptables-nft-restore", "--wait=10", "--noflush"],
                           "*filter\n-I SPA_FORWARD 1 %s\nCOMMIT\n"
                           "*nat\n-I SPA_PREROUTING 1 %s\nCOMMIT\n" % (ACCEPT4, DNAT4))]
    # Never shorter, and nothing runs for it.
    assert not fw.open_nat("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, 10, False, now=1001)
    assert len(fake.calls) == 1
    # Longer: new rules in, old ones out, in one run (ACCEPT first, old ACCEPT last).
    assert fw.open_nat("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, 60, False, now=1001)
    text = fake.calls[-1][1]
    assert text.startswith("*filter\n-I SPA_FORWARD 1 ") and "expires 1061" in text
    assert text.index("-D SPA_PREROUTING %s\n" % DNAT4) < text.index("-D SPA_FORWARD %s\n"
                                                                        % ACCEPT4)
    assert len(fake.calls) == 2
    # The same DNAT match to another place (local NAT this time) replaces it.
    assert fw.open_nat("198.18.1.2", "tcp", 5022, "198.18.1.1", 8022, 5, True, now=1002)
    text = fake.calls[-1][1]
    assert "-I SPA_INPUT 1 -s 198.18.1.2 -d 198.18.1.1 -p tcp --dport 8022 " in text
    assert '"spa local nat expires 1007" -j DNAT --to-destination 198.18.1.1:8022' in text
    assert "-D SPA_PREROUTING " in text and "-D SPA_FORWARD " in text
    assert list(fw.nat_ends) == [("198.18.1.2", "tcp", 5022, "198.18.1.1", 8022, True)]
    # IPv6: ip6tables, canonical addresses, [address]:port.
    assert fw.open_nat("2001:DB8:1:0::2", "udp", 53, "2001:db8:2:0::2", 5353, 5, False, now=1000)
    argv, text = fake.calls[-1]
    assert argv[0] == "ip6tables-nft-restore"
    assert "-s 2001:db8:1::2 -p udp --dport 53 " in text
    assert "--to-destination [2001:db8:2::2]:5353" in text


@pytest.mark.parametrize("args", [
    ("198.18.1.2", "tcp", 5022, "2001:db8:2::2", 22),            # families differ
    ("2001:db8:1::2", "tcp", 5022, "198.18.2.2", 22),
    ("198.18.1.2", "tcp", 5022, "198.18.2.2 -j ACCEPT", 22),
    ("198.18.1.2", "tcp", 5022, "198.18.2.0/24", 22),
    ("198.18.1.2", "tcp", 5022, "0.0.0.0", 22),
    ("198.18.1.2", "tcp", 5022, "224.0.0.1", 22),
    ("198.18.1.2", "icmp", 5022, "198.18.2.2", 22),
    ("198.18.1.2", "tcp", 0, "198.18.2.2", 22),
    ("198.18.1.2", "tcp", 5022, "198.18.2.2", 65536),
    ("198.18.1.2", "tcp", 5022, "198.18.2.2", "22 -j DROP"),
])
def test_open_nat_refuses_anything_but_addresses_and_ports(monkeypatch, args):
    fake = FakeCommands()
    monkeypatch.setattr(spa, "run_command", fake)
    with pytest.raises(ValueError):
        IptablesNat([("tcp", 22)], nat=True).open_nat(*args + (30, False))
    assert fake.calls == []


def test_nat_must_be_enabled(monkeypatch):
    fake = FakeCommands()
    monkeypatch.setattr(spa, "run_command", fake)
    fw = IptablesNat([("tcp", 22)])
    with pytest.raises(spa.SpaError, match="not enabled"):
        fw.open_nat("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, 30, False)
    assert fw.list_nat() == []                   # and reads nothing (no nat table created)
    assert fake.calls == []


def test_nat_rules_parse_back_and_plain_code_ignores_them():
    fw = IptablesNat([("tcp", 22)], nat=True)
    for key in [("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, False),
                ("2001:db8:1::2", "udp", 53, "2001:db8:1::1", 5353, True)]:
        for words in (fw._dnat_rule(key, 1893456001), fw._nat_accept_rule(key, 1893456001)):
            assert _parse_nat(words) == (key, 1893456001)
            assert spa._parse_opening(words) is None        # never taken for a plain opening
    line = ('-A SPA_PREROUTING -s 2001:db8:1::2/128 -p tcp -m tcp --dport 5022 -m time '
            '--datestop 2030-01-01T00:00:00 -m comment --comment "spa nat expires 1893456001" '
            '-j DNAT --to-destination [2001:db8:2::2]:22')
    assert _parse_nat(shlex.split(line)[2:]) == (
        ("2001:db8:1::2", "tcp", 5022, "2001:db8:2::2", 22, False), 1893456001)
    for other in ('-A SPA_INPUT -s 198.18.1.2/32 -p tcp --dport 22 -m comment --comment '
                  '"spa expires 1893456001" -j ACCEPT',
                  '-A X -s 198.18.1.2/32 -p tcp --dport 22 -m comment --comment '
                  '"spa nat expires 1893456001" -j DNAT --to-destination 198.18.2.2:22-23',
                  '-A X -s 198.18.1.2/32 -p tcp --dport 22 -m comment --comment '
                  '"spa nat expires 1893456001" -j ACCEPT',            # no --ctorigdstport
                  '-A X -s 198.18.1.2/32 -p tcp --dport 22 -m comment --comment '
                  '"spa nat expires 1893456001" -j DNAT --to-destination [198.18.2.2:22'):
        assert _parse_nat(shlex.split(other)[2:]) is None


class Log(object):
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda text, *args: self.lines.append((level, text % args))


def test_a_family_without_a_nat_table_still_gets_the_rest(monkeypatch, tmp_path):
    """ip6tables without a working nat table (OpenWrt without IPv6 NAT): IPv4 NAT, and IPv6
    plain openings, work; IPv6 NAT is refused with a clear error.  Forwarding off: a warning."""
    (tmp_path / "net" / "ipv4").mkdir(parents=True)
    (tmp_path / "net" / "ipv4" / "ip_forward").write_text("0\n")
    monkeypatch.setattr(spa, "PROC_SYS", str(tmp_path) + "/")
    fake = FakeCommands({("ip6tables-nft", "nat", "-S"): spa.SpaError(
        "ip6tables-nft failed: can't initialize ip6tables table `nat'")})
    monkeypatch.setattr(spa, "run_command", fake)
    log = Log()
    fw = IptablesNat([("tcp", 22)], log=log, command="iptables-nft", nat=True)
    fw.families = (4, 6)
    fw.setup()
    assert fw.nat_families == {4}
    restores = {argv[0]: text for argv, text in fake.calls if argv[0].endswith("-restore")}
    assert "-I FORWARD 1 -j SPA_FORWARD" in restores["iptables-nft-restore"]
    assert "-I PREROUTING 1 -j SPA_PREROUTING" in restores["iptables-nft-restore"]
    assert "SPA_FORWARD" not in restores["ip6tables-nft-restore"]
    assert "-I INPUT 1 -j SPA_INPUT" in restores["ip6tables-nft-restore"]
    assert [level for level, _ in log.lines] == ["warning", "warning"]
    assert "IPv6" in log.lines[0][1] and "net.ipv4.ip_forward is 0" in log.lines[1][1]
    with pytest.raises(spa.SpaError, match="IPv6 is not available"):
        fw.open_nat("2001:db8:1::2", "tcp", 5022, "2001:db8:2::2", 22, 30, False)
    assert fw.open_nat("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, 30, False)
    assert fw.open("2001:db8:1::2", "tcp", 22, 30)


def test_nat_off_never_reads_the_nat_table_unless_ours_may_be_there(monkeypatch, tmp_path):
    """Listing the nat table with iptables-legacy creates it: with nat=False, setup() and
    flush() read it only when SPA_FORWARD (ours) exists or legacy already has a nat table.
    (With protect_action = reject a TCP port is steered in the nat table: see test_reload.py;
    here nothing is steered.)"""
    monkeypatch.setattr(spa, "LEGACY_TABLE_NAMES", {4: str(tmp_path / "none"),
                                                      6: str(tmp_path / "none")})
    fake = FakeCommands()
    monkeypatch.setattr(spa, "run_command", fake)
    fw = IptablesNat([("tcp", 22)], action="drop", command="iptables-legacy")
    fw.families = (4, 6)
    fw.setup()
    fw.flush()
    assert not any("nat" in argv for argv, _ in fake.calls)
    assert not any("nat" in (text or "") for _, text in fake.calls)
    # An earlier run had NAT on: its chains go, DNATs first.
    fake = FakeCommands({("iptables-legacy", "filter", "-S"): "-P FORWARD ACCEPT\n"
                         "-N SPA_FORWARD\n-A FORWARD -j SPA_FORWARD\n",
                         ("iptables-legacy", "nat", "-S"): "-P PREROUTING ACCEPT\n"
                         "-N SPA_PREROUTING\n-A PREROUTING -j SPA_PREROUTING\n"})
    monkeypatch.setattr(spa, "run_command", fake)
    fw.setup()
    text = [t for argv, t in fake.calls if argv[0] == "iptables-legacy-restore"][0]
    assert text.index("-X SPA_PREROUTING") < text.index("-X SPA_FORWARD")
    assert "-D FORWARD -j SPA_FORWARD\n" in text and "-D PREROUTING -j SPA_PREROUTING\n" in text


# ------------------------------------------ integration: real iptables, namespaces

@pytest.mark.parametrize("command", FLAVOURS)
def test_forward_nat_reaches_the_inner_host_and_closes_on_time(command):
    """Forward NAT (types 2/4), IPv4 and IPv6: only client 1 reaches client 2's service through
    the server's port 5022, as itself; the kernel ends it on time with no expire() call while
    an established connection lives on; expire() tidies; flush() leaves the host's own rules
    (INPUT, FORWARD, nat PREROUTING) and iptables-save intact."""
    need_iptables(command)
    with Lab(clients=2, prefix="nat") as lab:
        forwarding(lab)
        inner = inner_services(lab)
        add_host_rules(lab, command)
        fw = InNetns(lab.ns["srv"], IptablesNat([("tcp", LOCAL_PORT)], command=command,
                                                nat=True))
        fw.setup()
        fw.setup()                               # a second start changes nothing
        for (table, chain), by_family in HOST_RULES.items():
            for family in (4, 6):
                # (the protected TCP port is steered at the end of nat PREROUTING: SPA_STEER)
                assert rules(lab, command, family, chain, table) == [
                    ["-j", JUMPS[table, chain]], by_family[family]] + (
                    [["-j", "SPA_STEER"]] if chain == "PREROUTING" else [])
        for family in (4, 6):
            assert rules(lab, command, family, "SPA_FORWARD") == [spa.IPT_ESTABLISHED]
            assert rules(lab, command, family, "SPA_PREROUTING", "nat") == []
        for family, cli1, srv1, cli2, srv2 in families(lab):
            assert tcp_try(lab.ns["cli1"], srv1, NAT_PORT) == "refused"

        now = time.time()
        end = math.ceil(now + 2)
        for family, cli1, srv1, cli2, srv2 in families(lab):
            assert fw.open_nat(cli1, "tcp", NAT_PORT, cli2, INNER_PORT, 2, False, now)
            assert not fw.open_nat(cli1, "tcp", NAT_PORT, cli2, INNER_PORT, 1, False)
        kept = []
        for family, cli1, srv1, cli2, srv2 in families(lab):
            assert tcp_try(lab.ns["cli1"], srv1, NAT_PORT) == b"inner v%d\n" % family
            assert inner[family].peers and all(p[0] == cli1 for p in inner[family].peers)
            # Another source cannot use the DNAT, on either of the server's addresses.
            assert tcp_try(lab.ns["cli2"], srv2, NAT_PORT) == "refused"
            assert tcp_try(lab.ns["cli2"], srv1, NAT_PORT) == "refused"
            kept.append(connected(lab.ns["cli1"], srv1, NAT_PORT))
        assert fw.list() == []                   # list() stays plain openings only
        listed = sorted(fw.list_nat())
        assert [row[:6] for row in listed] == sorted(
            (cli1, "tcp", NAT_PORT, cli2, INNER_PORT, False)
            for _, cli1, _, cli2, _ in families(lab))
        assert all(1 <= row[6] <= 3 for row in listed), listed
        for family in (4, 6):       # iptables-save reads our rules back, in both tables
            assert save(lab, command, family).count("spa nat expires") == 2

        sleep_until(end - 0.4)                                   # still open just before
        assert tcp_try(lab.ns["cli1"], lab.srv4(1), NAT_PORT) == b"inner v4\n"
        sleep_until(end + 0.1)
        # No expire() call: the rules are still there, and the kernel no longer matches them.
        for family, cli1, srv1, cli2, srv2 in families(lab):
            assert len(ours(rules(lab, command, family, "SPA_PREROUTING", "nat"))) == 1
            assert len(ours(rules(lab, command, family, "SPA_FORWARD"))) == 1
            assert tcp_try(lab.ns["cli1"], srv1, NAT_PORT) == "refused"
        for s in kept:                                            # established: still alive
            assert still_alive(s)
        assert fw.list_nat() == []

        assert fw.expire() == 4                  # two rules for each of the two openings
        assert fw.expire() == 0
        for family in (4, 6):
            assert ours(rules(lab, command, family, "SPA_PREROUTING", "nat")) == []
            assert rules(lab, command, family, "SPA_FORWARD") == [spa.IPT_ESTABLISHED]

        assert fw.flush()
        assert not fw.flush()
        for (table, chain), by_family in HOST_RULES.items():
            for family in (4, 6):
                assert rules(lab, command, family, chain, table) == [by_family[family]]
        for family in (4, 6):
            assert "SPA_" not in save(lab, command, family)


@pytest.mark.parametrize("command", FLAVOURS)
def test_forward_nat_on_a_host_whose_forward_policy_is_drop(command):
    """A router that drops forwarded traffic (and accepts its established replies, as any
    stateful router does): NAT openings (TCP and UDP) get through; the knocker still cannot reach the
    inner host directly; the host's policy and rules survive flush()."""
    need_iptables(command)
    with Lab(clients=2, prefix="nat") as lab:
        forwarding(lab)
        inner_services(lab)
        for family, cli1, srv1, cli2, srv2 in families(lab):
            lab.udp_echo("cli2", 53, cli2, tell_peer=True)
        host = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"]
        for family in (4, 6):
            iptables(lab, command, family, "-A", "FORWARD", *host)
            iptables(lab, command, family, "-P", "FORWARD", "DROP")
        for family, cli1, srv1, cli2, srv2 in families(lab):
            assert tcp_try(lab.ns["cli1"], cli2, INNER_PORT) == "timeout"     # routed: dropped
        fw = InNetns(lab.ns["srv"], IptablesNat([("tcp", LOCAL_PORT)], command=command,
                                                nat=True))
        fw.setup()
        for family, cli1, srv1, cli2, srv2 in families(lab):
            assert udp_try(lab.ns["cli1"], srv1, 5353) == "refused"
            assert fw.open_nat(cli1, "tcp", NAT_PORT, cli2, INNER_PORT, 30, False)
            assert fw.open_nat(cli1, "udp", 5353, cli2, 53, 30, False)
        for family, cli1, srv1, cli2, srv2 in families(lab):
            assert udp_try(lab.ns["cli1"], srv1, 5353) == b"knock from " + cli1.encode()
            assert udp_try(lab.ns["cli1"], cli2, 53) == "timeout"          # not directly
            assert tcp_try(lab.ns["cli1"], srv1, NAT_PORT) == b"inner v%d\n" % family
            s = connected(lab.ns["cli1"], srv1, NAT_PORT)
            assert still_alive(s)                    # replies and later packets get through
            # Only the DNATed path is open: not the inner host's port itself.
            assert tcp_try(lab.ns["cli1"], cli2, INNER_PORT) == "timeout"
        assert fw.flush()
        for family, cli1, srv1, cli2, srv2 in families(lab):
            assert rules(lab, command, family, "FORWARD") == [host]
            assert "-P FORWARD DROP" in iptables(lab, command, family, "-S", "FORWARD").stdout
            assert ":FORWARD DROP" in save(lab, command, family)
            assert tcp_try(lab.ns["cli1"], srv1, NAT_PORT) == "refused"


@pytest.mark.parametrize("command", FLAVOURS)
def test_local_nat_opens_the_nat_port_not_the_protected_one(command):
    """Local NAT (types 5/6), IPv4 and IPv6, no forwarding needed: client 1 reaches the
    server's protected 8022 through 55000; 8022 itself stays dark, to client 1 as well; the
    other client gets nothing; a plain opening of 8022 lives beside it, untouched by expire()."""
    need_iptables(command)
    with Lab(clients=2, prefix="nat") as lab:
        ns_sysctl(lab.ns["srv"], "net.ipv6.bindv6only", 1)
        local = {4: lab.tcp_service("srv", "0.0.0.0", LOCAL_PORT, b"server v4\n"),
                 6: lab.tcp_service("srv", "::", LOCAL_PORT, b"server v6\n")}
        fw = InNetns(lab.ns["srv"], IptablesNat([("tcp", LOCAL_PORT)], command=command,
                                                nat=True))
        fw.setup()
        for family, cli1, srv1, cli2, srv2 in families(lab):
            assert tcp_try(lab.ns["cli1"], srv1, LOCAL_PORT) == "refused"         # protected
            assert tcp_try(lab.ns["cli1"], srv1, LOCAL_NAT_PORT) == "refused"
        now = time.time()
        end = math.ceil(now + 2)
        for family, cli1, srv1, cli2, srv2 in families(lab):
            assert fw.open_nat(cli1, "tcp", LOCAL_NAT_PORT, srv1, LOCAL_PORT, 2, True, now)
        kept = []
        for family, cli1, srv1, cli2, srv2 in families(lab):
            assert tcp_try(lab.ns["cli1"], srv1, LOCAL_NAT_PORT) == b"server v%d\n" % family
            assert local[family].peers and all(p[0] == cli1 for p in local[family].peers)
            assert tcp_try(lab.ns["cli1"], srv1, LOCAL_PORT) == "refused"   # not opened by it
            assert tcp_try(lab.ns["cli2"], srv2, LOCAL_NAT_PORT) == "refused"
            assert tcp_try(lab.ns["cli2"], srv1, LOCAL_NAT_PORT) == "refused"
            assert tcp_try(lab.ns["cli2"], srv2, LOCAL_PORT) == "refused"
            kept.append(connected(lab.ns["cli1"], srv1, LOCAL_NAT_PORT))
        assert fw.list() == []
        assert sorted(row[:6] for row in fw.list_nat()) == sorted(
            (cli1, "tcp", LOCAL_NAT_PORT, srv1, LOCAL_PORT, True)
            for _, cli1, srv1, _, _ in families(lab))
        for family in (4, 6):
            assert rules(lab, command, family, "SPA_FORWARD") == [spa.IPT_ESTABLISHED]
            assert len(ours(rules(lab, command, family, "SPA_INPUT"))) == 1
        # A plain opening of the protected port itself, independent of the NAT one.
        for family, cli1, srv1, cli2, srv2 in families(lab):
            assert fw.open(cli1, "tcp", LOCAL_PORT, 30)
            assert tcp_try(lab.ns["cli1"], srv1, LOCAL_PORT) == b"server v%d\n" % family

        sleep_until(end + 0.1)
        for family, cli1, srv1, cli2, srv2 in families(lab):
            assert tcp_try(lab.ns["cli1"], srv1, LOCAL_NAT_PORT) == "refused"
        for s in kept:
            assert still_alive(s)
        assert fw.list_nat() == []
        assert fw.expire() == 4
        assert sorted(row[:3] for row in fw.list()) == sorted(
            (cli1, "tcp", LOCAL_PORT) for _, cli1, _, _, _ in families(lab))
        for family, cli1, srv1, cli2, srv2 in families(lab):
            assert tcp_try(lab.ns["cli1"], srv1, LOCAL_PORT) == b"server v%d\n" % family
        assert fw.flush()
        for family in (4, 6):
            assert "SPA_" not in save(lab, command, family)


@pytest.mark.parametrize("command", FLAVOURS)
def test_restart_reload_and_replacement_keep_nat_openings(command):
    need_iptables(command)
    with Lab(clients=2, prefix="nat") as lab:
        forwarding(lab)
        inner_services(lab)
        lab.tcp_service("srv", lab.srv4(1), LOCAL_PORT, b"server v4\n")
        lab.tcp_service("srv", lab.srv6(1), LOCAL_PORT, b"server v6\n")
        srv, cli1 = lab.ns["srv"], lab.ns["cli1"]
        protect = [("tcp", LOCAL_PORT)]
        first = InNetns(srv, IptablesNat(protect, command=command, nat=True))
        first.setup()
        now = time.time()
        assert first.open_nat(lab.cli4(1), "tcp", NAT_PORT, lab.cli4(2), INNER_PORT, 60, False, now)
        assert first.open_nat(lab.cli6(1), "tcp", LOCAL_NAT_PORT, lab.srv6(1), LOCAL_PORT, 60,
                              True, now)
        assert first.open_nat(lab.cli4(2), "tcp", NAT_PORT, lab.cli4(1), 22, 5, False,
                              now - 100)                               # long expired
        assert first.open(lab.cli4(1), "tcp", LOCAL_PORT, 60, now)

        # A new server (a restart): what is in force survives, the expired one goes.
        fw = InNetns(srv, IptablesNat(protect, command=command, nat=True))
        fw.setup()
        assert sorted(row[:6] for row in fw.list_nat()) == [
            (lab.cli4(1), "tcp", NAT_PORT, lab.cli4(2), INNER_PORT, False),
            (lab.cli6(1), "tcp", LOCAL_NAT_PORT, lab.srv6(1), LOCAL_PORT, True)]
        assert all(58 <= row[6] <= 61 for row in fw.list_nat())
        assert [row[:3] for row in fw.list()] == [(lab.cli4(1), "tcp", LOCAL_PORT)]
        assert len(ours(rules(lab, command, 4, "SPA_PREROUTING", "nat"))) == 1
        assert tcp_try(cli1, lab.srv4(1), NAT_PORT) == b"inner v4\n"
        assert fw.intact()
        assert not fw.restore()

        # A reload wipes our nat chain: intact() sees it, restore() puts it all back.
        iptables(lab, command, 4, "-t", "nat", "-D", "PREROUTING", "-j", "SPA_PREROUTING")
        iptables(lab, command, 4, "-t", "nat", "-F", "SPA_PREROUTING")
        iptables(lab, command, 4, "-t", "nat", "-X", "SPA_PREROUTING")
        assert tcp_try(cli1, lab.srv4(1), NAT_PORT) == "refused"
        assert not fw.intact()
        assert fw.restore()
        assert fw.intact()
        assert tcp_try(cli1, lab.srv4(1), NAT_PORT) == b"inner v4\n"
        # ... and one that takes the FORWARD jump and chain.
        iptables(lab, command, 6, "-D", "FORWARD", "-j", "SPA_FORWARD")
        iptables(lab, command, 6, "-F", "SPA_FORWARD")
        iptables(lab, command, 6, "-X", "SPA_FORWARD")
        assert fw.restore()
        assert rules(lab, command, 6, "FORWARD") == [["-j", "SPA_FORWARD"]]
        assert tcp_try(cli1, lab.srv6(1), LOCAL_NAT_PORT) == b"server v6\n"
        # An open_nat after the chain vanished builds the chains again and succeeds.
        iptables(lab, command, 4, "-t", "nat", "-D", "PREROUTING", "-j", "SPA_PREROUTING")
        iptables(lab, command, 4, "-t", "nat", "-F", "SPA_PREROUTING")
        iptables(lab, command, 4, "-t", "nat", "-X", "SPA_PREROUTING")
        assert fw.open_nat(lab.cli4(1), "tcp", NAT_PORT, lab.cli4(2), INNER_PORT, 90, False)
        assert len(ours(rules(lab, command, 4, "SPA_PREROUTING", "nat"))) == 1
        assert tcp_try(cli1, lab.srv4(1), NAT_PORT) == b"inner v4\n"

        # The same DNAT match to somewhere else replaces the old opening in one go.
        assert fw.open_nat(lab.cli4(1), "tcp", NAT_PORT, lab.srv4(1), LOCAL_PORT, 30, True)
        assert tcp_try(cli1, lab.srv4(1), NAT_PORT) == b"server v4\n"
        assert [row[:6] for row in fw.list_nat() if ":" not in row[0]] == [
            (lab.cli4(1), "tcp", NAT_PORT, lab.srv4(1), LOCAL_PORT, True)]
        assert ours(rules(lab, command, 4, "SPA_FORWARD")) == []
        assert fw.close_nat(lab.cli4(1), "tcp", NAT_PORT)
        assert not fw.close_nat(lab.cli4(1), "tcp", NAT_PORT)
        assert tcp_try(cli1, lab.srv4(1), NAT_PORT) == "refused"
        assert ours(rules(lab, command, 4, "SPA_INPUT")) == []

        # A restart with NAT turned off takes the NAT chains away, keeps plain openings.
        plain = InNetns(srv, IptablesNat(protect, command=command))
        plain.setup()
        assert plain.intact()
        for family in (4, 6):
            text = save(lab, command, family)
            assert "SPA_FORWARD" not in text and "SPA_PREROUTING" not in text
            assert "spa local nat" not in text and "SPA_INPUT" in text
        assert [row[:3] for row in plain.list()] == [(lab.cli4(1), "tcp", LOCAL_PORT)]
        assert tcp_try(cli1, lab.srv6(1), LOCAL_NAT_PORT) == "refused"
