"""Shared fixtures for capd's integration tests: a real capd per test with a
private folder, config, control socket and spool; capctl; local servers;
tshark helpers. Everything listens on loopback."""

import collections
import itertools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("CAPD_BUILD", ROOT / "build"))
CAPD = Path(os.environ.get("CAPD_BIN", BUILD / "capd"))
CAPCTL = Path(os.environ.get("CAPCTL_BIN", BUILD / "capctl"))
# a sanitizer build (tools/dev test --sanitize or --tsan): slower, and its RSS means nothing
SANITIZED = bool(os.environ.get("ASAN_OPTIONS") or os.environ.get("TSAN_OPTIONS"))


_given_ports = collections.deque(maxlen=512)


def free_port(kind=socket.SOCK_STREAM, host="127.0.0.1"):
    """A port the kernel says is free now on host (TCP by default), and not one this
    process was given lately: a test often takes two before binding either, and the
    kernel, whose ports are free until bound, can hand out one twice in a row (a
    forward's --port was "in use" by the instance on the port taken just before)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(fam, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _given_ports:
            break
    _given_ports.append(port)
    return port


def free_port_tcp_udp(host="127.0.0.1"):
    """A port free for both TCP and UDP now (forward --udp and dns bind both)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        port = free_port(host=host)
        try:
            with socket.socket(fam, socket.SOCK_DGRAM) as u:
                u.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free for both TCP and UDP")


def wait_port(port, host="127.0.0.1", timeout=10.0):
    deadline = time.time() + timeout
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    while time.time() < deadline:
        try:
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect((host, port))
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


def exchange(port, payload, timeout=10.0, host="127.0.0.1"):
    """Sends payload, half-closes, and returns everything read until the other side closes."""
    with socket.create_connection((host, port), timeout=timeout) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            d = c.recv(65536)
            if not d:
                return got
            got += d


class Capd:
    """One capd process. `conf` is the text after the [capd] section."""

    def __init__(self, tmp: Path, conf: str = "", settings: str = ""):
        self.dir = tmp
        self.sock = tmp / "capd.sock"
        self.spool = tmp / "spool"
        self.state = tmp / "state"
        self.conf_path = tmp / "capd.conf"
        self.log_path = tmp / "capd.log"
        self.write_conf(conf, settings)
        self.proc = None

    def write_conf(self, conf: str = "", settings: str = ""):
        self.conf_path.write_text(
            "[capd]\n"
            f"control = {self.sock}\n"
            f"spool = {self.spool}\n"
            f"state_dir = {self.state}\n"
            "log_level = debug\n"
            "flush_interval = 100ms\n"
            f"{settings}\n{conf}\n"
        )

    def start(self, wait=True, extra_env=None, args=()):
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("LISTEN_FDS", None)
        env.update(extra_env or {})
        self.logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(CAPD), "-c", str(self.conf_path), *args],
                                     stdout=self.logf, stderr=subprocess.STDOUT, env=env)
        if wait:
            deadline = time.time() + 10
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"capd exited {self.proc.returncode}:\n{self.log()}")
                if self.sock.exists():
                    # the socket exists before the instances are up: ready means
                    # the loop answers, which it does only after start-up is done
                    try:
                        if "result" in self.rpc("daemon.status", timeout=5):
                            return self
                    except (OSError, ValueError, IndexError):
                        pass
                time.sleep(0.02)
            raise TimeoutError("capd did not open its control socket:\n" + self.log())
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ctl(self, *args, check=True, json_out=False, timeout=30, input=None):
        """Runs capctl; returns CompletedProcess (or parsed JSON with json_out)."""
        cmd = [str(CAPCTL), "-s", str(self.sock)]
        if json_out:
            cmd.append("--json")
        cmd += [str(a) for a in args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"capctl {' '.join(map(str, args))} -> {r.returncode}\n{r.stdout}\n{r.stderr}\n--- capd log ---\n{self.log()[-4000:]}")
        if json_out and r.returncode == 0:
            return json.loads(r.stdout)
        return r

    def rpc(self, method, params=None, timeout=10):
        """One raw JSON-RPC call; returns the whole reply object."""
        return self.rpc_many((method, params), timeout=timeout)[0]

    def rpc_many(self, *requests, timeout=10):
        """(method, params) requests with ids 1, 2 ... sent in one write on one connection;
        returns the reply objects in the order they came."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.sock))
            s.sendall(b"".join((json.dumps({"jsonrpc": "2.0", "id": i, "method": m, "params": p or {}})
                                + "\n").encode() for i, (m, p) in enumerate(requests, 1)))
            data = b""
            while data.count(b"\n") < len(requests):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return [json.loads(x) for x in data.splitlines()]

    def session(self, sid):
        for s in self.ctl("sessions", json_out=True):
            if s["id"] == sid:
                return s
        return None

    def wait_sessions(self, pred, timeout=10.0):
        """Waits until pred(list of sessions) is true; returns the list."""
        deadline = time.time() + timeout
        while True:
            ss = self.ctl("sessions", json_out=True)
            if pred(ss):
                return ss
            if time.time() > deadline:
                raise TimeoutError(f"sessions never matched: {ss}")
            time.sleep(0.05)

    def pcaps(self):
        return sorted(self.spool.glob("*.pcapng"))

    def flush(self):
        """Returns once everything capd queued to the spool before the call is in the
        files (capture.sync): all of a session shown closed before it, say. Returns the
        reply; on a disk that fails (the tests that fill one) that is the error saying so,
        which is no failure of the wait."""
        r = self.rpc("capture.sync", timeout=30)
        if "result" not in r and "cannot write the capture" not in r.get("error", {}).get("message", ""):
            raise AssertionError(f"capture.sync: {r}\n--- capd log ---\n{self.log()[-4000:]}")
        return r

    def flush_until(self, done, timeout=10.0):
        """flush() until done() returns something true, which it returns (the last try's
        answer at the timeout): for what reaches the spool a moment after a client saw it
        (capd captures a datagram once it has sent it)."""
        deadline = time.time() + timeout
        while True:
            self.flush()
            r = done()
            if r or time.time() > deadline:
                return r
            time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "logf", None):
            self.logf.close()
            self.logf = None
        return self.proc.returncode if self.proc else None


@pytest.fixture
def capd_factory(tmp_path):
    made = []

    def make(conf="", settings="", start=True, **kw):
        d = tmp_path / f"capd{len(made)}"
        d.mkdir()
        c = Capd(d, conf, settings)
        made.append(c)
        if start:
            c.start(**kw)
        return c

    yield make
    for c in made:
        rc = c.stop()
        # a clean stop is part of every test: capd must exit 0 on SIGTERM
        if rc not in (0, None, -9):
            log = c.log()
            if "AddressSanitizer" in log or "ThreadSanitizer" in log or "runtime error" in log:
                pytest.fail(f"sanitizer report:\n{log[-6000:]}")
            # a crash the test did not look for (an abort, a fault) fails it too;
            # a refused config exits 1 and a test's own kill -9 is -9
            if rc < 0:
                pytest.fail(f"capd died of signal {-rc}:\n{log[-6000:]}")


@pytest.fixture
def capd(capd_factory):
    return capd_factory()


class Proc:
    """A helper process stopped at teardown."""

    def __init__(self, args, **kw):
        self.p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()


@pytest.fixture(scope="module")
def shared_http_server(tmp_path_factory):
    """One python http.server a test module (starting one took a few tenths of a second a
    test): (Proc, port, folder). Its tests write files into the folder and fetch them,
    one test at a time."""
    www = tmp_path_factory.mktemp("www")
    (www / "index.html").write_text("hello from the origin\n")
    port = free_port()
    p = Proc(["/usr/bin/python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=www)
    wait_port(port)
    yield p, port, www
    p.stop()


@pytest.fixture
def http_server(shared_http_server):
    """python http.server on a free port serving a folder with index.html; yields (port, folder)."""
    p, port, www = shared_http_server
    assert p.p.poll() is None, "the module's http.server has exited"
    return port, www


def stop_and_close(sock, thread):
    """Closes a socket that thread blocks on (accept, recvfrom) once the thread has ended.
    shutdown(2) wakes the blocked call; closing first would leave the thread in, or on its
    way into, a call on a number the next socket gets (seen once: a test's HTTP origin had
    its request echoed back by a closed EchoServer's thread, and the test then hung)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # UDP: ENOTCONN, but the shutdown is made and the reader woken
    thread.join(5)
    sock.close()


def apart(fn, *args):
    """Runs fn(*args) on a daemon thread of its own (one connection of a test server)."""
    threading.Thread(target=fn, args=args, daemon=True).start()


class Listener:
    """A test's TCP server (or Unix-domain, given a path): its accept loop runs on a thread
    and hands each connection to handle(conn, peer), on that thread (apart() serves
    connections side by side). A subclass sets its own attributes before calling this
    __init__, which starts the loop."""

    def __init__(self, host="127.0.0.1", backlog=64, port=0, path=None):
        if path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(str(path) if path is not None else (host, port))
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(backlog)
        self.port = None if path is not None else self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.thread.start()

    def accept_loop(self):
        while True:
            try:
                c, peer = self.sock.accept()
            except OSError:
                return  # shut down or closed
            self.handle(c, peer)

    def handle(self, c, peer):
        raise NotImplementedError

    def close(self):
        stop_and_close(self.sock, self.thread)


class TlsServer(Listener):
    """A test's TLS server (Python ssl, the given certificate): each connection on a
    thread of its own, its TLS socket handed to talk(t); a failed handshake or I/O
    (timeout: self.timeout) just closes it. A subclass sets its own attributes before
    calling this __init__."""

    timeout = 10

    def __init__(self, cert, key):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        super().__init__()

    def handle(self, c, peer):
        apart(self.serve, c)

    def serve(self, c):
        c.settimeout(self.timeout)
        try:
            with self.ctx.wrap_socket(c, server_side=True) as t:
                self.talk(t)
        except (OSError, ssl.SSLError):
            c.close()

    def talk(self, t):
        raise NotImplementedError


class EchoServer(Listener):
    """A TCP echo server: echoes everything, half-closes after EOF."""

    def __init__(self, host="127.0.0.1"):
        super().__init__(host, backlog=1024)

    def handle(self, c, peer):
        apart(self.serve, c)

    @staticmethod
    def serve(c):
        try:
            while True:
                d = c.recv(262144)
                if not d:
                    break
                c.sendall(d)
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            c.close()


class UdpServer:
    """A test's UDP server: a thread answers each datagram with reply(data), or not at
    all when that returns None."""

    def __init__(self, reply, host="127.0.0.1", port=0):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.thread = threading.Thread(target=self.recv_loop, daemon=True)
        self.thread.start()

    def recv_loop(self):
        while True:
            try:
                d, a = self.sock.recvfrom(65536)
                if a is None:
                    return  # shut down
                w = self.reply(d)
                if w is not None:
                    self.answer(w, a)
            except OSError:
                return

    def answer(self, w, a):
        self.sock.sendto(w, a)

    def close(self):
        stop_and_close(self.sock, self.thread)


class UdpEcho(UdpServer):
    """A UDP echo server; replies carry prefix before the datagram."""

    def __init__(self, host="127.0.0.1", prefix=b"echo:"):
        super().__init__(lambda d: prefix + d, host)


@pytest.fixture
def echo_server():
    e = EchoServer()
    yield e
    e.close()


_tshark_off = None


def _tshark_port_claimers():
    """--disable-protocol for each dissector tshark gives a TCP or UDP port in the
    ephemeral range: a test's ports are ephemeral (free_port, a client's), and one
    such port decides how tshark reads the whole stream before its heuristics look
    (a TLS client leg from port 57000 read as IRC, with no tls.* field at all)."""
    global _tshark_off
    if _tshark_off is None:
        try:
            low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            low = 32768
        r = subprocess.run(["tshark", "-G", "decodes"], capture_output=True, text=True, timeout=60)
        names = set()
        for line in r.stdout.splitlines():
            f = line.split("\t")
            if len(f) == 3 and f[0] in ("tcp.port", "udp.port") and f[1].isdigit() and int(f[1]) >= low:
                names.add(f[2])
        _tshark_off = [a for n in sorted(names) for a in ("--disable-protocol", n)]
    return _tshark_off


def tshark(*args, timeout=120):
    r = subprocess.run(["tshark", *_tshark_port_claimers(), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    return r


def as_http(port):
    """tshark arguments: TCP to and from port is HTTP, whatever the other port says (an
    ephemeral client port can be another protocol's: ADS is 48898)."""
    return ("-d", f"tcp.port=={port},http")


def follow_tcp(pcap, stream=0):
    """Bytes each way of TCP stream N in pcap, from tshark's follow,tcp,raw.
    Returns (client_to_server, server_to_client)."""
    return follow_tcp_many(pcap, [stream])[stream]


def follow_tcp_many(pcap, streams):
    """follow_tcp of several streams in one tshark pass (a pass over a large
    capture takes seconds): {stream: (client_to_server, server_to_client)}."""
    args = []
    for st in streams:
        args += ["-z", f"follow,tcp,raw,{st}"]
    r = tshark("-r", pcap, "-q", *args)
    assert r.returncode == 0, r.stderr
    got, cur, started = {}, None, False
    for line in r.stdout.splitlines():
        if line.startswith("Filter: tcp.stream eq "):
            cur = got.setdefault(int(line.split()[-1]), (bytearray(), bytearray()))
            started = False
        elif line.startswith("Node 1:"):
            started = True
        elif line.startswith("==="):
            started = False
        elif started and line.strip():
            cur[1 if line.startswith("\t") else 0].extend(bytes.fromhex(line.strip()))
    return {st: (bytes(got[st][0]), bytes(got[st][1])) if st in got else (b"", b"") for st in streams}


def tcp_streams_of(pcap):
    """{capd session id: its tcp.stream index} of every TCP stream in pcap, in one pass."""
    r = tshark("-r", pcap, "-Y", "tcp.flags.syn == 1 && tcp.flags.ack == 0", "-T", "fields", "-E", "separator=/t",
               "-e", "tcp.stream", "-e", "frame.comment")
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        st, _, comment = line.partition("\t")
        m = re.search(r"capd session (\d+)", comment)
        if m:
            out.setdefault(int(m.group(1)), int(st))
    return out


def tcp_stream_of(pcap, session_id):
    """The tcp.stream index of the packets whose comment names capd session N."""
    # "capd session 1" alone would also match sessions 10-19
    r = tshark("-r", pcap, "-Y", f'frame.comment matches "capd session {session_id}([^0-9]|$)"',
               "-T", "fields", "-e", "tcp.stream")
    vals = [v for v in r.stdout.split() if v]
    return int(vals[0]) if vals else None


def follow_session(pcap, session_id, client=None):
    """tcp_stream_of and follow_tcp of capd session N in one tshark pass (each pass costs
    a second on a loaded machine): (stream or None, client_to_server, server_to_client),
    the payloads of the stream's packets in capture order (capd writes them in order,
    with no retransmissions). client_to_server is what the session's client sent:
    client is its address as capctl shows it ("127.0.0.1:40000", "[::1]:40000"), or its
    session record; without it, the sender of the session's SYN in this file (the peer,
    not the client, of a SOCKS BIND, which the peer opened). A file
    without that SYN (the session began in an earlier one, before a rotation) needs
    client: its first packet may come from either side."""
    if isinstance(client, dict):
        client = client["client"]
    r = tshark("-r", pcap, "-Y", "tcp", "-T", "fields", "-E", "separator=/t", "-e", "tcp.stream",
               "-e", "tcp.srcport", "-e", "tcp.flags.syn", "-e", "tcp.flags.ack", "-e", "tcp.payload",
               "-e", "frame.comment", "-e", "ip.src", "-e", "ipv6.src")
    assert r.returncode == 0, r.stderr
    want = re.compile(rf"capd session {session_id}\b")
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    stream = None
    for st, _, syn, ack, _, comment, _, _ in rows:
        if syn in ("1", "True") and ack in ("0", "False") and want.search(comment):
            stream = st
            break
    if stream is None:  # no SYN: the first packet that names the session
        stream = next((row[0] for row in rows if want.search(row[5])), None)
    if stream is None:
        return None, b"", b""
    mine = [row for row in rows if row[0] == stream]
    if client is None:
        syn = next((row for row in mine if row[2] in ("1", "True") and row[3] in ("0", "False")), None)
        assert syn is not None, (f"{pcap} holds session {session_id} without its SYN: "
                                 "pass its client address to tell up from down")
        client = f"[{syn[7]}]:{syn[1]}" if syn[7] else f"{syn[6]}:{syn[1]}"
    up, down = bytearray(), bytearray()
    for _, sport, _, _, payload, _, src4, src6 in mine:
        if payload:
            sender = f"[{src6}]:{sport}" if src6 else f"{src4}:{sport}"
            (up if sender == client else down).extend(bytes.fromhex(payload.replace(":", "")))
    return int(stream), bytes(up), bytes(down)


def check_pcap_clean(pcap):
    """pcap keeps every rule of the pcapng format (pcapng_strict), and has no bad
    checksums, malformed packets or expert errors."""
    from pcapng_strict import check
    check(pcap)
    # payloads are decoded as plain data: random test bytes must not be taken
    # for some protocol by a heuristic dissector and then called malformed
    r = tshark("-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE",
               "-o", "udp.check_checksum:TRUE", "-d", "tcp.port==1-65535,data",
               "-d", "udp.port==1-65535,data", "-r", pcap, "-Y",
               "tcp.checksum.status==0 || ip.checksum.status==0 || udp.checksum.status==0 || "
               "_ws.malformed || _ws.expert.severity>=error")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", r.stdout[:3000]


# ---- network namespaces: capd and its peers alone on a loopback of their own ----

_seq = itertools.count()


def next_seq():
    """A number unique in this process, for namespace and link names."""
    return next(_seq)


def sh(*args, check=True, timeout=60, **kw):
    """Runs a command, text output captured; a failure raises with both outputs."""
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def sigstop(proc, timeout=5.0):
    """Stops proc (SIGSTOP) and returns once every thread of it is stopped: kill(2)
    returns before the stop takes hold, and a thread still running may read what a
    test sends next "while capd is held up"."""
    import signal
    proc.send_signal(signal.SIGSTOP)
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = []
        for t in os.listdir(f"/proc/{proc.pid}/task"):
            try:
                with open(f"/proc/{proc.pid}/task/{t}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except OSError:
                pass
        if states and all(st in ("T", "t") for st in states):
            return
        time.sleep(0.005)


def syn_hole():
    """A listener (backlog 0, never accepting) whose accept queue is full: a new
    connect to it hangs in SYN_SENT until the system gives up (about two minutes).
    Returns (listener, [held sockets]); the caller closes them."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    held = []
    for _ in range(8):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(ls.getsockname())
        held.append(c)
        time.sleep(0.3)
        try:
            c.getpeername()
        except OSError:
            return ls, held  # this one's SYN went unanswered: the queue is full
    raise AssertionError("the listener's accept queue never filled")


@pytest.fixture
def netns():
    """One namespace with only lo up, for loopback captures that see the test's traffic alone."""
    ns = f"capsnL{os.getpid() % 100000}{next_seq()}"
    sh("ip", "netns", "add", ns)
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    yield ns
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def ns_etc(netns):
    """/etc/netns/NS: `ip netns exec` mounts its files over /etc's for what runs in NS
    (resolv.conf, hosts, passwd, group)."""
    d = f"/etc/netns/{netns}"
    os.makedirs(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# An echo server on ADDR PORT (argv), one connection at a time; "ready" once it listens. EchoServer
# as a program of its own, for namespaces the test process is not in.
ECHO_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.shutdown(socket.SHUT_WR)
    c.close()
"""


@pytest.fixture
def ns_python():
    """start(ns, script, *args): a Python script run in a namespace, ready once it prints
    "ready"; every one is killed at teardown."""
    procs = []

    def start(ns, script, *args):
        p = subprocess.Popen(["ip", "netns", "exec", ns, "/usr/bin/python3", "-c", script, *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "ready"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


class NsCapd(Capd):
    """A capd running inside a network namespace."""

    def __init__(self, tmp, ns, conf="", settings="", wrap=()):
        super().__init__(tmp, conf, settings)
        self.ns = ns
        self.wrap = list(wrap)

    def start(self, wait=True, extra_env=None, args=()):
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("LISTEN_FDS", None)
        self.logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *self.wrap, str(CAPD),
                                      "-c", str(self.conf_path), *args],
                                     stdout=self.logf, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 10
        while wait and time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"capd exited {self.proc.returncode}:\n{self.log()}")
            # an answer means the loop runs, so the config's instances are started
            if self.sock.exists() and self.ctl("status", check=False).returncode == 0:
                return self
            time.sleep(0.05)
        if wait:
            raise TimeoutError("capd did not open its control socket:\n" + self.log())
        return self


@pytest.fixture
def ns_capd(tmp_path):
    made = []

    def make(ns, conf="", settings="", wrap=()):
        d = tmp_path / f"capd{len(made)}"
        d.mkdir()
        c = NsCapd(d, ns, conf, settings, wrap)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        assert c.stop() in (0, None), c.log()[-3000:]


def refused_flow(capd, s, nends=0, port=None):
    """The capture of session s (its record), which capd refused before any upstream
    (the test_http, test_reverse and test_socks tests of it): the TCP conversation
    between the client and the address it connected to. Flushes first. Returns a dict:
    up, down (Follow TCP Stream's bytes each way, tshark's follow,tcp,raw), client
    and server ("ip:port" of the SYN's sender and receiver), and ends, the closing
    flags in order as (side, "FIN" or "RST"), side "c" or "s", once nends of them are
    there (a lingering client's close is captured when capd reads it) or 10 s passed.
    port: the instance's, for a session that has a flow to its upstream besides."""
    deadline = time.time() + 10
    while True:
        got = _refused_flow(capd, s, port)
        if len(got["ends"]) >= nends or time.time() > deadline:
            return got
        time.sleep(0.1)


def _refused_flow(capd, s, port):
    capd.flush()
    pcap = capd.pcaps()[-1]
    also = f" && tcp.port == {port}" if port else ""
    r = tshark("-r", pcap, "-Y", f'frame.comment matches "^capd session {s["id"]}( |$)"{also}', "-T", "fields",
               "-E", "separator=/t", "-e", "tcp.stream", "-e", "ip.src", "-e", "ipv6.src", "-e", "tcp.srcport",
               "-e", "ip.dst", "-e", "ipv6.dst", "-e", "tcp.dstport", "-e", "tcp.flags.syn", "-e", "tcp.flags.ack",
               "-e", "tcp.flags.fin", "-e", "tcp.flags.reset")
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert rows, f"no packets of session {s['id']} in {pcap}"
    assert len({row[0] for row in rows}) == 1, rows  # one TCP stream

    def ep(ip4, ip6, port):
        return f"[{ip6}]:{port}" if ip6 else f"{ip4}:{port}"

    syn = rows[0]
    assert syn[7] in ("1", "True") and syn[8] in ("0", "False"), syn
    client, server = ep(syn[1], syn[2], syn[3]), ep(syn[4], syn[5], syn[6])
    ends = []
    for row in rows:
        side = "c" if ep(row[1], row[2], row[3]) == client else "s"
        if row[9] in ("1", "True"):
            ends.append((side, "FIN"))
        if row[10] in ("1", "True"):
            ends.append((side, "RST"))
    up, down = follow_tcp(pcap, int(syn[0]))
    return {"up": up, "down": down, "client": client, "server": server, "ends": ends, "pcap": pcap}
