#!/bin/sh
# Install what spa.py and its tests need on Debian/Ubuntu, then run spa.py's self-test.
# Usage (as root):  sh setup.sh
set -eu
cd "$(dirname "$0")"

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The tool: nftables and pycryptodome.  The tests: iptables, iproute2, the real fwknop
# client and server to test against, pytest and hypothesis, and the kernel headers (the
# system call numbers that the packet reader's seccomp filter is checked against).
apt-get install -y -qq --no-install-recommends \
    nftables iptables iproute2 python3 python3-pycryptodome python3-pytest python3-hypothesis \
    linux-libc-dev \
    python3-pip fwknop-client fwknop-server nmap hyperfine openssh-client openssh-server >/dev/null

# The python3 on PATH may not be Debian's (pyenv, a venv): give it the same modules.
if ! python3 -c 'import pytest, hypothesis
try:
    import Cryptodome
except ImportError:
    import Crypto' 2>/dev/null; then
    python3 -m pip install -q pycryptodome pytest hypothesis 2>/dev/null ||
        python3 -m pip install -q --break-system-packages pycryptodome pytest hypothesis
fi
python3 -m pip install -q vermin 2>/dev/null ||
    python3 -m pip install -q --break-system-packages vermin 2>/dev/null || true

# spa.py promises Python 3.6: where pyenv has one, the tests run spa.py with it too.
for py36 in /root/.pyenv/versions/3.6*/bin/python3; do
    [ -x "$py36" ] || continue
    "$py36" -c 'import Crypto.Cipher.AES' 2>/dev/null ||
        { "$py36" -m pip install -q "pip<22" && "$py36" -m pip install -q --only-binary :all: pycryptodome; } ||
        echo "note: could not give $py36 pycryptodome; the Python 3.6 test will skip"
done

# The server's packet reader runs as its own system user (spa.py install creates it too).
id -u spa >/dev/null 2>&1 ||
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin spa

python3 spa.py --version
# The self-test: a real server, capture and firewall in two throwaway namespaces.
python3 spa.py selftest
echo "setup done: run the tests with  python3 -m pytest -q"
