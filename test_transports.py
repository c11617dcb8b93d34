"""Knocks over TCP, ICMP and HTTP (issue 14 section 3): `[server] transports`, `http_port`,
`http_proxies`, and `spa.py client -P udp|tcpraw|icmp|http`.

1. The BPF programs, run by a small interpreter of the instructions they use: each passes
   only what its enabled transports need; the udp-only program is the one it always was.
2. The frame parser: source and knock of TCP segments, ICMP/ICMPv6 echoes and HTTP GETs;
   X-Forwarded-For believed only from the configured proxies.
3. The config's options and the client's HTTP request, as fwknop writes it.
4. In network namespaces: the real fwknop client (`--server-proto tcpraw|icmp|http`)
   knocking on spa.py; spa.py's client knocking on spa.py (IPv4 and IPv6) and on the real
   fwknopd (its PCAP_FILTER widened, ENABLE_SPA_OVER_HTTP Y); an HTTP knock with a real
   web server (python's http.server) there and not there; the knock over a transport
   that is not enabled is never seen; and nmap sees the same host with every transport
   enabled as with no spa.py at all.

Namespace tests need root, ip, nft (and fwknop, fwknopd, nmap where they use them):
outside CI they skip when one is missing, with CI=true that is a failure. Namespaces are
named tp<pid>x<n>-*, addresses only 198.18.0.0/15 and 2001:db8::/32.
"""

import os
import re
import socket
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

import netns_lab
import spa
from netns_lab import Lab, need, need_lab, tcp_connect_ok, wait_for_line, wait_tcp_open
from test_spa import (HMAC_KEY, KEY, SERVICE_PORT, knock, lab_server_config, server_config,
                      write_private)

HERE = os.path.dirname(os.path.abspath(__file__))
SPA = os.path.join(HERE, "spa.py")
PORT = spa.DEFAULT_PORT
ALL = "udp, tcp, icmp, http"
WEB = 8080                       # the web server's port in the lab tests (http_port)


# ---------------------------------------------------------------------------
# 1. BPF programs
# ---------------------------------------------------------------------------

def run_bpf(program, frame, pkttype=0):
    """Run a classic BPF program over a cooked frame (the ops bpf_assemble knows)."""
    proto = 0x0800 if frame[0] >> 4 == 4 else 0x86DD
    a = x = 0
    pc = 0

    def load(offset, size):
        if offset + size > len(frame):
            raise IndexError
        return int.from_bytes(frame[offset:offset + size], "big")

    try:
        while True:
            code, jt, jf, k = program[pc]
            pc += 1
            if code == 0x20:
                a = {spa.SKF_AD_PKTTYPE: pkttype, spa.SKF_AD_PROTOCOL: proto}[k]
            elif code in (0x28, 0x30):
                a = load(k, 2 if code == 0x28 else 1)
            elif code in (0x40, 0x48, 0x50):
                a = load(x + k, {0x40: 4, 0x48: 2, 0x50: 1}[code])
            elif code == 0xB1:
                x = (load(k, 1) & 15) * 4
            elif code in (0x04, 0x14, 0x54, 0x74, 0x0C, 0x1C):
                b = x if code in (0x0C, 0x1C) else k
                a = {0x04: a + b, 0x0C: a + b, 0x14: a - b, 0x1C: a - b, 0x54: a & b,
                     0x74: a >> b}[code] & 0xFFFFFFFF
            elif code == 0x07:
                x = a
            elif code == 0x87:
                a = x
            elif code == 0x06:
                return k
            else:
                cond = {0x15: a == k, 0x25: a > k, 0x35: a >= k, 0x45: bool(a & k)}[code]
                pc += jt if cond else jf
    except IndexError:           # the kernel drops a frame a load runs off
        return 0


def ip_frame(proto, l4, source="198.18.1.2", destination="198.18.1.1", frag=0, ihl=5):
    """An IPv4 or IPv6 frame (as a cooked AF_PACKET socket delivers it) around `l4`."""
    if ":" in source:
        next_header = {1: 58}.get(proto, proto)
        return (bytes([0x60, 0, 0, 0]) + len(l4).to_bytes(2, "big") + bytes([next_header, 64]) +
                socket.inet_pton(socket.AF_INET6, source) +
                socket.inet_pton(socket.AF_INET6, destination) + l4)
    return (bytes([0x40 | ihl, 0]) + (ihl * 4 + len(l4)).to_bytes(2, "big") + b"\0\0" +
            frag.to_bytes(2, "big") + bytes([64, proto]) + b"\0\0" + socket.inet_aton(source) +
            socket.inet_aton(destination) + b"\0" * (ihl * 4 - 20) + l4)


def udp(payload, dport=PORT):
    return struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload


def tcp(payload, dport=PORT, options=b"", flags=0x02):
    doff = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, doff << 4, flags, 32767, 0, 0) + \
        options + payload


def icmp(payload, kind=8):
    return struct.pack("!BBHHH", kind, 0, 0, 7, 1) + payload


def get(wire, extra=b""):
    path = wire.translate(bytes.maketrans(b"+/", b"-_"))
    return b"GET /" + path + b" HTTP/1.1\r\nUser-Agent: Fwknop/2.6.10\r\nAccept: */*\r\n" \
        b"Host: 198.18.1.1\r\n" + extra + b"Connection: close\r\n\r\n"


UDP_PROGRAM = [
    (32, 0, 0, 4294963204), (21, 0, 21, 0), (32, 0, 0, 4294963200), (21, 0, 10, 2048),
    (48, 0, 0, 9), (21, 0, 17, 17), (40, 0, 0, 6), (69, 15, 0, 16383), (177, 0, 0, 0),
    (72, 0, 0, 2), (21, 0, 12, 62201), (72, 0, 0, 4), (53, 0, 10, 148), (37, 9, 8, 407),
    (21, 0, 8, 34525), (48, 0, 0, 6), (21, 0, 6, 17), (40, 0, 0, 42), (21, 0, 4, 62201),
    (40, 0, 0, 44), (53, 0, 2, 148), (37, 1, 0, 407), (6, 0, 0, 65535), (6, 0, 0, 0)]


def test_udp_only_program_is_the_one_it_was():
    """The flood path's kernel cost for udp is what it was: the same 24 instructions as
    before there were other transports (copied from spa.py before the change)."""
    prog = spa.bpf_filter(PORT)
    assert prog == spa.bpf_filter(PORT, ("udp",), 80) == UDP_PROGRAM
    good = knock()
    for source in ("198.18.1.2", "2001:db8:1::2"):
        dest = "198.18.1.1" if "." in source else "2001:db8:1::1"
        assert run_bpf(prog, ip_frame(17, udp(good), source, dest)) == 0xFFFF
        for other in (ip_frame(6, tcp(good), source, dest), ip_frame(1, icmp(good), source, dest),
                      ip_frame(6, tcp(get(good), 80), source, dest)):
            assert run_bpf(prog, other) == 0


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_each_program_passes_what_its_transports_need(family):
    source, dest = ("198.18.1.2", "198.18.1.1") if family == "ipv4" else \
        ("2001:db8:1::2", "2001:db8:1::1")
    good = knock()
    icmp_kinds = (8, 0) if family == "ipv4" else (128, 129)
    frames = {
        "udp": ip_frame(17, udp(good), source, dest),
        "tcp": ip_frame(6, tcp(good), source, dest),
        "tcp with options": ip_frame(6, tcp(good, options=b"\x01" * 12), source, dest),
        "icmp": ip_frame(1, icmp(good, icmp_kinds[0]), source, dest),
        "icmp reply": ip_frame(1, icmp(good, icmp_kinds[1]), source, dest),
        "http": ip_frame(6, tcp(get(good), 80, flags=0x18), source, dest),
    }
    drops = [
        ip_frame(6, tcp(good, dport=PORT + 1), source, dest),          # another port
        ip_frame(6, tcp(get(good), 81), source, dest),                 # not the web port
        ip_frame(6, tcp(b"POST /" + good, 80), source, dest),          # not a GET
        ip_frame(6, tcp(b"GET A" + good, 80), source, dest),           # not "GET /"
        ip_frame(6, tcp(b"A" * 139), source, dest),                    # too short
        ip_frame(6, tcp(b"A" * 400), source, dest),                    # too long
        ip_frame(6, tcp(b""), source, dest),                           # a bare SYN
        ip_frame(6, tcp(b"GET /x HTTP/1.1\r\n\r\n", 80), source, dest),   # too short a path
        ip_frame(1, icmp(good, 3 if family == "ipv4" else 1), source, dest),  # unreachable
        ip_frame(1, icmp(b"A" * 139), source, dest),
    ]
    for enabled in (("tcp",), ("icmp",), ("http",), ("udp", "tcp"), ("udp", "icmp", "http"),
                    ("udp", "tcp", "icmp", "http")):
        prog = spa.bpf_filter(PORT, enabled, 80)
        for name, frame in frames.items():
            expected = 0xFFFF if name.split()[0] in enabled else 0
            assert run_bpf(prog, frame) == expected, (enabled, name)
            assert run_bpf(prog, frame, pkttype=4) == 0            # outgoing
        for frame in drops:
            assert run_bpf(prog, frame) == 0, (enabled, frame[:60])
        if family == "ipv4":
            fragment = ip_frame(6, tcp(good), source, dest, frag=0x2000)
            assert run_bpf(prog, fragment) == 0
            with_options = ip_frame(6, tcp(good), source, dest, ihl=6)
            assert run_bpf(prog, with_options) == (0xFFFF if "tcp" in enabled else 0)


def test_the_kernel_takes_every_program():
    """Each transport set's program attaches (the kernel checks it) and locks."""
    need(os.geteuid() == 0, "AF_PACKET needs root")
    for enabled in (("udp",), ("tcp",), ("icmp",), ("http",), ("udp", "tcp", "icmp", "http")):
        with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0) as sock:
            spa.attach_filter(sock, spa.bpf_filter(PORT, enabled, 8080))


# ---------------------------------------------------------------------------
# 2. The frame parser
# ---------------------------------------------------------------------------

def test_parse_frame_over_each_transport():
    good = knock()
    http = spa.HttpKnocks(80)
    for source, dest in (("198.18.1.2", "198.18.1.1"), ("2001:db8:1::2", "2001:db8:1::1")):
        for frame in (ip_frame(17, udp(good), source, dest),
                      ip_frame(6, tcp(good, options=b"\x01" * 12), source, dest),
                      ip_frame(1, icmp(good), source, dest),
                      ip_frame(6, tcp(get(good), 80), source, dest)):
            assert spa.parse_any_frame(frame + b"\0" * 6, http) == (source, good)  # link padding
            assert spa.frame_destination(frame) == dest
    # Without http, a GET is a TCP knock like any other (the filter passed it to `port`).
    frame = ip_frame(6, tcp(get(good), 80))
    assert spa.parse_any_frame(frame) == ("198.18.1.2", get(good))
    # A GET whose path does not end within a knock's length (the web site's own requests:
    # not even logged), or that is not a GET.
    assert spa.parse_any_frame(ip_frame(6, tcp(b"GET /" + b"A" * 500, 80)), http) == (None, b"")
    for path in (b"index.html", b"A" * 139):
        assert spa.parse_any_frame(ip_frame(6, tcp(get(path) + b"X" * 200, 80)),
                                   http) == (None, b"")
    assert spa.parse_any_frame(ip_frame(6, tcp(get(b"A" * 140), 80)), http)[1] == b"A" * 140
    assert spa.parse_any_frame(ip_frame(6, tcp(b"HEAD /" + good + b" HTTP/1.1", 80)),
                           http) == (None, b"")
    assert spa.parse_any_frame(ip_frame(6, b"\0" * 10), http) == (None, b"")   # truncated TCP
    assert spa.parse_any_frame(b"") == spa.parse_any_frame(b"\x45" * 27) == (None, b"")


def test_the_reader_parses_udp_alone_with_the_shortest_parser(tmp_path):
    """udp alone: parse_frame, as before there were transports (the flood path costs no
    more); with others, parse_any_frame, with the http port and proxies of the config."""
    log = spa.Log("stderr")
    reader = spa.Reader(server_config(tmp_path), None, log)
    assert reader.parse_frame is spa.parse_frame
    reader = spa.Reader(server_config(tmp_path, transports="udp, http", http_port="8080",
                                      http_proxies="198.18.2.2"), None, log)
    good = knock()
    xff = get(good, b"X-Forwarded-For: 198.18.1.2\r\n")
    assert reader.parse_frame(ip_frame(6, tcp(xff, 8080), "198.18.2.2")) == ("198.18.1.2", good)
    assert reader.parse_frame(ip_frame(17, udp(good))) == ("198.18.1.2", good)


def test_x_forwarded_for_only_from_the_proxies_configured():
    good = knock()
    import ipaddress
    proxies = [ipaddress.ip_network("198.18.2.2/32"), ipaddress.ip_network("2001:db8:2::/64")]
    http = spa.HttpKnocks(80, proxies)
    xff = b"X-Forwarded-For: 203.0.113.9, 198.18.1.2\r\n"
    from_proxy = ip_frame(6, tcp(get(good, xff), 80), "198.18.2.2")
    assert spa.parse_any_frame(from_proxy, http) == ("198.18.1.2", good)     # the last entry
    # Entries that are trusted proxies themselves are skipped (a chain of ours).
    chain = b"x-forwarded-for: 198.18.1.2\r\nX-Forwarded-For: 2001:db8:2::7\r\n"
    assert spa.parse_any_frame(ip_frame(6, tcp(get(good, chain), 80), "198.18.2.2"),
                           http) == ("198.18.1.2", good)
    # From anywhere else the header changes nothing: the packet's source is the source.
    elsewhere = ip_frame(6, tcp(get(good, xff), 80), "198.18.3.2")
    assert spa.parse_any_frame(elsewhere, http) == ("198.18.3.2", good)
    assert spa.parse_any_frame(from_proxy, spa.HttpKnocks(80)) == ("198.18.2.2", good)
    # A trusted proxy without the header: its own address; with a bad one: dropped.
    assert spa.parse_any_frame(ip_frame(6, tcp(get(good), 80), "198.18.2.2"),
                           http) == ("198.18.2.2", good)
    for bad in (b"X-Forwarded-For: unknown\r\n", b"X-Forwarded-For: 198.18.2.2\r\n"):
        assert spa.parse_any_frame(ip_frame(6, tcp(get(good, bad), 80), "198.18.2.2"),
                               http)[0] is None
    # Headers that do not end in this segment: X-Forwarded-For may be in the next one.
    cut = get(good, xff)[:-2]
    assert spa.parse_any_frame(ip_frame(6, tcp(cut, 80), "198.18.2.2"), http)[0] is None
    assert spa.parse_any_frame(ip_frame(6, tcp(cut, 80), "198.18.3.2"), http)[0] == "198.18.3.2"
    # A header after the request's end is the body's, not a header.
    body = get(good) + b"X-Forwarded-For: 203.0.113.9\r\n"
    assert spa.parse_any_frame(ip_frame(6, tcp(body, 80), "198.18.2.2"), http)[0] == "198.18.2.2"


# ---------------------------------------------------------------------------
# 3. Config and client
# ---------------------------------------------------------------------------

def test_transports_options(tmp_path):
    config = server_config(tmp_path)
    assert (config.transports, config.http_port, config.http_proxies) == (("udp",), 80, [])
    config = server_config(tmp_path, transports="HTTP,icmp , udp, tcp", http_port="8080",
                           http_proxies="198.18.2.2, 2001:db8:2::/64")
    assert config.transports == ("udp", "tcp", "icmp", "http") and config.http_port == 8080
    assert [str(n) for n in config.http_proxies] == ["198.18.2.2/32", "2001:db8:2::/64"]
    for server, message in (({"transports": "udp, tcpraw"}, "transports = tcpraw: expected"),
                            ({"transports": ""}, "transports = (nothing)"),
                            ({"transports": "tcp, http", "http_port": "62201"},
                             "http_port = 62201 is the knock port"),
                            ({"http_port": "0"}, "http_port"),
                            ({"http_proxies": "any"}, "http_proxies: ")):
        with pytest.raises(spa.SpaError) as e:
            server_config(tmp_path, **server)
        assert message in str(e.value)


def fwknop_http_request(tmp_path, *extra):
    """The request `fwknop -P http --test -v` prints (it sends nothing in test mode)."""
    need(subprocess.call(["which", "fwknop"], stdout=subprocess.DEVNULL) == 0,
         "fwknop is not installed")
    argv = netns_lab.fwknop_client_argv("198.18.1.1", "tcp/22", KEY, HMAC_KEY, "-P", "http",
                                        "--test", "-v", *extra)
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=30,
                          env=dict(os.environ, HOME=str(tmp_path)))
    start = done.stdout.index("GET /")
    return done.stdout[start:done.stdout.index("\n\n", start)]


def test_client_http_request_is_fwknops(tmp_path):
    """The GET line and headers in fwknop's order; '+' and '/' as '-' and '_'."""
    theirs = fwknop_http_request(tmp_path)
    wire = b"ab+cd/" + b"A" * 150
    ours = spa.http_request(wire, "198.18.1.1", "Fwknop/2.6.10").decode()
    assert ours.startswith("GET /ab-cd_" + "A" * 150 + " HTTP/1.1\r\n")
    norm = lambda text: [line.split(":")[0] for line in text.replace("\r", "").split("\n")[1:]
                         if line]
    assert norm(ours) == norm(theirs) == ["User-Agent", "Accept", "Host", "Connection"]
    assert "User-Agent: Fwknop/2.6.10\r\n" in ours and "Host: 198.18.1.1\r\n" in ours
    assert spa.http_request(b"x", "h").decode().split("\r\n")[1].startswith("User-Agent: Fwknop/")
    assert "\r\nHost: [2001:db8:1::1]\r\n" in spa.http_request(b"x", "2001:db8:1::1").decode()


def test_client_refuses_what_it_does_not_send():
    done = subprocess.run([sys.executable, SPA, "client", "-D", "198.18.1.1", "-A", "tcp/22",
                           "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY, "-P", "udpraw"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=30)
    assert done.returncode == 1 and "udpraw: expected udp, tcpraw, icmp, http" in done.stderr
    assert KEY not in done.stderr and len(done.stderr.splitlines()) == 1


def test_raw_modes_need_root_and_say_so(tmp_path):
    """As nobody, -P tcpraw and -P icmp fail with one line saying why."""
    need(os.geteuid() == 0, "needs root to become nobody")
    for proto in ("tcpraw", "icmp"):
        done = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
             SPA, "client", "-D", "127.0.0.1", "-A", "tcp/22", "--key-base64", KEY,
             "--hmac-key-base64", HMAC_KEY, "-P", proto, "--no-rc-file"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=30,
            cwd="/")
        assert done.returncode == 1, done.stderr
        assert "-P %s sends a raw packet: run the client as root" % proto in done.stderr


# ---------------------------------------------------------------------------
# 4. In network namespaces
# ---------------------------------------------------------------------------

def start_spa(lab, tmp_path, **server):
    """spa.py's server in srv, protecting the lab's service port, with these [server] options."""
    conf = lab_server_config(tmp_path, **server)
    proc = lab.spawn("srv", [sys.executable, SPA, "server", "-c", conf, "-v"])
    wait_for_line(proc, r"listening on", 15)
    return proc


def web_server(lab, root, port=WEB):
    """python's http.server in srv on `port` (IPv4 and IPv6), as a real web site would be,
    serving the empty directory `root`."""
    os.makedirs(str(root), exist_ok=True)
    proc = lab.spawn("srv", [sys.executable, "-m", "http.server", "--bind", "::",
                             "--directory", str(root), str(port)])
    deadline = time.monotonic() + 10
    while not tcp_connect_ok(lab.name("cli1"), Lab.srv4(1), port, 0.2):
        assert time.monotonic() < deadline, "http.server did not start"
        time.sleep(0.05)
    return proc


def spa_client(lab, dest, proto, *extra, check=True):
    argv = [sys.executable, SPA, "client", "-D", dest, "-A", "tcp/%d" % SERVICE_PORT,
            "--key-base64", KEY, "--hmac-key-base64", HMAC_KEY, "-U", "alice", "--no-rc-file",
            "-P", proto, "-v"] + list(extra)
    return lab.run("cli1", argv, check=check)


def fwknop_client(lab, proto, *extra):
    argv = netns_lab.fwknop_client_argv(Lab.srv4(1), "tcp/%d" % SERVICE_PORT, KEY, HMAC_KEY,
                                        "-P", proto, *extra)
    return lab.run("cli1", argv, env=dict(os.environ, HOME="/nonexistent"))


def opens(lab, dest, seconds=2.0):
    return wait_tcp_open(lab.name("cli1"), dest, SERVICE_PORT, seconds) is not None


def closed(lab, dest):
    return not tcp_connect_ok(lab.name("cli1"), dest, SERVICE_PORT, timeout=0.3)


@pytest.mark.parametrize("proto", ["tcpraw", "icmp", "http"])
def test_real_fwknop_client_knocks_on_spa_py(tmp_path, proto):
    """`fwknop --server-proto tcpraw|icmp|http` (IPv4: fwknop's raw modes have no IPv6)."""
    need_lab("nft", "fwknop")
    with Lab(clients=1, prefix="tp") as lab:
        lab.tcp_service("srv", "::", SERVICE_PORT)
        if proto == "http":
            web_server(lab, tmp_path / "www")
        transport = {"tcpraw": "tcp"}.get(proto, proto)
        server = start_spa(lab, tmp_path, transports=transport, http_port=WEB)
        assert closed(lab, Lab.srv4(1))
        fwknop_client(lab, proto, *(["-p", str(WEB)] if proto == "http" else []))
        assert opens(lab, Lab.srv4(1)), server.log.text()
        wait_for_line(server, r"accepted packet from 198\.18\.1\.2", 2)


@pytest.mark.parametrize("proto", ["tcpraw", "icmp", "http"])
def test_spa_py_client_knocks_on_spa_py_over_ipv4_and_ipv6(tmp_path, proto):
    """Each transport alone enabled: spa.py's own knock opens, IPv4 and IPv6; a UDP knock
    (udp not enabled) is never even seen."""
    need_lab("nft")
    with Lab(clients=1, prefix="tp") as lab:
        lab.tcp_service("srv", "::", SERVICE_PORT)
        if proto == "http":
            web_server(lab, tmp_path / "www")
        transport = {"tcpraw": "tcp"}.get(proto, proto)
        server = start_spa(lab, tmp_path, transports=transport, http_port=WEB)
        port = ["-p", str(WEB)] if proto == "http" else []
        mark = server.log.mark()
        spa_client(lab, Lab.srv4(1), "udp")
        time.sleep(0.3)
        assert closed(lab, Lab.srv4(1)) and "packet from" not in server.log.text()[mark:]
        for dest in (Lab.srv4(1), Lab.srv6(1)):
            done = spa_client(lab, dest, proto, *port)
            assert "sent " in done.stderr and " %s/" % proto in done.stderr
            assert opens(lab, dest), server.log.text()
            wait_for_line(server, r"accepted packet from %s" % (
                Lab.cli4(1) if "." in dest else Lab.cli6(1)).replace(".", r"\."), 2)


def test_spa_py_client_knocks_on_fwknopd_over_each_transport(tmp_path):
    """fwknopd captures tcp and icmp with its PCAP_FILTER, and HTTP with ENABLE_SPA_OVER_HTTP
    (its filter must include the web server's port, as its fwknopd.conf says)."""
    need_lab("fwknopd", "iptables")
    with Lab(clients=1, prefix="tp") as lab:
        lab.tcp_service("srv", "::", SERVICE_PORT)
        web_server(lab, tmp_path / "www")
        lab.run("srv", ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(SERVICE_PORT),
                        "-m", "conntrack", "!", "--ctstate", "ESTABLISHED,RELATED",
                        "-j", "REJECT", "--reject-with", "tcp-reset"])
        fwknopd = netns_lab.FwknopdServer(
            lab, "srv", lab.srv_if[1],
            {"SOURCE": "ANY", "KEY_BASE64": KEY, "HMAC_KEY_BASE64": HMAC_KEY,
             "HMAC_DIGEST_TYPE": "sha256", "FW_ACCESS_TIMEOUT": 2}, tmp_path,
            conf={"PCAP_FILTER": "udp port %d or tcp port %d or icmp or tcp port %d"
                                 % (PORT, PORT, WEB), "ENABLE_SPA_OVER_HTTP": "Y"})
        with fwknopd:
            # Debian 13's fwknopd is built without libpcap: "forcing UDP server mode", where
            # only a UDP knock reaches it (the other transports are tested against spa.py).
            udp_server = "forcing UDP server mode" in fwknopd.log.text()
            for proto in ("udp",) if udp_server else ("udp", "tcpraw", "icmp", "http"):
                assert closed(lab, Lab.srv4(1)), proto
                mark = fwknopd.log.mark()
                spa_client(lab, Lab.srv4(1), proto, *(["-p", str(WEB)] if proto == "http" else []))
                assert opens(lab, Lab.srv4(1), 3.0), (proto, fwknopd.log.text()[mark:])
                fwknopd.log.wait(fwknopd.RULE_ADDED, 2, since=mark)
                deadline = time.monotonic() + 6          # its rule expires (2 s, checked each 1 s)
                while not closed(lab, Lab.srv4(1)) and time.monotonic() < deadline:
                    time.sleep(0.2)


def raw_get(lab, wire, port=WEB, src_ns="cli1"):
    """One TCP segment (PSH|ACK, no handshake) carrying an HTTP GET of `wire`, as a capture
    sees a request; sent by a raw socket so that nothing on the server need answer."""
    dest, source = Lab.srv4(1), Lab.cli4(1)
    payload = spa.http_request(wire, dest)
    segment = struct.pack("!HHIIBBHHH", 40123, port, 1000, 1, 5 << 4, 0x18, 64240, 0, 0) + payload
    pseudo = socket.inet_aton(source) + socket.inet_aton(dest) + struct.pack("!BBH", 0, 6,
                                                                               len(segment))
    segment = segment[:16] + struct.pack("!H", spa.inet_checksum(pseudo + segment)) + segment[18:]
    with netns_lab.ns_socket(lab.name(src_ns), socket.AF_INET, socket.SOCK_RAW,
                             socket.IPPROTO_TCP) as s:
        s.sendto(segment, (dest, 0))


def test_http_knock_with_and_without_a_web_server(tmp_path):
    """With a web server, the knock is one of its requests: it opens, and the web server
    answers it as it answers any (404), spa.py adds nothing.  Without one, the connection is
    refused as it would be without spa.py (the client says so); a GET in a segment that
    reaches the host all the same is still captured."""
    need_lab("nft")
    with Lab(clients=1, prefix="tp") as lab:
        lab.tcp_service("srv", "::", SERVICE_PORT)
        server = start_spa(lab, tmp_path, transports="http", http_port=WEB,
                           stanzas={"alice": {"fw_access_timeout": "1"}})
        done = spa_client(lab, Lab.srv4(1), "http", "-p", str(WEB), check=False)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1] == "spa.py client: error: cannot send to " \
            "198.18.1.1 port %d (-P http): Connection refused" % WEB
        assert closed(lab, Lab.srv4(1))
        raw_get(lab, knock([("tcp", SERVICE_PORT)]))
        assert opens(lab, Lab.srv4(1)), server.log.text()
        deadline = time.monotonic() + 4
        while not closed(lab, Lab.srv4(1)) and time.monotonic() < deadline:
            time.sleep(0.2)
        web = web_server(lab, tmp_path / "www")
        mark = web.log.mark()
        spa_client(lab, Lab.srv4(1), "http", "-p", str(WEB))
        assert opens(lab, Lab.srv4(1)), server.log.text()
        wait_for_line(web, r'"GET /\S+ HTTP/1.1" 404', 3, since=mark)


def test_x_forwarded_for_end_to_end(tmp_path):
    """cli2 is a trusted proxy: its request carrying X-Forwarded-For: cli1 opens for cli1.
    cli1 itself sending X-Forwarded-For: cli2 opens for cli1 (not trusted), not for cli2."""
    need_lab("nft")
    with Lab(clients=2, prefix="tp") as lab:
        lab.tcp_service("srv", "::", SERVICE_PORT)
        web_server(lab, tmp_path / "www")
        server = start_spa(lab, tmp_path, transports="udp, http", http_port=WEB,
                           http_proxies=Lab.cli4(2))

        def request(ns, forwarded_for):
            wire = knock([("tcp", SERVICE_PORT)])
            text = spa.http_request(wire, Lab.srv4(1)).replace(
                b"Connection:", b"X-Forwarded-For: %s\r\nConnection:" % forwarded_for.encode())
            with netns_lab.ns_socket(lab.name(ns)) as s:
                s.settimeout(5)
                s.connect((Lab.srv4(1), WEB))
                s.sendall(text)
                assert s.recv(100).startswith(b"HTTP/1.0 404")

        request("cli2", Lab.cli4(1))
        assert opens(lab, Lab.srv4(1)), server.log.text()
        wait_for_line(server, r"accepted packet from 198\.18\.1\.2", 2)
        assert not tcp_connect_ok(lab.name("cli2"), Lab.srv4(2), SERVICE_PORT, 0.3)
        mark = server.log.mark()
        request("cli1", Lab.cli4(2))
        wait_for_line(server, r"accepted packet from 198\.18\.1\.2", 2, since=mark)
        assert not tcp_connect_ok(lab.name("cli2"), Lab.srv4(2), SERVICE_PORT, 0.3)


# --- What a scanner sees: the same host, with every transport enabled or no spa.py ---------

P, R, UNUSED = SERVICE_PORT, 8023, 8081
TCP_PORTS = (P, R, PORT, WEB, UNUSED)
UDP_PORTS = (PORT, 62202)
SPA_SHAPED = "8" + "A" * 203         # captured over every transport, refused by its HMAC

DEFAULT_DROP = """table inet host {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop
        iif lo accept
        icmp type { echo-request, destination-unreachable, time-exceeded } accept
        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, echo-request,
                      destination-unreachable, packet-too-big, time-exceeded } accept
        tcp dport { %d, %d } accept
    }
}
""" % (WEB, UNUSED)


def scan(lab):
    """nmap's SYN and UDP scans, plain and with SPA-shaped data in every probe (TCP, UDP,
    ICMP echo), its ping with SPA-shaped data, and an HTTP GET whose path is SPA-shaped,
    IPv4 and IPv6: {(family, what, proto, port): what was seen}."""
    import test_attack
    result = {}
    for family, target in (("ipv4", Lab.srv4(1)), ("ipv6", Lab.srv6(1))):
        six = ["-6"] if family == "ipv6" else []
        ports = ["-p", "T:%s,U:%s" % (",".join(map(str, TCP_PORTS)), ",".join(map(str, UDP_PORTS)))]
        for what, data in (("plain", []), ("spa-shaped", ["--data-string", SPA_SHAPED])):
            argv = test_attack.NMAP + six + ["-sS", "-sU"] + data + ports + ["-oX", "-", target]
            found = test_attack.parse_nmap(lab.run("cli1", argv, timeout=60).stdout)
            for (proto, port), state in found.items():
                result[(family, what, proto, port)] = state
            argv = [w for w in test_attack.NMAP if w != "-Pn"] + six + \
                ["-sn", "-PE", "--disable-arp-ping"] + data + ["-oX", "-", target]
            status = ET.fromstring(lab.run("cli1", argv, timeout=60).stdout).find("host/status")
            result[(family, what, "ping", 0)] = (status.get("state"), status.get("reason"))
        with netns_lab.ns_socket(lab.name("cli1"), socket.AF_INET6 if six else socket.AF_INET) as s:
            s.settimeout(5)
            s.connect((target, WEB))
            s.sendall(spa.http_request(SPA_SHAPED.encode(), target))
            answer = b""
            while True:            # Connection: close
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        result[(family, "http", "tcp", WEB)] = (lines[0], sorted(
            line.split(b":")[0] for line in lines[1:]), body)
    return result


@pytest.mark.parametrize("policy", ["no host firewall", "default-drop host"])
def test_nmap_sees_the_same_host_with_every_transport_enabled(tmp_path, policy):
    """Scan 1: no service behind P, no spa.py.  Scan 2: the service, spa.py with
    transports = udp, tcp, icmp, http and a web server on http_port: identical, and the
    server did capture the SPA-shaped probes over each transport (and said nothing)."""
    need_lab("nft", "nmap")
    with Lab(clients=1, prefix="tp") as lab:
        srv = lab.name("srv")
        netns_lab.ns_sysctl(srv, "net.ipv4.icmp_ratelimit", 0)
        netns_lab.ns_sysctl(srv, "net.ipv6.icmp.ratelimit", 0)
        web_server(lab, tmp_path / "www")
        if policy != "no host firewall":
            lab.run("srv", ["nft", "-f", "-"], input=DEFAULT_DROP)
        before = scan(lab)
        lab.tcp_service("srv", "::", P)
        server = start_spa(lab, tmp_path, transports=ALL, http_port=WEB,
                           protect_action="reject" if policy == "no host firewall" else "drop")
        mark = server.log.mark()
        during = scan(lab)
        lab.stop_process(server)
        text = server.log.text()
    assert "listening on any udp/%d, tcp/%d, icmp, http/%d;" % (PORT, PORT, WEB) in text
    text = text[mark:]
    assert {k: (v, during.get(k)) for k, v in before.items() if during.get(k) != v} == {}
    assert set(before) == set(during)
    assert before[("ipv4", "http", "tcp", WEB)][:2] == (b"HTTP/1.0 404 File not found", [
        b"Connection", b"Content-Length", b"Content-Type", b"Date", b"Server"])
    assert before[("ipv4", "plain", "ping", 0)] == ("up", "echo-reply")
    # The probes reached the reader over each transport: TCP to the knock port, UDP, ICMP
    # echo (nmap's SYN probes carry the data; so do its echo requests), the GET.
    for source in (Lab.cli4(1), Lab.cli6(1)):
        assert "rejected packet from %s: HMAC does not match" % source in text, text
    assert "accepted packet" not in text
    # One SPA-shaped probe a family over each of the four (more where the host's silence
    # makes nmap try again): only udp would be 2 at most.
    received = int(re.search(r"stats: received (\d+)", text).group(1))
    assert received == 8 if policy == "no host firewall" else received >= 8


def test_sighup_changes_the_transports(tmp_path):
    """A reload that adds icmp (and drops udp) captures anew with the new program: an ICMP
    knock ignored before opens after; a UDP knock, seen before, is not seen after."""
    need_lab("nft")
    with Lab(clients=1, prefix="tp") as lab:
        lab.tcp_service("srv", "::", SERVICE_PORT)
        server = start_spa(lab, tmp_path, stanzas={"alice": {"fw_access_timeout": "1"}})
        mark = server.log.mark()
        spa_client(lab, Lab.srv4(1), "icmp")
        time.sleep(0.3)
        assert closed(lab, Lab.srv4(1)) and "packet from" not in "".join(server.log.lines[mark:])
        lab_server_config(tmp_path, stanzas={"alice": {"fw_access_timeout": "1"}},
                          transports="icmp")          # the server's config, rewritten
        mark = server.log.mark()
        os.kill(server.pid, 1)
        wait_for_line(server, r"reloaded ", 3, since=mark)
        assert "restarts" not in "\n".join(server.log.lines[mark:])
        spa_client(lab, Lab.srv6(1), "icmp")
        assert opens(lab, Lab.srv6(1)), server.log.text()
        mark = server.log.mark()
        spa_client(lab, Lab.srv4(1), "udp")
        time.sleep(0.3)
        assert "packet from" not in "".join(server.log.lines[mark:]) and closed(lab, Lab.srv4(1))


def test_fwknoprc_spa_server_proto_is_the_client_s_proto(tmp_path):
    """SPA_SERVER_PROTO in ~/.fwknoprc is -P: tcpraw, icmp and http are taken; tcp and udpraw
    stop the client with a line that names them."""
    sections = spa.read_fwknoprc("rc", "[web1]\nSPA_SERVER_PROTO icmp\n")
    assert sections["web1"].options["server_proto"] == "icmp" and not sections["web1"].problems
    for proto, ok in (("http", True), ("tcp", False), ("udpraw", False)):
        rc = write_private(tmp_path / "rc", "[web1]\nSPA_SERVER 198.18.1.1\nACCESS tcp/22\n"
                           "KEY_BASE64 %s\nHMAC_KEY_BASE64 %s\nSPA_SERVER_PROTO %s\n"
                           % (KEY, HMAC_KEY, proto))
        done = subprocess.run([sys.executable, SPA, "client", "-c", rc, "-n", "web1", "--test"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=30)
        assert (done.returncode == 0) == ok, done.stderr
        if not ok:
            assert "(SPA_SERVER_PROTO) %s: expected udp, tcpraw, icmp, http" % proto in done.stderr
