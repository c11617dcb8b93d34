"""fwknop's NAT modes (issue 14, section 2): force_nat, force_snat, force_masquerade,
disable_dnat, forward_all, DESTINATION, and [server] enable_snat / snat_translate_ip.

As fwknopd builds them (server/fw_util_iptables.c: process_spa_request, forward_access_rule,
dnat_rule, snat_rule; access.c): force_nat turns any access request into NAT access to one
host; SNAT (an address) or MASQUERADE rewrites the source of what is forwarded; disable_dnat
forwards what the client itself sends to the inner host, with no DNAT; forward_all accepts
everything forwarded from the client.  DESTINATION picks stanzas by where the knock was sent.

The unit tests need nothing.  The others run the real nft and iptables (both flavours), IPv4
and IPv6, in network namespaces of their own (netns_lab, prefix "nt"; 198.18.0.0/15 and
2001:db8::/32 only): client 1 knocks, client 2 is the internal host behind the server (which
forwards), client 3 is a stranger; real TCP services; the real fwknop client where it helps.
"""

import base64
import os
import re
import shlex
import sys
import time

import pytest

import netns_lab
import spa
from spa import NatMode, PLAIN_NAT
from netns_lab import (FakeCommands, InNetns, Lab, ip6, ns_sysctl, sleep_until, tcp_try,
                       udp_try, wait_for_line)
from test_spa import HMAC_KEY, KEY, Lines, knock, server_config, write_private

HERE = os.path.dirname(os.path.abspath(__file__))
SPA = os.path.join(HERE, "spa.py")
KINDS = ("nft", "iptables-nft", "iptables-legacy")
NAT_PORT, INNER_PORT, OTHER_PORT = 5022, 22, 2222
EXTRA4, EXTRA6 = "198.18.2.9", "2001:db8:2::9"      # a second address of the server on link 2
ME = "198.18.0.1"


# ------------------------------------------------------------------- helpers

def need(kind):
    if kind == "nft":
        netns_lab.need_lab("nft")
    else:
        netns_lab.need_lab(kind, ip6(kind), kind + "-restore", ip6(kind) + "-restore")


def firewall(lab, kind, protect=(("tcp", 8022),)):
    if kind == "nft":
        fw = spa.NftFirewall(list(protect), nat=True)
    else:
        fw = spa.IptablesFirewall(list(protect), command=kind, nat=True)
    return InNetns(lab.name("srv"), fw)


def families(lab):
    """(family, client 1, server on link 1, client 2 = the inner host, server on link 2)."""
    return [(4, Lab.cli4(1), Lab.srv4(1), Lab.cli4(2), Lab.srv4(2)),
            (6, Lab.cli6(1), Lab.srv6(1), Lab.cli6(2), Lab.srv6(2))]


def router(lab, kind, drop=True):
    """The server forwards; with `drop`, its forward chain drops what it does not allow (and
    accepts established replies, as any stateful router does); a second address on link 2."""
    ns_sysctl(lab.name("srv"), "net.ipv4.ip_forward", 1)
    ns_sysctl(lab.name("srv"), "net.ipv6.conf.all.forwarding", 1)
    lab.run("srv", ["ip", "addr", "add", EXTRA4 + "/24", "dev", lab.srv_if[2]])
    lab.run("srv", ["ip", "addr", "add", EXTRA6 + "/64", "dev", lab.srv_if[2], "nodad"])
    if not drop:
        return
    if kind == "nft":
        lab.run("srv", ["nft", "-f", "-"], input="table inet filter {\n chain forward {\n"
                " type filter hook forward priority 0; policy drop;\n"
                " ct state established,related accept\n }\n}\n")
        return
    for command in (kind, ip6(kind)):
        lab.run("srv", [command, "-w", "-A", "FORWARD", "-m", "conntrack", "--ctstate",
                        "RELATED,ESTABLISHED", "-j", "ACCEPT"])
        lab.run("srv", [command, "-w", "-P", "FORWARD", "DROP"])


def inner_services(lab):
    """Client 2's services: {(family, port): service}."""
    return {(family, port): lab.tcp_service("cli2", cli2, port, b"inner %d v%d\n" % (port, family))
            for family, _, _, cli2, _ in families(lab) for port in (INNER_PORT, OTHER_PORT)}


def reach(ns, address, port, service):
    """(what a connection to address:port reads, the peer `service` saw for it)."""
    before = len(service.peers)
    got = tcp_try(ns, address, port)
    deadline = time.monotonic() + 2
    while len(service.peers) <= before and time.monotonic() < deadline:
        time.sleep(0.01)
    return got, service.peers[-1][0] if len(service.peers) > before else None


def extra(family):
    return EXTRA4 if family == 4 else EXTRA6


def banner(family, port):
    return b"inner %d v%d\n" % (port, family)


def gatekeeper(tmp_path, stanzas, addresses=(ME,), **server):
    config = server_config(tmp_path, stanzas, **server)
    replay = spa.ReplayCache(config.replay_cache, config.max_packet_age)
    return spa.Gatekeeper(config, spa.DryRunFirewall(config.protect), replay, Lines(),
                          set(addresses))


# ----------------------------------------------------- the policy, no root

@pytest.mark.parametrize("value, target", [
    ("198.18.2.2:22", ("198.18.2.2", 22)),
    ("198.18.2.2  2222", ("198.18.2.2", 2222)),                 # fwknop's `IP PORT`
    ("[2001:DB8:2::2]:22", ("2001:db8:2::2", 22)),
    ("2001:db8:2::2 22", ("2001:db8:2::2", 22)),
])
def test_force_nat_reads_ip_and_port(tmp_path, value, target):
    config = server_config(tmp_path, {"a": {"force_nat": value, "open_ports": "tcp/5022"}},
                           enable_forwarding="yes")
    assert config.stanzas[0].force_nat == target


@pytest.mark.parametrize("stanza, server, error", [
    ({"force_nat": "198.18.2.2:22"}, {}, "force_nat needs \\[server\\] enable_forwarding"),
    ({"force_nat": "198.18.2.2"}, {"enable_forwarding": "yes"}, "expected IP:PORT"),
    ({"force_nat": "198.18.2.2:0"}, {"enable_forwarding": "yes"}, "expected IP:PORT"),
    ({"force_nat": "127.0.0.1:22"}, {"enable_forwarding": "yes"}, "a loopback address"),
    ({"force_nat": "example.org:22"}, {"enable_forwarding": "yes"}, "expected an IP address"),
    ({"force_snat": "198.18.2.9"}, {"enable_forwarding": "yes"},
     "force_snat and force_masquerade need force_nat or forward_all"),
    ({"force_masquerade": "yes", "enable_nat": "yes"}, {"enable_forwarding": "yes"},
     "need force_nat or forward_all"),
    ({"force_nat": "198.18.2.2:22", "force_snat": "198.18.2.9", "force_masquerade": "yes"},
     {"enable_forwarding": "yes"}, "give one of them"),
    ({"disable_dnat": "yes"}, {"enable_forwarding": "yes"},
     "disable_dnat and forward_all need force_nat or enable_nat"),
    ({"forward_all": "yes", "enable_nat": "yes"}, {}, "forward_all needs \\[server\\] "
                                                      "enable_forwarding"),
    ({"destination": "198.18.0.0/33"}, {}, "destination"),
    ({}, {"enable_snat": "yes"}, "enable_snat needs enable_forwarding"),
    ({}, {"snat_translate_ip": "198.18.2.9"}, "snat_translate_ip needs enable_snat"),
    ({}, {"enable_snat": "yes", "enable_forwarding": "yes", "snat_translate_ip": "0.0.0.0"},
     "the unspecified address"),
])
def test_nat_modes_that_cannot_work_are_refused_at_load(tmp_path, stanza, server, error):
    with pytest.raises(spa.SpaError, match=error):
        server_config(tmp_path, {"a": dict(stanza, open_ports="tcp/5022")}, **server)


def test_force_nat_turns_any_access_request_into_nat_to_its_host(tmp_path):
    """fwknopd's process_spa_request: with FORCE_NAT, a plain access request (and a NAT
    request, whatever host it names) goes to the forced host; open_ports still decides."""
    gate = gatekeeper(tmp_path, {"a": {"force_nat": "198.18.2.2:2222",
                                       "open_ports": "tcp/5022"}}, enable_forwarding="yes")
    now = time.time()
    d = gate.knock("198.18.1.2", ME, knock([("tcp", 5022)], timestamp=int(now)), now)
    assert d.accepted, d.reason
    assert d.nat == ("198.18.2.2", 2222, False) and d.nat_mode == PLAIN_NAT
    assert gate.firewall.opened[-1] == ("198.18.1.2", "tcp", 5022, 30, "198.18.2.2", 2222, False)
    msg = spa.Message("alice", "0.0.0.0", [("tcp", 5022)], msg_type=spa.MSG_NAT,
                      nat_access="198.18.3.3,22", timestamp=int(now))
    wire = spa.seal(msg.encode(), base64.b64decode(KEY), base64.b64decode(HMAC_KEY))
    d = gate.knock("198.18.1.3", ME, wire, now)
    assert d.accepted and d.nat == ("198.18.2.2", 2222, False)
    for access, why in (([("tcp", 22)], "tcp/22 not in open_ports"),
                        ([("tcp", 5022), ("udp", 53)], "must name one")):
        d = gate.knock("198.18.1.4", ME, knock(access, timestamp=int(now)), now)
        assert not d.accepted and why in d.reason
    assert "opened tcp/5022 forwarded to 198.18.2.2:2222 for 198.18.1.2 for 30 s (test" in \
        "\n".join(gate.log.lines)


def test_each_stanza_forwards_as_its_mode_says(tmp_path):
    """force_snat, force_masquerade, disable_dnat, forward_all and [server] enable_snat
    (snat_translate_ip for its family, MASQUERADE for the other) reach the firewall."""
    stanzas = {
        "snat": {"source": "198.18.1.0/24", "force_nat": "198.18.2.2:22",
                 "force_snat": "198.18.2.9", "open_ports": "tcp/5022"},
        "masq": {"source": "198.18.3.0/24", "force_nat": "198.18.2.2:22",
                 "force_masquerade": "yes", "disable_dnat": "yes", "forward_all": "yes",
                 "open_ports": "tcp/5022"},
        "plain": {"source": "198.18.4.0/24, 2001:db8::/32", "enable_nat": "yes",
                  "nat_destinations": "198.18.2.2:22, [2001:db8:2::2]:22",
                  "open_ports": "tcp/5022"},
        "wrong": {"source": "198.18.5.0/24", "enable_nat": "yes", "forward_all": "yes",
                  "nat_destinations": "198.18.2.2:22",
                  "force_snat": "2001:db8:2::9", "open_ports": "tcp/5022"}}
    gate = gatekeeper(tmp_path, stanzas, addresses=(ME, "2001:db8::1"), enable_forwarding="yes",
                      enable_snat="yes", snat_translate_ip="198.18.2.1")
    now = time.time()
    modes = {}
    for source in ("198.18.1.2", "198.18.3.2"):
        d = gate.knock(source, ME, knock([("tcp", 5022)], timestamp=int(now)), now)
        assert d.accepted, d.reason
        modes[source] = d.nat_mode
    assert modes == {"198.18.1.2": NatMode(True, "198.18.2.9", False),
                     "198.18.3.2": NatMode(False, "masquerade", True)}
    for source, dest, target, snat in (("198.18.4.2", ME, "198.18.2.2,22", "198.18.2.1"),
                                       ("2001:db8:1::2", "2001:db8::1", "2001:db8:2::2,22",
                                        "masquerade")):
        msg = spa.Message("alice", "0.0.0.0", [("tcp", 5022)], msg_type=spa.MSG_NAT,
                          nat_access=target, timestamp=int(now))
        d = gate.knock(source, dest, spa.seal(msg.encode(), base64.b64decode(KEY),
                                              base64.b64decode(HMAC_KEY)), now)
        assert d.accepted and d.nat_mode == NatMode(True, snat, False), d.reason
        assert gate.firewall.opened[-1][-1] == d.nat_mode
    assert "198.18.3.2 for 30 s, without DNAT, everything forwarded, masqueraded (test" in \
        "\n".join(gate.log.lines)
    msg = spa.Message("alice", "0.0.0.0", [("tcp", 5022)], msg_type=spa.MSG_NAT,
                      nat_access="198.18.2.2,22", timestamp=int(now))
    d = gate.knock("198.18.5.2", ME, spa.seal(msg.encode(), base64.b64decode(KEY),
                                              base64.b64decode(HMAC_KEY)), now)
    assert not d.accepted and "force_snat 2001:db8:2::9 cannot SNAT an IPv4" in d.reason


def test_destination_picks_the_stanza_as_fwknopd_does(tmp_path):
    """DESTINATION is checked with SOURCE (incoming_spa.c): a stanza whose destination does
    not hold the knock's is passed over for the next, by the gatekeeper, against the
    captured packet's destination; no stanza left: refused, saying so."""
    stanzas = {"one": {"destination": "198.18.0.1", "open_ports": "tcp/22"},
               "two": {"destination": "198.18.9.0/24, 2001:db8:9::/48", "open_ports": "tcp/23"}}
    gate = gatekeeper(tmp_path, stanzas, addresses=(ME, "198.18.9.1", "198.18.8.1",
                                                    "2001:db8:9::1"))
    now = time.time()
    for dest, access, name in ((ME, [("tcp", 22)], "one"), ("198.18.9.1", [("tcp", 23)], "two"),
                               ("2001:db8:9::1", [("tcp", 23)], "two")):
        source = "2001:db8:1::2" if ":" in dest else "198.18.1.2"
        d = gate.knock(source, dest, knock(access, timestamp=int(now)), now)
        assert d.accepted and d.stanza.name == name, d.reason
    d = gate.knock("198.18.1.2", "198.18.8.1", knock(timestamp=int(now)), now)
    assert not d.accepted
    assert "no stanza for source 198.18.1.2 and destination 198.18.8.1" in d.reason
    # "one" opens nothing when the knock went to the other address.
    d = gate.knock("198.18.1.2", "198.18.9.1", knock(timestamp=int(now)), now)
    assert not d.accepted and "tcp/22 not in open_ports" in d.reason
    assert spa.decide(knock(), "198.18.1.2", None, gate.config.stanzas, lambda k: False, 120,
                      "198.18.9.1").stanza.name == "two"


ACCESS_CONF = """SOURCE              198.18.1.0/24
DESTINATION         198.18.1.1, 198.18.0.0/24
OPEN_PORTS          tcp/5022
KEY_BASE64          {key}
HMAC_KEY_BASE64     {hkey}
FORCE_NAT           198.18.2.2 2222
FORCE_SNAT          198.18.2.9
FORWARD_ALL         N

SOURCE              2001:db8::/32
DESTINATION         ANY
OPEN_PORTS          tcp/5022
KEY_BASE64          {key}
HMAC_KEY_BASE64     {hkey}
FORCE_NAT           2001:db8:2::2 2222
FORCE_MASQUERADE    Y
DISABLE_DNAT        Y
FORWARD_ALL         Y
"""


def test_access_conf_names_load_with_their_meaning(tmp_path):
    path = write_private(tmp_path / "access.conf", ACCESS_CONF.format(key=KEY, hkey=HMAC_KEY))
    config = server_config(tmp_path, access_conf=path, enable_forwarding="yes")
    one, two = config.stanzas[1:]
    assert one.force_nat == ("198.18.2.2", 2222) and one.nat_mode(4) == NatMode(
        True, "198.18.2.9", False)
    assert [str(n) for n in one.destinations] == ["198.18.1.1/32", "198.18.0.0/24"]
    assert two.force_nat == ("2001:db8:2::2", 2222) and two.destinations is None
    assert two.nat_mode(6) == NatMode(False, "masquerade", True)
    assert not any("NAT access to other hosts is refused" in n for n in config.notes)
    # FORWARD_ALL or DISABLE_DNAT without FORCE_NAT would forward nothing here: left out.
    gateway = write_private(tmp_path / "gateway.conf", (
        "SOURCE ANY\nKEY_BASE64 %s\nHMAC_KEY_BASE64 %s\nFORWARD_ALL Y\nDISABLE_DNAT Y\n"
        "FORCE_MASQUERADE Y\n") % (KEY, HMAC_KEY))
    config = server_config(tmp_path, access_conf=gateway, enable_forwarding="yes")
    assert [s.name for s in config.stanzas] == ["alice"]
    assert "gateway.conf:1: stanza left out: spa.py does not support FORWARD_ALL or " \
        "DISABLE_DNAT without FORCE_NAT" in config.notes
    # Without forwarding, a FORCE_NAT stanza is left out and the note says why.
    config = server_config(tmp_path, access_conf=path)
    assert [s.name for s in config.stanzas] == ["alice"]
    assert "force_nat needs [server] enable_forwarding = yes" in "\n".join(config.notes)


def test_check_config_says_where_knocks_go_and_how_they_forward(tmp_path):
    import subprocess
    config = server_config(tmp_path, {
        "a": {"force_nat": "[2001:db8:2::2]:22", "force_masquerade": "yes", "forward_all": "yes",
              "destination": "198.18.0.1, 2001:db8::/64", "open_ports": "tcp/5022"},
        "b": {"force_nat": "198.18.2.2:22", "open_ports": "tcp/5022"}},
        enable_forwarding="yes", enable_snat="yes", snat_translate_ip="198.18.2.1")
    out = subprocess.run([sys.executable, SPA, "check-config", "-c", config.path],
                         stdout=subprocess.PIPE, universal_newlines=True).stdout
    assert "knocks must be sent to 198.18.0.1/32, 2001:db8::/64" in out
    assert "every request is forwarded to [2001:db8:2::2]:22, everything forwarded, " \
        "masqueraded" in out
    assert "every request is forwarded to 198.18.2.2:22, SNAT to 198.18.2.1" in out
    with pytest.raises(spa.SpaError, match="different families"):
        server_config(tmp_path, {"a": {"force_nat": "198.18.2.2:22", "force_snat":
                                       "2001:db8:2::9", "open_ports": "tcp/5022"}},
                      enable_forwarding="yes")


# ----------------------------------------------- the back ends' rules, no root

def test_iptables_mode_rules_carry_the_whole_opening_back():
    """Each rule of a NAT opening with a mode says in its comment what it belongs to (an
    SNAT or forward_all rule names neither port nor target), so a restart reads it back."""
    fw = spa.IptablesFirewall([("tcp", 22)], nat=True)
    end = 1893456001
    for key, mode in (
            (spa.NatOpening("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, False),
             NatMode(True, "198.18.2.9", False)),
            (spa.NatOpening("2001:db8:1::2", "udp", 53, "2001:db8:2::2", 5353, False),
             NatMode(False, "masquerade", True)),
            (spa.NatOpening("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, False),
             NatMode(False, None, False))):
        rules = fw._nat_rule_set(key, end, mode)
        assert [chain for _, chain, _ in rules] == (
            ["SPA_FORWARD"] + ["SPA_PREROUTING"] * mode.dnat
            + ["SPA_POSTROUTING"] * (mode.snat is not None))
        for _, _, words in rules:
            line = shlex.split(spa._restore_words(words))
            assert spa._parse_nat_mode(line) == (key, end, mode)
            assert spa._parse_nat(line) == (key, end)
            assert spa._parse_opening(line) is None
    accept = fw._nat_accept_rule(key, end, NatMode(False, None, False))
    assert "--ctstate" not in accept and accept[:8] == [
        "-s", "198.18.1.2", "-d", "198.18.2.2", "-p", "tcp", "--dport", "22"]
    everything = fw._nat_accept_rule(key, end, NatMode(True, None, True))
    assert everything[:2] == ["-s", "198.18.1.2"] and "-p" not in everything
    for bad in ("spa nat expires 5 tcp/5022 198.18.2.2:22 bogus",
                "spa nat expires 5 icmp/1 198.18.2.2:22", "spa nat expires 5 tcp/5022"):
        assert spa._parse_nat_mode(["-s", "198.18.1.2", "-m", "comment", "--comment", bad,
                                    "-j", "ACCEPT"]) is None


def test_iptables_open_nat_with_a_mode_in_one_run(monkeypatch):
    fake = FakeCommands()
    monkeypatch.setattr(spa, "run_command", fake)
    fw = spa.IptablesFirewall([("tcp", 22)], command="iptables-nft", nat=True)
    mode = NatMode(True, "masquerade", True)
    assert fw.open_nat("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, 30, False, 1000.2, mode)
    (argv, text), = fake.calls
    assert argv[0] == "iptables-nft-restore"
    assert text.index("-I SPA_FORWARD 1 -s 198.18.1.2 -m time") < text.index(
        "-I SPA_PREROUTING 1 ") < text.index("-I SPA_POSTROUTING 1 -s 198.18.1.2 -m time")
    assert '"spa nat expires 1031 tcp/5022 198.18.2.2:22 all masq" -j MASQUERADE' in text
    # The same knock again: nothing; another mode for the same match replaces it.
    assert not fw.open_nat("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, 30, False, 1000.2, mode)
    assert fw.open_nat("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, 30, False, 1000.2)
    text = fake.calls[-1][1]
    assert "-D SPA_POSTROUTING " in text and "--ctstate DNAT" in text
    assert fw.nat_modes == {}
    for bad in (NatMode(True, "2001:db8:2::9", False), NatMode(True, "198.18.2.0/24", False),
                NatMode(True, "127.0.0.1", False)):
        with pytest.raises(ValueError):
            fw.open_nat("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, 30, False, None, bad)


def test_nft_mode_elements():
    fw = spa.NftFirewall([("tcp", 22)], nat=True)
    key = nftkey = spa.nft_key
    elements = fw._nat_elements("198.18.1.2", "tcp", 5022, "198.18.2.2", 22, False,
                                NatMode(False, "198.18.2.9", True))
    assert [(place[2], element, data) for place, element, data in elements] == [
        ("fwall4", key(["198.18.1.2"]), None),
        ("fwdd4", key(["198.18.1.2", "198.18.2.2"], 6, 22), None),      # (for list_nat)
        ("snatall4", key(["198.18.1.2"]), nftkey(["198.18.2.9"]))]
    elements = fw._nat_elements("2001:db8:1::2", "udp", 53, "2001:db8:2::2", 5353, False,
                                NatMode(True, "masquerade", False))
    assert [place[2] for place, _, _ in elements] == ["dnat6", "fwd6", "masq6"]
    assert elements[2][1] == key(["2001:db8:1::2", "2001:db8:2::2"], 17, 5353)


# ------------------------------------------ integration: real firewalls, namespaces

@pytest.mark.parametrize("kind", KINDS)
def test_snat_and_masquerade_change_the_source_the_inner_host_sees(kind):
    """force_snat: the inner host sees the SNAT address (a second one of the server's);
    MASQUERADE: the server's own address on the way out; none: the client itself.  IPv4
    and IPv6; a stranger gets nothing; the kernel ends it on time."""
    need(kind)
    with Lab(clients=3, prefix="nt") as lab:
        router(lab, kind)
        inner = inner_services(lab)
        fw = firewall(lab, kind)
        fw.setup()
        cli1 = lab.name("cli1")
        for snat, seen in ((None, "client"), ("masquerade", "server"), ("extra", "extra")):
            now = time.time()
            for family, c1, s1, c2, s2 in families(lab):
                address = {"extra": EXTRA4 if family == 4 else EXTRA6}.get(snat, snat)
                assert fw.open_nat(c1, "tcp", NAT_PORT, c2, INNER_PORT, 2, False, now,
                                   NatMode(True, address, False))
            for family, c1, s1, c2, s2 in families(lab):
                got, peer = reach(cli1, s1, NAT_PORT, inner[family, INNER_PORT])
                assert got == banner(family, INNER_PORT)
                extra = EXTRA4 if family == 4 else EXTRA6
                # MASQUERADE takes an address of the way out (over IPv6 the kernel's source
                # address selection may pick either of the two).
                expected = {"client": [c1], "server": [s2, extra], "extra": [extra]}[seen]
                assert peer in expected, (snat, family)
                assert tcp_try(lab.name("cli3"), Lab.srv4(3) if family == 4 else Lab.srv6(3),
                               NAT_PORT) == "refused"
            sleep_until(now + 3.1)
            for family, c1, s1, c2, s2 in families(lab):
                assert tcp_try(cli1, s1, NAT_PORT) == "refused"
            fw.expire()
        fw.flush()


@pytest.mark.parametrize("kind", KINDS)
def test_disable_dnat_forwards_what_the_client_sends_to_the_inner_host(kind):
    """disable_dnat: through a router that drops what it does not allow, client 1 reaches
    the inner host's service at its own address, and only that service; the server's port
    leads nowhere (no DNAT); client 3 gets nothing; it ends on time."""
    need(kind)
    with Lab(clients=3, prefix="nt") as lab:
        router(lab, kind)
        inner = inner_services(lab)
        fw = firewall(lab, kind)
        fw.setup()
        cli1, cli3 = lab.name("cli1"), lab.name("cli3")
        for family, c1, s1, c2, s2 in families(lab):
            assert tcp_try(cli1, c2, INNER_PORT) == "timeout"          # routed: dropped
        now = time.time()
        for family, c1, s1, c2, s2 in families(lab):
            assert fw.open_nat(c1, "tcp", NAT_PORT, c2, INNER_PORT, 2, False, now,
                               NatMode(False, None, False))
        for family, c1, s1, c2, s2 in families(lab):
            assert reach(cli1, c2, INNER_PORT, inner[family, INNER_PORT]) == (
                banner(family, INNER_PORT), c1)
            assert tcp_try(cli1, c2, OTHER_PORT) == "timeout"          # only that service
            assert tcp_try(cli1, s1, NAT_PORT) == "refused"            # no DNAT
            assert tcp_try(cli3, c2, INNER_PORT) == "timeout"
        # Listed with the port the client reaches: the inner host's own.
        assert sorted(row[:6] for row in fw.list_nat()) == sorted(
            (c1, "tcp", INNER_PORT, c2, INNER_PORT, False) for _, c1, _, c2, _ in families(lab))
        sleep_until(now + 3.1)
        for family, c1, s1, c2, s2 in families(lab):
            assert tcp_try(cli1, c2, INNER_PORT) == "timeout"
        fw.flush()


@pytest.mark.parametrize("kind", KINDS)
def test_a_plain_nat_opening_accepts_only_what_its_dnat_rewrote(kind):
    """The accept of a NAT opening matches only connections its DNAT rewrote, on every back
    end: the knocker reaches the inner host through the server's port, not at the inner
    host's own address (nft accepted that too, through a default-drop forward chain)."""
    need(kind)
    with Lab(clients=2, prefix="nt") as lab:
        router(lab, kind)
        inner_services(lab)
        fw = firewall(lab, kind)
        fw.setup()
        cli1 = lab.name("cli1")
        for family, c1, s1, c2, s2 in families(lab):
            assert fw.open_nat(c1, "tcp", NAT_PORT, c2, INNER_PORT, 30, False)
        for family, c1, s1, c2, s2 in families(lab):
            assert tcp_try(cli1, s1, NAT_PORT) == banner(family, INNER_PORT)
            assert tcp_try(cli1, c2, INNER_PORT) == "timeout"
        if kind == "nft":
            ruleset = lab.run("srv", ["nft", "list", "chain", "inet", "filter", "forward"]).stdout
            assert "ct status dnat ip saddr . ip daddr . meta l4proto . th dport @spa_fwd4 " \
                "accept" in ruleset
        fw.flush()


@pytest.mark.parametrize("kind", KINDS)
def test_forward_all_forwards_everything_from_the_client_and_nothing_from_others(kind):
    """forward_all (with MASQUERADE, fwknop's SPA gateway): every protocol and port the
    client sends through the router passes, masqueraded; the DNAT of the requested port
    still leads to the inner host; client 3 still gets nothing; it ends on time."""
    need(kind)
    with Lab(clients=3, prefix="nt") as lab:
        router(lab, kind)
        inner = inner_services(lab)
        for family, _, _, c2, _ in families(lab):
            lab.udp_echo("cli2", 53, c2, tell_peer=True)
        fw = firewall(lab, kind)
        fw.setup()
        cli1, cli3 = lab.name("cli1"), lab.name("cli3")
        now = time.time()
        for family, c1, s1, c2, s2 in families(lab):
            assert fw.open_nat(c1, "tcp", NAT_PORT, c2, INNER_PORT, 2, False, now,
                               NatMode(True, "masquerade", True))
            assert fw.open_nat(c1, "udp", 53, c2, 53, 2, False, now,        # as a gateway
                               NatMode(False, "masquerade", True))
        assert sorted(row[:6] for row in fw.list_nat()) == sorted(
            [(c1, "tcp", NAT_PORT, c2, INNER_PORT, False) for _, c1, _, c2, _ in families(lab)]
            + [(c1, "udp", 53, c2, 53, False) for _, c1, _, c2, _ in families(lab)])
        for family, c1, s1, c2, s2 in families(lab):
            for port in (INNER_PORT, OTHER_PORT):
                got, peer = reach(cli1, c2, port, inner[family, port])
                assert got == banner(family, port) and peer in (s2, extra(family))  # masqueraded
            assert udp_try(cli1, c2, 53) in (b"knock from " + s2.encode(),
                                             b"knock from " + extra(family).encode())
            assert tcp_try(cli1, s1, NAT_PORT) == banner(family, INNER_PORT)
            assert tcp_try(cli3, c2, OTHER_PORT) == "timeout"
        sleep_until(now + 3.1)
        for family, c1, s1, c2, s2 in families(lab):
            assert tcp_try(cli1, c2, OTHER_PORT) == "timeout"
            assert tcp_try(cli1, s1, NAT_PORT) == "refused"
        fw.expire()
        fw.flush()


@pytest.mark.parametrize("kind", ["iptables-nft", "iptables-legacy"])
def test_iptables_restart_and_reload_keep_the_mode(kind):
    """A new server reads each opening's mode back from its rules; a reload that took the
    SNAT chain is seen (intact) and put back (restore), mode and all."""
    need(kind)
    with Lab(clients=2, prefix="nt") as lab:
        router(lab, kind)
        inner = inner_services(lab)
        first = firewall(lab, kind)
        first.setup()
        mode = NatMode(True, EXTRA4, True)
        assert first.open_nat(Lab.cli4(1), "tcp", NAT_PORT, Lab.cli4(2), INNER_PORT, 60, False,
                              None, mode)
        fw = firewall(lab, kind)
        fw.setup()
        key = spa.NatOpening(Lab.cli4(1), "tcp", NAT_PORT, Lab.cli4(2), INNER_PORT, False)
        assert fw.firewall.nat_modes == {key: mode}
        assert fw.intact() and not fw.restore()
        lab.run("srv", [kind, "-w", "-t", "nat", "-F", "SPA_POSTROUTING"])
        lab.run("srv", [kind, "-w", "-t", "nat", "-D", "POSTROUTING", "-j", "SPA_POSTROUTING"])
        lab.run("srv", [kind, "-w", "-t", "nat", "-X", "SPA_POSTROUTING"])
        assert reach(lab.name("cli1"), Lab.cli4(2), OTHER_PORT, inner[4, OTHER_PORT]) == (
            banner(4, OTHER_PORT), Lab.cli4(1))                        # the SNAT went
        assert not fw.intact()
        assert fw.restore()
        assert reach(lab.name("cli1"), Lab.cli4(2), OTHER_PORT, inner[4, OTHER_PORT]) == (
            banner(4, OTHER_PORT), EXTRA4)
        assert fw.flush()
        save = lab.run("srv", [kind + "-save"]).stdout
        assert "SPA_" not in save


def spa_server(lab, tmp_path, stanzas, kind, access_conf=None, **server):
    lines = ["[server]", "protect = tcp/8022", "interface = any", "firewall = " + kind,
             "enable_forwarding = yes", "replay_cache = %s" % (tmp_path / "replay.cache")]
    lines += ["%s = %s" % kv for kv in server.items()]
    for name, options in stanzas.items():
        lines.append("[client %s]" % name)
        lines += ["%s = %s" % kv for kv in dict(options, key_base64=KEY,
                                                 hmac_key_base64=HMAC_KEY).items()]
    conf = write_private(tmp_path / "spa.conf", "\n".join(lines) + "\n")
    argv = [sys.executable, SPA, "server", "-c", conf, "-v"]
    if access_conf:
        argv += ["--access-conf", access_conf]
    proc = lab.spawn("srv", argv)
    wait_for_line(proc, r"listening on", 15)
    return proc


@pytest.mark.parametrize("kind", KINDS)
def test_spa_client_plain_knock_reaches_the_forced_host(tmp_path, kind):
    """End to end: `spa.py client -A tcp/5022` (a plain access request) to a server whose
    stanza says force_nat: IPv4 (with force_snat) and IPv6 (with force_masquerade) reach
    the inner host through the server's port; the log says where it went."""
    need(kind)
    with Lab(clients=2, prefix="nt") as lab:
        router(lab, kind)
        inner = inner_services(lab)
        server = spa_server(lab, tmp_path, {
            "v4": {"source": "198.18.0.0/15", "open_ports": "tcp/5022", "fw_access_timeout": "5",
                   "force_nat": "%s:%d" % (Lab.cli4(2), OTHER_PORT), "force_snat": EXTRA4},
            "v6": {"source": "2001:db8::/32", "open_ports": "tcp/5022", "fw_access_timeout": "5",
                   "force_nat": "[%s]:%d" % (Lab.cli6(2), OTHER_PORT),
                   "force_masquerade": "yes"}}, kind)
        for family, c1, s1, c2, s2 in families(lab):
            assert tcp_try(lab.name("cli1"), s1, NAT_PORT) == "refused"
            lab.run("cli1", [sys.executable, SPA, "client", "-D", s1, "-A", "tcp/%d" % NAT_PORT,
                             "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY])
            wait_for_line(server, r"opened tcp/%d forwarded to %s for %s" % (
                NAT_PORT, re.escape(spa.format_endpoint(c2, OTHER_PORT)), re.escape(c1)), 3)
            got, peer = reach(lab.name("cli1"), s1, NAT_PORT, inner[family, OTHER_PORT])
            assert got == banner(family, OTHER_PORT)
            assert peer in ((EXTRA4,) if family == 4 else (s2, EXTRA6))
        lab.stop_process(server)


def fwknop_knock(lab, dest, access="tcp/%d" % NAT_PORT):
    lab.run("cli1", netns_lab.fwknop_client_argv(dest, access, KEY, HMAC_KEY))


@pytest.mark.parametrize("kind", KINDS)
def test_fwknop_client_and_access_conf_force_nat_and_destination(tmp_path, kind):
    """The real fwknop client against an fwknopd access.conf read with --access-conf:
    FORCE_NAT with FORCE_SNAT opens the way to the inner host, SNATed; DESTINATION lets a
    knock sent to another address of the server open nothing, and the log says why."""
    netns_lab.need_lab("fwknop")
    need(kind)
    with Lab(clients=2, prefix="nt") as lab:
        router(lab, kind)
        inner = inner_services(lab)
        access = write_private(tmp_path / "access.conf", (
            "SOURCE 198.18.1.0/24\nDESTINATION %s\nOPEN_PORTS tcp/%d\nKEY_BASE64 %s\n"
            "HMAC_KEY_BASE64 %s\nFORCE_NAT %s %d\nFORCE_SNAT %s\nFW_ACCESS_TIMEOUT 5\n")
            % (Lab.srv4(1), NAT_PORT, KEY, HMAC_KEY, Lab.cli4(2), OTHER_PORT, EXTRA4))
        server = spa_server(lab, tmp_path, {"other": {"source": "2001:db8::/32"}}, kind,
                            access_conf=access)
        fwknop_knock(lab, Lab.srv4(2))              # to the server, but not to DESTINATION
        wait_for_line(server, r"rejected packet from 198\.18\.1\.2: .*no stanza for source "
                      r"198\.18\.1\.2 and destination 198\.18\.2\.1", 3)
        assert tcp_try(lab.name("cli1"), Lab.srv4(1), NAT_PORT) == "refused"
        fwknop_knock(lab, Lab.srv4(1))
        wait_for_line(server, r"opened tcp/%d forwarded to %s:%d" % (NAT_PORT, Lab.cli4(2),
                                                                     OTHER_PORT), 3)
        assert reach(lab.name("cli1"), Lab.srv4(1), NAT_PORT, inner[4, OTHER_PORT]) == (
            banner(4, OTHER_PORT), EXTRA4)
        lab.stop_process(server)


def test_the_same_access_conf_forwards_alike_under_fwknopd_and_spa_py(tmp_path):
    """One access.conf stanza (FORCE_NAT, FORCE_SNAT), loaded by the real fwknopd
    (ENABLE_IPT_FORWARDING, its iptables back end) and by spa.py (--access-conf): the real
    fwknop client's plain `-A tcp/5022` gives the same path to the inner host, which sees
    the same SNAT address, through a router that drops the rest.  (fwknopd makes its SNAT
    rule only with ENABLE_IPT_SNAT Y as well: without it FORCE_SNAT does nothing, measured
    here; spa.py needs no [server] switch for a stanza's own force_snat.)"""
    netns_lab.need_lab("fwknop", "fwknopd", "iptables")
    stanza = {"SOURCE": "198.18.1.0/24", "OPEN_PORTS": "tcp/%d" % NAT_PORT,
              "KEY_BASE64": KEY, "HMAC_KEY_BASE64": HMAC_KEY, "HMAC_DIGEST_TYPE": "sha256",
              "FW_ACCESS_TIMEOUT": 10, "FORCE_NAT": "%s %d" % (Lab.cli4(2), OTHER_PORT),
              "FORCE_SNAT": EXTRA4}
    seen = {}
    for daemon, conf in (("fwknopd", {"ENABLE_IPT_FORWARDING": "Y"}),
                         ("fwknopd-snat", {"ENABLE_IPT_FORWARDING": "Y", "ENABLE_IPT_SNAT": "Y"}),
                         ("spa.py", None)):
        with Lab(clients=2, prefix="nt") as lab:
            router(lab, "iptables-nft")
            inner = inner_services(lab)
            cli1 = lab.name("cli1")
            assert tcp_try(cli1, Lab.srv4(1), NAT_PORT) == "refused"
            if conf:
                os.makedirs(str(tmp_path / daemon))
                server = netns_lab.FwknopdServer(lab, "srv", lab.srv_if[1], stanza,
                                                 tmp_path / daemon, conf=conf)
                server.start()
            else:
                access = write_private(tmp_path / "access.conf", "".join(
                    "%s %s\n" % kv for kv in stanza.items()))
                server = spa_server(lab, tmp_path, {"other": {"source": "2001:db8::/32"}},
                                    "iptables-nft", access_conf=access)
            fwknop_knock(lab, Lab.srv4(1))
            deadline = time.monotonic() + 3
            while tcp_try(cli1, Lab.srv4(1), NAT_PORT) == "refused" and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)            # fwknopd adds its rules one iptables run at a time
            seen[daemon] = reach(cli1, Lab.srv4(1), NAT_PORT, inner[4, OTHER_PORT])
            if conf:
                server.stop()
            else:
                lab.stop_process(server)
    assert seen == {"fwknopd": (banner(4, OTHER_PORT), Lab.cli4(1)),
                    "fwknopd-snat": (banner(4, OTHER_PORT), EXTRA4),
                    "spa.py": (banner(4, OTHER_PORT), EXTRA4)}
