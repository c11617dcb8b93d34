"""The client off Linux: Windows and macOS, simulated on Linux.

spa.py's client runs where fwknop's does.  These tests run `spa.py client` in a Python
that looks like Windows (sys.platform win32; no pwd, grp, fcntl or termios; no
os.geteuid/getuid; select() that takes sockets only, as Winsock's) or like macOS
(sys.platform darwin), on the real network of a namespace lab: key files, the user
name, and --connect's relay to a real TCP service behind a real spa.py server.  Also
here: a connection reset during --connect, which must end in one line, not a traceback.
"""

import os
import re
import socket
import subprocess
import sys
import threading

import pytest

from netns_lab import Lab, ns_socket
from test_spa import HMAC_KEY, KEY, SERVICE_PORT, SPA, closed, need_nft, start_server, write_private

# Runs spa.main(argv[3:]) as if on system argv[1], with spa.py from directory argv[2].
SHIM = r'''
import os, select, socket, sys
system, folder, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if system == "win32":
    for name in ("pwd", "grp", "fcntl", "termios", "resource"):
        sys.modules[name] = None                  # `import pwd` fails, as on Windows
    for name in ("geteuid", "getuid", "getegid", "getgid", "getgroups"):
        delattr(os, name)
    posix_select = select.select

    def winsock_select(rlist, wlist, xlist, *timeout):
        for item in list(rlist) + list(wlist) + list(xlist):
            if not isinstance(item, socket.socket):
                raise OSError(10038, "An operation was attempted on something that is not a socket")
        return posix_select(rlist, wlist, xlist, *timeout)
    select.select = winsock_select
    del select.poll
sys.platform = system
sys.path.insert(0, folder)
import spa
sys.exit(spa.main(argv))
'''


def shim(tmp_path):
    path = tmp_path / "as_if_on.py"
    path.write_text(SHIM)
    return [sys.executable, str(path)]


def client_on(tmp_path, system, *argv, **kw):
    """`spa.py client argv` as if on `system` (win32, darwin; linux: as it is)."""
    env = dict(kw.pop("env", os.environ))
    head = [sys.executable, SPA] if system == "linux" else \
        shim(tmp_path) + [system, os.path.dirname(SPA)]
    return subprocess.run(head + ["client"] + list(argv), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=env, **kw)


KEYS = ["--key-base64", KEY, "--hmac-key-base64", HMAC_KEY]


def test_key_files_where_there_are_no_posix_modes(tmp_path):
    """Windows: the mode bits say nothing (they read as readable by all), and there is no
    os.geteuid: the file is used, and the client says what it could not check; on macOS
    the check is the one of Linux."""
    home = tmp_path / "home"
    home.mkdir()
    section = "[web1]\ndestination = 198.18.0.1\naccess = tcp/22\nkey_base64 = %s\n" \
        "hmac_key_base64 = %s\n" % (KEY, HMAC_KEY)
    inside = write_private(home / ".spa.conf", section)
    outside = write_private(tmp_path / "shared.conf", section)
    for path in (inside, outside):
        os.chmod(path, 0o644)
    env = dict(os.environ, HOME=str(home))
    note = "cannot check who may read %s, which holds keys"
    done = client_on(tmp_path, "win32", "-n", "web1", "--test", env=env)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    assert "note" not in done.stderr                 # in the profile: said only with -v
    done = client_on(tmp_path, "win32", "-n", "web1", "--test", "-v", env=env)
    assert done.returncode == 0 and note % inside in done.stderr, done.stderr
    done = client_on(tmp_path, "win32", "-c", outside, "-n", "web1", "--test", env=env)
    assert done.returncode == 0 and note % outside in done.stderr, done.stderr
    for system in ("darwin", "linux"):
        done = client_on(tmp_path, system, "-c", outside, "-n", "web1", "--test", env=env)
        assert done.returncode == 1 and "readable by group or others" in done.stderr


def test_user_name_where_there_is_no_password_database(tmp_path):
    """Without -U: $SPOOF_USER (as fwknop), else getpass's login name ($USERNAME on
    Windows), else fwknop's NO_USER."""
    env = dict((k, v) for k, v in os.environ.items()
               if k not in ("LOGNAME", "USER", "LNAME", "USERNAME", "SPOOF_USER"))

    def user(system, **more):
        done = client_on(tmp_path, system, "-D", "198.18.0.1", "-A", "tcp/22", "--test", "-v",
                         *KEYS, env=dict(env, **more))
        assert done.returncode == 0, done.stderr
        return re.search(r"username\s+(\S+)", done.stderr).group(1)
    assert user("win32", USERNAME="winuser") == "winuser"
    assert user("win32") == "NO_USER"
    assert user("win32", USERNAME="winuser", SPOOF_USER="spoofed") == "spoofed"
    assert user("darwin", USER="macuser") == "macuser"
    assert user("linux") == "root"                   # the password database


@pytest.mark.parametrize("system", ["win32", "darwin"])
def test_knock_and_connect_relays(tmp_path, system):
    """--connect's relay: with a thread for stdin where select() takes only sockets
    (Windows), with select() elsewhere; a real knock, a real server and TCP service."""
    need_nft()
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT, banner=b"hello from behind\n")
        start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "5"}})
        assert closed(lab, "cli1", Lab.srv4(1))
        lines = "".join("line %d through the relay\n" % i for i in range(200))
        done = lab.run("cli1", shim(tmp_path) + [system, os.path.dirname(SPA), "client", "-A",
                                                 "tcp/%d" % SERVICE_PORT, "-U", "alice"] + KEYS +
                       ["--connect", "%s:%d" % (Lab.srv4(1), SERVICE_PORT)],
                       input=lines, timeout=20)
        assert done.stdout == "hello from behind\n" + lines, done.stderr
        assert done.stderr == ""


class ResettingService(object):
    """A TCP service in a namespace that greets, reads a line, then resets the connection."""

    def __init__(self, ns, address, port):
        self.sock = ns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((address, port))
        self.sock.listen(4)
        self.sock.settimeout(20)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        conn.sendall(b"hello\n")
        conn.recv(100)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()                     # SO_LINGER 0: a reset instead of a FIN

    def close(self):
        self.sock.close()
        self.thread.join(5)


@pytest.mark.parametrize("system", ["linux", "win32"])
def test_connection_reset_during_connect_is_one_line(tmp_path, system):
    with Lab(clients=1, prefix="spa") as lab:
        service = ResettingService(lab.name("srv"), Lab.srv4(1), SERVICE_PORT)
        lab.on_close(service.close)
        head = [sys.executable, SPA] if system == "linux" else \
            shim(tmp_path) + [system, os.path.dirname(SPA)]
        done = lab.run("cli1", head + ["client", "-A", "tcp/%d" % SERVICE_PORT] + KEYS +
                       ["--connect", "%s:%d" % (Lab.srv4(1), SERVICE_PORT)],
                       input="ping\n", check=False, timeout=20)
        assert done.returncode == 1 and done.stdout == "hello\n"
        assert done.stderr == "spa.py client: error: the connection was broken off: " \
            "Connection reset by peer\n"


def test_relay_ends_quietly_when_its_reader_is_gone(tmp_path):
    """ssh closing the ProxyCommand's stdout is the normal end, not an error."""
    with Lab(clients=1, prefix="spa") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT, banner=b"x" * 200000)
        read, write = os.pipe()
        os.close(read)                   # nobody will read what the client writes
        try:
            done = subprocess.run(["ip", "netns", "exec", lab.name("cli1"), sys.executable, SPA,
                                   "client", "-A", "tcp/%d" % SERVICE_PORT] + KEYS +
                                  ["--connect", "%s:%d" % (Lab.srv4(1), SERVICE_PORT)],
                                  stdout=write, stderr=subprocess.PIPE, input="",
                                  universal_newlines=True, timeout=20)
        finally:
            os.close(write)
        assert done.returncode == 0 and done.stderr == ""
