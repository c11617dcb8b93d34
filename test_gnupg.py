"""fwknop's GnuPG mode: packets encrypted to the server's GnuPG key and signed by the
client's, with the HMAC kept.  Real gpg keyrings (made once for the module: RSA 2048), the
real gpg binary, spa.py's server in network namespaces behind real nftables, and the real
fwknop client and fwknopd 2.6.10 in GnuPG mode, both ways."""

import base64
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

import netns_lab
import spa
from netns_lab import Lab, need_lab, udp_send, wait_for_line, wait_tcp_open
from test_spa import HMAC_KEY, SERVICE_PORT, SPA, closed, need_nft, run_spa, write_private

DECRYPT_PW = "decrypt-pass"    # the second server key's
SIGN_PW = "signpass"           # the client's signing key's passphrase


def gpg(home, *argv, data=None):
    done = subprocess.run(["gpg", "--batch", "--no-tty", "--homedir", home] + list(argv),
                          input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def make_key(home, uid, passphrase=""):
    """One RSA 2048 key that signs and encrypts; returns its fingerprint."""
    gpg(home, "--pinentry-mode", "loopback", "--passphrase", passphrase, "--quick-gen-key", uid,
        "rsa2048", "sign,encr", "never")
    out = gpg(home, "--with-colons", "--list-secret-keys", uid).decode()
    return [line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")][0]


class Keys(object):
    """Three keyrings: the server's (its key, the client's public one and a stranger's),
    the client's (its key with a passphrase, the server's public one), a stranger's."""


@pytest.fixture(scope="module")
def keys():
    netns_lab.need(shutil.which("gpg") is not None, "gpg (GnuPG) is not installed")
    k = Keys()
    k.base = tempfile.mkdtemp(prefix="gp", dir="/tmp")   # short: gpg-agent's socket paths
    k.server, k.client, k.stranger = (os.path.join(k.base, n) for n in ("s", "c", "x"))
    for home in (k.server, k.client, k.stranger):
        os.mkdir(home, 0o700)
    k.server_fpr = make_key(k.server, "spa server <server@example.org>")
    k.client_fpr = make_key(k.client, "spa client <client@example.org>", SIGN_PW)
    k.stranger_fpr = make_key(k.stranger, "stranger <x@example.org>")
    # A second server key, with a passphrase (gpg_decrypt_pw).
    k.locked_fpr = make_key(k.server, "spa locked <locked@example.org>", DECRYPT_PW)
    gpg(k.client, "--import", data=gpg(k.server, "--export", k.locked_fpr))
    gpg(k.client, "--import", data=gpg(k.server, "--export", k.server_fpr))
    gpg(k.stranger, "--import", data=gpg(k.server, "--export", k.server_fpr))
    for home, fpr in ((k.client, k.client_fpr), (k.stranger, k.stranger_fpr)):
        gpg(k.server, "--import", data=gpg(home, "--export", fpr))
    # fwknopd weighs the web of trust: the server vouches for the client's key.
    gpg(k.server, "--quick-lsign-key", k.client_fpr)
    yield k
    for home in (k.server, k.client, k.stranger):
        subprocess.call(["gpgconf", "--homedir", home, "--kill", "gpg-agent"])
    shutil.rmtree(k.base, ignore_errors=True)


def gpg_user():
    """The user the server's gpg runs as: spa-gpg (install makes it), else daemon."""
    for name in ("spa-gpg", "daemon"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    netns_lab.need(False, "no user spa-gpg or daemon")


def stanza(keys, **options):
    merged = {"hmac_key_base64": HMAC_KEY, "gpg_home_dir": keys.server,
              "gpg_decrypt_id": keys.server_fpr, "gpg_allow_no_pw": "yes",
              "gpg_fingerprint_id": keys.client_fpr,
              "open_ports": "tcp/%d" % SERVICE_PORT, "fw_access_timeout": "5"}
    merged.update(options)
    return {k: v for k, v in merged.items() if v is not None}


def write_config(path, stanzas, **server):
    opts = {"protect": "tcp/%d" % SERVICE_PORT, "interface": "any",
            "replay_cache": str(path.parent / "replay.cache"), "gpg_user": gpg_user()}
    opts.update(server)
    lines = ["[server]"] + ["%s = %s" % kv for kv in opts.items()]
    for name, options in stanzas.items():
        lines.append("[client %s]" % name)
        lines += ["%s = %s" % kv for kv in options.items()]
    return write_private(path, "\n".join(lines) + "\n")


def fwknoprc(tmp_path, keys, server="198.18.1.1", signer=None, home=None, **extra):
    """A ~/.fwknoprc section [srv] for GnuPG mode: fwknop's client and spa.py's read it."""
    rows = {"SPA_SERVER": server, "ACCESS": "tcp/%d" % SERVICE_PORT, "USE_GPG": "Y",
            "GPG_RECIPIENT": keys.server_fpr, "GPG_SIGNER": signer or keys.client_fpr,
            "GPG_HOMEDIR": home or keys.client, "GPG_SIGNING_PW": SIGN_PW,
            "HMAC_KEY_BASE64": HMAC_KEY, "USE_HMAC": "Y", "ALLOW_IP": "source"}
    rows.update(extra)
    text = "[srv]\n" + "".join("%s %s\n" % kv for kv in rows.items() if kv[1] is not None)
    return write_private(tmp_path / "fwknoprc", text)


def spa_gpg_packet(tmp_path, keys, *argv, **rc):
    rc_file = fwknoprc(tmp_path, keys, **rc)
    done = run_spa("client", "-c", rc_file, "-n", "srv", "--test", *argv)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().encode()


def fwknop_gpg_packet(tmp_path, keys, *argv):
    need_lab("fwknop")
    rc_file = fwknoprc(tmp_path, keys)
    out = str(tmp_path / "fwknop.packet")
    done = subprocess.run(["fwknop", "--rc-file", rc_file, "-n", "srv", "--no-save-args", "-T",
                           "-B", out] + list(argv), env=dict(os.environ, HOME=str(tmp_path)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=60)
    # With -T, fwknop decrypts its own packet as a check, which needs the server's secret
    # key: "No secret key" is the one failure it may report.
    assert done.returncode == 0 or "GPG ERR: No secret key" in done.stderr, done.stderr
    with open(out) as f:
        return f.read().strip().encode()


@pytest.fixture
def served(keys, tmp_path):
    """decide(wire, **stanza options) -> Decision, on a config whose gpg runs as gpg_user on
    a private copy of the server's keyring (ServerConfig.start_gpg, as the server does)."""
    configs = []

    def decide(wire, seen=lambda key: False, **options):
        config = spa.ServerConfig(write_config(tmp_path / ("c%d.conf" % len(configs)),
                                               {"alice": stanza(keys, **options)}))
        configs.append(config)
        config.start_gpg()
        return spa.decide(wire, "198.18.1.2", None, config.stanzas, seen, 120)
    yield decide
    for config in configs:
        config.stop_gpg()


def test_a_gpg_packet_is_fwknops_format_and_opens(keys, tmp_path, served):
    """spa.py's packet: 400-1500 characters, "hQ" cut off, the HMAC over the text with it;
    the server's gpg (as gpg_user, on a private copy) decrypts it and checks the signer."""
    wire = spa_gpg_packet(tmp_path, keys, "--gpg-signer-key", keys.client_fpr)
    assert spa.MIN_GPG_WIRE_LEN <= len(wire) <= spa.MAX_GPG_WIRE_LEN
    assert not wire.startswith(b"hQ")
    text, mac = b"hQ" + wire[:-43], wire[-43:]
    assert spa.hmac_b64(base64.b64decode(HMAC_KEY), text, "sha256") == mac
    raw = spa.b64decode(text)
    assert raw[:2] == b"\x85\x01"           # a public-key session key packet, 2048 bits
    d = served(wire)
    assert d.accepted, d.reason
    assert d.message.access == [("tcp", SERVICE_PORT)] and d.replay_key
    # Replayed: refused before gpg runs.
    d = served(wire, seen=lambda key: True)
    assert not d.accepted and d.reason == "replayed packet" and d.replay_key is None


def test_the_signer_decides(keys, tmp_path, served):
    """gpg_require_sig (on by default): only a good signature by a listed key opens."""
    wire = spa_gpg_packet(tmp_path, keys)
    assert served(wire, gpg_fingerprint_id=keys.stranger_fpr).reason == \
        "signed by %s, which is not in gpg_fingerprint_id" % keys.client_fpr
    d = served(wire, gpg_fingerprint_id=None, gpg_remote_id=keys.client_fpr[-8:])
    assert d.accepted, d.reason
    assert "not in gpg_remote_id" in served(wire, gpg_fingerprint_id=None,
                                            gpg_remote_id=keys.stranger_fpr[-16:]).reason
    # A stranger whose key the server holds signs a packet to the server's key.
    stranger = spa_gpg_packet(tmp_path, keys, signer=keys.stranger_fpr, home=keys.stranger,
                              GPG_SIGNING_PW=None, GPG_NO_SIGNING_PW="Y")
    assert "which is not in gpg_fingerprint_id" in served(stranger).reason
    # Unsigned: refused, unless gpg_require_sig is off.
    unsigned = spa_gpg_packet(tmp_path, keys, GPG_SIGNER=None, GPG_SIGNING_PW=None)
    d = served(unsigned)
    assert not d.accepted and d.reason == "not signed, and gpg_require_sig is on"
    assert d.replay_key is None
    d = served(unsigned, gpg_require_sig="no", gpg_fingerprint_id=None)
    assert d.accepted, d.reason


def sealed(raw):
    """The wire text of a raw OpenPGP message, as gpg_seal makes it, with the test HMAC key."""
    text = spa.b64encode(raw)
    assert text.startswith(b"hQ")
    return text[2:] + spa.hmac_b64(base64.b64decode(HMAC_KEY), text, "sha256")


def test_a_server_key_with_a_passphrase(keys, tmp_path, served):
    """gpg_decrypt_pw reaches gpg through a pipe; a wrong one opens nothing; a packet for
    another key of the keyring than gpg_decrypt_id's is refused."""
    wire = spa_gpg_packet(tmp_path, keys, GPG_RECIPIENT=keys.locked_fpr)
    locked = dict(gpg_decrypt_id=keys.locked_fpr, gpg_allow_no_pw=None)
    d = served(wire, gpg_decrypt_pw=DECRYPT_PW, **locked)
    assert d.accepted, d.reason
    d = served(wire, gpg_decrypt_pw="wrong", **locked)
    assert not d.accepted and d.reason == "gpg could not decrypt it: wrong or no gpg_decrypt_pw"
    assert d.replay_key is None
    d = served(wire, gpg_decrypt_pw=DECRYPT_PW, gpg_allow_no_pw=None,
               gpg_decrypt_id=keys.server_fpr[-16:])
    assert d.reason == "encrypted to %s, not to gpg_decrypt_id" % keys.locked_fpr


def test_a_passphrase_alone_opens_nothing(keys, served):
    """A message that gpg opens with the passphrase it is given (a symmetric session key
    next to one for a key the server lacks), not with a key of the keyring: refused."""
    raw = gpg(keys.stranger, "--pinentry-mode", "loopback", "--passphrase", DECRYPT_PW,
              "--trust-model", "always", "--encrypt", "--symmetric", "-r", keys.stranger_fpr,
              data=b"1234567890123456:" + b"x" * 60)
    d = served(sealed(raw), gpg_decrypt_pw=DECRYPT_PW, gpg_allow_no_pw=None,
               gpg_require_sig="no", gpg_fingerprint_id=None)
    assert not d.accepted and d.replay_key is None
    assert d.reason == "gpg decrypted it without a key of the keyring"


def test_gpg_reads_only_authenticated_bytes(keys, tmp_path, served, monkeypatch):
    """A packet whose HMAC does not match never reaches gpg; one that does, but that gpg
    cannot decrypt, is refused and not recorded."""
    wire = spa_gpg_packet(tmp_path, keys)
    runs = []
    real = spa.GnuPG.run
    monkeypatch.setattr(spa.GnuPG, "run", lambda self, *a: runs.append(a) or real(self, *a))
    flipped = wire[:100] + (b"A" if wire[100:101] != b"A" else b"B") + wire[101:]
    d = served(flipped)
    assert d.reason == "HMAC does not match any stanza for this source" and runs == []
    mac = spa.hmac_b64(base64.b64decode(HMAC_KEY), b"hQ" + flipped[:-43], "sha256")
    d = served(flipped[:-43] + mac)
    assert len(runs) == 1 and not d.accepted and d.replay_key is None
    assert d.reason.startswith("gpg could not decrypt it") or "not a message" in d.reason \
        or "not valid base64" in d.reason


def test_the_keyring_copy_is_gpg_users_alone(keys, tmp_path):
    config = spa.ServerConfig(write_config(tmp_path / "spa.conf", {"alice": stanza(keys)}))
    config.start_gpg()
    try:
        copy = config.gpg_copies[0]
        st = os.stat(copy)
        assert st.st_uid == pwd.getpwnam(gpg_user()).pw_uid and st.st_mode & 0o777 == 0o700
        assert config.stanzas[0].gpg.user == gpg_user()
        assert config.longest_wire == spa.MAX_GPG_WIRE_LEN
    finally:
        config.stop_gpg()
    assert not os.path.exists(copy)
    os.chmod(keys.server, 0o755)
    try:
        with pytest.raises(spa.SpaError, match="only root may open"):
            config.start_gpg()
    finally:
        os.chmod(keys.server, 0o700)
    missing = spa.ServerConfig(write_config(tmp_path / "missing.conf", {"alice": stanza(keys)},
                                            gpg_user="no-such-gpg-user"))
    with pytest.raises(spa.SpaError, match="no user no-such-gpg-user, which gpg runs as"):
        missing.start_gpg()
    # Never as root, nor as the packet reader's user.
    for user in ("root", config.user):
        bad = spa.ServerConfig(write_config(tmp_path / "bad.conf", {"alice": stanza(keys)},
                                            gpg_user=user))
        with pytest.raises(spa.SpaError, match="a user of its own"):
            bad.start_gpg()


@pytest.mark.parametrize("options,error", [
    ({"gpg_allow_no_pw": None}, "give gpg_decrypt_pw, or gpg_allow_no_pw"),
    ({"gpg_fingerprint_id": None}, "gpg_require_sig needs gpg_fingerprint_id or gpg_remote_id"),
    ({"gpg_decrypt_id": None}, "GnuPG options without gpg_decrypt_id"),
    ({"gpg_remote_id": "XYZ"}, "is not a key ID"),
])
def test_stanza_errors(keys, tmp_path, options, error):
    with pytest.raises(spa.SpaError, match=error):
        spa.ServerConfig(write_config(tmp_path / "spa.conf", {"a": stanza(keys, **options)}))


def test_fwknop_clients_gpg_packet_opens(keys, tmp_path, served):
    """fwknop 2.6.10's GnuPG packet (--gpg-recipient-key, --gpg-signer-key, --gpg-home-dir
    from its rc file, with an HMAC) is one spa.py accepts."""
    wire = fwknop_gpg_packet(tmp_path, keys)
    assert len(wire) >= spa.MIN_GPG_WIRE_LEN
    d = served(wire)
    assert d.accepted, d.reason
    assert d.allow_ip == "198.18.1.2"


ACCESS_GPG = """SOURCE ANY
OPEN_PORTS tcp/{port}
HMAC_KEY_BASE64 {hmac}
ENCRYPTION_MODE asymmetric
GPG_HOME_DIR {home}
GPG_DECRYPT_ID {server}
GPG_ALLOW_NO_PW Y
GPG_REQUIRE_SIG Y
GPG_FINGERPRINT_ID {client}
FW_ACCESS_TIMEOUT 5
"""


def test_access_conf_gnupg_stanzas_load(keys, tmp_path):
    text = ACCESS_GPG.format(port=SERVICE_PORT, hmac=HMAC_KEY, home=keys.server,
                             server=keys.server_fpr, client=keys.client_fpr)
    access = write_private(tmp_path / "access.conf", text + "\n" + text.replace(
        "GPG_FINGERPRINT_ID %s\n" % keys.client_fpr, "").replace(
        "GPG_REQUIRE_SIG Y", "GPG_DISABLE_SIG Y"))
    stanzas, notes = spa.read_access_conf(access, [("tcp", SERVICE_PORT)])
    assert notes == [] and len(stanzas) == 2
    assert stanzas[0].gpg_require_sig and stanzas[0].gpg_fingerprints == [keys.client_fpr]
    assert not stanzas[1].gpg_require_sig and stanzas[0].key is None
    # Without the signers it checks, fwknopd refuses to start: spa.py leaves it out.
    write_private(access, text.replace("GPG_FINGERPRINT_ID %s\n" % keys.client_fpr, ""))
    stanzas, notes = spa.read_access_conf(access, [("tcp", SERVICE_PORT)])
    assert stanzas == [] and "gpg_require_sig needs gpg_fingerprint_id" in notes[0]


def test_client_errors(keys, tmp_path):
    done = run_spa("client", "-D", "198.18.1.1", "-A", "tcp/22", "-g", "--hmac-key-base64",
                   HMAC_KEY, "--test")
    assert done.returncode == 1 and "needs the server's key: give --gpg-recipient" in done.stderr
    rc_file = fwknoprc(tmp_path, keys, GPG_SIGNING_PW=None)
    done = run_spa("client", "-c", rc_file, "-n", "srv", "--test", stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and "gpg_signing_pw" in done.stderr
    rc_file = fwknoprc(tmp_path, keys, GPG_RECIPIENT="nobody@example.org")
    done = run_spa("client", "-c", rc_file, "-n", "srv", "--test")
    assert done.returncode == 1 and "gpg could not encrypt" in done.stderr
    assert SIGN_PW not in done.stderr
    assert "Traceback" not in done.stderr


def lab_service(lab):
    lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)


def test_spa_server_opens_for_fwknops_gpg_client(keys, tmp_path):
    """The real fwknop client in GnuPG mode knocks; spa.py's server (GnuPG stanza from
    fwknop's access.conf, gpg as gpg_user) opens the port in nftables."""
    need_nft()
    need_lab("fwknop")
    access = write_private(tmp_path / "access.conf", ACCESS_GPG.format(
        port=SERVICE_PORT, hmac=HMAC_KEY, home=keys.server, server=keys.server_fpr,
        client=keys.client_fpr))
    conf = write_config(tmp_path / "spa.conf", {}, access_conf=access)
    rc_file = fwknoprc(tmp_path, keys)
    with Lab(clients=1, prefix="gp") as lab:
        lab_service(lab)
        server = lab.spawn("srv", [sys.executable, SPA, "server", "-c", conf, "-v"])
        wait_for_line(server, r"listening on", 15)
        assert closed(lab, "cli1", Lab.srv4(1))
        lab.run("cli1", ["fwknop", "--rc-file", rc_file, "-n", "srv", "--no-save-args"],
                env=dict(os.environ, HOME=str(tmp_path)))
        assert wait_tcp_open(lab.name("cli1"), Lab.srv4(1), SERVICE_PORT, 5.0) is not None
        wait_for_line(server, r"accepted packet from 198\.18\.1\.2", 5)
        # SIGHUP: a new private keyring copy, the old one removed; knocks still open.
        mark = server.log.mark()
        server.send_signal(signal.SIGHUP)
        wait_for_line(server, r"reloaded", 5, since=mark)
        lab.run("cli1", [sys.executable, SPA, "client", "-c", rc_file, "-n", "srv"],
                env=dict(os.environ, HOME=str(tmp_path)))
        wait_for_line(server, r"accepted packet from 198\.18\.1\.2", 5, since=mark)
        copies = [d for d in os.listdir("/run") if d.startswith("spa-gpg-")]
        lab.stop_process(server)
    assert set(copies) - set(os.listdir("/run")) == set(copies)   # all removed at exit


def test_fwknopd_opens_for_spa_gpg_client(keys, tmp_path):
    """spa.py's client in GnuPG mode (-g, --gpg-recipient-key, --gpg-signer-key,
    --gpg-home-dir, the passphrase from its config) knocks; fwknopd 2.6.10 opens."""
    need_lab("fwknopd", "iptables")
    home = os.path.join(str(tmp_path), "fwknopd-gnupg")
    shutil.copytree(keys.server, home, ignore=shutil.ignore_patterns("S.*"))
    os.chmod(home, 0o700)
    conf = write_private(tmp_path / "cli.conf", "[default]\ngpg_signing_pw = %s\n" % SIGN_PW)
    with Lab(clients=1, prefix="gp") as lab:
        lab_service(lab)
        lab.run("srv", ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(SERVICE_PORT),
                        "-j", "DROP"])
        assert closed(lab, "cli1", Lab.srv4(1))
        fwknopd = netns_lab.FwknopdServer(
            lab, "srv", lab.srv_if[1],
            {"SOURCE": "ANY", "OPEN_PORTS": "tcp/%d" % SERVICE_PORT, "HMAC_KEY_BASE64": HMAC_KEY,
             "HMAC_DIGEST_TYPE": "sha256", "GPG_HOME_DIR": home,
             "GPG_DECRYPT_ID": keys.server_fpr, "GPG_ALLOW_NO_PW": "Y",
             "GPG_REQUIRE_SIG": "Y", "GPG_FINGERPRINT_ID": keys.client_fpr,
             "FW_ACCESS_TIMEOUT": 10}, tmp_path)
        try:
            with fwknopd:
                lab.run("cli1", [sys.executable, SPA, "client", "-c", conf, "-D", Lab.srv4(1),
                                 "-A", "tcp/%d" % SERVICE_PORT, "-g", "--gpg-recipient-key",
                                 keys.server_fpr, "--gpg-signer-key", keys.client_fpr,
                                 "--gpg-home-dir", keys.client, "--hmac-key-base64", HMAC_KEY])
                assert wait_tcp_open(lab.name("cli1"), Lab.srv4(1), SERVICE_PORT, 5.0) \
                    is not None, fwknopd.log.text()
                fwknopd.log.wait(fwknopd.RULE_ADDED, 2)
        finally:
            subprocess.call(["gpgconf", "--homedir", home, "--kill", "gpg-agent"])


def test_keygen_prints_gnupg_sections_that_work(keys, tmp_path, served):
    """keygen --gpg-recipient --gpg-signer-key: the fingerprints looked up, a fresh HMAC key,
    no AES key; the server's stanza loads and takes the packet the client's section makes."""
    done = run_spa("keygen", "-n", "web1", "-D", "198.18.1.1", "-A", "tcp/%d" % SERVICE_PORT,
                   "--gpg-recipient", "spa server", "--gpg-signer-key", "client@example.org",
                   "--gpg-home-dir", keys.client)
    assert done.returncode == 0, done.stderr
    server, client = done.stdout.split("# On the client")
    client = "# On the client" + client
    assert "gpg_decrypt_id = %s" % keys.server_fpr in server and "key_base64 = " not in \
        server.replace("hmac_key_base64", "")
    assert "gpg_fingerprint_id = %s" % keys.client_fpr in server
    assert "gpg_recipient = %s\ngpg_signer = %s" % (keys.server_fpr, keys.client_fpr) in client
    conf = write_private(tmp_path / "spa.conf", "[server]\nprotect = tcp/%d\nreplay_cache = %s\n"
                         "gpg_user = %s\n" % (SERVICE_PORT, tmp_path / "replay", gpg_user()) +
                         server[server.index("[client web1]"):] +
                         "gpg_home_dir = %s\n" % keys.server)
    cli = write_private(tmp_path / "cli.conf", client + "gpg_home_dir = %s\ngpg_signing_pw = %s\n"
                        % (keys.client, SIGN_PW))
    packet = run_spa("client", "-c", cli, "-n", "web1", "--test")
    assert packet.returncode == 0, packet.stderr
    config = spa.ServerConfig(conf)
    config.start_gpg()
    try:
        d = spa.decide(packet.stdout.strip().encode(), "198.18.1.2", None, config.stanzas,
                       lambda key: False, 120)
        assert d.accepted, d.reason
    finally:
        config.stop_gpg()
    # A key that makes no "hQ" packet, or one that is not there: refused, named.
    done = run_spa("keygen", "--gpg-recipient", "nobody@example.org", "--gpg-signer-key",
                   "client@example.org", "--gpg-home-dir", keys.client)
    assert done.returncode == 1 and "'nobody@example.org': no such key" in done.stderr
    done = run_spa("keygen", "--gpg-recipient", "spa server")
    assert done.returncode == 1 and "need both --gpg-recipient" in done.stderr


def test_check_config_checks_gnupg_stanzas(keys, tmp_path):
    conf = write_config(tmp_path / "spa.conf", {"alice": stanza(keys)}, firewall="nft",
                        saved_firewall="none")
    done = run_spa("check-config", "-c", conf)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok    gpg runs as user %s on private copies of 1 keyring(s)" % gpg_user() in done.stdout
    assert "GnuPG, signed by %s" % keys.client_fpr in done.stdout
    conf = write_config(tmp_path / "spa.conf", {"alice": stanza(
        keys, gpg_fingerprint_id=keys.client_fpr[:-1] + "0")}, firewall="nft",
        saved_firewall="none")
    done = run_spa("check-config", "-c", conf)
    assert done.returncode == 1 and "FAIL  [client alice]: GnuPG: no key" in done.stdout


def test_fwknoprc_gpg_variables(keys, tmp_path, served):
    """~/.fwknoprc's GPG_SIGNING_PW_BASE64 and USE_GPG_AGENT (gpg-agent asks, here for a key
    without a passphrase: nothing to ask) are honoured; GPG_EXE is named as not."""
    b64 = base64.b64encode(SIGN_PW.encode()).decode()
    wire = spa_gpg_packet(tmp_path, keys, GPG_SIGNING_PW=None, GPG_SIGNING_PW_BASE64=b64)
    assert served(wire).accepted
    stranger = spa_gpg_packet(tmp_path, keys, signer=keys.stranger_fpr, home=keys.stranger,
                              GPG_SIGNING_PW=None, USE_GPG_AGENT="Y")
    assert served(stranger, gpg_fingerprint_id=keys.stranger_fpr).accepted
    rc_file = fwknoprc(tmp_path, keys, GPG_EXE="/usr/bin/gpg")
    done = run_spa("client", "-c", rc_file, "-n", "srv", "--test")
    assert done.returncode == 1 and "[srv]: GPG_EXE is not supported" in done.stderr
