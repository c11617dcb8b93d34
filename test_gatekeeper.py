"""The privileged parent believes nothing the packet reader says (issue 12, items 2-10, 12, 13).

The packet reader checks length, alphabet and HMAC, and passes each packet that
authenticates to the parent as one line: source address, destination address, packet.
The parent checks the line strictly, checks the HMAC again, decrypts, and decides itself
against the config and this host's state.  These tests send it what a packet reader an
attacker has taken over could send:

1. The pipe protocol: every line is refused or granted within the policy, never raises
   (the six lines that killed the old parent, a hypothesis property over any lines).
2. What the parent checks itself: the stanza's source, access_expire,
   require_source_address, require_username; the knock's destination (this host's own
   addresses only); log fields escaped.
3. The replay cache: forged stamps clamped and pruned, no replay after the window widens.
4. NAT: local NAT checks the port it leads to, nat_destinations, targets that never are,
   a re-knock to another target replaces the opening (nft and both iptables flavours).
5. max_openings, and command messages (session, process group, no_new_privs, the whole
   group killed at the time limit, a cap on how many run).
6. End to end, in network namespaces with the real firewall: a compromised reader
   (start_compromised below) sends each line to a real parent, which stays up, refuses,
   and opens for a good knock afterwards.

Namespace tests need root, ip and nft (iptables for its variants): outside CI they skip
when one is missing, with CI=true that is a failure.  They use only 198.18.0.0/15 and
2001:db8::/32.
"""

import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import netns_lab
import spa
from netns_lab import Lab, tcp_connect_ok, udp_send, wait_for_line, wait_tcp_open
from test_spa import (HMAC_KEY, KEY, SERVICE_PORT, Lines, closed, knock, need_firewall, need_nft,
                      server_config, start_server, timed_knock, lab_server_config)

HERE = os.path.dirname(os.path.abspath(__file__))
SPA = os.path.join(HERE, "spa.py")
ME = "198.18.0.1"              # this host, as far as the in-process gatekeepers know
SRC = "198.18.0.2"
OTHER_KEY = base64.b64encode(b"o" * 32).decode()
OTHER_HMAC = base64.b64encode(b"p" * 64).decode()


def gatekeeper(tmp_path, stanzas=None, firewall=None, addresses=(ME,), **server):
    config = server_config(tmp_path, stanzas, **server)
    replay = spa.ReplayCache(config.replay_cache, config.max_packet_age)
    gate = spa.Gatekeeper(config, firewall or spa.DryRunFirewall(config.protect), replay,
                          Lines(), set(addresses))
    return gate


def other_keys(access=(("tcp", 22),), **kw):
    return knock(list(access), key=OTHER_KEY, hmac_key=OTHER_HMAC, **kw)


def nat_knock(nat_access, access=(("tcp", 22),), local=False, **kw):
    msg = spa.Message("alice", kw.pop("allow_ip", "0.0.0.0"), list(access),
                      msg_type=spa.MSG_LOCAL_NAT if local else spa.MSG_NAT,
                      nat_access=nat_access, **kw)
    return spa.seal(msg.encode(), base64.b64decode(KEY), base64.b64decode(HMAC_KEY))


# ---------------------------------------------------------------------------
# 1. The pipe protocol
# ---------------------------------------------------------------------------

def old_request(**fields):
    """A line of the old pipe protocol (JSON): a grant of tcp/8022 with `fields` changed,
    each with a replay key of its own."""
    request = {"op": "grant", "key": spa.b64encode(hashlib.sha256(os.urandom(16)).digest()).decode(),
               "stamp": int(time.time()), "source": "198.18.1.2", "address": "198.18.1.2",
               "access": [["tcp", SERVICE_PORT]], "timeout": 30, "stanza": "alice",
               "user": "alice", "nat": None, "command": None}
    request.update(fields)
    return json.dumps(request).encode() + b"\n"


# The six lines that stopped the old parent (issue 12, item 3).
ISSUE_LINES = [
    ("stanza [1]", old_request(stanza=[1])),
    ("stamp Infinity", old_request(op="record", stamp=float("inf"))),
    ("timeout 1e999", old_request().replace(b'"timeout": 30', b'"timeout": 1e999')),
    ("5,000 nested [", b"[" * 5000 + b"\n"),
    ("address fe80::1%lo", old_request(address="fe80::1%lo", source="fe80::1%lo")),
    ("command with NUL", old_request(stanza="cmd", command="/bin/true\0")),
]
CMD_STANZA = {"cmd": {"enable_cmd_exec": "yes", "cmd_exec_user": "nobody",
                      "key_base64": OTHER_KEY, "hmac_key_base64": OTHER_HMAC}}


def test_request_lines_are_three_strict_words():
    wire = knock()
    for source, destination in ((SRC, ME), ("2001:db8:1::2", "2001:db8:1::1"), ("::", "::1")):
        line = spa.request_line(source, destination, wire)
        assert line.endswith(b"\n") and line.count(b" ") == 2
        assert spa.parse_request(line[:-1]) == (source, destination, wire, None)
    assert spa.parse_request(b"2001:DB8:0::2 198.18.0.1 " + wire)[0] == "2001:db8::2"
    # With bind_interface, the interface the knock came in on is a fourth word.
    line = spa.request_line(SRC, ME, wire, "eth0")
    assert spa.parse_request(line[:-1]) == (SRC, ME, wire, "eth0")
    for interface in (b"", b"a/b", b"x" * 16, b"eth0:1", b"\xff", b"e\x1bth"):
        with pytest.raises(ValueError):
            spa.parse_request(line[:-5] + interface)
    good = spa.request_line(SRC, ME, wire)[:-1]
    bad = [b"", b" ", good + b" ", b" " + good, good.replace(b" ", b"  ", 1),
           good.replace(b" ", b"\t", 1), good + b"\0", good.replace(b"198.18.0.2", b"198.18.0.2\0"),
           good.replace(b"198.18.0.2", b"fe80::1%lo"), good.replace(b"198.18.0.2", b"198.018.0.2"),
           good.replace(b"198.18.0.2", b"198.18.0"), good.replace(b"198.18.0.2", b"localhost"),
           good.replace(b"198.18.0.2", b"1" * 46), good.replace(b"198.18.0.2", b"::ffff::1"),
           good + b"=", good[:-70], good + b"A" * 300, spa.request_line(SRC, ME, b"A" * 139)[:-1],
           b"[" * 5000] + [line.rstrip(b"\n") for _, line in ISSUE_LINES]
    for line in bad:
        with pytest.raises(ValueError):
            spa.parse_request(line)


class Supervised(object):
    """A ReaderProcess serving a real pipe, with a real (sleeping) process as its packet reader."""

    def __init__(self, tmp_path, firewall=None):
        config = server_config(tmp_path, dict({"alice": {"fw_access_timeout": "30"}}, **CMD_STANZA),
                               protect="tcp/%d" % SERVICE_PORT)
        self.firewall = firewall or spa.DryRunFirewall(config.protect)
        self.log = Lines()
        self.replay = spa.ReplayCache(config.replay_cache, config.max_packet_age)
        gate = spa.Gatekeeper(config, self.firewall, self.replay, self.log)
        gate.addresses = {ME, "198.18.1.1"}
        self.supervisor = spa.ReaderProcess(gate, self.log)
        self.reader = subprocess.Popen(["sleep", "30"])
        self.supervisor.pid = self.reader.pid
        r, self.w = os.pipe()
        os.set_blocking(r, False)
        self.supervisor.fd = r

    def send(self, data):
        """Write to the parent's pipe and let it serve all it can; False once it has
        stopped listening to this reader."""
        os.write(self.w, data)
        while True:
            if not self.supervisor.serve():
                return False
            try:
                if not os.read(self.supervisor.fd, 0) and not self._more():
                    return True
            except BlockingIOError:
                return True

    def _more(self):
        import select
        return bool(select.select([self.supervisor.fd], [], [], 0)[0])

    def close(self):
        if self.reader.poll() is None:
            self.reader.kill()
        self.reader.wait()
        os.close(self.w)
        os.close(self.supervisor.fd)
        self.replay.close()


@pytest.mark.parametrize("line", [line for _, line in ISSUE_LINES], ids=[n for n, _ in ISSUE_LINES])
def test_the_lines_that_killed_the_parent_are_refused_and_the_reader_replaced(tmp_path, line):
    """Each line is refused with one log line; the reader that sent it is killed (the
    supervisor then starts a new one); nothing opens; the parent goes on."""
    box = Supervised(tmp_path)
    try:
        assert box.send(line) is False
        assert box.reader.wait(5) == -signal.SIGKILL
        refused = [l for l in box.log.lines if l.startswith("packet reader: ")]
        assert len(refused) == 1 and "a malformed request" in refused[0] and "replacing it" in refused[0]
        assert box.firewall.opened == []
    finally:
        box.close()


class Broken(spa.DryRunFirewall):
    """A back end with a bug: any exception at all, where the parent serves a request."""

    def open_many(self, openings, now=None):
        raise RuntimeError("a bug")


def test_an_exception_while_serving_refuses_and_replaces_the_reader(tmp_path):
    box = Supervised(tmp_path, Broken([("tcp", SERVICE_PORT)]))
    try:
        line = spa.request_line("198.18.1.2", "198.18.1.1", knock([("tcp", SERVICE_PORT)]))
        assert box.send(line) is False
        assert box.reader.wait(5) == -signal.SIGKILL
        assert "packet reader: a request raised RuntimeError: a bug; replacing it" in box.log.text()
        assert "rejected packet from 198.18.1.2 [client alice]: internal error RuntimeError" \
            in box.log.text()
    finally:
        box.close()


def test_a_line_that_never_ends_is_refused_before_it_is_whole(tmp_path):
    box = Supervised(tmp_path)
    try:
        assert box.send(b"1" * 600) is False            # no newline yet: refused all the same
        assert "a line of 600 bytes" in box.log.text()
        assert box.supervisor.buffer == b""
    finally:
        box.close()


def test_good_lines_before_a_bad_one_are_served(tmp_path):
    box = Supervised(tmp_path)
    try:
        wire = knock([("tcp", SERVICE_PORT)])
        assert box.send(spa.request_line("198.18.1.2", "198.18.1.1", wire)) is True
        assert box.firewall.opened == [("198.18.1.2", "tcp", SERVICE_PORT, 30)]
        assert box.send(spa.request_line("198.18.1.3", "198.18.1.1", knock([("tcp", SERVICE_PORT)]))
                        + b"junk\n" + spa.request_line("198.18.1.4", "198.18.1.1", wire)) is False
        assert [o[0] for o in box.firewall.opened] == ["198.18.1.2", "198.18.1.3"]
    finally:
        box.close()


HOSTILE_WORDS = st.one_of(
    st.sampled_from([b"198.18.0.2", b"198.18.0.1", b"2001:db8::2", b"198.18.9.9", b"0.0.0.0",
                     b"::", b"fe80::1%lo", b"198.18.0.2\0", b"::ffff:198.18.0.2", b"", b"-",
                     b"127.0.0.1", b"1e999", b"[", b"\n"]),
    st.binary(max_size=50))


@st.composite
def pipe_lines(draw, wires):
    """Anything a packet reader could write: bytes, lines of hostile words, lines that carry a
    real packet (valid, replayed, refused by the policy), and the issue's lines."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=700))
    if kind == 1:
        return draw(st.sampled_from([line.rstrip(b"\n") for _, line in ISSUE_LINES]))
    wire = draw(st.sampled_from(wires)) if kind < 8 else draw(st.binary(min_size=130, max_size=420))
    source = draw(st.sampled_from([b"198.18.0.2", b"198.18.9.9", b"2001:db8::2"])) \
        if kind < 6 else draw(HOSTILE_WORDS)
    destination = draw(st.sampled_from([b"198.18.0.1", b"198.18.0.1", b"198.18.2.2"])) \
        if kind < 6 else draw(HOSTILE_WORDS)
    words = [source, destination, wire]
    if kind == 7:
        words.insert(draw(st.integers(0, 3)), draw(HOSTILE_WORDS))
    return draw(st.sampled_from([b" ", b" ", b"\t", b"  "])).join(words)


def parses(line):
    try:
        spa.parse_request(line)
        return True
    except ValueError:
        return False


def test_any_line_from_the_reader_is_refused_or_granted_within_the_policy(tmp_path):
    """A hypothesis property over the pipe protocol: the parent never raises, fails no
    request internally, and opens only for packets made with the keys, once each, for
    the address the policy gives, on this host's address, within the stanza's ports and
    timeouts; and it asks for the reader to be replaced exactly when a line is malformed."""
    gate = gatekeeper(tmp_path, {"a": {"source": "198.18.0.0/16", "open_ports": "tcp/22",
                                       "max_fw_timeout": "60"},
                                 "b": {"source": "2001:db8::/32", "open_ports": "tcp/22",
                                       "require_source_address": "yes"}}, protect="tcp/22")
    now = int(time.time())
    made = {knock(): "fresh", knock(allow_ip="198.19.7.7"): "allow IP",
            knock(timeout=600): "timeout", knock([("tcp", 23)]): "port",
            knock(timestamp=now - 500): "old", knock(user="u" * 48): "user",
            knock(hmac_key=OTHER_HMAC): "other HMAC key", knock(key=OTHER_KEY): "other key",
            nat_knock("198.18.5.5,22"): "NAT"}
    wires = list(made)
    opened = {}

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(pipe_lines(wires), min_size=1, max_size=4))
    def check(lines):
        before = len(gate.firewall.opened)
        decisions, problem = gate.serve_lines(lines, now)
        well_formed = [parses(line) for line in lines] + [False]
        parsed = [spa.parse_request(line) for line in lines[:well_formed.index(False)]]
        assert (problem is not None) == (len(parsed) < len(lines))
        assert problem is None or "raised" not in problem
        assert len(decisions) == len(parsed)
        new = gate.firewall.opened[before:]
        granted = [d for d in decisions if d.accepted]
        assert len(new) == len(granted)
        for d, (source, destination, wire, _), opening in zip(
                [d for d in decisions if d.accepted], [p for p, d in zip(parsed, decisions)
                                                       if d.accepted], new):
            assert "internal error" not in (d.reason or "")
            assert wire in made and made[wire] in ("fresh", "allow IP", "timeout", "user")
            assert wire not in opened, "a packet opened twice"
            opened[wire] = opening
            assert destination == ME
            # Stanza a takes 198.18.0.0/16; b takes 2001:db8::/32 but never 0.0.0.0.
            assert source.startswith("198.18.") or (source.startswith("2001:db8:")
                                                    and made[wire] == "allow IP")
            address = "198.19.7.7" if made[wire] == "allow IP" else source
            assert opening == (address, "tcp", 22, 60 if made[wire] == "timeout" else 30)
        for d in decisions:
            assert d.accepted or d.reason
    check()
    # (Which good packets opened depends on what came first: one sent to another address
    # is refused, and remembered, before it can open.)  A new one on its own opens.
    decisions, problem = gate.serve_lines([spa.request_line(SRC, ME, knock())[:-1]], now)
    assert problem is None and decisions[0].accepted


# ---------------------------------------------------------------------------
# 2. What the parent checks itself
# ---------------------------------------------------------------------------

def test_the_parent_applies_the_stanza_to_whatever_source_the_reader_claims(tmp_path):
    gate = gatekeeper(tmp_path, {
        "net": {"source": "198.18.1.0/24", "key_base64": OTHER_KEY, "hmac_key_base64": OTHER_HMAC},
        "strict": {"source": "198.18.2.0/24", "require_source_address": "yes",
                   "require_username": "bob"},
        "gone": {"source": "198.18.3.0/24", "access_expire": "2020-01-01"},
        "any": {"source": "any", "key_base64": base64.b64encode(b"q" * 32).decode(),
                "hmac_key_base64": base64.b64encode(b"r" * 64).decode()}})
    refused = {
        "198.18.9.9": (other_keys(), "HMAC does not match any stanza for this source"),
        "198.18.2.2": (knock(user="bob"), "allow IP 0.0.0.0 refused: require_source_address"),
        "198.18.2.3": (knock(allow_ip="198.18.2.3"), "username 'alice' is not the required one"),
        "198.18.3.3": (knock(), "expired on 2020-01-01"),
    }
    for source, (wire, reason) in refused.items():
        d = gate.knock(source, ME, wire)
        assert not d.accepted and reason in d.reason, d.reason
    assert gate.firewall.opened == []
    assert gate.knock("198.18.2.4", ME, knock(allow_ip="198.18.2.4", user="bob")).accepted
    # The address opened is the source the reader claims, or the packet's IPv4 allow IP:
    # never anything a request names.
    q = dict(key=base64.b64encode(b"q" * 32).decode(), hmac_key=base64.b64encode(b"r" * 64).decode())
    assert gate.knock("2001:db8:7::7", ME, knock(**q)).accepted
    assert gate.knock("2001:db8:7::8", ME, knock(allow_ip="198.19.0.8", **q)).accepted
    assert [o[0] for o in gate.firewall.opened] == ["198.18.2.4", "2001:db8:7::7", "198.19.0.8"]


def test_a_knock_must_be_addressed_to_this_host(tmp_path):
    """A router that forwards a knock to a host behind it must not open itself."""
    gate = gatekeeper(tmp_path, addresses=(ME, "2001:db8::1"))
    for destination in ("198.18.2.2", "2001:db8::2", "198.18.0.255", "0.0.0.0"):
        d = gate.knock(SRC, destination, knock())
        assert not d.accepted and "not to this host" in d.reason
        assert d.replay_key in gate.replay          # authenticated: remembered all the same
    assert gate.firewall.opened == []
    assert gate.knock(SRC, "2001:db8::1", knock()).accepted and gate.knock(SRC, ME, knock()).accepted


def test_host_addresses_are_read_from_the_kernel_and_again_when_they_change():
    need_nft()
    with Lab(clients=1, prefix="gk") as lab:
        addresses = netns_lab.in_netns(lab.name("srv"), spa.HostAddresses)
        check = lambda a: netns_lab.in_netns(lab.name("srv"), addresses.__contains__, a)  # noqa: E731
        assert check(Lab.srv4(1)) and check(Lab.srv6(1)) and check("127.0.0.1") and check("::1")
        assert not check(Lab.cli4(1)) and not check("198.18.77.1")
        lab.run("srv", ["ip", "addr", "add", "198.18.77.1/32", "dev", "lo"])
        assert check("198.18.77.1")                 # told by the kernel, read again at once
        lab.run("srv", ["ip", "addr", "del", "198.18.77.1/32", "dev", "lo"])
        assert not check("198.18.77.1")
        addresses.close()


def test_log_fields_are_escaped(capsys):
    """No field can start a log line of its own (two were forged through source and user)."""
    log = spa.Log("stderr", False)
    log.info("rejected packet from %s [client %s] user %s: %s", "198.18.0.2\n2026 spa: accepted",
             "a\rb", "\x1b[2Kalice\x00", "why\u2028not")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\r" not in err and "\x1b" not in err and "\u2028" not in err
    assert "198.18.0.2\\n2026 spa: accepted" in err and "\\x1b[2Kalice\\x00" in err
    assert spa.log_field("plain text, even 'quoted' and \u00e9") == "plain text, even 'quoted' and \u00e9"


def test_the_parent_rate_limits_its_refusals(tmp_path):
    """Refusals of authenticated packets are the parent's to log now: 20 at once, then 5 a
    second, and a count of what was left out; accepted packets are always logged."""
    gate = gatekeeper(tmp_path)
    wire = knock()
    assert gate.knock(SRC, ME, wire).accepted
    for _ in range(200):
        assert gate.knock(SRC, ME, wire).reason == "replayed packet"
    assert gate.knock(SRC, ME, knock()).accepted
    text = gate.log.text()
    assert text.count("replayed packet") == 20 and text.count("accepted packet") == 2
    gate.tick()
    assert "180 more rejected packets were not logged (rate limit)" in gate.log.text()
    assert gate.stats() == "gatekeeper: accepted 2, refused 200 of the packets the reader passed on"


def test_check_config_names_where_nat_may_lead(tmp_path):
    config = server_config(tmp_path, {"a": {"enable_nat": "yes", "nat_destinations":
                                            "10.0.0.7:22, 10.0.1.0/24:8000-8099, [2001:db8::/64]"},
                                      "b": {"enable_nat": "yes"}}, enable_forwarding="yes")
    out = subprocess.run([sys.executable, SPA, "check-config", "-c", config.path],
                         stdout=subprocess.PIPE, universal_newlines=True).stdout
    assert "NAT access to other hosts: 10.0.0.7/32:22, 10.0.1.0/24:8000-8099, [2001:db8::/64]" in out
    assert "NAT access to other hosts: none (no nat_destinations)" in out


# ---------------------------------------------------------------------------
# 3. The replay cache: forged stamps, and windows that widen
# ---------------------------------------------------------------------------

def test_forged_stamps_neither_keep_entries_nor_grow_the_file(tmp_path):
    """Stamps of 2^32-1 (and 4,000 digits) kept entries forever and grew the file: each is
    now kept no longer than two windows, and what an older file holds of them is pruned."""
    path = str(tmp_path / "replay.cache")
    now = 1800000000
    digests = [spa.b64encode(hashlib.sha256(b"%d" % i).digest()).decode() for i in range(2000)]
    cache = spa.ReplayCache(path, 120, now)
    cache.add_many([(d, 2 ** 32 - 1) for d in digests[:1000]], now)
    cache.add(digests[1000], int("9" * 4000), now)
    cache.close()
    with open(path) as f:
        text = f.read()
    assert "4294967295" not in text and "9" * 20 not in text and max(map(len, text.splitlines())) < 80
    later = spa.ReplayCache(path, 120, now + 241)
    assert len(later.entries) == 0 and digests[0] not in later
    later.close()
    assert os.path.getsize(path) < 100
    # A file written before the clamp, with forged stamps: pruned as it is loaded.
    with open(path, "w") as f:
        f.write("# spa.py replay cache: digest packet-time seen-time\n")
        f.writelines("%s %d %d\n" % (d, 2 ** 32 - 1, now) for d in digests[1000:])
        f.write("%s %d %d\n" % (digests[0], now, now))
    loaded = spa.ReplayCache(path, 120, now + 1)
    assert len(loaded.entries) == 1 and digests[0] in loaded
    loaded.close()


def test_no_replay_after_a_reload_widens_the_window(tmp_path):
    """A packet accepted under a 3 s window, pruned, must not pass once the window is 120 s."""
    gate = gatekeeper(tmp_path, max_packet_age="3")
    t = int(time.time())
    wire = knock(timestamp=t)
    assert gate.knock(SRC, ME, wire, now=t).accepted
    gate.replay.prune(t + 5)                       # what the server does every few seconds
    assert spa.packet_key(spa.SALT_PREFIX + wire[:-43]) not in gate.replay
    wider = server_config(tmp_path, max_packet_age="120")
    gate.config, gate.replay.max_age = wider, 120  # as Supervisor.reload() does
    d = gate.knock(SRC, ME, wire, now=t + 6)
    assert not d.accepted and "stamped before what the replay cache still remembers" in d.reason
    assert gate.knock(SRC, ME, knock(timestamp=t + 6), now=t + 6).accepted     # new ones pass
    # ...and it holds across a restart: the floor is in the file.
    gate.replay.rewrite()
    gate.replay.close()
    again = spa.ReplayCache(wider.replay_cache, 120, t + 7)
    assert again.floor == t + 2
    again.close()


def test_no_replay_after_a_restart_widens_the_window(tmp_path):
    """End to end: knock under max_packet_age = 3; a restart prunes it; the same packet sent
    after a restart with max_packet_age = 120 opens nothing."""
    need_nft()
    with Lab(clients=1, prefix="gk") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        wire = knock([("tcp", SERVICE_PORT)])
        server = start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "1"}},
                              max_packet_age="3")
        assert timed_knock(lab, "cli1", Lab.srv4(1), wire) is not None
        lab.stop_process(server)
        time.sleep(4.2)
        lab.stop_process(start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "1"}},
                                      max_packet_age="3"))     # loads, prunes the digest
        time.sleep(1.2)                                        # the opening is over
        server = start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "1"}},
                              max_packet_age="120")
        assert closed(lab, "cli1", Lab.srv4(1))
        udp_send(lab.name("cli1"), Lab.srv4(1), spa.DEFAULT_PORT, wire)
        wait_for_line(server, r"stamped before what the replay cache still remembers", 3)
        assert closed(lab, "cli1", Lab.srv4(1))
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None     # a fresh knock opens


# ---------------------------------------------------------------------------
# 4. NAT
# ---------------------------------------------------------------------------

def test_local_nat_checks_the_port_it_leads_to(tmp_path):
    """--nat-local --nat-port P -A tcp/Q reaches Q: Q must be in open_ports (and not in
    restrict_ports); P, the port knocked on, only leads there."""
    gate = gatekeeper(tmp_path, {"a": {"open_ports": "tcp/22022", "restrict_ports": "tcp/23306",
                                       "enable_nat": "yes"}},
                      protect="tcp/22022,tcp/23306", enable_local_nat="yes")
    d = gate.knock(SRC, ME, nat_knock(ME + ",23306", [("tcp", 22022)], local=True))
    assert not d.accepted and "tcp/23306 not in open_ports (the port local NAT leads to)" in d.reason
    d = gate.knock(SRC, ME, nat_knock(ME + ",22022", [("tcp", 55000)], local=True))   # README's
    assert d.accepted, d.reason
    assert gate.firewall.opened == [(SRC, "tcp", 55000, 30, ME, 22022, True)]
    for target, why in (("198.18.0.9", "not an address of this host"),
                        ("127.0.0.1", "a loopback address"), ("0.0.0.0", "unspecified")):
        d = gate.knock(SRC, ME, nat_knock(target + ",22022", [("tcp", 55000)], local=True))
        assert not d.accepted and why in d.reason, d.reason


def test_local_nat_reaches_no_port_outside_open_ports_end_to_end(tmp_path):
    """The issue's case with the real client: open_ports = tcp/8022, restrict_ports =
    tcp/8023; --nat-local --nat-port 8022 -A tcp/8023 reached 8023.  Now it is refused, and
    the README's own form (--nat-port 55000 -A tcp/8022) reaches 8022."""
    need_nft()
    with Lab(clients=1, prefix="gk") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT, banner=b"allowed\n")
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT + 1, banner=b"restricted\n")
        server = start_server(lab, tmp_path, {"alice": {
            "fw_access_timeout": "30", "enable_nat": "yes", "open_ports": "tcp/%d" % SERVICE_PORT,
            "restrict_ports": "tcp/%d" % (SERVICE_PORT + 1)}},
            protect="tcp/%d,tcp/%d" % (SERVICE_PORT, SERVICE_PORT + 1), enable_local_nat="yes")
        client = [sys.executable, SPA, "client", "-D", Lab.srv4(1), "--nat-local",
                  "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY]
        lab.run("cli1", client + ["--nat-port", str(SERVICE_PORT), "-A", "tcp/%d" % (SERVICE_PORT + 1)])
        wait_for_line(server, r"tcp/%d not in open_ports \(the port local NAT leads to\)"
                      % (SERVICE_PORT + 1), 3)
        for port in (SERVICE_PORT, SERVICE_PORT + 1):
            assert not tcp_connect_ok(lab.name("cli1"), Lab.srv4(1), port, timeout=0.3)
        lab.run("cli1", client + ["--nat-port", "55000", "-A", "tcp/%d" % SERVICE_PORT])
        assert wait_tcp_open(lab.name("cli1"), Lab.srv4(1), 55000, 1.0) is not None
        assert banner_of(lab, 55000) == b"allowed\n"
        assert not tcp_connect_ok(lab.name("cli1"), Lab.srv4(1), SERVICE_PORT + 1, timeout=0.3)


def test_forward_nat_goes_only_to_nat_destinations(tmp_path):
    stanza = {"enable_nat": "yes", "open_ports": "tcp/22,tcp/5022"}
    (tmp_path / "none").mkdir()
    none = gatekeeper(tmp_path / "none", {"a": stanza}, enable_forwarding="yes")
    d = none.knock(SRC, ME, nat_knock("198.18.5.5,22", [("tcp", 5022)]))
    assert not d.accepted and "the stanza has no nat_destinations" in d.reason
    (tmp_path / "some").mkdir()
    gate = gatekeeper(tmp_path / "some", {"a": dict(stanza, nat_destinations=(
        "198.18.5.5:22, 198.18.6.0/24:8000-8099, [2001:db8:6::/64]:22, 0.0.0.0/0:7"))},
        enable_forwarding="yes", addresses=(ME, "2001:db8::1"))
    accepted = [("198.18.5.5,22", SRC), ("198.18.6.7,8000", SRC), ("198.18.6.254,8099", SRC),
                ("2001:db8:6::9,22", "2001:db8::2"), ("198.51.100.1,7", SRC)]
    for nat, source in accepted:
        d = gate.knock(source, ME if ":" not in source else "2001:db8::1",
                       nat_knock(nat, [("tcp", 5022)]))
        assert d.accepted, (nat, d.reason)
    refused = [("198.18.5.5,23", "not in nat_destinations"), ("198.18.5.6,22", "not in"),
               ("198.18.6.7,8100", "not in"), ("198.18.6.255,8000", "broadcast address of"),
               ("198.18.6.0,8000", "network or broadcast"), ("0.0.0.0,7", "unspecified"),
               ("127.0.0.1,7", "loopback"), ("224.0.0.1,7", "multicast"),
               ("255.255.255.255,7", "broadcast"), ("0.1.2.3,7", "'this network'")]
    for nat, why in refused:
        d = gate.knock(SRC, ME, nat_knock(nat, [("tcp", 5022)]))
        assert not d.accepted and why in d.reason, (nat, d.reason)
    for nat in ("::,22", "::1,22", "ff02::1,22", "fe80::1,22", "::ffff:198.18.5.5,22"):
        d = gate.knock("2001:db8::2", "2001:db8::1", nat_knock(nat, [("tcp", 5022)]))
        assert not d.accepted and "refused" in d.reason, (nat, d.reason)
    for bad in ("2001:db8::1:22", "[2001:db8::1", "198.18.5.5:0", "198.18.5.5:9-8", "host:22"):
        with pytest.raises(spa.SpaError, match="nat_destinations"):
            server_config(tmp_path, {"a": dict(stanza, nat_destinations=bad)})


class Refusing(spa.DryRunFirewall):
    """A back end that refuses a NAT target, as the iptables one did for 0.0.0.0."""

    def open_nat(self, *args, **kwargs):
        raise ValueError("cannot NAT to 0.0.0.0")


def test_a_back_end_that_refuses_a_nat_target_refuses_the_packet(tmp_path):
    gate = gatekeeper(tmp_path, {"a": {"enable_nat": "yes", "open_ports": "tcp/5022",
                                       "nat_destinations": "198.18.5.0/24"}},
                      firewall=Refusing([("tcp", 22)]), enable_forwarding="yes")
    d = gate.knock(SRC, ME, nat_knock("198.18.5.5,22", [("tcp", 5022)]))
    assert not d.accepted and "the firewall change failed" in d.reason
    for fw in (spa.NftFirewall([("tcp", 22)], nat=True),
               spa.IptablesFirewall([("tcp", 22)], nat=True)):
        for target in ("0.0.0.0", "127.0.0.1", "224.0.0.1", "::"):
            with pytest.raises(ValueError):
                fw.open_nat("198.18.1.2", "tcp", 5022, target, 22, 30, False)


@pytest.mark.parametrize("kind", ["nft", "iptables-nft", "iptables-legacy"])
def test_a_knock_asking_nat_to_0000_stops_no_server(tmp_path, kind):
    """On the iptables back ends one such knock stopped the server (an uncaught ValueError)."""
    need_firewall(kind)
    with Lab(clients=1, prefix="gk") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        server = start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "30",
                                                        "enable_nat": "yes",
                                                        "open_ports": "tcp/5022,tcp/%d" % SERVICE_PORT}},
                              enable_forwarding="yes", enable_local_nat="yes", firewall=kind)
        for nat in (["-N", "0.0.0.0:22"], ["--nat-local", "-D", "0.0.0.0"]):
            lab.run("cli1", [sys.executable, SPA, "client", "-D", Lab.srv4(1), "-A", "tcp/5022",
                             "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY] + nat)
            wait_for_line(server, r"rejected packet from 198\.18\.1\.2 \[client alice\]: NAT to "
                          r"0\.0\.0\.0:\d+ refused|no nat_destinations", 3)
        assert server.poll() is None
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None


def nat_firewall(lab, kind):
    if kind == "nft":
        fw = spa.NftFirewall([("tcp", SERVICE_PORT)], nat=True)
    else:
        fw = spa.IptablesFirewall([("tcp", SERVICE_PORT)], command=kind, nat=True)
    return netns_lab.InNetns(lab.name("srv"), fw)


def banner_of(lab, port=5022):
    sock = netns_lab.ns_socket(lab.name("cli1"))
    sock.settimeout(2)
    try:
        sock.connect((Lab.srv4(1), port))
        return sock.recv(100)
    finally:
        sock.close()


@pytest.mark.parametrize("kind", ["nft", "iptables-nft", "iptables-legacy"])
def test_a_nat_re_knock_to_another_target_replaces_the_opening(tmp_path, kind):
    """Shorter than the time left: the new target at once (nft kept the old one and logged
    the new); longer: no "File exists" (nft refused it).  Only the new target is reachable.
    A plain opening of the old target's port (which the old one's elements may share) is
    kept through it."""
    need_firewall(kind)
    with Lab(clients=3, prefix="gk") as lab:
        netns_lab.ns_sysctl(lab.name("srv"), "net.ipv4.ip_forward", 1)
        for k in (2, 3):
            lab.tcp_service("cli%d" % k, Lab.cli4(k), 2222, banner=b"host %d\n" % k)
        if kind == "nft":      # a default-drop forward chain: our accepts are what let it in
            lab.run("srv", ["nft", "-f", "-"], input="table inet filter {\n chain forward {\n"
                    " type filter hook forward priority 0; policy drop;\n"
                    " ct state established,related accept\n }\n}\n")
        fw = nat_firewall(lab, kind)
        fw.setup()
        me = Lab.cli4(1)
        assert fw.open_nat(me, "tcp", 5022, Lab.cli4(2), 2222, 20, False)
        assert banner_of(lab) == b"host 2\n"
        assert fw.open(me, "tcp", 2222, 60)
        assert fw.open_nat(me, "tcp", 5022, Lab.cli4(3), 2222, 8, False)       # shorter
        assert banner_of(lab) == b"host 3\n"
        assert fw.open_nat(me, "tcp", 5022, Lab.cli4(2), 2222, 30, False)      # longer
        assert banner_of(lab) == b"host 2\n"
        listed = fw.list_nat()
        assert [row[:6] for row in listed] == [(me, "tcp", 5022, Lab.cli4(2), 2222, False)]
        assert 28 <= listed[0][6] <= 30
        if kind == "nft":       # what only host 3 needed went with it
            assert not tcp_connect_ok(lab.name("cli1"), Lab.cli4(3), 2222, timeout=0.3)
        assert [row[:3] for row in fw.list()] == [(me, "tcp", 2222)]
        fw.flush()


# ---------------------------------------------------------------------------
# 5. max_openings, commands
# ---------------------------------------------------------------------------

def test_max_openings_counts_openings_in_force(tmp_path):
    gate = gatekeeper(tmp_path, {"a": {"max_openings": "2", "open_ports": "tcp/22,tcp/23"}})
    now = time.time()
    assert gate.knock("198.18.0.2", ME, knock(timestamp=int(now)), now).accepted
    assert gate.knock("198.18.0.3", ME, knock(timestamp=int(now)), now).accepted
    d = gate.knock("198.18.0.4", ME, knock(timestamp=int(now)), now)
    assert not d.accepted and "[client a] holds its max_openings (2) already" in d.reason
    assert "max_openings (2)" in gate.log.text()
    # Knocking again for an opening in force adds none; two ports are two openings.
    assert gate.knock("198.18.0.2", ME, knock(timestamp=int(now)), now).accepted
    assert not gate.knock("198.18.0.2", ME, knock([("tcp", 22), ("tcp", 23)],
                                                  timestamp=int(now)), now).accepted
    # Once they have ended (30 s), there is room again.
    later = now + 31
    assert gate.knock("198.18.0.4", ME, knock(timestamp=int(later)), later).accepted
    assert len(gate.firewall.opened) == 4
    with pytest.raises(spa.SpaError, match="max_openings"):
        server_config(tmp_path, {"a": {"max_openings": "0"}})


class Stanza(object):
    name, cmd_exec_user = "c", "nobody"


def wait_reaped(runner, pred, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        runner.reap()
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_a_command_runs_in_a_session_of_its_own_with_no_new_privileges():
    netns_lab.need(os.geteuid() == 0, "needs root (it runs a command as nobody)")
    log = Lines()
    runner = spa.CommandRunner(log)
    check = ('/bin/sh -c "grep -q \'^NoNewPrivs:[[:space:]]*1\' /proc/self/status && '
             'test $(cut -d\' \' -f6 /proc/$$/stat) = $$ && test $(cut -d\' \' -f5 /proc/$$/stat) = $$ '
             '&& test $(id -u) != 0 && test $(id -g) != 0 && test -z \\"$HOME\\""')
    assert runner.start(Stanza(), check, SRC, "alice") is None
    assert wait_reaped(runner, lambda: not runner.running)
    assert re.search(r"command .* \(pid \d+\) exited with status 0", log.text()), log.text()


def test_the_whole_group_of_a_command_is_killed_at_the_time_limit():
    """A child left in the background escaped the old time limit."""
    netns_lab.need(os.geteuid() == 0, "needs root (it runs a command as nobody)")
    log = Lines()
    runner = spa.CommandRunner(log, limit=1.0)
    assert runner.start(Stanza(), "/bin/sh -c 'sleep 60 & exit 0'", SRC, "alice") is None
    group = runner.running[0].proc.pid
    assert wait_reaped(runner, lambda: "exited with status 0" in log.text())
    os.killpg(group, 0)                              # the sleep is still there
    assert len(runner.running) == 1                  # and counts as running
    assert wait_reaped(runner, lambda: not runner.running)
    assert "ran over 1 s: killed what it left running" in log.text()
    deadline = time.monotonic() + 5           # (until whoever adopted it has reaped it)
    while time.monotonic() < deadline and spa.CommandRunner._group_alive(group):
        time.sleep(0.02)
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)


def test_commands_are_capped_and_never_run_with_group_0(tmp_path, monkeypatch):
    netns_lab.need(os.geteuid() == 0, "needs root (it runs a command as nobody)")
    runner = spa.CommandRunner(Lines(), most=2)
    assert runner.start(Stanza(), "/bin/sleep 30", SRC, "alice") is None
    assert runner.start(Stanza(), "/bin/sleep 30", SRC, "alice") is None
    assert "2 are running already" in runner.start(Stanza(), "/bin/true", SRC, "alice")
    runner.limit = 0.0
    assert wait_reaped(runner, lambda: not runner.running)     # over the limit: killed
    assert runner.start(Stanza(), "/bin/true", SRC, "alice") is None
    assert wait_reaped(runner, lambda: not runner.running)
    import pwd
    real = pwd.getpwnam

    def group_0(name):
        entry = real(name)
        return pwd.struct_passwd(entry[:3] + (0,) + entry[4:]) if name == "nobody" else entry
    monkeypatch.setattr(pwd, "getpwnam", group_0)
    with pytest.raises(spa.SpaError, match="has group 0"):
        server_config(tmp_path, {"a": {"enable_cmd_exec": "yes", "cmd_exec_user": "nobody"}})
    assert "root or in group 0" in runner.start(Stanza(), "/bin/true", SRC, "alice")


# ---------------------------------------------------------------------------
# 6. End to end: a compromised packet reader against the real parent and firewall
# ---------------------------------------------------------------------------

# The real server (spa.main, as the command line runs it) with one change: the k-th packet
# reader it starts writes ATTACKS[k-1] to its pipe to the parent before it reads a packet,
# after its real privilege drop, as a reader an attacker has taken over could; the readers
# after the last attack are honest.  (test_sandbox.py's CompromisedServer does the same for
# attacker code: os.write(pipe, LINE) there is one of these attacks.)
COMPROMISED = """
import os, sys
sys.path.insert(0, %(here)r)
import spa
ATTACKS = %(attacks)r
started = [0]
real_start, real_run = spa.start_reader, spa.Reader.run

def start_reader(*args, **kwargs):      # in the parent: which reader is this?
    started[0] += 1
    spa.ATTACK = ATTACKS[started[0] - 1] if started[0] <= len(ATTACKS) else None
    return real_start(*args, **kwargs)

def run(self, sockets, parent_fd=None, *more):   # in the reader, unprivileged already
    if spa.ATTACK is not None:
        os.write(parent_fd, spa.ATTACK)
    return real_run(self, sockets, parent_fd, *more)

spa.start_reader, spa.Reader.run = start_reader, run
sys.exit(spa.main(["server", "-c", %(conf)r, "-v"]))
"""


def start_compromised(lab, conf, attacks):
    """The server process (proc.log holds its log), started and listening."""
    code = COMPROMISED % {"here": HERE, "attacks": list(attacks), "conf": conf}
    proc = lab.spawn("srv", [sys.executable, "-c", code])
    wait_for_line(proc, r"listening on", 15)
    proc.conf = conf
    return proc


def set_elements(lab, name):
    out = lab.run("srv", ["nft", "-j", "list", "set", "inet", "spa", name]).stdout
    return [e for item in json.loads(out)["nftables"] for e in item.get("set", {}).get("elem", [])]


def attacked_server(lab, tmp_path, attacks, stanzas=None):
    lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
    conf = lab_server_config(tmp_path, stanzas or dict({"alice": {"fw_access_timeout": "30"}},
                                                       **CMD_STANZA))
    return start_compromised(lab, conf, attacks)


def survived(lab, server, refusals):
    """The parent refused `refusals` readers, replaced each, and still opens for a knock."""
    for _ in range(refusals):
        wait_for_line(server, r"starting a new one", 10, since=0)
    deadline = time.monotonic() + 10
    while server.log.text().count("; replacing it") < refusals:
        assert time.monotonic() < deadline, server.log.text()
        time.sleep(0.05)
    time.sleep(0.3 * refusals)
    assert server.poll() is None, server.log.text()
    assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None, server.log.text()


@pytest.mark.parametrize("part", [0, 1])
def test_a_compromised_reader_sending_the_issues_lines_gets_nothing(tmp_path, part):
    """Each line from a new reader (three a run, under the restart limit); then a good knock."""
    need_nft()
    lines = [line for _, line in ISSUE_LINES][3 * part:3 * part + 3]
    with Lab(clients=1, prefix="gk") as lab:
        server = attacked_server(lab, tmp_path, lines)
        survived(lab, server, len(lines))
        assert len(set_elements(lab, "allow6")) == 0
        assert "/bin/true" not in server.log.text()


def test_a_compromised_reader_gets_no_more_than_its_packets_could(tmp_path):
    """Old-style requests that the old parent granted (an IPv6 address no knock can name;
    stamps of 2^32-1 for the replay file), then lines carrying real packets with forged
    sources and destinations: the parent grants none of it, and opens for a good knock."""
    need_nft()
    stanzas = {"alice": {"fw_access_timeout": "30"},
               "net": {"source": "198.18.9.0/24", "require_source_address": "yes",
                       "key_base64": OTHER_KEY, "hmac_key_base64": OTHER_HMAC},
               "gone": {"access_expire": "2020-01-01", "key_base64": base64.b64encode(b"g" * 32).decode(),
                        "hmac_key_base64": base64.b64encode(b"G" * 64).decode()}}
    port = [("tcp", SERVICE_PORT)]
    forged = b"".join([
        spa.request_line("198.18.1.77", Lab.srv4(1), other_keys(port, allow_ip="198.18.1.77")),
        spa.request_line("198.18.9.9", Lab.srv4(1), other_keys(port)),
        spa.request_line("198.18.1.78", Lab.srv4(1), knock(port, key=base64.b64encode(b"g" * 32).decode(),
                                                            hmac_key=base64.b64encode(b"G" * 64).decode())),
        spa.request_line("198.18.1.79", "198.18.2.9", knock(port)),
    ])
    attacks = [old_request(address="2001:db8:1::99"),
               b"".join(old_request(op="record", stamp=2 ** 32 - 1) for _ in range(50)),
               forged]
    with Lab(clients=1, prefix="gk") as lab:
        server = attacked_server(lab, tmp_path, attacks, stanzas)
        survived(lab, server, 2)
        text = server.log.text()
        for why in ("HMAC does not match any stanza for this source",
                    "allow IP 0.0.0.0 refused: require_source_address is on",
                    "the stanza expired on 2020-01-01",
                    "addressed to 198.18.2.9, not to this host"):
            assert why in text, why
        assert set_elements(lab, "allow6") == []
        opened = {e["elem"]["val"]["concat"][0] for e in set_elements(lab, "allow4")}
        assert opened == {Lab.cli4(1)}
        with open(tmp_path / "replay.cache") as f:
            assert "4294967295" not in f.read()


def test_a_knock_routed_through_this_host_opens_nothing_here(tmp_path):
    """A router (srv) sees a knock addressed to a host behind it (cli2): it must not open."""
    need_nft()
    with Lab(clients=2, prefix="gk") as lab:
        netns_lab.ns_sysctl(lab.name("srv"), "net.ipv4.ip_forward", 1)
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        server = start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "30"}})
        udp_send(lab.name("cli1"), Lab.cli4(2), spa.DEFAULT_PORT, knock([("tcp", SERVICE_PORT)]))
        wait_for_line(server, r"rejected packet from 198\.18\.1\.2 \[client alice\]: addressed to "
                      r"198\.18\.2\.2, not to this host", 3)
        assert closed(lab, "cli1", Lab.srv4(1))
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None
