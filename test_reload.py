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
