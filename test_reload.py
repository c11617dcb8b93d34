"""Fail closed in the firewall: through reloads of the host's firewall, at boot, while the
server is stopped; a reset like a closed port's; openings bound to an interface; clocks
that step; iptables that fails for a moment.

The integration tests build throwaway network namespaces (netns_lab; 198.18.0.0/15 and
2001:db8::/32 only).  In each, the host's own saved firewall accepts the protected port,
as a real host's would, and `spa.py firewall-config --write` puts spa.py's protection into
it.  A non-knocker then probes the port with fresh SYNs every 0.2 ms (netns_lab.SynProbe,
a raw socket, IPv4 and IPv6 at once) through 20 reloads of that saved firewall, after the
server stopped, and at "boot" (the saved files loaded with no server): not one SYN may be
answered with a SYN-ACK.
"""

import os
import re
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import netns_lab
import spa
from netns_lab import FakeCommands, Lab, SynProbe, need_lab, wait_for_line, wait_tcp_open
from test_spa import (HMAC_KEY, KEY, SERVICE_PORT as P, SPA, client_knock, closed, need_nft,
                      packet, spa_list, start_server, write_private)

FIREWALLS = ["nft", "iptables-nft", "iptables-legacy"]
RELOADS = 20

HOST_NFT = """#!/usr/sbin/nft -f
# the host's own rules: they accept the protected port
flush ruleset

table inet filter {
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\ttcp dport %d accept
\t}
}
""" % P
HOST_IPT = """# the host's own rules (iptables-save format): they accept the protected port
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport %d -j ACCEPT
COMMIT
""" % P


def need_firewall(kind):
    need_nft()
    if kind != "nft":
        need_lab(kind, kind + "-restore", kind.replace("ip", "ip6", 1) + "-restore")


def saved_paths(tmp_path, kind):
    """The host's saved firewall files for `kind`, written with the host's own rules."""
    if kind == "nft":
        paths = [tmp_path / "nftables.conf"]
        paths[0].write_text(HOST_NFT)
    else:
        paths = [tmp_path / "rules.v4", tmp_path / "rules.v6"]
        for path in paths:
            path.write_text(HOST_IPT)
    return [str(path) for path in paths]


def reload_saved(lab, kind, paths):
    """Load the host's saved firewall as its service does at a reload or a boot."""
    if kind == "nft":
        lab.run("srv", ["nft", "-f", paths[0]])
    else:
        for command, path in ((kind, paths[0]), (kind.replace("ip", "ip6", 1), paths[1])):
            lab.run("srv", [command + "-restore", path])


def clean_slate(lab):
    """No rules at all in the server's namespace, as at boot: nftables (iptables-nft's tables
    too) and legacy iptables."""
    lab.run("srv", ["nft", "flush", "ruleset"])
    for command in ("iptables-legacy", "ip6tables-legacy"):
        for table in ("filter", "nat"):
            for flag in ("-F", "-X"):
                lab.run("srv", [command, "-t", table, flag], check=False)


def probing(lab, ns="cli1"):
    """SYN probes of the protected port from `ns`, IPv4 and IPv6 at once (a context manager
    list: use with both)."""
    k = int(ns[3:])
    return [SynProbe(lab.name(ns), Lab.cli4(k), Lab.srv4(k), P),
            SynProbe(lab.name(ns), Lab.cli6(k), Lab.srv6(k), P)]


class Probes(object):
    """Both probes of `probing` in one `with`."""

    def __init__(self, lab, ns="cli1"):
        self.probes = probing(lab, ns)

    def __enter__(self):
        for probe in self.probes:
            probe.__enter__()
        return self

    def __exit__(self, *exc):
        for probe in self.probes:
            probe.__exit__(*exc)

    @property
    def connections(self):
        return sum(p.connections for p in self.probes)

    @property
    def sent(self):
        return sum(p.sent for p in self.probes)

    @property
    def resets(self):
        return sum(p.resets for p in self.probes)

    def __str__(self):
        return ", ".join("IPv%d: %d SYNs sent, %d answered with SYN-ACK (at %s s), %d reset"
                         % (6 if p.six else 4, p.sent, p.connections,
                            ", ".join("%.4f" % t for t in p.answered[:5]), p.resets)
                         for p in self.probes)


REPORT = []      # figures, printed at the end of the run (pytest -s)


def server_options(kind, paths, tmp_path):
    options = {"firewall": kind, "saved_firewall": ", ".join(paths)}
    if kind == "nft":
        options["nft_include"] = str(tmp_path / "spa.nft")
    return options


def run_spa_in(lab, *args, check=True):
    return lab.run("srv", [sys.executable, SPA] + list(args), check=check)


@pytest.mark.parametrize("kind", FIREWALLS)
def test_reloads_boot_and_a_stopped_server_never_open_the_port(tmp_path, kind):
    """The host's saved firewall accepts the protected port.  check-config says what is
    missing; firewall-config --write puts the protection in; then a non-knocker's SYNs,
    every 0.2 ms over IPv4 and IPv6, are never answered: at boot (the saved files loaded,
    no server), through 20 reloads with the server running, and after it stopped; while a
    knocker's opening comes back after each reload."""
    need_firewall(kind)
    paths = saved_paths(tmp_path, kind)
    with Lab(clients=2, prefix="rld") as lab:
        lab.tcp_service("srv", "::", P)
        reload_saved(lab, kind, paths)
        options = server_options(kind, paths, tmp_path)
        conf = start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "60"}}, **options)
        conf_path = conf.conf
        wait_for_line(conf, r"the host's saved firewall does not hold spa.py's protection", 2)
        lab.stop_process(conf)
        clean_slate(lab)
        reload_saved(lab, kind, paths)            # as the host was, without spa.py
        with Probes(lab) as before:
            time.sleep(0.1)
        assert before.connections > 0, "the host's own rules should accept the port"

        checked = run_spa_in(lab, "check-config", "-c", conf_path, check=False)
        assert checked.returncode == 1
        assert "FAIL  the host's saved firewall does not hold spa.py's protection" in checked.stdout
        assert "firewall-config -c %s --write" % conf_path in checked.stdout
        shown = run_spa_in(lab, "firewall-config", "-c", conf_path).stdout
        assert "--write" in shown and all(open(p).read() in (HOST_NFT, HOST_IPT) for p in paths)
        written = run_spa_in(lab, "firewall-config", "-c", conf_path, "--write").stdout
        assert "wrote" in written
        checked = run_spa_in(lab, "check-config", "-c", conf_path, check=False)
        assert "ok    the host's saved firewall holds spa.py's protection" in checked.stdout, \
            checked.stdout
        assert "the host's saved firewall holds spa.py's protection" in \
            run_spa_in(lab, "firewall-config", "-c", conf_path).stdout

        # Boot: the saved files loaded, no server.
        clean_slate(lab)
        reload_saved(lab, kind, paths)
        with Probes(lab) as boot:
            time.sleep(0.3)
        assert boot.connections == 0, str(boot)

        server = start_server(lab, tmp_path, {"alice": {"fw_access_timeout": "60"}}, **options)
        assert "saved firewall" not in server.log.text()
        client_knock(lab, "cli2", Lab.srv4(2))
        assert wait_tcp_open(lab.name("cli2"), Lab.srv4(2), P, 1.0) is not None
        with Probes(lab) as running:
            for _ in range(RELOADS):
                reload_saved(lab, kind, paths)
                time.sleep(0.05)
        assert running.connections == 0, str(running)
        assert running.resets > 0.9 * running.sent, str(running)    # closed, not silent
        # The knocker's opening came back (within 2 s: iptables-legacy is checked every 2 s).
        assert wait_tcp_open(lab.name("cli2"), Lab.srv4(2), P, 3.0) is not None
        wait_for_line(server, r"restored .*1 opening", 1)

        lab.stop_process(server)
        with Probes(lab) as stopped:
            reload_saved(lab, kind, paths)
            time.sleep(0.3)
        assert stopped.connections == 0, str(stopped)
        REPORT.append("%s: boot: %s | running, %d reloads: %s | stopped, reload: %s"
                      % (kind, boot, RELOADS, running, stopped))


def test_zz_report_reload_probes():
    """Print what the probes saw (with pytest -s)."""
    for line in REPORT:
        print(line)


# --- a refused connection's reset is the kernel's own, as a closed port's -----------------

CLOSED = 8023           # no service and not protected: what P must look like


def reset_fields(frame, syn_seq):
    """What an observer sees of a reset to one of SynProbe's SYNs: every field but the
    addresses, ports and checksums; the flow label only as set or not (it is random)."""
    first = struct.unpack("!I", frame[:4])[0]
    if first >> 28 == 6:
        ip = {"traffic class": (first >> 20) & 0xFF, "flow label set": first & 0xFFFFF != 0,
              "payload length": struct.unpack("!H", frame[4:6])[0], "next header": frame[6],
              "hop limit": frame[7]}
        tcp = frame[40:]
    else:
        ihl = (frame[0] & 15) * 4
        ip = {"header length": ihl, "tos": frame[1], "total length": frame[2:4],
              "id": frame[4:6], "flags and fragment": frame[6:8], "ttl": frame[8],
              "protocol": frame[9], "options": frame[20:ihl]}
        tcp = frame[ihl:]
    dport = struct.unpack("!H", tcp[2:4])[0]
    _, _, seq, ack, offset, flags, window, _, urgent = struct.unpack("!HHIIBBHHH", tcp[:20])
    size = (offset >> 4) * 4
    ip.update({"seq": seq, "ack - syn": (ack - syn_seq(dport)) & 0xFFFFFFFF,
               "data offset": offset, "flags": flags, "window": window, "urgent": urgent,
               "options": tcp[20:size], "payload": tcp[size:]})
    return ip


def flow_label(frame):
    return struct.unpack("!I", frame[:4])[0] & 0xFFFFF


def resets(lab, dst, src, port):
    """The answers to 20 fresh SYNs from cli1 to dst:port."""
    probe = SynProbe(lab.name("cli1"), src, dst, port, interval=0.005)
    with probe:
        time.sleep(0.1)
    assert probe.connections == 0 and probe.resets >= 10, (port, probe.sent, probe.resets)
    return [reset_fields(f, lambda sport: sport * 7919) for f in probe.frames], probe.frames


@pytest.mark.parametrize("kind", FIREWALLS)
def test_protected_port_resets_exactly_like_a_closed_port(tmp_path, kind):
    """protect_action = reject: the reset for the protected port (a service listens behind
    it) and for a port with no service and no spa.py are the same, field by field, over
    IPv4 and IPv6; over IPv6 both carry a random flow label (net.ipv6.auto_flowlabels = 1,
    the default), where a firewall's reject sends flow label 0."""
    need_firewall(kind)
    with Lab(clients=1, prefix="rst") as lab:
        lab.tcp_service("srv", "::", P)
        netns_lab.ns_sysctl(lab.name("srv"), "net.ipv6.auto_flowlabels", 1)
        start_server(lab, tmp_path, firewall=kind, saved_firewall="none")
        for dst, src in ((Lab.srv4(1), Lab.cli4(1)), (Lab.srv6(1), Lab.cli6(1))):
            protected, frames = resets(lab, dst, src, P)
            closed_port, closed_frames = resets(lab, dst, src, CLOSED)
            for field in protected[0]:
                assert {repr(r[field]) for r in protected} == \
                    {repr(r[field]) for r in closed_port}, (dst, field)
            if ":" in dst:
                labels = [flow_label(f) for f in frames]
                assert all(labels) and len(set(labels)) > len(labels) // 2, labels
                assert all(flow_label(f) for f in closed_frames)


# --- a clock stepped back never lengthens an opening -------------------------------------

HOUR = 3600


def stepped_back(monkeypatch, seconds=HOUR):
    """time.time() from now on `seconds` behind (a clock stepped back by NTP or by hand);
    the kernel's clocks and time.monotonic() go on as they were."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - seconds)


def test_nft_restore_after_a_clock_step_re_adds_no_more_than_was_left(tmp_path, monkeypatch):
    """An opening of 5 s; the clock steps back an hour; a reload removes our table; the
    restore puts the opening back with what was left of its 5 s, not with 1 h 5 s."""
    need_nft()
    with Lab(clients=1, prefix="clk") as lab:
        fw = netns_lab.InNetns(lab.name("srv"), spa.NftFirewall([("tcp", P)]))
        fw.setup()
        assert fw.open(Lab.cli4(1), "tcp", P, 5)
        stepped_back(monkeypatch)
        lab.run("srv", ["nft", "delete", "table", "inet", "spa"])     # a reload
        assert fw.restore()
        (address, proto, port, left, _), = fw.list()
        assert (address, port) == (Lab.cli4(1), P) and left <= 5, left


@pytest.mark.parametrize("command", ["iptables-nft", "iptables-legacy"])
def test_iptables_openings_end_by_the_monotonic_clock(tmp_path, monkeypatch, command):
    """iptables: the clock steps back an hour while openings are in force.  expire() still
    removes a rule at its end (xt_time, which reads the wall clock, would match for an hour
    more); and after a reload the restore re-adds what was left of each, not an hour more."""
    need_firewall(command)
    with Lab(clients=1, prefix="clk") as lab:
        fw = netns_lab.InNetns(lab.name("srv"), spa.IptablesFirewall([("tcp", P)],
                                                                     command=command))
        fw.setup()
        assert fw.open(Lab.cli4(1), "tcp", P, 2)
        assert fw.open(Lab.cli6(1), "tcp", P, 30)
        stepped_back(monkeypatch)
        assert fw.expire() == 0
        time.sleep(3.05)                       # (an end is rounded up to a whole second)
        assert fw.expire() == 1                # by the monotonic clock
        assert [row[0] for row in fw.list()] == [Lab.cli6(1)]
        assert fw.open(Lab.cli4(1), "tcp", P, 30)
        for family_command in (command, command.replace("ip", "ip6", 1)):
            for table in ("filter", "nat"):    # a reload: our chains and rules are gone
                for flag in ("-F", "-X"):
                    lab.run("srv", [family_command, "-t", table, flag])
        assert fw.restore()
        ends = {row[0]: row[3] for row in fw.list()}
        # Each rule's end, read back by the stepped clock: what was left, not 1 h more.
        assert 26 <= ends[Lab.cli4(1)] <= 30 and 26 <= ends[Lab.cli6(1)] <= 30, ends
        steer = lab.run("srv", [command, "-w", "-t", "nat", "-S", "SPA_STEER"]).stdout
        assert Lab.cli4(1) in steer


# --- a transient iptables-restore failure does not stop the server -----------------------

WRAPPER = """#!/bin/sh
# iptables-restore that fails while %(flag)s exists (as it does when it cannot get the
# xtables lock), else the real one.
if [ -e %(flag)s ]; then
    echo "Another app is currently holding the xtables lock." >&2
    exit 4
fi
exec %(real)s "$@"
"""


def test_a_failing_iptables_restore_during_expiry_is_retried(tmp_path):
    need_firewall("iptables-legacy")
    import shutil
    flag = tmp_path / "fail"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("iptables-legacy-restore", "ip6tables-legacy-restore"):
        wrapper = bin_dir / name
        wrapper.write_text(WRAPPER % {"flag": flag, "real": shutil.which(name)})
        wrapper.chmod(0o755)
    conf = tmp_path / "spa.conf"
    write_private(conf, "[server]\ninterface = any\nprotect = tcp/%d\nfirewall = iptables-legacy\n"
                  "saved_firewall = none\nreplay_cache = %s\n[client alice]\nkey_base64 = %s\n"
                  "hmac_key_base64 = %s\nfw_access_timeout = 1\n"
                  % (P, tmp_path / "replay", KEY, HMAC_KEY))
    env = dict(os.environ, PATH="%s:%s" % (bin_dir, os.environ["PATH"]))
    with Lab(clients=1, prefix="ipx") as lab:
        lab.tcp_service("srv", "::", P)
        server = lab.spawn("srv", [sys.executable, SPA, "server", "-c", str(conf), "-v"], env=env)
        wait_for_line(server, r"listening on", 15)
        client_knock(lab, "cli1", Lab.srv4(1))
        assert wait_tcp_open(lab.name("cli1"), Lab.srv4(1), P, 1.0) is not None
        flag.write_text("")
        wait_for_line(server, r"could not remove expired openings \(.*xtables lock.*\): trying "
                      r"again every second", 4)
        time.sleep(1.5)
        assert server.poll() is None, server.log.text()
        assert server.log.text().count("could not remove expired openings") == 1
        assert closed(lab, "cli1", Lab.srv4(1))        # xt_time closed it in the kernel
        flag.unlink()
        wait_for_line(server, r"expired openings removed again, after \d+ failed attempt", 3)
        assert "spa expires" not in lab.run("srv", ["iptables-legacy", "-w", "-S", "SPA_INPUT"]).stdout
        client_knock(lab, "cli1", Lab.srv4(1))     # and it goes on serving
        assert wait_tcp_open(lab.name("cli1"), Lab.srv4(1), P, 1.0) is not None


# --- bind_interface: an opening holds on the knock's interface only ----------------------

UDP_SERVICE = 5353
HOST_DEFAULT_DROP = """table inet host {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
    }
}
"""


def knock_for(lab, ns, dest, access, *extra):
    lab.run(ns, [sys.executable, SPA, "client", "-D", dest, "-A", access, "--key-base64", KEY,
                 "--hmac-key-base64", HMAC_KEY] + list(extra))


def received(sock, seconds=0.3):
    """The payloads that reached a UDP socket within `seconds`."""
    got = []
    sock.settimeout(seconds)
    while True:
        try:
            got.append(sock.recv(256))
        except socket.timeout:
            return got


@pytest.mark.parametrize("kind", FIREWALLS)
def test_bind_interface_keeps_out_a_datagram_spoofed_from_another_interface(tmp_path, kind):
    """Loose reverse-path filtering (systemd's default): client 2 sends datagrams with client
    1's addresses to a UDP service client 1 opened.  They reach it, unless bind_interface =
    yes, which keys the opening on client 1's interface too; client 1's own still do.  (With
    nft the host drops what it does not allow: the openings get through its chain too.)"""
    need_firewall(kind)
    with Lab(clients=2, prefix="bnd") as lab:
        srv, cli2 = lab.name("srv"), lab.name("cli2")
        if kind == "nft":
            lab.run("srv", ["nft", "-f", "-"], input=HOST_DEFAULT_DROP)
        for key in ("all", "default", lab.srv_if[1], lab.srv_if[2]):
            netns_lab.ns_sysctl(srv, "net.ipv4.conf.%s.rp_filter" % key, 2)
        # Client 2 may send as client 1.
        lab.run("cli2", ["ip", "addr", "add", Lab.cli4(1) + "/32", "dev", lab.cli_if[2]])
        lab.run("cli2", ["ip", "addr", "add", Lab.cli6(1) + "/128", "dev", lab.cli_if[2], "nodad"])
        service = netns_lab.ns_socket(srv, socket.AF_INET6, socket.SOCK_DGRAM)
        service.bind(("::", UDP_SERVICE))
        lab.on_close(service.close)
        stanza = {"alice": {"open_ports": "udp/%d" % UDP_SERVICE, "fw_access_timeout": "30"}}

        def send_as_client1(ns, dest, text):
            with netns_lab.ns_socket(lab.name(ns), socket.AF_INET6 if ":" in dest
                                     else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((Lab.cli6(1) if ":" in dest else Lab.cli4(1), 0))
                s.sendto(text, (dest, UDP_SERVICE))

        for bind in ("no", "yes"):
            server = start_server(lab, tmp_path, stanza, protect="udp/%d" % UDP_SERVICE,
                                  interface="%s, %s" % (lab.srv_if[1], lab.srv_if[2]),
                                  bind_interface=bind, firewall=kind, saved_firewall="none")
            for dest in (Lab.srv4(1), Lab.srv6(1)):
                knock_for(lab, "cli1", dest, "udp/%d" % UDP_SERVICE)
            wait_for_line(server, r"opened udp/%d for 2001:db8:1::2 for 30 s%s" % (
                UDP_SERVICE, " on " + lab.srv_if[1] if bind == "yes" else "$"), 2)
            for (ns, dest, text) in (("cli1", Lab.srv4(1), b"genuine4"),
                                     ("cli1", Lab.srv6(1), b"genuine6"),
                                     ("cli2", Lab.srv4(2), b"spoofed4"),
                                     ("cli2", Lab.srv6(2), b"spoofed6")):
                send_as_client1(ns, dest, text)
            got = sorted(received(service))
            if bind == "no":       # the hole bind_interface closes
                assert got == [b"genuine4", b"genuine6", b"spoofed4", b"spoofed6"]
            else:
                assert got == [b"genuine4", b"genuine6"]
                assert re.search(r"%s\s+udp/%d\s+\d+ s left \(on %s\)" % (
                    re.escape(Lab.cli4(1)), UDP_SERVICE, lab.srv_if[1]),
                    spa_list(lab, server.conf))
            lab.stop_process(server)
            lab.run("srv", [sys.executable, SPA, "server", "-c", server.conf, "--flush"])


def test_bind_interface_needs_named_interfaces(tmp_path):
    conf = write_private(tmp_path / "spa.conf", "[server]\nprotect = tcp/22\nbind_interface = yes\n"
                         "[client a]\nkey_base64 = %s\nhmac_key_base64 = %s\n" % (KEY, HMAC_KEY))
    with pytest.raises(spa.SpaError, match="bind_interface = yes needs interface to name"):
        spa.ServerConfig(conf)


def test_gatekeeper_takes_only_a_named_interface_from_the_reader(tmp_path):
    """With bind_interface, the parent opens for the interface the reader names only if the
    config names it; without, it ignores what the reader says."""
    from test_spa import server_config, knock
    from test_ipt_nat import Log
    for bind, interface, opened in (("yes", "eth1", [("198.18.0.9", "tcp", 22, 30, "eth1")]),
                                    ("yes", "eth7", []), ("yes", None, []),
                                    ("no", "eth7", [("198.18.0.9", "tcp", 22, 30)])):
        config = server_config(tmp_path, interface="eth1, eth2", bind_interface=bind)
        firewall = spa.DryRunFirewall(config.protect)
        gate = spa.Gatekeeper(config, firewall, spa.ReplayCache(None, 120), Log(),
                              {"198.18.0.1"})
        gate.knock("198.18.0.9", "198.18.0.1", knock(), interface=interface)
        assert firewall.opened == opened, (bind, interface)


# --- SIGHUP applies the NAT switches, firewall included ----------------------------------

@pytest.mark.parametrize("kind", FIREWALLS)
def test_sighup_applies_the_nat_switches_to_the_firewall_too(tmp_path, kind):
    """enable_local_nat switched on by a reload: a local NAT knock works at once (the
    firewall's NAT chains are made); switched off again: refused, and they are gone."""
    need_firewall(kind)
    with Lab(clients=1, prefix="hup") as lab:
        lab.tcp_service("srv", Lab.srv4(1), P, banner=b"local\n")
        server = start_server(lab, tmp_path, {"alice": {
            "fw_access_timeout": "5", "enable_nat": "yes", "open_ports": "tcp/55000,tcp/%d" % P}},
            firewall=kind, saved_firewall="none")
        text = open(server.conf).read()

        def local_nat_knock():
            knock_for(lab, "cli1", Lab.srv4(1), "tcp/%d" % P, "--nat-local", "--nat-port", "55000")

        def reload(enable):
            with open(server.conf, "w") as f:
                f.write(text.replace("[server]", "[server]\nenable_local_nat = %s" % enable))
            mark = server.log.mark()
            os.kill(server.pid, 1)
            wait_for_line(server, r"reloaded ", 3, since=mark)
            assert "restarts" not in "\n".join(server.log.lines[mark:])
            return server.log.mark()

        def nat_chains():
            if kind == "nft":
                return "chain prerouting" in lab.run("srv", ["nft", "list", "table", "inet", "spa"]).stdout
            return "SPA_PREROUTING" in lab.run("srv", [kind + "-save", "-t", "nat"]).stdout

        assert not nat_chains()
        mark = reload("yes")
        assert nat_chains()
        local_nat_knock()
        wait_for_line(server, r"opened tcp/55000 forwarded to 198\.18\.1\.1:%d" % P, 2, since=mark)
        assert wait_tcp_open(lab.name("cli1"), Lab.srv4(1), 55000, 1.0) is not None
        assert "firewall change failed" not in server.log.text()
        mark = reload("no")
        assert not nat_chains()
        local_nat_knock()
        wait_for_line(server, r"refused: \[server\] enable_local_nat is off", 2, since=mark)


# --- the saved firewall's files, edited (no root) ---------------------------------------

DEBIAN_NFTABLES = """#!/usr/sbin/nft -f

flush ruleset

table inet filter {
\tchain input {
\t\ttype filter hook input priority filter;
\t}
}
"""
SAVED_BY_IPTABLES_SAVE = """# Generated by iptables-save v1.8.9
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.2
COMMIT
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:SPA_INPUT - [0:0]
-A INPUT -j SPA_INPUT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A SPA_INPUT -s 198.51.100.7/32 -p tcp -m tcp --dport 22 -m time --datestop 2026-11-28T10:00:29 -m comment --comment "spa expires 1795860030" -j ACCEPT
-A SPA_INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A SPA_INPUT -p tcp -m tcp --dport 0 -m conntrack --ctstate DNAT -j ACCEPT
-A SPA_INPUT -p tcp -m tcp --dport 22 -j REJECT --reject-with tcp-reset
COMMIT
"""


def test_nft_include_goes_after_flush_ruleset_at_the_top_level():
    text = spa.with_nft_include(DEBIAN_NFTABLES, "/etc/spa/spa.nft")
    assert text.splitlines()[2:4] == ["flush ruleset", 'include "/etc/spa/spa.nft"']
    assert spa.nft_includes("/etc/nftables.conf", text, "/etc/spa/spa.nft")
    assert not spa.nft_includes("/etc/nftables.conf", DEBIAN_NFTABLES, "/etc/spa/spa.nft")
    # By a glob, or a name relative to the file's directory: included too.
    glob = DEBIAN_NFTABLES + 'include "nftables.d/*.nft";  # local rules\n'
    assert spa.nft_includes("/etc/nftables.conf", glob, "/etc/nftables.d/spa.nft")
    # Inside a table block (fw4's /etc/nftables.d/ is one) it would be a table in a table.
    inside = "table inet fw4 {\n\tinclude \"/etc/nftables.d/*.nft\"\n}\n"
    assert not spa.nft_includes("/etc/nftables.conf", inside, "/etc/nftables.d/spa.nft")
    # No flush ruleset: at the start, after the first comment lines.
    assert spa.with_nft_include("# mine\ntable ip t {\n}", "/x.nft") == \
        '# mine\ninclude "/x.nft"\ntable ip t {\n}'


def test_iptables_rules_merge_into_the_filter_table_only():
    fw = spa.IptablesFirewall([("tcp", 22)])
    fw.steer = False
    ours = fw.saved_rules(4)
    assert ours == [":SPA_INPUT - [0:0]", "-A INPUT -j SPA_INPUT",
                    "-A SPA_INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
                    "-A SPA_INPUT -p tcp --dport 22 -j REJECT --reject-with tcp-reset"]
    # An empty (or missing) file: a filter table of ours alone.
    assert spa.with_iptables_rules("", ours) == "*filter\n" + "\n".join(ours) + "\nCOMMIT\n"
    host = SAVED_BY_IPTABLES_SAVE
    assert not spa.iptables_rules_hold(host.replace("-A INPUT -j SPA_INPUT\n", ""), ours)
    merged = spa.with_iptables_rules(host.replace("-A INPUT -j SPA_INPUT\n", ""), ours)
    assert spa.iptables_rules_hold(merged, ours)
    filter_part = merged.split("*filter\n")[1]
    rules = [line for line in filter_part.splitlines() if line.startswith("-A ")]
    assert rules[0] == "-A INPUT -j SPA_INPUT"           # first in INPUT
    assert "spa expires" not in merged                   # the opening a save caught is gone
    assert merged.startswith(host.split("*filter")[0])   # the nat table as it was
    assert "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT" in merged
    assert spa.with_iptables_rules(merged, ours) == merged     # once is enough
    # iptables-save's form of our rules (-m tcp, an opening among them) holds them too...
    steered = spa.IptablesFirewall([("tcp", 22)])
    assert steered.steer and spa.iptables_rules_hold(host, steered.saved_rules(4))
    # ...but not in another order (REJECT before the RETURN of established connections),
    # not another port, and not with the jump after the host's rules.
    ret = "-A SPA_INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n"
    reject = "-A SPA_INPUT -p tcp -m tcp --dport 22 -j REJECT --reject-with tcp-reset\n"
    jump, accept = "-A INPUT -j SPA_INPUT\n", "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n"
    for broken in (host.replace(ret, "").replace(reject, reject + ret),
                   host.replace(reject, reject.replace("22", "23")),
                   host.replace(jump, "").replace(accept, accept + jump)):
        assert not spa.iptables_rules_hold(broken, steered.saved_rules(4))


def test_the_include_file_loads_alone_and_again(tmp_path):
    """The file firewall-config writes is nft's own syntax, loads in a fresh namespace, and
    loading it again (fw4 runs its includes at every reload, without flushing our table)
    keeps the openings and does not double the rules."""
    need_nft()
    conf = write_private(tmp_path / "spa.conf", "[server]\nprotect = tcp/22, udp/53\n"
                         "nft_include = %s\nsaved_firewall = %s\n[client a]\nkey_base64 = %s\n"
                         "hmac_key_base64 = %s\n" % (tmp_path / "spa.nft", tmp_path / "nft.conf",
                                                     KEY, HMAC_KEY))
    config = spa.ServerConfig(conf)
    saved = spa.SavedFirewall(config, spa.make_firewall(config, False))
    (tmp_path / "spa.nft").write_text(saved.include_text())
    with Lab(clients=1, prefix="inc") as lab:
        lab.run("srv", ["nft", "-f", str(tmp_path / "spa.nft")])
        lab.run("srv", ["nft", "add", "element", "inet", "spa", "allow4",
                        "{ 198.18.1.2 . tcp . 22 timeout 60s }"])
        first = lab.run("srv", ["nft", "list", "table", "inet", "spa"]).stdout
        lab.run("srv", ["nft", "-f", str(tmp_path / "spa.nft")])
        again = lab.run("srv", ["nft", "list", "table", "inet", "spa"]).stdout
        strip = lambda text: re.sub(r"expires \S+", "", text)      # noqa: E731
        assert strip(first) == strip(again) and "198.18.1.2 . tcp . 22" in again
        assert "reject with tcp reset" in again and "redirect to :0" in again


def test_an_include_before_flush_ruleset_does_not_count():
    text = 'include "/etc/spa/spa.nft"\nflush ruleset\ntable inet filter {\n}\n'
    assert not spa.nft_includes("/etc/nftables.conf", text, "/etc/spa/spa.nft")
    assert spa.nft_includes("/etc/nftables.conf", spa.with_nft_include(text, "/etc/spa/spa.nft"),
                            "/etc/spa/spa.nft")
