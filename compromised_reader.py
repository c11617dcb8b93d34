"""The real server with packet readers under an attacker's control, for tests.

start(lab, conf, attacks) runs `spa.py server -c CONF -v` in the lab's server namespace
(through spa.main, as the command line runs it) with one change: the k-th packet reader
it starts writes attacks[k-1] (bytes) to its pipe to the parent before it reads a packet,
after its real privilege drop, as a reader that an attacker has taken over could; the
readers after the last attack are honest ones.  A parent that refuses such a reader
replaces it, so each attack meets a parent that has survived the ones before.
"""

import os
import sys

from netns_lab import wait_for_line

HERE = os.path.dirname(os.path.abspath(__file__))

CODE = """
import os, sys
sys.path.insert(0, %(here)r)
import spa
ATTACKS = %(attacks)r
started = [0]
real_start, real_run = spa.start_reader, spa.Reader.run

def start_reader(*args, **kwargs):      # in the parent: which reader is this?
    started[0] += 1
    spa.ATTACK = ATTACKS[started[0] - 1] if started[0] <= len(ATTACKS) else None
    return real_start(*args, **kwargs)

def run(self, sockets, parent_fd=None):   # in the reader, unprivileged already
    if spa.ATTACK is not None:
        os.write(parent_fd, spa.ATTACK)
    return real_run(self, sockets, parent_fd)

spa.start_reader, spa.Reader.run = start_reader, run
sys.exit(spa.main(["server", "-c", %(conf)r, "-v"]))
"""


def start(lab, conf, attacks, python=sys.executable):
    """The server process (proc.log holds its log), started and listening."""
    code = CODE % {"here": HERE, "attacks": list(attacks), "conf": conf}
    proc = lab.spawn("srv", [python, "-c", code])
    wait_for_line(proc, r"listening on", 15)
    proc.conf = conf
    return proc
