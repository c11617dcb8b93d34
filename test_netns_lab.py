"""Self-check of netns_lab: the topology, in-namespace sockets, cleanup, real fwknop."""

import os
import socket
import subprocess
import time

import pytest

import netns_lab
from netns_lab import (Lab, need, need_lab, ns_socket, ping, tcp_connect_ok, udp_send,
                       wait_for_line, wait_tcp_open)

PREFIX = "labh"


@pytest.fixture
def lab():
    need_lab()
    netns_lab.sweep_stale(PREFIX)
    with Lab(clients=2, prefix=PREFIX) as lab:
        yield lab


def netns_list():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_need_skips_or_fails_on_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        need(False, "missing thing")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing thing"):
        need(False, "missing thing")
    need(True, "never shown")


def test_names_are_unique_and_short():
    a, b = Lab(clients=3, prefix=PREFIX), Lab(clients=3, prefix=PREFIX)
    assert set(a.ns.values()).isdisjoint(b.ns.values())
    assert a.srv_if[1] != b.srv_if[1]
    assert all(len(i) <= 15 for i in [*a.srv_if.values(), *a.cli_if.values()])
    assert (a.srv4(2), a.cli4(2), a.srv6(2), a.cli6(2)) == (
        "198.18.2.1", "198.18.2.2", "2001:db8:2::1", "2001:db8:2::2")


@pytest.mark.parametrize("v", [4, 6])
def test_topology_ping_and_tcp(lab, v):
    srv, cli = (lab.srv4, lab.cli4) if v == 4 else (lab.srv6, lab.cli6)
    cli1, cli2 = lab.ns["cli1"], lab.ns["cli2"]
    assert ping(cli1, srv(1))
    assert ping(cli1, srv(2)), "the default route lets cli1 reach the server's other addresses"
    assert ping(cli2, srv(2))
    assert not ping(cli1, cli(2), timeout=0.3), "the server does not forward between clients"

    svc = lab.tcp_service("srv", srv(1), 0, banner=b"hi\n")
    assert tcp_connect_ok(cli1, srv(1), svc.port)
    assert tcp_connect_ok(cli2, srv(1), svc.port)
    assert not tcp_connect_ok(cli1, srv(1), svc.port + 1), "nothing listens there: refused"
    with ns_socket(cli1, socket.AF_INET6 if v == 6 else socket.AF_INET) as s:
        s.settimeout(2)
        s.connect((srv(1), svc.port))
        assert s.recv(3) == b"hi\n"
        s.sendall(b"echo me")
        assert s.recv(100) == b"echo me"
    assert {p[0] for p in svc.peers} == {cli(1), cli(2)}


def test_ns_sysctl_changes_only_that_namespace(lab):
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        host_forwarding = f.read()
    netns_lab.ns_sysctl(lab.ns["srv"], "net.ipv4.ip_forward", 1)
    netns_lab.ns_sysctl(lab.ns["srv"], "net.ipv6.conf.all.forwarding", 1)
    assert ping(lab.ns["cli1"], lab.cli4(2)) and ping(lab.ns["cli1"], lab.cli6(2)), "srv now routes"
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read() == host_forwarding


def test_ns_socket_lives_in_the_namespace(lab):
    before = os.stat("/proc/self/ns/net").st_ino
    with ns_socket(lab.ns["srv"]) as s:
        s.bind((lab.srv4(1), 0))  # only the server namespace has this address
    with pytest.raises(OSError):
        with ns_socket(lab.ns["cli1"]) as s:
            s.bind((lab.srv4(1), 0))
    with pytest.raises(OSError):
        with socket.socket() as s:  # the host (this thread) has no 198.18.x address
            s.bind((lab.srv4(1), 0))
    with ns_socket(lab.ns["srv"], socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind((lab.srv6(2), 0))
    assert os.stat("/proc/self/ns/net").st_ino == before, "this thread must stay on the host"
    with pytest.raises(FileNotFoundError):
        ns_socket("labh-no-such-namespace")


@pytest.mark.parametrize("v", [4, 6])
def test_udp_send_with_source(lab, v):
    srv, cli = (lab.srv4, lab.cli4) if v == 4 else (lab.srv6, lab.cli6)
    with ns_socket(lab.ns["srv"], socket.AF_INET6 if v == 6 else socket.AF_INET,
                   socket.SOCK_DGRAM) as rx:
        rx.bind((srv(1), 0))
        rx.settimeout(2)
        port = rx.getsockname()[1]
        assert udp_send(lab.ns["cli1"], srv(1), port, b"x" * 150, src=cli(1)) == 150
        data, peer = rx.recvfrom(2000)
        assert (data, peer[0]) == (b"x" * 150, cli(1))
        udp_send(lab.ns["cli1"], srv(1), port, "text", src=(cli(1), 40000))
        assert rx.recvfrom(2000)[1][:2] == (cli(1), 40000)


def test_wait_tcp_open(lab):
    cli1 = lab.ns["cli1"]
    t = time.monotonic()
    assert wait_tcp_open(cli1, lab.srv4(1), 4444, 0.3) is None
    assert 0.29 <= time.monotonic() - t < 1.0
    lab.tcp_service("srv", lab.srv6(1), 4444)
    took = wait_tcp_open(cli1, lab.srv6(1), 4444, 2)
    assert took is not None and took < 0.5


def test_run_and_spawn_logs(lab, tmp_path):
    addrs = lab.run("srv", ["ip", "-o", "addr", "show", "dev", lab.srv_if[1]]).stdout
    assert addrs.count("inet") == 3 and "tentative" not in addrs, addrs  # v4, v6, link-local
    with pytest.raises(netns_lab.CommandFailed, match="No such file"):
        lab.run("srv", ["ls", "/nonexistent-labh"])
    assert lab.run("srv", ["false"], check=False).returncode == 1

    proc = lab.spawn("cli1", ["sh", "-c", "echo one; echo two >&2; sleep 0.2; echo three; exec sleep 60"])
    assert wait_for_line(proc, r"^thr(ee)$", 5).group(1) == "ee"
    assert proc.log.lines == ["one", "two", "three"] or sorted(proc.log.lines) == ["one", "three", "two"]
    with pytest.raises(TimeoutError, match="never"):
        wait_for_line(proc, "never", 0.1, since=proc.log.mark())

    quitter = lab.spawn("cli1", ["sh", "-c", "echo bye"])
    t = time.monotonic()
    with pytest.raises(TimeoutError, match="output ended"):
        wait_for_line(quitter, "never", 10)
    assert time.monotonic() - t < 5, "a dead process must not make us wait the whole timeout"

    log = tmp_path / "x.log"
    writer = lab.spawn("srv", ["sh", "-c", f"sleep 0.1; echo ready-77 >> {log}"], stdout=None, stderr=None)
    assert wait_for_line(str(log), r"ready-(\d+)", 5).group(1) == "77"
    writer.wait(5)


def test_cleanup_kills_processes_and_deletes_namespaces():
    need_lab()
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(clients=2, prefix=PREFIX) as lab:
            names = set(lab.ns.values())
            assert names <= netns_list()
            proc = lab.spawn("srv", ["sleep", "300"])
            lab.tcp_service("srv", lab.srv4(1), 0)
            raise RuntimeError("boom")
    assert proc.poll() is not None, "the process was killed"
    assert not names & netns_list(), "no namespace left behind"
    lab.close()  # idempotent


def test_fwknop_client_opens_port_through_fwknopd(lab, tmp_path):
    need_lab("fwknop", "fwknopd", "iptables")
    port = 2222
    key, hmac_key = netns_lab.fwknop_keygen()
    lab.tcp_service("srv", lab.srv4(1), port)
    lab.run("srv", ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"])
    fwknopd = netns_lab.FwknopdServer(
        lab, "srv", lab.srv_if[1],
        [{"SOURCE": "ANY", "KEY_BASE64": key, "HMAC_KEY_BASE64": hmac_key,
          "HMAC_DIGEST_TYPE": "sha256", "OPEN_PORTS": f"tcp/{port}", "FW_ACCESS_TIMEOUT": 30}],
        tmp_path)
    with fwknopd:
        assert fwknopd.rules() == []
        assert not tcp_connect_ok(lab.ns["cli1"], lab.srv4(1), port)

        mark = fwknopd.log.mark()
        t0 = time.monotonic()
        lab.run("cli1", netns_lab.fwknop_client_argv(lab.srv4(1), f"tcp/{port}", key, hmac_key))
        took = wait_tcp_open(lab.ns["cli1"], lab.srv4(1), port, 2.0)
        assert took is not None, "port did not open; fwknopd log:\n" + fwknopd.log.text()
        print(f"fwknopd knock-to-open: {(time.monotonic() - t0) * 1000:.0f} ms")

        m = wait_for_line(fwknopd.log, fwknopd.RULE_ADDED, 2, since=mark)
        assert m.group(2, 3, 4) == (lab.cli4(1), "tcp", str(port))
        (rule,) = fwknopd.rules()
        assert f"-s {lab.cli4(1)}/32" in rule and f"--dport {port}" in rule and "_exp_" in rule
        assert not tcp_connect_ok(lab.ns["cli2"], lab.srv4(1), port), "only the knocker is let in"
    assert fwknopd.proc.returncode == 0
    assert lab.run("srv", ["iptables", "-S", "FWKNOP_INPUT"], check=False).returncode != 0, \
        "fwknopd removes its chain when it exits"
