"""single_use on a system too old for it (issue 15: the oldest versions spa.py supports).

A kernel before Linux 5.4 or an nft before nftables 0.9.3 refuses the rule that deletes a
set element from the packet path.  This machine has newer ones, so the tests put a fake
`nft` first in PATH that refuses exactly that (as nft 0.9.2's parser or a 5.3 kernel
would) and hands everything else to the real nft, in a throwaway network namespace
(netns_lab, prefix "sv").
"""

import os
import subprocess
import sys

import pytest

import netns_lab
import spa
from netns_lab import InNetns, Lab
from test_spa import server_config

HERE = os.path.dirname(os.path.abspath(__file__))
SPA = os.path.join(HERE, "spa.py")

FAKE_NFT = """#!/bin/sh
# A fake nft: refuses a ruleset that deletes a set element from the packet path, as an
# nft or a kernel from before that feature does; the rest goes to the real nft.
if [ "$1" = "-f" ] || [ "$2" = "-f" ]; then
    input=$(cat)
    case "$input" in
        *"delete @once"*)
            echo "Error: Could not process rule: Operation not supported" >&2
            exit 1;;
    esac
    printf '%%s\\n' "$input" | exec %s "$@"
fi
exec %s "$@"
"""


@pytest.fixture
def old_nft(tmp_path, monkeypatch):
    """A directory first in PATH whose nft refuses the rules of single-use openings."""
    netns_lab.need_lab("nft")
    real = spa.find_tool("nft")
    fake = tmp_path / "bin" / "nft"
    fake.parent.mkdir()
    fake.write_text(FAKE_NFT % (real, real))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", "%s%s%s" % (fake.parent, os.pathsep, os.environ["PATH"]))
    assert spa.find_tool("nft") == str(fake)
    return str(fake.parent)


def test_the_minimum_versions_are_named_once():
    assert spa.ONCE_MINIMUM == {"nft": ("5.4", "0.9.3"), "iptables": ("2.6.28", "1.4.3")}


def test_an_nft_that_refuses_the_single_use_rules_stops_setup_with_a_clear_error(old_nft):
    with Lab(clients=1, prefix="sv") as lab:
        inner = spa.NftFirewall([("tcp", 2222)], table="spa_sv")
        fw = InNetns(lab.ns["srv"], inner)
        fw.setup()                              # without single-use stanzas: as before
        inner.once = True
        with pytest.raises(spa.SpaError) as e:
            fw.setup()
        text = str(e.value)
        assert text.startswith("single_use = yes: this system's nft or kernel refused")
        assert "Linux 5.4 and nftables 0.9.3 or later" in text
        assert "Operation not supported" in text and "\n" not in text
        # Nothing half made: the table is as the first setup left it, protect rule and all.
        rules = lab.run("srv", ["nft", "list", "table", "inet", "spa_sv"]).stdout
        assert "once4" not in rules and "2222" in rules


def test_an_error_that_is_not_about_single_use_is_not_blamed_on_it(old_nft, tmp_path):
    with Lab(clients=1, prefix="sv") as lab:
        inner = spa.NftFirewall([("tcp", 2222)], table="spa_sv")
        inner.once = True
        fw = InNetns(lab.ns["srv"], inner)
        fake = os.path.join(old_nft, "nft")
        with open(fake) as f:
            text = f.read()
        with open(fake, "w") as f:     # now it refuses everything
            f.write(text.replace('*"delete @once"*)', '*)'))
        with pytest.raises(spa.SpaError) as e:
            fw.setup()
        assert "single_use" not in str(e.value) and "Operation not supported" in str(e.value)


def test_the_server_stops_with_one_line_naming_single_use_and_the_versions(old_nft, tmp_path):
    server_config(tmp_path, {"a": {"single_use": "yes", "open_ports": "tcp/2222"}},
                  protect="tcp/2222")
    with Lab(clients=1, prefix="sv") as lab:
        done = subprocess.run(["ip", "netns", "exec", lab.ns["srv"], sys.executable, SPA,
                               "server", "-c", str(tmp_path / "spa.conf")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=30)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert lines[0].startswith("spa.py server: error: single_use = yes")
        assert "Linux 5.4 and nftables 0.9.3" in lines[0]
        # and nothing of single-use openings was made
        out = subprocess.run(["ip", "netns", "exec", lab.ns["srv"], "nft", "list", "ruleset"],
                             stdout=subprocess.PIPE, universal_newlines=True).stdout
        assert "once4" not in out
