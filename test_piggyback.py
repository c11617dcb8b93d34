"""The NAT-piggybacking measurement (piggyback.py) with a small N, in CI.

A real NAT in network namespaces: the knocker and a neighbour behind one masquerading
router, the server outside it (piggyback.py's NatLab), with the real `spa.py server` and
`spa.py client`.  Counts only: with single_use and --connect
the neighbour never gets in; without single_use it does; with single_use and a separate
connect, never both.  Each back end: nft, iptables-nft, iptables-legacy; IPv4 and IPv6.
"""

import pytest

import netns_lab
import piggyback
from netns_lab import ip6

N = 2


@pytest.mark.parametrize("firewall", piggyback.FIREWALLS)
def test_the_neighbour_never_gets_in_on_a_single_use_knock_with_connect(firewall, monkeypatch):
    tools = ["nft"] + ([] if firewall == "nft" else
                       [firewall, ip6(firewall), firewall + "-restore", ip6(firewall) + "-restore"])
    netns_lab.need_lab(*tools)
    monkeypatch.setattr(piggyback, "TIMEOUT", 2)         # more than spa.ONCE_GRACE
    results = piggyback.measure((firewall,), (4, 6), piggyback.MODES, N, prefix="sx")
    assert len(results) == 2 * len(piggyback.MODES) * N
    for r in results:
        what = "%s IPv%d %s: %r" % (firewall, r["family"], r["mode"], r)
        assert r["tried"] > 1000, what                 # the neighbour kept trying
        if r["mode"] == "once+connect":
            assert r["knocker"] is not None, what
            assert r["neighbour"] == [], what
        elif r["mode"] == "once+separate":
            # A race: whoever comes first after the grace period, never both.
            assert len(r["neighbour"]) + (r["knocker"] is not None) <= 1, what
        else:
            assert r["knocker"] is not None and len(r["neighbour"]) > 100, what
