#!/usr/bin/env python3
"""Make spa.py's test vectors with the real fwknop client (Debian's fwknop-client).

    python3 testdata/make_vectors.py [--out DIR]        (default: the folder of this file)

Writes two files, which the tests read from the repository:

- vectors.json: for each case, fwknop's command line, its exit status, the packet it
  wrote with -B (the exact UDP payload), its own dump of the packet's fields
  (--verbose --verbose), and the keys.  The keys are fresh ones from `fwknop --key-gen`
  (and two passphrases); the fwknop version is recorded at the top.
- decoded.json: what each packet holds, worked out here with hashlib, hmac and
  pycryptodome alone -- never with spa.py, so the tests compare spa.py with an independent
  reading: the salt, the AES key and IV (OpenSSL's EVP_BytesToKey with MD5), the
  plaintext, the text the HMAC covers, and the message's fields.  Every value is checked
  against fwknop's own dump before it is written.

Needs the fwknop client (Debian/Ubuntu: apt install fwknop-client) and pycryptodome.
Run it again to make new vectors (every run differs: fwknop draws a new salt, random
value and timestamp each time); the tests then read the new ones.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import tempfile
import time

try:
    from Cryptodome.Cipher import AES
except ImportError:
    from Crypto.Cipher import AES

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER, ALLOW_IP = "198.18.0.1", "198.18.0.2"
SALT_PREFIX = "U2FsdGVkX1"            # base64 of "Salted__", which fwknop leaves off the wire
MODES = {"cbc": AES.MODE_CBC, "legacy": AES.MODE_CBC, "ecb": AES.MODE_ECB,
         "ctr": AES.MODE_CTR, "cfb": AES.MODE_CFB, "ofb": AES.MODE_OFB}
NAT_TYPES, TIMEOUT_TYPES = (2, 4, 5, 6), (3, 4, 6)
# fwknop's numbers for the inner digest (its dump says "3 (SHA256)").
DIGEST_NAMES = {"md5": "MD5", "sha1": "SHA1", "sha256": "SHA256", "sha384": "SHA384",
                "sha512": "SHA512", "sha3_256": "SHA3_256", "sha3_512": "SHA3_512"}

TWENTY_PORTS = ",".join("tcp/%d" % port for port in range(10001, 10021))

# (name, description, fwknop options, keys, HMAC type, mode).  keys: "b64" (fresh
# --key-gen keys for the HMAC type), "ascii" (the passphrases), "ascii-no-hmac", "no-hmac".
CASES = [
    ("aes_cbc_hmac_sha256_default", "Default: AES-256-CBC (EVP_BytesToKey/MD5), inner digest "
     "SHA256, HMAC-SHA256, access msg", ["-A", "tcp/22", "-a", ALLOW_IP], "b64", "sha256", "cbc"),
    ("aes_cbc_hmac_sha512", "HMAC-SHA512 (128-byte key from --key-gen --hmac-digest-type sha512)",
     ["-A", "tcp/22", "-a", ALLOW_IP, "--hmac-digest-type", "sha512"], "b64", "sha512", "cbc"),
    ("aes_cbc_hmac_sha384", "HMAC-SHA384 (128-byte key from --key-gen --hmac-digest-type sha384)",
     ["-A", "tcp/22", "-a", ALLOW_IP, "--hmac-digest-type", "sha384"], "b64", "sha384", "cbc"),
    ("aes_cbc_hmac_sha1", "HMAC-SHA1 (20-byte key)",
     ["-A", "tcp/22", "-a", ALLOW_IP, "--hmac-digest-type", "sha1"], "b64", "sha1", "cbc"),
    ("aes_cbc_hmac_md5", "HMAC-MD5 (16-byte key)",
     ["-A", "tcp/22", "-a", ALLOW_IP, "--hmac-digest-type", "md5"], "b64", "md5", "cbc"),
    ("passphrase_keys", "Short ASCII passphrases: --key-rijndael fwknoptest (10 bytes), "
     "--key-hmac hmacsecret", ["-A", "tcp/22", "-a", ALLOW_IP], "ascii", "sha256", "cbc"),
    ("multi_port", "Multi-port access request",
     ["-A", "tcp/22,udp/53,tcp/443", "-a", ALLOW_IP], "b64", "sha256", "cbc"),
    ("client_timeout", "Client timeout (-f 45) -> message type 3 and trailing ':45' field",
     ["-A", "tcp/22", "-a", ALLOW_IP, "-f", "45"], "b64", "sha256", "cbc"),
    ("nat_access", "NAT access (-N 10.11.12.13:22 -A tcp/5022) -> message type 2",
     ["-A", "tcp/5022", "-a", ALLOW_IP, "-N", "10.11.12.13:22"], "b64", "sha256", "cbc"),
    ("nat_access_client_timeout", "NAT access + client timeout -> message type 4",
     ["-A", "tcp/5022", "-a", ALLOW_IP, "-N", "10.11.12.13:22", "-f", "120"],
     "b64", "sha256", "cbc"),
    ("local_nat", "Local NAT (--nat-local --nat-port 55000 -A tcp/22) -> type 5, "
     "nat_access = '<-D host>,22'",
     ["-A", "tcp/22", "-a", ALLOW_IP, "--nat-local", "--nat-port", "55000"],
     "b64", "sha256", "cbc"),
    ("local_nat_client_timeout", "Local NAT + client timeout -> type 6",
     ["-A", "tcp/22", "-a", ALLOW_IP, "--nat-local", "--nat-port", "55000", "-f", "60"],
     "b64", "sha256", "cbc"),
    ("source_ip_any", "-s: allow IP 0.0.0.0 (server substitutes packet source IP unless "
     "REQUIRE_SOURCE_ADDRESS)", ["-A", "tcp/22", "-s"], "b64", "sha256", "cbc"),
    ("command_msg", "Command message (-C 'uname -a') -> type 0, message '<ip>,<cmd>'",
     ["-a", ALLOW_IP, "-C", "uname -a"], "b64", "sha256", "cbc"),
    ("no_access_ports", "No -A given -> the client refuses to build a packet (libfko rejects "
     "its own none/0)", ["-a", ALLOW_IP], "b64", "sha256", "cbc"),
    ("digest_sha512", "Inner digest SHA512 (-m sha512)",
     ["-A", "tcp/22", "-a", ALLOW_IP, "-m", "sha512"], "b64", "sha256", "cbc"),
    ("digest_md5", "Inner digest MD5 (-m md5)",
     ["-A", "tcp/22", "-a", ALLOW_IP, "-m", "md5"], "b64", "sha256", "cbc"),
    ("digest_sha1", "Inner digest SHA1 (-m sha1)",
     ["-A", "tcp/22", "-a", ALLOW_IP, "-m", "sha1"], "b64", "sha256", "cbc"),
    ("digest_sha384", "Inner digest SHA384 (-m sha384)",
     ["-A", "tcp/22", "-a", ALLOW_IP, "-m", "sha384"], "b64", "sha256", "cbc"),
    ("digest_sha3_256", "Inner digest SHA3-256 (-m sha3_256; same length as SHA256, receiver "
     "tries both)", ["-A", "tcp/22", "-a", ALLOW_IP, "-m", "sha3_256"], "b64", "sha256", "cbc"),
    ("no_hmac_legacy", "No HMAC at all (old style; server stanza must then have no HMAC key)",
     ["-A", "tcp/22", "-a", ALLOW_IP], "no-hmac", None, "cbc"),
    ("mode_ctr", "AES-256-CTR (-M CTR)", ["-A", "tcp/22", "-a", ALLOW_IP, "-M", "CTR"],
     "b64", "sha256", "ctr"),
    ("mode_cfb", "AES-256-CFB128 (-M CFB)", ["-A", "tcp/22", "-a", ALLOW_IP, "-M", "CFB"],
     "b64", "sha256", "cfb"),
    ("mode_ofb", "AES-256-OFB (-M OFB)", ["-A", "tcp/22", "-a", ALLOW_IP, "-M", "OFB"],
     "b64", "sha256", "ofb"),
    ("mode_ecb", "AES-256-ECB (-M ECB)", ["-A", "tcp/22", "-a", ALLOW_IP, "-M", "ECB"],
     "b64", "sha256", "ecb"),
    ("mode_legacy_short_key", "Legacy IV mode (-M legacy) with a 10-byte passphrase (padded "
     "with '0' to 16); the client refuses -M legacy together with HMAC, so no HMAC here",
     ["-A", "tcp/22", "-a", ALLOW_IP, "-M", "legacy"], "ascii-no-hmac", None, "legacy"),
    ("http_transport", "-P http: same SPA data, sent as 'GET /<data with +->- and /->_> "
     "HTTP/1.0' (request printed with -v -v)", ["-A", "tcp/22", "-a", ALLOW_IP, "-P", "http"],
     "b64", "sha256", "cbc"),
    ("long_multi_port_over_400", "Many ports so the wire packet is >= 400 chars (fwknopd then "
     "classifies it as GnuPG)", ["-A", TWENTY_PORTS, "-a", ALLOW_IP], "b64", "sha256", "cbc"),
]
PASSPHRASE, HMAC_PASSPHRASE = "fwknoptest", "hmacsecret"


class Problem(Exception):
    """fwknop did something this script does not expect: no vectors are written."""


def fwknop(args, home):
    """Run the fwknop client with HOME in a folder of ours (it would write ~/.fwknoprc)."""
    env = dict(os.environ, HOME=home)
    try:
        return subprocess.run(["fwknop"] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, env=env, timeout=30)
    except FileNotFoundError:
        raise Problem("fwknop is not installed (Debian/Ubuntu: apt install fwknop-client)")


def versions(home):
    """fwknop's own version line, and the Debian package's version where dpkg knows it."""
    line = fwknop(["--version", "--no-rc-file"], home).stdout.strip()
    try:
        package = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}",
                                  "fwknop-client"], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, universal_newlines=True).stdout
    except FileNotFoundError:
        package = ""
    return line, package.strip() or None


def fresh_keys(hmac_type, home):
    """(KEY_BASE64, HMAC_KEY_BASE64) from `fwknop --key-gen` for this HMAC type."""
    done = fwknop(["--key-gen", "--no-rc-file", "--hmac-digest-type", hmac_type], home)
    keys = dict(re.findall(r"^(KEY_BASE64|HMAC_KEY_BASE64):\s*(\S+)", done.stdout, re.M))
    if done.returncode != 0 or len(keys) != 2:
        raise Problem("fwknop --key-gen failed: %s" % (done.stderr or done.stdout).strip())
    return keys["KEY_BASE64"], keys["HMAC_KEY_BASE64"]


def dump_fields(text):
    """The first 'SPA Field Values' block of fwknop's -v -v output, as a dict."""
    block = text.split("SPA Field Values:", 1)[1].split("\n\n", 1)[0]
    return dict((k.strip(), v.strip()) for k, v in re.findall(r"^ *([^:\n=]+): (.*)$", block, re.M))


def http_request(text):
    """The HTTP request fwknop prints with -P http -v -v (up to its blank line)."""
    m = re.search(r"^GET /.*?\r?\n\r?\n", text, re.M | re.S)
    return m.group(0).replace("\r\n", "\n").strip().replace("\n", "\r\n") if m else None


def make_case(name, description, options, keys, hmac_type, mode, keyring, home):
    argv = ["fwknop", "-D", SERVER, "--test", "--verbose", "--verbose", "--no-rc-file",
            "--no-save-args", "-U", "alice"] + options
    vec = {"name": name, "description": description}
    if keys == "b64":
        vec["key_b64"], vec["hmac_key_b64"] = keyring[hmac_type]
        argv += ["--key-base64-rijndael", vec["key_b64"], "--key-base64-hmac",
                 vec["hmac_key_b64"], "--use-hmac"]
    elif keys == "ascii":
        vec["key_ascii"], vec["hmac_key_ascii"] = PASSPHRASE, HMAC_PASSPHRASE
        argv += ["--key-rijndael", PASSPHRASE, "--key-hmac", HMAC_PASSPHRASE, "--use-hmac"]
    elif keys == "ascii-no-hmac":
        vec["key_ascii"] = PASSPHRASE
        argv += ["--key-rijndael", PASSPHRASE]
    else:
        vec["key_b64"] = keyring["sha256"][0]
        argv += ["--key-base64-rijndael", vec["key_b64"]]
    packet_file = os.path.join(home, name + ".pkt")
    done = fwknop(argv[1:] + ["-B", packet_file], home)
    vec["argv"] = argv + ["-B", "<pkt_file>"]
    vec["rc"] = done.returncode
    wire = None
    if os.path.exists(packet_file):
        with open(packet_file) as f:
            wire = f.read().rstrip("\n")
    vec["wire"], vec["wire_len"] = wire, len(wire or "")
    vec["client_dump"] = dump_fields(done.stdout) if "SPA Field Values:" in done.stdout else None
    vec.update(hmac_type=hmac_type, mode=mode)
    if done.returncode != 0:
        vec["client_error"] = done.stderr.strip()
    if "-P" in options:
        vec["http_request"] = http_request(done.stdout)
    return vec


# --- an independent reading of each packet: hashlib, hmac, pycryptodome, nothing of spa.py ---

def b64decode(text):
    return base64.b64decode(text + "=" * (-len(text) % 4))


def b64_unpadded(data):
    return base64.b64encode(data).decode().rstrip("=")


def evp_bytes_to_key(passphrase, salt):
    """OpenSSL's EVP_BytesToKey with MD5 and one round: 32 bytes of key, 16 of IV."""
    out, block = b"", b""
    while len(out) < 48:
        block = hashlib.md5(block + passphrase + salt).digest()
        out += block
    return out[:32], out[32:48]


def decrypt(ciphertext, key, iv, mode):
    if mode == "ecb":
        cipher = AES.new(key, AES.MODE_ECB)
    elif mode == "ctr":                     # the whole IV is the big-endian block counter
        cipher = AES.new(key, AES.MODE_CTR, nonce=b"", initial_value=iv)
    elif mode == "cfb":
        cipher = AES.new(key, AES.MODE_CFB, iv, segment_size=128)
    else:
        cipher = AES.new(key, MODES[mode], iv)
    return cipher.decrypt(ciphertext)


def passphrase_of(vec):
    key = base64.b64decode(vec["key_b64"]) if "key_b64" in vec else vec["key_ascii"].encode()
    if vec["mode"] == "legacy":             # padded with '0' (or cut) to 16 bytes
        key = key[:16].ljust(16, b"0")
    return key


def decode(vec):
    """What the packet holds, and a check of each value against fwknop's own dump."""
    wire, hmac_type, dump = vec["wire"], vec["hmac_type"], vec["client_dump"]
    mac_len = len(b64_unpadded(hashlib.new(hmac_type).digest())) if hmac_type else 0
    signed = SALT_PREFIX + (wire[:-mac_len] if mac_len else wire)
    if mac_len:
        hkey = base64.b64decode(vec["hmac_key_b64"]) if "hmac_key_b64" in vec \
            else vec["hmac_key_ascii"].encode()
        mac = b64_unpadded(hmac.new(hkey, signed.encode(), hmac_type).digest())
        if mac != wire[-mac_len:] or mac != dump["HMAC"]:
            raise Problem("%s: the HMAC does not verify" % vec["name"])
    raw = b64decode(signed)
    salt, ciphertext = raw[8:16], raw[16:]
    key, iv = evp_bytes_to_key(passphrase_of(vec), salt)
    padded = decrypt(ciphertext, key, iv, vec["mode"])
    pad = padded[-1]
    if not 1 <= pad <= 16 or padded[-pad:] != bytes([pad]) * pad:
        raise Problem("%s: no PKCS#7 padding after decryption" % vec["name"])
    plaintext = padded[:-pad].decode("ascii")
    body, _, digest = plaintext.rpartition(":")
    digest_type = next((name for name in DIGEST_NAMES if len(b64_unpadded(
        hashlib.new(name).digest())) == len(digest) and b64_unpadded(
        hashlib.new(name, body.encode()).digest()) == digest), None)
    fields = body.split(":")
    msg_type = int(fields[4])
    rest = fields[6:]
    nat = b64decode(rest.pop(0)).decode() if msg_type in NAT_TYPES else None
    timeout = int(rest.pop()) if msg_type in TIMEOUT_TYPES else 0
    decoded = {
        "name": vec["name"], "salt_hex": salt.hex(), "aes_key_hex": key.hex(),
        "iv_hex": iv.hex(), "ciphertext_len": len(ciphertext), "plaintext": plaintext,
        "plaintext_len": len(plaintext), "pkcs7_pad_len": pad,
        "hmac_input": signed if mac_len else None,
        "fields": {
            "rand_val": fields[0], "username": b64decode(fields[1]).decode(),
            "timestamp": int(fields[2]), "version": fields[3], "message_type": msg_type,
            "message": b64decode(fields[5]).decode(), "nat_access": nat,
            "server_auth": b64decode(rest[0]).decode() if rest else None,
            "client_timeout": timeout, "digest_type": digest_type, "digest": digest}}
    f = decoded["fields"]
    agree = {"Encoded Data": body, "SPA Data Digest": digest, "Random Value": f["rand_val"],
             "Username": f["username"], "Timestamp": str(f["timestamp"]),
             "Message String": f["message"], "Client Timeout": str(timeout),
             "Nat Access": nat if nat is not None else "<NULL>"}
    for label, value in agree.items():
        if dump[label] != value:
            raise Problem("%s: %s is %r in fwknop's dump, %r here" % (vec["name"], label,
                                                                      dump[label], value))
    if digest_type is None or not dump["Digest Type"].endswith("(%s)" % DIGEST_NAMES[digest_type]):
        raise Problem("%s: inner digest %r, fwknop says %s" % (vec["name"], digest_type,
                                                               dump["Digest Type"]))
    return decoded


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=HERE, help="where to write vectors.json and decoded.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="make-vectors-") as home:
        try:
            version, package = versions(home)
            keyring = {t: fresh_keys(t, home) for t in ("sha256", "sha384", "sha512", "sha1", "md5")}
            vectors = [make_case(*case, keyring=keyring, home=home) for case in CASES]
            decoded = [decode(v) for v in vectors if v["wire"]]
        except Problem as e:
            print("make_vectors.py: %s" % e, file=sys.stderr)
            return 1
    made = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    head = {"generator": "%s; Debian package %s" % (version, package) if package else version,
            "fwknop_version": version, "package": package, "made": made,
            "made_by": "testdata/make_vectors.py"}
    files = {
        "vectors.json": dict(head, notes="wire = exact UDP payload (what -B/--save-packet writes, "
                             "minus the trailing newline). Keys: *_b64 are standard base64 of raw "
                             "key bytes (fresh from fwknop --key-gen); *_ascii are literal "
                             "passphrases.", vectors=vectors),
        "decoded.json": dict(head, note="Values computed from each packet by make_vectors.py "
                             "with hashlib, hmac and pycryptodome (not spa.py), each checked "
                             "against fwknop's own dump: salt, EVP_BytesToKey(MD5) key/IV, "
                             "plaintext, HMAC input string, fields.", vectors=decoded),
    }
    os.makedirs(args.out, exist_ok=True)
    for name, data in files.items():
        path = os.path.join(args.out, name)
        with open(path + ".new", "w") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(path + ".new", path)
    print("wrote %d vectors (%d packets) made by %s to %s"
          % (len(vectors), len(decoded), version, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
