"""bench_spa.py --smoke runs end to end and prints every figure for both servers.

Only the shape of the output is checked, never a timing: the numbers depend on the
machine.  Needs root, nft, iptables, fwknop(d), hyperfine, ss and trafgen (see setup.sh);
outside CI it skips when they are missing, with CI=true that is a failure.
"""

import json
import os
import subprocess
import sys

import netns_lab

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(HERE, "bench_spa.py")

# The start of each figure's row label in the printed table (the smoke run's rates and N).
FIGURES = [
    "knock-to-open median", "knock-to-open p95", "knock-to-open: knocks opened",
    "client cost",
    "flood 1.0k pps: valid knocks opened", "flood max pps: valid knocks opened",
    "flood max pps, each knock sent 3 times: valid knocks opened",
    "flood: highest rate with 100% opened", "flood: peak server RSS", "flood: peak server PSS",
    "flood: log lines written",
    "garbage cost", "garbage: packets handled per second", "garbage: kernel drops",
    "scale N=10: authorized", "scale N=10: authorizations per second",
    "scale N=10: firewall entries", "scale N=30: authorized",
    "memory: PSS idle", "memory: PSS after the floods", "memory: PSS holding",
    "memory: RSS idle", "memory: RSS after the floods", "memory: RSS holding",
    "memory: RSS growth",
    "router (10% of one core): knock-to-open median", "router (10% of one core): knock-to-open p95",
    "router (10% of one core): highest garbage rate with 100% opened",
    "router (10% of one core): start-up", "router (10% of one core): PSS idle",
]


def _crypto_ok():
    sys.path.insert(0, HERE)
    import spa
    try:
        spa.aes_module()
        return True
    except spa.SpaError:
        return False


def _table_rows(text):
    """{figure: [spa.py cell, fwknopd cell, ratio, goal]} from the printed markdown table."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith("| figure "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _netns_names():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def test_bench_smoke_prints_every_figure_for_both_servers(tmp_path):
    netns_lab.need_lab("nft", "iptables", "fwknopd", "fwknop", "hyperfine", "ss", "trafgen")
    netns_lab.need(_crypto_ok(), "pycryptodome is not installed")
    out_json = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, BENCH, "--smoke", "--json", str(out_json)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.terminate()             # bench_spa.py cleans up on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError("bench_spa.py --smoke ran over 300 s:\n" + stderr[-3000:])
    assert proc.returncode == 0, "bench_spa.py --smoke failed:\n%s\n%s" % (stdout, stderr[-3000:])

    rows = _table_rows(stdout)
    for figure in FIGURES:
        matching = [label for label in rows if label.startswith(figure)]
        assert matching, "no row %r in the table:\n%s" % (figure, stdout)
        for label in matching:
            spa_cell, fwknopd_cell = rows[label][:2]
            assert spa_cell not in ("", "n/a"), "row %r has no spa.py figure:\n%s" % (label, stdout)
            assert fwknopd_cell not in ("", "n/a"), \
                "row %r has no fwknopd figure:\n%s" % (label, stdout)

    data = json.loads(out_json.read_text())
    assert set(data["servers"]) == {"spa.py", "fwknopd"}
    for name, server in data["servers"].items():
        for part in ("latency", "flood", "garbage", "scale", "memory_idle", "memory_holding",
                     "router"):
            assert server.get(part), "%s: no %s figures in the JSON" % (name, part)
        for run in server["flood"]["runs"]:          # the sender's rate and the drops, each run
            assert run["sender"]["rate"] > 0 and run["sender"]["tool"], run["sender"]
            assert run["kernel_drops"] is not None, run
    assert data["client_cost"]["spa.py"]["runs"] >= 2
    assert {r["figure"] for r in data["rows"]} == set(rows)

    leftovers = [n for n in _netns_names() if n.startswith("bench%dx" % proc.pid)]
    assert not leftovers, "bench_spa.py left namespaces behind: %s" % leftovers


def test_flood_runs_are_read_as_the_help_writes_them():
    """--flood-runs takes what its help and the docstring show: rates with k, max, xN."""
    sys.path.insert(0, HERE)
    import bench_spa
    assert [bench_spa.flood_run(r) for r in ("1k", "150000", "max", "max x3", "0x2", "2.5k")] == \
        [(1000, 1), (150000, 1), (0, 1), (0, 3), (0, 2), (2500, 1)]
    for bad in ("fast", "1m", "x3", ""):
        try:
            bench_spa.flood_run(bad)
        except ValueError as e:
            assert "is not RATE[xN]" in str(e)
        else:
            raise AssertionError(bad)
    res = subprocess.run([sys.executable, BENCH, "--flood-runs", "max,fast"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert res.returncode == 2 and "'fast' is not RATE[xN]" in res.stderr


def test_the_in_process_flood_path_refuses_every_garbage_frame_of_its_ring():
    """`bench_spa.py _reader_loop`: spa.py's Reader reads a ring of garbage, pass after pass;
    the figure is per frame read, and every frame of every pass was read and refused."""
    netns_lab.need(_crypto_ok(), "pycryptodome is not installed")
    res = subprocess.run([sys.executable, BENCH, "_reader_loop", '{"length": 204, "passes": 3}'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    sys.path.insert(0, HERE)
    import spa
    assert r["frames"] == spa.RING_FRAMES and r["passes"] == 3
    assert r["refused"] == 3 * spa.RING_FRAMES
    assert 0 < r["best_us"] <= r["median_us"] < 1000
