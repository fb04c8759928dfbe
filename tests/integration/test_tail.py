"""Issue 8: watching live: capctl sessions, tail session N, tail events, kill."""

import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import CAPCTL, SANITIZED, free_port, tshark


def tail_proc(capd, *args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.Popen([str(CAPCTL), "-s", str(capd.sock), "tail", *map(str, args)],
                            stdout=stdout, stderr=stderr, env=e)


class Reader:
    """Collects a pipe in a thread so a test can wait for some output."""

    def __init__(self, f):
        self.f = f
        self.data = bytearray()
        self.lock = threading.Lock()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while True:
            d = self.f.read1(1 << 20) if hasattr(self.f, "read1") else self.f.read(65536)
            if not d:
                return
            with self.lock:
                self.data += d

    def wait(self, pred, timeout=10.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if pred(bytes(self.data)):
                    return bytes(self.data)
            time.sleep(0.02)
        raise TimeoutError(f"output never matched: {bytes(self.data)[-2000:]!r}")

    def get(self):
        self.t.join(30)
        return bytes(self.data)


def calls(capd, method):
    """How many times capd has dispatched method (its debug log names each call)."""
    return capd.log().count(f" calls {method}")


def wait_calls(capd, method, n, timeout=10.0):
    """Waits until capd has handled method n times, then a moment for the reply to go out."""
    deadline = time.time() + timeout
    while calls(capd, method) < n:
        if time.time() > deadline:
            raise TimeoutError(f"capd never handled {method} #{n}")
        time.sleep(0.02)
    time.sleep(0.05)


def forward(capd, to_port, name=None):
    port = free_port()
    args = ["add", "forward", "--port", port, "--to", f"127.0.0.1:{to_port}"]
    if name:
        args += ["--name", name]
    capd.ctl(*args)
    return port


def open_session(capd, port):
    """Connects through the forward; returns (socket, session id)."""
    before = {s["id"] for s in capd.ctl("sessions", json_out=True)}
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    ss = capd.wait_sessions(lambda ss: any(x["id"] not in before and x["state"] == "open" for x in ss))
    sid = [x["id"] for x in ss if x["id"] not in before][0]
    return s, sid


def drain(sock, into):
    """Reads sock until EOF in a thread (the echo server's replies)."""
    def run():
        try:
            while True:
                d = sock.recv(1 << 20)
                if not d:
                    return
                into.extend(d)
        except OSError:
            return
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def hexdump(path, skip, length):
    return subprocess.run(["hexdump", "-C", "-s", str(skip), "-n", str(length), str(path)],
                          capture_output=True, text=True, check=True).stdout


HEADER = re.compile(r"^\[(\S+) (c2s|s2c) (\d+) bytes\]$")


def test_raw_c2s_byte_exact(capd, echo_server):
    port = forward(capd, echo_server.port)
    s, sid = open_session(capd, port)
    echoed = bytearray()
    t = drain(s, echoed)
    payload = os.urandom(1 << 20)
    s.sendall(payload[:1000])
    p = tail_proc(capd, "session", sid, "--raw", "--dir", "c2s")
    out = Reader(p.stdout)
    out.wait(lambda d: len(d) >= 1000)  # the backlog: the subscription is live
    s.sendall(payload[1000:])
    s.shutdown(socket.SHUT_WR)
    t.join(30)
    s.close()
    assert p.wait(30) == 0, p.stderr.read()
    assert out.get() == payload
    assert bytes(echoed) == payload
    # s2c is the same stream back from the echo server
    assert p.stderr.read() == b""


def test_hex_matches_hexdump(capd, echo_server, tmp_path):
    port = forward(capd, echo_server.port)
    s, sid = open_session(capd, port)
    echoed = bytearray()
    t = drain(s, echoed)
    # runs of identical lines ('*'), text, binary and a partial last line
    payload = b"A" * 100 + os.urandom(333) + b"hello world\n" * 20 + bytes(range(256)) + b"\0" * 77
    f = tmp_path / "payload.bin"
    f.write_bytes(payload)
    p = tail_proc(capd, "session", sid, "--hex", "--dir", "c2s", env={"NO_COLOR": ""})
    out = Reader(p.stdout)
    out.wait(lambda d: d.startswith(b"[session"))
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    t.join(30)
    s.close()
    assert p.wait(30) == 0
    text = out.get().decode()
    assert "\033" not in text  # not a tty: no colour
    lines = text.splitlines()
    assert lines[0].startswith(f"[session {sid} ")
    assert lines[-1].startswith(f"[session {sid} ended: closed")
    # each chunk is exactly `hexdump -C` of its stretch of the c2s stream
    chunks, off, i = 0, 0, 1
    body = lines[1:-1]
    while i - 1 < len(body):
        m = HEADER.match(body[i - 1])
        assert m, body[i - 1]
        assert m.group(2) == "c2s"
        n = int(m.group(3))
        want = hexdump(f, off, n).splitlines()
        got = body[i:i + len(want)]
        assert got == want
        i += len(want) + 1
        off += n
        chunks += 1
    assert off == len(payload)
    if chunks == 1:
        full = subprocess.run(["hexdump", "-C", str(f)], capture_output=True, text=True).stdout
        assert "\n".join(body[1:]) + "\n" == full


def test_tail_midsession_backlog_then_live(capd, echo_server):
    port = forward(capd, echo_server.port)
    s, sid = open_session(capd, port)
    s.settimeout(10)
    s.sendall(b"hello\r\n")
    assert s.recv(100) == b"hello\r\n"
    s.sendall(b"bin\x00\x01\x02\n")
    assert s.recv(100) == b"bin\x00\x01\x02\n"
    p = tail_proc(capd, "session", sid, "--text")
    out = Reader(p.stdout)
    out.wait(lambda d: d.count(b"bin") >= 2)  # backlog of both directions
    s.sendall(b"live line\n")
    assert s.recv(100) == b"live line\n"
    out.wait(lambda d: d.count(b"live line") >= 2)
    assert p.poll() is None  # follows until the session ends
    s.close()
    assert p.wait(15) == 0
    lines = out.get().decode().splitlines()
    heads = [HEADER.match(x) for x in lines]
    # the conversation in the order it went, each direction under its header
    texts = [(h.group(2), lines[i + 1]) for i, h in enumerate(heads) if h]
    assert texts == [("c2s", "hello"), ("s2c", "hello"), ("c2s", "bin\\0\\x01\\x02"),
                     ("s2c", "bin\\0\\x01\\x02"), ("c2s", "live line"), ("s2c", "live line")]
    assert lines[-1].startswith(f"[session {sid} ended: ")


def test_half_closed_tail_is_closed_when_its_session_ends(capd, echo_server):
    """A raw client that sends session.tail and half-closes (echo ... | nc -U) gets
    the stream, then the close once session.end went out; capd kept such a
    connection open for ever, as if the ended tail still held it."""
    port = forward(capd, echo_server.port)
    s, sid = open_session(capd, port)
    s.sendall(b"ping\n")
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(str(capd.sock))
        c.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "session.tail",
                              "params": {"id": sid}}).encode() + b"\n")
        c.shutdown(socket.SHUT_WR)
        wait_calls(capd, "session.tail", 1)
        s.close()
        data = b""
        while True:
            d = c.recv(65536)  # a timeout here is the bug
            if not d:
                break
            data += d
    msgs = [json.loads(x) for x in data.splitlines()]
    assert msgs[0]["id"] == 1 and msgs[0]["result"]["id"] == sid
    assert msgs[-1]["method"] == "session.end" and msgs[-1]["params"]["id"] == sid


def test_backlog_keeps_last_bytes(capd_factory, echo_server):
    capd = capd_factory(settings="tail_backlog = 4K")
    port = forward(capd, echo_server.port)
    s, sid = open_session(capd, port)
    echoed = bytearray()
    t = drain(s, echoed)
    first = os.urandom(10000)
    s.sendall(first)
    deadline = time.time() + 10
    while len(echoed) < len(first) and time.time() < deadline:
        time.sleep(0.02)
    p = tail_proc(capd, "session", sid, "--raw", "--dir", "c2s")
    out = Reader(p.stdout)
    out.wait(lambda d: len(d) >= 4096)
    s.sendall(b"tail end")
    s.shutdown(socket.SHUT_WR)
    t.join(10)
    s.close()
    assert p.wait(15) == 0
    assert out.get() == first[-4096:] + b"tail end"
    assert b"5904 bytes before the backlog" in p.stderr.read()
    # --backlog 0: only what comes after
    s, sid = open_session(capd, port)
    s.sendall(b"old")
    time.sleep(0.2)
    n = calls(capd, "session.tail")
    p = tail_proc(capd, "session", sid, "--raw", "--dir", "c2s", "--backlog", "0")
    wait_calls(capd, "session.tail", n + 1)
    s.sendall(b"new")
    time.sleep(0.2)
    s.close()
    assert p.wait(15) == 0
    assert p.stdout.read() == b"new"


def test_unknown_session_and_usage(capd):
    r = capd.ctl("tail", "session", "4242", check=False)
    assert r.returncode == 1
    assert "no session 4242" in r.stderr
    r = capd.ctl("tail", "session", "1", "--raw", check=False)
    assert r.returncode == 2
    r = capd.ctl("tail", "session", "x", check=False)
    assert r.returncode == 2
    r = capd.ctl("kill", "4242", check=False)
    assert r.returncode == 1 and "no session 4242" in r.stderr
    # a raw subscriber that asks again and again on one connection is refused, not fatal
    with socket.socket(socket.AF_UNIX) as u:
        u.connect(str(capd.sock))
        for i in range(6):
            u.sendall(json.dumps({"jsonrpc": "2.0", "id": i, "method": "events.subscribe"}).encode() + b"\n")
        u.settimeout(5)
        data = b""
        while data.count(b"\n") < 6:
            data += u.recv(65536)
    replies = [json.loads(x) for x in data.splitlines()]
    assert sum("result" in x for x in replies) == 1
    assert sum("error" in x for x in replies) == 5
    assert capd.ctl("status").returncode == 0


@pytest.mark.parametrize("args,msg", [
    (["--hex", "--text"], "give one of --hex, --text and --raw"),
    (["--raw", "--dir", "c2s", "--hex"], "give one of --hex, --text and --raw"),
    (["--text", "--text"], "give one of --hex, --text and --raw"),
    (["--raw", "--dir", "c2s", "--dir=s2c"], "--dir given twice"),
    (["--backlog", "1K", "--backlog=0"], "--backlog given twice"),
])
def test_tail_session_option_twice_is_usage_error(capd, args, msg):
    """`tail session N --hex --text` (the usage says one of them) or --dir/--backlog twice
    took the last silently; capctl now says so (exit 2) before it asks capd."""
    r = capd.ctl("tail", "session", "4242", *args, check=False)
    assert r.returncode == 2 and r.stderr == f"capctl: {msg}\n", (r.returncode, r.stderr)


def call_twice(capd, u, method):
    """The same streaming call twice on one connection u (left open for what follows):
    the two replies, and every byte read so far."""
    u.connect(str(capd.sock))
    u.settimeout(5)
    for i in (1, 2):
        u.sendall(json.dumps({"jsonrpc": "2.0", "id": i, "method": method}).encode() + b"\n")
    data = b""
    while data.count(b"\n") < 2:
        data += u.recv(65536)
    first, second = (json.loads(x) for x in data.splitlines()[:2])
    return first, second, data


def test_events_subscribe_twice_is_refused(capd):
    """A second events.subscribe on one connection would send every event twice:
    it is refused with a clear error and the first subscription goes on alone."""
    with socket.socket(socket.AF_UNIX) as u:
        first, second, data = call_twice(capd, u, "events.subscribe")
        assert first["result"] == {"subscribed": True}
        assert "subscribed to events already" in second["error"]["message"], second
        port = free_port()
        capd.ctl("add", "forward", "--name", "twice", "--port", port, "--to", "127.0.0.1:9")
        deadline = time.time() + 5
        while data.count(b'"instance.add"') < 1 and time.time() < deadline:
            data += u.recv(65536)
        time.sleep(0.5)  # a duplicate would follow at once
        u.settimeout(0.2)
        try:
            while True:
                d = u.recv(65536)
                if not d:
                    break
                data += d
        except socket.timeout:
            pass
    assert data.count(b'"instance.add"') == 1, data


def test_capture_follow_twice_is_refused(capd):
    """capture.data names no follow, so two follows on one connection sent two pcapng
    streams interleaved, blocks of one inside the other's: a second follow is refused
    and the first goes on."""
    with socket.socket(socket.AF_UNIX) as u:
        first, second, _ = call_twice(capd, u, "capture.follow")
        assert "data" in first["result"], first
        assert second["error"]["message"] == "this connection follows the capture already", second


class Sink:
    """Accepts one connection, reads everything, sends back the count, and
    closes when told to (the session stays open until then)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self.release = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        c, _ = self.sock.accept()
        buf = bytearray(1 << 20)
        while True:
            n = c.recv_into(buf)
            if n == 0:
                break
            self.count += n
        c.sendall(str(self.count).encode())
        self.release.wait(60)
        c.close()


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def tailed_bulk_session(capd_factory, tmp_path, capture):
    """A forward to a Sink with one session open, 1000 bytes sent through it, and a
    `capctl tail --raw --dir c2s` of it seen to write them to tmp_path/raw.out.
    Returns (sink, capd, client socket, tail process, its output file)."""
    sink = Sink()
    port = free_port()
    capd = capd_factory(f"[forward big]\nlisten = {port}\nto = 127.0.0.1:{sink.port}\n"
                        + ("" if capture else "capture = no\n"))
    s, sid = open_session(capd, port)
    outf = open(tmp_path / "raw.out", "wb")
    p = tail_proc(capd, "session", sid, "--raw", "--dir", "c2s", stdout=outf)
    s.sendall(b"x" * 1000)
    deadline = time.time() + 10
    while (tmp_path / "raw.out").stat().st_size < 1000 and time.time() < deadline:
        time.sleep(0.02)
    assert (tmp_path / "raw.out").stat().st_size == 1000
    return sink, capd, s, p, outf


def end_tailed(sink, s, p, outf, err):
    """Lets the Sink close the session, waits for the tail to end with it, and returns the
    bytes the tail said it lost ("[... N bytes dropped ...]") and its stderr."""
    sink.release.set()
    assert s.recv(100) == b""
    s.close()
    assert p.wait(60) == 0
    outf.close()
    text = err.get().decode()
    return sum(int(n) for n in re.findall(r"\[\.\.\. (\d+) bytes dropped \.\.\.\]", text)), text


def test_stopped_subscriber_drops_not_stalls(capd_factory, tmp_path):
    """100 MB through a session whose tail is SIGSTOPped: full speed, bounded memory, drop reported."""
    sink, capd, s, p, outf = tailed_bulk_session(capd_factory, tmp_path, capture=False)
    pid = capd.proc.pid
    base = rss_kb(pid)
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_kb(pid))
            time.sleep(0.05)
    st = threading.Thread(target=sample, daemon=True)
    st.start()
    err = Reader(p.stderr)
    os.kill(p.pid, signal.SIGSTOP)
    try:
        total = 100 * 1024 * 1024
        block = os.urandom(1 << 20)
        t0 = time.time()
        for _ in range(100):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(60)
        reply = s.recv(100)
        elapsed = time.time() - t0
        done.set()
        st.join()
        assert int(reply) == total + 1000
        # a loopback relay does this in about a second; a stalled one never finishes
        assert elapsed < 30, elapsed
        # capture is off here: the spool's own bounded queue is the spool's tests' business
        assert (peak[0] - base) < 48 * 1024, (base, peak[0])
    finally:
        os.kill(p.pid, signal.SIGCONT)
    # the session is still open (the server has not closed) and quiet:
    # the subscriber hears of the drop once it has caught up
    err.wait(lambda d: b"bytes dropped" in d, timeout=20)
    assert p.poll() is None
    dropped, text = end_tailed(sink, s, p, outf, err)
    assert dropped > 0, text
    assert (tmp_path / "raw.out").stat().st_size + dropped == total + 1000


def test_live_subscriber_of_a_captured_bulk_flow_misses_nothing(capd_factory, tmp_path):
    """A capturing bulk flow reads up to 1 MiB a call (relay.c): a live tail hears all of it, in
    notifications short enough for capctl's line limit, or is told what it lost."""
    sink, capd, s, p, outf = tailed_bulk_session(capd_factory, tmp_path, capture=True)
    err = Reader(p.stderr)
    sent = bytearray(b"x" * 1000)
    for _ in range(64):
        block = os.urandom(1 << 20)
        s.sendall(block)
        sent += block
    s.shutdown(socket.SHUT_WR)
    s.settimeout(60)
    assert int(s.recv(100)) == len(sent)
    dropped, text = end_tailed(sink, s, p, outf, err)
    got = (tmp_path / "raw.out").read_bytes()
    assert len(got) + dropped == len(sent), (len(got), dropped, text[-500:])
    if dropped == 0:
        assert got == bytes(sent)


def test_tail_events_sees_curl_sessions(capd, http_server):
    hport, _ = http_server
    pj = tail_proc(capd, "events", "--json")
    ph = tail_proc(capd, "events")
    outj, outh = Reader(pj.stdout), Reader(ph.stdout)
    try:
        wait_calls(capd, "events.subscribe", 2)
        port = forward(capd, hport, name="web")
        outj.wait(lambda d: b'"instance.add"' in d)
        outh.wait(lambda d: b"instance.add web forward" in d)
        r = subprocess.run(["curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{port}/"],
                           capture_output=True, timeout=30)
        assert r.stdout == b"hello from the origin\n"
        outj.wait(lambda d: b'"session.close"' in d)
        outh.wait(lambda d: b"session.close" in d)
        capd.ctl("remove", "web")
        outj.wait(lambda d: b'"instance.remove"' in d)
    finally:
        pj.terminate()
        ph.terminate()
        pj.wait(5)
        ph.wait(5)
    events = [json.loads(x) for x in outj.get().splitlines()]
    names = [e["event"] for e in events]
    assert names == ["instance.add", "session.open", "session.close", "instance.remove"]
    assert events[0]["state"] == "running" and events[3]["state"] == "stopped", events  # not "running" when gone
    for e in events:
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$", e["time"])
    opened, closed = events[1], events[2]
    assert opened["id"] == closed["id"]
    assert opened["instance"] == closed["instance"] == "web"
    assert closed["target"] == f"127.0.0.1:{hport}"
    assert closed["bytes_down"] > 20 and closed["bytes_up"] > 20
    assert closed["reason"]
    human = outh.get().decode()
    assert re.search(rf"session\.open {opened['id']} web tcp 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:{hport}", human)
    assert re.search(rf"session\.close {opened['id']} web .* up \S+ down \S+: ", human)


def test_tail_ends_at_once_when_its_reader_goes(capd, echo_server):
    """capctl tail events | head -1 hung after the first event until another came
    (only a failed write told capctl that head had gone), on a quiet capd for
    ever; capture follow watched its stdout already, and now tail does too."""
    p = tail_proc(capd, "events")
    wait_calls(capd, "events.subscribe", 1)
    capd.ctl("capture", "rotate")
    assert b"capture.rotate" in p.stdout.readline()
    p.stdout.close()  # the reader goes, and no event follows
    assert p.wait(5) == 0
    # tail session too, on a session that stays quiet
    port = forward(capd, echo_server.port)
    s, sid = open_session(capd, port)
    s.sendall(b"one line\n")
    assert s.recv(100) == b"one line\n"
    p = tail_proc(capd, "session", sid, "--text")
    assert p.stdout.readline().startswith(f"[session {sid} ".encode())
    p.stdout.close()
    try:
        assert p.wait(5) == 0
    finally:
        s.close()


def test_kill_ends_long_transfer(capd):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    server_saw = {}

    def serve():
        c, _ = srv.accept()
        c.settimeout(20)
        try:
            while True:  # a download that would go on for ever
                c.sendall(b"z" * 65536)
                time.sleep(0.01)
        except OSError as e:
            server_saw["err"] = e
        c.close()
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    port = forward(capd, srv.getsockname()[1])
    s, sid = open_session(capd, port)
    s.settimeout(20)
    got = 0
    while got < 1 << 20:
        got += len(s.recv(1 << 20))
    r = capd.ctl("kill", sid)
    assert f"killed session {sid}" in r.stdout
    ended = None
    try:
        while True:
            d = s.recv(1 << 20)
            if not d:
                ended = "eof"
                break
    except ConnectionResetError:
        ended = "reset"
    assert ended in ("eof", "reset")
    th.join(20)
    assert "err" in server_saw  # the server's side was cut too
    s.close()
    srv.close()
    ss = capd.wait_sessions(lambda ss: any(x["id"] == sid and x["state"] == "closed" for x in ss))
    assert [x for x in ss if x["id"] == sid][0]["reason"] == "killed by capctl"
    capd.flush()
    resets = 0
    for pcap in capd.pcaps():
        r = tshark("-r", pcap, "-Y", f'tcp.flags.reset == 1 && frame.comment contains "capd session {sid}"')
        resets += len(r.stdout.splitlines())
    assert resets > 0


def test_kill_of_an_ended_session_says_it_ended(capd, echo_server):
    """A session `capctl sessions` still lists as closed is not 'no session N' to kill."""
    port = forward(capd, echo_server.port)
    s, sid = open_session(capd, port)
    s.close()
    capd.wait_sessions(lambda ss: any(x["id"] == sid and x["state"] == "closed" for x in ss))
    r = capd.ctl("kill", sid, check=False)
    assert r.returncode == 1
    assert f"session {sid} has ended (" in r.stderr, r.stderr
    r = capd.ctl("tail", "session", sid, check=False)
    assert r.returncode == 1 and f"session {sid} has ended (" in r.stderr


def test_sessions_table(capd, echo_server):
    port = forward(capd, echo_server.port, name="fw")
    s, sid = open_session(capd, port)
    s.sendall(b"q" * 3000)
    got = 0
    s.settimeout(10)
    while got < 3000:
        got += len(s.recv(65536))
    s2, sid2 = open_session(capd, port)
    s2.close()
    capd.wait_sessions(lambda ss: any(x["id"] == sid2 and x["state"] == "closed" for x in ss))
    out = capd.ctl("sessions").stdout.splitlines()
    assert out[0].split() == ["ID", "INSTANCE", "PROTO", "CLIENT", "TARGET", "STATE", "UP", "DOWN", "AGE"]
    row = [x.split() for x in out[1:] if x.split()[0] == str(sid)][0]
    assert row[1:3] == ["fw", "tcp"]
    assert row[4] == f"127.0.0.1:{echo_server.port}"
    assert row[5:8] == ["open", "2.9K", "2.9K"]
    assert re.match(r"\d+s$", row[8])
    opened = capd.ctl("sessions", "--open").stdout
    assert str(sid2) not in [x.split()[0] for x in opened.splitlines()[1:]]
    j = capd.ctl("sessions", "--instance", "fw", json_out=True)
    assert {x["id"] for x in j} >= {sid, sid2}
    assert capd.ctl("sessions", "--instance", "nope", check=False).returncode == 1
    s.close()


def test_rotate_event(capd):
    p = tail_proc(capd, "events", "--json")
    out = Reader(p.stdout)
    try:
        wait_calls(capd, "events.subscribe", 1)
        st = capd.ctl("capture", "rotate", json_out=True)
        out.wait(lambda d: b'"capture.rotate"' in d)
    finally:
        p.terminate()
        p.wait(5)
    ev = [json.loads(x) for x in out.get().splitlines() if b"capture.rotate" in x][0]
    assert ev["file"] == st["file"]
    assert ev["file"].endswith(".pcapng")


def test_capture_follow(capd, echo_server, tmp_path):
    port = forward(capd, echo_server.port, name="fw")
    other = forward(capd, echo_server.port, name="other")
    path = tmp_path / "follow.pcapng"
    with open(path, "wb") as f:
        p = subprocess.Popen([str(CAPCTL), "-s", str(capd.sock), "capture", "follow", "--instance", "fw"],
                             stdout=f, stderr=subprocess.PIPE)
    try:
        wait_calls(capd, "capture.follow", 1)
        deadline = time.time() + 10
        while path.stat().st_size == 0 and time.time() < deadline:
            time.sleep(0.02)
        assert path.stat().st_size > 0  # the section header came with the reply
        payload = b"follow me " * 500
        with socket.create_connection(("127.0.0.1", other), timeout=10) as s:  # not followed
            s.sendall(b"elsewhere")
            s.recv(100)
        s, sid = open_session(capd, port)
        echoed = bytearray()
        t = drain(s, echoed)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        t.join(10)
        s.close()
        assert bytes(echoed) == payload
        capd.wait_sessions(lambda ss: any(x["id"] == sid and x["state"] == "closed" for x in ss))
        # the writer hands packets over at its flush tick
        deadline = time.time() + 10
        while time.time() < deadline:
            r = tshark("-r", path, "-Y", "tcp.flags.fin == 1", "-T", "fields", "-e", "frame.number")
            if len(r.stdout.split()) >= 2:
                break
            time.sleep(0.1)
    finally:
        p.terminate()
        p.wait(5)
    from conftest import follow_session
    stream, up, down = follow_session(path, sid)
    assert stream == 0  # only the followed instance's session
    assert up == payload and down == payload
    r = tshark("-r", path, "-T", "fields", "-e", "frame.comment")
    assert all(f"capd session {sid}" in x for x in r.stdout.splitlines() if x)



def test_capture_follow_ends_when_its_instance_is_removed(capd, echo_server, tmp_path):
    """A follow of an instance that was removed went silent for ever; it now gets
    the instance's last packets, then ends with a word on stderr."""
    port = forward(capd, echo_server.port, name="fw")
    path = tmp_path / "follow.pcapng"
    with open(path, "wb") as f:
        p = subprocess.Popen([str(CAPCTL), "-s", str(capd.sock), "capture", "follow", "--instance", "fw"],
                             stdout=f, stderr=subprocess.PIPE, text=True)
    try:
        wait_calls(capd, "capture.follow", 1)
        s, sid = open_session(capd, port)
        s.sendall(b"last words")
        assert s.recv(100) == b"last words"
        capd.ctl("remove", "fw")
        rc = p.wait(10)
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        s.close()
    assert rc == 0 and "fw: instance removed; the follow ends" in err, (rc, err)
    from conftest import follow_session
    _, up, down = follow_session(path, sid)
    assert up == b"last words" and down == b"last words"


def follow_head_interfaces(capd):
    """The if_name of each IDB in the head a new capture.follow is answered with."""
    import base64
    import struct
    head = base64.b64decode(capd.rpc_many(("capture.follow", {}))[0]["result"]["data"])
    names, off = [], 0
    while off < len(head):
        btype, blen = struct.unpack_from("=II", head, off)
        if btype == 1:  # IDB: options after linktype, reserved, snaplen
            o = off + 16
            while o < off + blen - 4:
                code, olen = struct.unpack_from("=HH", head, o)
                if code == 0:
                    break
                if code == 2:
                    names.append(head[o + 4:o + 4 + olen].decode())
                o += 4 + (olen + 3) // 4 * 4
        off += blen
    return names


def test_capture_follow_head_leaves_out_removed_instances(capd, echo_server):
    """A follow started after an instance was removed got that instance's
    interface in its head all the same (every one ever seen: a capd that ran
    many traces handed each new follower hundreds of dead interfaces), while a
    new spool file names only the live ones."""
    gone = forward(capd, echo_server.port, name="gone")
    kept = forward(capd, echo_server.port, name="kept")
    p = subprocess.Popen([str(CAPCTL), "-s", str(capd.sock), "capture", "follow"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_calls(capd, "capture.follow", 1)
        for port in (gone, kept):
            s, _ = open_session(capd, port)
            s.sendall(b"seen")
            assert s.recv(100) == b"seen"
            s.close()
        deadline = time.time() + 10
        while sorted(follow_head_interfaces(capd)) != ["gone", "kept"] and time.time() < deadline:
            time.sleep(0.05)
        assert sorted(follow_head_interfaces(capd)) == ["gone", "kept"]
        capd.ctl("remove", "gone")
        assert follow_head_interfaces(capd) == ["kept"]
    finally:
        p.terminate()
        p.wait(5)


def test_half_closed_follow_is_closed_when_its_instance_is_removed(capd, echo_server):
    """A raw client that asks for capture.follow of an instance and half-closes gets
    capture.end when the instance is removed, then the close; capd kept the
    connection open for ever, the ended follow still counted as a subscription."""
    forward(capd, echo_server.port, name="fw")
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(str(capd.sock))
        c.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "capture.follow",
                              "params": {"instance": "fw"}}).encode() + b"\n")
        c.shutdown(socket.SHUT_WR)
        wait_calls(capd, "capture.follow", 1)
        capd.ctl("remove", "fw")
        data = b""
        while True:
            d = c.recv(65536)  # a timeout here is the bug
            if not d:
                break
            data += d
    msgs = [json.loads(x) for x in data.splitlines()]
    assert msgs[0]["id"] == 1 and "data" in msgs[0]["result"]
    assert msgs[-1]["method"] == "capture.end" and msgs[-1]["params"]["instance"] == "fw"
    # and capd goes on serving follows
    assert capd.rpc_many(("capture.follow", {}))[0]["result"]["data"]


def test_capture_follow_keeps_up_with_a_burst(capd, echo_server, tmp_path):
    """A follower writing to a file reads fast: a burst of several MB through two
    sessions reaches it whole, the writer's handover of up to 8 MiB in one go
    included."""
    port = forward(capd, echo_server.port, name="fw")
    path = tmp_path / "burst.pcapng"
    with open(path, "wb") as f:
        p = subprocess.Popen([str(CAPCTL), "-s", str(capd.sock), "capture", "follow"],
                             stdout=f, stderr=subprocess.PIPE)
    try:
        wait_calls(capd, "capture.follow", 1)
        sent = {}

        def one():
            s, _ = open_session(capd, port)
            payload = os.urandom(3 << 20)
            echoed = bytearray()
            t = drain(s, echoed)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            t.join(30)
            s.close()
            assert bytes(echoed) == payload
            sent[threading.get_ident()] = payload

        ts = [threading.Thread(target=one) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        capd.wait_sessions(lambda ss: sum(x["state"] == "closed" for x in ss) == 2)
        deadline = time.time() + 15
        while time.time() < deadline:
            r = tshark("-r", path, "-Y", "tcp.flags.fin == 1", "-T", "fields", "-e", "frame.number")
            if len(r.stdout.split()) >= 4:
                break
            time.sleep(0.2)
    finally:
        p.terminate()
        _, err = p.communicate(timeout=5)
    assert b"dropped" not in err, err
    from conftest import follow_tcp
    got = set()
    for stream in (0, 1):
        up, down = follow_tcp(path, stream)
        assert up == down, (stream, len(up), len(down))
        got.add(up)
    assert got == set(sent.values())


def test_capture_follow_pipe_ends_with_reader(capd, echo_server):
    port = forward(capd, echo_server.port)
    p = subprocess.Popen(f"'{CAPCTL}' -s '{capd.sock}' capture follow | tshark -r - -c 3 -T fields -e tcp.flags; "
                         "echo status ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    wait_calls(capd, "capture.follow", 1)
    s, sid = open_session(capd, port)
    s.sendall(b"x")
    s.recv(10)
    s.close()
    out, _ = p.communicate(timeout=20)
    lines = out.decode().split()
    assert lines[-1] == "0" and lines[-2] == "status"  # capctl ended cleanly when tshark had enough
    assert lines[0] == "0x0002"  # SYN first


def test_capture_follow_usage(capd):
    r = capd.ctl("capture", "follow", "--instance", "nope", check=False)
    assert r.returncode == 1 and "no instance nope" in r.stderr


def test_colour_only_on_a_terminal(capd, echo_server):
    import pty
    import select
    port = forward(capd, echo_server.port)
    s, sid = open_session(capd, port)
    s.settimeout(10)
    s.sendall(b"ping\n")
    assert s.recv(100) == b"ping\n"
    env = dict(os.environ)
    env.pop("NO_COLOR", None)
    for extra, coloured in (({}, True), ({"NO_COLOR": "1"}, False)):
        master, slave = pty.openpty()
        p = subprocess.Popen([str(CAPCTL), "-s", str(capd.sock), "tail", "session", str(sid)],
                             stdout=slave, stderr=subprocess.PIPE, env={**env, **extra})
        os.close(slave)
        data = b""
        deadline = time.time() + 10
        while data.count(b"ping") < 2 and time.time() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                data += os.read(master, 65536)
        p.terminate()
        p.wait(5)
        os.close(master)
        assert data.count(b"ping") == 2
        assert (b"\033[31m" in data) == coloured  # c2s
        assert (b"\033[34m" in data) == coloured  # s2c
    s.close()


def test_backlog_of_many_turns(capd, echo_server):
    """More turns than capd remembers the order of: every kept byte still comes, once, in stream order."""
    port = forward(capd, echo_server.port)
    s, sid = open_session(capd, port)
    s.settimeout(10)
    sent = bytearray()
    for i in range(1500):
        line = b"line %d\n" % i
        s.sendall(line)
        got = b""
        while len(got) < len(line):
            got += s.recv(100)
        assert got == line
        sent += line
    outs = {}
    for d in ("c2s", "s2c"):
        p = tail_proc(capd, "session", sid, "--raw", "--dir", d)
        outs[d] = (p, Reader(p.stdout))
        outs[d][1].wait(lambda x: len(x) >= len(sent))
    p = tail_proc(capd, "session", sid, "--text")
    text = Reader(p.stdout)
    text.wait(lambda x: x.count(b"line 1499") == 2)
    s.close()
    for d, (pd, r) in outs.items():
        assert pd.wait(10) == 0
        assert r.get() == bytes(sent), d
    assert p.wait(10) == 0
    lines = text.get().decode().splitlines()
    # the last turns keep their order: request, echo, request, echo
    body = [x for x in lines if x.startswith("line ")]
    assert body[-4:] == ["line 1498", "line 1498", "line 1499", "line 1499"]
    assert sorted(body) == sorted([f"line {i}" for i in range(1500)] * 2)
    r = capd.ctl("tail", "session", sid, check=False)
    assert r.returncode == 1 and f"session {sid} has ended (closed)" in r.stderr


def wait_bytes_up(capd, sid, n, timeout=20.0):
    """Waits until session sid has carried n bytes from client to server."""
    capd.wait_sessions(lambda ss: any(x["id"] == sid and x["bytes_up"] >= n for x in ss), timeout=timeout)


def wait_size(path, n, err, timeout):
    """Waits until the file at path holds n bytes or the tail said it dropped some."""
    deadline = time.time() + timeout
    while path.stat().st_size < n and time.time() < deadline:
        with err.lock:
            if b"dropped" in err.data:
                break
        time.sleep(0.05)


def test_wrapped_ring_regrows_in_order(capd_factory, echo_server):
    """Regression: a ring held small by the 64 MiB budget for all rings wraps; once memory
    frees up it grows again, and its bytes must be laid out anew. It kept the wrapped
    layout, so the tail showed its bytes out of order, zeros and whatever the new area held."""
    capd = capd_factory(settings="tail_backlog = 64M")
    sink = Sink()
    big = free_port()
    capd.ctl("add", "forward", "--port", big, "--to", f"127.0.0.1:{sink.port}", "--no-capture")
    port = forward(capd, echo_server.port)
    # one ring of 64 MiB (it doubles past 32 MiB carried) takes the whole budget
    b, bid = open_session(capd, big)
    size = (32 << 20) + 1024
    b.sendall(os.urandom(size))
    wait_bytes_up(capd, bid, size)
    # a new session's ring gets its first 256 bytes and cannot grow: it wraps
    s, sid = open_session(capd, port)
    s.settimeout(10)
    sent = bytearray()
    for i in range(40):
        line = b"line %02d of the first.\n" % i  # 22 bytes
        s.sendall(line)
        got = b""
        while len(got) < len(line):
            got += s.recv(100)
        sent += line
    assert len(sent) == 880
    # the big session ends, its 64 MiB go back to the budget: the next byte regrows the ring
    b.shutdown(socket.SHUT_WR)
    sink.release.set()
    assert b.recv(100) == str(size).encode()
    b.close()
    capd.wait_sessions(lambda ss: any(x["id"] == bid and x["state"] == "closed" for x in ss))
    s.sendall(b"last line\n")
    assert s.recv(100) == b"last line\n"
    sent += b"last line\n"
    outs = {}
    for d in ("c2s", "s2c"):
        p = tail_proc(capd, "session", sid, "--raw", "--dir", d)
        outs[d] = (p, Reader(p.stdout), Reader(p.stderr))
        outs[d][1].wait(lambda x: x.endswith(b"last line\n"), timeout=5)
    s.close()
    for d, (p, out, err) in outs.items():
        assert p.wait(10) == 0
        got = out.get()
        # the 256 bytes the small ring kept when it grew, then what came after: in order
        assert got == bytes(sent[-(256 + 10):]), (d, got)
        assert f"[... {len(sent) - len(got)} bytes before the backlog ...]".encode() in err.get()


def test_big_backlog_reaches_a_fast_reader_whole(capd_factory, tmp_path):
    """Regression: the whole backlog was queued at once, so past the subscriber's 4 MiB
    bound (3.4 MB of payload after base64) a reader writing to a file lost the rest."""
    capd = capd_factory(settings="tail_backlog = 20M")
    sink = Sink()
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{sink.port}")
    s, sid = open_session(capd, port)
    payload = os.urandom(10_000_000)
    s.sendall(payload)
    wait_bytes_up(capd, sid, len(payload))
    path = tmp_path / "raw.out"
    with open(path, "wb") as f:
        p = tail_proc(capd, "session", sid, "--raw", "--dir", "c2s", stdout=f)
    err = Reader(p.stderr)
    wait_size(path, len(payload), err, 15)
    s.shutdown(socket.SHUT_WR)
    sink.release.set()
    s.settimeout(10)
    assert s.recv(100) == str(len(payload)).encode()
    s.close()
    assert p.wait(15) == 0
    assert err.get() == b""
    assert path.read_bytes() == payload


def test_second_tail_of_a_spliced_session_gets_its_backlog(capd, tmp_path):
    """Regression: the chunk that came after spliced bytes joined the previous turn of
    its direction, which ended before them, so a later tail got none of the backlog
    the ring held (only the header and the end line)."""
    sink = Sink()
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{sink.port}", "--no-capture")
    s, sid = open_session(capd, port)
    s.sendall(os.urandom(100 * 1024))
    wait_bytes_up(capd, sid, 100 * 1024)
    s.sendall(os.urandom(1 << 20))  # past a full 64K ring: spliced
    wait_bytes_up(capd, sid, 100 * 1024 + (1 << 20))
    n = calls(capd, "session.tail")
    a = tail_proc(capd, "session", sid, "--raw", "--dir", "c2s")
    wait_calls(capd, "session.tail", n + 1)
    line = b"a line after the splicing\n"
    line = line + b"." * (27 - len(line))
    assert len(line) == 27
    s.sendall(line)
    out = Reader(a.stdout)
    out.wait(lambda x: x == line)
    a.terminate()
    a.wait(5)
    b = tail_proc(capd, "session", sid, "--raw", "--dir", "c2s")
    out = Reader(b.stdout)
    err = Reader(b.stderr)
    try:
        out.wait(lambda x: len(x) >= len(line), timeout=5)
    finally:
        s.shutdown(socket.SHUT_WR)
        sink.release.set()
        s.settimeout(10)
        s.recv(100)
        s.close()
    assert b.wait(10) == 0
    assert out.get() == line
    assert b"[... %d bytes before the backlog ...]" % (100 * 1024 + (1 << 20)) in err.get()


def test_capture_follow_takes_a_prefix(capd):
    """capctl(1): sub-commands may be shortened to a unique prefix. `capture st` and
    `capture rot` were, `capture fol` was refused as bad usage."""
    p = subprocess.Popen([str(CAPCTL), "-s", str(capd.sock), "capture", "fol"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        head = p.stdout.read(4)
    finally:
        p.terminate()
        _, err = p.communicate(timeout=5)
    assert head == b"\x0a\x0d\x0d\x0a", err  # a pcapng section header


@pytest.mark.parametrize("mode", ["--text", None])
def test_text_crlf_split_across_reads_ends_one_line(capd, echo_server, mode):
    """A read that ended between the CR and the LF of a line end: --text (and the
    default, for printable chunks) showed the chunk's CR, then the next chunk's LF
    as an empty line of its own that the stream does not have."""
    port = forward(capd, echo_server.port)
    s, sid = open_session(capd, port)
    s.settimeout(10)
    p = tail_proc(capd, "session", sid, *([mode] if mode else []), "--dir", "c2s")
    out = Reader(p.stdout)
    out.wait(lambda d: d.startswith(b"[session"))
    for part in (b"GET / HTTP/1.1\r", b"\nHost: x\r\n"):
        s.sendall(part)
        assert s.recv(100) == part
        out.wait(lambda d, part=part: d.count(b" c2s %d bytes]" % len(part)) == 1)
    s.close()
    assert p.wait(15) == 0
    lines = out.get().decode().splitlines()
    body = [x for x in lines[1:-1] if not HEADER.match(x)]
    assert body == ["GET / HTTP/1.1\\r", "Host: x"], lines


@pytest.mark.parametrize("mode", ["--text", None])
def test_text_shows_utf8_split_across_reads(capd, echo_server, mode):
    """--text (and the default) escaped every byte above 0x7f, so "héllo" came out
    as h\\xc3\\xa9llo (or a hex dump) even in a UTF-8 locale, and a character split
    between two reads could not be read at all. Now UTF-8 prints as it is in a
    UTF-8 locale, a split character whole with the chunk that completes it; C1 and
    bidirectional controls, bytes that are no UTF-8, and a character the session
    never completed stay escaped."""
    port = forward(capd, echo_server.port)
    s, sid = open_session(capd, port)
    s.settimeout(10)
    p = tail_proc(capd, "session", sid, *([mode] if mode else []), "--dir", "c2s",
                  env={"LC_ALL": "C.UTF-8"})
    out = Reader(p.stdout)
    out.wait(lambda d: d.startswith(b"[session"))
    parts = [b"h\xc3", b"\xa9llo w\xc3\xb6rld \xe2", b"\x86\x92 ok\n",
             b"c1\xc2\x85 rlo\xe2\x80\xae bad\xff\n", b"end \xf0\x9f"]
    want = ["h", "\u00e9llo w\u00f6rld ", "\u2192 ok", "c1\\xc2\\x85 rlo\\xe2\\x80\\xae bad\\xff",
            "end ", "\\xf0\\x9f"]
    if mode is None:  # the default shows what is not text in hex
        del parts[3], want[3]
    for n, part in enumerate(parts, 1):
        s.sendall(part)
        got = b""
        while len(got) < len(part):
            got += s.recv(100)
        out.wait(lambda d, n=n: d.count(b" c2s ") == n)
    s.close()
    assert p.wait(15) == 0
    lines = out.get().decode().splitlines()
    body = [x for x in lines[1:-1] if not HEADER.match(x)]
    assert body == want, lines


def test_tail_of_one_direction_is_not_crowded_out_by_the_other(capd):
    """`tail session N --dir s2c` of an upload: capd sent both directions and capctl
    threw c2s away, so while capctl waited on its reader the upload filled the
    subscriber's 4 MiB and the server's answer, a few KB, was dropped
    ("[... 51200 bytes dropped ...]"). capd now sends only the direction asked for."""
    first, last = os.urandom(256 * 1024), os.urandom(50 * 1024)
    upload = 64 << 20
    got_upload, tailing = threading.Event(), threading.Event()
    ls = socket.create_server(("127.0.0.1", 0))

    def serve():
        c, _ = ls.accept()
        with c:
            tailing.wait(30)
            c.sendall(first)
            n = 0
            while n < upload:
                d = c.recv(1 << 20)
                if not d:
                    return
                n += len(d)
            got_upload.set()
            c.sendall(last)
            c.shutdown(socket.SHUT_WR)
            while c.recv(65536):
                pass
    threading.Thread(target=serve, daemon=True).start()
    port = forward(capd, ls.getsockname()[1])
    s, sid = open_session(capd, port)
    p = tail_proc(capd, "session", sid, "--raw", "--dir", "s2c")
    try:
        wait_calls(capd, "session.tail", 1)
        tailing.set()
        down = bytearray()
        t = drain(s, down)
        # capctl blocks on its full stdout pipe with most of `first` still to write
        # while the upload passes, then the answer comes
        buf = b"\0" * (1 << 20)
        for _ in range(upload >> 20):
            s.sendall(buf)
        assert got_upload.wait(60)
        s.shutdown(socket.SHUT_WR)
        t.join(60)
        assert bytes(down) == first + last
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        s.close()
        ls.close()
    assert p.returncode == 0, err
    assert b"dropped" not in err, err
    assert out == first + last


def paced_echo(port, total=64 << 20, rate=20):
    """Sends total bytes through port to the echo server at rate MB/s (one the old
    capctl and capd kept up with, dropping nothing) and reads them back; returns total."""
    return pace(socket.create_connection(("127.0.0.1", port), timeout=30), total, rate)


def pace(s, total, rate):
    """paced_echo over a connected socket s, which it closes."""
    back = bytearray()
    t = drain(s, back)
    chunk = b"\x5a" * (1 << 20)
    t0 = time.time()
    for i in range(total >> 20):
        s.sendall(chunk)
        time.sleep(max(0.0, t0 + (i + 1) / rate - time.time()))
    s.shutdown(socket.SHUT_WR)
    t.join(60)
    s.close()
    assert len(back) == total
    return total


@pytest.mark.skipif(SANITIZED, reason="CPU seconds of a sanitizer build mean nothing: the normal build's run has it")
def test_capture_follow_reads_big_notifications_cheaply(capd, echo_server, tmp_path):
    """capctl spent three quarters of its time in jansson's lexer walking the base64
    of each capture.data line: following 130 MB of capture took 1.5 s of CPU, and at
    50 MB/s through a forward it could not keep up, so capd dropped thousands of
    packets for a reader writing to a file ("capctl: [... 2891 packets dropped ...]").
    The payload string is now cut out before the line is parsed. Measured as capctl's
    CPU time (about 0.15 s now), not as a rate, so a busy machine does not decide it."""
    port = forward(capd, echo_server.port)
    outf = tmp_path / "follow.pcapng"
    with open(outf, "wb") as f:
        p = subprocess.Popen([str(CAPCTL), "-s", str(capd.sock), "capture", "follow"],
                             stdout=f, stderr=subprocess.PIPE)
    try:
        wait_calls(capd, "capture.follow", 1)
        total = paced_echo(port)
        capd.flush()
        deadline = time.time() + 30
        while outf.stat().st_size < 2 * total and time.time() < deadline:
            time.sleep(0.1)
    finally:
        p.terminate()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = status
    err = p.stderr.read()
    size = outf.stat().st_size
    outf.unlink()
    assert size >= 2 * total, err
    assert b"dropped" not in err, err
    cpu = ru.ru_utime + ru.ru_stime
    assert cpu < 0.7, f"capctl used {cpu:.2f} s of CPU to follow {size >> 20} MB"


def cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(SANITIZED, reason="CPU seconds of a sanitizer build mean nothing: the normal build's run has it")
def test_capture_follow_costs_capd_little(capd, echo_server, tmp_path):
    """capd built each capture.data line with jansson, whose dump walked the base64
    a character at a time: a follower of 128 MB of capture cost capd's loop 0.75 s
    of CPU (six times the relay's), and at 100 MB/s through a forward the loop fell
    behind and a follower writing to a file lost 3000 packets. The line is now
    written directly. Measured as capd's CPU with a follower less without one."""
    port = forward(capd, echo_server.port)
    c0 = cpu_secs(capd.proc.pid)
    paced_echo(port)
    base = cpu_secs(capd.proc.pid) - c0
    p = subprocess.Popen([str(CAPCTL), "-s", str(capd.sock), "capture", "follow"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = [0]  # bytes of pcapng the follower wrote

    def count():
        while d := p.stdout.read1(1 << 20):
            out[0] += len(d)
    threading.Thread(target=count, daemon=True).start()
    try:
        wait_calls(capd, "capture.follow", 1)
        c0 = cpu_secs(capd.proc.pid)
        total = paced_echo(port)
        capd.flush()
        # the last notifications have gone out once the follower has both ways' bytes
        # (a fixed second: more than an idle machine needs, and maybe less than a busy one)
        deadline = time.time() + 30
        while out[0] < 2 * total and time.time() < deadline:
            time.sleep(0.05)
        followed = cpu_secs(capd.proc.pid) - c0
    finally:
        p.terminate()
        p.wait(10)
    err = p.stderr.read()
    assert out[0] >= 2 * total, err
    assert b"dropped" not in err, err
    assert followed - base < 0.4, f"capd used {base:.2f} s of CPU unfollowed, {followed:.2f} s followed"


@pytest.mark.skipif(SANITIZED, reason="CPU seconds of a sanitizer build mean nothing: the normal build's run has it")
def test_tail_costs_the_session_little(capd, echo_server):
    """capd built each session.data line with jansson on the session's own thread
    (under the global lock), whose dump walked the base64 a character at a time: a
    tail that kept up with 128 MB cost capd 0.8 s of CPU and slowed a bulk session
    from 330 to 225 MB/s. The line is now written directly. Measured as capd's CPU
    with a tail less without one."""
    port = forward(capd, echo_server.port)
    c0 = cpu_secs(capd.proc.pid)
    paced_echo(port)
    base = cpu_secs(capd.proc.pid) - c0
    s, sid = open_session(capd, port)
    p = tail_proc(capd, "session", sid, "--json", stdout=subprocess.DEVNULL)
    try:
        wait_calls(capd, "session.tail", 1)
        c0 = cpu_secs(capd.proc.pid)
        pace(s, 64 << 20, 20)
        assert p.wait(30) == 0
        tailed = cpu_secs(capd.proc.pid) - c0
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read()
    assert b"dropped" not in err, err
    assert tailed - base < 0.4, f"capd used {base:.2f} s of CPU untailed, {tailed:.2f} s tailed"


def test_tail_events_unknown_target_is_a_dash(capd):
    """A SOCKS connection that sent no valid request has no target yet: tail events
    printed "127.0.0.1:41602 ->  up 0 down 0", an empty column that shifts those
    after it for awk/cut. It prints "-" now, as for other missing fields."""
    port = free_port()
    capd.ctl("add", "socks", "--port", port)
    p = tail_proc(capd, "events")
    out = Reader(p.stdout)
    try:
        wait_calls(capd, "events.subscribe", 1)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"garbage\n")
            s.recv(100)
        text = out.wait(lambda d: b"session.close" in d).decode()
    finally:
        p.terminate()
        p.wait(10)
    line = [x for x in text.splitlines() if "session.close" in x][0]
    assert re.search(r" socks 127\.0\.0\.1:\d+ -> - up 0 down 0: ", line), line


def pcapng_packets(path):
    """Enhanced Packet Blocks in a pcapng file written on this machine (host byte order)."""
    data = path.read_bytes()
    n = off = 0
    while off + 12 <= len(data):
        btype, blen = struct.unpack_from("=II", data, off)
        if blen < 12:
            break
        n += btype == 6
        off += blen
    return n


def test_capture_follow_takes_a_burst_bigger_than_its_base64_bound(capd, echo_server, tmp_path):
    """A follower's bound was 48 MiB of base64 in its connection, each take of the
    writer's queue encoded into it at once: 2 x 20 MiB echoed while the reader looked
    away for a moment (here: stopped until the burst is in capd's queue for it) came
    to 53 MiB, and capctl said "[... 74 packets dropped ...]" though it then read it
    all at once. The packets now wait as they are, 48 MiB of them, and are encoded a
    notification at a time as the reader takes them: every one of them comes."""
    port = forward(capd, echo_server.port)
    path = tmp_path / "burst.pcapng"
    with open(path, "wb") as f:
        p = subprocess.Popen([str(CAPCTL), "-s", str(capd.sock), "capture", "follow"],
                             stdout=f, stderr=subprocess.PIPE)
    try:
        wait_calls(capd, "capture.follow", 1)
        deadline = time.time() + 10
        while path.stat().st_size == 0 and time.time() < deadline:
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGSTOP)
        try:
            s, sid = open_session(capd, port)
            payload = os.urandom(20 << 20)
            echoed = bytearray()
            t = drain(s, echoed)
            for i in range(0, len(payload), 4 << 20):
                s.sendall(payload[i:i + (4 << 20)])
                time.sleep(0.05)  # the writer's own queue (32 MiB) is not what this is about
            s.shutdown(socket.SHUT_WR)
            t.join(60)
            s.close()
            assert len(echoed) == len(payload)
            capd.wait_sessions(lambda ss: any(x["id"] == sid and x["state"] == "closed" for x in ss))
            capd.flush()  # all of it is in capd's queue for the follower
        finally:
            os.kill(p.pid, signal.SIGCONT)
        spooled = sum(pcapng_packets(x) for x in capd.pcaps())
        deadline = time.time() + 30
        while pcapng_packets(path) < spooled and time.time() < deadline:
            time.sleep(0.1)
    finally:
        p.terminate()
        _, err = p.communicate(timeout=10)
    assert b"dropped" not in err, err
    assert spooled > 500 and pcapng_packets(path) == spooled, (spooled, pcapng_packets(path))


def test_tail_drop_notice_names_its_direction(capd):
    """Without colour (stdout not a terminal) `tail session N` said "[... 13285376 bytes
    dropped ...]" at the session's end with nothing to tell which direction lost them.
    It names it now, as a chunk's header line does: "[... s2c 13285376 bytes dropped ...]"."""
    go = threading.Event()
    ls = socket.create_server(("127.0.0.1", 0))

    def serve():
        c, _ = ls.accept()
        with c:
            go.wait(30)
            c.sendall(b"\0" * (16 << 20))  # hexdump -C collapses it to a few lines
    threading.Thread(target=serve, daemon=True).start()
    port = forward(capd, ls.getsockname()[1])
    s, sid = open_session(capd, port)
    p = tail_proc(capd, "session", sid)
    out = Reader(p.stdout)
    try:
        wait_calls(capd, "session.tail", 1)
        out.wait(lambda d: b"[session " in d)
        os.kill(p.pid, signal.SIGSTOP)
        try:
            down = bytearray()
            t = drain(s, down)
            go.set()
            t.join(30)
            assert len(down) == 16 << 20
            s.close()
            capd.wait_sessions(lambda ss: any(x["id"] == sid and x["state"] == "closed" for x in ss))
        finally:
            os.kill(p.pid, signal.SIGCONT)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        ls.close()
    text = out.get().decode()
    assert re.search(r"^\[\.\.\. s2c \d+ bytes dropped \.\.\.\]$", text, re.M), text[-2000:]
    assert "\x1b" not in text and " c2s " not in text


def in_log_write(pid):
    """Whether a thread of pid is in write(2) on fd 2, its log (/proc/PID/task/*/syscall)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/syscall") as f:
                words = f.read().split()
        except OSError:
            continue
        if words[:2] == ["1", "0x2"]:
            return True
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_session_end_comes_after_the_log_line(capd_factory, echo_server, workers):
    """session_end told a tail subscriber the session had ended before it wrote the
    session's summary line, so a script that waited for the end and then read the
    log could miss the line. capd's log here is a FIFO the test stops reading: capd
    blocks at its next log line, which must come before session.end goes out."""
    capd = capd_factory(start=False, settings=f"workers = {workers}\n")
    capd.conf_path.write_text(capd.conf_path.read_text().replace("log_level = debug", "log_level = info"))
    fifo, log = capd.log_path.with_suffix(".fifo"), capd.log_path
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    skip = [0]  # the test's own filler still in the FIFO

    def drain_log():
        """Copies the FIFO to capd.log until it is empty (or, blocking, until capd is gone)."""
        with open(log, "ab") as f:
            while True:
                try:
                    d = os.read(rfd, 65536)
                except BlockingIOError:
                    return
                if not d:
                    return
                n = min(skip[0], len(d))
                skip[0] -= n
                f.write(d[n:])
                f.flush()

    capd.log_path = fifo  # capd's stderr; capd.log() reads what drain_log copied
    capd.start()
    capd.log_path = log
    c = socket.socket(socket.AF_UNIX)
    try:
        drain_log()
        port = forward(capd, echo_server.port)
        s, sid = open_session(capd, port)
        c.settimeout(10)
        c.connect(str(capd.sock))
        c.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "session.tail",
                              "params": {"id": sid}}).encode() + b"\n")
        got = b""
        while b"\n" not in got:
            got += c.recv(65536)
        assert json.loads(got.split(b"\n")[0])["result"]["id"] == sid
        got = got.split(b"\n", 1)[1]
        drain_log()
        wfd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            while True:
                skip[0] += os.write(wfd, b"filler\n")
        except BlockingIOError:
            pass
        finally:
            os.close(wfd)
        s.close()
        deadline = time.time() + 10
        while not in_log_write(capd.proc.pid):
            assert time.time() < deadline, "capd never wrote its log"
            time.sleep(0.01)
        c.setblocking(False)
        try:
            got += c.recv(65536)
        except BlockingIOError:
            pass
        assert b"session.end" not in got, "session.end went out before the session's log line"
    finally:
        # capd goes on once its log is read again, to its end (its stop included)
        os.set_blocking(rfd, True)
        threading.Thread(target=drain_log, daemon=True).start()
    c.settimeout(10)
    while b"session.end" not in got:
        d = c.recv(65536)
        assert d, "the tail ended without session.end"
        got += d
    c.close()
    deadline = time.time() + 10
    while f"session {sid} forward/" not in capd.log():
        assert time.time() < deadline, capd.log()
        time.sleep(0.02)
