"""Tests of the iptables back end (spa.IptablesFirewall, detect_firewall).

The unit tests replace run_command and need nothing.  The others run the real iptables,
both flavours (iptables-legacy and iptables-nft), IPv4 and IPv6, in throwaway network
namespaces (netns_lab, prefix "ipt"; 198.18.0.0/15 and 2001:db8::/32 only), with a real
TCP and UDP service behind the firewall.  Nothing iptables-related ever runs outside a
namespace we created: each firewall call runs in a thread that entered the namespace with
setns(2) (netns_lab.in_netns), and the iptables processes it starts inherit that namespace.
"""

import math
import shlex
import socket
import time

import pytest

import spa as ipt
import netns_lab
import spa
from netns_lab import FakeCommands, InNetns, ip6, sleep_until, tcp_try, udp_try, Lab, in_netns, ns_socket

FLAVOURS = ("iptables-legacy", "iptables-nft")
TCP_PORT, UDP_PORT, OTHER_PORT = 2222, 5353, 2223


# ------------------------------------------------------------------- helpers

def need_iptables(*commands):
    tools = []
    for command in commands:
        tools += [command, ip6(command), command + "-restore", ip6(command) + "-restore"]
    netns_lab.need_lab(*tools)


def iptables(lab, ns, command, family, *args, check=True):
    """Run iptables (or ip6tables) of one flavour inside `ns`; returns the result."""
    argv = [ip6(command) if family == 6 else command, "-w"] + list(args)
    return lab.run(ns, argv, check=check)


def rules(lab, ns, command, family, chain):
    """The `-S` rules of `chain` as word lists ([] when the chain does not exist)."""
    res = iptables(lab, ns, command, family, "-S", chain, check=False)
    return [shlex.split(line)[2:] for line in res.stdout.splitlines() if line.startswith("-A ")]


def save(lab, ns, command, family):
    """iptables-save of one flavour; it must succeed (a rule it cannot read makes it fail)."""
    res = lab.run(ns, [(ip6(command) if family == 6 else command) + "-save"], check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def section(saved, table):
    """The lines of one table in iptables-save output."""
    return saved.split("*%s\n" % table, 1)[1].split("COMMIT\n", 1)[0]


BANNER = b"netns-lab\n"          # what lab.tcp_service says first


def services(lab):
    """TCP (banner + echo) and UDP echo on every server address, IPv4 and IPv6."""
    lab.tcp_service("srv", "::", TCP_PORT)
    lab.udp_echo("srv", UDP_PORT)


def peers(lab):
    """(family, client 1's address, address it connects to, client 2's, address it uses)."""
    return [(4, lab.cli4(1), lab.srv4(1), lab.cli4(2), lab.srv4(2)),
            (6, lab.cli6(1), lab.srv6(1), lab.cli6(2), lab.srv6(2))]


def openings(rule_list):
    return [r for r in rule_list if any(w.startswith(ipt.IPT_COMMENT) for w in r)]


# ----------------------------------------------------- unit tests, no root

def test_open_writes_one_validated_rule(monkeypatch):
    fake = FakeCommands()
    monkeypatch.setattr(ipt, "run_command", fake)
    fw = ipt.IptablesFirewall([("tcp", 22)], command="iptables-nft")
    assert fw.open("198.18.1.2", "tcp", 22, 30, now=1000.2)
    rule = ('-s 198.18.1.2 -p tcp --dport 22 -m time --datestop 1970-01-01T00:17:10 '
            '-m comment --comment "spa expires 1031" -j ACCEPT')
    assert fake.calls == [(["iptables-nft-restore", "--wait=10", "--noflush"],
                           "*filter\n-I SPA_INPUT 1 %s\nCOMMIT\n" % rule)]
    # Never shorter, and nothing runs for it.
    assert not fw.open("198.18.1.2", "tcp", 22, 10, now=1001)
    assert len(fake.calls) == 1
    # Longer: the new rule and the removal of the old one, in one commit.
    assert fw.open("198.18.1.2", "tcp", 22, 60, now=1001)
    text = fake.calls[-1][1]
    assert '-I SPA_INPUT 1 -s 198.18.1.2 ' in text and '"spa expires 1061"' in text
    assert "-D SPA_INPUT %s\n" % rule in text
    # IPv6 goes to ip6tables, in canonical form.
    assert fw.open("2001:DB8:1:0::2", "udp", 53, 5, now=1000)
    argv, text = fake.calls[-1]
    assert argv[0] == "ip6tables-nft-restore" and "-s 2001:db8:1::2 -p udp --dport 53 " in text


@pytest.mark.parametrize("address, proto, port", [
    ("198.18.1.2 -j ACCEPT\n-F INPUT", "tcp", 22), ("198.18.1.0/24", "tcp", 22),
    ("198.18.1.2", "icmp", 22), ("198.18.1.2", "tcp", 0), ("198.18.1.2", "tcp", "22 -j DROP"),
])
def test_open_refuses_anything_but_an_address_proto_and_port(monkeypatch, address, proto, port):
    fake = FakeCommands()
    monkeypatch.setattr(ipt, "run_command", fake)
    with pytest.raises(ValueError):
        ipt.IptablesFirewall([("tcp", 22)]).open(address, proto, port, 30)
    assert fake.calls == []


def test_unknown_command_is_refused():
    with pytest.raises(spa.SpaError, match="expected one of"):
        ipt.IptablesFirewall([("tcp", 22)], command="/bin/sh")


def test_opening_rules_parse_back():
    fw = ipt.IptablesFirewall([("tcp", 22)])
    line = ('-A SPA_INPUT -s 2001:db8:1::2/128 -p tcp -m tcp --dport 22 -m time --datestop '
            '2030-01-01T00:00:00 -m comment --comment "spa expires 1893456001" -j ACCEPT')
    assert ipt._parse_opening(shlex.split(line)[2:]) == (("2001:db8:1::2", "tcp", 22), 1893456001)
    words = fw._opening_rule(("198.18.1.2", "udp", 53), 1893456001)
    assert ipt._parse_opening(words) == (("198.18.1.2", "udp", 53), 1893456001)
    assert "--datestop 2030-01-01T00:00:00" in " ".join(words)
    # Bound to an interface (bind_interface): -i, and the key says which.
    words = fw._opening_rule(("198.18.1.2", "tcp", 22, "eth0"), 1893456001)
    assert words[2:4] == ["-i", "eth0"]
    assert ipt._parse_opening(words) == (("198.18.1.2", "tcp", 22, "eth0"), 1893456001)
    # The RETURN of the same opening in SPA_STEER (nat) is read only when asked for.
    ret = fw._opening_rule(("198.18.1.2", "tcp", 22), 1893456001, "RETURN")
    assert ipt._parse_opening(ret) is None
    assert ipt._parse_opening(ret, "RETURN") == (("198.18.1.2", "tcp", 22), 1893456001)
    for other in ("-A SPA_INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
                  '-A SPA_INPUT -s 198.18.1.2/32 -m comment --comment "spa expires x" -j ACCEPT',
                  '-A SPA_INPUT -s 198.18.1.2/32 -p tcp --dport 22 -m comment --comment "spa"'
                  ' -j ACCEPT'):
        assert ipt._parse_opening(shlex.split(other)[2:]) is None


def test_protect_rules_per_action_and_family():
    fw = ipt.IptablesFirewall([("udp", 53), ("tcp", 22), ("tcp", 22)])
    assert fw._protect_rules(6) == [
        ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"],
        ["-p", "tcp", "--dport", "22", "-j", "REJECT", "--reject-with", "tcp-reset"],
        ["-p", "udp", "--dport", "53", "-j", "REJECT", "--reject-with", "icmp6-port-unreachable"]]
    assert fw._protect_rules(4)[2][-1] == "icmp-port-unreachable"
    drop = ipt.IptablesFirewall([("tcp", 22)], action="drop")
    assert drop._protect_rules(4)[1] == ["-p", "tcp", "--dport", "22", "-j", "DROP"]


NFT_CHAINS_IPTABLES = ('{"nftables": [{"metainfo": {}}, {"chain": {"family": "ip", '
                       '"table": "filter", "name": "INPUT", "hook": "input"}}]}')
NFT_CHAINS_OWN = ('{"nftables": [{"chain": {"family": "inet", "table": "spa", "name": "input"}}, '
                  '{"chain": {"family": "ip", "table": "filter", "name": "input"}}]}')
LEGACY_RULES = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"
LEGACY_EMPTY = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"
MISSING = spa.SpaError("not found")


@pytest.mark.parametrize("outputs, expected", [
    ({"nft": '{"nftables": []}'}, "nft"),
    ({"nft": NFT_CHAINS_OWN, "iptables-legacy-save": LEGACY_EMPTY}, "nft"),
    ({"nft": NFT_CHAINS_IPTABLES}, "iptables-nft"),
    ({"nft": '{"nftables": []}', "iptables-legacy-save": LEGACY_RULES}, "iptables-legacy"),
    ({"nft": MISSING, "iptables-nft-save": "*filter\n-A INPUT -j DROP\n"}, "iptables-nft"),
    ({"nft": MISSING, "ip6tables-legacy-save": "*filter\n-A INPUT -j DROP\n"}, "iptables-legacy"),
    ({"nft": MISSING, "iptables": "iptables v1.8.9 (legacy)\n"}, "iptables-legacy"),
    ({"nft": MISSING, "iptables": "iptables v1.8.9 (nf_tables)\n"}, "iptables-nft"),
])
def test_detect_firewall_decisions(monkeypatch, outputs, expected):
    monkeypatch.setattr(ipt, "run_command", FakeCommands(outputs))
    assert ipt.detect_firewall() == expected


def test_detect_firewall_with_nothing_installed(monkeypatch):
    monkeypatch.setattr(ipt, "run_command", FakeCommands(
        {name: MISSING for name in ("nft", "iptables", "iptables-nft-save", "ip6tables-nft-save",
                                    "iptables-legacy-save", "ip6tables-legacy-save")}))
    with pytest.raises(spa.SpaError, match="neither nft nor iptables"):
        ipt.detect_firewall()


# ------------------------------------------ integration: real iptables, namespaces

def test_subprocesses_started_in_a_setns_thread_inherit_its_namespace():
    netns_lab.need_lab()
    import os
    with Lab(clients=1, prefix="ipt") as lab:
        own = os.readlink("/proc/self/ns/net")
        want = in_netns(lab.ns["srv"], os.readlink, "/proc/thread-self/ns/net")
        child = in_netns(lab.ns["srv"], spa.run_command, ["readlink", "/proc/self/ns/net"]).strip()
        assert child == want != own


@pytest.mark.parametrize("command", FLAVOURS)
def test_open_for_one_client_closes_on_time_without_the_server(command):
    """Reject before; open for client 1 alone (TCP and UDP, IPv4 and IPv6); the kernel closes
    it at its end with no expire() call (a dead server) while an established connection
    lives on; expire() tidies; flush() leaves the host's own rules and iptables-save intact."""
    need_iptables(command)
    with Lab(clients=2, prefix="ipt") as lab:
        services(lab)
        host_rule = {4: ["-s", "198.19.255.1/32", "-j", "ACCEPT"],
                     6: ["-s", "2001:db8:ffff::1/128", "-j", "ACCEPT"]}
        for family in (4, 6):
            iptables(lab, "srv", command, family, "-A", "INPUT", *host_rule[family])
        fw = InNetns(lab.ns["srv"], ipt.IptablesFirewall([("tcp", TCP_PORT), ("udp", UDP_PORT)],
                                                         command=command))
        fw.setup()
        fw.setup()                               # a second start changes nothing
        for family in (4, 6):
            assert rules(lab, "srv", command, family, "INPUT") == [["-j", "SPA_INPUT"],
                                                                   host_rule[family]]
        for family, cli1, srv1, cli2, srv2 in peers(lab):
            assert tcp_try(lab.ns["cli1"], srv1, TCP_PORT) == "refused"
            assert udp_try(lab.ns["cli1"], srv1, UDP_PORT) == "refused"

        now = time.time()
        end = math.ceil(now + 2)
        for family, cli1, srv1, cli2, srv2 in peers(lab):
            assert fw.open(cli1, "tcp", TCP_PORT, 2, now)
            assert fw.open(cli1, "udp", UDP_PORT, 2, now)
            assert not fw.open(cli1, "tcp", TCP_PORT, 1)           # never shortened
        kept = []
        for family, cli1, srv1, cli2, srv2 in peers(lab):
            assert tcp_try(lab.ns["cli1"], srv1, TCP_PORT) == BANNER
            assert udp_try(lab.ns["cli1"], srv1, UDP_PORT) == b"knock"
            assert tcp_try(lab.ns["cli2"], srv2, TCP_PORT) == "refused"    # the other client
            assert udp_try(lab.ns["cli2"], srv2, UDP_PORT) == "refused"
            s = ns_socket(lab.ns["cli1"], socket.AF_INET6 if family == 6 else socket.AF_INET)
            s.settimeout(2)
            s.connect((srv1, TCP_PORT))
            assert s.recv(64)
            kept.append(s)
        for family in (4, 6):      # iptables-save reads our rules (xt_time, comment) back
            saved = save(lab, "srv", command, family)
            assert section(saved, "filter").count(ipt.IPT_COMMENT) == 2
            # and the TCP opening's RETURN in SPA_STEER (nat), which lets it past the steering
            assert section(saved, "nat").count(ipt.IPT_COMMENT) == 1
        listed = sorted(fw.list())
        assert [row[:3] for row in listed] == sorted(
            (cli1, proto, port) for _, cli1, _, _, _ in peers(lab)
            for proto, port in (("tcp", TCP_PORT), ("udp", UDP_PORT)))
        assert all(1 <= row[3] <= 3 for row in listed), listed

        sleep_until(end - 0.3)                                   # still open just before the end
        assert tcp_try(lab.ns["cli1"], lab.srv4(1), TCP_PORT) == BANNER
        sleep_until(end + 0.05)
        # No expire() call: the rules are still there, and the kernel no longer matches them.
        for family, cli1, srv1, cli2, srv2 in peers(lab):
            assert len(openings(rules(lab, "srv", command, family, "SPA_INPUT"))) == 2
            assert tcp_try(lab.ns["cli1"], srv1, TCP_PORT) == "refused"
            assert udp_try(lab.ns["cli1"], srv1, UDP_PORT) == "refused"
        for s in kept:                                            # established: still alive
            s.sendall(b"still there?")
            assert s.recv(64) == b"still there?"
            s.close()
        assert fw.list() == []

        assert fw.expire() == 4
        assert fw.expire() == 0
        for family in (4, 6):
            assert openings(rules(lab, "srv", command, family, "SPA_INPUT")) == []

        assert fw.flush()
        assert not fw.flush()
        for family in (4, 6):
            assert rules(lab, "srv", command, family, "INPUT") == [host_rule[family]]
            assert "SPA_INPUT" not in save(lab, "srv", command, family)
        assert tcp_try(lab.ns["cli2"], lab.srv4(2), TCP_PORT) == BANNER   # nothing kept dark


@pytest.mark.parametrize("command", FLAVOURS)
def test_restart_keeps_openings_drops_expired_and_repairs_the_chain(command):
    need_iptables(command)
    with Lab(clients=2, prefix="ipt") as lab:
        services(lab)
        srv = lab.ns["srv"]
        first = InNetns(srv, ipt.IptablesFirewall([("tcp", TCP_PORT)], command=command))
        first.setup()
        now = time.time()
        assert first.open(lab.cli4(1), "tcp", TCP_PORT, 60, now)
        assert first.open(lab.cli6(1), "tcp", TCP_PORT, 60, now)
        assert first.open(lab.cli4(2), "tcp", TCP_PORT, 5, now - 100)   # long expired
        assert len(openings(rules(lab, "srv", command, 4, "SPA_INPUT"))) == 2

        # A new server (a restart), protecting one more port.
        fw = InNetns(srv, ipt.IptablesFirewall([("tcp", TCP_PORT), ("tcp", OTHER_PORT)],
                                               command=command))
        fw.setup()
        listed = sorted(fw.list())
        assert [row[:3] for row in listed] == [(lab.cli4(1), "tcp", TCP_PORT),
                                               (lab.cli6(1), "tcp", TCP_PORT)]
        assert all(58 <= row[3] <= 61 for row in listed), listed
        chain = rules(lab, "srv", command, 4, "SPA_INPUT")
        # Openings first; then what the nat table steered to port 0, the protect rules.
        assert [r[:2] for r in chain] == [["-s", lab.cli4(1) + "/32"], ["-m", "conntrack"],
                                          ["-p", "tcp"], ["-p", "tcp"], ["-p", "tcp"]]
        assert chain[2][chain[2].index("--dport") + 1] == "0"
        assert chain[4][chain[4].index("--dport") + 1] == str(OTHER_PORT)
        assert tcp_try(lab.ns["cli1"], lab.srv4(1), TCP_PORT) == BANNER
        assert tcp_try(lab.ns["cli1"], lab.srv6(1), TCP_PORT) == BANNER
        assert tcp_try(lab.ns["cli2"], lab.srv4(2), TCP_PORT) == "refused"

        assert not fw.open(lab.cli4(1), "tcp", TCP_PORT, 30)
        assert fw.open(lab.cli4(1), "tcp", TCP_PORT, 120)
        mine = openings(rules(lab, "srv", command, 4, "SPA_INPUT"))
        assert len(mine) == 1 and abs(ipt._parse_opening(mine[0])[1] - time.time() - 120) < 2

        assert fw.close(lab.cli4(1), "tcp", TCP_PORT)
        assert not fw.close(lab.cli4(1), "tcp", TCP_PORT)
        assert tcp_try(lab.ns["cli1"], lab.srv4(1), TCP_PORT) == "refused"
        assert [row[0] for row in fw.list()] == [lab.cli6(1)]

        # Someone wipes our IPv4 chain (a firewall reload): the next open builds it again.
        iptables(lab, "srv", command, 4, "-D", "INPUT", "-j", "SPA_INPUT")
        iptables(lab, "srv", command, 4, "-F", "SPA_INPUT")
        iptables(lab, "srv", command, 4, "-X", "SPA_INPUT")
        # Still dark: SPA_STEER (nat) sends new connections to port 0, to the kernel's reset.
        assert tcp_try(lab.ns["cli2"], lab.srv4(2), TCP_PORT) == "refused"
        assert fw.open(lab.cli4(2), "tcp", TCP_PORT, 30)
        assert rules(lab, "srv", command, 4, "INPUT") == [["-j", "SPA_INPUT"]]
        assert tcp_try(lab.ns["cli2"], lab.srv4(2), TCP_PORT) == BANNER
        assert tcp_try(lab.ns["cli1"], lab.srv4(1), TCP_PORT) == "refused"  # dark again
        assert tcp_try(lab.ns["cli1"], lab.srv6(1), TCP_PORT) == BANNER       # IPv6 untouched


@pytest.mark.parametrize("command", FLAVOURS)
def test_default_drop_host_is_opened_and_keeps_its_rules(command):
    need_iptables(command)
    with Lab(clients=2, prefix="ipt") as lab:
        services(lab)
        host = {4: [["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
                    ["-i", "lo", "-j", "ACCEPT"]],
                6: [["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
                    ["-i", "lo", "-j", "ACCEPT"],
                    ["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", "133", "-j", "ACCEPT"],
                    ["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", "135", "-j", "ACCEPT"],
                    ["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", "136", "-j", "ACCEPT"]]}
        for family in (4, 6):
            for rule in host[family]:
                iptables(lab, "srv", command, family, "-A", "INPUT", *rule)
            iptables(lab, "srv", command, family, "-P", "INPUT", "DROP")
        host_listing = {f: rules(lab, "srv", command, f, "INPUT") for f in (4, 6)}
        for family, cli1, srv1, cli2, srv2 in peers(lab):
            assert tcp_try(lab.ns["cli1"], srv1, TCP_PORT) == "timeout"      # the host drops
        fw = InNetns(lab.ns["srv"], ipt.IptablesFirewall([("tcp", TCP_PORT)], command=command))
        fw.setup()
        for family, cli1, srv1, cli2, srv2 in peers(lab):
            assert tcp_try(lab.ns["cli1"], srv1, TCP_PORT) == "refused"      # ours answers first
            assert fw.open(cli1, "tcp", TCP_PORT, 30)
        for family, cli1, srv1, cli2, srv2 in peers(lab):
            assert tcp_try(lab.ns["cli1"], srv1, TCP_PORT) == BANNER
            assert tcp_try(lab.ns["cli2"], srv2, TCP_PORT) == "refused"
        assert fw.flush()
        for family, cli1, srv1, cli2, srv2 in peers(lab):
            assert rules(lab, "srv", command, family, "INPUT") == host_listing[family]
            assert "-P INPUT DROP" in iptables(lab, "srv", command, family, "-S", "INPUT").stdout
            assert ":INPUT DROP" in save(lab, "srv", command, family)
            assert tcp_try(lab.ns["cli1"], srv1, TCP_PORT) == "timeout"


@pytest.mark.parametrize("command", FLAVOURS)
def test_drop_action_is_silent(command):
    need_iptables(command)
    with Lab(clients=2, prefix="ipt") as lab:
        services(lab)
        fw = InNetns(lab.ns["srv"], ipt.IptablesFirewall([("tcp", TCP_PORT), ("udp", UDP_PORT)],
                                                         action="drop", command=command))
        fw.setup()
        for family, cli1, srv1, cli2, srv2 in peers(lab):
            assert tcp_try(lab.ns["cli1"], srv1, TCP_PORT, 0.3) == "timeout"
            assert udp_try(lab.ns["cli1"], srv1, UDP_PORT, 0.3) == "timeout"
            assert fw.open(cli1, "tcp", TCP_PORT, 30)
            assert fw.open(cli1, "udp", UDP_PORT, 30)
        for family, cli1, srv1, cli2, srv2 in peers(lab):
            assert tcp_try(lab.ns["cli1"], srv1, TCP_PORT) == BANNER
            assert udp_try(lab.ns["cli1"], srv1, UDP_PORT) == b"knock"
            assert tcp_try(lab.ns["cli2"], srv2, TCP_PORT, 0.3) == "timeout"


def test_detect_firewall_in_namespaces():
    need_iptables(*FLAVOURS)
    netns_lab.need_lab("nft", "iptables-nft-save", "iptables-legacy-save")
    with Lab(clients=3, prefix="ipt") as lab:
        detect = lambda ns: in_netns(lab.ns[ns], ipt.detect_firewall)   # noqa: E731
        assert detect("cli1") == "nft"                                   # a clean namespace
        iptables(lab, "srv", "iptables-nft", 4, "-A", "INPUT", "-s", "198.19.255.1", "-j", "ACCEPT")
        assert detect("srv") == "iptables-nft"
        iptables(lab, "cli1", "iptables-legacy", 6, "-P", "INPUT", "DROP")
        assert detect("cli1") == "iptables-legacy"
        # Our own back ends leave the answer as it was: a restart finds the same one.
        InNetns(lab.ns["cli2"], spa.NftFirewall([("tcp", TCP_PORT)])).setup()
        assert detect("cli2") == "nft"
        InNetns(lab.ns["cli3"], ipt.IptablesFirewall([("tcp", TCP_PORT)],
                                                     command="iptables-nft")).setup()
        assert detect("cli3") == "iptables-nft"
        # Listing alone changes nothing (legacy -L makes its built-in chains, with ACCEPT).
        iptables(lab, "cli2", "iptables-legacy", 4, "-L", "-n")
        iptables(lab, "cli2", "iptables-nft", 6, "-L", "-n")
        assert detect("cli2") == "nft"
