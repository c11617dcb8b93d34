#!/usr/bin/env python3
"""spa.py - Single Packet Authorization in one readable file.

A host that runs `spa.py server` shows nothing: the ports it protects look like
closed ports and nothing answers on the knock port.  An authorised client sends
one encrypted, authenticated UDP packet (`spa.py client`); the server checks it
and opens the requested port for that client's address alone, for a short time,
with a timeout kept by the kernel itself, so the port goes dark again on time
even if the server has died.

The packet is fwknop's (AES-256-CBC with OpenSSL's salted key derivation, an
inner digest, and an HMAC over the base64 text: encrypt-then-MAC; or fwknop's GnuPG
mode, through the gpg binary), so fwknop clients and fwknopd interoperate with spa.py
both ways.  The file opens with that
format, as the reference a reader of fwknop's wire format can read.

Needs Python 3.6 or newer and pycryptodome (imported as Cryptodome, Debian's
python3-pycryptodome, or as Crypto, PyPI's pycryptodome).  The server needs
root (CAP_NET_RAW to capture, CAP_NET_ADMIN to change the firewall) and nft or
iptables; it parses packets in a child process that has given up root.

Sections, each under a banner, in dependency order (what a section uses stands above
it, but for the last one):
  The SPA packet: fwknop's wire format     seal() and unseal(), the decision
  Files                                    key files read privately, state kept durably
  Policy and config                        [server], [client NAME], fwknop's access.conf
  Replay cache                             no packet opens anything twice
  Firewall: one interface                  what every back end does; the dry run; none
  nftables, iptables                       the two real back ends
  Choosing the back end; the saved firewall
  Capture                                  AF_PACKET sockets and their BPF filter
  Logging
  Server                                   the reader's sandbox, the command runner, the
                                           gatekeeper, the packet reader, the supervisor
  Client, keygen, selftest, install, Command line
  Speed and memory                         AES, hashes, HMAC and a packed table, made
                                           fast to start and small (README: Performance)
README.md documents every command and option.
"""

import argparse
import base64
import binascii
import mmap
import os
import socket
import struct
import sys
import time
from binascii import b2a_base64
from collections import namedtuple      # (loaded already: argparse imports it)

VERSION = "0.1.0"


class SpaError(Exception):
    """A mistake the user can fix: printed as one line, exit status 1."""


class Reject(Exception):
    """A packet refused by the decision function; the message says why."""


# ---------------------------------------------------------------------------
# The SPA packet: fwknop's wire format
# ---------------------------------------------------------------------------
#
# What one packet is, how it is made (seal) and taken apart (unseal), and how the server
# decides on it (screen, judge: decide), with no I/O: functions of their arguments.
# Nothing here trusts a packet: only the length check, the alphabet check and the HMAC
# touch its bytes before the HMAC has passed.  The names are fwknop's (fwknop 2.6.10,
# libfko; its source files in brackets), so a reader who knows fwknop finds each part
# under the name it has there.  The primitives (AES, the hashes, HMAC) are the standard
# ones; how spa.py makes them quick to load and small sits in the last section.
#
# A packet as the client builds it, from the inside out:
#
#  1. The message, fields joined by ':' (fko_encode.c, Message.encode):
#
#       rand_value : username : timestamp : version : type : message
#                                   [ : nat_access ] [ : server_auth ] [ : client_timeout ]
#
#       rand_value      16 random decimal digits (FKO_RAND_VAL_SIZE)
#       username        base64 of the user's name, at most 48 bytes decoded
#       timestamp       Unix seconds, decimal; the server allows +-120 s (packet age)
#       version         "3.0.0" (FKO_PROTOCOL_VERSION); never checked by a server
#       type            0-6, the message type (MSG_* below)
#       message         base64 of "ALLOW_IP,tcp/22,udp/53" (type 0: "ALLOW_IP,command");
#                       ALLOW_IP 0.0.0.0 asks for the packet's own source address
#       nat_access      types 2, 4, 5, 6: base64 of "HOST,PORT"
#       server_auth     optional, any text, base64; no fwknop client sets it
#       client_timeout  types 3, 4, 6: seconds, decimal
#
#  2. The SPA digest (fko_digest.c): plaintext P = message ":" b64(SHA-256(message)).  A
#     check inside the encryption, not an authentication; its type (MD5, SHA-1, SHA-2,
#     SHA-3) is known only by its length (DIGESTS_BY_LEN).
#
#  3. Rijndael (cipher_funcs.c), as `openssl enc -aes-256-cbc -md md5 -salt` does it:
#
#       salt          8 random bytes
#       key, IV       EVP_BytesToKey(MD5, passphrase, salt, 1 round): D1 = MD5(pass || salt),
#                     Di = MD5(Di-1 || pass || salt); key = D1 || D2 (32 bytes), IV = D3
#       R             "Salted__" || salt || AES-256-CBC(key, IV, P || PKCS#7 padding)
#
#     The passphrase is KEY_BASE64 decoded (or KEY as it is), never the AES key itself.
#     CTR, CFB and OFB modes work the same way; nothing on the wire says which is used.
#
#  4. Base64 (fko_funcs.c): B = base64(R) without '='.  B always begins with
#     "U2FsdGVkX1" (base64 of "Salted__": B64_RIJNDAEL_SALT), which is cut off the wire.
#
#  5. The HMAC (fko_hmac.c): M = base64(HMAC-SHA-256(HMAC key, B)) without '=', over B
#     *with* its "U2FsdGVkX1" put back, appended with no separator:
#
#       wire = B without "U2FsdGVkX1"  ||  M
#              '-- ciphertext -------'     '-- 43 characters for SHA-256 (HMAC_TYPES)
#
#     140 to 399 characters of A-Z a-z 0-9 + / in one UDP datagram to port 62201.
#
# A server undoes it in the opposite order (unseal; in the server screen(), then judge()):
# length and alphabet; the HMAC, split off by the length of the stanza's HMAC type (the
# packet does not say) and compared in constant time over the text with "U2FsdGVkX1" put
# back; base64, with the '=' padding put back; decryption, where "16 digits and ':'" at
# the start shows that the key was right; the SPA digest; each field (parse_plaintext).
# Base64 everywhere: fwknop writes it without '=' (b64encode) and reads it with or
# without (b64decode).

DEFAULT_PORT = 62201                  # FKO_DEFAULT_PORT: the UDP port knocks go to
MIN_WIRE_LEN = 140                    # MIN_SPA_DATA_SIZE: fwknopd ignores shorter payloads
MAX_WIRE_LEN = 399                    # fwknopd takes 400+ characters as GnuPG, never AES
SALT_PREFIX = b"U2FsdGVkX1"           # B64_RIJNDAEL_SALT: base64 of "Salted__", not on the wire
B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

# HMAC_DIGEST_TYPE -> (hash name, length of the HMAC's base64 text without padding): the
# receiver splits the HMAC off by this length, so the type is the stanza's, not the packet's.
HMAC_TYPES = {
    "md5": ("md5", 22), "sha1": ("sha1", 27), "sha256": ("sha256", 43),
    "sha384": ("sha384", 64), "sha512": ("sha512", 86),
    "sha3_256": ("sha3_256", 43), "sha3_512": ("sha3_512", 86),
}
# The SPA digest's type is known only by its length; 43 and 86 may be SHA-3 too.
DIGESTS_BY_LEN = {22: ("md5",), 27: ("sha1",), 43: ("sha256", "sha3_256"),
                  64: ("sha384",), 86: ("sha512", "sha3_512")}
# ENCRYPTION_MODE: fwknop's Rijndael modes that spa.py speaks (not ECB, legacy IV).
ENCRYPTION_MODES = ("cbc", "ctr", "cfb", "ofb")
# GnuPG instead of Rijndael (step 3'): "hQ" (B64_GPG_PREFIX) is the base64 of 0x85 0x01-0x0f,
# the header of the session key packet that an RSA or ElGamal key of 2048 bits or more
# makes; it is cut off the wire as "U2FsdGVkX1" is.  A GnuPG packet is 400 (MIN_GNUPG_MSG_SIZE)
# to 1500 (MAX_SPA_PACKET_LEN) characters, so its length alone says which kind it is.
GPG_PREFIX = b"hQ"
MIN_GPG_WIRE_LEN = 400
MAX_GPG_WIRE_LEN = 1500

# Message types (fko_message_type_t).  A client timeout turns 1 into 3, 2 into 4 and
# 5 into 6 (fko_client_timeout.c).
MSG_COMMAND = 0                       # FKO_COMMAND_MSG: run a command on the server
MSG_ACCESS = 1                        # FKO_ACCESS_MSG: open ports for the allow IP
MSG_NAT = 2                           # FKO_NAT_ACCESS_MSG: forward a port to another host
MSG_TIMEOUT_ACCESS = 3                # FKO_CLIENT_TIMEOUT_ACCESS_MSG
MSG_TIMEOUT_NAT = 4                   # FKO_CLIENT_TIMEOUT_NAT_ACCESS_MSG
MSG_LOCAL_NAT = 5                     # FKO_LOCAL_NAT_ACCESS_MSG: forward to a port of the server
MSG_TIMEOUT_LOCAL_NAT = 6             # FKO_CLIENT_TIMEOUT_LOCAL_NAT_ACCESS_MSG
MSG_NAMES = {0: "command", 1: "access", 2: "NAT access", 3: "access with timeout",
             4: "NAT access with timeout", 5: "local NAT access",
             6: "local NAT access with timeout"}
TIMEOUT_TYPES = (MSG_TIMEOUT_ACCESS, MSG_TIMEOUT_NAT, MSG_TIMEOUT_LOCAL_NAT)
NAT_TYPES = (MSG_NAT, MSG_TIMEOUT_NAT, MSG_LOCAL_NAT, MSG_TIMEOUT_LOCAL_NAT)
PROTO_NUMBERS = {"tcp": 6, "udp": 17}       # the protocols an access field may name
PROTO_NAMES = {number: name for name, number in PROTO_NUMBERS.items()}
USERNAME_FORBIDDEN = set('"/\\[]:;|=,+*?<>')      # as fko_user.c's validate_username


# --- Base64, as fwknop writes it ------------------------------------------------------

def b64encode(data):
    """Standard base64 without '=' padding, as fwknop writes it (returns bytes)."""
    return base64.b64encode(data).rstrip(b"=")


def b64decode(text):
    """Decode base64 written with or without padding; raise ValueError if malformed."""
    if isinstance(text, str):
        text = text.encode("ascii")
    text = text.rstrip(b"=")
    if len(text) % 4 == 1:
        raise ValueError("truncated base64")
    return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)


# --- 1, 2. The message and its SPA digest ---------------------------------------------

def random_digits(n):
    """n random decimal digits from the system's CSPRNG, uniformly (rejection sampling).

    fwknop's client concatenates rand() values seeded from /dev/urandom; any 16 digits
    do, as long as no one can guess them: they make two packets of one second differ."""
    top = 10 ** n
    limit = (1 << 64) // top * top
    while True:
        value = int.from_bytes(os.urandom(8), "big")
        if value < limit:
            return "%0*d" % (n, value % top)


_DIGITS = frozenset("0123456789")


def parse_access(text, what="access", config=False):
    """Parse 'tcp/22,udp/53' into [("tcp", 22), ("udp", 53)]: the one port-list parser.

    As libfko checks a packet's access field (validate_access_msg), and so the
    fwknop client its -A: items joined by ',' and nothing else, each `tcp/PORT` or
    `udp/PORT` in lower case, PORT 1-65535 in at most 5 digits.  With config=True
    (the server's own lists), as fwknopd reads OPEN_PORTS: blanks around an item and
    the protocol's case do not matter; nothing else is forgiven.
    """
    result = []
    for item in text.split(","):
        word = item.strip() if config else item
        proto, sep, port = word.partition("/")
        proto = proto.lower() if config else proto
        if not sep or proto not in PROTO_NUMBERS or not 1 <= len(port) <= 5 \
                or not set(port) <= _DIGITS or not 1 <= int(port) <= 65535:
            hint = ""
            if not config and item != "".join(item.split()):
                hint = " (no blanks: tcp/22,udp/53)"
            elif not config and item != item.lower():
                hint = " (in lower case)"
            raise ValueError("%s %r: expected tcp/PORT or udp/PORT with PORT 1-65535%s"
                             % (what, item, hint))
        result.append((proto, int(port)))
    return result


def format_access(access):
    """[("tcp", 22), ("udp", 53)] as 'tcp/22,udp/53': the one way a port list is written
    (parse_access reads it back)."""
    return ",".join("%s/%d" % pp for pp in access)


class Message(object):
    """The fields of one SPA message, fwknop's names in fwknop's order (step 1).

    `access` is a port list [("tcp", 22), ...]; a command message (type 0) carries
    `command` instead.  `digest_type` names the SPA digest's hash (step 2)."""

    __slots__ = ("rand", "username", "timestamp", "version", "msg_type", "allow_ip",
                 "access", "nat_access", "server_auth", "client_timeout", "digest_type",
                 "command")

    def __init__(self, username, allow_ip, access, client_timeout=0, timestamp=None,
                 rand=None, version="3.0.0", msg_type=None, nat_access=None,
                 server_auth=None, digest_type="sha256", command=None):
        self.rand = rand if rand is not None else random_digits(16)
        self.username = username
        self.timestamp = int(time.time()) if timestamp is None else timestamp
        self.version = version
        if msg_type is None:
            msg_type = MSG_TIMEOUT_ACCESS if client_timeout else MSG_ACCESS
        self.msg_type = msg_type
        self.allow_ip = allow_ip
        self.access = list(access)            # [("tcp", 22), ...]
        self.nat_access = nat_access
        self.server_auth = server_auth
        self.client_timeout = client_timeout
        self.digest_type = digest_type
        self.command = command                # type 0 (command) messages carry this instead

    def access_text(self):
        """The access part of the message field: 'tcp/22,udp/53'."""
        return format_access(self.access)

    def encode(self):
        """The plaintext that gets encrypted: fields joined by ':' and the SPA digest.
        parse_plaintext() is its mirror."""
        fields = [self.rand, b64encode(self.username.encode()).decode(), str(self.timestamp),
                  self.version, str(self.msg_type),
                  b64encode(("%s,%s" % (self.allow_ip, self.command if self.msg_type == MSG_COMMAND
                                        else self.access_text())).encode()).decode()]
        if self.nat_access is not None:
            fields.append(b64encode(self.nat_access.encode()).decode())
        if self.server_auth is not None:
            fields.append(b64encode(self.server_auth.encode()).decode())
        if self.msg_type in TIMEOUT_TYPES:
            fields.append(str(self.client_timeout))
        body = ":".join(fields).encode()
        return body + b":" + b64encode(hash_digest(self.digest_type, body))

    def describe(self):
        """Human-readable field dump for `client --test -v` and debug logs (no key material)."""
        rows = [("random value", self.rand), ("username", self.username),
                ("timestamp", self.timestamp), ("version", self.version),
                ("message type", "%d (%s)" % (self.msg_type, MSG_NAMES.get(self.msg_type, "?"))),
                ("allow ip", self.allow_ip)]
        rows.append(("command", self.command) if self.msg_type == MSG_COMMAND
                    else ("access", self.access_text()))
        if self.nat_access is not None:
            rows.append(("nat access", self.nat_access))
        if self.msg_type in TIMEOUT_TYPES:
            rows.append(("client timeout", self.client_timeout))
        rows.append(("digest type", self.digest_type))
        return "\n".join("%-15s %s" % row for row in rows)


# --- 3. Rijndael: OpenSSL's salted encryption -----------------------------------------

def derive_key_iv(passphrase, salt):
    """OpenSSL's EVP_BytesToKey with MD5 and one round: AES-256 key and IV.

    fwknop uses its key as a passphrase, not as the AES key itself (fwknopd's manual
    calls this PBKDF1), so a key of any length up to 32 bytes gives an AES-256 key.
    """
    material, block = b"", b""
    while len(material) < 48:
        block = hash_digest("md5", block + passphrase + salt)
        material += block
    return material[:32], material[32:48]


def encrypt(plaintext, passphrase, mode="cbc", salt=None):
    """Encrypt as `openssl enc -aes-256-<mode> -md md5` does: "Salted__" + salt + ciphertext."""
    salt = os.urandom(8) if salt is None else salt
    key, iv = derive_key_iv(passphrase, salt)
    pad = 16 - len(plaintext) % 16                # PKCS#7, in every mode, as fwknop does
    return b"Salted__" + salt + aes_crypt(key, iv, plaintext + bytes([pad]) * pad, mode)


def decrypt(raw, passphrase, mode="cbc"):
    """Reverse of encrypt(); raise Reject when the padding shows a wrong key or mode.

    The salt is read from bytes 8-15; like fwknop, "Salted__" itself is not checked."""
    if len(raw) < 32 or len(raw) % 16:
        raise Reject("ciphertext length %d is not whole AES blocks" % len(raw))
    key, iv = derive_key_iv(passphrase, raw[8:16])
    padded = aes_crypt(key, iv, raw[16:], mode, decrypt=True)
    pad = padded[-1]
    if not 1 <= pad <= 16 or padded[-pad:] != bytes([pad]) * pad:
        raise Reject("decryption failed (key_base64 or encryption_mode differ from the client's)")
    return padded[:-pad]


# --- 4, 5. Base64, the prefix cut off, the HMAC: the wire -----------------------------

def hmac_b64(key, data, hmac_type):
    """The HMAC of `data` as fwknop appends it: base64 without padding."""
    return b64encode(Hmac(key, HMAC_TYPES[hmac_type][0]).digest(data))


def seal(plaintext, key, hmac_key, hmac_type="sha256", mode="cbc", salt=None):
    """Encrypt, then MAC: the wire text of one packet (bytes).  unseal() is its mirror.

    The HMAC covers the base64 text with "U2FsdGVkX1" (SALT_PREFIX) on it; the wire
    leaves that prefix out, as every fwknop packet starts with it."""
    text = b64encode(encrypt(plaintext, key, mode, salt))
    return text[len(SALT_PREFIX):] + hmac_b64(hmac_key, text, hmac_type)


def gpg_seal(plaintext, gpg, hmac_key, hmac_type="sha256"):
    """fwknop's GnuPG packet (fko_encryption.c gpg_encrypt): step 3 done by `gpg` (a GnuPG:
    encrypted to its recipient, signed by its signer if it has one), then as seal() with
    "hQ" (GPG_PREFIX) in the place of "U2FsdGVkX1".  The HMAC stays: the server's gpg only
    ever reads authenticated bytes."""
    text = b64encode(gpg.encrypt(plaintext))
    if not text.startswith(GPG_PREFIX):
        raise SpaError("gpg's packet does not start with 'hQ': fwknop's GnuPG mode needs an "
                       "RSA (or ElGamal) recipient key of 2048 bits or more")
    return text[len(GPG_PREFIX):] + hmac_b64(hmac_key, text, hmac_type)


# --- Taking a packet apart: the mirror of seal() and of Message.encode() --------------

def authenticate(wire, mac, mac_len, prefix=SALT_PREFIX, signer=None):
    """The signed text, "U2FsdGVkX1" (a GnuPG packet's "hQ") put back, if `mac` (an Hmac
    with the HMAC key and that prefix fed in already) made the HMAC that ends the wire
    (Hmac.signs: its last `mac_len` characters, as the stanza's HMAC type says: a packet
    does not), else None.  `signer`: the Hmac hmac_sieve() found made it: if that is
    `mac`, its HMAC is not computed again."""
    if mac is signer or mac.signs(wire, mac_len):
        return prefix + wire[:-mac_len]
    return None


def decrypt_signed(signed, key, mode):
    """The plaintext of an authenticated packet's signed text; Reject if it is not one.

    The first 16 characters must be digits and the 17th ':' (the random value and its
    separator): as libfko checks, what shows that the key was right, since AES itself
    decrypts anything."""
    try:
        raw = b64decode(signed)
    except ValueError:
        raise Reject("authenticated, but not valid base64")
    plaintext = decrypt(raw, key, mode)
    if not (plaintext[:16].isdigit() and plaintext[16:17] == b":"):
        raise Reject("decryption failed: not a message (key_base64 or encryption_mode differ "
                     "from the client's, or the random value is not 16 digits)")
    return plaintext


def unseal(wire, key, hmac_key, hmac_type="sha256", mode="cbc"):
    """The plaintext of a packet, the mirror of seal(): its HMAC checked, then decrypted
    (decrypt_signed); Reject says what failed.  parse_plaintext() then reads its fields.

    The server does the same in two processes, with each stanza's HMAC state made once:
    screen() in the packet reader, judge() in the privileged parent.
    """
    mac = Hmac(hmac_key, HMAC_TYPES[hmac_type][0], SALT_PREFIX)
    signed = authenticate(wire, mac, HMAC_TYPES[hmac_type][1])
    if signed is None:
        raise Reject("HMAC does not match")
    return decrypt_signed(signed, key, mode)


def _b64_field(text, limit, name):
    """A base64 field's text (username, message, nat_access, server_auth): at most
    `limit` characters (libfko's MAX_SPA_*_SIZE), ASCII once decoded."""
    if not 1 <= len(text) <= limit:
        raise Reject("%s field has %d base64 characters (1-%d allowed)" % (name, len(text), limit))
    try:
        return b64decode(text).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise Reject("%s field is not base64 of ASCII text" % name)


# Printable ASCII that a username may hold, to delete with str.translate.
_USERNAME_ASCII = {c: None for c in range(32, 127) if chr(c) not in USERNAME_FORBIDDEN}


def _valid_username(name):
    """Letters and digits (any script), and printable ASCII but fwknop's forbidden marks."""
    rest = name.translate(_USERNAME_ASCII)
    return bool(name) and (not rest or rest.isalnum())


def _is_ipv4(text):
    """Strict dotted quad, as fwknop's allow IP must be."""
    parts = text.split(".")
    if len(parts) != 4:
        return False
    for p in parts:
        # No leading zeros: inet_aton (nft, fwknopd) reads 010 as octal, Python as decimal.
        if not (p.isdigit() and len(p) <= 3 and int(p) <= 255 and p == str(int(p))):
            return False
    return True


def _digest_checked(plaintext):
    """(the message, the SPA digest's type) of a plaintext whose digest matches."""
    try:
        text = plaintext.decode("ascii")
    except UnicodeDecodeError:
        raise Reject("plaintext is not ASCII")
    if not text.isprintable():
        raise Reject("plaintext has control characters")
    body, _, inner = text.rpartition(":")
    for name in DIGESTS_BY_LEN.get(len(inner), ()):
        if compare_digest(b64encode(hash_digest(name, body.encode())), inner.encode()):
            return body, name
    raise Reject("inner digest does not match the message")


def _optional_fields(msg_type, rest):
    """(nat_access, server_auth, client_timeout) from the fields after the message: the
    NAT field first for NAT types, the timeout last for timeout types, and what is left
    between them, if anything, is server_auth (fko_decode.c)."""
    nat_access = server_auth = None
    client_timeout = 0
    if msg_type in NAT_TYPES:
        if not rest:
            raise Reject("NAT message without its NAT field")
        nat_access = _b64_field(rest.pop(0), 256, "NAT access")
    if msg_type in TIMEOUT_TYPES:
        if not rest or not rest[-1].isdigit() or len(rest[-1]) > 5 or int(rest[-1]) > 65536:
            raise Reject("client timeout is not a number from 0 to 65536")
        client_timeout = int(rest.pop())
    if len(rest) > 1:
        raise Reject("message has %d unexpected fields" % (len(rest) - 1))
    if rest:
        server_auth = _b64_field(rest[0], 64, "server auth")
    return nat_access, server_auth, client_timeout


def _access_or_command(msg_type, message):
    """(allow IP, port list, command) of a decoded message field: "ALLOW_IP,tcp/22,..."
    (fko_message.c), or "ALLOW_IP,command" for a command message."""
    allow_ip, sep, spec = message.partition(",")
    if not sep:
        raise Reject("message has no allow IP")
    if not _is_ipv4(allow_ip):
        raise Reject("allow IP %r is not an IPv4 address" % allow_ip[:16])
    if msg_type == MSG_COMMAND:
        if not spec:
            raise Reject("command message without a command")
        return allow_ip, [], spec
    if spec != spec.lower():
        raise Reject("access %r is not lower case" % spec[:40])
    try:
        return allow_ip, parse_access(spec), None
    except ValueError as e:
        raise Reject(str(e))


def parse_plaintext(plaintext):
    """The Message in a decrypted plaintext, the mirror of Message.encode(): the SPA
    digest and every field checked as libfko checks them (fko_decode.c); Reject says
    which failed.

    Only ever called on authenticated bytes: the HMAC has already passed.
    """
    body, digest_type = _digest_checked(plaintext)
    fields = body.split(":")
    if len(fields) < 6:
        raise Reject("message has %d fields, at least 6 needed" % len(fields))
    rand, user, stamp, version, mtype, message = fields[:6]
    if len(rand) != 16 or not rand.isdigit():
        raise Reject("random value is not 16 digits")
    username = _b64_field(user, 64, "username")
    if not _valid_username(username):
        raise Reject("username has characters fwknop does not allow")
    if not stamp.isdigit() or len(stamp) > 12:
        raise Reject("timestamp is not a number")
    if not 1 <= len(version) <= 8:
        raise Reject("version field has %d characters (1-8 allowed)" % len(version))
    if not mtype.isdigit() or len(mtype) > 2 or int(mtype) > 6:
        raise Reject("unknown message type %r" % mtype)
    msg_type = int(mtype)
    message = _b64_field(message, 256, "message")
    nat_access, server_auth, client_timeout = _optional_fields(msg_type, fields[6:])
    allow_ip, access, command = _access_or_command(msg_type, message)
    return Message(username, allow_ip, access, client_timeout, int(stamp), rand, version,
                   msg_type, nat_access, server_auth, digest_type, command)


# --- The decision: a pure function of (payload, source, now, policy, replay state) ----
#
# decide() answers for one packet: accept (open what for whom, how long) or refuse
# (why).  It reads no clock unless asked to, and changes nothing: its caller records the
# replay key and opens the firewall.  The server runs it in two halves, so that the
# process that reads the network never holds the AES key: screen() in the packet reader
# (length, alphabet, HMAC) and judge() in the privileged parent (the rest).  A stanza (the
# policy section's Stanza) brings what the decision asks of the config: matches_source(),
# its HMAC state (mac, mac_len), its AES key and mode, and authorize().

class Decision(object):
    """What the server should do with one packet, and why."""

    __slots__ = ("accepted", "reason", "source", "stanza", "replay_key", "message",
                 "allow_ip", "timeout", "nat", "nat_mode", "interface", "hooks")

    def __init__(self, source, reason=None):
        self.accepted = False
        self.reason = reason
        self.source = source
        self.stanza = self.replay_key = self.message = self.allow_ip = None
        self.timeout = 0
        self.nat = self.interface = self.hooks = None
        self.nat_mode = PLAIN_NAT


def screen(payload, source, stanzas, destination=None, signer=None):
    """Steps 1 and 2 of decide(), all the packet reader does: (the first stanza whose source
    (and, given `destination`, whose destination: fwknop's DESTINATION) matches and whose
    HMAC key made the packet's HMAC, the signed text with the prefix put back), or (None,
    why not).  Nothing else ever reads unauthenticated bytes.  The packet reader leaves
    the destination out (a first sieve); the gatekeeper gives it.  `signer`: the Hmac
    that hmac_sieve() found made this payload's HMAC (the reader's), not computed again.

    This is the path every flood packet takes, so it allocates as little as it can.
    """
    # 1. Length and alphabet; 400 characters or more is a GnuPG packet, as for fwknopd.
    gpg = len(payload) > MAX_WIRE_LEN
    if len(payload) < MIN_WIRE_LEN or gpg and not (
            len(payload) <= MAX_GPG_WIRE_LEN and any(s.gpg_mac is not None for s in stanzas)):
        return None, "length %d outside %d-%d" % (len(payload), MIN_WIRE_LEN, MAX_WIRE_LEN)
    if payload.translate(None, B64_ALPHABET):
        return None, "not base64"
    # 2. HMAC against each stanza whose source matches: the first that authenticates wins.
    matched = False
    for stanza in stanzas:
        if stanza.sources is not None and not stanza.matches_source(source):
            continue
        if destination is not None and stanza.destinations is not None and \
                not stanza.matches_destination(destination):
            continue
        mac = stanza.gpg_mac if gpg else stanza.mac
        if mac is None:
            continue
        matched = True
        signed = authenticate(payload, mac, stanza.mac_len, GPG_PREFIX if gpg else SALT_PREFIX,
                              signer)
        if signed is not None:
            return stanza, signed
    return None, ("HMAC does not match any stanza for this source" if matched
                  else "no %sstanza for source %s%s" % (
                      "GnuPG " if gpg else "", source,
                      "" if destination is None else " and destination %s" % destination))


def hmac_sieve(stanzas, payload_of=None):
    """screen()'s first cut, for the flood's path: a function of a list of frames that
    gives those whose payload a stanza's key signed, as (frame, that key's Hmac) pairs
    (its GnuPG one, for a payload longer than an AES packet can be), and appends the
    others to `refused` if that is a list.  screen() then refuses them too, whatever
    their source: the packet reader runs this on every packet, and screen() only on
    those it lets through (told the signer, whose HMAC it then skips), or to say why it
    refuses one it logs.  It reads nothing but the length and the HMAC (not even the
    alphabet).

    `payload_of(frame)` gives a frame's payload; None for UDP alone, whose payload is
    read here as bpf_filter passed it (a UDP header, its length field included, after
    the IPv4 header's length or IPv6's 40 bytes; udp_payload without its checks): every
    packet of a flood runs this loop, so it makes no call but the hash's (Hmac.signs
    written out)."""
    def keys(macs):
        return tuple((mac.inner.copy, mac.outer.copy, mac_len, mac) for mac, mac_len in macs)
    aes = keys((s.mac, s.mac_len) for s in stanzas if s.mac is not None)
    gpg = keys((s.gpg_mac, s.mac_len) for s in stanzas if s.gpg_mac is not None)
    shortest, aes_longest = MIN_WIRE_LEN, MAX_WIRE_LEN
    longest = MAX_GPG_WIRE_LEN if gpg else MAX_WIRE_LEN
    same, base64 = compare_digest, b2a_base64

    def sieve(frames, refused=None):
        passed = []
        for frame in frames:
            if payload_of is None:
                try:
                    udp = (frame[0] & 15) * 4 + 8 if frame[0] < 0x60 else 48
                    payload = frame[udp:udp - 8 + ((frame[udp - 4] << 8) | frame[udp - 3])]
                except IndexError:            # shorter than bpf_filter lets through
                    payload = b""
            else:
                payload = payload_of(frame)
            length = len(payload)
            if shortest <= length <= longest:
                for inner, outer, mac_len, mac in (aes if length <= aes_longest else gpg):
                    digest = inner()
                    digest.update(payload[:-mac_len])
                    tag = outer()
                    tag.update(digest.digest())
                    if same(base64(tag.digest())[:mac_len], payload[-mac_len:]):
                        passed.append((frame, mac))
                        break
                else:
                    if refused is not None:
                        refused.append(frame)
            elif refused is not None:
                refused.append(frame)
        return passed
    return sieve


def _packet_sha256(signed):
    """The SHA-256 of an authenticated packet's ciphertext (of the signed text itself if
    that is not base64).  fwknop hashes the wire text; the ciphertext is the same for
    every form the wire may take."""
    try:
        data = b64decode(signed)
    except ValueError:
        data = signed
    return hash_digest("sha256", data)


def packet_key(signed):
    """The replay key of an authenticated packet: the base64 of _packet_sha256()."""
    return b64encode(_packet_sha256(signed)).decode()


def packet_digest(signed):
    """What the replay cache keeps of the packet's replay key, made straight from the
    packet (the packet reader's form: no base64 made and read back)."""
    return _packet_sha256(signed)[:16]


def open_signed(stanza, signed, seen):
    """(plaintext, replay key) of an authenticated packet's signed text: decrypted with the
    stanza's AES key, or (it starts with "hQ") by its GnuPG keyring, whose signer the
    stanza must accept (Stanza.gpg_open).  Reject if not.  A GnuPG packet's replay key is
    checked before gpg runs: anyone may encrypt to a public key, so only the signature
    (or, without gpg_require_sig, the decryption) vouches for it."""
    if signed[:len(GPG_PREFIX)] != GPG_PREFIX:
        return decrypt_signed(signed, stanza.key, stanza.mode), packet_key(signed)
    key = packet_key(signed)
    if seen(key):
        raise Reject("replayed packet")
    try:
        raw = b64decode(signed)
    except ValueError:
        raise Reject("authenticated, but not valid base64")
    plaintext = stanza.gpg_open(raw)
    if not (plaintext[:16].isdigit() and plaintext[16:17] == b":"):
        raise Reject("gpg decrypted it, but it is not a message")
    return plaintext, key


def judge(stanza, signed, source, now, seen, max_age):
    """Steps 3 to 7 of decide(), the gatekeeper's part, on a packet `stanza` authenticated:
    decrypt, inner digest and fields, replay cache, packet age, the stanza's policy.

    `replay_key` is set once the plaintext shows the stanza's AES key made it (16 digits
    and a colon: no one else can make that; a GnuPG packet: once its signature passed, or
    without gpg_require_sig, its decryption), and from then on the caller must record it,
    accepted or not.  A packet that authenticates but does not decrypt is not recorded
    (as fwknopd does not): it can never open anything, and recording it would let
    whoever holds only the HMAC key (a compromised packet reader) fill the cache.
    """
    decision = Decision(source)
    now = time.time() if now is None else now
    decision.stanza = stanza
    try:
        # 3. Decrypt, 4. inner digest and fields.
        plaintext, decision.replay_key = open_signed(stanza, signed, seen)
        msg = parse_plaintext(plaintext)
        decision.message = msg
        # 5. Replay cache, 6. packet age, 7. stanza policy.
        if seen(decision.replay_key):
            raise Reject("replayed packet")
        age = int(now) - msg.timestamp          # whole seconds, as fwknopd counts
        if abs(age) > max_age:
            raise Reject("packet age %+d s outside the %d s window (check the client's clock)"
                         % (age, max_age))
        decision.allow_ip, decision.timeout, decision.nat = stanza.authorize(msg, source, now)
        if decision.nat is not None and not decision.nat.local:
            decision.nat_mode = stanza.nat_mode(_family(decision.allow_ip))
    except Reject as e:
        decision.reason = str(e)
        return decision
    except Exception as e:   # a bug must not stop the server or open anything
        decision.reason = "internal error %s: %s" % (type(e).__name__, e)
        return decision
    decision.accepted = True
    return decision


def decide(payload, source, now, stanzas, seen, max_age, destination=None):
    """Decide on one captured UDP payload from address `source` (text) at time `now`
    (None: the clock is read only for a packet that authenticates).

    `stanzas` are the Stanza objects in config order; `seen(replay_key)` tells
    whether a packet was already used.  Never raises: every problem becomes a
    Decision with `accepted` False and a `reason`.  Whenever `replay_key` is set
    (the packet authenticates and decrypts), the caller must record it, accepted or
    not, so no such packet can be used twice.  The server runs this in two halves:
    screen() in the packet reader, judge() in the privileged parent.  `destination`:
    where the packet was sent (the stanzas' DESTINATION); None checks none.
    """
    stanza, signed = screen(payload, source, stanzas, destination)
    if stanza is None:
        return Decision(source, signed)
    return judge(stanza, signed, source, now, seen, max_age)


# ---------------------------------------------------------------------------
# Files: keys read privately, state written durably
# ---------------------------------------------------------------------------
#
# A file that holds keys is read only if no one else may read it (check_private_file),
# and never echoed; a file the server writes (the replay cache, the saved firewall, the
# installed launcher) is written to a new file next to it and renamed over it at once
# (replace_file), in a directory no one else may write to (check_private_dir), never
# through a symlink someone planted.

# Key files read where their permissions cannot be checked (no POSIX modes: Windows),
# for the client to say so.
UNCHECKED_FILES = []


def check_private_file(path):
    """Refuse a key-bearing file that group or others can read, or that is not ours.

    Windows has no POSIX owners and modes (no os.geteuid; a mode there says only
    whether a file is read-only): there neither can be checked, and the file is
    listed in UNCHECKED_FILES for the client to say so.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise SpaError("cannot read %s: %s" % (path, e.strerror))
    except ValueError:                     # a NUL byte in the name
        raise SpaError("%r is not a usable file name" % path)
    check_private_stat(st, path)


def check_private_stat(st, path, fix=None):
    """check_private_file's test of an os.stat() result: also for a file already open (a
    key file given on stdin or --fd).  `fix`: what to say instead of 'chmod 600 PATH'."""
    if not hasattr(os, "geteuid"):
        UNCHECKED_FILES.append(path)
        return
    if st.st_mode & 0o077:
        raise SpaError("%s holds keys but is readable by group or others (mode %04o): "
                       "%s" % (path, st.st_mode & 0o7777, fix or "run 'chmod 600 %s'" % path))
    if st.st_uid not in (0, os.geteuid()):
        raise SpaError("%s holds keys but belongs to another user (uid %d)" % (path, st.st_uid))


def read_private_text(path):
    """The text of a key-bearing file, after the permission check: the one place that reads one."""
    check_private_file(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SpaError("cannot read %s: %s" % (path, e.strerror))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpaError("%s is not UTF-8 text (byte %d)" % (path, e.start))


def check_private_dir(path, writers=0o022):
    """Why a directory where root keeps state or code is unsafe (one line), or None.

    It must be a directory that belongs to root (or to this user) and that no one else may
    write to (`writers`: group or others; others alone for install's directories, where
    Debian lets the group staff write): whoever can write there can swap the files root
    writes or runs.  (Checked on the modes: as root, os.access() says yes to everything.)
    """
    try:
        st = os.stat(path)
    except OSError as e:
        return "cannot use %s: %s" % (path, e.strerror)
    if not os.path.isdir(path):
        return "%s is not a directory" % path
    if st.st_uid not in (0, os.geteuid()):
        return "%s belongs to uid %d, not to root: run 'chown root: %s'" % (path, st.st_uid, path)
    if st.st_mode & writers:
        return "%s is writable by %s (mode %04o): run 'chmod %s-w %s'" % (
            path, "group or others" if writers & 0o020 else "others", st.st_mode & 0o7777,
            "go" if writers & 0o020 else "o", path)
    return None


def sync_file(fd):
    """Make what was written durable: fdatasync where there is one (it skips timestamps)."""
    getattr(os, "fdatasync", os.fsync)(fd)


def write_all(fd, data):
    """os.write until all of `data` is written (a short write raises on the next call)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def create_temp_file(path, mode=0o600):
    """(name, fd) of a new file next to `path`, with a random name, created only if no file,
    link or symlink has that name (O_EXCL, O_NOFOLLOW): nothing planted is ever followed."""
    for _ in range(10):
        name = "%s.%s.tmp" % (path, binascii.hexlify(os.urandom(6)).decode())
        try:
            return name, os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                                 getattr(os, "O_NOFOLLOW", 0), mode)
        except FileExistsError:
            continue
    raise OSError(17, "cannot make a temporary file next to %s" % path)


def replace_file(path, write, mode=0o600, owner=None, check=None):
    """Write a file anew and swap it in atomically, the one way spa.py writes a file that
    matters (the replay cache, the saved firewall, the server config, the installed
    files): `write(fd)` fills a new file made next to it (create_temp_file), which gets
    `mode` (whatever the umask) and `owner` ((uid, gid) if given), is synced, may be
    refused by `check(its name)` (SpaError), and is renamed over `path` (a symlink there is
    replaced, never followed).  If anything fails the new file is removed and `path` left
    as it was."""
    tmp, fd = create_temp_file(path, mode)
    try:
        try:
            write(fd)
            if hasattr(os, "fchmod"):       # (Windows has no modes to speak of)
                os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
            os.fsync(fd)
        finally:
            os.close(fd)
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise



def reopen_appending(path, old_fd=None):
    """After replace_file swapped in a journal's new copy (the replay cache, the pending
    closes): close `old_fd` (the replaced file's, if any), make the rename durable (fsync
    of the directory), and return a descriptor that appends to the new file."""
    if old_fd is not None:
        os.close(old_fd)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)

def write_file(path, text, mode=0o644, check=None):
    """Replace `path` with `text` at once (replace_file), keeping an existing file's mode and
    owner; the folder is made if it is missing.  `check(new name)`, if given, may refuse the
    new file (SpaError) before it replaces the old one."""
    import locale
    os.makedirs(os.path.dirname(os.path.abspath(path)), 0o755, exist_ok=True)
    owner = None
    try:
        st = os.lstat(path)
        mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        pass
    data = text.encode(locale.getpreferredencoding(False))     # as open(path, "w") writes
    replace_file(path, lambda fd: write_all(fd, data), mode, owner, check)


def read_pending_closes(path):
    """({id: close}, lines that could not be read) of a PendingCloses journal, read only;
    a missing file holds nothing."""
    import json
    pending, skipped = {}, 0
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return pending, skipped
    except (OSError, UnicodeDecodeError) as e:
        raise SpaError("cannot read %s: %s" % (path, getattr(e, "strerror", None) or e))
    for line in lines:
        try:
            entry = json.loads(line)
            if "done" in entry:
                pending.pop(str(entry["done"]), None)
                continue
            if not (isinstance(entry["argv"], list) and entry["argv"]
                    and all(isinstance(a, str) for a in entry["argv"])):
                raise ValueError("argv")
            entry["due"], entry["key"] = float(entry["due"]), tuple(entry["key"])
            entry["user"], entry["what"] = str(entry["user"]), str(entry["what"])
            pending[str(entry["id"])] = entry
        except (ValueError, KeyError, TypeError, AttributeError):
            skipped += 1
    return pending, skipped


def _read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


# --- GnuPG keyrings and the gpg binary --------------------------------------------------
#
# fwknop's GnuPG mode through the `gpg` binary (GnuPG 2; fwknop uses gpgme, which runs the
# same binary): argument lists, never a shell; a passphrase only ever through a pipe
# (--pinentry-mode loopback --passphrase-fd), never on a command line; the results read
# from --status-fd, not from gpg's messages.  The server runs gpg as its own unprivileged
# user (gpg_user, spa-gpg) on a private copy of each keyring (private_keyring), with a
# time limit, and only on bytes whose HMAC has passed.

GPG_TIMEOUT = 10.0        # seconds one gpg run may take
GPG_USER = "spa-gpg"      # the server's gpg runs as this user (gpg_user)
GPG_MAX_OUTPUT = 4096     # bytes of plaintext the server's gpg may write (a message: < 1500)


def _gpg_status(text):
    """{keyword: [the words after it, for each line]} of gpg's --status-fd output."""
    status = {}
    for line in text.decode("utf-8", "replace").splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "[GNUPG:]":
            status.setdefault(words[1], []).append(words[2:])
    return status


def _become(user):
    """A preexec_fn that makes the child `user`, with that user's group and no others."""
    import pwd
    pw = pwd.getpwnam(user)

    def become():
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    return become


def _bad_passphrase(status):
    """Whether gpg's status says a passphrase was wrong or missing (GPG_ERR_BAD_PASSPHRASE,
    GPG_ERR_CANCELED, GPG_ERR_NO_PASSPHRASE in an ERROR or FAILURE line)."""
    codes = [words[-1] for key in ("ERROR", "FAILURE") for words in status.get(key, [])]
    return "BAD_PASSPHRASE" in status or any(
        code.isdigit() and int(code) & 0xFFFF in (11, 99, 177) for code in codes)


class GnuPG(object):
    """The gpg binary on one keyring (`home`, None: gpg's default), run as `user` (None:
    as this process).  `agent`: let gpg-agent ask for passphrases (its pinentry) instead
    of passing them through a pipe.  `server`: the server's, which never runs gpg as root,
    reads no gpg.conf (--no-options: no key servers, nothing a keyring's owner set), and
    takes at most GPG_MAX_OUTPUT bytes of plaintext (no decompression bomb)."""

    def __init__(self, home=None, user=None, agent=False, server=False, timeout=GPG_TIMEOUT):
        self.home, self.user, self.agent = home, user, agent
        self.server, self.timeout = server, timeout
        self.recipient = self.signer = self.passphrase = None

    def run(self, args, data, passphrase=None):
        """(exit status, stdout, {status keyword: [words]}) of one gpg run on `data`."""
        import subprocess
        gpg = find_tool("gpg")
        if gpg is None:
            raise SpaError("gpg not found: install GnuPG (Debian: apt-get install gnupg)")
        if self.server and self.user is None and hasattr(os, "geteuid") \
                and os.geteuid() == 0:
            raise SpaError("refusing to run gpg as root: the server runs it as gpg_user")
        status_r, status_w = os.pipe()
        pass_r = pass_w = None
        argv = [gpg, "--batch", "--no-tty", "--quiet", "--status-fd", str(status_w)]
        if self.server:
            argv += ["--no-options", "--no-auto-key-retrieve", "--max-output", str(GPG_MAX_OUTPUT)]
        if self.home:
            argv += ["--homedir", self.home]
        if not self.agent:
            pass_r, pass_w = os.pipe()
            argv += ["--pinentry-mode", "loopback", "--passphrase-fd", str(pass_r)]
            os.write(pass_w, (passphrase or b"") + b"\n")     # small: the pipe holds it
            os.close(pass_w)
        env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "LC_ALL": "C"}
        if self.user is not None:
            env["HOME"] = self.home or "/nonexistent"
        else:
            env.update((k, v) for k, v in os.environ.items()
                       if k in ("HOME", "GNUPGHOME", "GPG_TTY", "DISPLAY", "GPG_AGENT_INFO"))
        keep = [fd for fd in (status_w, pass_r) if fd is not None]
        try:
            proc = subprocess.Popen(argv + args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=keep, env=env,
                                    preexec_fn=_become(self.user) if self.user else None)
        except OSError as e:
            os.close(status_r)
            raise SpaError("cannot run %s: %s" % (gpg, e.strerror or e))
        finally:
            for fd in keep:
                os.close(fd)
        with os.fdopen(status_r, "rb") as status_file:
            try:
                out, _ = proc.communicate(data, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise Reject("gpg took more than %g s" % self.timeout)
            # gpg has written its status and exited; should a gpg-agent it started hold the
            # pipe too, the read must not wait for that.
            os.set_blocking(status_r, False)
            try:
                status = _gpg_status(status_file.read() or b"")
            except BlockingIOError:
                status = {}
        return proc.returncode, out, status

    def encrypt(self, plaintext):
        """The binary OpenPGP message of `plaintext`: encrypted to self.recipient, and signed
        by self.signer (with self.passphrase) if there is one (fwknop's gpg_encrypt)."""
        args = ["--trust-model", "always", "--compress-algo", "none", "--encrypt",
                "--recipient", self.recipient]
        if self.signer:
            args += ["--sign", "--local-user", self.signer]
        code, out, status = self.run(args + ["--output", "-"], plaintext, self.passphrase)
        if code != 0 or "END_ENCRYPTION" not in status:
            why = status.get("INV_RECP") and "no usable key %s" % self.recipient or \
                status.get("INV_SGNR") and "no usable signing key %s" % self.signer or \
                _bad_passphrase(status) and "wrong or no passphrase for %s" % self.signer or \
                " ".join((status.get("FAILURE") or [[]])[0]) or "exit %d" % code
            raise SpaError("gpg could not encrypt%s: %s (keyring %s)" % (
                " and sign" if self.signer else "", why, self.home or "the default"))
        return out

    def decrypt(self, raw, passphrase=None, key_id=None):
        """(plaintext, the fingerprints of the key that made its one good signature and of
        its primary key, or () if unsigned); Reject if it does not decrypt with a secret key
        (with `key_id`, hex: that one) of the keyring, or its signature is bad.  The
        signature is not weighed by the web of trust: the stanza names the signers it
        accepts."""
        code, out, status = self.run(["--trust-model", "always", "--decrypt", "--output", "-"],
                                     raw, passphrase)
        used = [word.upper() for words in status.get("DECRYPTION_KEY", []) for word in words[:2]]
        if "DECRYPTION_OKAY" not in status or "DECRYPTION_FAILED" in status:
            # gpg 2.4 says NO_SECKEY after a bad passphrase too: the passphrase first.
            why = ("wrong or no gpg_decrypt_pw" if _bad_passphrase(status) else
                   "no secret key for it in the keyring" if "NO_SECKEY" in status else
                   "wrong or no gpg_decrypt_pw" if not used and "KEY_CONSIDERED" in status
                   else "gpg exit %d" % code)
            raise Reject("gpg could not decrypt it: %s" % why)
        if not used:       # a passphrase (a symmetric session key), not a key, opened it
            raise Reject("gpg decrypted it without a key of the keyring")
        if key_id and not any(fpr.endswith(key_id) for fpr in used):
            raise Reject("encrypted to %s, not to gpg_decrypt_id" % used[0])
        signatures = status.get("NEWSIG", [])
        if not signatures:
            return out, ()
        valid = status.get("VALIDSIG", [])
        if len(signatures) != 1 or len(valid) != 1 or "GOODSIG" not in status:
            bad = [k for k in ("BADSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "ERRSIG")
                   if k in status]
            raise Reject("its signature does not check (%s)" % (
                ", ".join(bad) if bad else "%d signatures" % len(signatures)))
        return out, (valid[0][0].upper(), valid[0][-1].upper())


def private_keyring(home, user):
    """A copy of the keyring directory `home` that only `user` may read (a new directory of
    mode 0700 that `user` owns, under /run, else the temporary directory), for the server's
    gpg to run on as that user: it never sees the real keyring, nor the real keyring it.
    Only regular files are copied (no agent sockets, no symlinks)."""
    import pwd
    import shutil
    import tempfile
    pw = pwd.getpwnam(user)
    try:
        st = os.stat(home)
    except OSError as e:
        raise SpaError("GnuPG keyring %s: %s" % (home, e.strerror))
    if not os.path.isdir(home) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o077:
        raise SpaError("GnuPG keyring %s must be a directory of root's that only root may "
                       "open (it holds a secret key): chown root: %s; chmod 700 %s"
                       % (home, home, home))
    base = "/run" if os.access("/run", os.W_OK) else None
    copy = tempfile.mkdtemp(prefix="spa-gpg-", dir=base)
    try:
        for root, dirs, files in os.walk(home):
            target = os.path.join(copy, os.path.relpath(root, home))
            if root != home:
                os.mkdir(target, 0o700)
            for name in files:
                path = os.path.join(root, name)
                st = os.lstat(path)
                if not name.startswith("S.") and (st.st_mode & 0o170000) == 0o100000:
                    shutil.copyfile(path, os.path.join(target, name))
                    os.chmod(os.path.join(target, name), 0o600)
            for name in [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                dirs.remove(name)
        for root, dirs, files in os.walk(copy):
            for name in [root] + [os.path.join(root, n) for n in dirs + files]:
                os.chown(name, pw.pw_uid, pw.pw_gid)
    except OSError as e:
        shutil.rmtree(copy, ignore_errors=True)
        raise SpaError("cannot copy the GnuPG keyring %s for %s: %s" % (home, user, e))
    return copy


def remove_keyring(copy):
    """Stop the gpg-agent that gpg started on a private keyring copy, and remove it."""
    import shutil
    import subprocess
    gpgconf = find_tool("gpgconf")
    if gpgconf is not None:
        try:
            subprocess.call([gpgconf, "--homedir", copy, "--kill", "gpg-agent"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
    shutil.rmtree(copy, ignore_errors=True)


# ---------------------------------------------------------------------------
# Policy and config
# ---------------------------------------------------------------------------
#
# The server's config: [server] (ServerConfig) and one [client NAME] per key pair
# (Stanza: who may knock, with which keys, for what), and fwknop's access.conf, whose
# stanzas become Stanzas too.  A Stanza is the policy judge() asks: authorize() turns an
# authenticated message into (allow IP, seconds, NAT target) or a refusal.  Config files
# are trusted, but read as if a key could be on any line: an error names the file and
# the line, never the line's text.

def _showable(name):
    """Whether a name read from a file may be shown in a message: a word that does not look
    like a variable's name may be a key pasted on a line of its own."""
    return name[:1].isalpha() and len(name) <= 32 and (len(name) <= 16 or "_" in name) \
        and all(c.isalnum() or c == "_" for c in name)


def _ini_error(path, text, e):
    """configparser's complaint as file, section and line number: its own message quotes
    the line, which may hold a key (it would reach stderr, and the log at SIGHUP)."""
    errors = getattr(e, "errors", None)
    number = errors[0][0] if errors else getattr(e, "lineno", None)
    if not number:
        return "%s: not an INI file (%s)" % (path, type(e).__name__)
    section = None
    for line in text.splitlines()[:number - 1]:
        line = line.strip()
        if line.startswith("[") and "]" in line:
            section = line[1:line.index("]")]
    where = "%s line %d%s" % (path, number, " (in [%s])" % section if section else "")
    if type(e).__name__ == "MissingSectionHeaderError":
        return "%s: comes before any [section]" % where
    if type(e).__name__ == "DuplicateSectionError":
        return "%s: section [%s] appears twice" % (where, e.section)
    if type(e).__name__ == "DuplicateOptionError":
        return "%s: %s is set twice" % (where, e.option if _showable(e.option) else "an option")
    return "%s: not `name = value`, a [section] or a comment (the line is not shown: it " \
        "may hold a key)" % where


def read_ini(path, text=None):
    """Read an INI file (after the permission check); [default] gives defaults to every section.

    A value may go on over indented lines, as configparser reads them (a long `protect`
    or `source` list); they are joined with a space, so that no value holds a line break
    (an error message quoting it then stays one line)."""
    import configparser
    text = read_private_text(path) if text is None else text
    parser = configparser.ConfigParser(default_section="default", interpolation=None,
                                       inline_comment_prefixes=("#", ";"))
    try:
        parser.read_string(text, path)
    except configparser.Error as e:
        raise SpaError(_ini_error(path, text, e))
    for section in [parser.default_section] + parser.sections():
        for option, value in list(parser[section].items()):
            if "\n" in value:
                parser.set(section, option, " ".join(part for part in value.split("\n") if part))
    return parser


NOT_SHOWN = "not a `VARIABLE value` line (not shown: it may hold a key)"


def _shown_names(names):
    """Option names for an error message, any that may be a key replaced by words."""
    return ", ".join(sorted(n if _showable(n) else "a name not shown (it may be a key)"
                            for n in names))


def parse_bool(value, name):
    """A yes/no option (yes, true, on, 1 and their opposites, in any case)."""
    v = value.strip().lower()
    if v in ("y", "yes", "true", "on", "1"):
        return True
    if v in ("n", "no", "false", "off", "0"):
        return False
    raise SpaError("%s = %r: expected yes or no" % (name, value))


def parse_int(value, name, low, high):
    """A whole-number option, which must lie from `low` to `high`."""
    try:
        n = int(value)
    except ValueError:
        raise SpaError("%s = %r: expected a whole number" % (name, value))
    if not low <= n <= high:
        raise SpaError("%s = %d: must be from %d to %d" % (name, n, low, high))
    return n


def parse_key(value, name, low, high):
    """Decode a base64 key and check its length; never echo the key itself."""
    try:
        key = b64decode(value.strip())
    except (ValueError, UnicodeEncodeError):
        raise SpaError("%s is not valid base64" % name)
    if not low <= len(key) <= high:
        raise SpaError("%s decodes to %d bytes; %d to %d are allowed (spa.py keygen makes good ones)"
                       % (name, len(key), low, high))
    return key


def _one_key(get, where, name, longest, optional=False):
    """One key of a section: `NAME` (a passphrase, as fwknop's KEY) or `NAME_base64`,
    not both; at most `longest` bytes (None if `optional` and neither is given)."""
    if get(name + "_base64") and get(name):
        raise SpaError("%s: give %s_base64 or %s, not both" % (where, name, name))
    if get(name):
        key = get(name).encode()
        if len(key) > longest:
            raise SpaError("%s: %s is longer than %d bytes" % (where, name, longest))
        return key
    if not get(name + "_base64"):
        if optional:
            return None
        raise SpaError("%s: %s_base64 is missing (%s)" % (
            where, name, "make keys with 'spa.py keygen'" if name == "key"
            else "spa.py always uses an HMAC"))
    return parse_key(get(name + "_base64"), "%s: %s_base64" % (where, name), 1, longest)


def parse_hmac_type(value, name="hmac_digest_type"):
    """An HMAC type as fwknop names it (SHA256, sha-256...) -> a key of HMAC_TYPES."""
    v = value.strip().lower().replace("-", "_")
    if v not in HMAC_TYPES:
        raise SpaError("%s = %r: expected one of %s" % (name, value, ", ".join(HMAC_TYPES)))
    return v


def parse_keys(get, where, gpg=False):
    """The keys shared by server stanzas and client sections: (key, hmac_key, hmac_type, mode).

    `key` and `hmac_key` are fwknop's plain passphrases (KEY, HMAC_KEY), for keys
    carried over from fwknop; `spa.py keygen` makes the base64 kind.  With `gpg` (GnuPG
    does the encryption) the AES key may be left out: then `key` is None.
    """
    key = _one_key(get, where, "key", 32, optional=gpg)
    hmac_key = _one_key(get, where, "hmac_key", 128)
    if key == hmac_key:
        raise SpaError("%s: key_base64 and hmac_key_base64 must differ" % where)
    hmac_type = parse_hmac_type(get("hmac_digest_type") or "sha256", where + ": hmac_digest_type")
    mode = (get("encryption_mode") or "cbc").strip().lower()
    if mode not in ENCRYPTION_MODES:
        raise SpaError("%s: encryption_mode = %r: expected one of %s"
                       % (where, mode, ", ".join(ENCRYPTION_MODES)))
    return key, hmac_key, hmac_type, mode


def parse_date(value, name):
    """A day (YYYY-MM-DD, or fwknop's MM/DD/YYYY) or epoch seconds -> the epoch it starts or is."""
    value = value.strip()
    if value.isdigit():
        return int(value)
    for fmt in ("%Y-%m-%d", "%m/%d/%Y"):
        try:
            return int(time.mktime(time.strptime(value, fmt)))
        except ValueError:
            pass
    raise SpaError("%s = %r: expected YYYY-MM-DD" % (name, value))


def _family(address):
    """6 for an IPv6 address (text), 4 for an IPv4 one: the one place that tells them apart
    (an address is checked before it gets here)."""
    return 6 if ":" in address else 4


def _socket_family(address):
    """socket.AF_INET6 or socket.AF_INET, for an address (text)."""
    return socket.AF_INET6 if _family(address) == 6 else socket.AF_INET


def format_endpoint(address, port):
    """address:port, an IPv6 address in brackets: '[2001:db8::7]:22'."""
    return ("[%s]:%d" if _family(address) == 6 else "%s:%d") % (address, port)


def valid_interface_name(name):
    """A Linux interface name: 1-15 bytes, no slash, colon or white space."""
    return isinstance(name, str) and 0 < len(name.encode()) < 16 and \
        not any(c in name for c in "/: \t\n\0") and name not in (".", "..")


def parse_nat_destinations(value, name):
    """`nat_destinations`: [(network, first port, last port)] from a list such as
    `10.0.0.7:22, 10.0.1.0/24:8000-8099, [2001:db8::7]:22, 192.0.2.9` (IPv6 in brackets;
    no port: any port)."""
    import ipaddress
    result = []
    for item in value.split(",") if value.strip() else []:
        item = item.strip()
        if item.startswith("["):
            host, sep, port = item[1:].partition("]")
            if not sep or (port and not port.startswith(":")):
                raise SpaError("%s: %r: expected [IPV6]:PORT" % (name, item))
            port = port[1:]
        elif item.count(":") > 1:
            raise SpaError("%s: %r: write an IPv6 address in brackets: [%s]" % (name, item, item))
        else:
            host, _, port = item.partition(":")
        try:
            network = ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise SpaError("%s: %r: expected an address or a network, optionally with "
                           ":PORT or :PORT-PORT" % (name, item))
        first, last = 1, 65535
        if port:
            low, _, high = port.partition("-")
            if not all(p.isdigit() and len(p) <= 5 and 1 <= int(p) <= 65535
                       for p in (low, high or low)):
                raise SpaError("%s: %r: ports are 1-65535" % (name, item))
            first, last = int(low), int(high or low)
            if first > last:
                raise SpaError("%s: %r: the port range is backwards" % (name, item))
        result.append((network, first, last))
    return result


def format_nat_destination(item):
    """One (network, first port, last port) of nat_destinations, as the config writes it."""
    network, first, last = item
    text = "[%s]" % network if network.version == 6 else str(network)
    if (first, last) == (1, 65535):
        return text
    return "%s:%d%s" % (text, first, "" if first == last else "-%d" % last)


def nat_target_problem(address):
    """Why `address` (an ipaddress object) can never be a NAT target, else None: no knock may
    forward to no one, to a group, to loopback or to a whole network."""
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_multicast:
        return "a multicast address"
    if address.version == 4 and (address.packed[0] == 0 or address.packed == b"\xff" * 4):
        return "a broadcast or 'this network' address"
    if address.version == 6 and (address.is_link_local or address.ipv4_mapped is not None):
        return "a link-local or IPv4-mapped address"
    return None


# How a NAT opening forwards (fwknop's FORCE_SNAT, FORCE_MASQUERADE, DISABLE_DNAT, FORWARD_ALL
# and fwknopd.conf's ENABLE_IPT_SNAT): `dnat` False forwards without a DNAT (the client sends
# to the inner address itself); `snat` None, "masquerade" or the address to SNAT to;
# `forward_all` accepts everything forwarded from the allow IP, not only the one service.
NatMode = namedtuple("NatMode", "dnat snat forward_all")
PLAIN_NAT = NatMode(True, None, False)

# Where an accepted NAT request leads: to address:port, `local` if that is a port of this host
# (fwknop's local NAT, message types 5 and 6).  How it is forwarded: Decision.nat_mode.
NatTarget = namedtuple("NatTarget", "address port local")


STANZA_OPTIONS = {"source", "key_base64", "hmac_key_base64", "hmac_digest_type", "key", "hmac_key",
                  "restrict_ports", "access_expire", "enable_nat", "enable_cmd_exec",
                  "cmd_exec_user",
                  "encryption_mode", "open_ports", "fw_access_timeout", "max_fw_timeout",
                  "require_username", "require_source_address", "nat_destinations",
                  "max_openings", "cmd_cycle_open", "cmd_cycle_close", "cmd_cycle_timer",
                  "cmd_cycle_user", "gpg_home_dir", "gpg_decrypt_id", "gpg_decrypt_pw",
                  "gpg_allow_no_pw", "gpg_require_sig", "gpg_remote_id", "gpg_fingerprint_id",
                  "force_nat", "force_snat", "force_masquerade", "disable_dnat",
                  "forward_all", "destination", "single_use"}


def _parse_sources(value, where, name="source"):
    """`source` (or `destination`): None for any, else [ip_network] from a list of addresses
    and networks."""
    import ipaddress
    if any(s.strip().lower() == "any" for s in value.split(",")):
        return None
    try:
        return [ipaddress.ip_network(s.strip(), strict=False) for s in value.split(",")]
    except ValueError as e:
        raise SpaError("%s: %s: %s" % (where, name, e))


def parse_nat_address(value, name):
    """An address a NAT opening may lead to or SNAT to (force_nat, force_snat,
    snat_translate_ip): an ipaddress object, else SpaError."""
    import ipaddress
    try:
        address = ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        raise SpaError("%s = %r: expected an IP address" % (name, value))
    problem = nat_target_problem(address)
    if problem is not None:
        raise SpaError("%s = %s: %s cannot be used" % (name, value, problem))
    return address


def parse_force_nat(value, name):
    """`force_nat`: (address, port) from IP:PORT, [IPV6]:PORT or fwknop's `IP PORT`."""
    text = value.strip()
    if " " in text:
        host, _, port = text.partition(" ")
    elif text.startswith("["):
        host, _, port = text.partition("]")
        port = port[1:] if port.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    port = port.strip()
    if not (port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise SpaError("%s = %r: expected IP:PORT ([IPV6]:PORT), the port 1-65535"
                       % (name, value))
    return str(parse_nat_address(host, name)), int(port)


def _parse_port_set(value, name, where, default):
    """A port list of the config (open_ports, restrict_ports) as a set; `default` if empty."""
    try:
        return set(parse_access(value, name, True)) if value else set(default)
    except ValueError as e:
        raise SpaError("%s: %s" % (where, e))


def _check_command_user(name, where):
    """cmd_exec_user must be an existing user, neither root nor of group 0: a command
    message runs as that user (CommandRunner)."""
    import pwd
    try:
        user = pwd.getpwnam(name or "")
    except KeyError:
        raise SpaError("%s: enable_cmd_exec needs cmd_exec_user, an existing "
                       "unprivileged user" % where)
    if user.pw_uid == 0:
        raise SpaError("%s: cmd_exec_user must not be root" % where)
    if user.pw_gid == 0:
        raise SpaError("%s: cmd_exec_user %s has group 0 (root): give it a group of "
                       "its own" % (where, user.pw_name))


# The variables a hook's arguments may hold (fwknop's CMD_CYCLE_* names and meanings, in
# server/cmd_cycle.c): each is replaced inside an argument, never through a shell.
HOOK_VARIABLES = {
    "IP": "the address opened (the packet's allow IP, or its source for 0.0.0.0)",
    "SRC": "the same as $IP", "PKT_SRC": "the knock's source address",
    "DST": "the address the knock was sent to", "PORT": "the port opened",
    "PROTO": "the protocol opened, as its number (6 tcp, 17 udp), as fwknopd gives it",
    "TIMEOUT": "when the close is due, in seconds since 1970 (the packet's timestamp "
               "plus the timer, as fwknopd counts it)",
    "CLIENT_TIMEOUT": "the timer: seconds from the open to the close",
    "NAT_IP": "a NAT request's target address", "NAT_PORT": "a NAT request's target port"}


def _hook_variables_used(argv):
    """The $NAMES in a hook's arguments (SpaError, to be prefixed, for a $NAME not known)."""
    import re
    used = set()
    for arg in argv:
        for name in re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", arg):
            if name not in HOOK_VARIABLES:
                raise SpaError("$%s is not a variable (%s)" % (
                    name if _showable(name) else "...", ", ".join(
                        "$" + n for n in sorted(HOOK_VARIABLES))))
            used.add(name)
    return used


def parse_hook(value, where, name):
    """A hook (cmd_cycle_open, cmd_cycle_close): the argument list of one command, split
    as a shell would split it but run without one; None for NONE (cmd_cycle_close only)."""
    import shlex
    if name == "cmd_cycle_close" and value.strip().upper() == "NONE":
        return None
    try:
        argv = shlex.split(value)
    except ValueError as e:
        raise SpaError("%s: %s: %s" % (where, name, e))
    if not argv:
        raise SpaError("%s: %s is empty" % (where, name))
    if "$" in argv[0]:
        raise SpaError("%s: %s: the program (its first word) may not be a variable"
                       % (where, name))
    try:
        _hook_variables_used(argv)
    except SpaError as e:
        raise SpaError("%s: %s: %s" % (where, name, e))
    return argv


def expand_hook(argv, values):
    """A hook's arguments with its variables replaced, argument by argument (no shell,
    no splitting: a value is never more than part of one argument).  `values` maps each
    variable to its text; a variable it lacks (NAT_IP for a plain opening) raises
    ValueError."""
    import re

    def value(match):
        if match.group(1) not in values:
            raise ValueError("$%s has no value for this request" % match.group(1))
        return values[match.group(1)]
    return [re.sub(r"\$([A-Za-z_][A-Za-z0-9_]*)", value, arg) for arg in argv]


def check_hook_user(name, where):
    """cmd_cycle_user: an existing user; root only when named `root` outright, never a
    user of group 0 other than root (a hook runs as this user: HookRunner)."""
    import pwd
    try:
        user = pwd.getpwnam(name or "")
    except KeyError:
        raise SpaError("%s: cmd_cycle_open needs cmd_cycle_user, an existing user (root "
                       "only if you write root)" % where)
    if (user.pw_uid == 0 or user.pw_gid == 0) and name != "root":
        raise SpaError("%s: cmd_cycle_user %s is root or of group 0: write cmd_cycle_user = "
                       "root if hooks must run as root" % (where, user.pw_name))
    return user


class Stanza(object):
    """One `[client NAME]` section of the server config: who may knock, with which keys, for what."""

    def __init__(self, name, options, protect, where=None, forwarding=False, local_nat=False,
                 snat=None):
        where = where or "[client %s]" % name
        self.name = name
        unknown = set(options) - STANZA_OPTIONS
        if unknown:
            raise SpaError("%s: unknown option %s" % (where, _shown_names(unknown)))
        get = lambda option: (options.get(option) or "").strip()
        self.sources = _parse_sources(get("source") or "any", where)
        # fwknop's DESTINATION: the addresses a knock must be sent to (None: any).
        self.destinations = _parse_sources(get("destination") or "any", where, "destination")
        # A passphrase is taken as it is, blanks and all, as fwknopd takes it.
        key_get = lambda option: options.get(option) or "" if option in ("key", "hmac_key") \
            else get(option)
        self._read_gpg(options, get, where)
        self.key, self.hmac_key, self.hmac_type, self.mode = parse_keys(key_get, where,
                                                                        self.gpg is not None)
        if self.gpg_decrypt_pw is not None and self.gpg_decrypt_pw == self.hmac_key:
            raise SpaError("%s: gpg_decrypt_pw and the HMAC key must differ" % where)
        self.mac_len = HMAC_TYPES[self.hmac_type][1]
        hash_name = HMAC_TYPES[self.hmac_type][0]
        self.mac = None if self.key is None else Hmac(self.hmac_key, hash_name, SALT_PREFIX)
        self.gpg_mac = None if self.gpg is None else Hmac(self.hmac_key, hash_name, GPG_PREFIX)
        self.open_ports = _parse_port_set(get("open_ports"), "open_ports", where, protect)
        if not self.open_ports:
            raise SpaError("%s: open_ports is empty and [server] protects nothing" % where)
        # A timeout of 0 would mean "forever" to nftables: never allow it.
        self.fw_access_timeout = parse_int(get("fw_access_timeout") or "30",
                                           where + ": fw_access_timeout", 1, 86400)
        self.max_fw_timeout = parse_int(get("max_fw_timeout") or "300",
                                        where + ": max_fw_timeout", 1, 86400)
        self.require_username = get("require_username") or None
        self.require_source_address = parse_bool(get("require_source_address") or "no",
                                                 where + ": require_source_address")
        self.restrict_ports = _parse_port_set(get("restrict_ports"), "restrict_ports", where, ())
        self.access_expire = parse_date(get("access_expire"), where + ": access_expire") \
            if get("access_expire") else None
        # NAT access needs the stanza's consent and the server's ([server] enable_forwarding,
        # enable_local_nat).
        # Command messages run a command without a shell, as an unprivileged user.
        self.enable_cmd_exec = parse_bool(get("enable_cmd_exec") or "no", where + ": enable_cmd_exec")
        self.cmd_exec_user = get("cmd_exec_user") or None
        if self.enable_cmd_exec:
            _check_command_user(self.cmd_exec_user, where)
        self.enable_nat = parse_bool(get("enable_nat") or "no", where + ": enable_nat")
        self.nat_forward = self.enable_nat and forwarding
        self.nat_local = self.enable_nat and local_nat
        # Where NAT access to another host may lead: nowhere unless listed.
        self.nat_destinations = parse_nat_destinations(get("nat_destinations"),
                                                       where + ": nat_destinations")
        # Openings in force at once: each holds a little kernel memory that nothing else frees.
        self.max_openings = parse_int(get("max_openings") or "1000", where + ": max_openings",
                                      1, 1000000)
        self._read_hooks(get, where)
        self._read_nat_modes(get, where, forwarding, snat or {})
        self._read_single_use(get, where)

    def _read_single_use(self, get, where):
        """single_use: an opening that admits one new connection; the kernel ends it at that
        connection's first packet (README.md: Close the NAT-piggybacking window)."""
        self.single_use = parse_bool(get("single_use") or "no", where + ": single_use")
        # A NAT opening is taken by the DNAT of its first connection (the nat chain sees
        # only a connection's first packet); without one there is nothing to take it.
        if self.single_use and (self.disable_dnat or self.forward_all):
            raise SpaError("%s: single_use = yes with %s: a single-use NAT opening is taken "
                           "by its connection's DNAT, and %s; set one to no" % (
                               where, "disable_dnat" if self.disable_dnat else "forward_all",
                               "disable_dnat has none" if self.disable_dnat else
                               "forward_all forwards everything from the address"))

    def _read_hooks(self, get, where):
        """Hooks (fwknop's command cycles): cmd_cycle_open runs at each opening and
        cmd_cycle_close `cmd_cycle_timer` seconds later, as cmd_cycle_user."""
        self.cmd_cycle_open = parse_hook(get("cmd_cycle_open"), where, "cmd_cycle_open") \
            if get("cmd_cycle_open") else None
        self.cmd_cycle_close = parse_hook(get("cmd_cycle_close"), where, "cmd_cycle_close") \
            if get("cmd_cycle_close") else None
        self.cmd_cycle_timer = parse_int(get("cmd_cycle_timer"), where + ": cmd_cycle_timer",
                                         1, 86400) if get("cmd_cycle_timer") else None
        self.cmd_cycle_user = get("cmd_cycle_user") or None
        if self.cmd_cycle_open is None:
            if get("cmd_cycle_close") or get("cmd_cycle_timer") or get("cmd_cycle_user"):
                raise SpaError("%s: cmd_cycle_close, cmd_cycle_timer and cmd_cycle_user need "
                               "cmd_cycle_open" % where)
            return
        if not get("cmd_cycle_close"):
            raise SpaError("%s: cmd_cycle_open needs cmd_cycle_close (NONE: no close, the "
                           "opening is for good)" % where)
        check_hook_user(self.cmd_cycle_user, where)

    def hook_timer(self, msg, timeout):
        """Seconds from a hook's open to its close: the client's timeout (capped, as for
        an opening) if it asked for one, else cmd_cycle_timer, else the opening's."""
        if msg.msg_type in TIMEOUT_TYPES and msg.client_timeout > 0:
            return timeout
        return self.cmd_cycle_timer or timeout

    def _read_gpg(self, options, get, where):
        """The GnuPG options (fwknop's GPG_*): self.gpg is None unless the stanza takes
        GnuPG packets, which needs gpg_decrypt_id and gpg_decrypt_pw or gpg_allow_no_pw;
        gpg_require_sig (on by default, as for fwknopd) needs the signers it accepts."""
        self.gpg = self.gpg_decrypt_pw = None
        self.gpg_home_dir = get("gpg_home_dir") or None
        self.gpg_decrypt_id = get("gpg_decrypt_id") or None
        allow_no_pw = parse_bool(get("gpg_allow_no_pw") or "no", where + ": gpg_allow_no_pw")
        if options.get("gpg_decrypt_pw") and not allow_no_pw:
            self.gpg_decrypt_pw = options["gpg_decrypt_pw"].encode()
        self.gpg_require_sig = parse_bool(get("gpg_require_sig") or "yes",
                                          where + ": gpg_require_sig")
        words = lambda option: [w.upper() for w in get(option).replace(",", " ").split()]
        self.gpg_remote_ids, self.gpg_fingerprints = words("gpg_remote_id"), \
            [w.replace(":", "") for w in words("gpg_fingerprint_id")]
        bad = [w for w in self.gpg_remote_ids if len(w) not in (8, 16) or
               w.strip("0123456789ABCDEF")] + [w for w in self.gpg_fingerprints if len(w) != 40
                                              or w.strip("0123456789ABCDEF")]
        if not self.gpg_decrypt_id:
            if any(get(o) for o in STANZA_OPTIONS if o.startswith("gpg_")):
                raise SpaError("%s: GnuPG options without gpg_decrypt_id (the server's key)"
                               % where)
            return
        if self.gpg_decrypt_pw is None and not allow_no_pw:
            raise SpaError("%s: give gpg_decrypt_pw, or gpg_allow_no_pw = yes for a key without "
                           "a passphrase" % where)
        if bad:
            raise SpaError("%s: %r is not a key ID (8 or 16 hex digits) or fingerprint (40)"
                           % (where, bad[0][:40]))
        if self.gpg_require_sig and not (self.gpg_remote_ids or self.gpg_fingerprints):
            raise SpaError("%s: gpg_require_sig needs gpg_fingerprint_id or gpg_remote_id: "
                           "the signers whose packets it takes" % where)
        self.gpg = GnuPG(self.gpg_home_dir, server=True)

    def gpg_open(self, raw):
        """The plaintext of a GnuPG packet, decrypted by self.gpg; with gpg_require_sig, only
        if one of gpg_fingerprint_id made its good signature (or, without that list, one
        whose fingerprint ends in a gpg_remote_id).  Reject says why not."""
        key_id = self.gpg_decrypt_id.replace(" ", "").upper()
        hex_id = len(key_id) in (8, 16, 40) and not key_id.strip("0123456789ABCDEF")
        plaintext, signer = self.gpg.decrypt(raw, self.gpg_decrypt_pw, key_id if hex_id else None)
        if not self.gpg_require_sig:
            return plaintext
        if not signer:
            raise Reject("not signed, and gpg_require_sig is on")
        if self.gpg_fingerprints:
            if not set(signer) & set(self.gpg_fingerprints):
                raise Reject("signed by %s, which is not in gpg_fingerprint_id" % signer[0])
        if self.gpg_remote_ids and not any(f.endswith(i) for f in signer
                                           for i in self.gpg_remote_ids):
            raise Reject("signed by %s, which is not in gpg_remote_id" % signer[0][-16:])
        return plaintext


    def _read_nat_modes(self, get, where, forwarding, server_snat):
        """force_nat, force_snat, force_masquerade, disable_dnat, forward_all (fwknop's
        access.conf variables), checked as fwknopd checks them; `server_snat`: [server]
        enable_snat's {family: "masquerade" or address}."""
        flag = lambda name: parse_bool(get(name) or "no", where + ": " + name)
        self.force_nat = parse_force_nat(get("force_nat"), where + ": force_nat") \
            if get("force_nat") else None
        force_snat = parse_nat_address(get("force_snat"), where + ": force_snat") \
            if get("force_snat") else None
        masquerade = flag("force_masquerade")
        self.disable_dnat, self.forward_all = flag("disable_dnat"), flag("forward_all")
        if (force_snat or masquerade) and not (self.force_nat or self.forward_all):
            raise SpaError("%s: force_snat and force_masquerade need force_nat or forward_all"
                           % where)
        if force_snat and masquerade:
            raise SpaError("%s: force_snat and force_masquerade: give one of them" % where)
        if force_snat and self.force_nat and force_snat.version != _family(self.force_nat[0]):
            raise SpaError("%s: force_snat %s and force_nat %s are of different families"
                           % (where, force_snat, self.force_nat[0]))
        needs = [name for name, on in (("force_nat", self.force_nat), ("force_snat", force_snat),
                                       ("force_masquerade", masquerade),
                                       ("disable_dnat", self.disable_dnat),
                                       ("forward_all", self.forward_all)) if on]
        if needs and not forwarding:
            raise SpaError("%s: %s needs [server] enable_forwarding = yes" % (where, needs[0]))
        if (self.disable_dnat or self.forward_all) and not (self.force_nat or self.enable_nat):
            raise SpaError("%s: disable_dnat and forward_all need force_nat or enable_nat = yes"
                           % where)
        # SNAT of what this stanza forwards, by family: its own, else the server's.
        self.snat = {4: "masquerade", 6: "masquerade"} if masquerade else \
            {force_snat.version: str(force_snat)} if force_snat else dict(server_snat)
        self.snat_forced = bool(force_snat or masquerade)

    def nat_mode(self, family):
        """The NatMode of this stanza's NAT openings to another host over IPv`family`;
        Reject if its force_snat is of the other family."""
        snat = self.snat.get(family)
        if snat is None and self.snat_forced:
            raise Reject("force_snat %s cannot SNAT an IPv%d connection" % (
                list(self.snat.values())[0], family))
        return NatMode(not self.disable_dnat, snat, self.forward_all)

    def matches_destination(self, destination):
        """Whether a knock sent to `destination` (an address as text) may use this stanza."""
        if self.destinations is None:
            return True
        import ipaddress
        address = ipaddress.ip_address(destination)
        return any(address in net for net in self.destinations)

    def matches_source(self, source):
        """Whether a packet from `source` (an address as text) may use this stanza."""
        if self.sources is None:
            return True
        import ipaddress
        address = ipaddress.ip_address(source)
        return any(address in net for net in self.sources)

    def authorize(self, msg, source, now):
        """Apply this stanza's policy to an authenticated message.

        Returns (allow IP, seconds, NAT) where NAT is None or a NatTarget;
        raises Reject.
        """
        if self.access_expire is not None and now >= self.access_expire:
            raise Reject("the stanza expired on %s (access_expire)"
                         % time.strftime("%Y-%m-%d", time.localtime(self.access_expire)))
        if msg.msg_type == MSG_COMMAND:
            if not self.enable_cmd_exec:
                raise Reject("message type 0 (command) refused: enable_cmd_exec is off for "
                             "this stanza")
            if self.require_username is not None and msg.username != self.require_username:
                raise Reject("username %r is not the required one" % msg.username)
            return (source if msg.allow_ip == "0.0.0.0" else msg.allow_ip), 0, None
        if self.force_nat is not None:          # every request goes where the stanza says
            nat = self._forced_nat(msg)
        else:
            nat = self._nat(msg) if msg.msg_type in NAT_TYPES else None
        if msg.allow_ip == "0.0.0.0":
            if self.require_source_address:
                raise Reject("allow IP 0.0.0.0 refused: require_source_address is on")
            allow_ip = source
        else:
            allow_ip = msg.allow_ip
        if self.require_username is not None and msg.username != self.require_username:
            raise Reject("username %r is not the required one" % msg.username)
        # The ports the client reaches: through local NAT, the one it is forwarded to.
        local = nat is not None and nat.local
        reached = [(msg.access[0][0], nat.port)] if local else msg.access
        denied = [pp for pp in reached if pp not in self.open_ports or pp in self.restrict_ports]
        if denied:
            raise Reject("%s not in open_ports%s" % (format_access(denied),
                                                     " (the port local NAT leads to)" if local
                                                     else ""))
        if msg.msg_type in TIMEOUT_TYPES and msg.client_timeout > 0:
            timeout = min(msg.client_timeout, self.max_fw_timeout)
        else:
            timeout = self.fw_access_timeout
        if nat is not None and _family(nat.address) != _family(allow_ip):
            raise Reject("NAT to %s for %s: the addresses are of different families"
                         % (nat.address, allow_ip))
        return allow_ip, timeout, nat

    def _forced_nat(self, msg):
        """force_nat: the NatTarget of any access request (its one port) to this stanza."""
        if len(msg.access) != 1:
            raise Reject("force_nat: the request names %d ports; it must name one"
                         % len(msg.access))
        return NatTarget(self.force_nat[0], self.force_nat[1], False)

    def _nat(self, msg):
        """The NatTarget of a NAT request this stanza allows, else Reject."""
        import ipaddress
        local = msg.msg_type in (MSG_LOCAL_NAT, MSG_TIMEOUT_LOCAL_NAT)
        if not (self.nat_local if local else self.nat_forward):
            raise Reject("message type %d (%s) refused: %s" % (
                msg.msg_type, MSG_NAMES[msg.msg_type], "enable_nat is off for this stanza"
                if not self.enable_nat else
                "[server] %s is off" % ("enable_local_nat" if local else "enable_forwarding")))
        host, sep, port = (msg.nat_access or "").rpartition(",")
        try:
            address = str(ipaddress.ip_address(host))
        except ValueError:
            raise Reject("NAT host %r is not an address (spa.py resolves no names)" % host[:70])
        if not sep or not port.isdigit() or len(port) > 5 or not 1 <= int(port) <= 65535:
            raise Reject("NAT port %r is not 1-65535" % port[:8])
        if len(msg.access) != 1:
            raise Reject("a NAT request names %d ports; it must name one" % len(msg.access))
        port = int(port)
        target = ipaddress.ip_address(address)
        problem = nat_target_problem(target)
        if problem is None and not local:
            problem = self.nat_destination_problem(target, port)
        if problem is not None:
            raise Reject("NAT to %s refused: %s" % (format_endpoint(address, port), problem))
        return NatTarget(address, port, local)

    def nat_destination_problem(self, target, port):
        """Why NAT access to another host may not lead to target:port, else None."""
        if not self.nat_destinations:
            return "the stanza has no nat_destinations"
        for network, first, last in self.nat_destinations:
            if target.version == network.version and target in network and first <= port <= last:
                if network.num_addresses > 2 and target in (network.network_address,
                                                            network.broadcast_address) \
                        and target.version == 4:
                    return "the network or broadcast address of %s" % network
                return None
        return "not in nat_destinations"


# fwknop access.conf variable -> our stanza option.
ACCESS_CONF_NAMES = {
    "SOURCE": "source", "OPEN_PORTS": "open_ports", "RESTRICT_PORTS": "restrict_ports",
    "KEY_BASE64": "key_base64", "KEY": "key", "HMAC_KEY_BASE64": "hmac_key_base64",
    "HMAC_KEY": "hmac_key", "HMAC_DIGEST_TYPE": "hmac_digest_type",
    "FW_ACCESS_TIMEOUT": "fw_access_timeout", "CMD_EXEC_USER": "cmd_exec_user",
    "MAX_FW_TIMEOUT": "max_fw_timeout", "REQUIRE_USERNAME": "require_username",
    "ACCESS_EXPIRE": "access_expire", "ACCESS_EXPIRE_EPOCH": "access_expire",
    "CMD_CYCLE_OPEN": "cmd_cycle_open", "CMD_CYCLE_CLOSE": "cmd_cycle_close",
    "CMD_CYCLE_TIMER": "cmd_cycle_timer",
    "CMD_CYCLE_USER": "cmd_cycle_user",     # spa.py's own: fwknopd runs command cycles as root
    "GPG_HOME_DIR": "gpg_home_dir", "GPG_DECRYPT_ID": "gpg_decrypt_id",
    "GPG_DECRYPT_PW": "gpg_decrypt_pw", "GPG_REMOTE_ID": "gpg_remote_id",
    "GPG_FINGERPRINT_ID": "gpg_fingerprint_id",
    "FORCE_NAT": "force_nat", "FORCE_SNAT": "force_snat", "DESTINATION": "destination",
}


# fwknopd's yes/no variables (true when the value starts with Y or y, as fwknopd reads them).
ACCESS_CONF_BOOLS = {"REQUIRE_SOURCE_ADDRESS": "require_source_address",
                     "REQUIRE_SOURCE": "require_source_address",
                     "ENABLE_CMD_EXEC": "enable_cmd_exec", "GPG_ALLOW_NO_PW": "gpg_allow_no_pw",
                     "GPG_REQUIRE_SIG": "gpg_require_sig",
                     "FORCE_MASQUERADE": "force_masquerade", "DISABLE_DNAT": "disable_dnat",
                     "FORWARD_ALL": "forward_all"}


# Settings of command messages that spa.py has no use for: it never uses sudo, and runs a
# command with the user's own group.
ACCESS_CONF_CMD = {"CMD_EXEC_GROUP", "CMD_SUDO_EXEC_USER", "CMD_SUDO_EXEC_GROUP"}


# The key variables, the only ones fwknopd takes from a %include_keys file.
ACCESS_CONF_KEYS = ("KEY", "KEY_BASE64", "HMAC_KEY", "HMAC_KEY_BASE64")


def _fwknop_variable(word):
    """The variable a line of fwknop's files sets: its first word, a ':' at its end (and
    whatever follows the last ':') dropped, as fwknop reads access.conf and ~/.fwknoprc."""
    return word[:word.rindex(":")] if ":" in word else word


def access_conf_lines(path):
    """[(line number, variable, value)] of an access.conf file, read as fwknopd reads it.

    fwknopd skips a line whose first character is '#' or ';', takes the first word
    as the variable (a ':' at its end dropped) and the rest, up to a ';', as the
    value: `SOURCE ANY;  ### comment` is ANY.  Without the ';', the comment is part of
    the value for fwknopd too.  A passphrase (KEY, HMAC_KEY) keeps its blanks at the end.
    """
    lines = []
    for number, line in enumerate(read_private_text(path).splitlines(), 1):
        words = line.split(None, 1)
        if not words or words[0][0] in "#;":
            continue
        var = _fwknop_variable(words[0])
        value = words[1].split(";", 1)[0] if len(words) > 1 else ""
        lines.append((number, var, value if var in ("KEY", "HMAC_KEY", "GPG_DECRYPT_PW")
                      else value.strip()))
    return lines


class _AccessConfStanza(object):
    """One access.conf stanza turned into our stanza options, line by line: what it asks
    that spa.py does not do (`unsupported`), what spa.py cannot read (`problems`), and what
    spa.py does differently (said in `notes`, the notes of the whole file)."""

    def __init__(self, name, notes):
        self.name, self.notes = name, notes
        self.options, self.unsupported, self.problems = {}, [], []
        self.gpg_disable_sig = False

    def line(self, number, var, value):
        options, unsupported, problems = self.options, self.unsupported, self.problems
        yes = value[:1] in ("Y", "y")
        if not _showable(var.lstrip("%")):
            problems.append("line %d is %s" % (number, NOT_SHOWN))
        elif not value.strip():
            problems.append("%s has no value (line %d)" % (var, number))
        elif var in ("KEY", "KEY_BASE64", "HMAC_KEY", "HMAC_KEY_BASE64", "GPG_DECRYPT_PW") \
                and value.upper() == "__CHANGEME__":
            problems.append("%s is still __CHANGEME__ (line %d)" % (var, number))
        elif var in ("FW_ACCESS_TIMEOUT", "MAX_FW_TIMEOUT") and value.isdigit() and int(value) == 0:
            options.pop(ACCESS_CONF_NAMES[var], None)   # fwknopd's default (30, 300 s) is ours
        elif var in ACCESS_CONF_NAMES:
            options[ACCESS_CONF_NAMES[var]] = value
            if var in ACCESS_CONF_KEYS:        # the last of KEY and KEY_BASE64 counts
                other = var[:-7] if var.endswith("_BASE64") else var + "_BASE64"
                options.pop(ACCESS_CONF_NAMES[other], None)
        elif var in ACCESS_CONF_BOOLS:
            options[ACCESS_CONF_BOOLS[var]] = "yes" if yes else "no"
        elif var == "ENCRYPTION_MODE":
            mode = value.lower()
            if mode == "asymmetric":
                pass                         # GnuPG: the GPG_* variables make it
            elif mode in ENCRYPTION_MODES:
                options["encryption_mode"] = mode
            else:
                unsupported.append("ENCRYPTION_MODE %s" % value)
        elif var in ("GPG_DISABLE_SIG", "GPG_IGNORE_SIG_VERIFY_ERROR", "GPG_EXE"):
            self.gpg_line(var, yes)
        elif var == "ENABLE_CMD_SUDO_EXEC":
            if yes:
                self.notes.append("%s: ENABLE_CMD_SUDO_EXEC is not honoured: spa.py uses no sudo"
                                  % self.name)
        elif var not in ACCESS_CONF_CMD:
            problems.append("%s is not a variable fwknopd knows (it would ignore it; names are "
                            "case-sensitive)" % var)

    def gpg_line(self, var, yes):
        """fwknopd's GnuPG variables that are not stanza options: GPG_DISABLE_SIG turns
        gpg_require_sig off (unless GPG_REQUIRE_SIG is Y); spa.py never takes a bad
        signature, and runs the gpg on PATH."""
        if var == "GPG_DISABLE_SIG":
            self.gpg_disable_sig = yes
        elif yes or var == "GPG_EXE":
            self.notes.append("%s: %s is not honoured: %s" % (self.name, var, (
                "spa.py runs the gpg on PATH" if var == "GPG_EXE" else
                "spa.py never accepts a bad signature (it does not weigh the web of trust: "
                "GPG_FINGERPRINT_ID / GPG_REMOTE_ID name the signers)")))

    def finish(self):
        """(options, problems): the checks of the stanza as a whole, after its last line."""
        name, options, unsupported, notes = self.name, self.options, self.unsupported, self.notes
        if self.gpg_disable_sig and options.get("gpg_require_sig") != "yes":
            options["gpg_require_sig"] = "no"
        gpg = options.get("gpg_decrypt_pw") or options.get("gpg_allow_no_pw") == "yes"
        if not gpg:         # as fwknopd: GPG_* without a passphrase (or ALLOW_NO_PW) is no GnuPG
            for option in [o for o in options if o.startswith("gpg_")]:
                del options[option]
        elif not options.get("gpg_decrypt_id"):
            self.problems.append("GPG_DECRYPT_ID is missing (the server's key)")
        if not options.get("key_base64") and not options.get("key") and not gpg:
            unsupported.append("a stanza without an AES key")
        if not options.get("hmac_key_base64") and not options.get("hmac_key"):
            unsupported.append("packets without an HMAC")
        if "yes" in (options.get("forward_all"), options.get("disable_dnat")) and \
                not options.get("force_nat"):
            # fwknopd forwards then to the host a NAT request names (or, with FORCE_SNAT
            # or FORCE_MASQUERADE, to "0.0.0.0": its gateway); an access.conf stanza
            # cannot name nat_destinations, so here nothing would forward.
            unsupported.append("FORWARD_ALL or DISABLE_DNAT without FORCE_NAT")
        if options.get("enable_cmd_exec") == "yes" and not options.get("cmd_exec_user"):
            options["enable_cmd_exec"] = "no"     # fwknopd would run them as root: never
            notes.append("%s: ENABLE_CMD_EXEC is not honoured without CMD_EXEC_USER: spa.py "
                         "never runs commands as root" % name)
        if options.get("cmd_cycle_open") and not options.get("cmd_cycle_user"):
            options["cmd_cycle_user"] = "nobody"  # fwknopd would run them as root: not unasked
            notes.append("%s: CMD_CYCLE_OPEN and CMD_CYCLE_CLOSE run as nobody (fwknopd runs "
                         "them as root): name their user with CMD_CYCLE_USER, root too" % name)
        if unsupported:
            self.problems.insert(0, "spa.py does not support %s" % ", ".join(unsupported))
        if any(s.strip().upper() == "ANY" for s in options.get("source", "").split(",")):
            options["source"] = "any"
        # fwknopd has no per-stanza NAT switch: its ENABLE_IPT_FORWARDING / ENABLE_IPT_LOCAL_NAT
        # are ours in [server], and they decide for its stanzas.
        options["enable_nat"] = "yes"
        return options, self.problems


def _access_conf_stanza(name, pairs, notes):
    """The stanza options of one access.conf stanza, and what stops spa.py from loading it."""
    stanza = _AccessConfStanza(name, notes)
    for number, var, value in pairs:
        if isinstance(value, SpaError):
            stanza.problems.append(str(value))
            continue
        stanza.line(number, var, value)
    return stanza.finish()


def read_access_conf(path, protect, forwarding=False, local_nat=False, depth=0, snat=None):
    """Turn fwknop's access.conf into Stanzas: ([Stanza], [notes on what is not honoured]).

    Read as fwknopd reads it (access_conf_lines; variable names are case-sensitive).
    A stanza that needs what spa.py does not do (ECB or legacy mode, no HMAC key,
    FORCE_NAT without [server] enable_forwarding, FORWARD_ALL or DISABLE_DNAT without
    FORCE_NAT), or that it cannot
    read, is left out and a note names it and why, rather than being loaded with a
    restriction quietly dropped; the other stanzas load.
    """
    import glob
    if depth > 3:
        raise SpaError("%s: %%include nested too deep" % path)
    stanzas, notes, raw = [], [], []
    for number, var, value in access_conf_lines(path):
        if var in ("%include", "%include_folder"):
            if "\0" in value:
                raise SpaError("%s line %d: %r is not a usable file name" % (path, number, value))
            files = [value] if var == "%include" else sorted(glob.glob(os.path.join(value, "*.conf")))
            for name in files:
                more, more_notes = read_access_conf(name, protect, forwarding, local_nat,
                                                    depth + 1, snat)
                stanzas += more
                notes += more_notes
            continue
        if var == "SOURCE":
            raw.append(("%s:%d" % (os.path.basename(path), number), []))
        if not raw:
            continue                   # fwknopd ignores what comes before the first SOURCE
        if var == "%include_keys":     # keys kept in a file of their own
            try:
                raw[-1][1].extend(line for line in access_conf_lines(value)
                                  if line[1] in ACCESS_CONF_KEYS or line[1].startswith("GPG_"))
            except SpaError as e:
                raw[-1][1].append((number, "%include_keys", SpaError(str(e))))
            continue
        raw[-1][1].append((number, var, value))
    for name, pairs in raw:
        options, problems = _access_conf_stanza(name, pairs, notes)
        if problems:
            notes.append("%s: stanza left out: %s" % (name, "; ".join(problems)))
            continue
        if forwarding and not options.get("force_nat"):
            notes.append("%s: NAT access to other hosts is refused: access.conf cannot name "
                         "nat_destinations (a [client] stanza can)" % name)
        try:
            stanzas.append(Stanza(name, options, protect, where="%s stanza at %s" % (path, name),
                                  forwarding=forwarding, local_nat=local_nat, snat=snat))
        except SpaError as e:
            notes.append("%s: stanza left out: %s" % (name, e))
    return stanzas, notes


FIREWALLS = ("nft", "auto", "iptables", "iptables-nft", "iptables-legacy", "none")
# [server] options that SIGHUP cannot change in a running server.
RESTART_OPTIONS = ("firewall", "replay_cache", "user", "log", "bind_interface")
SERVER_OPTIONS = {"interface", "optional_interface", "port", "firewall", "protect",
                  "protect_action", "max_packet_age", "replay_cache", "log", "user", "access_conf",
                  "enable_forwarding", "enable_local_nat", "bind_interface", "saved_firewall",
                  "nft_include", "gpg_user", "transports", "http_port", "http_proxies",
                  "enable_snat", "snat_translate_ip"}
DEFAULT_REPLAY_CACHE = "/var/lib/spa/replay.cache"
TRANSPORTS = ("udp", "tcp", "icmp", "http")   # what knocks may come over ([server] transports)
DEFAULT_HTTP_PORT = 80
READER_USER = "spa"                   # the packet reader's own system user (see install)
USERADD = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
           "--shell", "/usr/sbin/nologin"]


def reader_user(path, name):
    """The user the packet reader runs as: `name`, or else the dedicated `spa`, or else
    nobody; and a warning for the log in that last case (other daemons run as nobody,
    and any of them could signal the reader)."""
    import pwd
    if not name:
        try:
            pwd.getpwnam(READER_USER)
            return READER_USER, None
        except KeyError:
            return "nobody", ("no user %s: the packet reader runs as nobody, which other "
                              "daemons share; create it: %s" % (READER_USER, " ".join(
                                  USERADD + [READER_USER])))
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        raise SpaError("%s: user = %s: no such user (the packet reader runs as this "
                       "unprivileged user)" % (path, name))
    if uid == 0:
        raise SpaError("%s: user = %s: the packet reader must not run as root" % (path, name))
    return name, None


def _comma_list(text):
    """'eth0, wg0' -> ['eth0', 'wg0']: the words of a comma-separated option."""
    return [word.strip() for word in text.split(",") if word.strip()]


class ServerConfig(object):
    """The whole server config: the [server] section and the client stanzas."""

    def __init__(self, path, access_conf=None):
        parser = read_ini(path)
        self.path = path
        self.notes = []        # what an imported fwknop access.conf asked that we do not honour
        section = parser["server"] if parser.has_section("server") else {}
        get = lambda option, default: section.get(option, default).strip()
        unknown = set(section) - SERVER_OPTIONS - set(parser.defaults())
        if unknown:
            raise SpaError("%s: [server]: unknown option %s" % (path, _shown_names(unknown)))
        self._read_server(get)
        self.user, self.user_note = reader_user(path, get("user", ""))
        self.gpg_user = get("gpg_user", GPG_USER)
        self.gpg_copies = []
        self._read_stanzas(parser, access_conf or get("access_conf", ""))
        if not self.protect:
            raise SpaError("%s: [server] protect is empty: name the ports to keep dark, "
                           "e.g. protect = tcp/22" % path)
        self.single_use = any(stanza.single_use for stanza in self.stanzas)
        if self.single_use and self.bind_interface:
            raise SpaError("%s: bind_interface = yes with a single_use stanza: spa.py has no "
                           "single-use openings bound to an interface (yet)" % path)

    def _read_server(self, get):
        """The [server] options but `user` and `access_conf`; `get(option, default)`."""
        path = self.path
        self.optional_interfaces = _comma_list(get("optional_interface", ""))
        self.interfaces = _comma_list(get("interface", "" if self.optional_interfaces else "any"))
        self.port = parse_int(get("port", str(DEFAULT_PORT)), "port", 1, 65535)
        self.firewall = get("firewall", "nft").lower()
        if self.firewall not in FIREWALLS:
            raise SpaError("%s: firewall = %r: expected %s (none: hooks do the work)"
                           % (path, self.firewall, ", ".join(FIREWALLS)))
        try:
            self.protect = parse_access(get("protect", ""), "protect", True) \
                if get("protect", "") else []
        except ValueError as e:
            raise SpaError("%s: [server]: %s" % (path, e))
        self.protect_action = get("protect_action", "reject").lower()
        if self.protect_action not in ("reject", "drop"):
            raise SpaError("%s: protect_action = %r: expected reject or drop"
                           % (path, self.protect_action))
        self.max_packet_age = parse_int(get("max_packet_age", "120"), "max_packet_age", 1, 86400)
        self.replay_cache = get("replay_cache", DEFAULT_REPLAY_CACHE)
        self.log = get("log", "stderr").lower()
        if self.log not in ("stderr", "syslog"):
            raise SpaError("%s: log = %r: expected stderr or syslog" % (path, self.log))
        self.enable_forwarding = parse_bool(get("enable_forwarding", "no"), "enable_forwarding")
        self.enable_local_nat = parse_bool(get("enable_local_nat", "no"), "enable_local_nat")
        # fwknopd.conf's ENABLE_IPT_SNAT and SNAT_TRANSLATE_IP: SNAT what NAT access forwards,
        # to that address (for its family; MASQUERADE for the other), else MASQUERADE.
        self.snat = {}
        if parse_bool(get("enable_snat", "no"), "enable_snat"):
            if not self.enable_forwarding:
                raise SpaError("%s: enable_snat needs enable_forwarding = yes" % path)
            self.snat = {4: "masquerade", 6: "masquerade"}
            if get("snat_translate_ip", ""):
                address = parse_nat_address(get("snat_translate_ip", ""), "snat_translate_ip")
                self.snat[address.version] = str(address)
        elif get("snat_translate_ip", ""):
            raise SpaError("%s: snat_translate_ip needs enable_snat = yes" % path)
        # Openings keyed on the interface the knock came in on, too.
        self.bind_interface = parse_bool(get("bind_interface", "no"), "bind_interface")
        self._read_transports(get)
        named = self.interfaces + self.optional_interfaces
        if self.bind_interface and ("any" in named or not named):
            raise SpaError("%s: bind_interface = yes needs interface to name the interfaces "
                           "knocks come in on (not any): each opening is bound to one" % path)
        bad = [name for name in named if name != "any" and not valid_interface_name(name)]
        if bad:
            raise SpaError("%s: interface %r: not an interface name" % (path, bad[0]))
        # Where the host keeps its firewall for reloads and boots (SavedFirewall).
        saved = get("saved_firewall", "auto")
        self.saved_firewall = saved.lower() if saved.lower() in ("auto", "none") else \
            _comma_list(saved)
        self.nft_include = get("nft_include", "") or None
        for name, value in (("saved_firewall", self.saved_firewall),
                            ("nft_include", [self.nft_include or "/"])):
            if isinstance(value, list) and not all(os.path.isabs(p) for p in value):
                raise SpaError("%s: %s: expected auto, none or absolute paths" % (path, name))

    def start_gpg(self):
        """As root: give each GnuPG stanza a gpg that runs as gpg_user on a private copy of its
        keyring (one copy a keyring), never as root, never as the packet reader's user."""
        import pwd
        stanzas = [stanza for stanza in self.stanzas if stanza.gpg is not None]
        if not stanzas or not hasattr(os, "geteuid") or os.geteuid() != 0:
            return
        try:
            uid = pwd.getpwnam(self.gpg_user).pw_uid
        except KeyError:
            raise SpaError("%s: no user %s, which gpg runs as for the GnuPG stanzas: create it "
                           "(%s %s) or name another with gpg_user" % (
                               self.path, self.gpg_user, " ".join(USERADD), self.gpg_user))
        if uid == 0 or self.gpg_user == self.user:
            raise SpaError("%s: gpg_user = %s: gpg must run as a user of its own, not root nor "
                           "the packet reader's" % (self.path, self.gpg_user))
        copies = {}
        try:
            for stanza in stanzas:
                home = os.path.abspath(os.path.expanduser(stanza.gpg_home_dir or "~/.gnupg"))
                if home not in copies:
                    copies[home] = private_keyring(home, self.gpg_user)
                    self.gpg_copies.append(copies[home])
                stanza.gpg = GnuPG(copies[home], self.gpg_user, server=True)
        except SpaError:
            self.stop_gpg()
            raise

    def stop_gpg(self):
        """Remove the private keyring copies (and stop their gpg-agents)."""
        while self.gpg_copies:
            remove_keyring(self.gpg_copies.pop())

    def _read_transports(self, get):
        """`transports` (udp, tcp, icmp, http), `http_port` and `http_proxies`."""
        path = self.path
        names = [word.lower() for word in _comma_list(get("transports", "udp"))]
        bad = [name for name in names if name not in TRANSPORTS]
        if bad or not names:
            raise SpaError("%s: transports = %s: expected one or more of %s" % (
                path, ", ".join(bad) or "(nothing)", ", ".join(TRANSPORTS)))
        self.transports = tuple(t for t in TRANSPORTS if t in names)
        self.http_port = parse_int(get("http_port", str(DEFAULT_HTTP_PORT)), "http_port", 1,
                                   65535)
        if "tcp" in names and "http" in names and self.http_port == self.port:
            raise SpaError("%s: http_port = %d is the knock port: tcp and http need two ports"
                           % (path, self.http_port))
        import ipaddress
        try:       # the proxies whose X-Forwarded-For header is believed: none by default
            self.http_proxies = [ipaddress.ip_network(word, strict=False)
                                 for word in _comma_list(get("http_proxies", ""))]
        except ValueError as e:
            raise SpaError("%s: http_proxies: %s (expected addresses or networks of the "
                           "proxies whose X-Forwarded-For is believed)" % (path, e))

    def transports_text(self):
        """'udp/62201, icmp, http/80': what knocks are read from, for the log."""
        return ", ".join(name if name == "icmp" else "%s/%d" % (
            name, self.http_port if name == "http" else self.port) for name in self.transports)

    def _read_stanzas(self, parser, access_conf):
        """The [client NAME] stanzas, then those of fwknop's access.conf (if one is named)."""
        path = self.path
        self.stanzas = []
        for name in parser.sections():
            kind, _, client = name.partition(" ")
            if name == "server":
                continue
            if kind != "client" or not client.strip():
                raise SpaError("%s: unknown section [%s]: expected [server] or [client NAME]"
                               % (path, name))
            self.stanzas.append(Stanza(client.strip(), dict(parser[name]), self.protect,
                                       forwarding=self.enable_forwarding,
                                       local_nat=self.enable_local_nat, snat=self.snat))
        if access_conf:
            stanzas, self.notes = read_access_conf(access_conf, self.protect,
                                                   self.enable_forwarding, self.enable_local_nat,
                                                   snat=self.snat)
            self.stanzas += stanzas
        gpg = any(stanza.gpg is not None for stanza in self.stanzas)
        self.longest_wire = MAX_GPG_WIRE_LEN if gpg else MAX_WIRE_LEN
        if not self.stanzas:
            raise SpaError("%s: no [client NAME] section%s: nobody could knock" % (
                path, " and no usable stanza in %s (%s)" % (access_conf, "; ".join(self.notes))
                if access_conf else ""))
        bare = [stanza.name for stanza in self.stanzas if stanza.cmd_cycle_open is None]
        if self.firewall == "none" and bare:
            raise SpaError("%s: firewall = none, and [client %s] has no cmd_cycle_open: its "
                           "knocks would open nothing (hooks do the work without a firewall)"
                           % (path, bare[0]))
        once = [stanza.name for stanza in self.stanzas if stanza.single_use]
        if self.firewall == "none" and once:
            raise SpaError("%s: firewall = none, and [client %s] has single_use = yes: only "
                           "the kernel's firewall can end an opening at its first connection"
                           % (path, once[0]))

    @property
    def pending_closes(self):
        """The file that keeps the hooks' pending closes: next to the replay cache."""
        return os.path.join(os.path.dirname(os.path.abspath(self.replay_cache)),
                            "pending-closes")


# ---------------------------------------------------------------------------
# Replay cache
# ---------------------------------------------------------------------------
#
# No packet may open anything twice.  The digest of every packet that authenticates and
# decrypts is written durably before anything opens (fdatasync), and kept while the
# packet could still pass the age check; a restart reads the file again.  The file is
# the server's own (root's directory); a line it cannot read is skipped and counted.

_B64_TEXT = B64_ALPHABET.decode()


def _replay_digest(key):
    """What the replay cache keeps of a replay key (the base64 of a packet's SHA-256):
    its first 16 bytes.  128 bits tell packets apart as well as 256 here, where no one
    without the keys can make a packet that authenticates, and the table is near half
    the size (README.md: Performance).  The cache file's own lines have these 16 bytes.
    The 16 bytes themselves (packet_digest) are taken as they are."""
    if type(key) is bytes and len(key) == 16:
        return key
    if isinstance(key, str) and len(key) == 43 and not key.strip(_B64_TEXT):
        return binascii.a2b_base64(key + "=")[:16]     # the usual form, in one call
    raw = b64decode(key)
    if len(raw) not in (16, 32):
        raise ValueError("not a replay digest")
    return raw[:16]


def _replay_key(raw):
    return b64encode(raw).decode()


def _reader_digest(key):
    """What the packet reader's copy of the cache keeps of a replay key or digest (see
    ReplayCache.copy): the first 8 of _replay_digest()'s 16 bytes."""
    if type(key) is bytes and len(key) == 8:
        return key
    return _replay_digest(key)[:8]


def _u32(number):
    return min(max(int(number), 0), 0xFFFFFFFF)


class ReplayCache(object):
    """The digests of every authenticated packet, kept durably in a file.

    A line is `<digest> <packet timestamp> <time seen>`, the digest being the base64
    of the first 16 bytes of the packet's SHA-256 (a whole one, as spa.py wrote
    before, is read too: see _replay_digest).  An entry is kept while its packet
    could still pass the age check; older entries are pruned, so the file stays
    small.  A packet timestamp is clamped to the window around the time seen: a stamp
    far ahead keeps no entry longer than two windows (and one stamped 2^32-1 not
    forever), and the file never holds more digits than a clock has.

    `floor`: every packet stamped from then on that the cache was given is still in
    it; earlier ones may have been pruned, so the gatekeeper refuses packets stamped
    before it.  Only a wider window (SIGHUP, or a restart with a larger
    max_packet_age) lets such a packet pass the age check: without the floor, a packet
    pruned under a 3 s window could be used again under a 120 s one.  It is the
    latest limit a prune has used, and the file's first line keeps it.
    `path` None keeps it in memory only (server --test, the packet reader's copy).

    The directory must belong to root and be writable by no one else (it is made, mode
    0700, if missing).  Lines that cannot be read are skipped and counted (`skipped`).
    When a write fails (a full disk), `failure` says why, add_many() returns False
    (nothing may open), and the next attempt writes the whole cache anew, so the file
    never keeps the failed write's partial line.
    """

    HEADER = "# spa.py replay cache: digest packet-time seen-time; floor %d\n"
    LONGEST_LINE = 200

    def __init__(self, path, max_age, now=None):
        self.path, self.max_age = path, max_age
        # digest -> the later of packet time and time seen
        self.entries = PackedMap(16, _replay_digest, _replay_key)
        self.fd = None          # the file, open for appending
        self.failure = None     # why the last write failed; None while every digest is durable
        self.skipped = 0        # lines of the file that could not be read
        self.lines = 0
        self.floor = 0
        now = time.time() if now is None else now
        if path is None:
            return
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise SpaError("cannot make the replay cache's directory %s: %s" % (directory, e.strerror))
        problem = check_private_dir(directory)
        if problem:
            raise SpaError("replay cache: %s" % problem)
        self._load(path, now)
        self.prune(now)
        try:
            self.rewrite()
        except OSError as e:
            if e.errno not in (28, 122):      # ENOSPC, EDQUOT: start, and refuse knocks for now
                raise SpaError("cannot write the replay cache %s: %s" % (path, e.strerror))
            self.failure = e.strerror

    def _load(self, path, now):
        """Read the cache file (missing: nothing to read); lines it cannot read are
        skipped and counted, entries stamped impossibly far ahead dropped."""
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return
        except OSError as e:
            raise SpaError("cannot read the replay cache %s: %s" % (path, e.strerror))
        with f:
            # A file from before floors were recorded was pruned with a window we do not
            # know: nothing stamped before its last change may pass.
            self.floor = int(min(os.fstat(f.fileno()).st_mtime, now))
            for line in f:
                if not line.strip():
                    continue
                if len(line) > self.LONGEST_LINE:
                    self.skipped += 1
                    continue
                if line.startswith(b"#"):
                    head, sep, floor = line.rpartition(b"; floor ")
                    if sep and floor.strip().isdigit():
                        self.floor = int(floor)
                    continue
                try:
                    digest, stamp, seen = line.decode("ascii").split()
                    keep = max(int(stamp), int(seen))
                    if keep <= now + 2 * self.max_age:      # else a forged stamp: dropped
                        self.entries[digest] = _u32(keep)
                except ValueError:            # not three fields, not numbers, not ASCII
                    self.skipped += 1

    def __contains__(self, digest):
        return digest in self.entries

    @staticmethod
    def valid(digest):
        """True if `digest` has the form of a replay key."""
        try:
            return isinstance(digest, str) and len(b64decode(digest)) == 32
        except ValueError:
            return False

    def add(self, digest, packet_time, now):
        """Record a digest; written and flushed to disk before the caller opens anything."""
        return self.add_many([(digest, packet_time)], now)

    def add_new(self, digest, now, most=None):
        """The packet reader's copy (no file): record a digest seen `now` (its packet is
        then in the window) unless it is there; False if it was (a replay).  Holding
        `most` entries, it records no more (True for a digest not there): its table does
        not grow in the middle of a burst, and the parent's cache, the one that counts,
        refuses a replay all the same."""
        if most is not None and len(self.entries) >= most:
            return digest not in self.entries
        return self.entries.add(digest, _u32(int(now)))

    def add_many(self, digests, now):
        """Record [(digest, packet time)] with one write and one sync.  True once they are
        durable; False if they could not be written (`failure` says why): then the
        caller must open nothing.  They stay remembered here either way."""
        now, lines = int(now), []
        for digest, packet_time in digests:
            stamp = min(max(int(packet_time), now - self.max_age), now + self.max_age)
            self.entries[digest] = _u32(max(stamp, now))
            if self.path is not None:       # (the packet reader's copy writes no file)
                lines.append("%s %d %d\n" % (_replay_key(_replay_digest(digest)), stamp, now))
        if self.path is None or not digests:
            return True
        if self.fd is None:
            return self.retry()               # the whole cache, these digests with it
        try:
            write_all(self.fd, "".join(lines).encode())
            sync_file(self.fd)
        except OSError as e:
            self._failed(e)
            return False
        self.lines += len(lines)
        if self.lines > 2 * len(self.entries) + 1000:
            self.prune(now)
            try:
                self.rewrite()
            except OSError as e:    # the file as it was holds every digest: compact it later
                if self.fd is None:             # ...unless it was replaced: write anew then
                    self.failure = e.strerror or str(e)
        return True

    def retry(self):
        """After a failed write, write the whole cache anew; True once that worked."""
        if self.fd is not None or self.path is None:
            return True
        try:
            self.rewrite()
        except OSError as e:
            self.failure = e.strerror or str(e)
            return False
        self.failure = None
        return True

    def _failed(self, error):
        """A write failed: say why, and write the whole file anew next time."""
        self.failure = error.strerror or str(error)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def prune(self, now):
        """Drop the entries no packet could still use; the floor rises with them."""
        limit = int(now) - self.max_age       # the age check counts whole seconds too
        # Never ahead of the clock: after a clock stepped back, packets stamped before the
        # step are refused for one window, not until the clock catches up.
        self.floor = min(max(self.floor, limit), int(now))
        self.entries.keep_if(lambda t: t >= limit)

    def rewrite(self):
        """Write the live entries to a new file and swap it in atomically (replace_file).

        OSError if that fails: the old file is left as it was.  Lines go out 64 KiB at a
        time, each made and dropped in its turn (a list of 10,000 lines would leave its
        memory with Python's allocator).
        """
        if self.path is None:
            return

        def write(fd):
            chunk = bytearray((self.HEADER % self.floor).encode())
            for digest, t in self.entries.items():
                chunk += b"%s %d %d\n" % (digest.encode(), t, t)
                if len(chunk) >= 65536:
                    write_all(fd, chunk)
                    del chunk[:]
            write_all(fd, chunk)
        replace_file(self.path, write)
        old, self.fd = self.fd, None   # the file it appends to is gone
        self.fd = reopen_appending(self.path, old)
        self.lines = len(self.entries)

    def copy(self):
        """An in-memory copy for the packet reader, which must not hold the file.  It keeps
        8 bytes of each digest, in a table 13 bytes a slot instead of 21: 64 bits still
        tell the packets of a window apart (two of 10,000 alike once in ~10^11 windows,
        and then a knock would be refused as a replay, never a replay let through)."""
        seen = ReplayCache(None, self.max_age)
        seen.entries = PackedMap(8, _reader_digest, _replay_key)
        seen.entries.reserve(max(self.entries.reserved, len(self.entries)))
        for raw, value in self.entries._raw_items():
            seen.entries.raise_to(raw[:8], value)
        seen.floor = self.floor
        return seen

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------
# Firewall: one interface, three back ends
# ---------------------------------------------------------------------------
#
# What the server asks of a firewall (Firewall, a small base class), the dry run
# (DryRunFirewall, for --test) and no firewall at all (NoFirewall, firewall = none: hooks
# do the work).  The two real back ends follow:
# nftables, then iptables.  Back ends change only what is theirs (their own table or
# chains, and a marked rule where the host's own chains would drop an opening), and run
# their tools with argument lists (run_command), never through a shell.  A new back end
# (firewalld, pf) is a subclass of Firewall, chosen in make_firewall().

SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_tool(name):
    """Where the tool `name` (nft, ip, iptables...) is: on PATH, else in the sbin folders,
    which a user's PATH often leaves out; None if neither has it.  (shutil.which() would
    do, but shutil brings bz2, lzma and zlib with it: 0.3 MB in the server.)"""
    if os.sep in name:
        return name if os.access(name, os.X_OK) and not os.path.isdir(name) else None
    folders = os.environ.get("PATH", os.defpath).split(os.pathsep) + list(SBIN_DIRS)
    for folder in folders:
        path = os.path.join(folder, name)
        if folder and os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def run_command(argv, stdin=None):
    """Run an external command (argument list, never a shell); return stdout or raise SpaError."""
    import subprocess
    try:
        done = subprocess.run([find_tool(argv[0]) or argv[0]] + list(argv[1:]), input=stdin,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True)
    except FileNotFoundError:
        package = "iptables" if "tables" in argv[0] else {"ip": "iproute2"}.get(argv[0], "nftables")
        raise SpaError("%s not found: install it (Debian: apt install %s)" % (argv[0], package))
    except OSError as e:
        raise SpaError("cannot run %s: %s" % (argv[0], e.strerror))
    if done.returncode != 0:
        raise SpaError("%s failed: %s" % (" ".join(argv[:3]),
                                          done.stderr.strip().replace("\n", " | ")))
    return done.stdout


FORWARDING_SYSCTLS = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}
PROC_SYS = "/proc/sys/"


def warn_without_forwarding(log, families):
    """NAT access to another host needs the kernel to forward; say so where it does not."""
    if log is None:
        return
    for family in sorted(families):
        name = FORWARDING_SYSCTLS[family]
        try:
            with open(PROC_SYS + name.replace(".", "/")) as f:
                on = f.read().strip() != "0"
        except OSError:
            continue
        if not on:
            log.warning("NAT access to another host over IPv%d needs forwarding: "
                        "%s is 0 (local NAT works without it)", family, name)


def _nat_target(address, to_address):
    """to_address as text, if NAT from `address` may lead there; ValueError if not (the
    back ends' own check, behind the policy's)."""
    import ipaddress
    target = ipaddress.ip_address(to_address)
    problem = nat_target_problem(target)
    if problem is None and _family(address) != target.version:
        problem = "not the same address family as %s" % address
    if problem is not None:
        raise ValueError("cannot NAT to %s: %s" % (to_address, problem))
    return str(target)


def _nat_mode(address, mode):
    """`mode` (a NatMode) if a NAT opening from `address` may be forwarded so; ValueError if
    not: an SNAT only to `masquerade` or an address of the same family."""
    dnat, snat, forward_all = mode
    if snat not in (None, "masquerade"):
        snat = _nat_target(address, snat)
    return NatMode(bool(dnat), snat, bool(forward_all))


# A single-use opening admits, for its first ONCE_GRACE seconds, only a connection from the
# source port that the knock names (connect_port); until then the kernel drops (never
# refuses) other new connections to it, so that a client's SYN is sent again after 1 s.
ONCE_GRACE = 1

# nft: the gate of a single-use opening, made by the packet path when a connection takes
# the opening: a limit that lets one packet through (its tokens under a spinlock, and two
# CPUs that add the same element get the same one), for longer than any two first packets
# can race; open_once() takes it away for the next opening.
ONCE_GATE = "timeout 10s limit rate 1/hour burst 1 packets"

# The oldest releases whose kernel and tools accept the rules of single-use openings, as
# read in their sources (README.md: Close the NAT-piggybacking window): nft's delete of a
# set element from the packet path came with Linux 5.4 (d0a8d877da97) and nftables 0.9.3
# (a87f2a2227be); xt_recent's IPv6 lists with Linux 2.6.28 (079aa88fe717) and iptables
# 1.4.3 (c7f0e945).
ONCE_MINIMUM = {"nft": ("5.4", "0.9.3"), "iptables": ("2.6.28", "1.4.3")}


def connect_port(rand):
    """The TCP source port a spa.py client connects from after a knock whose random digits
    are `rand` (--connect): 49152-65535, the dynamic ports.  A NAT that keeps source ports
    (Linux's masquerade does when it can) shows the server the same one."""
    return 49152 + int(rand) % 16384


class Firewall(object):
    """What the server asks of a firewall back end: one small interface, which nft,
    iptables and the dry run share (as bottle.py's server adapters share theirs).

    An opening lets (address, protocol, port) in for some seconds, and the kernel itself
    ends it, so that it ends on time even if the server has died; the protected ports
    refuse everyone else, as `action` says (protect_action: reject or drop).  The back
    ends trust their callers for policy (the gatekeeper decided), not for form: an
    address that is not one, or a NAT target that never may be, raises ValueError.

    Attributes every back end has: `name` (as [server] firewall names it), `protect`
    ([("tcp", 22), ...]), `action`, `nat` (NAT access on), `steer` (refused TCP
    connections redirected to port 0, so that the kernel's own reset answers them),
    `bind` (openings keyed on the knock's interface too), `monitored` (nftables' change
    notifications tell of a reload: RulesetMonitor), `once` (the rules of single-use
    openings are in place: setup() makes them), `log` (None: say nothing).
    """

    name = None
    monitored = False
    once = False        # single-use openings: open_once() (any stanza with single_use)

    def __init__(self, protect, action="reject", log=None, nat=False, bind=False):
        self.protect, self.action, self.log, self.nat, self.bind = protect, action, log, nat, bind
        self.steer = action == "reject" and any(p == "tcp" for p, _ in protect)

    def reconfigure(self, protect, action, nat):
        """New protect, protect_action and NAT switch (at SIGHUP); setup() applies them."""
        self.protect, self.action, self.nat = protect, action, nat
        self.steer = action == "reject" and any(p == "tcp" for p, _ in protect)

    def setup(self):
        """Make or refresh our tables, chains and protect rules; openings in force stay."""
        raise NotImplementedError

    def open(self, address, proto, port, timeout, now=None, interface=None):
        """Open (address, proto, port) for `timeout` seconds, never shortening an opening;
        True if the firewall changed.  With bind, `interface` is the knock's."""
        raise NotImplementedError

    def open_many(self, openings, now=None):
        """Open [(address, proto, port, seconds[, interface])]; returns how many changed."""
        return sum(self.open(*opening[:4], now=now, interface=(opening[4:] or (None,))[0])
                   for opening in openings)

    def open_once(self, openings, now=None):
        """Single-use openings [(address, proto, port, seconds, source port)]: each admits
        one new connection, and the kernel ends it at that connection's first packet or
        after `seconds`, whichever comes first; for its first ONCE_GRACE seconds only from
        `source port` (connect_port).  Each call gives a fresh one (a consumed opening is
        made again).  Needs `once` set before setup(); returns how many."""
        raise NotImplementedError

    def open_nat(self, address, proto, port, to_address, to_port, timeout, local, now=None,
                 mode=PLAIN_NAT, once=None):
        """NAT access (fwknop's message types 2, 4, 5, 6) for `timeout` seconds: connections
        from `address` to `port` go to to_address:to_port (local: a port of this host),
        forwarded as `mode` (a NatMode: with or without DNAT, SNAT, everything) says.
        `once` (a source port, as open_once's): a single-use NAT opening, which the DNAT of
        its first connection takes away (the mode must have a DNAT, and not forward_all);
        for its first ONCE_GRACE seconds only from that port.  Needs `once` set before
        setup(), as open_once."""
        raise NotImplementedError

    def close(self, address, proto, port):
        """Remove the openings of (address, proto, port) now; True if there was one."""
        raise NotImplementedError

    def list(self):
        """The openings in force, read from the kernel:
        [(address, proto, port, seconds left, interface or "")]; an unused single-use
        opening has a sixth item, "single use"."""
        return []

    def list_nat(self):
        """NAT openings in force, read from the kernel:
        [(address, proto, port, to address, to port, local, seconds left)]; an unused
        single-use one has an eighth item, "single use"."""
        return []

    def expire(self, now=None):
        """Forget (and remove, where the kernel does not) the openings past their end;
        returns how many rules went."""
        return 0

    def restore(self):
        """Put back what a reload of the host's firewall removed, if it removed anything
        (intact, _put_back); True if it did.  Logged either way; never raises."""
        try:
            if self.intact():
                return False
            what = self._put_back()
        except SpaError as e:
            self._say("error", "could not restore the firewall: %s", e)
            return False
        self._say("warning", "the firewall was changed under us (a reload?): restored %s", what)
        return True

    def intact(self):
        """False if something of ours is missing from the kernel (a reload removed it)."""
        return True

    def _put_back(self):
        """Make what is ours again, with the openings in force; says what, in words."""
        raise NotImplementedError

    def flush(self):
        """Remove everything of ours; True if there was anything."""
        return False

    def _say(self, level, text, *args):
        if self.log is not None:
            getattr(self.log, level)(text, *args)


class DryRunFirewall(Firewall):
    """Changes nothing; records what it would do (server --test)."""

    name = "none"

    def __init__(self, protect, action="reject", log=None):
        Firewall.__init__(self, protect, action, log)
        self.steer = False
        self.opened = []

    def setup(self):
        self._say("info", "test mode: would protect %s (%s)", format_access(self.protect),
                  self.action)

    def open(self, address, proto, port, timeout, now=None, interface=None):
        self.opened.append((address, proto, port, timeout) + ((interface,) if interface else ()))
        return True

    def open_nat(self, address, proto, port, to_address, to_port, timeout, local, now=None,
                 mode=PLAIN_NAT, once=None):
        self.opened.append((address, proto, port, timeout, to_address, to_port, local)
                           + (() if mode == PLAIN_NAT else (mode,))
                           + (() if once is None else (once, "single use")))
        return True

    def open_many(self, openings, now=None):
        self.opened += openings
        return len(openings)

    def open_once(self, openings, now=None):
        self.opened += [opening + ("single use",) for opening in openings]
        return len(openings)

    def close(self, address, proto, port):
        return False


class NoFirewall(Firewall):
    """firewall = none: spa.py changes no firewall; every stanza's hooks (cmd_cycle_open and
    cmd_cycle_close: pf on another box, a cloud security group, an ipset) open and close.
    It keeps the book of what is open, until when, for the log and for max_openings."""

    name = "none"

    def __init__(self, protect, action="reject", log=None, journal=None):
        Firewall.__init__(self, protect, action, log)
        self.steer = False
        self.ends = {}         # (address, proto, port) -> end (wall clock)
        self.journal = journal   # the hooks' pending closes (PendingCloses), for list()

    def list(self):
        """What the hooks hold open: the pending closes the journal keeps, by the time
        left until each runs (read only; the server keeps the file)."""
        if self.journal is None:
            return []
        now = time.time()
        return [(e["key"][1], e["key"][2], e["key"][3], max(0, int(e["due"] - now)), "")
                for e in read_pending_closes(self.journal)[0].values() if len(e["key"]) == 4]

    def setup(self):
        self._say("info", "firewall = none: spa.py changes no firewall; the stanzas' hooks "
                  "open and close %s", format_access(self.protect))

    def open(self, address, proto, port, timeout, now=None, interface=None):
        now = time.time() if now is None else now
        key = (address, proto, port)
        self.ends[key] = max(self.ends.get(key, 0), now + timeout)
        return True

    def open_nat(self, address, proto, port, to_address, to_port, timeout, local, now=None,
                 mode=PLAIN_NAT, once=None):
        return self.open(address, proto, port, timeout, now)

    def close(self, address, proto, port):
        return self.ends.pop((address, proto, port), None) is not None

    def expire(self, now=None):
        now = time.time() if now is None else now
        for key in [key for key, end in self.ends.items() if end <= now]:
            del self.ends[key]
        return 0


# ---------------------------------------------------------------------------
# nftables
# ---------------------------------------------------------------------------
#
# Our own table `inet spa`: timeout sets of (address, protocol, port) that an accept rule
# looks up, the protect rules, and, with NAT, a DNAT map and the sets that accept what it
# rewrote.  Tables, chains and rules are made with `nft -f`; an opening is a set element
# sent over netlink (NftNetlink), whose timeout the kernel keeps.  What nft prints back
# (JSON) is parsed, nothing else read.

NFT_TABLE = "spa"                     # our own `inet` table; nothing else is touched


class RulesetMonitor(object):
    """The nftables change notifications (what `nft monitor` reads), on a netlink socket:
    tells within milliseconds that someone changed the ruleset (a firewall reload), so the
    back end can put back what was removed.  Element changes, ours the usual news, are
    ignored; iptables-nft's changes come here too."""

    NETLINK_NETFILTER, NFNLGRP_NFTABLES, NFNL_SUBSYS_NFTABLES = 12, 7, 10
    QUIET = (12, 14, 15)        # NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_NEWGEN

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, self.NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 1 << (self.NFNLGRP_NFTABLES - 1)))
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)   # SO_RCVBUFFORCE
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def fileno(self):
        return self.sock.fileno()

    def news(self):
        """True if what arrived may have removed something of ours (or some was lost)."""
        news = False
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return news
            except OSError:              # ENOBUFS: events were lost; check to be sure
                news = True
                continue
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                subsys, message = kind >> 8, kind & 0xFF
                if subsys == self.NFNL_SUBSYS_NFTABLES and message not in self.QUIET:
                    news = True
                offset += max(16, (length + 3) & ~3)

    def close(self):
        self.sock.close()


def nft_key(addresses, proto=None, port=None):
    """The bytes of an nftables concatenation `address [. address] [. proto] [. port]`, as
    nft builds it: each field in network byte order, padded to a 4-byte register."""
    fields = [socket.inet_pton(_socket_family(a), a)
              for a in addresses]
    if proto is not None:
        fields.append(struct.pack("B3x", proto))
    if port is not None:
        fields.append(struct.pack("!H2x", port))
    return b"".join(fields)


class ElementBatch(object):
    """Set and map element changes for one nftables transaction.

    Re-adding an element does not refresh its timeout on older kernels, so an
    element that may be there already is added, deleted and added again.  The
    changes run in three phases (all first adds, all deletes, all last adds), which
    for distinct elements is the same and lets each phase go as one message a set.
    A place is (family, table, set name); a key and data are nft_key() bytes.  An
    element put twice (a local NAT opening and a plain one through the same
    default-drop chain) goes in once, with the longer time: a second delete of it
    would fail the whole transaction.
    """

    def __init__(self):
        self.first, self.deletes, self.last = [], [], []
        self.where = {}        # (place, key) -> its index in self.last

    def put(self, place, key, seconds, data=None, fresh=False, old_data=None):
        """The element is to be there for `seconds`; `fresh`: it is known not to be.  A
        map element that may be there with other data gives that as `old_data` (adding
        it again with the new data would fail: "File exists")."""
        element = (place, key, data, seconds)
        known = self.where.get((place, key))
        if known is not None:
            if seconds > self.last[known][3]:
                self.last[known] = element
            return
        if not fresh:
            self.first.append(element if old_data is None else (place, key, old_data, seconds))
            self.deletes.append((place, key, None, None))
        self.where[(place, key)] = len(self.last)
        self.last.append(element)

    def remove(self, place, key):
        """The element is to be gone (added first, so that the delete cannot fail)."""
        self.first.append((place, key, None, None))
        self.deletes.append((place, key, None, None))

    def __len__(self):
        return len(self.first) + len(self.deletes) + len(self.last)


class NftNetlink(object):
    """Element changes sent straight to the kernel on a netlink socket, each batch one
    nftables transaction, as `nft` sends them: no nft process to keep (its memory grows
    with its cache), and no process started for an opening (README.md: Performance).
    Tables, chains and rules are still made by `nft -f` at setup.
    """

    NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES = 12, 10
    BATCH_BEGIN, BATCH_END, NEWSETELEM, DELSETELEM = 0x10, 0x11, 12, 14
    REQUEST, ACK, CREATE, NESTED, NLMSG_ERROR = 0x1, 0x4, 0x400, 0x8000, 2
    FAMILIES = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}
    SO_SNDBUFFORCE, SOL_NETLINK, NETLINK_CAP_ACK = 32, 270, 10

    def __init__(self):
        self.sock = None
        self.seq = 0

    @staticmethod
    def _attr(kind, payload):
        return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)

    def _message(self, kind, flags, family, payload, res_id=0):
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        return (struct.pack("=IHHII", 20 + len(payload), kind, flags, self.seq, 0) +
                struct.pack("=BBH", family, 0, socket.htons(res_id)) + payload), self.seq

    def _element(self, key, data, seconds):
        item = self._attr(1 | self.NESTED, self._attr(1, key))              # KEY { VALUE }
        if data is not None:
            item += self._attr(2 | self.NESTED, self._attr(1, data))        # DATA { VALUE }
        if seconds is not None:
            item += self._attr(4, struct.pack("!Q", max(1, int(seconds * 1000))))  # TIMEOUT, ms
        return self._attr(1 | self.NESTED, item)                            # LIST_ELEM

    def _elements_message(self, kind, place, items):
        family, table, name = place
        payload = (self._attr(1, table.encode() + b"\0") + self._attr(2, name.encode() + b"\0") +
                   self._attr(3 | self.NESTED, b"".join(items)))
        flags = self.REQUEST | self.ACK | (self.CREATE if kind == self.NEWSETELEM else 0)
        return self._message((self.NFNL_SUBSYS_NFTABLES << 8) | kind, flags,
                             self.FAMILIES[family], payload)

    def commit(self, batch):
        """Apply an ElementBatch atomically; raise SpaError (naming the set) if the kernel
        refuses any of it, in which case none of it took effect."""
        if not len(batch):
            return
        messages, what = [], {}
        for kind, phase in ((self.NEWSETELEM, batch.first), (self.DELSETELEM, batch.deletes),
                            (self.NEWSETELEM, batch.last)):
            # One message per run of elements of the same set, each message's list of
            # elements within a netlink attribute's 64 kB.
            place, items, size = None, [], 0
            for element in phase + [(None, None, None, None)]:
                if items and (element[0] != place or size > 60000):
                    message, seq = self._elements_message(kind, place, items)
                    messages.append(message)
                    what[seq] = "%s element %s" % (
                        "add" if kind == self.NEWSETELEM else "delete", " ".join(place))
                    items, size = [], 0
                if element[0] is not None:
                    place = element[0]
                    items.append(self._element(*element[1:]))
                    size += len(items[-1])
        begin, begin_seq = self._message(self.BATCH_BEGIN, self.REQUEST, 0, b"",
                                         self.NFNL_SUBSYS_NFTABLES)
        end = self._message(self.BATCH_END, self.REQUEST, 0, b"", self.NFNL_SUBSYS_NFTABLES)[0]
        what[begin_seq] = "commit"
        data = begin + b"".join(messages) + end
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                                          self.NETLINK_NETFILTER)
                self.sock.bind((0, 0))
                try:         # answers without a copy of the message (Linux 4.3 and later)
                    self.sock.setsockopt(self.SOL_NETLINK, self.NETLINK_CAP_ACK, 1)
                except OSError:
                    pass
                self.sock.setblocking(False)
            if len(data) > 100000:               # a big batch must fit the send buffer whole
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, self.SO_SNDBUFFORCE, len(data) + 65536)
                except OSError:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, len(data) + 65536)
            self.sock.sendto(data, (0, 0))
            errors = self._answers(set(what) - {begin_seq}, set(what))
        except OSError as e:
            self.close()
            raise SpaError("nftables netlink: %s" % (e.strerror or e))
        if errors:
            seq, errno = errors[0]
            raise SpaError("nft: %s: %s" % (what.get(seq, "change"), os.strerror(errno)))

    def _answers(self, waiting, ours):
        """Read the kernel's answers: [(seq, errno)] of the messages it refused.  It
        handles a batch while we send it, so all answers are queued once send() returns
        (an error in the commit comes as the answer to BATCH_BEGIN)."""
        import select
        errors = []
        while True:
            if waiting and not errors and not select.select([self.sock], [], [], 5.0)[0]:
                raise SpaError("nftables netlink: no answer from the kernel")
            try:
                reply = self.sock.recv(1 << 16)
            except BlockingIOError:
                return errors
            offset = 0
            while offset + 20 <= len(reply):
                length, kind = struct.unpack_from("=IH", reply, offset)
                if kind == self.NLMSG_ERROR and offset + 36 <= len(reply):
                    error, = struct.unpack_from("=i", reply, offset + 16)
                    seq, = struct.unpack_from("=I", reply, offset + 28)
                    waiting.discard(seq)
                    if error < 0 and seq in ours:     # (not a late answer to an old batch)
                        errors.append((seq, -error))
                offset += max(20, (length + 3) & ~3)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# A NAT opening in the nft back end: its end (monotonic clock) and where it leads.
NatEnd = namedtuple("NatEnd", "end to_address to_port local mode")


class OpeningEnds(object):
    """The nft back end's book of openings: (address, proto, port[, interface]) -> its end
    on the monotonic clock, in a PackedMap a family, so that an IPv4 opening's slot holds
    its 4 bytes of address, not 16 (16 bytes a slot instead of 29; with bind_interface,
    the interface's name makes 16 more).  A key that is no opening is absent (get, pop,
    in) or refused with ValueError (setting it), as in a PackedMap."""

    def __init__(self, bind=False):
        self.bind = bind
        self.maps = {family: PackedMap((4 if family == 4 else 16) + 3 + (16 if bind else 0),
                                       self._encoder(family), self._decoder(family), "d")
                     for family in (4, 6)}

    def _encoder(self, family):
        af, parts = socket.AF_INET6 if family == 6 else socket.AF_INET, 4 if self.bind else 3

        def encode(key):
            if type(key) is not tuple or len(key) != parts or key[1] not in PROTO_NUMBERS or \
                    not isinstance(key[2], int) or not 0 <= key[2] <= 65535:
                raise ValueError("not an opening: %r" % (key,))
            try:
                raw = socket.inet_pton(af, key[0]) + struct.pack("!BH", PROTO_NUMBERS[key[1]],
                                                                  key[2])
            except (OSError, TypeError):
                raise ValueError("not an opening: %r" % (key,))
            if self.bind:
                if not valid_interface_name(key[3]):
                    raise ValueError("not an opening bound to an interface: %r" % (key,))
                raw += key[3].encode().ljust(16, b"\0")
            return raw
        return encode

    def _decoder(self, family):
        af, size = socket.AF_INET6 if family == 6 else socket.AF_INET, 4 if family == 4 else 16

        def decode(raw):
            port, = struct.unpack("!H", raw[size + 1:size + 3])
            key = (socket.inet_ntop(af, raw[:size]), PROTO_NAMES[raw[size]], port)
            return key + (raw[size + 3:].rstrip(b"\0").decode(),) if self.bind else key
        return decode

    def _map(self, key):
        try:
            return self.maps[_family(key[0])]
        except (TypeError, IndexError):
            return self.maps[4]            # whose encoder then refuses the key

    def __len__(self):
        return sum(len(m) for m in self.maps.values())

    def __contains__(self, key):
        return key in self._map(key)

    def get(self, key, default=None):
        return self._map(key).get(key, default)

    def __setitem__(self, key, end):
        self._map(key)[key] = end

    def update(self, pairs):
        for key, end in pairs.items():
            self[key] = end

    def pop(self, key, default=None):
        return self._map(key).pop(key, default)

    def items(self):
        for m in self.maps.values():
            for item in m.items():
                yield item

    def keep_if(self, test):
        for m in self.maps.values():
            m.keep_if(test)


class NftFirewall(Firewall):
    """nftables: our own `inet` table with two timeout sets and one input chain.

    New connections to the protected ports are refused unless (source address,
    protocol, port) is in a set whose elements carry the kernel's own timeout,
    so an opening closes on time even when the server has died.  Connections
    opened during the window keep working after it closes (conntrack).

    In nftables an accept ends only its own chain, and a drop anywhere is final.
    So on a host whose own input chains drop by policy, an opening also goes into
    a set of the same kind that spa.py adds to each such chain's table, with one
    accept rule at the top of the chain, marked "spa.py".  Tables that
    iptables-nft manages are never touched (a rule added there by nft breaks
    iptables-save): on such hosts use the iptables back end.

    With protect_action = reject, refused TCP connections are not answered by the
    firewall (its resets carry IPv6 flow label 0, which a scan can tell from the kernel's
    own): a nat chain redirects them to port 0 of this host, where nothing can ever
    listen, so the kernel answers as for any closed port, and conntrack gives the answer
    the original port back.  The reject rule stays as the backstop.

    With bind = True (bind_interface), openings are keyed on the knock's interface
    too (iifname . address . protocol . port, in the `_if` sets).

    Time is kept on the monotonic clock, which a clock step does not move.
    """

    name = "nft"
    MARK = "spa.py"
    STEER_PORT = 0              # no socket can listen on port 0: the kernel always resets
    MARK_BOUND = "spa.py if"           # the accept rule of openings bound to an interface
    MARK_STEER = "spa.py steer"
    MARK_ALL = "spa.py all"     # the accepts of disable_dnat and forward_all openings (forward)
    NAT_SETS = [
        ("map", "dnat4", "{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . "
         "inet_service; flags timeout; }"),
        ("map", "dnat6", "{ type ipv6_addr . inet_proto . inet_service : ipv6_addr . "
         "inet_service; flags timeout; }"),
        ("set", "lnat4", "{ type ipv4_addr . inet_proto . inet_service; flags timeout; }"),
        ("set", "lnat6", "{ type ipv6_addr . inet_proto . inet_service; flags timeout; }"),
        ("set", "fwd4", "{ type ipv4_addr . ipv4_addr . inet_proto . inet_service; "
         "flags timeout; }"),
        ("set", "fwd6", "{ type ipv6_addr . ipv6_addr . inet_proto . inet_service; "
         "flags timeout; }")]
    # forward_all, and SNAT (a map to the address) or MASQUERADE (a set), of one service
    # (keyed as the fwd sets) or of everything from the address (the `all` ones).
    for _v in "46":
        _a = "ipv%s_addr" % _v
        _service = "%s . %s . inet_proto . inet_service" % (_a, _a)
        NAT_SETS += [("set", "fwall" + _v, "{ type %s; flags timeout; }" % _a),
                     ("set", "fwdd" + _v, "{ type %s; flags timeout; }" % _service),
                     ("map", "snat" + _v, "{ type %s : %s; flags timeout; }" % (_service, _a)),
                     ("set", "masq" + _v, "{ type %s; flags timeout; }" % _service),
                     ("map", "snatall" + _v, "{ type %s : %s; flags timeout; }" % (_a, _a)),
                     ("set", "masqall" + _v, "{ type %s; flags timeout; }" % _a)]
    del _v, _a, _service
    NAT_CHAINS = [
        ("prerouting", "{ type nat hook prerouting priority dstnat; policy accept; }",
         ["dnat ip to ip saddr . meta l4proto . th dport map @dnat4",
          "dnat ip6 to ip6 saddr . meta l4proto . th dport map @dnat6"]),
        ("forward", "{ type filter hook forward priority 0; policy accept; }",
         ["ct status dnat ip saddr . ip daddr . meta l4proto . th dport @fwd4 accept",
          "ct status dnat ip6 saddr . ip6 daddr . meta l4proto . th dport @fwd6 accept",
          "ip saddr . ip daddr . meta l4proto . th dport @fwdd4 accept",
          "ip6 saddr . ip6 daddr . meta l4proto . th dport @fwdd6 accept",
          "ip saddr @fwall4 accept", "ip6 saddr @fwall6 accept"]),
        ("postrouting", "{ type nat hook postrouting priority srcnat; policy accept; }",
         ["snat ip to ip saddr . ip daddr . meta l4proto . th dport map @snat4",
          "snat ip6 to ip6 saddr . ip6 daddr . meta l4proto . th dport map @snat6",
          "ip saddr . ip daddr . meta l4proto . th dport @masq4 masquerade",
          "ip6 saddr . ip6 daddr . meta l4proto . th dport @masq6 masquerade",
          "snat ip to ip saddr map @snatall4", "snat ip6 to ip6 saddr map @snatall6",
          "ip saddr @masqall4 masquerade", "ip6 saddr @masqall6 masquerade"])]
    STEER_CHAIN = ("steer", "{ type nat hook prerouting priority -90; policy accept; }")

    monitored = True           # nftables' notifications tell of a reload

    def __init__(self, protect, action="reject", table=NFT_TABLE, log=None, nat=False,
                 bind=False):
        Firewall.__init__(self, protect, action, log, nat, bind)
        self.table = table
        # (address, proto, port[, interface]) -> monotonic end of the opening; one past
        # its end counts as absent, and is dropped at the next purge (expire) or rebuild.
        self.ends = OpeningEnds(bind)
        self.next_purge = 0
        self.nat_ends = {}     # (address, proto, port) -> NatEnd
        # A single-use NAT opening's dnatonce key -> (its data, its end on the monotonic
        # clock): a knock for another target must name the data it replaces.
        self.once_targets = {}
        self.kernel = NftNetlink()
        # Where openings go: (family, table, IPv4 set, IPv6 set); ours first.  Forwarded
        # NAT connections go into the fwd sets, keyed source . destination . proto . port.
        self.places = [("inet", table, "allow4", "allow6")]
        self.fwd_places = [("inet", table, "fwd4", "fwd6")] if nat else []
        self.handle = None             # our table's handle: a new one means it was made anew

    def _nft(self, commands):
        """Run nft commands, as one `nft -f -` transaction."""
        return run_command(["nft", "-f", "-"], "\n".join(commands) + "\n")

    def commands(self):
        """The nft commands that make our table, its sets, chains and rules.  setup() runs
        them, and `firewall-config` writes them into the host's saved ruleset.  Running
        them again changes nothing but the rules: sets keep their elements, and each chain
        is flushed and filled again in the same transaction, so the protect rules are never
        missing for a moment."""
        t = "inet " + self.table
        key = "ipv%s_addr . inet_proto . inet_service; flags timeout; }"
        sets = ["add set %s allow%s { type %s" % (t, v, key % v) for v in "46"]
        if self.bind:
            sets += ["add set %s allow%s_if { type ifname . %s" % (t, v, key % v) for v in "46"]
        chain = ["add chain %s input { type filter hook input priority 0; policy accept; }" % t,
                 "flush chain %s input" % t,
                 "add rule %s input ct state established,related accept" % t]
        if self.once:
            sets += self._once_sets()
            # A flow whose first packet got in (a SYN sent again, a UDP flow before its first
            # reply) still counts as new: it was admitted once already.
            chain.append("add rule %s input ct status confirmed accept" % t)
        for ip, v in (("ip", "4"), ("ip6", "6")):
            chain.append("add rule %s input %s saddr . meta l4proto . th dport @allow%s accept"
                         % (t, ip, v))
            if self.bind:
                chain.append("add rule %s input iifname . %s saddr . meta l4proto . th dport "
                             "@allow%s_if accept" % (t, ip, v))
            if self.once:
                # The kernel ends a single-use opening at the first packet that uses it.
                chain += ["add rule %s input %s" % (t, rule) for rule in self._once_rules(ip, v)]
        if self.nat:
            # Local NAT: only connections a DNAT of ours rewrote, not the port itself.
            chain += ["add rule %s input ct status dnat ip saddr . meta l4proto . th dport "
                      "@lnat4 accept" % t,
                      "add rule %s input ct status dnat ip6 saddr . meta l4proto . th dport "
                      "@lnat6 accept" % t]
        for proto in ("tcp", "udp"):
            ports = self._ports(proto)
            if not ports:
                continue
            verdict = "drop" if self.action == "drop" else \
                ("reject with tcp reset" if proto == "tcp" else "reject")
            chain.append("add rule %s input meta l4proto %s th dport { %s } %s"
                         % (t, proto, ports, verdict))
        if self.steer:
            chain += self._steer_commands()
        if self.nat:
            sets += ["add %s %s %s %s" % (kind, t, name, spec) for kind, name, spec in self.NAT_SETS]
            for name, spec, rules in self.NAT_CHAINS:
                chain += ["add chain %s %s %s" % (t, name, spec), "flush chain %s %s" % (t, name)]
                if name == "prerouting" and self.once:       # before the plain DNATs
                    rules = self._once_nat_rules("ip", "4") + self._once_nat_rules("ip6", "6") \
                        + rules
                chain += ["add rule %s %s %s" % (t, name, rule) for rule in rules]
        return ["add table " + t] + sets + chain

    def _once_sets(self):
        """The commands that make the sets of single-use openings: once4/once6, one element
        an opening, which the rule that admits a connection deletes (so they are dynamic);
        oncep4/oncep6, the source port each prefers; grace4/grace6, openings in their first
        ONCE_GRACE seconds; ready4/ready6, openings whose once element is wholly in place
        (open_once() adds it in a transaction of its own, after the others); gate4/gate6,
        made by the packet path (ONCE_GATE), one element an opening used."""
        kind = "ipv%s_addr . inet_proto . inet_service"
        names = (("once", ""), ("oncep", " . inet_service"), ("grace", ""), ("ready", ""),
                 ("gate", "")) + ((("natonce", ""),) if self.nat else ())
        sets = ["add set inet %s %s%s { type %s; size 65535; flags dynamic,timeout; }"
                % (self.table, name, v, kind % v + extra) for v in "46" for name, extra in names]
        # Single-use NAT openings: natonce4/natonce6 as once4/once6, their DNAT targets in a
        # map of their own (dnat4/dnat6 would DNAT a second connection).
        return sets + ["add map inet %s dnatonce%s { type %s : ipv%s_addr . inet_service; "
                       "flags timeout; }" % (self.table, v, kind % v, v)
                       for v in "46" if self.nat]

    def _once_nat_rules(self, ip, v):
        """The prerouting rules of single-use NAT openings of one family, as _once_rules
        (ready, the preferred port, the grace period's drop, the first comer, the gate):
        the DNAT that leads a connection to the opening's target takes the opening away."""
        key = "%s saddr . meta l4proto . th dport" % ip
        ready = "ct state new %s @ready%s %s" % (key, v, key)
        take = "@natonce%s add @gate%s { %s %s } delete @natonce%s { %s } dnat %s to %s " \
            "map @dnatonce%s" % (v, v, key, ONCE_GATE, v, key, ip, key, v)
        return ["%s . th sport @oncep%s %s %s" % (ready, v, key, take),
                "%s @grace%s %s @natonce%s drop" % (ready, v, key, v),
                "%s %s" % (ready, take)]

    def _once_rules(self, ip, v):
        """The input chain's rules of single-use openings of one family, each only for an
        opening that is ready: the preferred source port gets in; in the grace period
        everyone else is dropped; after it, the first comer.  Whoever gets in takes the
        opening away, and only one can: the kernel's delete of the once element does not
        stop the rule when another CPU deleted it first, so the rule passes the opening's
        gate element (ONCE_GATE), whose limit lets one packet through, atomically."""
        key = "%s saddr . meta l4proto . th dport" % ip
        ready = "ct state new %s @ready%s %s" % (key, v, key)
        take = "@once%s add @gate%s { %s %s } delete @once%s { %s } accept" % (
            v, v, key, ONCE_GATE, v, key)
        return ["%s . th sport @oncep%s %s %s" % (ready, v, key, take),
                "%s @grace%s %s @once%s drop" % (ready, v, key, v),
                "%s %s" % (ready, take)]

    def _ports(self, proto):
        """The protected ports of `proto`, as an nft set's elements: '22, 443'."""
        return ", ".join(str(p) for p in sorted(set(p for pr, p in self.protect if pr == proto)))

    def _steer_commands(self):
        """A nat chain that sends new TCP connections to the protected ports, from anyone
        without an opening, to port 0 of this host: the kernel's own reset answers them.
        Only what is addressed to this host: a router forwards other connections untouched.
        After any DNAT of the host's own (dstnat), which wins."""
        t = "inet " + self.table
        rules = ["fib daddr type != local return"]
        for ip, v in (("ip", "4"), ("ip6", "6")):
            rules.append("%s saddr . meta l4proto . th dport @allow%s return" % (ip, v))
            if self.once:
                rules.append("%s saddr . meta l4proto . th dport @once%s return" % (ip, v))
            if self.bind:
                rules.append("iifname . %s saddr . meta l4proto . th dport @allow%s_if return"
                             % (ip, v))
        rules.append("meta l4proto tcp th dport { %s } redirect to :%d"
                     % (self._ports("tcp"), self.STEER_PORT))
        name, spec = self.STEER_CHAIN       # (priority dstnat + 10)
        return (["add chain %s %s %s" % (t, name, spec), "flush chain %s %s" % (t, name)]
                + ["add rule %s %s %s" % (t, name, r) for r in rules])

    def _removals(self, items):
        """Commands that remove what an earlier setup made and this one does not (NAT or
        the steering switched off at a reload, say), of what the ruleset `items` hold."""
        t = "inet " + self.table
        unwanted = ([] if self.nat else [name for name, _, _ in self.NAT_CHAINS]
                    + [name for _, name, _ in self.NAT_SETS]) + \
            ([] if self.steer else [self.STEER_CHAIN[0]]) + \
            ([] if self.once else ["once4", "once6", "oncep4", "oncep6", "grace4", "grace6",
                                  "ready4", "ready6", "gate4", "gate6"]) + \
            ([] if self.once and self.nat else ["natonce4", "natonce6", "dnatonce4",
                                                "dnatonce6"])
        commands = []
        for item in items:
            for kind in ("chain", "set", "map"):
                thing = item.get(kind, {})
                if (thing.get("family"), thing.get("table")) == ("inet", self.table) and \
                        thing.get("name") in unwanted:
                    if kind == "chain":   # its rules first: they may use a set that goes
                        commands.insert(0, "flush chain %s %s" % (t, thing["name"]))
                    commands.append("delete %s %s %s" % (kind, t, thing["name"]))
        return commands

    def _load(self):
        """Make our table with `commands()`; a table an older spa.py left that nft
        cannot change into ours is deleted and made anew (its openings lost)."""
        t = "inet " + self.table
        try:
            self._nft(self.commands())
        except SpaError:
            # A table left by an incompatible version: start it afresh.
            self._nft(["add table " + t, "delete table " + t] + self.commands())

    def _loads_without_once(self):
        """Whether nft and the kernel accept our ruleset without the rules of single-use
        openings (`nft -c`: checked by the kernel, nothing changed)."""
        self.once = False
        try:
            run_command(["nft", "-c", "-f", "-"], "\n".join(self.commands()) + "\n")
            return True
        except SpaError:
            return False
        finally:
            self.once = True

    def _load_or_say_why(self):
        """_load(), or, where only the rules of single-use openings are refused (an older
        kernel or nft), an error that says so: the server stops rather than run its
        single_use stanzas without them."""
        try:
            self._load()
        except SpaError as e:
            if self.once and self._loads_without_once():
                raise SpaError("single_use = yes: this system's nft or kernel refused the rules "
                               "of single-use openings (%s); they need Linux %s and nftables "
                               "%s or later (README.md: Close the NAT-piggybacking window): "
                               "upgrade, or set single_use = no" % ((e,) + ONCE_MINIMUM["nft"]))
            raise

    def setup(self):
        """Create or refresh our table and our rules in default-drop chains; openings still
        in force survive a restart."""
        try:
            self._load_or_say_why()
        except SpaError as e:
            if not self.steer or str(e).startswith("single_use"):
                raise
            # No NAT in this kernel (or no fib): refuse with the firewall's own resets.
            self.steer = False
            self._load_or_say_why()
            self._say("warning", "refused TCP connections are answered by nftables' reject, "
                      "not by the kernel (%s): over IPv6 its resets carry flow label 0, unlike "
                      "a closed port's (README.md: protect_action)", e)
        items = self._ruleset()
        removals = self._removals(items)
        if removals:
            self._nft(removals)
        self.handle = self._handle(items)
        self.places = self.places[:1] + self._default_drop_places("input", items)
        if self.nat:
            self.fwd_places = [("inet", self.table, "fwd4", "fwd6")] + \
                self._default_drop_places("forward", items)
            warn_without_forwarding(self.log, (4, 6))
            # What single-use NAT openings' DNATs lead to (a knock's new target replaces it).
            now = time.monotonic()
            self.once_targets = {nft_key([k[0]], PROTO_NUMBERS[k[1]], k[2]):
                                 (nft_key([d[0]], None, int(d[1])), now + left + 1)
                                 for v in "46" for k, d, left in
                                 self._elements("map", "dnatonce" + v)} if self.once else {}
        else:
            self.fwd_places, self.nat_ends = [], {}
        now = time.monotonic()
        for key, left in self._kernel_openings():
            try:
                self.ends[key] = max(self.ends.get(key, 0), now + left)
            except ValueError:        # an element someone else put in our set
                pass

    def _handle(self, items):
        """Our table's handle in a ruleset listing, or None."""
        for item in items:
            table = item.get("table", {})
            if (table.get("family"), table.get("name")) == ("inet", self.table):
                return table.get("handle")
        return None

    def _ruleset(self):
        """The whole ruleset as nft's JSON items (nft -j list ruleset)."""
        import json
        return json.loads(run_command(["nft", "-t", "-j", "list", "ruleset"]))["nftables"]

    def _default_drop_places(self, hook, items):
        """Put our set and accept rule in each other `hook` chain that drops what it does not
        allow (input: openings; forward: forwarded NAT connections)."""
        places = []
        prefix, key = ("spa_allow", "saddr . meta l4proto . th dport") if hook == "input" else \
            ("spa_fwd", "saddr . {0} daddr . meta l4proto . th dport")
        for item in items:
            c = item.get("chain", {})
            if c.get("hook") != hook or (c.get("family"), c.get("table")) == ("inet", self.table):
                continue
            family, table, name = c["family"], c["table"], c["name"]
            if c.get("policy") != "drop" and not self._ends_in_drop(items, family, table, name):
                continue
            where = "%s %s" % (family, table)
            if table == "firewalld":
                self._say("error", "firewalld runs here and refuses what it does not allow: open "
                          "the ports through firewalld instead (README.md: firewalld)")
                continue
            if family in ("ip", "ip6") and name.isupper():
                self._say("error", "table %s chain %s drops what it does not allow, but iptables-nft manages it "
                          "and nft must not change it: set firewall = iptables (or auto) so "
                          "openings get through", where, name)
                continue
            v4 = prefix + "4" if family in ("inet", "ip") else None
            v6 = prefix + "6" if family in ("inet", "ip6") else None
            bound = self.bind and hook == "input"
            commands = []
            for set_name, kind in ((v4, "ipv4_addr"), (v6, "ipv6_addr")):
                if set_name:
                    kinds = (kind + " . ") * (2 if hook == "forward" else 1)
                    commands.append("add set %s %s { type %sinet_proto . inet_service; "
                                    "flags timeout; }" % (where, set_name, kinds))
                    if bound:
                        commands.append("add set %s %s_if { type ifname . %sinet_proto . "
                                        "inet_service; flags timeout; }" % (where, set_name, kinds))
            if hook == "forward":
                commands += self._forward_mode_commands(items, where, name, v4, v6)
            for mark, interface, wanted in ((self.MARK, "", True),
                                            (self.MARK_BOUND, "iifname . ", bound)):
                if not wanted or self._has_mark(items, family, table, name, mark):
                    continue
                for set_name, ip in ((v4, "ip"), (v6, "ip6")):
                    if set_name:       # forward: only what a DNAT of ours rewrote
                        commands.append('insert rule %s %s %s%s%s %s @%s%s accept comment "%s"'
                                        % (where, name, "ct status dnat " if hook == "forward"
                                           else "", interface, ip, key.format(ip), set_name,
                                           "_if" if interface else "", mark))
            if self.steer and hook == "input" and \
                    not self._has_mark(items, family, table, name, self.MARK_STEER):
                # What the steer chain sent to port 0 is to get the kernel's reset, as the
                # protected port would have without spa.py.
                commands.append('insert rule %s %s meta l4proto tcp th dport %d ct status dnat '
                                'accept comment "%s"' % (where, name, self.STEER_PORT,
                                                         self.MARK_STEER))
            self._nft(commands)
            self._say("info", "table %s chain %s drops what it does not allow: openings are "
                      "accepted there too%s", where, name, " (forwarded NAT connections)"
                      if hook == "forward" else "")
            places.append((family, table, v4, v6))
        return places

    def _forward_mode_commands(self, items, where, chain, v4, v6):
        """The sets and rules (marked MARK_ALL) that accept, in another table's default-drop
        forward chain, what disable_dnat openings forward (`fwdd` sets, keyed as `fwd`
        without its DNAT) and everything from an address with a forward_all opening."""
        family, table = where.split()
        commands = []
        for set_name, ip in ((v4, "ip"), (v6, "ip6")):
            if set_name:
                kind = "ipv4_addr" if ip == "ip" else "ipv6_addr"
                direct, everything = set_name.replace("fwd", "fwdd"), set_name.replace("fwd",
                                                                                       "fwall")
                commands += ["add set %s %s { type %s . %s . inet_proto . inet_service; "
                             "flags timeout; }" % (where, direct, kind, kind),
                             "add set %s %s { type %s; flags timeout; }"
                             % (where, everything, kind)]
                if not self._has_mark(items, family, table, chain, self.MARK_ALL):
                    commands += ['insert rule %s %s %s saddr . %s daddr . meta l4proto . '
                                 'th dport @%s accept comment "%s"'
                                 % (where, chain, ip, ip, direct, self.MARK_ALL),
                                 'insert rule %s %s %s saddr @%s accept comment "%s"'
                                 % (where, chain, ip, everything, self.MARK_ALL)]
        return commands

    @staticmethod
    def _ends_in_drop(items, family, table, chain):
        """True if the chain's last rule drops or rejects whatever reaches it."""
        rules = [i["rule"] for i in items if "rule" in i and
                 (i["rule"]["family"], i["rule"]["table"], i["rule"]["chain"]) == (family, table, chain)]
        if not rules:
            return False
        verdicts = [e for e in rules[-1].get("expr", []) if "counter" not in e]
        return len(verdicts) == 1 and ("drop" in verdicts[0] or "reject" in verdicts[0])

    def _has_mark(self, items, family, table, chain, mark=MARK):
        """Whether the chain holds our rule with the comment `mark`."""
        return any(r.get("rule", {}).get("comment") == mark and
                   (r["rule"]["family"], r["rule"]["table"], r["rule"]["chain"]) ==
                   (family, table, chain) for r in items if "rule" in r)

    def open(self, address, proto, port, timeout, now=None, interface=None):
        """Open (address, proto, port) for `timeout` seconds; never shortens an opening."""
        opening = (address, proto, port, timeout) + ((interface,) if interface else ())
        return self.open_many([opening], now) == 1

    def _key(self, address, proto, port, interface=None):
        """The key of an opening in `ends`: with bind, the interface is part of it."""
        import ipaddress
        key = (str(ipaddress.ip_address(address)), proto, port)  # only an address reaches nft
        if self.bind:
            if not valid_interface_name(interface):
                raise ValueError("bind_interface: an opening needs its interface")
            return key + (interface,)
        return key

    def open_many(self, openings, now=None):
        """Open [(address, proto, port, seconds[, interface])] in one nft transaction; returns
        how many changed (an opening already in force for longer is left as it is).  `now`
        (the wall clock) is not used: ends are kept on the monotonic clock."""
        now = time.monotonic()
        batch, changed = ElementBatch(), {}
        for opening in openings:
            address, proto, port, timeout = opening[:4]
            key = self._key(address, proto, port, *opening[4:5])
            end = max(self.ends.get(key, 0), changed.get(key, 0))
            if end >= now + timeout:
                continue
            # Not open (as far as we know, and we know all since setup): one add is enough.
            fresh = end <= now - 1 and key not in changed
            for place, element in self._elements_in(self.places, key):
                batch.put(place, element, timeout, fresh=fresh)
            changed[key] = now + timeout
        self.kernel.commit(batch)
        self.ends.update(changed)
        return len(changed)

    def open_once(self, openings, now=None):
        """Single-use openings [(address, proto, port, seconds, source port)] in two nft
        transactions.  The first takes each out of ready4/ready6 and puts it into
        once4/once6 (oncep, grace) anew (after a delete, so that one the kernel removed
        comes back and one still there gets the new time); a default-drop chain of another
        table gets it as a plain opening: what it accepts, our chain refuses once it is
        used.  The second, once the first is wholly done, puts it into ready4/ready6, which
        the rules ask for: while a transaction is being committed, the packet path already
        sees its new elements but cannot delete them (the kernel's delete looks for an
        element in force in both generations), so a rule that took a once element still
        being committed would accept without taking it: a second connection."""
        if not self.once:
            raise SpaError("single-use openings need the firewall set up for them")
        now = time.monotonic()
        batch, ready = ElementBatch(), ElementBatch()
        for address, proto, port, timeout, sport in openings:
            key = self._key(address, proto, port)
            element, v = nft_key([key[0]], PROTO_NUMBERS[proto], port), _family(key[0])
            batch.remove(("inet", self.table, "ready%d" % v), element)
            batch.remove(("inet", self.table, "gate%d" % v), element)   # a used one's
            batch.put(("inet", self.table, "once%d" % v), element, timeout)
            batch.put(("inet", self.table, "oncep%d" % v), element + struct.pack("!H2x", sport),
                      timeout)
            batch.put(("inet", self.table, "grace%d" % v), element, min(ONCE_GRACE, timeout))
            ready.put(("inet", self.table, "ready%d" % v), element, timeout, fresh=True)
            if self.ends.get(key, 0) < now + timeout:
                for place, other in self._elements_in(self.places[1:], key):
                    batch.put(place, other, timeout)
        self.kernel.commit(batch)
        self.kernel.commit(ready)
        return len(openings)

    def open_nat(self, address, proto, port, to_address, to_port, timeout, local, now=None,
                 mode=PLAIN_NAT, once=None):
        """Forward (address, proto, port) to to_address:to_port for `timeout` seconds: to
        another host (accepted in the forward chains), or to this one (local NAT, accepted
        in the input chains), as `mode` says.  Never shortens an opening to the same target;
        a knock for another target replaces the opening: the DNAT leads to the new target at
        once, and what only the old one needed goes.  An element other openings share
        (forward_all's, keyed on the address alone) keeps the longest end any of them needs.
        (`now` is not used: ends are kept on the monotonic clock.)  With `once`: a single-use
        NAT opening (_open_nat_once)."""
        import ipaddress
        now = time.monotonic()
        address = str(ipaddress.ip_address(address))
        to_address = _nat_target(address, to_address)
        mode = PLAIN_NAT if local else _nat_mode(address, mode)
        if once is not None:
            return self._open_nat_once(address, proto, port, to_address, to_port, timeout,
                                       local, mode, once)
        port = port if mode.dnat else to_port     # no DNAT: the client goes to to_port itself
        key = (address, proto, port)
        old = self.nat_ends.get(key)
        same = old is not None and old[1:] == (to_address, to_port, local, mode)
        if same and old.end >= now + timeout:
            return False
        new = self._nat_elements(address, proto, port, to_address, to_port, local, mode)
        needed = self._nat_needs(key, now)       # what the other openings need, until when
        plain = (address, proto, old.to_port) if old is not None else None
        end = self.ends.get(plain, 0) if plain is not None else 0
        if end > now:                                           # a plain opening's too
            needed.update((item, end) for item in self._elements_in(self.places, plain))
        batch = ElementBatch()
        old_data = {}
        if old is not None:
            for place, element, data in self._nat_elements(address, proto, port, *old[1:]):
                old_data[(place, element)] = data
                if not same and (place, element) not in needed and \
                        (place, element) not in [(p, e) for p, e, _ in new]:
                    batch.remove(place, element)
        for place, element, data in new:
            seconds = max(timeout, needed.get((place, element), 0) - now)
            batch.put(place, element, seconds, data=data,
                      old_data=old_data.get((place, element)) if data else None)
        self.kernel.commit(batch)
        self.nat_ends[key] = NatEnd(now + timeout, to_address, to_port, local, mode)
        return True

    def _open_nat_once(self, address, proto, port, to_address, to_port, timeout, local, mode,
                       sport):
        """A single-use NAT opening, in two transactions as open_once's: the first takes it
        out of ready4/ready6 and puts it anew into natonce (oncep, grace), its DNAT into
        dnatonce and what the DNAT leads to (the accept, an SNAT) with the rest, each never
        shortened; the second puts it into ready4/ready6."""
        if not (self.once and self.nat) or not mode.dnat or mode.forward_all:
            raise SpaError("single-use NAT openings need a DNAT, not forward_all, and the "
                           "firewall set up for them")
        now, v = time.monotonic(), _family(address)
        key = nft_key([address], PROTO_NUMBERS[proto], port)
        needed = self._nat_needs(None, now)
        batch, ready = ElementBatch(), ElementBatch()
        batch.remove(("inet", self.table, "ready%d" % v), key)
        batch.remove(("inet", self.table, "gate%d" % v), key)      # a used one's
        for name, element, seconds in (("natonce", key, timeout),
                                       ("oncep", key + struct.pack("!H2x", sport), timeout),
                                       ("grace", key, min(ONCE_GRACE, timeout))):
            batch.put(("inet", self.table, "%s%d" % (name, v)), element, seconds)
        target = None
        for place, element, data in self._nat_elements(address, proto, port, to_address,
                                                       to_port, local, mode):
            if place == ("inet", self.table, "dnat%d" % v):
                place, target = ("inet", self.table, "dnatonce%d" % v), (element, data)
                old = self.once_targets.get(element, (None,))[0]
                batch.put(place, element, timeout, data=data, old_data=old)
            else:
                batch.put(place, element, max(timeout, needed.get((place, element), 0) - now),
                          data=data)
        ready.put(("inet", self.table, "ready%d" % v), key, timeout, fresh=True)
        self.kernel.commit(batch)
        self.once_targets[target[0]] = (target[1], now + timeout)
        self.kernel.commit(ready)
        return True

    def _nat_needs(self, but, now):
        """{(place, element): end} of the elements the NAT openings in force other than `but`
        need, each with the latest end."""
        needed = {}
        for other, (end, o_address, o_port, o_local, o_mode) in self.nat_ends.items():
            if other != but and end > now:
                for place, element, _ in self._nat_elements(other[0], other[1], other[2],
                                                            o_address, o_port, o_local, o_mode):
                    needed[(place, element)] = max(end, needed.get((place, element), 0))
        return needed

    def _nat_elements(self, address, proto, port, to_address, to_port, local, mode=PLAIN_NAT):
        """[(place, key, data)] of the set and map elements one NAT opening needs: the DNAT
        (unless disable_dnat), the accept of what it forwards (local: in the input chains;
        else: forward, the one service or, forward_all, everything from the address), and
        its SNAT or MASQUERADE."""
        six = _family(address) == 6
        v = "6" if six else "4"
        number = PROTO_NUMBERS[proto]
        elements = []
        if mode.dnat:
            elements.append((("inet", self.table, "dnat" + v), nft_key([address], number, port),
                             nft_key([to_address], None, to_port)))
        if local:
            elements.append((("inet", self.table, "lnat" + v),
                             nft_key([address], number, to_port), None))
            # Through default-drop chains elsewhere.
            return elements + [(place, element, None) for place, element in
                               self._elements_in(self.places[1:], (address, proto, to_port))]
        service = nft_key([address, to_address], number, to_port)
        for family, table, v4, v6 in self.fwd_places:
            set_name = v6 if six else v4
            if set_name and mode.forward_all:
                elements.append(((family, table, set_name.replace("fwd", "fwall")),
                                 nft_key([address]), None))
                if not mode.dnat and table == self.table:     # (for list_nat: its target)
                    elements.append(((family, table, set_name.replace("fwd", "fwdd")),
                                     service, None))
            elif set_name:       # without a DNAT: a set whose accept does not ask for one
                elements.append(((family, table, set_name if mode.dnat else
                                  set_name.replace("fwd", "fwdd")), service, None))
        if mode.snat is not None:
            which = ("masq" if mode.snat == "masquerade" else "snat") + \
                ("all" if mode.forward_all else "") + v
            elements.append((("inet", self.table, which),
                             nft_key([address]) if mode.forward_all else service,
                             None if mode.snat == "masquerade" else nft_key([mode.snat])))
        return elements

    @staticmethod
    def _elements_in(places, key):
        """(place, element) of the opening `key` in the set of each place that has one for
        its address's family: `address . proto . port`, or with an interface in the key,
        `interface . address . proto . port` in the `_if` set."""
        address, proto, port = key[:3]
        element = nft_key([address], PROTO_NUMBERS[proto], port)
        if len(key) > 3:
            element = key[3].encode().ljust(16, b"\0") + element
        for family, table, v4, v6 in places:
            set_name = v6 if _family(address) == 6 else v4
            if set_name:
                yield (family, table, set_name + ("_if" if len(key) > 3 else "")), element

    def close(self, address, proto, port, interface=None):
        """Remove an opening now; True if there was one."""
        key = self._key(address, proto, port, interface)
        if self.ends.pop(key, 0) <= time.monotonic():
            return False
        batch = ElementBatch()
        for place, element in self._elements_in(self.places, key):
            batch.remove(place, element)
        self.kernel.commit(batch)
        return True

    def expire(self, now=None):
        """Forget openings past their end; the kernel has removed them itself.  (Ended
        ones already count as absent: the table of ends is purged every 30 s only.)"""
        now = time.monotonic()
        if now >= self.next_purge:
            self.ends.keep_if(lambda end: end > now)
            # (a second's margin: the kernel's end of an element comes a little after ours)
            self.once_targets = {k: (d, end) for k, (d, end) in self.once_targets.items()
                                 if end + 1 > now}
            self.next_purge = now + 30
        for key in [k for k, v in self.nat_ends.items() if v.end <= now]:
            del self.nat_ends[key]
        return 0

    # -- surviving a reload of the host's firewall ------------------------------------------

    def intact(self):
        """False if our table, our rules or our marks in default-drop chains are missing, or
        if our table was made anew (by the host's saved ruleset, say): then its sets lost
        the openings."""
        items = self._ruleset()
        rules = [i["rule"] for i in items if "rule" in i]
        ours = [r for r in rules if (r["family"], r["table"]) == ("inet", self.table)]
        if self._handle(items) != self.handle or len(ours) < 3:
            return False
        for family, table, v4, v6 in self.places[1:] + self.fwd_places[1:]:
            if not any(r.get("comment") == self.MARK and (r["family"], r["table"]) == (family, table)
                       for r in rules):
                return False
        return True

    def _put_back(self):
        """Our table, rules and the openings in force, made again.  An opening comes back
        with what was left of it, never more."""
        self.setup()
        now = time.monotonic()
        alive = [(k, end) for k, end in self.ends.items() if end > now + 0.5]
        batch = ElementBatch()
        for key, end in alive:
            for place, element in self._elements_in(self.places, key):
                batch.put(place, element, end - now)
        for (address, proto, port), (end, to_address, to_port, local, mode) in \
                self.nat_ends.items():
            if end > now + 0.5:
                for place, element, data in self._nat_elements(address, proto, port,
                                                               to_address, to_port, local, mode):
                    batch.put(place, element, end - now, data=data)
        self.kernel.commit(batch)
        return "table inet %s and %d opening(s) in force%s" % (
            self.table, len(alive), " (single-use openings are not put back: they may have "
            "been used; knock again)" if self.once else "")

    def _elements(self, kind, name):
        """(key, data or None, seconds left) of each element of our set or map `name`; the
        key of an `_if` set ends with the interface."""
        import json
        try:
            out = run_command(["nft", "-j", "list", kind, "inet", self.table, name])
        except SpaError:
            return
        for item in json.loads(out)["nftables"]:
            for elem in item.get(kind, {}).get("elem", []):
                key, data = elem if kind == "map" else (elem, None)
                e = key.get("elem", {})
                fields = e["val"]["concat"]
                interface = (fields.pop(0),) if name.endswith("_if") else ()
                addresses, (proto, port) = fields[:-2], fields[-2:]    # fwd: two addresses
                if isinstance(proto, int):
                    proto = PROTO_NAMES.get(proto, str(proto))
                yield tuple(addresses) + (proto, int(port)) + interface, \
                    data and data["concat"], int(e.get("expires", 0))

    def _kernel_openings(self):
        """[(key, seconds left)] of the openings in our sets (those of the other kind too)."""
        names = ("allow4", "allow6") + (("allow4_if", "allow6_if") if self.bind else ())
        return [(key, left) for name in names for key, _, left in self._elements("set", name)]

    def list(self):
        """The openings in force, read from the kernel:
        [(address, proto, port, seconds left, interface or "")]."""
        once = [key + (left, "", "single use") for name in
                (("once4", "once6") if self.once else ()) for key, _, left in
                self._elements("set", name)]
        return [key[:3] + (left, key[3] if len(key) > 3 else "")
                for key, left in self._kernel_openings()] + once

    def list_nat(self):
        """NAT openings in force, read from the kernel:
        [(address, proto, port, to address, to port, local, seconds left)]."""
        local = {key for name in ("lnat4", "lnat6") for key, _, _ in self._elements("set", name)}
        rows = [key + (to_address, int(to_port), (key[0], key[1], int(to_port)) in local, left)
                for name in ("dnat4", "dnat6")
                for key, (to_address, to_port), left in self._elements("map", name)]
        if self.once:        # unused single-use ones: in natonce still (and made: ready)
            ready = {key for name in ("ready4", "ready6")
                     for key, _, _ in self._elements("set", name)}
            unused = {key: left for name in ("natonce4", "natonce6")
                      for key, _, left in self._elements("set", name) if key in ready}
            rows += [key + (to_address, int(to_port), (key[0], key[1], int(to_port)) in local,
                            unused[key], "single use") for name in ("dnatonce4", "dnatonce6")
                     for key, (to_address, to_port), _ in self._elements("map", name)
                     if key in unused]
        # Forwarding without a DNAT (disable_dnat): the port is the inner host's own.
        return rows + [(address, proto, port, to_address, port, False, left)
                       for name in ("fwdd4", "fwdd6")
                       for (address, to_address, proto, port), _, left in
                       self._elements("set", name)]

    def flush(self):
        """Remove our table, and our sets and rules in other tables."""
        items = self._ruleset()
        commands = []
        for r in (i["rule"] for i in items if "rule" in i):
            if r.get("comment") in (self.MARK, self.MARK_BOUND, self.MARK_STEER,
                                    self.MARK_ALL) and \
                    r["table"] != self.table:
                commands.append("delete rule %s %s %s handle %d"
                                % (r["family"], r["table"], r["chain"], r["handle"]))
        for s in (i["set"] for i in items if "set" in i):
            if s["name"] in ("spa_allow4", "spa_allow6", "spa_fwd4", "spa_fwd6",
                             "spa_fwall4", "spa_fwall6", "spa_fwdd4", "spa_fwdd6",
                             "spa_allow4_if", "spa_allow6_if"):
                commands.append("delete set %s %s %s" % (s["family"], s["table"], s["name"]))
        if any(i.get("table", {}).get("name") == self.table and
               i["table"]["family"] == "inet" for i in items):
            commands.append("delete table inet " + self.table)
        if not commands:
            return False
        self._nft(commands)
        return True


# ---------------------------------------------------------------------------
# iptables
# ---------------------------------------------------------------------------
#
# Our own chains (SPA_INPUT, with NAT SPA_FORWARD and SPA_PREROUTING, and SPA_STEER),
# jumped to from the top of the host's chains, changed only with iptables-restore
# --noflush (atomic, one process).  Each opening is a rule whose `time` match carries its
# end into the kernel, and whose comment carries it back to us when the rules are read
# again (`iptables -S`): the only state the back end keeps is what the kernel holds.

IPT_CHAIN = "SPA_INPUT"               # our own chain in the filter table, jumped to from INPUT
IPT_COMMENT = "spa expires "          # + the epoch second an opening ends (list, expire read it)
IPT_WAIT = "10"                       # seconds to wait for the xtables lock before failing
IPT_COMMANDS = ("iptables", "iptables-nft", "iptables-legacy")
IPT_FORWARD_CHAIN = "SPA_FORWARD"         # filter table, jumped to from FORWARD
IPT_NAT_CHAIN = "SPA_PREROUTING"          # nat table, jumped to from PREROUTING
IPT_STEER_CHAIN = "SPA_STEER"             # nat table, jumped to from PREROUTING's end
IPT_SNAT_CHAIN = "SPA_POSTROUTING"        # nat table, jumped to from POSTROUTING (SNAT)
IPT_NAT_COMMENTS = {False: "spa nat expires ", True: "spa local nat expires "}   # by `local`
IPT_ONCE_COMMENT = "spa once expires "      # a single-use opening's rule
IPT_NAT_ONCE_COMMENTS = {False: "spa nat once expires ", True: "spa local nat once expires "}
XT_RECENT = "/proc/thread-self/net/xt_recent/"     # xt_recent's lists (this thread's netns)
IPT_ESTABLISHED = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"]
LEGACY_TABLE_NAMES = {4: "/proc/net/ip_tables_names", 6: "/proc/net/ip6_tables_names"}

# A NAT opening: connections from `address` to `proto`/`port` go to to_address:to_port (local:
# a port of this host).  Its rules (a DNAT and the ACCEPT of what it rewrote) carry its end.
NatOpening = namedtuple("NatOpening", "address proto port to_address to_port local")
# One rule of ours as read from the kernel: its opening (a plain one's key, or a NatOpening),
# its end (epoch seconds), where it is, and its words as `iptables -S` gives them.
IptRule = namedtuple("IptRule", "key end table chain words")


def _parse_opening(words, verdict="ACCEPT", prefix=IPT_COMMENT):
    """((address, proto, port[, interface]), end) of one of our opening rules (`-S` words;
    prefix IPT_ONCE_COMMENT: a single-use one), else None."""
    import ipaddress
    option = dict(zip(words, words[1:]))        # each word -> the word after it
    comment = option.get("--comment", "")
    if not comment.startswith(prefix) or option.get("-j") != verdict:
        return None
    try:
        address = str(ipaddress.ip_interface(option["-s"]).ip)
        port, end = int(option["--dport"]), int(comment[len(prefix):])
    except (KeyError, ValueError):
        return None
    if option.get("-p") not in PROTO_NUMBERS:
        return None
    interface = (option["-i"],) if "-i" in option else ()
    return (address, option["-p"], port) + interface, end


def _nat_mode_words(key, mode):
    """What a NAT rule's comment says after its end, for a mode other than PLAIN_NAT: the
    whole opening (not every rule names it) and the mode: `tcp/5022 198.18.2.2:22 nodnat
    all snat=198.18.2.1` (or `masq`)."""
    if mode == PLAIN_NAT:
        return ""
    words = ["%s/%d" % (key.proto, key.port), format_endpoint(key.to_address, key.to_port)]
    words += ["nodnat"] * (not mode.dnat) + ["all"] * mode.forward_all
    if mode.snat is not None:
        words.append("masq" if mode.snat == "masquerade" else "snat=" + mode.snat)
    return " " + " ".join(words)


def _parse_nat_comment(address, local, words):
    """(NatOpening, NatMode) from the words of a NAT rule's comment after its end."""
    import ipaddress
    proto, _, port = words[0].partition("/")
    host, _, to_port = words[1].rpartition(":")
    if host.startswith("["):
        host = host[1:-1] if host.endswith("]") else ""
    snat = None
    for word in words[2:]:
        if word == "masq" or word.startswith("snat="):
            snat = "masquerade" if word == "masq" else str(ipaddress.ip_address(word[5:]))
        elif word not in ("nodnat", "all"):
            raise ValueError(word)
    if proto not in PROTO_NUMBERS:
        raise ValueError(proto)
    return (NatOpening(address, proto, int(port), str(ipaddress.ip_address(host)), int(to_port),
                       local), NatMode("nodnat" not in words, snat, "all" in words))


def _parse_nat_mode(words):
    """(NatOpening, end, NatMode) of one of our NAT rules (a DNAT, the ACCEPT that goes with
    it, an SNAT or MASQUERADE, as `-S` words), else None."""
    import ipaddress
    option = dict(zip(words, words[1:]))        # each word -> the word after it
    comment = option.get("--comment", "")
    for local, prefix in sorted(IPT_NAT_COMMENTS.items()):
        if comment.startswith(prefix):
            break
    else:
        return None
    try:
        rest = comment[len(prefix):].split()
        end = int(rest[0])
        address = str(ipaddress.ip_interface(option["-s"]).ip)
        if len(rest) > 1:
            opening, mode = _parse_nat_comment(address, local, rest[1:])
            return opening, end, mode
        if option.get("-j") == "DNAT":
            port = int(option["--dport"])
            host, _, to_port = option["--to-destination"].rpartition(":")
            if host.startswith("["):
                host = host[1:-1] if host.endswith("]") else ""
            to_address, to_port = str(ipaddress.ip_address(host)), int(to_port)
        elif option.get("-j") == "ACCEPT":
            port, to_port = int(option["--ctorigdstport"]), int(option["--dport"])
            to_address = str(ipaddress.ip_interface(option["-d"]).ip)
        else:
            return None
    except (KeyError, ValueError, IndexError):
        return None
    if option.get("-p") not in PROTO_NUMBERS:
        return None
    return NatOpening(address, option["-p"], port, to_address, to_port, local), end, PLAIN_NAT


def _parse_nat(words):
    """(NatOpening, end) of one of our NAT rules (see _parse_nat_mode), else None."""
    parsed = _parse_nat_mode(words)
    return parsed and parsed[:2]


def _newest_first(ends):
    """The items of {key: end}, the latest end first (ties in the order of the keys)."""
    return sorted(ends.items(), key=lambda item: (-item[1], item[0]))


def _restore_words(words):
    """One rule as an iptables-restore line: words with a space in double quotes."""
    for word in words:
        if '"' in word or "\n" in word or not word:
            raise SpaError("cannot pass %r to iptables-restore" % word)
    return " ".join('"%s"' % w if " " in w else w for w in words)


class IptablesFirewall(Firewall):
    """iptables (either flavour): our own chain in the filter tables of iptables and ip6tables.

        -I INPUT 1 -j SPA_INPUT
        -A SPA_INPUT -s ADDR -p tcp --dport 22 -m time --datestop END-1s
                     -m comment --comment "spa expires END" -j ACCEPT   (one per opening)
        -A SPA_INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
        -A SPA_INPUT -p tcp --dport 22 -j REJECT --reject-with tcp-reset

    Each opening carries its end into the kernel (the xt_time match, in UTC), so it stops
    matching on time even when the server has died; expire() removes it at its end as the
    monotonic clock counts, so that a clock stepped back does not lengthen it.  An opening
    ACCEPTs, as fwknop's rules do, so it opens the port even on a host whose own INPUT chain
    drops everything; everything else RETURNs to the host's own rules.  Every change is one
    `iptables-restore --noflush`: one process, applied atomically.

    With protect_action = reject, new TCP connections to the protected ports from anyone
    without an opening are redirected to port 0 in the nat table (SPA_STEER, jumped to from
    the end of PREROUTING), so that the kernel answers them as it answers a closed port
    (REJECT's resets carry IPv6 flow label 0); an opening has a RETURN there too.  With
    an interface in an opening's key (bind_interface), its rules have `-i`.
    """

    name = "iptables"

    def __init__(self, protect, action="reject", log=None, command="iptables", nat=False,
                 bind=False):
        if command not in IPT_COMMANDS:
            raise SpaError("firewall = %s: expected one of %s"
                           % (command, ", ".join(IPT_COMMANDS)))
        Firewall.__init__(self, protect, action, log, bool(nat), bind)
        self.commands = {4: command, 6: command.replace("ip", "ip6", 1)}    # ip6tables-nft...
        self.monitored = command == "iptables-nft"      # it speaks nftables: notified too
        # A kernel booted with ipv6.disable=1 has no ip6tables tables (and no IPv6 to guard).
        self.families = (4, 6) if os.path.isdir("/proc/sys/net/ipv6") else (4,)
        # (address, proto, port[, interface]) -> the epoch second its rule ends (the rule's
        # text), and -> its end on the monotonic clock (when expire() removes it)
        self.ends, self.deadlines = {}, {}
        self.nat_ends = {}     # (address, proto, port, to_address, to_port, local) -> end
        self.nat_modes = {}    # the same -> its NatMode, where not PLAIN_NAT
        self.nat_deadlines = {}
        self.once_ends, self.once_deadlines = {}, {}    # single-use openings, as ends
        self.once_nat = {}     # (address, proto, port) -> (NatOpening, (end, port, mode), deadline)
        # Families whose nat table works; setup() drops one that does not (a kernel or an
        # OpenWrt build without IPv6 NAT), so that IPv4 NAT still works there.
        self.nat_families = set(self.families) if self.nat else set()
        self.steer_families = set()        # where the nat table lets us steer (setup)

    def reconfigure(self, protect, action, nat):
        Firewall.reconfigure(self, protect, action, nat)
        self.nat_families = set(self.families) if nat else set()

    def _ipt(self, family, table, *args):
        """Run iptables (or ip6tables) on `table`, waiting for the xtables lock."""
        return run_command([self.commands[family], "--wait=" + IPT_WAIT, "-t", table]
                           + list(args))

    def _restore_tables(self, family, sections):
        """Apply [(table, lines)] in order in one iptables-restore --noflush run.

        Each section is its own commit (atomic within its table, in the order given);
        empty ones are left out.
        """
        text = "".join("*%s\n%sCOMMIT\n" % (table, "".join(line + "\n" for line in lines))
                       for table, lines in sections if lines)
        if text:
            run_command([self.commands[family] + "-restore", "--wait=" + IPT_WAIT, "--noflush"],
                        text)
        return bool(text)

    def _table(self, family, table, names, chain=None):
        """{chain: [rule as a word list]} of the chains `names` of `table` that exist, from
        `-S` (of the whole table, or only of `chain`); the host's other chains are skipped
        unparsed."""
        import shlex
        chains = {}
        for line in self._ipt(family, table, "-S", *([chain] if chain else [])).splitlines():
            words = line.split(None, 2)
            if len(words) < 2 or words[0] not in ("-P", "-N", "-A") or words[1] not in names:
                continue
            rules = chains.setdefault(words[1], [])
            if words[0] == "-A":
                try:
                    rules.append(shlex.split(line)[2:])
                except ValueError:         # quoting shlex cannot read: not one of our rules
                    rules.append(line.split()[2:])
        return chains

    def _openings(self, family, table="filter", chain=IPT_CHAIN):
        """[IptRule] of the opening rules in our chain (or, in the nat table, the RETURNs of
        SPA_STEER)."""
        try:
            rules = self._table(family, table, (chain,), chain).get(chain, [])
        except SpaError:
            return []          # no chain (or no ip6tables): nothing is open
        verdict = "ACCEPT" if table == "filter" else "RETURN"
        found = []
        for words in rules:
            opening = _parse_opening(words, verdict)
            if opening is not None:
                found.append(IptRule(opening[0], opening[1], table, chain, words))
        return found

    def _opening_rule(self, key, end, verdict="ACCEPT"):
        # xt_time matches up to and including the second --datestop: stop one before `end`.
        """The words of an opening's rule: ACCEPT in SPA_INPUT, or RETURN in
        SPA_STEER, matching until `end` (epoch seconds) and saying so in its comment."""
        stop = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(end - 1))
        address, proto, port = key[:3]
        return (["-s", address] + (["-i", key[3]] if len(key) > 3 else []) +
                ["-p", proto, "--dport", str(port), "-m", "time",
                 "--datestop", stop, "-m", "comment", "--comment", IPT_COMMENT + str(end),
                 "-j", verdict])

    def _steered(self, key):
        """True if connections of this opening would be steered without it (see SPA_STEER)."""
        return self.steer and _family(key[0]) in self.steer_families and key[1] == "tcp" \
            and ("tcp", key[2]) in self.protect

    def _protect_rules(self, family, steer=False):
        """SPA_INPUT's rules after the openings: established connections return
        to the host's rules, what SPA_STEER redirected (steer) is accepted, and the protected
        ports are refused as protect_action says."""
        rules = [["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"]]
        if self.once:
            # A flow whose first packet got in (a SYN sent again, a UDP flow before its first
            # reply) still counts as new: it was admitted once already.
            rules.append(["-m", "conntrack", "--ctstate", "NEW", "--ctstatus", "CONFIRMED",
                          "-j", "ACCEPT"])
        if steer:
            # What SPA_STEER sent to port 0 is to get the kernel's reset, as the protected
            # port would have without spa.py, whatever the host's own rules say.
            rules.append(["-p", "tcp", "--dport", "0", "-m", "conntrack", "--ctstate", "DNAT",
                          "-j", "ACCEPT"])
        for proto, port in sorted(set(self.protect)):
            if self.action == "drop":
                verdict = ["DROP"]
            elif proto == "tcp":
                verdict = ["REJECT", "--reject-with", "tcp-reset"]
            else:
                verdict = ["REJECT", "--reject-with",
                           "icmp6-port-unreachable" if family == 6 else "icmp-port-unreachable"]
            rules.append(["-p", proto, "--dport", str(port), "-j"] + verdict)
        return rules

    def _steer_lines(self, nat, keys):
        """SPA_STEER made anew (a RETURN for each steered opening of `keys`, {key: end}), and
        the jump to it at the end of PREROUTING, after the host's own DNATs."""
        lines = [":%s - [0:0]" % IPT_STEER_CHAIN,
                 "-A %s -m addrtype ! --dst-type LOCAL -j RETURN" % IPT_STEER_CHAIN]
        lines += ["-A %s %s" % (IPT_STEER_CHAIN, _restore_words(self._opening_rule(k, e, "RETURN")))
                  for k, e in sorted(keys.items(), key=lambda item: (-item[1], item[0]))]
        lines += ["-A %s -p tcp --dport %d -j REDIRECT --to-ports %d"
                  % (IPT_STEER_CHAIN, port, NftFirewall.STEER_PORT)
                  for proto, port in sorted(set(self.protect)) if proto == "tcp"]
        jumps = nat.get("PREROUTING", []).count(["-j", IPT_STEER_CHAIN])
        if jumps != 1:
            lines += ["-D PREROUTING -j %s" % IPT_STEER_CHAIN] * jumps
            lines.append("-A PREROUTING -j %s" % IPT_STEER_CHAIN)
        return lines

    def saved_rules(self, family):
        """The lines of our chain for the host's saved iptables rules (rules.v4 / rules.v6,
        loaded by iptables-restore at boot and at a reload): the protect rules alone, with
        the jump that must come first in INPUT.  Openings are the server's to put in."""
        return ([":%s - [0:0]" % IPT_CHAIN, "-A INPUT -j %s" % IPT_CHAIN] +
                ["-A %s %s" % (IPT_CHAIN, _restore_words(rule))
                 for rule in self._protect_rules(family, self.steer)])

    def setup(self):
        """Create or rebuild our chains and their jumps; openings in force (plain and NAT)
        survive, expired ones go.  With nat=False, NAT chains left by an earlier run go."""
        now, mono = time.time(), time.monotonic()
        known = self.deadlines
        self.ends, self.nat_ends, self.nat_modes = {}, {}, {}
        # Single-use openings go with the chain's rules (`:SPA_INPUT` empties it): one
        # that was used cannot be told from one that was not once its rule is gone.
        self.once_ends, self.once_deadlines, self.once_nat = {}, {}, {}
        for family in self.families:
            filt, nat = self._read_tables(family)
            use_nat = self.nat and nat is not None
            ends, nat_ends, modes = self._in_force(filt, nat if use_nat else None, now)
            self.ends.update(ends)
            self.nat_ends.update(nat_ends)
            self.nat_modes.update(modes)
            filter_lines, nat_lines = self._setup_lines(family, filt, nat, ends, nat_ends)
            # With NAT on, the ACCEPTs before the DNATs that lead to them.
            self._restore_tables(family, [("filter", filter_lines), ("nat", nat_lines)] if use_nat
                                 else [("nat", nat_lines), ("filter", filter_lines)])
        # Ends on the monotonic clock: what we knew, unless the rule says it ends sooner.
        self.deadlines = {k: min(known.get(k, float("inf")), mono + e - now)
                          for k, e in self.ends.items()}
        self.nat_deadlines = {k: min(self.nat_deadlines.get(k, float("inf")), mono + e - now)
                              for k, e in self.nat_ends.items()}
        if self.nat:
            warn_without_forwarding(self.log, self.nat_families)
        if self.once:
            self._try_once_rules()

    def _try_once_rules(self):
        """Where a stanza has single_use: that the kernel and iptables take the rules of
        single-use openings (xt_recent), with a rule that never matches (an empty list's
        --rcheck) put at the end of our chain and taken out again; else an error that says
        so, and the server stops rather than refuse each single-use knock."""
        words = ["-p", "tcp", "-m", "recent", "--rcheck", "--name", "spa_probe", "--rsource",
                 "-j", "RETURN"]
        for family in self.families:
            try:
                self._restore_tables(family, [("filter", ["-A %s %s" % (
                    IPT_CHAIN, _restore_words(words))])])
            except SpaError as e:
                raise SpaError("single_use = yes: this system's %s or kernel refused the rules "
                               "of single-use openings (%s); they need xt_recent: Linux %s and "
                               "iptables %s or later (README.md: Close the NAT-piggybacking "
                               "window): load xt_recent, or set single_use = no"
                               % ((self.commands[family], e) + ONCE_MINIMUM["iptables"]))
            self._restore_tables(family, [("filter", ["-D %s %s" % (
                IPT_CHAIN, _restore_words(words))])])

    def _read_tables(self, family):
        """(filter chains, nat chains or None) of ours and of their parents, for setup(); notes
        in nat_families and steer_families whether this family's nat table works."""
        filt = self._table(family, "filter", ("INPUT", "FORWARD", IPT_CHAIN, IPT_FORWARD_CHAIN))
        nat = None
        if self.steer or self.nat or self._nat_table_may_hold_ours(family, filt):
            try:
                nat = self._table(family, "nat", ("PREROUTING", "POSTROUTING", IPT_NAT_CHAIN,
                                                  IPT_STEER_CHAIN, IPT_SNAT_CHAIN))
            except SpaError as e:
                steer = "; refused TCP connections are answered by REJECT, not by the " \
                    "kernel" if self.steer else ""
                if self.nat:
                    self._say("warning", "no NAT access over IPv%d: the nat table does not "
                              "work here (%s)%s", family, e, steer)
                elif steer:
                    self._say("warning", "IPv%d: the nat table does not work here (%s)%s",
                              family, e, steer)
        for flag, families in ((self.nat and nat is not None, self.nat_families),
                               (self.steer and nat is not None, self.steer_families)):
            if flag:
                families.add(family)
            else:
                families.discard(family)
        return filt, nat

    @staticmethod
    def _in_force(filt, nat, now):
        """({key: end} of the plain openings, {NatOpening: end} of the NAT ones, {NatOpening:
        NatMode} of those not PLAIN_NAT) that the chains read (_read_tables; nat None: NAT is
        off) hold and that have not ended."""
        ends, nat_ends, modes = {}, {}, {}
        for words in filt.get(IPT_CHAIN, []):
            opening = _parse_opening(words)
            if opening is not None and opening[1] > now:
                ends[opening[0]] = max(opening[1], ends.get(opening[0], 0))
        if nat is None:
            return ends, nat_ends, modes
        # Any rule of a NAT opening brings back all of them (a reload may have taken one).
        for words in (filt.get(IPT_CHAIN, []) + filt.get(IPT_FORWARD_CHAIN, [])
                      + nat.get(IPT_NAT_CHAIN, []) + nat.get(IPT_SNAT_CHAIN, [])):
            parsed = _parse_nat_mode(words)
            if parsed is not None and parsed[1] > now:
                nat_ends[parsed[0]] = max(parsed[1], nat_ends.get(parsed[0], 0))
                modes[parsed[0]] = parsed[2]
        # One NAT opening per DNAT match (address, proto, port): the latest end wins.
        latest = {}
        for key, end in sorted(nat_ends.items(), key=lambda item: item[1]):
            latest[key[:3]] = (key, end)
        return ends, dict(latest.values()), {k: m for k, m in modes.items()
                                             if latest[k[:3]][0] == k and m != PLAIN_NAT}

    def _setup_lines(self, family, filt, nat, ends, nat_ends):
        """The iptables-restore lines (filter, nat) that make our chains anew, with the
        openings in force, and leave one jump to each at the top of its parent chain."""
        use_nat = family in self.nat_families
        nat_rules = [rule for k, e in _newest_first(nat_ends)
                     for rule in self._nat_rule_set(k, e, self.nat_modes.get(k, PLAIN_NAT))]
        in_chain = lambda chain: ["-A %s %s" % (chain, _restore_words(w))
                                  for _, c, w in nat_rules if c == chain]
        # `:CHAIN` creates our chain, or empties it when it exists (with --noflush).
        filter_lines = [":%s - [0:0]" % IPT_CHAIN]
        filter_lines += ["-A %s %s" % (IPT_CHAIN, _restore_words(self._opening_rule(k, e)))
                         for k, e in _newest_first(ends)]
        filter_lines += in_chain(IPT_CHAIN)
        filter_lines += ["-A %s %s" % (IPT_CHAIN, _restore_words(rule))
                         for rule in self._protect_rules(family, family in self.steer_families)]
        filter_lines += self._jump_lines(filt, "INPUT", IPT_CHAIN)
        nat_lines = []
        if use_nat:
            filter_lines.append(":%s - [0:0]" % IPT_FORWARD_CHAIN)
            filter_lines += in_chain(IPT_FORWARD_CHAIN)
            filter_lines.append("-A %s %s" % (IPT_FORWARD_CHAIN, _restore_words(IPT_ESTABLISHED)))
            filter_lines += self._jump_lines(filt, "FORWARD", IPT_FORWARD_CHAIN)
            nat_lines = [":%s - [0:0]" % IPT_NAT_CHAIN] + in_chain(IPT_NAT_CHAIN)
            nat_lines += self._jump_lines(nat, "PREROUTING", IPT_NAT_CHAIN)
            nat_lines += [":%s - [0:0]" % IPT_SNAT_CHAIN] + in_chain(IPT_SNAT_CHAIN)
            nat_lines += self._jump_lines(nat, "POSTROUTING", IPT_SNAT_CHAIN)
        else:
            # NAT off: what an earlier run with NAT on left goes, DNATs first.
            filter_lines += self._removal_lines(filt, "FORWARD", IPT_FORWARD_CHAIN)
            if nat is not None:
                nat_lines = self._removal_lines(nat, "PREROUTING", IPT_NAT_CHAIN) + \
                    self._removal_lines(nat, "POSTROUTING", IPT_SNAT_CHAIN)
        if family in self.steer_families:
            nat_lines += self._steer_lines(nat, {k: e for k, e in ends.items()
                                                 if self._steered(k)})
        elif nat is not None:
            nat_lines += self._removal_lines(nat, "PREROUTING", IPT_STEER_CHAIN)
        return filter_lines, nat_lines

    def _key(self, address, proto, port, interface=None):
        """The key of an opening; raises ValueError for anything but an address, tcp or udp,
        a port and (with bind) an interface name."""
        import ipaddress
        address = str(ipaddress.ip_address(address))   # nothing but an address reaches iptables
        port = int(port)
        if proto not in PROTO_NUMBERS or not 1 <= port <= 65535:
            raise ValueError("cannot open %s/%s" % (proto, port))
        if self.bind:
            if not valid_interface_name(interface):
                raise ValueError("bind_interface: an opening needs its interface")
            return address, proto, port, interface
        return address, proto, port

    def open(self, address, proto, port, timeout, now=None, interface=None):
        """Open (address, proto, port) for `timeout` seconds; never shortens an opening.

        It ends at now + timeout rounded up to a whole second (xt_time counts whole
        seconds).  A rule that opened the same port before is replaced in the same
        commit.  If that fails (our chain was changed behind our back, e.g. by a firewall
        reload), the chain is built again from what is in force, and the change retried once.
        """
        import math
        now = time.time() if now is None else now
        key = self._key(address, proto, port, interface)
        end = int(math.ceil(now + timeout))
        return self._put(key, end, time.monotonic() + end - now)

    def _put(self, key, end, deadline):
        """Make the rule(s) of opening `key`, ending at the epoch second `end` and at
        `deadline` on the monotonic clock; False if it is open longer already."""
        family = _family(key[0])
        for attempt in (1, 2):
            if self.deadlines.get(key, 0) >= deadline:
                return False
            old = self.ends.get(key)
            lines = ["-I %s 1 %s" % (IPT_CHAIN, _restore_words(self._opening_rule(key, end)))]
            nat_lines = []
            if self._steered(key):
                nat_lines = ["-I %s 1 %s" % (IPT_STEER_CHAIN, _restore_words(
                    self._opening_rule(key, end, "RETURN")))]
            if old is not None:
                lines.append("-D %s %s" % (IPT_CHAIN, _restore_words(self._opening_rule(key, old))))
                if nat_lines:
                    nat_lines.append("-D %s %s" % (IPT_STEER_CHAIN, _restore_words(
                        self._opening_rule(key, old, "RETURN"))))
            try:
                self._restore_tables(family, [("nat", nat_lines), ("filter", lines)])
                break
            except SpaError:
                if attempt == 2:
                    raise
                self.setup()
        self.ends[key], self.deadlines[key] = end, deadline
        return True

    # -- single-use openings: a rule with an xt_recent list per port --------------------------

    @staticmethod
    def _recent_name(proto, port, grace=False, nat=False):
        """The xt_recent list of the single-use openings of proto/port (addresses), or of
        those in their grace period; `nat`: of single-use NAT openings of that port."""
        return "spa_%s%s%s%d" % ("n" if nat else "", "g" if grace else "", proto, port)

    def _once_rules(self, key, end, sport, verdict="ACCEPT"):
        """The word lists of a single-use opening's rules until `end`.  In SPA_INPUT: ACCEPT
        the first packet of a new connection from the preferred source port while the
        port's list holds the address, and take it out (--remove, the last match: only a
        packet that matched all else can); in the grace period, DROP the others while it
        is unused; after it, ACCEPT and take out as the first did.  In SPA_STEER (verdict RETURN): RETURN
        while the list holds the address (--rcheck)."""
        stop = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(end - 1))
        address, proto, port = key
        head = ["-s", address, "-p", proto]
        tail = ["--dport", str(port)] + (["-m", "conntrack", "--ctstate", "NEW", "!",
                                         "--ctstatus", "CONFIRMED"] if verdict != "RETURN"
                                        else []) + \
            ["-m", "time", "--datestop", stop, "-m", "comment", "--comment",
             IPT_ONCE_COMMENT + str(end), "-m", "recent"]
        name = ["--name", self._recent_name(proto, port), "--rsource"]
        if verdict == "RETURN":
            return [head + tail + ["--rcheck"] + name + ["-j", "RETURN"]]
        return [head + ["--sport", str(sport)] + tail + ["--remove"] + name + ["-j", "ACCEPT"],
                head + tail + ["--rcheck", "--seconds", str(ONCE_GRACE), "--name",
                               self._recent_name(proto, port, True), "--rsource",
                               "-m", "recent", "--rcheck"] + name + ["-j", "DROP"],
                head + tail + ["--remove"] + name + ["-j", "ACCEPT"]]

    def _recent(self, key, grace=False, nat=False):
        """Put the address of `key` into its port's xt_recent list (or the grace one)."""
        name = self._recent_name(key[1], key[2], grace, nat)
        try:
            with open(XT_RECENT + name, "w") as f:
                f.write("+%s\n" % key[0])
        except OSError as e:
            raise SpaError("cannot change xt_recent list %s: %s" % (name, e.strerror or e))

    def _recent_holds(self, key, nat=False):
        """Whether the port's xt_recent list holds the address: the opening is unused."""
        import ipaddress
        try:
            with open(XT_RECENT + self._recent_name(key[1], key[2], nat=nat)) as f:
                text = f.read()
        except OSError:
            return False
        wanted = ipaddress.ip_address(key[0])
        for line in text.splitlines():
            word = line.split(None, 1)[0] if line.strip() else ""
            try:
                if word.startswith("src=") and ipaddress.ip_address(word[4:]) == wanted:
                    return True
            except ValueError:
                continue
        return False

    def open_once(self, openings, now=None):
        """Single-use openings [(address, proto, port, seconds, source port)]: for each, its
        rules (which replace an earlier one's), then its address into the lists."""
        import math
        if not self.once:
            raise SpaError("single-use openings need the firewall set up for them")
        now = time.time() if now is None else now
        for address, proto, port, timeout, sport in openings:
            key = self._key(address, proto, port)
            end = int(math.ceil(now + timeout))
            self._put_once(key, (end, int(sport)), time.monotonic() + end - now)
        return len(openings)

    def _put_once(self, key, mine, deadline):
        """Make a single-use opening's rules (SPA_INPUT, and SPA_STEER where steered) and put
        its address into the lists; those of an earlier knock go.  `mine`: (end, port)."""
        family = _family(key[0])
        old = self.once_ends.get(key)
        for attempt in (1, 2):
            steer = self._steered(key)
            lines = ["-I %s 1 %s" % (IPT_CHAIN, _restore_words(w))
                     for w in reversed(self._once_rules(key, *mine))]
            nat_lines = ["-I %s 1 %s" % (IPT_STEER_CHAIN, _restore_words(
                self._once_rules(key, mine[0], 0, "RETURN")[0]))] if steer else []
            if old is not None:
                lines += ["-D %s %s" % (IPT_CHAIN, _restore_words(w))
                          for w in self._once_rules(key, *old)]
                if steer:
                    nat_lines.append("-D %s %s" % (IPT_STEER_CHAIN, _restore_words(
                        self._once_rules(key, old[0], 0, "RETURN")[0])))
            try:
                self._restore_tables(family, [("nat", nat_lines), ("filter", lines)])
                break
            except SpaError:
                if attempt == 2 or old is None:
                    raise
                old = None              # its rules are gone (a reload): only the new ones
        self.once_ends[key], self.once_deadlines[key] = mine, deadline
        self._recent(key, grace=True)
        self._recent(key)

    def _once_in_force(self, family, now):
        """[(key, end)] of the single-use rules in SPA_INPUT whose address is still in its
        list (unused) and whose end has not come."""
        try:
            rules = self._table(family, "filter", (IPT_CHAIN,), IPT_CHAIN).get(IPT_CHAIN, [])
        except SpaError:
            return []
        found = dict(o for o in (_parse_opening(words, prefix=IPT_ONCE_COMMENT)
                                 for words in rules) if o is not None and o[1] > now)
        return [(key, end) for key, end in sorted(found.items()) if self._recent_holds(key)]

    def _expire_once(self, now, mono):
        """Remove the rules of single-use openings past their end; how many.  They are named
        by our own words (xt_recent's, as `-S` prints them, do not delete): one that is
        gone already (a reload) is passed over."""
        due = {k for k, (e, _) in self.once_ends.items()
               if e <= now or self.once_deadlines.get(k, 0) <= mono}
        for key in sorted(due):
            end, sport = self.once_ends.pop(key)
            self.once_deadlines.pop(key, None)
            lines = ["-D %s %s" % (IPT_CHAIN, _restore_words(w))
                     for w in self._once_rules(key, end, sport)]
            nat_lines = ["-D %s %s" % (IPT_STEER_CHAIN, _restore_words(
                self._once_rules(key, end, 0, "RETURN")[0]))] if self._steered(key) else []
            self._delete_lines(_family(key[0]), [("nat", nat_lines), ("filter", lines)])
        return len(due)

    def _delete_lines(self, family, sections):
        """Run [(table, `-D` lines)], each table on its own; where one fails (a rule gone
        already, after a reload), line by line, passing over those that fail."""
        for section in sections:
            try:
                self._restore_tables(family, [section])
            except SpaError:
                for line in section[1]:
                    try:
                        self._restore_tables(family, [(section[0], [line])])
                    except SpaError:
                        pass

    def close(self, address, proto, port):
        """Remove every opening of (address, proto, port) now (on every interface); True if
        there was one."""
        import ipaddress
        key = (str(ipaddress.ip_address(address)), proto, int(port))
        family = _family(key[0])
        gone = [o.words for o in self._openings(family) if o.key[:3] == key]
        steered = [o.words for o in self._openings(family, "nat", IPT_STEER_CHAIN)
                   if o.key[:3] == key] if family in self.steer_families else []
        self._restore_tables(family, [
            ("nat", ["-D %s %s" % (IPT_STEER_CHAIN, _restore_words(w)) for w in steered]),
            ("filter", ["-D %s %s" % (IPT_CHAIN, _restore_words(w)) for w in gone])])
        for k in [k for k in self.ends if k[:3] == key]:
            del self.ends[k]
            self.deadlines.pop(k, None)
        return bool(gone)

    def list(self):
        """The openings in force, read from the kernel:
        [(address, proto, port, seconds left, interface or "")]."""
        now = time.time()
        once = [key + (int(end - now), "", "single use") for family in self.families
                for key, end in (self._once_in_force(family, now) if self.once else [])]
        return [key[:3] + (int(end - now), key[3] if len(key) > 3 else "")
                for family in self.families
                for key, end, _, _, _ in self._openings(family) if end > now] + once

    def expire(self, now=None):
        """Remove the plain and NAT rules whose end has passed; returns how many rules (a NAT
        opening is two; a RETURN in SPA_STEER is not counted).  An end has passed when the
        monotonic clock says so (a clock stepped back would leave xt_time matching longer),
        or the wall clock (xt_time stopped matching then already).  The firewall is read
        only when a known end has passed."""
        now = time.time() if now is None else now
        mono = time.monotonic()
        due = {k for k, e in self.ends.items() if e <= now or self.deadlines.get(k, 0) <= mono}
        nat_due = {k for k, e in self.nat_ends.items()
                   if e <= now or self.nat_deadlines.get(k, float("inf")) <= mono}
        removed = 0
        for family in sorted(set(_family(k[0]) for k in due | nat_due)):
            plain, steered = [], []
            if any(_family(k[0]) == family for k in due):
                plain = [o.words for o in self._openings(family) if o.key in due or o.end <= now]
                if family in self.steer_families:
                    steered = [o.words for o in self._openings(family, "nat", IPT_STEER_CHAIN)
                               if o.key in due or o.end <= now]
            rules = [r for r in self._nat_rules(family) if r.key in nat_due or r.end <= now] \
                if any(_family(k[0]) == family for k in nat_due) else []
            self._delete_nat(family, rules, plain, steered)
            removed += len(plain) + len(rules)
        for k in due:
            del self.ends[k]
            self.deadlines.pop(k, None)
        for k in nat_due:
            del self.nat_ends[k]
            self.nat_modes.pop(k, None)
        self.nat_deadlines = {k: d for k, d in self.nat_deadlines.items() if k in self.nat_ends}
        removed += self._expire_once(now, mono) + self._expire_once_nat(now, mono)
        if removed:
            self._say("info", "removed %d expired opening rule%s", removed, "s" * (removed != 1))
        return removed

    def intact(self):
        """False if a chain, a jump, a protect rule or an opening in force is missing."""
        mono = time.monotonic()
        alive = {k for k, d in self.deadlines.items() if d > mono + 0.5}
        for family in self.families:
            filt = self._table(family, "filter", ("INPUT", "FORWARD", IPT_CHAIN,
                                                   IPT_FORWARD_CHAIN))
            mine = filt.get(IPT_CHAIN, [])
            if not filt.get("INPUT") or filt["INPUT"][0] != ["-j", IPT_CHAIN] or \
                    len(mine) < 1 + len(self.protect):
                return False
            wanted = {k for k in alive if _family(k[0]) == family}
            opened = set(o[0] for o in map(_parse_opening, mine) if o is not None)
            if not wanted <= opened:
                return False
            if family in self.nat_families | self.steer_families:
                nat = self._table(family, "nat", ("PREROUTING", "POSTROUTING", IPT_NAT_CHAIN,
                                                  IPT_STEER_CHAIN, IPT_SNAT_CHAIN))
            if family in self.nat_families:
                if not filt.get("FORWARD") or filt["FORWARD"][0] != ["-j", IPT_FORWARD_CHAIN] \
                        or IPT_ESTABLISHED not in filt.get(IPT_FORWARD_CHAIN, []):
                    return False
                if not nat.get("PREROUTING") or nat["PREROUTING"][0] != ["-j", IPT_NAT_CHAIN] \
                        or IPT_NAT_CHAIN not in nat or IPT_SNAT_CHAIN not in nat or \
                        nat.get("POSTROUTING", [[]])[0] != ["-j", IPT_SNAT_CHAIN]:
                    return False
            if family in self.steer_families:
                steer = nat.get(IPT_STEER_CHAIN, [])
                returns = set(o[0] for o in (_parse_opening(w, "RETURN") for w in steer)
                              if o is not None)
                if ["-j", IPT_STEER_CHAIN] not in nat.get("PREROUTING", []) or \
                        not any("REDIRECT" in w for w in steer) or \
                        not {k for k in wanted if self._steered(k)} <= returns:
                    return False
        return True

    def _put_back(self):
        """Our chains, their jumps and the openings (plain and NAT) in force, made again
        (after iptables-restore of the host's rules, a ufw reload).  An opening comes back
        with what was left of it on the monotonic clock, never more."""
        deadlines, nat_deadlines = dict(self.deadlines), dict(self.nat_deadlines)
        nat_keys, modes = list(self.nat_ends), dict(self.nat_modes)
        self.setup()
        now, mono = time.time(), time.monotonic()
        alive = [(key, d) for key, d in deadlines.items() if d > mono + 0.5]
        for key, d in alive:
            self._put(key, int(now + d - mono), d)
        nat_alive = [(key, nat_deadlines[key]) for key in nat_keys
                     if nat_deadlines.get(key, 0) > mono + 0.5
                     and _family(key[0]) in self.nat_families]
        for key, d in sorted(nat_alive, key=lambda item: item[1]):
            self._put_nat(key, int(now + d - mono), modes.get(key, PLAIN_NAT))
            self.nat_deadlines[key] = d
        return "our chains and %d opening(s) in force%s" % (
            len(alive) + len(nat_alive), " (single-use openings are not put back: they may "
            "have been used; knock again)" if self.once else "")

    def flush(self):
        """Remove our chains and the jumps to them (NAT ones too, even with nat=False)."""
        removed = False
        for family in self.families:
            try:
                filt = self._table(family, "filter", ("INPUT", "FORWARD", IPT_CHAIN,
                                                       IPT_FORWARD_CHAIN))
            except SpaError:
                continue
            nat = {}
            if self.steer or self.nat or self._nat_table_may_hold_ours(family, filt):
                try:
                    nat = self._table(family, "nat", ("PREROUTING", "POSTROUTING",
                                                      IPT_NAT_CHAIN, IPT_STEER_CHAIN,
                                                      IPT_SNAT_CHAIN))
                except SpaError:
                    nat = {}
            if self._restore_tables(family, [
                    ("nat", self._removal_lines(nat, "PREROUTING", IPT_NAT_CHAIN)
                     + self._removal_lines(nat, "PREROUTING", IPT_STEER_CHAIN)
                     + self._removal_lines(nat, "POSTROUTING", IPT_SNAT_CHAIN)),
                    ("filter", self._removal_lines(filt, "INPUT", IPT_CHAIN)
                     + self._removal_lines(filt, "FORWARD", IPT_FORWARD_CHAIN))]):
                removed = True
        self.ends, self.nat_ends, self.deadlines, self.nat_deadlines = {}, {}, {}, {}
        self.nat_modes = {}
        return removed

    # -- NAT access (fwknop message types 2, 4, 5, 6) and any-table helpers -----------

    def _nat_table_may_hold_ours(self, family, filter_chains):
        """Whether to read the nat table when NAT is off: only when something of ours may be
        there.  Listing the nat table with iptables-legacy creates it (and loads iptable_nat);
        iptables-nft lists without creating anything."""
        if IPT_FORWARD_CHAIN in filter_chains:
            return True
        try:
            with open(LEGACY_TABLE_NAMES[family]) as f:
                return "nat" in f.read().split()
        except OSError:
            return False

    @staticmethod
    def _nat_until(key, end, mode=PLAIN_NAT):
        """A NAT rule's end: the time match and the comment that carries it (and, for a mode
        other than PLAIN_NAT, the whole opening: _nat_mode_words)."""
        key = NatOpening(*key)
        stop = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(end - 1))
        return ["-m", "time", "--datestop", stop, "-m", "comment", "--comment",
                IPT_NAT_COMMENTS[key.local] + str(end) + _nat_mode_words(key, mode)]

    def _dnat_rule(self, key, end, mode=PLAIN_NAT):
        """The words of a NAT opening's DNAT rule (SPA_PREROUTING)."""
        address, proto, port, to_address, to_port, local = key
        target = format_endpoint(to_address, to_port)
        return (["-s", address, "-p", proto, "--dport", str(port)]
                + self._nat_until(key, end, mode) + ["-j", "DNAT", "--to-destination", target])

    def _nat_accept_rule(self, key, end, mode=PLAIN_NAT):
        """The words of the rule that accepts what a NAT opening forwards: in SPA_INPUT for
        local NAT, in SPA_FORWARD for another host; what its DNAT rewrote, or (disable_dnat)
        what the client sent to the inner host itself, or (forward_all) all it sends."""
        address, proto, port, to_address, to_port, local = key
        until = self._nat_until(key, end, mode) + ["-j", "ACCEPT"]
        if mode.forward_all:
            return ["-s", address] + until
        service = ["-s", address, "-d", to_address, "-p", proto, "--dport", str(to_port)]
        if not mode.dnat:
            return service + until
        return service + ["-m", "conntrack", "--ctstate", "DNAT", "--ctorigdstport",
                          str(port)] + until

    def _snat_rule(self, key, end, mode):
        """The words of a NAT opening's SNAT or MASQUERADE rule (SPA_POSTROUTING): of the
        forwarded service, or (forward_all) of all the address sends."""
        address, proto, port, to_address, to_port, local = key
        match = ["-s", address] if mode.forward_all else \
            ["-s", address, "-d", to_address, "-p", proto, "--dport", str(to_port)]
        target = ["MASQUERADE"] if mode.snat == "masquerade" else \
            ["SNAT", "--to-source", mode.snat]
        return match + self._nat_until(key, end, mode) + ["-j"] + target

    @staticmethod
    def _accept_chain(key):
        """Where a NAT opening's ACCEPT goes (see _nat_accept_rule)."""
        return IPT_CHAIN if key.local else IPT_FORWARD_CHAIN

    def _nat_rule_set(self, key, end, mode=PLAIN_NAT):
        """[(table, chain, words)] of every rule of a NAT opening, the filter one first."""
        key = NatOpening(*key)
        rules = [("filter", self._accept_chain(key), self._nat_accept_rule(key, end, mode))]
        if mode.dnat:
            rules.append(("nat", IPT_NAT_CHAIN, self._dnat_rule(key, end, mode)))
        if mode.snat is not None:
            rules.append(("nat", IPT_SNAT_CHAIN, self._snat_rule(key, end, mode)))
        return rules

    def _nat_rules(self, family):
        """[IptRule] of every NAT rule of ours in the kernel."""
        found = []
        try:
            filt = self._table(family, "filter", (IPT_CHAIN, IPT_FORWARD_CHAIN))
        except SpaError:
            filt = {}
        try:
            nat = self._table(family, "nat", (IPT_NAT_CHAIN, IPT_SNAT_CHAIN)) \
                if family in self.nat_families else {}
        except SpaError:           # no chain: nothing is NATed
            nat = {}
        tables = [("filter", chain, rules) for chain, rules in sorted(filt.items())]
        tables += [("nat", chain, rules) for chain, rules in sorted(nat.items())]
        for table, chain, rules in tables:
            for words in rules:
                parsed = _parse_nat(words)
                if parsed is not None:
                    found.append(IptRule(parsed[0], parsed[1], table, chain, words))
        return found

    @staticmethod
    def _jump_lines(chains, parent, chain):
        """Lines that leave exactly one `-j chain` at the top of `parent`."""
        rules = chains.get(parent, [])
        jumps = rules.count(["-j", chain])
        if jumps == 1 and rules[0] == ["-j", chain]:
            return []
        return ["-D %s -j %s" % (parent, chain)] * jumps + ["-I %s 1 -j %s" % (parent, chain)]

    @staticmethod
    def _removal_lines(chains, parent, chain):
        """Lines that remove the jumps to `chain` from `parent`, then `chain`."""
        lines = ["-D %s -j %s" % (parent, chain)] * chains.get(parent, []).count(["-j", chain])
        if chain in chains:
            lines += ["-F %s" % chain, "-X %s" % chain]
        return lines

    def open_nat(self, address, proto, port, to_address, to_port, timeout, local, now=None,
                 mode=PLAIN_NAT, once=None):
        """NAT access for `timeout` seconds: (address, proto, port) -> to_address:to_port.

        local=False (fwknop types 2/4): DNAT, and forward the DNATed connection to another
        host (SPA_FORWARD).  local=True (types 5/6): DNAT to a port of this host, and accept
        the DNATed connection in SPA_INPUT (before the protect rules), not the port itself.

        Never shortens the same opening; a NAT opening that had the same (address, proto,
        port) is replaced, its rules deleted in the same run.  Ends at now + timeout rounded
        up to a whole second, in the kernel.  Returns True if it changed the firewall.
        With `once` (a source port): a single-use NAT opening (_put_once_nat).
        """
        import math
        import ipaddress
        now = time.time() if now is None else now
        address = str(ipaddress.ip_address(address))   # nothing but addresses reach iptables
        to_address = _nat_target(address, to_address)
        port, to_port = int(port), int(to_port)
        if proto not in PROTO_NUMBERS or not 1 <= port <= 65535 or not 1 <= to_port <= 65535:
            raise ValueError("cannot NAT %s/%s to port %s" % (proto, port, to_port))
        family = _family(address)
        if not self.nat:
            raise SpaError("NAT access is not enabled in the firewall back end")
        if family not in self.nat_families:
            raise SpaError("NAT access over IPv%d is not available on this host" % family)
        mode = PLAIN_NAT if local else _nat_mode(address, mode)
        port = port if mode.dnat else to_port     # no DNAT: the client goes to to_port itself
        key = NatOpening(address, proto, port, to_address, to_port, bool(local))
        end = int(math.ceil(now + timeout))
        if once is not None:
            if not (self.once and mode.dnat and not mode.forward_all):
                raise SpaError("single-use NAT openings need a DNAT, not forward_all, and "
                               "the firewall set up for them")
            self._put_once_nat(key, (end, int(once), mode), time.monotonic() + end - now)
            return True
        changed = self._put_nat(key, end, mode)
        if changed:       # its end on the monotonic clock, which expire() and restore() go by
            self.nat_deadlines[key] = time.monotonic() + end - now
        self.nat_deadlines = {k: d for k, d in self.nat_deadlines.items() if k in self.nat_ends}
        return changed

    def _once_nat_rules(self, key, end, sport, mode):
        """[(table, chain, words)] of a single-use NAT opening's rules, each with a comment
        of its own (IPT_NAT_ONCE_COMMENTS: a restart or a reload never reads them back as a
        NAT opening).  In SPA_PREROUTING, as _once_rules: the DNAT of a connection from the
        preferred port takes the address out of the port's list (--remove, the last match);
        in the grace period the others are DNATed and left in it; after it, the first comer
        takes it.  Before the accept (SPA_FORWARD, or SPA_INPUT for local NAT), a DROP of a
        new connection so DNATed while the address is in the list (the grace period's).
        Then the accept and the SNAT, as a NAT opening's."""
        comment = IPT_NAT_ONCE_COMMENTS[key.local] + str(end)

        def own(words):
            words = list(words)
            words[words.index("--comment") + 1] = comment
            return words
        name = ["--name", self._recent_name(key.proto, key.port, nat=True), "--rsource"]
        dnat = own(self._dnat_rule(key, end, mode))
        accept = own(self._nat_accept_rule(key, end, mode))
        rules = [("nat", IPT_NAT_CHAIN, dnat[:4] + ["--sport", str(sport)] + dnat[4:-4]
                  + ["-m", "recent", "--remove"] + name + dnat[-4:]),
                 ("nat", IPT_NAT_CHAIN, dnat[:-4] + [
                     "-m", "recent", "--rcheck", "--seconds", str(ONCE_GRACE), "--name",
                     self._recent_name(key.proto, key.port, True, True), "--rsource",
                     "-m", "recent", "--rcheck"] + name + dnat[-4:]),
                 ("nat", IPT_NAT_CHAIN, dnat[:-4] + ["-m", "recent", "--remove"] + name
                  + dnat[-4:]),
                 ("filter", self._accept_chain(key), accept[:-2] + [
                     "-m", "conntrack", "--ctstate", "NEW", "!", "--ctstatus", "CONFIRMED",
                     "-m", "recent", "--rcheck"] + name + ["-j", "DROP"]),
                 ("filter", self._accept_chain(key), accept)]
        if mode.snat is not None:
            rules.append(("nat", IPT_SNAT_CHAIN, own(self._snat_rule(key, end, mode))))
        return rules

    def _put_once_nat(self, key, mine, deadline):
        """Make a single-use NAT opening's rules (those of an earlier knock for the same
        address, protocol and port go), then put its address into the lists.  `mine`:
        (end, source port, NatMode)."""
        family = _family(key.address)
        old = self.once_nat.get(key[:3])
        new = self._once_nat_rules(key, *mine)
        gone = self._once_nat_rules(old[0], *old[1]) if old else []
        insert = lambda table: ["-I %s 1 %s" % (c, _restore_words(w))
                                for t, c, w in reversed(new) if t == table]
        delete = lambda table: ["-D %s %s" % (c, _restore_words(w)) for t, c, w in gone
                                if t == table]
        try:
            self._restore_tables(family, [("filter", insert("filter")),
                                          ("nat", insert("nat") + delete("nat")),
                                          ("filter", delete("filter"))])
        except SpaError:
            if not old:
                raise
            self._delete_lines(family, [("nat", delete("nat")), ("filter", delete("filter"))])
            self._restore_tables(family, [("filter", insert("filter")), ("nat", insert("nat"))])
        self.once_nat[key[:3]] = (key, mine, deadline)
        self._recent(key[:3], grace=True, nat=True)
        self._recent(key[:3], nat=True)

    def _expire_once_nat(self, now, mono):
        """Remove the rules of single-use NAT openings past their end (by our own words, as
        _expire_once); how many openings."""
        due = [k for k, (_, (end, _, _), deadline) in self.once_nat.items()
               if end <= now or deadline <= mono]
        for k in sorted(due):
            key, mine, _ = self.once_nat.pop(k)
            rules = self._once_nat_rules(key, *mine)
            self._delete_lines(_family(key.address), [
                (table, ["-D %s %s" % (c, _restore_words(w)) for t, c, w in rules if t == table])
                for table in ("nat", "filter")])
        return len(due)

    def _once_nat_unused(self, family, now):
        """[(address, proto, port, to address, to port, local, seconds left, "single use")]
        of the single-use NAT openings whose DNAT rules are in force and whose address is
        still in the port's list."""
        import ipaddress
        try:
            rules = self._table(family, "nat", (IPT_NAT_CHAIN,), IPT_NAT_CHAIN).get(
                IPT_NAT_CHAIN, [])
        except SpaError:
            return []
        found = {}
        for words in rules:
            option = dict(zip(words, words[1:]))
            comment = option.get("--comment", "")
            for local, prefix in sorted(IPT_NAT_ONCE_COMMENTS.items()):
                if comment.startswith(prefix) and option.get("-j") == "DNAT":
                    try:
                        host, _, to_port = option["--to-destination"].rpartition(":")
                        key = (str(ipaddress.ip_interface(option["-s"]).ip), option["-p"],
                               int(option["--dport"]), str(ipaddress.ip_address(
                                   host.strip("[]"))), int(to_port), local)
                        end = int(comment[len(prefix):])
                    except (KeyError, ValueError):
                        continue
                    if end > now and self._recent_holds(key, nat=True):
                        found[key] = max(end, found.get(key, 0))
        return [key + (int(end - now), "single use") for key, end in sorted(found.items())]

    def _put_nat(self, key, end, mode=PLAIN_NAT):
        """Make the rules of NAT opening `key`, ending at the epoch second `end`,
        replacing those of an opening with the same (address, proto, port); False if it is open
        longer already.  If our chains were changed behind our back, rebuild them and retry once."""
        family = _family(key[0])
        for attempt in (1, 2):
            old = self.nat_ends.get(key) if self.nat_modes.get(key, PLAIN_NAT) == mode else None
            if old is not None and old >= end:
                # After a failed first attempt this is success: each table commits on its
                # own, so the filter part may have gone in before the nat part failed, and
                # setup() has then rebuilt both rules from it.
                return attempt == 2
            replaced = [(k, e) for k, e in self.nat_ends.items() if k[:3] == key[:3]]
            gone = [rule for k, e in replaced
                    for rule in self._nat_rule_set(k, e, self.nat_modes.get(k, PLAIN_NAT))]
            new = self._nat_rule_set(key, end, mode)
            sections = [
                # The new ACCEPT first, then the DNAT (and SNAT) swap, then the old ACCEPTs
                # go: no moment in which a DNAT of ours leads to nothing.
                ("filter", ["-I %s 1 %s" % (c, _restore_words(w)) for t, c, w in new
                            if t == "filter"]),
                ("nat", ["-I %s 1 %s" % (c, _restore_words(w)) for t, c, w in new if t == "nat"]
                 + ["-D %s %s" % (c, _restore_words(w)) for t, c, w in gone if t == "nat"]),
                ("filter", ["-D %s %s" % (c, _restore_words(w)) for t, c, w in gone
                            if t == "filter"])]
            try:
                self._restore_tables(family, sections)
                break
            except SpaError:
                if attempt == 2:
                    raise
                self.setup()            # our chains changed behind our back: rebuild, retry
                if family not in self.nat_families:
                    raise
        for k, _ in replaced:
            del self.nat_ends[k]
            self.nat_modes.pop(k, None)
        self.nat_ends[key] = end
        if mode != PLAIN_NAT:
            self.nat_modes[key] = mode
        return True

    def close_nat(self, address, proto, port):
        """Remove every NAT opening of (address, proto, port) now; True if there was one."""
        import ipaddress
        match = (str(ipaddress.ip_address(address)), proto, int(port))
        family = _family(match[0])
        gone = [r for r in self._nat_rules(family) if r.key[:3] == match]
        self._delete_nat(family, gone)
        self.nat_ends = {k: e for k, e in self.nat_ends.items() if k[:3] != match}
        self.nat_modes = {k: m for k, m in self.nat_modes.items() if k in self.nat_ends}
        return bool(gone)

    def _delete_nat(self, family, rules, plain=(), steered=()):
        """Delete NAT rules (from _nat_rules), plain SPA_INPUT rules and their SPA_STEER
        RETURNs: DNATs first."""
        return self._restore_tables(family, [
            ("nat", ["-D %s %s" % (r.chain, _restore_words(r.words)) for r in rules
                     if r.table == "nat"]
             + ["-D %s %s" % (IPT_STEER_CHAIN, _restore_words(w)) for w in steered]),
            ("filter", ["-D %s %s" % (r.chain, _restore_words(r.words))
                        for r in rules if r.table == "filter"]
             + ["-D %s %s" % (IPT_CHAIN, _restore_words(w)) for w in plain])])

    def list_nat(self):
        """NAT openings in force, read from the kernel:
        [(address, proto, port, to_address, to_port, local, seconds left)]."""
        now = time.time()
        ends = {}              # one row an opening, whichever of its rules are there
        for family in sorted(self.nat_families):
            for key, end, _, _, _ in self._nat_rules(family):
                if end > now:
                    ends[key] = max(end, ends.get(key, 0))
        return [key + (int(end - now),) for key, end in sorted(ends.items())] + \
            [row for family in (sorted(self.nat_families) if self.once else ())
             for row in self._once_nat_unused(family, now)]


# ---------------------------------------------------------------------------
# Choosing the back end, and the host's saved firewall
# ---------------------------------------------------------------------------
#
# firewall = auto looks at the host's rules to choose nft or an iptables flavour.  The
# saved firewall (SavedFirewall) is the host's own ruleset files, which a reload or a
# boot loads: firewall-config puts our protect rules there, so that the protected ports
# are never open, with the server running or not.  Those files are the host's: spa.py
# edits only its own lines, and checks the result with nft -c or iptables-restore --test
# before it replaces one.

def _iptables_in_use(flavour):
    """True if that iptables flavour holds a rule or a non-ACCEPT policy (IPv4 or IPv6).

    iptables-save lists only the tables that exist, and creates none.
    """
    for command in ("iptables-%s-save" % flavour, "ip6tables-%s-save" % flavour):
        try:
            out = run_command([command])
        except SpaError:
            continue
        for line in out.splitlines():
            if line.startswith("-A ") or (line.startswith(":") and len(line.split()) > 1
                                          and line.split()[1] not in ("ACCEPT", "-")):
                return True
    return False


def detect_firewall(log=None):
    """For `firewall = auto`: "nft", "iptables-nft" or "iptables-legacy".

    nft, unless the host keeps its own rules in iptables.  A packet must pass every base
    chain on the input hook, and an accept in our nft table cannot undo a drop in the host's
    iptables chains, so on such a host only a rule inside its INPUT chain opens a port.  And
    nft must never change a table that iptables-nft manages (iptables-save then fails with
    "table is incompatible"), which the iptables back end never does.  So: iptables-nft when
    iptables-nft has made its filter table (chain INPUT in ip or ip6 filter); iptables-legacy
    when legacy iptables holds rules or a non-accept policy; nft otherwise.  Without nft, the
    flavour that holds rules, or else the one `iptables -V` names.
    """
    import json
    nft_works = nft_managed = False
    try:
        listing = json.loads(run_command(["nft", "-j", "list", "chains"]))
        nft_works = True
        nft_managed = any(c.get("family") in ("ip", "ip6") and c.get("table") == "filter"
                          and c.get("name") == "INPUT"
                          for c in (item.get("chain", {}) for item in listing.get("nftables", [])))
    except (SpaError, ValueError, AttributeError):
        pass
    legacy_used = _iptables_in_use("legacy")
    nft_used = nft_managed if nft_works else _iptables_in_use("nft")
    if nft_used and not legacy_used:
        choice, why = "iptables-nft", "iptables-nft manages the filter table"
    elif legacy_used and not nft_used:
        choice, why = "iptables-legacy", "the host's rules are in legacy iptables"
    elif nft_works and not legacy_used:
        choice, why = "nft", "no iptables rules on this host"
    else:
        try:
            version = run_command(["iptables", "-V"])
        except SpaError:
            raise SpaError("firewall = auto: neither nft nor iptables works here: install "
                           "nftables (Debian: apt install nftables)")
        choice = "iptables-legacy" if "(legacy)" in version else "iptables-nft"
        why = "iptables -V says %s" % version.strip()
    if log:
        log.info("firewall = auto: using %s (%s)", choice, why)
    return choice


def make_firewall(config, test, log=None):
    """The back end the config asks for: nft, iptables (either flavour), none (the hooks
    do the work), or a dry run (--test)."""
    if test:
        return DryRunFirewall(config.protect, config.protect_action, log)
    if config.firewall == "none":
        return NoFirewall(config.protect, config.protect_action, log, config.pending_closes)
    kind = detect_firewall(log) if config.firewall == "auto" else config.firewall
    nat = config.enable_forwarding or config.enable_local_nat
    if kind == "nft":
        firewall = NftFirewall(config.protect, config.protect_action, log=log, nat=nat,
                               bind=config.bind_interface)
    else:
        firewall = IptablesFirewall(config.protect, config.protect_action, log, command=kind,
                                    nat=nat, bind=config.bind_interface)
    firewall.once = config.single_use
    return firewall


def _uncommented(text):
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _nft_statement(line):
    return line.split("#", 1)[0].strip().rstrip(";").strip()


def nft_includes(main, text, path):
    """True if the nft ruleset file `main` (its `text`) includes the file `path`, by name or
    by a glob, at its top level (an include inside a table block would put our table inside
    another: fw4's /etc/nftables.d/ is such a place), after its last `flush ruleset`."""
    import fnmatch
    depth, found = 0, False
    for line in text.splitlines():
        statement = _nft_statement(line)
        if statement == "flush ruleset":
            found = False                # what was included before is flushed
        elif depth == 0 and statement.startswith("include "):
            pattern = statement[len("include "):].strip().strip('"')
            found = found or any(fnmatch.fnmatch(path, candidate) for candidate in (
                pattern, os.path.join(os.path.dirname(main), pattern),
                os.path.join("/etc", pattern)))
        depth += statement.count("{") - statement.count("}")
    return found


def with_nft_include(text, path):
    """The nft ruleset file `text` with an include of `path` right after its (last) `flush
    ruleset` (at its start, after the first comment lines, if it flushes nothing)."""
    lines = text.splitlines(True)
    at = max((i + 1 for i, line in enumerate(lines)
              if _nft_statement(line) == "flush ruleset"), default=None)
    if at is None:
        at = 0
        while at < len(lines) and lines[at].startswith("#"):
            at += 1
    if at and not lines[at - 1].endswith("\n"):
        lines[at - 1] += "\n"
    return "".join(lines[:at] + ['include "%s"\n' % path] + lines[at:])


def _rule_words(line):
    """An iptables-restore rule line as words, the implicit `-m tcp`/`-m udp` left out and
    quotes read, so that iptables-save's form and ours compare equal."""
    import shlex
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    out = []
    for word in words:
        if out and out[-1] == "-m" and word in ("tcp", "udp"):
            out.pop()
            continue
        out.append(word)
    return out


def _filter_section(text):
    """(lines before, the *filter section's lines between `*filter` and COMMIT, lines after);
    the middle is None when the text has no *filter section."""
    lines = text.splitlines()
    try:
        start = [line.strip() for line in lines].index("*filter")
        end = start + 1 + [line.strip() for line in lines[start + 1:]].index("COMMIT")
    except ValueError:
        return lines, None, []
    return lines[:start + 1], lines[start + 1:end], lines[end:]


def _ours(line):
    words = _rule_words(line)
    return (words[:1] == [":" + IPT_CHAIN] or words[:2] == ["-A", IPT_CHAIN] or
            words == ["-A", "INPUT", "-j", IPT_CHAIN])


def iptables_rules_hold(text, lines):
    """True if iptables-restore `text` has our chain with the protect rules of `lines` (in
    their order; openings a save caught may sit among them) and the jump to it first in
    INPUT, in its *filter table."""
    _, body, _ = _filter_section(text)
    if body is None:
        return False
    rules = [_rule_words(line) for line in body if line.strip().startswith("-")]
    inputs = [words for words in rules if words[1:2] == ["INPUT"]]
    want = [_rule_words(line) for line in lines if line.startswith("-A %s " % IPT_CHAIN)]
    have = [words for words in rules if words[:2] == ["-A", IPT_CHAIN]
            and _parse_opening(words[2:]) is None]
    return (any(line.split()[:1] == [":" + IPT_CHAIN] for line in body) and
            inputs[:1] == [["-A", "INPUT", "-j", IPT_CHAIN]] and have == want)


def with_iptables_rules(text, lines):
    """iptables-restore `text` with `lines` (saved_rules) in its *filter table, in place of
    anything of ours it had (openings an iptables-save caught included): our chain declared
    with the others, the jump and our rules before the first rule, so the jump comes first
    in INPUT.  The other tables and rules stay as they are."""
    head, body, tail = _filter_section(text)
    declare = [line for line in lines if line.startswith(":")]
    rules = [line for line in lines if not line.startswith(":")]
    if body is None:
        head = head + ["*filter"]
        body, tail = [], ["COMMIT"]
    body = [line for line in body if not _ours(line)]
    first = next((i for i, line in enumerate(body) if line.strip().startswith("-")), len(body))
    body = body[:first] + declare + rules + body[first:]
    return "\n".join(head + body + tail) + "\n"


class SavedFirewall(object):
    """spa.py's protection in the host's own saved firewall, so that a firewall reload or a
    boot loads it with the host's rules, in the same transaction: the protected ports are
    never open for a moment, whether the server runs or not.  The server only adds openings
    (and puts back, from its memory, those a reload removed).

    nft: our table's commands in a file of their own (`nft_include`), which the host's
    ruleset file includes (Debian's /etc/nftables.conf starts with `flush ruleset`, so
    anything not in it is gone after a reload).  fw4 (OpenWrt) includes the files in
    /usr/share/nftables.d/ruleset-post/ by itself, after its own table.  iptables: our chain
    with its protect rules, and the jump to it first in INPUT, in the *filter table of the
    files iptables-restore loads (iptables-persistent's /etc/iptables/rules.v4 and
    rules.v6, iptables-services' /etc/sysconfig/iptables and ip6tables).
    """

    FW4_DIR = "/usr/share/nftables.d/ruleset-post"

    def __init__(self, config, firewall):
        self.config, self.firewall = config, firewall
        self.kind = "nft" if isinstance(firewall, NftFirewall) else "iptables"
        self.main = self.include = None
        self.rules = {}                         # iptables: family -> rules file
        paths = config.saved_firewall
        if self.kind == "nft":
            fw4 = os.path.isdir(os.path.dirname(self.FW4_DIR)) or os.path.exists("/sbin/fw4")
            self.include = config.nft_include or (
                os.path.join(self.FW4_DIR, "spa.nft") if fw4 and paths == "auto"
                else "/etc/spa/spa.nft")
            if paths == "auto" and not fw4:
                self.main = next((p for p in ("/etc/sysconfig/nftables.conf", "/etc/nftables.nft")
                                  if os.path.exists(p)), "/etc/nftables.conf")
            elif paths != "auto":
                self.main = paths[0]
        else:
            if paths == "auto":
                rhel = os.path.exists("/etc/sysconfig/iptables") or (
                    os.path.isdir("/etc/sysconfig") and not os.path.isdir("/etc/iptables"))
                paths = ["/etc/sysconfig/iptables", "/etc/sysconfig/ip6tables"] if rhel else \
                    ["/etc/iptables/rules.v4", "/etc/iptables/rules.v6"]
            if len(paths) < len(firewall.families):
                raise SpaError("saved_firewall: name the IPv4 and the IPv6 rules files, in "
                               "that order (iptables-restore and ip6tables-restore load them)")
            self.rules = dict(zip(firewall.families, paths))

    def include_text(self):
        """The file nft_include holds: our table's commands, under a note."""
        return ("# spa.py's table, written by `spa.py firewall-config` from\n"
                "# %s; run that again when protect or protect_action change.\n"
                "# The host's saved ruleset includes this file, so that a reload or a boot\n"
                "# loads spa.py's protection in the same transaction as the host's own rules;\n"
                "# the running server puts the openings in.  Loading it again changes nothing\n"
                "# but the rules.\n" % os.path.abspath(self.config.path)) + \
            "\n".join(self.firewall.commands()) + "\n"

    def problems(self):
        """What is missing from the saved firewall, as [(path, what, how to fix it)]."""
        found = []
        fix = "spa.py firewall-config -c %s --write" % self.config.path
        if self.kind == "nft":
            current = _read_text(self.include)
            if current is None:
                found.append((self.include, "missing", fix))
            elif _uncommented(current) != _uncommented(self.include_text()):
                found.append((self.include, "out of date (protect or protect_action changed?)",
                              fix))
            if self.main is not None and not nft_includes(self.main, _read_text(self.main) or "",
                                                          self.include):
                found.append((self.main, 'does not include "%s"' % self.include,
                              "%s, or add the line  include \"%s\"  after its flush ruleset"
                              % (fix, self.include)))
        else:
            for family, path in sorted(self.rules.items()):
                text = _read_text(path)
                if text is None or not iptables_rules_hold(text, self.firewall.saved_rules(family)):
                    found.append((path, "missing" if text is None else
                                  "does not hold %s's protect rules, first in INPUT" % IPT_CHAIN,
                                  fix))
        return found

    def describe(self):
        """Where the saved protection is, for a line of check-config."""
        if self.kind == "nft":
            return "%s%s" % (self.include, ", included by %s" % self.main if self.main else
                             " (fw4 includes it)")
        return ", ".join(path for _, path in sorted(self.rules.items()))

    def changes(self):
        """[(path, new text, why)] that make the saved firewall hold our protection."""
        out = []
        if self.kind == "nft":
            if _uncommented(_read_text(self.include) or "") != _uncommented(self.include_text()):
                out.append((self.include, self.include_text(), "spa.py's table"))
            if self.main is not None:
                text = _read_text(self.main) or ""
                if not nft_includes(self.main, text, self.include):
                    out.append((self.main, with_nft_include(text, self.include),
                                'include "%s"' % self.include))
        else:
            for family, path in sorted(self.rules.items()):
                text = _read_text(path) or ""
                new = with_iptables_rules(text, self.firewall.saved_rules(family))
                if new != text:
                    out.append((path, new, "%s, first in INPUT" % IPT_CHAIN))
        return out

    def checker(self, path):
        """What reads the file at `path` as the firewall tool would at a reload, without
        applying it (SpaError if it cannot): for write_file's `check`."""
        if self.kind == "nft":
            return None if path == self.include else \
                (lambda new: run_command(["nft", "-c", "-f", new]))
        family = [f for f, p in self.rules.items() if p == path][0]
        return lambda new: run_command([self.firewall.commands[family] + "-restore", "--test",
                                        new])


# ---------------------------------------------------------------------------
# Capture: AF_PACKET sockets with a BPF filter in the kernel
# ---------------------------------------------------------------------------
#
# The knocks are read where the firewall cannot hide them: an AF_PACKET socket per
# interface, whose classic BPF program (in the kernel, locked) passes only unfragmented
# UDP to the knock port, addressed to this host, of a length a packet could have (and,
# with more [server] transports, TCP data to the knock port, ICMP echo data, HTTP GETs to
# the web server).  Nothing binds the port and nothing answers.  Frames are parsed only as
# far as the addresses and the knock; HostAddresses tells which addresses are this host's.

ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD
SO_ATTACH_FILTER, SO_LOCK_FILTER = 26, 44
SKF_AD_PROTOCOL = 0xFFFFF000          # SKF_AD_OFF + 0: the frame's ethertype
SKF_AD_PKTTYPE = 0xFFFFF004           # SKF_AD_OFF + 4: PACKET_HOST, _OUTGOING, ...
PACKET_HOST = 0
SOL_PACKET, PACKET_STATISTICS = 263, 6
# The receive ring (PACKET_MMAP, TPACKET_V2): the kernel writes each frame the filter
# passes into a ring of fixed-size frames that the packet reader maps and reads in
# batches, with no system call per packet.  A frame: a 32-byte tpacket2_hdr (status,
# length, captured length, offsets), the link address, then the IP packet at tp_net (80:
# TPACKET_ALIGN(52) + 16 on a cooked socket).  RING_FRAME, ten to a page, holds a knock
# of up to 292 characters over IPv4 and 272 over IPv6 (20 and 40 bytes of IP header, 8 of
# UDP): every AES knock of fwknop's client but those with a long message (testdata: 161-268
# characters).  The kernel cuts a longer frame to fit and, as the socket asks
# (PACKET_COPY_THRESH), queues it whole on the socket besides, marking the frame
# TP_STATUS_COPY: the reader takes the whole from there with recv(), one system call more
# (Reader.whole).  So every frame fits in fewer bytes than the longest knock would need
# (560 for udp; 1,648 with GnuPG), and a ring of RING_BYTES holds RING_FRAMES frames
# while the reader falls behind.  The ring is kernel memory, mapped into the reader
# whole: it counts in its PSS from the start (README.md, Performance).  Copies wait in the
# socket's buffer, kernel memory that no process maps, left at the system's default size
# (~200 kB: ~160 copies).  When it is full the kernel keeps only the cut frame, refused
# without an HMAC: a flood of long packets then costs what one of short ones does (~2.5
# us a packet), where with room for a ring's worth of copies each cost ~8.5 us (one
# recvfrom, the kernel's copy and its accounting; measured: README.md, Performance).
PACKET_RX_RING, PACKET_VERSION, TPACKET_V2, PACKET_COPY_THRESH = 5, 10, 1, 7
TP_STATUS_KERNEL, TP_STATUS_USER, TP_STATUS_COPY = 0, 1, 2
SO_RCVBUFFORCE = 33
RING_FRAME = 400
RING_BLOCK = max(mmap.PAGESIZE, 4096)
RING_BYTES = 1408 << 10
RING_FRAMES = (RING_BYTES // RING_BLOCK) * (RING_BLOCK // RING_FRAME)
RECV_LEN = 2048            # the longest frame the filter passes (an HTTP knock's), and more


def bpf_assemble(prog):
    """Classic BPF from (op, k[, jump if true, jump if false]) tuples and ("label:",) marks;
    a jump target is a label or None (the next instruction).  Returns (code, jt, jf, k)s."""
    codes = {"ld": 0x20, "ldh": 0x28, "ldb": 0x30, "ldxmsh": 0xB1, "ldwx": 0x40, "ldhx": 0x48,
             "ldbx": 0x50, "add": 0x04, "sub": 0x14, "and": 0x54, "rsh": 0x74, "addx": 0x0C,
             "subx": 0x1C, "tax": 0x07, "txa": 0x87,
             "jeq": 0x15, "jgt": 0x25, "jge": 0x35, "jset": 0x45, "ret": 0x06}
    labels, insns = {}, []
    for op in prog:
        if op[0].endswith(":"):
            labels[op[0][:-1]] = len(insns)
        else:
            insns.append(op)
    out = []
    for i, op in enumerate(insns):
        if op[0].startswith("j"):
            jt, jf = (0 if t is None else labels[t] - i - 1 for t in op[2:4])
            if not (0 <= jt < 256 and 0 <= jf < 256):
                raise ValueError("BPF jump out of range at %d" % i)
            out.append((codes[op[0]], jt, jf, op[1]))
        else:
            out.append((codes[op[0]], 0, 0, op[1]))
    return out


ICMP_ECHO_TYPES = {4: (8, 0), 6: (128, 129)}   # echo request and reply, as fwknop sends either
HTTP_GET = 0x47455420                          # "GET ", then "/": fwknop's knock over HTTP
MAX_HTTP_LEN = 2048 - 60 - 60                  # what one recv() holds past the headers


def _bpf_length_check(lo, hi):
    """The end of a section: pass if lo <= A <= hi."""
    return [("jge", lo, None, "drop"), ("jgt", hi, "drop", "pass")]


def _bpf_v4_sections(protos, port, longest):
    """IPv4 sections per protocol: unfragmented, X = header length, then the checks."""
    lo, hi = MIN_WIRE_LEN, longest
    head = [("ldh", 6), ("jset", 0x3FFF, "drop", None), ("ldxmsh", 0)]
    out = []
    if 17 in protos:
        out += [("v4_17:",)] + head + [("ldhx", 2), ("jeq", port, None, "drop"), ("ldhx", 4)] \
            + _bpf_length_check(lo + 8, hi + 8)
    if 6 in protos:
        # X = IP header + TCP header; A = the data's length (total length - X)
        tcp = [("ldbx", 12), ("and", 0xF0), ("rsh", 2), ("addx", 0), ("tax", 0)]
        out += [("v4_6:",)] + head + [("ldhx", 2)]
        out += [("jeq", p, "v4_%s" % name, None) for name, p in protos[6]] + [("ret", 0)]
        for name, _ in protos[6]:
            out += [("v4_%s:" % name,)] + tcp
            if name == "http":
                out += [("ldwx", 0), ("jeq", HTTP_GET, None, "drop"), ("ldbx", 4),
                        ("jeq", ord("/"), None, "drop")]
            out += [("ldh", 2), ("subx", 0)] + _bpf_length_check(
                *((lo + 5, MAX_HTTP_LEN) if name == "http" else (lo, hi)))
    if 1 in protos:
        request, reply = ICMP_ECHO_TYPES[4]
        out += [("v4_1:",)] + head + [("ldbx", 0), ("jeq", request, "v4_echo", None),
                                      ("jeq", reply, None, "drop"), ("v4_echo:",),
                                      ("ldh", 2), ("subx", 0)] + _bpf_length_check(lo + 8, hi + 8)
    return out


def _bpf_v6_sections(protos, port, longest):
    """IPv6 sections per protocol (the next header must be it: no extension headers)."""
    lo, hi = MIN_WIRE_LEN, longest
    out = []
    if 17 in protos:
        out += [("v6_17:",), ("ldh", 42), ("jeq", port, None, "drop"), ("ldh", 44)] \
            + _bpf_length_check(lo + 8, hi + 8)
    if 6 in protos:
        out += [("v6_6:",), ("ldh", 42)]
        out += [("jeq", p, "v6_%s" % name, None) for name, p in protos[6]] + [("ret", 0)]
        for name, _ in protos[6]:
            # X = the TCP header's length (+ 40 for the loads); A = the data's length
            out += [("v6_%s:" % name,), ("ldb", 52), ("and", 0xF0), ("rsh", 2)]
            if name == "http":
                out += [("add", 40), ("tax", 0), ("ldwx", 0), ("jeq", HTTP_GET, None, "drop"),
                        ("ldbx", 4), ("jeq", ord("/"), None, "drop"), ("txa", 0),
                        ("sub", 40), ("tax", 0)]
            else:
                out += [("tax", 0)]
            out += [("ldh", 4), ("subx", 0)] + _bpf_length_check(
                *((lo + 5, MAX_HTTP_LEN) if name == "http" else (lo, hi)))
    if 1 in protos:
        request, reply = ICMP_ECHO_TYPES[6]
        out += [("v6_1:",), ("ldb", 40), ("jeq", request, "v6_echo", None),
                ("jeq", reply, None, "drop"), ("v6_echo:",), ("ldh", 4)] \
            + _bpf_length_check(lo + 8, hi + 8)
    return out


def bpf_filter(port, transports=("udp",), http_port=DEFAULT_HTTP_PORT, longest=MAX_WIRE_LEN):
    """A classic BPF program passing only the knocks of the enabled `transports`, IPv4 or
    IPv6, addressed to this host, unfragmented, with a payload length spa.py could accept:
    udp: UDP to `port`; tcp: TCP data to `port`; icmp: ICMP/ICMPv6 echo (request or reply)
    data; http: TCP data to `http_port` that begins "GET /".  It runs on cooked
    (SOCK_DGRAM) frames, where the IP header starts at offset 0, so it works on any link
    type.  For udp alone it is the shortest program.  `longest`: the longest payload
    (MAX_GPG_WIRE_LEN with GnuPG stanzas).  Returns (code, jt, jf, k)s.
    """
    protos = {}
    for name in TRANSPORTS:
        if name in transports:
            number = {"udp": 17, "tcp": 6, "icmp": 1, "http": 6}[name]
            protos.setdefault(number, []).append((name, http_port if name == "http" else port))
    numbers = sorted(protos, key=[17, 6, 1].index)
    v6_numbers = {17: 17, 6: 6, 1: 58}

    def dispatch(family, offset):
        out = [("ldb", offset)]
        for i, number in enumerate(numbers):
            last = i == len(numbers) - 1
            out.append(("jeq", number if family == 4 else v6_numbers[number],
                        "v%d_%d" % (family, number), "drop" if last else None))
        return out

    prog = [("ld", SKF_AD_PKTTYPE), ("jeq", PACKET_HOST, None, "drop"),
            ("ld", SKF_AD_PROTOCOL), ("jeq", ETH_P_IP, None, "v6")]
    prog += dispatch(4, 9) + _bpf_v4_sections(protos, port, longest)
    prog += [("v6:",), ("jeq", ETH_P_IPV6, None, "drop")]
    prog += dispatch(6, 6) + _bpf_v6_sections(protos, port, longest)
    prog += [("pass:",), ("ret", 0xFFFF), ("drop:",), ("ret", 0)]
    return bpf_assemble(prog)


def sock_fprog(program):
    """A struct sock_fprog (the length and the address of the instructions) for `program`,
    and the array that holds the instructions (keep it alive while the kernel reads them)."""
    import array
    code = array.array("B", b"".join(struct.pack("HBBI", *insn) for insn in program))
    return struct.pack("HL", len(program), code.buffer_info()[0]), code


def attach_filter(sock, program):
    """Attach `program` and lock it: from then on no one, the packet reader included, can
    remove or replace it (SO_LOCK_FILTER), so the socket never delivers anything else."""
    fprog, _code = sock_fprog(program)        # _code lives until the kernel has copied it
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)
    except OSError:       # Linux before 3.9; the reader's seccomp filter forbids setsockopt
        pass


class InterfaceDown(SpaError):
    """The interface to capture on is there but down: the server waits for it to come up."""


def _capture_buffer(sock):
    """The receive ring (see RING_BYTES) on a capture socket, set before it is bound, with
    whole copies of the frames it cuts queued on the socket (PACKET_COPY_THRESH); where
    the kernel has none, a socket buffer of 32 MiB instead, room for ~30,000 knocks (memory
    only when full).  Returns whether the ring is there."""
    try:
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, struct.pack(
            "IIII", RING_BLOCK, RING_BYTES // RING_BLOCK, RING_FRAME, RING_FRAMES))
    except OSError:
        pass
    else:
        sock.setsockopt(SOL_PACKET, PACKET_COPY_THRESH, 1)
        return True
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    except OSError:
        pass
    return False


def open_capture(interface, port, transports=("udp",), http_port=DEFAULT_HTTP_PORT,
                 longest=MAX_WIRE_LEN):
    """One non-blocking AF_PACKET socket that sees the knocks (over the `transports`, see
    bpf_filter; payloads up to `longest` characters) even when the firewall drops them,
    with its receive ring.  InterfaceDown if `interface` is down: a socket bound to
    it would report ENETDOWN at once (and its reader would end, again and again)."""
    import errno
    try:
        if interface == "any":
            # Python cannot bind to "all interfaces": leave the socket unbound instead.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        else:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    except PermissionError:
        raise SpaError("capture needs root (CAP_NET_RAW): run the server as root")
    attach_filter(sock, bpf_filter(port, transports, http_port, longest))
    _capture_buffer(sock)
    if interface != "any":
        try:
            sock.bind((interface, ETH_P_ALL))
        except OSError as e:
            sock.close()
            raise SpaError("cannot capture on interface %r: %s" % (interface, e.strerror))
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ENETDOWN:
            sock.close()
            raise InterfaceDown("cannot capture on interface %r: it is down" % interface)
    sock.setblocking(False)
    # Frames queued before the filter was attached (unbound socket) are dropped here.
    while interface == "any":
        try:
            sock.recv(1)
        except BlockingIOError:
            break
    return sock


class HttpKnocks(object):
    """Knocks in HTTP GETs to the web server on `port` (fwknop's --server-proto http):
    the path is the knock, with '-' for '+' and '_' for '/'.  From the addresses in
    `proxies` (trusted proxies), the X-Forwarded-For header names the knock's source."""

    PATH = bytes.maketrans(b"-_", b"+/")

    def __init__(self, port=DEFAULT_HTTP_PORT, proxies=()):
        self.port, self.proxies = port, list(proxies)

    def knock(self, data, source):
        """(source, knock) from the TCP data of a request, or (None, b'') for one whose
        path cannot be a knock by its length (the web site's own requests, not logged)."""
        end = data.find(b" ", 5, 6 + MAX_GPG_WIRE_LEN)
        if not data.startswith(b"GET /") or end < 5 + MIN_WIRE_LEN:
            return None, b""
        if self.proxies and self._trusted(source):
            source = self.forwarded_for(data, source)
        return source, data[5:end].translate(self.PATH)

    def _trusted(self, address):
        import ipaddress
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self.proxies)

    def forwarded_for(self, data, proxy):
        """The address X-Forwarded-For gives: its last entry that is not a trusted proxy
        (the one the nearest trusted proxy saw).  None (the packet is dropped) if the
        header names no such valid address, or if the headers do not end in this segment
        (the header may be in the next); `proxy` itself when there is no header."""
        import ipaddress
        head, end, _ = data.partition(b"\r\n\r\n")
        if not end:
            return None
        head = head.split(b"\r\n")[1:]
        values = [line.split(b":", 1)[1] for line in head
                  if line[:16].lower() == b"x-forwarded-for:"]
        if not values:
            return proxy
        for word in reversed(b",".join(values).split(b",")):
            try:
                address = ipaddress.ip_address(word.strip().decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                return None
            if not any(address in net for net in self.proxies):
                return str(address)
        return None


class Ring(object):
    """A capture socket's receive ring (see RING_BYTES), mapped into this process: frames
    are read in the ring's order from `next`, each handed back to the kernel (its status
    set to TP_STATUS_KERNEL) once read.  Map it before the sandbox: Python's mmap
    duplicates the descriptor, which the sandbox refuses.

    In order, never skipping: a frame not ready at `next` may be one the kernel is still
    writing (on another CPU) while later ones are ready.  Skipping it would leave it
    ready but unread until the kernel comes round to it, stops there (it writes only into
    a frame handed back) and drops everything after; and poll() would not wake the
    reader, as it asks only about the frame before the kernel's.  Only a reader that is
    not `synced` (new to a ring another read before, or after a whole wait with nothing
    to read: see Reader.resync) looks for the first ready frame (find)."""

    HEADER = struct.Struct("=III2xH")       # tp_status, tp_len, tp_snaplen, (tp_mac), tp_net

    def __init__(self, sock, mapped=None):
        """`mapped`: memory laid out as the ring, in place of the socket's (a test's, the
        benchmark's)."""
        self.sock = sock
        self.map = mmap.mmap(sock.fileno(), RING_BYTES) if mapped is None else mapped
        self.offsets = [b * RING_BLOCK + i * RING_FRAME for b in range(RING_BYTES // RING_BLOCK)
                        for i in range(RING_BLOCK // RING_FRAME)]
        self.next = 0
        self.synced = False
        self.idle = None        # since when wake-ups found nothing to read (Reader.woken)

    @classmethod
    def of(cls, sock):
        """The ring of `sock` mapped, or None where it has none (a socket the parent did
        not give one: the kernel refuses the mapping)."""
        try:
            return cls(sock)
        except (OSError, ValueError):
            return None

    def find(self):
        """After a miss at `next` (a new reader of a ring another one read before, where
        the kernel writes elsewhere): move `next` to the first frame ready after it;
        False if none is."""
        count, status = len(self.offsets), self.map
        for step in range(1, count):
            i = (self.next + step) % count
            if struct.unpack_from("=I", status, self.offsets[i])[0] & TP_STATUS_USER:
                self.next = i
                return True
        return False

    def close(self):
        self.map.close()


def udp_payload(frame):
    """The UDP payload of an IP frame the BPF filter passed (b'' if it is cut short): all
    the flood's path reads of a frame."""
    if len(frame) < 28:
        return b""
    udp = (frame[0] & 15) * 4 if frame[0] >> 4 == 4 else 40
    if len(frame) < udp + 8:
        return b""
    return frame[udp + 8:udp + ((frame[udp + 4] << 8) | frame[udp + 5])]


def frame_source(frame):
    """The source address (text) of an IP frame, or None if it is not a whole IP header."""
    version = frame[0] >> 4 if frame else 0
    if version == 4 and len(frame) >= 28:
        return socket.inet_ntop(socket.AF_INET, frame[12:16])
    if version == 6 and len(frame) >= 48:
        return socket.inet_ntop(socket.AF_INET6, frame[8:24])
    return None


def parse_frame(frame):
    """Source address and UDP payload of an IP frame the BPF filter passed, or (None, b'')."""
    source = frame_source(frame)
    return (None, b"") if source is None else (source, udp_payload(frame))


def parse_any_frame(frame, http=None):
    """parse_frame() for servers with transports besides udp: the source and the knock
    in UDP's payload, TCP's data (a tcp knock, or with `http` (HttpKnocks) a GET to its
    port) or ICMP's echo data.  The filter passed only the enabled transports."""
    version = frame[0] >> 4 if frame else 0
    if version == 4 and len(frame) >= 28:
        start, proto, end = (frame[0] & 15) * 4, frame[9], struct.unpack_from("!H", frame, 2)[0]
        src = socket.inet_ntop(socket.AF_INET, frame[12:16])
    elif version == 6 and len(frame) >= 48:
        start, proto, end = 40, frame[6], 40 + struct.unpack_from("!H", frame, 4)[0]
        src = socket.inet_ntop(socket.AF_INET6, frame[8:24])
    else:
        return None, b""
    if proto == 17:
        return parse_frame(frame)
    if proto == 6 and len(frame) >= start + 20:
        data = frame[start + (frame[start + 12] >> 4) * 4:end]
        if http is not None and struct.unpack_from("!H", frame, start + 2)[0] == http.port:
            return http.knock(data, src)
        return src, data
    if proto in (1, 58):
        return src, frame[start + 8:end]
    return None, b""


def frame_destination(frame):
    """The destination address of an IP frame the BPF filter passed (see parse_frame)."""
    if frame[0] >> 4 == 4:
        return socket.inet_ntop(socket.AF_INET, frame[16:20])
    return socket.inet_ntop(socket.AF_INET6, frame[24:40])


class HostAddresses(object):
    """This host's own addresses (in its network namespace), read over rtnetlink, and read
    again once the kernel says they changed: a knock must be addressed to one of them, or
    a router that forwards a knock to a host behind it would open itself.

    `address in addresses` is the whole interface; an address missing from what was read
    (one added a moment ago) makes it read them again, at most once a second.
    """

    NETLINK_ROUTE, RTM_NEWADDR, RTM_GETADDR, NLMSG_DONE, NLMSG_ERROR = 0, 20, 22, 3, 2
    GROUPS = 0x10 | 0x100          # RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
    IFA_ADDRESS, IFA_LOCAL = 1, 2

    def __init__(self):
        self.addresses = frozenset()
        self.read_at = None            # monotonic time of the last read
        self.news = None
        try:
            self.news = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, self.NETLINK_ROUTE)
            self.news.bind((0, self.GROUPS))
            self.news.setblocking(False)
        except OSError:                # no notifications: read them again on a miss
            self.news = None

    def __contains__(self, address):
        if self.read_at is None or self._changed():
            self._read()
        if address in self.addresses:
            return True
        if time.monotonic() - self.read_at >= 1.0:
            self._read()
        return address in self.addresses

    def _changed(self):
        """Whether the kernel said that the addresses changed since they were
        read (without notifications: whether a second has passed)."""
        if self.news is None:           # no notifications: read them once a second
            return time.monotonic() - self.read_at >= 1.0
        changed = False
        while True:
            try:
                if not self.news.recv(1 << 16):
                    return changed
                changed = True
            except BlockingIOError:
                return changed
            except OSError:             # ENOBUFS: some were lost; what is left comes next time
                return True

    def _read(self):
        """Read the addresses again (keeping the old ones if that fails)."""
        self.read_at = time.monotonic()
        try:
            self.addresses = frozenset(self.dump())
        except OSError:
            pass                       # keep what we had

    def dump(self):
        """Every address of every interface (RTM_GETADDR), as text."""
        found = []
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, self.NETLINK_ROUTE) as sock:
            sock.bind((0, 0))
            sock.settimeout(5)
            # nlmsghdr (REQUEST | DUMP), then an ifaddrmsg for every family
            sock.send(struct.pack("=IHHII", 24, self.RTM_GETADDR, 0x301, 1, 0) + bytes(8))
            while True:
                data = sock.recv(1 << 16)
                offset = 0
                while offset + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, offset)
                    if kind in (self.NLMSG_DONE, self.NLMSG_ERROR) or length < 16:
                        return found
                    if kind == self.RTM_NEWADDR:
                        found += self._addresses(data[offset + 16:offset + length])
                    offset += (length + 3) & ~3

    def _addresses(self, body):
        """The local address of one RTM_NEWADDR message (IFA_LOCAL where there is one: on
        a point-to-point link IFA_ADDRESS is the peer's)."""
        family = body[0]
        size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(family)
        attrs, offset = {}, 8
        while size and offset + 4 <= len(body):
            length, kind = struct.unpack_from("=HH", body, offset)
            if length < 4:
                break
            if kind in (self.IFA_ADDRESS, self.IFA_LOCAL) and length - 4 == size:
                attrs[kind] = socket.inet_ntop(family, body[offset + 4:offset + length])
            offset += (length + 3) & ~3
        address = attrs.get(self.IFA_LOCAL, attrs.get(self.IFA_ADDRESS))
        return [address] if address else []

    def close(self):
        if self.news is not None:
            self.news.close()
            self.news = None


# ---------------------------------------------------------------------------
# Logging: one line per decision, rejections rate-limited, never key material
# ---------------------------------------------------------------------------
#
# The server's log (Log: stderr or syslog, no logging module), and the rate limit that
# keeps a flood of refusals from filling a disk.  Every field is escaped (log_field):
# a username, a command or a reason may come from a packet.

SYSLOG_SOCKET = "/dev/log"
# Control characters (C0, DEL, C1) as \xNN: text from the packet reader cannot forge
# lines or drive the terminal that shows the log.
CONTROL_ESCAPES = {c: "\\x%02x" % c for c in list(range(32)) + list(range(127, 160))}


_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escaped(c):
    """One character as Python writes it in a string's repr: no codec (the packet reader,
    in its sandbox, could not load one)."""
    n = ord(c)
    return _ESCAPES.get(c) or ("\\x%02x" % n if n < 0x100 else "\\u%04x" % n if n < 0x10000
                               else "\\U%08x" % n)


def log_field(text):
    """A value for a log line, with control characters (and every other unprintable one)
    escaped: no field, whoever chose it (a username, a command, a source, a reason that
    quotes a packet), can start a line of its own or hide what follows.  Log applies it
    to every argument: the one place that formats log fields."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


class Log(object):
    """The server's log: a line per event on stderr with a time stamp, or to syslog as
    `spa[PID]`, facility daemon.  (The logging module would cost each process memory:
    README.md, Performance.)"""

    SEVERITY = {"error": 3, "warning": 4, "info": 6, "debug": 7}
    FACILITY_DAEMON = 3

    def __init__(self, where="stderr", verbose=False):
        self.verbose = verbose
        self.sock = None
        self.pipe = None       # the packet reader's log: lines go to the parent, which logs them
        if where == "syslog":
            self._connect()

    @classmethod
    def to_pipe(cls, fd, verbose=False):
        """The packet reader's log: "LEVEL text" lines on the pipe `fd`, never blocking (a
        line the pipe cannot take now is lost); the parent logs them (ReaderProcess.relay)."""
        log = cls(verbose=verbose)
        log.pipe = fd
        os.set_blocking(fd, False)
        return log

    def _connect(self):
        """Connect to syslog's socket (datagram, else stream)."""
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            sock = socket.socket(socket.AF_UNIX, kind)
            try:
                sock.connect(SYSLOG_SOCKET)
                self.sock = sock
                return
            except OSError as e:
                sock.close()
                error = e
        raise SpaError("cannot log to syslog (%s): %s" % (SYSLOG_SOCKET, error.strerror))

    def _write(self, level, text, args):
        """Format one line (each argument escaped, log_field) and write it: to the
        parent's pipe (the packet reader), to syslog, or to stderr with a time stamp.  Never
        raises: the server must not stop because its log cannot be written."""
        if args:
            try:
                text = text % tuple(log_field(a) if isinstance(a, str) else a for a in args)
            except (TypeError, ValueError):       # a bad format must not stop the server
                text = "%s %r" % (text, args)
        if self.pipe is not None:
            try:
                os.write(self.pipe, ("%s %s\n" % (level, text)).encode("utf-8", "replace"))
            except OSError:
                pass
            return
        if self.sock is None:
            now = time.time()
            try:
                sys.stderr.write("%s,%03d spa: %s\n" % (
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)), now % 1 * 1000, text))
                sys.stderr.flush()
            except (OSError, ValueError):     # stderr closed: nowhere left to say it
                pass
            return
        line = ("<%d>spa[%d]: %s\0" % (self.FACILITY_DAEMON * 8 + self.SEVERITY[level],
                                         os.getpid(), text)).encode("utf-8", "replace")
        try:
            self.sock.send(line)
        except OSError:               # syslog restarted: connect again, once
            try:
                self.sock.close()
                self._connect()
                self.sock.send(line)
            except (OSError, SpaError):
                pass

    def debug(self, text, *args):
        if self.verbose:
            self._write("debug", text, args)

    def info(self, text, *args):
        self._write("info", text, args)

    def warning(self, text, *args):
        self._write("warning", text, args)

    def error(self, text, *args):
        self._write("error", text, args)


class RateLimiter(object):
    """A token bucket for rejected-packet log lines: a flood cannot fill the disk."""

    def __init__(self, rate=5.0, burst=20):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()
        self.empty_until = 0.0       # no token before then: refuse without arithmetic
        self.suppressed = 0

    def quiet(self):
        """Whether no line may be logged now (the usual case in a flood), for callers
        that count what they leave unsaid themselves (adding it to `suppressed`)."""
        return time.monotonic() < self.empty_until

    def allow(self, now=None):
        """Whether one more line may be logged now; counts the ones refused."""
        now = time.monotonic() if now is None else now
        if now < self.empty_until:   # the usual case in a flood
            self.suppressed += 1
            return False
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.empty_until = now + (1 - self.tokens) / self.rate
        self.suppressed += 1
        return False

    def log_suppressed(self, log, what):
        """Log how many `what` (lines of a kind) were refused since the last such line."""
        n = self.take_suppressed()
        if n:
            log.info("%d more %s were not logged (rate limit)", n, what)

    def take_suppressed(self):
        """How many lines were refused since the last call (and start anew)."""
        n, self.suppressed = self.suppressed, 0
        return n


# ---------------------------------------------------------------------------
# Server: a privileged gatekeeper and an unprivileged packet reader
# ---------------------------------------------------------------------------
#
# The server runs as two processes.  The parent keeps root: it opens the capture
# sockets, owns the firewall and the replay cache file, and reads nothing from
# the network.  The child drops to an unprivileged user before it reads a single
# packet; it checks length, alphabet and HMAC (screen), and passes each packet that
# authenticates to the parent over a pipe: one line of three words, the source
# address, the destination address and the packet.  The parent believes none of
# it: it checks the line, checks the HMAC again, decrypts, and decides itself
# (judge, against the config and the host's state).  So a packet reader that an
# attacker took over can pass on only packets that a key holder made, each once,
# and get for them no more than their sender could have.
#
# It trusts the config and the kernel; the packet reader is trusted with nothing but
# reading packets, and its requests and log lines are checked as hostile.  In this
# section's order: the reader's sandbox, the pipe protocol (request lines), the command
# runner, the hooks (commands at open and close), the gatekeeper (the parent's
# decisions), the packet reader, the reader's process seen from the parent
# (ReaderProcess), the supervisor's event loop, and the entry points (server,
# firewall-config, check-config).

# --- The packet reader's sandbox ------------------------------------------------------
#
# After its privilege drop the reader confines itself as OpenSSH's pre-auth child does:
# rlimits (no new descriptor, process, file growth or core dump) and a seccomp filter that
# lets through only the system calls its loop makes.  Its descriptors: /dev/null on 0-2,
# its capture sockets (receive only), its request pipe and its log pipe to the parent (the
# only ones it may write to), /proc/self/status (read for the stats line) and the epoll
# instance its loop waits in.

PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 4, 22, 38
SECCOMP_MODE_FILTER = 2
SECCOMP_KILL, SECCOMP_ERRNO, SECCOMP_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
AUDIT_ARCHES = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7, "riscv64": 0xC00000F3}
# System call numbers: x86_64's table, and the generic one that aarch64 and riscv64 share.
_GENERIC_SYSCALLS = {
    "recvfrom": 207, "epoll_pwait": 22, "epoll_ctl": 21, "clock_gettime": 113, "gettimeofday": 169, "times": 153,
    "brk": 214, "munmap": 215, "mremap": 216, "madvise": 233, "rt_sigreturn": 139,
    "rt_sigprocmask": 135, "restart_syscall": 128, "futex": 98, "getpid": 172, "close": 57,
    "exit": 93, "exit_group": 94, "write": 64, "pread64": 67, "getsockopt": 209, "mmap": 222,
    "mprotect": 226, "openat": 56, "openat2": 437, "execve": 221, "execveat": 281,
    "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271}
SYSCALLS = {
    "x86_64": {
        "recvfrom": 45, "epoll_wait": 232, "epoll_pwait": 281, "epoll_ctl": 233,
        "clock_gettime": 228, "gettimeofday": 96,
        "times": 100, "brk": 12, "munmap": 11, "mremap": 25, "madvise": 28, "rt_sigreturn": 15,
        "rt_sigprocmask": 14, "restart_syscall": 219, "futex": 202, "getpid": 39, "close": 3,
        "exit": 60, "exit_group": 231, "write": 1, "pread64": 17, "getsockopt": 55, "mmap": 9,
        "mprotect": 10, "open": 2, "openat": 257, "openat2": 437, "execve": 59, "execveat": 322,
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311},
    "aarch64": _GENERIC_SYSCALLS, "riscv64": _GENERIC_SYSCALLS,
}
# What the reader's loop calls (strace): receive, wait, clocks, memory, signals, exit.
SECCOMP_ALLOWED = ("recvfrom", "epoll_wait", "epoll_pwait", "epoll_ctl", "clock_gettime",
                   "gettimeofday", "times", "brk", "munmap", "mremap", "madvise",
                   "rt_sigreturn", "rt_sigprocmask", "restart_syscall", "futex", "getpid",
                   "close", "exit", "exit_group")
# Calls no bug in the reader makes, only an attacker: they kill it (SIGSYS).
SECCOMP_KILLED = ("execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev")


def prctl(option, *args):
    """prctl(2) through ctypes; OSError on failure."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, *[a if isinstance(a, bytes) else ctypes.c_ulong(a)
                            for a in args + (0,) * (4 - len(args))]) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def seccomp_arch():
    """The name of this process's system call table, or None where spa.py has none (a
    32-bit Python on a 64-bit kernel counts as unknown: its calls use another table)."""
    machine = os.uname().machine
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if struct.calcsize("P") != 8 or sys.byteorder != "little" or machine not in SYSCALLS:
        return None
    return machine


def seccomp_program(arch, writable, readable):
    """The reader's seccomp filter, a classic BPF program over struct seccomp_data.

    A call made for another architecture (a 32-bit entry into a 64-bit process) kills;
    the calls in SECCOMP_ALLOWED pass; write only to the descriptors in `writable`, pread64
    only from those in `readable`; getsockopt only for PACKET_STATISTICS; mmap and mprotect
    never with PROT_EXEC; open and openat fail with EACCES (Python then reports an error),
    SECCOMP_KILLED kills, and everything else fails with EPERM: new sockets, send, connect,
    bind, setsockopt, ioctl, fork, kill, dup, pipe, setrlimit, prctl, unshare...
    Arguments are compared by their low 32 bits (little-endian: offset 16 + 8 * n), which
    is all the kernel reads of a descriptor or an int option.
    """
    import errno
    numbers = SYSCALLS[arch]
    arg = lambda n: 16 + 8 * n                         # noqa: E731
    prog = [("ld", 4), ("jeq", AUDIT_ARCHES[arch], None, "kill"), ("ld", 0)]
    prog += [("jeq", numbers[name], "allow", None) for name in SECCOMP_ALLOWED if name in numbers]
    prog += [("jeq", numbers["write"], "write", None), ("jeq", numbers["pread64"], "pread", None),
             ("jeq", numbers["getsockopt"], "getsockopt", None),
             ("jeq", numbers["mmap"], "memory", None), ("jeq", numbers["mprotect"], "memory", None)]
    prog += [("jeq", numbers[name], "kill", None) for name in SECCOMP_KILLED]
    prog += [("jeq", numbers[name], "eacces", None) for name in ("open", "openat", "openat2")
             if name in numbers]
    prog += [("ret", SECCOMP_ERRNO | errno.EPERM)]
    prog += [("write:",), ("ld", arg(0))] + [("jeq", fd, "allow", None) for fd in writable]
    prog += [("ret", SECCOMP_ERRNO | errno.EPERM)]
    prog += [("pread:",), ("ld", arg(0))] + [("jeq", fd, "allow", None) for fd in readable]
    prog += [("ret", SECCOMP_ERRNO | errno.EPERM),
             ("getsockopt:",), ("ld", arg(1)), ("jeq", SOL_PACKET, None, "eperm"),
             ("ld", arg(2)), ("jeq", PACKET_STATISTICS, "allow", "eperm"),
             ("memory:",), ("ld", arg(2)), ("jset", mmap.PROT_EXEC, "eperm", "allow"),
             ("allow:",), ("ret", SECCOMP_ALLOW),
             ("kill:",), ("ret", SECCOMP_KILL),
             ("eacces:",), ("ret", SECCOMP_ERRNO | errno.EACCES),
             ("eperm:",), ("ret", SECCOMP_ERRNO | errno.EPERM)]
    return bpf_assemble(prog)


def drop_privileges(user):
    """Become `user` for good: no groups, no capabilities, no way back (confine_reader adds
    no_new_privs), and not dumpable: no other process of that user may trace it or read
    its memory (the keys)."""
    import pwd
    pw = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    prctl(PR_SET_DUMPABLE, 0)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise SpaError("could not drop root privileges")


def close_fds_except(keep):
    """Close every file descriptor of this process but those in `keep`."""
    limit = min(os.sysconf("SC_OPEN_MAX"), 1 << 16)
    low = 0
    for fd in sorted(keep) + [limit]:
        if fd > low:        # closerange(n, n) would close everything on some Pythons
            os.closerange(low, fd)
        low = fd + 1


def take_free_descriptors(below):
    """Put /dev/null on every free descriptor under `below`: with 3, descriptors 0-2 are
    never the terminal, nor a pipe or socket of ours that a stray print() would write to."""
    while True:
        fd = os.open(os.devnull, os.O_RDWR)     # the lowest free descriptor
        if fd >= below:
            os.close(fd)
            return


def confine_reader(writable, readable, log):
    """Enter the packet reader's sandbox (see above) for good: True with the seccomp filter
    in place, False where it could not be (logged)."""
    import resource
    for limit in (resource.RLIMIT_NOFILE, resource.RLIMIT_NPROC, resource.RLIMIT_FSIZE,
                  resource.RLIMIT_CORE):
        resource.setrlimit(limit, (0, 0))
    arch = seccomp_arch()
    try:
        prctl(PR_SET_NO_NEW_PRIVS, 1)        # no exec can give privileges back; seccomp needs it
        if arch is None:
            raise OSError(0, "spa.py has no system call table for %s with a %d-bit Python"
                          % (os.uname().machine, 8 * struct.calcsize("P")))
        fprog, _code = sock_fprog(seccomp_program(arch, writable, readable))
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog)
    except OSError as e:
        log.warning("packet reader: no seccomp filter (%s): it runs confined by its user, "
                    "rlimits and closed files only", e.strerror)
        return False
    return True


# --- The pipe protocol: one request line a packet -------------------------------------

REQUEST_LONGEST = 2 * 45 + MAX_WIRE_LEN + 16 + 3   # two addresses, a packet, an interface
REQUEST_EXTRA = 2 * 45 + 16 + 3                   # all but the packet
_ADDRESS_CHARS = b"0123456789abcdefABCDEF:."


def request_line(source, destination, wire, interface=None):
    """The packet reader's request for one packet that authenticated (with
    bind_interface, the name of the interface it came in on is a fourth word)."""
    line = b"%s %s %s" % (source.encode("ascii"), destination.encode("ascii"), wire)
    if interface is not None:
        line += b" " + interface.encode()
    return line + b"\n"


def _request_address(word):
    """An address as inet_ntop writes it (the reader's words are that already)."""
    if not 2 <= len(word) <= 45 or word.translate(None, _ADDRESS_CHARS):
        raise ValueError("not an address")
    text = word.decode("ascii")                 # (the alphabet is checked: it is ASCII)
    family = _socket_family(text)
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, text))
    except OSError:
        raise ValueError("not an address")


def parse_request(line, longest_wire=MAX_WIRE_LEN):
    """(source, destination, wire, interface or None) of one request line (without its
    newline), checked strictly; ValueError for anything but two addresses (no scope, no
    name, nothing else), a packet of the right length and alphabet, and maybe an
    interface name."""
    if len(line) > REQUEST_EXTRA + longest_wire:
        raise ValueError("a line of %d bytes" % len(line))
    words = line.split(b" ")
    if len(words) not in (3, 4):
        raise ValueError("%d words, not 3" % len(words))
    source, destination = (_request_address(word) for word in words[:2])
    wire = bytes(words[2])
    if not MIN_WIRE_LEN <= len(wire) <= longest_wire or wire.translate(None, B64_ALPHABET):
        raise ValueError("not a packet")
    interface = None
    if len(words) == 4:
        try:
            interface = words[3].decode("ascii")
        except UnicodeDecodeError:
            interface = None
        if not valid_interface_name(interface) or not interface.isprintable():
            raise ValueError("not an interface name")
    return source, destination, wire, interface


def send_signal(log, pid, signum, what, group=False):
    """Signal a process (or its process group); False, logged, if that was refused.

    Never raises: a root process without CAP_KILL may not signal another user's process
    (the packet reader, a command), and that must not stop the server.  A process that
    is already gone counts as done.
    """
    try:
        (os.killpg if group else os.kill)(pid, signum)
    except ProcessLookupError:
        pass
    except OSError as e:
        log.error("cannot send signal %d to %s (pid %d): %s%s", signum, what, pid, e.strerror,
                  " (the server lacks CAP_KILL)" if e.errno == 1 else "")
        return False
    return True


# --- The command runner (fwknop's command messages) -----------------------------------

COMMAND_TIME_LIMIT = 60               # seconds a command message may run before it is killed


class _Command(object):
    """A command that CommandRunner started: its process, its text, when it started
    (monotonic), its exit status once it has one (its group may outlive it), and, for a
    hook, the pipe its output comes through, what was kept of it, and its key."""

    __slots__ = ("proc", "command", "started", "status", "pipe", "output", "key")

    def __init__(self, proc, command, started, key=None):
        self.proc, self.command, self.started, self.status = proc, command, started, None
        self.pipe, self.output, self.key = None, bytearray(), key


class CommandRunner(object):
    """Command messages (fwknop's type 0): each runs without a shell as the stanza's
    cmd_exec_user (never root, never group 0), in a session and process group of its
    own with no_new_privs and an empty environment but PATH; at the time limit
    (COMMAND_TIME_LIMIT) the whole group is killed, children it left in the background
    too; at most `most` groups run at once.  A kill that is refused (no CAP_KILL) is
    logged, and the command left to end."""

    MOST = 4
    PATH = "/usr/bin:/bin"
    WHAT = "command"

    def __init__(self, log, limit=None, most=None):
        self.log, self.limit = log, limit          # limit None: the module's constant
        self.most = self.MOST if most is None else most
        self.running = []      # [_Command]

    @staticmethod
    def _default_limit():
        return COMMAND_TIME_LIMIT

    def start(self, stanza, command, source, username, test=False):
        """Start one command; None when it started (or would, in test mode), else why not."""
        import pwd
        import shlex
        import subprocess
        try:
            argv = shlex.split(command)
            user = pwd.getpwnam(stanza.cmd_exec_user or "")
        except (ValueError, KeyError) as e:
            return "command not run: %s" % e
        if not argv:
            return "command not run: it is empty"
        if user.pw_uid == 0 or user.pw_gid == 0:
            return "command not run: cmd_exec_user %s is root or in group 0" % user.pw_name
        if test:
            self.log.info("accepted command from %s [client %s]: %r not run (test mode)",
                          source, stanza.name, command)
            return None
        self.reap()
        if len(self.running) >= self.most:
            return "command not run: %d are running already, the most at once" % self.most
        try:
            proc = self._spawn(argv, user, False)
        except (OSError, subprocess.SubprocessError) as e:
            self.log.error("command from %s [client %s] as %s failed to start: %s", source,
                           stanza.name, user.pw_name, getattr(e, "strerror", None) or e)
            return "command failed to start"
        self.log.info("accepted command from %s [client %s] user %s: running %r as %s (pid %d)",
                      source, stanza.name, username, command, user.pw_name, proc.pid)
        self.running.append(_Command(proc, command, time.monotonic()))
        return None

    def _spawn(self, argv, user, capture):
        """Popen(argv) as `user` (a pwd entry): no shell, a session of its own, no_new_privs,
        the environment PATH alone; with `capture`, its output (stdout and stderr) on a
        non-blocking pipe, else nowhere."""
        import ctypes
        import subprocess
        prctl = ctypes.CDLL(None, use_errno=True).prctl

        def become_user():          # in the child, between fork and exec
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
        out = subprocess.PIPE if capture else subprocess.DEVNULL
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT if capture else subprocess.DEVNULL,
                                close_fds=True, cwd="/", preexec_fn=become_user,
                                start_new_session=True, env={"PATH": self.PATH})
        if capture:
            os.set_blocking(proc.stdout.fileno(), False)
        return proc

    def reap(self):
        """Log how commands ended; kill the group of any that ran past the limit.  A
        command counts as running while anything of its group does."""
        import signal
        limit = self._default_limit() if self.limit is None else self.limit
        still = []
        for entry in self.running:
            proc, command, status = entry.proc, entry.command, entry.status
            self._drain(entry)
            if status is None:
                status = entry.status = proc.poll()
                if status is not None:
                    self._exited(entry, status)
            alive = self._group_alive(proc.pid)
            if alive and time.monotonic() - entry.started > limit:
                if send_signal(self.log, proc.pid, signal.SIGKILL, "%s %r" % (self.WHAT, command),
                               True):
                    self.log.warning("%s %r ran over %d s: killed%s", self.WHAT, command, limit,
                                     "" if status is None else " what it left running")
                    if status is None:
                        entry.status = proc.wait()
                        self._exited(entry, entry.status)
                    alive = False
                else:
                    self.log.warning("%s %r ran over %d s and could not be killed: left "
                                     "running", self.WHAT, command, limit)
                    entry.started = float("inf")     # tried once; its end is still logged
            if alive or entry.status is None:
                still.append(entry)
            elif entry.pipe is not None:
                entry.pipe.close()
        self.running = still

    def _drain(self, entry):
        """Read what a hook wrote since the last look (without waiting)."""

    def _exited(self, entry, status):
        """Log how a command ended."""
        self.log.info("command %r (pid %d) exited with status %d", entry.command,
                      entry.proc.pid, status)

    @staticmethod
    def _group_alive(pgid):
        """Whether the process group still has a process (its leader's number stays taken
        while it does, so it names no one else)."""
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


# --- Hooks: commands at each opening and after it (fwknop's command cycles) -----------
#
# A stanza's cmd_cycle_open runs when a knock opens a port, cmd_cycle_close its timer
# later (fwknopd's CMD_CYCLE_OPEN, CMD_CYCLE_CLOSE, CMD_CYCLE_TIMER; knockd's start and
# stop commands).  Each is an argument list with fwknop's variables ($IP, $PORT...)
# replaced inside its arguments from the request the gatekeeper accepted, run without a
# shell as cmd_cycle_user (HookRunner).  A close is written durably (PendingCloses) before
# its open runs, so it runs on time across a restart, and at start after a crash.

HOOK_TIME_LIMIT = 30                  # seconds a hook may run before its group is killed
HOOK_OUTPUT_KEPT = 2000               # bytes of a hook's output that are logged


class HookRunner(CommandRunner):
    """Runs hooks as CommandRunner runs commands (a session of their own, no_new_privs,
    PATH alone, the group killed at HOOK_TIME_LIMIT), as cmd_cycle_user (root only when
    it is `root`), with PATH's sbin folders; their output is read as it comes, the first
    HOOK_OUTPUT_KEPT bytes logged with the exit status, as untrusted text."""

    MOST = 16
    PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    WHAT = "hook"

    @staticmethod
    def _default_limit():
        return HOOK_TIME_LIMIT

    def run(self, argv, user_name, what, key=None):
        """Start one hook; None when it started, else why not ("busy" when as many run as
        may: try again later)."""
        import pwd
        import subprocess
        try:
            user = pwd.getpwnam(user_name or "")
        except KeyError:
            return "no user %s" % user_name
        if (user.pw_uid == 0 or user.pw_gid == 0) and user_name != "root":
            return "cmd_cycle_user %s is root or of group 0" % user_name
        self.reap()
        if len(self.running) >= self.most:
            return "busy"
        try:
            proc = self._spawn(argv, user, True)
        except (OSError, subprocess.SubprocessError) as e:
            return "it failed to start: %s" % (getattr(e, "strerror", None) or e)
        self.log.info("%s: running %s as %s (pid %d)", what, " ".join(argv), user.pw_name,
                      proc.pid)
        entry = _Command(proc, what, time.monotonic(), key)
        entry.pipe = proc.stdout
        self.running.append(entry)
        return None

    def busy(self, key):
        """Whether a hook of `key` (stanza, address, proto, port) still runs."""
        self.reap()
        return any(entry.key == key for entry in self.running)

    def _drain(self, entry):
        """Read what the hook wrote since the last look, keeping its first bytes."""
        while entry.pipe is not None and not entry.pipe.closed:
            try:
                data = os.read(entry.pipe.fileno(), 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                return
            entry.output += data[:max(0, HOOK_OUTPUT_KEPT + 1 - len(entry.output))]

    def _exited(self, entry, status):
        """Log how a hook ended, with what it wrote (escaped by the log)."""
        self._drain(entry)
        text = bytes(entry.output[:HOOK_OUTPUT_KEPT]).decode("utf-8", "replace").strip()
        more = " (more left out)" if len(entry.output) > HOOK_OUTPUT_KEPT else ""
        (self.log.info if status == 0 else self.log.warning)(
            "%s (pid %d) exited with status %d%s", entry.command, entry.proc.pid, status,
            "; its output: %s%s" % (text, more) if text else "")


class PendingCloses(object):
    """The hooks' closes not run yet, kept durably in a journal in the replay cache's private
    folder: a line a close ({"id", "due": wall-clock seconds, "user", "argv", "what",
    "key"}; a later line of the same id moves it later), a line {"done": id} once it has
    started; each change appended and synced before it counts.  It is compacted (written
    anew and swapped in: replace_file) at start and when done lines outnumber the rest.  A
    server that starts after a crash runs the overdue closes at once and waits for the
    others.  A close is forgotten only once it has started: after a crash in between it may
    run twice, never not at all.  `path` None: in memory only."""

    def __init__(self, path):
        self.path, self.pending, self.skipped, self.fd, self.lines = path, {}, 0, None, 0
        if path is None:
            return
        self._load(path)
        try:
            self._rewrite()
        except OSError as e:
            raise SpaError("cannot write %s: %s" % (path, e.strerror or e))

    def _load(self, path):
        self.pending, self.skipped = read_pending_closes(path)

    @property
    def entries(self):
        return list(self.pending.values())

    def add(self, entries):
        """Record new closes (one write, one sync); the same close (user and argv) already
        pending is kept once, for the later time.  OSError if they could not be made
        durable: then nothing changed."""
        import json
        same = {(e["user"], tuple(e["argv"])): e for e in self.pending.values()}
        changed = {}
        for new in entries:
            old = changed.get((new["user"], tuple(new["argv"]))) or \
                same.get((new["user"], tuple(new["argv"])))
            entry = dict(old or new, due=max(old["due"], new["due"]) if old else new["due"])
            entry.setdefault("id", binascii.hexlify(os.urandom(8)).decode())
            changed[(entry["user"], tuple(entry["argv"]))] = entry
        self._append([json.dumps(e, sort_keys=True) for e in changed.values()])
        for entry in changed.values():
            self.pending[entry["id"]] = entry

    def due(self, now):
        """The closes whose time has come, the earliest first."""
        return sorted((e for e in self.pending.values() if e["due"] <= now),
                      key=lambda e: e["due"])

    def remove(self, gone):
        """Forget closes that were started (or can never run), at once in memory; the
        journal says so too (OSError if it could not)."""
        import json
        for entry in gone:
            self.pending.pop(entry["id"], None)
        self._append([json.dumps({"done": entry["id"]}) for entry in gone])

    def _append(self, lines):
        """Append lines to the journal and sync; the whole file anew after a failed write,
        or once done lines outnumber the pending ones."""
        if self.path is None or not lines:
            return
        if self.fd is None or self.lines + len(lines) > 2 * len(self.pending) + 100:
            self._rewrite(lines)
            return
        try:
            write_all(self.fd, "".join(line + "\n" for line in lines).encode())
            sync_file(self.fd)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise
        self.lines += len(lines)

    def _rewrite(self, more=()):
        """Write the pending closes (and `more` lines) to a new file, swap it in, and
        append to it from then on."""
        import json
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.pending.values()) + \
            "".join(line + "\n" for line in more)
        replace_file(self.path, lambda fd: write_all(fd, text.encode()))
        old, self.fd = self.fd, None
        self.fd = reopen_appending(self.path, old)
        self.lines = len(self.pending) + len(more)


# --- The gatekeeper: the parent decides -----------------------------------------------

def _opening_hash(key):
    """8 bytes that tell openings (address text as inet_ntop writes it, proto, port) apart
    within this process: 64 bits of its hash."""
    return struct.pack("q", hash(key))


def packet_fields(d, now):
    """An authenticated packet's fields in one line, for -v: never key material."""
    m = d.message
    parts = ["user %s" % m.username,
             "timestamp %d (age %+d s)" % (m.timestamp, int(now) - m.timestamp),
             "type %d (%s)" % (m.msg_type, MSG_NAMES.get(m.msg_type, "?")),
             "allow IP %s%s" % (m.allow_ip, " (the source)" if m.allow_ip == "0.0.0.0" else ""),
             "command %r" % m.command if m.msg_type == MSG_COMMAND
             else "access %s" % (m.access_text() or "none")]
    if m.nat_access is not None:
        parts.append("NAT %s" % m.nat_access)
    if m.msg_type in TIMEOUT_TYPES:
        parts.append("client timeout %d s" % m.client_timeout)
    if d.accepted and m.msg_type != MSG_COMMAND:
        parts.append("open for %d s" % d.timeout)
    return ", ".join(parts)


def _mode_words(mode):
    """How a NAT opening forwards, for the log: '' for PLAIN_NAT, else ', without DNAT,
    everything forwarded, SNAT to 198.18.2.9' (as much of it as holds)."""
    words = ["without DNAT"] * (not mode.dnat) + ["everything forwarded"] * mode.forward_all
    if mode.snat is not None:
        words.append("masqueraded" if mode.snat == "masquerade" else "SNAT to " + mode.snat)
    return "".join(", " + word for word in words)


class Gatekeeper(object):
    """The privileged side: decides on each packet the reader passes on, records replay
    digests durably, then opens the firewall (or runs a command).

    `addresses` answers `address in addresses` for this host's own addresses
    (HostAddresses); `commands` runs command messages (CommandRunner); `hooks` runs the
    stanzas' hooks (HookRunner), `closes` keeps their pending closes (PendingCloses).
    """

    def __init__(self, config, firewall, replay, log, addresses=None, commands=None,
                 hooks=None, closes=None):
        self.config, self.firewall, self.replay, self.log = config, firewall, replay, log
        self.addresses = HostAddresses() if addresses is None else addresses
        self.commands = CommandRunner(log) if commands is None else commands
        self.hooks = HookRunner(log) if hooks is None else hooks
        self.closes = PendingCloses(None) if closes is None else closes
        self.test = isinstance(firewall, DryRunFirewall)
        self.limiter = RateLimiter()
        self.openings = {}     # stanza name -> PackedMap (address, proto, port) -> end
        self.counts = {"accepted": 0, "refused": 0}
        self.served = (0, 0)      # packets served at the last tick, and at the last trim

    def knock(self, source, destination, wire, now=None, interface=None):
        """One packet passed on by a packet reader in this process (tests): through the
        same line and the same checks as the pipe's.  Returns its Decision."""
        line = request_line(source, destination, wire, interface)[:-1]
        decisions, problem = self.serve_lines([line], now)
        return decisions[0] if decisions else Decision(source, problem)

    def serve_lines(self, lines, now=None):
        """One round of the packet reader's requests (lines without their newline).

        Returns (Decisions, problem): `problem` says why the reader must be replaced (it
        sent a line no packet reader sends, or a request raised), else None; the lines
        after a malformed one are not served.  Nothing a line holds makes it raise.
        """
        requests, problem = [], None
        for line in lines:
            try:
                requests.append(parse_request(line, self.config.longest_wire))
            except ValueError as e:
                problem = "a malformed request (%s)" % e
                break
        decisions, failure = self.serve(requests, now)
        return decisions, problem or failure

    def serve(self, requests, now=None):
        """Decide on [(source, destination, wire, interface)] and carry out what is
        accepted: every new replay digest is written with one fsync before the firewall
        changes, and all plain openings go in one change.  Returns (Decisions, problem
        or None)."""
        now = time.time() if now is None else now
        decisions, records, fresh, problem = [], [], set(), None
        for source, destination, wire, interface in requests:
            try:
                d = self._decide(source, destination, wire, interface, now, fresh)
            except Exception as e:          # never die of what the reader sends
                d = Decision(source, "internal error %s: %s" % (type(e).__name__, e))
                problem = problem or "a request raised %s: %s" % (type(e).__name__, e)
            decisions.append(d)
            if d.replay_key is not None and d.replay_key not in fresh \
                    and d.replay_key not in self.replay:
                fresh.add(d.replay_key)
                records.append((d.replay_key, d.message.timestamp if d.message else now))
        if records and not self._durable(records, decisions, now):   # before anything opens
            for d in decisions:
                if d.accepted:
                    d.accepted, d.reason = False, ("no durable replay record (%s)"
                                                   % self.replay.failure)
        self._record_closes(decisions)                   # before any hook opens
        try:
            self._carry_out(decisions, now)
        except Exception as e:
            problem = problem or "a request raised %s: %s" % (type(e).__name__, e)
            for d in decisions:
                if d.accepted:
                    d.accepted, d.reason = False, "internal error %s: %s" % (type(e).__name__, e)
        for d in decisions:
            self._log(d, now)
        return decisions, problem

    def _durable(self, records, decisions, now):
        """Record the digests durably; False, logged, if that cannot be done (a full disk):
        then nothing opens.  The cache is written anew at the next knock and every second
        (retry_replay), and knocks are accepted again as soon as that works."""
        failing = self.replay.failure
        if self.replay.add_many(records, now):
            if failing is not None:
                self.log.info("replay cache %s can be written again: knocks are accepted again",
                              self.replay.path)
            return True
        if failing is None:
            self.log.error("replay cache %s cannot be written (%s): knocks are refused until it "
                           "can", self.replay.path, self.replay.failure)
        return False

    def retry_replay(self):
        """While the replay cache cannot be written: try again (logged when it works)."""
        if self.replay.failure is not None and self.replay.retry():
            self.log.info("replay cache %s can be written again: knocks are accepted again",
                          self.replay.path)

    def _decide(self, source, destination, wire, interface, now, fresh):
        """Decide on one request: screen() again (a reader may lie), judge() against
        the config, then what this host allows (_host_problem).  `fresh`: the replay keys of
        this round, not yet in the cache."""
        stanza, signed = screen(wire, source, self.config.stanzas, destination)
        if stanza is None:       # a reader of an older config, or one that lies
            return Decision(source, "passed on by the packet reader, but %s" % signed)
        d = judge(stanza, signed, source, now, lambda key: key in self.replay or key in fresh,
                  self.config.max_packet_age)
        if d.accepted:
            reason = self._host_problem(d, destination, interface, now)
            if reason is None and stanza.cmd_cycle_open and d.message.msg_type != MSG_COMMAND:
                try:
                    d.hooks = self._hook_calls(d, destination, now)
                except ValueError as e:
                    reason = "cmd_cycle_open or cmd_cycle_close: %s" % e
            if reason is not None:
                d.accepted, d.reason = False, reason
        return d

    @staticmethod
    def _hook_calls(d, destination, now):
        """The hooks an accepted opening runs, one for each port it opens: [(open argv,
        close entry for PendingCloses or None, key, what)], fwknop's variables taken from
        the request as the policy accepted it.  ValueError if one cannot be made."""
        stanza, msg = d.stanza, d.message
        timer = stanza.hook_timer(msg, d.timeout)
        values = {"IP": d.allow_ip, "SRC": d.allow_ip, "PKT_SRC": d.source, "DST": destination,
                  "TIMEOUT": str(msg.timestamp + timer), "CLIENT_TIMEOUT": str(timer)}
        if d.nat is not None:
            values.update(NAT_IP=d.nat.address, NAT_PORT=str(d.nat.port))
        calls = []
        for proto, port in msg.access[:1] if d.nat is not None else msg.access:
            values.update(PORT=str(port), PROTO=str(PROTO_NUMBERS[proto]))
            key = (stanza.name, d.allow_ip, proto, port)
            what = "[client %s] %s %s/%d" % key
            close = None if stanza.cmd_cycle_close is None else {
                "due": now + timer, "user": stanza.cmd_cycle_user, "what": what, "key": key,
                "argv": expand_hook(stanza.cmd_cycle_close, values)}
            calls.append((expand_hook(stanza.cmd_cycle_open, values), close, key, what))
        return calls

    def _record_closes(self, decisions):
        """Write the closes of this round's hooks durably (PendingCloses), in one write,
        before any of their opens runs; if that fails, those knocks are refused."""
        closes = [close for d in decisions if d.accepted and d.hooks
                  for _, close, _, _ in d.hooks if close is not None]
        if not closes or self.test:
            return
        try:
            self.closes.add(closes)
        except OSError as e:
            self.log.error("cannot write the pending closes to %s: %s", self.closes.path,
                           e.strerror or e)
            for d in decisions:
                if d.accepted and d.hooks:
                    d.accepted, d.reason = False, "its cmd_cycle_close could not be recorded"

    def _run_opens(self, d):
        """Start an accepted knock's cmd_cycle_open hooks; why not, else None."""
        for argv, _, key, what in d.hooks:
            if self.test:
                self.log.info("test mode: cmd_cycle_open of %s not run: %s", what, " ".join(argv))
                continue
            reason = self.hooks.run(argv, d.stanza.cmd_cycle_user, "cmd_cycle_open of " + what,
                                    key)
            if reason is not None:
                return "cmd_cycle_open not run: %s" % (
                    "%d hooks run already, the most at once" % self.hooks.most
                    if reason == "busy" else reason)
        return None

    def run_closes(self, now=None):
        """Start the closes whose time has come (every second, and at start those a stopped
        server left); a close waits while its own open still runs, or while as many hooks
        run as may."""
        now = time.time() if now is None else now
        started = []
        for entry in self.closes.due(now):
            if self.hooks.busy(entry["key"]):
                continue
            late = now - entry["due"]
            reason = self.hooks.run(entry["argv"], entry["user"], "cmd_cycle_close of %s%s" % (
                entry["what"], " (%d s late: the server was not running)" % late
                if late > 5 else ""), entry["key"])
            if reason == "busy":
                break
            if reason is not None:
                self.log.error("cmd_cycle_close of %s not run: %s", entry["what"], reason)
            started.append(entry)
        if started:
            try:
                self.closes.remove(started)
            except OSError as e:
                self.log.error("cannot write the pending closes to %s: %s (a close that ran "
                               "may run again after a restart)", self.closes.path,
                               e.strerror or e)

    def _host_problem(self, d, destination, interface, now):
        """Why this host cannot grant an accepted packet now, else None: it must be
        addressed to this host, have come in on an interface the config names (with
        bind_interface), be vouched for by the replay cache, lead (local NAT) to this
        host, and fit the stanza's max_openings."""
        msg = d.message
        if destination not in self.addresses:
            return ("addressed to %s, not to this host: a knock for a host behind it opens "
                    "nothing here" % destination)
        if self.config.bind_interface:
            if interface not in self.config.interfaces + self.config.optional_interfaces:
                return "came in on %s, not an interface the config names" % interface
            d.interface = interface
        if msg.timestamp < self.replay.floor:
            return ("stamped before what the replay cache still remembers (max_packet_age "
                    "was raised): send a new packet")
        if d.nat is not None and d.nat.local and d.nat.address not in self.addresses:
            return "local NAT to %s: not an address of this host" % d.nat.address
        if msg.msg_type == MSG_COMMAND:
            return None
        return self._room(d, now)

    def _room(self, d, now):
        """Count the packet's openings against its stanza's max_openings (openings in
        force at once); why not, if they do not fit."""
        stanza = d.stanza
        access = d.message.access[:1] if d.nat is not None else d.message.access
        keys = [(d.allow_ip, proto, port) for proto, port in access]
        table = self.openings.get(stanza.name)
        if table is None:
            # Each opening as 8 bytes of its hash and its end in whole seconds: 13 bytes a
            # slot, as the table is only counted, never listed.
            table = self.openings[stanza.name] = PackedMap(8, _opening_hash, None, "!I")
            table.purged = now
        if len(table) + len(keys) > stanza.max_openings:     # near the limit: count exactly
            if now - table.purged >= 1:                      # (ended ones go once a second)
                table.keep_if(lambda end: end > now)
                table.purged = now
            new = sum(1 for key in keys if table.get(key, 0) <= now)
            if len(table) + new > stanza.max_openings:
                return ("[client %s] holds its max_openings (%d) already"
                        % (stanza.name, stanza.max_openings))
        for key in keys:
            table.raise_to(key, int(now + d.timeout) + 1)
        return None

    def _carry_out(self, decisions, now):
        """Open what was accepted: the plain openings in one change, NAT and commands one
        by one.  A change that fails refuses its packets (logged); nothing raises."""
        test = self.test
        for d in decisions:
            if d.accepted and d.hooks:
                reason = self._run_opens(d)
                if reason is not None:
                    d.accepted, d.reason = False, reason
        plain = [d for d in decisions if d.accepted and d.nat is None
                 and d.message.msg_type != MSG_COMMAND]
        for single, change in ((False, self.firewall.open_many), (True, self.firewall.open_once)):
            these = [d for d in plain if d.stanza.single_use == single]
            if not these:
                continue
            try:
                # A single-use opening's last item: the source port a spa.py client uses.
                change([(d.allow_ip, proto, port, d.timeout)
                        + ((connect_port(d.message.rand),) if single else
                           (d.interface,) if d.interface else ())
                        for d in these for proto, port in d.message.access], now)
            except (SpaError, ValueError, OSError) as e:
                self.log.error("firewall change failed: %s", e)
                for d in these:
                    d.accepted, d.reason = False, "the firewall change failed"
        for d in decisions:
            if not d.accepted or d.nat is None and d.message.msg_type != MSG_COMMAND:
                continue
            if d.nat is None:
                reason = self.commands.start(d.stanza, d.message.command, d.source,
                                             d.message.username, test)
            else:
                (proto, port), (to_address, to_port, local) = d.message.access[0], d.nat
                try:
                    # A single-use one: the source port a spa.py client uses (`once`).
                    once = {"once": connect_port(d.message.rand)} if d.stanza.single_use \
                        else {}
                    self.firewall.open_nat(d.allow_ip, proto, port, to_address, to_port,
                                           d.timeout, local, now, d.nat_mode, **once)
                    reason = None
                except (SpaError, ValueError, OSError) as e:
                    self.log.error("firewall change failed for %s: %s", d.allow_ip, e)
                    reason = "the firewall change failed"
            if reason is not None:
                d.accepted, d.reason = False, reason

    def _log(self, d, now):
        """One line a decision, refusals rate-limited; with -v (verbose), the fields of each
        packet that authenticated too (appended to a refusal; a line of their own, also
        rate-limited, before an acceptance)."""
        fields = packet_fields(d, now) if self.log.verbose and d.message else None
        if not d.accepted:
            self.counts["refused"] += 1
            if self.limiter.allow():
                self.log.info("rejected packet from %s%s: %s%s", d.source, " [client %s]"
                              % d.stanza.name if d.stanza else "", d.reason,
                              "; " + fields if fields else "")
            return
        self.counts["accepted"] += 1
        if fields and self.limiter.allow():
            self.log.debug("packet from %s [client %s] accepted; %s", d.source, d.stanza.name,
                           fields)
        msg, nat = d.message, d.nat
        if msg.msg_type == MSG_COMMAND:
            return                       # CommandRunner said what it started
        what = format_access(msg.access) if nat is None else "%s forwarded to %s" % (
            format_access(msg.access), format_endpoint(nat.address, nat.port))
        self.log.info("accepted packet from %s [client %s] user %s: opened %s for %s for %d s%s",
                      d.source, d.stanza.name, msg.username, what, d.allow_ip, d.timeout, "".join((
                          " on " + d.interface if d.interface else "", _mode_words(d.nat_mode),
                          ", for one connection (single_use)" if d.stanza.single_use else "",
                          " (test mode: firewall unchanged)" if self.test else
                          " (by its hooks: firewall = none)"
                          if isinstance(self.firewall, NoFirewall) else "")))

    def tick(self):
        """Once a second: reap commands and hooks, run the closes that are due, retry a
        replay cache that could not be written, say how many refusals the rate limit kept
        out; after a burst, once it is over, give the heap's free pages back (release_heap)."""
        self.commands.reap()
        self.hooks.reap()
        self.run_closes()
        self.retry_replay()
        self.log_suppressed()
        served = self.counts["accepted"] + self.counts["refused"]
        if served == self.served[0] != self.served[1]:
            release_heap()
            self.served = (served, served)
        self.served = (served, self.served[1])

    def log_suppressed(self):
        """Log how many refusals the rate limit left out since the last such line."""
        self.limiter.log_suppressed(self.log, "packets" if self.log.verbose
                                    else "rejected packets")

    def stats(self):
        """One line of counters for the log (SIGUSR1)."""
        return ("gatekeeper: accepted %d, refused %d of the packets the reader passed on"
                % (self.counts["accepted"], self.counts["refused"]))


# --- The packet reader ----------------------------------------------------------------

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
REQUEST_PIPE_SIZE = 4 << 20    # the request pipe's room: kernel memory, used only while full


class GatePipe(object):
    """The packet reader's handle on the gatekeeper in the parent: one line a packet.

    Writes never block: what the pipe cannot take now waits here, so the reader goes on
    draining its capture sockets while the parent is busy.
    """

    def __init__(self, fd):
        self.fd = fd
        self.pending = bytearray()
        os.set_blocking(fd, False)
        try:
            import fcntl
            if fcntl.fcntl(fd, F_GETPIPE_SZ) < 1 << 20:    # (start_reader made it larger)
                fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)    # room for a burst
        except (OSError, ImportError):
            pass

    def knock(self, source, destination, wire, now=None, interface=None):
        """Pass one packet on to the parent (Reader.handle calls it): it goes at the next
        flush(), which the reader's loop makes after each batch of frames, so a burst of
        knocks costs one write a batch, not one a knock."""
        self.pending += request_line(source, destination, wire, interface)

    def flush(self):
        """Write what the pipe takes now; True when nothing is left waiting (and then the
        buffer a burst grew goes back to the system, not kept at its largest)."""
        while self.pending:
            try:
                written = os.write(self.fd, self.pending)
            except BlockingIOError:
                return False
            del self.pending[:written]
            if not self.pending:
                self.pending = bytearray()
        return True


class CaptureLost(Exception):
    """A capture socket failed: its interface went down or away."""


CAPTURE_LOST = 3          # the reader's exit status then: the parent opens the capture anew


def rss_kb(status=None):
    """This process's resident memory in kB (0 where /proc is missing), read from
    /proc/self/status, or from `status`, that file already open (the packet reader can
    open no file)."""
    try:
        if status is None:
            with open("/proc/self/status", "rb") as f:
                text = f.read()
        else:
            text = os.pread(status, 8192, 0)
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(b"VmRSS:"):
            return int(line.split()[1])
    return 0


class Reader(object):
    """The unprivileged side: capture, sieve each packet (hmac_sieve: length and HMAC, all
    a flood's packet costs), screen() what the sieve lets through (length, alphabet, HMAC
    against the stanzas for its source: it needs no AES key), drop what it passed on
    before, log rejections, and pass on the rest to the gate."""

    BURST = 10000          # knocks its replay table holds: room from the start, never more

    def __init__(self, config, gate, log, seen=None):
        self.config, self.gate, self.log = config, gate, log
        self.stanzas = config.stanzas
        # Digests of the packets passed on (and the parent's, at start): a replay of a
        # knock stops here, without costing the parent a decryption.
        self.seen = seen if seen is not None else ReplayCache(None, config.max_packet_age)
        self.limiter = RateLimiter()
        self.sockets = []
        self.names = {}        # with bind_interface: capture socket's fd -> its interface
        self.counts = {"passed": 0, "rejected": 0}
        self.kernel_drops = 0
        self.status = None     # /proc/self/status, opened before the sandbox (start_reader)
        # The frame parser: for udp alone, the shortest (the flood's path costs no more).
        transports = getattr(config, "transports", ("udp",))
        http = HttpKnocks(config.http_port, config.http_proxies) if "http" in transports else None
        self.parse_frame = parse_frame if transports == ("udp",) else \
            (lambda frame: parse_any_frame(frame, http))
        self.sieve = hmac_sieve(self.stanzas, None if transports == ("udp",) else
                                (lambda frame: self.parse_frame(frame)[1]))
        self.rings = None      # capture socket's fd -> its Ring, mapped before the sandbox
        # Room for a burst of knocks without growing the table of digests mid-burst (each
        # growth moves every entry while the ring fills): memory only as entries come.
        self.seen.entries.reserve(self.BURST)

    def map_rings(self, sockets):
        """Map the receive ring of each capture socket that has one (before the sandbox);
        the others are read with recv()."""
        self.rings = {}
        for sock in sockets:
            ring = Ring.of(sock)
            if ring is not None:
                self.rings[sock.fileno()] = ring

    def name_interfaces(self, sockets):
        """With bind_interface, learn each capture socket's interface (each is bound to
        one): before the sandbox, which refuses getsockname."""
        if self.config.bind_interface:
            self.names = {sock.fileno(): sock.getsockname()[0] for sock in sockets}

    def handle(self, payload, source, now=None, frame=None, destination=None, interface=None,
               signer=None):
        """Screen one payload from `source` (its frame, or `destination`, gives where it was
        sent; `signer`, the Hmac the sieve found) and pass it on if it authenticates.
        Returns why it was refused here, or what the gate answers (from the pipe: None)."""
        stanza, signed = screen(payload, source, self.stanzas, None, signer)
        if stanza is None:                # the flood's path: nothing more than this
            self.counts["rejected"] += 1
            if self.limiter.allow():
                self.log.info("rejected packet from %s: %s", source, signed)
            return signed
        now = time.time() if now is None else now
        if not self.seen.add_new(packet_digest(signed), now, self.BURST):
            self.counts["rejected"] += 1
            if self.limiter.allow():
                self.log.info("rejected packet from %s [client %s]: replayed packet", source,
                              stanza.name)
            return "replayed packet"
        self.counts["passed"] += 1
        if destination is None:
            destination = frame_destination(frame)
        return self.gate.knock(source, destination, payload, now, interface)

    def refuse_cut(self, length):
        """A frame the ring cut short whose whole the socket had no room for (or lost):
        refused."""
        self.counts["rejected"] += 1
        if self.limiter.allow():
            self.log.info("rejected packet: a frame of %d bytes, cut to the capture ring's %d, "
                          "and the socket's buffer had no room for the whole", length,
                          RING_FRAME - 80)

    def take_cut(self, ring, head, length, status, frames):
        """A frame the ring cut to `head`: its whole, from the socket, joins `frames`; or,
        without one, it is refused."""
        whole = self.whole(ring, head, length) if status & TP_STATUS_COPY else None
        if whole is None:
            self.refuse_cut(length)
        else:
            frames.append(whole)

    def whole(self, ring, head, length):
        """The whole of a frame the ring cut short (TP_STATUS_COPY: see RING_FRAME): the
        copy the kernel queued on the socket, in the ring's order, so the first one there,
        unless a reader before this one left copies of frames it took (those are dropped
        on the way).  None if it is not there."""
        for _ in range(256):
            try:
                data = ring.sock.recv(RECV_LEN)
            except OSError:        # none there; ENETDOWN (then the ring's poll says so)
                return None
            if len(data) == length and data.startswith(head):
                return data
        return None

    def woken(self, ring, interface):
        """poll() says the ring's socket is readable: read the ring.  Wake-ups that keep
        finding nothing there for 50 ms (a frame the kernel is still writing takes
        microseconds) mean the reader spins: the socket holds copies no frame will take
        (a reader before this one took their frames, and died before their copies), or
        the ring has frames ready where the reader does not stand (poll() asks about the
        frame before the kernel's: see Ring).  The copies are dropped, and the ring looked
        through from where the reader stands (resync): a reader that lost the kernel
        finds it again within 50 ms, instead of spinning until new frames come round to
        it.  (Should a frame have been still being written all that time, it is passed
        over; when the kernel comes round to it, unread, the same spin brings the reader
        back to it.  A copy queued in that very moment goes with the others: its long
        frame is then refused.)"""
        if self.read_ring(ring, interface):
            ring.idle = None
        elif ring.idle is None:
            ring.idle = time.monotonic()
        elif time.monotonic() - ring.idle > 0.05:
            while True:
                try:
                    ring.sock.recv(1)
                except OSError:
                    break
            ring.idle = None
            ring.synced = False
            self.read_ring(ring, interface)

    def take(self, frames, interface):
        """Screen a batch of frames: the flood's path.  A frame whose payload no key signed
        (hmac_sieve) costs that and a count, and while the log has room, screen() says why
        it is refused; the others go through handle()."""
        limiter = self.limiter
        refused = None if limiter.quiet() else []    # no room in the log: count, say nothing
        passed = self.sieve(frames, refused)
        for frame, signer in passed:
            source, payload = self.parse_frame(frame)
            if source is not None:
                self.handle(payload, source, None, frame, None, interface, signer)
        count, said = len(frames) - len(passed), 0
        for frame in refused or ():
            said += 1
            if not self.log_refusal(frame):
                break
        self.counts["rejected"] += count
        limiter.suppressed += count - said

    def log_refusal(self, frame):
        """Log why screen() refuses a frame hmac_sieve() refused, if the rate limit lets
        it (False if not: the limiter counted it)."""
        if not self.limiter.allow():
            return False
        source, payload = self.parse_frame(frame)
        self.log.info("rejected packet from %s: %s", source or "?",
                      screen(payload, source, self.stanzas)[1] if source else
                      "not an IP packet spa.py reads")
        return True

    def read_ring(self, ring, interface, batch=256):
        """Take the frames ready in `ring`, up to `batch`, each handed back to the kernel
        once copied: the flood's path, with no system call.  Returns how many it took."""
        view, offsets, header = ring.map, ring.offsets, Ring.HEADER.unpack_from
        i, count = ring.next, len(offsets)
        if not header(view, offsets[i])[0] & TP_STATUS_USER and (ring.synced or not ring.find()):
            return 0
        ring.synced = True
        i, frames = ring.next, []
        for _ in range(batch):
            at = offsets[i]
            status, length, kept, net = header(view, at)
            if not status & TP_STATUS_USER:
                break
            if kept == length:
                frames.append(view[at + net:at + net + kept])
            else:
                self.take_cut(ring, view[at + net:at + net + kept], length, status, frames)
            view[at:at + 4] = b"\0\0\0\0"               # TP_STATUS_KERNEL: the kernel's again
            i = i + 1 if i + 1 < count else 0
        taken, ring.next = (i - ring.next) % count, i
        self.take(frames, interface)
        return taken

    def resync(self):
        """After a whole wait in which poll() saw nothing: read whatever each ring holds,
        from its first ready frame (Ring.find).  Nothing should be there; if something is
        (a frame passed over: by a new reader's find(), or one the kernel finished only
        after find() looked), the kernel stands at it, dropping all, and poll() cannot
        tell: reading it hands the kernel back the frame it waits for.  Never after a
        poll that did not wait (the housekeeping's): a flood may be running, with a frame
        still being written, which find() would pass over."""
        for fd, ring in (self.rings or {}).items():
            ring.synced = False
            self.read_ring(ring, self.names.get(fd))

    def read_socket(self, sock, interface, batch=64):
        """Take the frames waiting in a capture socket without a ring, up to `batch`."""
        frames = []
        for _ in range(batch):
            try:
                frames.append(sock.recv(RECV_LEN))
            except BlockingIOError:
                break
            except OSError:            # ENETDOWN: the interface went down or away
                self.take(frames, interface)
                raise CaptureLost()
        self.take(frames, interface)

    def stats(self):
        """One line of counters for the log (SIGUSR1, and at exit); benchmarks parse it."""
        for sock in self.sockets:
            try:   # struct tpacket_stats; reading it resets the kernel's counters
                _, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
                self.kernel_drops += drops
            except OSError:
                pass
        cpu = os.times()
        return ("stats: received %d, passed on %d, rejected %d, kernel drops %d, cpu %.3f s, "
                "rss %d kB" % (self.counts["passed"] + self.counts["rejected"],
                               self.counts["passed"], self.counts["rejected"], self.kernel_drops,
                               cpu[0] + cpu[1], rss_kb(self.status)))

    def run(self, sockets, parent_fd=None, poller=None):
        """Wait on the capture sockets and handle each knock as it arrives.

        Returns when the parent goes away (its end of the pipe closes).  `poller` is an
        empty epoll object made before the sandbox, which allows no new descriptor (epoll
        rather than poll: poll() fails when it waits on more descriptors than RLIMIT_NOFILE).
        """
        import select
        self.sockets = sockets
        poller = select.epoll() if poller is None else poller
        if not self.names:
            self.name_interfaces(sockets)
        if self.rings is None:
            self.map_rings(sockets)
        rings = self.rings
        by_fd = {}
        for sock in sockets:
            poller.register(sock, select.EPOLLIN)
            by_fd[sock.fileno()] = sock
        if parent_fd is not None:
            poller.register(parent_fd, 0)       # EPOLLERR: the parent has gone
        waiting = False                         # requests the pipe could not take yet
        next_housekeeping = time.monotonic() + 10
        passed = 0               # knocks passed on when the heap was last given back
        while True:
            burst = self.counts["passed"] != passed
            wait = 0.5 if burst else max(0, next_housekeeping - time.monotonic())
            events = poller.poll(wait)
            if not events and wait > 0:         # a whole wait with nothing: see resync
                self.resync()
            if burst and not events:            # quiet after knocks: free what they used
                release_heap()
                passed = self.counts["passed"]
            for fd, event in events:
                sock = by_fd.get(fd)
                if sock is None:
                    if event & select.EPOLLOUT and not event & (select.EPOLLERR | select.EPOLLHUP):
                        continue                # flushed below
                    return
                if event & (select.EPOLLERR | select.EPOLLHUP):
                    raise CaptureLost()
                # A batch from each socket in turn, so one flooded interface cannot
                # starve the others.
                if fd in rings:
                    self.woken(rings[fd], self.names.get(fd))
                else:
                    self.read_socket(sock, self.names.get(fd))
            if parent_fd is not None and hasattr(self.gate, "flush"):
                still = not self.gate.flush()
                if still != waiting:
                    poller.modify(parent_fd, select.EPOLLOUT if still else 0)
                    waiting = still
            if time.monotonic() >= next_housekeeping:
                next_housekeeping = time.monotonic() + 10
                self.seen.prune(time.time())
                self.log_suppressed()

    def log_suppressed(self):
        """Log how many rejections the rate limit left out since the last such line."""
        self.limiter.log_suppressed(self.log, "rejected packets")


def crash_report():
    """The exception being handled, as a traceback without source lines: the reader cannot
    read them, nor import the traceback module then (loaded before, it would cost each
    process memory: README.md, Performance)."""
    kind, error, tb = sys.exc_info()
    lines = ["Traceback (most recent call last):"]
    while tb is not None:
        code = tb.tb_frame.f_code
        lines.append('  File "%s", line %d, in %s' % (code.co_filename, tb.tb_lineno,
                                                      code.co_name))
        tb = tb.tb_next
    lines.append("%s: %s" % (kind.__name__, error) if str(error) else kind.__name__)
    return "\n".join(lines)


def preload():
    """Import now everything the packet reader may need later, when it can no longer read
    the files (the hashes' modules are loaded on first use), and what the parent needs
    to decrypt, so that the two share it (pycryptodome's AES)."""
    import ipaddress, resource, select  # noqa: F401,E401
    key = b"k" * 32
    for mode in ENCRYPTION_MODES:
        for hmac_type in HMAC_TYPES:
            plaintext = Message("u", "0.0.0.0", [("tcp", 1)], digest_type=hmac_type).encode()
            wire = seal(plaintext, key, b"h", hmac_type, mode)
            parse_plaintext(unseal(wire, key, b"h", hmac_type, mode))


def crypto_available():
    """Fail early, with the install hint, where pycryptodome is missing (before the
    firewall is set up)."""
    aes_ecb()


# --- The reader's process: started, served, stopped by the parent ---------------------

def _confined_reader(config, sockets, seen, log, user, pipes):
    """In the forked child: the steps of the reader's confinement, in their order (see the
    sandbox above), and the Reader, ready to run; (reader, the epoll it waits in)."""
    import select
    import signal
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent stops us with SIGTERM
    # A session of its own, without the terminal: no TIOCSTI into the admin's shell.
    os.setsid()
    # Nothing of the parent's may leak in: the terminal, its netlink sockets, the replay
    # cache file...
    close_fds_except(set(pipes) | {sock.fileno() for sock in sockets})
    take_free_descriptors(3)
    if user and os.geteuid() == 0:
        drop_privileges(user)
    reader = Reader(config, GatePipe(pipes[0]), log, seen)

    def stop(signum, frame):
        raise SystemExit
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, lambda signum, frame: log.info("%s", reader.stats()))
    # What the loop needs that the sandbox would refuse it later: the file the stats
    # line reads, and the epoll it waits in.
    reader.status = os.open("/proc/self/status", os.O_RDONLY)
    reader.name_interfaces(sockets)
    reader.map_rings(sockets)
    poller = select.epoll()
    confine_reader(pipes, (reader.status,), log)
    return reader, poller


def _reader_main(config, sockets, seen, log, user, pipes, mask):
    """The packet reader's whole life, in the forked child: confine itself, read packets
    until the parent goes away, say what it saw; its exit status tells the parent why it
    ended (CAPTURE_LOST: a capture socket failed)."""
    import signal
    code = 1
    try:
        log = Log.to_pipe(pipes[1], log.verbose)
        reader, poller = _confined_reader(config, sockets, seen, log, user, pipes)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)      # what came meanwhile, now
        try:
            # returns when the parent closes its end of the pipe
            reader.run(sockets, pipes[0], poller)
            code = 0
        except (SystemExit, BrokenPipeError):   # SIGTERM; a request after the pipe closed
            code = 0
        except CaptureLost:
            code = CAPTURE_LOST
        # Stopping already: say what was seen.  (A mask, as the sandbox refuses sigaction.)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        reader.log_suppressed()
        log.info("%s", reader.stats())
    except SpaError as e:
        log.error("packet reader: %s", e)
    except BaseException:
        log.error("packet reader crashed:\n%s", crash_report())
    finally:
        os._exit(code)


def start_reader(config, sockets, seen, log, user):
    """Fork the packet reader; returns (pid, read end of its request pipe, read end of its
    log pipe).  The child runs _reader_main() and never returns here."""
    import gc
    import signal
    r, w = os.pipe()
    log_r, log_w = os.pipe()
    try:
        # Root may make the request pipe larger than a user may: a burst of 10,000 knocks
        # (2.5 MB of requests) then waits in the kernel, not in the reader's heap, which
        # would keep the memory after the burst.
        import fcntl
        fcntl.fcntl(w, F_SETPIPE_SZ, REQUEST_PIPE_SIZE)
    except OSError:
        pass
    # Load what the reader needs before the fork, while files are readable: then it is
    # shared with the parent (ctypes, pycryptodome's libraries, the hash modules, the
    # modules decide() uses), not loaded twice.  Python 3.7+: the child's garbage
    # collector leaves shared pages alone.
    preload()
    getattr(gc, "freeze", lambda: None)()
    # Signals wait, blocked, until each side has its own handlers: one that reached the
    # child before then would run the parent's handler there (lost) or end it (SIG_DFL).
    caught = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, caught)
    pid = os.fork()
    if pid == 0:
        _reader_main(config, sockets, seen, log, user, (w, log_w), mask)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(w)
    os.close(log_w)
    return pid, r, log_r


class ReaderProcess(object):
    """The packet reader as the parent sees it, one process at a time: it starts it
    (start_reader), logs what it writes to its log pipe, serves its requests through the
    gatekeeper, stops it and reaps it; after a death it says when the next may start.

    It trusts nothing the reader sends: a log line is untrusted text (escaped, capped,
    rate-limited), a request the gatekeeper checks again, and a line no packet reader
    sends gets the reader killed and replaced.
    """

    MAX_LINE = 4096           # the longest log line of the reader's that is logged whole
    RESTART_DELAY = (0.1, 60.0)   # a reader that keeps dying: first and longest wait (doubling)

    def __init__(self, gate, log, user=None):
        self.gate, self.log, self.user = gate, log, user
        self.pid = self.fd = self.log_fd = None     # the reader, its request and log pipes
        self.buffer = self.log_buffer = b""         # what came of a line not yet whole
        self.started = self.restart_at = 0.0    # when the reader started; when the next may
        self.delay = 0.0
        self.lines = RateLimiter(rate=10.0, burst=100)    # a reader flooding the log
        self.strays = []      # readers that did not stop when told: reaped when they end

    def start(self, config, sockets):
        """Fork a reader of `sockets` for `config`, with a copy of the replay cache."""
        self.pid, self.fd, self.log_fd = start_reader(config, sockets, self.gate.replay.copy(),
                                                      self.log, self.user)
        os.set_blocking(self.fd, False)
        os.set_blocking(self.log_fd, False)
        self.buffer = self.log_buffer = b""
        self.started = time.monotonic()

    def back_off(self, status):
        """A reader died: start the next one after a wait that doubles while readers keep
        dying young (up to a minute), so a crash loop costs little, and never give up:
        meanwhile the firewall stays as it is and knocks wait in the capture buffer."""
        first, longest = self.RESTART_DELAY
        young = time.monotonic() - self.started < longest
        self.delay = min(longest, max(first, 2 * self.delay)) if young else first
        self.restart_at = time.monotonic() + self.delay
        self.log.error("packet reader stopped (%s): starting a new one in %s s", status,
                       "%.3g" % self.delay)

    def relay(self):
        """Log what the packet reader wrote to its log pipe ("LEVEL text" lines), as
        untrusted text: control characters escaped, lines capped, at most 10 a second
        after a burst of 100.  Closes the pipe at its end; False when nothing was there."""
        try:
            chunk = os.read(self.log_fd, 16384)
        except BlockingIOError:
            return False
        if not chunk:
            os.close(self.log_fd)
            self.log_fd = None
            chunk = b"\n" if self.log_buffer else b""
        *lines, self.log_buffer = (self.log_buffer + chunk).split(b"\n")
        if len(self.log_buffer) > self.MAX_LINE:
            lines.append(self.log_buffer)
            self.log_buffer = b""
        for line in filter(None, lines):
            if not self.lines.allow():
                continue
            missed = self.lines.take_suppressed()
            if missed:
                self.log.warning("%d lines of the packet reader were not logged (rate limit)",
                                 missed)
            text = line[:self.MAX_LINE].decode("utf-8", "replace").translate(CONTROL_ESCAPES)
            level, _, rest = text.partition(" ")
            if level in Log.SEVERITY:
                getattr(self.log, level)("%s", rest)
            else:
                self.log.info("%s", text)
        return True

    def serve(self):
        """Read and carry out the reader's requests; False once its pipe has closed, or
        once it sent what no packet reader sends (it is killed then, and replaced).

        One read is one round (one fsync, one firewall change): up to 16 KiB, ~70
        requests.  A burst is served in rounds of that size, each request checked
        and decided in its turn: the transient objects of a round are few and fit in
        the same memory round after round.
        """
        import signal
        try:
            chunk = os.read(self.fd, 16384)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        if len(self.buffer) > REQUEST_EXTRA + self.gate.config.longest_wire:   # never whole
            lines.append(self.buffer)
            self.buffer = b""
        problem = self.gate.serve_lines(lines)[1] if lines else None
        if problem is None:
            return True
        self.log.error("packet reader: %s; replacing it", problem)
        # (If the kill is refused, the reader still ends: its pipe is closed next.)
        send_signal(self.log, self.pid, signal.SIGKILL, "the packet reader")
        return False

    def reap(self):
        """After its request pipe closed: wait for the reader, log its last lines; (its
        exit status or None, how it ended in words)."""
        import signal
        os.close(self.fd)
        _, status = os.waitpid(self.pid, 0)
        self._close_log()
        self.pid = self.fd = None
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status), "exit status %d" % os.WEXITSTATUS(status)
        return None, "killed by signal %d%s" % (
            os.WTERMSIG(status), ": a system call its sandbox forbids"
            if os.WTERMSIG(status) == signal.SIGSYS else "")

    def stop(self, wait=2.0):
        """Stop the packet reader: carry out what it has sent, then close its pipe.

        The reader ends as soon as its pipe to us closes (it polls for that), so no
        signal is needed: a root parent without CAP_KILL may not signal it (another
        user), and a signal could land in the middle of a request.  A request written
        between the last read and the close is lost: a knock then opens nothing (the
        digest was never recorded; the client knocks again).  A reader that has not
        ended after `wait` seconds is killed; if even that is refused, it is left to
        end (logged), and reaped later.
        """
        import select
        import signal
        if not self.pid:
            return
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while poller.poll(0) and self.serve():     # what is waiting now, round by round
            pass
        os.close(self.fd)
        pid, self.pid, self.fd = self.pid, None, None
        try:
            for step in (wait, 1.0):
                deadline = time.monotonic() + step
                while time.monotonic() < deadline:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        return
                    time.sleep(0.002)
                if step == wait:
                    send_signal(self.log, pid, signal.SIGKILL, "the packet reader")
            self.log.error("the packet reader (pid %d) did not stop; left behind", pid)
            self.strays.append(pid)
        finally:
            self._close_log()

    def reap_strays(self):
        """Reap the readers left behind (stop) that have ended since."""
        self.strays = [pid for pid in self.strays if not os.waitpid(pid, os.WNOHANG)[0]]

    def _close_log(self):
        """Log the last lines of a reader that has ended (a traceback, its stats), then
        close its log pipe; one still held open (a reader left behind) is closed as it is."""
        while self.log_fd is not None and self.relay():
            pass
        if self.log_fd is not None:
            os.close(self.log_fd)
            self.log_fd = None


# --- The supervisor: the parent's event loop ------------------------------------------

class Supervisor(object):
    """The parent's event loop: it keeps a packet reader running (ReaderProcess), handles
    signals (SIGHUP reloads, SIGUSR1 logs counters), keeps the capture going when
    interfaces come and go, removes expired openings every second, and puts back what a
    reload of the host's firewall removed."""

    def __init__(self, args, config, gate, log):
        self.args, self.config, self.gate, self.log = args, config, gate, log
        self.user = config.user if os.geteuid() == 0 else None
        self.reader = ReaderProcess(gate, log, self.user)
        self.captures = {}    # interface -> socket, for those that are there
        self.waiting = set()  # interfaces that went away (or were not there at start)
        self.expire_failed = 0    # expire() failures in a row

    def open_captures(self, first=False):
        """Open capture sockets for every configured interface not captured yet.

        A missing interface is an error at start unless it is listed as optional; one
        that is down is waited for; later (a link that went away or down) it is retried
        every second.
        """
        opened = False
        for interface in self.config.interfaces + self.config.optional_interfaces:
            if interface in self.captures:
                continue
            try:
                self.captures[interface] = open_capture(interface, self.config.port,
                                                        self.config.transports,
                                                        self.config.http_port,
                                                        self.config.longest_wire)
                opened = True
                if not first:
                    self.log.info("capturing on %s again", interface)
            except SpaError as e:
                if first and interface in self.config.interfaces and \
                        not isinstance(e, InterfaceDown):
                    raise
                if first or interface not in self.waiting:
                    self.log.warning("%s: waiting for it to come back", e)
                self.waiting.add(interface)
                continue
            self.waiting.discard(interface)
        return opened

    def close_captures(self):
        """Close every capture socket (a new reader gets new ones)."""
        for sock in self.captures.values():
            sock.close()
        self.captures = {}

    def catch_signals(self):
        """From now on SIGTERM, SIGINT, SIGHUP and SIGUSR1 wait in `pending` for run(), which
        a byte on the wake-up pipe wakes: caught before the server says it listens, so an
        early `systemctl reload` cannot end it."""
        import signal
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        self.pending = []
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, lambda signum, frame: self.pending.append(signum))

    def run(self):
        """Serve until SIGTERM or SIGINT: wait for what comes (_wait), then the signals, the
        interfaces that came back, and the tasks of every second and every few seconds."""
        if not hasattr(self, "pending"):
            self.catch_signals()
        firewall = self.gate.firewall
        monitor = self._monitor(firewall)
        every = 10 if monitor is not None else 2
        next_check = time.monotonic() + every
        next_expire = time.monotonic() + 1
        try:
            while True:
                self._wait(monitor)
                if not self._signals():
                    return
                if self.waiting and self.open_captures():
                    self._restart()     # a reader for the interfaces that are back
                if time.monotonic() >= next_expire:      # once a second, however busy
                    next_expire = time.monotonic() + 1
                    self._expire(firewall)
                    self.gate.tick()
                    self.reader.reap_strays()
                if time.monotonic() >= next_check:     # in case the monitor missed something
                    next_check = time.monotonic() + every
                    firewall.restore()
                    self.gate.replay.prune(time.time())   # not at every batch: it walks all
        finally:
            self.reader.stop()
            if monitor is not None:
                monitor.close()
            if self.gate.closes.entries:
                self.log.warning("%d hook close(s) pending: they run when the server starts "
                                 "again (%s)", len(self.gate.closes.entries), self.gate.closes.path)

    def _wait(self, monitor):
        """Wait up to a second for the reader's requests or log lines, a signal or news of
        the ruleset (`monitor`), and handle what came; start a reader when one is due."""
        import select
        reader = self.reader
        wait = 1000
        if reader.pid is None and self.captures:
            wait = max(0, min(wait, 1000 * (reader.restart_at - time.monotonic())))
            if wait == 0:
                reader.start(self.config, list(self.captures.values()))
                wait = 1000
        poller = select.poll()
        for fd in (reader.fd, reader.log_fd, self.wake_r, monitor):
            if fd is not None:
                poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(wait):
            if fd == self.wake_r:
                os.read(self.wake_r, 512)
            elif monitor is not None and fd == monitor.fileno():
                if monitor.news():
                    self.gate.firewall.restore()
            elif fd == reader.log_fd:
                reader.relay()
            elif fd == reader.fd and not reader.serve():
                code, status = reader.reap()
                if code == CAPTURE_LOST:
                    self.log.warning("packet reader lost its capture: reopening it")
                    self.close_captures()
                    self.open_captures()
                else:
                    reader.back_off(status)

    def _signals(self):
        """Handle the signals that came; False for SIGTERM or SIGINT: time to stop."""
        import signal
        while self.pending:
            signum = self.pending.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                return False
            if signum == signal.SIGUSR1:
                self.log.info("%s", self.gate.stats())
                if self.reader.pid:
                    send_signal(self.log, self.reader.pid, signal.SIGUSR1, "the packet reader")
            if signum == signal.SIGHUP:
                self.reload()
        return True

    def _expire(self, firewall):
        """Remove expired openings.  A failure (iptables-restore that could not get the
        xtables lock, say) is logged once and tried again every second until it works:
        meanwhile the kernel's own timeouts close the openings."""
        try:
            firewall.expire()
        except SpaError as e:
            if not self.expire_failed:
                self.log.error("could not remove expired openings (%s): trying again every "
                               "second", e)
            self.expire_failed += 1
            return
        if self.expire_failed:
            self.log.info("expired openings removed again, after %d failed attempt(s)",
                          self.expire_failed)
            self.expire_failed = 0

    def _monitor(self, firewall):
        """nftables' change notifications where the back end may be changed under us
        (RulesetMonitor), else None: then restore() runs every 2 s instead of every 10."""
        if not firewall.monitored:
            return None
        try:
            return RulesetMonitor()
        except OSError:
            return None

    def _restart(self):
        """A new packet reader, for a new config or new capture sockets."""
        self.reader.stop()
        if self.captures:
            self.reader.start(self.config, list(self.captures.values()))

    def reload(self):
        """SIGHUP: read the config again; openings in force and the replay cache stay."""
        try:
            config = ServerConfig(self.args.config, self.args.access_conf)
            config.start_gpg()
        except SpaError as e:
            self.log.error("config reload failed, keeping the running config: %s", e)
            return
        for note in config.notes:
            self.log.warning("access.conf: %s", note)
        old = self.config
        later = [name for name in RESTART_OPTIONS if getattr(config, name) != getattr(old, name)]
        if later:
            self.log.warning("%s: changed, but takes effect only when the server restarts",
                             ", ".join(later))
            for name in later:            # until then the running values hold
                setattr(config, name, getattr(old, name))
        self.config = self.gate.config = config
        old.stop_gpg()
        self.gate.replay.max_age = config.max_packet_age
        firewall = self.gate.firewall
        nat = config.enable_forwarding or config.enable_local_nat
        try:
            if (config.protect, config.protect_action, nat, config.single_use) != \
                    (old.protect, old.protect_action, firewall.nat, firewall.once):
                # The NAT switches too: the stanzas the new config made follow them already,
                # so the firewall's NAT chains (made or removed by setup) must as well; and
                # the rules of single-use openings.
                firewall.reconfigure(config.protect, config.protect_action, nat)
                firewall.once = config.single_use
                firewall.setup()
        except SpaError as e:
            self.log.error("firewall update failed: %s", e)
        capture = ("interfaces", "optional_interfaces", "port", "transports", "http_port",
                   "longest_wire")
        if [getattr(config, name) for name in capture] != [getattr(old, name) for name in capture]:
            self.close_captures()
            self.open_captures()
        self._restart()
        self.log.info("reloaded %s: %d client stanza(s); protecting %s (%s)", config.path,
                      len(config.stanzas), format_access(config.protect), config.protect_action)


# --- Entry points: server, firewall-config, check-config ------------------------------

def notify_systemd(state):
    """Tell systemd how the server is (Type=notify: READY=1 once it protects and listens, so
    `systemctl start` waits for that, and fails if the server does not get there).  Does
    nothing outside systemd; the variable is dropped, so no child of ours could use it."""
    path = os.environ.pop("NOTIFY_SOCKET", "")
    if not path.startswith(("/", "@")):
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect("\0" + path[1:] if path.startswith("@") else path)
            sock.send(state.encode())
    except OSError:
        pass


CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13}


def require_capabilities(names):
    """Stop, in words, unless this process has the capabilities `names` (root has them all):
    rather than with the first `Permission denied` of a socket or a config file."""
    try:
        with open("/proc/self/status") as f:
            effective = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
        missing = [n for n in names if not effective >> CAPABILITIES[n] & 1]
    except (OSError, StopIteration, ValueError, IndexError):
        missing = [] if os.geteuid() == 0 else names
    if missing:
        raise SpaError("the server needs root (or CAP_NET_RAW and CAP_NET_ADMIN; this process "
                       "lacks %s): run it as root" % " and ".join(missing))


def warn_unsaved(config, firewall, log):
    """Say at start if the host's saved firewall lacks our protection (SavedFirewall)."""
    if config.saved_firewall == "none" or isinstance(firewall, (DryRunFirewall, NoFirewall)):
        return
    try:
        found = SavedFirewall(config, firewall).problems()
    except SpaError as e:
        found = [(config.path, "(%s)" % e, "spa.py check-config -c %s" % config.path)]
    if found:
        path, what, fix = found[0]
        log.warning("the host's saved firewall does not hold spa.py's protection (%s %s): a "
                    "firewall reload or a boot leaves %s open until this server puts it back; "
                    "run  %s  (README.md: Keep the ports dark through reloads and boots)",
                    path, what, format_access(config.protect), fix)


def pending_closes(config, test, log):
    """The hooks' closes a stopped server left (PendingCloses), said in the log."""
    closes = PendingCloses(None if test else config.pending_closes)
    if closes.skipped:
        log.warning("%s: skipped %d line(s) that could not be read", closes.path, closes.skipped)
    if closes.entries:
        log.info("%d hook close(s) pending from before the start: the overdue ones run at "
                 "once, the others on time", len(closes.entries))
    return closes


def server_main(args):
    """`spa.py server`: load the config, set up the firewall and the replay cache,
    and supervise the packet reader until SIGTERM; or, with --list and --flush, show or
    remove what spa.py put in the firewall."""
    require_capabilities(["CAP_NET_ADMIN"] if args.list or args.flush else ["CAP_NET_RAW"])
    config = ServerConfig(args.config, args.access_conf)
    if not (args.test or args.list or args.flush or config.firewall == "none"):
        require_capabilities(["CAP_NET_RAW", "CAP_NET_ADMIN"])
    log = Log("stderr" if args.test else config.log, args.verbose)
    for note in config.notes:
        log.warning("access.conf: %s", note)
    firewall = make_firewall(config, args.test, log)
    if args.flush:
        removed = firewall.flush()
        print("removed spa.py's %s rules (a running server puts them back: stop it first)"
              % firewall.name if removed else "nothing to remove")
        return 0
    if args.list:
        rows = firewall.list()
        for row in sorted(rows):
            address, proto, port, left, interface = row[:5]
            print("%-40s %s/%-5d %5d s left%s%s" % (address, proto, port, left,
                                                    " (on %s)" % interface if interface else "",
                                                    ", single use, unused" if row[5:] else ""))
        nat_rows = firewall.list_nat()
        for row in sorted(nat_rows):
            address, proto, port, to_address, to_port, local, left = row[:7]
            print("%-40s %s/%-5d %5d s left, forwarded to %s%s%s" % (
                address, proto, port, left, format_endpoint(to_address, to_port),
                " (this host)" if local else "", ", single use, unused" if row[7:] else ""))
        if not rows and not nat_rows:
            print("no open authorizations")
        return 0
    crypto_available()
    config.start_gpg()
    try:
        return _serve(args, config, firewall, log)
    finally:
        config.stop_gpg()


def _serve(args, config, firewall, log):
    """server_main's part once the config is read: the replay cache, the firewall, the
    supervisor until SIGTERM."""
    # Replay cache first, so a config or permission problem stops us before any change.
    replay = ReplayCache(None if args.test else config.replay_cache, config.max_packet_age)
    if replay.skipped:
        log.warning("replay cache %s: skipped %d line(s) that could not be read",
                    config.replay_cache, replay.skipped)
    if replay.failure is not None:
        log.error("replay cache %s cannot be written (%s): knocks are refused until it can",
                  config.replay_cache, replay.failure)
    gate = Gatekeeper(config, firewall, replay, log, closes=pending_closes(config, args.test, log))
    supervisor = Supervisor(args, config, gate, log)
    supervisor.catch_signals()
    supervisor.open_captures(first=True)
    firewall.setup()
    gate.run_closes()              # the overdue ones a stopped server left
    if not args.test:
        warn_unsaved(config, firewall, log)
    log.info("listening on %s %s; protecting %s (%s); %d client stanza(s); packets read as "
             "user %s%s", ",".join(config.interfaces + config.optional_interfaces),
             config.transports_text(),
             format_access(config.protect), config.protect_action, len(config.stanzas),
             supervisor.user or "(unchanged: not root)", "; test mode" if args.test else "")
    if config.user_note and supervisor.user:
        log.warning("%s", config.user_note)
    notify_systemd("READY=1")
    try:
        supervisor.run()
    finally:
        replay.close()
        supervisor.config.stop_gpg()
    log.info("stopping: protected ports stay closed; openings expire on their own")
    return 0


def firewall_config_main(args):
    """Show (or, with --write, make) the changes that put spa.py's protection into the host's
    saved firewall (SavedFirewall)."""
    import difflib
    config = ServerConfig(args.config)
    if config.firewall == "none":
        raise SpaError("firewall = none: there is no firewall to save spa.py's rules in")
    if config.saved_firewall == "none":
        raise SpaError("saved_firewall = none in %s: set it to auto or to the host's ruleset "
                       "file(s)" % config.path)
    firewall = make_firewall(config, False)
    saved = SavedFirewall(config, firewall)
    changes = saved.changes()
    if not changes:
        print("the host's saved firewall holds spa.py's protection: %s" % saved.describe())
        return 0
    for path, text, why in changes:
        if args.write:
            try:
                write_file(path, text, check=saved.checker(path))
            except OSError as e:
                raise SpaError("cannot write %s: %s" % (path, e.strerror))
            except SpaError as e:
                raise SpaError("%s would not load (%s): left as it was" % (path, e))
            print("wrote %s (%s)" % (path, why))
            continue
        old = _read_text(path) or ""
        sys.stdout.writelines(difflib.unified_diff(
            old.splitlines(True), text.splitlines(True), path if old else "/dev/null", path))
    if args.write:
        print("a reload of the host's firewall, and a boot, now keep %s dark, with or without "
              "the server (which puts openings back after a reload)" % format_access(config.protect))
    else:
        print("(run again with --write to make these changes)")
    return 0


class Checklist(object):
    """The `ok` / `FAIL` lines of check-config and selftest, and what failed."""

    def __init__(self, say=print):
        """`say` prints a line; failures are collected."""
        self.say = say
        self.failures = []

    def __call__(self, ok, text):
        self.say("  %s  %s" % ("ok  " if ok else "FAIL", text))
        if not ok:
            self.failures.append(text)
        return ok


def check_saved_firewall(config, line):
    """check-config: does the host's saved firewall hold our protection (SavedFirewall)?"""
    if config.saved_firewall == "none":
        print("  note  saved_firewall = none: a firewall reload or a boot leaves %s open until "
              "the server puts it back" % format_access(config.protect))
        return
    saved = SavedFirewall(config, make_firewall(config, False))
    found = saved.problems()
    if not found:
        line(True, "the host's saved firewall holds spa.py's protection: %s" % saved.describe())
        return
    line(False, "the host's saved firewall does not hold spa.py's protection: a firewall "
         "reload or a boot leaves %s open until the server puts it back"
         % format_access(config.protect))
    for path, what, fix in found:
        print("        %s %s: run  %s" % (path, what, fix))


def _gpg_key_problem(gpg, key, secret=False):
    """Why gpg's keyring lacks the (secret) key `key`, else None."""
    code, out, _ = gpg.run(["--with-colons", "--list-secret-keys" if secret else "--list-keys",
                            "--", key], b"")
    if code != 0 or not out.strip():
        return "no %skey %s in its keyring" % ("secret " if secret else "", key)
    return None


def check_gpg(config, line):
    """check-config's part for GnuPG stanzas: gpg_user, the keyrings (copied as the server
    copies them), the server's secret key and the signers' public keys in each."""
    stanzas = [stanza for stanza in config.stanzas if stanza.gpg is not None]
    if not stanzas:
        return
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        line(False, "GnuPG stanzas: cannot be checked without root")
        return
    try:
        config.start_gpg()
        line(True, "gpg runs as user %s on private copies of %d keyring(s)"
             % (config.gpg_user, len(config.gpg_copies)))
        for stanza in stanzas:
            problems = [p for p in [_gpg_key_problem(stanza.gpg, stanza.gpg_decrypt_id, True)] +
                        [_gpg_key_problem(stanza.gpg, fpr) for fpr in stanza.gpg_fingerprints]
                        if p]
            line(not problems, "[client %s]: GnuPG: %s" % (stanza.name, "; ".join(problems) if
                                                            problems else "its keyring has the "
                                                            "server's secret key and the signers'"))
    except (SpaError, Reject) as e:
        line(False, "GnuPG stanzas: %s" % e)
    finally:
        config.stop_gpg()


def _crypto_text(stanza):
    """How a stanza's packets are encrypted, for check-config."""
    aes = stanza.mode if stanza.key is not None else None
    gpg = None if stanza.gpg is None else "GnuPG, %s" % (
        "signed by %s" % ", ".join(stanza.gpg_fingerprints + stanza.gpg_remote_ids)
        if stanza.gpg_require_sig else "signature not required")
    return " and ".join(t for t in (aes, gpg) if t)


def _stanza_nat_lines(stanza):
    """check-config's lines on where a stanza's knocks must go and where NAT leads."""
    lines = []
    if stanza.destinations is not None:
        lines.append("knocks must be sent to %s" % ", ".join(map(str, stanza.destinations)))
    if stanza.force_nat is not None:
        family = _family(stanza.force_nat[0])
        lines.append("every request is forwarded to %s%s" % (
            format_endpoint(*stanza.force_nat), _mode_words(stanza.nat_mode(family))))
    elif stanza.nat_forward:
        lines.append("NAT access to other hosts: %s" % (", ".join(
            map(format_nat_destination, stanza.nat_destinations)) or
            "none (no nat_destinations)"))
    return lines


def _stanza_hook_lines(stanza):
    """check-config's line on a stanza's hooks (cmd_cycle_*), if it has them."""
    if not stanza.cmd_cycle_open:
        return []
    return ["hooks: cmd_cycle_open %s; cmd_cycle_close %s; as %s" % (
        " ".join(stanza.cmd_cycle_open), "NONE" if stanza.cmd_cycle_close is None else
        "%s, %s s later" % (" ".join(stanza.cmd_cycle_close), stanza.cmd_cycle_timer
                            or "the opening's timeout"), stanza.cmd_cycle_user)]


def check_config_main(args):
    """Validate a server config as far as it can be without running the server."""
    config = ServerConfig(args.config, args.access_conf)
    line = Checklist()
    print("%s: parsed; every key has a valid length; the file is private" % config.path)
    for interface in config.interfaces + config.optional_interfaces:
        optional = interface in config.optional_interfaces
        try:
            exists = interface == "any" or bool(socket.if_nametoindex(interface))
        except OSError:
            exists = False
        line(exists or optional, "interface %s%s%s" % (interface, " (optional)" if optional else "",
                                                       "" if exists else ": not there now"))
    print("  knocks over %s; protects %s (%s); packets must be within %d s of this clock"
          % (config.transports_text(), format_access(config.protect), config.protect_action,
             config.max_packet_age))
    if config.firewall != "none":
        if os.geteuid() != 0:
            line(False, "firewall %s: cannot be checked without root" % config.firewall)
        else:
            try:
                kind = detect_firewall() if config.firewall == "auto" else config.firewall
                run_command(["nft", "list", "tables"] if kind == "nft" else [kind + "-save"])
                line(True, "firewall %s works%s" % (kind, " (chosen by auto)"
                                                    if config.firewall == "auto" else ""))
                check_saved_firewall(config, line)
            except SpaError as e:
                line(False, str(e))
    directory = os.path.dirname(os.path.abspath(config.replay_cache))
    problem = check_private_dir(directory) if os.path.lexists(directory) else None
    line(problem is None, "replay cache %s%s" % (config.replay_cache, ": " + problem if problem
                                                 else "" if os.path.lexists(directory)
                                                 else " (its directory is made at start)"))
    print("  packets are read as user %s" % config.user)
    if config.user_note:
        print("  note  %s" % config.user_note)
    check_gpg(config, line)
    for stanza in config.stanzas:
        print("  [client %s]: from %s; opens %s for %d s (a client may ask for up to %d s); "
              "HMAC %s, %s%s%s" % (
                  stanza.name, "any address" if stanza.sources is None
                  else ", ".join(map(str, stanza.sources)), format_access(sorted(stanza.open_ports)),
                  stanza.fw_access_timeout, stanza.max_fw_timeout, stanza.hmac_type,
                  _crypto_text(stanza),
                  "; user must be " + stanza.require_username if stanza.require_username else "",
                  "; refuses 0.0.0.0" if stanza.require_source_address else ""))
        for text in _stanza_nat_lines(stanza) + _stanza_hook_lines(stanza):
            print("    " + text)
    for note in config.notes:
        print("  note  access.conf: %s" % note)
    print("verdict: %s" % ("ok" if not line.failures else "%d problem(s)" % len(line.failures)))
    return 1 if line.failures else 0


# ---------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------
#
# `spa.py client`: settings from the command line over a config section (spa.py's INI, or
# fwknop's ~/.fwknoprc read as fwknop reads it), one packet built (build_packet) and sent
# as one UDP datagram (or, -P, in a raw TCP segment or ICMP echo request, which need root,
# or an HTTP GET: send_knock); with --connect, a wait for the port and a relay of stdin and
# stdout (ssh's ProxyCommand).  The client trusts its user and config; it also runs on
# macOS, the BSDs and Windows, so it uses nothing Linux alone has (but -P tcpraw, whose raw
# TCP socket the BSDs and Windows refuse, as they refuse fwknop's).

CLIENT_OPTIONS = {"destination", "server_port", "access", "allow_ip", "source_ip", "fw_timeout",
                  "user", "key_base64", "hmac_key_base64", "hmac_digest_type", "encryption_mode",
                  "key", "hmac_key", "resolve_url", "nat_access", "nat_local", "nat_port",
                  "server_cmd", "ip_version", "digest_type", "source_port", "time_offset",
                  "user_agent", "key_file", "get_key", "get_hmac_key", "use_gpg",
                  "gpg_recipient", "gpg_signer", "gpg_home_dir", "gpg_signing_pw",
                  "gpg_signing_pw_base64", "gpg_no_signing_pw", "gpg_agent", "server_proto"}

# ~/.fwknoprc variable -> our option name; the values carry over as they are.
FWKNOPRC_NAMES = {
    "SPA_SERVER": "destination", "SPA_SERVER_PORT": "server_port", "ACCESS": "access",
    "FW_TIMEOUT": "fw_timeout", "SPOOF_USER": "user",
    "KEY_BASE64": "key_base64", "KEY": "key", "HMAC_KEY_BASE64": "hmac_key_base64",
    "HMAC_KEY": "hmac_key", "HMAC_DIGEST_TYPE": "hmac_digest_type",
    "ENCRYPTION_MODE": "encryption_mode", "RESOLVE_URL": "resolve_url",
    "NAT_ACCESS": "nat_access", "NAT_PORT": "nat_port", "DIGEST_TYPE": "digest_type",
    "SPA_SOURCE_PORT": "source_port", "TIME_OFFSET": "time_offset",
    "HTTP_USER_AGENT": "user_agent", "SPA_SERVER_PROTO": "server_proto", "KEY_FILE": "get_key", "HMAC_KEY_FILE": "get_hmac_key",
    "GPG_RECIPIENT": "gpg_recipient", "GPG_SIGNER": "gpg_signer",
    "GPG_HOMEDIR": "gpg_home_dir", "GPG_SIGNING_PW": "gpg_signing_pw",
    "GPG_SIGNING_PW_BASE64": "gpg_signing_pw_base64",
}
# fwknop's yes/no variables (to fwknop only Y, in either case, is yes) -> (option, its yes).
FWKNOPRC_FLAGS = {"NAT_LOCAL": ("nat_local", "yes"), "SERVER_RESOLVE_IPV4": ("ip_version", "4"),
                  "RESOLVE_IP_HTTPS": ("resolve", True), "RESOLVE_IP_HTTP": ("resolve", True),
                  "RESOLVE_HTTP_ONLY": ("resolve", True), "USE_GPG": ("use_gpg", "yes"),
                  "USE_GPG_AGENT": ("gpg_agent", "yes"),
                  "GPG_NO_SIGNING_PW": ("gpg_no_signing_pw", "yes")}
# Variables that change nothing spa.py's client does: it uses an HMAC whenever it has the
# key (as fwknop does, whatever USE_HMAC says), runs no wget and saves no command lines.
FWKNOPRC_HARMLESS = {"USE_HMAC", "VERBOSE", "WGET_CMD", "NO_SAVE_ARGS", "USE_WGET_USER_AGENT"}
# yes/no variables that ask with Y for what spa.py's client does not do.
FWKNOPRC_UNSUPPORTED_FLAGS = {"RAND_PORT", "NAT_RAND_PORT"}
# Every other variable fwknop knows, which spa.py's client does not do.
FWKNOPRC_UNSUPPORTED = {"GPG_EXE", "SPOOF_SOURCE_IP"}
# fwknop client options that spa.py's client does not have, and why.  Refused by name
# (refuse_fwknop_only_options): their values are never shown, some are keys.
FWKNOP_ONLY_OPTIONS = dict(
    [("--gpg-exe", "it runs the gpg on PATH")] +
    [(o, "it sends from its own address only") for o in ("-Q", "--spoof-source", "--spoof-src")] +
    [(o, "it knocks on one port") for o in ("-r", "--rand-port")] +
    [(o, "it knocks over HTTP straight to the server (-P http)") for o in (
        "-H", "--http-proxy")] +
    [(o, "-P icmp sends an echo request") for o in ("--icmp-type", "--icmp-code")] +
    [("--nat-rand-port", "give the port with --nat-port")] +
    [(o, "make keys with 'spa.py keygen'") for o in (
        "-k", "--key-gen", "-K", "--key-gen-file", "--key-len", "--hmac-key-len",
        "--save-rc-stanza", "--force-stanza")] +
    [(o, "it saves no command lines") for o in ("-l", "--last-cmd", "--show-last", "-E",
                                                 "--save-args-file")] +
    [(o, "print the packet with --test (-T)") for o in ("-B", "--save-packet", "-b",
                                                        "--save-packet-append")] +
    [("--stanza-list", "list the sections of the file yourself"),
     ("--fault-injection-tag", "it has no fault injection")])


def refuse_fwknop_only_options(argv):
    """A one-line error for a fwknop client option spa.py's client does not have (argparse
    would print the whole command line's rest, keys included), naming it but no value."""
    for word in argv:
        if word == "--":
            break
        name = word.split("=", 1)[0] if word.startswith("--") else word
        if name in FWKNOP_ONLY_OPTIONS:
            raise SpaError("fwknop's %s is not supported by spa.py's client (%s)"
                           % (name, FWKNOP_ONLY_OPTIONS[name]))


def login_name():
    """The user name a packet carries without -U: $SPOOF_USER (as for fwknop), else the
    login name as getpass.getuser() finds it ($LOGNAME, $USER, $LNAME, $USERNAME, which
    is Windows', then the password database), else fwknop's NO_USER."""
    for var in ("SPOOF_USER", "LOGNAME", "USER", "LNAME", "USERNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        import getpass
        return getpass.getuser()
    except (ImportError, KeyError, OSError):
        return "NO_USER"


class RcSection(object):
    """One [section] of a ~/.fwknoprc: our options, and what spa.py cannot honour in it."""

    def __init__(self, name):
        self.name, self.options, self.problems = name, {}, []


def read_fwknoprc(path, text):
    """fwknop's client rc file, read as fwknop reads it: {section name in lower case:
    RcSection}, [default] included.

    A line starting with '#' or ';' is a comment; `[name]` starts a section (names
    match in any case); `VARIABLE value` sets a variable (names are case-sensitive), the
    value ending at a blank, ';' or '#': `KEY my secret` is `my` to fwknop too.  What
    spa.py cannot honour is a problem of its section, which stops the client only when
    that section is used (client_settings), as fwknop reads only those.
    """
    sections, current = {}, None
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split(None, 1)
        if not words or line[0] in "#;":
            continue
        if words[0].startswith("[") and "]" in line:
            name = line.strip()[1:].partition("]")[0]
            current = sections.setdefault(name.lower(), RcSection(name))
            continue
        if current is None:
            continue                       # fwknop reads nothing before the first section
        var = _fwknop_variable(words[0])
        value = words[1] if len(words) > 1 else ""
        for end in " \t;#":
            value = value.split(end, 1)[0]
        where = "%s [%s]" % (path, current.name)
        if not _showable(var):
            current.problems.append("%s line %d is %s" % (where, number, NOT_SHOWN))
        elif not value:
            current.problems.append("%s line %d: %s has no value" % (where, number, var))
        elif var in FWKNOPRC_NAMES:
            current.options[FWKNOPRC_NAMES[var]] = value
        elif var in FWKNOPRC_FLAGS:
            option, yes = FWKNOPRC_FLAGS[var]
            if value.upper() == "Y":
                current.options[option] = "%s Y in %s" % (var, where) if yes is True else yes
        elif var == "ALLOW_IP":            # -a, or -s for "source", or -R for "resolve"
            for option in ("allow_ip", "source_ip", "allow"):
                current.options.pop(option, None)
            if value.lower() == "source":
                current.options["source_ip"] = "yes"
            elif value.lower() == "resolve":
                current.options["allow"] = "ALLOW_IP resolve in %s" % where
            else:
                current.options["allow_ip"] = value
        elif var in FWKNOPRC_HARMLESS or var in FWKNOPRC_UNSUPPORTED_FLAGS and value.upper() != "Y":
            pass
        elif var in FWKNOPRC_UNSUPPORTED or var in FWKNOPRC_UNSUPPORTED_FLAGS:
            current.problems.append("%s: %s is not supported by spa.py's client" % (where, var))
        else:
            current.problems.append("%s line %d: %s is not a variable fwknop knows"
                                    % (where, number, var))
    return sections


def is_fwknoprc(text):
    """fwknop's rc files say `NAME value`; ours say `name = value`."""
    import re
    return bool(re.search(r"^\s*[A-Z][A-Z0-9_]*:?[ \t]+[^=\s]", text, re.M))


def default_client_config():
    """The client's config file when -n names a section and -c names no file."""
    for path in ("~/.spa.conf", "~/.fwknoprc"):
        if os.path.exists(os.path.expanduser(path)):
            return path
    raise SpaError("-n/--name needs a config file: none of ~/.spa.conf, ~/.fwknoprc exists "
                   "(give one with -c FILE)")


def section_named(config, name, destinations):
    """The section `name`, else the one whose destination is `name`: ssh's %n is the host
    name as typed (`ssh web1.example.org`), which names the section [web1] by its
    destination.  `destinations` maps each section to its destination."""
    if name in destinations:
        return name
    matches = [section for section, destination in destinations.items()
               if section != "default" and (destination or "").strip().lower() == name.lower()]
    if len(matches) > 1:
        raise SpaError("%s: sections %s all have destination %s: name one with -n"
                       % (config, ", ".join("[%s]" % m for m in matches), name))
    if not matches:
        raise SpaError("%s has no section [%s], nor one whose destination is %s (it has: %s)"
                       % (config, name, name, ", ".join(destinations) or "none"))
    return matches[0]


def _allow_choice(options):
    """A config section's choice of the address to open for, or None."""
    allow = (options.get("allow_ip") or "").strip()
    if allow.lower() == "source":
        return ("source",)
    if allow.lower() == "resolve":
        return ("resolve", "allow_ip = resolve")
    if allow:
        return ("ip", allow)
    if parse_bool(options.get("source_ip") or "no", "source_ip"):
        return ("source",)
    if options.get("allow") or options.get("resolve"):
        return ("resolve", options.get("allow") or options["resolve"])
    return None


def _config_layers(args):
    """The option layers of the config section the command line names (-c, -n), [default]
    first: [{option: value}], none without a config file."""
    if args.no_rc_file and args.name and not args.config:
        raise SpaError("-n/--name needs a config file and --no-rc-file says to read none: "
                       "give -c FILE")
    config = args.config or (default_client_config() if args.name else None)
    if not config:
        return []
    path = os.path.expanduser(config)
    name = args.name or "default"
    text = read_private_text(path)
    if is_fwknoprc(text):
        sections = read_fwknoprc(path, text)
        used = name.lower()
        if used != "default" and used not in sections:
            used = section_named(config, name, {n: s.options.get("destination")
                                                for n, s in sections.items()})
        for layer in ("default", used):
            if layer in sections and sections[layer].problems:
                raise SpaError(sections[layer].problems[0])
        return [sections[n].options for n in ("default", used) if n in sections]
    parser = read_ini(path, text)
    if name != "default":
        name = section_named(config, name, {n: parser[n].get("destination")
                                             for n in parser.sections()})
    section = dict(parser[name] if name != "default" else parser.defaults())
    unknown = set(section) - CLIENT_OPTIONS
    if unknown:
        raise SpaError("%s: [%s]: unknown option %s" % (config, name, _shown_names(unknown)))
    return [section]


# Keys without a command line (fwknop's -G/--get-key, --get-hmac-key, --stdin, --fd, and
# spa.py's --key-file): each key comes from the first place that gives it, the command line
# before the section and the section before [default]; two ways in one place are an error.
# A key read from a file or a descriptor is never shown, nor is a line of it.

# A key file's variables (the key lines of a ~/.fwknoprc, as `fwknop -k` prints them).
KEY_FILE_VARIABLES = {"KEY_BASE64": "key_base64", "KEY": "key",
                      "HMAC_KEY_BASE64": "hmac_key_base64", "HMAC_KEY": "hmac_key"}
# Which keys each option gives: "key" (the encryption key), "hmac" (the HMAC key).
KEY_GIVERS = {"key_base64": ("key",), "key": ("key",), "get_key": ("key",),
              "hmac_key_base64": ("hmac",), "hmac_key": ("hmac",), "get_hmac_key": ("hmac",),
              "key_file": ("key", "hmac")}
# The options' names on the command line, for errors.
KEY_FLAGS = {"key_base64": "--key-base64", "key": "--key-rijndael", "get_key": "-G/--get-key",
             "hmac_key_base64": "--hmac-key-base64", "hmac_key": "--key-hmac",
             "get_hmac_key": "--get-hmac-key", "key_file": "--key-file", "stream": "--stdin/--fd"}
KEY_STREAM_LIMIT = 65536        # bytes read from --stdin or --fd at most


def _checked_key(option, value, where):
    """A key's value as a key file or stream gave it, checked as parse_keys() will check it:
    base64 that decodes to 1-32 bytes (HMAC: 1-128), or a passphrase of at most that many."""
    longest = 128 if option.startswith("hmac") else 32
    if option.endswith("_base64"):
        parse_key(value, where, 1, longest)
    elif len(value.encode()) > longest:
        raise SpaError("%s is longer than %d bytes" % (where, longest))
    return value


def read_key_lines(text, origin):
    """{option: value} for both keys from a key file's text: `KEY_BASE64: ...` and
    `HMAC_KEY_BASE64: ...` lines (or the passphrases KEY and HMAC_KEY), read as the same
    lines of a ~/.fwknoprc (a value ends at a blank, ';' or '#'); blank lines and comments
    ('#', ';') skipped; each key once; nothing else."""
    found, seen = {}, {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split(None, 1)
        if not words or words[0][0] in "#;":
            continue
        var = _fwknop_variable(words[0])
        where = "%s line %d" % (origin, number)
        if var not in KEY_FILE_VARIABLES:
            raise SpaError("%s: not a KEY_BASE64 or HMAC_KEY_BASE64 line (not shown: it may "
                           "hold a key)" % where)
        option = KEY_FILE_VARIABLES[var]
        kind = "hmac" if option.startswith("hmac") else "key"
        if kind in seen:
            raise SpaError("%s: %s gives the %s key again (line %d gave it)" % (
                where, var, "HMAC" if kind == "hmac" else "encryption", seen[kind]))
        value = words[1] if len(words) > 1 else ""
        for end in " \t;#":
            value = value.split(end, 1)[0]
        if not value:
            raise SpaError("%s: %s has no value" % (where, var))
        found[option], seen[kind] = _checked_key(option, value, "%s: %s" % (where, var)), number
    if "key" not in seen:
        raise SpaError("%s has no KEY_BASE64 line (nor KEY): no encryption key" % origin)
    if "hmac" not in seen:
        raise SpaError("%s has no HMAC_KEY_BASE64 line (nor HMAC_KEY): spa.py always uses "
                       "an HMAC" % origin)
    return found


def read_passphrase_file(path, destination, option):
    """fwknop's -G/--get-key (and --get-hmac-key) file: the passphrase of the last
    `HOST: passphrase` line whose HOST is the destination as given (-D), the way fwknop
    reads it: blanks and '=' before HOST and after the ':' skipped, the passphrase running
    to the end of its line (blanks kept; a CR before the newline dropped); lines starting
    with '#' or ';' are comments; other lines are skipped."""
    if not destination:
        raise SpaError("%s %s: the file holds a passphrase for each server: give the server "
                       "with -D HOST" % (KEY_FLAGS[option], path))
    text = read_private_text(os.path.expanduser(path))
    passphrase = None
    for line in text.split("\n"):
        line = line.lstrip(" \t=")
        if line[:1] in ("#", ";") or not line.startswith(destination + ":"):
            continue
        passphrase = line[len(destination) + 1:].lstrip(" \t=")
        if passphrase.endswith("\r"):
            passphrase = passphrase[:-1]
    if not passphrase:
        raise SpaError("%s has no `%s: passphrase` line (%s)" % (path, destination,
                                                                 KEY_FLAGS[option]))
    name = "key" if option == "get_key" else "hmac_key"
    return {name: _checked_key(name, passphrase, "%s: the passphrase for %s" % (path, destination))}


def _is_key_line(line):
    """Whether a stream's first line starts a key file: `KEY_BASE64`, `HMAC_KEY_BASE64`,
    `KEY:` or `HMAC_KEY:` (a passphrase such as `KEY lime` stays a passphrase)."""
    words = line.split(None, 1)
    return bool(words) and words[0] in ("KEY_BASE64", "KEY_BASE64:", "HMAC_KEY_BASE64",
                                        "HMAC_KEY_BASE64:", "KEY:", "HMAC_KEY:")


def read_key_stream(fd, origin):
    """Keys read from a file descriptor (--stdin: 0, --fd N): {option: value}.

    Its first line is the encryption passphrase, as fwknop's --stdin and --fd read it (one
    line, which gives the encryption key alone); unless that line starts a key file
    (_is_key_line): then the whole stream is one (read_key_lines) and gives both keys.  A
    regular file behind the descriptor must be private, as a key file must."""
    import stat
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise SpaError("%s: %s" % (origin, e.strerror))
    if stat.S_ISREG(st.st_mode):
        check_private_stat(st, origin, "run 'chmod 600' on the file given there")
    data = b""
    while len(data) <= KEY_STREAM_LIMIT:
        try:
            chunk = os.read(fd, 4096)
        except OSError as e:
            raise SpaError("cannot read %s: %s" % (origin, e.strerror))
        data += chunk
        if not chunk or b"\n" in data and not _is_key_line(data.split(b"\n", 1)[0].decode(
                "utf-8", "replace")):
            break
    if len(data) > KEY_STREAM_LIMIT:
        raise SpaError("%s gives more than %d bytes: not keys" % (origin, KEY_STREAM_LIMIT))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpaError("%s is not UTF-8 text (byte %d)" % (origin, e.start))
    first = text.split("\n", 1)[0]
    if _is_key_line(first):
        return read_key_lines(text, origin)
    passphrase = first[:-1] if first.endswith("\r") else first
    if not passphrase:
        raise SpaError("%s gives no key: its first line, the encryption passphrase, is empty"
                       % origin)
    return {"key": _checked_key("key", passphrase, "%s: the passphrase" % origin)}


def _key_kinds(option, value):
    """The keys an option gives: ("key",), ("hmac",) or both; the stream's as it read."""
    if option == "stream":
        return tuple(set(KEY_GIVERS[o][0] for o in value))
    return KEY_GIVERS[option]


def _keys_from(option, value, destination, loaded):
    """{key option: value} that `option` gives (`value`: a key, or a file's name); a key
    file is read once (`loaded`)."""
    if option == "stream":
        return value
    if option == "key_file":
        if value not in loaded:
            loaded[value] = read_key_lines(read_private_text(os.path.expanduser(value)), value)
        return loaded[value]
    if option in ("get_key", "get_hmac_key"):
        return read_passphrase_file(value, destination, option)
    return {option: value}


def choose_keys(places, destination):
    """{option: value} for the two keys: each from the first of `places` ((where, {option:
    value}, whether to name options as on the command line), the command line first) that
    gives it.  One place that gives a key two ways is an error; a key file is read only if
    it is used, a --get-key file only for the key it gives."""
    chosen, loaded = {}, {}
    for kind, name in (("key", "encryption key"), ("hmac", "HMAC key")):
        for where, given, flags in places:
            givers = sorted(o for o, v in given.items() if v and kind in _key_kinds(o, v))
            if len(givers) > 1:
                raise SpaError("%s gives the %s twice (%s): give it one way" % (
                    where, name, " and ".join(KEY_FLAGS[o] if flags else o for o in givers)))
            if givers:
                keys = _keys_from(givers[0], given[givers[0]], destination, loaded)
                chosen.update((o, v) for o, v in keys.items() if KEY_GIVERS[o] == (kind,))
                break
    return chosen


def _key_stream(args):
    """The keys --stdin or --fd N give, read at once ({} without either)."""
    fd = getattr(args, "fd", None)
    if not getattr(args, "stdin", False) and fd is None:
        return {}
    if args.stdin and fd is not None:
        raise SpaError("give --stdin or --fd N, not both")
    fd = 0 if args.stdin else parse_int(fd, "--fd", 0, 65535)
    if fd == 0 and getattr(args, "connect", None):
        raise SpaError("--connect relays stdin, so the keys cannot come from it: give them "
                       "with --fd N (e.g. --fd 3 3<FILE) or --key-file FILE")
    return read_key_stream(fd, "stdin" if fd == 0 else "file descriptor %d (--fd)" % fd)


def client_keys(args, layers, destination):
    """The client's two keys, {option: value}, from the command line (--key-base64 ...,
    --key-file, -G, --get-hmac-key, --stdin, --fd) before the config section's options
    before [default]'s (choose_keys)."""
    cli = dict((option, getattr(args, option, None)) for option in KEY_GIVERS)
    cli["stream"] = _key_stream(args)
    places = [("the command line", cli, True)]
    for n, layer in reversed(list(enumerate(layers))):
        where = "[default]" if n == 0 and len(layers) > 1 else "the config section"
        places.append((where, dict((o, layer.get(o)) for o in KEY_GIVERS), False))
    keys = choose_keys(places, destination)
    if cli["stream"] and not any(KEY_GIVERS[o] == ("hmac",) for o in keys):
        raise SpaError("no HMAC key: the first line of %s is the encryption passphrase "
                       "alone, as fwknop reads it; give the HMAC key another way (--key-hmac, "
                       "--get-hmac-key, the config), or give both keys there as KEY_BASE64 and "
                       "HMAC_KEY_BASE64 lines" % ("stdin" if args.stdin else "--fd"))
    return keys


def split_host_port(text, option="--connect"):
    """'host:22', '[2001:db8::1]:22' -> (host, 22)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535 or not host:
        raise SpaError("%s %r: expected HOST:PORT (an IPv6 address in brackets)" % (option, text))
    return host.strip("[]"), int(port)


def client_settings(args):
    """Merge the config section (spa.py's INI or fwknop's rc) with the command line, which wins.

    Which address the packet asks to open for is one choice: the command line's (-a,
    -s, -R), else the section's, else [default]'s (in a ~/.fwknoprc; as for fwknop,
    ALLOW_IP beats RESOLVE_IP_HTTPS within one); where none chose, a resolve URL means
    -R, as it does to fwknop, and nothing means the packet's source address.
    """
    layers = _config_layers(args)
    section = {}
    for layer in layers:
        section.update(layer)
    opts = {}
    for option in CLIENT_OPTIONS:
        value = getattr(args, option, None)
        if value is None:
            value = section.get(option)
        # A passphrase is taken as it is, blanks and all, as fwknop takes it.
        opts[option] = value.strip() if isinstance(value, str) and option not in (
            "key", "hmac_key", "gpg_signing_pw") else value
    if args.connect and not opts.get("destination"):
        opts["destination"] = split_host_port(args.connect)[0]
    for option in KEY_FILE_VARIABLES.values():
        opts[option] = None
    opts.update(client_keys(args, layers, opts.get("destination")))
    if args.time_offset_plus or args.time_offset_minus:
        opts["time_offset"] = ("+" + args.time_offset_plus if args.time_offset_plus
                               else "-" + args.time_offset_minus)
    cli = [c for c in (args.allow_ip and ("ip", args.allow_ip), args.source_ip and ("source",),
                       args.resolve_ip and ("resolve", "-R")) if c]
    if len(cli) > 1:
        raise SpaError("give only one of -a/--allow-ip, -s/--source-ip and -R/--resolve-ip-https")
    choices = cli + [c for c in map(_allow_choice, reversed(layers)) if c]
    if not choices and opts.get("resolve_url"):
        choices = [("resolve", "--resolve-url" if args.resolve_url else "resolve_url")]
    kind = choices[0] if choices else ("source",)
    opts["allow_ip"] = kind[1] if kind[0] == "ip" else None
    opts["source_ip"] = kind[0] == "source"
    opts["resolve"] = kind[1] if kind[0] == "resolve" else False
    return opts


def resolve_public_ip(url, timeout=10, origin="-R", user_agent=None):
    """Ask `url` (the user's choice; none is built in) which IPv4 address we come from.

    A redirect is followed only to https: an https URL that answered "go to http://..."
    would hand the choice of the address to whoever is on the path.
    """
    import re
    if not url:
        if origin == "-R":
            raise SpaError("-R needs a URL that answers with your public address: give "
                           "--resolve-url https://... (spa.py has none built in)")
        raise SpaError("%s asks to open for the public address a URL reports, and spa.py has "
                       "none built in: add RESOLVE_URL https://... to that section (resolve_url "
                       "= https://... in spa.py's INI) or give --resolve-url https://... (or -s: "
                       "the address the packet comes from; -a ADDRESS: another)" % origin)
    import urllib.request
    if not url.startswith("https://"):
        print("spa.py client: warning: %s is not https: whoever is on the path can choose the "
              "address the port opens for" % url, file=sys.stderr)

    class HttpsOnly(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if req.full_url.startswith("https://") and not newurl.startswith("https://"):
                raise SpaError("%s redirected to %s: refused, only https is followed"
                               % (req.full_url, newurl[:200]))
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.build_opener(HttpsOnly)
    request = urllib.request.Request(url, headers={"User-Agent": user_agent or
                                                   "spa.py/" + VERSION})
    try:
        with opener.open(request, timeout=timeout) as answer:
            body = answer.read(4096).decode("ascii", "replace")
    except (OSError, ValueError) as e:
        raise SpaError("cannot resolve the public address with %s: %s" % (url, e))
    for candidate in re.findall(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])", body):
        if _is_ipv4(candidate):
            return candidate
    raise SpaError("%s did not answer with an IPv4 address" % url)


TIME_UNITS = {"": 1, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1, "m": 60, "min": 60,
              "mins": 60, "minute": 60, "minutes": 60, "h": 3600, "hour": 3600, "hours": 3600,
              "d": 86400, "day": 86400, "days": 86400}


def parse_time_offset(text):
    """fwknop's time offset ('60', '90sec', '5min', '-2hours', '1day') in seconds."""
    text = (text or "").strip()
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    number = "".join(c for c in digits[:6] if c in _DIGITS)
    unit = digits[len(number):].strip().lower()
    if not text:
        return 0
    if not number or int(number) > 65536 or unit not in TIME_UNITS:
        raise SpaError("time offset %r: expected a number of seconds, or of min, hours or days "
                       "(e.g. 90sec, 5min, 2hours)" % text)
    return sign * int(number) * TIME_UNITS[unit]


def _name_arg(host):
    """A host for getaddrinfo(): ASCII as bytes, which spares loading the idna codec."""
    try:
        return host.encode("ascii")
    except UnicodeEncodeError:
        return host


IP_VERSIONS = {None: 0, "": 0, "4": socket.AF_INET, "6": socket.AF_INET6}


def addresses(host, port, kind, version=None):
    """getaddrinfo() for `host`, IPv4 first: fwknop's client knocks over IPv4 only and
    fwknopd listens on IPv4, so a name with both kinds of address is knocked over IPv4
    unless -6 (version "6") says otherwise; -4 or -6 leave out the other kind."""
    version = str(version or "").strip()
    if version not in IP_VERSIONS:
        raise SpaError("ip_version = %r: expected 4 or 6" % version)
    try:
        infos = socket.getaddrinfo(_name_arg(host), port, IP_VERSIONS[version], kind)
    except socket.gaierror as e:
        raise SpaError("cannot resolve %s%s: %s" % (
            host, " to an IPv%s address (-%s)" % (version, version) if version else "",
            e.strerror))
    return sorted(infos, key=lambda info: info[0] != socket.AF_INET)


def resolve_address(host, version=None):
    """An address for a name: a spa.py server resolves no names in NAT requests."""
    return addresses(host, None, socket.SOCK_DGRAM, version)[0][4][0]


def nat_request(opts, access, timeout):
    """(message type, NAT field, access) for -N/--nat-access and --nat-local, as fwknop
    builds them: -N HOST[:PORT] forwards the -A port to HOST:PORT (the -A port if none);
    --nat-local forwards the --nat-port (or the -A port) to the -A port on the server."""
    nat_local = opts.get("nat_local")
    if isinstance(nat_local, str):
        nat_local = parse_bool(nat_local, "nat_local")
    nat_access, nat_port = opts.get("nat_access"), opts.get("nat_port")
    if not nat_access and not nat_local:
        if nat_port:
            raise SpaError("--nat-port goes with --nat-local")
        return (MSG_TIMEOUT_ACCESS if timeout else MSG_ACCESS), None, access
    if nat_access and nat_local:
        raise SpaError("give -N/--nat-access or --nat-local, not both")
    if len(access) != 1:
        raise SpaError("NAT access takes one port in -A, not %d" % len(access))
    proto, port = access[0]
    version = opts.get("ip_version")
    if nat_local:
        host = resolve_address(opts["destination"], version)
        if nat_port:
            access = [(proto, parse_int(str(nat_port), "nat_port", 1, 65535))]
        field = "%s,%d" % (host, port)
        return (MSG_TIMEOUT_LOCAL_NAT if timeout else MSG_LOCAL_NAT), field, access
    if nat_access.startswith("[") or nat_access.count(":") == 1:
        host, to_port = split_host_port(nat_access, "-N/--nat-access")
    else:
        host, to_port = nat_access, port          # a name or address without a port
    field = "%s,%d" % (resolve_address(host, version), to_port)
    return (MSG_TIMEOUT_NAT if timeout else MSG_NAT), field, access


def _signing_passphrase(opts):
    """The passphrase of the GnuPG signing key: the section's gpg_signing_pw (or its
    _base64), else asked for on the terminal; never from the command line."""
    if opts.get("gpg_signing_pw"):
        return opts["gpg_signing_pw"].encode()
    if opts.get("gpg_signing_pw_base64"):
        return parse_key(opts["gpg_signing_pw_base64"], "gpg_signing_pw_base64", 1, 1024)
    if not sys.stdin.isatty():
        raise SpaError("the GnuPG signing key's passphrase: put gpg_signing_pw in the config "
                       "section (mode 0600), or use --gpg-agent or --gpg-no-signing-pw")
    import getpass
    # Kept for a second knock (--connect knocks again halfway): asked for once.
    opts["gpg_signing_pw"] = getpass.getpass("passphrase of GnuPG key %s: " % opts["gpg_signer"])
    return opts["gpg_signing_pw"].encode()


def client_gpg(opts):
    """The GnuPG that makes a GnuPG packet (-g, --gpg-recipient), or None for AES."""
    yes = lambda option: parse_bool(opts.get(option) or "no", option)
    if not (yes("use_gpg") or opts.get("gpg_recipient")):
        return None
    if not opts.get("gpg_recipient"):
        raise SpaError("GnuPG mode needs the server's key: give --gpg-recipient KEY")
    home = opts.get("gpg_home_dir")
    gpg = GnuPG(os.path.expanduser(home) if home else None, agent=yes("gpg_agent"))
    gpg.recipient, gpg.signer = opts["gpg_recipient"], opts.get("gpg_signer")
    if gpg.signer and not gpg.agent and not yes("gpg_no_signing_pw"):
        gpg.passphrase = _signing_passphrase(opts)
    return gpg


def build_packet(opts, now=None):
    """Validate the client's settings and build (Message, wire text) for them."""
    get = lambda option: opts.get(option) or ""
    where = "client"
    gpg = client_gpg(opts)
    key, hmac_key, hmac_type, mode = parse_keys(get, where, gpg is not None)
    if not opts.get("destination"):
        raise SpaError("no destination: give -D HOST or destination = HOST in the config section")
    if not opts.get("access") and not opts.get("server_cmd"):
        raise SpaError("no ports to open: give -A tcp/22 or access = tcp/22")
    try:
        access = parse_access(opts["access"]) if opts.get("access") else []
    except ValueError as e:
        raise SpaError(str(e))
    if opts.get("resolve"):
        allow_ip = resolve_public_ip(opts.get("resolve_url"), origin=opts["resolve"],
                                     user_agent=opts.get("user_agent"))
    else:
        allow_ip = opts.get("allow_ip") or "0.0.0.0"
    if not _is_ipv4(allow_ip):
        raise SpaError("allow IP %r: fwknop's format carries only an IPv4 address; "
                       "leave it out (-s) to open for the address the packet comes from" % allow_ip)
    timeout = parse_int(str(opts.get("fw_timeout") or 0), "fw_timeout", 0, 65535)
    msg_type, nat_access, access = nat_request(opts, access, timeout)
    command = opts.get("server_cmd")
    if command:
        if nat_access:
            raise SpaError("a command message cannot also ask for NAT access")
        msg_type, access = MSG_COMMAND, []
    user = opts.get("user") or login_name()
    if not _valid_username(user) or len(user.encode()) > 48:
        raise SpaError("user %r: up to 48 characters, without any of %s (give one with -U)"
                       % (user, "".join(sorted(USERNAME_FORBIDDEN))))
    digest = parse_hmac_type(opts.get("digest_type") or "sha256", "digest_type")
    stamp = int(time.time() if now is None else now) + parse_time_offset(opts.get("time_offset"))
    msg = Message(user, allow_ip, access, timeout, msg_type=msg_type, nat_access=nat_access,
                  timestamp=stamp, command=command, digest_type=digest)
    if gpg is not None:
        wire = gpg_seal(msg.encode(), gpg, hmac_key, hmac_type)
        if len(wire) > MAX_GPG_WIRE_LEN:
            raise SpaError("the packet would be %d characters; fwknop servers accept at most %d: "
                           "use GnuPG keys of 2048 or 3072 bits" % (len(wire), MAX_GPG_WIRE_LEN))
        return msg, wire
    wire = seal(msg.encode(), key, hmac_key, hmac_type, mode)
    if len(wire) > MAX_WIRE_LEN:
        raise SpaError("the packet would be %d characters; fwknop servers accept at most %d: "
                       "ask for fewer ports" % (len(wire), MAX_WIRE_LEN))
    return msg, wire


def send_packet(wire, host, port, version=None, source_port=None):
    """Send the packet as one UDP datagram to the first of `host`'s addresses (IPv4 first).

    Returns (the address knocked, the addresses of the other family) for -v."""
    infos = addresses(host, port, socket.SOCK_DGRAM, version)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        try:
            if source_port:
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", source_port))
            sock.sendto(wire, address)
        except OSError as e:
            raise SpaError("cannot send to %s port %d: %s" % (address[0], port, e.strerror))
    others = sorted(set(i[4][0] for i in infos if i[0] != family))
    return address[0], others


SERVER_PROTOS = ("udp", "tcpraw", "icmp", "http")     # -P: fwknop's names for the transports


def inet_checksum(data):
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _raw_segment(proto, wire, family, source, destination, port, source_port):
    """A TCP segment (SYN carrying the knock, as fwknop's tcpraw sends it) or an ICMP
    echo request carrying it, checksum filled in (ICMPv6's the kernel fills in)."""
    import random
    if proto == "icmp":
        kind = 8 if family == socket.AF_INET else 128
        head = struct.pack("!BBHHH", kind, 0, 0, random.randrange(1 << 16), 1)
        if family == socket.AF_INET:
            head = head[:2] + struct.pack("!H", inet_checksum(head + wire)) + head[4:]
        return head + wire
    head = struct.pack("!HHIIBBHHH", source_port or random.randrange(32768, 61000), port,
                       random.randrange(1 << 32), 0, 5 << 4, 0x02, 64240, 0, 0)
    segment = head + wire
    packed = socket.inet_pton(family, source) + socket.inet_pton(family, destination)
    pseudo = packed + (struct.pack("!BBH", 0, 6, len(segment)) if family == socket.AF_INET
                       else struct.pack("!IxxxB", len(segment), 6))
    return head[:16] + struct.pack("!H", inet_checksum(pseudo + segment)) + head[18:] + wire


def send_raw(proto, wire, info, port, source_port=None):
    """Send the knock in one raw TCP segment (tcpraw) or ICMP echo request (icmp) to the
    address in getaddrinfo() entry `info`: root only, as with fwknop."""
    family, address = info[0], info[4]
    number = 6 if proto == "tcpraw" else (1 if family == socket.AF_INET else 58)
    with socket.socket(family, socket.SOCK_DGRAM) as probe:     # our address on that route
        probe.connect(address)
        source = probe.getsockname()[0]
    try:
        sock = socket.socket(family, socket.SOCK_RAW, number)
    except PermissionError:
        raise SpaError("-P %s sends a raw packet: run the client as root (as with fwknop), "
                       "or knock over udp or http" % proto)
    with sock:
        segment = _raw_segment("icmp" if proto == "icmp" else "tcp", wire, family,
                               source.split("%")[0], address[0].split("%")[0], port, source_port)
        sock.sendto(segment, (address[0], 0) + tuple(address[2:]))


def http_request(wire, host, user_agent=None):
    """fwknop's HTTP knock: a GET whose path is the knock, '+' as '-' and '/' as '_' (the
    Host header as fwknop writes it, an IPv6 address in brackets as HTTP wants it)."""
    path = wire.translate(bytes.maketrans(b"+/", b"-_")).decode("ascii")
    host = "[%s]" % host if ":" in host and not host.startswith("[") else host
    return ("GET /%s HTTP/1.1\r\nUser-Agent: %s\r\nAccept: */*\r\nHost: %s\r\n"
            "Connection: close\r\n\r\n" % (path, user_agent or "Fwknop/spa.py-" + VERSION,
                                             host)).encode("ascii")


def send_knock(wire, host, port, version=None, source_port=None, proto="udp", user_agent=None):
    """Send the knock over `proto` (SERVER_PROTOS) to the first of `host`'s addresses
    (IPv4 first): one UDP datagram, one raw TCP segment, one ICMP echo request, or an
    HTTP GET to the web server on `port`.  Returns (the address knocked, the addresses of
    the other family) for -v."""
    if proto == "udp":
        return send_packet(wire, host, port, version, source_port)
    infos = addresses(host, port, socket.SOCK_STREAM, version)
    info = infos[0]
    try:
        if proto == "http":
            with socket.create_connection(info[4][:2], timeout=10) as sock:
                sock.sendall(http_request(wire, host, user_agent))
        else:
            send_raw(proto, wire, info, port, source_port)
    except OSError as e:
        raise SpaError("cannot send to %s port %d (-P %s): %s" % (
            info[4][0], port, proto, e.strerror or e))
    return info[4][0], sorted(set(i[4][0] for i in infos if i[0] != info[0]))


REPEAT_GAP = 0.02          # seconds between the copies of --repeat


def send_copies(wire, host, port, version=None, source_port=None, copies=1, proto="udp",
                user_agent=None):
    """send_knock() `copies` times, REPEAT_GAP apart: a server that drops packets under
    a flood (README.md, Performance) loses each copy independently; it acts on the first
    that arrives and refuses the others as replays."""
    for i in range(copies):
        if i:
            time.sleep(REPEAT_GAP)
        sent = send_knock(wire, host, port, version, source_port, proto, user_agent)
    return sent


# --connect: one connection attempt at a time (a fresh SYN each), the next as soon as one is
# refused; one that goes unanswered for 0.25 s is given up.  A fresh knock when nothing
# connected for 0.05 s, then 0.1, 0.2 s..., at most once a second, and never while an
# attempt is under way (it could still use the opening: the new one would be left over).
# Not before 2 s after the last attempt that went unanswered (dropped: a single-use opening
# in its grace period, where a NAT changed the source port): that opening is there and ours
# to take once its grace period ends, and a knock still on its way when we take it would
# make an opening that nobody uses (a neighbour's to take until its timeout).  Where every
# attempt goes unanswered (protect_action = drop, a lost knock), every 4 s.
CONNECT_REKNOCK, CONNECT_UNANSWERED, CONNECT_REKNOCK_DROPPED = (0.05, 1.0), 0.25, 2.0


def _connect_attempt(info, sport=None):
    """A non-blocking connect to one of addresses()' entries, from source port `sport` if
    given: (socket, None), or (None, the error) if it failed at once."""
    import errno
    family, kind, proto, _, address = info
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        if sport:
            if os.name != "nt":     # on Windows, SO_REUSEADDR would take the port from another
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", sport))
        err = sock.connect_ex(address)
    except OSError as e:
        err = e.errno or errno.EINVAL
    if err in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, 10035):  # 10035: Windows
        return sock, None
    sock.close()
    return None, OSError(err, os.strerror(err))


def _connected(sock, timeout):
    """Wait up to `timeout` for a connect under way: True (connected), False (still under
    way), or the error that ended it."""
    import select
    _, writable, failed = select.select([], [sock], [sock], timeout)
    if not writable and not failed:
        return False
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return OSError(err, os.strerror(err)) if err or failed else True


def connect_when_open(host, port, knock, wait=10.0, version=None, prefer=None, asked=None,
                      sport=None):
    """Connect to host:port as soon as the knock has opened it, knocking again while it
    has not: an opening that admits one connection (single_use) may have been taken by
    someone behind the same NAT, and a fresh knock makes a fresh one.  `knock()` knocks
    and returns its connect_port(); `sport`, the first knock's: the attempts come from it
    (a single-use opening admits only that port at first), or from any port if it is
    taken here.

    Tries the addresses of the family `prefer` (the knock's), all of them after half the
    wait.  Returns the connected socket, or raises SpaError naming what to check.  `asked`
    is the access list the knock asked for: a port not in it is named as the likely cause.
    """
    import errno
    infos = addresses(host, port, socket.SOCK_STREAM, version)
    preferred = [info for info in infos if info[0] == prefer] or infos
    start = knocked = time.monotonic()
    gap, last, turn, sock = CONNECT_REKNOCK[0], None, 0, None
    unanswered = float("-inf")      # when the last attempt that went unanswered began
    try:
        while time.monotonic() - start < wait:
            now = time.monotonic()
            if sock is None:
                if now - knocked >= gap and (now - unanswered >= CONNECT_REKNOCK_DROPPED or
                                             now - knocked >= 2 * CONNECT_REKNOCK_DROPPED):
                    sport = knock()
                    knocked, gap = now, min(gap * 2, CONNECT_REKNOCK[1])
                candidates = preferred if now - start < wait / 2 else infos
                sock, last = _connect_attempt(candidates[turn % len(candidates)], sport)
                turn += 1
                began = now
                if sock is None:
                    if last.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, 10048):
                        sport = None        # the port is taken here: any port instead
                    time.sleep(0.001)
                    continue
            done = _connected(sock, max(0.0, min(CONNECT_UNANSWERED - (now - began),
                                                 wait - (now - start))))
            if done is True:
                sock.setblocking(True)
                sock, connected = None, sock
                return connected
            if done is not False or time.monotonic() - began >= CONNECT_UNANSWERED:
                last = done or last
                unanswered = began if done is False else unanswered
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()
    why = getattr(last, "strerror", None) or last or "no answer"
    if asked is not None and ("tcp", port) not in asked:
        raise SpaError("%s port %d did not open within %.0f s (%s): tcp/%d was not among the "
                       "ports the knock asked for (%s): add it to -A or the section's access"
                       % (host, port, wait, why, port, format_access(asked) or "none"))
    raise SpaError("%s port %d did not open within %.0f s (%s): check the server's log "
                   "(spa.py server -v says why it refused a packet) and the clocks"
                   % (host, port, wait, why))


def _to_output(sock, fd_out):
    """Copy what the socket has to fd_out; False when the connection or the output ended."""
    try:
        data = sock.recv(65536)
    except OSError as e:
        raise SpaError("the connection was broken off: %s" % (e.strerror or e))
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd_out, view):]
    except OSError:
        return False                # whoever read our output (ssh) is gone
    return bool(data)


def _to_socket(sock, fd_in):
    """Copy what fd_in has to the socket; False at the end of the input."""
    try:
        data = os.read(fd_in, 65536)
    except OSError:
        data = b""
    try:
        if data:
            sock.sendall(data)
        else:
            sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        if data:
            raise SpaError("the connection was broken off: %s" % (e.strerror or e))
        # Too late to say we are done: reading the socket tells what became of it.
    return bool(data)


def _relay_with_a_thread(sock, fd_in, fd_out):
    """relay() where select() cannot wait for stdin: a thread copies stdin to the socket."""
    import threading
    try:
        import msvcrt               # Windows: no newline translation on the pipes
        for fd in (fd_in, fd_out):
            msvcrt.setmode(fd, os.O_BINARY)
    except (ImportError, OSError):
        pass
    failed = []

    def forward():
        try:
            while _to_socket(sock, fd_in):
                pass
        except SpaError as e:
            failed.append(e)
            try:
                sock.shutdown(socket.SHUT_RDWR)     # wakes the reading side
            except OSError:
                pass
    threading.Thread(target=forward, daemon=True).start()
    while _to_output(sock, fd_out):
        pass
    if failed:
        raise failed[0]


def relay(sock, fd_in=0, fd_out=1):
    """Copy stdin to the socket and the socket to stdout until both sides are done (like nc).

    With select() where it takes stdin; on Windows, where it takes only sockets, with a
    thread for stdin.  A connection the other side breaks off (a reset) is a one-line
    SpaError; a reader of our output that went away (ssh closed) ends the relay quietly.
    """
    import select
    try:
        select.select([fd_in], [], [], 0)
    except (OSError, ValueError):
        return _relay_with_a_thread(sock, fd_in, fd_out)
    inputs = [fd_in, sock]
    while sock in inputs:
        for ready in select.select(inputs, [], [])[0]:
            if ready is sock:
                if not _to_output(sock, fd_out):
                    return
            elif not _to_socket(sock, fd_in):
                inputs.remove(fd_in)


def _under_home(path):
    """Whether `path` lies in the user's home folder (on Windows, the profile, which only
    its user and the administrators may read unless someone changed that)."""
    home = os.path.normcase(os.path.abspath(os.path.expanduser("~")))
    return os.path.normcase(os.path.abspath(path)).startswith(home.rstrip(os.sep) + os.sep)


def client_main(args):
    """`spa.py client`: build the packet and send it (or print it, --test); with
    --connect, connect as soon as the port opens (knocking again while it has not: a
    single-use opening may have been taken) and relay stdin and stdout to it."""
    opts = client_settings(args)
    proto = (opts.get("server_proto") or "udp").lower()
    if proto not in SERVER_PROTOS:
        raise SpaError("-P/--server-proto (SPA_SERVER_PROTO) %s: expected %s (spa.py's client "
                       "has no tcp or udpraw)" % (proto, ", ".join(SERVER_PROTOS)))
    connect = split_host_port(args.connect) if args.connect else None
    port = parse_int(str(opts.get("server_port") or (
        DEFAULT_HTTP_PORT if proto == "http" else DEFAULT_PORT)), "server_port", 1, 65535)
    source_port = parse_int(str(opts["source_port"]), "source_port", 1, 65535) \
        if opts.get("source_port") else None
    version = opts.get("ip_version")
    if not 1 <= args.repeat <= 100:
        raise SpaError("--repeat %d: send the packet 1 to 100 times" % args.repeat)
    knocked = []

    asked = []          # the ports the knock asks for, which --connect should be among

    def knock():
        """Send a fresh packet; returns the source port --connect is to use after it."""
        msg, wire = build_packet(opts)
        asked[:] = msg.access
        if args.verbose:
            print(msg.describe(), file=sys.stderr)
        if args.test:
            print(wire.decode())
            return None
        address, others = send_copies(wire, opts["destination"], port, version, source_port,
                                      args.repeat, proto, opts.get("user_agent"))
        knocked.append(address)
        if args.verbose:
            print("sent %d bytes to %s %s/%d%s%s" % (
                len(wire), address, proto, port, " %d times" % args.repeat if args.repeat > 1
                else "", (
                " (%s also has %s: -6 knocks there; IPv4 goes first, as with fwknop)"
                % (opts["destination"], ", ".join(others))) if others else ""), file=sys.stderr)
        return connect_port(msg.rand)

    for path in UNCHECKED_FILES:
        if args.verbose or not _under_home(path):
            print("spa.py client: note: this system has no POSIX file modes: spa.py cannot "
                  "check who may read %s, which holds keys; keep it where only you can read "
                  "it" % path, file=sys.stderr)
    sport = knock()
    if connect and not args.test:
        prefer = _socket_family(knocked[0]) if knocked else None
        with connect_when_open(connect[0], connect[1], knock, args.connect_wait,
                               version=version, prefer=prefer, asked=asked,
                               sport=sport) as sock:
            if args.verbose:
                print("connected to %s port %d" % sock.getpeername()[:2], file=sys.stderr)
            relay(sock)
    return 0


# ---------------------------------------------------------------------------
# keygen
# ---------------------------------------------------------------------------
#
# Fresh keys, as `fwknop --key-gen` makes them, and the sections that use them: printed,
# or put straight into the server's config (--server-config), which must still load
# afterwards or is left as it was.

# HMAC key length that `fwknop --key-gen` makes for each type.
HMAC_KEY_BYTES = {"md5": 16, "sha1": 20, "sha256": 64, "sha384": 128,
                  "sha512": 128, "sha3_256": 64, "sha3_512": 128}

# What `keygen --server-config` writes when the server config is missing: spa.conf.example,
# word for word (a test holds them equal), with the keygen's ports in `protect`.
SERVER_CONFIG_TEMPLATE = """\
# spa.py server configuration: /etc/spa/spa.conf, mode 0600 (it holds keys: the server
# refuses a key file that group or others can read).  Add a client, a key pair, with
#     spa.py keygen -n laptop -D server.example.org -A tcp/22 --server-config /etc/spa/spa.conf
# which writes this file when it is missing, then adds (or replaces) its [client laptop].
# Every option is described in README.md under "Configuration reference".

[server]
# Interfaces to capture knocks on: a list (eth0, wg0) or "any".
interface = any
# UDP port the knocks are sent to (fwknop's default).  Nothing listens on it.
port = 62201
# Firewall back end: nft, iptables, iptables-nft, iptables-legacy, or auto (nft unless the
# host keeps its rules in iptables).  "none": no firewall, the stanzas' hooks do the work.
firewall = nft
# Ports kept dark until a knock opens them for one address.
protect = tcp/22
# reject: answer like a port with no service (TCP reset, ICMP port unreachable).
# drop:   stay silent, for hosts whose policy drops everything.
protect_action = reject
# Seconds a packet's timestamp may differ from the server's clock.
max_packet_age = 120
# Digests of every authenticated packet, so none can be replayed, even after a restart.
replay_cache = /var/lib/spa/replay.cache
# stderr (for systemd's journal) or syslog (identity "spa").
log = stderr
# The unprivileged user that reads and parses packets.  Default: its own system user, spa
# (setup.sh and `spa.py install` create it); without it, nobody, with a warning.
# user = spa
# Interfaces that may come and go (a PPPoE link): captured whenever they are there.
# optional_interface = ppp0
# fwknopd's access.conf, to load its stanzas too.
# access_conf = /etc/fwknop/access.conf
# The host's saved firewall, which must hold spa.py's protection so that a firewall reload
# or a boot never leaves the ports open (spa.py firewall-config --write puts it there):
# auto (the distribution's place), none, or the file(s): nft: the ruleset file
# (/etc/nftables.conf); iptables: the IPv4 and IPv6 rules files.
# saved_firewall = auto
# nft: the file firewall-config writes spa.py's table to, which that ruleset includes.
# nft_include = /etc/spa/spa.nft
# yes: an opening holds only on the interface its knock came in on (interface must name
# the interfaces, not "any").
# bind_interface = no

# One [client NAME] section per key pair, as spa.py keygen writes them.  The first one
# whose source matches and whose keys authenticate the packet decides.  Besides the keys:
#   source = any                   where the knock may come from: any, or addresses and networks
#   open_ports = tcp/22            ports it may open; each requested port must be listed
#   fw_access_timeout = 30         seconds a port stays open
#   max_fw_timeout = 300           the most a client may ask for (spa.py client -f)
#   require_username = alice       the username the packet must carry
#   require_source_address = no    yes: refuse packets that ask to open "for whoever sent this"
#   max_openings = 1000            openings it may hold at once (each costs the kernel a little memory)
#   single_use = yes               each knock admits one connection (README.md: Close the
#                                  NAT-piggybacking window): for spa.py client --connect
#   nat_destinations = 10.0.0.7:22, 10.0.1.0/24:8000-8099, [2001:db8::7]:22
#                                  with enable_nat = yes and [server] enable_forwarding = yes:
#                                  the only hosts and ports a knock may forward to (none if absent)
"""


def keygen_keys(hmac_type="sha256"):
    """Fresh random keys, base64, as `fwknop --key-gen` makes them."""
    return (base64.b64encode(os.urandom(32)).decode(),
            base64.b64encode(os.urandom(HMAC_KEY_BYTES[hmac_type])).decode())


def gpg_fingerprint(gpg, key):
    """The fingerprint of the one key of gpg's keyring that `key` (an ID, a fingerprint or
    a user ID) names; SpaError if none or more than one."""
    code, out, _ = gpg.run(["--with-colons", "--list-keys", "--", key], b"")
    lines = out.decode("utf-8", "replace").splitlines()
    fprs = [lines[i + 1].split(":")[9] for i, line in enumerate(lines[:-1])
            if line.startswith("pub:") and lines[i + 1].startswith("fpr:")]
    if code != 0 or len(fprs) != 1:
        raise SpaError("GnuPG key %r: %s in keyring %s" % (
            key, "%d keys match" % len(fprs) if fprs else "no such key", gpg.home or "~/.gnupg"))
    return fprs[0].upper()


def keygen_gpg(recipient, signer, home):
    """(server's fingerprint, client's fingerprint) for keygen's GnuPG sections, looked up
    in the keyring `home`, and the server's key tried: fwknop's format needs its "hQ"."""
    gpg = GnuPG(os.path.expanduser(home) if home else None)
    fprs = gpg_fingerprint(gpg, recipient), gpg_fingerprint(gpg, signer)
    gpg.recipient = fprs[0]
    gpg_seal(b"a trial", gpg, b"h", "sha256")
    return fprs


def server_stanza(name, keys, hmac_type, access, gpg=None):
    """The [client NAME] stanza keygen writes into the server's config; with `gpg` (the
    fingerprints of the server's key and the client's), a GnuPG stanza."""
    secret = "key_base64 = %s\n" % keys[0] if gpg is None else ""
    text = ("[client {name}]\nsource = any\nopen_ports = {access}\n{secret}"
            "hmac_key_base64 = {hkey}\nhmac_digest_type = {htype}\n").format(
                name=name, access=access, secret=secret, hkey=keys[1], htype=hmac_type)
    if gpg is not None:
        text += ("# GnuPG: the server's key decrypts (in root's ~/.gnupg unless gpg_home_dir says"
                 "\n# otherwise); the client's key must sign.  A key with a passphrase: give\n"
                 "# gpg_decrypt_pw = PASSPHRASE instead of gpg_allow_no_pw.\n"
                 "gpg_decrypt_id = %s\ngpg_allow_no_pw = yes\ngpg_fingerprint_id = %s\n" % gpg)
    return text + ("# yes: each knock admits one connection, so no one behind the same NAT can\n"
                   "# use it; for clients that connect with spa.py client --connect (ssh's\n"
                   "# ProxyCommand).  Leave it off for fwknop clients and for several\n"
                   "# connections a knock.\n# single_use = yes\n")


def client_section(name, keys, hmac_type, access, destination=None, gpg=None):
    """The client's section; without a destination, a line that says how to give one (a
    made-up host would only fail later, with `cannot resolve`); with `gpg`, GnuPG's."""
    where = "destination = %s" % destination if destination else \
        "# destination = the server's name or address (or give it with spa.py client -D)"
    secret = "key_base64 = %s\n" % keys[0] if gpg is None else ""
    text = ("# On the client, in ~/.spa.conf (mode 0600), then: spa.py client -n {name}\n"
            "[{name}]\n{where}\naccess = {access}\n{secret}"
            "hmac_key_base64 = {hkey}\nhmac_digest_type = {htype}\n").format(
                name=name, where=where, access=access, secret=secret, hkey=keys[1],
                htype=hmac_type)
    if gpg is not None:
        text += ("gpg_recipient = %s\ngpg_signer = %s\n# gpg_home_dir = ~/.gnupg\n"
                 "# gpg_signing_pw = the signing key's passphrase (else: asked for, or "
                 "--gpg-agent)\n" % gpg)
    return text


def keygen_text(hmac_type="sha256", name="myhost", destination=None, access="tcp/22", gpg=None):
    """keygen's whole output: the keys as fwknop prints them, then both sections."""
    keys = keygen_keys(hmac_type)
    head = "HMAC_KEY_BASE64: %s\n" % keys[1] if gpg else \
        "KEY_BASE64: %s\nHMAC_KEY_BASE64: %s\n" % keys
    return ("%s\n# On the server, in /etc/spa/spa.conf "
            "(mode 0600), or let keygen put it there with --server-config /etc/spa/spa.conf:\n"
            "%s\n%s" % (head, server_stanza(name, keys, hmac_type, access, gpg),
                         client_section(name, keys, hmac_type, access, destination, gpg)))


def replace_section(text, header, block):
    """`text` with the INI section `[header]` replaced by `block`, or `block` added at the
    end: (new text, True if a section was replaced).  Comments and blank lines just above
    the next section stay with it."""
    lines = text.splitlines(True)
    want = header.split()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("[")
                  and line.strip().endswith("]") and line.strip()[1:-1].split() == want), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + block, False
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")),
               len(lines))
    while end > start + 1 and end < len(lines) and \
            (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith(("#", ";"))):
        end -= 1
    gap = "\n" if end < len(lines) else ""
    return "".join(lines[:start]) + block + gap + "".join(lines[end:]), True


def add_to_server_config(path, name, stanza, access):
    """Put [client NAME] into the server config at `path`, replacing one of that name; make
    the file from SERVER_CONFIG_TEMPLATE (mode 0600, a new folder 0700) when it is missing.
    The result must load as a server config, else the file is left as it was."""
    import re
    if os.path.lexists(path):
        text, made = read_private_text(path), False
    else:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            try:
                os.makedirs(folder, 0o700)
                os.chmod(folder, 0o700)
            except OSError as e:
                raise SpaError("cannot make %s: %s" % (folder, e.strerror))
        text = re.sub(r"(?m)^protect = .*$", "protect = " + access, SERVER_CONFIG_TEMPLATE)
        made = True
    text, replaced = replace_section(text, "client " + name, stanza)

    def loads(tmp):
        try:
            ServerConfig(tmp)
        except SpaError as e:
            raise SpaError("%s not changed: with [client %s] it would not load: %s"
                           % (path, name, str(e).replace(tmp, path)))
    try:
        write_file(path, text, 0o600, loads)
    except OSError as e:
        raise SpaError("cannot write %s: %s" % (path, e.strerror or e))
    return ("wrote %s (mode 0600) from the template, protecting %s, with [client %s]"
            % (path, access, name) if made else "%s [client %s] %s %s"
            % ("replaced" if replaced else "added", name, "in" if replaced else "to", path))


def keygen_main(args):
    """`spa.py keygen`: fresh keys, and the server's and the client's sections; with
    --server-config the server's goes straight into its config; -o writes to a new file
    (0600), made first, so that a server never holds keys its client cannot get."""
    import re
    hmac_type = parse_hmac_type(args.hmac_digest, "--hmac-digest")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$", args.name):
        raise SpaError("-n %r: a section name of letters, digits and . _ @ + - (it names a "
                       "section of the server's config and of the client's)" % args.name)
    try:
        access = format_access(parse_access(args.access))
    except ValueError as e:
        raise SpaError(str(e))
    out = None
    if args.output:     # made first: a server must never hold keys its client cannot get
        try:
            out = os.fdopen(os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w")
        except FileExistsError:
            raise SpaError("%s already exists: keygen never overwrites keys" % args.output)
        except OSError as e:
            raise SpaError("cannot create %s: %s" % (args.output, e.strerror))
    try:
        gpg = None
        if args.gpg_recipient or args.gpg_signer:
            if not (args.gpg_recipient and args.gpg_signer):
                raise SpaError("GnuPG sections need both --gpg-recipient (the server's key) "
                               "and --gpg-signer-key (the client's)")
            gpg = keygen_gpg(args.gpg_recipient, args.gpg_signer, args.gpg_home_dir)
        if args.server_config:
            keys = keygen_keys(hmac_type)
            done = add_to_server_config(args.server_config, args.name, server_stanza(
                args.name, keys, hmac_type, access, gpg), access)
            text = client_section(args.name, keys, hmac_type, access, args.destination, gpg)
        else:
            text = keygen_text(hmac_type, args.name, args.destination, access, gpg)
    except BaseException:
        if out is not None:
            out.close()
            os.unlink(args.output)
        raise
    if args.server_config:
        print("%s; check it with: spa.py check-config -c %s" % (done, args.server_config),
              file=sys.stderr)
    if out is None:
        sys.stdout.write(text)
        return 0
    with out:
        out.write(text)
    print("wrote %s to %s (mode 0600)" % ("the client's section" if args.server_config
                                          else "new keys", args.output), file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------
# selftest: the whole thing, for real, in two throwaway network namespaces
# ---------------------------------------------------------------------------
#
# `spa.py selftest` proves on this machine what the tests prove: a real server, capture
# and firewall in one namespace, knocks from another, each step shown; the host's own
# firewall is never touched, and everything made is removed.

def in_netns(name, fn):
    """Run fn() in a short-lived thread that has entered network namespace `name`.

    Sockets made there stay in that namespace, so one process can act as both ends.
    """
    import ctypes
    import threading
    result = {}

    def target():
        try:
            fd = os.open("/var/run/netns/" + name, os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, 0x40000000) != 0:          # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), "setns into %s failed" % name)
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as e:
            result["error"] = e
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


class SelfTest(object):
    """Two namespaces joined by a veth pair; a server with the real capture and firewall in
    one, a TCP service behind it, and knocks from the other.  Everything is removed after."""

    PORT = 22022

    def __init__(self, say):
        tag = "%d" % (os.getpid() % 100000)
        self.srv, self.cli = "spa-selftest-%s-s" % tag, "spa-selftest-%s-c" % tag
        self.veth = ("spast%sa" % tag, "spast%sb" % tag)
        self.say = say
        self.made, self.server, self.listener, self.tmp = [], None, None, None
        self.log = []

    def ip(self, *args):
        """Run `ip` with these arguments (SpaError if it fails)."""
        run_command(["ip"] + list(args))

    def build(self, timeout):
        """Make the two namespaces and the veth pair between them, and a server
        config (fresh keys, the given fw_access_timeout) in a temporary folder; its path."""
        import tempfile
        for name in (self.srv, self.cli):
            self.ip("netns", "add", name)
            self.made.append(name)
            self.ip("-n", name, "link", "set", "lo", "up")
        self.ip("link", "add", self.veth[0], "netns", self.srv, "type", "veth", "peer", "name",
                self.veth[1], "netns", self.cli)
        for ns, dev, v4, v6 in ((self.srv, self.veth[0], "198.18.254.1", "2001:db8:fe::1"),
                                (self.cli, self.veth[1], "198.18.254.2", "2001:db8:fe::2")):
            self.ip("-n", ns, "addr", "add", v4 + "/24", "dev", dev)
            self.ip("-n", ns, "addr", "add", v6 + "/64", "dev", dev, "nodad")
            self.ip("-n", ns, "link", "set", dev, "up")
        self.tmp = tempfile.mkdtemp(prefix="spa-selftest-")
        self.key, self.hmac_key = os.urandom(32), os.urandom(64)
        conf = os.path.join(self.tmp, "spa.conf")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("[server]\ninterface = %s\nprotect = tcp/%d\nreplay_cache = %s\n"
                    "[client selftest]\nkey_base64 = %s\nhmac_key_base64 = %s\n"
                    "fw_access_timeout = %d\n"
                    % (self.veth[0], self.PORT, os.path.join(self.tmp, "replay.cache"),
                       base64.b64encode(self.key).decode(),
                       base64.b64encode(self.hmac_key).decode(), timeout))
        return conf

    def start_service(self):
        """A TCP service on the protected port in the server's namespace."""
        import threading

        def listen():
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", self.PORT))
            sock.listen(16)
            return sock
        self.listener = in_netns(self.srv, listen)

        def serve():
            while True:
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    return
                conn.close()
        threading.Thread(target=serve, daemon=True).start()

    def start_server(self, conf):
        """Start `spa.py server` in the server's namespace; wait until it listens."""
        import subprocess
        import threading
        self.server = subprocess.Popen(
            [find_tool("ip") or "ip", "netns", "exec", self.srv, sys.executable,
             os.path.abspath(__file__), "server",
             "-c", conf], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, universal_newlines=True)

        def collect():
            for line in self.server.stderr:
                self.log.append(line.rstrip())
        threading.Thread(target=collect, daemon=True).start()
        if not self.wait_log("listening on", 15):
            raise SpaError("the server did not start: %s" % " | ".join(self.log[-3:]))

    def wait_log(self, text, seconds):
        """Wait up to `seconds` for a server log line holding `text`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if any(text in line for line in self.log):
                return True
            if self.server.poll() is not None and not any(text in line for line in self.log):
                time.sleep(0.1)
                return any(text in line for line in self.log)
            time.sleep(0.01)
        return False

    def connect(self, address, timeout=0.3):
        """'open', 'refused' or 'filtered': what a client sees of the protected port."""
        family = _socket_family(address)

        def attempt():
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect((address, self.PORT))
                return "open"
            except ConnectionRefusedError:
                return "refused"
            except OSError:
                return "filtered"
            finally:
                sock.close()
        return in_netns(self.cli, attempt)

    def knock(self, address, wire=None):
        """Send a knock (a new one, or `wire` again) from the client's namespace."""
        if wire is None:
            msg = Message("selftest", "0.0.0.0", [("tcp", self.PORT)])
            wire = seal(msg.encode(), self.key, self.hmac_key)
        family = _socket_family(address)
        sock = in_netns(self.cli, lambda: socket.socket(family, socket.SOCK_DGRAM))
        with sock:
            sock.sendto(wire, (address, DEFAULT_PORT))
        return wire

    def wait_open(self, address, seconds=1.0):
        """Seconds until the port opened for the client, or None within `seconds`."""
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            if self.connect(address, 0.05) == "open":
                return time.monotonic() - start
            time.sleep(0.001)
        return None

    def cleanup(self):
        """Stop the server and the service; remove the namespaces and the files."""
        import shutil
        import signal
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(5)
            except Exception:
                self.server.kill()
                self.server.wait()
        if self.listener is not None:
            self.listener.close()
        for name in reversed(self.made):
            try:
                self.ip("netns", "delete", name)
            except SpaError as e:
                self.say("warning: could not delete namespace %s: %s" % (name, e))
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def selftest_missing():
    """What this machine lacks for spa.py's server, in words an operator can act on."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the server needs CAP_NET_RAW and CAP_NET_ADMIN): run it with sudo")
    if find_tool("ip") is None:
        missing.append("the ip command (Debian: apt install iproute2)")
    if find_tool("nft") is None:
        missing.append("nft (Debian: apt install nftables)")
    try:
        aes_ecb()
    except SpaError as e:
        missing.append(str(e))
    if not hasattr(socket, "AF_PACKET"):
        missing.append("AF_PACKET sockets (Linux only)")
    return missing


def selftest_main(args):
    """Prove that knock, open, close and replay refusal work on this machine."""
    def say(text):
        print(text, flush=True)
    say("spa.py selftest: two throwaway network namespaces; the host's own firewall is not touched")
    missing = selftest_missing()
    if missing:
        for item in missing:
            say("  FAIL  missing: %s" % item)
        say("verdict: FAIL (install what is missing, then run the selftest again)")
        return 1
    timeout = 2
    t = SelfTest(say)
    check = Checklist(say)
    try:
        conf = t.build(timeout)
        t.start_service()
        t.start_server(conf)
        say("  ok    server running (real capture, firewall nft) with tcp/%d protected" % t.PORT)
        for address in ("198.18.254.1", "2001:db8:fe::1"):
            family = "IPv%d" % _family(address)
            state = t.connect(address)
            check(state != "open", "%s: before a knock the port is %s, like a port with no service"
                  % (family, state))
            wire = t.knock(address)
            opened = t.wait_open(address)
            check(opened is not None, "%s: knock sent, port open after %s" % (
                family, "%.1f ms" % (opened * 1000) if opened is not None else "- never (1 s)"))
            time.sleep(timeout + 0.5)
            check(t.connect(address) != "open",
                  "%s: port closed again after the %d s timeout" % (family, timeout))
            t.knock(address, wire)
            refused = t.wait_log("replayed packet", 2) and t.wait_open(address, 0.3) is None
            check(refused, "%s: the same packet sent again is refused as a replay" % family)
            t.log[:] = [line for line in t.log if "replayed packet" not in line]
    except SpaError as e:
        check(False, str(e))
    except KeyboardInterrupt:
        check(False, "interrupted")
    finally:
        t.cleanup()
        say("  ok    cleaned up: namespaces and temporary files removed")
    if check.failures:
        say("verdict: FAIL (%d check(s) failed; the server's last words: %s)"
            % (len(check.failures), " | ".join(t.log[-3:]) or "none"))
        return 1
    say("verdict: PASS: spa.py works on this machine")
    return 0


# ---------------------------------------------------------------------------
# install: a launcher, so that Python reuses the compiled code
# ---------------------------------------------------------------------------
#
# `spa.py install` copies this file, compiles it, and writes a launcher that root will
# run: so every directory on the way must be root's, every file is written under a
# random name and renamed (replace_file), and the launcher runs Python isolated (-I).

LAUNCHER = """#!{python} -I
# spa.py's launcher, written by `spa.py install`: importing spa (rather than running
# spa.py as a script) lets Python reuse its compiled code: a faster start, less memory.
# -I (isolated): PYTHONPATH, the user's site-packages and the current directory are not
# searched, so root imports nothing but this directory and the interpreter's own modules.
import sys
sys.path.insert(0, {lib!r})
import spa
sys.exit(spa.main())
"""

# Run by a candidate interpreter (-I -B): can it run spa.py, AES included?
_CAN_RUN_SPA = "import sys; sys.path.insert(0, sys.argv[1]); import spa; spa.aes_module()"


def _interpreter_problem(python):
    """Why root should not run `python` (one line), or None: it and its directory must
    belong to root (or to the installing user), it writable by no one else, its directory
    not by others."""
    real = os.path.realpath(python)
    if not os.path.isfile(real) or not os.access(real, os.X_OK):
        return "%s is not an executable file" % python
    for path, writers in ((real, 0o022), (os.path.dirname(real), 0o002)):
        st = os.stat(path)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & writers:
            return "%s belongs to uid %d (mode %04o): root would run what that user may change" % (
                path, st.st_uid, st.st_mode & 0o7777)
    if any(c.isspace() for c in python) or len(python) > 120:
        return "%s cannot go in a #! line" % python
    return None


def choose_python(given=None):
    """(interpreter, why) for the launcher's #! line.

    --python if given; else the system's /usr/bin/python3 (its distribution keeps it up
    to date) when it can run spa.py with AES; else the Python running this install when
    it can.  If neither can load pycryptodome the first usable one is kept, with a
    warning.  Never one that another user could change (_interpreter_problem).
    """
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    system = "/usr/bin/python3"       # not python3.11: the name outlives an upgrade
    if given:
        import shutil
        candidates = [(os.path.abspath(shutil.which(given) or given), "given with --python")]
    else:
        candidates = []
        if sys.platform.startswith("linux") and os.path.exists(system):
            candidates.append((system, "the system's Python, kept up to date by its distribution"))
        if not candidates or os.path.realpath(system) != os.path.realpath(sys.executable):
            candidates.append((sys.executable, "the Python running this install"))
    usable, notes = [], []
    for python, why in candidates:
        problem = _interpreter_problem(python) if os.path.exists(python) else \
            "%s does not exist" % python
        if problem:
            notes.append(problem)
            continue
        try:
            done = subprocess.run([python, "-I", "-B", "-c", _CAN_RUN_SPA, here],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
            ok = done.returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return python, "; ".join([why] + notes)
        usable.append((python, why))
        notes.append("%s cannot load pycryptodome (apt install python3-pycryptodome, or pip "
                     "install pycryptodome)" % python)
    if not usable:
        raise SpaError("no Python to run spa.py with: %s; name one with --python" % "; ".join(notes))
    python, why = usable[0]
    return python, "%s; WARNING: %s" % (why, "; ".join(notes))


def _install_dir(path, ours=False):
    """Make `path` (mode 0755) if it is missing; refuse one that root should not trust
    (check_private_dir: owned by another user, or writable by others).  Our own
    directories (`ours`: lib/spa, __pycache__) must be real directories, and get 0755."""
    try:
        os.makedirs(path, 0o755)     # (with its parents: the umask is 022 here)
    except FileExistsError:
        if ours and os.path.islink(path):
            raise SpaError("%s is a symlink: remove it, spa.py makes that directory" % path)
    problem = check_private_dir(path, 0o002)
    if problem:
        raise SpaError(problem)
    if ours:
        os.chmod(path, 0o755)


def create_system_user(name, role, later):
    """Create the system user `name` where it is missing; says what it did.  `role`: what
    runs as it ("the packet reader runs as"); `later`: what happens until it exists."""
    import pwd
    try:
        pwd.getpwnam(name)
        return "%s the user %s" % (role, name)
    except KeyError:
        pass
    command = USERADD + [name]
    if os.geteuid() != 0:
        return "note: no user %s: as root, run %s %s" % (name, " ".join(command), later)
    useradd = find_tool(command[0])
    try:
        if useradd is None:
            raise SpaError("%s not found" % command[0])
        run_command([useradd] + command[1:])
    except SpaError as e:
        return "note: could not create the system user %s: %s %s" % (name, e, later)
    return "created the system user %s, which %s" % (name, role)


def create_reader_user():
    """Create the packet reader's system user `spa` where it is missing; says what it did."""
    return create_system_user(READER_USER, "the packet reader runs as",
                              "(the packet reader runs as nobody until it exists)")


def install_main(args):
    """Copy this file to PREFIX/lib/spa, compile it, and write the launcher PREFIX/bin/spa
    (and PREFIX/bin/spa.py, a link to it, so that every line of README.md runs as typed).

    Root runs what this writes, so: every directory on the way must belong to root (or to
    the installing user) and be writable by no one else; modes are set explicitly
    (directories and the launcher 0755, the rest 0644), whatever the umask; each file is
    written under a random name (O_EXCL, O_NOFOLLOW) and renamed into place, so a planted
    symlink is never followed; and the launcher runs Python isolated (-I).
    """
    import subprocess
    prefix = os.path.abspath(args.prefix)
    lib = os.path.join(prefix, "lib", "spa")
    target = os.path.join(lib, "spa.py")
    launcher = os.path.join(prefix, "bin", "spa")
    python, why = choose_python(args.python)
    umask = os.umask(0o022)
    try:
        for path in (prefix, os.path.dirname(lib), lib, os.path.dirname(launcher)):
            _install_dir(path, ours=path == lib)
        with open(os.path.abspath(__file__), "rb") as f:
            code = f.read()
        replace_file(target, lambda fd: write_all(fd, code), 0o644)
        cache = os.path.join(lib, "__pycache__")
        _install_dir(cache, ours=True)
        done = subprocess.run([python, "-I", "-c", "import py_compile, sys; print(py_compile."
                               "compile(sys.argv[1], doraise=True))", target],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        if done.returncode != 0:
            raise SpaError("%s could not compile %s: %s" % (
                python, target, (done.stderr.strip().splitlines() or ["?"])[-1]))
        compiled = done.stdout.strip()
        if os.path.dirname(compiled) != cache or os.path.islink(compiled):
            raise SpaError("%s compiled %s to %s, not into %s" % (python, target, compiled, cache))
        os.chmod(compiled, 0o644)
        text = LAUNCHER.format(python=python, lib=lib).encode()
        replace_file(launcher, lambda fd: write_all(fd, text), 0o755)
        # spa.py too: a link made under a random name, then renamed over whatever was there
        link = "%s.py.%s" % (launcher, binascii.hexlify(os.urandom(6)).decode())
        os.symlink("spa", link)
        os.replace(link, launcher + ".py")
    except OSError as e:
        raise SpaError("cannot install into %s: %s" % (prefix, e.strerror or e))
    finally:
        os.umask(umask)
    print("installed %s (compiled) and the launcher %s (also as %s.py)"
          % (target, launcher, launcher))
    print("the launcher runs %s -I (isolated): %s" % (python, why))
    print(create_reader_user())
    print(create_system_user(GPG_USER, "the server's gpg (GnuPG stanzas) runs as",
                             "(GnuPG stanzas cannot be used until it exists)"))
    return 0


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
#
# argparse, built only for the subcommand given (a quicker start for the client), with
# errors that never show a value of the command line (it may be a key); main() turns an
# SpaError into one line and exit status 1.

DEFAULT_CONFIG = "/etc/spa/spa.conf"

EXAMPLES = """examples:
  spa.py keygen -n web1 -D web1.example.org -A tcp/22 -o web1.keys
  spa.py server -c /etc/spa/spa.conf
  spa.py client -c ~/.spa.conf -n web1 && ssh web1.example.org
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, sized from $COLUMNS or the terminal without importing shutil.

    argparse makes one of these for every option it adds, and each would import
    shutil (a part of the client's start-up: README.md, Performance) just to ask for the
    terminal's width.
    """

    def __init__(self, prog):
        try:
            columns = int(os.environ.get("COLUMNS", ""))
        except ValueError:
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                columns = 80
        super().__init__(prog, width=max(columns, 40) - 2)


def _shown_word(word):
    """A command-line word as an error may show it: an option's name, never a value."""
    name, equals, _ = word.partition("=")
    long_option = name[:2] == "--" and 3 <= len(name) <= 40 and all(
        c.isalnum() or c == "-" for c in name[2:])
    short_option = len(name) == 2 and name[0] == "-" and name[1].isalnum()
    return name + ("=..." if equals else "") if long_option or short_option else "..."


_SUBCOMMAND_HELP = {
    "keygen": "make a new key pair", "client": "send a knock",
    "server": "run the server (root)", "check-config": "validate a server config",
    "firewall-config": "keep the ports dark through firewall reloads and boots (root)",
    "install": "install spa.py with a fast launcher",
    "selftest": "prove it works on this machine (root)"}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors never show a value given on the command line: one
    of them may be a key (`--key-base64-hmac KEY` after an option it does not know would
    otherwise be printed back whole)."""

    argv = ()

    def parse_args(self, args=None, namespace=None):
        """argparse's, with an unknown argument named but never shown."""
        args, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error("unrecognized arguments: %s" % " ".join(map(_shown_word, extra)))
        return args

    def error(self, message):
        """argparse's error, every value given on the command line replaced by '...'."""
        import re
        values = set()
        for word in _Parser.argv:
            if _shown_word(word) == "...":
                values.add(word)
            if word.startswith("-") and "=" in word:
                values.add(word.split("=", 1)[1])
        for value in sorted(values - set(_SUBCOMMAND_HELP) - {""}, key=len, reverse=True):
            message = re.sub(r"(^|[\s'\"=])%s(?=$|[\s'\",)])" % re.escape(value), r"\1...",
                             message)
        super().error(message)


def _keygen_options(sub, fmt):
    """`spa.py keygen`'s options."""
    k = sub.add_parser("keygen", formatter_class=fmt, help=_SUBCOMMAND_HELP["keygen"],
                       description="Print fresh random keys (as `fwknop --key-gen` does) and "
                       "ready-to-paste server and client sections; or put the server's "
                       "section straight into its config (--server-config) and print the "
                       "client's.",
                       epilog="examples:\n  spa.py keygen -n web1 -D web1.example.org -o web1.keys\n"
                       "  spa.py keygen -n web1 -D web1.example.org -A tcp/22 "
                       "--server-config /etc/spa/spa.conf -o web1.spa.conf")
    k.add_argument("--hmac-digest", default="sha256", metavar="TYPE",
                   help="sha256 (default), sha384 or sha512")
    k.add_argument("-n", "--name", default="myhost", help="the section name to print")
    k.add_argument("-D", "--destination", metavar="HOST",
                   help="the server, for the client section (its name as the client knows it)")
    k.add_argument("-A", "--access", default="tcp/22", help="the ports, e.g. tcp/22,tcp/443")
    k.add_argument("-o", "--output", metavar="FILE", help="write to a new file with mode 0600")
    k.add_argument("--server-config", dest="server_config", metavar="FILE",
                   help="add [client NAME] to this server config, or replace it (a missing "
                   "file is made from spa.conf.example's text, mode 0600, protecting -A's "
                   "ports); then print only the client's section")
    k.add_argument("--gpg-recipient", "--gpg-recipient-key", dest="gpg_recipient", metavar="KEY",
                   help="GnuPG sections: the server's key, which the packets are encrypted to")
    k.add_argument("--gpg-signer-key", dest="gpg_signer", metavar="KEY",
                   help="GnuPG sections: the client's key, which signs them")
    k.add_argument("--gpg-home-dir", dest="gpg_home_dir", metavar="DIR",
                   help="the keyring that holds both public keys (default ~/.gnupg)")


def _client_request_options(c):
    """The client's options: where to knock, and what to ask for."""
    c.add_argument("-D", "--destination", metavar="HOST", help="the server: name, IPv4 or IPv6")
    c.add_argument("-p", "--server-port", dest="server_port", metavar="PORT",
                   help="the server's knock port (default %d; -P http: the web server's, "
                   "default 80)" % DEFAULT_PORT)
    c.add_argument("-A", "--access", metavar="PORTS", help="ports to open, e.g. tcp/22,udp/53")
    c.add_argument("-a", "--allow-ip", dest="allow_ip", metavar="IP",
                   help="open for this IPv4 address instead of the packet's source")
    c.add_argument("-s", "--source-ip", dest="source_ip", action="store_const", const=True,
                   help="open for the address the packet comes from (the default)")
    c.add_argument("-R", "--resolve-ip-https", "--resolve-ip-http", "--resolve-http-only",
                   dest="resolve_ip", action="store_true",
                   help="open for the public IPv4 address that --resolve-url reports (behind NAT)")
    c.add_argument("--resolve-url", dest="resolve_url", metavar="URL",
                   help="a URL of yours that answers with the caller's address (none is "
                   "built in); implies -R unless -a or -s is given")
    c.add_argument("-4", "--server-resolve-ipv4", dest="ip_version", action="store_const",
                   const="4", help="knock (and --connect) over IPv4 only")
    c.add_argument("-6", dest="ip_version", action="store_const", const="6",
                   help="knock (and --connect) over IPv6 only (by default a name with both "
                   "kinds of address is knocked over IPv4, as fwknop does)")
    c.add_argument("-N", "--nat-access", dest="nat_access", metavar="HOST[:PORT]",
                   help="ask the server to forward the -A port to this internal host")
    c.add_argument("--nat-local", dest="nat_local", action="store_const", const=True,
                   help="ask the server to forward --nat-port to the -A port on itself")
    c.add_argument("--nat-port", dest="nat_port", metavar="PORT",
                   help="with --nat-local: the port to connect to (default: the -A port)")
    c.add_argument("-C", "--server-cmd", dest="server_cmd", metavar="COMMAND",
                   help="ask the server to run this command (a stanza must allow it)")
    c.add_argument("-f", "--fw-timeout", dest="fw_timeout", metavar="SECONDS",
                   help="ask for this many seconds (the server caps it)")
    c.add_argument("-U", "--user", "--spoof-user", dest="user", metavar="NAME",
                   help="username to send (default: $SPOOF_USER, else your login name)")


def _client_packet_options(c):
    """The client's options: the keys, and how the packet is made."""
    c.add_argument("--key-base64", "--key-base64-rijndael", dest="key_base64", metavar="KEY",
                   help="encryption key")
    c.add_argument("--hmac-key-base64", "--key-base64-hmac", dest="hmac_key_base64",
                   metavar="KEY", help="HMAC key")
    c.add_argument("--key-rijndael", dest="key", metavar="PASSPHRASE",
                   help="encryption key as a fwknop-style passphrase")
    c.add_argument("--key-hmac", dest="hmac_key", metavar="PASSPHRASE",
                   help="HMAC key as a fwknop-style passphrase")
    c.add_argument("--key-file", dest="key_file", metavar="FILE",
                   help="both keys from FILE (mode 0600): KEY_BASE64 and HMAC_KEY_BASE64 lines, "
                   "as `fwknop -k` prints them")
    c.add_argument("-G", "--get-key", dest="get_key", metavar="FILE",
                   help="the encryption passphrase from FILE (mode 0600), fwknop's format: a "
                   "`HOST: passphrase` line for -D's HOST")
    c.add_argument("--get-hmac-key", dest="get_hmac_key", metavar="FILE",
                   help="the HMAC passphrase from such a file")
    c.add_argument("--stdin", action="store_true",
                   help="read the key from stdin: its first line is the encryption passphrase "
                   "(as for fwknop), or KEY_BASE64 and HMAC_KEY_BASE64 lines give both keys")
    c.add_argument("--fd", metavar="N", help="the same from file descriptor N")
    c.add_argument("--hmac-digest", "--hmac-digest-type", dest="hmac_digest_type",
                   metavar="TYPE", help="HMAC type: sha256 (default), sha384, sha512")
    c.add_argument("-M", "--encryption-mode", dest="encryption_mode", metavar="MODE",
                   help="cbc (default), ctr, cfb or ofb, as the server's stanza says")
    c.add_argument("-m", "--digest-type", dest="digest_type", metavar="TYPE",
                   help="the packet's inner digest: sha256 (default), sha384, sha512, ...")
    c.add_argument("-g", "--gpg-encryption", dest="use_gpg", action="store_const", const="yes",
                   help="GnuPG instead of AES (implied by --gpg-recipient)")
    c.add_argument("--gpg-recipient", "--gpg-recipient-key", dest="gpg_recipient",
                   metavar="KEY", help="GnuPG: the server's key (ID, fingerprint or e-mail)")
    c.add_argument("--gpg-signer-key", dest="gpg_signer", metavar="KEY",
                   help="GnuPG: your key, which signs the packet (the server requires it)")
    c.add_argument("--gpg-home-dir", dest="gpg_home_dir", metavar="DIR",
                   help="GnuPG: the keyring directory (default ~/.gnupg)")
    c.add_argument("--gpg-no-signing-pw", dest="gpg_no_signing_pw", action="store_const",
                   const="yes", help="GnuPG: the signing key has no passphrase")
    c.add_argument("--gpg-agent", dest="gpg_agent", action="store_const", const="yes",
                   help="GnuPG: let gpg-agent ask for the signing key's passphrase (without "
                   "it: gpg_signing_pw in the config section, else a prompt)")
    c.add_argument("-P", "--server-proto", dest="server_proto", metavar="PROTO",
                   help="how the knock travels: udp (default), tcpraw (one TCP segment to "
                   "the port), icmp (an ICMP echo request), http (a GET to the web server "
                   "on the port, default 80); tcpraw and icmp need root, as with fwknop; "
                   "the server must list it in transports")
    c.add_argument("-S", "--source-port", dest="source_port", metavar="PORT",
                   help="send the knock from this port (udp, tcpraw)")
    c.add_argument("--time-offset-plus", dest="time_offset_plus", metavar="TIME",
                   help="add TIME (90sec, 5min, 2hours, 1day) to the packet's timestamp")
    c.add_argument("--time-offset-minus", dest="time_offset_minus", metavar="TIME",
                   help="take TIME from the packet's timestamp (a server's clock behind yours)")
    c.add_argument("-u", "--user-agent", dest="user_agent", metavar="TEXT",
                   help="the User-Agent of -R's request and of -P http's knock")


def _client_run_options(c):
    """The client's options: its config file, what it does after the knock, and fwknop's
    options that change nothing here."""
    hidden = argparse.SUPPRESS
    c.add_argument("-c", "--config", "--rc-file", metavar="FILE",
                   help="read settings from this file: spa.py's INI or fwknop's ~/.fwknoprc")
    c.add_argument("-n", "--name", "--named-config", metavar="SECTION",
                   help="the section of the config to use, or else the one whose destination "
                   "is SECTION (default file: ~/.spa.conf, else ~/.fwknoprc)")
    c.add_argument("--no-rc-file", dest="no_rc_file", action="store_true",
                   help="read no config file unless -c names one")
    c.add_argument("--connect", metavar="HOST:PORT",
                   help="after the knock, wait until HOST:PORT accepts a connection and relay "
                   "stdin/stdout to it (for ssh's ProxyCommand)")
    c.add_argument("--connect-wait", dest="connect_wait", type=float, default=10.0,
                   metavar="SECONDS", help="how long --connect waits for the port (default 10)")
    c.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="send the packet N times, %d ms apart, for a server under a flood that "
                   "loses packets (the server opens once; it refuses the copies as replays)"
                   % (1000 * REPEAT_GAP))
    c.add_argument("-T", "--test", action="store_true",
                   help="print the packet instead of sending it")
    c.add_argument("-v", "--verbose", action="store_true",
                   help="print the packet's fields and the address knocked")
    c.add_argument("-V", "--version", action="version", version="spa.py " + VERSION)
    # fwknop's options that change nothing here: spa.py always uses an HMAC, saves no
    # command lines and runs no wget.
    for name in ("--use-hmac", "--no-save-args", "--no-home-dir", "--use-wget-user-agent"):
        c.add_argument(name, dest="ignored", action="store_true", help=hidden)
    c.add_argument("-w", "--wget-cmd", dest="ignored", help=hidden)


def _client_options(sub, fmt):
    """`spa.py client`'s options; fwknop's names for them work as well."""
    c = sub.add_parser("client", formatter_class=fmt, help=_SUBCOMMAND_HELP["client"],
                       description="Build one SPA packet and send it over UDP (no privileges "
                       "needed).  fwknop's option names work too (--key-base64-rijndael, "
                       "--spoof-user, ...; README.md lists them).",
                       epilog="examples:\n"
                       "  spa.py client -n web1                 # knock with [web1] of ~/.spa.conf\n"
                       "  spa.py client -c ~/.fwknoprc -n web1  # fwknop's client settings\n"
                       "  spa.py client -D 198.51.100.7 -A tcp/22 -c ~/.spa.conf -n web1 --test -v\n"
                       "  ssh -o 'ProxyCommand spa.py client -n %h --connect %h:%p' web1\n\n"
                       "Keys given on the command line are visible to every user in the process\n"
                       "list: keep them in a config file of mode 0600 (or --key-file, -G, --stdin).")
    _client_request_options(c)
    _client_packet_options(c)
    _client_run_options(c)


def _config_options(parser, access_conf=True):
    """The server config's options, the same for server, check-config and firewall-config."""
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                        help="config file (default %s)" % DEFAULT_CONFIG)
    if access_conf:
        parser.add_argument("--access-conf", dest="access_conf", metavar="FILE",
                            help="also load the client stanzas of fwknopd's access.conf")


def _server_options(sub, fmt):
    """`spa.py server`'s options."""
    s = sub.add_parser("server", formatter_class=fmt, help=_SUBCOMMAND_HELP["server"],
                       description="Capture knocks and open the firewall for authorised clients.",
                       epilog="examples:\n  spa.py server -c /etc/spa/spa.conf -v\n"
                       "  spa.py server -c /etc/spa/spa.conf --list\n"
                       "  spa.py server -c /etc/spa/spa.conf --flush")
    _config_options(s)
    s.add_argument("-v", "--verbose", action="store_true",
                   help="log every authenticated packet's fields with its decision (never keys)")
    s.add_argument("--test", action="store_true",
                   help="capture and decide, but change neither firewall nor replay cache")
    s.add_argument("--list", action="store_true", help="print the open authorizations and exit")
    s.add_argument("--flush", action="store_true",
                   help="remove everything spa.py put in the firewall and exit")


def _check_config_options(sub, fmt):
    """`spa.py check-config`'s options."""
    cc = sub.add_parser("check-config", formatter_class=fmt, help=_SUBCOMMAND_HELP["check-config"],
                        description="Parse and check a server config: keys, permissions, "
                        "interfaces, the firewall tool; print what the server would protect.",
                        epilog="example:\n  spa.py check-config -c /etc/spa/spa.conf")
    _config_options(cc)


def _firewall_config_options(sub, fmt):
    """`spa.py firewall-config`'s options."""
    f = sub.add_parser("firewall-config", formatter_class=fmt,
                       help=_SUBCOMMAND_HELP["firewall-config"],
                       description="Put spa.py's protect rules into the host's saved firewall, so that\n"
                       "reloading it (nft -f /etc/nftables.conf, iptables-restore) or booting loads\n"
                       "them with the host's own rules: the protected ports are never open for a\n"
                       "moment, with or without the server.  nft: writes spa.py's table to\n"
                       "nft_include (/etc/spa/spa.nft) and includes it in the host's ruleset file;\n"
                       "iptables: adds SPA_INPUT to the rules files (/etc/iptables/rules.v4, .v6).\n"
                       "Without --write, shows the changes.",
                       epilog="example:\n  sudo spa.py firewall-config -c /etc/spa/spa.conf --write")
    _config_options(f, access_conf=False)
    f.add_argument("--write", action="store_true",
                   help="make the changes (each file checked with nft -c or iptables-restore "
                   "--test first)")


def _install_options(sub, fmt):
    """`spa.py install`'s options."""
    i = sub.add_parser("install", formatter_class=fmt, help=_SUBCOMMAND_HELP["install"],
                       description="Copy spa.py to PREFIX/lib/spa, compile it, and write the "
                       "launcher PREFIX/bin/spa: `spa client ...` then starts faster and the "
                       "server needs less memory, because Python reuses the compiled code.",
                       epilog="example:\n  sudo python3 spa.py install && spa --version")
    i.add_argument("--prefix", default="/usr/local", help="where to install (default /usr/local)")
    i.add_argument("--python", metavar="PATH",
                   help="the Python the launcher runs (default: /usr/bin/python3 if it can load "
                   "pycryptodome, else the one running this install)")


def _selftest_options(sub, fmt):
    """`spa.py selftest`'s options (none)."""
    sub.add_parser("selftest", formatter_class=fmt, help=_SUBCOMMAND_HELP["selftest"],
                   description="Build two throwaway network namespaces, run a server with this "
                   "machine's real capture and firewall in one, knock from the other, and show "
                   "each step: port closed, knock, port open, closed after the timeout, replay "
                   "refused.  The host's own firewall is not touched.",
                   epilog="example:\n  sudo python3 spa.py selftest")


_SUBCOMMANDS = [("keygen", _keygen_options), ("client", _client_options),
                ("server", _server_options), ("check-config", _check_config_options),
                ("firewall-config", _firewall_config_options),
                ("install", _install_options), ("selftest", _selftest_options)]


def build_parser(argv=None):
    """The command line parser.  Given argv, only the options of the subcommand it names
    are built (the others still list in --help): a quicker start for `spa client`."""
    fmt = _HelpFormatter
    named = argv[0] if argv else None
    _Parser.argv = tuple(argv or ())
    p = _Parser(
        prog="spa.py", formatter_class=fmt, epilog=EXAMPLES,
        description="Single Packet Authorization, wire-compatible with fwknop.")
    p.add_argument("--version", action="version", version="spa.py " + VERSION)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    names = [n for n, _ in _SUBCOMMANDS]
    for name, add_options in _SUBCOMMANDS:
        if named in names and named != name:
            sub.add_parser(name, formatter_class=fmt, help=_SUBCOMMAND_HELP[name])
        else:
            add_options(sub, fmt)
    return p


def main(argv=None):
    """The command line: run a subcommand; an SpaError becomes one line on stderr and
    exit status 1 (no traceback), Ctrl-C exit status 130."""
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["client"]:
        try:
            refuse_fwknop_only_options(argv[1:])
        except SpaError as e:
            print("spa.py client: error: %s" % e, file=sys.stderr)
            return 2
    args = build_parser(argv).parse_args(argv)
    handler = {"keygen": keygen_main, "client": client_main, "server": server_main,
               "check-config": check_config_main, "selftest": selftest_main,
               "firewall-config": firewall_config_main,
               "install": install_main}
    try:
        return handler[args.command](args)
    except SpaError as e:
        print("spa.py %s: error: %s" % (args.command, e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------
# Speed and memory: AES, the hashes and HMAC, PackedMap
# ---------------------------------------------------------------------------
#
# The primitives the rest calls through small functions (aes_crypt, hash_digest,
# compare_digest, Hmac) and one container (PackedMap), made quick to start and small: the
# client's start-up and the server's memory are measured (README.md: Performance).  AES
# is pycryptodome's, called through ctypes in the library its AES module loads, with the
# modes chained here; the hashes are Python's own (no OpenSSL); HMAC is RFC 2104 over them
# with the key's blocks hashed once.  Each is checked against a known answer or the
# reference implementation in the tests.  Nothing here reads anything from outside.

_AES = None      # pycryptodome's AES module, once imported (aes_module)
_ECB = None      # the AES block function, once found (aes_ecb)

# FIPS-197 appendix C.3: AES-256 of one block, checked before the block function is used.
_KNOWN_ANSWER = (bytes(range(32)), bytes.fromhex("00112233445566778899aabbccddeeff"),
                 bytes.fromhex("8ea2b7ca516745bfeafc49904b496089"))


def pycryptodome():
    """pycryptodome's top package: Debian's `Cryptodome` first, then PyPI's `Crypto`.

    Imported on first use, so `--help` and keygen work without it and the
    client's start-up does not pay for it before it has parsed its arguments.
    """
    import importlib
    for package in ("Cryptodome", "Crypto"):
        try:
            top = importlib.import_module(package)
        except ImportError:
            continue
        # The long-dead PyCrypto also imports as `Crypto`: version 2.x.
        if tuple(getattr(top, "version_info", (0,)))[:1] >= (3,):
            return top
    raise SpaError("pycryptodome is missing: install it with "
                   "'apt install python3-pycryptodome' or 'pip install pycryptodome'")


def _skip_architecture_probe(raw_api):
    """Spare pycryptodome its `file` subprocess when it loads its C code through ctypes.

    pycryptodome's ctypes loader asks platform.architecture() once per process, which
    runs `file` on the Python binary (a process: README.md, Performance) and only uses the
    answer to tell Windows DLLs apart.  Its result cache is a module-level list: fill it
    with the answer platform.architecture() gives on Linux.  Left alone if that name is
    not there (the cffi loader, other versions).
    """
    cache = getattr(raw_api, "cached_architecture", None)
    if isinstance(cache, list) and not cache and sys.platform.startswith("linux"):
        cache[:] = ["%dbit" % (8 * struct.calcsize("P")), "ELF"]


def aes_module():
    """pycryptodome's AES module, its public interface (see aes_ecb for why it is the
    second choice)."""
    global _AES
    if _AES is None:
        import importlib
        name = pycryptodome().__name__
        try:
            _skip_architecture_probe(importlib.import_module(name + ".Util._raw_api"))
            _AES = importlib.import_module(name + ".Cipher.AES")
        except ImportError as e:
            raise SpaError("pycryptodome is broken: %s" % e)
    return _AES


def _library_ecb(package_dir):
    """aes_ecb() through pycryptodome's shared library (OSError if it is not there)."""
    import ctypes
    from importlib.machinery import EXTENSION_SUFFIXES

    def load(folder, name):
        for suffix in EXTENSION_SUFFIXES:
            path = os.path.join(package_dir, folder, name + suffix)
            if os.path.isfile(path):
                return ctypes.CDLL(path)
        raise OSError("%s not found in %s" % (name, package_dir))

    lib, prefix = load("Cipher", "_raw_aes"), "AES"
    try:
        if load("Util", "_cpuid_c").have_aes_ni():
            lib, prefix = load("Cipher", "_raw_aesni"), "AESNI"
    except (OSError, AttributeError):
        pass                                    # the portable build, then
    mode = load("Cipher", "_raw_ecb")
    pointer = ctypes.POINTER(ctypes.c_void_p)
    # As pycryptodome's AES and ECB modules declare them: the ECB state takes over the
    # AES state, and ECB_stop_operation frees both.
    start_aes = getattr(lib, prefix + "_start_operation")
    start_aes.argtypes = [ctypes.c_char_p, ctypes.c_size_t, pointer]
    stop_aes = getattr(lib, prefix + "_stop_operation")
    stop_aes.argtypes = [ctypes.c_void_p]
    mode.ECB_start_operation.argtypes = [ctypes.c_void_p, pointer]
    mode.ECB_stop_operation.argtypes = [ctypes.c_void_p]
    run = {False: mode.ECB_encrypt, True: mode.ECB_decrypt}
    for f in run.values():
        f.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    # An output buffer's type, by length, kept: ctypes would make a new one each time,
    # left for the garbage collector (a type is a cycle of objects).
    buffers = {}

    def ecb(key, data, decrypt=False):
        if len(data) % 16:
            raise ValueError("AES works on whole 16-byte blocks")
        kind = buffers.get(len(data))
        if kind is None:
            kind = ctypes.c_char * len(data)
            if len(buffers) < 256:
                buffers[len(data)] = kind
        out, cipher, state = kind(), ctypes.c_void_p(), ctypes.c_void_p()
        if start_aes(key, len(key), ctypes.byref(cipher)):
            raise ValueError("AES key setup failed (key length %d)" % len(key))
        if mode.ECB_start_operation(cipher, ctypes.byref(state)):
            stop_aes(cipher)
            raise ValueError("AES: no ECB state")
        try:
            if run[decrypt](state, data, out, len(data)):
                raise ValueError("AES failed")
        finally:
            mode.ECB_stop_operation(state)
        return out.raw
    return ecb


def _module_ecb(aes):
    """aes_ecb() through pycryptodome's public interface."""
    def ecb(key, data, decrypt=False):
        cipher = aes.new(key, aes.MODE_ECB)
        return cipher.decrypt(data) if decrypt else cipher.encrypt(data)
    return ecb


def aes_ecb():
    """AES on whole 16-byte blocks as one function: ecb(key, data, decrypt=False) -> bytes.

    It is pycryptodome's AES, called through ctypes in the shared library that
    pycryptodome's AES module loads itself (its AES-NI build where the CPU has
    AES-NI).  Importing that module would load pycryptodome's whole Cipher package:
    all eleven of its modes, through ctypes.util, subprocess and tempfile: start-up time
    and memory (README.md: Performance) that spa.py does not need, as it chains the
    blocks itself (aes_crypt).  Where that library cannot be
    found, or fails the FIPS-197 known answer, pycryptodome's public interface
    (AES.new in ECB mode) does the same work.
    """
    global _ECB
    if _ECB is None:
        top = pycryptodome()
        try:
            ecb = _library_ecb(os.path.dirname(os.path.abspath(top.__file__)))
            key, block, answer = _KNOWN_ANSWER
            if ecb(key, block) != answer or ecb(key, answer, True) != block:
                ecb = None
        except Exception:       # not found, not loadable, not as declared: the fallback
            ecb = None
        _ECB = ecb or _module_ecb(aes_module())
    return _ECB


def _xor(a, b):
    """a XOR b, two byte strings of one length: in one step, through Python's integers."""
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def aes_crypt(key, iv, data, mode, decrypt=False):
    """AES in `mode` over `data` (whole blocks: fwknop pads in every mode), chained here
    over aes_ecb() as OpenSSL chains it: CBC; CTR counting with the whole IV as one
    128-bit big-endian number; CFB with 128-bit segments; OFB.

    Decryption in CBC, CTR and CFB is one call for all the blocks (a packet's usual
    case); what needs the block before is done a block at a time.
    """
    ecb = aes_ecb()
    if mode not in ENCRYPTION_MODES:
        raise ValueError("unknown encryption mode %r" % mode)
    if len(data) % 16:
        raise ValueError("AES works on whole 16-byte blocks")
    if not data:
        return b""
    if mode == "cbc" and decrypt:
        return _xor(ecb(key, data, True), iv + data[:-16])
    if mode == "cfb" and decrypt:
        return _xor(data, ecb(key, iv + data[:-16]))
    if mode == "ctr":
        first = int.from_bytes(iv, "big")
        counters = b"".join(((first + i) % (1 << 128)).to_bytes(16, "big")
                            for i in range(len(data) // 16))
        return _xor(data, ecb(key, counters))
    out, chain = [], iv
    for i in range(0, len(data), 16):
        block = data[i:i + 16]
        if mode == "cbc":
            chain = ecb(key, _xor(block, chain))
            out.append(chain)
        elif mode == "cfb":
            chain = _xor(block, ecb(key, chain))
            out.append(chain)
        else:                                   # ofb: the same both ways
            chain = ecb(key, chain)
            out.append(_xor(block, chain))
    return b"".join(out)


# Where Python's own implementation of each hash is: 3.12 and later have the SHA-2
# family in _sha2, older ones in _sha256 and _sha512.
_BUILTIN_HASHES = {
    "md5": (("_md5", "md5"),), "sha1": (("_sha1", "sha1"),),
    "sha256": (("_sha2", "sha256"), ("_sha256", "sha256")),
    "sha384": (("_sha2", "sha384"), ("_sha512", "sha384")),
    "sha512": (("_sha2", "sha512"), ("_sha512", "sha512")),
    "sha3_256": (("_sha3", "sha3_256"),), "sha3_512": (("_sha3", "sha3_512"),),
}
_HASHES = {}


def hash_constructor(name):
    """The constructor of hash `name`: Python's own implementation where it has one,
    else hashlib's (OpenSSL).

    Importing hashlib loads OpenSSL's libcrypto, which the client's start-up and each
    server process's memory would pay for (README.md: Performance); spa.py needs none of
    it: its hashes are Python's own, and HMAC is built on them (Hmac).
    """
    ctor = _HASHES.get(name)
    if ctor is None:
        for module, attr in _BUILTIN_HASHES.get(name, ()):
            try:
                ctor = getattr(__import__(module), attr)
                break
            except (ImportError, AttributeError):
                continue
        else:
            import hashlib
            ctor = getattr(hashlib, name)
        _HASHES[name] = ctor
    return ctor


def hash_digest(name, data):
    """The hash `name` of `data`."""
    return hash_constructor(name)(data).digest()


try:    # what hmac.compare_digest is without OpenSSL; importing hmac would load it
    from _operator import _compare_digest as compare_digest
except ImportError:
    from hmac import compare_digest

_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


class Hmac(object):
    """HMAC (RFC 2104) with the key's two padded blocks hashed once, ahead of time: a
    message then costs two copies of hash states, an update and a digest each.

    `prefix` is fed in now, as if every message began with it.
    """

    def __init__(self, key, name, prefix=b""):
        ctor = hash_constructor(name)
        block = ctor().block_size
        if len(key) > block:
            key = ctor(key).digest()
        key = key.ljust(block, b"\0")
        self.inner, self.outer = ctor(key.translate(_IPAD)), ctor(key.translate(_OPAD))
        self.inner.update(prefix)

    def digest(self, message):
        """The HMAC of `message` (after the prefix given at the start)."""
        inner = self.inner.copy()
        inner.update(message)
        outer = self.outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def signs(self, wire, mac_len):
        """Whether this key made the HMAC that ends `wire`: its last `mac_len` characters,
        the base64 (unpadded) of digest(the rest).  Compared in constant time.  This runs
        on every packet a flood brings, so digest() is written out again here: one HMAC
        from the precomputed states, one compare, no call more."""
        inner = self.inner.copy()
        inner.update(wire[:-mac_len])
        outer = self.outer.copy()
        outer.update(inner.digest())
        # The digest's base64 without its padding: as many characters as the HMAC has.
        return compare_digest(b2a_base64(outer.digest())[:mac_len], wire[-mac_len:])


def release_heap():
    """Give the C heap's free pages back to the system (glibc's malloc_trim).  After a burst
    of knocks, what Python freed in the heap stays counted in the process's memory
    otherwise (0.8 MB in the packet reader after 10,000 knocks).  Nothing where the C
    library has no malloc_trim."""
    import ctypes
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


class PackedMap(object):
    """A dict of fixed-size keys to one packed number each, all in one table of bytes.

    Open addressing with linear probing, at most four fifths full (a lookup then
    probes 3 slots on average, 13 for a key that is absent).  The entries take at most
    a third of what a dict of small Python objects would (README.md: Performance), and
    a burst of knocks leaves no small objects behind, which would pin the memory the
    burst used for its transient work.  The capacity is not a power of two: a table
    rebuilt is two thirds full, so it grows by a fifth at a time, not twice over.
    `encode(key)` gives `size` bytes (ValueError if it cannot), `decode(raw)` the key
    back.  Deleted entries leave a tombstone until the next rebuild.
    """

    EMPTY, USED, GONE = 0, 1, 2

    def __init__(self, size, encode, decode, value="!I"):
        self.size, self.encode, self.decode = size, encode, decode
        self.value = struct.Struct(value)
        self.slot = 1 + size + self.value.size        # state, key, value
        self.reserved = 0                             # entries the table holds at least
        self._reset(16)

    def _reset(self, capacity):
        # A mapping of its own, private (copied on write in a forked child): when a
        # bigger table replaces it, its memory goes back to the system, where a
        # bytearray would leave a hole in the heap that only small things fill.
        """An empty table of `capacity` slots."""
        self.table = mmap.mmap(-1, self.slot * capacity, flags=mmap.MAP_PRIVATE)
        self.capacity = capacity
        self.count = self.gone = 0

    def _find(self, raw):
        """(offset of raw's slot or None, offset of the first free slot on its path)."""
        table, slot, size, capacity = self.table, self.slot, self.size, self.capacity
        i = hash(raw) % capacity
        free = None
        while True:
            offset = i * slot
            state = table[offset]
            if state == self.EMPTY:
                return None, offset if free is None else free
            if state == self.USED:
                if table[offset + 1:offset + 1 + size] == raw:
                    return offset, None
            elif free is None:
                free = offset
            i = i + 1 if i + 1 < capacity else 0

    def _insert(self, raw, value, free=None):
        """Put a key known to be absent (there is room), in the free slot found for it."""
        if free is None:
            free = self._find(raw)[1]
        if self.table[free] == self.GONE:
            self.gone -= 1
        self.table[free] = self.USED
        self.table[free + 1:free + 1 + self.size] = raw
        self.value.pack_into(self.table, free + 1 + self.size, value)
        self.count += 1

    def __len__(self):
        return self.count

    def _offset(self, key):
        """Where the key's entry is, or None (also for a key that cannot be encoded)."""
        try:
            return self._find(self.encode(key))[0]
        except ValueError:
            return None

    def __contains__(self, key):
        return self._offset(key) is not None

    def get(self, key, default=None):
        """The key's value, or `default`."""
        offset = self._offset(key)
        if offset is None:
            return default
        return self.value.unpack_from(self.table, offset + 1 + self.size)[0]

    def __setitem__(self, key, value):
        self._put(key, value, False)

    def update(self, pairs):
        for key, value in pairs.items():
            self[key] = value

    def raise_to(self, key, value):
        """The key's value becomes `value` if that is larger, or if the key is new."""
        self._put(key, value, True)

    def _put(self, key, value, only_larger):
        """Set the key's value (only_larger: only if larger, or new), growing the table."""
        raw = self.encode(key)
        offset, free = self._find(raw)        # one probe, for a new key too
        if offset is not None:
            if not only_larger or value > self.value.unpack_from(self.table,
                                                                  offset + 1 + self.size)[0]:
                self.value.pack_into(self.table, offset + 1 + self.size, value)
            return
        self._add(raw, value, free)

    def add(self, key, value):
        """Add the key with `value` if it is absent (one probe); False if it is there (then
        nothing changes)."""
        raw = self.encode(key)
        offset, free = self._find(raw)
        if offset is not None:
            return False
        self._add(raw, value, free)
        return True

    def _fits(self, n):
        """Whether n entries (tombstones counted) leave the table at most four fifths full."""
        return 5 * (n + 1) <= 4 * self.capacity

    def _add(self, raw, value, free):
        """Add a key known to be absent, in the free slot found for it, growing the table
        first if it is full (then the slot is found again)."""
        if not self._fits(self.count + self.gone):
            self._rebuild(None)
            free = None
        self._insert(raw, value, free)

    def pop(self, key, default=None):
        """Remove the key (a tombstone stays until the next rebuild); its value."""
        offset = self._offset(key)
        if offset is None:
            return default
        self.table[offset] = self.GONE
        self.count -= 1
        self.gone += 1
        return self.value.unpack_from(self.table, offset + 1 + self.size)[0]

    def _raw_items(self, table=None):
        """(raw key, value) of every entry, slot by slot."""
        table = self.table if table is None else table
        slot, size, unpack = self.slot, self.size, self.value.unpack_from
        for offset in range(0, len(table), slot):
            if table[offset] == self.USED:
                yield bytes(table[offset + 1:offset + 1 + size]), unpack(table, offset + 1 + size)[0]

    def items(self):
        for raw, value in self._raw_items():
            yield self.decode(raw), value

    def keep_if(self, test):
        """Drop the entries whose value fails `test`."""
        if any(not test(value) for _, value in self._raw_items()):
            self._rebuild(test)

    def _rebuild(self, test):
        """A new table holding the entries whose value passes `test`, two thirds full.

        Entries move one at a time, slot by slot, straight from the old table (and no
        tombstones to step over): a list of them all would be 10,000 small objects at
        once, whose memory the allocator would keep.
        """
        old, slot, size = self.table, self.slot, self.size
        keep = [test is None or test(value) for _, value in self._raw_items(old)]
        self._reset(max(16, 3 * (sum(keep) + 1) // 2, 5 * self.reserved // 4 + 2))
        table, capacity, index = self.table, self.capacity, 0
        for offset in range(0, len(old), slot):
            if old[offset] != self.USED:
                continue
            index += 1
            if not keep[index - 1]:
                continue
            i = hash(old[offset + 1:offset + 1 + size]) % capacity
            while table[i * slot] != self.EMPTY:       # a new table has no tombstones
                i = i + 1 if i + 1 < capacity else 0
            table[i * slot:(i + 1) * slot] = old[offset:offset + slot]
        self.count = sum(keep)

    def reserve(self, n):
        """From now on the table has room for `n` entries without growing, pruned or not.
        The room is mapped, not touched: its pages count only as entries fill them."""
        self.reserved = n
        if not self._fits(n):
            self._rebuild(None)


if __name__ == "__main__":
    sys.exit(main())
