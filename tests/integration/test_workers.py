"""Issue 11: session threads (workers). Sessions run on several threads while
the control socket lists, tails, kills and removes them; nothing is lost,
nothing crashes, and the counts come back to zero. Run under the sanitizers
too, where a data race or a use-after-free would show."""

import os
import socket
import subprocess
import threading
import time

from conftest import CAPCTL, SANITIZED, EchoServer, exchange, free_port


def listeners(port):
    """Listening sockets on 127.0.0.1:port."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    return len([x for x in out.splitlines() if x.strip()])


def thread_stat(pid, field):
    """{thread name: a number from /proc/PID/task/N/stat}, field counted as proc(5) does."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        stat = open(f"/proc/{pid}/task/{t}/stat").read()
        out[open(f"/proc/{pid}/task/{t}/comm").read().strip()] = int(stat.rsplit(")", 1)[1].split()[field - 3])
    return out


def thread_nice(pid):
    return thread_stat(pid, 19)


def thread_policy(pid):
    return thread_stat(pid, 41)


def worker_threads(pid):
    return sorted(n for n in thread_nice(pid) if n.startswith("capd-worker-"))


def test_workers_setting_and_listeners(capd_factory):
    capd = capd_factory(settings="workers = 2")
    echo = EchoServer()
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{echo.port}")
    assert capd.ctl("status", json_out=True)["workers"] == 2
    assert "workers:   2 session threads" in capd.ctl("status").stdout
    assert worker_threads(capd.proc.pid) == ["capd-worker-1", "capd-worker-2"]
    assert listeners(port) == 1  # one socket, watched by both
    # every connection is served, whichever thread's listener the kernel picks
    for i in range(40):
        assert exchange(port, b"ping %d" % i) == b"ping %d" % i
    one = capd_factory(settings="workers = 1")
    port1 = free_port()
    one.ctl("add", "forward", "--port", port1, "--to", f"127.0.0.1:{echo.port}")
    assert one.ctl("status", json_out=True)["workers"] == 1
    assert listeners(port1) == 1 and worker_threads(one.proc.pid) == []
    assert exchange(port1, b"single") == b"single"
    # a second instance on the port is refused
    r = capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{echo.port}", "--name", "again", check=False)
    assert r.returncode != 0 and "in use" in (r.stdout + r.stderr)
    echo.close()


def test_spool_writer_runs_ahead_of_session_threads(capd_factory):
    """capd starts as root here: its spool writer runs at nice -5, so that on
    busy cores the relay slows down before the capture falls behind; the
    session threads stay at capd's own priority. The writer and the reaper are
    batch threads, which never preempt the session thread that wakes them; the
    session threads are normal ones."""
    capd = capd_factory(settings="workers = 2")
    nice = thread_nice(capd.proc.pid)
    assert nice["capd-spool"] == -5, nice
    # capd's own nice, whatever the suite runs at (`nice tools/dev test`)
    assert nice["capd-worker-1"] == nice["capd-worker-2"] == nice["capd-reaper"] == nice["capd"], nice
    policy = thread_policy(capd.proc.pid)
    assert policy["capd-spool"] == policy["capd-reaper"] == os.SCHED_BATCH, policy
    assert policy["capd-worker-1"] == policy["capd-worker-2"] == os.SCHED_OTHER, policy


def test_control_while_sessions_run_on_every_thread(capd_factory):
    capd = capd_factory(settings="workers = 2")
    echo = EchoServer()
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{echo.port}", "--name", "fw")
    # the race runs until both sides have done enough rounds (about 3 s on the normal
    # build), or for at most 10 s (6 s under the sanitizers) on a slow machine
    stop = time.time() + (6 if SANITIZED else 10)
    errors, done, rounds = [], [0], [0]

    def going():
        return time.time() < stop and (done[0] < 1500 or rounds[0] < 30)

    def churn(n):
        # short connections, each checked byte for byte
        while going():
            msg = os.urandom(64 + n)
            try:
                got = exchange(port, msg)
            except OSError as e:
                errors.append(repr(e))
                continue
            if got != msg:
                errors.append(f"echo mismatch: {len(got)} of {len(msg)} bytes")
            done[0] += 1

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()

    # long-lived sessions, tailed and killed from the control socket meanwhile
    held = []
    for _ in range(6):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"hold\n")
        assert s.recv(100) == b"hold\n"
        held.append(s)
    # the held sessions by id: the history of closed sessions is a ring the churn soon overwrites,
    # so the test keeps its own list of what it killed
    by_client = {x["client"]: x["id"] for x in capd.ctl("sessions", json_out=True) if x["state"] == "open"}
    held_ids = [by_client[f"127.0.0.1:{s.getsockname()[1]}"] for s in held]
    killed = set()
    while going():
        ss = [x for x in capd.ctl("sessions", json_out=True) if x["state"] == "open"]
        if ss:
            sid = ss[-1]["id"]
            tail = subprocess.Popen([str(CAPCTL), "-s", str(capd.sock), "tail", "session", str(sid), "--raw", "--dir", "c2s"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(0.05)
            capd.ctl("kill", sid, check=False)  # it may have ended by itself already
            killed.add(sid)
            # it follows the session to its end, or finds it gone already
            assert tail.wait(15) in (0, 1), tail.stderr.read()
        capd.ctl("status", json_out=True)
        rounds[0] += 1
    for t in threads:
        t.join(30)
    # a kill cuts at most the one exchange it hit short
    assert len(errors) <= rounds[0], errors[:10]
    assert done[0] > 100 and rounds[0] > 5, (done, rounds)
    # the held sessions still carry data, unless a kill hit them
    dead = []
    for s, sid in zip(held, held_ids):
        try:
            s.sendall(b"still\n")
            if s.recv(100) == b"still\n":
                continue
        except OSError:
            pass
        dead.append(sid)
    assert set(dead) <= killed, (dead, sorted(killed & set(held_ids)))
    # removing the instance closes what is left on every thread; the counts come back to zero
    capd.ctl("remove", "fw")
    deadline = time.time() + 10
    while capd.ctl("status", json_out=True)["sessions"] and time.time() < deadline:
        time.sleep(0.1)
    assert capd.ctl("status", json_out=True)["sessions"] == 0
    for s in held:
        s.close()
    assert capd.proc.poll() is None
    assert capd.stop() == 0
    echo.close()


def pipes_of(pid):
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
        except OSError:
            pass
    return n


def test_sessions_killed_from_control_leave_no_pooled_pipes(capd_factory):
    """Spliced sessions on session threads, held back by a server that does not read,
    each hold a pipe; killed from the control socket (closed by the main thread for
    their thread), they leave the worker's pool too, as sessions that end by
    themselves do: an idle capd holds no pipes."""
    capd = capd_factory(settings="workers = 2")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{srv.getsockname()[1]}", "--no-capture")
    base = pipes_of(capd.proc.pid)
    clients, accepted = [], []
    for _ in range(12):
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        c.setblocking(False)
        clients.append(c)
        accepted.append(srv.accept()[0])
    chunk = os.urandom(1 << 20)
    for _ in range(4):  # past the tail backlog ring, so they splice, and on until the server's window is full
        for c in clients:
            try:
                c.send(chunk)
            except BlockingIOError:
                pass
        time.sleep(0.2)
    assert pipes_of(capd.proc.pid) > base  # pipes hold the bytes the server does not take
    for x in capd.ctl("sessions", json_out=True):
        if x["state"] == "open":
            capd.ctl("kill", x["id"], check=False)
    capd.wait_sessions(lambda ss: all(x["state"] == "closed" for x in ss))
    deadline = time.time() + 5
    while pipes_of(capd.proc.pid) > base and time.time() < deadline:
        time.sleep(0.1)
    assert pipes_of(capd.proc.pid) == base
    for s in clients + accepted:
        s.close()
    srv.close()
