#!/usr/bin/env python3
"""bench_spa.py - benchmark spa.py's server against fwknopd on the same topology.

Run it as root on any Linux box that has what setup.sh installs (nft, iptables,
iproute2, Debian's fwknop-server and fwknop-client, hyperfine, netsniff-ng's trafgen,
pycryptodome):

    python3 bench_spa.py                   # the full benchmark: about 8 minutes on 2 cores
    python3 bench_spa.py --servers spa.py --parts flood   # one server, some figures
    python3 bench_spa.py --json out.json   # ... and save every raw number
    python3 bench_spa.py --smoke           # a few knocks, ~1 s floods, tiny N: well under a minute

It builds throwaway network namespaces (prefix "bench"; addresses only in
198.18.0.0/15 and 2001:db8::/32), never touches the host's own network or
firewall, kills only the processes it started and deletes its namespaces when it
ends, also on Ctrl-C or SIGTERM.  A hard time budget (--budget, 900 s by default)
stops it by itself; every flood is bounded by a packet count and by seconds.

Topology (netns_lab.Lab with one client):

    bench...-cli1  198.18.1.2 ---veth--- 198.18.1.1  bench...-srv
                   + 198.19.0.0/16 is "local" here     route 198.19.0.0/16 via 198.18.1.2
                     (an AnyIP route on lo), so the     a TCP service on 198.18.1.1:8022,
                     benchmark can knock and connect    protected by the server under test
                     from any address in it

The two servers run one after the other, each in a freshly built, identical lab:

  spa.py   `spa.py server` (interface = the server's veth, protect = tcp/8022, one
           [client] stanza with the benchmark's keys and max_openings = 20000 for the
           scale test, every other option default).
  fwknopd  Debian's fwknopd 2.6.10 (pcap, iptables back end), its default
           fwknopd.conf apart from PCAP_INTF; access.conf: SOURCE ANY with the same
           keys.  The protected port is closed by an iptables REJECT (tcp-reset) rule
           after an ESTABLISHED,RELATED accept; fwknopd puts its FWKNOP_INPUT jump first.

Both accept the very same packets (fwknop's format, built in-process with spa.seal).
Every valid knock comes from a fresh source address and asks to open tcp/8022 for
its own address (allow IP 0.0.0.0).

The figures (the table prints spa.py, fwknopd, their ratio spa.py/fwknopd, and
spa.py's goal):

  knock-to-open latency  Time from the client's sendto() of a knock to the first
                         completed TCP connect to the protected service from the
                         same address; connects are attempted every 1 ms (a fresh
                         SYN each, non-blocking, several may be in flight).  60 knocks
                         one after the other, each from a fresh address; median and
                         p95 (nearest rank).
  client cost            Wall time of one complete client run that builds and sends a
                         packet, measured with hyperfine (30 runs, 3 warm-ups, no
                         shell) inside the client namespace: `spa.py client` under
                         Debian's /usr/bin/python3, and the `fwknop` client.
  flood resistance       SPA-shaped garbage (base64 alphabet, the length of a real
                         packet, 204 characters, so each one costs the server an HMAC)
                         at 1k, 5k, 20k, 50k, 100k, 150k, 200k packets/s and at the
                         sender's maximum, 10 s each, and at the maximum again with each
                         knock sent 3 times 20 ms apart (as `spa.py client --repeat 3`);
                         50 valid knocks from fresh addresses spread over each run.  The
                         sender: trafgen (Debian's netsniff-ng: whole frames through a
                         PACKET_MMAP ring of its own, one process per CPU at the maximum,
                         one at a set rate), or with --python-sender (or without trafgen)
                         this script's sendmmsg(2) processes, one per CPU at the maximum.
                         Reported: % of the valid knocks whose port opened within 1 s
                         (connects every 2 ms), the rate the sender achieved (its own
                         count) and the rate the server handled, the kernel's drops (the
                         capture socket's PACKET_STATISTICS for spa.py; for fwknopd the
                         datagrams to the knock port that arrived, counted by an nft
                         counter of the benchmark's own, less those it handled), the
                         highest rate up to which 100% held, peak server RSS and PSS, log
                         lines written.
  garbage cost           A 5 s flood at the sender's maximum rate, no knocks: server
                         CPU seconds divided by the packets it handled = microseconds
                         per rejected packet; packets handled per second; packets that
                         reached the server but were dropped before the server read
                         them (spa.py's SIGUSR1 stats line; for fwknopd, estimated as
                         above: its log has one "SPA Packet from IP" line per packet it
                         examines).
  reader's flood path    spa.py only, with the garbage: its Reader in a process of its
  in-process             own under the server's Python, reading a ring of 3,520 garbage
                         frames (the capture ring's layout, in memory) 40 times: us a
                         packet, best and median pass (`bench_spa.py _reader_loop
                         '{"length": 204, "passes": 40}'`, run from two checkouts in
                         turn, compares two versions of the code).
  router                 Each server again, in a fresh lab, in a cgroup of its own
                         limited to 10 % of one core (cgroup v2's cpu.max, or v1's
                         cpu.cfs_quota_us where the cpu controller is on v1), from its
                         first instruction: start-up time (start to "ready"), idle PSS,
                         knock-to-open (30 knocks), and garbage floods of 500, 1k, 2k,
                         5k, 10k, 20k, 30k, 50k packets/s, 5 s each with 20 knocks, up
                         to the first rate at which a knock fails to open.
  scale                  N knocks from N distinct addresses sent in one burst (N = 10,
                         100, 1000, 10000; each asks for 300 s so all stay open): how
                         many got authorized (the server's "opened" log lines, which
                         both write after the firewall change), how many were lost, the
                         rate (authorized / time from the first send to the last
                         authorization), and the firewall entries afterwards: those for
                         this run's addresses (nft set elements / iptables rules in
                         FWKNOP_INPUT), and all entries.
  memory                 Server memory right after start, after all the floods (with
                         the number of garbage packets handled by then) and while
                         holding the scale test's authorizations, each as PSS and
                         as RSS (rows of their own); "growth" compares RSS after the
                         floods with after the latency knocks (when helper processes
                         have started).
  sandbox cost           spa.py only: what the packet reader's seccomp filter adds to a
                         system call (one recvfrom per packet): 20,000 recvfrom on an
                         empty socket, timed in two forked processes, one under the
                         filter, in turn, 40 rounds; the best round of each.

"Server" always means the whole process tree: for spa.py its root process and packet
reader; for fwknopd the daemon and any iptables it is running.  CPU is user+system of
all of them (exited children included).  Memory is PSS summed over them (each page
shared by processes split among them: what the server costs the machine) and RSS
summed over them (which counts the pages spa.py's two forked processes share twice),
with the largest process's RSS; the goal is checked on PSS and on each process's RSS,
and summed RSS is checked against it too.

Limits: the sender, the server and this script share the machine's CPUs, so on a
2-core box the flood's top rates measure a server that has about one core; the
achieved sender rate is printed next to each result.  The scale waits are capped
(60 s for N = 10000), so a slow server is reported with what it managed by then.
"""

import argparse
import base64
import ctypes
import errno
import ipaddress
import json
import math
import os
import random
import re
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.abspath(__file__)
SPA = os.path.join(HERE, "spa.py")
sys.path.insert(0, HERE)

import netns_lab   # noqa: E402  (stdlib only)
import spa         # noqa: E402  (imports pycryptodome only when first used)

PREFIX = "bench"                   # namespace prefix: bench<pid>x<n>-srv / -cli1
SERVICE_PORT = 8022                # the protected TCP service
KNOCK_PORT = 62201                 # both servers' default
KNOCK_NET = "198.19.0.0/16"        # source addresses of knocks (inside 198.18.0.0/15)
USER = "bench"
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


class Settings(object):
    """How much of everything: the full benchmark, or --smoke."""

    def __init__(self, smoke):
        self.smoke = smoke
        self.latency_knocks = 5 if smoke else 60
        self.latency_window = 2.0          # give up on a knock after this long
        self.latency_gap = 0.02            # pause between latency knocks
        self.hyperfine_runs = 3 if smoke else 30
        self.hyperfine_warmup = 1 if smoke else 3
        # (rate in packets a second, 0 for the sender's maximum; copies of each knock)
        self.flood_runs = [(1000, 1), (0, 1), (0, 3)] if smoke else \
            [(1000, 1), (5000, 1), (20000, 1), (50000, 1), (100000, 1), (150000, 1),
             (200000, 1), (0, 1), (0, 3)]
        self.flood_seconds = 1.0 if smoke else 10.0
        self.flood_knocks = 3 if smoke else 50
        self.flood_window = 1.0            # "opened within 1 s"
        self.flood_poll = 0.002
        self.garbage_seconds = 1.0 if smoke else 5.0
        self.sandbox_rounds = 5 if smoke else 40        # of 20,000 system calls each
        self.loop_passes = 5 if smoke else 40           # of the ring of garbage, in-process
        self.max_sender_pps = 2000000      # the count bound of a max-rate flood, per second
        self.scale_ns = [10, 30] if smoke else [10, 100, 1000, 10000]
        self.scale_stall = 3.0             # stop waiting after this long without progress
        self.budget = 170 if smoke else 900
        self.garbage_length = 204          # main() sets it to a real packet's length
        self.python_sender = False         # --python-sender: sendmmsg processes, not trafgen
        self.tmpdir = None                 # bench_server sets it (trafgen's config)
        # The router: both servers in a cgroup of 10 % of one core.
        self.router_share = 0.10
        self.router_knocks = 5 if smoke else 30
        self.router_rates = [1000, 0] if smoke else \
            [500, 1000, 2000, 5000, 10000, 20000, 30000, 50000]
        self.router_flood_seconds = 1.0 if smoke else 5.0
        self.router_flood_knocks = 3 if smoke else 20

    def scale_deadline(self, n):
        if self.smoke:
            return 10.0
        return 60.0 if n >= 10000 else 30.0


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

class BudgetExceeded(BaseException):
    """The hard time budget ran out (SIGALRM); everything is cleaned up on the way out."""


def percentile(values, p):
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100.0 * len(ordered)) - 1)]


def load():
    """The machine's load averages (1, 5, 15 min), printed next to the figures: other
    work on the machine moves them."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def log(msg, *args):
    sys.stderr.write("[bench %6.1fs] %s\n" % (time.monotonic() - T_START, msg % args if args else msg))
    sys.stderr.flush()


T_START = time.monotonic()


def process_tree(pid):
    """`pid` and all its descendants, from /proc/*/stat."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def tree_cpu_seconds(pid):
    """CPU (user + system) used by a process and all its descendants, reaped ones included."""
    ticks = float(os.sysconf("SC_CLK_TCK"))
    total = 0
    for p in process_tree(pid):
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])    # utime stime cutime cstime
    return total / ticks


def tree_memory(pid):
    """[(pid, command, RSS kB, PSS kB)] of a process and its descendants."""
    out = []
    for p in process_tree(pid):
        try:
            with open("/proc/%d/comm" % p) as f:
                comm = f.read().strip()
            rss = pss = 0
            with open("/proc/%d/smaps_rollup" % p) as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss = int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss = int(line.split()[1])
        except OSError:
            continue
        out.append((p, comm, rss, pss))
    return out


def tree_memory_kb(pid):
    """(RSS summed over the process tree, PSS summed, number of processes)."""
    procs = tree_memory(pid)
    return sum(p[2] for p in procs), sum(p[3] for p in procs), len(procs)


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def ns_call(nsname, fn, *args, timeout=120.0):
    """Run fn(*args) in a daemon thread that has entered network namespace `nsname`.

    Like netns_lab.in_netns, but with a caller-chosen timeout (the probes run for
    many seconds) and as a daemon thread, so Ctrl-C never waits for it.
    """
    out = {}

    def body():
        try:
            with open(os.path.join("/var/run/netns", nsname), "rb") as f:
                if _libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, "setns(%s): %s" % (nsname, os.strerror(err)))
            out["result"] = fn(*args)
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=body, name="ns-" + nsname, daemon=True)
    t.start()
    t.join(timeout)
    if "error" in out:
        raise out["error"]
    if "result" not in out:
        raise TimeoutError("%r in %s did not finish in %s s" % (fn, nsname, timeout))
    return out["result"]


# ---------------------------------------------------------------------------
# Packets
# ---------------------------------------------------------------------------

def make_knock(keys, client_timeout=0):
    """One fresh valid packet (wire bytes) asking to open tcp/SERVICE_PORT for its source."""
    msg = spa.Message(USER, "0.0.0.0", [("tcp", SERVICE_PORT)], client_timeout=client_timeout)
    return spa.seal(msg.encode(), keys[0], keys[1])


def garbage_pool(length, count, seed):
    """SPA-shaped garbage: base64 characters, the length of a real packet."""
    rng = random.Random(seed)
    return [bytes(rng.choices(B64_CHARS, k=length)) for _ in range(count)]


# ---------------------------------------------------------------------------
# Network work done inside the client namespace (run through ns_call)
# ---------------------------------------------------------------------------

def send_from(sock, src, wire, dst, port):
    """Send one UDP datagram with source address `src` (any address of KNOCK_NET)."""
    info = struct.pack("=I4s4s", 0, socket.inet_aton(src), b"\0\0\0\0")
    sock.sendmsg([wire], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, (dst, port))


def probe(knocks, dst, window, poll, sequential=False, gap=0.0, repeat=1, repeat_gap=0.02):
    """Send knocks and time until a TCP connect from each knock's address succeeds.

    `knocks` is a list of (start offset in s, source address, wire).  Each knock
    is sent at its offset (in `sequential` mode also only once the previous one
    is finished, plus `gap`); from then on a fresh non-blocking connect from the
    same address is started every `poll` seconds until one completes or
    `window` seconds have passed.  Returns a list: seconds from send to the first
    completed connect, or None.  With `repeat`, each knock is sent that many times,
    `repeat_gap` seconds apart (as `spa.py client --repeat` does), timed from the first.
    Runs inside the client namespace.
    """
    sel = selectors.DefaultSelector()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    results = [None] * len(knocks)
    active = {}                    # index -> [t_sent, next_attempt, {sockets}, src]
    start = time.monotonic()
    nxt, last_done = 0, start - gap
    attempt_timeout = 0.25         # a lost SYN would wait 1 s for its retransmit: give up on it

    def finish(i, value):
        nonlocal last_done
        st = active.pop(i)
        for s in st[2]:
            sel.unregister(s)
            s.close()
        results[i] = value
        last_done = time.monotonic()

    try:
        while nxt < len(knocks) or active:
            now = time.monotonic()
            while nxt < len(knocks) and now >= start + knocks[nxt][0] and \
                    (not sequential or (not active and now >= last_done + gap)):
                _, src, wire = knocks[nxt]
                t_sent = time.monotonic()
                send_from(udp, src, wire, dst, KNOCK_PORT)
                active[nxt] = [t_sent, t_sent, set(), src, repeat - 1, wire]
                nxt += 1
                now = time.monotonic()
            for st in active.values():             # the copies of --repeat, when due
                if st[4] and now >= st[0] + repeat_gap * (repeat - st[4]):
                    send_from(udp, st[3], st[5], dst, KNOCK_PORT)
                    st[4] -= 1
            for i, st in list(active.items()):
                if now - st[0] > window:
                    finish(i, None)
                    continue
                if now < st[1]:
                    continue
                st[1] = st[1] + poll if st[1] + poll > now else now + poll
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.bind((st[3], 0))
                err = s.connect_ex((dst, SERVICE_PORT))
                if err == 0:
                    s.close()
                    finish(i, time.monotonic() - st[0])
                elif err == errno.EINPROGRESS:
                    sel.register(s, selectors.EVENT_WRITE, (i, now))
                    st[2].add(s)
                else:
                    s.close()
            # Give up on attempts whose SYN (or its answer) got lost.
            for i, st in active.items():
                for s in [s for s in st[2] if now - sel.get_key(s).data[1] > attempt_timeout]:
                    sel.unregister(s)
                    st[2].discard(s)
                    s.close()
            # Sleep until the next attempt or knock is due, or a connect finishes.
            due = [st[1] for st in active.values()]
            due += [st[0] + repeat_gap * (repeat - st[4]) for st in active.values() if st[4]]
            if nxt < len(knocks):
                due.append(start + knocks[nxt][0] if not sequential or not active
                           else now + poll)
            timeout = max(0.0, min(due) - time.monotonic()) if due else 0.0
            if not sel.get_map():
                if timeout > 0:
                    time.sleep(timeout)
                continue
            for key, _ in sel.select(timeout):
                s = key.fileobj
                i = key.data[0]
                if i not in active or s not in active[i][2]:
                    continue                       # its knock finished in this same batch
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err == 0:
                    finish(i, time.monotonic() - active[i][0])
                else:
                    sel.unregister(s)
                    active[i][2].discard(s)
                    s.close()
    finally:
        for i in list(active):
            finish(i, None)
        udp.close()
        sel.close()
    return results


def blast(items, dst, seconds=30.0):
    """Send (source, wire) knocks as fast as one socket can; returns (t_first, t_last).

    Bounded by the number of items and by `seconds`."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    t0 = time.monotonic()
    try:
        for src, wire in items:
            if time.monotonic() - t0 > seconds:
                break
            for attempt in range(100):
                try:
                    send_from(udp, src, wire, dst, KNOCK_PORT)
                    break
                except (BlockingIOError, ConnectionRefusedError):
                    time.sleep(0.0001)
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        raise
                    time.sleep(0.0001)
    finally:
        udp.close()
    return t0, time.monotonic()


# ---------------------------------------------------------------------------
# The flood sender: a separate process in the client namespace
# ---------------------------------------------------------------------------

class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(_Iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


def mmsg_sender(sock, pool):
    """send(first, n): n packets of the pool from index `first` (wrapping) in sendmmsg(2) calls,
    which costs far less per packet than Python's send(); falls back to send() without it.
    Returns (sent, errors)."""
    try:
        sendmmsg = _libc.sendmmsg
    except AttributeError:
        sendmmsg = None
    size = len(pool)
    if sendmmsg is None:
        def send(first, n):
            errors = 0
            for i in range(first, first + n):
                try:
                    sock.send(pool[i % size])
                except OSError:     # ICMP port unreachable reported back, ENOBUFS
                    errors += 1
            return n - errors, errors
        return send
    bufs = [ctypes.create_string_buffer(p, len(p)) for p in pool]
    iovs = (_Iovec * size)(*[_Iovec(ctypes.cast(b, ctypes.c_void_p), len(p))
                             for b, p in zip(bufs, pool)])
    msgs = (_Mmsghdr * size)()
    for j in range(size):
        msgs[j].hdr.iov = ctypes.pointer(iovs[j])
        msgs[j].hdr.iovlen = 1
    fd, width = sock.fileno(), ctypes.sizeof(_Mmsghdr)

    def send(first, n):
        sent = errors = 0
        while sent + errors < n:
            i = (first + sent + errors) % size
            vlen = min(n - sent - errors, size - i)
            r = sendmmsg(fd, ctypes.byref(msgs, i * width), vlen, 0)
            if r > 0:
                sent += r
            else:                   # the first message failed (e.g. an ICMP error): skip it
                errors += 1
        return sent, errors
    send.keep = (bufs, iovs, msgs)
    return send


def flood_sender_main(params):
    """`bench_spa.py _flood JSON`: send garbage at a rate (0 = as fast as possible).

    Bounded twice: it stops after `seconds` or after `max_packets`, whichever
    comes first.  Prints `flood-start` when it begins and `flood-done {json}`.
    """
    p = json.loads(params)
    pool = garbage_pool(p["length"], 1024, p.get("seed", 1))
    rate, seconds, max_packets = float(p["rate"]), float(p["seconds"]), int(p["max_packets"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sock.connect((p["dst"], p["port"]))
    send = mmsg_sender(sock, pool)
    sent = errors = 0
    print("flood-start", flush=True)
    t0 = time.monotonic()
    end = t0 + seconds
    while sent + errors < max_packets:
        now = time.monotonic()
        if now >= end:
            break
        if rate > 0:
            n = min(int((now - t0) * rate) - sent - errors, max_packets - sent - errors, 2000)
            if n <= 0:
                time.sleep(min(1.0 / rate, 0.001))
                continue
        else:
            n = min(256, max_packets - sent - errors)
        ok, bad = send(sent + errors, n)
        sent += ok
        errors += bad
    elapsed = time.monotonic() - t0
    print("flood-done " + json.dumps({"sent": sent, "errors": errors, "elapsed": elapsed,
                                      "rate": sent / elapsed if elapsed > 0 else 0.0}), flush=True)
    return 0


def trafgen_config(lab, length, count=32, seed=1):
    """trafgen's packet config: `count` SPA-shaped garbage datagrams from the client's
    address to the knock port, each a whole Ethernet frame (trafgen writes frames to the
    client's interface through its own PACKET_MMAP ring, with no system call a packet)."""
    def mac(ns, dev):
        res = lab.run(ns, ["ip", "-j", "link", "show", "dev", dev])
        return json.loads(res.stdout)[0]["address"]
    dst, src = mac("srv", lab.srv_iface), mac("cli1", lab.cli_iface)
    out = []
    for i, payload in enumerate(garbage_pool(length, count, seed)):
        out.append('{ eth(da=%s, sa=%s), ipv4(sa=%s, da=%s, ttl=64), udp(sp=%d, dp=%d), "%s" }'
                   % (dst, src, lab.cli4(1), lab.dst, 20000 + i, KNOCK_PORT, payload.decode()))
    return "\n".join(out) + "\n"


class FloodSender(object):
    """The garbage flood, from the client namespace, bounded by a packet count and by
    seconds: trafgen (Debian's netsniff-ng) where it is installed, one process per CPU at
    the maximum rate, one at a set rate; else `senders` Python processes of this script
    with sendmmsg(2).  start() returns once packets flow; finish() waits for the end and
    returns {"sent", "elapsed", "rate", "tool"}."""

    def __init__(self, lab, cfg, rate, seconds, max_packets, seed):
        self.lab, self.cfg, self.rate, self.seconds = lab, cfg, rate, seconds
        self.max_packets, self.seed = max_packets, seed
        self.tool = "trafgen" if shutil.which("trafgen") and not cfg.python_sender else "sendmmsg"
        self.procs = []

    def tx(self):
        res = self.lab.run("cli1", ["ip", "-j", "-s", "link", "show", "dev", self.lab.cli_iface],
                           check=False)
        try:
            return int(json.loads(res.stdout)[0]["stats64"]["tx"]["packets"])
        except (ValueError, KeyError, IndexError, TypeError):
            return 0

    def start(self):
        self.tx0 = self.tx()
        cpus = os.cpu_count() or 1
        if self.tool == "trafgen":
            path = os.path.join(self.cfg.tmpdir, "trafgen.cfg")
            with open(path, "w") as f:
                f.write(trafgen_config(self.lab, self.cfg.garbage_length, seed=self.seed))
            argv = ["trafgen", "-o", self.lab.cli_iface, "-i", path, "-n", str(self.max_packets),
                    "-C", "-P", str(1 if self.rate else cpus)]
            if self.rate:
                argv += ["-b", "%dpps" % self.rate]
            self.procs = [self.lab.spawn("cli1", argv)]
        else:
            n = 1 if self.rate else max(2, cpus)
            for i in range(n):
                params = {"dst": self.lab.dst, "port": KNOCK_PORT, "rate": self.rate / n,
                          "seconds": self.seconds, "max_packets": self.max_packets // n,
                          "length": self.cfg.garbage_length, "seed": self.seed + i}
                self.procs.append(self.lab.spawn("cli1", [sys.executable, BENCH, "_flood",
                                                          json.dumps(params)]))
            for proc in self.procs:
                proc.log.wait(r"^flood-start", 30)
        self.t0 = time.monotonic()
        deadline = self.t0 + 5
        while self.tx() == self.tx0 and time.monotonic() < deadline:
            time.sleep(0.005)
        self.t0 = time.monotonic()
        return self

    def finish(self):
        end = self.t0 + self.seconds
        for proc in self.procs:
            try:
                proc.wait(max(0.1, end - time.monotonic()) + (0 if self.tool == "trafgen" else 30))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGINT)     # trafgen: stop, bounded by seconds
                proc.wait(10)
        elapsed = time.monotonic() - self.t0
        # What the senders say they sent (the interface's counter counts the probes too).
        sent = 0
        for proc in self.procs:
            proc.log.wait_eof(2.0)
            text = "\n".join(proc.log.lines)
            if self.tool == "trafgen":
                sent += sum(int(n) for n in re.findall(r"(\d+) packets outgoing", text))
            else:
                sent += sum(json.loads(m)["sent"] for m in re.findall(r"flood-done (.*)", text))
        return {"sent": sent, "elapsed": elapsed, "rate": sent / elapsed if elapsed > 0 else 0.0,
                "tool": self.tool, "processes": len(self.procs)}


# ---------------------------------------------------------------------------
# The lab
# ---------------------------------------------------------------------------

class BenchLab(netns_lab.Lab):
    """A netns_lab.Lab with one client, plus KNOCK_NET: local in the client, routed by the server."""

    def __init__(self):
        super().__init__(clients=1, prefix=PREFIX)
        self.cli, self.srv = self.ns["cli1"], self.ns["srv"]
        self.dst = self.srv4(1)
        self.srv_iface, self.cli_iface = self.srv_if[1], self.cli_if[1]
        self._next = int(ipaddress.IPv4Address("198.19.1.1"))

    def _build(self):
        super()._build()
        # The server answers KNOCK_NET through the client; the client owns all of it
        # (an AnyIP "local" route), so a socket there can bind any of its addresses.
        self._ip("-n", self.srv, "route", "add", KNOCK_NET, "via", self.cli4(1))
        self._ip("-n", self.cli, "route", "add", "local", KNOCK_NET, "dev", "lo")
        # A counter of the datagrams that reach the server for the knock port (a table
        # of the benchmark's own, before everything else): what fwknopd's drops are
        # estimated from, as its pcap ring's cannot be read from outside.
        netns_lab._run(["ip", "netns", "exec", self.srv, "nft", "-f", "-"], input=(
            "table inet bench {\n counter knocks { }\n chain pre { type filter hook prerouting "
            "priority -500; udp dport %d counter name knocks; }\n}\n" % KNOCK_PORT))

    def knock_packets(self):
        """Datagrams to the knock port that reached the server's stack so far (or None)."""
        res = self.run("srv", ["nft", "-j", "list", "counter", "inet", "bench", "knocks"],
                       check=False)
        try:
            for item in json.loads(res.stdout)["nftables"]:
                if "counter" in item:
                    return int(item["counter"]["packets"])
        except (ValueError, KeyError, TypeError):
            pass
        return None

    def rx_packets(self):
        """Packets received on the server's interface so far (None if unreadable)."""
        res = self.run("srv", ["ip", "-j", "-s", "link", "show", "dev", self.srv_iface], check=False)
        try:
            return int(json.loads(res.stdout)[0]["stats64"]["rx"]["packets"])
        except (ValueError, KeyError, IndexError, TypeError):
            return None

    def fresh(self, n):
        """n source addresses never used before in this lab (no .0 or .255)."""
        out = []
        net = ipaddress.ip_network(KNOCK_NET)
        while len(out) < n:
            a = ipaddress.IPv4Address(self._next)
            self._next += 1
            if a not in net:
                raise RuntimeError("ran out of knock addresses")
            if a.packed[3] not in (0, 255):
                out.append(str(a))
        return out


class CpuLimit(object):
    """A cgroup of its own that holds its processes to `share` of one core, as a router's
    CPU would: cgroup v2's cpu.max where the cpu controller is on the unified hierarchy,
    else cgroup v1's cpu.cfs_quota_us.  `wrap(argv)` runs argv in it from its first
    instruction (sh writes its own pid into the cgroup, then execs argv: same pid, and
    every child it forks stays in it).  Removed on close()."""

    PERIOD_US = 100000

    def __init__(self, share, name):
        quota = int(share * self.PERIOD_US)
        v2, v1 = self._mounts()
        if v2 and "cpu" in self._read(os.path.join(v2, "cgroup.controllers")).split():
            self._write(os.path.join(v2, "cgroup.subtree_control"), "+cpu")
            self.path = os.path.join(v2, name)
            os.mkdir(self.path)
            self._write(os.path.join(self.path, "cpu.max"), "%d %d" % (quota, self.PERIOD_US))
            self.kind = "cgroup v2 cpu.max %d %d" % (quota, self.PERIOD_US)
        elif v1:
            self.path = os.path.join(v1, name)
            os.mkdir(self.path)
            self._write(os.path.join(self.path, "cpu.cfs_period_us"), str(self.PERIOD_US))
            self._write(os.path.join(self.path, "cpu.cfs_quota_us"), str(quota))
            self.kind = "cgroup v1 cpu.cfs_quota_us %d / cpu.cfs_period_us %d" % (
                quota, self.PERIOD_US)
        else:
            raise RuntimeError("no cgroup hierarchy with the cpu controller is mounted")
        self.procs = os.path.join(self.path, "cgroup.procs")

    @staticmethod
    def _mounts():
        """(the cgroup2 mount, the cgroup v1 mount of the cpu controller), None where absent."""
        v2 = v1 = None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                fstype, options = fields[sep + 1], fields[sep + 3].split(",")
                if fstype == "cgroup2" and v2 is None:
                    v2 = fields[4]
                elif fstype == "cgroup" and "cpu" in options and v1 is None:
                    v1 = fields[4]
        return v2, v1

    @staticmethod
    def _read(path):
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return ""

    @staticmethod
    def _write(path, text):
        with open(path, "w") as f:
            f.write(text)

    @classmethod
    def sweep_stale(cls):
        """Remove the cgroups of benchmarks that ended without removing theirs (killed):
        bench-spa-PID-* where PID is no longer running (a cgroup with a process in it
        cannot be removed, and is left)."""
        for root in cls._mounts():
            if root is None or not os.path.isdir(root):
                continue
            for name in os.listdir(root):
                m = re.match(r"bench-spa-(\d+)-", name)
                if m and not os.path.exists("/proc/%s" % m.group(1)):
                    try:
                        os.rmdir(os.path.join(root, name))
                    except OSError:
                        pass

    def wrap(self, argv):
        # Through this process's root: `ip netns exec` mounts a /sys of its own, without
        # the cgroup hierarchies.
        procs = "/proc/%d/root%s" % (os.getpid(), self.procs)
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs] + list(argv)

    def close(self):
        for _ in range(200):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:                # processes still leaving
                time.sleep(0.01)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# The servers under test
# ---------------------------------------------------------------------------

class LogCounter(object):
    """Counts the lines of a LineLog matching a regex, incrementally."""

    def __init__(self, linelog, pattern):
        self.log, self.rx = linelog, re.compile(pattern)
        self.index = self.n = 0

    def count(self):
        lines = self.log.lines
        end = len(lines)
        for j in range(self.index, end):
            if self.rx.search(lines[j]):
                self.n += 1
        self.index = end
        return self.n


class Counters(object):
    """One snapshot of a server: packets handled, kernel drops, CPU, memory, log size, and the
    packets that arrived on the server's interface."""

    def __init__(self, server, handled, drops):
        self.t = time.monotonic()
        self.handled, self.drops = handled, drops
        self.cpu = tree_cpu_seconds(server.pid)
        self.rss_kb, self.pss_kb, self.procs = tree_memory_kb(server.pid)
        self.log_lines, self.log_bytes = server.log_size()
        self.rx = server.lab.rx_packets()
        self.udp = server.lab.knock_packets()

    def delta(self, before):
        d = {"seconds": self.t - before.t, "handled": self.handled - before.handled,
             "cpu_s": self.cpu - before.cpu, "log_lines": self.log_lines - before.log_lines,
             "log_bytes": self.log_bytes - before.log_bytes, "rss_kb": self.rss_kb,
             "pss_kb": self.pss_kb, "processes": self.procs,
             "arrived": (self.rx - before.rx) if self.rx is not None and before.rx is not None
             else None,
             "arrived_udp": (self.udp - before.udp)
             if self.udp is not None and before.udp is not None else None}
        d["kernel_drops"] = (self.drops - before.drops
                             if self.drops is not None and before.drops is not None else None)
        return d


class ServerUnderTest(object):
    """Common parts: the process (tree), its log, counting its log lines."""

    name = "?"
    OPENED = None        # regex of the log line that says a knock opened the port
    SKIP_LINES = None    # regex of our own probing lines, not counted as "log written"
    POLL = 0.1           # how often settle() looks

    def __init__(self, lab, tmpdir, keys, wrap=None):
        self.lab, self.tmpdir, self.keys = lab, tmpdir, keys
        self.wrap = wrap or (lambda argv: argv)      # CpuLimit.wrap: run it in a cgroup
        self.proc = None
        self._log_lines = 0
        self._log_bytes = 0
        self._log_index = 0

    @property
    def pid(self):
        return self.proc.pid

    def log_size(self):
        """(lines, bytes) the server has written so far, not counting stats lines we asked for."""
        lines = self.proc.log.lines
        end = len(lines)
        for j in range(self._log_index, end):
            if self.SKIP_LINES and re.search(self.SKIP_LINES, lines[j]):
                continue
            self._log_lines += 1
            self._log_bytes += len(lines[j]) + 1
        self._log_index = end
        return self._log_lines, self._log_bytes

    def opened_counter(self):
        return LogCounter(self.proc.log, self.OPENED)

    def memory(self):
        """{"rss_kb", "pss_kb", "processes", "detail"} of the server's process tree."""
        procs = tree_memory(self.pid)
        return {"rss_kb": sum(p[2] for p in procs), "pss_kb": sum(p[3] for p in procs),
                "processes": len(procs),
                "detail": [{"pid": p[0], "command": p[1], "rss_kb": p[2], "pss_kb": p[3]}
                           for p in procs]}

    def settle(self, cap=12.0, quiet=0.4):
        """Wait until the server has worked through its backlog (its count stops moving).

        Returns (counters, time the count was last seen moving).
        """
        end = time.monotonic() + cap
        last = self.counters()
        moved = last.t
        while time.monotonic() < end:
            time.sleep(self.POLL)
            now = self.counters()
            if now.handled != last.handled:
                moved, last = now.t, now
            elif now.t - moved >= quiet:
                return now, moved
        return last, moved

    def stop(self):
        if self.proc is not None:
            self.lab.stop_process(self.proc, grace=5.0)


class SpaUnderTest(ServerUnderTest):
    name = "spa.py"
    OPENED = r"accepted packet from "
    SKIP_LINES = r"stats: received"
    STATS = r"stats: received (\d+)\b.*\bkernel drops (\d+)"

    def start(self):
        k, h = (base64.b64encode(x).decode() for x in self.keys)
        conf = os.path.join(self.tmpdir, "spa.conf")
        text = ("[server]\ninterface = %s\nport = %d\nprotect = tcp/%d\nreplay_cache = %s\n\n"
                "[client bench]\nkey_base64 = %s\nhmac_key_base64 = %s\n"
                "max_openings = 20000\n"          # the scale test holds 11,000 at once
                % (self.lab.srv_iface, KNOCK_PORT, SERVICE_PORT,
                   os.path.join(self.tmpdir, "replay.cache"), k, h))
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.proc = self.lab.spawn("srv", self.wrap([installed(system_python()[0]), "server",
                                                     "-c", conf]))
        netns_lab.wait_for_line(self.proc, r"listening on", 30)
        return self

    def stats(self):
        """(packets received, kernel drops) from the stats line SIGUSR1 makes it log."""
        mark = self.proc.log.mark()
        os.kill(self.pid, signal.SIGUSR1)
        m = self.proc.log.wait(self.STATS, 10, since=mark)
        return int(m.group(1)), int(m.group(2))

    def counters(self):
        received, drops = self.stats()
        return Counters(self, received, drops)

    def fw_addresses(self):
        """Source addresses of the elements in spa.py's allow4 set (one per opening)."""
        res = self.lab.run("srv", ["nft", "-j", "list", "set", "inet", "spa", "allow4"],
                           check=False, timeout=60)
        if res.returncode != 0:
            return None
        out = []
        for item in json.loads(res.stdout)["nftables"]:
            for elem in item.get("set", {}).get("elem", []):
                e = elem.get("elem", elem) if isinstance(elem, dict) else elem
                val = e.get("val", e) if isinstance(e, dict) else e
                concat = val.get("concat") if isinstance(val, dict) else None
                out.append(concat[0] if concat else str(val))
        return out


class FwknopdUnderTest(ServerUnderTest):
    """fwknopd: packets handled = its "SPA Packet from IP" log lines (one per packet it
    examines); its pcap ring's drops cannot be read from outside (they are not in
    the socket's sk_drops), so kernel drops are estimated as packets that arrived on
    the interface but were never handled."""

    name = "fwknopd"
    HANDLED = r"SPA Packet from IP: "

    def start(self):
        self.OPENED = netns_lab.FwknopdServer.RULE_ADDED
        k, h = (base64.b64encode(x).decode() for x in self.keys)
        for rule in (["-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                      "-j", "ACCEPT"],
                     ["-A", "INPUT", "-p", "tcp", "--dport", str(SERVICE_PORT), "-j", "REJECT",
                      "--reject-with", "tcp-reset"]):
            self.lab.run("srv", ["iptables"] + rule)
        self.server = netns_lab.FwknopdServer(
            self.lab, "srv", self.lab.srv_iface,
            {"SOURCE": "ANY", "KEY_BASE64": k, "HMAC_KEY_BASE64": h, "HMAC_DIGEST_TYPE": "sha256"},
            self.tmpdir)
        self.server.argv = self.wrap(self.server.argv)
        self.server.start(timeout=20)
        self.proc = self.server.proc
        self.handled = LogCounter(self.proc.log, self.HANDLED)
        return self

    def counters(self):
        return Counters(self, self.handled.count(), None)

    def fw_addresses(self):
        """Source addresses of fwknopd's rules in FWKNOP_INPUT (one per opening)."""
        return [m.group(1) for m in (re.search(r"-s (\S+?)(?:/32)? ", r) for r in self.server.rules())
                if m]


# ---------------------------------------------------------------------------
# The figures
# ---------------------------------------------------------------------------

def measure_latency(lab, server, cfg):
    srcs = lab.fresh(cfg.latency_knocks)
    knocks = [(0.0, src, make_knock(server.keys)) for src in srcs]
    timeout = cfg.latency_knocks * (cfg.latency_window + cfg.latency_gap + 0.05) + 10
    res = ns_call(lab.cli, probe, knocks, lab.dst, cfg.latency_window, 0.001, True,
                  cfg.latency_gap, timeout=timeout)
    ms = [r * 1000 for r in res if r is not None]
    out = {"knocks": len(res), "opened": len(ms), "latencies_ms": [None if r is None else r * 1000
                                                                    for r in res]}
    if ms:
        out.update(median_ms=statistics.median(ms), p95_ms=percentile(ms, 95),
                   min_ms=min(ms), max_ms=max(ms))
    log("%s: knock-to-open median %s ms, p95 %s ms, %d/%d opened", server.name,
        fmt(out.get("median_ms")), fmt(out.get("p95_ms")), len(ms), len(res))
    return out


def run_flood(lab, server, cfg, rate, seconds, knocks=(), repeat=1):
    """One flood run (rate 0: as fast as the sender goes), with valid knocks probed during it.

    The counters are read before the sender starts and again once the server has
    worked through its backlog, so every packet it handled is in the numbers.
    """
    max_packets = int((rate if rate else cfg.max_sender_pps) * seconds * 1.05) + 10
    before = server.counters()
    sender = FloodSender(lab, cfg, rate, seconds, max_packets, int(rate) + 1).start()
    t_start = time.monotonic()
    probe_result = []
    if knocks:
        probe_result = ns_call(lab.cli, probe, list(knocks), lab.dst, cfg.flood_window,
                               cfg.flood_poll, False, 0.0, repeat,
                               timeout=seconds + cfg.flood_window + 30)
    sent = sender.finish()
    peak = server.memory()
    after, t_moved = server.settle()
    d = after.delta(before)
    d["rss_peak_kb"] = max(peak["rss_kb"], after.rss_kb)
    d["pss_peak_kb"] = max(peak["pss_kb"], after.pss_kb)
    d["load"] = load()
    d["sender"] = sent
    d["offered_pps"] = rate or None
    d["repeat"] = repeat
    d["cpu_us_per_packet"] = d["cpu_s"] / d["handled"] * 1e6 if d["handled"] else None
    busy = max(t_moved - t_start, sent["elapsed"])
    d["handled_pps"] = d["handled"] / busy if busy > 0 else None
    if d["kernel_drops"] is None and d["arrived_udp"] is not None:
        # fwknopd: datagrams to the knock port that arrived but were never handled.
        d["kernel_drops_estimated"] = True
        d["kernel_drops"] = max(0, d["arrived_udp"] - d["handled"])
    seen = (d["handled"] or 0) + (d["kernel_drops"] or 0)
    d["drop_pct"] = 100.0 * d["kernel_drops"] / seen if seen and d["kernel_drops"] is not None \
        else None
    if knocks:
        opened = [r for r in probe_result if r is not None]
        d["knocks"] = len(probe_result)
        d["opened"] = len(opened)
        d["opened_pct"] = 100.0 * len(opened) / len(probe_result)
        d["opened_median_ms"] = statistics.median(opened) * 1000 if opened else None
        d["missed"] = [i for i, r in enumerate(probe_result) if r is None]   # which knocks
    return d


def show_unusual(server, why):
    """Print the server's last log lines that are not the routine ones (a reader that died,
    a warning): when a run went wrong, `why`."""
    unusual = [line for line in server.proc.log.lines[-2000:] if not re.search(
        r"rejected packet|accepted packet|stats: |gatekeeper: accepted|SPA Packet|"
        r"not logged|listening on|does not hold spa.py's protection", line)]
    log("%s: %s; the server's last unusual lines:\n  %s", server.name, why,
        "\n  ".join(unusual[-15:]) or "(none)")


def measure_flood(lab, server, cfg, runs_wanted=None):
    """The flood runs of cfg.flood_runs ((rate, copies of each knock)), each with
    cfg.flood_knocks valid knocks spread over it; the highest rate with every knock opened
    (single copies)."""
    runs = []
    for rate, repeat in (runs_wanted or cfg.flood_runs):
        n = cfg.flood_knocks
        span = max(cfg.flood_seconds - cfg.flood_window, cfg.flood_seconds / 2)
        knocks = [(span * (i + 0.5) / n, src, make_knock(server.keys))
                  for i, src in enumerate(lab.fresh(n))]
        r = run_flood(lab, server, cfg, rate, cfg.flood_seconds, knocks, repeat)
        runs.append(r)
        log("%s: flood %s%s: sender %.0f pps (%s), %d/%d knocks opened within %.0f s, server "
            "handled %d (%s us CPU each), kernel drops %s (%s%%), log +%d lines; load %s",
            server.name, "max" if not rate else "%d pps" % rate,
            " x%d" % repeat if repeat > 1 else "", r["sender"]["rate"], r["sender"]["tool"],
            r["opened"], r["knocks"], cfg.flood_window, r["handled"],
            fmt(r["cpu_us_per_packet"]), r["kernel_drops"], fmt(r["drop_pct"]), r["log_lines"],
            load())
        if r["opened"] < r["knocks"] / 2:        # something is wrong: show what the server said
            show_unusual(server, "fewer than half opened")
    best = None                         # the rate the sender reached, not the one asked
    for r in sorted((r for r in runs if r["repeat"] == 1), key=lambda r: r["sender"]["rate"]):
        if r["opened_pct"] < 100:
            break
        best = r["sender"]["rate"]
    return {"runs": runs, "highest_100pct_pps": best,
            "rss_peak_kb": max(r["rss_peak_kb"] for r in runs),
            "pss_peak_kb": max(r["pss_peak_kb"] for r in runs),
            "log_lines": sum(r["log_lines"] for r in runs),
            "log_bytes": sum(r["log_bytes"] for r in runs)}


def measure_garbage(lab, server, cfg):
    r = run_flood(lab, server, cfg, 0, cfg.garbage_seconds)
    arrived = r["arrived_udp"] if r.get("arrived_udp") is not None else r["arrived"]
    r["drop_pct_of_arrived"] = (100.0 * r["kernel_drops"] / arrived
                                if arrived and r["kernel_drops"] is not None else None)
    log("%s: garbage: sender %.0f pps, %d sent, %s arrived; handled %d = %s/s, %s us CPU each; "
        "kernel drops %s%s", server.name, r["sender"]["rate"], r["sender"]["sent"], arrived,
        r["handled"], fmt(r["handled_pps"]), fmt(r["cpu_us_per_packet"]), r["kernel_drops"],
        " (estimated)" if r.get("kernel_drops_estimated") else "")
    return r


def measure_sandbox_cost(cfg, calls=20000):
    """What the packet reader's seccomp filter adds to a system call: a recvfrom (EAGAIN,
    on an empty socket) timed in two forked processes, one under spa.py's filter, in turn;
    the best round of each.  (End to end, per garbage packet, the difference drowns in
    the noise of the flood measurements: one recvfrom per packet.)"""
    def child(filtered, go, out):
        sock, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        buf = bytearray(2048)
        if filtered:
            fprog, _code = spa.sock_fprog(spa.seccomp_program(spa.seccomp_arch(), (out,), ()))
            spa.prctl(spa.PR_SET_NO_NEW_PRIVS, 1)
            spa.prctl(spa.PR_SET_SECCOMP, spa.SECCOMP_MODE_FILTER, fprog)
        best = float("inf")
        while go.recv(1) == b"g":
            t = time.perf_counter()
            for _ in range(calls):
                try:
                    sock.recv_into(buf)
                except BlockingIOError:
                    pass
            best = min(best, (time.perf_counter() - t) / calls * 1e6)
            os.write(out, b".")
        os.write(out, ("%r" % best).encode())

    if spa.seccomp_arch() is None:
        return None
    procs = []
    for filtered in (False, True):
        go, go_child = socket.socketpair()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                go.close()
                child(filtered, go_child, w)
            finally:
                os._exit(0)
        go_child.close()
        os.close(w)
        procs.append((pid, go, r))
    for _ in range(cfg.sandbox_rounds):
        for pid, go, r in procs:
            go.send(b"g")
            os.read(r, 1)
    out = []
    for pid, go, r in procs:
        go.send(b"s")
        go.close()
        os.waitpid(pid, 0)
        out.append(float(os.read(r, 100)))
        os.close(r)
    log("seccomp filter: recvfrom %.3f us without, %.3f us under it", out[0], out[1])
    return {"recvfrom_us": out[0], "recvfrom_filtered_us": out[1], "extra_us": out[1] - out[0]}


def reader_loop_main(arg):
    """`bench_spa.py _reader_loop JSON`: spa.py's flood path alone, in this process: a
    Reader (one stanza, keys of its own, the log full as in a flood) reads a ring of
    SPA-shaped garbage (the capture ring's layout in anonymous memory, every frame
    ready) again and again.  Prints the best and the median pass, in us a packet, and
    how many frames were refused (all of them, or the figure measures something else)."""
    import mmap
    p = json.loads(arg)
    with tempfile.TemporaryDirectory(prefix="bench_spa.loop.") as tmpdir:
        conf = os.path.join(tmpdir, "spa.conf")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("[server]\nprotect = tcp/22\nreplay_cache = %s\n\n[client bench]\n"
                    "key_base64 = %s\nhmac_key_base64 = %s\n" % (
                        os.path.join(tmpdir, "replay.cache"),
                        base64.b64encode(os.urandom(32)).decode(),
                        base64.b64encode(os.urandom(64)).decode()))
        reader = spa.Reader(spa.ServerConfig(conf), None, spa.Log())
    reader.limiter.empty_until = float("inf")      # a flood: the log has no room
    ring = spa.Ring(None, mmap.mmap(-1, spa.RING_BYTES))    # in memory, without a socket
    net = 80                                        # where the kernel puts a cooked frame's IP header
    for at, payload in zip(ring.offsets, garbage_pool(p["length"], len(ring.offsets), 7)):
        udp = struct.pack("!HHHH", 40000, spa.DEFAULT_PORT, 8 + len(payload), 0) + payload
        frame = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                            socket.inet_aton("198.18.1.2"), socket.inet_aton("198.18.0.1")) + udp
        spa.Ring.HEADER.pack_into(ring.map, at, 0, len(frame), len(frame), net)
        ring.map[at + net:at + net + len(frame)] = frame
    ready = struct.Struct("=I").pack_into
    times = []
    for _ in range(p["passes"]):
        for at in ring.offsets:
            ready(ring.map, at, spa.TP_STATUS_USER)
        taken, t = 0, time.perf_counter()
        while taken < len(ring.offsets):
            taken += reader.read_ring(ring, None)
        times.append((time.perf_counter() - t) / taken * 1e6)
    print(json.dumps({"best_us": min(times), "median_us": statistics.median(times),
                      "frames": len(ring.offsets), "passes": len(times),
                      "refused": reader.counts["rejected"], "python": sys.version.split()[0]}))
    return 0


def measure_reader_loop(cfg):
    """The flood path's cost in-process (reader_loop_main), under the server's Python: its
    best pass is the least disturbed by the sender and the machine's other work, so it
    shows what a change to the code did (compare versions in turn, several times)."""
    done = subprocess.run([system_python()[0], BENCH, "_reader_loop",
                           json.dumps({"length": cfg.garbage_length, "passes": cfg.loop_passes})],
                          stdout=subprocess.PIPE, universal_newlines=True, timeout=300)
    if done.returncode != 0:
        return None
    r = json.loads(done.stdout)
    log("reader's flood path in-process: best %.3f us a packet, median %.3f (%d passes over "
        "%d frames, %d refused; Python %s)", r["best_us"], r["median_us"], r["passes"],
        r["frames"], r["refused"], r["python"])
    return r


def measure_scale(lab, server, cfg, budget):
    out = []
    for n in cfg.scale_ns:
        srcs = lab.fresh(n)
        items = [(src, make_knock(server.keys, client_timeout=300)) for src in srcs]
        counter = server.opened_counter()
        counter.count()
        base = counter.n
        before = server.counters()
        t_first, t_sent = ns_call(lab.cli, blast, items, lab.dst, timeout=60)
        deadline = t_first + min(cfg.scale_deadline(n), max(5.0, budget.left() - budget.reserve))
        last_change, last_n, t_last_auth = time.monotonic(), 0, None
        while True:
            got = counter.count() - base
            now = time.monotonic()
            if got != last_n:
                last_n, last_change, t_last_auth = got, now, now
            if got >= n or now >= deadline or now - last_change >= cfg.scale_stall:
                break
            time.sleep(0.002)
        after = server.counters()
        d = after.delta(before)
        if d["kernel_drops"] is None and d["arrived_udp"] is not None:    # fwknopd: estimated
            d["kernel_drops"] = max(0, d["arrived_udp"] - d["handled"])
        addresses = server.fw_addresses()
        entries = None if addresses is None else len(addresses)
        mine = None if addresses is None else len(set(srcs) & set(addresses))
        r = {"n": n, "authorized": last_n, "lost": n - last_n,
             "send_seconds": t_sent - t_first,
             "seconds_to_last": (t_last_auth - t_first) if t_last_auth else None,
             "rate_per_s": last_n / (t_last_auth - t_first) if t_last_auth and last_n else None,
             "complete": last_n >= n, "hit_deadline": last_n < n and time.monotonic() >= deadline,
             "handled": d["handled"], "arrived": d["arrived"], "kernel_drops": d["kernel_drops"],
             "cpu_s": d["cpu_s"], "fw_entries": entries,
             "fw_entries_of_this_run": mine,
             "rss_kb": after.rss_kb, "pss_kb": after.pss_kb}
        out.append(r)
        log("%s: scale N=%d: %d authorized, %d lost, %s/s, last after %s s (sent in %s s); "
            "firewall entries %s (%s of this run); server handled %s, kernel drops %s", server.name,
            n, last_n, n - last_n, fmt(r["rate_per_s"]), fmt(r["seconds_to_last"]),
            fmt(r["send_seconds"]), entries, mine, d["handled"], d["kernel_drops"])
        if last_n < n / 2:
            show_unusual(server, "fewer than half authorized")
    return out


def measure_router(kind, cfg, keys):
    """The server in a cgroup of cfg.router_share of one core (a router's CPU), in a fresh
    lab: its start-up time (start to "ready"), idle PSS, knock-to-open, and a ladder of
    garbage floods with valid knocks, up the rates until a knock fails to open."""
    out = {}
    name = "bench-spa-%d-%s" % (os.getpid(), re.sub(r"\W", "", kind.name))
    with tempfile.TemporaryDirectory(prefix="bench_spa.") as tmpdir, BenchLab() as lab, \
            CpuLimit(cfg.router_share, name) as limit:
        os.chmod(tmpdir, 0o700)
        cfg.tmpdir = tmpdir
        out["cgroup"] = limit.kind
        lab.tcp_service("srv", lab.dst, SERVICE_PORT)
        server = kind(lab, tmpdir, keys, wrap=limit.wrap)
        t = time.monotonic()
        server.start()
        out["startup_s"] = time.monotonic() - t
        time.sleep(0.5)
        out["memory_idle"] = server.memory()
        settings = dict(vars(cfg))
        cfg.latency_knocks = cfg.router_knocks
        try:
            out["latency"] = measure_latency(lab, server, cfg)
            cfg.flood_seconds, cfg.flood_knocks = cfg.router_flood_seconds, cfg.router_flood_knocks
            runs = []
            for rate in cfg.router_rates:
                runs += measure_flood(lab, server, cfg, [(rate, 1)])["runs"]
                if runs[-1]["opened_pct"] < 100:
                    break
        finally:
            vars(cfg).update(settings)
        out["flood"] = runs
        full = [r for r in runs if r["opened_pct"] >= 100]
        out["highest_100pct_pps"] = full[-1]["sender"]["rate"] if full else None
        server.stop()
    log("%s on a router's CPU (%s): start-up %.3f s, idle PSS %d kB, knock-to-open %s / %s ms, "
        "highest garbage rate with every knock opened %s pps; load %s", kind.name, out["cgroup"],
        out["startup_s"], out["memory_idle"]["pss_kb"], fmt(get(out, "latency", "median_ms")),
        fmt(get(out, "latency", "p95_ms")), out["highest_100pct_pps"], load())
    return out


_INSTALLED = {}


def system_python():
    """(interpreter, description): Debian's /usr/bin/python3 -- what a user who installed
    python3-pycryptodome runs -- if it can import pycryptodome, else this interpreter.
    Both the server and the client are measured under it."""
    python = "/usr/bin/python3"
    check = subprocess.run([python, "-c", "import sys; sys.path.insert(0, %r); import spa; spa.aes_module()" % HERE],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) \
        if os.path.exists(python) else None
    if check is None or check.returncode != 0:
        return sys.executable, "%s (no usable /usr/bin/python3 with pycryptodome)" % sys.executable
    version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                             stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    return python, "Debian's /usr/bin/python3 (%s)" % version


def installed(python):
    """The launcher that `spa.py install` writes, for `python`: what a user runs after
    installing (Python then reuses spa's compiled code, instead of compiling the script)."""
    if python not in _INSTALLED:
        import tempfile
        import atexit
        import shutil
        prefix = tempfile.mkdtemp(prefix="bench-spa-install-")
        atexit.register(shutil.rmtree, prefix, True)
        subprocess.run([python, SPA, "install", "--prefix", prefix, "--python", python], check=True,
                       stdout=subprocess.DEVNULL)
        _INSTALLED[python] = os.path.join(prefix, "bin", "spa")
    return _INSTALLED[python]


def measure_client_cost(lab, cfg, keys, tmpdir):
    """hyperfine inside the client namespace: spa.py client (Debian's python) vs fwknop."""
    k, h = (base64.b64encode(x).decode() for x in keys)
    python, note = system_python()
    args = "client -D %s -A tcp/%d --key-base64 %s --hmac-key-base64 %s -U %s" % (
        lab.dst, SERVICE_PORT, k, h, USER)
    spa_cmd = "%s %s" % (installed(python), args)
    script_cmd = "%s %s %s" % (python, SPA, args)
    fwknop_cmd = ("fwknop -D %s -A tcp/%d --key-base64-rijndael %s --key-base64-hmac %s --use-hmac "
                  "-s --no-save-args --no-rc-file" % (lab.dst, SERVICE_PORT, k, h))
    floor_cmd = "%s -c pass" % python
    export = os.path.join(tmpdir, "hyperfine.json")
    lab.run("cli1", ["hyperfine", "-N", "--style", "none", "--warmup", str(cfg.hyperfine_warmup),
                     "--runs", str(cfg.hyperfine_runs), "--export-json", export,
                     "-n", "spa.py", spa_cmd, "-n", "spa.py-script", script_cmd,
                     "-n", "fwknop", fwknop_cmd, "-n", "python-floor", floor_cmd], timeout=300)
    with open(export) as f:
        results = {r["command"]: r for r in json.load(f)["results"]}

    def summary(r):
        return {"mean_ms": r["mean"] * 1000, "stddev_ms": (r.get("stddev") or 0) * 1000,
                "median_ms": r["median"] * 1000, "min_ms": r["min"] * 1000,
                "max_ms": r["max"] * 1000, "runs": len(r["times"])}
    out = {"python": note, "spa.py": summary(results["spa.py"]),
           "spa.py_script": summary(results["spa.py-script"]),
           "fwknopd": summary(results["fwknop"]), "python_floor": summary(results["python-floor"])}
    log("client cost: spa.py client %.1f ms, fwknop %.1f ms (python -c pass: %.1f ms)",
        out["spa.py"]["mean_ms"], out["fwknopd"]["mean_ms"], out["python_floor"]["mean_ms"])
    return out


class Budget(object):
    def __init__(self, seconds, reserve):
        self.end = time.monotonic() + seconds
        self.reserve = reserve

    def left(self):
        return self.end - time.monotonic()


PARTS = ("client", "latency", "flood", "garbage", "sandbox", "scale", "router")


def bench_server(kind, cfg, keys, budget, results, with_client_cost, parts=PARTS):
    """Build a fresh lab, run one server in it and measure every figure (of `parts`); then
    the router's row, in a lab and a cgroup of its own."""
    data = results["servers"].setdefault(kind.name, {})
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_spa.") as tmpdir, BenchLab() as lab:
        os.chmod(tmpdir, 0o700)
        cfg.tmpdir = tmpdir
        lab.tcp_service("srv", lab.dst, SERVICE_PORT)
        if with_client_cost and "client" in parts:
            results["client_cost"] = measure_client_cost(lab, cfg, keys, tmpdir)
        server = kind(lab, tmpdir, keys).start()
        time.sleep(0.5)
        data["memory_idle"] = server.memory()
        log("%s: idle: RSS %d kB over %d processes (PSS %d kB); load %s", kind.name,
            data["memory_idle"]["rss_kb"], data["memory_idle"]["processes"],
            data["memory_idle"]["pss_kb"], load())
        if "latency" in parts:
            data["latency"] = measure_latency(lab, server, cfg)
        data["memory_warm"] = server.memory()      # after the first openings (helpers started)
        if "flood" in parts:
            data["flood"] = measure_flood(lab, server, cfg)
        if "garbage" in parts:
            data["garbage"] = measure_garbage(lab, server, cfg)
        if kind is SpaUnderTest and "sandbox" in parts:
            data["sandbox"] = measure_sandbox_cost(cfg)
        if kind is SpaUnderTest and "garbage" in parts:
            data["reader_loop"] = measure_reader_loop(cfg)
        data["handled_total"] = server.counters().handled
        data["memory_after_floods"] = server.memory()
        if "scale" in parts:
            data["scale"] = measure_scale(lab, server, cfg, budget)
            data["memory_holding"] = server.memory()
            data["holding"] = data["scale"][-1]["fw_entries"] if data["scale"] else None
        server.stop()
        data["log_tail"] = server.proc.log.lines[-4:]
    if "router" in parts:
        data["router"] = measure_router(kind, cfg, keys)
    data["seconds"] = time.monotonic() - t0
    log("%s: done in %.0f s", kind.name, data["seconds"])


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def fmt(x, digits=None):
    if x is None:
        return "n/a"
    if isinstance(x, int):
        return str(x)
    if digits is None:
        digits = 0 if abs(x) >= 100 else (1 if abs(x) >= 10 else (2 if abs(x) >= 0.1 else 3))
    return "%.*f" % (digits, x)


def kpps(x):
    if x is None:
        return "n/a"
    return "%.0fk" % (x / 1000.0) if x >= 10000 else "%.1fk" % (x / 1000.0)


def get(d, *path):
    for p in path:
        if d is None:
            return None
        d = d[p] if isinstance(d, list) else d.get(p)
    return d


def build_rows(results, cfg):
    """(figure, spa value, spa text, fwknopd value, fwknopd text, goal text) rows."""
    S, F = results["servers"].get("spa.py", {}), results["servers"].get("fwknopd", {})
    rows = []

    def row(label, sv, fv, st=None, ft=None, goal=""):
        rows.append((label, sv, fmt(sv) if st is None else st, fv, fmt(fv) if ft is None else ft,
                     goal))

    def check(ok, text):
        return "%s: %s" % (text, "ok" if ok else "MISSED") if ok is not None else text

    for key, label, goal in (("median_ms", "knock-to-open median (ms)", 2.0),
                             ("p95_ms", "knock-to-open p95 (ms)", 5.0)):
        sv, fv = get(S, "latency", key), get(F, "latency", key)
        row(label, sv, fv, goal=check(None if sv is None else sv <= goal, "<= %g" % goal))
    sv, fv = get(S, "latency", "opened"), get(F, "latency", "opened")
    row("knock-to-open: knocks opened", sv, fv,
        None if sv is None else "%d/%d" % (sv, get(S, "latency", "knocks")),
        None if fv is None else "%d/%d" % (fv, get(F, "latency", "knocks")), goal="all")

    cc = results.get("client_cost") or {}
    sv, fv = get(cc, "spa.py", "mean_ms"), get(cc, "fwknopd", "mean_ms")
    row("client cost, build+send (ms; installed `spa`; fwknopd column: fwknop client)", sv, fv,
        None if sv is None else "%s +- %s" % (fmt(sv), fmt(get(cc, "spa.py", "stddev_ms"))),
        None if fv is None else "%s +- %s" % (fmt(fv), fmt(get(cc, "fwknopd", "stddev_ms"))),
        goal=check(None if sv is None else sv <= 40, "<= 40"))
    sv = get(cc, "spa.py_script", "mean_ms")
    row("client cost, `python3 spa.py client` as a script (ms)", sv, fv,
        None if sv is None else "%s +- %s" % (fmt(sv), fmt(get(cc, "spa.py_script", "stddev_ms"))),
        None if fv is None else "%s" % fmt(fv), goal="(compiles the file each run)")

    for i, (rate, repeat) in enumerate(cfg.flood_runs):
        name = (("%s pps" % kpps(rate)) if rate else "max pps") + \
            (", each knock sent %d times" % repeat if repeat > 1 else "")
        cells = []
        for D in (S, F):
            r = get(D, "flood", "runs", i) if len(get(D, "flood", "runs") or []) > i else None
            if r is None:
                cells.append((None, None))
                continue
            cells.append((r["opened_pct"], "%s%% (sent %s/s, handled %s/s, kernel drops %s%%%s)"
                          % (fmt(r["opened_pct"], 0), kpps(r["sender"]["rate"]),
                             kpps(r["handled_pps"]), fmt(r["drop_pct"], 0),
                             " est." if r.get("kernel_drops_estimated") else "")))
        row("flood %s: valid knocks opened <= 1 s" % name, cells[0][0], cells[1][0],
            cells[0][1], cells[1][1],
            goal=">= 95%" if not rate else "100% up to the server's capacity")
    sv, fv = get(S, "flood", "highest_100pct_pps"), get(F, "flood", "highest_100pct_pps")
    row("flood: highest rate with 100% opened (pps)", sv, fv,
        "none" if S.get("flood") and sv is None else None,
        "none" if F.get("flood") and fv is None else None)
    sv, fv = get(S, "flood", "rss_peak_kb"), get(F, "flood", "rss_peak_kb")
    row("flood: peak server RSS (MB)", sv and sv / 1024.0, fv and fv / 1024.0)
    sv, fv = get(S, "flood", "pss_peak_kb"), get(F, "flood", "pss_peak_kb")
    row("flood: peak server PSS (MB)", sv and sv / 1024.0, fv and fv / 1024.0,
        goal=check(None if sv is None else sv / 1024.0 <= 20, "<= 20"))
    sv, fv = get(S, "flood", "log_lines"), get(F, "flood", "log_lines")
    row("flood: log lines written (all rates)", sv, fv,
        None if sv is None else "%d (%s kB)" % (sv, fmt(get(S, "flood", "log_bytes") / 1024.0)),
        None if fv is None else "%d (%s kB)" % (fv, fmt(get(F, "flood", "log_bytes") / 1024.0)))

    sv, fv = get(S, "garbage", "cpu_us_per_packet"), get(F, "garbage", "cpu_us_per_packet")
    row("garbage cost (us server CPU per packet)", sv, fv,
        goal=check(None if sv is None else sv <= 3, "<= 3"))
    sv, fv = get(S, "garbage", "handled_pps"), get(F, "garbage", "handled_pps")
    row("garbage: packets handled per second", sv, fv,
        None if sv is None else "%s (sent %s/s)" % (fmt(sv), kpps(get(S, "garbage", "sender", "rate"))),
        None if fv is None else "%s (sent %s/s)" % (fmt(fv), kpps(get(F, "garbage", "sender", "rate"))))
    cells = []
    for D in (S, F):
        d, pct = get(D, "garbage", "kernel_drops"), get(D, "garbage", "drop_pct_of_arrived")
        est = " est." if get(D, "garbage", "kernel_drops_estimated") else ""
        cells.append((d, None if d is None else "%d (%s%% of arrived%s)" % (d, fmt(pct, 0), est)))
    row("garbage: kernel drops before the server read them", cells[0][0], cells[1][0],
        cells[0][1], cells[1][1])
    sv = get(S, "reader_loop", "best_us")
    row("reader's flood path in-process (us a garbage packet; best, median of the passes)", sv,
        None, None if sv is None else "%.3f, %.3f (%d passes over %d frames)" % (
            sv, get(S, "reader_loop", "median_us"), get(S, "reader_loop", "passes"),
            get(S, "reader_loop", "frames")),
        "n/a (C)" if F else None, goal="what a code change did (best: the least disturbed)")
    sv = get(S, "sandbox", "extra_us")
    row("packet reader's seccomp filter: extra us per system call (recvfrom)", sv, None,
        None if sv is None else "%+.3f (%.3f -> %.3f)" % (
            sv, get(S, "sandbox", "recvfrom_us"), get(S, "sandbox", "recvfrom_filtered_us")),
        "no sandbox" if F else None, goal="small against the garbage cost")

    for i, n in enumerate(cfg.scale_ns):
        rs = get(S, "scale", i) if len(S.get("scale") or []) > i else None
        rf = get(F, "scale", i) if len(F.get("scale") or []) > i else None

        def auth_text(r):
            if r is None:
                return None
            extra = " (gave up waiting)" if r["hit_deadline"] else ""
            return "%d/%d, %d lost%s" % (r["authorized"], r["n"], r["lost"], extra)

        def entries_text(r):
            if r is None or r["fw_entries"] is None:
                return None
            return "%s of this run (%d in all)" % (fmt(r["fw_entries_of_this_run"]), r["fw_entries"])
        row("scale N=%d: authorized" % n, rs and rs["authorized"], rf and rf["authorized"],
            auth_text(rs), auth_text(rf), goal=check(None if rs is None else rs["lost"] == 0, "all"))
        row("scale N=%d: authorizations per second" % n, rs and rs["rate_per_s"],
            rf and rf["rate_per_s"],
            goal=check(None if rs is None or rs["rate_per_s"] is None
                       else rs["rate_per_s"] >= 1000, ">= 1000"))
        row("scale N=%d: firewall entries afterwards" % n, rs and rs["fw_entries_of_this_run"],
            rf and rf["fw_entries_of_this_run"], entries_text(rs), entries_text(rf))

    # spa.py's server is two processes (issue 4: a root parent and a packet reader as
    # nobody), forked, so they share most pages.  RSS summed counts those twice; PSS
    # (each shared page split among the processes that map it) is what the server
    # costs the machine.  Both are printed; the goal is checked on PSS and on the
    # largest process's RSS, and summed RSS is shown against it as well.
    def largest_mb(m):
        return max([p["rss_kb"] for p in m.get("detail", ())] or [m["rss_kb"]]) / 1024.0

    def mem(D, key, measure):
        m = D.get(key)
        if not m:
            return None, None
        largest = largest_mb(m)
        procs = "%d process%s" % (m["processes"], "" if m["processes"] == 1 else "es")
        if measure == "pss":
            return m["pss_kb"] / 1024.0, "%s (%s; RSS %s summed, largest process %s)" % (
                fmt(m["pss_kb"] / 1024.0), procs, fmt(m["rss_kb"] / 1024.0), fmt(largest))
        return m["rss_kb"] / 1024.0, "%s (summed over %s, largest %s)" % (
            fmt(m["rss_kb"] / 1024.0), procs, fmt(largest))
    for key, state, extra in (
            ("memory_idle", "idle", None),
            ("memory_after_floods", "after the floods", "handled_total"),
            ("memory_holding", "holding the scale authorizations", "holding")):
        for measure in ("pss", "rss"):
            (sv, st), (fv, ft) = mem(S, key, measure), mem(F, key, measure)
            if extra:
                what = "packets handled" if extra == "handled_total" else "held"
                st = st and "%s; %s %s" % (st, fmt(S.get(extra)), what)
                ft = ft and "%s; %s %s" % (ft, fmt(F.get(extra)), what)
            if measure == "pss":
                goal = check(None if sv is None else sv <= 20 and largest_mb(S[key]) <= 20,
                             "<= 20 (PSS, and each process's RSS)")
            else:
                goal = check(None if sv is None else sv <= 20, "<= 20 summed")
            row("memory: %s %s (MB)" % (measure.upper(), state), sv, fv, st, ft, goal=goal)
    growth = []
    for D in (S, F):
        a, b = mem(D, "memory_warm", "rss")[0], mem(D, "memory_after_floods", "rss")[0]
        growth.append(None if a is None or b is None else b - a)
    row("memory: RSS growth over the floods (MB, from after the latency knocks)", growth[0], growth[1],
        goal=check(None if growth[0] is None else growth[0] <= 1.0, "none (<= 1)"))
    router_rows(row, S, F, cfg)
    return rows


def router_rows(row, S, F, cfg):
    """The router's rows: both servers in a cgroup of cfg.router_share of one core."""
    def check(ok, text):
        return "%s: %s" % (text, "ok" if ok else "MISSED") if ok is not None else text
    share = "%d%% of one core" % round(100 * cfg.router_share)
    for key, label in (("median_ms", "knock-to-open median"), ("p95_ms", "knock-to-open p95")):
        sv, fv = get(S, "router", "latency", key), get(F, "router", "latency", key)
        row("router (%s): %s (ms)" % (share, label), sv, fv)
    cells = []
    for D in (S, F):
        best, runs = get(D, "router", "highest_100pct_pps"), get(D, "router", "flood") or []
        text = None
        if runs:
            text = "%s (%s)" % ("none" if best is None else fmt(best), ", ".join(
                "%s: %s%%" % (kpps(r["offered_pps"] or r["sender"]["rate"]),
                              fmt(r["opened_pct"], 0)) for r in runs))
        cells.append((best, text))
    row("router (%s): highest garbage rate with 100%% opened (pps)" % share, cells[0][0],
        cells[1][0], cells[0][1], cells[1][1])
    sv, fv = get(S, "router", "startup_s"), get(F, "router", "startup_s")
    row("router (%s): start-up, start to ready (ms)" % share, sv and sv * 1000,
        fv and fv * 1000)
    sv, fv = get(S, "router", "memory_idle", "pss_kb"), get(F, "router", "memory_idle", "pss_kb")
    row("router (%s): PSS idle (MB)" % share, sv and sv / 1024.0, fv and fv / 1024.0,
        goal=check(None if sv is None else sv / 1024.0 <= 20, "<= 20"))


def ratio(sv, fv):
    if not isinstance(sv, (int, float)) or not isinstance(fv, (int, float)) or not fv:
        return "n/a"
    return fmt(sv / float(fv), 3 if abs(sv / float(fv)) < 1 else None)


def print_table(rows, results, out=sys.stdout):
    table = [("figure", "spa.py", "fwknopd", "ratio spa.py/fwknopd", "goal for spa.py")]
    table += [(label, st, ft, ratio(sv, fv), goal) for label, sv, st, fv, ft, goal in rows]
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    meta = results["meta"]
    out.write("\nspa.py vs fwknopd (%s mode, %d CPUs, kernel %s, %.0f s in all; spa.py under %s; "
              "load average %s at the start, %s at the end)\n\n"
              % ("smoke" if meta["smoke"] else "full", meta["cpus"], meta["kernel"],
                 meta.get("total_seconds", 0), meta.get("spa_python", "?"),
                 meta.get("load_start", "?"), meta.get("load_end", "?")))
    out.write(line(table[0]) + "\n")
    out.write("|" + "|".join("-" * (w + 2) for w in widths) + "|\n")
    for r in table[1:]:
        out.write(line(r) + "\n")
    cc = results.get("client_cost")
    if cc:
        out.write("\nclient cost: spa.py under %s; `python3 -c pass` alone takes %.1f ms there.\n"
                  % (cc["python"], cc["python_floor"]["mean_ms"]))
    out.flush()


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def preflight():
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (it builds network namespaces)")
    for tool in ("ip", "nft", "iptables", "fwknopd", "fwknop", "hyperfine", "ss"):
        if shutil.which(tool) is None:
            problems.append("%s is not installed (sh setup.sh installs everything)" % tool)
    return problems


def flood_run(text):
    """(rate, copies) of one --flood-runs entry: "20k", "150000", "max" or "0" (the
    sender's maximum), each with an optional "xN" (send each knock N times)."""
    m = re.match(r"^\s*(max|\d+(?:\.\d+)?k?)\s*(?:x\s*(\d+))?\s*$", text)
    if not m:
        raise ValueError("--flood-runs: %r is not RATE[xN] (e.g. 20k, max, max x3)" % text)
    rate = m.group(1)
    rate = 0 if rate == "max" else int(float(rate.rstrip("k")) * (1000 if rate.endswith("k") else 1))
    return rate, int(m.group(2) or 1)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_flood"]:
        return flood_sender_main(argv[1])
    if argv[:1] == ["_reader_loop"]:
        return reader_loop_main(argv[1])
    p = argparse.ArgumentParser(description="Benchmark spa.py's server against fwknopd "
                                "(run as root; see the docstring at the top).")
    p.add_argument("--smoke", action="store_true", help="a quick run: a few knocks, ~1 s floods, tiny N")
    p.add_argument("--json", metavar="FILE", help="save every raw number to FILE")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="hard time limit (default 900, or 170 with --smoke)")
    p.add_argument("--servers", default="spa.py,fwknopd",
                   help="which servers to run, in order (default spa.py,fwknopd)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="which measurements to make (default all: %s)" % ",".join(PARTS))
    p.add_argument("--flood-runs", dest="flood_runs", metavar="RATE[xN],...",
                   help="the flood runs: rates in packets a second (0: the sender's maximum), "
                   "xN to send each knock N times (default 1k,5k,20k,50k,100k,150k,200k,max,"
                   "max x3)")
    p.add_argument("--python-sender", dest="python_sender", action="store_true",
                   help="flood with this script's sendmmsg processes instead of trafgen")
    args = p.parse_args(argv)
    cfg = Settings(args.smoke)
    cfg.python_sender = args.python_sender
    if args.flood_runs:
        try:
            cfg.flood_runs = [flood_run(r) for r in args.flood_runs.split(",")]
        except ValueError as e:
            p.error(str(e))
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    for part in parts:
        if part not in PARTS:
            p.error("unknown part %r (%s)" % (part, ",".join(PARTS)))
    if args.budget:
        cfg.budget = args.budget
    problems = preflight()
    if problems:
        for problem in problems:
            print("bench_spa.py: " + problem, file=sys.stderr)
        return 2

    try:
        spa.aes_module()
    except spa.SpaError as e:
        print("bench_spa.py: %s" % e, file=sys.stderr)
        return 2
    netns_lab.sweep_stale(PREFIX)
    CpuLimit.sweep_stale()

    keys = (os.urandom(32), os.urandom(64))
    cfg.garbage_length = len(make_knock(keys))    # a real packet's length, 204
    kinds = {"spa.py": SpaUnderTest, "fwknopd": FwknopdUnderTest}
    order = [s.strip() for s in args.servers.split(",") if s.strip()]
    for name in order:
        if name not in kinds:
            p.error("unknown server %r (spa.py, fwknopd)" % name)
    results = {"meta": {"smoke": cfg.smoke, "cpus": os.cpu_count(), "kernel": os.uname().release,
                        "python": sys.version.split()[0], "spa_python": system_python()[1],
                        "garbage_length": cfg.garbage_length,
                        "flood_runs": cfg.flood_runs, "flood_seconds": cfg.flood_seconds,
                        "scale_ns": cfg.scale_ns, "started": time.time(),
                        "load_start": load()},
               "servers": {}}
    budget = Budget(cfg.budget, reserve=0.0)

    def on_signal(signum, frame):
        if signum == signal.SIGALRM:
            raise BudgetExceeded("the %.0f s time budget ran out" % cfg.budget)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.setitimer(signal.ITIMER_REAL, cfg.budget)
    status = 0
    try:
        for i, name in enumerate(order):
            # Leave the later servers their share of the budget in the capped scale waits.
            budget.reserve = 0.0 if i == len(order) - 1 else \
                (60.0 if cfg.smoke else 240.0) * (len(order) - 1 - i)
            log("=== %s ===", name)
            bench_server(kinds[name], cfg, keys, budget, results, i == 0, parts)
    except BudgetExceeded as e:
        log("stopped: %s; the table shows what was measured", e)
        status = 3
    except KeyboardInterrupt:
        log("interrupted; namespaces removed")
        status = 130
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    results["meta"]["total_seconds"] = time.monotonic() - T_START
    results["meta"]["load_end"] = load()
    rows = build_rows(results, cfg)
    results["rows"] = [{"figure": r[0], "spa.py": r[1], "fwknopd": r[3], "ratio": ratio(r[1], r[3]),
                        "spa.py_text": r[2], "fwknopd_text": r[4], "goal": r[5]} for r in rows]
    print_table(rows, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
            f.write("\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
