#!/usr/bin/env python3
"""A long fuzz run against spa.decide(), the parent's request handling and the config parsers.

    python3 fuzz/fuzz_spa.py                    # 1,000,000 cases (a few minutes)
    python3 fuzz/fuzz_spa.py --cases 20000      # a short run
    python3 fuzz/fuzz_spa.py --replay FILE      # run one saved input again, with its traceback

Coverage-guided with atheris (libFuzzer) when it is installed (`pip install atheris`),
else a seeded mutation loop over the same seeds (--engine random).  Each case is one
input; its first byte picks what it is fed to:

  wire         the bytes as a captured payload               must never be accepted
  b64wire      the bytes mapped onto the base64 alphabet     must never be accepted
  mutant       edits of a real, valid packet                 must never be accepted
  authjunk     base64 text with a valid HMAC (a key holder)  refused, nothing to record
  plaintext    the bytes as a plaintext, sealed with the keys  policy holds if accepted
  request      the bytes as lines from a packet reader to     never raises; opens only for
               the parent (Gatekeeper.serve_lines)           packets made with the keys
  config       the bytes as spa.conf                         only SpaError may escape
  access_conf  the bytes as fwknop's access.conf             only SpaError may escape

The keys are made here and never given to the fuzzer, so the first three targets check
that no input makes decide() accept without the keys.  Everything decide() turns into
"internal error" (its catch-all for bugs) counts as a crash, as does any exception that
escapes decide() or escapes the config parsers as something other than SpaError, and
any broken invariant.  Crashes do not stop the run: each distinct one is saved once
(--out, default /tmp/spa-fuzz-crashes/) and the summary at the end counts them all.
"""

import argparse
import base64
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

TARGETS = ("wire", "b64wire", "mutant", "authjunk", "plaintext", "config", "access_conf",
           "request")
SRC = "198.18.1.2"
ME = "198.18.1.1"                 # this host's address, to the gatekeeper under test
B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
DICTIONARY = [b"[server]", b"[client a]", b"[default]", b"protect", b"tcp/22", b"udp/53",
              b"key_base64", b"hmac_key_base64", b"hmac_digest_type", b"open_ports", b"source",
              b"fw_access_timeout", b"max_fw_timeout", b"require_source_address", b"access_expire",
              b"restrict_ports", b"encryption_mode", b"protect_action", b"max_packet_age",
              b"SOURCE", b"KEY_BASE64", b"HMAC_KEY_BASE64", b"OPEN_PORTS", b"%include",
              b"ANY", b"0.0.0.0,", b"198.18.1.2,", b"U2FsdGVkX1", b"=", b":", b",", b"\n", b" = ",
              b" ", b"198.18.1.1 ", b"198.18.1.2 ", b"2001:db8::2 ", b"fe80::1%lo", b"::", b"Infinity",
              b'{"op": "grant"', b"["]


class Fuzz(object):
    """The targets, their invariants, and the tally."""

    def __init__(self, spa, out_dir, seed):
        self.spa = spa
        rng = random.Random(seed)
        self.key = bytes(rng.getrandbits(8) for _ in range(32))
        self.hmac_key = bytes(rng.getrandbits(8) for _ in range(64))
        self.key2 = bytes(rng.getrandbits(8) for _ in range(32))
        self.hmac_key2 = bytes(rng.getrandbits(8) for _ in range(128))
        self.now = 1800000000
        self.work = tempfile.mkdtemp(prefix="fuzz-spa-", dir="/dev/shm" if os.path.isdir(
            "/dev/shm") else None)
        self.out_dir = out_dir
        self.conf_text = self.server_conf()
        self.config = spa.ServerConfig(self.write("spa.conf", self.conf_text.encode()))
        self.access_server = self.write("access-server.conf", b"[server]\nprotect = tcp/22\n")
        self.cases = 0
        self.per_target = dict.fromkeys(TARGETS, 0)
        self.accepted = dict.fromkeys(TARGETS, 0)
        self.crashes = 0
        self.seed_accepts = 0
        self.unique = {}          # signature -> (file, description)
        self.seeds = self.make_seeds(rng)

    # -- setup ---------------------------------------------------------------

    def server_conf(self):
        b = lambda k: base64.b64encode(k).decode()      # noqa: E731
        return ("[server]\nprotect = tcp/22, udp/53\nmax_packet_age = 120\n"
                "replay_cache = %s/replay.cache\n"
                "[client a]\nkey_base64 = %s\nhmac_key_base64 = %s\nopen_ports = tcp/22,udp/53\n"
                "fw_access_timeout = 30\nmax_fw_timeout = 300\n"
                "[client b]\nsource = 198.18.0.0/15, 2001:db8::/32\nkey_base64 = %s\n"
                "hmac_key_base64 = %s\nhmac_digest_type = sha512\nencryption_mode = ctr\n"
                "open_ports = tcp/22\nrequire_source_address = yes\n"
                % (self.work, b(self.key), b(self.hmac_key), b(self.key2), b(self.hmac_key2)))

    def write(self, name, data):
        path = os.path.join(self.work, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def packet(self, msg, second=False):
        spa = self.spa
        if second:
            return spa.seal(msg.encode(), self.key2, self.hmac_key2, "sha512", "ctr")
        return spa.seal(msg.encode(), self.key, self.hmac_key)

    def make_seeds(self, rng):
        """Real packets and texts, each with its target byte in front: the fuzzer starts here."""
        spa, t = self.spa, TARGETS.index
        msgs = [spa.Message("alice", "0.0.0.0", [("tcp", 22)], timestamp=self.now),
                spa.Message("bob", SRC, [("tcp", 22), ("udp", 53)], 45, timestamp=self.now - 100),
                spa.Message("u" * 48, "198.19.0.1", [("udp", 53)], timestamp=self.now + 120)]
        carol = spa.Message("carol", SRC, [("tcp", 22)], timestamp=self.now)
        self.valid = [self.packet(m) for m in msgs] + [self.packet(carol, second=True)]
        for w in self.valid:
            d = spa.decide(w, SRC, self.now, self.config.stanzas, lambda k: False, 120)
            assert d.accepted, d.reason
        seeds = []
        for w in self.valid + self.vectors():
            seeds += [bytes([t("wire")]) + w, bytes([t("b64wire")]) + w]
        for i in range(len(self.valid)):
            seeds.append(bytes([t("mutant"), i, 0, 7, 65]))
        for w in self.valid:
            seeds.append(bytes([t("authjunk")]) + w[:-43])
        for m in msgs:
            plain = m.encode()
            seeds.append(bytes([t("plaintext"), 0]) + plain)                      # as it is
            seeds.append(bytes([t("plaintext"), 1]) + plain.rsplit(b":", 1)[0])  # digest added
        seeds.append(bytes([t("config"), 0]) + self.conf_text.encode())
        seeds.append(bytes([t("config"), 1]) + self.conf_text.encode())
        access = ("SOURCE ANY\nKEY_BASE64 %s\nHMAC_KEY_BASE64 %s\nOPEN_PORTS tcp/22\n"
                  "FW_ACCESS_TIMEOUT 30\nREQUIRE_SOURCE_ADDRESS Y\n"
                  % (base64.b64encode(self.key).decode(), base64.b64encode(self.hmac_key).decode()))
        seeds.append(bytes([t("access_conf"), 0]) + access.encode())
        seeds.append(bytes([t("access_conf"), 1]) + access.encode())
        lines = [spa.request_line(SRC, ME, w) for w in self.valid]
        seeds += [bytes([t("request")]) + line for line in lines]
        seeds.append(bytes([t("request")]) + b"".join(lines))
        seeds += [bytes([t("request")]) + line for line in (
            b'{"op": "grant", "stanza": [1], "timeout": 1e999, "stamp": Infinity}\n',
            b"[" * 600 + b"\n", spa.request_line("2001:db8::2", "2001:db8::1", self.valid[0]),
            lines[0].replace(SRC.encode(), b"fe80::1%lo"))]
        return seeds

    def vectors(self):
        """The real fwknop client's packets (other keys: to us they are just bytes)."""
        with open(os.path.join(ROOT, "testdata", "vectors.json")) as f:
            return [v["wire"].encode() for v in json.load(f)["vectors"] if v["wire"]]

    # -- one case ------------------------------------------------------------

    def one(self, data):
        self.cases += 1
        if not data:
            return
        target = TARGETS[data[0] % len(TARGETS)]
        self.per_target[target] += 1
        body = data[1:]
        try:
            getattr(self, "t_" + target)(body, data)
        except Exception as e:     # an exception escaped spa: always a crash
            if self.out_dir is None:
                traceback.print_exc()
            frames = [f for f in traceback.extract_tb(e.__traceback__)
                      if f.filename.endswith("spa.py")]
            where = "%s:%d" % (os.path.basename(frames[-1].filename), frames[-1].lineno) \
                if frames else "harness"
            self.crash(target, "%s raised %s at %s: %s" % (
                target, type(e).__name__, where, str(e)[:100]), data,
                signature="%s at %s" % (type(e).__name__, where))

    def crash(self, target, description, data, signature=None):
        self.crashes += 1
        signature = (target, signature or "".join(c for c in description
                                                   if not c.isdigit())[:120])
        if signature in self.unique:
            return
        if self.out_dir is None:         # --replay: report, save nothing
            self.unique[signature] = ("(replayed input)", description)
            return
        os.makedirs(self.out_dir, exist_ok=True)
        name = "crash-%s-%s" % (target, hashlib.sha1(data).hexdigest()[:12])
        path = os.path.join(self.out_dir, name)
        with open(path, "wb") as f:
            f.write(data)
        self.unique[signature] = (path, description)
        print("CRASH %s: %s (saved as %s)" % (target, description, path), file=sys.stderr,
              flush=True)

    def decide(self, payload, source=SRC):
        return self.spa.decide(payload, source, self.now, self.config.stanzas, lambda k: False, 120)

    def check_unauthenticated(self, target, payload, data):
        d = self.decide(payload)
        if d.accepted and payload in self.valid:
            self.seed_accepts += 1           # a valid packet we made, given as a seed: fine
        elif d.accepted:
            self.accepted[target] += 1
            self.crash(target, "ACCEPTED WITHOUT THE KEYS", data)
        elif d.replay_key is not None:
            self.crash(target, "replay key set for a packet that did not authenticate", data)
        elif not d.reason or d.reason.startswith("internal error"):
            self.crash(target, "reason %r" % d.reason, data)

    def t_wire(self, body, data):
        self.check_unauthenticated("wire", body, data)

    def t_b64wire(self, body, data):
        self.check_unauthenticated("b64wire", bytes(B64[b & 63] for b in body), data)

    def t_mutant(self, body, data):
        if not body:
            return
        base = self.valid[body[0] % len(self.valid)]
        w = bytearray(base)
        ops = body[1:25]
        for i in range(0, len(ops) - 2, 3):
            op, pos, byte = ops[i] % 3, ops[i + 1] * 7 + ops[i + 2], ops[i + 2]
            if op == 0 and w:
                w[pos % len(w)] = B64[byte & 63] if byte & 64 else byte
            elif op == 1:
                w.insert(pos % (len(w) + 1), B64[byte & 63] if byte & 64 else byte)
            elif w:
                del w[pos % len(w)]
        if bytes(w) != base:
            self.check_unauthenticated("mutant", bytes(w), data)

    def check_authenticated(self, target, wire, data, plain=None):
        """A packet with a valid HMAC: its replay key is set exactly when its plaintext
        (`plain`, where the fuzzer made one) shows the keys made it: 16 digits and ':'."""
        spa = self.spa
        d = self.decide(wire)
        in_range = spa.MIN_WIRE_LEN <= len(wire) <= spa.MAX_WIRE_LEN
        message = plain is not None and plain[:16].isdigit() and plain[16:17] == b":"
        if d.reason and d.reason.startswith("internal error"):
            self.crash(target, "reason %r" % d.reason, data)
        elif in_range and (d.replay_key is not None) != message:
            self.crash(target, "replay key %s for %s (reason %r)" % (
                "set" if d.replay_key else "missing", "a message" if message else "no message",
                d.reason), data)
        if not d.accepted:
            return
        self.accepted[target] += 1
        problems = self.policy_problems(d, SRC)
        if problems:
            self.crash(target, "accepted with " + "; ".join(problems), data)

    def policy_problems(self, d, source):
        """What an accepted Decision from `source` breaks of the policy (a list)."""
        spa = self.spa
        msg, problems = d.message, []
        if msg.msg_type not in (spa.MSG_ACCESS, spa.MSG_TIMEOUT_ACCESS):
            problems.append("message type %r" % msg.msg_type)
        if abs(self.now - msg.timestamp) > 120:
            problems.append("timestamp outside the window")
        if not msg.access or not set(msg.access) <= d.stanza.open_ports:
            problems.append("ports %r" % msg.access)
        if d.allow_ip != (source if msg.allow_ip == "0.0.0.0" else msg.allow_ip):
            problems.append("allow IP %r" % d.allow_ip)
        if msg.allow_ip == "0.0.0.0" and d.stanza.require_source_address:
            problems.append("0.0.0.0 with require_source_address")
        if not 1 <= d.timeout <= max(d.stanza.max_fw_timeout, d.stanza.fw_access_timeout):
            problems.append("timeout %r" % d.timeout)
        if not (len(msg.rand) == 16 and msg.rand.isdigit()):
            problems.append("random value %r" % msg.rand)
        try:
            import ipaddress
            if str(ipaddress.IPv4Address(d.allow_ip)) != d.allow_ip:
                raise ValueError
        except ValueError:
            if d.allow_ip != source:
                problems.append("allow IP %r is not a canonical IPv4 address" % d.allow_ip)
        return problems

    def t_authjunk(self, body, data):
        text = bytes(B64[b & 63] for b in body)
        wire = text + self.spa.hmac_b64(self.hmac_key, self.spa.SALT_PREFIX + text, "sha256")
        self.check_authenticated("authjunk", wire, data)

    def t_plaintext(self, body, data):
        if not body:
            return
        plain = body[1:]
        if body[0] & 1:       # let the fuzzer reach the fields: the digest is made for it
            plain += b":" + self.spa.b64encode(hashlib.sha256(plain).digest())
        salt = hashlib.sha256(data).digest()[:8]
        wire = self.spa.seal(plain, self.key, self.hmac_key, salt=salt)
        self.check_authenticated("plaintext", wire, data, plain)

    def t_request(self, body, data):
        """The bytes as a packet reader's lines to the parent: it never raises, fails no
        request internally, asks for the reader to be replaced exactly when a line is
        malformed, and opens only for the packets made with the keys, once each, as the
        policy says, on this host's address."""
        spa = self.spa
        lines = body.split(b"\n")[:8]
        gate = spa.Gatekeeper(self.config, spa.DryRunFirewall(self.config.protect),
                              spa.ReplayCache(None, 120), Quiet(), {ME})
        decisions, problem = gate.serve_lines(lines, self.now)
        parsed = []
        for line in lines:
            try:
                parsed.append(spa.parse_request(line))
            except ValueError:
                break
        if (problem is not None) != (len(parsed) < len(lines)) or "raised" in (problem or ""):
            self.crash("request", "problem %r for %d of %d lines parsed" % (problem, len(parsed),
                                                                            len(lines)), data)
        opened = set()
        for d, (source, destination, wire, _) in zip(decisions, parsed):
            if "internal error" in (d.reason or ""):
                self.crash("request", "reason %r" % d.reason, data)
            if not d.accepted:
                continue
            self.accepted["request"] += 1
            problems = self.policy_problems(d, source)
            if wire not in self.valid:
                problems.append("a packet the fuzzer made without the keys")
            if wire in opened:
                problems.append("the same packet twice")
            if destination != ME:
                problems.append("addressed to %s" % destination)
            opened.add(wire)
            if problems:
                self.crash("request", "accepted with " + "; ".join(problems), data)
        if len(gate.firewall.opened) > len(opened) * 2:
            self.crash("request", "the firewall holds more than was accepted", data)

    def parse_config(self, target, text, data, access):
        spa = self.spa
        if text[:1] and text[0] & 1:            # half the time, valid UTF-8 only
            text = text[1:].decode("utf-8", "replace").encode("utf-8")
        else:
            text = text[1:]
        try:
            if access:
                spa.ServerConfig(self.access_server, self.write("access.conf", text))
            else:
                spa.ServerConfig(self.write("fuzz.conf", text))
        except spa.SpaError as e:
            if not str(e):
                self.crash(target, "SpaError without a message", data)

    def t_config(self, body, data):
        self.parse_config("config", body, data, access=False)

    def t_access_conf(self, body, data):
        if hasattr(self.spa, "read_access_conf"):
            self.parse_config("access_conf", body, data, access=True)

    # -- the report ------------------------------------------------------------

    def summary(self, seconds, engine):
        unauth = sum(self.per_target[t] for t in ("wire", "b64wire", "mutant"))
        lines = ["", "fuzz_spa: %s, %d cases in %.1f s (%.0f cases/s)"
                 % (engine, self.cases, seconds, self.cases / max(seconds, 1e-9)),
                 "  per target: " + ", ".join("%s %d" % (t, self.per_target[t]) for t in TARGETS),
                 "  accepted without the keys: %d of %d cases (wire, b64wire, mutant; the %d "
                 "unchanged seed packets made with the keys not counted)"
                 % (sum(self.accepted[t] for t in ("wire", "b64wire", "mutant")), unauth,
                    self.seed_accepts),
                 "  accepted with the keys: plaintext %d, authjunk %d; requests granted "
                 "(packets made with the keys, any words around them) %d"
                 % (self.accepted["plaintext"], self.accepted["authjunk"],
                    self.accepted["request"]),
                 "  crashes: %d in all, %d distinct" % (self.crashes, len(self.unique))]
        for (target, _), (path, description) in sorted(self.unique.items()):
            lines.append("    %s: %s\n      reproduce: python3 fuzz/fuzz_spa.py --replay %s"
                         % (target, description, path))
        print("\n".join(lines), flush=True)
        shutil.rmtree(self.work, ignore_errors=True)


class Quiet(object):
    """The gatekeeper's log, thrown away."""

    def _say(self, text, *args):
        pass

    debug = info = warning = error = _say


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=1000000, help="how many inputs (default 1,000,000)")
    p.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    p.add_argument("--seed", type=int, default=1, help="keys, and the random engine's choices")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "spa-fuzz-crashes"),
                   help="where distinct crashing inputs are saved (default %(default)s)")
    p.add_argument("--replay", metavar="FILE", help="run one saved input and show what happens")
    args = p.parse_args(argv)

    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    if engine == "atheris" and not args.replay:
        import atheris
        with atheris.instrument_imports():
            import spa
    else:
        import spa
    fuzz = Fuzz(spa, args.out, args.seed)

    if args.replay:
        with open(args.replay, "rb") as f:
            data = f.read()
        target = TARGETS[data[0] % len(TARGETS)] if data else "(empty)"
        print("target %s, %d bytes: %r" % (target, len(data), data[:300]))
        fuzz.out_dir = None
        fuzz.one(data)
        print("\n".join("%s: %s" % (t, description) for (t, _), (_, description)
                        in fuzz.unique.items()) or "no problem found")
        shutil.rmtree(fuzz.work, ignore_errors=True)
        return 1 if fuzz.crashes else 0

    start = time.monotonic()
    if engine == "random":
        run_random(fuzz, args.cases, args.seed)
        fuzz.summary(time.monotonic() - start, "random mutation engine")
        return 1 if fuzz.crashes else 0

    corpus = tempfile.mkdtemp(prefix="fuzz-corpus-")
    for i, seed in enumerate(fuzz.seeds):
        with open(os.path.join(corpus, "seed-%03d" % i), "wb") as f:
            f.write(seed)
    dictionary = corpus + ".dict"
    with open(dictionary, "w") as f:
        for token in DICTIONARY:
            f.write('"%s"\n' % "".join("\\x%02x" % b for b in token))

    def test_one_input(data):
        fuzz.one(data)
        if fuzz.cases == args.cases:
            fuzz.summary(time.monotonic() - start, "atheris (libFuzzer, coverage-guided)")
            shutil.rmtree(corpus, ignore_errors=True)
            os.remove(dictionary)
            sys.stdout.flush()
            os._exit(1 if fuzz.crashes else 0)    # else libFuzzer exits 0 whatever we found

    os.makedirs(args.out, exist_ok=True)
    atheris.Setup([sys.argv[0], "-runs=%d" % args.cases, "-max_len=1024", "-seed=%d" % args.seed,
                   "-dict=%s" % dictionary, "-print_final_stats=1",
                   "-artifact_prefix=%s/" % args.out, corpus], test_one_input)
    atheris.Fuzz()      # test_one_input ends the process after the last case
    return 0


def run_random(fuzz, cases, seed):
    """Without atheris: mutate the seeds (bit flips, edits, splices, dictionary tokens)."""
    rng = random.Random(seed)
    pool = list(fuzz.seeds)
    by_target = {}
    for s in pool:
        by_target.setdefault(s[0], []).append(s)
    targets = sorted(by_target)
    for _ in range(cases):
        data = bytearray(rng.choice(by_target[rng.choice(targets)]))   # each target in turn
        for _ in range(rng.choice((1, 1, 2, 3, 8))):
            what = rng.randrange(6)
            i = rng.randrange(len(data) + 1)
            if what == 0 and data:
                data[i % len(data)] ^= 1 << rng.randrange(8)
            elif what == 1 and data:
                data[i % len(data)] = rng.randrange(256)
            elif what == 2:
                data[i:i] = bytes([rng.randrange(256)])
            elif what == 3 and len(data) > 1:
                del data[i % len(data):i % len(data) + rng.randrange(1, 9)]
            elif what == 4:
                data[i:i] = rng.choice(DICTIONARY)
            else:
                other = rng.choice(pool)
                j = rng.randrange(len(other) + 1)
                data[i:] = other[j:]
        fuzz.one(bytes(data[:1024]))


if __name__ == "__main__":
    sys.exit(main())
