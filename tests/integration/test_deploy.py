"""Deployment (issue 10): systemd units, sd_notify and the watchdog, socket
activation, `meson install`, privilege drop, man pages, bash completion.

Nothing here touches the host's systemd, users or /etc: units are verified
offline, sysusers/tmpfiles run against a private --root, capd runs with
private folders (privilege-drop tests inside a network namespace of their own).
"""

import json
import os
import grp
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BUILD, CAPCTL, CAPD, ROOT, SANITIZED, Capd, EchoServer, free_port, sh

MANS = ["capd.8", "capctl.1", "capd.conf.5"]
BUILD_OPTS = {}  # meson options of the build under test, filled by `installed`

# Where each installed file lands, relative to the install prefix (etc/ is
# /etc when the prefix is /usr, <prefix>/etc otherwise).
INSTALLED = [
    "sbin/capd",
    "bin/capctl",
    "lib/systemd/system/capd.service",
    "lib/systemd/system/capd.socket",
    "lib/sysusers.d/capd.conf",
    "lib/tmpfiles.d/capd.conf",
    "share/man/man8/capd.8",
    "share/man/man1/capctl.1",
    "share/man/man5/capd.conf.5",
    "share/bash-completion/completions/capctl",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`meson install --destdir` of the build under test: (destdir, prefix, sysconfdir)."""
    dest = tmp_path_factory.mktemp("destdir")
    sh("meson", "install", "-C", BUILD, "--no-rebuild", "--destdir", dest, "--quiet", timeout=300)
    opts = json.loads(sh("meson", "introspect", "--buildoptions", BUILD).stdout)
    opt = {o["name"]: o["value"] for o in opts}
    prefix = opt["prefix"]
    sysconfdir = os.path.join(prefix, opt["sysconfdir"])
    BUILD_OPTS.update(opt)
    return dest, prefix, sysconfdir


def under(dest, path):
    return Path(str(dest) + str(path))


def test_install_tree_holds_every_file(installed):
    """Issue 10: the destdir tree holds capd, capctl, the units, sysusers and
    tmpfiles snippets, the config, the man pages and the bash completion."""
    dest, prefix, sysconfdir = installed
    missing = [p for p in INSTALLED if not under(dest, os.path.join(prefix, p)).is_file()]
    conf = under(dest, os.path.join(sysconfdir, "capd", "capd.conf"))
    assert not missing, missing
    assert conf.is_file(), conf
    assert os.access(under(dest, os.path.join(prefix, "sbin/capd")), os.X_OK)
    # the units name the installed paths
    svc = under(dest, os.path.join(prefix, "lib/systemd/system/capd.service")).read_text()
    assert f"ExecStart={os.path.join(prefix, 'sbin/capd')} -c {os.path.join(sysconfdir, 'capd/capd.conf')}" in svc
    assert not re.search(r"@[A-Z_]+@", svc), "unconfigured placeholder in capd.service"


def test_reinstall_keeps_an_edited_config(installed):
    """`meson install` over an existing config keeps the user's file and puts
    the shipped one beside it as capd.conf.dist."""
    dest, prefix, sysconfdir = installed
    conf = under(dest, os.path.join(sysconfdir, "capd", "capd.conf"))
    shipped = conf.read_text()
    conf.write_text(shipped + "\n; edited by the analyst\n")
    try:
        sh("meson", "install", "-C", BUILD, "--no-rebuild", "--destdir", dest, "--quiet", timeout=300)
        assert conf.read_text().endswith("; edited by the analyst\n")
        assert under(dest, os.path.join(sysconfdir, "capd", "capd.conf.dist")).read_text() == shipped
    finally:
        conf.write_text(shipped)


def test_installed_capd_checks_installed_config(installed):
    """Issue 10: the installed capd accepts the installed default config (capd -t)."""
    dest, prefix, sysconfdir = installed
    capd = under(dest, os.path.join(prefix, "sbin/capd"))
    conf = under(dest, os.path.join(sysconfdir, "capd", "capd.conf"))
    try:
        grp.getgrnam("capd")
    except KeyError:
        # before systemd-sysusers made the group, capd -t says so, as start-up would
        r = subprocess.run([str(capd), "-t", "-c", str(conf)], capture_output=True, text=True)
        assert r.returncode == 1 and "control_group = capd: no such group" in r.stderr, r.stderr
        text = conf.read_text().replace("\ncontrol_group = capd\n", "\n;control_group = capd\n")
        conf = conf.parent / "capd-nogroup.conf"
        conf.write_text(text)
    r = sh(capd, "-t", "-c", conf)
    assert "configuration is good" in r.stdout
    # and the source copy documents every [capd] key with its default
    text = (ROOT / "conf" / "capd.conf").read_text()
    for key in ("rotate_size = 64M", "keep_files = 32", "flush_interval = 1s", "log_level = info",
                "control = /run/capd/capd.sock", "spool = /var/lib/capd/spool"):
        assert key in text, key


def test_units_pass_systemd_analyze_verify(installed, tmp_path):
    """Issue 10: systemd-analyze verify passes on capd.service and capd.socket
    (their paths pointed at the destdir tree, where the binaries are)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    dest, prefix, _ = installed
    units = []
    for u in ("capd.service", "capd.socket"):
        text = under(dest, os.path.join(prefix, "lib/systemd/system", u)).read_text()
        text = text.replace(f"={prefix}/", f"={dest}{prefix}/").replace(f" {prefix}/", f" {dest}{prefix}/")
        (tmp_path / u).write_text(text)
        units.append(tmp_path / u)
    r = sh("systemd-analyze", "verify", "--man=no", *units, check=False)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    svc = units[0].read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "RuntimeDirectory=capd",
                 "NoNewPrivileges=yes", "ProtectHome=yes", "PrivateTmp=yes",
                 "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in svc, line
    # the file is checked before the SIGHUP, so that a bad one fails `systemctl reload`
    assert any(ln.startswith("ExecReload=") and "/capd -t -c " in ln for ln in svc.splitlines()), svc
    # systemd would give a StateDirectory back to root at every reload (no User= here)
    assert "StateDirectory=" not in svc
    bounding = next(ln for ln in svc.splitlines() if ln.startswith("CapabilityBoundingSet="))
    assert set(bounding.split("=", 1)[1].split()) == {
        "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_CHOWN",
        "CAP_DAC_OVERRIDE", "CAP_KILL"}
    sock = units[1].read_text()
    for line in ("ListenStream=/run/capd/capd.sock", "SocketMode=0660", "SocketGroup=capd"):
        assert line in sock, line


def test_sysusers_and_tmpfiles_in_a_private_root(installed, tmp_path):
    """Issue 10: the sysusers.d snippet makes user and group capd, the tmpfiles.d
    one the state and spool folders owned by them (against --root, not the host)."""
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    dest, prefix, _ = installed
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    sh("systemd-sysusers", f"--root={root}", under(dest, os.path.join(prefix, "lib/sysusers.d/capd.conf")))
    passwd = (root / "etc/passwd").read_text()
    group = (root / "etc/group").read_text()
    line = next(ln for ln in passwd.splitlines() if ln.startswith("capd:"))
    uid, gid = int(line.split(":")[2]), int(line.split(":")[3])
    assert 0 < uid < 1000 and line.split(":")[5] == "/var/lib/capd", line
    assert any(ln.startswith(f"capd:x:{gid}:") for ln in group.splitlines()), group
    sh("systemd-tmpfiles", "--create", f"--root={root}",
        under(dest, os.path.join(prefix, "lib/tmpfiles.d/capd.conf")))
    for d in ("var/lib/capd", "var/lib/capd/spool"):
        st = (root / d).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, gid, 0o750), d


def test_builds_without_libsystemd(tmp_path):
    """-Dsystemd=disabled (no libsystemd on the box) failed to build: capd.c's
    watchdog timer and its callback were left unused, which -Werror refuses. The
    files that test HAVE_SYSTEMD are compiled as meson does, with it 0."""
    cc = json.loads((BUILD / "compile_commands.json").read_text())
    # meson's config.h (CAPD_VERSION too), with HAVE_SYSTEMD 0
    conf = (BUILD / "config.h").read_text()
    assert "#define HAVE_SYSTEMD 1" in conf or "#define HAVE_SYSTEMD 0" in conf, conf
    (tmp_path / "config.h").write_text(conf.replace("#define HAVE_SYSTEMD 1", "#define HAVE_SYSTEMD 0"))
    for src in ("daemon/capd.c", "daemon/control.c"):
        cmd = next(c for c in cc if c["file"].endswith(src))
        args, it = [], iter(shlex.split(cmd["command"]))
        for a in it:
            if a in ("-MQ", "-MF", "-o"):
                next(it)  # no dependency file, and the object goes to tmp_path
            elif a not in ("-MD", "-fdiagnostics-color=always"):
                args.append(a)
        args[1:1] = [f"-I{tmp_path}", "-o", str(tmp_path / "out.o")]
        r = subprocess.run(args, cwd=cmd["directory"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{src}:\n{r.stderr}"


# --- sd_notify and the watchdog ---------------------------------------------

class NotifySocket:
    """A NOTIFY_SOCKET as systemd provides it: AF_UNIX datagrams."""

    def __init__(self, path):
        self.path = str(path)
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.s.bind(self.path)
        self.msgs = []

    def pump(self, timeout):
        self.s.settimeout(timeout)
        try:
            self.msgs.append(self.s.recv(4096).decode())
            return True
        except socket.timeout:
            return False

    def find(self, line, start=0, timeout=10.0):
        """Index of the first message from start on holding `line`, reading as needed."""
        deadline = time.time() + timeout
        i = start
        while True:
            while i < len(self.msgs):
                if line in self.msgs[i].split("\n"):
                    return i
                i += 1
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError(f"no {line} after message {start}: {self.msgs}")
            self.pump(left)

    def close(self):
        self.s.close()


def test_sd_notify_ready_status_watchdog_reload_stopping(capd_factory, tmp_path):
    """Issue 10: under a NOTIFY_SOCKET capd sends READY=1 with STATUS= once it
    serves, WATCHDOG=1 pings (WATCHDOG_USEC set), RELOADING=1 then READY=1 on
    SIGHUP, and STOPPING=1 on SIGTERM."""
    ns = NotifySocket(tmp_path / "notify.sock")
    try:
        c = capd_factory(start=False)
        c.start(extra_env={"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "200000"})
        i = ns.find("READY=1")
        assert any(line.startswith("STATUS=") for line in ns.msgs[i].split("\n")), ns.msgs[i]
        assert c.ctl("status").returncode == 0
        # pings every WATCHDOG_USEC/2 while the loop runs
        w = i
        for _ in range(4):
            w = ns.find("WATCHDOG=1", w + 1, timeout=3)
        c.proc.send_signal(signal.SIGHUP)
        r = ns.find("RELOADING=1", w + 1)
        ns.find("READY=1", r + 1)
        c.ctl("reload")
        r = ns.find("RELOADING=1", r + 1)
        ns.find("READY=1", r + 1)
        c.proc.send_signal(signal.SIGTERM)
        s = ns.find("STOPPING=1", r + 1)
        assert c.proc.wait(10) == 0
        assert "READY=1" not in "\n".join(ns.msgs[s + 1:]).split("\n")
    finally:
        ns.close()


def test_reload_while_stopping_is_refused(capd_factory, tmp_path):
    """A reload (capctl reload or SIGHUP) in the 2 s a stop gives open sessions was
    carried out: an instance new in the file started listening and took clients that
    the stop then cut, and systemd was told READY=1 after STOPPING=1. It is refused."""
    ns = NotifySocket(tmp_path / "notify.sock")
    srv = EchoServer()
    try:
        pa, pb = free_port(), free_port()
        conf = f"[forward a]\nlisten = {pa}\nto = 127.0.0.1:{srv.port}\n"
        c = capd_factory(conf, start=False)
        c.start(extra_env={"NOTIFY_SOCKET": ns.path})
        ns.find("READY=1")
        held = socket.create_connection(("127.0.0.1", pa), timeout=5)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        c.proc.send_signal(signal.SIGTERM)
        s = ns.find("STOPPING=1")
        c.write_conf(conf + f"[forward b]\nlisten = {pb}\nto = 127.0.0.1:{srv.port}\n")
        r = c.ctl("reload", check=False)
        assert r.returncode == 1 and "capd is stopping" in r.stderr, r.stderr
        c.proc.send_signal(signal.SIGHUP)
        time.sleep(0.1)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", pb), timeout=1).close()
        held.close()
        assert c.proc.wait(10) == 0
        while ns.pump(0.1):
            pass
        assert "READY=1" not in "\n".join(ns.msgs[s + 1:]).split("\n"), ns.msgs
    finally:
        srv.close()
        ns.close()


def test_no_watchdog_pings_without_watchdog_usec(capd_factory, tmp_path):
    """Without WATCHDOG_USEC capd sends no WATCHDOG=1."""
    ns = NotifySocket(tmp_path / "notify.sock")
    try:
        c = capd_factory(start=False)
        c.start(extra_env={"NOTIFY_SOCKET": ns.path})
        ns.find("READY=1")
        while ns.pump(0.5):
            pass
        assert "WATCHDOG=1" not in ns.msgs
    finally:
        ns.close()


# --- socket activation -----------------------------------------------------

ACTIVATE = r"""
import fcntl, os, sys
given = [int(fd) for fd in sys.argv[1].split(",")]
fds = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in given]
for fd in given:
    os.close(fd)
for i, fd in enumerate(fds):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
if sys.argv[2]:
    os.environ["LISTEN_FDNAMES"] = sys.argv[2]
os.execv(sys.argv[3], sys.argv[3:])
"""


def start_activated(capd_factory, ls, path, names=""):
    """capd started as systemd starts it for capd.socket: given the listening socket ls
    (bound at path), or a list of sockets named by names (LISTEN_FDNAMES), as
    LISTEN_FDS. Returns the capd and its first `capctl --json status` on path."""
    c = capd_factory(start=False)
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    c.logf = open(c.log_path, "ab")
    socks = ls if isinstance(ls, list) else [ls]
    fds = [x.fileno() for x in socks]
    c.proc = subprocess.Popen(["/usr/bin/python3", "-c", ACTIVATE, ",".join(map(str, fds)), names, str(CAPD),
                               "-c", str(c.conf_path)], pass_fds=fds, env=env,
                              stdout=c.logf, stderr=subprocess.STDOUT)
    for x in socks:
        x.close()
    deadline = time.time() + 10
    while True:
        r = sh(CAPCTL, "-s", path, "--json", "status", check=False, timeout=5)
        if r.returncode == 0 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert r.returncode == 0, r.stderr + c.log()
    return c, r


def test_socket_activation_serves_capctl(capd_factory, tmp_path):
    """Issue 10: capd takes a socket passed the sd_listen_fds way (LISTEN_FDS=1,
    LISTEN_PID) instead of binding `control =`, and serves capctl on it; the
    socket file's group (SocketGroup=) may use it when control_group is unset."""
    base = Path(tempfile.mkdtemp(prefix="capd-act.", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        path = base / "activated.sock"
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(str(path))
        ls.listen(16)
        os.chmod(path, 0o660)
        os.chown(path, 0, 65534)
        c, r = start_activated(capd_factory, ls, path)
        st = json.loads(r.stdout)
        assert st["pid"] == c.proc.pid
        assert not c.sock.exists(), "capd bound control = although it was given a socket"
        assert "socket passed by systemd" in c.log()
        # a member of the socket's group (here: nobody's group) gets in
        if shutil.which("setpriv") and os.geteuid() == 0:
            r = sh("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", CAPCTL, "-s", path,
                    "status", check=False)
            assert r.returncode == 0, r.stderr + c.log()[-2000:]
        port = free_port()
        srv = EchoServer()
        try:
            sh(CAPCTL, "-s", path, "add", "forward", "--port", port, "--to", f"127.0.0.1:{srv.port}")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"activated")
                s.shutdown(socket.SHUT_WR)
                assert s.recv(100) == b"activated"
        finally:
            srv.close()
        c.proc.send_signal(signal.SIGTERM)
        assert c.proc.wait(10) == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_socket_activation_status_names_the_passed_socket(capd_factory, tmp_path):
    """With a socket passed by systemd, control = is ignored, but capctl status and
    the ready line named control = (a path where no socket is) rather than the
    socket capctl had just reached capd on."""
    base = Path(tempfile.mkdtemp(prefix="capd-act.", dir="/tmp"))
    try:
        path = base / "passed.sock"
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(str(path))
        ls.listen(16)
        c, r = start_activated(capd_factory, ls, path)
        assert json.loads(r.stdout)["control"] == str(path), r.stdout
        assert f"ready: control {path}," in c.log(), c.log()
        c.proc.send_signal(signal.SIGTERM)
        assert c.proc.wait(10) == 0
        assert path.exists()  # systemd's socket file is systemd's to remove
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_socket_activation_serves_every_passed_unix_socket(capd_factory, tmp_path):
    """capd.socket with two ListenStream= lines: capd took the first socket passed and
    left the second open and unserved, so a capctl on it waited in its backlog for
    ever. Every listening Unix stream socket is served now; the one named "control"
    is the one status names; a TCP socket passed by mistake is closed, not served."""
    base = Path(tempfile.mkdtemp(prefix="capd-act.", dir="/tmp"))
    try:
        socks = []
        for name in ("other.sock", "main.sock"):
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            u.bind(str(base / name))
            u.listen(16)
            socks.append(u)
        t = socket.socket()
        t.bind(("127.0.0.1", 0))
        t.listen(16)
        tport = t.getsockname()[1]
        socks.append(t)
        c, r = start_activated(capd_factory, socks, base / "main.sock", names="other:control:tcp")
        assert json.loads(r.stdout)["control"] == str(base / "main.sock"), r.stdout
        r = sh(CAPCTL, "-s", base / "other.sock", "--json", "status", timeout=5)
        assert json.loads(r.stdout)["pid"] == c.proc.pid
        assert "socket 5 (tcp) passed by systemd is no listening Unix stream socket" in c.log()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", tport), timeout=2).close()
        c.proc.send_signal(signal.SIGTERM)
        assert c.proc.wait(10) == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- privilege drop ---------------------------------------------------------

def caps_of(pid):
    st = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        st[k] = v.split()
    return st


CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_NET_BIND_SERVICE, CAP_NET_RAW, CAP_SYS_RESOURCE = 0, 1, 10, 13, 24


@pytest.fixture
def dropdir():
    """A folder the unprivileged user can reach (pytest's own is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="capd-drop.", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def echo_in_ns(ns, port):
    code = ("import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('127.0.0.1',{port}))\ns.listen(8)\nprint('ready',flush=True)\n"
            "while True:\n c,_=s.accept()\n d=c.recv(65536)\n c.sendall(d)\n c.close()\n")
    p = subprocess.Popen(["ip", "netns", "exec", ns, "/usr/bin/python3", "-c", code],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def ns_roundtrip(ns, port, data=b"through the proxy"):
    code = (f"import socket,sys\ns=socket.create_connection(('127.0.0.1',{port}),timeout=5)\n"
            f"s.sendall({data!r})\nd=s.recv(65536)\nsys.exit(0 if d=={data!r} else 3)\n")
    return sh("ip", "netns", "exec", ns, "/usr/bin/python3", "-c", code, check=False).returncode == 0


@pytest.mark.parametrize("hosts_owned_by_user", [True, False])
def test_privilege_drop_keeps_serving_with_few_capabilities(dropdir, netns, hosts_owned_by_user):
    """Issue 10: started as root with `user = nobody`, capd binds a low port
    from its config, then runs as nobody with only CAP_NET_BIND_SERVICE and
    CAP_NET_RAW (plus CAP_DAC_OVERRIDE and CAP_CHOWN when the hosts file is one
    nobody could not rewrite); it keeps proxying, adds a low-port forwarder and
    a sniffer later, and the spool it writes is nobody's."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    nobody = pwd.getpwnam("nobody")
    hosts = dropdir / ("hosts-dir" if hosts_owned_by_user else "root-only") / "hosts"
    hosts.parent.mkdir()
    hosts.write_text("127.0.0.1 localhost\n")
    if hosts_owned_by_user:
        os.chown(hosts.parent, nobody.pw_uid, nobody.pw_gid)
        os.chown(hosts, nobody.pw_uid, nobody.pw_gid)
    c = Capd(dropdir, "[forward low]\nlisten = 127.0.0.1:81\nto = 127.0.0.1:7001\n",
             f"user = nobody\nhosts_file = {hosts}\n")
    echo = echo_in_ns(netns, 7001)
    c.logf = open(c.log_path, "ab")
    c.proc = subprocess.Popen(["ip", "netns", "exec", netns, str(CAPD), "-c", str(c.conf_path)],
                              stdout=c.logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 10
        while c.ctl("status", check=False).returncode != 0:
            assert time.time() < deadline and c.proc.poll() is None, c.log()
            time.sleep(0.05)
        st = caps_of(c.proc.pid)
        assert st["Uid"] == [str(nobody.pw_uid)] * 4 and st["Gid"] == [str(nobody.pw_gid)] * 4, st
        want = (1 << CAP_NET_BIND_SERVICE) | (1 << CAP_NET_RAW)
        if not hosts_owned_by_user:
            want |= (1 << CAP_CHOWN) | (1 << CAP_DAC_OVERRIDE)
        for k in ("CapPrm", "CapEff", "CapBnd"):
            assert int(st[k][0], 16) == want, (k, st[k], hex(want))
        assert int(st["CapInh"][0], 16) == 0 and int(st["CapAmb"][0], 16) == 0
        assert "running as nobody" in c.log()
        # still serving: the config's low port, a new low port, a new sniffer
        assert ns_roundtrip(netns, 81)
        c.ctl("add", "forward", "--port", "82", "--to", "127.0.0.1:7001")
        assert ns_roundtrip(netns, 82)
        r = c.ctl("add", "sniff", "--interface", "lo", "--filter", "tcp port 82", json_out=True)
        assert r["state"] == "running"
        assert ns_roundtrip(netns, 82)
        deadline = time.time() + 5
        while next(i for i in c.ctl("list", json_out=True) if i["type"] == "sniff")["packets"] < 4:
            assert time.time() < deadline
            time.sleep(0.1)
        c.ctl("capture", "rotate")
        files = c.pcaps()
        assert files and all(f.stat().st_uid == nobody.pw_uid for f in files[1:]), \
            [(f.name, f.stat().st_uid) for f in files]
    finally:
        c.stop()
        echo.kill()
        echo.wait()
    assert c.proc.returncode == 0, c.log()



def test_privilege_drop_follows_a_root_link_and_keeps_rights_for_a_new_hosts_file(dropdir):
    """The spool reached through root's symbolic link (a bigger disk) is given to the
    user like a plain folder, and a hosts file not there yet, in a folder only root
    may write, keeps capd the rights to create it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    nobody = pwd.getpwnam("nobody")
    disk = dropdir / "bigdisk"
    disk.mkdir()
    etc = dropdir / "etc"
    etc.mkdir()
    c = Capd(dropdir, "", f"user = nobody\nhosts_file = {etc}/hosts\n")
    c.state.mkdir()
    (c.state / "spool").symlink_to(disk)
    c.conf_path.write_text(c.conf_path.read_text().replace(f"spool = {c.spool}", f"spool = {c.state}/spool"))
    c.spool = c.state / "spool"
    c.start()
    try:
        assert disk.stat().st_uid == nobody.pw_uid, c.log()
        c.ctl("capture", "rotate")
        st = c.ctl("capture", "status", json_out=True)
        assert Path(st["file"]).stat().st_uid == nobody.pw_uid and "dropping capture" not in c.log(), c.log()
        c.ctl("hosts", "add", "new.test")
        assert "new.test" in (etc / "hosts").read_text()
    finally:
        c.stop()
    assert c.proc.returncode == 0, c.log()


def test_privilege_drop_warns_of_a_config_the_user_cannot_read(dropdir):
    """A config only root may read (0600: it holds auth passwords) starts, but every
    reload after the switch failed with a bare "Permission denied", and systemctl
    reload, which checks the file as root first, said it worked. capd now says at
    start that reloads will fail, and nothing when the user can read the file."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    hosts = dropdir / "h"
    hosts.mkdir()
    os.chown(hosts, pwd.getpwnam("nobody").pw_uid, -1)  # no rights kept for the hosts file
    c = Capd(dropdir, "", f"user = nobody\nhosts_file = {hosts}/hosts\n")
    for mode, warned in ((0o600, True), (0o644, False)):
        os.chmod(c.conf_path, mode)
        c.start()
        try:
            assert "running as nobody" in c.log()
            assert ("cannot be read by nobody" in c.log()) == warned, c.log()
            r = c.ctl("reload", check=False)
            assert (r.returncode != 0) == warned, r.stderr
        finally:
            c.stop()
        assert c.proc.returncode == 0, c.log()
        c.log_path.unlink()


def test_unknown_user_fails_start(capd_factory):
    """`user =` naming nobody on the system stops start-up with the reason."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    c = capd_factory(settings="user = no-such-capd-user\n", start=False)
    c.start(wait=False)
    assert c.proc.wait(10) == 1
    assert "user = no-such-capd-user: no such user" in c.log()


# --- man pages and completion -------------------------------------------------

@pytest.mark.parametrize("page", MANS)
def test_mandoc_lint_clean(page):
    """Issue 10: `mandoc -Tlint` has nothing to say about each page."""
    if shutil.which("mandoc") is None:
        pytest.skip("mandoc is not installed")
    r = sh("mandoc", "-Tlint", ROOT / "man" / page, check=False)
    # Cross references are looked up in /usr/share/man only (mandoc's built-in
    # path): capd's own pages are found there once installed, not from the tree.
    left = [ln for ln in (r.stdout + r.stderr).splitlines()
            if "STYLE: referenced manual not found" not in ln and "outdated mandoc.db lacks" not in ln]
    assert not left, "\n".join(left)


def complete(words, cword=None):
    """What the capctl completion offers for the command line `words`."""
    comp = ROOT / "ctl" / "capctl.bash-completion"
    cword = len(words) - 1 if cword is None else cword
    script = (f"source {comp}\n"
              f"COMP_WORDS=({' '.join(repr(w) for w in words)})\nCOMP_CWORD={cword}\n"
              f"COMP_LINE='{' '.join(words)}'\nCOMP_POINT=${{#COMP_LINE}}\n"
              "_capctl capctl\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    env = dict(os.environ, PATH=f"{BUILD}:{os.environ.get('PATH', '')}", CAPD_SOCKET="/nonexistent/capd.sock")
    r = sh("bash", "-c", script, env=env)
    return [w for w in r.stdout.split("\n") if w]


def test_bash_completion():
    """Issue 10: the completion knows commands, sub-commands, instance types and options."""
    assert "add" in complete(["capctl", "a"])
    assert {"add", "capture", "list", "status", "remove", "sessions", "reload"} <= set(complete(["capctl", ""]))
    assert set(complete(["capctl", "add", ""])) >= {"forward", "socks", "http", "reverse", "dns", "sniff"}
    assert {"--interface", "--filter", "--promisc", "--snaplen"} <= set(complete(["capctl", "add", "sniff", "--"]))
    assert "--to" in complete(["capctl", "add", "forward", "--t"])
    assert set(complete(["capctl", "capture", ""])) >= {"status", "rotate"}
    assert "lo" in complete(["capctl", "add", "sniff", "--interface", ""])
    assert "--json" in complete(["capctl", "list", "--"])


# --- the real thing: systemd as PID 1 of a private namespace ------------------

BOOT_INNER = r"""#!/bin/sh
# In fresh PID, mount, UTS, network and cgroup namespaces: private /run, /tmp
# and /var folders, the test's units and files copied in, then systemd.
set -e
mount -t cgroup2 none /sys/fs/cgroup
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/systemd/system /run/capd-test
cp -a "$1/units/." /run/systemd/system/
cp -a "$1/payload/." /run/capd-test/
# the user and group capd of the package's sysusers.d snippet, in this namespace only
mount --bind "$1/passwd" /etc/passwd
mount --bind "$1/group" /etc/group
for d in /tmp /var/lib /var/log /var/cache /var/tmp; do mount -t tmpfs -o mode=0755 tmpfs "$d"; done
chmod 1777 /tmp /var/tmp
exec /lib/systemd/systemd --system --unit=capd-test.target --log-target=console --log-level=notice
"""

BOOT_TARGET = """[Unit]
Description=capd test boot: the journal and the units under test, nothing else
DefaultDependencies=no
Wants=systemd-journald.socket systemd-journald-dev-log.socket systemd-journald.service
After=systemd-journald.socket systemd-journald.service
"""

# Units a real boot would start that act on the machine; masked in the namespace.
BOOT_MASK = """systemd-sysctl.service systemd-sysusers.service systemd-tmpfiles-setup.service
systemd-tmpfiles-setup-dev.service systemd-tmpfiles-clean.timer systemd-journal-flush.service timers.target
systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service systemd-udevd-control.socket
systemd-udevd-kernel.socket systemd-modules-load.service systemd-random-seed.service systemd-remount-fs.service
systemd-machine-id-commit.service systemd-firstboot.service systemd-hwdb-update.service kmod-static-nodes.service
systemd-binfmt.service proc-sys-fs-binfmt_misc.automount sys-kernel-config.mount sys-kernel-debug.mount
sys-kernel-tracing.mount sys-fs-fuse-connections.mount dev-hugepages.mount dev-mqueue.mount
systemd-update-utmp.service systemd-journal-catalog-update.service ldconfig.service systemd-pstore.service
systemd-logind.service getty.target console-getty.service systemd-networkd.service systemd-resolved.service
systemd-timesyncd.service systemd-update-done.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer
fstrim.timer dpkg-db-backup.timer cron.service dbus.service dbus.socket""".split()


class NsSystemd:
    """systemd booted in its own namespaces, driven with nsenter."""

    def __init__(self, base):
        self.base = base
        self.cg = None
        self.proc = None
        self.pid = None

    def boot(self, timeout=20):
        root = Path("/sys/fs/cgroup/unified")
        if not (root / "cgroup.procs").exists():
            root = Path("/sys/fs/cgroup")
            if not (root / "cgroup.subtree_control").exists():
                pytest.skip("no cgroup v2 hierarchy to give the test's systemd a subtree of its own")
        # a cgroup of its own, which becomes the root of the namespace's cgroup tree
        self.cg = root / f"capd-boot-{os.getpid()}"
        self.cg.mkdir(exist_ok=True)
        (self.base / "inner.sh").write_text(BOOT_INNER)
        os.chmod(self.base / "inner.sh", 0o755)
        self.log = open(self.base / "boot.log", "wb")
        self.proc = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {self.cg}/cgroup.procs && exec unshare --pid --fork --kill-child --mount '
                         f'--mount-proc --uts --net --cgroup {self.base}/inner.sh {self.base}'],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            kids = sh("pgrep", "-P", self.proc.pid, check=False).stdout.split()
            if kids:
                self.pid = int(kids[0])
                r = self.ctl("systemctl", "is-system-running", check=False)
                if r.stdout.strip() in ("running", "degraded"):
                    return
            time.sleep(0.2)
        log = (self.base / "boot.log").read_text(errors="replace")[-2000:]
        self.stop()
        pytest.skip(f"systemd did not boot in a namespace here: {log}")

    def ctl(self, *args, check=True, timeout=30):
        return sh("nsenter", "-t", self.pid, "-p", "-m", "-n", "-u", *args, check=check, timeout=timeout)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            if self.pid:
                subprocess.run(["nsenter", "-t", str(self.pid), "-p", "-m", "systemctl", "poweroff", "-ff"],
                               capture_output=True, timeout=15)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # unshare --kill-child takes systemd with it
                self.proc.wait(10)
        if getattr(self, "log", None):
            self.log.close()
        if self.cg is not None:
            for _ in range(50):
                dirs = sorted((p for p in self.cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
                for d in dirs + [self.cg]:
                    try:
                        d.rmdir()
                    except OSError:
                        pass
                if not self.cg.exists():
                    break
                time.sleep(0.1)
            self.cg = None


def test_systemd_boot_in_namespace(installed, tmp_path):
    """Issue 10, the real thing: systemd as PID 1 of private PID, mount, UTS,
    network and cgroup namespaces; `systemctl start capd`, `capctl status`,
    `systemctl reload capd` (same main PID), `systemctl stop capd`; capd's
    lines in `journalctl -u capd` with their priorities; then capd.socket
    starts capd on the first capctl. The installed units are used as they are,
    with paths pointed at the installed tree copied into the namespace."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not Path("/lib/systemd/systemd").exists():
        pytest.skip("systemd is not installed (apt-get install systemd)")
    dest, prefix, sysconfdir = installed
    base = Path(tempfile.mkdtemp(prefix="capd-boot.", dir="/tmp"))
    units, payload = base / "units", base / "payload"
    units.mkdir()
    (payload / "sbin").mkdir(parents=True)
    (payload / "bin").mkdir()
    shutil.copy2(under(dest, os.path.join(prefix, "sbin/capd")), payload / "sbin/capd")
    shutil.copy2(under(dest, os.path.join(prefix, "bin/capctl")), payload / "bin/capctl")
    # the installed config as it is; user and group capd exist in the namespace only
    shutil.copy2(under(dest, os.path.join(sysconfdir, "capd/capd.conf")), payload / "capd.conf")
    used = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    cid = next(i for i in range(999, 100, -1) if i not in used)
    (base / "passwd").write_text(Path("/etc/passwd").read_text() +
                                 f"capd:x:{cid}:{cid}:capd traffic-capture daemon:/var/lib/capd:/usr/sbin/nologin\n")
    (base / "group").write_text(Path("/etc/group").read_text() + f"capd:x:{cid}:\n")
    for u in ("capd.service", "capd.socket"):
        text = under(dest, os.path.join(prefix, "lib/systemd/system", u)).read_text()
        text = text.replace(os.path.join(prefix, "sbin/capd"), "/run/capd-test/sbin/capd")
        text = text.replace(os.path.join(sysconfdir, "capd/capd.conf"), "/run/capd-test/capd.conf")
        if BUILD_OPTS.get("b_sanitize", "none") != "none" and u == "capd.service":
            # LeakSanitizer cannot stop the world inside the unit's sandbox
            text = text.replace("[Service]\n", "[Service]\nEnvironment=ASAN_OPTIONS=detect_leaks=0\n")
        (units / u).write_text(text)
    (units / "capd-test.target").write_text(BOOT_TARGET)
    for m in BOOT_MASK:
        os.symlink("/dev/null", units / m)
    sd = NsSystemd(base)
    try:
        sd.boot()
        capctl = ["/run/capd-test/bin/capctl", "-s", "/run/capd/capd.sock"]
        sd.ctl("systemctl", "start", "capd.service", timeout=30)
        assert sd.ctl("systemctl", "is-active", "capd.service").stdout.strip() == "active"
        r = sd.ctl(*capctl, "--json", "status")
        st = json.loads(r.stdout)
        pid = sd.ctl("systemctl", "show", "-p", "MainPID", "--value", "capd.service").stdout.strip()
        assert str(st["pid"]) == pid and pid != "0", (st, pid)
        # privilege drop under systemd: user capd, and only the expected capabilities
        status = sd.ctl("cat", f"/proc/{pid}/status").stdout
        fields = {k: v.split() for k, _, v in (ln.partition(":") for ln in status.splitlines())}
        assert fields["Uid"] == [str(cid)] * 4, fields["Uid"]
        want = (1 << CAP_NET_BIND_SERVICE) | (1 << CAP_NET_RAW) | (1 << CAP_CHOWN) | (1 << CAP_DAC_OVERRIDE)
        assert int(fields["CapEff"][0], 16) == want and int(fields["CapBnd"][0], 16) == want, fields
        # the spool writer at nice -5 all the same: CAP_SYS_NICE is not kept, LimitNICE=-5 allows it.
        # Where root may not raise a hard limit (no CAP_SYS_RESOURCE, as in some containers),
        # systemd cannot set that limit and the writer stays at capd's own priority.
        nice = sd.ctl("sh", "-c", f"for t in /proc/{pid}/task/*; do [ \"$(cat $t/comm)\" = capd-spool ] "
                      "&& cut -d' ' -f19 $t/stat; done; true").stdout.split()
        may_raise = int(dict(ln.split(":\t") for ln in Path("/proc/self/status").read_text().splitlines()
                             if ln.startswith("CapBnd"))["CapBnd"], 16) >> CAP_SYS_RESOURCE & 1
        assert nice == (["-5"] if may_raise else ["0"]), nice
        sock = sd.ctl("stat", "-c", "%a %G", "/run/capd/capd.sock").stdout.split()
        assert sock == ["660", "capd"], sock
        sd.ctl(*capctl, "add", "forward", "--port", "4444", "--to", "127.0.0.1:4445")
        sd.ctl("systemctl", "reload", "capd.service", timeout=30)
        assert sd.ctl("systemctl", "show", "-p", "MainPID", "--value", "capd.service").stdout.strip() == pid
        assert sd.ctl("systemctl", "is-active", "capd.service").stdout.strip() == "active"
        assert "forward-4444" in sd.ctl(*capctl, "list").stdout  # a reload keeps capctl's instances
        # a config capd would refuse fails `systemctl reload` itself, and capd runs on as it was
        sd.ctl("cp", "/run/capd-test/capd.conf", "/run/capd-test/capd.conf.good")
        sd.ctl("sh", "-c", "echo '[bogus]' >> /run/capd-test/capd.conf")
        r = sd.ctl("systemctl", "reload", "capd.service", check=False, timeout=30)
        assert r.returncode != 0, r
        assert sd.ctl("systemctl", "show", "-p", "MainPID", "--value", "capd.service").stdout.strip() == pid
        assert sd.ctl("systemctl", "is-active", "capd.service").stdout.strip() == "active"
        sd.ctl("mv", "/run/capd-test/capd.conf.good", "/run/capd-test/capd.conf")
        # the state and the spool stay the user's after a reload, and capture goes on into a new file
        owners = sd.ctl("stat", "-c", "%U", "/var/lib/capd", "/var/lib/capd/spool").stdout.split()
        assert owners == ["capd", "capd"], owners
        sd.ctl(*capctl, "capture", "rotate")
        st = json.loads(sd.ctl(*capctl, "--json", "capture", "status").stdout)
        assert st["file"] and sd.ctl("stat", "-c", "%U", st["file"]).stdout.strip() == "capd", st
        sd.ctl("systemctl", "stop", "capd.service", timeout=30)
        assert sd.ctl("systemctl", "is-active", "capd.service", check=False).stdout.strip() == "inactive"
        # the journal: capd's lines with the priorities capd gave them
        out = sd.ctl("journalctl", "-u", "capd.service", "-o", "json", "--no-pager").stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        mine = [(e.get("PRIORITY"), e.get("MESSAGE")) for e in entries if e.get("_COMM") == "capd"]
        assert any(p == "5" and "ready" in str(m) for p, m in mine), mine
        assert any(p == "6" and "reloaded" in str(m) for p, m in mine), mine
        assert any(p == "5" and "stopping on signal" in str(m) for p, m in mine), mine
        assert not any(str(m).startswith("<") for _, m in mine), mine
        # socket activation: the first capctl starts capd, which takes the socket
        sd.ctl("systemctl", "start", "capd.socket", timeout=30)
        assert sd.ctl("systemctl", "is-active", "capd.service", check=False).stdout.strip() == "inactive"
        st = json.loads(sd.ctl(*capctl, "--json", "status").stdout)
        assert sd.ctl("systemctl", "is-active", "capd.service").stdout.strip() == "active"
        out = sd.ctl("journalctl", "-u", "capd.service", "--no-pager", "-o", "cat").stdout
        assert "socket passed by systemd" in out, out[-2000:]
    except AssertionError as e:
        journal = sd.ctl("journalctl", "--no-pager", "-n", "60", check=False).stdout
        raise AssertionError(f"{e}\n--- journal ---\n{journal}") from None
    finally:
        sd.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(SANITIZED, reason="reads the README and meson, not capd: the normal build's run has it")
def test_readme_service_install_lands_in_usr_after_the_quick_start(tmp_path):
    """README: after the quick start (tools/dev made build/ with meson's default
    prefix, /usr/local), "Installing as a service" ran `meson setup build
    --prefix=/usr`, which on a folder already set up says so, exits 0 and keeps
    /usr/local: the unit then read /usr/local/etc/capd/capd.conf, not the
    /etc/capd/capd.conf the README has the user edit. Its commands now set up
    a folder whose prefix is /usr."""
    block = ROOT.joinpath("README.md").read_text().split("## Installing as a service", 1)[1]
    block = block.split("```sh\n", 1)[1].split("```", 1)[0]
    steps = [c.strip() for c in block.splitlines()[0].split("#")[0].split("&&")]
    setup = [c for c in steps if c.startswith("meson setup ")]
    install = [c for c in steps if c.startswith("meson install -C ")]
    assert len(setup) == 1 and len(install) == 1, steps
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build*"))
    sh("meson", "setup", "build", cwd=src, timeout=300)  # what tools/dev does
    sh(*setup[0].split(), cwd=src, timeout=300)
    folder = install[0].split()[-1]
    opts = json.loads(sh("meson", "introspect", "--buildoptions", src / folder).stdout)
    assert {o["name"]: o["value"] for o in opts}["prefix"] == "/usr"


def test_privilege_drop_keeps_the_spool_group_an_administrator_chose(dropdir):
    """A spool folder given to an analysts' group with the setgid bit (so that they
    may read what capd writes) kept its owner root: capd gives it to its user, and
    used to give it to the user's group too, which locked the analysts out."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    nobody = pwd.getpwnam("nobody")
    analysts = grp.getgrnam("adm").gr_gid
    c = Capd(dropdir, "", "user = nobody\n")
    c.spool.mkdir(parents=True)
    os.chown(c.spool, 0, analysts)
    os.chmod(c.spool, 0o2750)
    c.start()
    try:
        c.ctl("capture", "rotate")
        f = Path(c.ctl("capture", "status", json_out=True)["file"])
        st = c.spool.stat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, analysts), (st.st_uid, st.st_gid)
        assert f.stat().st_gid == analysts and f.stat().st_uid == nobody.pw_uid
    finally:
        c.stop()
    assert c.proc.returncode == 0, c.log()


def test_privilege_drop_removes_the_control_socket_at_stop(dropdir):
    """A capd that gave up root left its control socket behind at a clean stop: the
    socket's folder was root's, so the user could not unlink it. A folder capd makes for
    its socket is now given to its user, as state_dir is, and the stop removes socket and
    lock; in a folder root already had capd says it leaves a stale socket, which the next
    start replaces."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    nobody = pwd.getpwnam("nobody")
    hosts = dropdir / "h"
    hosts.mkdir()
    os.chown(hosts, nobody.pw_uid, -1)  # no CAP_DAC_OVERRIDE kept for /etc/hosts
    settings = f"user = nobody\nhosts_file = {hosts}/hosts\n"
    c = Capd(dropdir, "", settings)
    c.sock = dropdir / "run" / "capd.sock"
    c.write_conf(settings=settings)
    c.start()
    try:
        assert "running as nobody" in c.log() and "keeping CAP_NET_BIND_SERVICE CAP_NET_RAW\n" in c.log()
        assert (dropdir / "run").stat().st_uid == nobody.pw_uid
    finally:
        assert c.stop() == 0, c.log()
    assert sorted(os.listdir(dropdir / "run")) == [], c.log()
    # root's folder, which capd did not make, stays root's: the socket stays, and says so
    (dropdir / "root").mkdir(mode=0o755)
    c.sock = dropdir / "root" / "capd.sock"
    c.write_conf(settings=settings)
    for _ in range(2):  # the second start replaces the stale socket
        c.start()
        assert c.ctl("status").returncode == 0
        assert c.stop() == 0, c.log()
        assert (dropdir / "root").stat().st_uid == 0 and c.sock.exists()
    assert f"cannot remove {c.sock}: Permission denied (a stale socket: the next start replaces it)" in c.log()


def test_bash_completion_of_timeout():
    """--timeout SECONDS is a global option: the completion offers it, and its value is
    not taken for the command (`capctl --timeout 5 a<TAB>` offered nothing)."""
    assert "--timeout" in complete(["capctl", "--t"])
    assert "add" in complete(["capctl", "--timeout", "5", "a"])
    assert complete(["capctl", "--timeout", ""]) == []


def test_readme_first_capture_runs_on_the_dev_config(tmp_path, netns):
    """README's "A first capture", typed into a second shell while `tools/dev run`
    runs capd on conf/capd-dev.conf, has every command succeed and ends with the
    request in the file. It used to add a forwarder on 4444, the port the dev
    config's own forwarder holds: "capctl: port 4444 is in use". Run in a
    namespace of its own, since the README's ports are fixed."""
    text = ROOT.joinpath("README.md").read_text().split("## A first capture", 1)[1]
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    (tmp_path / "conf").mkdir()
    shutil.copy(ROOT / "conf" / "capd-dev.conf", tmp_path / "conf")
    (tmp_path / "build").mkdir()
    os.symlink(CAPCTL, tmp_path / "build" / "capctl")
    log = open(tmp_path / "capd.log", "wb")
    capd = subprocess.Popen(["ip", "netns", "exec", netns, str(CAPD), "-c", str(tmp_path / "conf" / "capd-dev.conf")],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        sock = tmp_path / "build" / "dev" / "capd.sock"
        deadline = time.time() + 10
        while not sock.exists() and time.time() < deadline and capd.poll() is None:
            time.sleep(0.05)
        assert sock.exists(), (tmp_path / "capd.log").read_text()
        lines = []
        for line in block.splitlines():
            lines.append(line)
            if "http.server 8000" in line:  # a person types slower than the server starts
                lines.append("for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null && break; "
                             "sleep 0.1; done")
        script = "set -e\ntrap 'kill $(jobs -p) 2>/dev/null' EXIT\n" + "\n".join(lines) + "\n"
        r = subprocess.run(["ip", "netns", "exec", netns, "bash", "-c", script], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "capctl:" not in r.stderr, r.stderr
        assert "GET / HTTP/1.1" in r.stdout and "Host: 127.0.0.1:4445" in r.stdout, r.stdout
    finally:
        capd.terminate()
        assert capd.wait(timeout=20) == 0, (tmp_path / "capd.log").read_text()
        log.close()


def test_capd_long_help_and_version():
    """An admin's first two commands: `capd --help` said "invalid option -- '-'" and
    exited 2, and `capd --version` did the same, while capctl takes both. Now --help
    prints the usage on standard output and exits 0 (as -h), --version the version;
    a wrong option still prints the usage on standard error and exits 2."""
    r = subprocess.run([str(CAPD), "--help"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and r.stderr == "", r
    assert r.stdout.startswith("usage: capd ") and "--config FILE" in r.stdout, r.stdout
    assert subprocess.run([str(CAPD), "-h"], capture_output=True, text=True, timeout=10).stdout == r.stdout
    v = subprocess.run([str(CAPD), "--version"], capture_output=True, text=True, timeout=10)
    assert v.returncode == 0 and re.fullmatch(r"capd \S+\n", v.stdout), v
    bad = subprocess.run([str(CAPD), "--bogus"], capture_output=True, text=True, timeout=10)
    assert bad.returncode == 2 and bad.stdout == "" and "usage: capd" in bad.stderr, bad


def test_capd_long_test_option(tmp_path):
    """--test and --config are -t and -c: the verdict is the same."""
    conf = tmp_path / "c.conf"
    conf.write_text(f"[capd]\nspool = {tmp_path}/sp\n[socks s]\nlisten = 0\n")
    short = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=10)
    long = subprocess.run([str(CAPD), "--test", "--config", str(conf)], capture_output=True, text=True,
                          timeout=10)
    assert short.returncode == long.returncode == 1, (short, long)
    assert long.stderr == short.stderr and ":4: bad port" in long.stderr, long.stderr
