"""README.md's Quick start, run as typed, so that README and program cannot drift apart.

The test reads the Quick start's code blocks from README.md and runs them as they are, on
two kinds of "machine": the server and two laptops, each a network namespace of a Lab with
its own /etc, /usr/local and /var/lib (overlays on the real ones: the host's are never
changed) and an empty home at /root, all kept from one command to the next.  A command runs
as root, in a clone of the repository (a folder with spa.py in it, which the machines
share: that is how web1.spa.conf travels to the laptops), with a fresh machine's PATH and
no other variable.  The laptops' /etc/hosts names web1.example.org, their ssh already has
a key that the server's sshd (a real OpenSSH server on port 22) accepts, and knows its host
key: what "you already log in to it with ssh" means.  Package installation (the `apt
install` line) is left to setup.sh, which must install the same packages.

Laptop 1 knocks with `spa.py client -n web1 && ssh ...`; laptop 2 uses the ProxyCommand
block and plain `ssh web1.example.org` (its own knock alone opens the port for it).  Once with `spa.py install` and
once with the other way the Quick start gives, `install -m 755 spa.py /usr/local/bin/`.
"""

import os
import re
import shlex
import shutil
import stat
import subprocess

import pytest

import netns_lab
from netns_lab import Lab, need_lab, wait_for_line

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")
SERVER_NAME = "web1.example.org"
FRESH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OVERLAID = ("/etc", "/usr/local", "/var/lib")
# What the laptops type in their ssh session: it says where the connection came from.
SESSION = 'echo "README-OK $SSH_CONNECTION"\n'


def quick_start():
    """The Quick start section's text, and its code blocks as (text before, language, code)."""
    with open(README) as f:
        text = f.read()
    assert "\n## Quick start" in text, "README.md has no Quick start section"
    section = text.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```$", section, re.M | re.S):
        indent = len(m.group(1))
        code = "\n".join(line[indent:] for line in m.group(3).splitlines())
        blocks.append((section[:m.start()], m.group(2), code))
    return section, blocks


def steps():
    """The blocks by their part in the Quick start; fails, saying why, if its shape changed."""
    section, blocks = quick_start()
    shape = [(lang, code.split()[0] if code.split() else "") for _, lang, code in blocks]
    expected = [("sh", "apt"), ("sh", "spa.py"), ("sh", "spa.py"), ("sh", "(umask"),
                ("sh", "spa.py"), ("", "Host")]
    assert shape == expected, (
        "the Quick start's code blocks changed (%s): update test_readme.py to run the new "
        "ones as typed" % shape)
    names = ["install", "keys", "server", "client_config", "knock", "ssh_config"]
    found = dict(zip(names, (code for _, _, code in blocks)))
    for name, words in (("install", "on the server and on the client, as root"),
                        ("keys", "on the server, as root"), ("server", "as root"),
                        ("client_config", "on the client")):
        before = blocks[names.index(name)][0]
        last_step = before[before.rfind("\n1. ") if name == "install" else
                           max(before.rfind("\n%d. " % n) for n in range(2, 10)):]
        assert words in " ".join(last_step.split()), \
            "the Quick start's step for %s no longer says %r" % (name, words)
    prose = " ".join(section.split())
    copy = re.search(r"`(install -m 755 spa\.py [^`]+)`", prose)
    assert copy, "the Quick start no longer gives `install -m 755 spa.py ...` as the other way"
    found["copy"] = copy.group(1)
    proxied = re.search(r"and `(ssh [^`]+)`, `scp`", prose[prose.index("ProxyCommand"):])
    assert proxied, "the Quick start no longer says which ssh command works with ProxyCommand"
    found["proxied_ssh"] = proxied.group(1)
    return found


class Machine(object):
    """One computer of the Quick start: a namespace with /etc, /usr/local and /var/lib of
    its own (overlays) and an empty home at /root, kept in `folder`."""

    def __init__(self, lab, ns, folder, clone):
        self.lab, self.ns, self.clone = lab, ns, clone
        self.upper = {}
        mounts = []
        for i, path in enumerate(OVERLAID):
            upper, work = os.path.join(folder, "upper%d" % i), os.path.join(folder, "work%d" % i)
            os.makedirs(upper)
            os.makedirs(work)
            os.chmod(upper, stat.S_IMODE(os.stat(path).st_mode))
            self.upper[path] = upper
            mounts.append("mount -t overlay overlay -o lowerdir=%s,upperdir=%s,workdir=%s %s"
                          % (path, shlex.quote(upper), shlex.quote(work), path))
        self.home = os.path.join(folder, "home")
        os.makedirs(self.home, 0o700)
        mounts.append("mount --bind %s /root" % shlex.quote(self.home))
        self.setup = " && ".join(mounts + ["cd %s" % shlex.quote(clone)])

    def argv(self, command):
        # Mounts made in a mount namespace of its own are gone when its last process is.
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                self.setup + ' && exec sh -ec "$1"', "machine", command]

    def run(self, command, stdin="", check=True, timeout=60):
        done = self.lab.run(self.ns, self.argv(command), check=False, timeout=timeout,
                            input=stdin, env={"PATH": FRESH_PATH, "HOME": "/root"})
        if check and done.returncode != 0:
            pytest.fail("on %s, `%s` exited %d:\n%s\n%s" % (self.ns, command, done.returncode,
                                                           done.stdout, done.stderr))
        return done

    def spawn(self, command):
        return self.lab.spawn(self.ns, self.argv(command), env={"PATH": FRESH_PATH,
                                                                "HOME": "/root"})

    def write(self, path, text, mode=0o600):
        """Put a file on this machine: in its home (/root/...) or its own /etc."""
        base = self.home if path.startswith("/root/") else self.upper["/etc"]
        target = os.path.join(base, path.split("/", 2)[2])
        os.makedirs(os.path.dirname(target), 0o700, exist_ok=True)
        with open(target, "w") as f:
            f.write(text)
        os.chmod(target, mode)


def setup_packages():
    with open(os.path.join(HERE, "setup.sh")) as f:
        text = f.read()
    return set(re.search(r"apt-get install -y -qq --no-install-recommends \\\n(.*?)>",
                         text, re.S).group(1).split())


def start_sshd(lab, tmp_path):
    """A real OpenSSH server on the server's port 22; returns (host key line, user key)."""
    os.makedirs("/run/sshd", exist_ok=True)            # its privilege separation directory
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(tmp_path / name)], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "user.pub").read_text())
    config = tmp_path / "sshd_config"
    config.write_text("\n".join([
        "Port 22", "ListenAddress %s" % Lab.srv4(1), "HostKey %s" % (tmp_path / "host"),
        "AuthorizedKeysFile %s" % (tmp_path / "authorized_keys"),
        "PidFile %s" % (tmp_path / "sshd.pid"), "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
        "StrictModes no", ""]))
    sshd = lab.spawn("srv", [shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f",
                             str(config)])
    wait_for_line(sshd, r"Server listening on %s port 22" % re.escape(Lab.srv4(1)), 10)
    host_key = (tmp_path / "host.pub").read_text().split()
    return "%s %s %s\n" % (SERVER_NAME, host_key[0], host_key[1]), \
        (tmp_path / "user").read_text()


@pytest.mark.parametrize("route", ["spa.py install", "install -m 755"])
def test_quick_start_as_typed(tmp_path, route):
    need_lab("nft", "sshd", "ssh", "ssh-keygen", "unshare", "mount")
    netns_lab.need(subprocess.run(["/usr/bin/python3", "-c", "import Cryptodome"],
                                  stderr=subprocess.DEVNULL).returncode == 0,
                   "Debian's python3-pycryptodome is not installed")
    step = steps()
    host_state = {path: os.path.lexists(path) for path in
                  ("/etc/spa", "/usr/local/bin/spa.py", "/usr/local/bin/spa", "/root/.spa.conf")}
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("spa.py", "spa.conf.example"):
        shutil.copy2(os.path.join(HERE, name), str(clone / name))

    # 1. Install, on every machine; apt's packages are setup.sh's too.
    install = []
    for line in step["install"].splitlines():
        if line.split()[:2] == ["apt", "install"]:
            assert set(line.split()[2:]) <= setup_packages(), line
        elif route == "install -m 755" and line == "python3 spa.py install":
            install.append(step["copy"])
        else:
            install.append(line)
    assert len(install) == 1, install

    with Lab(clients=2, prefix="rdm") as lab:
        server = Machine(lab, "srv", str(tmp_path / "server"), str(clone))
        laptops = [Machine(lab, "cli%d" % k, str(tmp_path / ("laptop%d" % k)), str(clone))
                   for k in (1, 2)]
        known_host, user_key = start_sshd(lab, tmp_path)
        with open("/etc/hosts") as f:
            hosts = f.read()
        for laptop in laptops:
            laptop.write("/etc/hosts", hosts + "%s %s\n" % (Lab.srv4(1), SERVER_NAME), 0o644)
            laptop.write("/root/.ssh/id_ed25519", user_key)
            laptop.write("/root/.ssh/known_hosts", known_host, 0o644)
        for machine in [server] + laptops:
            machine.run(install[0])
            assert machine.run("command -v spa.py").stdout.strip() == "/usr/local/bin/spa.py"

        # 2. Keys and the server's config, on the server; check-config passes on it.
        checked = server.run(step["keys"])
        assert "verdict: ok" in checked.stdout, checked.stdout
        conf = os.path.join(server.upper["/etc"], "spa", "spa.conf")
        assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(conf)).st_mode) == 0o700

        # 3. The server, in the foreground; from now on ssh is refused without a knock.
        daemon = server.spawn(step["server"])
        wait_for_line(daemon, r"listening on", 20)
        for laptop in laptops:
            plain = laptop.run("ssh -o BatchMode=yes %s true" % SERVER_NAME, check=False,
                               timeout=30)
            assert plain.returncode == 255 and "refused" in plain.stderr, plain.stderr

        # 4. Laptop 1: the client's section, a knock, then ssh.
        laptops[0].run(step["client_config"])
        assert stat.S_IMODE(os.stat(os.path.join(laptops[0].home, ".spa.conf")).st_mode) == 0o600
        done = laptops[0].run(step["knock"], stdin=SESSION, timeout=30)
        assert "README-OK %s " % Lab.cli4(1) in done.stdout, done.stdout + done.stderr
        wait_for_line(daemon, r"accepted packet from %s \[client web1\]" % re.escape(Lab.cli4(1)), 2)

        #    Laptop 2: the ProxyCommand block in ~/.ssh/config, then plain ssh.
        laptops[1].run(step["client_config"])
        laptops[1].write("/root/.ssh/config", step["ssh_config"] + "\n")
        done = laptops[1].run(step["proxied_ssh"], stdin=SESSION, timeout=30)
        assert "README-OK %s " % Lab.cli4(2) in done.stdout, done.stdout + done.stderr
        wait_for_line(daemon, r"accepted packet from %s \[client web1\]" % re.escape(Lab.cli4(2)), 2)

    assert host_state == {path: os.path.lexists(path) for path in host_state}, \
        "the test changed the host's own files"
