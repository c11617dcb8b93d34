"""compromised_reader: run attacker code inside spa.py's real packet reader.

The issue this answers: "a bug in packet parsing gives an attacker no more than a valid
knock could get" holds only if the process that parses packets can do nothing else.  To
test that, the tests play the attacker who already has code execution in the reader:

    server, outcomes = run_in_reader(lab, tmp_path, 'attempt("udp", socket.socket)')
    assert outcomes == {"udp": "refused EPERM"}

    server = CompromisedServer(lab, tmp_path, [code0, code1], tty=True).start()
    outcomes = server.outcomes(0)        # reader 0's; kill it and reader 1's code runs

each start a real `spa.py server` in the lab's `srv` namespace, with real capture and a real
firewall.  The i-th packet reader the server forks runs readers[i] (Python source) *after*
everything spa.py does to confine it (privilege drop, setsid, closed files, rlimits,
seccomp): the server process replaces `spa.Reader.run` before it starts, so each forked
reader inherits the replacement and calls it where it would start reading packets.  When
the attacker code returns, the reader goes on with its real loop, so a knock must still
open; a reader the attack ended (exit, or killed by the kernel) is replaced by the parent,
and readers past the list run the real loop only.

Attacker code sees these names:
  reader     the spa.Reader (reader.log writes through the reader's log channel)
  sockets    its capture sockets;   pipe   its request pipe (fd) to the root parent
  poller     the epoll object its loop will wait in (register, then unregister)
  index      which reader this is (0, 1, ...)
  config     the path of the server's config file;  replay  the replay cache's path
  interface, ifindex   the lab's server-side interface;  client  the lab client's address
  attempt(name, fn, *args, **kw)  run fn; report "refused ERRNO" (OSError), "DONE result"
                             (it worked: an attack that got through), or "error ..."
  report(name, text)         report anything
  wait_go(seconds)           wait until the test calls server.go() (a marker packet
                             through the capture socket): the frames the capture sockets
                             gave before it, or None if it did not come in time
Every report is one log line "attack INDEX NAME: OUTCOME"; "attack INDEX done" ends
the code's turn.  Modules the code needs must be imported here, before the reader is
confined (it can open no file afterwards): this module imports (and hands the code)
os, errno, fcntl, mmap, resource, select, signal, socket, struct, termios, ctypes.

Stdlib only (plus spa, netns_lab and test_spa's helpers); needs root, like the lab.
"""

import ctypes  # noqa: F401  (imported before the reader is confined: attacker code uses it)
import errno
import fcntl
import json
import mmap  # noqa: F401
import os
import re
import resource  # noqa: F401
import select  # noqa: F401
import signal  # noqa: F401
import socket
import struct
import sys
import termios

HERE = os.path.dirname(os.path.abspath(__file__))
GO_MARKER = b"compromised-reader-go:" + b"g" * 160      # a knock-sized payload, never valid
REPORT = r"attack %d (\S+): (.*)$"


# ------------------------------------------------------------- inside the server

def _serve(spec_path):
    """The server process's main (see CompromisedServer.argv): install the hook, run spa."""
    sys.path.insert(0, HERE)
    import spa
    with open(spec_path) as f:
        spec = json.load(f)
    codes = [compile(src, "<attack %d>" % i, "exec") for i, src in enumerate(spec["readers"])]
    started = [0]
    real_start, real_run = spa.start_reader, spa.Reader.run

    def start_reader(*args, **kw):
        started[0] += 1        # counted in the parent: the forked reader inherits its number
        return real_start(*args, **kw)

    def run(self, sockets, parent_fd=None, poller=None):
        index = started[0] - 1
        if index < len(codes):
            exec(codes[index], _attack_globals(self, sockets, parent_fd, poller, index, spec))
            self.log.info("attack %d done", index)
        return real_run(self, sockets, parent_fd, poller)

    spa.start_reader = start_reader
    spa.Reader.run = run
    for name, value in spec.get("patch", {}).items():     # e.g. no seccomp, for a layer test
        owner, _, attribute = ("spa." + name).rpartition(".")
        setattr(eval(owner, {"spa": spa}), attribute, eval(value, vars(spa)))
    spec["ifindex"] = socket.if_nametoindex(spec["interface"])
    return spa.main(["server", "-c", spec["config"], "-v"])


def _frames(sock, ring):
    """Every frame waiting on a capture socket: from its receive ring if it has one (each
    handed back to the kernel), else with recv()."""
    import spa
    out = []
    while ring is not None:
        at = ring.offsets[ring.next]
        status, length, kept, net = spa.Ring.HEADER.unpack_from(ring.map, at)
        if not status & spa.TP_STATUS_USER:
            if not ring.find():
                return out
            continue
        out.append(ring.map[at + net:at + net + kept])
        ring.map[at:at + 4] = bytes(4)
        ring.next = (ring.next + 1) % len(ring.offsets)
    try:
        while True:
            out.append(sock.recv(2048))
    except BlockingIOError:
        return out


def _attack_globals(reader, sockets, pipe, poller, index, spec):
    def report(name, text):
        reader.log.info("attack %d %s: %s", index, name, text)

    def attempt(name, fn, *args, **kw):
        try:
            result = fn(*args, **kw)
        except OSError as e:
            outcome = "refused %s" % errno.errorcode.get(e.errno, e.errno)
        except Exception as e:        # the attack code itself is wrong: the test fails
            outcome = "error %s: %s" % (type(e).__name__, e)
        else:
            outcome = "DONE %r" % (result,)
        report(name, outcome)
        return outcome

    def wait_go(seconds):
        import time
        end, frames = time.monotonic() + seconds, []
        by_fd = {sock.fileno(): sock for sock in sockets}
        rings = reader.rings or {}         # what the reader mapped before its sandbox
        for fd in by_fd:                   # the reader's own epoll (no new one can be made)
            poller.register(fd, select.EPOLLIN)
        try:
            while time.monotonic() < end:
                for fd, _ in poller.poll(max(0, end - time.monotonic())):
                    for frame in _frames(by_fd[fd], rings.get(fd)):
                        if GO_MARKER in frame:
                            return frames
                        frames.append(frame)
            return None
        finally:
            for fd in by_fd:
                poller.unregister(fd)

    return {"__builtins__": __builtins__, "reader": reader, "sockets": sockets, "pipe": pipe,
            "poller": poller,
            "index": index, "config": spec["config"], "replay": spec["replay"],
            "interface": spec["interface"], "ifindex": spec["ifindex"], "client": spec["client"],
            "attempt": attempt,
            "report": report, "wait_go": wait_go, "errno": errno, "fcntl": fcntl,
            "socket": socket, "os": os, "termios": termios, "ctypes": ctypes, "mmap": mmap,
            "signal": signal, "struct": struct, "select": select, "resource": resource}


# --------------------------------------------------------------- in the tests

class _Pty(object):
    """The master side of a pseudo-terminal as a stream for LineLog: EIO (no slave left) is
    its end."""

    def __init__(self, fd):
        self.fd, self.pending = fd, b""

    def readline(self):
        while b"\n" not in self.pending:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                line, self.pending = self.pending, b""
                return line
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line + b"\n"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


class CompromisedServer(object):
    """A real spa.py server in `lab`'s srv namespace whose packet readers run attacker code.

    readers: Python source for reader 0, 1, ... (see the module's docstring).
    tty:     run the server in a new pseudo-terminal, its controlling terminal (as when an
             admin starts it by hand); `tty_input()` tells what was typed into it.
    patch:   {name: expression}: spa.NAME (or spa.Class.name) set to the expression (evaluated
             in spa's namespace) before the server starts.
    Other keyword arguments become [server] options.
    """

    def __init__(self, lab, tmp_path, readers, tty=False, patch=None, stanzas=None, **server):
        from test_spa import lab_server_config
        self.lab, self.tmp_path, self.tty = lab, tmp_path, tty
        self.replay = str(tmp_path / "replay.cache")
        self.conf = lab_server_config(tmp_path, stanzas, **server)
        spec = {"readers": list(readers), "config": self.conf, "replay": self.replay,
                "interface": lab.srv_if[1], "client": lab.cli4(1), "patch": patch or {}}
        self.spec = str(tmp_path / "attack.json")
        with open(self.spec, "w") as f:
            json.dump(spec, f)
        self.proc = self.slave = None

    def argv(self):
        return [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import compromised_reader; "
                "sys.exit(compromised_reader._serve(%r))" % (HERE, self.spec)]

    def start(self, timeout=15):
        from netns_lab import LineLog, wait_for_line
        if not self.tty:
            self.proc = self.lab.spawn("srv", self.argv())
        else:
            master, slave = os.openpty()
            self.slave = os.ttyname(slave)

            def take_terminal():            # after setsid: the pty becomes ours
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            self.proc = self.lab.spawn("srv", self.argv(), stdin=slave, stdout=slave,
                                       stderr=slave, preexec_fn=take_terminal)
            os.close(slave)
            self.proc.log = LineLog()
            self.proc.log.attach(_Pty(master))
        wait_for_line(self.proc, r"listening on", timeout)
        return self

    @property
    def log(self):
        return self.proc.log

    def outcomes(self, index, timeout=10):
        """{name: outcome} of reader `index`'s attacks, once its code has finished."""
        from netns_lab import wait_for_line
        wait_for_line(self.proc, r"attack %d done" % index, timeout)
        found = {}
        for line in self.log.lines:
            m = re.search(REPORT % index, line)
            if m:
                found[m.group(1)] = m.group(2)
        return found

    def wait_report(self, index, name, timeout=10):
        from netns_lab import wait_for_line
        return wait_for_line(self.proc, REPORT.replace(r"(\S+)", re.escape(name)) % index,
                             timeout).group(1)

    def go(self):
        """Send the marker that the attacker's wait_go() waits for."""
        from netns_lab import udp_send
        import spa
        udp_send(self.lab.name("cli1"), self.lab.srv4(1), spa.DEFAULT_PORT, GO_MARKER)

    def reader_pid(self, timeout=2.0):
        """The pid of the packet reader running now (waiting for one up to `timeout`)."""
        import time
        from test_spa import children
        end = time.monotonic() + timeout
        while True:
            found = children(self.proc.pid)
            if len(found) == 1 or time.monotonic() > end:
                return found[0] if len(found) == 1 else None
            time.sleep(0.01)

    def tty_input(self):
        """Bytes waiting to be read from the server's terminal (what TIOCSTI would have
        typed), or None without a terminal."""
        if self.slave is None:
            return None
        fd = os.open(self.slave, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            pending = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
            return os.read(fd, pending) if pending else b""
        finally:
            os.close(fd)


def run_in_reader(lab, tmp_path, code, timeout=10, **kw):
    """Run `code` in the first packet reader of a fresh compromised server; returns
    (server, {name: outcome}).  The server keeps running (the lab stops it)."""
    server = CompromisedServer(lab, tmp_path, [code], **kw).start()
    return server, server.outcomes(0, timeout)
