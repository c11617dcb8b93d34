#!/bin/sh
# Install what spa.py and its tests need on Debian/Ubuntu, then run spa.py's self-test.
# Usage (as root):  sh setup.sh
# A step that fails says so (FAILED: ...); the others still run, and the script exits 1.
set -u
cd "$(dirname "$0")"

failed=""
fail() {
    echo "setup.sh: FAILED: $*" >&2
    failed="$failed
  - $*"
}

[ "$(id -u)" -eq 0 ] || { echo "setup.sh: run it as root (it installs packages)" >&2; exit 1; }
command -v apt-get >/dev/null ||
    { echo "setup.sh: no apt-get: this script is for Debian and Ubuntu (README.md says what to install elsewhere)" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || { echo "setup.sh: FAILED: apt-get update (see apt's message above)" >&2; exit 1; }
# The tool: nftables and pycryptodome.  The tests: iptables, iproute2, the real fwknop
# client and server to test against, pytest and hypothesis, nmap, hyperfine, trafgen (netsniff-ng:
# bench_spa.py's flood sender), OpenSSH,
# systemd (the README's unit runs under it, booted in a throwaway container: nothing of this
# machine's changes), and the kernel headers (the system call numbers that the packet
# reader's seccomp filter is checked against), coverage (CI prints spa.py's line coverage),
# and GnuPG (fwknop's GnuPG mode: spa.py runs the gpg binary).
apt-get install -y -qq --no-install-recommends \
    nftables iptables iproute2 python3 python3-pycryptodome python3-pytest python3-hypothesis \
    python3-coverage \
    linux-libc-dev python3-pip fwknop-client fwknop-server nmap hyperfine netsniff-ng openssh-client \
    openssh-server systemd gnupg >/dev/null ||
    { echo "setup.sh: FAILED: apt-get install (see apt's message above)" >&2; exit 1; }

# pip_install PYTHON PACKAGE...: plain pip first, then with --break-system-packages (Debian 12
# and Ubuntu 23.04 on mark their python3 as apt's); pip's last words if neither worked.
pip_install() {
    py=$1
    shift
    log=$(mktemp)
    if "$py" -m pip install -q "$@" >"$log" 2>&1 ||
        "$py" -m pip install -q --break-system-packages "$@" >>"$log" 2>&1; then
        rm -f "$log"
        return 0
    fi
    grep -v '^ *$' "$log" | tail -n 4 | sed 's/^/    pip: /' >&2
    rm -f "$log"
    return 1
}

# The python3 on PATH may not be Debian's (pyenv, a venv): give it the same modules.
if ! python3 -c 'import pytest, hypothesis
try:
    import Cryptodome
except ImportError:
    import Crypto' 2>/dev/null; then
    pip_install python3 pycryptodome pytest hypothesis ||
        fail "pip could not install pycryptodome, pytest and hypothesis for $(command -v python3)"
fi
# vermin checks that spa.py needs nothing newer than Python 3.6 (test_runs_on_python36).
# Without it (no way to PyPI) that test checks with Python's own parser and a list of newer
# APIs instead, a weaker check: said here, and again by the test run; in CI it is a failure.
if ! python3 -c 'import vermin' 2>/dev/null && ! pip_install python3 vermin; then
    if [ "${CI:-}" = true ]; then
        fail "pip could not install vermin, which test_runs_on_python36 needs"
    else
        echo "setup.sh: note: pip could not install vermin (above); test_runs_on_python36 checks" \
             "spa.py with Python's own parser instead, which misses newer library calls:" \
             "'python3 -m pip install vermin' once PyPI can be reached" >&2
    fi
fi
# coverage measures which lines of spa.py the tests run (conftest.py, in CI).
python3 -c 'import coverage' 2>/dev/null || pip_install python3 coverage ||
    fail "pip could not install coverage, which the tests' coverage report (CI) needs"

# spa.py promises Python 3.6: where pyenv has one, the tests run spa.py with it too
# (test_real_python36_end_to_end); Debian and Ubuntu have none of their own.
for py36 in /root/.pyenv/versions/3.6*/bin/python3 "$HOME"/.pyenv/versions/3.6*/bin/python3; do
    [ -x "$py36" ] || continue
    "$py36" -c 'import Crypto.Cipher.AES' 2>/dev/null && continue
    { pip_install "$py36" "pip<22" && pip_install "$py36" --only-binary :all: pycryptodome; } ||
        fail "pip could not give $py36 pycryptodome, which test_real_python36_end_to_end needs"
done

# The server's packet reader runs as its own system user (spa.py install creates it too).
id -u spa >/dev/null 2>&1 ||
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin spa ||
    fail "useradd could not create the system user spa, which the server's packet reader runs as"

python3 spa.py --version || fail "python3 spa.py --version"
# The self-test: a real server, capture and firewall in two throwaway namespaces.
python3 spa.py selftest || fail "spa.py selftest (its lines above say which check)"

if [ -n "$failed" ]; then
    echo "setup.sh: these steps failed:$failed" >&2
    exit 1
fi
echo "setup done: run the tests with  python3 -m pytest -q"
