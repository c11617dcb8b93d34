"""Tests for spa.py, in spa.py's own sections and order (the same banners): the packet
format first, then files, policy and config, replay cache, the firewall back ends,
capture, logging, the server, client, keygen, selftest, install, the command line, the
speed and memory machinery; last, tests of the whole tool (against the real fwknop,
setup.sh, Python 3.6).

Unit tests need nothing but Python and pycryptodome.  The integration tests (within each
section, after its unit tests) build network namespaces, real nftables rules, real
capture and a real TCP service, and talk to the real fwknop client and fwknopd; they
need root and Debian's nftables and fwknop packages.  Outside CI they skip when those
are missing; with CI=true a missing piece is a failure.
"""

import base64
import hashlib
import hmac
import json
import os
import random
import re
import shlex
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time

import pytest

from conftest import without_coverage

import netns_lab
import spa
from netns_lab import Lab, need_lab, tcp_connect_ok, udp_send, wait_for_line, wait_tcp_open


# ---------------------------------------------------------------------------
# Helpers: configs, packets, the namespace lab
# ---------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
SPA = os.path.join(HERE, "spa.py")
TESTDATA = os.path.join(HERE, "testdata")


def load_vectors():
    """The real fwknop client's packets and their decoded values, kept in the repository
    (made by testdata/make_vectors.py).  Missing files fail the tests that use them."""
    try:
        with open(os.path.join(TESTDATA, "vectors.json")) as f:
            vectors = json.load(f)
        with open(os.path.join(TESTDATA, "decoded.json")) as f:
            decoded = {d["name"]: d for d in json.load(f)["vectors"]}
    except OSError as e:
        return None, None, "testdata is missing (%s): run testdata/make_vectors.py" % e
    return vectors, decoded, None


VECTOR_FILE, DECODED, VECTORS_MISSING = load_vectors()
VECTORS = VECTOR_FILE["vectors"] if VECTOR_FILE else []


def vector(name):
    """One vector of testdata/vectors.json by name; fails (never skips) if it is not there."""
    if VECTORS_MISSING:
        pytest.fail(VECTORS_MISSING, pytrace=False)
    found = [v for v in VECTORS if v["name"] == name]
    if not found:
        pytest.fail("testdata/vectors.json has no vector %r" % name, pytrace=False)
    return found[0]


KEY = base64.b64encode(b"k" * 32).decode()
HMAC_KEY = base64.b64encode(b"h" * 64).decode()


def write_private(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return str(path)


def server_config(tmp_path, stanzas=None, **server):
    """Write a server config and load it: `stanzas` maps a name to its options."""
    opts = {"protect": "tcp/22", "replay_cache": str(tmp_path / "replay.cache")}
    opts.update(server)
    lines = ["[server]"] + ["%s = %s" % kv for kv in opts.items()]
    for name, options in (stanzas or {"alice": {}}).items():
        merged = {"key_base64": KEY, "hmac_key_base64": HMAC_KEY}
        merged.update(options)
        lines.append("[client %s]" % name)
        lines += ["%s = %s" % kv for kv in merged.items() if kv[1] is not None]
    path = write_private(tmp_path / "spa.conf", "\n".join(lines) + "\n")
    return spa.ServerConfig(path)


def knock(access=(("tcp", 22),), key=KEY, hmac_key=HMAC_KEY, hmac_type="sha256", mode="cbc",
          allow_ip="0.0.0.0", user="alice", timeout=0, timestamp=None, **fields):
    msg = spa.Message(user, allow_ip, access, timeout, timestamp=timestamp, **fields)
    return spa.seal(msg.encode(), base64.b64decode(key), base64.b64decode(hmac_key),
                    hmac_type, mode)


def decide(config, payload, source="198.18.0.2", now=None, seen=()):
    now = time.time() if now is None else now
    return spa.decide(payload, source, now, config.stanzas, set(seen).__contains__,
                      config.max_packet_age)


def vector_stanza(tmp_path, vec, **overrides):
    """A server config with one stanza holding the keys a vector was made with."""
    key = vec.get("key_b64") or base64.b64encode(vec["key_ascii"].encode()).decode()
    hkey = vec.get("hmac_key_b64") or base64.b64encode(
        vec.get("hmac_key_ascii", "unused-hmac").encode()).decode()
    options = {"key_base64": key, "hmac_key_base64": hkey,
               "open_ports": "tcp/22,udp/53,tcp/443,tcp/5022,tcp/55000"}
    options.update(overrides)
    return server_config(tmp_path, {"vec": options})


def vector_time(vec):
    return int(vec["client_dump"]["Timestamp"])


def run_spa(*args, **kw):
    return subprocess.run([sys.executable, SPA] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, **kw)


SERVICE_PORT = 8022
KNOCKS = []      # knock-to-open times seen, printed at the end of the run (pytest -s)


def need_nft():
    need_lab("nft")
    netns_lab.need(_crypto_ok(), "pycryptodome is not installed")


def _crypto_ok():
    try:
        spa.aes_module()
        return True
    except spa.SpaError:
        return False


def lab_server_config(tmp_path, stanzas=None, name="spa.conf", **server):
    """Write a server config for the lab (the service port protected, short timeouts)."""
    opts = {"protect": "tcp/%d" % SERVICE_PORT, "interface": "any",
            "replay_cache": str(tmp_path / "replay.cache")}
    opts.update(server)
    lines = ["[server]"] + ["%s = %s" % kv for kv in opts.items()]
    for sname, options in (stanzas or {"alice": {"fw_access_timeout": "3"}}).items():
        merged = {"key_base64": KEY, "hmac_key_base64": HMAC_KEY}
        merged.update(options)
        lines.append("[client %s]" % sname)
        lines += ["%s = %s" % kv for kv in merged.items()]
    return write_private(tmp_path / name, "\n".join(lines) + "\n")


def start_server(lab, tmp_path, stanzas=None, name="spa.conf", python=sys.executable, **server):
    """Write a config (lab_server_config) and start spa.py's server in srv."""
    conf = lab_server_config(tmp_path, stanzas, name, **server)
    proc = lab.spawn("srv", [python, SPA, "server", "-c", conf, "-v"])
    wait_for_line(proc, r"listening on", 15)
    proc.conf = conf
    return proc


def client_knock(lab, ns, dest, *extra):
    """Run `spa.py client` in a namespace with the test keys; returns when the packet is sent."""
    argv = [sys.executable, SPA, "client", "-D", dest, "-A", "tcp/%d" % SERVICE_PORT,
            "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY, "-U", "alice"] + list(extra)
    return lab.run(ns, argv)


def packet(**kw):
    return knock([("tcp", SERVICE_PORT)], **kw)


def timed_knock(lab, ns, dest, wire=None):
    """Send a knock from `ns`; return seconds until a TCP connect to the service succeeds."""
    wire = packet() if wire is None else wire
    start = time.monotonic()
    udp_send(lab.name(ns), dest, spa.DEFAULT_PORT, wire)
    opened = wait_tcp_open(lab.name(ns), dest, SERVICE_PORT, 1.0, poll_ms=1)
    if opened is not None:
        KNOCKS.append(time.monotonic() - start)
    return opened


def closed(lab, ns, dest):
    return not tcp_connect_ok(lab.name(ns), dest, SERVICE_PORT, timeout=0.3)


def closed_port(lab, ns, dest, port):
    return not tcp_connect_ok(lab.name(ns), dest, port, timeout=0.3)


def spa_list(lab, conf):
    return lab.run("srv", [sys.executable, SPA, "server", "-c", conf, "--list"]).stdout


def children(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
        return [int(p) for p in f.read().split()]


def proc_status(pid):
    with open("/proc/%d/status" % pid) as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def _has_user(name):
    import pwd
    try:
        return pwd.getpwnam(name) is not None
    except KeyError:
        return False


# ---------------------------------------------------------------------------
# The SPA packet: fwknop's wire format
# ---------------------------------------------------------------------------

# What a default server (CBC, HMAC-SHA256, types 1 and 3) does with each vector.
DEFAULT_OUTCOME = {
    "aes_cbc_hmac_sha256_default": None,
    "passphrase_keys": None,
    "multi_port": None,
    "client_timeout": None,
    "source_ip_any": None,
    "digest_sha512": None, "digest_md5": None, "digest_sha1": None,
    "digest_sha384": None, "digest_sha3_256": None,
    "http_transport": None,
    "aes_cbc_hmac_sha512": "HMAC does not match",
    "aes_cbc_hmac_sha384": "HMAC does not match",
    "aes_cbc_hmac_sha1": "HMAC does not match",
    "aes_cbc_hmac_md5": "HMAC does not match",
    "no_hmac_legacy": "HMAC does not match",
    "mode_legacy_short_key": "HMAC does not match",
    "nat_access": "message type 2 (NAT access) refused: enable_nat is off for this stanza",
    "nat_access_client_timeout": "message type 4 (NAT access with timeout) refused: enable_nat",
    "local_nat": "message type 5 (local NAT access) refused: enable_nat is off",
    "local_nat_client_timeout": "message type 6 (local NAT access with timeout) refused",
    "command_msg": "message type 0 (command) refused: enable_cmd_exec is off",
    "mode_ctr": "decryption failed", "mode_cfb": "decryption failed",
    "mode_ofb": "decryption failed", "mode_ecb": "decryption failed",
    "long_multi_port_over_400": "length 567 outside 140-399",
}


def test_every_vector_has_an_expected_outcome():
    vector("aes_cbc_hmac_sha256_default")
    with_wire = {v["name"] for v in VECTORS if v["wire"]}
    assert with_wire == set(DEFAULT_OUTCOME)
    # made by Debian's fwknop client, whose version the file records
    assert VECTOR_FILE["made_by"] == "testdata/make_vectors.py"
    assert re.match(r"fwknop client \d+\.\d+\.\d+, FKO protocol", VECTOR_FILE["fwknop_version"])


@pytest.mark.parametrize("name", sorted(DEFAULT_OUTCOME))
def test_default_server_on_real_client_vectors(tmp_path, name):
    vec = vector(name)
    config = vector_stanza(tmp_path, vec)
    d = decide(config, vec["wire"].encode(), now=vector_time(vec))
    expected = DEFAULT_OUTCOME[name]
    if expected is None:
        assert d.accepted, d.reason
        dump = vec["client_dump"]
        assert d.message.username == dump["Username"]
        assert d.message.rand == dump["Random Value"]
        assert "%s,%s" % (d.message.allow_ip, d.message.access_text()) == dump["Message String"]
        assert d.message.client_timeout == int(dump["Client Timeout"])
        assert d.allow_ip == (d.source if d.message.allow_ip == "0.0.0.0" else d.message.allow_ip)
    else:
        assert not d.accepted
        assert expected in d.reason


@pytest.mark.parametrize("name,option", [
    ("aes_cbc_hmac_sha512", {"hmac_digest_type": "sha512"}),
    ("aes_cbc_hmac_sha384", {"hmac_digest_type": "sha384"}),
    ("aes_cbc_hmac_sha1", {"hmac_digest_type": "sha1"}),
    ("aes_cbc_hmac_md5", {"hmac_digest_type": "md5"}),
    ("mode_ctr", {"encryption_mode": "ctr"}),
    ("mode_cfb", {"encryption_mode": "cfb"}),
    ("mode_ofb", {"encryption_mode": "ofb"}),
])
def test_vectors_accepted_when_the_stanza_matches(tmp_path, name, option):
    vec = vector(name)
    d = decide(vector_stanza(tmp_path, vec, **option), vec["wire"].encode(), now=vector_time(vec))
    assert d.accepted, d.reason
    assert d.message.access == [("tcp", 22)]


@pytest.mark.parametrize("name,nat,timeout", [
    ("nat_access", ("10.11.12.13", 22, False), 30),
    ("nat_access_client_timeout", ("10.11.12.13", 22, False), 120),
    ("local_nat", ("198.18.0.1", 22, True), 30),
    ("local_nat_client_timeout", ("198.18.0.1", 22, True), 60),
])
def test_nat_vectors_with_nat_enabled(tmp_path, name, nat, timeout):
    vec = vector(name)
    key = vec["key_b64"]
    # Forwarding checks the port knocked on (5022) and the target against nat_destinations;
    # local NAT the port it leads to (22), not the one knocked on (55000).
    config = server_config(tmp_path, {"vec": {"key_base64": key, "hmac_key_base64": vec["hmac_key_b64"],
                                              "open_ports": "tcp/5022,tcp/22",
                                              "nat_destinations": "10.11.12.0/24:22",
                                              "enable_nat": "yes"}},
                           enable_forwarding="yes", enable_local_nat="yes")
    d = decide(config, vec["wire"].encode(), now=vector_time(vec))
    assert d.accepted, d.reason
    assert d.nat == nat and d.timeout == timeout
    # The server's switch alone is not enough: the stanza must allow NAT too, and vice versa.
    off = server_config(tmp_path, {"vec": {"key_base64": key, "hmac_key_base64": vec["hmac_key_b64"],
                                           "open_ports": "tcp/5022,tcp/55000", "enable_nat": "yes"}})
    d = decide(off, vec["wire"].encode(), now=vector_time(vec))
    assert not d.accepted and "is off" in d.reason


@pytest.mark.parametrize("name", sorted(n for n in DEFAULT_OUTCOME if n != "long_multi_port_over_400"))
def test_reference_values_of_decoded_json(name):
    vec = vector(name)
    ref = DECODED[name]
    key = base64.b64decode(vec["key_b64"]) if "key_b64" in vec else vec["key_ascii"].encode()
    if vec["mode"] == "legacy":     # keys padded with '0' to 16 bytes; spa.py does not offer it
        key = key.ljust(16, b"0")
    aes_key, iv = spa.derive_key_iv(key, bytes.fromhex(ref["salt_hex"]))
    assert aes_key.hex() == ref["aes_key_hex"]
    assert iv.hex() == ref["iv_hex"]
    n = spa.HMAC_TYPES[vec["hmac_type"]][1] if vec["hmac_type"] in spa.HMAC_TYPES else 0
    wire = vec["wire"].encode()
    signed = spa.SALT_PREFIX + (wire[:-n] if n else wire)
    if n:
        assert signed.decode() == ref["hmac_input"]
        hkey = base64.b64decode(vec["hmac_key_b64"]) if "hmac_key_b64" in vec \
            else vec["hmac_key_ascii"].encode()
        assert spa.hmac_b64(hkey, signed, vec["hmac_type"]) == wire[-n:]
    if vec["mode"] in spa.ENCRYPTION_MODES:
        plaintext = spa.decrypt(spa.b64decode(signed), key, vec["mode"])
        assert plaintext.decode() == ref["plaintext"]
        if n:
            assert spa.unseal(wire, key, hkey, vec["hmac_type"], vec["mode"]) == plaintext
        msg, f = spa.parse_plaintext(plaintext), ref["fields"]
        assert (msg.rand, msg.username, msg.timestamp, msg.version, msg.msg_type) == \
            (f["rand_val"], f["username"], f["timestamp"], f["version"], f["message_type"])
        assert "%s,%s" % (msg.allow_ip, msg.command if msg.msg_type == spa.MSG_COMMAND
                          else msg.access_text()) == f["message"]
        assert (msg.nat_access, msg.server_auth, msg.client_timeout, msg.digest_type) == \
            (f["nat_access"], f["server_auth"], f["client_timeout"], f["digest_type"])


def test_encoder_reproduces_a_real_client_packet_byte_for_byte():
    vec = vector("aes_cbc_hmac_sha256_default")
    ref = DECODED[vec["name"]]
    f = ref["fields"]
    msg = spa.Message(f["username"], "198.18.0.2", [("tcp", 22)], timestamp=f["timestamp"],
                      rand=f["rand_val"])
    assert msg.encode().decode() == ref["plaintext"]
    wire = spa.seal(msg.encode(), base64.b64decode(vec["key_b64"]),
                    base64.b64decode(vec["hmac_key_b64"]), salt=bytes.fromhex(ref["salt_hex"]))
    assert wire.decode() == vec["wire"]


def test_random_value_is_16_uniform_digits():
    values = [spa.random_digits(16) for _ in range(2000)]
    assert all(len(v) == 16 and v.isdigit() for v in values)
    assert len(set(values)) == 2000
    first = [v[0] for v in values]
    assert all(first.count(d) > 120 for d in "0123456789")    # ~200 each


@pytest.mark.parametrize("hmac_type", ["sha256", "sha384", "sha512", "sha1", "md5"])
@pytest.mark.parametrize("mode", spa.ENCRYPTION_MODES)
def test_encode_then_decode(tmp_path, hmac_type, mode):
    hkey = base64.b64encode(os.urandom(spa.HMAC_KEY_BYTES[hmac_type])).decode()
    config = server_config(tmp_path, {"a": {"hmac_key_base64": hkey, "hmac_digest_type": hmac_type,
                                            "encryption_mode": mode,
                                            "open_ports": "tcp/22,udp/53"}})
    wire = knock([("tcp", 22), ("udp", 53)], hmac_key=hkey, hmac_type=hmac_type, mode=mode,
                 timeout=45)
    d = decide(config, wire)
    assert d.accepted, d.reason
    assert d.message.access == [("tcp", 22), ("udp", 53)]
    assert d.message.msg_type == spa.MSG_TIMEOUT_ACCESS
    assert d.timeout == 45 and d.allow_ip == "198.18.0.2"
    assert d.replay_key and len(d.replay_key) == 43


@pytest.mark.parametrize("hmac_type", sorted(spa.HMAC_TYPES))
@pytest.mark.parametrize("mode", spa.ENCRYPTION_MODES)
def test_unseal_is_the_mirror_of_seal(hmac_type, mode):
    """unseal(seal(plaintext)) is the plaintext, for every HMAC type and mode; a changed
    character, another HMAC key or another AES key is refused, each for its reason."""
    key, hkey = os.urandom(32), os.urandom(64)
    plaintext = spa.Message("alice", "0.0.0.0", [("tcp", 22)], digest_type="sha384").encode()
    wire = spa.seal(plaintext, key, hkey, hmac_type, mode)
    assert spa.unseal(wire, key, hkey, hmac_type, mode) == plaintext
    assert spa.parse_plaintext(spa.unseal(wire, key, hkey, hmac_type, mode)).access == [("tcp", 22)]
    flipped = wire[:20] + (b"A" if wire[20:21] != b"A" else b"B") + wire[21:]
    for bad, keys, reason in ((flipped, (key, hkey), "HMAC does not match"),
                              (wire, (key, os.urandom(64)), "HMAC does not match"),
                              (wire, (os.urandom(32), hkey), "decryption failed")):
        with pytest.raises(spa.Reject) as refused:
            spa.unseal(bad, keys[0], keys[1], hmac_type, mode)
        assert str(refused.value).startswith(reason)


def test_wire_shape_matches_fwknop():
    wire = knock()
    assert len(wire) == 204                   # the typical default packet
    assert wire[:1] in (b"8", b"9", b"+", b"/")
    assert not wire.startswith(spa.SALT_PREFIX)
    assert b"=" not in wire


HOSTILE = {
    "truncated": lambda w: w[:-1],
    "truncated to 150": lambda w: w[:150],
    "prefix left on": lambda w: spa.SALT_PREFIX + w,
    "trailing newline": lambda w: w + b"\n",
    "padding added": lambda w: w + b"==",
    "oversize": lambda w: w + b"A" * 300,
    "undersize": lambda w: w[:100],
    "non-base64": lambda w: w[:50] + b"!" + w[51:],
    "nul byte": lambda w: w[:50] + b"\0" + w[51:],
    "empty": lambda w: b"",
    "hmac cut off": lambda w: w[:-43],
    "hmac doubled": lambda w: w + w[-43:],
    "utf-8": lambda w: w[:60] + "é".encode() + w[62:],
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_inputs_are_rejected(tmp_path, name):
    config = server_config(tmp_path)
    d = decide(config, HOSTILE[name](knock()))
    assert not d.accepted and d.reason
    assert d.replay_key is None               # nothing unauthenticated reaches the cache


def test_every_single_bit_flip_is_rejected(tmp_path):
    config = server_config(tmp_path)
    wire = bytearray(knock())
    for i in range(len(wire)):
        for bit in (1, 2, 4, 8, 16, 32, 64, 128):
            bad = bytearray(wire)
            bad[i] ^= bit
            d = decide(config, bytes(bad))
            assert not d.accepted, (i, bit)


def test_wrong_keys_are_rejected(tmp_path):
    config = server_config(tmp_path)
    other = base64.b64encode(os.urandom(32)).decode()
    d = decide(config, knock(hmac_key=base64.b64encode(os.urandom(64)).decode()))
    assert not d.accepted and "HMAC does not match" in d.reason
    # Right HMAC key, wrong encryption key: authenticated but no message, so refused and not
    # remembered (it can never open anything; only a key holder's message is recorded).
    d = decide(config, knock(key=other))
    assert not d.accepted and "decryption failed" in d.reason
    assert d.replay_key is None


def test_random_bytes_never_raise(tmp_path):
    config = server_config(tmp_path)
    rng = __import__("random").Random(1)
    alphabet = spa.B64_ALPHABET
    for n in range(3000):
        size = rng.choice([0, 1, 139, 140, 204, 399, 400, 1500])
        if n % 2:
            payload = bytes(rng.choice(alphabet) for _ in range(size))
        else:
            payload = bytes(rng.getrandbits(8) for _ in range(size))
        d = decide(config, payload)
        assert not d.accepted and d.reason


@pytest.mark.parametrize("field,value,reason", [
    ("rand", "12345678901234567", "decryption failed"),          # 17 digits
    ("rand", "123456789012345", "decryption failed"),            # 15 digits
    ("version", "123456789", "version field"),
    ("msg_type", 7, "unknown message type"),
])
def test_authenticated_bad_fields(tmp_path, field, value, reason):
    config = server_config(tmp_path)
    d = decide(config, knock(**{field: value}))
    assert not d.accepted and reason in d.reason
    # Remembered all the same once the plaintext shows the AES key made it (16 digits
    # and a colon); before that it is nobody's message and can never open anything.
    assert (d.replay_key is not None) == (field != "rand")


@pytest.mark.parametrize("allow_ip", ["300.1.1.1", "1.2.3", "::1", "a.b.c.d", "1.2.3.4.5"])
def test_authenticated_bad_allow_ip(tmp_path, allow_ip):
    config = server_config(tmp_path)
    d = decide(config, knock(allow_ip=allow_ip))
    assert not d.accepted and "allow IP" in d.reason


@pytest.mark.parametrize("access", [[("tcp", 0)], [("tcp", 65536)], [("icmp", 1)], [("TCP", 22)]])
def test_authenticated_bad_access(tmp_path, access):
    config = server_config(tmp_path)
    d = decide(config, knock(access))
    assert not d.accepted


def test_overlong_username_is_refused(tmp_path):
    config = server_config(tmp_path)
    d = decide(config, knock(user="u" * 49))
    assert not d.accepted and "username field" in d.reason
    assert decide(config, knock(user="u" * 48)).accepted


def test_replay_is_refused(tmp_path):
    config = server_config(tmp_path)
    wire = knock()
    first = decide(config, wire)
    assert first.accepted
    again = decide(config, wire, seen={first.replay_key})
    assert not again.accepted and again.reason == "replayed packet"


def test_packet_age_window(tmp_path):
    config = server_config(tmp_path, max_packet_age="120")
    now = 1800000000
    for offset, ok in ((0, True), (120, True), (-120, True), (121, False), (-121, False),
                       (-100000, False)):
        d = decide(config, knock(timestamp=now + offset), now=now)
        assert d.accepted == ok, (offset, d.reason)
        if not ok:
            assert "outside the 120 s window" in d.reason


def test_a_bug_in_the_policy_refuses_and_never_raises(tmp_path):
    """judge() turns any exception of a policy (a bug) into a refusal that names it, with
    the replay key already set; the replay key of a signed text that is not base64 is the
    hash of the text itself."""
    config = server_config(tmp_path)
    stanza = config.stanzas[0]

    def broken(msg, source, now):
        raise RuntimeError("a bug")
    stanza.authorize = broken
    d = decide(config, knock())
    assert not d.accepted and d.reason == "internal error RuntimeError: a bug"
    assert d.replay_key is not None
    assert spa.packet_key(b"not base64!") == spa.b64encode(hashlib.sha256(b"not base64!")
                                                            .digest()).decode()


def test_first_authenticating_stanza_wins_and_source_lists(tmp_path):
    other_h = base64.b64encode(b"o" * 64).decode()
    config = server_config(tmp_path, {
        "net": {"source": "198.18.5.0/24, 2001:db8:5::/48", "hmac_key_base64": other_h},
        "bob": {"source": "any"},
    })
    assert decide(config, knock(hmac_key=other_h), source="198.18.5.7").stanza.name == "net"
    assert decide(config, knock(hmac_key=other_h), source="2001:db8:5::9").stanza.name == "net"
    d = decide(config, knock(hmac_key=other_h), source="198.18.6.7")
    assert not d.accepted and "HMAC does not match" in d.reason
    assert decide(config, knock(), source="198.18.5.7").stanza.name == "bob"
    only = server_config(tmp_path, {"net": {"source": "198.18.5.0/24"}})
    d = decide(only, knock(), source="198.18.6.7")
    assert not d.accepted and d.reason == "no stanza for source 198.18.6.7"


# ---------------------------------------------------------------------------
# Files: keys read privately, state written durably
# ---------------------------------------------------------------------------

def test_files_root_writes_are_made_safely(tmp_path, monkeypatch):
    """check_private_dir says why a directory will not do (missing, not one); a temporary
    file is never one whose name is taken (ten tries, then an error); a write that fails
    leaves the old file as it was and no temporary file behind."""
    assert spa.check_private_dir(str(tmp_path / "none")).startswith("cannot use %s: " % (tmp_path / "none"))
    (tmp_path / "file").write_text("")
    assert spa.check_private_dir(str(tmp_path / "file")) == "%s is not a directory" % (tmp_path / "file")
    target = str(tmp_path / "target")
    monkeypatch.setattr(spa.os, "urandom", lambda n: b"\0" * n)
    name, fd = spa.create_temp_file(target)
    os.close(fd)
    with pytest.raises(OSError, match="cannot make a temporary file next to"):
        spa.create_temp_file(target)                      # its one name is taken now
    os.unlink(name)
    monkeypatch.undo()
    (tmp_path / "target").write_text("old")

    def fails(fd):
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        spa.replace_file(target, fails)
    assert (tmp_path / "target").read_text() == "old"
    assert sorted(os.listdir(str(tmp_path))) == ["file", "target"]


def test_readable_key_file_is_refused(tmp_path):
    path = write_private(tmp_path / "spa.conf", "[server]\nprotect = tcp/22\n")
    os.chmod(path, 0o644)
    done = run_spa("server", "-c", path, "--test")
    assert done.returncode == 1 and "chmod 600" in done.stderr
    done = run_spa("client", "-c", path, "-n", "x", "--test")
    assert done.returncode == 1 and "readable by group or others" in done.stderr


# ---------------------------------------------------------------------------
# Policy and config
# ---------------------------------------------------------------------------

def test_policy_open_ports(tmp_path):
    config = server_config(tmp_path, {"a": {"open_ports": "tcp/22,tcp/443"}})
    assert decide(config, knock([("tcp", 22), ("tcp", 443)])).accepted
    d = decide(config, knock([("tcp", 22), ("tcp", 23)]))
    assert not d.accepted and d.reason == "tcp/23 not in open_ports"
    assert not decide(config, knock([("udp", 22)])).accepted


def test_open_ports_default_to_protect(tmp_path):
    config = server_config(tmp_path, protect="tcp/22,udp/1194")
    assert decide(config, knock([("udp", 1194)])).accepted
    assert not decide(config, knock([("tcp", 80)])).accepted


def test_policy_username_and_source_address(tmp_path):
    config = server_config(tmp_path, {"a": {"require_username": "alice",
                                            "require_source_address": "yes"}})
    d = decide(config, knock(user="mallory", allow_ip="198.18.0.2"))
    assert not d.accepted and "username" in d.reason
    d = decide(config, knock(user="alice"))
    assert not d.accepted and "require_source_address" in d.reason
    d = decide(config, knock(user="alice", allow_ip="198.18.0.9"))
    assert d.accepted and d.allow_ip == "198.18.0.9"


def test_nat_requests_the_stanza_refuses(tmp_path):
    """A NAT request must name an address (no names), a port, one port to open, and a
    target of the allow IP's family; an access message must carry the required user."""
    config = server_config(tmp_path, {"alice": {"enable_nat": "yes", "require_username": "alice",
                                                "open_ports": "tcp/22,tcp/2222",
                                                "nat_destinations": "10.0.0.7:22, [2001:db8::7]:22"}},
                           enable_forwarding="yes")
    stanza, now = config.stanzas[0], time.time()
    cases = [("inner.example,22", [("tcp", 2222)], "198.18.0.9",
              "NAT host 'inner.example' is not an address (spa.py resolves no names)"),
             ("10.0.0.7,99999", [("tcp", 2222)], "198.18.0.9", "NAT port '99999' is not 1-65535"),
             ("10.0.0.7,22", [("tcp", 2222), ("tcp", 22)], "198.18.0.9",
              "a NAT request names 2 ports; it must name one"),
             ("2001:db8::7,22", [("tcp", 2222)], "198.18.0.9",
              "NAT to 2001:db8::7 for 198.18.0.9: the addresses are of different families")]
    for nat_access, access, allow_ip, reason in cases:
        msg = spa.Message("alice", allow_ip, access, msg_type=spa.MSG_NAT, nat_access=nat_access)
        with pytest.raises(spa.Reject) as refused:
            stanza.authorize(msg, "198.18.0.2", now)
        assert str(refused.value) == reason
    msg = spa.Message("mallory", "0.0.0.0", [("tcp", 22)])
    with pytest.raises(spa.Reject, match="username 'mallory' is not the required one"):
        stanza.authorize(msg, "198.18.0.2", now)
    target = stanza.authorize(spa.Message("alice", "198.18.0.9", [("tcp", 2222)],
                                          msg_type=spa.MSG_NAT, nat_access="10.0.0.7,22"),
                              "198.18.0.2", now)[2]
    assert (target.address, target.port, target.local) == ("10.0.0.7", 22, False)


def test_client_timeout_is_capped(tmp_path):
    config = server_config(tmp_path, {"a": {"fw_access_timeout": "7", "max_fw_timeout": "60"}})
    assert decide(config, knock()).timeout == 7
    assert decide(config, knock(timeout=20)).timeout == 20
    assert decide(config, knock(timeout=5000)).timeout == 60


def test_ini_errors_name_the_line_not_its_text(tmp_path):
    """A section given twice, or a file configparser cannot read at all: the error names
    the file (and line), never a line's text."""
    path = write_private(tmp_path / "spa.conf", "[server]\nprotect = tcp/22\n[server]\n")
    with pytest.raises(spa.SpaError) as e:
        spa.read_ini(path)
    assert str(e.value) == "%s line 3 (in [server]): section [server] appears twice" % path

    class Broken(Exception):
        pass
    assert spa._ini_error(path, "", Broken()) == "%s: not an INI file (Broken)" % path


@pytest.mark.parametrize("text,message", [
    ("[server]\nprotect = tcp/22\n", "no [client NAME] section"),
    ("[server]\nprotect = tcp/22\n[client a]\nkey_base64 = %s\n" % KEY, "hmac_key_base64 is missing"),
    ("[server]\nprotect = tcp/22\n[client a]\nkey_base64 = %s\nhmac_key_base64 = %s\n"
     % (KEY, KEY), "must differ"),
    ("[server]\nprotect = tcp/22\n[client a]\nkey_base64 = !!!\nhmac_key_base64 = %s\n"
     % HMAC_KEY, "not valid base64"),
    ("[server]\nprotect = tcp/22\n[client a]\nkey_base64 = %s\nhmac_key_base64 = %s\n"
     % (base64.b64encode(b"x" * 33).decode(), HMAC_KEY), "33 bytes"),
    ("[server]\nprotect = tcp/22\n[client a]\nkey_base64 = %s\nhmac_key_base64 = %s\n"
     "fw_access_timeout = 0\n" % (KEY, HMAC_KEY), "fw_access_timeout = 0: must be from 1"),
    ("[server]\nprotect = tcp/99999\n", "expected tcp/PORT"),
    ("[server]\nprotect_action = maybe\nprotect = tcp/22\n", "protect_action"),
    ("[server]\nprotect = tcp/22\nbogus = 1\n", "unknown option bogus"),
    ("[server]\nprotect = tcp/22\n[client a]\nkey_base64 = %s\nhmac_key_base64 = %s\n"
     "source = 300.1.1.1\n" % (KEY, HMAC_KEY), "source"),
    ("[server]\nprotect = tcp/22\n[clients a]\n", "unknown section"),
    ("[server\n", "spa.conf"),
])
def test_config_errors_are_one_line(tmp_path, text, message):
    path = write_private(tmp_path / "spa.conf", text)
    done = run_spa("server", "-c", path, "--test")
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    for secret in (KEY, HMAC_KEY):
        assert secret not in done.stderr


def test_missing_config_and_unknown_option(tmp_path):
    done = run_spa("server", "-c", str(tmp_path / "nope.conf"))
    assert done.returncode == 1 and "No such file" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_spa("client", "--bogus")
    assert done.returncode == 2 and "unrecognized arguments" in done.stderr


ACCESS_CONF = """# fwknopd's access.conf, as a fwknop user has it
SOURCE              ANY
OPEN_PORTS          tcp/22, tcp/8022
KEY_BASE64          {key}
HMAC_KEY_BASE64     {hkey}
FW_ACCESS_TIMEOUT   7
REQUIRE_SOURCE_ADDRESS  N

SOURCE              198.18.0.0/16
DESTINATION         198.18.1.1
KEY_BASE64          {key}
HMAC_KEY_BASE64     {hkey}

SOURCE              ANY
GPG_REMOTE_ID       12345678
GPG_DECRYPT_ID      ABCDEF01

SOURCE              ANY
KEY_BASE64          {key}
HMAC_KEY_BASE64     {other}
ENABLE_CMD_EXEC     Y
ENABLE_CMD_SUDO_EXEC Y
RESTRICT_PORTS      tcp/23
ACCESS_EXPIRE       01/01/2020
"""


def test_fwknopd_access_conf_is_read(tmp_path):
    other = base64.b64encode(b"o" * 64).decode()
    path = write_private(tmp_path / "access.conf",
                         ACCESS_CONF.format(key=KEY, hkey=HMAC_KEY, other=other))
    config = server_config(tmp_path, access_conf=path)
    lines = [n for n, line in enumerate(ACCESS_CONF.splitlines(), 1) if line.startswith("SOURCE")]
    names = [s.name for s in config.stanzas]
    assert names == ["alice"] + ["access.conf:%d" % lines[i] for i in (0, 1, 3)]
    notes = "\n".join(config.notes)
    assert [str(n) for n in config.stanzas[2].destinations] == ["198.18.1.1/32"]   # DESTINATION
    assert "access.conf:%d: stanza left out: spa.py does not support a stanza without an AES " \
        "key" % lines[2] in notes        # GPG_* without GPG_DECRYPT_PW: no GnuPG, as for fwknopd
    assert "access.conf:%d: ENABLE_CMD_EXEC is not honoured without CMD_EXEC_USER" % lines[3] in notes
    assert "access.conf:%d: ENABLE_CMD_SUDO_EXEC is not honoured" % lines[3] in notes
    assert not config.stanzas[3].enable_cmd_exec
    fw = config.stanzas[1]
    assert fw.open_ports == {("tcp", 22), ("tcp", 8022)} and fw.fw_access_timeout == 7
    d = decide(config, knock([("tcp", 22)]))
    assert d.accepted and d.stanza.name == "alice"          # spa.conf's own stanzas come first
    expired = decide(config, knock(hmac_key=other))
    assert not expired.accepted and "expired on 2020-01-01" in expired.reason


def test_access_conf_includes_and_what_it_cannot_honour(tmp_path):
    """%include reads another file (its stanzas load too); %include_keys that cannot be
    read leaves its stanza out, named; a key still __CHANGEME__ or a GnuPG-only stanza is
    left out; with forwarding on, access.conf's stanzas refuse NAT to other hosts."""
    keys = "KEY_BASE64 %s\nHMAC_KEY_BASE64 %s\n" % (KEY, HMAC_KEY)
    extra = write_private(tmp_path / "extra.conf", "SOURCE ANY\n" + keys)
    main = write_private(tmp_path / "access.conf", (
        "%%include %s\n"
        "SOURCE 198.18.0.0/24\n%%include_keys %s\n"
        "SOURCE 198.18.1.0/24\nKEY __CHANGEME__\nHMAC_KEY_BASE64 %s\n"
        "SOURCE 198.18.2.0/24\nENCRYPTION_MODE asymmetric\nGPG_DECRYPT_ID ABCD1234\n"
        "HMAC_KEY_BASE64 %s\n") % (extra, tmp_path / "no-such-keys", HMAC_KEY, HMAC_KEY))
    stanzas, notes = spa.read_access_conf(main, [("tcp", 22)], forwarding=True)
    assert [s.name for s in stanzas] == ["extra.conf:1"]
    text = "\n".join(notes)
    assert "cannot read %s: No such file" % (tmp_path / "no-such-keys") in notes[1]
    assert notes[1].startswith("access.conf:2: stanza left out: ")
    assert notes[2].startswith("access.conf:4: stanza left out: ")
    assert notes[2].endswith("KEY is still __CHANGEME__ (line 5)")
    assert "access.conf:7: stanza left out: spa.py does not support a stanza without an AES " \
        "key" in text
    assert "extra.conf:1: NAT access to other hosts is refused: access.conf cannot name " \
        "nat_destinations" in text


def test_access_conf_alone_and_readable_refused(tmp_path):
    path = write_private(tmp_path / "access.conf",
                         ACCESS_CONF.format(key=KEY, hkey=HMAC_KEY, other=HMAC_KEY))
    conf = write_private(tmp_path / "spa.conf", "[server]\nprotect = tcp/22\nreplay_cache = %s\n"
                         % (tmp_path / "r"))
    config = spa.ServerConfig(conf, path)
    assert [s.name for s in config.stanzas][0] == "access.conf:2"     # its first SOURCE line
    d = decide(config, knock([("tcp", 8022)]))
    assert d.accepted and d.stanza.name == "access.conf:2" and d.timeout == 7
    d = decide(config, knock([("tcp", 23)]))
    assert not d.accepted and "tcp/23 not in open_ports" in d.reason
    os.chmod(path, 0o644)
    with pytest.raises(spa.SpaError, match="chmod 600"):
        spa.ServerConfig(conf, path)


def test_spa_server_replaces_fwknopd_without_rekeying(tmp_path):
    """fwknopd's own access.conf, fwknop's own client and keys: spa.py takes over."""
    need_nft()
    need_lab("fwknop")
    key, hmac_key = netns_lab.fwknop_keygen()
    access = write_private(tmp_path / "access.conf", "SOURCE ANY\nOPEN_PORTS tcp/%d\nKEY_BASE64 %s\n"
                           "HMAC_KEY_BASE64 %s\nFW_ACCESS_TIMEOUT 5\n" % (SERVICE_PORT, key, hmac_key))
    conf = write_private(tmp_path / "spa.conf", "[server]\nprotect = tcp/%d\nreplay_cache = %s\n"
                         % (SERVICE_PORT, tmp_path / "replay.cache"))
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        server = lab.spawn("srv", [sys.executable, SPA, "server", "-c", conf, "--access-conf", access])
        wait_for_line(server, r"listening on", 15)
        assert closed(lab, "cli1", Lab.srv4(1))
        lab.run("cli1", netns_lab.fwknop_client_argv(Lab.srv4(1), "tcp/%d" % SERVICE_PORT, key, hmac_key))
        assert wait_tcp_open(lab.name("cli1"), Lab.srv4(1), SERVICE_PORT, 1.0) is not None
        wait_for_line(server, r"\[client access.conf:1\] .* for 5 s", 2)


# ---------------------------------------------------------------------------
# Replay cache
# ---------------------------------------------------------------------------

def test_replay_cache_survives_a_restart_and_prunes(tmp_path):
    path = str(tmp_path / "sub" / "replay.cache")
    now = 1800000000
    cache = spa.ReplayCache(path, 120, now)
    cache.add("A" * 43, now, now)
    cache.add("B" * 43, now - 1000, now - 1000)
    cache.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = spa.ReplayCache(path, 120, now + 60)
    assert "A" * 43 in again and "B" * 43 not in again
    again.close()
    later = spa.ReplayCache(path, 120, now + 1000)
    assert "A" * 43 not in later
    later.close()
    with open(path) as f:
        assert len(f.read().splitlines()) == 1    # only the header is left


def test_replay_cache_keeps_128_bits_of_each_digest(tmp_path):
    """The file and the table hold a digest's first 16 bytes; a file with whole digests
    (as spa.py wrote them before) is read as well."""
    path = str(tmp_path / "replay.cache")
    now = 1800000000
    full = [spa.b64encode(hashlib.sha256(b"%d" % i).digest()).decode() for i in range(3)]
    with open(path, "w") as f:
        f.write("%s %d %d\n" % (full[0], now, now))
    os.chmod(path, 0o600)
    cache = spa.ReplayCache(path, 120, now)
    assert full[0] in cache and full[1] not in cache
    cache.add(full[1], now, now)
    cache.close()
    with open(path) as f:
        lines = [line.split() for line in f if not line.startswith("#")]
    assert [len(words[0]) for words in lines] == [22, 22]
    again = spa.ReplayCache(path, 120, now)
    assert full[0] in again and full[1] in again and full[2] not in again
    # Differing only after the 16th byte: the same packet, as far as the cache can tell.
    twin = spa.b64encode(spa.b64decode(full[2])[:16] + bytes(16)).decode()
    again.add(twin, now, now)
    assert full[2] in again


def test_the_readers_digest_is_the_parents_replay_key(tmp_path):
    """packet_digest(), the packet reader's replay digest made straight from the packet, is
    what the cache keeps of packet_key(), the parent's: so the reader's copy of the cache
    refuses a packet the parent recorded, and add_new() refuses it once recorded."""
    now = 1800000000
    signed = [spa.authenticate(knock(), spa.Hmac(base64.b64decode(HMAC_KEY), "sha256",
                                                 spa.SALT_PREFIX), 43),
              b"U2FsdGVkX1" + b"A" * 101]          # not whole base64: the text is hashed
    assert signed[0] is not None
    parent = spa.ReplayCache(str(tmp_path / "replay.cache"), 120, now)
    parent.add(spa.packet_key(signed[0]), now, now)
    for text in signed:
        assert spa.packet_digest(text) == spa._replay_digest(spa.packet_key(text))
    reader = parent.copy()
    assert spa.packet_digest(signed[0]) in reader
    assert not reader.add_new(spa.packet_digest(signed[0]), now)
    assert reader.add_new(spa.packet_digest(signed[1]), now)
    assert not reader.add_new(spa.packet_digest(signed[1]), now + 1)
    assert spa.packet_key(signed[1]) in reader and spa.packet_key(signed[1]) not in parent


def test_replay_cache_compacts_itself_and_reads_what_it_can(tmp_path):
    """The file is written anew once it holds many more lines than live entries (each
    packet appends one); a line too long to be one is skipped and counted; a cache that
    cannot be read or made is an error in words."""
    path = str(tmp_path / "replay.cache")
    cache = spa.ReplayCache(path, 120)
    now = time.time()
    digest = spa.b64encode(hashlib.sha256(b"one").digest()).decode()
    assert cache.add_many([(digest, now)] * 1100, now)     # 1,100 lines for one entry
    with open(path) as f:
        assert len(f.read().splitlines()) == 2              # the header and the entry
    cache.close()
    with open(path, "a") as f:
        f.write("x" * 500 + "\n")
    assert spa.ReplayCache(path, 120).skipped == 1
    with pytest.raises(spa.SpaError, match="cannot read the replay cache"):
        spa.ReplayCache(str(tmp_path), 120)              # a directory
    (tmp_path / "file").write_text("")
    with pytest.raises(spa.SpaError, match="cannot make the replay cache's directory"):
        spa.ReplayCache(str(tmp_path / "file" / "replay.cache"), 120)


def test_replay_cache_keeps_future_packets(tmp_path):
    """A packet stamped ahead (within the window) stays remembered until it could no longer
    pass; one stamped further ahead is refused by the age check and kept two windows."""
    path = str(tmp_path / "replay.cache")
    now = 1800000000
    cache = spa.ReplayCache(path, 120, now)
    cache.add("F" * 43, now + 100, now)
    cache.add("G" * 43, now + 5000, now)
    cache.close()
    later = spa.ReplayCache(path, 120, now + 220)
    assert "F" * 43 in later and "G" * 43 in later
    later.close()
    assert "F" * 43 not in spa.ReplayCache(path, 120, now + 241)


def test_replay_opens_nothing_even_after_a_restart(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        server = start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "1"}})
        wire = packet()
        assert timed_knock(lab, "cli1", Lab.srv4(1), wire) is not None
        time.sleep(1.5)
        assert closed(lab, "cli1", Lab.srv4(1))
        udp_send(lab.name("cli1"), Lab.srv4(1), spa.DEFAULT_PORT, wire)
        wait_for_line(server, r"rejected packet from 198\.18\.1\.2 \[client alice\]: replayed packet", 2)
        assert closed(lab, "cli1", Lab.srv4(1))
        lab.stop_process(server)
        server = start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "1"}})
        udp_send(lab.name("cli1"), Lab.srv4(1), spa.DEFAULT_PORT, wire)
        wait_for_line(server, r"replayed packet", 2)
        assert closed(lab, "cli1", Lab.srv4(1))


# ---------------------------------------------------------------------------
# Firewall: one interface, three back ends
# ---------------------------------------------------------------------------

def test_the_firewall_interface_s_defaults():
    """What a back end does not do itself: nothing to list, expire, restore or flush; the
    methods every back end must have raise NotImplementedError in the base class."""
    fw = spa.Firewall([("tcp", 22)], "drop")
    assert (fw.list(), fw.list_nat(), fw.expire(), fw.restore(), fw.flush()) == \
        ([], [], 0, False, False)
    assert (fw.steer, fw.monitored, fw.name) == (False, False, None)
    for call in (fw.setup, lambda: fw.open("198.18.0.2", "tcp", 22, 30),
                 lambda: fw.open_many([("198.18.0.2", "tcp", 22, 30)]),
                 lambda: fw.open_nat("198.18.0.2", "tcp", 22, "10.0.0.7", 22, 30, False),
                 lambda: fw.close("198.18.0.2", "tcp", 22)):
        with pytest.raises(NotImplementedError):
            call()
    dry = spa.DryRunFirewall([("tcp", 22)])
    assert dry.open("198.18.0.2", "tcp", 22, 30, interface="eth0") is True
    assert dry.opened == [("198.18.0.2", "tcp", 22, 30, "eth0")]
    assert dry.close("198.18.0.2", "tcp", 22) is False


def test_every_back_end_offers_the_firewall_interface():
    """nft, iptables and the dry run share one small interface (spa.Firewall): each has its
    own setup, open, open_nat and close, and answers every method the server calls."""
    methods = ("setup", "open", "open_many", "open_nat", "close", "list", "list_nat", "expire",
               "restore", "flush", "reconfigure")
    for back_end in (spa.NftFirewall, spa.IptablesFirewall, spa.DryRunFirewall):
        assert issubclass(back_end, spa.Firewall)
        for name in ("setup", "open", "open_nat", "close"):
            assert getattr(back_end, name) is not getattr(spa.Firewall, name), (back_end, name)
        assert all(callable(getattr(back_end, name)) for name in methods)
    dry = spa.DryRunFirewall([("tcp", 22)], "reject")
    assert (dry.name, dry.steer, dry.nat, dry.monitored) == ("none", False, False, False)
    assert dry.open_many([("198.18.0.2", "tcp", 22, 30)]) == 1 and dry.list() == []
    dry.reconfigure([("udp", 53)], "drop", True)
    assert (dry.protect, dry.action, dry.nat, dry.steer) == ([("udp", 53)], "drop", True, False)


def test_tools_in_sbin_are_found_off_path(monkeypatch):
    """`selftest` said nft was missing where only /usr/sbin was off PATH (a user's PATH, `su`
    without -); the server ran nft and ip from PATH alone too."""
    need_lab("nft")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    if shutil.which("nft") is not None:
        pytest.fail("nft is in /usr/bin here: this test needs it in an sbin folder")
    assert [m for m in spa.selftest_missing() if "nft" in m or "ip command" in m] == []
    assert spa.run_command(["nft", "--version"]).startswith("nftables")
    assert spa.find_tool("nft") in ("/usr/local/sbin/nft", "/usr/sbin/nft", "/sbin/nft")
    assert spa.find_tool("no-such-tool-here") is None
    with pytest.raises(spa.SpaError, match="no-such-tool-here not found"):
        spa.run_command(["no-such-tool-here"])


def test_find_tool_takes_path_in_order_and_skips_what_cannot_run(tmp_path, monkeypatch):
    """find_tool (shutil.which's work, without importing shutil): the first executable
    file of that name on PATH; a file without the execute bit, a folder of that name and
    an empty PATH entry (the current folder) are passed over; a name with a slash is
    taken as it is, if it can run."""
    first, second, plain, folder = (tmp_path / d for d in ("first", "second", "plain", "dir"))
    for d in (first, second, plain, folder):
        d.mkdir()
    (folder / "spa-tool").mkdir()
    (plain / "spa-tool").write_text("#!/bin/sh\n")             # not executable
    for d in (first, second):
        (d / "spa-tool").write_text("#!/bin/sh\n")
        (d / "spa-tool").chmod(0o755)
    monkeypatch.chdir(second)
    monkeypatch.setenv("PATH", os.pathsep.join(["", str(folder), str(plain), str(first),
                                                str(second)]))
    assert spa.find_tool("spa-tool") == str(first / "spa-tool")
    monkeypatch.setenv("PATH", os.pathsep.join([str(plain), ""]))
    assert spa.find_tool("spa-tool") is None
    assert spa.find_tool(str(second / "spa-tool")) == str(second / "spa-tool")
    assert spa.find_tool(str(plain / "spa-tool")) is None


def test_test_mode_and_flush(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        conf_dir = tmp_path / "t"
        conf_dir.mkdir()
        proc = start_server(lab, conf_dir)
        lab.stop_process(proc)
        # --test: decides, logs, changes nothing (the table from before stays as it was).
        lab.run("srv", [sys.executable, SPA, "server", "-c", proc.conf, "--flush"])
        assert lab.run("srv", ["nft", "list", "tables"]).stdout.strip() == ""
        with open(str(conf_dir / "replay.cache")) as f:
            cache_before = f.read()
        test = lab.spawn("srv", [sys.executable, SPA, "server", "-c", proc.conf, "--test"])
        wait_for_line(test, r"listening on .*test mode", 15)
        udp_send(lab.name("cli1"), Lab.srv4(1), spa.DEFAULT_PORT, packet())
        wait_for_line(test, r"accepted .* \(test mode: firewall unchanged\)", 2)
        assert lab.run("srv", ["nft", "list", "tables"]).stdout.strip() == ""
        with open(str(conf_dir / "replay.cache")) as f:
            assert f.read() == cache_before
        # The real server, stopped (the port stays dark), then --flush: no longer protected.
        lab.stop_process(test)
        real = start_server(lab, conf_dir)
        lab.stop_process(real)
        assert closed(lab, "cli1", Lab.srv4(1))
        out = lab.run("srv", [sys.executable, SPA, "server", "-c", proc.conf, "--flush"]).stdout
        assert "removed spa.py's nft rules" in out
        assert not closed(lab, "cli1", Lab.srv4(1))


# ---------------------------------------------------------------------------
# nftables
# ---------------------------------------------------------------------------

def test_nft_without_nat_in_the_kernel_refuses_with_reject(monkeypatch):
    """A kernel without NAT (nf_nat, nft_redir, fib) cannot steer refused connections to
    port 0: setup() loads the table without the steer chain, says so, and the reject rule
    answers.  (nft itself is played here by a stand-in that refuses `redirect`.)"""
    ran = []

    def nft(argv, stdin=None):
        ran.append(stdin or " ".join(argv))
        if stdin and "redirect to" in stdin:
            raise spa.SpaError("nft failed: Error: Could not process rule: No such file")
        return '{"nftables": []}' if "list" in argv else ""
    monkeypatch.setattr(spa, "run_command", nft)
    log = Lines()
    fw = spa.NftFirewall([("tcp", 22)], "reject", log=log)
    assert fw.steer
    fw.setup()
    assert not fw.steer and "steer" not in "\n".join(fw.commands())
    assert "reject with tcp reset" in "\n".join(fw.commands())
    assert [line for line in log.lines if "answered by nftables' reject, not by the kernel" in line]
    # tried twice with the steer chain (the second time anew, as for an old table), then without
    assert [("redirect" in text, "delete table" in text) for text in ran if "add table" in text] \
        == [(True, False), (True, True), (False, False)]


def test_nft_close_removes_an_opening_now(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        fw = spa.NftFirewall([("tcp", SERVICE_PORT)])
        netns_lab.in_netns(lab.name("srv"), fw.setup)
        netns_lab.in_netns(lab.name("srv"), lambda: fw.open(Lab.cli4(1), "tcp", SERVICE_PORT, 30))
        assert not closed(lab, "cli1", Lab.srv4(1))
        assert netns_lab.in_netns(lab.name("srv"), lambda: fw.close(Lab.cli4(1), "tcp", SERVICE_PORT))
        assert closed(lab, "cli1", Lab.srv4(1))
        assert not netns_lab.in_netns(lab.name("srv"), lambda: fw.close(Lab.cli4(1), "tcp", SERVICE_PORT))
        fw.kernel.close()


def test_nft_netlink_changes_are_the_elements_nft_makes(tmp_path):
    """Openings go to the kernel over netlink, not through nft: the elements must be the
    very ones nft itself writes and reads (keys, NAT data, timeouts), a refused change
    must say which set, and a burst of 10,000 must go in one transaction."""
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        srv = lab.name("srv")
        fw = spa.NftFirewall([("tcp", SERVICE_PORT)], nat=True)
        netns_lab.in_netns(srv, fw.setup)
        # Elements nft made are found under the keys spa.py builds: removing them works.
        lab.run("srv", ["nft", "add element inet spa allow4 { 198.18.7.7 . tcp . 22 timeout 60s }; "
                        "add element inet spa allow6 { 2001:db8::77 . udp . 53 timeout 60s }"])
        assert len(netns_lab.in_netns(srv, fw.list)) == 2
        batch = spa.ElementBatch()
        batch.remove(("inet", "spa", "allow4"), spa.nft_key(["198.18.7.7"], 6, 22))
        batch.remove(("inet", "spa", "allow6"), spa.nft_key(["2001:db8::77"], 17, 53))
        netns_lab.in_netns(srv, fw.kernel.commit, batch)
        assert netns_lab.in_netns(srv, fw.list) == []
        # And what spa.py writes, nft reads back as written.
        netns_lab.in_netns(srv, fw.open_many, [("198.18.7.8", "tcp", 22, 30),
                                               ("2001:db8::78", "udp", 53, 40)])
        netns_lab.in_netns(srv, fw.open_nat, "198.18.7.9", "tcp", 2222, "198.18.9.1", 22, 50, False)
        netns_lab.in_netns(srv, fw.open_nat, "2001:db8::79", "tcp", 2223, "2001:db8:9::1", 22, 60,
                           True)
        # (nft shows whole seconds left, rounded down: 29 or 30 for 30)
        opened = sorted(netns_lab.in_netns(srv, fw.list))
        assert [o[:3] for o in opened] == [("198.18.7.8", "tcp", 22), ("2001:db8::78", "udp", 53)]
        assert 29 <= opened[0][3] <= 30 and 39 <= opened[1][3] <= 40
        nat = sorted(netns_lab.in_netns(srv, fw.list_nat))
        assert [o[:6] for o in nat] == [("198.18.7.9", "tcp", 2222, "198.18.9.1", 22, False),
                                        ("2001:db8::79", "tcp", 2223, "2001:db8:9::1", 22, True)]
        assert 49 <= nat[0][6] <= 50 and 59 <= nat[1][6] <= 60
        fwd = lab.run("srv", ["nft", "list", "set", "inet", "spa", "fwd4"]).stdout
        assert "198.18.7.9 . 198.18.9.1 . tcp . 22 timeout 50s" in fwd
        # A longer opening is a refresh (add, delete, add): the new timeout holds.
        netns_lab.in_netns(srv, fw.open_many, [("198.18.7.8", "tcp", 22, 90)])
        assert [o[3] >= 88 for o in netns_lab.in_netns(srv, fw.list) if o[0] == "198.18.7.8"] == [True]
        # An element put twice in one batch goes in once, with the longer time.
        batch = spa.ElementBatch()
        for seconds in (30, 70, 50):
            batch.put(("inet", "spa", "allow4"), spa.nft_key(["198.18.7.11"], 6, 22), seconds)
        assert len(batch) == 3                          # add, delete, add: once
        netns_lab.in_netns(srv, fw.kernel.commit, batch)
        assert [o[3] >= 68 for o in netns_lab.in_netns(srv, fw.list) if o[0] == "198.18.7.11"] == [True]
        # The kernel refuses a change to a set that is not there; nothing of the batch stays.
        batch = spa.ElementBatch()
        batch.put(("inet", "spa", "allow4"), spa.nft_key(["198.18.7.10"], 6, 22), 30)
        batch.put(("inet", "spa", "nosuch"), spa.nft_key(["198.18.7.10"], 6, 22), 30)
        with pytest.raises(spa.SpaError, match="add element inet spa nosuch: No such file"):
            netns_lab.in_netns(srv, fw.kernel.commit, batch)
        assert "198.18.7.10" not in [o[0] for o in netns_lab.in_netns(srv, fw.list)]
        # 10,000 openings, fresh and then refreshed, each burst one transaction.
        burst = [("198.19.%d.%d" % (i // 200, i % 200 + 1), "tcp", 22, 120) for i in range(10000)]
        assert netns_lab.in_netns(srv, fw.open_many, burst) == 10000
        burst = [(a, p, port, 240) for a, p, port, _ in burst]
        assert netns_lab.in_netns(srv, fw.open_many, burst) == 10000
        left = [o[3] for o in netns_lab.in_netns(srv, fw.list) if o[0].startswith("198.19.")]
        assert len(left) == 10000 and min(left) >= 238
        fw.kernel.close()


HOST_RULESET = """flush ruleset
table inet filter {
    chain input {
        type filter hook input priority 0; policy drop;
        ct state established,related accept
        iif lo accept
        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
        tcp dport 9999 accept
    }
}
"""


def host_rules(lab):
    return lab.run("srv", ["nft", "list", "table", "inet", "filter"]).stdout


def test_default_drop_host_opens_and_survives_a_reload(tmp_path):
    need_nft()
    rules_file = tmp_path / "nftables.conf"
    rules_file.write_text(HOST_RULESET)
    with Lab(clients=2, prefix="spa") as lab:
        for addr in (Lab.srv4(1), Lab.srv6(1), Lab.srv4(2)):
            lab.tcp_service("srv", addr, SERVICE_PORT)
        lab.run("srv", ["nft", "-f", str(rules_file)])
        pristine = host_rules(lab)
        server = start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "20"}},
                              protect_action="drop")
        wait_for_line(server, r"table inet filter chain input drops what it does not allow: "
                      r"openings are accepted there too", 2)
        assert 'comment "spa.py"' in host_rules(lab)
        assert tcp_connect_ok(lab.name("cli1"), Lab.srv4(1), SERVICE_PORT, 0.3) is False
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None          # through the drop
        assert timed_knock(lab, "cli1", Lab.srv6(1)) is not None
        assert closed(lab, "cli2", Lab.srv4(2))
        # The host reloads its firewall the Debian way: `flush ruleset` first.
        mark = server.log.mark()
        lab.run("srv", ["nft", "-f", str(rules_file)])
        wait_for_line(server, r"restored table inet spa and 2 opening\(s\) in force", 3, since=mark)
        assert not closed(lab, "cli1", Lab.srv4(1)) and not closed(lab, "cli1", Lab.srv6(1))
        assert closed(lab, "cli2", Lab.srv4(2))
        assert timed_knock(lab, "cli2", Lab.srv4(2)) is not None
        m = re.search(r"^198\.18\.1\.2\s+tcp/8022\s+(\d+) s left", spa_list(lab, server.conf), re.M)
        assert m and 15 <= int(m.group(1)) <= 20           # the remaining time, not a new 20 s
        lab.stop_process(server)
        lab.run("srv", [sys.executable, SPA, "server", "-c", server.conf, "--flush"])
        assert host_rules(lab) == pristine                 # the host's table as it was


def test_chain_that_ends_in_a_reject_is_handled_like_a_drop_policy(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        lab.run("srv", ["nft", "-f", "-"], input="table ip host {\n chain in {\n"
                " type filter hook input priority 10; policy accept;\n"
                " ct state established,related accept\n counter reject\n }\n}\n")
        server = start_server(lab, tmp_path)
        wait_for_line(server, r"table ip host chain in drops what it does not allow", 2)
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None


def test_nft_back_end_leaves_iptables_nft_tables_alone(tmp_path):
    need_nft()
    need_lab("iptables-nft")
    with Lab(clients=1, prefix="spa") as lab:
        lab.run("srv", ["iptables-nft", "-P", "INPUT", "DROP"])
        server = start_server(lab, tmp_path)
        wait_for_line(server, r"table ip filter chain INPUT drops what it does not allow, but "
                      r"iptables-nft manages it .* set firewall = iptables", 2)
        assert lab.run("srv", ["iptables-nft-save"]).returncode == 0
        assert "spa" not in lab.run("srv", ["iptables-nft", "-S"]).stdout


# ---------------------------------------------------------------------------
# iptables
# ---------------------------------------------------------------------------

def test_iptables_nat_rules_read_back_as_named_openings():
    """A NAT opening's two rules (the DNAT and the ACCEPT of what it rewrote) read back, as
    `iptables -S` words, as the NatOpening they were made from, fields by name."""
    fw = spa.IptablesFirewall([("tcp", 22)], nat=True)
    for key in (spa.NatOpening("198.18.0.2", "tcp", 5022, "198.18.1.9", 22, False),
                spa.NatOpening("2001:db8::2", "udp", 53, "2001:db8:1::9", 5353, True)):
        for rule in (fw._dnat_rule(key, 1795846272), fw._nat_accept_rule(key, 1795846272)):
            words = shlex.split(spa._restore_words(rule))
            found, end = spa._parse_nat(words)
            assert (found, end) == (key, 1795846272)
            assert (found.to_address, found.to_port, found.local) == key[3:]
        assert fw._accept_chain(key) == (spa.IPT_CHAIN if key.local else spa.IPT_FORWARD_CHAIN)


def test_iptables_without_ip6tables_or_a_nat_table(monkeypatch):
    """Where ip6tables (or the nat table) does not work, the IPv4 side still does: flush
    skips it, setup says NAT over IPv6 is not available, nothing is open there; a rule
    whose quoting shlex cannot read is not one of ours; a restore that fails is logged."""
    fake = netns_lab.FakeCommands({
        "ip6tables": spa.SpaError("ip6tables failed: can't initialize ip6tables table"),
        ("iptables", "nat", "-S"): spa.SpaError("iptables failed: no nat table"),
        ("iptables", "filter", "-S"): "-P INPUT ACCEPT\n-N SPA_INPUT\n"
                                  "-A SPA_INPUT -m comment --comment \"broken -j ACCEPT\n"})
    monkeypatch.setattr(spa, "run_command", fake)
    log = Lines()
    fw = spa.IptablesFirewall([("tcp", 22)], log=log, nat=True)
    fw.families = (4, 6)
    assert fw._table(4, "filter", ("SPA_INPUT",)) == \
        {"SPA_INPUT": [["-m", "comment", "--comment", '"broken', "-j", "ACCEPT"]]}
    assert fw._openings(6) == [] and fw._nat_rules(6) == []
    assert fw.flush() is True                 # IPv4's chain went; IPv6 was skipped
    fake.outputs["ip6tables"] = ""
    fw.setup()
    assert fw.nat_families == {6} and fw.steer_families == {6}
    assert "no NAT access over IPv4: the nat table does not work here (iptables failed: no nat " \
        "table); refused TCP connections are answered by REJECT, not by the kernel" in log.lines
    fake.outputs["iptables-restore"] = spa.SpaError("iptables-restore failed: the xtables lock")
    fw.deadlines = {("198.18.0.2", "tcp", 22): time.monotonic() + 30}
    assert fw.restore() is False
    assert log.lines[-1].startswith("could not restore the firewall: iptables-restore failed")


def iptables_default_drop(lab, command):
    """A classic default-drop host: policy DROP, established and neighbour discovery accepted."""
    v6 = command.replace("ip", "ip6", 1)
    for cmd in (command, v6):
        lab.run("srv", [cmd, "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                        "-j", "ACCEPT"])
        lab.run("srv", [cmd, "-A", "INPUT", "-i", "lo", "-j", "ACCEPT"])
    for kind in ("neighbour-solicitation", "neighbour-advertisement"):
        lab.run("srv", [v6, "-A", "INPUT", "-p", "ipv6-icmp", "--icmpv6-type", kind, "-j", "ACCEPT"])
    for cmd in (command, v6):
        lab.run("srv", [cmd, "-P", "INPUT", "DROP"])


@pytest.mark.parametrize("command", ["iptables-nft", "iptables-legacy"])
def test_iptables_back_end_end_to_end(tmp_path, command):
    need_lab(command, command + "-save", command + "-restore")
    with Lab(clients=2, prefix="spa") as lab:
        for addr in (Lab.srv4(1), Lab.srv6(1), Lab.srv4(2)):
            lab.tcp_service("srv", addr, SERVICE_PORT)
        iptables_default_drop(lab, command)
        host = lab.run("srv", [command + "-save"]).stdout
        pristine = lab.run("srv", [command, "-S"]).stdout
        server = start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "3"}},
                              firewall=command, protect_action="drop")
        assert closed(lab, "cli1", Lab.srv4(1)) and closed(lab, "cli2", Lab.srv4(2))
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None          # through policy DROP
        assert timed_knock(lab, "cli1", Lab.srv6(1)) is not None
        assert closed(lab, "cli2", Lab.srv4(2))
        conn = netns_lab.ns_socket(lab.name("cli1"))
        conn.settimeout(2)
        conn.connect((Lab.srv4(1), SERVICE_PORT))
        conn.recv(100)
        time.sleep(4.5)      # xt_time counts whole seconds: an opening ends on the next one
        assert closed(lab, "cli1", Lab.srv4(1)), "opening outlived its timeout"
        conn.sendall(b"still here")
        assert conn.recv(100) == b"still here"
        conn.close()
        # A reload of the host's rules wipes our chain; the server puts it back, with the
        # opening in force.
        assert timed_knock(lab, "cli2", Lab.srv4(2), packet(timeout=30)) is not None
        mark = server.log.mark()
        lab.run("srv", [command + "-restore"], input=host)
        wait_for_line(server, r"restored our chains and 1 opening\(s\) in force", 4, since=mark)
        assert not closed(lab, "cli2", Lab.srv4(2)) and closed(lab, "cli1", Lab.srv4(1))
        # SIGKILL: the kernel (xt_time) still closes the opening on time.
        assert timed_knock(lab, "cli1", Lab.srv4(1), packet(timeout=2)) is not None
        os.kill(server.pid, 9)
        server.wait(5)
        time.sleep(3.5)
        assert closed(lab, "cli1", Lab.srv4(1)), "opening outlived the server's death"
        lab.run("srv", [sys.executable, SPA, "server", "-c", server.conf, "--flush"])
        assert lab.run("srv", [command, "-S"]).stdout == pristine


# ---------------------------------------------------------------------------
# Choosing the back end, and the host's saved firewall
# ---------------------------------------------------------------------------

def test_firewall_config_refuses_and_leaves_files_as_they_were(tmp_path, monkeypatch, capsys):
    """firewall-config: nothing to save with firewall = none or saved_firewall = none; a
    ruleset file that nft would not load (nft -c) is not replaced; a file that cannot be
    written is an error in words."""
    hooks = {"alice": {"cmd_cycle_open": "/bin/true", "cmd_cycle_close": "NONE",
                       "cmd_cycle_user": "nobody"}}       # (firewall = none needs hooks)
    for option, message in (({"firewall": "none"}, "firewall = none: there is no firewall"),
                            ({"saved_firewall": "none"}, "saved_firewall = none in")):
        config = server_config(tmp_path, hooks, **option)
        assert spa.main(["firewall-config", "-c", config.path, "--write"]) == 1
        assert message in capsys.readouterr().err
    main = tmp_path / "nftables.conf"
    main.write_text("flush ruleset\n")

    def nft(argv, stdin=None):
        if argv[:2] == ["nft", "-c"]:
            raise spa.SpaError("nft failed: Error: syntax error")
        return ""
    monkeypatch.setattr(spa, "run_command", nft)
    config = server_config(tmp_path, saved_firewall=str(main), nft_include=str(tmp_path / "spa.nft"))
    assert spa.main(["firewall-config", "-c", config.path, "--write"]) == 1
    assert "%s would not load (nft failed: Error: syntax error): left as it was" % main \
        in capsys.readouterr().err
    assert main.read_text() == "flush ruleset\n"
    (tmp_path / "file").write_text("")
    config = server_config(tmp_path, saved_firewall=str(main),
                           nft_include=str(tmp_path / "file" / "spa.nft"))
    assert spa.main(["firewall-config", "-c", config.path, "--write"]) == 1
    assert "cannot write %s: " % (tmp_path / "file" / "spa.nft") \
        in capsys.readouterr().err


def test_firewall_auto_picks_iptables_where_iptables_nft_rules(tmp_path):
    need_lab("iptables-nft")
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        iptables_default_drop(lab, "iptables-nft")
        server = start_server(lab, tmp_path, firewall="auto", protect_action="drop")
        wait_for_line(server, r"firewall = auto: using iptables-nft", 2)
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None
        assert lab.run("srv", ["iptables-nft-save"]).returncode == 0


# ---------------------------------------------------------------------------
# Capture: AF_PACKET sockets with a BPF filter in the kernel
# ---------------------------------------------------------------------------

def run_bpf(program, frame, pkttype=0, proto=0x0800):
    """A tiny interpreter for the instructions bpf_filter() uses."""
    a = x = 0
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x20:
            a = {spa.SKF_AD_PKTTYPE: pkttype, spa.SKF_AD_PROTOCOL: proto}[k]
        elif code == 0x28:
            a = int.from_bytes(frame[k:k + 2], "big")
        elif code == 0x30:
            a = frame[k]
        elif code == 0xB1:
            x = (frame[k] & 15) * 4
        elif code == 0x48:
            a = int.from_bytes(frame[x + k:x + k + 2], "big")
        elif code == 0x06:
            return k
        else:
            cond = {0x15: a == k, 0x25: a > k, 0x35: a >= k, 0x45: bool(a & k)}[code]
            pc += jt if cond else jf


def ipv4_udp(dport, payload, proto=17, frag=0, ihl=5):
    total = ihl * 4 + 8 + len(payload)
    header = bytes([0x40 | ihl, 0]) + total.to_bytes(2, "big") + b"\0\0" + frag.to_bytes(2, "big") \
        + bytes([64, proto]) + b"\0\0" + bytes([198, 18, 0, 2, 198, 18, 0, 1]) + b"\0" * (ihl * 4 - 20)
    return header + (40000).to_bytes(2, "big") + dport.to_bytes(2, "big") + \
        (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload


def udp_frame(source, destination, payload, dport=62201):
    """An IPv4 or IPv6 UDP frame as a cooked AF_PACKET socket delivers it."""
    import socket as socketmod
    udp = (40000).to_bytes(2, "big") + dport.to_bytes(2, "big") + \
        (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
    if ":" in source:
        return (bytes([0x60, 0, 0, 0]) + len(udp).to_bytes(2, "big") + bytes([17, 64]) +
                socketmod.inet_pton(socketmod.AF_INET6, source) +
                socketmod.inet_pton(socketmod.AF_INET6, destination) + udp)
    return (bytes([0x45, 0]) + (20 + len(udp)).to_bytes(2, "big") + b"\0\0\0\0" +
            bytes([64, 17]) + b"\0\0" + socketmod.inet_aton(source) +
            socketmod.inet_aton(destination) + udp)


def test_bpf_program_logic():
    prog = spa.bpf_filter(62201)
    good = knock()
    assert run_bpf(prog, ipv4_udp(62201, good)) == 0xFFFF
    assert run_bpf(prog, ipv4_udp(62201, good, ihl=6)) == 0xFFFF       # IP options
    assert run_bpf(prog, ipv4_udp(62202, good)) == 0
    assert run_bpf(prog, ipv4_udp(62201, good, proto=6)) == 0
    assert run_bpf(prog, ipv4_udp(62201, good, frag=0x2000)) == 0      # more fragments
    assert run_bpf(prog, ipv4_udp(62201, b"A" * 139)) == 0             # too short
    assert run_bpf(prog, ipv4_udp(62201, b"A" * 400)) == 0             # too long
    assert run_bpf(prog, ipv4_udp(62201, good), pkttype=4) == 0        # outgoing
    assert run_bpf(prog, ipv4_udp(62201, good), proto=0x0806) == 0
    v6 = b"\x60" + b"\0" * 5 + bytes([17, 64]) + b"\0" * 32 + (40000).to_bytes(2, "big") + \
        (62201).to_bytes(2, "big") + (8 + len(good)).to_bytes(2, "big") + b"\0\0" + good
    assert run_bpf(prog, v6, proto=0x86DD) == 0xFFFF
    assert run_bpf(prog, v6[:6] + bytes([6]) + v6[7:], proto=0x86DD) == 0


def test_parse_frame():
    good = knock()
    src, payload = spa.parse_frame(ipv4_udp(62201, good, ihl=6) + b"\0" * 10)   # link padding
    assert src == "198.18.0.2" and payload == good
    frame = udp_frame("2001:db8:1::2", "2001:db8:1::1", good)
    assert spa.parse_frame(frame) == ("2001:db8:1::2", good)
    assert spa.frame_destination(frame) == "2001:db8:1::1"
    assert spa.frame_destination(udp_frame("198.18.0.2", "198.18.0.1", good)) == "198.18.0.1"
    for short in (b"", b"E" * 27, frame[:47], b"\x70" + frame[1:]):    # too short; IP version 7
        assert spa.parse_frame(short) == (None, b"")


def test_host_addresses_without_notifications_or_a_dump(monkeypatch):
    """This host's addresses: without rtnetlink's notifications they are read again once a
    second; lost notifications (ENOBUFS) mean a read; a read that fails keeps what was."""
    hosts = spa.HostAddresses()
    assert "127.0.0.1" in hosts and "198.51.100.250" not in hosts

    class Lost(object):
        def recv(self, size):
            raise OSError(105, "No buffer space available")

        def close(self):
            pass
    hosts.news.close()
    hosts.news = Lost()
    assert hosts._changed() is True
    hosts.news = None
    hosts.read_at = time.monotonic()
    assert hosts._changed() is False
    hosts.read_at -= 2
    assert hosts._changed() is True

    def fails():
        raise OSError(1, "Operation not permitted")
    monkeypatch.setattr(hosts, "dump", fails)
    hosts._read()
    assert "127.0.0.1" in hosts.addresses             # kept
    real = spa.socket.socket

    def no_netlink(family, *args):
        if family == spa.socket.AF_NETLINK:
            raise OSError(97, "Address family not supported by protocol")
        return real(family, *args)
    monkeypatch.setattr(spa.socket, "socket", no_netlink)
    assert spa.HostAddresses().news is None


def test_capture_sees_knocks_the_firewall_drops(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        # The host's own firewall drops the knock port, early and at ingress.
        lab.run("srv", ["nft", "-f", "-"], input=(
            "table inet hostile {\n chain in {\n type filter hook input priority -300;\n"
            "udp dport %d drop\n }\n}\n"
            "table netdev edge {\n chain in {\n type filter hook ingress device %s priority 0;\n"
            "udp dport %d drop\n }\n}\n" % (spa.DEFAULT_PORT, lab.srv_if[1], spa.DEFAULT_PORT)))
        start_server(lab, tmp_path, interface=lab.srv_if[1])
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None


def udp_answer(lab, port):
    with netns_lab.ns_socket(lab.name("cli1"), netns_lab.socket.AF_INET,
                             netns_lab.socket.SOCK_DGRAM) as s:
        s.connect((Lab.srv4(1), port))
        s.send(packet())
        s.settimeout(0.5)
        try:
            return "answer %r" % s.recv(100)
        except ConnectionRefusedError:
            return "refused"
        except netns_lab.socket.timeout:
            return "silence"


def test_only_the_configured_interface_and_port_are_watched(tmp_path):
    need_nft()
    with Lab(clients=2, prefix="spa") as lab:
        for k in (1, 2):
            lab.tcp_service("srv", Lab.srv4(k), SERVICE_PORT)
        server = start_server(lab, tmp_path, interface=lab.srv_if[1])
        udp_send(lab.name("cli2"), Lab.srv4(2), spa.DEFAULT_PORT, packet())  # other interface
        udp_send(lab.name("cli1"), Lab.srv4(1), spa.DEFAULT_PORT + 1, packet())  # other port
        udp_send(lab.name("cli1"), Lab.srv4(1), spa.DEFAULT_PORT, b"A" * 204)   # garbage
        wait_for_line(server, r"rejected packet from 198\.18\.1\.2: HMAC does not match", 2)
        assert closed(lab, "cli2", Lab.srv4(2)) and closed(lab, "cli1", Lab.srv4(1))
        assert "accepted" not in server.log.text()
        # The knock port answers exactly like any other unused UDP port (here the kernel's
        # ICMP port unreachable, as this host has no firewall of its own): it does not stand out.
        assert udp_answer(lab, spa.DEFAULT_PORT) == udp_answer(lab, 62299) == "refused"
        # The parent's line: by then the reader has written its own (-v) and waits in poll().
        wait_for_line(server, r"accepted packet from", 2)
        # SIGUSR1 logs the counters: only what the filter passed on this interface was seen.
        os.kill(server.pid, 10)
        m = wait_for_line(server, r"stats: received (\d+), passed on (\d+), rejected (\d+), "
                          r"kernel drops (\d+), cpu [\d.]+ s, rss (\d+) kB", 2)
        assert [int(g) for g in m.groups()[:4]] == [2, 1, 1, 0]   # the garbage, the knock
        assert KEY not in server.log.text() and HMAC_KEY not in server.log.text()


# ---------------------------------------------------------------------------
# Logging: one line per decision, rejections rate-limited, never key material
# ---------------------------------------------------------------------------

def test_rejection_log_is_rate_limited():
    limiter = spa.RateLimiter(rate=5, burst=20)
    t = time.monotonic()
    allowed = sum(limiter.allow(now=t) for _ in range(1000))
    assert allowed == 20
    assert limiter.take_suppressed() == 980
    assert sum(limiter.allow(now=t + 1.0) for _ in range(100)) == 5    # 5 a second after that


def test_rate_limiter_is_a_token_bucket():
    """allow() refuses a flood's packets without arithmetic until its next token is due;
    over random sequences of calls it must answer exactly as a plain token bucket does.
    (Rate 4 and times in 64ths of a second: binary fractions, no rounding.)"""
    from hypothesis import given, settings, strategies as st

    class Bucket(object):
        def __init__(self, now):
            self.tokens, self.stamp = 20.0, now

        def allow(self, now):
            self.tokens = min(20, self.tokens + max(0.0, now - self.stamp) * 4)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.integers(0, 12), max_size=400))
    def run(gaps):
        t = 1000.0
        limiter, bucket = spa.RateLimiter(rate=4, burst=20), Bucket(t)
        limiter.stamp = t
        allowed = 0
        for gap in gaps:
            t += gap / 64.0
            answer = limiter.allow(now=t)
            assert answer == bucket.allow(t)
            allowed += answer
        assert limiter.take_suppressed() == len(gaps) - allowed
    run()


def test_syslog_lines_say_spa_and_never_the_keys(tmp_path, monkeypatch):
    import socket as socketmod
    path = str(tmp_path / "log")
    sink = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_DGRAM)
    sink.bind(path)
    sink.settimeout(2)
    monkeypatch.setattr(spa, "SYSLOG_SOCKET", path)
    log = spa.Log("syslog", False)
    config = server_config(tmp_path)
    replay = spa.ReplayCache(None, 120)
    reader = spa.Reader(config, spa.Gatekeeper(config, spa.DryRunFirewall(config.protect),
                                               replay, log, {"198.18.0.1"}), log, replay.copy())
    reader.handle(b"A" * 204, "198.18.0.2")
    reader.handle(knock(), "198.18.0.2", destination="198.18.0.1")
    lines = [sink.recv(4096).decode(), sink.recv(4096).decode()]
    sink.close()
    assert re.match(r"<30>spa\[\d+\]: rejected packet from 198\.18\.0\.2: HMAC", lines[0])  # daemon.info
    assert re.match(r"<30>spa\[\d+\]: accepted packet from 198\.18\.0\.2 \[client alice\]", lines[1])
    assert not any(secret in "".join(lines) for secret in (KEY, HMAC_KEY))


def test_the_log_never_stops_the_server(tmp_path, monkeypatch, capsys):
    """A format that does not fit its arguments, a closed stderr, a syslog that went away
    (reconnected once, then given up): each is survived, and what can be said is."""
    import io
    import socket as socketmod
    log = spa.Log()
    log.info("two %s %s", "args")                       # one missing: logged as it came
    assert capsys.readouterr().err.endswith(" spa: two %s %s ('args',)\n")
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    log.error("nowhere to say it")                      # no exception
    monkeypatch.undo()
    path = str(tmp_path / "log")
    sink = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_DGRAM)
    sink.bind(path)
    monkeypatch.setattr(spa, "SYSLOG_SOCKET", path)
    log = spa.Log("syslog")
    sink.close()
    os.unlink(path)                                     # syslog restarts, on a new socket
    sink = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_DGRAM)
    sink.bind(path)
    sink.settimeout(2)
    log.warning("after the restart")
    assert sink.recv(4096) == b"<28>spa[%d]: after the restart\0" % os.getpid()
    sink.close()
    os.unlink(path)
    log.info("and while it is away")                    # reconnecting fails: no exception
    with pytest.raises(spa.SpaError) as e:
        spa.Log("syslog")
    assert str(e.value).startswith("cannot log to syslog (%s): " % path)


# ---------------------------------------------------------------------------
# Server: a privileged gatekeeper and an unprivileged packet reader
# ---------------------------------------------------------------------------

class Lines(object):
    """A log that keeps its lines (as Log would write them, %-formatted)."""

    verbose = False

    def __init__(self):
        self.lines = []

    def _line(self, text, *args):
        self.lines.append(text % args if args else text)

    debug = info = warning = error = _line

    def text(self):
        return "\n".join(self.lines)


def test_reader_run_passes_knocks_on_and_ends_with_its_parent(tmp_path):
    """Reader.run as the packet reader runs it, here in this process over a socket pair
    that stands for a capture socket (its frames kept whole): each knock that authenticates goes to the parent
    as a request line (IPv4 and IPv6), garbage and a replay stay; it returns when the
    parent's end of the pipe closes, and raises CaptureLost when its socket fails."""
    import socket as socketmod
    import threading
    config = server_config(tmp_path)
    log = Lines()
    for ending in ("parent", "capture"):
        capture, feed = socketmod.socketpair(socketmod.AF_UNIX, socketmod.SOCK_SEQPACKET)
        capture.setblocking(False)
        r, w = os.pipe()
        reader = spa.Reader(config, spa.GatePipe(w), log)
        first, second = knock(), knock([("tcp", 22)], allow_ip="198.18.0.9")
        for frame in (udp_frame("198.18.0.2", "198.18.0.1", first), b"garbage",
                      udp_frame("198.18.0.2", "198.18.0.1", first),          # a replay
                      udp_frame("198.18.0.2", "198.18.0.1", b"A" * 204),
                      udp_frame("2001:db8:1::2", "2001:db8:1::1", second)):
            feed.send(frame)
        ended = []

        def run():
            try:
                reader.run([capture], w)
                ended.append("returned")
            except spa.CaptureLost:
                ended.append("capture lost")
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        received = b""
        while received.count(b"\n") < 2:
            received += os.read(r, 4096)
        lines = [spa.parse_request(line) for line in received.splitlines()]
        assert lines == [("198.18.0.2", "198.18.0.1", first, None),
                         ("2001:db8:1::2", "2001:db8:1::1", second, None)]
        assert reader.counts == {"passed": 2, "rejected": 3}     # not IP, a replay, garbage
        (os.close(r) if ending == "parent" else feed.close())     # the parent, or the capture, ends
        thread.join(5)
        assert ended == ["returned" if ending == "parent" else "capture lost"]
        capture.close()
        os.close(w)
        (feed.close() if ending == "parent" else os.close(r))
    assert any("replayed packet" in line for line in log.lines)


def test_the_readers_pipe_never_blocks_it():
    """GatePipe: what the pipe cannot take now waits, and goes at the next flush."""
    r, w = os.pipe()
    try:
        pipe = spa.GatePipe(w)
        wire = knock()
        sent = 0
        while pipe.flush():                          # fill the pipe: one request at a time
            pipe.knock("198.18.0.2", "198.18.0.1", wire)
            sent += 1
        assert pipe.pending and not pipe.flush()
        received = b""
        while received.count(b"\n") < sent:
            received += os.read(r, 1 << 16)
            pipe.flush()
        assert not pipe.pending and pipe.flush()
        assert received.splitlines()[0] == spa.request_line("198.18.0.2", "198.18.0.1", wire)[:-1]
    finally:
        os.close(r)
        os.close(w)


def test_the_readers_log_and_stats_and_crash_report(tmp_path):
    """What the reader says goes to the parent as "LEVEL text" lines (escaped, never
    blocking, lost rather than waited for when the pipe is gone); its stats line reads
    /proc/self/status through a descriptor opened before the sandbox; a crash report is
    a traceback without source lines."""
    r, w = os.pipe()
    log = spa.Log.to_pipe(w, verbose=True)
    log.info("rejected packet from %s: %s", "198.18.0.2", "forged\nline")
    log.debug("a %s", "detail")
    assert os.read(r, 4096) == b"info rejected packet from 198.18.0.2: forged\\nline\n" \
        b"debug a detail\n"
    config = server_config(tmp_path)
    reader = spa.Reader(config, spa.GatePipe(w), log)
    reader.sockets = [socket_pair_end()]
    reader.limiter.suppressed = 3
    reader.log_suppressed()
    assert os.read(r, 4096) == b"info 3 more rejected packets were not logged (rate limit)\n"
    assert spa.rss_kb() > 1000
    reader.status = os.open("/proc/self/status", os.O_RDONLY)
    try:
        line = reader.stats()
    finally:
        os.close(reader.status)
        reader.sockets[0].close()
    assert re.match(r"stats: received 0, passed on 0, rejected 0, kernel drops 0, cpu [\d.]+ s, "
                    r"rss [1-9]\d* kB$", line), line
    assert spa.rss_kb(-1) == 0                      # a descriptor that is not there
    os.close(r)
    log.info("the parent is gone")                  # lost, silently
    os.close(w)
    try:
        {}["missing"]
    except KeyError:
        report = spa.crash_report()
    assert report.startswith("Traceback (most recent call last):\n  File ")
    assert "in test_the_readers_log_and_stats_and_crash_report" in report
    assert report.endswith("KeyError: 'missing'")


def socket_pair_end():
    """A socket that is no capture socket: its statistics cannot be read (skipped)."""
    import socket as socketmod
    one, other = socketmod.socketpair()
    other.close()
    return one


READER_CHILD = r"""
import json, os, signal, socket, sys
sys.path.insert(0, sys.argv[1])
import spa
pipe, log_pipe, case = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
confined = []
spa.confine_reader = lambda writable, readable, log: confined.append([list(writable),
                                                                       list(readable)])
os._exit = sys.exit            # so that this process ends as usual, its coverage saved
spa.preload()                  # as start_reader does: the user it becomes may read no module
config = spa.ServerConfig(sys.argv[2])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
stray = os.open("/dev/null", os.O_RDONLY)          # a descriptor the reader must not keep
log = spa.Log()
def is_open(fd):
    try:
        return bool(os.fstat(fd))
    except OSError:                # the descriptor that listed them, closed since
        return False


if case == "steps":
    reader, poller = spa._confined_reader(config, [sock], None, log, "nobody",
                                          (pipe, log_pipe))
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    os.write(pipe, json.dumps({
        "session": os.getsid(0) == os.getpid(), "uid": os.getuid(), "groups": os.getgroups(),
        "confined": confined,
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd") if is_open(int(fd))),
        "keep": sorted([pipe, log_pipe, sock.fileno(), reader.status, poller.fileno()]),
        "null": [os.path.samestat(os.fstat(fd), os.stat(os.devnull)) for fd in (0, 1, 2)],
        "status": reader.status}).encode())
else:
    def run(self, sockets, parent_fd=None, poller=None):
        if case == "capture lost":
            raise spa.CaptureLost()
        if case == "crash":
            raise ValueError("a bug")
        raise spa.SpaError("cannot go on")
    spa.Reader.run = run
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    spa._reader_main(config, [sock], None, log, None, (pipe, log_pipe), mask)
"""


@pytest.mark.parametrize("case", ["steps", "capture lost", "crash", "error"])
def test_the_reader_child_s_steps_and_how_it_ends(tmp_path, case):
    """The packet reader's side of the fork (_reader_main, _confined_reader), run in a
    process of its own with the sandbox itself left out (test_sandbox.py tests it): a
    session of its own, /dev/null on 0-2, no descriptor but its pipes, capture sockets,
    /proc/self/status and its epoll, the reader's user, then confine_reader with its two
    pipes; a lost capture ends it with CAPTURE_LOST, a bug or an error with 1, each said
    on its log pipe."""
    netns_lab.need(os.geteuid() == 0, "dropping privileges needs root")
    config = server_config(tmp_path)
    pipe_r, pipe_w = os.pipe()
    log_r, log_w = os.pipe()
    try:
        done = subprocess.run([sys.executable, "-c", READER_CHILD, HERE, config.path,
                               str(pipe_w), str(log_w), case], pass_fds=(pipe_w, log_w),
                              timeout=30)
        os.close(pipe_w)
        os.close(log_w)
        pipe_w = log_w = None
        with os.fdopen(pipe_r, "rb") as f, os.fdopen(log_r, "rb") as g:
            pipe_r = log_r = None
            said, logged = f.read(), g.read().decode()
    finally:
        for fd in (pipe_r, pipe_w, log_r, log_w):
            if fd is not None:
                os.close(fd)
    if case == "steps":
        assert done.returncode == 0
        seen = json.loads(said.decode())
        assert seen["session"] and seen["null"] == [True] * 3
        assert seen["uid"] == spa_uid("nobody") and seen["groups"] == []
        assert seen["fds"] == [0, 1, 2] + seen["keep"]
        assert seen["confined"] == [[[int(arg) for arg in done.args[5:7]], [seen["status"]]]]
        return
    code, line = {"capture lost": (spa.CAPTURE_LOST, "info stats: received 0"),
                  "crash": (1, "error packet reader crashed:\nTraceback (most recent call last):"),
                  "error": (1, "error packet reader: cannot go on")}[case]
    assert done.returncode == code, logged
    assert logged.startswith(line), logged


def spa_uid(name):
    import pwd
    return pwd.getpwnam(name).pw_uid


def test_reader_records_authenticated_rejects(tmp_path):
    config = server_config(tmp_path, {"a": {"open_ports": "tcp/22"}})
    replay = spa.ReplayCache(config.replay_cache, config.max_packet_age)
    firewall = spa.DryRunFirewall(config.protect)
    log = spa.Log("stderr", False)
    here = {"198.18.0.1"}
    reader = spa.Reader(config, spa.Gatekeeper(config, firewall, replay, log, here), log,
                        replay.copy())
    bad = knock([("tcp", 80)])
    assert not reader.handle(bad, "198.18.0.2", destination="198.18.0.1").accepted
    good = knock()
    assert reader.handle(good, "198.18.0.2", destination="198.18.0.1").accepted
    assert firewall.opened == [("198.18.0.2", "tcp", 22, 30)]
    replay.close()
    # Both are in the file: neither packet can be used again, even after a restart, and
    # neither gets past the parent, whatever a packet reader passes on.
    restarted = spa.ReplayCache(config.replay_cache, config.max_packet_age)
    gate = spa.Gatekeeper(config, firewall, restarted, log, here)
    reader = spa.Reader(config, gate, log, restarted.copy())
    for wire in (bad, good):
        assert reader.handle(wire, "198.18.0.2", destination="198.18.0.1") == "replayed packet"
        d = gate.knock("198.18.0.2", "198.18.0.1", wire)
        assert not d.accepted and d.reason == "replayed packet"
    assert len(firewall.opened) == 1


def test_gatekeeper_decides_itself_on_what_the_reader_passes_on(tmp_path):
    """The parent believes nothing of a request but that a packet arrived: it checks the
    HMAC again, decrypts, and applies the policy itself; the packet decides what opens."""
    config = server_config(tmp_path, {"a": {"open_ports": "tcp/22", "max_fw_timeout": "60"}})
    replay = spa.ReplayCache(config.replay_cache, config.max_packet_age)
    firewall = spa.DryRunFirewall(config.protect)
    gate = spa.Gatekeeper(config, firewall, replay, spa.Log("stderr", False), {"198.18.0.1"})
    for wire in (knock([("tcp", 23)]), knock(timestamp=int(time.time()) - 500), knock(hmac_key=KEY),
                 knock(key=HMAC_KEY), b"A" * 204):
        assert not gate.knock("198.18.0.2", "198.18.0.1", wire).accepted
    assert firewall.opened == []
    wire = knock(timeout=60)
    assert gate.knock("198.18.0.2", "198.18.0.1", wire).accepted
    assert not gate.knock("198.18.0.2", "198.18.0.1", wire).accepted     # the same packet twice
    assert firewall.opened == [("198.18.0.2", "tcp", 22, 60)]
    assert spa.packet_key(spa.SALT_PREFIX + wire[:-43]) in \
        spa.ReplayCache(config.replay_cache, config.max_packet_age)


@pytest.mark.parametrize("verbose", [True, False])
def test_server_v_logs_each_packet_s_decision_and_fields(tmp_path, capsys, verbose):
    """`server -v` (the Troubleshoot guide, the client's timeout error) says what each
    authenticated packet asked for and what was decided, never a key; rate-limited.  The
    parent decides, so the parent says it."""
    config = server_config(tmp_path, {"alice": {"open_ports": "tcp/22", "fw_access_timeout": "40"}})
    replay = spa.ReplayCache(config.replay_cache, config.max_packet_age)
    log = spa.Log("stderr", verbose)
    gate = spa.Gatekeeper(config, spa.DryRunFirewall(config.protect), replay, log, {"198.18.0.1"})
    reader = spa.Reader(config, gate, log, replay.copy())
    now = time.time()
    for wire in (knock(timeout=25, allow_ip="198.18.0.9"), knock([("tcp", 23)]),
                 knock(hmac_key=base64.b64encode(b"x" * 64).decode())):
        reader.handle(wire, "198.18.0.2", now, destination="198.18.0.1")
    log = capsys.readouterr().err
    accepted = ("packet from 198.18.0.2 [client alice] accepted; user alice, timestamp %d (age "
                "+0 s), type 3 (access with timeout), allow IP 198.18.0.9, access tcp/22, client "
                "timeout 25 s, open for 25 s" % int(now))
    rejected = ("rejected packet from 198.18.0.2 [client alice]: tcp/23 not in open_ports; user "
                "alice, timestamp %d (age +0 s), type 1 (access), allow IP 0.0.0.0 (the source), "
                "access tcp/23\n" % int(now))
    assert (accepted in log, rejected in log) == (verbose, verbose), log
    assert "opened tcp/22 for 198.18.0.9 for 25 s (test mode: firewall unchanged)\n" in log
    assert "rejected packet from 198.18.0.2: HMAC does not match any stanza for this source\n" in log
    if not verbose:
        assert "tcp/23 not in open_ports\n" in log
    for secret in (KEY, HMAC_KEY, "a2tr", "aGho"):        # not even the keys' first bytes
        assert secret not in log
    start = time.monotonic()
    for _ in range(100):          # a key holder's flood: every opening logged, -v's fields bounded
        reader.handle(knock(), "198.18.0.2", destination="198.18.0.1")
    took = time.monotonic() - start
    lines = capsys.readouterr().err.splitlines()
    assert sum("opened tcp/22 for 198.18.0.2" in line for line in lines) == 100
    # a burst of 20 lines, then 5 a second (a slow machine takes a second or two for these)
    assert sum("accepted; user alice" in line for line in lines) <= 20 + 5 * took
    replay.close()


def test_knock_opens_for_the_knocker_alone_ipv4_and_ipv6(tmp_path):
    need_nft()
    with Lab(clients=2, prefix="spa") as lab:
        for addr in (Lab.srv4(1), Lab.srv6(1), Lab.srv4(2), Lab.srv6(2)):
            lab.tcp_service("srv", addr, SERVICE_PORT)
        server = start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "30"}})
        for ns, dest in (("cli1", Lab.srv4(1)), ("cli1", Lab.srv6(1)), ("cli2", Lab.srv4(2))):
            assert closed(lab, ns, dest), "protected port open before any knock"
        # The real client, over IPv4: the port opens within a second.
        client_knock(lab, "cli1", Lab.srv4(1))
        assert wait_tcp_open(lab.name("cli1"), Lab.srv4(1), SERVICE_PORT, 1.0) is not None
        wait_for_line(server, r"accepted packet from 198\.18\.1\.2 \[client alice\] user alice: "
                      r"opened tcp/8022 for 198\.18\.1\.2 for 30 s", 2)
        # ...for that address alone: the other client, and IPv6 from the same host, stay shut.
        assert closed(lab, "cli2", Lab.srv4(2))
        assert closed(lab, "cli1", Lab.srv6(1))
        # IPv6, with the real client too.
        client_knock(lab, "cli1", Lab.srv6(1))
        assert wait_tcp_open(lab.name("cli1"), Lab.srv6(1), SERVICE_PORT, 1.0) is not None
        assert closed(lab, "cli2", Lab.srv6(2))
        listed = spa_list(lab, server.conf)
        # 30 s, less what the checks since each knock took (seconds on a loaded machine)
        assert re.search(r"198\.18\.1\.2\s+tcp/8022\s+(2[4-9]|30) s left", listed), listed
        assert re.search(r"2001:db8:1::2\s+tcp/8022\s+(2[4-9]|30) s left", listed), listed
        # Timed knocks from fresh packets, both families, each from a closed port.
        for _ in range(5):
            lab.run("srv", ["nft", "flush", "set", "inet", "spa", "allow4"])
            assert closed(lab, "cli2", Lab.srv4(2))
            assert timed_knock(lab, "cli2", Lab.srv4(2), packet()) is not None
        assert timed_knock(lab, "cli2", Lab.srv6(2)) is not None


def test_opening_closes_on_time_and_established_connections_survive(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "2"}})
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None
        conn = netns_lab.ns_socket(lab.name("cli1"))
        conn.settimeout(2)
        conn.connect((Lab.srv4(1), SERVICE_PORT))
        assert conn.recv(100) == b"netns-lab\n"
        time.sleep(2.5)
        assert closed(lab, "cli1", Lab.srv4(1)), "opening outlived its timeout"
        conn.sendall(b"still here")
        assert conn.recv(100) == b"still here"      # the established connection survives
        conn.close()


def test_sigkill_leaves_the_port_dark_and_the_opening_closes_on_time(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        server = start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "2"}})
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None
        os.kill(server.pid, 9)
        server.wait(5)
        assert not closed(lab, "cli1", Lab.srv4(1))     # still open: the kernel keeps time
        time.sleep(2.5)
        assert closed(lab, "cli1", Lab.srv4(1)), "opening outlived the server's death"
        ruleset = lab.run("srv", ["nft", "list", "table", "inet", "spa"]).stdout
        assert "reject with tcp reset" in ruleset       # fail closed


def test_missing_interface_is_a_clear_error(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        conf = write_private(tmp_path / "spa.conf", "[server]\nprotect = tcp/22\ninterface = nope0\n"
                             "replay_cache = %s\n[client a]\nkey_base64 = %s\nhmac_key_base64 = %s\n"
                             % (tmp_path / "r", KEY, HMAC_KEY))
        done = lab.run("srv", [sys.executable, SPA, "server", "-c", conf], check=False)
        assert done.returncode == 1
        assert "cannot capture on interface 'nope0'" in done.stderr
        assert "Traceback" not in done.stderr


def test_packets_are_read_without_privileges(tmp_path):
    """The process that parses packets runs as the dedicated user spa, with no capabilities,
    in a session of its own without a terminal, holding only its capture socket, its two
    pipes to the parent, /proc/self/status, its epoll and /dev/null, under rlimits and a
    seccomp filter; if it dies, a new one takes over."""
    need_nft()
    import pwd
    netns_lab.need(_has_user("spa"), "no user spa: sh setup.sh creates it")
    spa_uid = pwd.getpwnam("spa").pw_uid
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        # (unmeasured: coverage would load OpenSSL's libcrypto into the server)
        server = lab.spawn("srv", [sys.executable, SPA, "server", "-c", lab_server_config(tmp_path),
                                   "-v"], env=without_coverage())
        wait_for_line(server, r"listening on", 15)
        wait_for_line(server, r"packets read as user spa", 1)
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None     # the firewall was changed
        readers = [p for p in children(server.pid) if "spa.py" in open("/proc/%d/cmdline" % p).read()]
        assert len(readers) == 1
        assert children(server.pid) == readers      # no nft process: openings go over netlink
        for pid in [server.pid] + readers:
            with open("/proc/%d/maps" % pid) as f:
                maps = f.read()
            # Python's own hashes, not OpenSSL's; of pycryptodome only AES and ECB
            assert "libcrypto" not in maps and "_raw_cbc" not in maps and "_raw_ecb" in maps
        reader = readers[0]
        status = proc_status(reader)
        assert status["Uid"].split() == [str(spa_uid)] * 4
        assert status["CapEff"].strip() == "0" * 16 and status["CapPrm"].strip() == "0" * 16
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp"].strip() == "2"                   # a filter (mode 2) is in force
        with open("/proc/%d/stat" % reader) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        assert int(fields[3]) == reader and int(fields[4]) == 0    # its own session; no terminal
        fds = {int(fd): os.readlink("/proc/%d/fd/%s" % (reader, fd))
               for fd in os.listdir("/proc/%d/fd" % reader)}
        # (in a chroot, the paths read from /proc start with the chroot's own path)
        kinds = sorted("/dev/null" if t.endswith("/dev/null") else
                       "status" if t.endswith("/proc/%d/status" % reader) else
                       t.split(":[")[0] if t.startswith(("pipe:", "socket:")) else t
                       for t in fds.values())
        assert [fds[fd].endswith("/dev/null") for fd in (0, 1, 2)] == [True] * 3
        # The capture socket twice: its own descriptor, and the one its ring's mapping holds
        # (Python's mmap duplicates it): the same socket.
        assert kinds == ["/dev/null"] * 3 + ["anon_inode:[eventpoll]", "pipe", "pipe", "socket",
                                             "socket", "status"]
        sockets = [t for t in fds.values() if t.startswith("socket:")]
        assert len(set(sockets)) == 1, sockets
        with open("/proc/%d/limits" % reader) as f:
            limits = {line[:26].strip(): line[26:].split()[:2] for line in f}
        for limit in ("Max open files", "Max processes", "Max file size", "Max core file size"):
            assert limits[limit] == ["0", "0"], limit
        os.kill(reader, 9)
        wait_for_line(server, r"packet reader stopped \(killed by signal 9\): starting a new one", 2)
        lab.run("srv", ["nft", "flush", "set", "inet", "spa", "allow4"])
        time.sleep(0.3)
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None


def test_server_without_privileges_says_it_needs_root(tmp_path):
    """A normal user got "Permission denied" (of /etc/spa, or of a capture socket); root
    without CAP_NET_ADMIN (a unit's capability set) a failure later.  Both are told what
    the server needs."""
    need_lab("setpriv")
    folder = tmp_path / "etc-spa"
    folder.mkdir(mode=0o700)
    os.chmod(str(tmp_path), 0o755)
    conf = server_config(folder).path
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    runs = [p for p in (sys.executable, "/usr/bin/python3") if subprocess.run(
        as_nobody + [p, "-c", "import sys; sys.exit(0)"], stderr=subprocess.DEVNULL).returncode == 0]
    assert runs, "no python3 that the user nobody can run"
    for argv, lacks in ((as_nobody + [runs[0]], "CAP_NET_RAW"),
                        (["setpriv", "--bounding-set=-net_admin", sys.executable], "CAP_NET_ADMIN")):
        done = subprocess.run(argv + [SPA, "server", "-c", conf], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
        assert done.returncode == 1
        assert done.stderr == ("spa.py server: error: the server needs root (or CAP_NET_RAW and "
                               "CAP_NET_ADMIN; this process lacks %s): run it as root\n" % lacks)


def test_sighup_rereads_the_config_and_keeps_openings(tmp_path):
    need_nft()
    with Lab(clients=2, prefix="spa") as lab:
        for k in (1, 2):
            lab.tcp_service("srv", Lab.srv4(k), SERVICE_PORT)
        server = start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "20"}})
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None
        # A changed stanza: another timeout.  A broken file first: the running config stays.
        with open(server.conf) as f:
            text = f.read()
        with open(server.conf, "w") as f:
            f.write(text + "\n[client broken]\n")
        os.kill(server.pid, 1)
        wait_for_line(server, r"config reload failed, keeping the running config", 3)
        with open(server.conf, "w") as f:
            f.write(text.replace("fw_access_timeout = 20", "fw_access_timeout = 9")
                    .replace("[server]", "[server]\nfirewall = iptables-legacy"))
        mark = server.log.mark()
        os.kill(server.pid, 1)
        wait_for_line(server, r"reloaded .*spa.conf: 1 client stanza", 3, since=mark)
        wait_for_line(server, r"firewall: changed, but takes effect only when the server "
                      r"restarts", 1, since=mark)
        assert not closed(lab, "cli1", Lab.srv4(1))          # the opening in force survived
        assert timed_knock(lab, "cli2", Lab.srv4(2)) is not None
        wait_for_line(server, r"opened tcp/8022 for 198\.18\.2\.2 for 9 s", 2)


def test_interface_deleted_and_recreated_under_the_server(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        server = start_server(lab, tmp_path, interface=lab.srv_if[1])
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None
        srv, cli = lab.name("srv"), lab.name("cli1")
        lab.run("srv", ["ip", "link", "del", lab.srv_if[1]])      # both ends go
        wait_for_line(server, r"lost its capture", 3)
        wait_for_line(server, r"waiting for it to come back", 3)
        assert server.poll() is None
        subprocess.run(["ip", "link", "add", lab.srv_if[1], "netns", srv, "type", "veth", "peer",
                        "name", lab.cli_if[1], "netns", cli], check=True)
        for ns, dev, addr in ((srv, lab.srv_if[1], Lab.srv4(1)), (cli, lab.cli_if[1], Lab.cli4(1))):
            subprocess.run(["ip", "-n", ns, "addr", "add", addr + "/24", "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        wait_for_line(server, r"capturing on %s again" % lab.srv_if[1], 5)
        lab.run("srv", ["nft", "flush", "set", "inet", "spa", "allow4"])
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None


def test_optional_interface_may_be_missing_at_start(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        server = start_server(lab, tmp_path, interface=lab.srv_if[1], optional_interface="ppp7")
        wait_for_line(server, r"cannot capture on interface 'ppp7'.*waiting for it", 2)
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None


def test_ready_is_told_to_systemd_and_the_variable_dropped(tmp_path, monkeypatch):
    """Type=notify: READY=1 goes to $NOTIFY_SOCKET (a path, or an abstract name with '@'),
    which no child of the server then sees; outside systemd nothing happens."""
    import socket as socketmod
    for name in (str(tmp_path / "notify"), "@spa-test-notify-%d" % os.getpid()):
        sink = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_DGRAM)
        sink.bind(name if name.startswith("/") else "\0" + name[1:])
        sink.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        spa.notify_systemd("READY=1")
        assert sink.recv(64) == b"READY=1" and "NOTIFY_SOCKET" not in os.environ
        sink.close()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    spa.notify_systemd("READY=1")                       # no one there: no exception
    spa.notify_systemd("READY=1")                       # no variable: nothing to do
    assert "NOTIFY_SOCKET" not in os.environ


class Named(object):
    """A stanza as CommandRunner sees one: a name and a cmd_exec_user."""

    def __init__(self, user):
        self.name, self.cmd_exec_user = "ops", user


def test_command_runner_refuses_what_it_cannot_run_as_asked():
    """A command is not run when it cannot be parsed, is empty, has no user or a user of
    root's, or when `most` already run; in test mode it is said and not run; one that
    cannot start is logged; each says why (the gatekeeper refuses the packet with it)."""
    log = Lines()
    runner = spa.CommandRunner(log, most=0)
    assert runner.start(Named("nobody"), "echo 'unclosed", "198.18.0.2", "alice") \
        .startswith("command not run: No closing quotation")
    assert runner.start(Named("no-such-user-here"), "true", "198.18.0.2", "alice") \
        .startswith("command not run: ")
    assert runner.start(Named("nobody"), "  ", "198.18.0.2", "alice") == \
        "command not run: it is empty"
    assert runner.start(Named("root"), "true", "198.18.0.2", "alice") == \
        "command not run: cmd_exec_user root is root or in group 0"
    assert runner.start(Named("nobody"), "true", "198.18.0.2", "alice", test=True) is None
    assert log.lines[-1] == "accepted command from 198.18.0.2 [client ops]: 'true' not run " \
        "(test mode)"
    assert runner.start(Named("nobody"), "true", "198.18.0.2", "alice") == \
        "command not run: 0 are running already, the most at once"
    if os.geteuid() == 0:
        runner.most = 1
        assert runner.start(Named("nobody"), "/no/such/program", "198.18.0.2", "alice") == \
            "command failed to start"
        assert "as nobody failed to start" in log.lines[-1] and runner.running == []


def test_check_config(tmp_path):
    conf = write_private(tmp_path / "spa.conf", "[server]\ninterface = lo, nope0\nprotect = tcp/22\n"
                         "saved_firewall = none\nreplay_cache = %s\n"
                         "[client alice]\nkey_base64 = %s\nhmac_key_base64 = %s\n"
                         "source = 198.18.0.0/15\nrequire_username = alice\n"
                         % (tmp_path / "r", KEY, HMAC_KEY))
    done = run_spa("check-config", "-c", conf)
    assert done.returncode == 1
    assert "ok    interface lo" in done.stdout and "FAIL  interface nope0: not there now" in done.stdout
    assert "[client alice]: from 198.18.0.0/15; opens tcp/22 for 30 s" in done.stdout
    assert "verdict: 1 problem(s)" in done.stdout
    with open(conf) as f:
        text = f.read()
    # (whether the host's saved firewall holds the protection: test_reload.py)
    write_private(tmp_path / "spa.conf", text.replace("lo, nope0", "lo"))
    done = run_spa("check-config", "-c", conf)
    assert done.returncode == (0 if os.geteuid() == 0 else 1), done.stdout
    if os.geteuid() == 0:
        assert "note  saved_firewall = none: a firewall reload or a boot leaves tcp/22 open" \
            in done.stdout
    assert KEY not in done.stdout and HMAC_KEY not in done.stdout


def nat_server(lab, tmp_path, **server):
    return start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "4", "enable_nat": "yes",
                                                  "open_ports": "tcp/5022,tcp/55000,tcp/8022",
                                                  "nat_destinations": "%s:2222" % Lab.cli4(2)}},
                        **server)


FIREWALL_KINDS = ["nft", "iptables-nft", "iptables-legacy"]


def need_firewall(kind):
    need_lab(kind, *([] if kind == "nft" else [kind + "-save", kind + "-restore"]))


@pytest.mark.parametrize("kind", FIREWALL_KINDS)
def test_nat_access_to_an_internal_host(tmp_path, kind):
    need_firewall(kind)
    with Lab(clients=2, prefix="spa") as lab:      # cli2 plays the internal host
        netns_lab.ns_sysctl(lab.name("srv"), "net.ipv4.ip_forward", 1)
        inside = lab.tcp_service("cli2", Lab.cli4(2), 2222, banner=b"internal\n")
        server = nat_server(lab, tmp_path, enable_forwarding="yes", firewall=kind)
        assert closed_port(lab, "cli1", Lab.srv4(1), 5022)
        lab.run("cli1", [sys.executable, SPA, "client", "-D", Lab.srv4(1), "-A", "tcp/5022",
                         "-N", "%s:2222" % Lab.cli4(2), "--key-base64", KEY,
                         "--hmac-key-base64", HMAC_KEY])
        wait_for_line(server, r"opened tcp/5022 forwarded to 198\.18\.2\.2:2222 for 198\.18\.1\.2 "
                      r"for 4 s", 2)
        assert wait_tcp_open(lab.name("cli1"), Lab.srv4(1), 5022, 1.0) is not None
        deadline = time.monotonic() + 2
        while not inside.peers and time.monotonic() < deadline:   # its accept thread may lag
            time.sleep(0.01)
        assert inside.peers[-1][0] == Lab.cli4(1)
        assert re.search(r"198\.18\.1\.2\s+tcp/5022 .* forwarded to 198\.18\.2\.2:2222",
                         spa_list(lab, server.conf))
        time.sleep(5.6)        # iptables' time match ends an opening on a whole second
        assert closed_port(lab, "cli1", Lab.srv4(1), 5022)
        # Without the server's consent the same request is refused.
        lab.stop_process(server)
        server = nat_server(lab, tmp_path, firewall=kind)
        lab.run("cli1", [sys.executable, SPA, "client", "-D", Lab.srv4(1), "-A", "tcp/5022",
                         "-N", "%s:2222" % Lab.cli4(2), "--key-base64", KEY,
                         "--hmac-key-base64", HMAC_KEY])
        wait_for_line(server, r"refused: \[server\] enable_forwarding is off", 2)


@pytest.mark.parametrize("kind", FIREWALL_KINDS)
def test_local_nat(tmp_path, kind):
    need_firewall(kind)
    with Lab(clients=2, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT, banner=b"local\n")
        server = nat_server(lab, tmp_path, enable_local_nat="yes", firewall=kind)
        assert closed_port(lab, "cli1", Lab.srv4(1), 55000)
        lab.run("cli1", [sys.executable, SPA, "client", "-D", Lab.srv4(1), "-A", "tcp/%d" % SERVICE_PORT,
                         "--nat-local", "--nat-port", "55000", "--key-base64", KEY,
                         "--hmac-key-base64", HMAC_KEY])
        wait_for_line(server, r"opened tcp/55000 forwarded to 198\.18\.1\.1:8022", 2)
        assert wait_tcp_open(lab.name("cli1"), Lab.srv4(1), 55000, 1.0) is not None
        assert closed_port(lab, "cli2", Lab.srv4(2), 55000)
        # Only the path asked for: the protected port itself stays shut to the knocker.
        assert closed_port(lab, "cli1", Lab.srv4(1), SERVICE_PORT)


def test_nat_access_through_a_default_drop_forward_chain(tmp_path):
    need_nft()
    with Lab(clients=2, prefix="spa") as lab:
        netns_lab.ns_sysctl(lab.name("srv"), "net.ipv4.ip_forward", 1)
        lab.tcp_service("cli2", Lab.cli4(2), 2222, banner=b"internal\n")
        lab.run("srv", ["nft", "-f", "-"], input="table inet filter {\n chain forward {\n"
                " type filter hook forward priority 0; policy drop;\n"
                " ct state established,related accept\n }\n}\n")
        server = nat_server(lab, tmp_path, enable_forwarding="yes")
        wait_for_line(server, r"table inet filter chain forward drops what it does not allow: "
                      r"openings are accepted there too \(forwarded NAT connections\)", 2)
        lab.run("cli1", [sys.executable, SPA, "client", "-D", Lab.srv4(1), "-A", "tcp/5022",
                         "-N", "%s:2222" % Lab.cli4(2), "--key-base64", KEY,
                         "--hmac-key-base64", HMAC_KEY])
        assert wait_tcp_open(lab.name("cli1"), Lab.srv4(1), 5022, 1.0) is not None


def test_command_messages_run_without_a_shell_as_the_stanza_user(tmp_path):
    """fwknop's type 0: off by default; when a stanza allows it, the command runs split into
    arguments (no shell) as cmd_exec_user, and its exit status is logged."""
    need_nft()
    with pytest.raises(spa.SpaError, match="cmd_exec_user must not be root"):
        server_config(tmp_path, {"a": {"enable_cmd_exec": "yes", "cmd_exec_user": "root"}})
    with Lab(clients=1, prefix="spa") as lab:
        server = start_server(lab, tmp_path, {"alice": {"enable_cmd_exec": "yes",
                                                        "cmd_exec_user": "nobody"}})
        for command in ("/usr/bin/test -w /root", "/bin/true", "/bin/echo $HOME; /bin/false"):
            lab.run("cli1", [sys.executable, SPA, "client", "-D", Lab.srv4(1), "-C", command,
                             "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY])
            wait_for_line(server, r"command %s \(pid \d+\) exited with status" % re.escape(repr(command)), 5)
        text = server.log.text()
        assert "'/usr/bin/test -w /root' (pid" in text and "as nobody" in text
        assert re.search(r"'/usr/bin/test -w /root' \(pid \d+\) exited with status 1", text)  # not root
        assert re.search(r"'/bin/true' \(pid \d+\) exited with status 0", text)
        # No shell: "$HOME; /bin/false" are just arguments to echo, which succeeds.
        assert re.search(r"'/bin/echo \$HOME; /bin/false' \(pid \d+\) exited with status 0", text)
    with Lab(clients=1, prefix="spa") as lab:
        server = start_server(lab, tmp_path)          # the default: refused
        lab.run("cli1", [sys.executable, SPA, "client", "-D", Lab.srv4(1), "-C", "/bin/true",
                         "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY])
        wait_for_line(server, r"message type 0 \(command\) refused: enable_cmd_exec is off", 2)


# ---------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------

def test_client_command_line_keys(tmp_path):
    config = server_config(tmp_path, {"a": {"open_ports": "tcp/22,tcp/443"}})
    done = run_spa("client", "-D", "198.18.0.1", "-A", "tcp/22,tcp/443", "--key-base64", KEY,
                   "--hmac-key-base64", HMAC_KEY, "-U", "carol", "-f", "90", "-a", "198.18.0.7",
                   "--test", "-v")
    assert done.returncode == 0, done.stderr
    assert "username        carol" in done.stderr
    d = decide(config, done.stdout.strip().encode())
    assert d.accepted and d.allow_ip == "198.18.0.7" and d.timeout == 90
    assert d.message.username == "carol"


@pytest.mark.parametrize("args,message", [
    (["-A", "tcp/22"], "no destination"),
    (["-D", "h"], "no ports to open"),
    (["-D", "h", "-A", "tcp/0"], "expected tcp/PORT"),
    (["-D", "h", "-A", "tcp/22", "-a", "2001:db8::1"], "IPv4"),
    (["-D", "h", "-A", "tcp/22", "-a", "198.18.0.1", "-s"], "give only one of"),
    (["-D", "h", "-A", "tcp/22", "-R"], "--resolve-url"),
    (["-D", "h", "-A", "tcp/22", "-U", "a:b"], "user"),
    (["-D", "h", "-A", ",".join("tcp/%d" % p for p in range(10000, 10030))], "at most 399"),
])
def test_client_errors(args, message):
    done = run_spa("client", "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY, "--test", *args)
    assert done.returncode == 1, done.stdout
    assert message in done.stderr and "Traceback" not in done.stderr


def test_client_without_keys():
    done = run_spa("client", "-D", "h", "-A", "tcp/22", "--test")
    assert done.returncode == 1 and "key_base64 is missing" in done.stderr


def test_client_config_section_missing(tmp_path):
    path = write_private(tmp_path / "c.conf", "[web1]\ndestination = h\n")
    done = run_spa("client", "-c", path, "-n", "web2", "--test")
    assert done.returncode == 1 and "no section [web2]" in done.stderr and "web1" in done.stderr


def test_client_finds_its_section_by_destination(tmp_path):
    """ssh's %n is the host name as typed: `-n %n` with `Host web1.example.org` must find
    [web1], whose destination that is (in spa.py's file and in fwknop's rc file)."""
    config = server_config(tmp_path)
    section = "destination = Web1.Example.org\naccess = tcp/22\nkey_base64 = %s\n" \
        "hmac_key_base64 = %s\n" % (KEY, HMAC_KEY)
    ini = write_private(tmp_path / "spa-client.conf", "[web1]\n" + section +
                        "[db]\ndestination = db.example.org\n")
    rc = write_private(tmp_path / "fwknoprc", "[web1]\nSPA_SERVER web1.example.org\nACCESS tcp/22\n"
                       "KEY_BASE64 %s\nHMAC_KEY_BASE64 %s\n" % (KEY, HMAC_KEY))
    for path in (ini, rc):
        done = run_spa("client", "-c", path, "-n", "web1.example.org", "--test", "-v")
        assert done.returncode == 0, done.stderr
        assert decide(config, done.stdout.strip().encode()).accepted
    twice = write_private(tmp_path / "twice.conf", "[web1]\n" + section + "[web1b]\n" + section)
    done = run_spa("client", "-c", twice, "-n", "web1.example.org", "--test")
    assert done.returncode == 1 and "[web1], [web1b] all have destination" in done.stderr
    done = run_spa("client", "-c", ini, "-n", "web9.example.org", "--test")
    assert done.returncode == 1
    assert "no section [web9.example.org], nor one whose destination is" in done.stderr
    assert KEY not in done.stderr and HMAC_KEY not in done.stderr


def test_client_reads_the_rc_file_fwknop_writes(tmp_path):
    """`fwknop --key-gen --save-rc-stanza` writes ~/.fwknoprc; spa.py's client uses it as it is."""
    need_lab("fwknop")
    env = dict(os.environ, HOME=str(tmp_path))
    subprocess.run(["fwknop", "--key-gen", "--save-rc-stanza", "-n", "web1", "-D", "198.18.0.1",
                    "-A", "tcp/22", "--use-hmac"], env=env, check=True, stdout=subprocess.PIPE)
    rc = str(tmp_path / ".fwknoprc")
    with open(rc) as f:
        text = f.read()
    keys = dict(re.findall(r"^(KEY_BASE64|HMAC_KEY_BASE64)\s+(\S+)", text, re.M))
    config = server_config(tmp_path, {"web1": {"key_base64": keys["KEY_BASE64"],
                                               "hmac_key_base64": keys["HMAC_KEY_BASE64"]}})
    for args in (["-c", rc, "-n", "web1"], ["-n", "web1"]):       # ~/.fwknoprc is the default
        done = run_spa("client", "--test", *args, env=env)
        assert done.returncode == 0, done.stderr
        d = decide(config, done.stdout.strip().encode())
        assert d.accepted, d.reason
        assert d.message.access == [("tcp", 22)]


@pytest.mark.parametrize("line,message", [
    ("RAND_PORT Y", "RAND_PORT is not supported"),
    ("GPG_EXE /usr/bin/gpg", "GPG_EXE is not supported"),
    ("SPA_SERVER_PROTO tcp", "has no tcp or udpraw"),
])
def test_client_names_what_it_cannot_honour_in_fwknoprc(tmp_path, line, message):
    rc = write_private(tmp_path / "rc", "[default]\nKEY_BASE64 %s\nHMAC_KEY_BASE64 %s\n"
                       "[web1]\nSPA_SERVER 198.18.0.1\nACCESS tcp/22\n%s\n" % (KEY, HMAC_KEY, line))
    done = run_spa("client", "-c", rc, "-n", "web1", "--test")
    assert done.returncode == 1 and message in done.stderr


def test_fwknoprc_lines_read_as_fwknop_reads_them():
    """Lines before the first section are ignored (as by fwknop); a variable without a
    value, or one fwknop does not know, is a problem of its section; ALLOW_IP resolve is
    -R; INI sections choose their allow IP the same ways."""
    sections = spa.read_fwknoprc("rc", "KEY_BASE64 ignored\n[web1]\nSPA_SERVER\nMADE_UP yes\n"
                                       "ALLOW_IP resolve\n")
    assert set(sections) == {"web1"}
    assert sections["web1"].problems == ["rc [web1] line 3: SPA_SERVER has no value",
                                         "rc [web1] line 4: MADE_UP is not a variable fwknop knows"]
    assert sections["web1"].options["allow"] == "ALLOW_IP resolve in rc [web1]"
    assert spa._allow_choice({"allow_ip": "Source"}) == ("source",)
    assert spa._allow_choice({"allow_ip": "resolve"}) == ("resolve", "allow_ip = resolve")
    assert spa._allow_choice({"allow_ip": "198.18.0.9"}) == ("ip", "198.18.0.9")
    assert spa._allow_choice({}) is None


def test_nat_options_that_do_not_go_together():
    """--nat-port needs --nat-local, -N and --nat-local exclude each other, NAT takes one
    port; nat_local from a config file is a yes/no; -N without a port forwards the -A
    port."""
    access = [("tcp", 22)]
    for opts, message in (({"nat_port": "2222"}, "--nat-port goes with --nat-local"),
                          ({"nat_access": "10.0.0.7", "nat_local": "yes"},
                           "give -N/--nat-access or --nat-local, not both"),
                          ({"nat_access": "10.0.0.7"}, "NAT access takes one port in -A, not 2")):
        with pytest.raises(spa.SpaError, match=re.escape(message)):
            spa.nat_request(opts, access * (2 if "one port" in message else 1), 0)
    assert spa.nat_request({"nat_local": "no"}, access, 0) == (spa.MSG_ACCESS, None, access)
    assert spa.nat_request({"nat_access": "10.0.0.7"}, access, 30) == \
        (spa.MSG_TIMEOUT_NAT, "10.0.0.7,22", access)


def test_fwknoprc_allow_ip_source_and_passphrase_keys(tmp_path):
    rc = write_private(tmp_path / "rc", "[web1]\nSPA_SERVER 198.18.0.1\nACCESS tcp/22\n"
                       "ALLOW_IP source\nKEY fwknoptest\nHMAC_KEY hmacsecret\nFW_TIMEOUT 45\n"
                       "SPOOF_USER carol\n")
    config = server_config(tmp_path, {"p": {"key_base64": None, "hmac_key_base64": None,
                                            "key": "fwknoptest", "hmac_key": "hmacsecret"}})
    done = run_spa("client", "-c", rc, "-n", "web1", "--test")
    assert done.returncode == 0, done.stderr
    d = decide(config, done.stdout.strip().encode())
    assert d.accepted, d.reason
    assert d.message.allow_ip == "0.0.0.0" and d.timeout == 45 and d.message.username == "carol"


@pytest.mark.parametrize("name", ["nat_access", "nat_access_client_timeout", "local_nat",
                                  "local_nat_client_timeout"])
def test_client_builds_nat_requests_as_fwknop_does(tmp_path, name):
    vec = vector(name)
    argv = vec["argv"]
    wanted = {"-A", "-N", "-f", "--nat-port", "-a"}
    args = ["-D", argv[argv.index("-D") + 1]]
    for i, word in enumerate(argv):
        if word in wanted:
            args += [word, argv[i + 1]]
        elif word == "--nat-local":
            args.append(word)
    done = run_spa("client", "--key-base64", vec["key_b64"], "--hmac-key-base64",
                   vec["hmac_key_b64"], "--test", "-v", *args)
    assert done.returncode == 0, done.stderr
    dump = vec["client_dump"]
    assert re.search(r"message type\s+%s" % re.escape(dump["Message Type"].split()[0]), done.stderr)
    assert re.search(r"nat access\s+%s$" % re.escape(dump["Nat Access"]), done.stderr, re.M)
    assert re.search(r"access\s+%s$" % re.escape(dump["Message String"].split(",", 1)[1]),
                     done.stderr, re.M)


def test_connect_relays_to_the_opened_port(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT, banner=b"hello from behind\n")
        lab.tcp_service("srv", Lab.srv6(1), SERVICE_PORT, banner=b"hello from behind\n")
        start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "5"}})
        assert closed(lab, "cli1", Lab.srv4(1))
        for target in ("%s:%d" % (Lab.srv4(1), SERVICE_PORT), "[%s]:%d" % (Lab.srv6(1), SERVICE_PORT)):
            done = lab.run("cli1", [sys.executable, SPA, "client", "-A", "tcp/%d" % SERVICE_PORT,
                                    "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY,
                                    "--connect", target], input="ping through spa\n", timeout=20)
            assert done.stdout == "hello from behind\nping through spa\n"


def test_connect_gives_up_with_advice(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        start_server(lab, tmp_path)
        wrong = base64.b64encode(b"w" * 64).decode()
        start = time.monotonic()
        done = lab.run("cli1", [sys.executable, SPA, "client", "-A", "tcp/%d" % SERVICE_PORT,
                                "--key-base64", KEY, "--hmac-key-base64", wrong, "--connect",
                                "%s:%d" % (Lab.srv4(1), SERVICE_PORT), "--connect-wait", "2"],
                       check=False, input="", timeout=20)
        assert done.returncode == 1
        assert "did not open within 2 s" in done.stderr and "spa.py server -v" in done.stderr
        assert time.monotonic() - start < 6
        # The right keys, but a connection to a port the knock did not ask for: said so.
        done = lab.run("cli1", [sys.executable, SPA, "client", "-A", "tcp/%d" % SERVICE_PORT,
                                "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY, "--connect",
                                "%s:%d" % (Lab.srv4(1), SERVICE_PORT + 1), "--connect-wait", "1"],
                       check=False, input="", timeout=20)
        assert done.returncode == 1
        assert "tcp/%d was not among the ports the knock asked for (tcp/%d)" % (
            SERVICE_PORT + 1, SERVICE_PORT) in done.stderr, done.stderr


def test_resolve_ip_from_a_url(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        www = tmp_path / "www"
        www.mkdir()
        (www / "ip").write_text("your address: 198.18.77.7\n")
        # -u: a Python child block-buffers its piped stdout, and the line would never come.
        web = lab.spawn("srv", [sys.executable, "-u", "-m", "http.server", "8080", "--bind",
                                Lab.srv4(1), "--directory", str(www)])
        wait_for_line(web, r"Serving HTTP", 10)
        done = lab.run("cli1", [sys.executable, SPA, "client", "-D", Lab.srv4(1), "-A", "tcp/22",
                                "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY, "-R",
                                "--resolve-url", "http://%s:8080/ip" % Lab.srv4(1), "--test", "-v"])
        assert re.search(r"allow ip\s+198\.18\.77\.7", done.stderr)
        assert "not https" in done.stderr


def test_ssh_through_proxycommand(tmp_path):
    """A real OpenSSH server behind the firewall: plain ssh cannot connect; with the
    ProxyCommand line from README.md, ssh and scp just work."""
    need_nft()
    need_lab("sshd", "ssh", "ssh-keygen", "scp")
    os.makedirs("/run/sshd", exist_ok=True)            # sshd's privilege separation directory
    sshd_port = 2222
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)],
                       check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "user.pub").read_text())
    sshd_config = write_private(tmp_path / "sshd_config", "\n".join([
        "Port %d" % sshd_port, "ListenAddress %s" % Lab.srv4(1), "HostKey %s" % (tmp_path / "host"),
        "AuthorizedKeysFile %s" % (tmp_path / "authorized_keys"), "PidFile %s" % (tmp_path / "sshd.pid"),
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "StrictModes no", "Subsystem sftp internal-sftp", ""]))
    client_conf = write_private(tmp_path / "spa-client.conf", "[web1]\ndestination = %s\naccess = tcp/%d\n"
                                "key_base64 = %s\nhmac_key_base64 = %s\n"
                                % (Lab.srv4(1), sshd_port, KEY, HMAC_KEY))
    ssh_config = write_private(tmp_path / "ssh_config", "\n".join([
        "Host web1", "  HostName %s" % Lab.srv4(1), "  Port %d" % sshd_port, "  User root",
        "  IdentityFile %s" % (tmp_path / "user"), "  StrictHostKeyChecking no",
        "  UserKnownHostsFile /dev/null", "  BatchMode yes", "  ConnectTimeout 3", "  LogLevel ERROR",
        "  ProxyCommand %s %s client -c %s -n %%n --connect %%h:%%p" % (sys.executable, SPA, client_conf),
        "Host plain", "  HostName %s" % Lab.srv4(1), "  Port %d" % sshd_port, "  User root",
        "  IdentityFile %s" % (tmp_path / "user"), "  StrictHostKeyChecking no",
        "  UserKnownHostsFile /dev/null", "  BatchMode yes", "  ConnectTimeout 3", ""]))
    with Lab(clients=1, prefix="spa") as lab:
        start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "10"}}, protect="tcp/%d" % sshd_port)
        sshd = lab.spawn("srv", ["/usr/sbin/sshd", "-D", "-e", "-f", sshd_config])
        deadline = time.monotonic() + 10
        while not os.path.exists(str(tmp_path / "sshd.pid")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sshd.poll() is None, sshd.log.text()
        ssh = ["ssh", "-F", ssh_config]
        plain = lab.run("cli1", ssh + ["plain", "echo", "unexpected"], check=False, timeout=20)
        assert plain.returncode == 255 and "refused" in plain.stderr
        done = lab.run("cli1", ssh + ["web1", "echo", "hello from $(hostname -s) as $(id -un)"],
                       timeout=30)
        assert done.stdout.startswith("hello from ") and done.stdout.strip().endswith("as root")
        (tmp_path / "payload").write_bytes(os.urandom(100000))
        lab.run("cli1", ["scp", "-q", "-F", ssh_config, str(tmp_path / "payload"),
                         "web1:%s" % (tmp_path / "copied")], timeout=30)
        assert (tmp_path / "copied").read_bytes() == (tmp_path / "payload").read_bytes()


# ---------------------------------------------------------------------------
# keygen
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("digest,hmac_len", [("sha256", 64), ("sha384", 128), ("sha512", 128)])
def test_keygen_output(digest, hmac_len):
    done = run_spa("keygen", "--hmac-digest", digest)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    m1 = re.match(r"^KEY_BASE64: (\S+)$", lines[0])
    m2 = re.match(r"^HMAC_KEY_BASE64: (\S+)$", lines[1])
    assert m1 and m2
    assert len(base64.b64decode(m1.group(1))) == 32 and m1.group(1).endswith("=")
    assert len(base64.b64decode(m2.group(1))) == hmac_len
    assert "hmac_digest_type = %s" % digest in done.stdout
    assert run_spa("keygen").stdout.splitlines()[0] != lines[0]     # fresh each time


def test_keygen_sections_work_as_configs(tmp_path):
    out = str(tmp_path / "keys")
    done = run_spa("keygen", "-o", out, "-n", "web1", "-D", "198.18.0.1", "-A", "tcp/22")
    assert done.returncode == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    again = run_spa("keygen", "-o", out)
    assert again.returncode == 1 and "already exists" in again.stderr
    with open(out) as f:
        text = f.read()
    server_text = "[server]\nprotect = tcp/22\nreplay_cache = %s\n" % (tmp_path / "r") + \
        text[text.index("[client web1]"):text.index("# On the client")]
    config = spa.ServerConfig(write_private(tmp_path / "spa.conf", server_text))
    client_text = text[text.index("[web1]"):]
    cpath = write_private(tmp_path / "client.conf", client_text)
    done = run_spa("client", "-c", cpath, "-n", "web1", "--test")
    assert done.returncode == 0, done.stderr
    d = decide(config, done.stdout.strip().encode())
    assert d.accepted, d.reason


def test_keygen_without_a_destination_says_how_to_give_one(tmp_path):
    """`keygen -n bob` printed `destination = HOST`, which then failed as `cannot resolve
    HOST`; now the section has no destination, and the client asks for one."""
    done = run_spa("keygen", "-n", "bob")
    assert done.returncode == 0
    assert not re.search(r"^destination", done.stdout, re.M) and "HOST" not in done.stdout
    client = write_private(tmp_path / "bob.conf", done.stdout[done.stdout.index("[bob]"):])
    knock = run_spa("client", "-c", client, "-n", "bob", "--test")
    assert knock.returncode == 1 and "no destination: give -D HOST" in knock.stderr
    knock = run_spa("client", "-c", client, "-n", "bob", "-D", "198.18.0.1", "--test")
    assert knock.returncode == 0, knock.stderr


def test_keygen_adds_or_replaces_the_stanza_in_the_server_config(tmp_path):
    conf = tmp_path / "spa.conf"
    first = run_spa("keygen", "-n", "web1", "--server-config", str(conf))
    assert first.returncode == 0, first.stderr
    with open(str(conf), "a") as f:
        f.write("\n# the database\n[client db]\nkey_base64 = %s\nhmac_key_base64 = %s\n"
                % (KEY, HMAC_KEY))
    again = run_spa("keygen", "-n", "web1", "-A", "tcp/22", "--server-config", str(conf))
    assert again.returncode == 0 and "replaced [client web1] in" in again.stderr
    bob = run_spa("keygen", "-n", "bob", "--server-config", str(conf))
    assert bob.returncode == 0 and "added [client bob] to" in bob.stderr
    with open(str(conf)) as f:
        text = f.read()
    assert text.count("[client web1]") == 1 and "# the database\n[client db]" in text
    config = spa.ServerConfig(str(conf))
    assert [st.name for st in config.stanzas] == ["web1", "db", "bob"]
    for out in (first, again, bob):         # each printed client section holds its keys
        key = re.search(r"^key_base64 = (\S+)", out.stdout, re.M).group(1)
        assert (key in text) == (out is not first)
    # A group-readable config, or an -o file that exists: refused, and nothing changed.
    os.chmod(str(conf), 0o640)
    assert "chmod 600" in run_spa("keygen", "-n", "eve", "--server-config", str(conf)).stderr
    os.chmod(str(conf), 0o600)
    (tmp_path / "exists").write_text("")
    done = run_spa("keygen", "-n", "eve", "--server-config", str(conf), "-o",
                   str(tmp_path / "exists"))
    assert done.returncode == 1 and "already exists" in done.stderr
    # A config that would not load with the new stanza (a typo elsewhere): left as it was.
    with open(str(conf)) as f:
        before = f.read()
    with open(str(conf), "w") as f:
        f.write(before.replace("[client db]", "[client db]\nbogus = 1"))
    done = run_spa("keygen", "-n", "mallory", "--server-config", str(conf), "-o",
                   str(tmp_path / "mallory.conf"))
    assert done.returncode == 1 and "not changed" in done.stderr and "unknown option bogus" in done.stderr
    assert "mallory" not in open(str(conf)).read() and not (tmp_path / "mallory.conf").exists()
    assert sorted(os.listdir(str(tmp_path))) == ["exists", "spa.conf"]   # no temporary file left
    done = run_spa("keygen", "-n", "x]\nsource", "--server-config", str(conf))
    assert done.returncode == 1 and "a section name of letters" in done.stderr


def test_keygen_refuses_bad_ports_and_unwritable_output(tmp_path):
    done = run_spa("keygen", "-A", "tcp/99999")
    assert done.returncode == 1 and "access 'tcp/99999': expected tcp/PORT" in done.stderr
    done = run_spa("keygen", "-o", str(tmp_path / "none" / "keys"))
    assert done.returncode == 1 and "cannot create %s: No such file" % (tmp_path / "none" / "keys") \
        in done.stderr


def test_the_example_config_is_what_keygen_writes(tmp_path):
    """spa.conf.example is the text keygen --server-config starts a missing config from, word
    for word; it has no stanza with placeholders to trip over; the result passes check-config
    but for the host's saved firewall, which `firewall-config --write` (the Quick start's
    next line, run for real in test_readme.py) sets right: not done here, on this host."""
    with open(os.path.join(HERE, "spa.conf.example")) as f:
        text = f.read()
    assert text == spa.SERVER_CONFIG_TEMPLATE
    parser = spa.read_ini(write_private(tmp_path / "example.conf", text))
    assert parser.sections() == ["server"]
    conf = tmp_path / "etc" / "spa" / "spa.conf"
    done = run_spa("keygen", "-n", "web1", "-D", "web1.example.org", "-A", "tcp/22,tcp/443",
                   "--server-config", str(conf))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(str(conf)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(str(conf.parent)).st_mode) == 0o700
    with open(str(conf)) as f:
        made = f.read()
    assert made.startswith(text.replace("protect = tcp/22\n", "protect = tcp/22,tcp/443\n"))
    made = made.replace("/var/lib/spa/replay.cache", str(tmp_path / "replay.cache"))
    write_private(str(conf), made)
    checked = run_spa("check-config", "-c", str(conf))
    failed = [line for line in checked.stdout.splitlines() if line.strip().startswith("FAIL")]
    if os.geteuid() == 0:
        assert all("saved firewall" in line for line in failed), checked.stdout
        assert checked.returncode == (1 if failed else 0), checked.stdout
    else:
        assert checked.returncode == 1, checked.stdout
    assert "[client web1]: from any address; opens tcp/22,tcp/443" in checked.stdout
    # the client's section, printed, works with the server's stanza
    client = write_private(tmp_path / "client.conf", done.stdout)
    knocked = run_spa("client", "-c", client, "-n", "web1", "--test")
    assert knocked.returncode == 0, knocked.stderr
    assert decide(spa.ServerConfig(str(conf)), knocked.stdout.strip().encode()).accepted


# ---------------------------------------------------------------------------
# selftest: the whole thing, for real, in two throwaway network namespaces
# ---------------------------------------------------------------------------

def selftest_namespaces(pid):
    """The namespaces the selftest of process `pid` made (others may run a selftest too)."""
    return [n for n in os.listdir("/var/run/netns")
            if n.startswith("spa-selftest-%d-" % (pid % 100000))]


def test_selftest_passes_and_cleans_up():
    need_nft()
    proc = subprocess.Popen([sys.executable, SPA, "selftest"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "verdict: PASS" in out
    for step in ("before a knock the port is refused", "knock sent, port open after",
                 "port closed again after the 2 s timeout", "refused as a replay"):
        assert out.count(step) == 2, step             # IPv4 and IPv6
    assert selftest_namespaces(proc.pid) == []


def test_selftest_cleans_up_after_ctrl_c():
    need_nft()
    import signal
    # SIGINT as at a terminal, even where the suite was started with it ignored (a shell's
    # background job): Python then leaves it ignored, and Ctrl-C would change nothing.
    proc = subprocess.Popen([sys.executable, SPA, "selftest"], stdout=subprocess.PIPE,
                            universal_newlines=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline() + proc.stdout.readline()
    assert "server running" in line
    proc.send_signal(2)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode != 0 and "verdict: FAIL" in out and "cleaned up" in out
    assert selftest_namespaces(proc.pid) == []


def test_selftest_names_what_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(spa.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(spa, "find_tool", lambda name: None if name == "nft" else "/usr/bin/" + name)
    assert spa.main(["selftest"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  missing: root" in out and "FAIL  missing: nft (Debian: apt install nftables)" in out
    assert "verdict: FAIL" in out
    monkeypatch.setattr(spa, "find_tool", lambda name: None)

    def no_aes():
        raise spa.SpaError("pycryptodome is missing: install it")
    monkeypatch.setattr(spa, "aes_ecb", no_aes)
    monkeypatch.delattr(spa.socket, "AF_PACKET")
    missing = spa.selftest_missing()
    assert "the ip command (Debian: apt install iproute2)" in missing
    assert "pycryptodome is missing: install it" in missing
    assert "AF_PACKET sockets (Linux only)" in missing


# ---------------------------------------------------------------------------
# install: a launcher, so that Python reuses the compiled code
# ---------------------------------------------------------------------------

def test_install_names_the_python_it_will_not_use(tmp_path):
    """--python must be an executable file, root's, with a name a #! line can hold; one
    that cannot load pycryptodome is used only with a warning."""
    assert spa._interpreter_problem(str(tmp_path / "none")) == \
        "%s is not an executable file" % (tmp_path / "none")
    spaced = tmp_path / "my python"
    spaced.mkdir()
    os.symlink(sys.executable, str(spaced / "python3"))
    assert spa._interpreter_problem(str(spaced / "python3")).endswith("cannot go in a #! line")
    with pytest.raises(spa.SpaError, match="no Python to run spa.py with"):
        spa.choose_python(str(tmp_path / "none"))
    plain = tmp_path / "plain"
    plain.mkdir()
    script = plain / "python3"
    script.write_text("#!/bin/sh\nexit 1\n")          # runs, but loads nothing
    os.chmod(str(script), 0o755)
    python, why = spa.choose_python(str(script))
    assert python == str(script) and "WARNING: %s cannot load pycryptodome" % script in why


def test_install_writes_a_launcher_that_reuses_compiled_code(tmp_path):
    prefix = tmp_path / "prefix"
    done = run_spa("install", "--prefix", str(prefix))
    assert done.returncode == 0, done.stderr
    launcher = prefix / "bin" / "spa"
    assert os.access(str(launcher), os.X_OK)
    assert list((prefix / "lib" / "spa" / "__pycache__").glob("spa.*.pyc"))
    config = server_config(tmp_path)
    for name in ("spa", "spa.py"):      # README.md's `spa.py ...` lines run the installed copy
        out = subprocess.run([str(prefix / "bin" / name), "client", "-D", "198.18.0.1", "-A",
                              "tcp/22", "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY,
                              "--test"], stdout=subprocess.PIPE, universal_newlines=True,
                             check=True).stdout
        assert decide(config, out.strip().encode()).accepted
    assert os.readlink(str(prefix / "bin" / "spa.py")) == "spa"
    assert run_spa("install", "--prefix", str(prefix)).returncode == 0     # again, over itself
    assert run_spa("install", "--prefix", "/proc/nope").returncode == 1


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def test_ctrl_c_ends_with_status_130(monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(spa, "keygen_main", interrupted)
    assert spa.main(["keygen"]) == 130


def test_help_shows_examples():
    for args in ([], ["keygen"], ["client"], ["server"], ["check-config"], ["selftest"],
                 ["install"]):
        done = run_spa(*(args + ["--help"]))
        assert done.returncode == 0
        assert "example" in done.stdout


def test_parser_built_for_one_subcommand_is_the_whole_parser_for_it():
    """build_parser(argv) adds only the named subcommand's options (a faster client
    start): its help and its parse must be exactly those of the full parser."""
    for cmd in ("keygen", "client", "server", "check-config", "install", "selftest"):
        full = spa.build_parser()._subparsers._group_actions[0].choices[cmd]
        one = spa.build_parser([cmd])._subparsers._group_actions[0].choices[cmd]
        assert one.format_help() == full.format_help()
    argv = ["client", "-D", "198.18.0.1", "-A", "tcp/22", "-U", "bob", "-v"]
    assert spa.build_parser(argv).parse_args(argv) == spa.build_parser().parse_args(argv)
    # the top-level help still names every subcommand
    top = spa.build_parser(["client"]).format_help()
    for cmd in ("keygen", "client", "server", "check-config", "install", "selftest"):
        assert cmd in top


def test_spa_py_runs_as_a_command():
    """The file is executable, with a shebang, so that `spa.py ...` works once it is on PATH
    (the ProxyCommand line of README.md); git keeps the mode (100755)."""
    assert stat.S_IMODE(os.stat(SPA).st_mode) & 0o111 == 0o111
    with open(SPA) as f:
        assert f.readline() == "#!/usr/bin/env python3\n"
    done = subprocess.run([SPA, "--version"], stdout=subprocess.PIPE, universal_newlines=True)
    assert done.returncode == 0 and done.stdout.startswith("spa.py ")


# ---------------------------------------------------------------------------
# Speed and memory: AES, the hashes and HMAC, PackedMap
# ---------------------------------------------------------------------------

def _pycryptodome_reference(key, iv, data, mode, decrypt):
    """The same work by pycryptodome's own mode implementations (its public interface)."""
    aes = spa.aes_module()
    cipher = {"cbc": lambda: aes.new(key, aes.MODE_CBC, iv),
              "ctr": lambda: aes.new(key, aes.MODE_CTR, nonce=b"", initial_value=iv),
              "cfb": lambda: aes.new(key, aes.MODE_CFB, iv, segment_size=128),
              "ofb": lambda: aes.new(key, aes.MODE_OFB, iv)}[mode]()
    return cipher.decrypt(data) if decrypt else cipher.encrypt(data)


def _library_ecb():
    return spa._library_ecb(os.path.dirname(os.path.abspath(spa.pycryptodome().__file__)))


@pytest.mark.parametrize("path", ["library", "module"])
def test_aes_modes_are_pycryptodome_s(monkeypatch, path):
    """aes_crypt() chains the blocks itself, over pycryptodome's AES called straight in its
    shared library (or, as a fallback, through its public ECB mode): every mode, both ways,
    must give what pycryptodome's own CBC/CTR/CFB/OFB give."""
    ecb = _library_ecb() if path == "library" else spa._module_ecb(spa.aes_module())
    monkeypatch.setattr(spa, "_ECB", ecb)
    rng = random.Random(5)
    for i in range(300):
        key, iv = rng.getrandbits(256).to_bytes(32, "big"), rng.getrandbits(128).to_bytes(16, "big")
        if i == 0:
            iv = b"\xff" * 16                       # CTR's counter wraps at 2**128
        data = os.urandom(16 * rng.randint(0, 24))
        for mode in spa.ENCRYPTION_MODES:
            for decrypt in (False, True):
                assert spa.aes_crypt(key, iv, data, mode, decrypt) == \
                    _pycryptodome_reference(key, iv, data, mode, decrypt), (mode, decrypt, i)
    with pytest.raises(ValueError):
        spa.aes_crypt(b"k" * 32, b"i" * 16, b"x" * 17, "cbc")
    with pytest.raises(ValueError):
        spa.aes_crypt(b"k" * 32, b"i" * 16, b"x" * 16, "ecb")


def test_aes_is_called_in_pycryptodome_s_library(monkeypatch):
    """Here (pycryptodome from Debian or PyPI) the shared library is found and used; the
    public interface takes over if it is missing or gives a wrong answer."""
    monkeypatch.setattr(spa, "_ECB", None)
    assert spa.aes_ecb().__qualname__.startswith("_library_ecb.")
    key, block, answer = spa._KNOWN_ANSWER
    assert spa.aes_ecb()(key, block) == answer and spa.aes_ecb()(key, answer, True) == block

    def missing(package_dir):
        raise OSError("_raw_aes not found")
    for broken in (missing, lambda package_dir: lambda key, data, decrypt=False: data):
        monkeypatch.setattr(spa, "_ECB", None)
        monkeypatch.setattr(spa, "_library_ecb", broken)
        assert spa.aes_ecb().__qualname__.startswith("_module_ecb.")
        assert spa.aes_ecb()(key, block) == answer


def test_the_aes_block_function_refuses_what_is_not_aes(monkeypatch):
    """Whole blocks only, and a key AES has; a hash Python does not have itself comes from
    hashlib; a pycryptodome without its AES module is an error in words."""
    for ecb in (_library_ecb(), spa._module_ecb(spa.aes_module())):
        with pytest.raises(ValueError):
            ecb(b"k" * 32, b"x" * 15)
        with pytest.raises(ValueError):
            ecb(b"k" * 15, b"x" * 16)
    monkeypatch.setattr(spa, "_BUILTIN_HASHES", {"sha256": (("_no_such_module", "sha256"),)})
    monkeypatch.setattr(spa, "_HASHES", {})
    assert spa.hash_constructor("sha256") is hashlib.sha256
    monkeypatch.setattr(spa, "_AES", None)
    import importlib
    real = importlib.import_module

    def no_aes(name, *args):
        if name.endswith(".Cipher.AES"):
            raise ImportError("No module named %r" % name)
        return real(name, *args)
    monkeypatch.setattr(importlib, "import_module", no_aes)
    with pytest.raises(spa.SpaError, match="pycryptodome is broken: No module named"):
        spa.aes_module()


def test_hashes_and_hmac_are_those_of_hashlib_and_hmac():
    """spa.py's hashes are Python's own implementations (no OpenSSL) and its HMAC is
    built on them: each must give what hashlib and hmac give, for every type, keys
    shorter and longer than the hash's block and messages of every length."""
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(sorted(spa.HMAC_TYPES)), st.binary(max_size=300),
           st.binary(max_size=300), st.binary(max_size=20))
    def run(hmac_type, key, message, prefix):
        name = spa.HMAC_TYPES[hmac_type][0]
        assert spa.hash_digest(name, message) == hashlib.new(name, message).digest()
        assert spa.Hmac(key, name).digest(message) == hmac.new(key, message, name).digest()
        assert spa.Hmac(key, name, prefix).digest(message) == \
            hmac.new(key, prefix + message, name).digest()
    run()
    for name in spa.HMAC_TYPES:      # Python's own, where this Python has them all
        assert spa.hash_constructor(name).__module__ != "_hashlib", name
    assert spa.compare_digest(b"abc", b"abc") and not spa.compare_digest(b"abc", b"abd")


def test_packed_map_behaves_like_a_dict():
    """PackedMap (the replay cache's and nft's tables of ends) against a dict, over random
    sequences of puts, adds, pops and purges; keys it cannot encode are absent."""
    from hypothesis import given, settings, strategies as st
    keys = st.tuples(st.sampled_from(["198.18.0.1", "198.18.0.2", "2001:db8::1", "2001:db8::2"]),
                     st.sampled_from(["tcp", "udp"]), st.sampled_from([22, 443, 65535]))
    ops = st.lists(st.one_of(
        st.tuples(st.just("put"), keys, st.integers(0, 100)),
        st.tuples(st.just("add"), keys, st.integers(0, 100)),
        st.tuples(st.just("pop"), keys, st.just(0)),
        st.tuples(st.just("keep"), st.just(None), st.integers(0, 100))), max_size=80)

    def encode(key):
        address, proto, port = key
        if proto not in ("tcp", "udp"):
            raise ValueError(key)
        try:
            raw = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        except OSError:
            raise ValueError(key)
        return raw.ljust(16, b"\0") + struct.pack("!?H", proto == "tcp", port)

    def decode(raw):
        address = raw[:16] if raw[4:16].strip(b"\0") else raw[:4]
        return (socket.inet_ntop(socket.AF_INET6 if len(address) == 16 else socket.AF_INET,
                                 address), "tcp" if raw[16] else "udp",
                struct.unpack("!H", raw[17:])[0])

    @settings(max_examples=300, deadline=None)
    @given(ops)
    def run(sequence):
        packed, model = spa.PackedMap(19, encode, decode, "d"), {}
        for op, key, n in sequence:
            if op == "put":
                packed[key] = float(n)
                model[key] = float(n)
            elif op == "add":           # only if absent: True then, False (unchanged) if not
                assert packed.add(key, float(n)) == (key not in model)
                model.setdefault(key, float(n))
            elif op == "pop":
                assert packed.pop(key, -1.0) == model.pop(key, -1.0)
            else:
                packed.keep_if(lambda v: v >= n)
                model = {k: v for k, v in model.items() if v >= n}
            assert len(packed) == len(model) and dict(packed.items()) == model
            assert all(packed.get(k) == v and k in packed for k, v in model.items())
        assert ("198.18.0.1", "sctp", 22) not in packed and packed.get(("nonsense", "tcp", 1)) is None
    run()
    # Growth: 10,000 entries, then most of them gone again.
    packed = spa.PackedMap(16, spa._replay_digest, spa._replay_key)
    digests = [spa.b64encode(hashlib.sha256(b"%d" % i).digest()).decode() for i in range(10000)]
    for i, d in enumerate(digests):
        packed[d] = i
    assert len(packed) == 10000 and all(packed.get(d) == i for i, d in enumerate(digests))
    packed.keep_if(lambda i: i >= 9000)
    assert len(packed) == 1000 and digests[8999] not in packed and digests[9000] in packed
    assert len(packed.table) < 100 * 1024          # rebuilt small again
    assert "!" * 43 not in packed and not spa.ReplayCache.valid("!" * 43)


def test_the_nft_book_of_openings_behaves_like_a_dict():
    """OpeningEnds (nft's ends, a PackedMap a family, 4 bytes of an IPv4 address) against a
    dict, with and without bind_interface; keys that are no opening are absent, and
    refused when set."""
    from hypothesis import given, settings, strategies as st
    addresses = st.sampled_from(["198.18.0.1", "198.18.0.2", "2001:db8::1", "::ffff:198.18.0.1"])
    ops = st.lists(st.one_of(
        st.tuples(st.just("put"), addresses, st.sampled_from(["tcp", "udp"]),
                  st.sampled_from([0, 22, 65535]), st.sampled_from(["eth0", "br-lan"]),
                  st.integers(0, 100)),
        st.tuples(st.just("pop"), addresses, st.just("tcp"), st.just(22), st.just("eth0"),
                  st.just(0)),
        st.tuples(st.just("keep"), addresses, st.just("tcp"), st.just(22), st.just("eth0"),
                  st.integers(0, 100))), max_size=60)

    for bind in (False, True):
        @settings(max_examples=150, deadline=None)
        @given(ops)
        def run(sequence):
            ends, model = spa.OpeningEnds(bind), {}
            for op, address, proto, port, interface, n in sequence:
                key = (address, proto, port) + ((interface,) if bind else ())
                if op == "put":
                    ends[key] = model[key] = float(n)
                elif op == "pop":
                    assert ends.pop(key, -1.0) == model.pop(key, -1.0)
                else:
                    ends.keep_if(lambda v: v >= n)
                    model = {k: v for k, v in model.items() if v >= n}
                assert len(ends) == len(model) and dict(ends.items()) == model
                assert all(ends.get(k) == v and k in ends for k, v in model.items())
        run()
        ends = spa.OpeningEnds(bind)
        tail = ("eth0",) if bind else ()
        for nonsense in [("198.18.0.1", "sctp", 22) + tail, ("nonsense", "tcp", 1) + tail,
                         ("198.18.0.1", "tcp", 70000) + tail, ("198.18.0.1", "tcp", 22, "eth0", 1),
                         ("198.18.0.1",), (), 5, None]:
            assert ends.get(nonsense) is None and nonsense not in ends
            assert ends.pop(nonsense, "absent") == "absent"
            with pytest.raises(ValueError):
                ends[nonsense] = 1.0
        if bind:
            with pytest.raises(ValueError):
                ends[("198.18.0.1", "tcp", 22, "no such name, far too long")] = 1.0
    # An IPv4 opening's slot: 4 bytes of address, protocol, port, its end, the slot's state.
    assert spa.OpeningEnds().maps[4].slot == 4 + 3 + 8 + 1
    assert spa.OpeningEnds(True).maps[6].slot == 16 + 3 + 16 + 8 + 1


def _pythons_with_pycryptodome():
    found = []
    for python in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(python) and python not in found and subprocess.run(
                [python, "-c", "import sys; sys.path.insert(0, %r); import spa; spa.aes_module()"
                 % HERE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
            found.append(python)
    return found


# What the client has no use for: pycryptodome's Cipher package (its eleven modes, and
# through ctypes.util subprocess and tempfile), which aes_ecb() goes around; OpenSSL's
# hashes (hashlib, hmac: Python's own are used); `platform`,
# which pycryptodome's ctypes loader uses to run `file`; the idna codec; what only the
# server or --help use.
_NOT_IN_THE_CLIENT = ("Cryptodome.Cipher", "Crypto.Cipher", "ctypes.util", "platform",
                      "_hashlib", "hashlib", "hmac", "encodings.idna", "logging", "json",
                      "configparser")


@pytest.mark.parametrize("python", _pythons_with_pycryptodome())
def test_client_start_up_skips_what_it_does_not_need(python):
    """The client imports none of _NOT_IN_THE_CLIENT, and still builds its packet."""
    code = ("import sys; sys.path.insert(0, %r); import spa\n"
            "spa.main(['client', '-D', '198.18.0.1', '-A', 'tcp/22', '-U', 'bob', '--test',\n"
            "          '--key-base64', %r, '--hmac-key-base64', %r])\n"
            "print(sorted(m for m in %r if m in sys.modules))\n"
            % (HERE, base64.b64encode(b"k" * 32).decode(), base64.b64encode(b"h" * 64).decode(),
               _NOT_IN_THE_CLIENT))
    done = subprocess.run([python, "-c", code], stdout=subprocess.PIPE, env=without_coverage(),
                          stderr=subprocess.PIPE, universal_newlines=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines[0]) > 100                    # the packet --test prints
    loaded = lines[-1]
    assert loaded == "[]", loaded


@pytest.mark.parametrize("python", _pythons_with_pycryptodome())
def test_fallback_to_pycryptodome_s_interface_skips_its_file_probe(python):
    """Without its shared library, AES goes through pycryptodome's AES module; its ctypes
    loader must not run `file` (platform.architecture) then either."""
    code = ("import sys; sys.path.insert(0, %r); import spa\n"
            "def missing(package_dir):\n"
            "    raise OSError('not there')\n"
            "spa._library_ecb = missing\n"
            "print(spa.aes_ecb().__qualname__, 'platform' in sys.modules)\n" % HERE)
    done = subprocess.run([python, "-c", code], stdout=subprocess.PIPE, env=without_coverage(),
                          stderr=subprocess.PIPE, universal_newlines=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["_module_ecb.<locals>.ecb", "False"]


# ---------------------------------------------------------------------------
# The whole tool: against the real fwknop, its test data, setup.sh, Python 3.6
# ---------------------------------------------------------------------------

def test_fwknop_client_opens_a_port_on_spa_server(tmp_path):
    need_nft()
    need_lab("fwknop")
    key, hmac_key = netns_lab.fwknop_keygen()
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        server = start_server(lab, tmp_path, {"fw": {"key_base64": key, "hmac_key_base64": hmac_key,
                                                     "fw_access_timeout": "5"}})
        assert closed(lab, "cli1", Lab.srv4(1))
        argv = netns_lab.fwknop_client_argv(Lab.srv4(1), "tcp/%d" % SERVICE_PORT, key, hmac_key,
                                            "-U", "fwuser")
        lab.run("cli1", argv)
        assert wait_tcp_open(lab.name("cli1"), Lab.srv4(1), SERVICE_PORT, 1.0) is not None
        wait_for_line(server, r"accepted packet from 198\.18\.1\.2 \[client fw\] user fwuser", 2)
        # fwknop's client timeout (-f, message type 3) is honoured as well.
        lab.run("cli1", netns_lab.fwknop_client_argv(Lab.srv4(1), "tcp/%d" % SERVICE_PORT, key,
                                                     hmac_key, "-f", "9"))
        wait_for_line(server, r"for 9 s", 2)


def test_spa_client_opens_a_port_on_fwknopd(tmp_path):
    need_lab("fwknopd", "iptables")
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        lab.run("srv", ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(SERVICE_PORT),
                        "-j", "DROP"])
        assert closed(lab, "cli1", Lab.srv4(1))
        fwknopd = netns_lab.FwknopdServer(
            lab, "srv", lab.srv_if[1],
            {"SOURCE": "ANY", "KEY_BASE64": KEY, "HMAC_KEY_BASE64": HMAC_KEY,
             "HMAC_DIGEST_TYPE": "sha256", "FW_ACCESS_TIMEOUT": 10}, tmp_path)
        with fwknopd:
            client_knock(lab, "cli1", Lab.srv4(1))
            assert wait_tcp_open(lab.name("cli1"), Lab.srv4(1), SERVICE_PORT, 3.0) is not None
            fwknopd.log.wait(fwknopd.RULE_ADDED, 2)
            assert any("198.18.1.2" in rule for rule in fwknopd.rules())


def test_make_vectors_makes_what_the_tests_read(tmp_path):
    """testdata/make_vectors.py, run again with this machine's fwknop client, makes the same
    cases (new packets, new keys), and spa.py decides each new packet as it does the
    committed one."""
    netns_lab.need(shutil.which("fwknop") is not None, "fwknop is not installed")
    done = subprocess.run([sys.executable, os.path.join(TESTDATA, "make_vectors.py"), "--out",
                           str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with open(str(tmp_path / "vectors.json")) as f:
        fresh = json.load(f)
    assert re.match(r"fwknop client \d+\.\d+\.\d+, FKO protocol", fresh["fwknop_version"])
    committed = {v["name"]: v for v in VECTORS}
    assert [v["name"] for v in fresh["vectors"]] == [v["name"] for v in VECTORS]
    for vec in fresh["vectors"]:
        old = committed[vec["name"]]
        assert (vec["rc"], vec["wire_len"], vec["mode"], vec["hmac_type"]) == \
            (old["rc"], old["wire_len"], old["mode"], old["hmac_type"]), vec["name"]
        if not vec["wire"]:
            continue
        d = decide(vector_stanza(tmp_path, vec), vec["wire"].encode(), now=vector_time(vec))
        expected = DEFAULT_OUTCOME[vec["name"]]
        assert d.accepted if expected is None else expected in d.reason, (vec["name"], d.reason)


def test_nothing_reads_outside_the_repository():
    """A user's clone has only itself: no file of it may name the folder beside it that
    held the vectors once (they are in testdata/ now)."""
    needles = ["..".join(["", "/shared"]), '"%s", "vectors"' % "shared"]
    for folder, dirs, files in os.walk(HERE):
        dirs[:] = [d for d in dirs if d == ".ci" or not d.startswith(".") and d != "__pycache__"
                   and not os.path.exists(os.path.join(folder, d, "pyvenv.cfg"))]
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                text = f.read().decode("utf-8", "replace")
            for needle in needles:
                assert needle not in text, "%s names %s" % (os.path.join(folder, name), needle)


STUB_PYTHON = """#!/bin/sh
# python3 for test_setup_sh_names_the_step_that_failed: no vermin, and pip cannot get it.
case "$*" in
    *"import vermin"*) exit 1 ;;
    "-m pip install"*) echo "ERROR: No matching distribution found for vermin" >&2; exit 1 ;;
    *selftest*) echo "selftest ran"; exit 0 ;;
    *) exit 0 ;;
esac
"""


def test_setup_sh_names_the_step_that_failed(tmp_path):
    """setup.sh hid a failed vermin install (2>/dev/null || true), and the Python 3.6 test
    then skipped without a word.  Now a failed step says so with pip's own words, the
    other steps still run, and setup.sh exits 1 with the list of what failed."""
    netns_lab.need(os.geteuid() == 0, "setup.sh runs as root")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("apt-get", "#!/bin/sh\nexit 0\n"), ("python3", STUB_PYTHON)):
        (stubs / name).write_text(text)
        os.chmod(str(stubs / name), 0o755)
    def setup(**env):
        env.update(PATH="%s:/usr/bin:/bin" % stubs, HOME=str(tmp_path))
        return subprocess.run(["sh", os.path.join(HERE, "setup.sh")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=60, env=env)
    done = setup(CI="true")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "setup.sh: FAILED: pip could not install vermin, which test_runs_on_python36 " \
        "needs" in done.stderr
    assert "pip: ERROR: No matching distribution found for vermin" in done.stderr
    assert "selftest ran" in done.stdout                      # the steps after it still ran
    assert done.stderr.rstrip().endswith("these steps failed:\n  - pip could not install "
                                         "vermin, which test_runs_on_python36 needs")
    # Outside CI, vermin is optional (a weaker check stands in): said, not a failure.
    done = setup()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pip: ERROR: No matching distribution found for vermin" in done.stderr
    assert "setup.sh: note: pip could not install vermin" in done.stderr
    assert "FAILED" not in done.stderr and "selftest ran" in done.stdout


# Library calls and modules spa.py must not use, as they came after Python 3.6: what the
# fallback check looks for where vermin is missing (vermin knows them all).
NEWER_KEYWORDS_THAN_36 = {"capture_output", "text"}           # subprocess's, 3.7
NEWER_THAN_36 = {"dataclasses", "contextvars", "removeprefix",
                 "removesuffix", "isqrt", "cached_property", "zoneinfo", "graphlib", "tomllib",
                 "fromisoformat", "breakpoint", "get_running_loop", "to_thread", "pidfd_open",
                 "waitstatus_to_exitcode", "shlex.join", "math.prod", "math.dist", "math.comb"}


def python36_fallback_problems(source):
    """What Python's own parser, told to accept only Python 3.6's grammar, and a list of
    later library names, find in `source`: a weaker check than vermin's."""
    import ast
    try:
        tree = ast.parse(source, feature_version=(3, 6))
    except SyntaxError as e:
        return ["line %d: syntax newer than Python 3.6: %s" % (e.lineno, e.msg)]
    problems = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.keyword) and node.arg in NEWER_KEYWORDS_THAN_36:
            problems.append("line %d: %s= is newer than Python 3.6" % (node.value.lineno, node.arg))
        elif isinstance(node, ast.Attribute):
            names.append(node.attr)
            if isinstance(node.value, ast.Name):
                names.append("%s.%s" % (node.value.id, node.attr))
        elif isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [(getattr(node, "module", None) or alias.name).split(".")[0]
                      for alias in node.names]
        problems += ["line %d: %s is newer than Python 3.6" % (node.lineno, name)
                     for name in names if name in NEWER_THAN_36]
    return problems


def test_python36_fallback_finds_newer_constructs():
    """The fallback must be able to fail: it finds each kind of newer construct."""
    for code in ("if (n := 3): pass", "def f(a, /): pass", "subprocess.run([], text=True)",
                 "import dataclasses", "'x'.removeprefix('y')", "math.prod([])"):
        assert python36_fallback_problems(code), code
    assert python36_fallback_problems("import os\nos.getpid()\n") == []


def test_runs_on_python36():
    """spa.py must run on Python 3.6 (RHEL 8, OpenWrt): vermin checks every construct.
    Where vermin is missing (setup.sh could not reach PyPI, and said so) Python's own
    parser checks the grammar and a list of later names instead; in CI vermin must be there."""
    try:
        import vermin  # noqa: F401
    except ImportError:
        netns_lab.need(False, "vermin is not installed (sh setup.sh installs it with pip)") \
            if os.environ.get("CI", "").lower() == "true" else None
        with open(SPA) as f:
            problems = python36_fallback_problems(f.read())
        print("\nvermin is missing: spa.py checked against Python 3.6 with Python's own parser "
              "and a list of later names only (pip install vermin for the full check)")
        assert problems == []
        return
    done = subprocess.run([sys.executable, "-c",
                           "import sys; from vermin.main import main; sys.argv[0] = 'vermin'; "
                           "sys.exit(main())", "-q", "-t=3.6-", "--violations", "--no-tips",
                           "--eval-annotations", SPA],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout


def pythons36():
    """Every Python 3.6 on this machine: python3.6 on PATH, or pyenv's (root's or the user's)."""
    import glob
    found = [shutil.which("python3.6")] + sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.6*/bin/python3")) +
        glob.glob("/root/.pyenv/versions/3.6*/bin/python3"))
    found = sorted({os.path.realpath(p) for p in found if p})
    # pyenv's shims are on PATH even where they lead nowhere: keep what really is 3.6.
    return [p for p in found if subprocess.run(
        [p, "-c", "import sys; sys.exit(sys.version_info[:2] != (3, 6))"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0]


def _real_python36_end_to_end(tmp_path, py36):
    """vermin says spa.py needs nothing newer than 3.6; here a real 3.6 runs it: keygen,
    client, server, knock."""
    need_nft()
    has_aes = subprocess.run([py36, "-c", "import sys; sys.path.insert(0, %r); import spa; "
                              "spa.aes_module()" % HERE], stderr=subprocess.PIPE,
                             universal_newlines=True)
    assert has_aes.returncode == 0, \
        "%s has no pycryptodome (sh setup.sh installs it): %s" % (py36, has_aes.stderr[-300:])
    out = subprocess.run([py36, SPA, "keygen"], stdout=subprocess.PIPE, check=True,
                         universal_newlines=True).stdout
    assert out.startswith("KEY_BASE64: ")
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        server = start_server(lab, tmp_path, python=py36)
        wait_for_line(server, r"packets read as user spa", 1)
        lab.run("cli1", [py36, SPA, "client", "-D", Lab.srv4(1), "-A", "tcp/%d" % SERVICE_PORT,
                         "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY])
        assert wait_tcp_open(lab.name("cli1"), Lab.srv4(1), SERVICE_PORT, 1.0) is not None
        wait_for_line(server, r"accepted packet from 198\.18\.1\.2", 1)


# Collected once for each Python 3.6 the machine has, and not at all where it has none
# (conftest.py then says so at the end of the run): nothing is skipped that could run.
PYTHONS36 = pythons36()
if PYTHONS36:
    test_real_python36_end_to_end = pytest.mark.parametrize("py36", PYTHONS36)(
        _real_python36_end_to_end)


def banners(path):
    """The section titles of a file, in order: each between two lines of dashes."""
    with open(path) as f:
        lines = f.read().splitlines()
    rule = "# " + "-" * 75
    return [lines[i + 1][2:] for i in range(len(lines) - 2)
            if lines[i] == rule and lines[i + 2] == rule]


def test_spa_py_reads_as_the_reference_of_fwknop_s_format():
    """spa.py opens with the protocol, under fwknop's names, within its first 800 lines
    (the diagram, seal and unseal, the decision); its functions stay short (60 lines at
    most); and this file's sections are spa.py's, in spa.py's order."""
    import ast
    with open(SPA) as f:
        text = f.read()
    head = "\n".join(text.splitlines()[:800])
    for name in ("def seal(", "def unseal(", "class Message(", "def parse_plaintext(",
                 "def derive_key_iv(", "def screen(", "def judge(", "def decide("):
        assert name in head, name
    for word in ("EVP_BytesToKey", "U2FsdGVkX1", "B64_RIJNDAEL_SALT", "FKO_ACCESS_MSG",
                 "rand_value", "nat_access", "server_auth", "client_timeout", "SPA digest"):
        assert word in head, word
    assert banners(SPA)[0] == "The SPA packet: fwknop's wire format"
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert long == [], "functions over 60 lines: %s" % long
    mine = [title for title in banners(os.path.join(HERE, "test_spa.py"))
            if not title.startswith(("Helpers:", "The whole tool:"))]
    assert mine == banners(SPA)


def test_zz_report_knock_times():
    """Prints the knock-to-open times the integration tests saw (run with -s to read them)."""
    if not KNOCKS:
        pytest.skip("no timed knocks ran")
    ms = sorted(1000 * t for t in KNOCKS)
    print("\nknock-to-open over %d knocks: median %.1f ms, max %.1f ms"
          % (len(ms), ms[len(ms) // 2], ms[-1]))
    assert ms[-1] < 1000
