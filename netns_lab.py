"""netns_lab: throwaway network namespaces for spa.py's tests.

A ``Lab`` is a small star network built from Linux network namespaces: one
server namespace ``srv`` and N client namespaces ``cli1``..``cliN``.  Client k
is joined to the server by its own veth pair and subnet:

    cli<k>  198.18.k.2/24   2001:db8:<k hex>::2/64   default route via the server
    srv     198.18.k.1/24   2001:db8:<k hex>::1/64   on interface lab.srv_if[k]

Only 198.18.0.0/15 and 2001:db8::/32 are used, and only inside namespaces the
Lab created.  The veth ends are created directly inside their namespaces, so
the host's own network and firewall are never touched.  Leaving the ``with``
block kills every process the Lab started (by PID / process group) and deletes
its namespaces, even after an error.

Sockets can also be made inside a namespace from this very process
(``ns_socket``), which the connect/UDP/ping/TCP-service helpers build on, and
``FwknopdServer`` runs the real fwknopd in a namespace for comparison tests.

Stdlib only; pytest is imported lazily by ``need``.  Needs root.
"""

import ctypes
import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

__all__ = [
    "need", "need_lab", "Lab", "CommandFailed", "LineLog", "wait_for_line",
    "in_netns", "ns_socket", "ns_sysctl", "tcp_connect_ok", "wait_tcp_open", "udp_send", "ping",
    "TcpService", "tcp_service", "FwknopdServer", "fwknop_keygen",
    "fwknop_client_argv", "sweep_stale", "SynProbe",
]

NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
MAX_CLIENTS = 250


# ---------------------------------------------------------------- test gating

def need(cond, why):
    """Skip the calling test unless ``cond`` holds; with env CI=true, fail instead.

    A CI machine is supposed to have root and every tool, so a missing
    prerequisite there is a broken environment, not a reason to go green.
    """
    if cond:
        return
    import pytest
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"prerequisite missing on CI: {why}", pytrace=False)
    pytest.skip(why)


def need_lab(*tools):
    """``need`` root, ``ip`` and each named executable (e.g. "fwknopd")."""
    need(os.geteuid() == 0, "network namespaces need root")
    for tool in ("ip",) + tools:
        need(shutil.which(tool) is not None, f"{tool} is not installed")


# ------------------------------------------------------- running commands

class CommandFailed(subprocess.CalledProcessError):
    """A command run by ``Lab.run`` failed; the message carries its stderr."""

    def __str__(self):
        err = self.stderr.decode(errors="replace") if isinstance(self.stderr, bytes) else self.stderr
        return f"{super().__str__()}\n--- stderr ---\n{(err or '').strip()}"


def _run(argv, check=True, timeout=60, **kw):
    """subprocess.run with captured text output, a timeout and a loud failure."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    res = subprocess.run(list(argv), timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise CommandFailed(res.returncode, res.args, res.stdout, res.stderr)
    return res


class LineLog:
    """Lines read from a process's pipes by reader threads, safe to wait on.

    ``lines`` is the list collected so far (tests may assert on it), ``mark()``
    returns the current length so a later ``wait`` can ignore older lines.
    """

    def __init__(self):
        self.lines = []
        self._cond = threading.Condition()
        self._open_readers = 0

    def attach(self, stream):
        """Start a daemon thread that copies ``stream``'s lines into the log."""
        with self._cond:
            self._open_readers += 1
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        try:
            with stream:
                for raw in iter(stream.readline, b""):
                    with self._cond:
                        self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                        self._cond.notify_all()
        finally:
            with self._cond:
                self._open_readers -= 1
                self._cond.notify_all()

    def wait_eof(self, timeout):
        """Wait until every attached stream has ended; True if they did in time."""
        with self._cond:
            return self._cond.wait_for(lambda: self._open_readers == 0, timeout)

    @property
    def eof(self):
        """True once every attached stream has ended (the process closed them)."""
        return self._open_readers == 0

    def mark(self):
        return len(self.lines)

    def text(self):
        return "\n".join(self.lines)

    def wait(self, pattern, timeout, since=0):
        """Return the first ``re.search`` match in lines[since:]; raise TimeoutError."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = since
            while True:
                for i in range(i, len(self.lines)):
                    m = rx.search(self.lines[i])
                    if m:
                        return m
                i = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    tail = "\n".join(self.lines[-20:])
                    why = "output ended" if self.eof else f"{timeout} s passed"
                    raise TimeoutError(f"no line matching {pattern!r} ({why}); last lines:\n{tail}")
                self._cond.wait(left)


def wait_for_line(proc_or_file, pattern, timeout, since=0):
    """Wait for a line matching regex ``pattern`` and return the match.

    ``proc_or_file`` is a process from ``Lab.spawn`` (its collected output is
    searched), a ``LineLog``, or the path of a log file (polled every 10 ms).
    Only lines with index >= ``since`` count.  Raises TimeoutError with the
    last lines when nothing matched in time or the process's output ended.
    """
    log = getattr(proc_or_file, "log", proc_or_file)
    if isinstance(log, LineLog):
        return log.wait(pattern, timeout, since)
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(proc_or_file, errors="replace") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines[since:]:
            m = rx.search(line)
            if m:
                return m
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no line matching {pattern!r} in {proc_or_file} after {timeout} s; "
                               "last lines:\n" + "\n".join(lines[-20:]))
        time.sleep(0.01)


# ----------------------------------------------- sockets inside a namespace

_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(nsname, fn, *args):
    """Run ``fn(*args)`` inside network namespace ``nsname`` and return its result.

    setns(2) switches only the calling thread, so a short-lived thread enters
    the namespace, runs ``fn`` and ends; this thread never leaves the host's.
    """
    out = {}

    def enter_and_run():
        try:
            with open(os.path.join(NETNS_DIR, nsname), "rb") as nsfile:
                if _libc.setns(nsfile.fileno(), CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({nsname}): {os.strerror(err)}")
                want = os.fstat(nsfile.fileno())
            have = os.stat("/proc/thread-self/ns/net")
            if (have.st_dev, have.st_ino) != (want.st_dev, want.st_ino):
                raise OSError(f"setns({nsname}) did not switch this thread's namespace")
            out["result"] = fn(*args)
        except BaseException as e:  # handed to the caller's thread below
            out["error"] = e

    t = threading.Thread(target=enter_and_run, name=f"setns-{nsname}", daemon=True)
    t.start()
    t.join(10)
    if "error" in out:
        raise out["error"]
    if "result" not in out:
        raise TimeoutError(f"running {fn!r} in {nsname} did not finish")
    return out["result"]


class InNetns(object):
    """An object whose every method call runs inside network namespace `ns` (a firewall
    back end under test, say)."""

    def __init__(self, ns, firewall):
        self.ns, self.firewall = ns, firewall

    def __getattr__(self, name):
        method = getattr(self.firewall, name)
        return lambda *args: in_netns(self.ns, method, *args)


class FakeCommands(object):
    """Stands in for spa.run_command in unit tests: records argv and stdin, and answers
    from `outputs`, keyed by (command, argv[3:]...) or else by the command alone."""

    def __init__(self, outputs=None):
        self.calls = []
        self.outputs = outputs or {}

    def __call__(self, argv, stdin=None):
        self.calls.append((argv, stdin))
        answer = self.outputs.get(tuple(argv[:1] + argv[3:]), self.outputs.get(argv[0], ""))
        if isinstance(answer, Exception):
            raise answer
        return answer


def ip6(command):
    """The IPv6 twin of an iptables command: iptables-nft -> ip6tables-nft."""
    return command.replace("ip", "ip6", 1)

def ns_socket(nsname, family=socket.AF_INET, type=socket.SOCK_STREAM, proto=0):
    """Create a socket inside network namespace ``nsname`` and return it.

    A socket belongs to the namespace it was created in for its whole life,
    whichever thread then uses it.
    """
    return in_netns(nsname, socket.socket, family, type, proto)


def ns_sysctl(nsname, key, value):
    """Write a net.* sysctl of one namespace, e.g. ("net.ipv4.ip_forward", 1).

    /proc/sys/net files belong to the namespace of the thread that opens them.
    """
    path = "/proc/sys/" + key.replace(".", "/")

    def write():
        with open(path, "w") as f:
            f.write(f"{value}\n")
    in_netns(nsname, write)


def _family(addr):
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def tcp_connect_ok(ns, addr, port, timeout=0.2):
    """True if a TCP connect from ``ns`` to addr:port completes within ``timeout``."""
    with ns_socket(ns, _family(addr), socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
            return True
        except OSError:  # refused, timed out, unreachable
            return False


def wait_tcp_open(ns, addr, port, deadline_s, poll_ms=1):
    """Poll TCP connects until one succeeds; return seconds taken, or None.

    Every attempt uses a fresh socket (a fresh SYN), so a port opened by a
    firewall change is seen within about max(poll_ms, 5 ms) rather than at
    the kernel's 1 s SYN retransmit.
    """
    poll = poll_ms / 1000
    start = time.monotonic()
    end = start + deadline_s
    while True:
        now = time.monotonic()
        if now >= end:
            return None
        if tcp_connect_ok(ns, addr, port, timeout=min(max(poll, 0.005), end - now)):
            return time.monotonic() - start
        time.sleep(max(0.0, min(poll - (time.monotonic() - now), end - time.monotonic())))


def udp_send(ns, addr, port, payload, src=None):
    """Send one UDP datagram from ``ns``; ``src`` is an address or (address, port)."""
    if isinstance(payload, str):
        payload = payload.encode()
    with ns_socket(ns, _family(addr), socket.SOCK_DGRAM) as s:
        if src is not None:
            s.bind((src, 0) if isinstance(src, str) else tuple(src))
        return s.sendto(payload, (addr, port))


def tcp_try(ns, addr, port, timeout=0.4):
    """One fresh TCP connect from ``ns``: the banner (bytes), or 'refused' / 'timeout'."""
    with ns_socket(ns, _family(addr), socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
            return s.recv(64)
        except ConnectionRefusedError:
            return "refused"
        except socket.timeout:
            return "timeout"


def sleep_until(t):
    """Sleep until wall-clock time ``t`` (no-op if it has passed)."""
    time.sleep(max(0.0, t - time.time()))


def udp_try(ns, addr, port, timeout=0.4, payload=b"knock"):
    """One datagram to a UDP echo from ``ns``: its answer (bytes), or 'refused' (ICMP port
    unreachable) or 'timeout'."""
    with ns_socket(ns, _family(addr), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((addr, port))
        s.send(payload)
        try:
            return s.recv(128)
        except ConnectionRefusedError:
            return "refused"
        except socket.timeout:
            return "timeout"


class SynProbe:
    """Fresh TCP SYNs from namespace ``ns`` to ``dst``:``port``, one every ``interval``
    seconds, each from a new source port (a raw socket, so no connection state is kept
    on this side), and what comes back, read with an AF_PACKET socket in ``ns``: every
    SYN-ACK is a connection the server's firewall let through.

    Use it as a context manager: it sends from a thread while the block runs (and at most
    ``limit`` seconds).  Afterwards ``sent`` is the number of SYNs, ``resets`` how many
    were answered with a reset, ``answered`` the seconds (since the start) at which each
    answered SYN was sent, ``connections`` the number of answered SYNs, and ``frames``
    the first 1000 answers (IP packets, to compare field by field).
    ``src`` is the client's address (for the IPv4 checksum).
    """

    FIRST_PORT, PORTS = 20000, 40000

    def __init__(self, ns, src, dst, port, interval=0.0002, limit=60.0):
        self.ns, self.src, self.dst, self.port = ns, src, dst, port
        self.interval, self.limit = interval, limit
        self.six = _family(dst) == socket.AF_INET6
        self.sent, self.resets, self.answered = 0, 0, []
        self.frames = []                 # the first 1000 answers, as IP packets
        self._times = {}                 # source port -> when its SYN was sent
        self._quiet = threading.Event()      # stop sending
        self._stop = threading.Event()       # stop reading (once past _until)
        self._until = 0.0
        self._threads = []

    @property
    def connections(self):
        return len(self.answered)

    def _segment(self, sport):
        header = struct.pack("!HHIIBBHHH", sport, self.port, sport * 7919, 0, 5 << 4, 0x02,
                             64240, 0, 0)
        if self.six:
            return header                # the kernel fills the checksum in (IPV6_CHECKSUM)
        pseudo = socket.inet_aton(self.src) + socket.inet_aton(self.dst) + struct.pack(
            "!BBH", 0, socket.IPPROTO_TCP, len(header))
        return header[:16] + struct.pack("!H", _icmp_checksum(pseudo + header)) + header[18:]

    def _send(self, raw, start):
        due = time.monotonic()
        sport = self.FIRST_PORT
        while not self._quiet.is_set() and time.monotonic() - start < self.limit:
            self._times[sport] = time.monotonic() - start
            raw.sendto(self._segment(sport), (self.dst, 0))
            self.sent += 1
            sport = self.FIRST_PORT + (sport - self.FIRST_PORT + 1) % self.PORTS
            # Every `interval`, never faster: one that came late does not make others early.
            due = max(due + self.interval, time.monotonic())
            time.sleep(max(0.0, due - time.monotonic()))

    def _receive(self, cap):
        cap.settimeout(0.05)
        while not self._stop.is_set() or time.monotonic() < self._until:
            try:
                frame, address = cap.recvfrom(2048)
            except socket.timeout:
                continue
            if address[2] == socket.PACKET_OUTGOING:
                continue
            if self.six and frame[:1] and frame[0] >> 4 == 6 and frame[6] == socket.IPPROTO_TCP:
                tcp = frame[40:]
            elif not self.six and frame[:1] and frame[0] >> 4 == 4 and frame[9] == socket.IPPROTO_TCP:
                tcp = frame[(frame[0] & 15) * 4:]
            else:
                continue
            if len(tcp) < 14:
                continue
            sport, dport = struct.unpack("!HH", tcp[:4])
            flags = tcp[13]
            if sport != self.port or dport not in self._times:
                continue
            if len(self.frames) < 1000:
                self.frames.append(frame)
            if flags & 0x12 == 0x12:
                self.answered.append(self._times[dport])
            elif flags & 0x04:
                self.resets += 1

    def __enter__(self):
        family = socket.AF_INET6 if self.six else socket.AF_INET
        raw = ns_socket(self.ns, family, socket.SOCK_RAW, socket.IPPROTO_TCP)
        if self.six:
            raw.setsockopt(socket.IPPROTO_IPV6, 7, 16)       # IPV6_CHECKSUM at offset 16
        cap = ns_socket(self.ns, socket.AF_PACKET, socket.SOCK_DGRAM,
                        socket.htons(0x86DD if self.six else 0x0800))
        start = time.monotonic()
        self._sockets = (raw, cap)
        self._threads = [threading.Thread(target=self._receive, args=(cap,), daemon=True),
                         threading.Thread(target=self._send, args=(raw, start), daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._quiet.set()
        self._threads[1].join(5)
        self._until = time.monotonic() + 0.05      # answers to the last SYNs
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for s in self._sockets:
            s.close()
        return False


def _icmp_checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(ns, addr, timeout=1.0):
    """Send one ICMP(v6) echo request from ``ns``; True if the reply came in time.

    (No ping binary is needed: this uses a raw socket made with ns_socket.)
    """
    v6 = _family(addr) == socket.AF_INET6
    family, proto, req, rep = ((socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129) if v6
                               else (socket.AF_INET, socket.IPPROTO_ICMP, 8, 0))
    ident, seq = os.getpid() & 0xFFFF, int(time.monotonic() * 1000) & 0xFFFF
    body = struct.pack("!HH", ident, seq) + b"netns_lab"
    csum = 0 if v6 else _icmp_checksum(struct.pack("!BBH", req, 0, 0) + body)  # kernel does v6
    deadline = time.monotonic() + timeout
    with ns_socket(ns, family, socket.SOCK_RAW, proto) as s:
        s.sendto(struct.pack("!BBH", req, 0, csum) + body, (addr, 0))
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data, _ = s.recvfrom(2048)
            except socket.timeout:
                return False
            if not v6:
                data = data[(data[0] & 0x0F) * 4:]  # raw IPv4 sockets include the IP header
            if len(data) >= 8 and data[0] == rep and data[4:8] == body[:4]:
                return True
    return False


class TcpService:
    """A TCP banner+echo server listening inside a namespace (a thread here).

    Each connection gets ``banner`` and then its own bytes echoed back until
    EOF.  ``peers`` lists the (address, port) of every accepted client.
    """

    def __init__(self, ns, addr, port, banner=b"netns-lab\n"):
        self.banner = banner
        self.peers = []
        self._stop = threading.Event()
        self._sock = ns_socket(ns, _family(addr), socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((addr, port))
        self._sock.listen(128)
        self._sock.settimeout(0.05)  # how often the accept loop looks at _stop
        self.addr, self.port = self._sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            self.peers.append(peer[:2])
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    @staticmethod
    def _talk_loop(conn, banner):
        conn.settimeout(30.0)   # long enough for a test to outlive a firewall window
        conn.sendall(banner)
        while data := conn.recv(4096):
            conn.sendall(data)

    def _talk(self, conn):
        with conn:
            try:
                self._talk_loop(conn, self.banner)
            except OSError:
                pass

    def stop(self):
        self._stop.set()
        self._thread.join(2)
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def tcp_service(ns, addr, port, banner=b"netns-lab\n"):
    """Start a ``TcpService`` on addr:port inside ``ns`` (port 0 picks one)."""
    return TcpService(ns, addr, port, banner)


# ------------------------------------------------------------------- the lab

_lab_counter = itertools.count(1)


def _b36(n):
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def sweep_stale(prefix):
    """Delete namespaces named by a Lab with ``prefix`` whose creating process is gone.

    A Lab killed with SIGKILL cannot clean up; this removes what it left,
    skipping any namespace that still has processes in it.  Returns the names.
    """
    removed = []
    for name in _netns_names():
        m = re.match(rf"{re.escape(prefix)}(\d+)x\d+-", name)
        if not m or os.path.exists(f"/proc/{m.group(1)}"):
            continue
        if _run(["ip", "netns", "pids", name], check=False).stdout.strip():
            continue
        _run(["ip", "netns", "delete", name], check=False)
        removed.append(name)
    return removed


def _netns_names():
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()]


class Lab:
    """Server namespace + ``clients`` client namespaces; use it as a context manager.

    Attributes: ``ns`` maps 'srv', 'cli1', ... to real namespace names;
    ``srv_if[k]`` / ``cli_if[k]`` are the interface names on each end of the
    link to client k.  Methods taking ``ns`` accept either form of name.
    """

    def __init__(self, clients=1, prefix="lab"):
        if not 1 <= clients <= MAX_CLIENTS:
            raise ValueError(f"clients must be 1..{MAX_CLIENTS}")
        n = next(_lab_counter)
        self.clients = clients
        self.tag = f"{prefix}{os.getpid()}x{n}"
        self.ns = {"srv": f"{self.tag}-srv"}
        self.ns.update({f"cli{k}": f"{self.tag}-cli{k}" for k in range(1, clients + 1)})
        # Interface names live inside the namespaces, so they only need to be
        # readable and short (IFNAMSIZ: 15 chars); they still carry the lab's tag.
        short = f"{prefix[:3]}{_b36(os.getpid())}{_b36(n % 1296)}"
        self.srv_if = {k: f"{short}-s{k}" for k in range(1, clients + 1)}
        self.cli_if = {k: f"{short}-c{k}" for k in range(1, clients + 1)}
        if max(len(i) for i in self.srv_if.values()) > 15:
            raise ValueError(f"interface names from prefix {prefix!r} exceed 15 characters")
        self._procs = []
        self._closers = []
        self._made = []

    # Addresses: client k's own subnet, server side .1 / ::1, client side .2 / ::2.
    @staticmethod
    def srv4(k):
        return f"198.18.{k}.1"

    @staticmethod
    def cli4(k):
        return f"198.18.{k}.2"

    @staticmethod
    def srv6(k):
        return f"2001:db8:{k:x}::1"

    @staticmethod
    def cli6(k):
        return f"2001:db8:{k:x}::2"

    def __enter__(self):
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _ip(self, *args):
        _run(["ip", *args], timeout=20)

    def _build(self):
        for name in self.ns.values():
            self._ip("netns", "add", name)
            self._made.append(name)
            self._ip("-n", name, "link", "set", "lo", "up")
            # No duplicate address detection at all: link-local addresses too
            # would otherwise stay "tentative" for a second or two.
            for conf in ("all", "default"):
                ns_sysctl(name, f"net.ipv6.conf.{conf}.accept_dad", 0)
        srv = self.ns["srv"]
        for k in range(1, self.clients + 1):
            cli, s_if, c_if = self.ns[f"cli{k}"], self.srv_if[k], self.cli_if[k]
            # Both ends are created inside their namespaces: nothing appears on the host.
            self._ip("link", "add", s_if, "netns", srv, "type", "veth", "peer", "name", c_if, "netns", cli)
            for ns, ifname, addr4, addr6 in ((srv, s_if, self.srv4(k), self.srv6(k)),
                                             (cli, c_if, self.cli4(k), self.cli6(k))):
                self._ip("-n", ns, "addr", "add", f"{addr4}/24", "dev", ifname)
                # nodad: usable at once instead of "tentative" for ~1-2 s.
                self._ip("-n", ns, "addr", "add", f"{addr6}/64", "dev", ifname, "nodad")
                self._ip("-n", ns, "link", "set", ifname, "up")
            self._ip("-n", cli, "route", "add", "default", "via", self.srv4(k))
            self._ip("-n", cli, "-6", "route", "add", "default", "via", self.srv6(k))

    def name(self, ns):
        """Real namespace name for 'srv'/'cliK' (real names pass through)."""
        return self.ns.get(ns, ns)

    def run(self, ns, argv, check=True, timeout=60, **kw):
        """subprocess.run(argv) inside ``ns``: text output captured, CommandFailed on error."""
        return _run(["ip", "netns", "exec", self.name(ns), *argv], check=check, timeout=timeout, **kw)

    def spawn(self, ns, argv, **kw):
        """Popen(argv) inside ``ns``, in its own process group, killed by ``close``.

        stdout and stderr go (merged, by default) into ``proc.log``, a LineLog
        that ``wait_for_line(proc, ...)`` searches.
        """
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        kw["start_new_session"] = True
        # `ip netns exec` execs argv, so proc.pid is the program itself.
        proc = subprocess.Popen(["ip", "netns", "exec", self.name(ns), *argv], **kw)
        self._procs.append(proc)
        proc.log = LineLog()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                proc.log.attach(stream)
        return proc

    @staticmethod
    def stop_process(proc, grace=3.0):
        """SIGTERM the process group of a process we started, then SIGKILL after ``grace``."""
        for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)  # pgid == pid: start_new_session, leader alive
            except ProcessLookupError:
                break
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        if isinstance(getattr(proc, "log", None), LineLog):
            proc.log.wait_eof(2.0)  # so the log is complete; the readers close the pipes
        return proc.returncode

    def tcp_service(self, ns, addr, port, banner=b"netns-lab\n"):
        """``tcp_service`` inside ``ns``, stopped automatically by ``close``."""
        svc = TcpService(self.name(ns), addr, port, banner)
        self._closers.append(svc.stop)
        return svc

    def udp_echo(self, ns, port, addr="::", tell_peer=False):
        """A UDP echo service on addr:port inside ``ns`` ("::" also takes IPv4), stopped by
        ``close``; with ``tell_peer`` it answers `data + b" from " + the sender's address`."""
        sock = ns_socket(self.name(ns), _family(addr), socket.SOCK_DGRAM)
        sock.bind((addr, port))
        sock.settimeout(0.05)            # how often the loop looks at `stop`
        stop = threading.Event()

        def serve():
            while not stop.is_set():
                try:
                    data, peer = sock.recvfrom(2048)
                    sock.sendto(data + b" from " + peer[0].encode() if tell_peer else data, peer)
                except socket.timeout:
                    continue
                except OSError:
                    return
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()

        def close():
            stop.set()
            thread.join(2)
            sock.close()
        self._closers.append(close)

    def on_close(self, fn):
        """Call ``fn()`` during ``close``, before processes are killed."""
        self._closers.append(fn)

    def close(self):
        """Stop services and processes, then delete the namespaces. Idempotent."""
        errors = []
        while self._closers:
            try:
                self._closers.pop()()
            except Exception as e:
                errors.append(e)
        while self._procs:
            self.stop_process(self._procs.pop())
        while self._made:
            name = self._made.pop()
            try:
                _run(["ip", "netns", "delete", name], timeout=20)
            except Exception as e:
                errors.append(e)
        if errors:
            raise RuntimeError(f"lab cleanup had errors: {errors}")


# --------------------------------------------------------- real fwknop peers

def fwknop_keygen():
    """(KEY_BASE64, HMAC_KEY_BASE64) from ``fwknop --key-gen``.

    --no-rc-file matters: without it the client writes ~/.fwknoprc.
    """
    out = _run(["fwknop", "--key-gen", "--no-rc-file"]).stdout
    keys = dict(re.findall(r"^(KEY_BASE64|HMAC_KEY_BASE64):\s*(\S+)", out, re.M))
    return keys["KEY_BASE64"], keys["HMAC_KEY_BASE64"]


def fwknop_client_argv(server, access, key_b64, hmac_b64, *extra):
    """argv for the real fwknop client: HMAC-SHA256, allow the packet's source (-s).

    --no-save-args / --no-rc-file keep it from touching $HOME.
    """
    return ["fwknop", "-D", server, "-A", access, "--key-base64-rijndael", key_b64,
            "--key-base64-hmac", hmac_b64, "--use-hmac", "-s", "--no-save-args", "--no-rc-file",
            *extra]


class FwknopdServer:
    """The real fwknopd (pcap on ``interface``, or its UDP server where it is built
    without libpcap; iptables back end) inside ``ns``.

    ``access_stanzas`` is a dict or a list of dicts, rendered in order as
    access.conf stanzas (SOURCE first), e.g. {"SOURCE": "ANY", "KEY_BASE64": k,
    "HMAC_KEY_BASE64": h, "HMAC_DIGEST_TYPE": "sha256", "FW_ACCESS_TIMEOUT": 30}.
    ``conf`` adds fwknopd.conf variables.  All state files live in ``tmpdir``.
    """

    # Debian 12's fwknopd captures with libpcap; Debian 13's is built without it and runs its
    # UDP server instead, which binds the port only after saying so.
    READY = r"Starting fwknopd main event loop|Kicking off UDP server to listen on port (\d+)"
    RULE_ADDED = r"Added access rule to (\S+) for (\S+) -> \S+ (\w+)/(\d+), expires at (\d+)"

    def __init__(self, lab, ns, interface, access_stanzas, tmpdir, conf=None, args=()):
        self.lab, self.ns = lab, lab.name(ns)
        tmpdir = os.fspath(tmpdir)
        self.conf_file = os.path.join(tmpdir, "fwknopd.conf")
        self.access_file = os.path.join(tmpdir, "access.conf")
        self.digest_file = os.path.join(tmpdir, "digest.cache")
        self.pid_file = os.path.join(tmpdir, "fwknopd.pid")
        self.run_dir = tmpdir
        self.proc = None
        settings = {"PCAP_INTF": interface, **(conf or {})}
        _write_private(self.conf_file, "".join(f"{k} {v};\n" for k, v in settings.items()))
        stanzas = [access_stanzas] if isinstance(access_stanzas, dict) else list(access_stanzas)
        text = ""
        for st in stanzas:
            st = dict(st)
            text += f"SOURCE {st.pop('SOURCE', 'ANY')}\n"
            text += "".join(f"{k} {v}\n" for k, v in st.items()) + "\n"
        _write_private(self.access_file, text)
        self.argv = ["fwknopd", "-f", "-c", self.conf_file, "-a", self.access_file,
                     "-d", self.digest_file, "-p", self.pid_file, "-r", self.run_dir, *args]

    @property
    def log(self):
        """The daemon's collected log lines (a LineLog; foreground logs go to stderr)."""
        return self.proc.log

    def start(self, timeout=10):
        """Start fwknopd and wait until it sniffs (or its UDP server has bound its port);
        raises with its log if it does not."""
        self.proc = self.lab.spawn(self.ns, self.argv)
        self.lab.on_close(self.stop)
        deadline = time.monotonic() + timeout
        try:
            udp_port = self.log.wait(self.READY, timeout).group(1)
            while udp_port and not self.lab.run(self.ns, ["ss", "-Hlun", f"sport = :{udp_port}"],
                                                check=False).stdout.strip():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fwknopd's UDP server did not bind port {udp_port}")
                time.sleep(0.01)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self):
        """SIGTERM fwknopd (it flushes its chains on exit); returns its exit code."""
        if self.proc is not None:
            return Lab.stop_process(self.proc)

    def rules(self, chain="FWKNOP_INPUT"):
        """The ``iptables -S`` lines of ``chain`` in the namespace ([] if absent)."""
        res = self.lab.run(self.ns, ["iptables", "-S", chain], check=False)
        return [line for line in res.stdout.splitlines() if line.startswith("-A ")]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _write_private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
