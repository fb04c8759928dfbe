"""Issue 5: the reverse instance, routing by Host to real origins (the
recording origin of test_http), with keep-alive, bodies and capture."""

import os
import signal
import socket
import ssl
import subprocess
import time

import pytest

from conftest import (sigstop, CAPD, Listener, TlsServer, apart, check_pcap_clean, follow_session, free_port, refused_flow,
                      wait_port)
from test_http import KeptOrigin, Origin, curl_trace, kept_connection_requests, raw, read_all, status_of


@pytest.fixture
def origins():
    a, b, c = Origin("www"), Origin("api"), Origin("default")
    yield a, b, c
    for o in (a, b, c):
        o.close()


def curl(*args, timeout=60):
    return subprocess.run(["curl", "-sS", "--max-time", "30", *map(str, args)], capture_output=True, timeout=timeout)


def reverse(capd_factory, origins, default=False):
    a, b, c = origins
    port = free_port()
    conf = (f"[reverse r]\nlisten = {port}\nroute = www.example.com=127.0.0.1:{a.port}\n"
            f"route = *.api.test=127.0.0.1:{b.port}\n")
    if default:
        conf += f"default = 127.0.0.1:{c.port}\n"
    return capd_factory(conf), port


def closed(capd, n):
    """The sessions once n of instance r's have closed, by id: capctl lists them in the order
    they closed, which sessions on two workers invert (a client's second connection closed
    before its first, whose end capd learnt later, seen in test_bodies_and_keepalive)."""
    return sorted(capd.wait_sessions(lambda ss: len([s for s in ss if s["instance"] == "r" and s["state"] == "closed"])
                                      >= n), key=lambda s: s["id"])



def test_refusal_reaches_an_uploading_client(capd_factory, origins):
    """A client still sending its body when capd refuses the head (421) can finish
    sending and then read the refusal: after the reply and its FIN, capd reads and
    drops what comes (a lingering close) instead of closing, which would reset the
    connection under the client's next write (curl then reports a failed send and
    never shows the reply)."""
    capd, port = reverse(capd_factory, origins)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST / HTTP/1.1\r\nHost: nowhere.test\r\nContent-Length: 4194304\r\n\r\n" + os.urandom(1 << 18))
    time.sleep(0.5)  # capd has answered and sent its FIN by now
    for _ in range(15):
        s.sendall(os.urandom(1 << 18))  # a reset would fail one of these
    reply = read_all(s, 10)
    s.close()
    assert status_of(reply) == 421, reply


def test_routes_by_host(capd_factory, origins):
    a, b, c = origins
    capd, port = reverse(capd_factory, origins)
    r = curl("-H", "Host: www.example.com", f"http://127.0.0.1:{port}/index.html?q=1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello from www /index.html?q=1\n"
    req = a.requests[-1]
    assert req["line"] == "GET /index.html?q=1 HTTP/1.1"
    assert req["headers"]["Host"] == "www.example.com"          # kept
    assert req["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert req["headers"]["X-Forwarded-Host"] == "www.example.com"
    assert req["headers"]["X-Forwarded-Proto"] == "http"
    # wildcard at any depth, the port in Host ignored for routing, case-insensitive
    for host in ("v1.api.test", "a.b.API.test:8081"):
        r = curl("-H", f"Host: {host}", f"http://127.0.0.1:{port}/x")
        assert r.stdout == b"hello from api /x\n", host
    assert b.requests[-1]["headers"]["Host"] == "a.b.API.test:8081"


def test_no_route_421(capd_factory, origins):
    a, b, c = origins
    capd, port = reverse(capd_factory, origins)
    for host in ("unknown.test", "api.test", "example.com"):
        reply = raw(port, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert status_of(reply) == 421, (host, reply)
        assert b"no route" in reply
    ss = closed(capd, 3)
    assert all(s["reason"].startswith("421 Misdirected Request") for s in ss if s["instance"] == "r")
    assert "421 Misdirected Request" in capd.log()
    # still serving
    r = curl("-H", "Host: www.example.com", f"http://127.0.0.1:{port}/")
    assert r.stdout == b"hello from www /\n"


def test_default_route(capd_factory, origins):
    a, b, c = origins
    capd, port = reverse(capd_factory, origins, default=True)
    r = curl("-H", "Host: elsewhere.test", f"http://127.0.0.1:{port}/d")
    assert r.stdout == b"hello from default /d\n"
    reply = raw(port, b"GET /old HTTP/1.0\r\n\r\n")      # no Host at all: the default
    assert reply.endswith(b"hello from default /old\n")


def test_forwarded_for_appends(capd_factory, origins):
    a, b, c = origins
    capd, port = reverse(capd_factory, origins)
    r = curl("-H", "Host: www.example.com", "-H", "X-Forwarded-For: 10.0.0.1", "-H", "X-Forwarded-Host: evil",
             f"http://127.0.0.1:{port}/")
    assert r.returncode == 0
    h = a.requests[-1]["headers"]
    assert h["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    assert h["X-Forwarded-Host"] == "www.example.com"
    assert "evil" not in a.requests[-1]["raw_headers"]


def test_forwarded_for_appends_to_the_last_line(capd_factory, origins):
    """Regression: with X-Forwarded-For on two lines (one list, RFC 9110 5.3) the client's
    address was appended to each; it goes once, after the last."""
    a, b, c = origins
    capd, port = reverse(capd_factory, origins)
    reply = raw(port, b"GET /xff HTTP/1.1\r\nHost: www.example.com\r\nX-Forwarded-For: 10.0.0.1\r\n"
                      b"X-Forwarded-For: 10.0.0.2\r\nConnection: close\r\n\r\n")
    assert status_of(reply) == 200, reply
    lines = [x for x in a.requests[-1]["raw_headers"].splitlines() if x.lower().startswith("x-forwarded-for:")]
    assert lines == ["X-Forwarded-For: 10.0.0.1", "X-Forwarded-For: 10.0.0.2, 127.0.0.1"]


def test_connection_cannot_drop_host_or_the_framing(capd_factory, origins):
    """Regression: a header named in Connection was dropped even when it was Host
    (the origin got an HTTP/1.1 request without one) or Transfer-Encoding, whose
    chunked body capd passed on all the same (the origin read it as requests)."""
    a, b, c = origins
    capd, port = reverse(capd_factory, origins)
    reply = raw(port, b"PUT /chunked HTTP/1.1\r\nHost: www.example.com\r\n"
                      b"Connection: Host, Transfer-Encoding, close\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"4\r\nbody\r\n0\r\n\r\n")
    assert status_of(reply) == 200 and b"\r\n4\r\nbody\r\n0\r\n\r\n" in reply, reply
    assert len(a.requests) == 1, a.requests
    h = a.requests[0]["headers"]
    assert h["Host"] == "www.example.com" and h["Transfer-Encoding"] == "chunked"
    assert a.requests[0]["body"] == b"body"


def test_host_with_an_empty_port(capd_factory, origins):
    """Regression: "Host: name:" (an empty port is the default one, RFC 9110 4.2.1;
    nginx takes it) got 400 "bad Host" instead of being routed by its name."""
    a, b, c = origins
    capd, port = reverse(capd_factory, origins)
    for host in ("www.example.com:", "v1.api.test:"):
        reply = raw(port, f"GET /e HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert status_of(reply) == 200, (host, reply)
    assert a.requests[-1]["headers"]["Host"] == "www.example.com:"
    assert b.requests[-1]["headers"]["Host"] == "v1.api.test:"
    reply = raw(port, b"GET http://www.example.com:/abs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.endswith(b"hello from www /abs\n"), reply


def test_absolute_form_replaces_host(capd_factory, origins):
    """Regression: an absolute-form request is routed by its URL's host, whose authority
    replaces Host (RFC 9112 3.2.2); the upstream got the client's Host, and X-Forwarded-Host
    named it too."""
    a, b, c = origins
    capd, port = reverse(capd_factory, origins)
    for authority in ("x.api.test", "x.api.test:8081"):
        reply = raw(port, f"GET http://{authority}/4?q HTTP/1.1\r\nHost: www.example.com\r\n"
                          "Connection: close\r\n\r\n".encode())
        assert reply.endswith(b"hello from api /4?q\n"), reply
        req = b.requests[-1]
        assert req["line"] == "GET /4?q HTTP/1.1"
        assert req["headers"]["Host"] == authority
        assert req["headers"]["X-Forwarded-Host"] == authority
        assert "www.example.com" not in req["raw_headers"]
    # origin form keeps its Host
    reply = raw(port, b"GET /5 HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n")
    assert reply.endswith(b"hello from www /5\n")
    assert a.requests[-1]["headers"]["Host"] == a.requests[-1]["headers"]["X-Forwarded-Host"] == "www.example.com"


def test_bodies_and_keepalive(capd_factory, origins, tmp_path):
    a, b, c = origins
    capd, port = reverse(capd_factory, origins)
    data = os.urandom(200000)
    f = tmp_path / "body"
    f.write_bytes(data)
    r = curl("-H", "Host: www.example.com", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{f}",
             f"http://127.0.0.1:{port}/chunked")
    assert r.stdout == data
    r = curl("-H", "Host: www.example.com", "-H", "Expect:", "--data-binary", f"@{f}", f"http://127.0.0.1:{port}/echo")
    assert r.stdout == data
    # two requests for two upstreams on one client connection, answered in order
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /1 HTTP/1.1\r\nHost: www.example.com\r\n\r\nGET /2 HTTP/1.1\r\nHost: x.api.test\r\n"
                  b"Connection: close\r\n\r\n")
        got = read_all(s)
    assert got.index(b"hello from www /1\n") < got.index(b"hello from api /2\n")
    ss = closed(capd, 4)
    last = [x for x in ss if x["instance"] == "r"][-2:]
    assert [x["target"] for x in last] == [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
    assert last[0]["client"] == last[1]["client"]


def test_reverse_capture(capd_factory, origins):
    a, b, c = origins
    capd, port = reverse(capd_factory, origins)
    r = curl("-H", "Host: www.example.com", f"http://127.0.0.1:{port}/cap")
    assert r.stdout == b"hello from www /cap\n"
    s = [x for x in closed(capd, 1) if x["instance"] == "r" and x["bytes_up"] > 0][0]
    capd.flush()
    pcap = capd.pcaps()[-1]
    _, up, down = follow_session(pcap, s["id"])
    assert up.startswith(b"GET /cap HTTP/1.1\r\nHost: www.example.com\r\n")
    assert b"X-Forwarded-For: 127.0.0.1\r\n" in up
    assert down.startswith(b"HTTP/1.1 200 OK\r\n") and down.endswith(b"hello from www /cap\n")
    check_pcap_clean(pcap)


def test_reverse_malformed(capd_factory, origins):
    capd, port = reverse(capd_factory, origins)
    for req, st in ((b"GET / HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
                    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
                    (b"CONNECT www.example.com:443 HTTP/1.1\r\nHost: www.example.com\r\n\r\n", 405),
                    (b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n", 400)):
        assert status_of(raw(port, req)) == st, req


def test_capctl_add_reverse(capd, origins):
    a, b, c = origins
    port = free_port()
    capd.ctl("add", "reverse", "--port", port, "--route", f"www.example.com=127.0.0.1:{a.port}",
             "--route", f"*.api.test=127.0.0.1:{b.port}", "--default", f"127.0.0.1:{c.port}")
    lst = capd.ctl("list", json_out=True)
    inst = [i for i in lst if i["type"] == "reverse"][0]
    assert inst["name"] == f"reverse-{port}"
    assert inst["routes"] == [f"www.example.com=127.0.0.1:{a.port}", f"*.api.test=127.0.0.1:{b.port}"]
    assert inst["default"] == f"127.0.0.1:{c.port}"
    r = curl("-H", "Host: q.api.test", f"http://127.0.0.1:{port}/")
    assert r.stdout == b"hello from api /\n"
    bad = capd.ctl("add", "reverse", "--port", free_port(), "--route", "nohost", check=False)
    assert bad.returncode != 0
    # the table's INFO: a default alone said "routes , default ..."
    capd.ctl("add", "reverse", "--port", free_port(), "--name", "d", "--default", f"127.0.0.1:{c.port}")
    rows = {line.split()[0]: line for line in capd.ctl("list").stdout.splitlines()}
    assert rows[f"reverse-{port}"].endswith(f"routes www.example.com=127.0.0.1:{a.port},*.api.test=127.0.0.1:{b.port}"
                                            f", default 127.0.0.1:{c.port}"), rows
    assert rows["d"].endswith(f"  default 127.0.0.1:{c.port}"), rows


@pytest.fixture(scope="module")
def tls_origin(tmp_path_factory):
    """The TLS origin (nginx serving static files, its certificates made with openssl:
    about a second to set up), one for the module's tests, which only read from it."""
    import test_tls
    o = test_tls.Origin(tmp_path_factory.mktemp("reverse-tls") / "tls-origin")
    yield o
    o.stop()


@pytest.fixture
def tls_reverse(capd, tmp_path, tls_origin):
    """A `--tls` reverse instance routing test_tls.NAME to a TLS origin (nginx):
    yields (run curl against it with extra args, the test_tls module)."""
    import test_tls
    o = tls_origin
    assert o.proc.poll() is None, "the shared TLS origin has stopped"
    port = free_port()
    capd.ctl("add", "reverse", "--port", port, "--name", "r", "--route", f"{test_tls.NAME}=127.0.0.1:{o.port}",
             "--tls", "--no-tls-verify")
    ca = test_tls.export_ca(capd, tmp_path / "capd-ca.pem")
    url = f"https://{test_tls.NAME}:{port}/"

    def get(*args, n=1):
        return curl("--http1.1", "--cacert", ca, "--resolve", f"{test_tls.NAME}:{port}:127.0.0.1",
                    *args, *[url] * n)
    get.port, get.ca, get.origin_port = port, ca, o.port
    yield get, test_tls


def test_reverse_tls(capd, tls_reverse):
    """`--tls` on a reverse instance: the client's TLS ends at capd (certificate
    forged for its SNI), the route is picked from the plaintext Host, and the
    upstream leg is TLS again; the capture holds the plaintext exchange."""
    get, test_tls = tls_reverse
    r = get(n=2)
    assert r.returncode == 0, r.stderr
    assert r.stdout == test_tls.BODY * 2
    s = [x for x in closed(capd, 1) if x["bytes_up"] > 0][-1]
    pcap = test_tls.pcap_after(capd)
    _, up, down = follow_session(pcap, s["id"])
    assert up.startswith(b"GET / HTTP/1.1\r\n")
    assert b"X-Forwarded-Proto: https\r\n" in up
    assert down.endswith(test_tls.BODY)



def test_reverse_tls_refusal_reaches_an_uploading_client(capd, tls_reverse, tmp_path):
    """A TLS client still uploading when capd refuses its request (421: no route)
    reads the refusal: capd sends close_notify and a FIN and drains what comes,
    as for a plain client, instead of a close that resets the reply away."""
    get, _ = tls_reverse
    body = tmp_path / "body"
    body.write_bytes(os.urandom(200000))
    codes = []
    for _ in range(8):
        r = get("-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: nowhere.test", "-H", "Expect:",
                "--data-binary", f"@{body}")
        codes.append((r.returncode, r.stdout))
    assert codes == [(0, b"421")] * 8, codes


def test_reverse_tls_head_longer_than_one_read(capd, tls_reverse):
    """Inside TLS, a head longer than one 16 KiB handshake read (the most a
    TLS record holds): capd must read on while OpenSSL holds decrypted bytes
    the socket no longer shows, or the request would stall."""
    get, test_tls = tls_reverse
    pads = [f"X-Pad-{i}: {chr(ord('a') + i) * 7000}" for i in range(3)]  # nginx: 4 lines of 8 KiB at most
    r = get(*[a for h in pads for a in ("-H", h)])
    assert r.returncode == 0, r.stderr
    assert r.stdout == test_tls.BODY, r.stdout[:300]
    s = [x for x in closed(capd, 1) if x["bytes_up"] > 0][-1]
    assert s["bytes_up"] > 21000, s


def tls_send_and_close(port, ca, name, data):
    """A TLS client that sends data (one record at most 16 KiB) and its close_notify in one
    TCP segment with the FIN, then returns the plaintext it reads until capd closes."""
    ctx = ssl.create_default_context(cafile=str(ca))
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(inc, out, server_hostname=name)
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                s.sendall(out.read())
                d = s.recv(65536)
                assert d, "capd closed during the TLS handshake"
                inc.write(d)
        s.sendall(out.read())
        time.sleep(0.3)      # capd waits for the request now: the record and the close come in one read
        tls.write(data)
        try:
            tls.unwrap()
        except ssl.SSLWantReadError:
            pass             # close_notify sent, the server's not read yet
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        s.sendall(out.read())
        s.shutdown(socket.SHUT_WR)
        while True:
            d = s.recv(65536)
            if not d:
                return got
            inc.write(d)
            try:
                while True:
                    got += tls.read(65536)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return got


def test_reverse_tls_pipelined_requests_and_close_in_one_read(capd, tls_reverse):
    """Regression: inside TLS a 16 KiB read is one whole record. Two pipelined requests in
    one 16384-byte record followed by close_notify and the FIN: the close was seen before the
    relay started, and a worker spun forever (no answer, capctl hung). Both are answered."""
    get, test_tls = tls_reverse
    pads = [f"X-Pad-{i}: {chr(ord('a') + i) * 7000}\r\n" for i in range(2)]   # nginx: lines of 8 KiB at most
    first = f"GET /index.html HTTP/1.1\r\nHost: {test_tls.NAME}\r\n" + "".join(pads)
    second = f"GET /index.html?2 HTTP/1.1\r\nHost: {test_tls.NAME}\r\n\r\n"
    first += "X-Pad: " + "p" * (16384 - len(first) - 7 - 4 - len(second)) + "\r\n\r\n"
    data = (first + second).encode()
    assert len(data) == 16384
    got = tls_send_and_close(get.port, get.ca, test_tls.NAME, data)
    assert capd.ctl("status", timeout=5).returncode == 0
    assert got.count(b"HTTP/1.1 200 OK\r\n") == 2, got[:500]
    assert got.count(test_tls.BODY) == 2
    s = [x for x in closed(capd, 1) if x["bytes_up"] > 0][-1]
    assert s["reason"] == "closed", s


def test_route_to_a_name_capd_redirects_is_not_a_loop(netns, ns_etc, ns_capd):
    """The no-proxy setup written with the name on both sides (`hosts add www.loop.test`,
    `route = www.loop.test=www.loop.test:PORT`): capd's resolver reads the hosts file
    too, so the route led to the instance itself, and each new session again: the request
    went round ~120 times until its Via lines made a 431 (a forward instance looped until
    capd ran out of descriptors). capd now answers 502 saying why, with one session."""
    with open(f"{ns_etc}/hosts", "w") as f:
        # as `capctl hosts add www.loop.test` would, outside capd's block: capd editing
        # this bind-mounted file (even to drop its block at the stop) leaves its backup in
        # the real /etc
        f.write("127.0.0.1 localhost\n127.0.0.1 www.loop.test\n")
    port = 61080
    c = ns_capd(netns, f"[reverse r]\nlisten = 127.0.0.1:{port}\nroute = www.loop.test=www.loop.test:{port}\n"
                       f"[forward f]\nlisten = 127.0.0.1:{port + 1}\nto = www.loop.test:{port + 1}\n")
    r = subprocess.run(["ip", "netns", "exec", netns, "curl", "-sS", "--max-time", "5", "-i",
                        f"http://www.loop.test:{port}/"], capture_output=True, timeout=20)
    assert status_of(r.stdout) == 502, r.stdout + r.stderr
    assert b"resolves to this instance's own address 127.0.0.1:" in r.stdout, r.stdout
    subprocess.run(["ip", "netns", "exec", netns, "curl", "-sS", "--max-time", "2",
                    f"http://www.loop.test:{port + 1}/"], capture_output=True, timeout=20)
    ss = c.wait_sessions(lambda ss: len([s for s in ss if s["state"] == "closed"]) >= 2)
    assert len(ss) == 2, ss  # one each: no session led to another
    assert all("own address" in s["reason"] for s in ss), ss


def test_reverse_tls_upstream_handshake_failure_is_a_502(capd, tls_reverse, origins):
    """A `--tls` reverse instance whose upstream TLS fails (a certificate capd does not
    trust, a server that is not TLS): the client's TLS and its request were done, yet it
    got a bare close (curl: "Empty reply from server"); it gets a 502 saying why."""
    get, test_tls = tls_reverse
    a, b, c = origins
    port = free_port()
    capd.ctl("add", "reverse", "--port", port, "--name", "rv", "--tls",
             "--route", f"{test_tls.NAME}=127.0.0.1:{get.origin_port}",  # verified: the origin's CA is not capd's
             "--route", f"plain.example.test=127.0.0.1:{a.port}")           # plain HTTP
    for name, why in ((test_tls.NAME, b"upstream certificate did not verify"),
                      ("plain.example.test", b"upstream handshake failed")):
        r = curl("--http1.1", "-i", "--cacert", get.ca, "--resolve", f"{name}:{port}:127.0.0.1",
                 f"https://{name}:{port}/x")
        assert r.returncode == 0, (name, r.stderr)
        assert status_of(r.stdout) == 502, r.stdout
        assert why in r.stdout, r.stdout
    ss = [s for s in capd.wait_sessions(lambda ss: len([s for s in ss if s["instance"] == "rv" and s["state"] == "closed"]) >= 2)
          if s["instance"] == "rv"]
    assert all(s["reason"].startswith("502 Bad Gateway: upstream ") for s in ss), ss


def test_refused_request_names_its_target_reverse(capd_factory, origins):
    """Regression: a reverse instance's refusals (421 no route, 405 CONNECT, 400) left the
    session record with target "" and no note. The record now names the host the client
    asked for (Host, or the CONNECT or URL authority; the scheme's default port) and the
    request line; a Host that does not parse leaves the target empty but not the note."""
    capd, port = reverse(capd_factory, origins)
    cases = [(b"GET /a HTTP/1.1\r\nHost: nowhere.test\r\n\r\n", 421, "nowhere.test:80", "GET /a"),
             (b"GET /b HTTP/1.1\r\nHost: NoWhere.test:8081\r\n\r\n", 421, "NoWhere.test:8081", "GET /b"),
             (b"CONNECT www.example.com:443 HTTP/1.1\r\nHost: www.example.com\r\n\r\n", 405,
              "www.example.com:443", "CONNECT www.example.com:443"),
             (b"GET /c HTTP/1.1\r\nHost: bad host\r\n\r\n", 400, "", "GET /c"),
             (b"GET /d HTTP/1.0\r\n\r\n", 421, "", "GET /d")]
    for req, status, _, _ in cases:
        assert status_of(raw(port, req)) == status, req
    # in the order they came (two shards may close them in another)
    ss = sorted((s for s in closed(capd, len(cases)) if s["instance"] == "r"), key=lambda s: s["id"])
    for (req, status, target, note), s in zip(cases, ss):
        assert (s["target"], s.get("note"), s["reason"][:4]) == (target, note, f"{status} "), (req, s)
        assert f"session {s['id']} reverse/r 127.0.0.1:" in capd.log()
        assert f" -> {target or '-'} up=0 down=0 {s['reason']}\n" in capd.log()


def test_reverse_max_forwards(capd_factory, origins):
    """RFC 9110 7.6.2 binds a gateway too: a reverse instance answers an OPTIONS or TRACE
    whose Max-Forwards is 0 itself (its Allow leaves out CONNECT, which it refuses), and
    counts a larger one down; it passed both on unchanged."""
    a, b, c = origins
    capd, port = reverse(capd_factory, origins)
    reply = raw(port, b"OPTIONS * HTTP/1.1\r\nHost: www.example.com\r\nMax-Forwards: 0\r\n\r\n")
    assert reply == (b"HTTP/1.1 200 OK\r\nAllow: GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE\r\n"
                     b"Content-Length: 0\r\nConnection: close\r\n\r\n"), reply
    assert a.requests == []
    s = [x for x in closed(capd, 1) if x["instance"] == "r"][-1]
    assert (s["target"], s["note"]) == ("www.example.com:80", "OPTIONS *"), s
    assert s["reason"] == "200 OK: OPTIONS with Max-Forwards: 0, answered by capd"
    reply = raw(port, b"TRACE /t HTTP/1.1\r\nHost: www.example.com\r\nMax-Forwards: 2\r\nConnection: close\r\n\r\n")
    assert status_of(reply) == 200, reply
    assert a.requests[-1]["line"] == "TRACE /t HTTP/1.1"
    assert a.requests[-1]["headers"]["Max-Forwards"] == "1"


def test_absolute_https_form_on_a_plain_connection_is_misdirected(capd_factory, origins):
    """An absolute-form target with https:// (`GET https://h/ HTTP/1.1`) got 400 'bad request
    target' from a reverse instance, which knew only http:// URLs; the request is well formed.
    On a connection without TLS it names a resource this connection cannot serve (RFC 9110
    7.4: an https resource only over a secured connection), so it gets 421 (RFC 9110 15.5.20:
    a target URI that does not match the connection), and nothing goes upstream."""
    a, b, c = origins
    capd, port = reverse(capd_factory, origins, default=True)
    for target in ("https://www.example.com/x", "HTTPS://www.example.com:8443/x"):
        reply = raw(port, f"GET {target} HTTP/1.1\r\nHost: www.example.com\r\n\r\n".encode())
        assert status_of(reply) == 421, (target, reply)
        assert b"https" in reply.split(b"\r\n\r\n", 1)[1]
    assert a.requests == [] and c.requests == []
    ss = sorted((s for s in closed(capd, 2) if s["instance"] == "r"), key=lambda s: s["id"])
    assert [(s["target"], s["note"]) for s in ss] == [("www.example.com:443", "GET https://www.example.com/x"),
                                                      ("www.example.com:8443", "GET HTTPS://www.example.com:8443/x")]
    assert all(s["reason"].startswith("421 Misdirected Request: ") for s in ss), ss


class TlsRecordingOrigin(TlsServer):
    """A TLS origin (Python ssl, a self-signed certificate) that records each request head
    and answers it with a close-delimited "hello"."""

    timeout = 5

    def __init__(self, d):
        import test_tls
        self.heads = []
        super().__init__(*test_tls.make_cert(d, "rec-origin", "/CN=rec-origin"))

    def talk(self, t):
        got = b""
        while b"\r\n\r\n" not in got:
            d = t.recv(65536)
            if not d:
                return
            got += d
        self.heads.append(got.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
        t.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello")


def test_reverse_tls_absolute_https_form(capd, tmp_path):
    """Regression: `GET https://h/ HTTP/1.1` on a reverse instance's TLS connection got 400
    'bad request target'. A server must accept the absolute form (RFC 9112 3.2.2): it is
    routed by the URL's host, whose authority replaces Host, as for http://."""
    import test_tls
    o = TlsRecordingOrigin(tmp_path)
    try:
        port = free_port()
        capd.ctl("add", "reverse", "--port", port, "--name", "r", "--route", f"www.example.test=127.0.0.1:{o.port}",
                 "--tls", "--no-tls-verify")
        ca = test_tls.export_ca(capd, tmp_path / "capd-ca.pem")
        for target, authority in (("https://www.example.test/p?q", "www.example.test"),
                                  ("HTTPS://www.example.test:4443", "www.example.test:4443")):
            r = curl("--http1.1", "--cacert", ca, "--resolve", f"www.example.test:{port}:127.0.0.1",
                     "--request-target", target, "-H", "Host: no-route.test", f"https://www.example.test:{port}/")
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"hello", r.stdout
            head = o.heads[-1]
            assert head.startswith(f"GET /{'p?q' if '?' in target else ''} HTTP/1.1\r\nHost: {authority}\r\n".encode()), head
            assert b"no-route.test" not in head and f"X-Forwarded-Host: {authority}\r\n".encode() in head
        s = [x for x in closed(capd, 2) if x["instance"] == "r"][-1]
        assert s["note"].startswith("GET HTTPS://www.example.test:4443; tls "), s
    finally:
        o.close()


def test_reverse_origin_resets_idle_connection(capd):
    """Regression: an origin that resets its idle kept connection made capd reset
    the client's connection; the client's next request now goes to a new one."""
    o = KeptOrigin("rst", idle=0.1)
    try:
        port = free_port()
        capd.ctl("add", "reverse", "--port", port, "--name", "r", "--default", f"127.0.0.1:{o.port}")
        got = kept_connection_requests(port, "", 2, pause=0.3)
        assert got[0].endswith(b"conn 1: GET /r0 HTTP/1.1\n"), got
        assert got[1].endswith(b"conn 2: GET /r1 HTTP/1.1\n"), got
        ss = [x for x in closed(capd, 2) if x["instance"] == "r"]
        assert ss[0]["reason"] == f"upstream reset (client continues in session {ss[1]['id']})", ss
    finally:
        o.close()


def tls_request(port, sni, head):
    """One request on a new TLS connection to capd with this SNI: the reply, read to the end."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname=sni) as t:
        t.sendall(head)
        got = b""
        while True:
            try:
                d = t.recv(65536)
            except ssl.SSLZeroReturnError:
                break
            if not d:
                break
            got += d
        return got


def test_reverse_tls_host_differs_from_sni_is_misdirected(capd, tmp_path):
    """Regression: on a `--tls` connection whose SNI was a.example.test, a request with
    `Host: b.example.test` went to b's upstream, with a.example.test as the upstream's SNI
    (and the certificate capd showed forged for a.example.test). A Host other than the
    SNI that routes elsewhere is misdirected (RFC 9110 7.4): 421, as nginx answers; case,
    a trailing dot and the port do not make it differ, and one that routes where the SNI
    does (domain fronting) goes on."""
    o = TlsRecordingOrigin(tmp_path)
    try:
        port = free_port()
        capd.ctl("add", "reverse", "--port", port, "--name", "r", "--route", f"a.example.test=127.0.0.1:{o.port}",
                 "--route", f"b.example.test=127.0.0.1:{o.port}", "--tls", "--no-tls-verify")
        reply = tls_request(port, "a.example.test", b"GET /x HTTP/1.1\r\nHost: b.example.test\r\n\r\n")
        assert status_of(reply) == 421, reply
        assert b"SNI" in reply
        assert o.heads == []
        reply = tls_request(port, "a.example.test", b"GET /y HTTP/1.1\r\nHost: A.Example.Test.:443\r\n\r\n")
        assert status_of(reply) == 200, reply
        assert o.heads[-1].startswith(b"GET /y HTTP/1.1\r\nHost: A.Example.Test.:443\r\n"), o.heads
        # a Host that routes where the SNI does (here the default: domain fronting) goes on
        port = free_port()
        capd.ctl("add", "reverse", "--port", port, "--default", f"127.0.0.1:{o.port}", "--tls", "--no-tls-verify")
        reply = tls_request(port, "front.example.test", b"GET /z HTTP/1.1\r\nHost: hidden.example.test\r\n\r\n")
        assert status_of(reply) == 200, reply
        assert o.heads[-1].startswith(b"GET /z HTTP/1.1\r\nHost: hidden.example.test\r\n"), o.heads
    finally:
        o.close()


class ListLengthOrigin(Listener):
    """Reads one request head and its 2-byte body, records the head, and answers with
    a Content-Length written as the list "5, 5"."""

    def __init__(self):
        self.heads = []
        super().__init__()

    def handle(self, c, peer):
        with c:
            c.settimeout(5)
            got = b""
            while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < 2:
                d = c.recv(65536)
                if not d:
                    return
                got += d
            self.heads.append(got.split(b"\r\n\r\n", 1)[0])
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")


def test_reverse_content_length_list_goes_on_as_one_value(capd):
    """Regression: a Content-Length that capd takes as one length though it is a list of
    equal values ("2, 2") or a repeated line went on as received, which RFC 9110 8.6
    allows only if the single value is forwarded: an nginx origin answered 400 to what
    capd had accepted, and an origin that reads the list as a number fails. One line
    with the value goes on, upstream and to the client."""
    o = ListLengthOrigin()
    try:
        port = free_port()
        capd.ctl("add", "reverse", "--port", port, "--name", "r", "--default", f"127.0.0.1:{o.port}")
        for head in (b"Content-Length: 2, 2\r\n", b"Content-Length: 2\r\ncontent-length: 02\r\n"):
            reply = raw(port, b"POST /p HTTP/1.1\r\nHost: x.test\r\nConnection: close\r\n" + head + b"\r\nab")
            assert status_of(reply) == 200, reply
            lines = [x for x in o.heads[-1].split(b"\r\n") if x.lower().startswith(b"content-length:")]
            assert lines == [head.split(b"\r\n")[0].replace(b"2, 2", b"2")], o.heads[-1]
            rhead, body = reply.split(b"\r\n\r\n", 1)
            lines = [x for x in rhead.split(b"\r\n") if x.lower().startswith(b"content-length:")]
            assert lines == [b"Content-Length: 5"] and body == b"hello", reply
    finally:
        o.close()


def test_reverse_ipv6_route_matches_any_spelling(capd_factory, origins):
    """Regression: a route for the IPv6 address ::1 matched `Host: [::1]` but not
    `Host: [0:0::1]` or `[::0001]`, other spellings of the same address (RFC 4291 2.2),
    which got 421. An IP route matches its address however Host writes it."""
    a, b, c = origins
    port = free_port()
    capd_factory(f"[reverse r]\nlisten = {port}\nroute = ::1=127.0.0.1:{a.port}\n")
    for host in ("[::1]", "[0:0::1]", "[::0001]:81", "[0:0:0:0:0:0:0:1]"):
        reply = raw(port, f"GET /v6 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert reply.endswith(b"hello from www /v6\n"), (host, reply)
        assert a.requests[-1]["headers"]["Host"] == host
    reply = raw(port, b"GET /v6 HTTP/1.1\r\nHost: [::2]\r\nConnection: close\r\n\r\n")
    assert status_of(reply) == 421, reply


def test_reverse_tls_request_without_host_is_routed_by_sni(capd, tmp_path):
    """Regression: on a `--tls` connection with SNI a.example.test, an HTTP/1.0 request
    without Host went to the default upstream (with a.example.test as its SNI), or got
    421 'no Host and no default route' though a.example.test has a route. Without Host
    the SNI names the host, as nginx takes it."""
    (tmp_path / "o").mkdir()
    (tmp_path / "d").mkdir()
    o, d = TlsRecordingOrigin(tmp_path / "o"), TlsRecordingOrigin(tmp_path / "d")
    try:
        port = free_port()
        capd.ctl("add", "reverse", "--port", port, "--name", "r", "--route", f"a.example.test=127.0.0.1:{o.port}",
                 "--default", f"127.0.0.1:{d.port}", "--tls", "--no-tls-verify")
        reply = tls_request(port, "a.example.test", b"GET /sni HTTP/1.0\r\n\r\n")
        assert status_of(reply) == 200 and reply.endswith(b"hello"), reply
        assert [h.split(b"\r\n")[0] for h in o.heads] == [b"GET /sni HTTP/1.0"] and d.heads == [], (o.heads, d.heads)
        reply = tls_request(port, "other.example.test", b"GET /other HTTP/1.0\r\n\r\n")
        assert status_of(reply) == 200 and [h.split(b"\r\n")[0] for h in d.heads] == [b"GET /other HTTP/1.0"]
    finally:
        o.close()
        d.close()


def test_reverse_asterisk_target_is_for_options_only(capd_factory, origins):
    """Regression: `GET * HTTP/1.1` went to the origin as it came (a Python origin served
    it as the path "*"). The asterisk form is for a server-wide OPTIONS only (RFC 9112
    3.2.4); nginx answers any other method with it 400, and so does capd now."""
    a, b, c = origins
    capd, port = reverse(capd_factory, origins)
    for method in ("GET", "POST", "DELETE"):
        reply = raw(port, f"{method} * HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 0\r\n\r\n".encode())
        assert status_of(reply) == 400 and b"OPTIONS only" in reply, (method, reply)
    assert a.requests == []
    reply = raw(port, b"OPTIONS * HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n")
    assert status_of(reply) == 200 and a.requests[-1]["line"] == "OPTIONS * HTTP/1.1", reply


def test_reverse_route_written_with_a_trailing_dot(capd_factory, origins):
    """Regression: `route = www.example.com.=...` (or `*.api.test.=...`) was accepted
    but matched nothing, neither `Host: www.example.com` nor `www.example.com.`, whose
    dot the match drops: every request got 421. A pattern's one trailing dot is dropped
    as a Host's is."""
    a, b, c = origins
    port = free_port()
    capd_factory(f"[reverse r]\nlisten = {port}\nroute = www.example.com.=127.0.0.1:{a.port}\n"
                        f"route = *.api.test.=127.0.0.1:{b.port}\n")
    for host, body in (("www.example.com", b"www"), ("WWW.example.com.", b"www"), ("v1.api.test", b"api"),
                       ("v1.api.test.:80", b"api")):
        reply = raw(port, f"GET /dot HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert reply.endswith(b"hello from " + body + b" /dot\n"), (host, reply)
    assert status_of(raw(port, b"GET / HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")) == 421


def test_reverse_conflicting_routes_for_one_pattern_are_refused(capd, origins, tmp_path):
    """Regression: two routes for one pattern (`www.example.com` to one upstream and
    `WWW.example.com.` to another) were both accepted and listed, and every request went
    to the first: the second was dead without a word. Such a config is refused, with the
    pattern; the same route twice is still accepted."""
    from conftest import CAPD
    a, b, c = origins
    bad = capd.ctl("add", "reverse", "--port", free_port(), "--route", f"www.example.com=127.0.0.1:{a.port}",
                   "--route", f"WWW.example.com.=127.0.0.1:{b.port}", check=False)
    assert bad.returncode == 1 and "two routes for 'WWW.example.com'" in bad.stderr, bad
    conf = tmp_path / "dup.conf"
    conf.write_text(f"[capd]\ncontrol = {tmp_path}/x.sock\nspool = {tmp_path}/sp\nstate_dir = {tmp_path}/st\n"
                    f"[reverse r]\nlisten = {free_port()}\nroute = *.api.test=127.0.0.1:{a.port}\n"
                    f"route = *.API.test=127.0.0.1:{b.port}\n")
    t = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert t.returncode == 1 and "two routes for '*.API.test'" in t.stderr, t
    port = free_port()
    capd.ctl("add", "reverse", "--port", port, "--route", f"www.example.com=127.0.0.1:{a.port}",
             "--route", f"www.example.com=127.0.0.1:{a.port}")
    assert raw(port, b"GET / HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n").endswith(b"hello from www /\n")


def test_reverse_route_for_a_bracketed_ipv6_address(capd, origins):
    """Regression: `--route '[::1]=...'`, the IPv6 address as Host writes it, was refused
    as a bad host pattern; only the bare `::1` was taken. Brackets around an IPv6 address
    are accepted; around anything else they are still refused, as written."""
    a, b, c = origins
    port = free_port()
    capd.ctl("add", "reverse", "--port", port, "--name", "r", "--route", f"[::1]=127.0.0.1:{a.port}")
    reply = raw(port, b"GET /br HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n")
    assert reply.endswith(b"hello from www /br\n"), reply
    for bad in ("[www.example.com]", "[127.0.0.1]", "[]"):
        r = capd.ctl("add", "reverse", "--port", free_port(), "--route", f"{bad}=127.0.0.1:{a.port}", check=False)
        assert r.returncode == 1 and f"bad host pattern '{bad}'" in r.stderr, (bad, r)


def test_reverse_conflicting_routes_for_one_ipv6_address_are_refused(capd, origins):
    """Regression: `::1` and `[0::1]` are one address, which a Host matches against the
    first route only; two such routes to different upstreams were accepted."""
    a, b, c = origins
    r = capd.ctl("add", "reverse", "--port", free_port(), "--route", f"::1=127.0.0.1:{a.port}",
                 "--route", f"[0::1]=127.0.0.1:{b.port}", check=False)
    assert r.returncode == 1 and "two routes for '0::1'" in r.stderr, r


def test_reverse_route_errors_name_their_own_line(tmp_path):
    """Regression: an error about one `route` line of a config named the line
    of the section's first route (repeated keys kept only that line): a
    conflicting route four lines further down was reported at the line of
    the route it conflicts with. Each error now names the offending entry's
    line, in `capd -t` and at start-up alike; so does a bad `auth` entry."""
    cases = [
        (["route = a.test=127.0.0.1:1", "route = b.test=127.0.0.1:1", "", "# the conflict:",
          "route = a.test=127.0.0.1:2"], "two routes for 'a.test' go to different upstreams"),
        (["route = a.test=127.0.0.1:1", "route = b.test=127.0.0.1:1", "route = c.test=127.0.0.1:0"],
         "bad route 'c.test=127.0.0.1:0'"),
        (["route = a.test=127.0.0.1:1", "route = bad_name!=127.0.0.1:1"], "bad host pattern 'bad_name!'"),
    ]
    for lines, msg in cases:
        conf = tmp_path / "capd.conf"
        head = ["[capd]", f"control = {tmp_path}/capd.sock", f"spool = {tmp_path}/spool",
                f"state_dir = {tmp_path}/state", "", "[reverse r]", f"listen = 127.0.0.1:{free_port()}"]
        conf.write_text("\n".join(head + lines) + "\n")
        want = f"{conf}:{len(head) + len(lines)}: {msg}"
        r = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=20)
        assert r.returncode == 1 and want in r.stderr, (want, r.stderr)
        r = subprocess.run([str(CAPD), "-c", str(conf)], capture_output=True, text=True, timeout=20)
        assert r.returncode != 0 and want in r.stderr, (want, r.stderr)
    conf.write_text("\n".join(head[:5] + ["[http h]", f"listen = 127.0.0.1:{free_port()}", "auth = u:p",
                                          "auth = nocolon"]) + "\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and f"{conf}:9: bad auth (no ':', so not shown)" in r.stderr, r.stderr


def test_empty_host(capd_factory, origins):
    """RFC 9112 3.2: an empty Host on an HTTP/1.1 origin-form request is a 400
    (nginx agrees), with a default route too; with an absolute-form target the
    Host is ignored and the URL's authority routes and replaces it, so an
    empty one there is no error. (Checked as correct; this pins it.)"""
    a, b, c = origins
    capd, port = reverse(capd_factory, origins, default=True)
    for version in ("1.1", "1.0"):
        reply = raw(port, f"GET /e HTTP/{version}\r\nHost: \r\nConnection: close\r\n\r\n".encode())
        assert status_of(reply) == 400 and b"bad Host" in reply, (version, reply)
    reply = raw(port, b"GET http://www.example.com/abs HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n")
    assert reply.endswith(b"hello from www /abs\n"), reply
    assert a.requests[-1]["headers"]["Host"] == "www.example.com"


def test_reverse_keep_alive_race_resends_the_request(capd):
    """The keep-alive race on a reverse instance (see test_http's
    test_keep_alive_race_resends_the_request): the GET the origin read as it
    closed its reused connection goes once more on a new one, rewritten from
    what the client sent, so X-Forwarded-For is added once, not twice."""
    o = KeptOrigin("fin", answers=1, idle=5, read_next=True)
    try:
        port = free_port()
        capd.ctl("add", "reverse", "--port", port, "--name", "r", "--default", f"127.0.0.1:{o.port}")
        got = kept_connection_requests(port, "", 2)
        assert [g.split(b"\r\n\r\n")[1] for g in got] == [b"conn 1: GET /r0 HTTP/1.1\n",
                                                         b"conn 2: GET /r1 HTTP/1.1\n"], got
        ss = [x for x in closed(capd, 2) if x["instance"] == "r"]
        assert ss[0]["reason"] == f"upstream closed without a response (request sent again in session {ss[1]['id']})"
        capd.flush()
        _, up, _ = follow_session(capd.pcaps()[-1], ss[1]["id"])
        assert up.startswith(b"GET /r1 HTTP/1.1\r\n") and up.count(b"X-Forwarded-For: 127.0.0.1\r\n") == 1, up
    finally:
        o.close()


class TlsKeptOrigin(Listener):
    """A TLS origin (Python ssl, a certificate for test_tls.NAME) that answers
    each request on a kept connection with "conn N: REQUEST LINE" and records
    the SNI each connection sent (.snis, None for none). With `answers`, after
    that many answers it reads the next request head and closes (close_notify
    and FIN; end="rst": a reset): the keep-alive race, as an origin's idle
    timeout firing then."""

    def __init__(self, d, answers=None, end="fin"):
        import test_tls
        cert, key = test_tls.make_cert(d, "kept", f"/CN={test_tls.NAME}", f"DNS:{test_tls.NAME}")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.sni_callback = lambda sock, name, ctx: self.snis.append(name)
        self.answers, self.end, self.conns, self.snis = answers, end, 0, []
        super().__init__()

    def handle(self, c, peer):
        self.conns += 1
        apart(self.serve, c, self.conns)

    def serve(self, c, n):
        c.settimeout(10)
        try:
            t = self.ctx.wrap_socket(c, server_side=True)
            got, answered = b"", 0
            while self.answers is None or answered < self.answers:
                d = t.recv(65536)
                if not d:
                    break
                got += d
                while b"\r\n\r\n" in got and (self.answers is None or answered < self.answers):
                    head, got = got.split(b"\r\n\r\n", 1)
                    body = b"conn %d: %s\n" % (n, head.split(b"\r\n")[0])
                    answered += 1
                    t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            while b"\r\n\r\n" not in got and (d := t.recv(65536)):
                got += d
            if self.end == "rst":
                t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                t.close()  # no close_notify: a bare reset
                return
            t.unwrap()
            t.close()
        except (OSError, ssl.SSLError):
            c.close()


@pytest.mark.parametrize("end", ["fin", "rst"])
def test_reverse_tls_keep_alive_race_resends_the_request(capd, tmp_path, end):
    """Regression: the keep-alive race (test_reverse_keep_alive_race_resends_the_request)
    on a `--tls` reverse instance gave curl "502 Bad Gateway: upstream closed
    without a response"; then, as its client connection could not move to a new
    session, capd closed it unanswered for curl's retry ("Connection died,
    retrying a fresh connect"). Issue tlsmove: the connection now moves with its
    TLS, and capd sends the request again on a new upstream connection itself,
    as on a plain one: curl sees no retry."""
    import test_tls
    o = TlsKeptOrigin(tmp_path, answers=1, end=end)
    try:
        port = free_port()
        capd.ctl("add", "reverse", "--port", port, "--name", "r", "--route", f"{test_tls.NAME}=127.0.0.1:{o.port}",
                 "--tls", "--no-tls-verify")
        ca = test_tls.export_ca(capd, tmp_path / "capd-ca.pem")
        url = f"https://{test_tls.NAME}:{port}"
        r = test_tls.curl("-v", "--http1.1", "--cacert", ca, "--resolve", f"{test_tls.NAME}:{port}:127.0.0.1",
                          f"{url}/r0", f"{url}/r1")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"conn 1: GET /r0 HTTP/1.1\nconn 2: GET /r1 HTTP/1.1\n", (r.stdout, r.stderr)
        assert b"retrying" not in r.stderr and b"Re-using existing connection" in r.stderr, r.stderr
        assert o.conns == 2
        ss = [x for x in closed(capd, 2) if x["instance"] == "r"]
        why = "upstream reset" if end == "rst" else "upstream closed without a response"
        assert ss[0]["reason"] == f"{why} (request sent again in session {ss[1]['id']})", ss
        assert ss[1]["reason"] == "closed", ss
    finally:
        o.close()


def test_reverse_tls_without_client_sni_sends_the_routes_name(capd, tmp_path):
    """Regression: on a `--tls` reverse instance a client that sent no SNI (curl
    to https://127.0.0.1 with a Host header) made capd send none to a TLS
    upstream, though it verifies the upstream's certificate against the route's
    name: a server with several sites showed its default certificate. capd now
    asks for the route's name (as nginx's proxy_ssl_server_name on), never an
    IP literal; a client's SNI still goes as it came."""
    import test_tls
    o = TlsKeptOrigin(tmp_path)
    try:
        port = free_port()
        capd.ctl("add", "reverse", "--port", port, "--name", "r", "--route", f"{test_tls.NAME}=localhost:{o.port}",
                 "--route", f"ip.test=127.0.0.1:{o.port}", "--tls", "--no-tls-verify")
        for host in (test_tls.NAME, "ip.test"):
            r = test_tls.curl("-k", "--http1.1", "-H", f"Host: {host}", f"https://127.0.0.1:{port}/nosni")
            assert r.returncode == 0 and r.stdout.endswith(b": GET /nosni HTTP/1.1\n"), r
        r = test_tls.curl("-k", "--http1.1", "--resolve", f"{test_tls.NAME}:{port}:127.0.0.1",
                          f"https://{test_tls.NAME}:{port}/sni")
        assert r.returncode == 0 and r.stdout.endswith(b": GET /sni HTTP/1.1\n"), r
        assert o.snis == ["localhost", None, test_tls.NAME], o.snis
    finally:
        o.close()


def test_reverse_fragment_in_the_target_is_a_400(capd_factory, origins):
    """Regression: a reverse instance passed "GET /a#frag" (and an absolute URL
    with a fragment) to the origin as sent, where a request target has no
    fragment (RFC 9112 3.2; clients strip it) and an invalid request line
    SHOULD get 400, which an http instance already answered. Now 400 on both,
    and nothing reaches the origin."""
    a, _, _ = origins
    capd, port = reverse(capd_factory, origins)
    before = len(a.requests)
    for target in (b"/a#frag", b"http://www.example.com/a?q#frag", b"http://www.example.com#frag"):
        reply = raw(port, b"GET %s HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n" % target)
        assert status_of(reply) == 400 and b"fragment in the request target" in reply, (target, reply)
    reply = raw(port, b"GET /a?q=%23 HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n")
    assert status_of(reply) == 200, reply
    assert len(a.requests) == before + 1 and a.requests[-1]["line"] == "GET /a?q=%23 HTTP/1.1", a.requests


def test_reverse_tls_verifies_the_name_it_sends_as_sni(capd_factory, tmp_path):
    """Regression: a `--tls` reverse instance sends the client's SNI to the upstream but
    checked the upstream's certificate against the route's host name only, so a route by
    name to a server that serves the client's name (several sites on one nginx, a CDN
    reached by its own name) got 502 "hostname mismatch" for the very certificate it had
    asked for, which nginx or curl reaching it with that SNI accept. A certificate for
    either name now passes (one for the route's name alone still does); one for neither
    is still refused."""
    import test_tls

    class Ok(TlsServer):
        def talk(self, t):
            got = b""
            while b"\r\n\r\n" not in got and (d := t.recv(65536)):
                got += d
            t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")

    certs = {n: test_tls.make_cert(tmp_path, n.replace(".", "-"), f"/CN={n}", f"DNS:{n}")
             for n in (test_tls.NAME, "localhost", "other.test")}
    trust = tmp_path / "trust.pem"
    trust.write_text("".join(c.read_text() for c, _ in certs.values()))
    servers = {n: Ok(*ck) for n, ck in certs.items()}
    try:
        port = free_port()
        capd = capd_factory(f"[reverse r]\nlisten = {port}\ntls = yes\n"
                            f"route = {test_tls.NAME}=localhost:{servers[test_tls.NAME].port}\n"
                            f"route = alt.example.test=localhost:{servers['localhost'].port}\n"
                            f"route = bad.example.test=localhost:{servers['other.test'].port}\n",
                            extra_env={"SSL_CERT_FILE": str(trust)})
        ca = test_tls.export_ca(capd, tmp_path / "capd-ca.pem")
        got = {}
        for name in (test_tls.NAME, "alt.example.test", "bad.example.test"):
            r = curl("--http1.1", "-i", "--cacert", ca, "--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/")
            assert r.returncode == 0, (name, r.stderr)
            got[name] = status_of(r.stdout)
        assert got == {test_tls.NAME: 200, "alt.example.test": 200, "bad.example.test": 502}, got
        assert closed(capd, 3)[-1]["reason"] == "502 Bad Gateway: upstream certificate did not verify: hostname mismatch"
    finally:
        for s in servers.values():
            s.close()


def test_reverse_tls_alpn_without_http1_is_refused(capd, tls_reverse):
    """Regression: a `--tls` reverse instance serves HTTP/1.x only, yet a client whose
    ALPN list held neither http/1.1 nor http/1.0 (an h2-only client, as gRPC's) got a
    handshake without ALPN, sent its HTTP/2 preface and got a 505 in HTTP/1.1 it cannot
    read. RFC 7301 3.2 says no_application_protocol, which nginx sends: capd now does,
    and says why. http/1.0 alone (curl --http1.0) gets http/1.0, as from nginx."""
    get, test_tls = tls_reverse

    def hello(alpn):
        ctx = ssl.create_default_context(cafile=str(get.ca))
        ctx.set_alpn_protocols(alpn)
        with socket.create_connection(("127.0.0.1", get.port), timeout=10) as c:
            with ctx.wrap_socket(c, server_hostname=test_tls.NAME) as t:
                return t.selected_alpn_protocol()

    assert hello(["h2", "http/1.1"]) == "http/1.1"
    assert hello(["http/1.0"]) == "http/1.0"
    with pytest.raises(ssl.SSLError) as e:
        hello(["h2", "grpc-exp"])
    assert "no application protocol" in str(e.value), e.value
    s = closed(capd, 3)[-1]
    assert s["reason"] == "protocol mismatch: the client's ALPN offers h2, grpc-exp, capd serves HTTP/1.1 here", s
    r = get("--http1.0")
    assert r.returncode == 0 and r.stdout == test_tls.BODY, r.stderr


def test_upgrade_ignored_in_http10_request(capd_factory, origins):
    """RFC 9110 7.8: Upgrade in an HTTP/1.0 request is ignored; capd passed it on
    (with a Connection: Upgrade of its own) to the origin behind a reverse instance."""
    capd, port = reverse(capd_factory, origins)
    r = curl("--http1.0", "-H", "Host: www.example.com", "-H", "Upgrade: h2c", "-H", "Connection: Upgrade",
             f"http://127.0.0.1:{port}/u")
    assert r.returncode == 0 and r.stdout == b"hello from www /u\n", r.stderr
    req = origins[0].requests[-1]
    assert req["line"] == "GET /u HTTP/1.0"
    assert "Upgrade" not in req["headers"] and "Connection" not in req["headers"], req["raw_headers"]


def test_reverse_reload_of_routes_keeps_the_sessions(capd_factory, origins):
    """Regression: a reload that changed a route restarted the reverse instance and cut
    every request in flight (curl on a slow origin: "(52) Empty reply from server", and
    upgraded connections closed). As nginx's reload, one that changes only route and
    default lines now keeps the sessions: an upgraded connection goes on to the origin
    it had, and a kept-alive connection's next request takes the new route."""
    a, b, c = origins
    port = free_port()
    conf = f"[reverse r]\nlisten = {port}\nroute = www.example.com=127.0.0.1:{{}}\ndefault = 127.0.0.1:{c.port}\n"
    capd = capd_factory(conf.format(a.port))
    ws = socket.create_connection(("127.0.0.1", port), timeout=10)
    ws.sendall(b"GET /ws HTTP/1.1\r\nHost: www.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert status_of(read_all(ws, 10, until=b"\r\n\r\n")) == 101
    kept = socket.create_connection(("127.0.0.1", port), timeout=10)
    kept.sendall(b"GET /one HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    assert read_all(kept, 10, until=b"hello from www /one\n").endswith(b"hello from www /one\n")

    capd.write_conf(conf.format(b.port))
    r = capd.ctl("reload")
    assert "1 changed" in r.stdout, r.stdout
    ws.sendall(b"still here")
    assert read_all(ws, 10, until=b"still here") == b"still here"
    kept.sendall(b"GET /two HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    assert read_all(kept, 10, until=b"hello from api /two\n").endswith(b"hello from api /two\n")
    assert [s for s in capd.ctl("sessions", json_out=True) if s["instance"] == "r" and s["state"] != "closed"]
    ws.close()
    kept.close()
    assert "changed by reload" not in "".join(s.get("reason") or "" for s in capd.ctl("sessions", json_out=True))
    # any other key still restarts the instance
    capd.write_conf(conf.format(b.port) + "idle_timeout = 30s\n")
    capd.ctl("reload")
    wait_port(port)
    assert curl("-H", "Host: www.example.com", f"http://127.0.0.1:{port}/x").stdout == b"hello from api /x\n"


def test_reverse_tls_reload_of_routes_moves_a_kept_client(capd_factory, tmp_path):
    """Regression: after a reload moved a route, the next GET on a kept `tls` client
    connection got "421 ... this connection is bound to another upstream; use a new
    one", which curl, Python and Java show as an error; then it got no answer and
    the connection closed for the client's retry. Issue tlsmove: the connection
    now moves with its TLS to a new session, which sends it to the new route."""
    import test_tls
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    o1, o2 = TlsKeptOrigin(tmp_path / "1"), TlsKeptOrigin(tmp_path / "2")
    try:
        port = free_port()
        conf = (f"[reverse r]\nlisten = {port}\ntls = yes\ntls_verify = no\n"
                f"route = {test_tls.NAME}=127.0.0.1:{{}}\n")
        capd = capd_factory(conf.format(o1.port))
        ctx = ssl.create_default_context(cafile=str(test_tls.export_ca(capd, tmp_path / "capd-ca.pem")))

        def connect():
            return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                   server_hostname=test_tls.NAME)

        def get(t, path):
            t.sendall(f"GET {path} HTTP/1.1\r\nHost: {test_tls.NAME}\r\n\r\n".encode())
            return read_all(t, 10, until=f"GET {path} HTTP/1.1\n".encode())

        kept = connect()
        assert get(kept, "/a").endswith(b"conn 1: GET /a HTTP/1.1\n")
        capd.write_conf(conf.format(o2.port))
        capd.ctl("reload")
        assert get(kept, "/b").endswith(b"conn 1: GET /b HTTP/1.1\n")   # not a 421, nor closed
        assert get(kept, "/c").endswith(b"conn 1: GET /c HTTP/1.1\n")   # and it stays
        kept.close()
        assert (o1.conns, o2.conns) == (1, 1)
        ss = [x for x in closed(capd, 2) if x["instance"] == "r"]
        assert ss[0]["reason"] == f"closed (client continues in session {ss[1]['id']})", ss
    finally:
        o1.close()
        o2.close()


JAVA_H2C_SRC = """
import java.net.URI;
import java.net.http.*;

public class H2cGet {
    public static void main(String[] a) throws Exception {
        HttpClient c = HttpClient.newHttpClient();  // HTTP_2: offers "Upgrade: h2c" on http://
        for (String u : a) {
            HttpRequest r = HttpRequest.newBuilder(URI.create(u)).header("Host-Check", "1").build();
            HttpResponse<String> s = c.send(r, HttpResponse.BodyHandlers.ofString());
            System.out.println(s.statusCode() + " " + s.version() + " " + s.body().trim());
        }
    }
}
"""


def test_reverse_h2c_upgrade_is_dropped(capd_factory, origins, tmp_path):
    """Regression: Java's HttpClient (HTTP/2 by default) sends "Connection: Upgrade,
    HTTP2-Settings", "Upgrade: h2c" and HTTP2-Settings on http://. capd removed
    HTTP2-Settings (Connection names it: hop-by-hop) but passed "Upgrade: h2c" and
    "Connection: Upgrade" on, an upgrade RFC 7540 3.2 calls malformed, which an
    origin may take up. As mitmproxy does, an h2c Upgrade is dropped whole and the
    request goes on as HTTP/1.1; a 101 to it is a 502."""
    a, b, c = origins
    capd, port = reverse(capd_factory, origins, default=True)
    (tmp_path / "H2cGet.java").write_text(JAVA_H2C_SRC)
    r = subprocess.run(["java", str(tmp_path / "H2cGet.java"), f"http://127.0.0.1:{port}/one",
                        f"http://127.0.0.1:{port}/two"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["200 HTTP_1_1 hello from default /one", "200 HTTP_1_1 hello from default /two"]
    for q in c.requests:
        assert q["headers"].get("Host-Check") == "1", q
        assert not {"Upgrade", "HTTP2-Settings", "Connection"} & set(q["headers"]), q["raw_headers"]
    reply = raw(port, b"GET /ws HTTP/1.1\r\nHost: elsewhere.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                      b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n")
    assert status_of(reply) == 502, reply
    assert "Upgrade" not in c.requests[-1]["headers"], c.requests[-1]


def test_reverse_client_that_leaves_before_the_answer_ends_the_session(capd):
    """Regression: as for the forward proxy, an origin that never answers kept a
    reverse session and both its sockets forever after curl gave up (--max-time),
    with idle_timeout 0. The session now ends with the client, and the upstream
    connection with it."""
    from test_http import SilentOrigin
    o = SilentOrigin()
    try:
        port = free_port()
        capd.ctl("add", "reverse", "--port", port, "--name", "r", "--default", f"127.0.0.1:{o.port}")
        r = curl("--max-time", "1", f"http://127.0.0.1:{port}/")
        assert r.returncode == 28, r
        s = closed(capd, 1)[-1]
        assert s["reason"] == "client closed before the answer", s
        assert o.ended.wait(5), "the upstream connection stayed open"
    finally:
        o.close()


def test_reverse_tls_client_that_leaves_before_the_answer_ends_the_session(capd, tmp_path):
    """The same for a `--tls` reverse instance in front of a TLS origin that never
    answers (openssl s_server): curl's close_notify, a record, is read while the
    request waits, and ends the session as its FIN does."""
    import test_tls
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", crt, "-subj", "/CN=origin", "-days", "1"], check=True, capture_output=True)
    oport = free_port()
    srv = subprocess.Popen(["openssl", "s_server", "-quiet", "-accept", f"127.0.0.1:{oport}", "-cert", crt,
                            "-key", key], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(oport)
        port = free_port()
        capd.ctl("add", "reverse", "--port", port, "--name", "r", "--route", f"{test_tls.NAME}=127.0.0.1:{oport}",
                 "--tls", "--no-tls-verify")
        ca = test_tls.export_ca(capd, tmp_path / "capd-ca.pem")
        r = curl("--http1.1", "--max-time", "1", "--cacert", ca, "--resolve", f"{test_tls.NAME}:{port}:127.0.0.1",
                 f"https://{test_tls.NAME}:{port}/")
        assert r.returncode == 28, r
        s = closed(capd, 1)[-1]
        assert s["reason"] == "client closed before the answer", s
    finally:
        srv.kill()
        srv.wait()


class RedirectingOrigin:
    """An origin that answers every request with a 302 to the URL after `/to?`,
    in which `SELF` stands for its own address, as an origin that builds its
    redirects from its own listening address (not from Host) writes them."""

    def __init__(self, host="127.0.0.1"):
        import http.server
        import threading
        import urllib.parse

        class Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                url = urllib.parse.unquote(self.path.split("?", 1)[1])
                self.send_response(302)
                self.send_header("Location", url.replace("SELF", f"{self_host}:{self.server.server_port}"))
                self.send_header("Content-Length", "0")
                self.end_headers()

        self_host = f"[{host}]" if ":" in host else host
        self.srv = Server((host, 0), Handler)
        self.port = self.srv.server_port
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def test_reverse_location_naming_the_upstream_is_rewritten(capd_factory):
    """Regression: a redirect whose Location named the upstream's own address
    (http://127.0.0.1:PORT/new, from an origin that writes its redirects so)
    reached the client as it was, and curl -L then left the proxy for the
    origin. As nginx's "proxy_redirect default" does, the scheme and authority
    become the ones the client used (its Host, or its absolute URL's);
    other Locations pass unchanged."""
    o, v6 = RedirectingOrigin(), RedirectingOrigin("::1")
    try:
        port = free_port()
        capd_factory(f"[reverse r]\nlisten = {port}\nroute = site.test=127.0.0.1:{o.port}\n"
                     f"route = v6.test=[::1]:{v6.port}\n")

        def location(to, host="site.test:8080", target="/to?"):
            reply = raw(port, f"GET {target}{to} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert status_of(reply) == 302, reply
            return [ln[10:] for ln in reply.decode().split("\r\n") if ln.lower().startswith("location: ")]

        assert location("http://SELF/new%3Fx=1") == ["http://site.test:8080/new?x=1"]
        assert location("HTTP://SELF") == ["http://site.test:8080"]
        assert location("http://SELF/a", host="SITE.test") == ["http://SITE.test/a"]
        assert location("http://SELF/a", host="www.example.com", target="http://site.test/to?") == \
            ["http://site.test/a"]
        # an IPv6 upstream, in another spelling of its address
        assert location(f"http://[0:0::1]:{v6.port}/a", host="v6.test") == ["http://v6.test/a"]
        # not the upstream: another host, port or scheme, a relative one
        for other in ("http://elsewhere.test/a", f"http://127.0.0.1:{o.port + 1}/a", "https://SELF/a", "/rel"):
            want = other.replace("SELF", f"127.0.0.1:{o.port}")
            assert location(other) == [want], other
        # curl -L follows the redirect through capd (--resolve: no name reaches the resolver)
        r = curl("-L", "--max-redirs", "1", "--resolve", f"site.test:{port}:127.0.0.1", "-w", "%{url_effective}",
                 f"http://site.test:{port}/to?http://SELF/to%3F/end")
        assert r.stdout.endswith(f"http://site.test:{port}/to?/end".encode()), r
    finally:
        o.close()
        v6.close()


def test_reverse_route_written_as_a_url_is_named_so(tmp_path):
    """Regression: an upstream written as nginx's proxy_pass takes it
    (`route = a.test=https://127.0.0.1:8443`, `default = http://...`) was
    refused with "write IPv6 as [addr]:port", which sent the user after a
    mistake they had not made. The error now says a URL is not an address."""
    for line in ("route = a.test=https://127.0.0.1:8443", "default = http://127.0.0.1:8080/"):
        conf = tmp_path / "capd.conf"
        conf.write_text(f"[capd]\ncontrol = {tmp_path}/capd.sock\nspool = {tmp_path}/spool\n"
                        f"state_dir = {tmp_path}/state\n[reverse r]\nlisten = 127.0.0.1:{free_port()}\n{line}\n")
        r = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=20)
        assert r.returncode == 1 and "expected host:port, not a URL" in r.stderr, r.stderr
        assert "IPv6" not in r.stderr, r.stderr


def test_reverse_route_pattern_errors_say_what_was_meant(tmp_path):
    """A route pattern written as nginx would write a server_name with a port
    or a `.suffix` was refused as a bare "bad host pattern", which left the
    user to guess; the error now says what capd takes. (A location's path is
    a route's path prefix since issue routes.)"""
    cases = (("www.test:8080", "a pattern has no port"), ("[::1]:8080", "a pattern has no port"),
             (".www.test", "write *.suffix"))
    for pattern, hint in cases:
        conf = tmp_path / "capd.conf"
        conf.write_text(f"[capd]\ncontrol = {tmp_path}/capd.sock\nspool = {tmp_path}/spool\n"
                        f"state_dir = {tmp_path}/state\n[reverse r]\nlisten = 127.0.0.1:{free_port()}\n"
                        f"route = {pattern}=127.0.0.1:1\n")
        r = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=20)
        assert r.returncode == 1 and f"bad host pattern '{pattern}' in route: {hint}" in r.stderr, r.stderr


def test_reverse_silent_origin_gets_a_504_after_response_timeout(capd):
    """Regression: with idle_timeout 0 (the default) a reverse instance whose
    origin accepts and never answers held curl forever. As nginx
    (proxy_read_timeout) it now answers 504 after response_timeout, naming
    the origin and the timeout, and ends the upstream connection."""
    from test_http import SilentOrigin, add_kind_timeout
    o = SilentOrigin()
    try:
        port = add_kind_timeout(capd, "reverse", o.port, "500ms")
        t = time.monotonic()
        r = curl("-w", "%{http_code}", f"http://127.0.0.1:{port}/slow")
        took = time.monotonic() - t
        why = f"no response from 127.0.0.1:{o.port} within response_timeout (0.5s)"
        assert r.returncode == 0 and r.stdout == f"504 Gateway Timeout: {why}\n504".encode(), r
        assert 0.45 < took < 15, took
        s = [x for x in capd.wait_sessions(lambda ss: any(x["instance"] == "h" and x["state"] == "closed"
                                                          for x in ss)) if x["instance"] == "h"][-1]
        assert s["reason"] == f"504 Gateway Timeout: {why}", s
        assert o.ended.wait(5), "the upstream connection stayed open"
    finally:
        o.close()


def test_reverse_origin_that_keeps_sending_outlives_response_timeout(capd):
    """The timer restarts with each read from the origin: a long poll that
    sends a chunk every 0.3 s for 2.1 s passes whole with response_timeout 1s."""
    from test_http import TrickleOrigin, add_kind_timeout
    o = TrickleOrigin()
    try:
        port = add_kind_timeout(capd, "reverse", o.port)
        r = curl(f"http://127.0.0.1:{port}/stream")
        assert r.returncode == 0 and r.stdout == b"".join(b"part %d\n" % i for i in range(6)), r
    finally:
        o.close()


def test_reverse_http2_prior_knowledge_gets_goaway_http_1_1_required(capd_factory, origins):
    """Regression: curl --http2-prior-knowledge to a reverse instance got "curl: (52)
    Empty reply from server" (capd answered the HTTP/2 preface with an HTTP/1.1 505).
    It now gets SETTINGS and GOAWAY HTTP_1_1_REQUIRED, which curl reports as an HTTP/2
    error, and the session says why; the next connection's request goes through."""
    from test_http import check_h2_refused, curl_h2_prior_knowledge
    capd, port = reverse(capd_factory, origins)
    curl_h2_prior_knowledge(f"http://127.0.0.1:{port}/")
    check_h2_refused(capd, closed(capd, 1)[-1])
    r = curl("-H", "Host: www.example.com", f"http://127.0.0.1:{port}/after")
    assert r.returncode == 0 and r.stdout == b"hello from www /after\n", r.stderr


def test_reverse_tls_http2_prior_knowledge_gets_goaway_http_1_1_required(capd, tls_reverse):
    """On a `--tls` reverse instance a client that offers no ALPN (curl --no-alpn
    --http2-prior-knowledge) sends the HTTP/2 preface after the handshake; it got the
    HTTP/1.1 505 it cannot read, and now gets GOAWAY HTTP_1_1_REQUIRED inside TLS."""
    from test_http import H2_REASON, curl_h2_prior_knowledge
    get, test_tls = tls_reverse
    curl_h2_prior_knowledge(f"https://{test_tls.NAME}:{get.port}/", "--no-alpn", "--cacert", get.ca,
                            "--resolve", f"{test_tls.NAME}:{get.port}:127.0.0.1")
    s = closed(capd, 1)[-1]
    assert s["reason"] == H2_REASON, s
    r = get()
    assert r.returncode == 0 and r.stdout == test_tls.BODY, r.stderr


def read_response(s, timeout=10.0):
    """One Content-Length framed response from s, on a connection that stays: (head, body)."""
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        d = s.recv(65536)
        if not d:
            return data, b""
        data += d
    head, _, body = data.partition(b"\r\n\r\n")
    n = next((int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n")[1:]
              if ln.lower().startswith(b"content-length:")), 0)
    while len(body) < n:
        d = s.recv(65536)
        if not d:
            break
        body += d
    return head, body


def test_reverse_routes_by_path_prefix_on_one_kept_connection(capd_factory, origins):
    """Issue routes: a site whose /api/ has a backend of its own (nginx's
    `location /api/ { proxy_pass ...; }`) could not be put behind a reverse
    instance: `route = site.test/api/=...` was refused ("routes go by Host only").
    A pattern now takes a path prefix: the host pattern is picked first, as nginx
    picks a server block, then the longest of its prefixes that the path as sent
    starts with; a kept connection whose next request routes elsewhere moves to a
    new session, and a Location naming the upstream is still rewritten."""
    a, b, c = origins
    redir = RedirectingOrigin()
    try:
        port = free_port()
        capd = capd_factory(
            f"[reverse r]\nlisten = {port}\nroute = site.test/api/=127.0.0.1:{b.port}\n"
            f"route = site.test=127.0.0.1:{a.port}\nroute = site.test/api/v2/=127.0.0.1:{c.port}\n"
            f"route = SITE.test./to=127.0.0.1:{redir.port}\nroute = */static/=127.0.0.1:{c.port}\n"
            f"route = only.test/api/=127.0.0.1:{b.port}\n")
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        cases = [("/api/x", "site.test", b"hello from api /api/x\n"),
                 ("/other", "site.test", b"hello from www /other\n"),
                 ("/api/v2/y?q=/api/", "site.test", b"hello from default /api/v2/y?q=/api/\n"),
                 ("/apix", "site.test:80", b"hello from www /apix\n"),
                 ("/api?/api/", "site.test", b"hello from www /api?/api/\n"),
                 ("/%61pi/x", "site.test", b"hello from www /%61pi/x\n"),      # as sent: not decoded
                 ("/static/s", "Site.Test", b"hello from www /static/s\n"),    # its host's routes only
                 ("http://site.test/api/abs", "x.test", b"hello from api /api/abs\n"),
                 ("http://site.test?a", "x.test", b"hello from www /?a\n"),
                 ("/static/s", "other.test", b"hello from default /static/s\n"),
                 ("/api/z", "site.test", b"hello from api /api/z\n")]
        for target, host, want in cases:
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head, body = read_response(s)
            assert body == want, (target, host, head, body)
        s.sendall(b"OPTIONS * HTTP/1.1\r\nHost: site.test\r\n\r\n")   # no path: as /
        assert read_response(s)[1] == b"hello from www *\n"
        s.sendall(b"GET /to?http://SELF/new HTTP/1.1\r\nHost: site.test\r\n\r\n")
        head, _ = read_response(s)
        assert status_of(head) == 302 and b"\r\nLocation: http://site.test/new" in head, head
        s.close()
        # a host pattern with routes but none for the path: 404, as nginx without a location
        for host in ("other.test", "only.test"):
            reply = raw(port, f"GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert status_of(reply) == 404 and b"no route for this path" in reply, (host, reply)
        # the one client connection went on through a session per upstream run
        ss = closed(capd, 12)
        assert sum("(client continues in session" in x["reason"] for x in ss) == 9, ss
    finally:
        redir.close()


def test_reverse_path_route_errors_name_their_line(tmp_path):
    """Issue routes: two routes for one host pattern and path (`site.test` is
    `site.test/`; the host ignores case and a trailing dot, the path does not)
    to different upstreams are refused at their own line, as host routes are, and
    so is a path that no request's path can start with."""
    cases = [
        (["route = site.test/api/=127.0.0.1:1", "route = site.test=127.0.0.1:2", "route = *.site.test/api/=127.0.0.1:2",
          "route = SITE.test./api/=127.0.0.1:3"], "two routes for 'SITE.test/api/' go to different upstreams"),
        (["route = site.test=127.0.0.1:1", "route = site.test/=127.0.0.1:2"],
         "two routes for 'site.test' go to different upstreams"),
        (["route = site.test/a?b=127.0.0.1:1"],
         "bad path '/a?b' in route 'site.test/a?b=127.0.0.1:1': routes go by path, not by query"),
        (["route = /api/=127.0.0.1:1"], "bad host pattern '' in route: a path needs a host pattern before it"),
        (["route = http://site.test/=127.0.0.1:1"],
         "bad host pattern 'http:' in route: a route is pattern[/path]=host:port, not a URL"),
    ]
    head = ["[capd]", f"control = {tmp_path}/capd.sock", f"spool = {tmp_path}/spool",
            f"state_dir = {tmp_path}/state", "", "[reverse r]", f"listen = 127.0.0.1:{free_port()}"]
    conf = tmp_path / "capd.conf"
    for lines, msg in cases:
        conf.write_text("\n".join(head + lines) + "\n")
        want = f"{conf}:{len(head) + len(lines)}: {msg}"
        r = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=20)
        assert r.returncode == 1 and want in r.stderr, (want, r.stderr)
    # paths are case-sensitive, and one route may be written twice
    conf.write_text("\n".join(head + ["route = a.test/api/=127.0.0.1:1", "route = a.test/API/=127.0.0.1:2",
                                      "route = A.test/api/=127.0.0.1:1", "route = a.test/a=b/=127.0.0.1:3"]) + "\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr


def test_capctl_add_reverse_route_with_a_path(capd, origins):
    """Issue routes: `capctl add reverse --route site.test/api/=...` takes a path
    prefix as the config does, and `capctl list` shows the routes as written."""
    a, b, c = origins
    port = free_port()
    routes = [f"site.test/api/=127.0.0.1:{b.port}", f"site.test=127.0.0.1:{a.port}"]
    capd.ctl("add", "reverse", "--port", port, "--name", "p", *[x for r in routes for x in ("--route", r)])
    inst = [i for i in capd.ctl("list", json_out=True) if i["name"] == "p"][0]
    assert inst["routes"] == routes, inst
    row = [ln for ln in capd.ctl("list").stdout.splitlines() if ln.startswith("p ")][0]
    assert row.endswith("routes " + ",".join(routes)), row
    for path, want in (("/api/1", b"hello from api /api/1\n"), ("/1", b"hello from www /1\n")):
        r = curl("-H", "Host: site.test", f"http://127.0.0.1:{port}{path}")
        assert r.returncode == 0 and r.stdout == want, r
    bad = capd.ctl("add", "reverse", "--port", free_port(), "--route", f"site.test/api/=127.0.0.1:{a.port}",
                   "--route", f"site.test/api/=127.0.0.1:{b.port}", check=False)
    assert bad.returncode == 1 and "two routes for 'site.test/api/' go to different upstreams" in bad.stderr, bad


def tls_client_ends_without_close_notify(capd, port, name, request=b""):
    """A TLS connection to capd that sends request and then a FIN without close_notify;
    capd is stopped meanwhile, so that its first read after the handshake takes both.
    Returns what came back, read to the end."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname=name) as t:
        sigstop(capd.proc)
        try:
            if request:
                t.sendall(request)
            socket.socket.shutdown(t, socket.SHUT_WR)  # the socket's FIN, with no close_notify before it
        finally:
            capd.proc.send_signal(signal.SIGCONT)
        got = b""
        try:
            while d := t.recv(65536):
                got += d
        except (ssl.SSLError, OSError):
            pass  # capd passes the missing close_notify on: a bare FIN
        return got


def test_reverse_tls_request_line_noted_before_the_tls_part(capd, tls_reverse):
    """Regression: a TLS client whose request came in the same read as its FIN without
    close_notify (a Python client, capd held up) left the session's note as "client ended
    without close_notify; tls TLSv1.3 sni=...": TLS noted the end first and the request
    line was never added. A note is the request line, then the TLS part, whose version,
    SNI and ALPN come before how it ended, here and on the close line; a connection that
    ended before any request has the version and SNI too (it had the end alone)."""
    get, test_tls = tls_reverse
    req = f"GET /index.html HTTP/1.1\r\nHost: {test_tls.NAME}\r\nConnection: close\r\n\r\n".encode()
    got = tls_client_ends_without_close_notify(capd, get.port, test_tls.NAME, req)
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(test_tls.BODY), got[:300]
    tls_client_ends_without_close_notify(capd, get.port, test_tls.NAME)
    ss = closed(capd, 2)[-2:]
    tls_part = f"tls TLSv1.3 sni={test_tls.NAME}"
    end = "; client ended without close_notify"
    assert ss[0]["note"].startswith(f"GET /index.html; {tls_part}") and ss[0]["note"].endswith(end), ss
    assert ss[1]["note"] == tls_part + end, ss
    log = capd.log()
    for s in ss:
        line = next(x for x in log.splitlines() if f"session {s['id']} reverse/r " in x)
        assert line.endswith(f"[{s['note'][s['note'].index('tls '):]}]"), line


class TaggedTlsOrigin(TlsKeptOrigin):
    """A TLS origin (as TlsKeptOrigin's) that names itself in each answer,
    "TAG conn N: REQUEST LINE body=BODY", reading a Content-Length body."""

    def __init__(self, d, tag):
        d.mkdir()
        self.tag = tag
        super().__init__(d)

    def serve(self, c, n):
        c.settimeout(10)
        try:
            t = self.ctx.wrap_socket(c, server_side=True)
            got = b""
            while True:
                while b"\r\n\r\n" not in got:
                    d = t.recv(65536)
                    if not d:
                        return t.close()
                    got += d
                head, got = got.split(b"\r\n\r\n", 1)
                n_body = next((int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n")[1:]
                               if ln.lower().startswith(b"content-length:")), 0)
                while len(got) < n_body:
                    d = t.recv(65536)
                    if not d:
                        return t.close()
                    got += d
                body, got = got[:n_body], got[n_body:]
                out = b"%s conn %d: %s body=%s\n" % (self.tag, n, head.split(b"\r\n")[0], body)
                t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out))
        except (OSError, ssl.SSLError):
            c.close()


def tls_site(capd, tmp_path, *args):
    """A `tls` reverse instance r for test_tls.NAME: / to origin www, /api/ to origin
    api (TaggedTlsOrigin). (port, www, api, the curl arguments that reach it)."""
    import test_tls
    www, api = TaggedTlsOrigin(tmp_path / "www", b"www"), TaggedTlsOrigin(tmp_path / "api", b"api")
    port = free_port()
    capd.ctl("add", "reverse", "--port", port, "--name", "r", "--route", f"{test_tls.NAME}=127.0.0.1:{www.port}",
             "--route", f"{test_tls.NAME}/api/=127.0.0.1:{api.port}", "--tls", "--no-tls-verify", *args)
    return port, www, api, ("-v", "-k", "--http1.1", "--resolve", f"{test_tls.NAME}:{port}:127.0.0.1")


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_reverse_tls_kept_connection_moves_to_another_route(capd, tmp_path, method):
    """Issue tlsmove: on a `tls` reverse instance with path routes, a kept client
    connection whose next request routed to another upstream could not move to a
    new session, as a plain one does (the session owned the TLS state): curl's
    GET of / then /api/b printed "Connection died, retrying a fresh connect", and
    with -d its POST got "421 ... this connection is bound to another upstream;
    use a new one". The client's TLS (the SSL object, what it read ahead) now goes
    with its socket to the new session: both requests are answered on the one
    connection, each by its own origin, and each session captures its own."""
    import test_tls
    port, www, api, args = tls_site(capd, tmp_path)
    try:
        url = f"https://{test_tls.NAME}:{port}"
        body = ("-d", "x=1") if method == "POST" else ()
        r = test_tls.curl(*args, *body, f"{url}/a", f"{url}/api/b")
        assert r.returncode == 0, r.stderr
        b = b"x=1" if body else b""
        assert r.stdout == (b"www conn 1: %s /a HTTP/1.1 body=%s\napi conn 1: %s /api/b HTTP/1.1 body=%s\n"
                            % (method.encode(), b, method.encode(), b)), (r.stdout, r.stderr)
        assert b"retrying" not in r.stderr and b"Re-using existing connection" in r.stderr, r.stderr
        assert (www.conns, api.conns) == (1, 1)
        ss = closed(capd, 2)
        assert ss[0]["reason"] == f"closed (client continues in session {ss[1]['id']})", ss
        assert ss[1]["reason"] == "closed", ss
        assert ss[0]["client"] == ss[1]["client"], ss   # one client connection
        assert [x["target"] for x in ss] == [f"127.0.0.1:{www.port}", f"127.0.0.1:{api.port}"], ss
        for x in ss:   # the client's TLS shows on both
            assert f"tls TLSv1.3 sni={test_tls.NAME} alpn=http/1.1" in x["note"], ss
        capd.flush()
        _, up, down = follow_session(capd.pcaps()[-1], ss[1]["id"], ss[1])
        assert up.startswith(f"{method} /api/b HTTP/1.1\r\n".encode()) and b"/a " not in up, up
        assert down.endswith(b"api conn 1: %s /api/b HTTP/1.1 body=%s\n" % (method.encode(), b)), down
    finally:
        www.close()
        api.close()


def test_reverse_tls_moved_connection_keeps_one_client_leg(capd_factory, tmp_path):
    """Issue tlsmove: with tls_capture = both, the ciphertext of a client connection
    that moved to a new session stays one flow (the client leg of the session it
    began in) that holds its handshake, so it decrypts whole from the file's keys:
    both requests show in it, and each session's upstream leg has its own."""
    import test_tls
    from conftest import tshark
    capd = capd_factory()
    port, www, api, args = tls_site(capd, tmp_path, "--tls-capture", "both")
    try:
        url = f"https://{test_tls.NAME}:{port}"
        r = test_tls.curl(*args, f"{url}/a", f"{url}/api/b")
        assert r.returncode == 0 and b"retrying" not in r.stderr, r.stderr
        closed(capd, 2)
        pcap = test_tls.pcap_after(capd)
        t = tshark("-r", pcap, *test_tls.as_tls(port, www.port, api.port), "-Y", "tls && http.request", "-T",
                   "fields", "-E", "separator=/t", "-e", "tcp.stream", "-e", "http.request.uri")
        legs = {}
        for row in t.stdout.splitlines():
            st, uri = row.split("\t")
            legs.setdefault(st, []).append(uri)
        assert sorted(legs.values()) == [["/a"], ["/a", "/api/b"], ["/api/b"]], t.stdout + t.stderr
    finally:
        www.close()
        api.close()


def test_reverse_tls_kept_connection_without_sni_moves_to_another_host(capd, tmp_path):
    """Issue tlsmove: a TLS client that sent no SNI is routed by its Host, and one
    Host after another on its kept connection (connection coalescing) got 421 for
    a POST whose Host routed elsewhere. It moves to a new session now, as for a
    path (test_reverse_tls_kept_connection_moves_to_another_route)."""
    www, api = TaggedTlsOrigin(tmp_path / "www", b"www"), TaggedTlsOrigin(tmp_path / "api", b"api")
    try:
        port = free_port()
        capd.ctl("add", "reverse", "--port", port, "--name", "r", "--route", f"www.test=127.0.0.1:{www.port}",
                 "--route", f"api.test=127.0.0.1:{api.port}", "--tls", "--no-tls-verify")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as t:  # no SNI
            for host in ("www.test", "api.test", "api.test"):
                t.sendall(f"POST /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1\r\n\r\nz".encode())
                _, body = read_response(t)
                assert body == b"%s conn 1: POST /x HTTP/1.1 body=z\n" % host[:3].encode(), (host, body)
        ss = closed(capd, 2)
        assert ss[0]["reason"] == f"closed (client continues in session {ss[1]['id']})", ss
        assert [x["target"] for x in ss] == [f"127.0.0.1:{www.port}", f"127.0.0.1:{api.port}"], ss
    finally:
        www.close()
        api.close()


def test_reverse_tls_pipelined_requests_move_with_their_bodies(capd, tmp_path):
    """Issue tlsmove: requests pipelined on one TLS connection, each for the other
    upstream, with bodies larger than the relay's buffer: what capd had read
    (decrypted, or still inside the client's TLS) moves with the connection,
    and every request reaches its own origin whole, in order."""
    import test_tls
    port, www, api, _ = tls_site(capd, tmp_path)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        paths = ["/a", "/api/b", "/c", "/api/d"]
        bodies = [bytes([65 + i]) * 100000 for i in range(len(paths))]
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                             server_hostname=test_tls.NAME) as t:
            t.sendall(b"".join(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s"
                               % (p.encode(), test_tls.NAME.encode(), len(b), b) for p, b in zip(paths, bodies)))
            for i, (p, b) in enumerate(zip(paths, bodies)):
                _, body = read_response(t)
                tag = b"api" if p.startswith("/api/") else b"www"
                assert body == b"%s conn %d: POST %s HTTP/1.1 body=%s\n" % (tag, i // 2 + 1, p.encode(), b), \
                    (p, body[:80])
        ss = closed(capd, 4)
        assert all("(client continues in session" in x["reason"] for x in ss[:3]), ss
    finally:
        www.close()
        api.close()


def assert_refusal_as_traced(capd, port, trace, request_line):
    """The last closed session's refusal flow is curl's --trace (in trace) both ways:
    between curl's port and the instance's address, the request then a 421, closed by
    capd's FIN and then curl's. Returns the flow."""
    sent, got = curl_trace(trace)
    s = closed(capd, 1)[-1]
    f = refused_flow(capd, s, 2)
    assert (f["client"], f["server"]) == (s["client"], f"127.0.0.1:{port}"), f
    assert f["up"] == b"".join(bytes(b) for _, b in sent) and f["up"].startswith(request_line), f
    assert f["down"] == b"".join(bytes(b) for _, b in got) and f["down"].startswith(b"HTTP/1.1 421 "), f
    assert f["ends"] == [("s", "FIN"), ("c", "FIN")], f
    return f


def test_no_route_refusal_is_captured(capd_factory, origins, tmp_path):
    """A request a reverse instance refused (421: no route for its Host) was in no
    capture. Its capture is now the conversation curl had with the instance: what
    curl sent and what it got, exactly as its --trace has them, between curl's port
    and the instance's address, with capd's FIN and then curl's."""
    capd, port = reverse(capd_factory, origins)
    trace = tmp_path / "trace"
    r = curl("-H", "Host: unknown.test", "--trace", trace, f"http://127.0.0.1:{port}/x?y=1")
    assert r.returncode == 0 and b"no route" in r.stdout, r.stderr
    f = assert_refusal_as_traced(capd, port, trace, b"GET /x?y=1 HTTP/1.1\r\n")
    check_pcap_clean(f["pcap"])


def test_tls_refusal_is_captured_in_plaintext(capd, tls_reverse, tmp_path):
    """A TLS client's refused request (421: its Host is not its SNI) is captured as
    the plaintext conversation, as the sessions capd relays are: curl's request and
    the 421 as its --trace has them, and the closes, with none of the ciphertext capd
    reads while it lingers (curl's close_notify) in that plaintext stream."""
    get, test_tls = tls_reverse
    trace = tmp_path / "trace"
    r = get("-H", "Host: nope.test", "--trace", trace)
    assert r.returncode == 0 and r.stdout.startswith(b"421 "), r.stderr
    assert_refusal_as_traced(capd, get.port, trace, b"GET / HTTP/1.1\r\n")
