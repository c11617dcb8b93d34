"""piggyback.py: how often, and for how long, a neighbour behind the same NAT gets in on a knock.

A real NAT, in network namespaces (netns_lab; 198.18.0.0/15 and 2001:db8::/32 only):

    knocker  198.19.1.2  2001:db8:f1::2 --\\
                                           router (masquerade) 198.18.1.2 -- server 198.18.1.1
    neighbour 198.19.2.2 2001:db8:f2::2 --/                  2001:db8:1::2    2001:db8:1::1

The server runs `spa.py server` (nft, iptables-nft or iptables-legacy) with two stanzas, one
with single_use = yes and one without, and a TCP service on the protected port.  In each
trial the knocker knocks with the real `spa.py client` and connects, and from the moment the
client starts, the neighbour tries a fresh connection (a new SYN, non-blocking) every
millisecond until the opening has surely ended.  Three ways of knocking:

    once+connect   single_use, `spa.py client --connect` (it connects as soon as it is open)
    once+separate  single_use, `spa.py client`, then a connect of its own (`client && ssh`)
    plain          no single_use, `spa.py client --connect`

Each trial counts the neighbour's connections that were accepted, when they were (ms after
the knock was sent), and when the knocker got in.  Run as root:

    python3 piggyback.py -n 20                     # every back end, IPv4 and IPv6
    python3 piggyback.py -n 5 --firewall nft -4    # fewer
    python3 piggyback.py -n 3 --forward            # NAT openings: the server forwards each
                                                   # knock (force_nat) to an internal host

It prints one Markdown table (README.md: Close the NAT-piggybacking window).
test_piggyback.py runs it with a small N in CI and checks the counts, never the times.
"""

import argparse
import base64
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import netns_lab
from netns_lab import Lab, ns_socket, ns_sysctl, wait_for_line

HERE = os.path.dirname(os.path.abspath(__file__))
SPA = os.path.join(HERE, "spa.py")
PORT = 2222                    # the protected port, with a TCP service behind it
TIMEOUT = 3                    # fw_access_timeout, seconds (more than spa.ONCE_GRACE)
FIREWALLS = ("nft", "iptables-nft", "iptables-legacy")
MODES = ("once+connect", "once+separate", "plain")
LAN = {"kn": ("198.19.1", "2001:db8:f1::"), "nb": ("198.19.2", "2001:db8:f2::")}


class NatLab(object):
    """The server (lab's srv), the router (lab's cli1, masquerading out of its link to the
    server), and two hosts behind the router: the knocker ("kn") and the neighbour ("nb")."""

    def __init__(self, lab, random_ports=False):
        self.lab = lab
        self.ns = {}
        router = lab.name("cli1")
        for k, (who, (v4, v6)) in enumerate(sorted(LAN.items()), 1):
            name = "%s-%s" % (lab.tag, who)
            self._ip("netns", "add", name)
            lab.on_close(lambda name=name: netns_lab._run(["ip", "netns", "delete", name]))
            self.ns[who] = name
            self._ip("-n", name, "link", "set", "lo", "up")
            for conf in ("all", "default"):
                ns_sysctl(name, "net.ipv6.conf.%s.accept_dad" % conf, 0)
            inner, outer = "%s-i%d" % (lab.cli_if[1][:10], k), "%s-o%d" % (lab.cli_if[1][:10], k)
            self._ip("link", "add", outer, "netns", router, "type", "veth", "peer", "name",
                     inner, "netns", name)
            for ns, ifname, host in ((router, outer, "1"), (name, inner, "2")):
                self._ip("-n", ns, "addr", "add", "%s.%s/24" % (v4, host), "dev", ifname)
                self._ip("-n", ns, "addr", "add", "%s%s/64" % (v6, host), "dev", ifname, "nodad")
                self._ip("-n", ns, "link", "set", ifname, "up")
            self._ip("-n", name, "route", "add", "default", "via", "%s.1" % v4)
            self._ip("-n", name, "-6", "route", "add", "default", "via", "%s1" % v6)
        for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
            ns_sysctl(router, key, 1)
        lab.run("cli1", ["nft", "-f", "-"], input=(
            "table inet su_nat {\n chain post {\n  type nat hook postrouting priority srcnat;\n"
            "  oifname %s masquerade%s\n }\n}\n"
            % (lab.cli_if[1], " fully-random" if random_ports else "")))

    def _ip(self, *args):
        netns_lab._run(["ip"] + list(args), timeout=20)

    @staticmethod
    def server(family):
        return Lab.srv4(1) if family == 4 else Lab.srv6(1)


class Prober(object):
    """From start() on, a fresh non-blocking connect to addr:port every `interval` seconds,
    for `duration` seconds, inside namespace `ns`; `accepted` holds the monotonic times at
    which one connected (each is closed at once).  At most 256 in flight (bounded)."""

    def __init__(self, ns, addr, port, duration, interval=0.001):
        self.ns, self.addr, self.port = ns, addr, port
        self.duration, self.interval = duration, interval
        self.accepted, self.tried = [], 0
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self._enter)
        self.thread.start()

    def _enter(self):
        netns_lab.in_netns(self.ns, self._run)

    def _run(self):
        family = socket.AF_INET6 if ":" in self.addr else socket.AF_INET
        end = time.monotonic() + self.duration
        pending = {}
        next_try = time.monotonic()
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_try and len(pending) < 256:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.connect_ex((self.addr, self.port))
                pending[sock] = now
                self.tried += 1
                next_try += self.interval
            wait = max(0.0, min(next_try, end) - time.monotonic())
            _, ready, _ = select.select([], list(pending), [], wait)
            for sock in ready:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    self.accepted.append(time.monotonic())
                sock.close()
                del pending[sock]
            for sock in [s for s, t in pending.items() if time.monotonic() - t > 0.3]:
                sock.close()
                del pending[sock]
        for sock in pending:
            sock.close()

    def join(self):
        self.thread.join(self.duration + 15)


def _private(path, text):
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)


def _keys():
    return base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(64)).decode()


def start_server(lab, firewall, folder, nat=False):
    """`spa.py server` in the server's namespace with stanzas `once` (single_use) and
    `plain`; returns (process, {stanza: keys}).  nat: each stanza forwards (force_nat) to
    the same port of the internal host (the lab's client 2), one stanza a family."""
    keys = {"once": _keys(), "plain": _keys()}
    conf = os.path.join(folder, "spa-%s.conf" % firewall)
    text = ("[server]\ninterface = any\nprotect = tcp/%d\nfirewall = %s\nsaved_firewall = none\n"
            "replay_cache = %s\n%s" % (PORT, firewall, os.path.join(folder, "replay-" + firewall),
                                       "enable_forwarding = yes\n" if nat else ""))
    targets = [("", "198.18.0.0/15", "%s:%d" % (Lab.cli4(2), PORT)),
               ("6", "2001:db8::/32", "[%s]:%d" % (Lab.cli6(2), PORT))] if nat else [("", "", "")]
    for name, (key, hmac_key) in sorted(keys.items()):
        for suffix, source, target in targets:
            text += ("\n[client %s%s]\nkey_base64 = %s\nhmac_key_base64 = %s\nopen_ports = "
                     "tcp/%d\nfw_access_timeout = %d\nmax_openings = 100000\nsingle_use = %s\n"
                     % (name, suffix, key, hmac_key, PORT, TIMEOUT,
                        "yes" if name == "once" else "no"))
            text += "source = %s\nforce_nat = %s\n" % (source, target) if nat else ""
    _private(conf, text)
    server = lab.spawn("srv", [sys.executable, SPA, "server", "-c", conf, "-v"])
    wait_for_line(server, r"listening on", 20)
    return server, keys


def client_conf(folder, keys):
    """The knocker's client config: sections `once` and `plain`, the server by address."""
    path = os.path.join(folder, "client.conf")
    text = ""
    for name, (key, hmac_key) in sorted(keys.items()):
        text += ("[%s]\naccess = tcp/%d\nkey_base64 = %s\nhmac_key_base64 = %s\n\n"
                 % (name, PORT, key, hmac_key))
    _private(path, text)
    return path


class Lines(object):
    """A process's stderr lines, each with the monotonic time it was read."""

    def __init__(self, stream):
        self.lines = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in iter(stream.readline, b""):
            self.lines.append((time.monotonic(), line.decode(errors="replace")))

    def when(self, start):
        return next((t for t, line in self.lines if line.startswith(start)), None)


def connect_once_then_retry(ns, addr, port, limit=2.0):
    """`ssh` right after the client: one connect; if refused (not open yet), again every
    millisecond (as a user would run ssh again); the monotonic time it connected, or None."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    end = time.monotonic() + limit
    while time.monotonic() < end:
        with ns_socket(ns, family, socket.SOCK_STREAM) as s:
            s.settimeout(3.0)          # the kernel sends the SYN again after 1 s
            try:
                s.connect((addr, port))
                return time.monotonic()
            except OSError:
                pass
        time.sleep(0.001)
    return None


def trial(nat, mode, family, conf):
    """One knock of `mode` over IPv`family`: a dict of what happened (times in ms after the
    knock was sent)."""
    lab, server = nat.lab, NatLab.server(family)
    section = "plain" if mode == "plain" else "once"
    argv = ["ip", "netns", "exec", nat.ns["kn"], sys.executable, SPA, "client", "-c", conf,
            "-n", section, "-D", server, "-%d" % family, "-v"]
    if mode != "once+separate":
        argv += ["--connect", "%s:%d" % (server if family == 4 else "[%s]" % server, PORT),
                 "--connect-wait", "3"]
    neighbour = Prober(nat.ns["nb"], server, PORT, duration=TIMEOUT + 1.5)
    neighbour.start()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    lines = Lines(proc.stderr)
    out = proc.stdout.read()
    proc.wait(20)
    lines.thread.join(5)
    sent = lines.when("sent ")
    began = None
    if mode == "once+separate":
        began = time.monotonic()
        connected = connect_once_then_retry(nat.ns["kn"], server, PORT) if proc.returncode == 0 \
            else None
    else:
        connected = lines.when("connected to") if b"netns-lab" in out else None
    neighbour.join()
    ms = lambda t: None if t is None or sent is None else (t - sent) * 1000.0     # noqa: E731
    times = [ms(t) for t in neighbour.accepted]
    return {"mode": mode, "family": family, "knocker": ms(connected), "neighbour": times,
            "began": ms(began),
            "tried": neighbour.tried, "rc": proc.returncode,
            "errors": "" if proc.returncode == 0 else "".join(line for _, line in lines.lines)}


def measure(firewalls=FIREWALLS, families=(4, 6), modes=MODES, n=5, say=None,
            random_ports=False, prefix="su", forward=False):
    """Run n trials of each (firewall, family, mode); returns the trial dicts, each with its
    firewall.  random_ports: a NAT that does not keep source ports (fully-random); prefix:
    the Lab's namespace prefix; forward: the server forwards each knock's connection to
    an internal host (single-use NAT openings), whose service answers in place of its own."""
    results = []
    for firewall in firewalls:
        # Fresh namespaces for each: a connection of the neighbour's that got in earlier and
        # whose conntrack entry lives on lets a new one with the same addresses and ports
        # through as its own (conntrack's doing, single_use or not), and `plain` leaves
        # thousands.  Each family's `plain` trials come after its single-use ones.
        with Lab(clients=2 if forward else 1, prefix=prefix) as lab, \
                tempfile.TemporaryDirectory() as folder:
            nat = NatLab(lab, random_ports)
            if forward:
                for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
                    ns_sysctl(lab.name("srv"), key, 1)
            lab.tcp_service("cli2" if forward else "srv", "::", PORT)
            server, keys = start_server(lab, firewall, folder, forward)
            conf = client_conf(folder, keys)
            for family in families:
                for mode in sorted(modes, key=lambda m: m == "plain"):
                    for _ in range(n):
                        result = trial(nat, mode, family, conf)
                        result["firewall"] = firewall
                        results.append(result)
                        if say:
                            say(result)
            Lab.stop_process(server)
    return results


def _median(values):
    return "%.1f" % statistics.median(values) if values else "-"


def table(results):
    """The Markdown table of the results, one row per (firewall, family, mode)."""
    rows = ["| firewall | IP | knock | trials | knocker got in | neighbour got in (trials) | "
            "neighbour's connections | neighbour in from / to (ms after the knock, median) | "
            "knocker in at (ms, median) | knocker's connect began (ms, median) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in results:
        key = (r["firewall"], r["family"], r["mode"])
        if key not in keys:
            keys.append(key)
    for firewall, family, mode in keys:
        these = [r for r in results if (r["firewall"], r["family"], r["mode"]) ==
                 (firewall, family, mode)]
        got_in = [r for r in these if r["neighbour"]]
        rows.append("| %s | IPv%d | %s | %d | %d | %d | %d | %s / %s | %s | %s |" % (
            firewall, family, mode, len(these), sum(1 for r in these if r["knocker"] is not None),
            len(got_in), sum(len(r["neighbour"]) for r in these),
            _median([min(r["neighbour"]) for r in got_in]),
            _median([max(r["neighbour"]) for r in got_in]),
            _median([r["knocker"] for r in these if r["knocker"] is not None]),
            _median([r["began"] for r in these if r["began"] is not None])))
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Measure the NAT-piggybacking window "
                                     "(README.md: Close the NAT-piggybacking window).")
    parser.add_argument("-n", type=int, default=5, help="trials of each kind (default 5)")
    parser.add_argument("--firewall", action="append", choices=FIREWALLS,
                        help="a back end (default: all three)")
    parser.add_argument("-4", dest="families", action="append_const", const=4)
    parser.add_argument("-6", dest="families", action="append_const", const=6)
    parser.add_argument("--random-ports", action="store_true",
                        help="a NAT that does not keep source ports (masquerade fully-random)")
    parser.add_argument("--prefix", default="su",
                        help="the namespaces' name prefix (netns_lab's Lab; default su)")
    parser.add_argument("--forward", action="store_true",
                        help="NAT openings: the server forwards (force_nat) to an internal host")
    parser.add_argument("--mode", action="append", choices=MODES,
                        help="a way of knocking (default: all three)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    results = measure(tuple(args.firewall or FIREWALLS), tuple(args.families or (4, 6)),
                      tuple(args.mode or MODES), args.n,
                      say=lambda r: print("%-16s IPv%d %-14s knocker %s, neighbour %d of %d"
                                          % (r["firewall"], r["family"], r["mode"],
                                             "-" if r["knocker"] is None else
                                             "%.1f ms" % r["knocker"], len(r["neighbour"]),
                                             r["tried"]), file=sys.stderr),
                      random_ports=args.random_ports, prefix=args.prefix,
                      forward=args.forward)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
