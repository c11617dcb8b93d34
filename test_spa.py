"""Tests for spa.py.

Unit tests need nothing but Python and pycryptodome.  The integration tests
(further down) build network namespaces, real nftables rules, real capture and
a real TCP service, and talk to the real fwknop client and fwknopd; they need
root and Debian's nftables and fwknop packages.  Outside CI they skip when
those are missing; with CI=true a missing piece is a failure.
"""

import base64
import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

import spa

HERE = os.path.dirname(os.path.abspath(__file__))
SPA = os.path.join(HERE, "spa.py")


def find_shared():
    """../shared next to the checkout (CI lays a copy of it beside the clone)."""
    for base in (os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))):
        path = os.path.join(base, "shared", "vectors")
        if os.path.isdir(path):
            return path
    return None


VECTOR_DIR = find_shared()


def load_vectors():
    if VECTOR_DIR is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("../shared/vectors is missing")
        return [], {}
    with open(os.path.join(VECTOR_DIR, "vectors.json")) as f:
        vectors = json.load(f)["vectors"]
    with open(os.path.join(VECTOR_DIR, "decoded.json")) as f:
        decoded = {d["name"]: d for d in json.load(f)["vectors"]}
    return vectors, decoded


VECTORS, DECODED = load_vectors()
needs_vectors = pytest.mark.skipif(not VECTORS, reason="../shared/vectors not found")

KEY = base64.b64encode(b"k" * 32).decode()
HMAC_KEY = base64.b64encode(b"h" * 64).decode()


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# Wire format against the real fwknop client's packets
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
    "nat_access": "message type 2 (NAT access) is not supported",
    "nat_access_client_timeout": "message type 4 (NAT access with timeout) is not supported",
    "local_nat": "message type 5 (local NAT access) is not supported",
    "local_nat_client_timeout": "message type 6 (local NAT access with timeout) is not supported",
    "command_msg": "message type 0 (command) is not supported",
    "mode_ctr": "decryption failed", "mode_cfb": "decryption failed",
    "mode_ofb": "decryption failed", "mode_ecb": "decryption failed",
    "long_multi_port_over_400": "length 567 outside 140-399",
}


@needs_vectors
def test_every_vector_has_an_expected_outcome():
    with_wire = {v["name"] for v in VECTORS if v["wire"]}
    assert with_wire == set(DEFAULT_OUTCOME)


@needs_vectors
@pytest.mark.parametrize("name", sorted(DEFAULT_OUTCOME))
def test_default_server_on_real_client_vectors(tmp_path, name):
    vec = next(v for v in VECTORS if v["name"] == name)
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


@needs_vectors
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
    vec = next(v for v in VECTORS if v["name"] == name)
    d = decide(vector_stanza(tmp_path, vec, **option), vec["wire"].encode(), now=vector_time(vec))
    assert d.accepted, d.reason
    assert d.message.access == [("tcp", 22)]


@needs_vectors
@pytest.mark.parametrize("name", sorted(n for n in DEFAULT_OUTCOME if n != "long_multi_port_over_400"))
def test_reference_values_of_decoded_json(name):
    vec = next(v for v in VECTORS if v["name"] == name)
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
        assert spa.parse_plaintext(plaintext).digest_type == ref["fields"]["digest_type"]


@needs_vectors
def test_encoder_reproduces_a_real_client_packet_byte_for_byte():
    vec = VECTORS[0]
    ref = DECODED[vec["name"]]
    f = ref["fields"]
    msg = spa.Message(f["username"], "198.18.0.2", [("tcp", 22)], timestamp=f["timestamp"],
                      rand=f["rand_val"])
    assert msg.encode().decode() == ref["plaintext"]
    wire = spa.seal(msg.encode(), base64.b64decode(vec["key_b64"]),
                    base64.b64decode(vec["hmac_key_b64"]), salt=bytes.fromhex(ref["salt_hex"]))
    assert wire.decode() == vec["wire"]


# ---------------------------------------------------------------------------
# Round trips and the decision
# ---------------------------------------------------------------------------

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
    # Right HMAC key, wrong encryption key: authenticated, so it is remembered, then refused.
    d = decide(config, knock(key=other))
    assert not d.accepted and "decryption failed" in d.reason
    assert d.replay_key is not None


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


def test_client_timeout_is_capped(tmp_path):
    config = server_config(tmp_path, {"a": {"fw_access_timeout": "7", "max_fw_timeout": "60"}})
    assert decide(config, knock()).timeout == 7
    assert decide(config, knock(timeout=20)).timeout == 20
    assert decide(config, knock(timeout=5000)).timeout == 60


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
    assert d.replay_key is not None           # remembered all the same


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


def test_replay_cache_keeps_future_packets(tmp_path):
    """A packet stamped in the future stays remembered until it could no longer pass."""
    path = str(tmp_path / "replay.cache")
    now = 1800000000
    cache = spa.ReplayCache(path, 120, now)
    cache.add("F" * 43, now + 5000, now)
    cache.close()
    assert "F" * 43 in spa.ReplayCache(path, 120, now + 5000)


def test_server_records_authenticated_rejects(tmp_path):
    config = server_config(tmp_path, {"a": {"open_ports": "tcp/22"}})
    replay = spa.ReplayCache(config.replay_cache, config.max_packet_age)
    firewall = spa.DryRunFirewall(config.protect)
    server = spa.Server(config, firewall, replay, spa.make_logger("stderr", False))
    bad = knock([("tcp", 80)])
    assert not server.handle(bad, "198.18.0.2").accepted
    good = knock()
    assert server.handle(good, "198.18.0.2").accepted
    assert firewall.opened == [("198.18.0.2", "tcp", 22, 30)]
    replay.close()
    # Both are in the file: neither packet can be used again, even after a restart.
    restarted = spa.ReplayCache(config.replay_cache, config.max_packet_age)
    server = spa.Server(config, firewall, restarted, spa.make_logger("stderr", False))
    for wire in (bad, good):
        d = server.handle(wire, "198.18.0.2")
        assert not d.accepted and d.reason == "replayed packet"
    assert len(firewall.opened) == 1


def test_rejection_log_is_rate_limited():
    limiter = spa.RateLimiter(rate=5, burst=20)
    t = time.monotonic()
    allowed = sum(limiter.allow(now=t) for _ in range(1000))
    assert allowed == 20
    assert limiter.take_suppressed() == 980
    assert sum(limiter.allow(now=t + 1.0) for _ in range(100)) == 5    # 5 a second after that


# ---------------------------------------------------------------------------
# Config errors speak to the operator
# ---------------------------------------------------------------------------

def run_spa(*args, **kw):
    return subprocess.run([sys.executable, SPA] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, **kw)


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


def test_readable_key_file_is_refused(tmp_path):
    path = write_private(tmp_path / "spa.conf", "[server]\nprotect = tcp/22\n")
    os.chmod(path, 0o644)
    done = run_spa("server", "-c", path, "--test")
    assert done.returncode == 1 and "chmod 600" in done.stderr
    done = run_spa("client", "-c", path, "-n", "x", "--test")
    assert done.returncode == 1 and "readable by group or others" in done.stderr


def test_missing_config_and_unknown_option(tmp_path):
    done = run_spa("server", "-c", str(tmp_path / "nope.conf"))
    assert done.returncode == 1 and "No such file" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_spa("client", "--bogus")
    assert done.returncode == 2 and "unrecognized arguments" in done.stderr


def test_help_shows_examples():
    for args in ([], ["keygen"], ["client"], ["server"]):
        done = run_spa(*(args + ["--help"]))
        assert done.returncode == 0
        assert "example" in done.stdout


# ---------------------------------------------------------------------------
# keygen and client
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
    (["-D", "h", "-A", "tcp/22", "-a", "198.18.0.1", "-s"], "not both"),
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


# ---------------------------------------------------------------------------
# The BPF program (run for real in the integration tests)
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
