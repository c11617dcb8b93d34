"""Coming from fwknop: its files and command lines, read as fwknop reads them.

Each test checks spa.py against the real thing where it can: libfko's own access check
(through ctypes), Debian's fwknop client (its packets, its --save-rc-stanza files, its
command lines) and fwknopd (what it makes of an access.conf).  Also here: errors that
never echo a key (argparse, configparser, the SIGHUP log) and -R's resolve URL served
over https from a network namespace.
"""

import base64
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import example, given, settings, strategies as st

import netns_lab
import spa
from netns_lab import Lab, need_lab, udp_send, wait_for_line
from test_spa import (HMAC_KEY, KEY, SERVICE_PORT, SPA, decide, need_nft, packet, run_spa,
                      server_config, start_server, write_private)

OTHER_KEY = base64.b64encode(b"o" * 64).decode()
SECRETS = (KEY, HMAC_KEY, OTHER_KEY)


def assert_no_key(text):
    """No key, nor a recognisable piece of one (in any case), in `text`."""
    for secret in SECRETS + ("secretpass", "hmacpass"):
        for piece in (secret, secret.lower(), secret[:16], secret[-16:].lower()):
            assert piece not in text and piece.lower() not in text.lower(), text


def fwknop(home, *argv, check=True):
    """The real fwknop client, with $HOME in the test's directory (it writes ~/.fwknoprc and
    ~/.fwknop.run there, never in the real one)."""
    need_lab("fwknop")
    env = dict(os.environ, HOME=str(home), LOGNAME="tester")
    return subprocess.run(["fwknop"] + list(argv), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, check=check)


def fwknop_packet(home, *argv):
    """The packet the real fwknop client makes for argv (-T: not sent; -B: saved)."""
    path = os.path.join(str(home), "fwknop.packet")
    if os.path.exists(path):
        os.unlink(path)
    fwknop(home, *(list(argv) + ["-T", "-B", path]))
    with open(path) as f:
        return f.read().strip().encode()


def spa_packet(home, *argv, env=None):
    """The packet `spa.py client` makes for argv (printed with --test)."""
    done = run_spa("client", "--test", *argv, env=dict(os.environ, HOME=str(home), LOGNAME="tester",
                                                        **(env or {})))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().encode()


def fields(d):
    m = d.message
    return (d.stanza.name, m.username, d.allow_ip, m.access, m.msg_type, m.client_timeout,
            m.digest_type, d.timeout)


# --- the access field, exactly as libfko checks it ------------------------------------------

class Libfko(object):
    """libfko's own check of an access message, through ctypes (Debian's fwknop-client)."""

    def __init__(self):
        try:
            self.lib = ctypes.CDLL("libfko.so.3")
        except OSError:
            netns_lab.need(False, "libfko.so.3 (Debian's fwknop-client) is not installed")
        self.ctx = ctypes.c_void_p()
        assert self.lib.fko_new(ctypes.byref(self.ctx)) == 0
        self.lib.fko_set_spa_message_type.argtypes = [ctypes.c_void_p, ctypes.c_short]
        self.lib.fko_set_spa_message.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        assert self.lib.fko_set_spa_message_type(self.ctx, 1) == 0       # an access message

    def accepts(self, access):
        return self.lib.fko_set_spa_message(self.ctx, ("198.18.0.7," + access).encode()) == 0


_LIBFKO = []


def libfko():
    if not _LIBFKO:
        _LIBFKO.append(Libfko())
    return _LIBFKO[0]


def spa_accepts(access):
    try:
        spa.parse_access(access)
        return True
    except ValueError:
        return False


ITEMS = st.builds(lambda blank, proto, sep, port: blank + proto + sep + port,
                  st.sampled_from(["", "", " ", "\t"]),
                  st.sampled_from(["tcp", "udp", "tcp", "TCP", "Udp", "icmp", "none", "tcpx", "t c p",
                                   "", "tc"]),
                  st.sampled_from(["/", "/", "/", " /", "/ ", "", "//"]),
                  st.one_of(st.integers(0, 99999).map(str),
                            st.sampled_from(["022", "00022", "000022", "2 2", "22 ", "22x", "",
                                             "+22", "-1", "65535", "65536", "\u0662\u0662"])))
ACCESS_TEXTS = st.one_of(st.lists(ITEMS, min_size=1, max_size=3).map(",".join),
                         st.text(alphabet="tcpud/0123456789, TCPx", max_size=16))


@settings(max_examples=400, deadline=None)
@given(ACCESS_TEXTS)
@example("tcp/22")
@example("tcp/22,udp/53")
@example("tcp /22")
@example("t c p/2 2")
@example("tcp/22, udp/53")
@example("tcp/22 ")
@example("TCP/22")
@example("tcp/022")
@example("tcp/22,")
def test_access_field_is_parsed_exactly_as_libfko_parses_it(access):
    """The packet's access field and -A: spa.py takes what libfko takes, nothing else."""
    if "\u0662" in access:         # not ASCII: never in a packet (decide refuses it before)
        assert not spa_accepts(access)
        return
    assert spa_accepts(access) == libfko().accepts(access), access


class RawAccess(spa.Message):
    """A message whose access field is given as text, as a client could write anything."""
    __slots__ = ("raw",)

    def access_text(self):
        return self.raw


@pytest.mark.parametrize("access", ["tcp /22", "t c p/2 2", " tcp/22", "tcp/22 ", "tcp/ 22",
                                    "tcp/22, tcp/23", "tcpx/22"])
def test_authenticated_access_with_blanks_is_refused(tmp_path, access):
    config = server_config(tmp_path, {"a": {"open_ports": "tcp/22, tcp/23"}})
    msg = RawAccess("alice", "0.0.0.0", [])
    msg.raw = access
    wire = spa.seal(msg.encode(), base64.b64decode(KEY), base64.b64decode(HMAC_KEY))
    d = decide(config, wire)
    assert not d.accepted and "expected tcp/PORT or udp/PORT" in d.reason, d.reason
    assert not libfko().accepts(access)
    msg.raw = "tcp/22,tcp/23"
    d = decide(config, spa.seal(msg.encode(), base64.b64decode(KEY), base64.b64decode(HMAC_KEY)))
    assert d.accepted and d.message.access == [("tcp", 22), ("tcp", 23)]


def test_both_clients_refuse_an_access_list_with_blanks(tmp_path):
    """fwknop -A 'tcp/22, tcp/443' fails in libfko; spa.py says so before it builds a packet.
    The server's own lists (protect, open_ports) may have blanks after the commas, as
    fwknopd's OPEN_PORTS may."""
    for access in ("tcp /22", "tcp/22, tcp/443"):
        done = fwknop(tmp_path, "-A", access, "-D", "198.18.0.1", "--key-base64-rijndael", KEY,
                      "--key-base64-hmac", HMAC_KEY, "--use-hmac", "-s", "--no-save-args",
                      "--no-rc-file", "-T", check=False)
        assert done.returncode != 0, "fwknop took -A %r" % access
        done = run_spa("client", "-D", "198.18.0.1", "-A", access, "--key-base64", KEY,
                       "--hmac-key-base64", HMAC_KEY, "--test")
        assert done.returncode == 1 and "no blanks: tcp/22,udp/53" in done.stderr, done.stderr
    config = server_config(tmp_path, {"a": {"open_ports": " tcp/22 , TCP/443"}},
                           protect="tcp/22,  tcp/443")
    assert config.protect == [("tcp", 22), ("tcp", 443)]
    assert config.stanzas[0].open_ports == {("tcp", 22), ("tcp", 443)}


# --- access.conf, as fwknopd reads it ------------------------------------------------------

ACCESS_CONF = """# what tripped spa.py: each stanza is one that fwknopd 2.6.10 loads
SOURCE              ANY;                  ### every address
DESTINATION         ANY
KEY                 secretpass;with a semicolon
HMAC_KEY            hmacpass;
FW_ACCESS_TIMEOUT   0
OPEN_PORTS          tcp/22, udp/53;       ### the list ends at the semicolon

SOURCE              198.18.0.0/16
KEY_BASE64          {key}
HMAC_KEY_BASE64     {hkey}
ENCRYPTION_MODE     ecb

SOURCE              ANY
KEY_BASE64          {key}
HMAC_KEY_BASE64     {hkey}
ENCRYPTION_MODE     legacy

SOURCE              ANY
DESTINATION         198.18.1.1
KEY_BASE64          {key}
HMAC_KEY_BASE64     {hkey}

SOURCE              198.18.5.0/24, ANY
KEY_BASE64          {key}
HMAC_KEY_BASE64     {other}
ENCRYPTION_MODE     CTR
MAX_FW_TIMEOUT      0
"""


def fwknopd_dump(tmp_path, access_conf):
    """`fwknopd -D`: the access.conf as the real fwknopd reads it (it exits non-zero on a
    file it cannot load)."""
    need_lab("fwknopd")
    conf = write_private(tmp_path / "fwknopd.conf", "PCAP_INTF lo;\n")
    done = subprocess.run(["fwknopd", "-c", conf, "-a", access_conf, "-D",
                           "-d", str(tmp_path / "digest"), "-p", str(tmp_path / "pid"),
                           "-r", str(tmp_path)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
    assert done.returncode == 0, done.stdout
    stanzas = re.split(r"\nSOURCE \(\d+\):", done.stdout)[1:]
    return [dict((k.strip(), v.strip()) for k, v in re.findall(r"^\s*([A-Z_ ()]+):\s+(.*)$",
                                                              "SOURCE: " + s, re.M))
            for s in stanzas]


def test_access_conf_stanzas_fwknopd_loads(tmp_path):
    """`;` ends a value (so a passphrase ending in one, and a comment after it), SOURCE ANY;,
    DESTINATION ANY, FW_ACCESS_TIMEOUT 0: read as fwknopd reads them; ECB and legacy mode are
    left out, named, and the rest of the file loads (a DESTINATION too)."""
    path = write_private(tmp_path / "access.conf",
                         ACCESS_CONF.format(key=KEY, hkey=HMAC_KEY, other=OTHER_KEY))
    dumped = fwknopd_dump(tmp_path, path)
    assert [s["SOURCE"] for s in dumped] == ["ANY", "198.18.0.0/16", "ANY", "ANY",
                                             "198.18.5.0/24, ANY"]
    assert (dumped[0]["KEY_LEN"], dumped[0]["HMAC_KEY_LEN"]) == ("10", "8")
    assert dumped[0]["FW_ACCESS_TIMEOUT"] == "30" and dumped[4]["MAX_FW_TIMEOUT"] == "300"

    config = server_config(tmp_path, access_conf=path)
    lines = [n for n, line in enumerate(ACCESS_CONF.splitlines(), 1) if line.startswith("SOURCE")]
    assert [s.name for s in config.stanzas] == ["alice"] + ["access.conf:%d" % lines[i]
                                                            for i in (0, 3, 4)]
    notes = "\n".join(config.notes)
    for n, what in ((lines[1], "ENCRYPTION_MODE ecb"), (lines[2], "ENCRYPTION_MODE legacy")):
        assert "access.conf:%d: stanza left out: spa.py does not support %s" % (n, what) in notes
    # DESTINATION loads (test_nat_modes.py), as fwknopd reads it.
    assert [str(n) for n in config.stanzas[2].destinations] == ["198.18.1.1/32"]
    assert dumped[3]["DESTINATION"] == "198.18.1.1"
    first, last = config.stanzas[1], config.stanzas[3]
    assert (first.key, first.hmac_key, first.sources) == (b"secretpass", b"hmacpass", None)
    assert first.fw_access_timeout == 30 and first.open_ports == {("tcp", 22), ("udp", 53)}
    assert last.sources is None and last.mode == "ctr" and last.max_fw_timeout == 300

    # The real fwknop client's packets open what fwknopd would open.
    wire = fwknop_packet(tmp_path, "-A", "tcp/22", "-D", "198.18.0.1", "--key-rijndael",
                         "secretpass", "--key-hmac", "hmacpass", "--use-hmac", "-s",
                         "--no-save-args", "--no-rc-file")
    d = decide(config, wire)
    assert d.accepted and d.stanza is first and d.timeout == 30, d.reason
    wire = fwknop_packet(tmp_path, "-A", "tcp/22", "-D", "198.18.0.1", "--key-base64-rijndael",
                         KEY, "--key-base64-hmac", OTHER_KEY, "--use-hmac", "-s", "-M", "ctr",
                         "-f", "900", "--no-save-args", "--no-rc-file")
    d = decide(config, wire, source="198.18.77.7")
    assert d.accepted and d.stanza is last and d.timeout == 300, d.reason
    done = run_spa("check-config", "-c", str(tmp_path / "spa.conf"))
    assert "ENCRYPTION_MODE ecb" in done.stdout and "Traceback" not in done.stderr


def test_access_conf_what_cannot_be_read_leaves_out_only_its_stanza(tmp_path):
    """A key fwknopd would take but spa.py cannot (too long a timeout, a bad key) or an
    unknown variable name leave out their stanza, never echoing a key; %include_keys
    brings keys from a file of their own; the last of KEY and KEY_BASE64 counts."""
    write_private(tmp_path / "keys.conf", "KEY_BASE64 %s\nHMAC_KEY_BASE64 %s\nSOURCE ignored\n"
                  % (KEY, OTHER_KEY))
    path = write_private(tmp_path / "access.conf", "\n".join([
        "SOURCE ANY", "KEY_BASE64 %s" % KEY, "HMAC_KEY_BASE64 %s" % HMAC_KEY,
        "FW_ACCESS_TIMEOUT 100000",
        "SOURCE ANY", "KEY_BASE64 !%s" % KEY[1:], "HMAC_KEY_BASE64 %s" % HMAC_KEY,
        "SOURCE ANY", "KEY_BASE64 %s" % KEY, "HMAC_KEY_BASE64 %s" % HMAC_KEY,
        "require_username bob", KEY,
        "SOURCE ANY", "%%include_keys %s" % (tmp_path / "keys.conf"), "REQUIRE_USERNAME bob",
        "SOURCE ANY", "KEY nothing", "KEY_BASE64 %s" % KEY, "HMAC_KEY_BASE64 %s" % OTHER_KEY,
        "HMAC_KEY other", ""]))
    config = server_config(tmp_path, access_conf=path)
    notes = "\n".join(config.notes)
    assert_no_key(notes)
    assert [s.name for s in config.stanzas] == ["alice", "access.conf:13", "access.conf:16"]
    assert "access.conf:1: stanza left out:" in notes and "fw_access_timeout = 100000" in notes
    assert "access.conf:5: stanza left out:" in notes and "not valid base64" in notes
    assert "access.conf:8: stanza left out: require_username is not a variable fwknopd knows" \
        in notes and "line 12 is not a `VARIABLE value` line (not shown" in notes
    included, both = config.stanzas[1], config.stanzas[2]
    assert (included.key, included.hmac_key) == (b"k" * 32, b"o" * 64)
    assert included.require_username == "bob"
    assert (both.key, both.hmac_key) == (b"k" * 32, b"other")


# --- ~/.fwknoprc, as fwknop reads it --------------------------------------------------------

FWKNOPRC = """[default]
HMAC_DIGEST_TYPE    SHA256
SPA_SERVER_PROTO    udp

[web1]
SPA_SERVER          198.18.0.1
ACCESS              tcp/22
KEY_BASE64          {key}
HMAC_KEY_BASE64     {hkey}
ALLOW_IP            source
USE_HMAC            N

[pass]
SPA_SERVER          198.18.0.1
ACCESS              tcp/22;      # a comment after a ; or a # is no part of a value
KEY                 secretpass and the rest of the line
HMAC_KEY            hmacpass#comment
ALLOW_IP            source

[gpg]
SPA_SERVER          198.18.0.1
ACCESS              tcp/22
GPG_EXE             /usr/bin/gpg
KEY_BASE64          {key}
HMAC_KEY_BASE64     {hkey}
"""


def test_fwknoprc_problem_refuses_only_its_section_when_used(tmp_path):
    rc = write_private(tmp_path / ".fwknoprc", FWKNOPRC.format(key=KEY, hkey=HMAC_KEY))
    config = server_config(tmp_path, {"b64": {}, "pass": {
        "key_base64": None, "hmac_key_base64": None, "key": "secretpass", "hmac_key": "hmacpass"}})
    for name, stanza in (("web1", "b64"), ("WEB1", "b64"), ("pass", "pass")):
        ours = spa_packet(tmp_path, "-n", name)
        theirs = fwknop_packet(tmp_path, "-n", name, "--no-save-args")
        d, e = decide(config, ours), decide(config, theirs)
        assert d.accepted and e.accepted, (d.reason, e.reason)
        assert fields(d)[:7] == fields(e)[:7] and d.stanza.name == stanza
    done = run_spa("client", "-c", rc, "-n", "gpg", "--test")
    assert done.returncode == 1 and "[gpg]: GPG_EXE is not supported" in done.stderr
    # [default] is read for every section, by fwknop as by spa.py.
    with open(rc, "a") as f:
        f.write("[Default]\nRAND_PORT Y\n")
    done = run_spa("client", "-c", rc, "-n", "web1", "--test")
    assert done.returncode == 1 and "[default]: RAND_PORT is not supported" in done.stderr
    assert_no_key(done.stderr)


# --- fwknop's command lines -----------------------------------------------------------------

FWKNOP_LINES = [
    # README's interoperability section, as typed
    ["-D", "198.18.0.1", "-A", "tcp/22", "--key-base64-rijndael", KEY, "--key-base64-hmac",
     HMAC_KEY, "--use-hmac", "-s"],
    # what the tests run fwknop with (netns_lab.fwknop_client_argv)
    netns_lab.fwknop_client_argv("198.18.0.1", "tcp/22", KEY, HMAC_KEY, "-U", "fwuser")[1:],
    ["--destination", "198.18.0.1", "--access", "tcp/22,udp/53", "--key-rijndael", "secretpass",
     "--key-hmac", "hmacpass", "--hmac-digest-type", "sha512", "--spoof-user", "bob",
     "--fw-timeout", "45", "--server-port", "40001", "--allow-ip", "198.18.9.9", "-M", "cbc",
     "--no-save-args", "--no-rc-file"],
    ["-D", "198.18.0.1", "-A", "tcp/22", "--key-base64-rijndael", KEY, "--key-base64-hmac",
     OTHER_KEY, "--encryption-mode", "ctr", "--digest-type", "sha384", "-f", "60", "-s",
     "--server-proto", "udp", "--time-offset-minus", "60sec", "--no-save-args"],
    ["--rc-file", "RC", "--named-config", "web1", "-v"],
]


@pytest.mark.parametrize("argv", FWKNOP_LINES, ids=["readme", "netns_lab", "passphrases",
                                                      "modes", "rc-file"])
def test_fwknop_command_lines_work_unchanged(tmp_path, argv):
    """`fwknop ARGS` and `spa.py client ARGS` make packets that a server takes the same way."""
    rc = write_private(tmp_path / "rc", FWKNOPRC.format(key=KEY, hkey=HMAC_KEY))
    argv = [rc if word == "RC" else word for word in argv]
    config = server_config(tmp_path, {
        "b64": {"open_ports": "tcp/22,udp/53"},
        "pass": {"key_base64": None, "hmac_key_base64": None, "key": "secretpass",
                 "hmac_key": "hmacpass", "hmac_digest_type": "sha512", "open_ports": "tcp/22,udp/53"},
        "ctr": {"hmac_key_base64": OTHER_KEY, "encryption_mode": "ctr"}})
    theirs = decide(config, fwknop_packet(tmp_path, *argv))
    ours = decide(config, spa_packet(tmp_path, *argv))
    assert theirs.accepted and ours.accepted, (theirs.reason, ours.reason)
    assert fields(ours) == fields(theirs)
    assert abs(ours.message.timestamp - theirs.message.timestamp) <= 2


def test_fwknop_options_spa_py_does_not_have_are_named_without_their_values(tmp_path):
    for argv, name in ((["--gpg-exe", KEY], "--gpg-exe"),
                       (["--save-packet=" + str(tmp_path / "k")], "--save-packet"),
                       (["-Q", "198.18.0.9"], "-Q"), (["--key-gen"], "--key-gen")):
        done = run_spa("client", "-D", "198.18.0.1", "-A", "tcp/22", "--key-base64-rijndael", KEY,
                       "--key-base64-hmac", HMAC_KEY, *argv)
        assert done.returncode == 2 and "fwknop's %s is not supported" % name in done.stderr
        assert len(done.stderr.splitlines()) == 1
        assert_no_key(done.stderr)
    done = run_spa("client", "-D", "198.18.0.1", "-A", "tcp/22", "--key-base64", KEY,
                   "--hmac-key-base64", HMAC_KEY, "-P", "tcp", "--test")
    assert done.returncode == 1 and "has no tcp or udpraw" in done.stderr


# --- no error echoes a key --------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--bogus", "--key-base64-rijndael", KEY, "--key-base64-hmac", HMAC_KEY],
    ["--key-base64", KEY, "--hmac-key-base64", HMAC_KEY, "stray", OTHER_KEY],
    ["--key=" + KEY, "--hmac-key-base64=" + HMAC_KEY],
    ["--key-base64", KEY, "--hmac-key-base64", HMAC_KEY, "--connect-wait", OTHER_KEY],
    ["--key-base64", KEY, "--hmac-key-base64", HMAC_KEY, "-x" + OTHER_KEY],
], ids=["unknown-option", "stray-words", "ambiguous", "bad-value", "unknown-short"])
def test_command_line_errors_never_echo_a_key(argv):
    done = run_spa("client", "-D", "198.18.0.1", "-A", "tcp/22", *argv)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr
    assert_no_key(done.stderr)


@pytest.mark.parametrize("text,message", [
    ("key_base64 = {key}\n[server]\nprotect = tcp/22\n", "line 1: comes before any [section]"),
    ("[server]\nprotect = tcp/22\n[client a]\nkey_base64 = {key}\n{bare}\n",
     "line 5 (in [client a]): not `name = value`"),
    ("[server]\nprotect = tcp/22\n[client a]\nkey_base64 = {key}\nkey_base64 = {hkey}\n",
     "line 5 (in [client a]): key_base64 is set twice"),
    ("[server]\nprotect = tcp/22\n[client a]\nkey_base64 = {key}\nhmac_key_base64 = {hkey}\n"
     "{other}\n", "unknown option a name not shown"),
])
def test_config_errors_never_echo_a_key(tmp_path, text, message):
    """configparser's own messages quote the line; spa.py reports file, section and line."""
    path = write_private(tmp_path / "spa.conf", text.format(key=KEY, hkey=HMAC_KEY, other=OTHER_KEY,
                                                                bare=HMAC_KEY.rstrip("=")))
    for argv in (["server", "-c", path, "--test"], ["check-config", "-c", path],
                 ["client", "-c", path, "-n", "client a", "--test"]):
        done = run_spa(*argv)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert_no_key(done.stderr + done.stdout)
        assert message in done.stderr, done.stderr


def test_fwknop_files_with_a_pasted_key_never_echo_it(tmp_path):
    rc = write_private(tmp_path / "rc", "[web1]\nSPA_SERVER 198.18.0.1\n%s x\n" % KEY)
    done = run_spa("client", "-c", rc, "-n", "web1", "--test")
    assert done.returncode == 1 and "[web1] line 3 is not a `VARIABLE value` line" in done.stderr
    assert_no_key(done.stderr)
    stanza = "SOURCE ANY\n%s\nKEY_BASE64 %s\nHMAC_KEY_BASE64 %s\n" % (OTHER_KEY, KEY, HMAC_KEY)
    access = write_private(tmp_path / "access.conf", stanza)
    conf = write_private(tmp_path / "spa.conf", "[server]\nprotect = tcp/22\nreplay_cache = %s\n"
                         "saved_firewall = none\naccess_conf = %s\n" % (tmp_path / "r", access))
    done = run_spa("check-config", "-c", conf)       # all left out: the error says why
    assert done.returncode == 1 and "no usable stanza in %s (access.conf:1: stanza left out: " \
        "line 2 is not a `VARIABLE value` line" % access in done.stderr, done.stderr
    assert_no_key(done.stdout + done.stderr)
    write_private(access, stanza + stanza.replace("%s\n" % OTHER_KEY, ""))
    done = run_spa("check-config", "-c", conf)
    assert "note  access.conf: access.conf:1: stanza left out: line 2 is not a" in done.stdout
    assert_no_key(done.stdout + done.stderr)


def test_broken_config_at_sighup_is_logged_without_its_keys(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        server = start_server(lab, tmp_path)
        # A knock handled: the server's loop, and its SIGHUP handler, are in place.
        udp_send(lab.name("cli1"), Lab.srv4(1), spa.DEFAULT_PORT, packet())
        wait_for_line(server, r"accepted packet", 5)
        with open(server.conf) as f:
            text = f.read()
        write_private(server.conf, text + "%s\n" % OTHER_KEY.rstrip("="))
        mark = server.log.mark()
        server.send_signal(signal.SIGHUP)
        wait_for_line(server, r"config reload failed, keeping the running config", 5, since=mark)
        line = [l for l in server.log.text().splitlines() if "reload failed" in l][0]
        assert "line %d (in [client alice])" % (text.count("\n") + 1) in line
        assert_no_key(server.log.text())


# --- -R: RESOLVE_IP_HTTPS, RESOLVE_URL, and https that stays https ----------------------------

# A test CA and a certificate for 198.18.1.1 it signed (EC P-256, valid 2000-2100), made with
# `openssl ca`: the client trusts the CA through SSL_CERT_FILE, as it would a real one.
TEST_CA = """-----BEGIN CERTIFICATE-----
MIIBZjCCAQugAwIBAgIBATAKBggqhkjOPQQDAjAZMRcwFQYDVQQDDA5zcGEucHkg
dGVzdCBDQTAgFw0wMDAxMDEwMDAwMDBaGA8yMTAwMDEwMTAwMDAwMFowGTEXMBUG
A1UEAwwOc3BhLnB5IHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATk
DNcTLXOx+CCn59/SloFYB9Aupg9MJBqYqW0M/qO62AzzTn/gt4CfRWgmoGCIR+dl
kFdtnLxmLh+YVUnRNKnvo0IwQDAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQE
AwIBBjAdBgNVHQ4EFgQUNcd6ujA4LCPpIVx6Mk2dfSQmOjswCgYIKoZIzj0EAwID
SQAwRgIhAP6rHNV8edLRLESNYDyAND8ddIQDxhzPJosxqSa6b/tkAiEA2gsAglde
5+3BMOB/D/40ZobgoCzcA3ANvAf+DKyj8XQ=
-----END CERTIFICATE-----
"""
TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIBpzCCAU2gAwIBAgIBAjAKBggqhkjOPQQDAjAZMRcwFQYDVQQDDA5zcGEucHkg
dGVzdCBDQTAgFw0wMDAxMDEwMDAwMDBaGA8yMTAwMDEwMTAwMDAwMFowFTETMBEG
A1UEAwwKMTk4LjE4LjEuMTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABMaEvxBn
ZDw9SOoPytk9vMnwgh5ly0MLDVRFLQnZ8zbXCiH6jfNnVTbNbc80KZC2Uy1lXd3d
ZLWQrLpScFxH8fOjgYcwgYQwDAYDVR0TAQH/BAIwADAOBgNVHQ8BAf8EBAMCB4Aw
EwYDVR0lBAwwCgYIKwYBBQUHAwEwDwYDVR0RBAgwBocExhIBATAdBgNVHQ4EFgQU
FONq40pWZEFitBLPpmOTyI8O8rwwHwYDVR0jBBgwFoAUNcd6ujA4LCPpIVx6Mk2d
fSQmOjswCgYIKoZIzj0EAwIDSAAwRQIhAN2vQ5O/fEhsHp5vQCQLafVrCQV4eHiR
c6+m2jsYFyzPAiB7ggU+clJVGN3jPzp+SVt8yqfJY5Lu7dkoCKGuvZmHPQ==
-----END CERTIFICATE-----
"""
TEST_CERT_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgy2nncSl0EG4QQyJb
gN3RBbIUzKIFsFCY0qLePgiA5QqhRANCAATGhL8QZ2Q8PUjqD8rZPbzJ8IIeZctD
Cw1URS0J2fM21woh+o3zZ1U2zW3PNCmQtlMtZV3d3WS1kKy6UnBcR/Hz
-----END PRIVATE KEY-----
"""

# What answers the client's -R: https on 8443 (the address, or a redirect), http on 8080.
RESOLVER = r'''
import http.server, ssl, sys, threading
answers = {"/ip": (200, "198.18.77.7"), "/ip2": (200, "your address is 198.18.77.8\n"),
           "/to-http": (302, "http://198.18.1.1:8080/ip"),
           "/to-https": (302, "https://198.18.1.1:8443/ip2"), "/plain": (200, "198.18.66.6")}
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code, text = answers.get(self.path, (404, "no"))
        if self.path == "/agent":
            code, text = 200, "198.18.44.%d" % len(self.headers.get("User-Agent", ""))
        self.send_response(code)
        if code == 302:
            self.send_header("Location", text)
        self.end_headers()
        self.wfile.write(text.encode())
    def log_message(self, *args):
        pass
https = http.server.HTTPServer(("198.18.1.1", 8443), Answer)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
https.socket = context.wrap_socket(https.socket, server_side=True)
plain = http.server.HTTPServer(("198.18.1.1", 8080), Answer)
threading.Thread(target=plain.serve_forever, daemon=True).start()
print("resolver ready", flush=True)
https.serve_forever()
'''


def start_resolver(lab, tmp_path):
    cert = write_private(tmp_path / "cert.pem", TEST_CERT)
    key = write_private(tmp_path / "cert.key", TEST_CERT_KEY)
    (tmp_path / "ca.pem").write_text(TEST_CA)
    proc = lab.spawn("srv", [sys.executable, "-c", RESOLVER, cert, key])
    wait_for_line(proc, r"resolver ready", 10)
    return str(tmp_path / "ca.pem")


def resolve(lab, ca, home, *argv):
    """`spa.py client ... --test -v` in cli1, trusting the test CA: (exit status, allow IP, stderr)."""
    env = dict(os.environ, SSL_CERT_FILE=ca, HOME=str(home))
    done = lab.run("cli1", [sys.executable, SPA, "client", "--test", "-v"] + list(argv),
                   check=False, env=env, timeout=30)
    allow = re.search(r"allow ip\s+(\S+)", done.stderr)
    return done.returncode, allow and allow.group(1), done.stderr


def test_resolve_ip_https_as_fwknop_saves_it(tmp_path):
    """`fwknop -R --save-rc-stanza` writes RESOLVE_IP_HTTPS Y (and RESOLVE_URL with
    --resolve-url): spa.py resolves as fwknop would, or stops and says how to set a URL."""
    need_nft()
    home = tmp_path / "home"
    home.mkdir()
    fwknop(home, "-A", "tcp/22", "--use-hmac", "-R", "-D", "198.18.1.1", "--key-gen",
           "--save-rc-stanza", "-n", "nourl")
    fwknop(home, "-A", "tcp/22", "--use-hmac", "-R", "--resolve-url", "https://198.18.1.1:8443/ip",
           "-D", "198.18.1.1", "--key-gen", "--save-rc-stanza", "-n", "url")
    with open(str(home / ".fwknoprc")) as f:
        rc = f.read()
    assert rc.count("RESOLVE_IP_HTTPS            Y") == 2 and "RESOLVE_URL" in rc
    with Lab(clients=1, prefix="spa") as lab:
        ca = start_resolver(lab, tmp_path)
        status, allow, err = resolve(lab, ca, home, "-n", "nourl")
        assert status == 1 and allow is None
        assert "RESOLVE_IP_HTTPS Y in" in err and "[nourl] asks to open for the public address" in err
        assert "add RESOLVE_URL https://... to that section" in err and "--resolve-url" in err
        assert resolve(lab, ca, home, "-n", "url")[:2] == (0, "198.18.77.7")
        assert resolve(lab, ca, home, "-n", "nourl", "--resolve-url",
                       "https://198.18.1.1:8443/ip")[:2] == (0, "198.18.77.7")
        # -s and -a on the command line choose instead; a URL alone means -R, as for fwknop.
        assert resolve(lab, ca, home, "-n", "url", "-s")[:2] == (0, "0.0.0.0")
        assert resolve(lab, ca, home, "-n", "nourl", "-a", "198.18.9.9")[:2] == (0, "198.18.9.9")
        args = ["-D", "198.18.1.1", "-A", "tcp/22", "--key-base64", KEY, "--hmac-key-base64",
                HMAC_KEY]
        assert resolve(lab, ca, home, "--resolve-url", "https://198.18.1.1:8443/ip",
                       *args)[:2] == (0, "198.18.77.7")
        # -u sets the request's User-Agent (its length comes back as the address's last byte).
        assert resolve(lab, ca, home, "-R", "--resolve-url", "https://198.18.1.1:8443/agent",
                       "-u", "x" * 42, *args)[:2] == (0, "198.18.44.42")


def test_https_resolve_url_that_redirects_away_from_https_is_refused(tmp_path):
    need_nft()
    args = ["-D", "198.18.1.1", "-A", "tcp/22", "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY]
    with Lab(clients=1, prefix="spa") as lab:
        ca = start_resolver(lab, tmp_path)
        home = tmp_path
        assert resolve(lab, ca, home, "-R", "--resolve-url", "https://198.18.1.1:8443/to-https",
                       *args)[:2] == (0, "198.18.77.8")
        status, allow, err = resolve(lab, ca, home, "-R", "--resolve-url",
                                     "https://198.18.1.1:8443/to-http", *args)
        assert status == 1 and allow is None and "198.18.66.6" not in err
        assert "redirected to http://198.18.1.1:8080/ip: refused, only https is followed" in err
        status, allow, err = resolve(lab, ca, home, "-R", "--resolve-url",
                                     "http://198.18.1.1:8080/plain", *args)
        assert (status, allow) == (0, "198.18.66.6") and "not https" in err


# --- A and AAAA: IPv4 first, as fwknop; -4 and -6 --------------------------------------------

def test_name_with_both_kinds_of_address_is_knocked_over_ipv4(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        ns = lab.name("cli1")
        made = not os.path.isdir("/etc/netns")
        os.makedirs("/etc/netns/%s" % ns)
        try:
            # `ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts for what runs in NS.
            with open("/etc/netns/%s/hosts" % ns, "w") as f:
                f.write("%s web1.test\n%s web1.test\n" % (Lab.srv6(1), Lab.srv4(1)))
            for address in (Lab.srv4(1), Lab.srv6(1)):
                lab.tcp_service("srv", address, SERVICE_PORT, banner=b"hello over %s\n"
                                % address.encode())
            server = start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "5"}})
            base = [sys.executable, SPA, "client", "-D", "web1.test", "-A", "tcp/%d" % SERVICE_PORT,
                    "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY, "-U", "alice", "-v"]
            done = lab.run("cli1", base)
            wait_for_line(server, r"accepted packet from %s " % re.escape(Lab.cli4(1)), 3)
            assert re.search(r"sent \d+ bytes to %s udp/62201 \(web1.test also has %s: -6 knocks "
                             r"there; IPv4 goes first, as with fwknop\)" % (
                                 re.escape(Lab.srv4(1)), re.escape(Lab.srv6(1))), done.stderr), \
                done.stderr
            wait_for_line(server, r"accepted packet from %s " % re.escape(Lab.cli4(1)), 3)
            done = lab.run("cli1", base + ["-6"])
            assert re.search(r"sent \d+ bytes to %s udp/62201\n" % re.escape(Lab.srv6(1)),
                             done.stderr), done.stderr
            wait_for_line(server, r"accepted packet from %s " % re.escape(Lab.cli6(1)), 3)
            # --connect goes where the knock went: the IPv4 address here.
            done = lab.run("cli1", base[:3] + ["-A", "tcp/%d" % SERVICE_PORT, "--key-base64", KEY,
                                               "--hmac-key-base64", HMAC_KEY, "-v", "--connect",
                                               "web1.test:%d" % SERVICE_PORT], input="", timeout=20)
            assert done.stdout == "hello over %s\n" % Lab.srv4(1)
            assert "connected to %s port %d" % (Lab.srv4(1), SERVICE_PORT) in done.stderr
            done = lab.run("cli1", base + ["-4", "-D", Lab.srv6(1)], check=False)
            assert done.returncode == 1 and "to an IPv4 address (-4)" in done.stderr
        finally:
            os.unlink("/etc/netns/%s/hosts" % ns)
            os.rmdir("/etc/netns/%s" % ns)
            if made:
                os.rmdir("/etc/netns")


def test_source_port_and_time_offsets(tmp_path):
    """-S sends from the port asked for; --time-offset-plus/minus and TIME_OFFSET move the
    timestamp as fwknop's do (seconds by default, or min, hours, days)."""
    assert [spa.parse_time_offset(t) for t in ("60", "90sec", "5min", "-2hours", "+1day", "")] \
        == [60, 90, 300, -7200, 86400, 0]
    for bad in ("5 weeks", "min", "99999999"):
        with pytest.raises(spa.SpaError, match="time offset"):
            spa.parse_time_offset(bad)
    rc = write_private(tmp_path / "rc", "[web1]\nSPA_SERVER 198.18.0.1\nACCESS tcp/22\n"
                       "KEY_BASE64 %s\nHMAC_KEY_BASE64 %s\nTIME_OFFSET -5min\n" % (KEY, HMAC_KEY))
    config = server_config(tmp_path)
    d = decide(config, spa_packet(tmp_path, "-c", rc, "-n", "web1"), now=time.time())
    assert not d.accepted and "packet age" in d.reason          # 300 s behind: too old
    for argv, shift in ((["-c", rc, "-n", "web1"], -300),
                        (["-c", rc, "-n", "web1", "--time-offset-plus", "1min"], 60)):
        d = decide(config, spa_packet(tmp_path, *argv), now=time.time() + shift)
        assert d.accepted, d.reason
    with Lab(clients=1, prefix="spa") as lab:
        sock = netns_lab.ns_socket(lab.name("srv"), socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((Lab.srv4(1), spa.DEFAULT_PORT))
        sock.settimeout(5)
        lab.run("cli1", [sys.executable, SPA, "client", "-D", Lab.srv4(1), "-A", "tcp/22",
                         "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY, "-S", "40123"])
        data, peer = sock.recvfrom(2048)
        sock.close()
        assert peer == (Lab.cli4(1), 40123) and decide(config, data).accepted
