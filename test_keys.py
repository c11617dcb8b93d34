"""Keys without a command line: --key-file, fwknop's -G/--get-key and --get-hmac-key files,
--stdin and --fd, and ~/.fwknoprc's KEY_FILE and HMAC_KEY_FILE.

Real knocks from a network namespace on spa.py's server in another (nftables, a real TCP
service behind it), with the keys taken from each source, by spa.py's client and by
Debian's fwknop client reading the same files; the refusals (a file others can read,
missing or extra lines, bad base64, ...) are one line each and never show key text.
"""

import base64
import os
import re
import stat
import subprocess
import sys
import time

import pytest

import spa
from netns_lab import Lab, need_lab, tcp_connect_ok, wait_tcp_open
from test_fwknop import fwknop_packet, spa_packet
from test_spa import HMAC_KEY, KEY, SERVICE_PORT, SPA, decide, need_nft, run_spa, write_private

PASS, HPASS = "encpass-Zq81", "hmacpass-Xw42"        # passphrases (fwknop's KEY, HMAC_KEY)
BAD = base64.b64encode(b"w" * 32).decode()           # a key no stanza has
SECRETS = (KEY, HMAC_KEY, PASS, HPASS, BAD, "NOTBASE64KEYTEXT")
SERVER = Lab.srv4(1)
ACCESS = "tcp/%d" % SERVICE_PORT


def assert_no_key(text):
    """No key, nor a recognisable piece of one, in `text`."""
    for secret in SECRETS:
        for piece in (secret, secret[:12], secret[-12:]):
            assert piece.lower() not in text.lower(), text


def key_lines(key=KEY, hmac_key=HMAC_KEY):
    """A key file as `fwknop -k` prints one."""
    return "KEY_BASE64: %s\nHMAC_KEY_BASE64: %s\n" % (key, hmac_key)


def stanzas_config(tmp_path, **stanzas):
    """A server config (spa.py's INI) with the stanzas given as {name: {option: value}}."""
    lines = ["[server]", "protect = tcp/%d" % SERVICE_PORT, "interface = any",
             "replay_cache = %s" % (tmp_path / "replay.cache")]
    for name, options in stanzas.items():
        lines.append("[client %s]" % name)
        lines += ["%s = %s" % kv for kv in options.items()]
    return write_private(tmp_path / "spa.conf", "\n".join(lines) + "\n")


B64 = {"key_base64": KEY, "hmac_key_base64": HMAC_KEY, "fw_access_timeout": "2"}
PASSPHRASES = {"key": PASS, "hmac_key": HPASS, "fw_access_timeout": "2"}


def files(tmp_path):
    """The key files of the tests: --key-file's, and fwknop's -G and --get-hmac-key files
    (several servers, comments and blanks, as fwknop's man page describes them)."""
    other = "198.18.1.10: %s\n# %s: commented out\n" % (BAD, SERVER)
    return (write_private(tmp_path / "keys", key_lines()),
            write_private(tmp_path / "get-key", other + "%s: %s\n" % (SERVER, PASS)),
            write_private(tmp_path / "get-hmac-key", other + "%s:%s\n" % (SERVER, HPASS)))


# --- real knocks: each source opens the port --------------------------------------------------

def knock_opens(lab, server, argv, stanza, client="spa", **kw):
    """The service is closed; a knock with `argv` opens it (through `stanza`); then it
    closes again (the stanzas' fw_access_timeout is 2 s)."""
    ns = lab.name("cli1")
    assert not tcp_connect_ok(ns, SERVER, SERVICE_PORT), "open before the knock"
    mark = server.log.mark()
    if client == "spa":
        argv = [sys.executable, SPA, "client", "-D", SERVER, "-A", "tcp/%d" % SERVICE_PORT,
                "-U", "alice"] + argv
    done = lab.run("cli1", argv, check=False, **kw)
    assert done.returncode == 0, done.stderr
    assert_no_key(done.stdout + done.stderr)
    server.log.wait(r"accepted packet from %s \[client %s\]" % (re.escape(Lab.cli4(1)), stanza),
                    5, since=mark)
    assert wait_tcp_open(ns, SERVER, SERVICE_PORT, 3) is not None, "the knock did not open"
    end = time.monotonic() + 8
    while tcp_connect_ok(ns, SERVER, SERVICE_PORT) and time.monotonic() < end:
        time.sleep(0.2)


def test_knocks_with_keys_from_each_source(tmp_path):
    need_nft()
    need_lab("fwknop")
    keys, get_key, get_hmac_key = files(tmp_path)
    rc = write_private(tmp_path / "fwknoprc", "[web1]\nSPA_SERVER %s\nACCESS tcp/%d\n"
                       "KEY_FILE %s\nHMAC_KEY_FILE %s\n" % (SERVER, SERVICE_PORT, get_key,
                                                             get_hmac_key))
    conf = stanzas_config(tmp_path, b64=B64, passphrases=PASSPHRASES)
    env = dict(os.environ, HOME=str(tmp_path), LOGNAME="alice")
    with Lab(clients=1, prefix="ky") as lab:
        lab.tcp_service("srv", SERVER, SERVICE_PORT)
        server = lab.spawn("srv", [sys.executable, SPA, "server", "-c", conf, "-v"])
        server.log.wait(r"listening on", 15)
        knock_opens(lab, server, ["--key-file", keys], "b64")
        knock_opens(lab, server, ["--stdin"], "b64", input=key_lines())
        read_end, write_end = os.pipe()
        os.write(write_end, key_lines().encode())
        os.close(write_end)
        try:
            knock_opens(lab, server, ["--fd", str(read_end)], "b64", pass_fds=(read_end,))
        finally:
            os.close(read_end)
        knock_opens(lab, server, ["-G", get_key, "--get-hmac-key", get_hmac_key], "passphrases")
        knock_opens(lab, server, ["--stdin", "--get-hmac-key", get_hmac_key], "passphrases",
                    input=PASS + "\n")
        knock_opens(lab, server, ["-c", rc, "-n", "web1"], "passphrases")
        # The fwknop client, with the same files (its $HOME in the test's directory).
        fw = ["fwknop", "-D", SERVER, "-A", "tcp/%d" % SERVICE_PORT, "-s", "--use-hmac"]
        knock_opens(lab, server, fw + ["-G", get_key, "--get-hmac-key", get_hmac_key],
                    "passphrases", client="fwknop", env=env)
        knock_opens(lab, server, fw + ["--stdin", "--get-hmac-key", get_hmac_key],
                    "passphrases", client="fwknop", env=env, input=PASS + "\n")


# --- the same files, read as fwknop reads them ------------------------------------------------

def test_get_key_file_is_read_as_fwknop_reads_it(tmp_path):
    """fwknop's -G and --get-hmac-key files: the line for -D's host as given (not a longer
    name that starts with it), the last such line, blanks and '=' skipped, comments left out;
    fwknop and spa.py pick the same passphrases."""
    candidates = ["pw-%d" % n for n in range(6)]
    config = spa.ServerConfig(stanzas_config(
        tmp_path, **dict(("c%d" % n, {"key": pw, "hmac_key": "h-" + pw})
                         for n, pw in enumerate(candidates))))
    text = ("# fwknop keys\n198.18.1.10: pw-0\n; 198.18.1.1: pw-1\n  = 198.18.1.1 : pw-2\n"
            "198.18.1.1: pw-3\nweb1: pw-4\n\t=198.18.1.1:= pw-5\n")
    get_key = write_private(tmp_path / "get-key", text)
    get_hmac_key = write_private(tmp_path / "get-hmac-key", text.replace("pw-", "h-pw-"))
    argv = ["-D", SERVER, "-A", ACCESS, "-a", "198.18.1.2", "-G", get_key,
            "--get-hmac-key", get_hmac_key]
    theirs = decide(config, fwknop_packet(tmp_path, *(argv + ["--use-hmac"])))
    ours = decide(config, spa_packet(tmp_path, *argv))
    assert theirs.accepted and ours.accepted, (theirs.reason, ours.reason)
    assert theirs.stanza.name == ours.stanza.name == "c5"
    argv[1] = "web1"                  # not resolved: -T; the line for web1 is pw-4
    ours = decide(config, spa_packet(tmp_path, *argv))
    assert ours.accepted and ours.stanza.name == "c4"


def test_stdin_gives_one_passphrase_as_for_fwknop_or_both_keys_as_lines(tmp_path):
    """fwknop's --stdin reads one line, the encryption passphrase (a second key is not read:
    its client fails when it needs the HMAC key from stdin too); spa.py reads the same line,
    or KEY_BASE64 and HMAC_KEY_BASE64 lines for both keys.  A passphrase that starts with
    KEY stays a passphrase."""
    config = spa.ServerConfig(stanzas_config(tmp_path, b64=B64, passphrases=PASSPHRASES,
                                             lime={"key": "KEY lime", "hmac_key": "hmac-lime"}))
    argv = ["-D", SERVER, "-A", ACCESS, "-a", "198.18.1.2"]
    for stdin, extra, stanza in ((PASS + "\r\nignored\n", ["--key-hmac", HPASS], "passphrases"),
                                 (PASS, ["--key-hmac", HPASS], "passphrases"),
                                 ("KEY lime\n", ["--key-hmac", "hmac-lime"], "lime"),
                                 (key_lines(), [], "b64"),
                                 ("\n" + key_lines(), ["--key-hmac", HPASS], None)):
        done = run_spa("client", "--test", "--stdin", *(argv + extra), input=stdin)
        if stanza is None:            # an empty first line: no key
            assert done.returncode == 1 and "first line, the encryption passphrase, is empty" \
                in done.stderr
            continue
        assert done.returncode == 0, done.stderr
        d = decide(config, done.stdout.strip().encode())
        assert d.accepted and d.stanza.name == stanza, d.reason
    need_lab("fwknop")
    done = subprocess.run(["fwknop"] + argv + ["--stdin", "--use-hmac", "-T"],
                          input=PASS + "\n" + HPASS + "\n", universal_newlines=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=dict(os.environ, HOME=str(tmp_path)))
    assert "getpasswd() key error" in done.stdout, done.stdout


def test_each_key_comes_from_the_first_place_that_gives_it(tmp_path):
    """The command line before the section, the section before [default]; a key file is
    read only when used; one place that gives a key twice is an error."""
    config = spa.ServerConfig(stanzas_config(tmp_path, b64=B64, passphrases=PASSPHRASES))
    keys, get_key, get_hmac_key = files(tmp_path)
    rc = write_private(tmp_path / "rc", "[default]\nKEY_FILE %s\n[web1]\nSPA_SERVER %s\n"
                       "ACCESS tcp/8022\nKEY_BASE64 %s\nHMAC_KEY_BASE64 %s\n[web2]\nSPA_SERVER "
                       "%s\nACCESS tcp/8022\nHMAC_KEY_FILE %s\n" % (
                           get_key, SERVER, BAD, HMAC_KEY, SERVER, get_hmac_key))
    ini = write_private(tmp_path / "spa.ini", "[web1]\ndestination = %s\naccess = tcp/8022\n"
                        "key_file = %s\n[web3]\ndestination = %s\naccess = tcp/8022\n"
                        "key_file = %s\n" % (SERVER, keys, SERVER, tmp_path / "missing"))
    for argv, stanza in ((["-c", rc, "-n", "web1", "--key-file", keys], "b64"),
                         (["-c", rc, "-n", "web2"], "passphrases"),         # [default]'s -G
                         (["-c", ini, "-n", "web1"], "b64"),
                         (["-c", ini, "-n", "web3", "--key-file", keys], "b64")):
        d = decide(config, spa_packet(tmp_path, "-a", "198.18.1.2", *argv))
        assert d.accepted and d.stanza.name == stanza, (argv, d.reason)
    done = run_spa("client", "-c", rc, "-n", "web1", "-a", "198.18.1.2", "--test")
    assert done.returncode == 0           # the section's wrong key wins over [default]'s file
    assert not decide(config, done.stdout.strip().encode()).accepted


REFUSALS = [
    (["--key-file", "{mode644}"], "readable by group or others (mode 0644): run 'chmod 600"),
    (["-G", "{getkey644}", "--key-hmac", HPASS], "readable by group or others (mode 0644)"),
    (["--stdin"], "stdin holds keys but is readable by group or others (mode 0644)"),
    (["--key-file", "{nohmac}"], "has no HMAC_KEY_BASE64 line (nor HMAC_KEY): spa.py always"),
    (["--key-file", "{nokey}"], "has no KEY_BASE64 line (nor KEY): no encryption key"),
    (["--key-file", "{badb64}"], "line 1: KEY_BASE64 is not valid base64"),
    (["--key-file", "{short}"], "line 2: HMAC_KEY_BASE64 decodes to 200 bytes; 1 to 128"),
    (["--key-file", "{pasted}"], "line 2: not a KEY_BASE64 or HMAC_KEY_BASE64 line (not shown"),
    (["--key-file", "{twice}"], "line 3: KEY_BASE64 gives the encryption key again (line 1"),
    (["--key-file", "{empty}"], "line 1: KEY_BASE64 has no value"),
    (["--key-file", "{missing}"], "cannot read"),
    (["-G", "{getkey}", "-D", "198.18.1.99", "--key-hmac", HPASS],
     "has no `198.18.1.99: passphrase` line (-G/--get-key)"),
    (["--get-hmac-key", "{getkey}", "--key-rijndael", PASS, "-D", "198.18.1.1x"],
     "has no `198.18.1.1x: passphrase` line (--get-hmac-key)"),
    (["--stdin", "--stdin-input={badb64text}"], "stdin line 1: KEY_BASE64 is not valid base64"),
    (["--stdin", "--stdin-input=" + PASS + "\n"], "no HMAC key: the first line of stdin is"),
    (["--fd", "97"], "file descriptor 97 (--fd): Bad file descriptor"),
    (["--stdin", "--fd", "0", "--stdin-input=x"], "give --stdin or --fd N, not both"),
    (["--stdin", "--connect", "198.18.1.1:22", "--stdin-input=x"], "--connect relays stdin"),
    (["--key-file", "{keys}", "--key-base64", KEY],
     "the command line gives the encryption key twice (--key-base64 and --key-file)"),
    (["--key-file", "{keys}", "--stdin", "--stdin-input={keystext}"],
     "the command line gives the encryption key twice (--key-file and --stdin/--fd)"),
]


@pytest.mark.parametrize("argv,message", REFUSALS, ids=[
    "key-file-0644", "get-key-0644", "stdin-file-0644", "no-hmac-line", "no-key-line",
    "bad-base64", "hmac-too-long", "pasted-key", "key-twice", "no-value", "missing-file",
    "get-key-no-line", "get-hmac-key-longer-name", "stdin-bad-base64", "stdin-no-hmac",
    "bad-fd", "stdin-and-fd", "stdin-and-connect", "two-ways", "file-and-stdin"])
def test_refusals_are_one_line_without_key_text(tmp_path, argv, message):
    paths = {
        "keys": key_lines(), "mode644": key_lines(), "nohmac": "KEY_BASE64: %s\n" % KEY,
        "nokey": "# only one\nHMAC_KEY_BASE64: %s\n" % HMAC_KEY,
        "badb64": "KEY_BASE64: NOTBASE64KEYTEXT!%s\nHMAC_KEY_BASE64: %s\n" % (KEY, HMAC_KEY),
        "short": "KEY_BASE64: %s\nHMAC_KEY_BASE64: %s\n" % (KEY, base64.b64encode(b"h" * 200)
                                                          .decode()),
        "pasted": "KEY_BASE64: %s\n%s\n" % (KEY, HMAC_KEY),
        "twice": key_lines() + "KEY_BASE64: %s\n" % BAD, "empty": "KEY_BASE64:\n",
        "getkey": "%s: %s\n198.18.1.1: %s\n" % (SERVER, PASS, HPASS),
        "getkey644": "%s: %s\n" % ("198.18.1.99", PASS)}
    for name, text in paths.items():
        write_private(tmp_path / name, text)
    os.chmod(str(tmp_path / "mode644"), 0o644)
    os.chmod(str(tmp_path / "getkey644"), 0o644)
    values = dict((n, str(tmp_path / n)) for n in list(paths) + ["missing"])
    values.update(badb64text=paths["badb64"], keystext=key_lines())
    argv = [a.format(**values) for a in argv]
    stdin = [a.split("=", 1)[1] for a in argv if a.startswith("--stdin-input=")]
    argv = [a for a in argv if not a.startswith("--stdin-input=")]
    with open(values["mode644"]) as f644:
        done = run_spa("client", "-D", SERVER, "-A", ACCESS, "--test", *argv,
                       **({"input": stdin[0]} if stdin else {"stdin": f644}))
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("spa.py client: error: ") and done.stderr.count("\n") == 1
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert_no_key(done.stderr)


def test_a_private_file_on_stdin_and_the_limit(tmp_path):
    """A key file of mode 0600 may be given on stdin; more than 64 KiB is refused."""
    path = write_private(tmp_path / "keys", key_lines())
    with open(path) as f:
        done = run_spa("client", "-D", SERVER, "-A", ACCESS, "--test", "--stdin", stdin=f)
    assert done.returncode == 0, done.stderr
    done = run_spa("client", "-D", SERVER, "-A", ACCESS, "--test", "--stdin",
                   input=key_lines() + "# padding\n" * 7000)
    assert done.returncode == 1 and "more than 65536 bytes" in done.stderr


def test_without_posix_modes_a_key_file_is_read_and_listed_as_unchecked(tmp_path, monkeypatch):
    """Windows (no os.geteuid): the modes say nothing, so the file is read and listed in
    UNCHECKED_FILES, for the client's note; the same for a file on a descriptor."""
    path = str(tmp_path / "keys")
    with open(path, "w") as f:
        f.write(key_lines())
    os.chmod(path, 0o644)
    with pytest.raises(spa.SpaError, match="readable by group or others"):
        spa.read_private_text(path)
    monkeypatch.delattr(spa.os, "geteuid")
    monkeypatch.setattr(spa, "UNCHECKED_FILES", [])
    assert spa.read_key_lines(spa.read_private_text(path), path) == {
        "key_base64": KEY, "hmac_key_base64": HMAC_KEY}
    fd = os.open(path, os.O_RDONLY)
    try:
        assert spa.read_key_stream(fd, "stdin") == {"key_base64": KEY,
                                                    "hmac_key_base64": HMAC_KEY}
    finally:
        os.close(fd)
    assert spa.UNCHECKED_FILES == [path, "stdin"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_get_key_needs_the_destination_and_a_stream_must_be_text(tmp_path):
    get_key = write_private(tmp_path / "get-key", "%s: %s\n" % (SERVER, PASS))
    done = run_spa("client", "-A", ACCESS, "--test", "-G", get_key, "--key-hmac", HPASS)
    assert done.returncode == 1 and "give the server with -D HOST" in done.stderr
    done = subprocess.run([sys.executable, SPA, "client", "-D", SERVER, "-A", ACCESS, "--test",
                           "--stdin", "--key-hmac", HPASS], input=b"\xff" + PASS.encode() + b"\n",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert done.returncode == 1 and b"stdin is not UTF-8 text (byte 0)" in done.stderr
    assert_no_key(done.stderr.decode())
