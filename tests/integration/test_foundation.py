"""Issue 2: the daemon core, control socket, capctl and the forward instance."""

import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import BUILD, CAPCTL, CAPD, ROOT, EchoServer, exchange, free_port, refused_flow, sh, syn_hole, tshark


def curl(*args, timeout=30):
    return subprocess.run(["curl", "-sS", "--max-time", "20", *map(str, args)],
                          capture_output=True, timeout=timeout)


def test_forward_curl(capd, http_server):
    hport, www = http_server
    (www / "data.bin").write_bytes(os.urandom(100000))
    port = free_port()
    out = capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{hport}").stdout
    assert f"forward-{port}" in out
    r = curl(f"http://127.0.0.1:{port}/data.bin")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (www / "data.bin").read_bytes()
    ss = capd.wait_sessions(lambda ss: ss and ss[-1]["state"] == "closed")
    s = ss[-1]
    assert s["instance"] == f"forward-{port}"
    assert s["target"] == f"127.0.0.1:{hport}"
    assert s["bytes_down"] > 100000
    assert s["bytes_up"] > 50
    assert s["client"].startswith("127.0.0.1:")


def test_forward_by_name(capd, http_server):
    hport, _ = http_server
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"localhost:{hport}", "--name", "named")
    r = curl(f"http://127.0.0.1:{port}/")
    assert r.stdout == b"hello from the origin\n"
    lst = capd.ctl("list", json_out=True)
    assert [i["name"] for i in lst] == ["named"]
    assert lst[0]["to"] == f"localhost:{hport}"


def _transfer(port, payload, host="127.0.0.1"):
    """Sends payload, half-closes, reads everything back."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    got = bytearray()
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect((host, port))

        def reader():
            while True:
                d = s.recv(1 << 20)
                if not d:
                    break
                got.extend(d)

        t = threading.Thread(target=reader)
        t.start()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        t.join(90)
    return bytes(got)


def test_forward_50mb_echo_exact(capd, echo_server):
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{echo_server.port}")
    payload = os.urandom(50 * 1024 * 1024)
    got = _transfer(port, payload)
    assert len(got) == len(payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    ss = capd.wait_sessions(lambda ss: ss and ss[-1]["state"] == "closed")
    assert ss[-1]["bytes_up"] == len(payload)
    assert ss[-1]["bytes_down"] == len(payload)
    assert ss[-1]["reason"] == "closed"
    # the human table shows the same counts in short form
    table = capd.ctl("sessions").stdout
    assert "50M" in table


class OneServer:
    """A loopback server for one connection: serve(conn) runs on a thread of its own."""

    def __init__(self, serve):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(1)
        self.port = self.srv.getsockname()[1]
        self.thread = threading.Thread(target=self._run, args=(serve,))
        self.thread.start()

    def _run(self, serve):
        c, _ = self.srv.accept()
        with c:
            serve(c)

    def close(self):
        self.thread.join(10)
        self.srv.close()


def test_half_close(capd):
    """Client sends, shuts its write side, and still receives the whole reply."""
    reply = os.urandom(300000)

    def serve(c):
        data = b""
        while d := c.recv(65536):
            data += d
        time.sleep(0.2)  # the reply comes after the client's FIN
        c.sendall(hashlib.sha256(data).digest() + reply)

    srv = OneServer(serve)
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{srv.port}")
    req = os.urandom(123457)
    got = _transfer(port, req)
    srv.close()
    assert got == hashlib.sha256(req).digest() + reply


def test_half_closed_session_is_closing(capd):
    """A session one side of which has ended (its FIN passed on) while the other
    still sends is `closing` in the session list (capctl(1), DESIGN.md), then
    `closed` when the other side ends too."""
    go = threading.Event()

    def serve(c):
        while c.recv(65536):
            pass
        c.sendall(b"after your FIN")
        go.wait(10)

    srv = OneServer(serve)
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{srv.port}")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"hello")
        c.shutdown(socket.SHUT_WR)
        assert c.recv(100) == b"after your FIN"
        ss = capd.wait_sessions(lambda ss: ss and ss[-1]["state"] == "closing")
        assert ss[-1]["bytes_up"] == 5
        assert capd.ctl("sessions", "--open", json_out=True)[-1]["state"] == "closing"  # still open
        assert "closing" in capd.ctl("sessions").stdout
        go.set()
        srv.close()
        assert c.recv(100) == b""
    capd.wait_sessions(lambda ss: ss[-1]["state"] == "closed")


@pytest.mark.skipif(os.geteuid() != 0, reason="dumpcap on lo needs root")
def test_reply_and_fin_leave_in_one_segment(capd, tmp_path):
    """A server that answers and closes at once: capd reads the FIN waiting
    behind the reply (TCP_INQ) and the client gets the reply and the FIN in
    one segment, as the server sent them, not a segment and then a bare FIN."""
    reply = os.urandom(700)

    def serve(c):
        c.recv(100)
        c.send(reply, socket.MSG_MORE)  # held back: it leaves with the FIN
        c.shutdown(socket.SHUT_WR)
        c.recv(100)  # until the client closes

    srv = OneServer(serve)
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{srv.port}")
    ref = tmp_path / "lo.pcapng"
    dc = subprocess.Popen(["dumpcap", "-q", "-i", "lo", "-f", f"tcp port {port}", "-w", str(ref)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 15
        while not ref.exists() or ref.stat().st_size == 0:
            assert time.time() < deadline and dc.poll() is None, "dumpcap did not start"
            time.sleep(0.1)
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"hello\n")
            got = b""
            while d := s.recv(65536):
                got += d
        assert got == reply
        time.sleep(0.5)
    finally:
        dc.terminate()
        dc.wait(10)
        srv.close()
    fins = tshark("-r", ref, "-Y", f"tcp.srcport=={port} && tcp.flags.fin==1", "-T", "fields",
                  "-e", "tcp.len").stdout.split()
    assert fins == [str(len(reply))], fins


def test_upstream_refused(capd):
    dead = free_port()
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{dead}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(10)
        assert s.recv(100) == b""  # closed without data
    ss = capd.wait_sessions(lambda ss: ss and ss[-1]["state"] == "closed")
    assert "refused" in ss[-1]["reason"].lower()


def test_ipv6_forward(capd):
    e = EchoServer("::1")
    try:
        port = free_port(host="::1")
        capd.ctl("add", "forward", "--port", port, "--bind", "::1", "--to", f"[::1]:{e.port}")
        payload = os.urandom(70000)
        assert _transfer(port, payload, host="::1") == payload
        ss = capd.wait_sessions(lambda ss: ss and ss[-1]["state"] == "closed")
        assert ss[-1]["client"].startswith("[::1]:")
        assert ss[-1]["target"] == f"[::1]:{e.port}"
    finally:
        e.close()


@pytest.mark.parametrize("host,to", [("127.0.0.1", "0.0.0.0"), ("::1", "[::]"),
                                     ("127.0.0.1", "[::ffff:127.0.0.1]")])
def test_forward_to_unspecified_address_of_its_own_port_is_not_a_loop(capd, host, to):
    """`to = 0.0.0.0:PORT` (or [::]) on the instance's own port: the kernel connects
    0.0.0.0 to 127.0.0.1 (:: to ::1), so each connection connected to the instance
    itself, and that one again, until capd ran out of descriptors (~10000 sessions
    from one curl). It now fails the one session saying why, as 127.0.0.1:PORT does."""
    port = free_port(host=host)
    capd.ctl("add", "forward", "--port", port, "--bind", host, "--to", f"{to}:{port}")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect((host, port))
        assert s.recv(100) == b""  # closed without data
    ss = capd.wait_sessions(lambda ss: ss and ss[0]["state"] == "closed")
    time.sleep(0.5)
    ss = capd.ctl("sessions", json_out=True)
    assert len(ss) == 1, f"{len(ss)} sessions"
    assert "this instance's own address" in ss[0]["reason"], ss[0]


def test_forward_loop_between_two_instances_ends_at_the_second_lap(capd, echo_server):
    """Forward loops across instances: a forwarding to b and b to a went round
    until capd ran out of descriptors (one curl: 1024 of 1024 open, accept
    paused, curl timed out), since only an instance's own address was
    refused. Connections capd makes to its own listeners now carry the
    instances they came through, and b's connect back to a fails. A chain
    without a loop (c -> d -> echo server) still works."""
    a, b, c, d = (free_port() for _ in range(4))
    capd.ctl("add", "forward", "--port", a, "--to", f"127.0.0.1:{b}", "--name", "a")
    capd.ctl("add", "forward", "--port", b, "--to", f"127.0.0.1:{a}", "--name", "b")
    capd.ctl("add", "forward", "--port", c, "--to", f"127.0.0.1:{d}", "--name", "c")
    capd.ctl("add", "forward", "--port", d, "--to", f"127.0.0.1:{echo_server.port}", "--name", "d")
    assert exchange(c, b"through two instances") == b"through two instances"
    with socket.create_connection(("127.0.0.1", a), timeout=10) as s:
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    ss = capd.wait_sessions(lambda ss: sum(x["instance"] in ("a", "b") and x["state"] == "closed"
                                           for x in ss) >= 2)
    time.sleep(0.3)
    ss = [x for x in capd.ctl("sessions", json_out=True) if x["instance"] in ("a", "b")]
    assert len(ss) == 2, ss
    loop = [x for x in ss if x["instance"] == "b"][0]
    assert loop["reason"] == (f"a loop of capd instances: 127.0.0.1:{a} is instance a's address, "
                              "and this connection came through a already"), loop


# An echo server on a link-local address with its zone (argv: address, port).
V6_ECHO = r"""
import socket, sys
ai = socket.getaddrinfo(sys.argv[1], int(sys.argv[2]), socket.AF_INET6, socket.SOCK_STREAM)[0]
s = socket.socket(socket.AF_INET6)
s.bind(ai[4])
s.listen(4)
print("ready", flush=True)
c, _ = s.accept()
c.sendall(c.recv(100).upper())
c.close()
"""


def test_forward_to_a_link_local_address_with_its_zone(netns, ns_python, ns_capd):
    """`to = [fe80::53%lo]:PORT`, a link-local server as ip(8) and resolv.conf write
    it (lab devices often have no other address), was refused as "bad IPv6 address":
    inet_pton takes no zone. The zone now picks the interface, and the session's
    target names it."""
    sh("ip", "-n", netns, "-6", "addr", "add", "fe80::53/64", "dev", "lo")
    ns_python(netns, V6_ECHO, "fe80::53%lo", 7007)
    port = free_port()
    c = ns_capd(netns, f"[forward ll]\nlisten = 127.0.0.1:{port}\nto = [fe80::53%lo]:7007\n")
    client = ("import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), 5); "
              "s.sendall(b'hello'); print(s.recv(100).decode())")
    r = sh("ip", "netns", "exec", netns, "/usr/bin/python3", "-c", client, str(port))
    assert r.stdout.strip() == "HELLO"
    ss = c.wait_sessions(lambda ss: ss and ss[0]["state"] == "closed")
    assert ss[0]["target"] == "[fe80::53%lo]:7007", ss[0]
    assert [i["to"] for i in c.ctl("list", json_out=True)] == ["[fe80::53%lo]:7007"]


def test_remove_frees_port(capd, echo_server):
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{echo_server.port}", "--name", "f1")
    r = capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{echo_server.port}", "--name", "f2",
                 check=False)
    assert r.returncode == 1
    assert f"port {port} is in use" in r.stderr
    r = capd.ctl("add", "forward", "--port", free_port(), "--to", "127.0.0.1:9", "--name", "f1", check=False)
    assert r.returncode == 1 and "exists already" in r.stderr
    capd.ctl("remove", "f1")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the port is free again
    r = capd.ctl("remove", "f1", check=False)
    assert r.returncode == 1 and "no instance f1" in r.stderr


def test_remove_reply_matches_its_event(capd):
    """Known item 3: instance.remove answered "state": "removed" while its instance.remove
    event said "stopped", the word instance objects use for an instance that runs no more
    (running, failed, stopped). The reply is now the event's object."""
    with socket.socket(socket.AF_UNIX) as ev:
        ev.settimeout(10)
        ev.connect(str(capd.sock))
        ev.sendall(b'{"jsonrpc":"2.0","id":1,"method":"events.subscribe"}\n')
        lines = ev.makefile("r")
        assert json.loads(lines.readline())["result"]
        capd.ctl("add", "forward", "--port", free_port(), "--to", "127.0.0.1:9", "--name", "gone")
        reply = capd.ctl("remove", "gone", json_out=True)
        events = [json.loads(lines.readline())["params"] for _ in range(2)]
    assert [e.pop("event") for e in events] == ["instance.add", "instance.remove"]
    event = events[1]
    del event["time"]
    assert reply["state"] == "stopped" and reply == event, (reply, event)


def test_reload(capd_factory, echo_server):
    p1, p2, p3 = free_port(), free_port(), free_port()
    to = f"127.0.0.1:{echo_server.port}"
    c = capd_factory(f"[forward a]\nlisten = {p1}\nto = {to}\n[forward b]\nlisten = {p2}\nto = {to}\n")
    # an open session on a keeps flowing across a reload that leaves a unchanged
    s = socket.create_connection(("127.0.0.1", p1), timeout=10)
    s.sendall(b"before")
    assert s.recv(100) == b"before"
    c.write_conf(f"[forward a]\nlisten = {p1}\nto = {to}\n[forward c]\nlisten = {p3}\nto = {to}\n")
    out = c.ctl("reload")
    assert out.returncode == 0
    names = sorted(i["name"] for i in c.ctl("list", json_out=True))
    assert names == ["a", "c"]
    s.sendall(b"after")
    assert s.recv(100) == b"after"
    # a broken config changes nothing and says where it is broken
    c.write_conf(f"[forward a]\nlisten = {p1}\nto = {to}\nbogus = 1\n")
    r = c.ctl("reload", check=False)
    assert r.returncode == 1
    assert "capd.conf:" in r.stderr and "bogus" in r.stderr
    names = sorted(i["name"] for i in c.ctl("list", json_out=True))
    assert names == ["a", "c"]
    s.sendall(b"still")
    assert s.recv(100) == b"still"
    s.close()
    # SIGHUP does the same as capctl reload
    c.write_conf(f"[forward a]\nlisten = {p1}\nto = {to}\n")
    c.proc.send_signal(1)
    deadline = time.time() + 5
    while time.time() < deadline:
        if [i["name"] for i in c.ctl("list", json_out=True)] == ["a"]:
            break
        time.sleep(0.05)
    assert [i["name"] for i in c.ctl("list", json_out=True)] == ["a"]


def test_reload_keeps_settings_read_at_start(capd_factory, tmp_path):
    """A reload that changes a [capd] setting read only at start says so, once per
    key, and capd keeps showing and using the value it started with (status used
    to name the new spool folder, which nothing was written to)."""
    c = capd_factory("")
    spool, state = str(c.spool), str(c.state)
    conf = c.conf_path.read_text()
    conf = conf.replace(f"spool = {spool}", f"spool = {tmp_path}/spool2")
    conf = conf.replace(f"state_dir = {state}", f"state_dir = {tmp_path}/state2")
    # the keys added go to [capd], the file's only section
    c.conf_path.write_text(conf + f"user = root\ncontrol_group = root\nca_cert = {tmp_path}/ca2.pem\n")
    c.ctl("reload")
    st = c.ctl("status", json_out=True)
    assert st["spool"] == spool
    log = c.log()
    for key in ("spool folder", "state_dir", "user", "control_group", "ca_cert"):
        assert f"{key} changes only at restart" in log, log
    assert not (tmp_path / "spool2").exists() and not (tmp_path / "state2").exists()
    # a reload of the same file says nothing more
    n = log.count("changes only at restart")
    c.ctl("reload")
    assert c.log().count("changes only at restart") == n * 2
    c.write_conf()
    c.ctl("reload")
    assert c.log().count("changes only at restart") == n * 2, c.log()


def test_reload_keeps_capctl_instances(capd_factory, echo_server):
    c = capd_factory("")
    port = free_port()
    c.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{echo_server.port}", "--name", "live")
    c.ctl("reload")
    assert [i["name"] for i in c.ctl("list", json_out=True)] == ["live"]


def test_config_instance_that_cannot_start(capd_factory, echo_server):
    """An instance of the file that cannot start (its port taken) stops capd at start-up, and
    fails a reload, with the file and line; a reload that names a capctl instance says so and
    leaves it running; the rest of the file starts."""
    to = f"127.0.0.1:{echo_server.port}"
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    try:
        c = capd_factory(f"[forward ok]\nlisten = {free_port()}\nto = {to}\n\n[forward busy]\nlisten = {taken}\nto = {to}\n",
                         start=False)
        c.start(wait=False)
        assert c.proc.wait(10) == 1
        line = c.conf_path.read_text().splitlines().index("[forward busy]") + 1
        assert f"capd.conf:{line}: [forward busy]: port {taken} is in use" in c.log(), c.log()

        p1, p2 = free_port(), free_port()
        c = capd_factory(f"[forward a]\nlisten = {p1}\nto = {to}\n")
        c.ctl("add", "forward", "--port", p2, "--to", to, "--name", "live")
        c.write_conf(f"[forward a]\nlisten = {p1}\nto = {to}\n[forward busy]\nlisten = {taken}\nto = {to}\n"
                     f"[forward live]\nlisten = {free_port()}\nto = {to}\n[forward b]\nlisten = {free_port()}\nto = {to}\n")
        r = c.ctl("reload", check=False)
        assert r.returncode == 1
        line = c.conf_path.read_text().splitlines().index("[forward busy]") + 1
        assert f"capd.conf:{line}: [forward busy]: port {taken} is in use" in r.stderr, r.stderr
        line = c.conf_path.read_text().splitlines().index("[forward live]") + 1
        assert (f"capd.conf:{line}: [forward live]: the name of an instance added by capctl; remove that first"
                in r.stderr), r.stderr
        got = {i["name"]: i for i in c.ctl("list", json_out=True)}
        # busy could not start: listed failed with the reason (it was left out before)
        assert sorted(got) == ["a", "b", "busy", "live"]
        assert got["busy"]["state"] == "failed" and f"port {taken} is in use" in got["busy"]["error"], got
        assert got["live"]["origin"] == "capctl" and got["live"]["listen"] == f"127.0.0.1:{p2}"
        assert exchange(p2, b"still here") == b"still here"
    finally:
        busy.close()



def test_control_answers_a_half_closed_peer(capd):
    """A peer that sends its requests and half-closes (echo ... | socat - UNIX-CONNECT:...)
    gets every reply, however much is still queued, and then the close; a last
    request without its newline counts too."""
    n = 3000
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(capd.sock))
        reqs = b"".join(json.dumps({"jsonrpc": "2.0", "id": i, "method": "daemon.status"}).encode() + b"\n"
                        for i in range(1, n))
        s.sendall(reqs + json.dumps({"jsonrpc": "2.0", "id": n, "method": "daemon.status"}).encode())
        s.shutdown(socket.SHUT_WR)
        time.sleep(0.5)  # capd reads the end while most replies still wait to be sent
        s.settimeout(20)
        data = b""
        while True:
            d = s.recv(1 << 20)
            if not d:
                break
            data += d
    ids = [json.loads(line)["id"] for line in data.splitlines()]
    assert ids == list(range(1, n + 1))


def test_rpc_errors(capd):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(capd.sock))
        f = s.makefile("rwb")
        f.write(b"{this is not json\n")
        f.flush()
        r = json.loads(f.readline())
        assert r["error"]["code"] == -32700 and r["id"] is None
        f.write(b'{"jsonrpc":"2.0","id":2,"method":"no.such"}\n')
        f.flush()
        r = json.loads(f.readline())
        assert r["error"]["code"] == -32601 and r["id"] == 2
        f.write(b'{"jsonrpc":"2.0","id":3,"method":"session.kill","params":{"id":"x"}}\n')
        f.flush()
        r = json.loads(f.readline())
        assert r["error"]["code"] == -32602 and "id" in r["error"]["message"]
        # "-1" was read as 2^64-1 ("no session 18446744073709551615")
        for bad in (b'"-1"', b'" 1"', b'"99999999999999999999999"'):
            f.write(b'{"jsonrpc":"2.0","id":3,"method":"session.kill","params":{"id":' + bad + b'}}\n')
            f.flush()
            r = json.loads(f.readline())
            assert r["error"]["code"] == -32602, (bad, r)
        f.write(b'{"jsonrpc":"2.0","id":4,"method":"instance.add","params":{"type":"forward","listen":"1"}}\n')
        f.flush()
        r = json.loads(f.readline())
        assert "needs 'to" in r["error"]["message"]
        # over 1 MiB: refused, and the same connection still serves
        f.write(b'{"jsonrpc":"2.0","id":5,"method":"daemon.status","params":{"x":"' + b"a" * (1100 * 1024) + b'"}}\n')
        f.flush()
        r = json.loads(f.readline())
        assert r["error"]["code"] == -32002
        f.write(b'{"jsonrpc":"2.0","id":6,"method":"daemon.status"}\n')
        f.flush()
        r = json.loads(f.readline())
        assert r["id"] == 6 and r["result"]["pid"] == capd.proc.pid
    # and a new connection is served too
    assert capd.rpc("daemon.status")["result"]["instances"] == 0


def rpc_lines(capd, raw, timeout=10):
    """Sends raw bytes, then a daemon.status with id "end"; returns the reply lines
    before that one's (so a request that gets no reply shows as none)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(capd.sock))
        s.sendall(raw + b'{"jsonrpc":"2.0","id":"end","method":"daemon.status"}\n')
        data = b""
        while b'"id":"end"' not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    got = [json.loads(x) for x in data.splitlines()]
    assert got[-1]["id"] == "end" and "result" in got[-1]
    return got[:-1]


def test_rpc_notifications_get_no_reply(capd):
    """JSON-RPC 2.0: a request without an id is a notification, and capd must not
    answer it, even when its method is unknown or its params are wrong (capd
    answered those with an error of id null, which a client takes for its own)."""
    for req in ({"jsonrpc": "2.0", "method": "no.such"},
                {"jsonrpc": "2.0", "method": "daemon.status", "params": [1]},
                {"jsonrpc": "2.0", "method": "session.kill", "params": {"id": "x"}},
                {"jsonrpc": "2.0", "method": "daemon.status"}):
        assert rpc_lines(capd, json.dumps(req).encode() + b"\n") == [], req
    # what is not a request at all is still answered, with id null
    r = rpc_lines(capd, b'{"jsonrpc":"2.0","params":{}}\n')
    assert len(r) == 1 and r[0]["error"]["code"] == -32600 and r[0]["id"] is None


def test_rpc_invalid_version_or_id_refused(capd):
    """JSON-RPC 2.0: a request whose "jsonrpc" is not "2.0" (or is missing), or
    whose id is an array, an object or a boolean, is an Invalid Request answered
    with id null; capd ran them and echoed the odd id back."""
    for req in ({"jsonrpc": "1.0", "id": 1, "method": "daemon.status"},
                {"id": 1, "method": "daemon.status"},
                {"jsonrpc": 2.0, "id": 1, "method": "daemon.status"},
                {"jsonrpc": "1.0", "method": "daemon.status"},
                {"jsonrpc": "2.0", "id": [1], "method": "daemon.status"},
                {"jsonrpc": "2.0", "id": {"a": 1}, "method": "daemon.status"},
                {"jsonrpc": "2.0", "id": True, "method": "daemon.status"},
                {"jsonrpc": "2.0", "id": 1, "method": 5}):
        r = rpc_lines(capd, json.dumps(req).encode() + b"\n")
        assert len(r) == 1 and r[0]["error"]["code"] == -32600 and r[0]["id"] is None, (req, r)
    # the ids JSON-RPC 2.0 allows are still echoed
    for rid in ("a", 7, 1.5, None):
        r = rpc_lines(capd, json.dumps({"jsonrpc": "2.0", "id": rid, "method": "daemon.status"}).encode() + b"\n")
        assert len(r) == 1 and r[0]["id"] == rid and "result" in r[0], (rid, r)
    # and capctl, which speaks 2.0, still works
    assert capd.ctl("status").returncode == 0


def test_rpc_number_out_of_range(capd):
    """Known item 4: an id past 2^63 - 1 (or any number jansson cannot hold) is good JSON,
    but capd answered it as a parse error (-32700). It is now an invalid request (-32600)
    naming the number; an id that is itself out of range cannot be echoed as it came and
    is answered with id null, a smaller one is echoed; a notification gets no reply, and a
    batch holding such a number has each of its requests refused, none run."""
    def one(raw):
        return rpc_lines(capd, raw + b"\n")

    for big in (b"18446744073709551616", b"9223372036854775808", b"-9223372036854775809"):
        r = one(b'{"jsonrpc":"2.0","id":' + big + b',"method":"daemon.status"}')
        assert len(r) == 1 and r[0]["id"] is None and r[0]["error"]["code"] == -32600, r
        assert big.decode() in r[0]["error"]["message"] and "an id may be a string" in r[0]["error"]["message"]
    for rid in (3, "s", 2.5):
        r = one(b'{"jsonrpc":"2.0","id":' + json.dumps(rid).encode()
                + b',"method":"session.kill","params":{"id":99999999999999999999}}')
        assert len(r) == 1 and r[0]["id"] == rid and r[0]["error"]["code"] == -32600, r
    r = one(b'{"jsonrpc":"2.0","id":1e999,"method":"daemon.status"}')
    assert len(r) == 1 and r[0]["id"] is None and r[0]["error"]["code"] == -32600, r
    assert one(b'{"jsonrpc":"2.0","method":"daemon.status","params":{"x":99999999999999999999}}') == []
    r = one(b'[{"jsonrpc":"2.0","id":1,"method":"instance.add","params":{"type":"forward","listen":"'
            + str(free_port()).encode() + b'","to":"127.0.0.1:9"}},'
            b'{"jsonrpc":"2.0","id":18446744073709551616,"method":"daemon.status"},'
            b'{"jsonrpc":"2.0","method":"daemon.status"}]')
    assert len(r) == 1 and [x["id"] for x in r[0]] == [1, None], r
    assert all(x["error"]["code"] == -32600 for x in r[0]), r
    assert capd.ctl("list", json_out=True) == []  # the batch's instance.add did not run
    # the largest id capd holds is still served and echoed
    r = one(b'{"jsonrpc":"2.0","id":9223372036854775807,"method":"daemon.status"}')
    assert r[0]["id"] == 2**63 - 1 and "result" in r[0], r


def test_rpc_error_message_cut_inside_a_character(capd):
    """An unknown method's name is quoted up to 200 bytes: one with "é" across that cut made
    a message that was not UTF-8, json_pack() failed and capd sent an empty line, which a
    client skips as a keep-alive while it waits for its reply for ever."""
    method = "a" * 199 + "é"
    r = rpc_lines(capd, json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode() + b"\n")
    assert len(r) == 1 and r[0]["id"] == 1 and r[0]["error"]["code"] == -32601, r
    assert r[0]["error"]["message"] == f"unknown method '{'a' * 199}?'", r


def test_session_list_refuses_filters_of_the_wrong_type(capd, echo_server):
    """session.list with "open": 1 or "instance": 5 listed every session, closed
    ones and other instances' too, as if no filter had been given."""
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{echo_server.port}", "--name", "f")
    assert exchange(port, b"x") == b"x"
    capd.wait_sessions(lambda ss: len(ss) == 1 and ss[0]["state"] == "closed")
    for params in ({"open": 1}, {"open": "yes"}, {"instance": 5}, {"instance": None}):
        r = capd.rpc("session.list", params)
        assert r.get("error", {}).get("code") == -32602, (params, r)
    assert capd.rpc("session.list", {"open": True})["result"] == []
    assert len(capd.rpc("session.list", {"open": False, "instance": "f"})["result"]) == 1


def test_rpc_batch(capd):
    """JSON-RPC 2.0 batches: an array of requests gets one array of their replies
    (none for notifications), in order, and what waits on a started instance
    (instance.add) holds the rest of the batch; capd refused every batch as
    "invalid request"."""
    port = free_port()
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "daemon.status"},
             {"jsonrpc": "2.0", "method": "daemon.status"},
             {"jsonrpc": "2.0", "id": 2, "method": "instance.add",
              "params": {"type": "socks", "name": "b", "listen": port}},
             {"jsonrpc": "2.0", "id": 3, "method": "instance.list"},
             {"jsonrpc": "2.0", "id": 4, "method": "no.such"},
             5]
    r = rpc_lines(capd, json.dumps(batch).encode() + b"\n")
    assert len(r) == 1 and isinstance(r[0], list), r
    got = r[0]
    assert [x["id"] for x in got] == [1, 2, 3, 4, None]
    assert got[0]["result"]["pid"] == capd.proc.pid
    assert got[1]["result"]["name"] == "b"
    assert [i["name"] for i in got[2]["result"]] == ["b"]
    assert got[3]["error"]["code"] == -32601 and got[4]["error"]["code"] == -32600
    # a batch of notifications only is answered with nothing
    assert rpc_lines(capd, b'[{"jsonrpc":"2.0","method":"daemon.status"}]\n') == []
    # an empty batch, and JSON that is not a request, are invalid requests
    for raw in (b"[]\n", b"5\n", b'"x"\n'):
        r = rpc_lines(capd, raw)
        assert len(r) == 1 and r[0]["error"]["code"] == -32600 and r[0]["id"] is None, raw


def test_instance_add_takes_json_values(capd):
    """A script's instance.add may give numbers, booleans and lists as JSON, in the shapes
    instance.list shows them; a value of a type no key takes is refused by name."""
    p1, p2 = free_port(), free_port()
    r = capd.rpc("instance.add", {"type": "http", "name": "h", "listen": p1, "capture": False,
                                  "connect_ports": [443, "8443"], "max_header_size": 4096})
    assert "result" in r, r
    r = capd.rpc("instance.add", {"type": "dns", "name": "d", "listen": f"127.0.0.1:{p2}", "ttl": 7,
                                  "answer": ["a.test=10.0.0.1", "b.test=::1"], "upstream": "127.0.0.1:9"})
    assert "result" in r, r
    got = {i["name"]: i for i in capd.ctl("list", json_out=True)}
    assert got["h"]["listen"] == f"127.0.0.1:{p1}" and got["h"]["capture"] is False
    assert got["h"]["connect_ports"] == [443, 8443] and got["h"]["max_header_size"] == 4096
    assert got["d"]["ttl"] == 7 and got["d"]["answer"] == ["a.test=10.0.0.1", "b.test=::1"]
    # what list shows goes back in
    r = capd.rpc("instance.add", {"type": "http", "name": "h2", "listen": free_port(),
                                  "connect_ports": got["h"]["connect_ports"]})
    assert "result" in r, r
    for params, says in (({"capture": {"a": 1}}, "'capture' has a value of the wrong type"),
                         ({"to": ["127.0.0.1:9", "127.0.0.1:10"]}, "'to' may be given only once"),
                         # an object or an empty list is no value given twice
                         ({"to": {"a": 1}}, "'to' has a value of the wrong type"),
                         ({"to": []}, "'to' has a value of the wrong type"),
                         ({"name": {"a": 1}}, "'name' has a value of the wrong type"),
                         ({"capture": "maybe"}, "bad value for 'capture'"),
                         ({"idle_timeout": -1}, "bad duration for 'idle_timeout'")):
        base = {"type": "forward", "name": "f", "listen": free_port(), "to": "127.0.0.1:9"}
        r = capd.rpc("instance.add", {**base, **params})
        assert says in r["error"]["message"], r
    r = capd.rpc("instance.add", {"type": "http", "name": "h3", "listen": free_port(), "connect_ports": [443, 1.5]})
    assert "'connect_ports' must be a list of strings or numbers" in r["error"]["message"], r
    assert sorted(i["name"] for i in capd.ctl("list", json_out=True)) == ["d", "h", "h2"]


def test_capd_t(tmp_path):
    good = tmp_path / "good.conf"
    good.write_text("[capd]\nspool = /tmp/x\n[forward a]\nlisten = 4444\nto = example.com:80\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text("[capd]\nspool = /tmp/x\n\n[forward a]\nlisten = 4444\nto = example.com\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{bad}:6:" in r.stderr
    r = subprocess.run([str(CAPD), "-t", "-c", str(tmp_path / "missing.conf")], capture_output=True, text=True)
    assert r.returncode == 1 and "No such file" in r.stderr
    r = subprocess.run([str(CAPD), "-V"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("capd ")



def capd_t(tmp_path, text):
    f = tmp_path / "t.conf"
    f.write_text(text)
    r = subprocess.run([str(CAPD), "-t", "-c", str(f)], capture_output=True, text=True)
    return r.returncode, r.stderr.replace(str(f), "t.conf")


def test_capd_t_asks_the_system(tmp_path):
    """What start-up would refuse, capd -t refuses too, with the line."""
    rc, err = capd_t(tmp_path, "[capd]\nspool = /tmp/x\ncontrol_group = no-such-group-capd\n")
    assert rc == 1 and "t.conf:3: control_group = no-such-group-capd: no such group" in err, err
    if os.geteuid() == 0:
        rc, err = capd_t(tmp_path, "[capd]\nuser = no-such-user-capd\n")
        assert rc == 1 and "t.conf:2: user = no-such-user-capd: no such user" in err, err


def test_capd_t_sections_and_lines(tmp_path):
    """A section without keys is checked like any other, a line too long for the
    parser is refused at its own line, and an indented line continues a value."""
    rc, err = capd_t(tmp_path, "[capd]\nspool = /tmp/x\n\n[bogus]\n")
    assert rc == 1 and "t.conf:4: section [bogus] should be [capd] or [TYPE NAME]" in err, err
    rc, err = capd_t(tmp_path, "[capd]\nspool = /tmp/x\n[forward a]\n; nothing yet\n")
    assert rc == 1 and "t.conf:3: a forward instance needs 'listen'" in err, err
    rc, err = capd_t(tmp_path, "[forward a]\nlisten = 4444\nto = h:80\n[forward a]\n")
    assert rc == 1 and "t.conf:4: instance name 'a' is used twice" in err, err
    names = ",".join(f"host{i}.example" for i in range(20))
    rc, err = capd_t(tmp_path, f"[http h]\nlisten = 4444\ntls = yes\ntls_passthrough = {names}\n")
    assert rc == 1 and "t.conf:4: line longer than 198 characters" in err, err
    half = len(names) // 2
    cut = names.index(",", half)
    rc, err = capd_t(tmp_path, f"[http h]\nlisten = 4444\ntls = yes\ntls_passthrough = {names[:cut]}\n"
                               f"    {names[cut:]}\n")
    assert rc == 0, err
    rc, err = capd_t(tmp_path, "[forward a]\nlisten = 4444\n    to = h:80\n")
    assert rc == 1 and "t.conf:3: indented 'to = ...' would continue the value of 'listen'" in err, err
    rc, err = capd_t(tmp_path, "[capd]\nspool = /tmp/x\n   /y\n")
    assert rc == 1 and "t.conf:3: 'spool' takes its value on one line" in err, err




def test_capd_t_config_is_a_folder(capd_factory, tmp_path):
    """-c naming a folder (capd -c /etc/capd) read as an empty file: capd -t said
    "configuration is good (0 instances)" and capd would start on every default;
    a reload from a config turned folder changed everything to the defaults."""
    r = subprocess.run([str(CAPD), "-t", "-c", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and f"capd: {tmp_path}: Is a directory" in r.stderr, (r.returncode, r.stderr)
    c = capd_factory(f"[forward f]\nlisten = {free_port()}\nto = 127.0.0.1:9\n")
    c.conf_path.unlink()
    c.conf_path.mkdir()
    r = c.ctl("reload", check=False)
    assert r.returncode == 1 and "Is a directory" in r.stderr, r.stderr
    assert [i["name"] for i in c.ctl("list", json_out=True)] == ["f"]


def test_reload_of_an_empty_config_is_refused(capd_factory, tmp_path):
    """Known item 5: a reload that read the file while an editor had truncated it took the
    empty file as a config of no instances: it removed every config instance and put the
    [capd] settings back to their defaults, and capctl reload said "reloaded". An empty
    file (or one of only comments) is now refused on reload (and, since, at start and by
    capd -t too: test_capd_t_refuses_what_reload_refuses)."""
    c = capd_factory(f"[forward f]\nlisten = {free_port()}\nto = 127.0.0.1:9\n")
    c.conf_path.write_text("")
    r = c.ctl("reload", check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr == (f"capctl: reload failed, nothing changed: {c.conf_path}: the file has no section "
                        "(empty, or being written?); capd needs [capd] or an instance section\n"), r.stderr
    assert [i["name"] for i in c.ctl("list", json_out=True)] == ["f"]
    c.conf_path.write_text("; being written\n")
    c.proc.send_signal(1)
    deadline = time.time() + 5
    while "reload refused" not in c.log() and time.time() < deadline:
        time.sleep(0.02)
    assert "reload refused, the running config stays" in c.log()
    assert [i["name"] for i in c.ctl("list", json_out=True)] == ["f"]


def test_capd_setting_not_utf8_is_refused(tmp_path):
    """A [capd] path that is not UTF-8 (spool = /x\\xff) was taken, and then `capctl status`
    and `capctl capture status` only said "capctl: failed": their JSON cannot hold it. It is
    refused as an instance's value is, with its file and line."""
    f = tmp_path / "t.conf"
    f.write_bytes(b"[capd]\ncontrol = " + str(tmp_path).encode() + b"/c.sock\nspool = /tmp/sp\xff\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(f)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and f"{f}:3: value of 'spool' is not valid UTF-8" in r.stderr, r.stderr


def test_capd_t_section_without_bracket(tmp_path):
    """A section header missing its ']' is the error, at its line: its keys went to the
    section above, which capd then blamed ("'listen' is set twice in [forward a]")."""
    rc, err = capd_t(tmp_path, "[forward a]\nlisten = 4444\nto = h:80\n[forward b\nlisten = 4445\nto = h:80\n")
    assert rc == 1 and "t.conf:4: section header without its ']'" in err, err
    rc, err = capd_t(tmp_path, "[capd]\nlog_level = info\n[socks s\nlisten = 4444\n")
    assert rc == 1 and "t.conf:3: section header without its ']'" in err, err


def test_config_with_byte_order_mark(capd_factory):
    """A file an editor saved with a UTF-8 byte order mark was refused: "'control' is
    outside any section", at line 2, for the [capd] on line 1."""
    port = free_port()
    c = capd_factory(start=False)
    text = c.conf_path.read_text() + f"[forward f]\nlisten = {port}\nto = 127.0.0.1:9\n"
    c.conf_path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    r = subprocess.run([str(CAPD), "-t", "-c", str(c.conf_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    c.start()
    assert [i["listen"] for i in c.ctl("list", json_out=True)] == [f"127.0.0.1:{port}"]

def test_capd_t_empty_path(tmp_path):
    """A path key left empty named the config file's own folder: "spool =" passed
    capd -t and capd wrote its captures beside the config."""
    for key in ("control", "spool", "state_dir", "hosts_file", "ca_cert", "ca_key", "keylog_file"):
        rc, err = capd_t(tmp_path, f"[capd]\nlog_level = info\n{key} =\n")
        assert rc == 1 and f"t.conf:3: '{key}' needs a path" in err, (key, err)
    rc, err = capd_t(tmp_path, "[socks s]\nlisten = 4444\nusers =\n")
    assert rc == 1 and "t.conf:3: 'users' needs a path" in err, err
    assert list(tmp_path.glob("*.pcapng")) == []

def test_capd_t_listen_port_out_of_range(tmp_path):
    """A bare port out of range was called a bad address that lacked its host."""
    for port in ("0", "70000"):
        rc, err = capd_t(tmp_path, f"[forward f]\nlisten = {port}\nto = 127.0.0.1:80\n")
        assert rc == 1 and f"t.conf:2: bad port '{port}': expected 1-65535" in err, (port, err)
    rc, err = capd_t(tmp_path, "[forward f]\nlisten = 127.0.0.1:99999\nto = 127.0.0.1:80\n")
    assert rc == 1 and "expected 1-65535" in err, err
    # digits and dots are a mistyped address, not a name to look up when a client comes
    for to in ("256.1.1.1:80", "1.2.3:80"):
        rc, err = capd_t(tmp_path, f"[forward f]\nlisten = 61090\nto = {to}\n")
        assert rc == 1 and f"t.conf:3: bad IPv4 address in '{to}'" in err, (to, err)

def test_capd_t_two_sections_on_one_listen_address(tmp_path, capd_factory):
    """capd -t called a file good whose two sections listen on one address, and
    capd then failed to start the second; now -t, start-up and a reload refuse it
    with the line, whatever the spelling (61091, 127.0.0.1:61091, a wildcard)."""
    to = "to = 127.0.0.1:80\n"
    rc, err = capd_t(tmp_path, f"[forward a]\nlisten = 61091\n{to}\n[socks b]\nlisten = 127.0.0.1:61091\n")
    assert rc == 1 and "t.conf:6: listen = 127.0.0.1:61091: the port is taken by [forward a] (line 2)" in err, err
    rc, err = capd_t(tmp_path, f"[forward a]\nlisten = *:61091\nexpose = yes\n{to}[sniff s]\ninterface = lo\n"
                               "[http b]\nlisten = 127.0.0.2:61091\n")
    assert rc == 1 and "t.conf:8: listen = 127.0.0.2:61091: the port is taken by [forward a] (line 2)" in err, err
    # other addresses, or the other family, are another listening socket
    rc, err = capd_t(tmp_path, f"[forward a]\nlisten = 61091\n{to}[forward b]\nlisten = 127.0.0.2:61091\n{to}"
                               f"[forward c]\nlisten = [::1]:61091\n{to}")
    assert rc == 0, err
    p1, p2 = free_port(), free_port()
    c = capd_factory(f"[forward a]\nlisten = {p1}\n{to}[forward b]\nlisten = {p2}\n{to}")
    c.write_conf(f"[forward a]\nlisten = {p1}\n{to}[forward b]\nlisten = {p1}\n{to}")
    r = c.ctl("reload", check=False)
    assert r.returncode == 1 and "reload failed, nothing changed" in r.stderr and "port is taken" in r.stderr, r.stderr
    assert sorted(i["listen"] for i in c.ctl("list", json_out=True)) == sorted([f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"])

def test_hash_comment_after_a_value(capd_factory, echo_server):
    """A '#' note after a value stayed in it (inih cuts only ' ;' ones): a path key
    silently named a file or folder 'x # note', other keys failed as bad values.
    Now ' #' starts a comment as ' ;' does, on key lines and continued lines."""
    p = free_port()
    c = capd_factory(f"[forward a]   # the echo\nlisten = {p} # here\nto = 127.0.0.1:{echo_server.port}\t# echo\n"
                     "idle_timeout = 5 # seconds\n",
                     settings="rotate_size = 1M # small\ncontrol_group = root # admins\n")
    got = c.ctl("list", json_out=True)[0]
    assert got["listen"] == f"127.0.0.1:{p}" and got["to"] == f"127.0.0.1:{echo_server.port}", got
    assert exchange(p, b"noted") == b"noted"
    rc, err = capd_t(c.dir, "[sniff s]\ninterface = lo\nfilter = tcp port 80 # web\n    or udp port 53 # dns\n")
    assert rc == 0, err
    # a '#' inside a value, with no blank before it, stays
    rc, err = capd_t(c.dir, "[capd]\nrotate_size = 1M#x\n")
    assert rc == 1 and "'1M#x'" in err, err

def test_capd_t_longest_line_with_crlf(tmp_path):
    """A line of the 198 characters capd.conf(5) allows was refused as longer
    than 198 when the file has CRLF line ends (a Windows editor)."""
    line = "spool = /" + "x" * 189
    assert len(line) == 198
    rc, err = capd_t(tmp_path, f"[capd]\r\n{line}\r\n[forward f]\r\nlisten = 61090\r\nto = 127.0.0.1:80\r\n")
    assert rc == 0, err
    # and the lines after it keep their numbers
    rc, err = capd_t(tmp_path, f"[capd]\r\n{line}\r\nbogus = 1\r\n")
    assert rc == 1 and "t.conf:3: unknown key 'bogus' in [capd]" in err, err
    rc, err = capd_t(tmp_path, f"[capd]\r\n{line}x\r\n")
    assert rc == 1 and "t.conf:2: line longer than 198 characters" in err, err

def test_dns_upstream_ipv6_in_brackets_without_port(tmp_path):
    """upstream = [::1] (the form capd prints) was refused for lacking a port."""
    rc, err = capd_t(tmp_path, "[dns d]\nlisten = 61055\nupstream = [::1]\n")
    assert rc == 0, err
    rc, err = capd_t(tmp_path, "[dns d]\nlisten = 61055\nupstream = [::1\n")
    assert rc == 1 and "t.conf:3: bad upstream '[::1'" in err, err
    rc, err = capd_t(tmp_path, "[dns d]\nlisten = 61055\nupstream = [nohost]\n")
    assert rc == 1 and "t.conf:3: bad upstream" in err, err

def test_sniffer_refuses_keys_of_listening_instances(tmp_path):
    """idle_timeout, connect_timeout and expose were taken and ignored by a sniffer."""
    for key, val in (("idle_timeout", "5s"), ("connect_timeout", "1s"), ("expose", "yes")):
        rc, err = capd_t(tmp_path, f"[sniff s]\ninterface = lo\n{key} = {val}\n")
        assert rc == 1 and f"t.conf:3: '{key}' applies to instances that listen, not to sniff" in err, (key, err)
    rc, err = capd_t(tmp_path, "[sniff s]\ninterface = lo\ncapture = no\n")
    assert rc == 0, err
    r = subprocess.run([str(CAPCTL), "add", "sniff", "--interface", "lo", "--idle-timeout", "5s"],
                       capture_output=True, text=True, env={**os.environ, "CAPD_SOCKET": str(tmp_path / "none")})
    assert r.returncode == 2 and "unknown option --idle-timeout for add sniff" in r.stderr, r.stderr

def test_continued_value_reaches_the_instance(capd_factory):
    port = free_port()
    c = capd_factory(f"[http h]\nlisten = {port}\ntls = yes\ntls_passthrough = a.example,\n"
                     "  b.example   ; a comment\n\n  *.c.example\n")
    got = {i["name"]: i for i in c.ctl("list", json_out=True)}
    assert got["h"]["tls_passthrough"] in ("a.example, b.example *.c.example",
                                           ["a.example", "b.example", "*.c.example"]), got["h"]


def test_second_capd_refused_and_stale_socket(capd_factory):
    a = capd_factory("")
    b = capd_factory("", start=False)
    b.sock = a.sock
    b.write_conf("")
    b.conf_path.write_text(b.conf_path.read_text().replace(str(b.dir / "capd.sock"), str(a.sock)))
    b.start(wait=False)
    assert b.proc.wait(10) == 1
    assert "capd already running on" in b.log()
    # kill -9 leaves the socket file behind; the next capd replaces it
    a.proc.kill()
    a.proc.wait()
    assert a.sock.exists()
    a.start()
    assert a.ctl("status").returncode == 0


def test_control_path_that_is_not_a_socket_is_kept(capd_factory):
    """capd took whatever was at its control path for a stale socket and unlinked it:
    `control =` naming a file by mistake deleted that file. Only a socket is replaced."""
    c = capd_factory("", start=False)
    c.sock.write_text("precious\n")
    c.start(wait=False)
    assert c.proc.wait(10) == 1
    assert f"{c.sock} exists and is not a socket: capd replaces only a stale socket" in c.log(), c.log()
    assert c.sock.read_text() == "precious\n"
    c.sock.unlink()
    c.sock.symlink_to(c.dir / "capd.conf")
    c.start(wait=False)
    assert c.proc.wait(10) == 1
    assert c.sock.is_symlink() and (c.dir / "capd.conf").exists()


def test_second_capd_on_the_same_spool_or_state_dir_refused(capd_factory):
    """A second capd with its own control socket but the first's spool or state_dir
    started, "repaired" the file the first was writing, deleted its files at rotation
    and handed out the first's session ids; it now exits 1 and the first keeps its
    files. One folder that is both spool and state_dir is still fine."""
    a = capd_factory("")
    files = a.pcaps()
    assert files
    for shared in ("spool", "state_dir"):
        b = capd_factory("", start=False)
        mine, theirs = (b.spool, a.spool) if shared == "spool" else (b.state, a.state)
        b.conf_path.write_text(b.conf_path.read_text().replace(f"{shared} = {mine}\n", f"{shared} = {theirs}\n"))
        b.start(wait=False)
        assert b.proc.wait(10) == 1, b.log()
        assert "is in use by another capd" in b.log()
        assert not b.sock.exists()
    assert a.pcaps() == files
    assert a.ctl("status").returncode == 0
    # kill -9 lets go of the folders: the next capd takes them
    a.proc.kill()
    a.proc.wait()
    a.start()
    one = capd_factory("", start=False)
    one.conf_path.write_text(one.conf_path.read_text().replace(f"state_dir = {one.state}\n",
                                                               f"state_dir = {one.spool}\n"))
    one.start()
    assert one.ctl("status").returncode == 0


def test_second_capd_of_one_config_leaves_the_first_socket_alone(capd_factory):
    """Two capds of one config started at the same moment: the second found the
    first's socket file before the first listened on it, took it for stale, and
    replaced it, leaving the first running where no capctl could reach it (4 in 30
    such starts). The second now stops at the state_dir lock, before the socket."""
    c = capd_factory("", start=False)
    c.state.mkdir()
    held = os.open(c.state, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)  # a first capd, bound and not yet listening
    first = socket.socket(socket.AF_UNIX)
    first.bind(str(c.sock))
    ino = os.stat(c.sock).st_ino
    try:
        c.start(wait=False)
        assert c.proc.wait(10) == 1
        assert f"state_dir {c.state} is in use by another capd" in c.log()
        assert os.stat(c.sock).st_ino == ino
    finally:
        first.close()
        os.close(held)


def test_add_while_stopping_is_refused(capd_factory, echo_server):
    """capctl add (and trace) in the 2 s a stop gives open sessions started the
    instance: it listened and took clients that the stop cut a moment later. Both
    are refused now."""
    pa, pb = free_port(), free_port()
    c = capd_factory(f"[forward a]\nlisten = {pa}\nto = 127.0.0.1:{echo_server.port}\n")
    held = socket.create_connection(("127.0.0.1", pa), timeout=5)
    held.sendall(b"x")
    assert held.recv(1) == b"x"
    c.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 5
    while "stopping on signal" not in c.log() and time.time() < deadline:
        time.sleep(0.02)
    r = c.ctl("add", "forward", "--port", pb, "--to", f"127.0.0.1:{echo_server.port}", check=False)
    assert r.returncode == 1 and "capd is stopping" in r.stderr, r.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", pb), timeout=1).close()
    r = c.ctl("trace", "--", "true", check=False)
    assert r.returncode == 1 and "capd is stopping" in r.stderr, r.stderr
    held.close()
    assert c.proc.wait(10) == 0


def test_stop_while_an_instance_prepares(capd_factory):
    """capd stopped while a helper thread still made an instance's leaf keys (the
    first --tls instance) returned from main() with that thread running into
    OpenSSL's cleanup: SIGSEGV in about one stop in seven. It still does not wait
    for the thread (a filter's lookup may take long), but leaves without exit()'s
    handlers, and says so."""
    for attempt in range(5):
        c = capd_factory("")
        port = free_port()
        add = subprocess.Popen([str(CAPCTL), "-s", str(c.sock), "add", "forward", "--port", str(port), "--to",
                                "127.0.0.1:9", "--tls"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 5
        while "calls instance.add" not in c.log() and time.time() < deadline:
            time.sleep(0.005)
        c.proc.send_signal(signal.SIGTERM)
        c.proc.send_signal(signal.SIGTERM)
        assert c.proc.wait(10) == 0, c.log()
        out, err = add.communicate(timeout=10)
        if "added" not in out:  # else the keys came before the signal: again
            break
    assert add.returncode == 1, (out, err)
    assert "leaving an instance that was still being prepared" in c.log(), c.log()


def test_session_ids_grow_across_restart(capd_factory, echo_server):
    c = capd_factory("")
    port = free_port()
    c.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{echo_server.port}")
    for _ in range(2):
        socket.create_connection(("127.0.0.1", port)).close()
    ids = [s["id"] for s in c.wait_sessions(lambda ss: len(ss) == 2)]
    c.proc.kill()
    c.proc.wait()
    c.start()
    c.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{echo_server.port}")
    socket.create_connection(("127.0.0.1", port)).close()
    new = c.wait_sessions(lambda ss: len(ss) == 1)[0]["id"]
    assert new > max(ids)


def test_session_ids_go_on_after_a_clean_restart(capd_factory, echo_server):
    """Ids are reserved on disk 65536 at a time, so that a crash skips at most that
    many; a clean stop skipped them too, and after a few restarts capctl sessions
    showed ids like 786433. A stop now hands the unused ones back."""
    c = capd_factory("")
    port = free_port()

    def one_session():
        c.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{echo_server.port}")
        socket.create_connection(("127.0.0.1", port)).close()
        return c.wait_sessions(lambda ss: len(ss) == 1 and ss[0]["state"] == "closed")[0]["id"]

    first = one_session()
    assert c.stop() == 0
    c.start()
    assert one_session() == first + 1


def test_capctl_usage_and_unreachable(capd, tmp_path):
    r = subprocess.run([str(CAPCTL), "-s", str(tmp_path / "nope.sock"), "status"], capture_output=True, text=True)
    assert r.returncode == 1
    assert f"cannot reach capd at {tmp_path / 'nope.sock'}" in r.stderr
    for args in (["frobnicate"], ["add", "forward", "--port", "99999", "--to", "a:1"],
                 ["add", "forward", "--port", "1"], ["add", "forward", "--port", "1", "--to", "nope"],
                 ["add", "telnet", "--port", "1"], ["kill", "abc"], ["add", "forward", "--bogus"]):
        r = capd.ctl(*args, check=False)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("capctl: ") or "usage" in r.stderr
    r = capd.ctl("kill", "999999", check=False)
    assert r.returncode == 1 and "no session 999999" in r.stderr
    # --json after the command and unique prefixes work
    r = capd.ctl("stat", "--json")
    assert json.loads(r.stdout)["pid"] == capd.proc.pid
    env = dict(os.environ, CAPD_SOCKET=str(capd.sock))
    r = subprocess.run([str(CAPCTL), "list"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.startswith("NAME")



def test_capctl_socket_path_not_a_socket(tmp_path):
    """-s naming a file or a folder said "Connection refused", as for a socket whose capd
    died, which sends the user to start capd; capctl now says what is there. No capd needed."""
    (tmp_path / "file").write_text("x")
    for path, what in ((tmp_path / "file", "file"), (tmp_path, "folder")):
        r = subprocess.run([str(CAPCTL), "-s", str(path), "status"], capture_output=True, text=True, timeout=20)
        assert (r.returncode, r.stderr) == (1, f"capctl: cannot reach capd at {path}: not a socket (a {what})\n"), r
    with socket.socket(socket.AF_UNIX) as dead:  # bound, nobody accepts: still the kernel's word
        dead.bind(str(tmp_path / "dead.sock"))
        r = subprocess.run([str(CAPCTL), "-s", str(tmp_path / "dead.sock"), "status"], capture_output=True,
                           text=True, timeout=20)
    # a socket a stopped capd left (one that gave up root may not remove it)
    assert r.stderr == (f"capctl: cannot reach capd at {tmp_path / 'dead.sock'}: Connection refused "
                        "(capd is not running; the socket is left from an earlier one)\n"), r


def test_capctl_empty_socket_path_is_usage(capd):
    """-s '' or --socket= named no socket, and capctl said "cannot reach capd at :
    Connection refused" (exit 1), as if capd were down: it is a bad usage (exit 2)."""
    for args in (["-s", "", "status"], ["--socket=", "status"]):
        r = subprocess.run([str(CAPCTL), *args], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr == "capctl: the control socket path is empty\n", (args, r)
    # an empty CAPD_SOCKET still means the default, and -s wins over it
    env = dict(os.environ, CAPD_SOCKET="")
    r = subprocess.run([str(CAPCTL), "-s", str(capd.sock), "status"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def test_capctl_says_why_capd_refused_it(capd):
    """A user the socket file lets in but capd refuses (not root, capd's user or in the
    socket's group) read "lost capd: Broken pipe" or "capd closed the connection";
    capd now says why before it closes, and capctl shows that, however the race goes."""
    os.chmod(capd.sock, 0o666)
    d = capd.sock.parent
    while str(d).startswith("/tmp/") and d != d.parent:  # let uid 65534 reach the socket file
        os.chmod(d, os.stat(d).st_mode | 0o001)
        d = d.parent
    for args in (["status"], ["list"], ["tail", "events"]) * 4:
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            str(CAPCTL), "-s", str(capd.sock), *args], capture_output=True, text=True, timeout=20)
        assert r.returncode == 1
        assert r.stderr == ("capctl: permission denied: uid 65534 is not root, capd's user or in the control"
                            " socket's group\n"), (args, r.stderr)

def test_expose_needed(capd):
    """A non-loopback --bind without --expose: capd refuses it, and capctl, which knows both,
    now says so itself (exit 2; it was capd's exit 1)."""
    for bind in ("0.0.0.0", "*", "::", "192.0.2.1"):
        r = capd.ctl("add", "forward", "--port", free_port(), "--bind", bind, "--to", "127.0.0.1:9", check=False)
        assert (r.returncode, r.stderr) == (2, f"capctl: --bind: {bind} is not a loopback address: add --expose "
                                               "to listen there\n"), r
    r = capd.rpc("instance.add", {"type": "forward", "listen": f"0.0.0.0:{free_port()}", "to": "127.0.0.1:9"})
    assert "expose" in r["error"]["message"], r
    for bind in ("127.0.0.2", "localhost", "::1"):
        capd.ctl("add", "forward", "--port", free_port(host="::1" if bind == "::1" else "127.0.0.1"), "--bind", bind,
                 "--to", "127.0.0.1:9", "--name", f"lo-{len(capd.ctl('list', json_out=True))}")
    capd.ctl("add", "forward", "--port", free_port(), "--bind", "0.0.0.0", "--expose", "--to", "127.0.0.1:9")
    assert len(capd.ctl("list", json_out=True)) == 4


def test_sigterm_exits_zero(capd, echo_server):
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{echo_server.port}")
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"x")
    assert s.recv(10) == b"x"
    t = time.time()
    assert capd.stop() == 0
    assert time.time() - t < 5
    assert not capd.sock.exists()
    s.close()


def test_forward_1gb_memory_flat(capd):
    """A 1 GB transfer through the forwarder does not grow capd (issue 2's done-when)."""
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(1)
    got = [0]

    def drain():
        c, _ = sink.accept()
        while True:
            d = c.recv(1 << 20)
            if not d:
                break
            got[0] += len(d)
        c.close()

    t = threading.Thread(target=drain)
    t.start()
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{sink.getsockname()[1]}", "--no-capture")
    pid = capd.proc.pid

    def rss():
        return int([l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:")][0].split()[1])

    before = rss()
    peak = before
    chunk = b"\0" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as s:
        for i in range(1024):
            s.sendall(chunk)
            if i % 64 == 0:
                peak = max(peak, rss())
    t.join(60)
    sink.close()
    assert got[0] == 1 << 30
    assert peak - before < 4096, f"RSS went from {before} KiB to {peak} KiB"


def test_rpc_duplicate_key_is_an_invalid_request(capd):
    """A request naming a key twice ({"method":"x","method":"y"}) is good JSON (RFC 8259:
    names SHOULD be unique), but capd answered it with -32700 Parse error, as if the JSON
    were broken. It is now -32600 Invalid Request naming the key, echoing the id (null when
    the id is the key given twice); a notification gets no reply; nothing of the line runs."""
    def one(raw):
        return rpc_lines(capd, raw + b"\n")

    r = one(b'{"jsonrpc":"2.0","id":1,"method":"daemon.status","method":"daemon.stop"}')
    assert len(r) == 1 and r[0]["id"] == 1 and r[0]["error"]["code"] == -32600, r
    assert 'duplicate key "method"' in r[0]["error"]["message"], r
    port = free_port()
    r = one(b'{"jsonrpc":"2.0","id":"a","method":"instance.add","params":{"type":"forward","listen":"'
            + str(port).encode() + b'","to":"127.0.0.1:9","to":"127.0.0.1:10"}}')
    assert len(r) == 1 and r[0]["id"] == "a" and r[0]["error"]["code"] == -32600, r
    assert 'duplicate key "to"' in r[0]["error"]["message"], r
    r = one(b'{"jsonrpc":"2.0","id":2,"method":"daemon.status","id":3}')
    assert len(r) == 1 and r[0]["id"] is None and r[0]["error"]["code"] == -32600, r
    assert one(b'{"jsonrpc":"2.0","method":"daemon.status","method":"daemon.stop"}') == []
    r = one(b'[{"jsonrpc":"2.0","id":4,"method":"instance.add","params":{"type":"forward","listen":"'
            + str(port).encode() + b'","to":"127.0.0.1:9"}},'
            b'{"jsonrpc":"2.0","id":5,"method":"daemon.status","params":{"a":1,"a":2}}]')
    assert len(r) == 1 and [x["id"] for x in r[0]] == [4, 5], r
    assert all(x["error"]["code"] == -32600 for x in r[0]), r
    assert capd.ctl("list", json_out=True) == []  # neither instance.add ran
    assert capd.proc.poll() is None and capd.ctl("status").returncode == 0


def test_capd_t_refuses_what_reload_refuses(capd_factory, tmp_path):
    """capd -t passed an empty config file ("configuration is good (0 instances)", exit 0)
    while a reload of it was refused; capd.service's ExecReload= runs capd -t before the
    SIGHUP, so `systemctl reload capd` reported success while capd kept the old config.
    Start-up, capd -t and a reload now make one check (conf_check): a file with no section
    is refused by all three, with the same message."""
    for text in ("", "\n; only a comment\n"):
        f = tmp_path / "e.conf"
        f.write_text(text)
        want = (f"{f}: the file has no section (empty, or being written?); "
                "capd needs [capd] or an instance section")
        r = subprocess.run([str(CAPD), "-t", "-c", str(f)], capture_output=True, text=True, timeout=20)
        assert r.returncode == 1 and r.stderr == f"capd: {want}\n", (r.stdout, r.stderr)
        r = subprocess.run([str(CAPD), "-c", str(f)], capture_output=True, text=True, timeout=20)
        assert r.returncode == 1 and r.stderr == f"capd: {want}\n", (r.stdout, r.stderr)
    c = capd_factory(f"[forward f]\nlisten = {free_port()}\nto = 127.0.0.1:9\n")
    c.conf_path.write_text("")
    t = subprocess.run([str(CAPD), "-t", "-c", str(c.conf_path)], capture_output=True, text=True, timeout=20)
    r = c.ctl("reload", check=False)
    assert t.returncode == 1 and r.returncode == 1, (t.stderr, r.stderr)
    assert t.stderr.removeprefix("capd: ") == r.stderr.removeprefix("capctl: reload failed, nothing changed: ")
    # the smallest good file is still good for all three
    c.write_conf()
    assert subprocess.run([str(CAPD), "-t", "-c", str(c.conf_path)], capture_output=True).returncode == 0
    assert c.ctl("reload").returncode == 0 and c.ctl("list", json_out=True) == []


def test_one_control_socket_path_one_capd(capd_factory):
    """Two capds with state_dirs of their own but one control socket: each looked for a
    live capd on the socket, then removed the stale file and bound, and started at the same
    moment both did (1 start in 40 in a loop): the second removed the first's socket, which
    ran on unreachable. Whoever owns the path now holds <socket>.lock (flock) while it runs;
    here the test holds it, as a capd between its look and its bind would."""
    a = capd_factory("")
    b = capd_factory("", start=False)
    b.sock = a.sock
    b.write_conf()
    lock = a.sock.with_name(a.sock.name + ".lock")
    r = subprocess.run([str(CAPD), "-c", str(b.conf_path)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and f"capd already running on {a.sock}" in r.stderr, r.stderr
    assert a.ctl("status").returncode == 0 and lock.exists()
    assert a.stop() == 0
    assert not a.sock.exists() and not lock.exists()  # a stop takes both away
    with socket.socket(socket.AF_UNIX) as stale:  # a stale socket no capd answers on...
        stale.bind(str(a.sock))
        with open(lock, "w") as f:  # ...and a capd about to replace it
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            r = subprocess.run([str(CAPD), "-c", str(b.conf_path)], capture_output=True, text=True, timeout=20)
            assert r.returncode == 1, (r.stdout, r.stderr)
            assert r.stderr == f"capd: capd already running on {a.sock} (it holds {lock})\n", r.stderr
            assert a.sock.exists()
        b.start()  # the lock let go: the stale socket is replaced
        assert b.ctl("status").returncode == 0


def test_rpc_nul_in_a_string_is_an_invalid_request(capd):
    """A string holding \\u0000 is good JSON, but capd answered it -32700 Parse error
    ("\\u0000 is not allowed without JSON_ALLOW_NUL", jansson's words) with id null. capd's
    strings end at a NUL (taken, "daemon.status\\u0000x" would run daemon.status), so such a
    request is now -32600 Invalid Request saying so, with its id; none of its line runs."""
    def one(raw):
        return rpc_lines(capd, raw + b"\n")

    r = one(b'{"jsonrpc":"2.0","id":1,"method":"daemon.status\\u0000x"}')
    assert len(r) == 1 and r[0]["id"] == 1 and r[0]["error"]["code"] == -32600, r
    assert "\\u0000 in a string" in r[0]["error"]["message"], r
    r = one(b'{"jsonrpc":"2.0","id":"a\\u0000b","method":"daemon.status"}')
    assert len(r) == 1 and r[0]["id"] == "a\0b" and r[0]["error"]["code"] == -32600, r
    port = free_port()
    r = one(b'[{"jsonrpc":"2.0","id":2,"method":"instance.add","params":{"type":"forward","listen":"'
            + str(port).encode() + b'","to":"127.0.0.1:9","name":"f\\u0000"}},'
            b'{"jsonrpc":"2.0","method":"daemon.status"}]')
    assert len(r) == 1 and [x["id"] for x in r[0]] == [2] and r[0][0]["error"]["code"] == -32600, r
    assert one(b'{"jsonrpc":"2.0","method":"daemon.status\\u0000"}') == []
    assert capd.ctl("list", json_out=True) == []


def test_config_path_not_utf8_is_refused(tmp_path):
    """capd -c /x/\\xff.conf started, and then `capctl status` said only "capctl: failed":
    daemon.status shows the config path in JSON, which cannot hold it. Such a path is
    refused at once, as a [capd] path that is not UTF-8 is (test_capd_setting_not_utf8...)."""
    f = os.path.join(os.fsencode(tmp_path), b"c\xff.conf")
    with open(f, "w") as fh:
        fh.write(f"[capd]\ncontrol = {tmp_path}/c.sock\nspool = {tmp_path}/sp\nstate_dir = {tmp_path}/st\n")
    for args in ([b"-t"], []):
        r = subprocess.run([os.fsencode(str(CAPD)), *args, b"-c", f], capture_output=True, text=True, timeout=20)
        assert r.returncode == 1 and r.stderr == "capd: -c: the path is not valid UTF-8\n", (args, r.stderr)
    assert not (tmp_path / "c.sock").exists()


def test_capd_t_refuses_a_control_path_too_long_to_bind(tmp_path):
    """control = a path of 108 bytes or more passed capd -t ("configuration is good"), and
    start-up then failed at the bind ("control socket path too long", no line). The
    config now refuses it, at -t and start alike, with its file and line."""
    long = "/tmp/" + "a" * 110 + "/c.sock"
    rc, err = capd_t(tmp_path, f"[capd]\ncontrol = {long}\n")
    assert rc == 1 and err == (f"capd: t.conf:2: 'control' is too long for a Unix socket path "
                               f"({len(long)} bytes, at most 107)\n"), err
    ok = "/tmp/" + "a" * (107 - len("/tmp/") - len("/c")) + "/c"  # 107 bytes: binds
    rc, err = capd_t(tmp_path, f"[capd]\ncontrol = {ok}\n")
    assert rc == 0, err


def test_rpc_unknown_parameter_is_refused(capd, echo_server):
    """A parameter a method does not take was ignored: session.list {"instanse": "f"} (a
    typo) listed every session as if no filter were asked for, and daemon.status {"x": 1}
    answered as if all were well; instance.add alone refused its unknown keys. Each method
    of the control plane now refuses -32602 naming the key and what it takes; notifications
    still get no reply, and what capctl sends still works."""
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{echo_server.port}", "--name", "f")
    socket.create_connection(("127.0.0.1", port)).close()
    capd.wait_sessions(lambda ss: len(ss) == 1)
    for method, params, want in (
            ("session.list", {"instanse": "f"}, "session.list takes no parameter 'instanse' (it takes: instance, open)"),
            ("session.list", {"instance, open": True}, "session.list takes no parameter 'instance, open'"),
            ("daemon.status", {"x": 1}, "daemon.status takes no parameter 'x' (it takes none)"),
            ("session.kill", {"id": 1, "": 1}, "session.kill takes no parameter '' (it takes: id)"),
            ("instance.remove", {"name": "f", "force": True}, "instance.remove takes no parameter 'force'"),
            ("session.tail", {"id": 1, "direction": "c2s"},
             "session.tail takes no parameter 'direction' (it takes: id, backlog, dir)")):
        r = capd.rpc(method, params)
        assert r["error"]["code"] == -32602 and r["error"]["message"].startswith(want), (method, r)
    assert rpc_lines(capd, b'{"jsonrpc":"2.0","method":"instance.remove","params":{"name":"f","x":1}}\n') == []
    assert [i["name"] for i in capd.ctl("list", json_out=True)] == ["f"]  # nothing was removed
    assert len(capd.rpc("session.list", {"instance": "f", "open": False})["result"]) == 1
    assert capd.ctl("sessions", "--instance", "f").returncode == 0
    assert capd.ctl("remove", "f").returncode == 0


def test_rpc_whitespace_line_is_a_keepalive(capd):
    """Blank lines are keep-alives, but a line of spaces or tabs ("  \\r\\n", a terminal's
    Enter after a space) got a -32700 parse error ("unexpected token near end of file")
    with id null, which a client would take for an answer. It is skipped like a blank."""
    r = rpc_lines(capd, b"   \n\t\r\n" + b'{"jsonrpc":"2.0","id":1,"method":"daemon.status"}\n \t \n')
    assert len(r) == 1 and r[0]["id"] == 1 and "result" in r[0], r
    r = rpc_lines(capd, b" x \n")  # not only whitespace: still a parse error
    assert len(r) == 1 and r[0]["error"]["code"] == -32700, r


def test_version_comes_from_meson_alone(capd):
    """The version was written three times (meson.build, a define in capd.h, a literal
    in capctl.c), free to drift apart. meson's project version is now the only one:
    config.h carries it to capd -V, capctl --version and daemon.status."""
    root = ROOT
    version = re.search(r"^\s*version\s*:\s*'([^']+)'", (root / "meson.build").read_text(), re.M).group(1)
    assert f'#define CAPD_VERSION "{version}"' in (BUILD / "config.h").read_text()
    for d in ("daemon", "ctl", "common"):
        for f in (root / d).glob("*.[ch]"):
            assert f'"{version}"' not in f.read_text() and f'" {version}' not in f.read_text(), f
    assert subprocess.run([str(CAPD), "-V"], capture_output=True, text=True).stdout == f"capd {version}\n"
    assert subprocess.run([str(CAPCTL), "--version"], capture_output=True, text=True).stdout == f"capctl {version}\n"
    assert capd.ctl("status", json_out=True)["version"] == version


def test_routine_control_connection_is_not_logged_at_info(capd_factory):
    """Every capctl call logged "control: connection from pid ..." at info, capd's default
    level: a script polling capctl filled the journal. It is a debug line now."""
    c = capd_factory(start=False)
    c.conf_path.write_text(c.conf_path.read_text().replace("log_level = debug", "log_level = info"))
    c.start()
    for _ in range(3):
        c.ctl("status")
    assert "connection from pid" not in c.log(), c.log()
    c.stop()
    c.conf_path.write_text(c.conf_path.read_text().replace("log_level = info", "log_level = debug"))
    c.start()
    c.ctl("status")
    assert "control: connection from pid" in c.log()  # still there for whoever asks for debug


def test_ca_export_params_checked(capd):
    """Regression: ca.export judged its params itself and took any key and any "der":
    {"der": "yes"} answered without the DER (a script's `.der` was null) and {"pem": false}
    passed silently. "der" must be a boolean and other keys are refused (-32602), as for
    the other methods."""
    for params, what in (({"der": "yes"}, '"der" must be true or false'), ({"der": 1}, '"der" must be true'),
                         ({"pem": False}, "'pem'")):
        rep = capd.rpc("ca.export", params)
        assert rep.get("error", {}).get("code") == -32602 and what in rep["error"]["message"], (params, rep)
    assert "der" in capd.rpc("ca.export", {"der": True})["result"]
    assert "der" not in capd.rpc("ca.export", {"der": False})["result"]


def test_check_counts_one_instance_in_the_singular(tmp_path):
    """capd -t on a file of one section said "configuration is good (1 instances)"."""
    conf = tmp_path / "capd.conf"
    conf.write_text("[capd]\n[forward a]\nlisten = 127.0.0.1:1\nto = 127.0.0.1:2\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.endswith("configuration is good (1 instance)\n"), r.stdout + r.stderr
    conf.write_text(conf.read_text() + "[forward b]\nlisten = 127.0.0.1:3\nto = 127.0.0.1:2\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.endswith("configuration is good (2 instances)\n"), r.stdout + r.stderr


def test_status_names_a_relative_config_file_absolute(capd_factory, monkeypatch):
    """capd -c ./capd.conf started in a folder: capctl status said "config: ./capd.conf"
    (and the log "reloaded ./capd.conf"), which names no file for a capctl run from
    anywhere else. capd names it absolute once it runs; -t keeps the path as given."""
    from pathlib import Path
    c = capd_factory(start=False)
    monkeypatch.chdir(c.dir)
    c.conf_path = Path("./capd.conf")
    r = subprocess.run([str(CAPD), "-t", "-c", "./capd.conf"], capture_output=True, text=True, timeout=30)
    assert r.stdout.startswith("capd: ./capd.conf: configuration is good"), r.stdout + r.stderr
    c.start()
    monkeypatch.chdir("/")
    assert c.ctl("status", json_out=True)["config"] == str(c.dir / "capd.conf")
    assert f"config:    {c.dir}/capd.conf\n" in c.ctl("status").stdout
    c.ctl("reload")
    assert f"reloaded {c.dir}/capd.conf" in c.log(), c.log()


def test_reload_names_restart_only_keys_it_did_not_apply(capd_factory, tmp_path):
    """capctl reload after an edit of "spool =" printed "reloaded" and nothing else:
    only capd's log said the spool folder stays. daemon.reload's result names the
    restart-only keys left unapplied, capctl warns on stderr for each (still exit
    0, the rest applied) and sums up the instances added, removed and changed."""
    to = "127.0.0.1:9"
    pa, pb, pc, pd = (f"127.0.0.1:{free_port()}" for _ in range(4))
    c = capd_factory(f"[forward a]\nlisten = {pa}\nto = {to}\n"
                     f"[forward b]\nlisten = {pb}\nto = {to}\n")
    c.write_conf(f"[forward a]\nlisten = {pa}\nto = 127.0.0.2:9\n"
                 f"[forward c]\nlisten = {pc}\nto = {to}\n"
                 f"[forward d]\nlisten = {pd}\nto = {to}\n",
                 settings="workers = 3\n")
    conf = c.conf_path.read_text().replace(f"spool = {c.spool}", f"spool = {tmp_path}/spool2")
    c.conf_path.write_text(conf)
    r = c.ctl("reload")
    assert r.returncode == 0
    assert r.stdout == "reloaded: 2 added, 1 removed, 1 changed\n", r.stdout
    warn = [x for x in r.stderr.splitlines() if x.startswith("capctl: warning: ")]
    assert any(x.startswith("capctl: warning: spool changes only at restart") for x in warn), r.stderr
    assert any(x.startswith("capctl: warning: workers changes only at restart") for x in warn), r.stderr
    assert len(warn) == 2, r.stderr
    res = c.rpc("daemon.reload")["result"]
    assert res == {"reloaded": True, "restart_only": ["workers", "spool"],
                   "added": 0, "removed": 0, "changed": 0}, res
    # back to the file capd started with: no warning
    c.write_conf(f"[forward a]\nlisten = {pa}\nto = {to}\n")
    r = c.ctl("reload")
    assert r.stderr == "" and r.stdout == "reloaded: 0 added, 2 removed, 1 changed\n", r.stdout + r.stderr


def test_reload_with_errors_names_restart_only_keys(capd_factory, tmp_path):
    """A reload whose new instance cannot start answers an error; it names the
    restart-only keys left unapplied too, which the log alone said before."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        c = capd_factory("")
        c.write_conf(f"[forward busy]\nlisten = 127.0.0.1:{held.getsockname()[1]}\nto = 127.0.0.1:9\n")
        c.conf_path.write_text(c.conf_path.read_text().replace(f"spool = {c.spool}", f"spool = {tmp_path}/s2"))
        r = c.ctl("reload", check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "is in use" in r.stderr and r.stderr.rstrip().endswith("not applied until restart: spool"), r.stderr
    finally:
        held.close()


def _sessions_closed(capd, n, timeout=20):
    """The sessions once n of them have closed."""
    deadline = time.monotonic() + timeout
    while True:
        ss = capd.ctl("sessions", json_out=True)
        if sum(s["state"] == "closed" for s in ss) >= n or time.monotonic() > deadline:
            return ss
        time.sleep(0.1)


def test_target_name_only_for_a_name_refused_or_not(capd, http_server):
    """A SOCKS or HTTP CONNECT that capd refused to an IP address carried
    "target_name": "127.0.0.1:PORT" in its session, one it relayed to the same
    address none: target_name is the name capd looked up (capctl.1), so an
    address asked for has none either way; a refused name keeps it."""
    hport, _ = http_server
    sport, pport = free_port(), free_port()
    capd.ctl("add", "socks", "--port", sport, "--auth", "bob:x")
    capd.ctl("add", "http", "--port", pport, "--connect-ports", hport)
    url = f"http://127.0.0.1:{hport}/"
    assert curl("--socks5", f"127.0.0.1:{sport}", "--proxy-user", "bob:x", url).returncode == 0
    assert curl("--socks4", f"127.0.0.1:{sport}", url).returncode != 0          # SOCKS4: refused
    assert curl("-p", "-x", f"127.0.0.1:{pport}", url).returncode == 0
    assert curl("-p", "-x", f"127.0.0.1:{pport}", f"http://127.0.0.1:{sport}/").returncode != 0  # 403
    assert curl("-p", "-x", f"127.0.0.1:{pport}", f"http://localhost:{sport}/").returncode != 0
    ss = sorted(_sessions_closed(capd, 5), key=lambda s: s["id"])
    assert len(ss) == 5, ss
    assert [s["target"] for s in ss] == [f"127.0.0.1:{hport}"] * 3 + [f"127.0.0.1:{sport}", f"localhost:{sport}"], ss
    assert [s.get("target_name") for s in ss] == [None] * 4 + [f"localhost:{sport}"], ss
    assert "refused" in ss[1]["reason"] and ss[3]["reason"].startswith("403"), ss


def test_sessions_of_a_removed_instance_that_had_none(capd, echo_server):
    """capctl.1 says --instance works for removed instances, but capctl sessions
    --instance NAME of a removed instance that never had a session said "no instance
    NAME" (exit 1), as for a name capd never ran. capd now remembers the names it
    removed: such a list is empty (exit 0), a name never run still fails."""
    capd.ctl("add", "forward", "--port", free_port(), "--to", f"127.0.0.1:{echo_server.port}", "--name", "idle")
    capd.ctl("remove", "idle")
    r = capd.ctl("sessions", "--instance", "idle", check=False)
    assert r.returncode == 0 and r.stderr == "", (r.stdout, r.stderr)
    assert capd.ctl("sessions", "--instance", "idle", json_out=True) == []
    assert capd.rpc("session.list", {"instance": "idle"})["result"] == []
    r = capd.ctl("sessions", "--instance", "never", check=False)
    assert r.returncode == 1 and "no instance never" in r.stderr, r.stderr
    # one that had sessions lists them as before
    port = free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{echo_server.port}", "--name", "busy")
    socket.create_connection(("127.0.0.1", port)).close()
    capd.wait_sessions(lambda ss: any(s["instance"] == "busy" and s["state"] == "closed" for s in ss))
    capd.ctl("remove", "busy")
    assert len(capd.rpc("session.list", {"instance": "busy"})["result"]) == 1


def test_reload_lists_an_instance_it_cannot_start_as_failed(capd_factory):
    """A reload that moved [forward c] to a port another program held said "port ... is
    in use" and exited 1, but `capctl list` then showed no c at all: the old one was
    stopped, the new one dropped, and nothing told an admin looking at the list that the
    file's c was down. It now stays listed as failed with the reason, keeps its name,
    takes no port, and the next reload (once the port is free) starts it."""
    p1, p2 = free_port(), free_port()
    c = capd_factory(f"[forward b]\nlisten = {p1}\nto = 127.0.0.1:9\n")
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    other.bind(("127.0.0.1", p2))
    other.listen(1)
    try:
        c.write_conf(f"[forward b]\nlisten = {p1}\nto = 127.0.0.1:9\n"
                     f"[forward c]\nlisten = {p2}\nto = 127.0.0.1:9\n")
        r = c.ctl("reload", check=False)
        assert r.returncode == 1 and f"[forward c]: port {p2} is in use" in r.stderr, r.stderr
        got = {i["name"]: i for i in c.ctl("list", json_out=True)}
        assert sorted(got) == ["b", "c"], got
        assert got["b"]["state"] == "running"
        assert got["c"]["state"] == "failed" and f"port {p2} is in use" in got["c"]["error"], got["c"]
        table = c.ctl("list").stdout
        assert re.search(rf"^c +forward +127\.0\.0\.1:{p2} +failed .*port {p2} is in use", table, re.M), table
        # the name stays taken while it is listed
        r = c.ctl("add", "forward", "--port", free_port(), "--to", "127.0.0.1:9", "--name", "c", check=False)
        assert r.returncode == 1 and "exists already" in r.stderr, r.stderr
    finally:
        other.close()
    assert c.ctl("reload").returncode == 0
    got = {i["name"]: i for i in c.ctl("list", json_out=True)}
    assert got["c"]["state"] == "running" and "error" not in got["c"], got["c"]
    socket.create_connection(("127.0.0.1", p2), timeout=10).close()


def test_reload_refuses_a_user_or_group_capd_t_refuses(capd_factory):
    """`capd -t` (what `systemctl reload` runs first) refused a file whose user or
    control_group did not exist, but `capctl reload` of the same file said "reloaded"
    with a restart-only warning and exit 0: the verdicts differed, and the next start
    failed. A reload now refuses it with the same message and changes nothing."""
    port = free_port()
    c = capd_factory(f"[forward f]\nlisten = {port}\nto = 127.0.0.1:9\n")
    for key, value, what in (("user", "capd-no-such-user", "user"), ("control_group", "capd-no-such-grp", "group")):
        c.write_conf(f"[forward g]\nlisten = {free_port()}\nto = 127.0.0.1:9\n", settings=f"{key} = {value}")
        t = subprocess.run([str(CAPD), "-t", "-c", str(c.conf_path)], capture_output=True, text=True, timeout=10)
        line = next(n for n, ln in enumerate(c.conf_path.read_text().splitlines(), 1) if ln.startswith(key))
        msg = f"{c.conf_path}:{line}: {key} = {value}: no such {what}"
        assert t.returncode == 1 and t.stderr == f"capd: {msg}\n", t
        r = c.ctl("reload", check=False)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert r.stderr == f"capctl: reload failed, nothing changed: {msg}\n", r.stderr
        assert [i["name"] for i in c.ctl("list", json_out=True)] == ["f"]
    # the value in force, or another that exists, still reloads (and says it waits for a restart)
    c.write_conf(f"[forward f]\nlisten = {port}\nto = 127.0.0.1:9\n", settings="control_group = root")
    r = c.ctl("reload")
    assert "control_group changes only at restart" in r.stderr, r.stderr


def test_quoted_value_refused_by_capd_t_and_reload(capd_factory, tmp_path):
    """`spool = "/srv/capd"`, quoted as in a shell or a systemd unit: inih keeps the
    quotes, so capd -t said "configuration is good" and capd spooled into a folder
    named `"/srv/capd"` inside the config's folder (`listen = '1080'` said only "bad
    port"). A value in quotes is now refused, with its line and the unquoted form, by
    capd -t and by a reload alike."""
    conf = tmp_path / "q.conf"
    conf.write_text(f'[capd]\nspool = "{tmp_path}/sp"\n')
    r = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1, r
    assert r.stderr == (f"capd: {conf}:2: the value of 'spool' is in quotes, which capd would keep "
                        f"as part of it: write spool = {tmp_path}/sp\n"), r.stderr
    port = free_port()
    c = capd_factory(f"[forward f]\nlisten = {port}\nto = 127.0.0.1:9\n")
    c.write_conf(f"[forward f]\nlisten = '{port}'\nto = 127.0.0.1:9\n")
    r = c.ctl("reload", check=False)
    assert r.returncode == 1 and "nothing changed" in r.stderr, r.stderr
    assert (f"the value of 'listen' is in quotes, which capd would keep as part of it: "
            f"write listen = {port}") in r.stderr, r.stderr
    t = subprocess.run([str(CAPD), "-t", "-c", str(c.conf_path)], capture_output=True, text=True, timeout=10)
    assert t.returncode == 1 and t.stderr.split(": ", 1)[1] in r.stderr, (t.stderr, r.stderr)
    assert not list(tmp_path.glob('"*')), list(tmp_path.iterdir())


@pytest.mark.parametrize("header,shown", [
    ("[socks main] listen = {port}", "listen = {port}"),
    ("[socks main]]", "]"),
])
def test_text_after_a_section_header_refused(capd_factory, tmp_path, header, shown):
    """inih drops whatever follows a section header's ']': `[socks main] listen = 1080`
    (a dante-style one-liner) gave "a socks instance needs 'listen'" for the line of the
    header, and `[socks main]]` was taken silently. capd -t and a reload now name the
    line and the text; a comment after the header stays allowed."""
    port = free_port()
    good = tmp_path / "good.conf"
    good.write_text(f"[capd]\nspool = {tmp_path}/sp\n[socks main] ; the browsers' proxy\nlisten = {port}\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(good)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r
    c = capd_factory(f"[forward f]\nlisten = {free_port()}\nto = 127.0.0.1:9\n")
    c.write_conf(header.format(port=port) + f"\nlisten = {port}\n")
    line = len(c.conf_path.read_text().splitlines()) - 2
    msg = (f"{c.conf_path}:{line}: text after the section header's ']': '{shown.format(port=port)}' "
           "(a key goes on a line of its own)")
    t = subprocess.run([str(CAPD), "-t", "-c", str(c.conf_path)], capture_output=True, text=True, timeout=10)
    assert t.returncode == 1 and t.stderr == f"capd: {msg}\n", t.stderr
    r = c.ctl("reload", check=False)
    assert r.returncode == 1 and r.stderr == f"capctl: reload failed, nothing changed: {msg}\n", r.stderr
    assert [i["name"] for i in c.ctl("list", json_out=True)] == ["f"]


def test_duration_past_ten_years_refused(capd_factory, tmp_path):
    """flush_interval = 1e300 passed capd -t; capd then spun its spool thread (the
    writer's deadline overflowed time_t) and did not stop on SIGTERM. Durations are now
    at most 87600h, refused past it with the line by capd -t and a reload, and by
    capctl add."""
    conf = tmp_path / "d.conf"
    conf.write_text(f"[capd]\nspool = {tmp_path}/sp\nflush_interval = 1e300\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1, r
    assert r.stderr == f"capd: {conf}:3: duration for 'flush_interval' out of range: '1e300' (at most 87600h)\n"
    conf.write_text(f"[capd]\nspool = {tmp_path}/sp\nrotate_time = 87600h\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r
    port = free_port()
    c = capd_factory(f"[forward f]\nlisten = {port}\nto = 127.0.0.1:9\n")
    c.write_conf(f"[forward f]\nlisten = {port}\nto = 127.0.0.1:9\nidle_timeout = 1e12\n")
    r = c.ctl("reload", check=False)
    assert r.returncode == 1 and "duration for 'idle_timeout' out of range: '1e12' (at most 87600h)" in r.stderr, r
    r = c.ctl("add", "socks", "--port", free_port(), "--connect-timeout", "87601h", check=False)
    assert (r.returncode, r.stderr) == (2, "capctl: --connect-timeout: duration '87601h' out of range "
                                           "(at most 87600h)\n"), r
    assert [i["name"] for i in c.ctl("list", json_out=True)] == ["f"]


def test_a_port_alone_is_a_target_on_127_0_0_1(capd_factory, echo_server):
    """DESIGN.md and capd.conf(5): `PORT` alone means 127.0.0.1:PORT, for every address.
    A listen address took it, but `to = 4444`, `--to 4444`, `--default`, `--route` and
    `--upstream` were refused ("bad address '4444': expected host:port", exit 2)."""
    p1, p2 = free_port(), free_port()
    c = capd_factory(f"[forward a]\nlisten = {p1}\nto = {echo_server.port}\n")
    c.ctl("add", "forward", "--port", p2, "--to", echo_server.port)
    for port in (p1, p2):
        assert exchange(port, b"ping") == b"ping"
    want = f"127.0.0.1:{echo_server.port}"
    assert [i["to"] for i in c.ctl("list", json_out=True)] == [want, want]
    rev = c.ctl("add", "reverse", "--port", free_port(), "--default", "8080",
                "--route", "a.test=8081", json_out=True)
    assert (rev["default"], rev["routes"]) == ("127.0.0.1:8080", ["a.test=127.0.0.1:8081"]), rev
    dns = c.ctl("add", "dns", "--port", free_port(), "--answer", "a.test=127.0.0.1",
                "--upstream", "5353", json_out=True)
    assert dns["upstream"] == "127.0.0.1:5353", dns
    for bad in ("0", "65536"):
        r = c.ctl("add", "forward", "--port", free_port(), "--to", bad, check=False)
        assert r.returncode == 2 and "bad address" in r.stderr, r


def test_instance_name_not_utf8_is_refused(tmp_path):
    """[forward caf\\xe9] (a name in Latin-1) made no instance at all and no error:
    `capd -t` said "configuration is good (0 instances)" and capd started without it.
    The name, which capd writes in JSON and as a pcapng interface name (both UTF-8),
    is refused at its line, as a value that is not UTF-8 is."""
    f = tmp_path / "t.conf"
    f.write_bytes(b"[capd]\ncontrol = " + str(tmp_path).encode() + b"/c.sock\n\n[forward caf\xe9]\n"
                  b"listen = 127.0.0.1:4444\nto = 127.0.0.1:9\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(f)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and f"{f}:4: the instance name in a [forward ...] section is not valid UTF-8" \
        in r.stderr, r.stderr


def test_default_name_taken_gets_a_number(capd):
    """`capctl add socks --port P` then the same port on ::1 was refused: "an instance
    named 'socks-P' exists already", for a name the user never chose. A taken default
    name now gets the first free -2, -3 ...; a name the user gives is still refused."""
    port = free_port()
    assert capd.ctl("add", "socks", "--port", port).stdout.startswith(f"added socks-{port} ")
    r = capd.ctl("add", "socks", "--port", port, "--bind", "::1")
    assert r.stdout.startswith(f"added socks-{port}-2 "), r.stdout
    r = capd.ctl("add", "socks", "--port", port, "--bind", "127.0.0.2")
    assert r.stdout.startswith(f"added socks-{port}-3 "), r.stdout
    capd.ctl("remove", f"socks-{port}-2")
    r = capd.ctl("add", "socks", "--port", port, "--bind", "::1")
    assert r.stdout.startswith(f"added socks-{port}-2 "), r.stdout
    got = {i["name"]: i["listen"] for i in capd.ctl("list", json_out=True)}
    assert got == {f"socks-{port}": f"127.0.0.1:{port}", f"socks-{port}-2": f"[::1]:{port}",
                   f"socks-{port}-3": f"127.0.0.2:{port}"}, got
    r = capd.ctl("add", "socks", "--port", free_port(), "--name", f"socks-{port}-2", check=False)
    assert r.returncode == 1 and "exists already" in r.stderr, r.stderr


def test_key_colon_value_refused_by_capd_t_and_reload(capd_factory, tmp_path):
    """`listen: 1080` (a YAML habit) was taken as `listen = 1080`: inih splits a line at
    its first '=' or ':', while capd.conf.5 has key = value alone. It is now refused,
    with its line and the form to write, by capd -t and by a reload; a ':' inside a
    value after its '=' (an address and port) is still a value."""
    port = free_port()
    conf = tmp_path / "c.conf"
    conf.write_text(f"[capd]\ncontrol = {tmp_path}/t.sock\nspool = {tmp_path}/sp\n\n"
                    f"[forward f]\nlisten: {port}  \nto = 127.0.0.1:9\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1, r
    assert r.stderr == (f"capd: {conf}:6: a ':' after 'listen': write listen = {port} "
                        "(key = value, not key: value)\n"), r.stderr
    c = capd_factory(f"[forward f]\nlisten = [::1]:{port}\nto = 127.0.0.1:9 ; note: kept\n")
    assert [i["to"] for i in c.ctl("list", json_out=True)] == ["127.0.0.1:9"]
    c.write_conf(f"[forward f]\nlisten = [::1]:{port}\nto = 127.0.0.1:9\n", settings="log_level: info")
    r = c.ctl("reload", check=False)
    assert r.returncode == 1 and "a ':' after 'log_level': write log_level = info" in r.stderr, r.stderr


def test_forward_failed_connect_is_captured(capd):
    """A forward instance whose target refused the connect closed the client with
    nothing captured (test_upstream_refused). Its capture is now the client's side of
    it, toward the listening address: the SYN, what the client sent if capd read it
    before the connect failed, capd's FIN. Here the target does not exist: a port
    nobody listens on."""
    dead, port = free_port(), free_port()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{dead}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        me = "%s:%d" % s.getsockname()
        s.settimeout(10)
        assert s.recv(100) == b""
    ss = capd.wait_sessions(lambda ss: ss and ss[-1]["state"] == "closed")
    f = refused_flow(capd, ss[-1], 1)
    assert (f["client"], f["server"]) == (me, f"127.0.0.1:{port}"), f
    assert f["up"] == b"" and f["down"] == b"" and f["ends"] == [("s", "FIN")], f


def test_forward_connect_timeout_is_captured_with_what_the_client_sent(capd):
    """The same for a connect that timed out (connect_timeout 1 s, a target whose
    accept queue is full): what the client sent while capd waited is captured."""
    ls, held = syn_hole()
    try:
        port = free_port()
        capd.ctl("add", "forward", "--port", port, "--to", "127.0.0.1:%d" % ls.getsockname()[1],
                 "--connect-timeout", "1s")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"hello, anyone?\n")
            s.settimeout(10)
            assert s.recv(100) == b""
        ss = capd.wait_sessions(lambda ss: ss and ss[-1]["state"] == "closed")
        assert "timed out" in ss[-1]["reason"], ss[-1]
        f = refused_flow(capd, ss[-1], 1)
        assert f["server"] == f"127.0.0.1:{port}" and f["client"] == ss[-1]["client"], f
        assert f["up"] == b"hello, anyone?\n" and f["down"] == b"" and f["ends"] == [("s", "FIN")], f
    finally:
        for c in held:
            c.close()
        ls.close()


def test_relative_paths_are_shown_clean(capd_factory):
    """With conf/capd-dev.conf's `control = ../build/dev/capd.sock` (tools/dev run, the
    README's first step), capd's ready line, capctl status and capture status showed
    /work/main/conf/../build/dev/capd.sock. A config-relative path is now joined to the
    config file's folder and cleaned: the same file, named plainly. capd -c with a ".."
    in it is named clean too, and so is a users file in a capd -t error."""
    from pathlib import Path
    c = capd_factory(start=False)
    top = Path(os.path.realpath(c.dir))
    (top / "conf").mkdir()
    c.conf_path = c.dir / "conf" / ".." / "conf" / "capd.conf"
    c.sock, c.spool = top / "x" / "capd.sock", top / "x" / "spool"
    c.conf_path.write_text("[capd]\ncontrol = ../x/capd.sock\nspool = ./../x/./spool/\n"
                           "state_dir = ../x//state\nlog_level = info\n")
    (top / "x").mkdir()
    c.start()
    st = c.ctl("status", json_out=True)
    assert (st["config"], st["control"], st["spool"]) == (
        f"{top}/conf/capd.conf", str(c.sock), str(c.spool)), st
    cap = c.ctl("capture", "status", json_out=True)
    assert cap["file"].startswith(f"{c.spool}/capd-"), cap
    shown = json.dumps([st, cap]) + c.ctl("status").stdout + c.log()
    assert "/../" not in shown and "/./" not in shown and "//" not in shown, shown
    assert f"ready: control {c.sock}, spool {c.spool}\n" in c.log(), c.log()
    # the same folder cleaning in a message with file:line
    bad = top / "conf" / "bad.conf"
    bad.write_text(f"[capd]\ncontrol = ../x/t.sock\n[socks s]\nlisten = 127.0.0.1:{free_port()}\n"
                   "users = ../x/no-such-users\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(bad)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and f"cannot read users file {top}/x/no-such-users:" in r.stderr, r.stderr
