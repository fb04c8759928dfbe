"""Issue 4: the socks instance (SOCKS 4, 4a and 5: CONNECT, BIND, UDP ASSOCIATE,
username/password, IPv6) with real clients: curl, a Java program, proxychains4,
and small socket clients for what no stock client does (BIND, UDP, bad input)."""

import json
import os
import select
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import (ECHO_SERVER, EchoServer, Listener, follow_session, free_port, free_port_tcp_udp, refused_flow, sh,
                      sigstop, syn_hole, tshark, UdpEcho, wait_port)


# ---------------------------------------------------------------- helpers

def curl(*args, timeout=30):
    return subprocess.run(["curl", "-sS", "--max-time", "20", *map(str, args)],
                          capture_output=True, timeout=timeout)


def add_socks(capd, *args, host="127.0.0.1"):
    port = free_port(host=host)
    extra = ["--bind", host] if host != "127.0.0.1" else []
    capd.ctl("add", "socks", "--port", port, *extra, *args)
    return port


def recv_exact(s, n):
    data = b""
    while len(data) < n:
        d = s.recv(n - len(data))
        if not d:
            raise EOFError(f"closed after {len(data)} of {n} bytes: {data!r}")
        data += d
    return data


def recv_all(s, limit=1 << 20):
    data = b""
    while len(data) < limit:
        try:
            d = s.recv(65536)
        except ConnectionResetError:
            break
        if not d:
            break
        data += d
    return data


def s5_addr(host, port):
    """ATYP + address + port for a literal or a name."""
    try:
        return b"\x01" + socket.inet_pton(socket.AF_INET, host) + struct.pack("!H", port)
    except OSError:
        pass
    try:
        return b"\x04" + socket.inet_pton(socket.AF_INET6, host) + struct.pack("!H", port)
    except OSError:
        return b"\x03" + bytes([len(host)]) + host.encode() + struct.pack("!H", port)


def s5_read_reply(s):
    """Reads VER REP RSV ATYP BND.ADDR BND.PORT; returns (rep, host, port)."""
    head = recv_exact(s, 4)
    assert head[0] == 5, head
    if head[3] == 1:
        host = socket.inet_ntop(socket.AF_INET, recv_exact(s, 4))
    elif head[3] == 4:
        host = socket.inet_ntop(socket.AF_INET6, recv_exact(s, 16))
    else:
        host = recv_exact(s, recv_exact(s, 1)[0]).decode()
    port = struct.unpack("!H", recv_exact(s, 2))[0]
    return head[1], host, port


def s5_open(port, user=None, password=None, host="127.0.0.1"):
    """A connected, greeted (and authenticated) SOCKS5 control socket."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect((host, port))
    if user is None:
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
    else:
        s.sendall(b"\x05\x01\x02")
        assert recv_exact(s, 2) == b"\x05\x02"
        s.sendall(b"\x01" + bytes([len(user)]) + user.encode() + bytes([len(password)]) + password.encode())
        assert recv_exact(s, 2) == b"\x01\x00"
    return s


def s5_request(s, cmd, host, port):
    s.sendall(bytes([5, cmd, 0]) + s5_addr(host, port))
    return s5_read_reply(s)


def s4_request(port, cmd, ip, dport, user=b"", name=None):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    dst = socket.inet_aton("0.0.0.1" if name else ip)
    msg = bytes([4, cmd]) + struct.pack("!H", dport) + dst + user + b"\0"
    if name:
        msg += name.encode() + b"\0"
    s.sendall(msg)
    return s


def closed_by_peer(s, timeout=5):
    """True when the peer closes (FIN or RST) within timeout; drains what comes first."""
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def last_session(capd, pred=lambda s: True, timeout=10):
    ss = capd.wait_sessions(lambda ss: any(s["state"] == "closed" and pred(s) for s in ss), timeout=timeout)
    return [s for s in ss if s["state"] == "closed" and pred(s)][-1]


def pcap_with(capd, sid, timeout=10):
    """The spool file whose packets name session sid, and the session's bytes up and
    down in it (follow_session: one tshark pass a file)."""
    deadline = time.time() + timeout
    client = capd.session(sid)  # up is what it sent, also in a file that has no SYN of it
    while True:
        for p in capd.pcaps():
            st, up, down = follow_session(p, sid, client)
            if st is not None:
                return p, up, down
        if time.time() > deadline:
            raise AssertionError(f"no pcap holds session {sid}: {capd.pcaps()}")
        time.sleep(0.3)


class PeerServer(Listener):
    """Accepts connections and answers each with the client's address as 'host port\\n'."""

    def handle(self, c, peer):
        with c:
            c.sendall(f"{peer[0]} {peer[1]}\n".encode())
            c.shutdown(socket.SHUT_WR)
            recv_all(c)


# ---------------------------------------------------------------- CONNECT with curl

@pytest.mark.parametrize("flag,proto", [("--socks4", "socks4"), ("--socks4a", "socks4a"),
                                        ("--socks5", "socks5"), ("--socks5-hostname", "socks5")])
def test_curl_connect(capd, http_server, flag, proto):
    hport, www = http_server
    body = os.urandom(30000)
    (www / "data.bin").write_bytes(body)
    port = add_socks(capd)
    host = "localhost" if flag in ("--socks4a", "--socks5-hostname") else "127.0.0.1"
    r = curl(flag, f"127.0.0.1:{port}", f"http://{host}:{hport}/data.bin")
    assert r.returncode == 0, r.stderr
    assert r.stdout == body
    s = last_session(capd)
    assert s["proto"] == proto
    assert s["target"] == f"127.0.0.1:{hport}"
    assert s["bytes_down"] > 30000
    assert f"connect {host}:{hport}" in s["note"], s
    if host == "localhost" and proto == "socks5":
        assert s.get("target_name") == f"localhost:{hport}"

    # the capture holds the tunnelled HTTP exchange only, no SOCKS handshake
    capd.flush()
    if not capd.pcaps():
        pytest.skip("spool writes no pcapng yet")
    pcap, up, down = pcap_with(capd, s["id"])
    assert up.startswith(b"GET /data.bin HTTP/1.1\r\n"), up[:80]
    assert down.startswith(b"HTTP/1.0 200 OK\r\n"), down[:80]
    assert down.endswith(body)
    assert len(up) == s["bytes_up"] and len(down) == s["bytes_down"]


def test_curl_proxy_user(capd, http_server):
    hport, _ = http_server
    port = add_socks(capd, "--auth", "bob:s3cret", "--auth", "alice:pw")
    url = f"http://127.0.0.1:{hport}/"
    r = curl("--socks5", f"127.0.0.1:{port}", "--proxy-user", "bob:s3cret", url)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello from the origin\n"
    s = last_session(capd)
    assert "user=bob" in s["note"]

    # a wrong password: refused, and the reason names the user
    r = curl("--socks5", f"127.0.0.1:{port}", "--proxy-user", "bob:wrong", url)
    assert r.returncode != 0
    s = last_session(capd, lambda s: "auth failed" in s.get("reason", ""))
    assert s["reason"] == "socks5: auth failed for user bob"
    assert "socks5: auth failed for user bob" in capd.log()

    # no credentials at all: no acceptable method
    r = curl("--socks5", f"127.0.0.1:{port}", url)
    assert r.returncode != 0
    last_session(capd, lambda s: "no acceptable auth method" in s.get("reason", ""))

    # SOCKS4 has no password: refused while users are configured
    r = curl("--socks4", f"127.0.0.1:{port}", url)
    assert r.returncode != 0
    last_session(capd, lambda s: s["proto"] == "socks4" and "refused" in s.get("reason", ""))
    assert capd.ctl("list", json_out=True)[0]["users"] == 2


def test_socks4_allowed_with_users(capd, http_server):
    hport, _ = http_server
    port = add_socks(capd, "--auth", "bob:x", "--socks4")
    r = curl("--socks4a", f"127.0.0.1:{port}", "--proxy-user", "bob:", f"http://localhost:{hport}/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello from the origin\n"
    s = last_session(capd)
    assert s["proto"] == "socks4a"
    assert "user=bob" in s["note"]


def test_users_file_in_config(capd_factory, http_server, tmp_path):
    hport, _ = http_server
    port = free_port()
    users = tmp_path / "users"
    users.write_text("# lab users\nbob:one:two\n\n  eve:pw\n")
    capd = capd_factory(f"[socks lab]\nlisten = 127.0.0.1:{port}\nusers = {users}\nhandshake_timeout = 3s\n")
    url = f"http://127.0.0.1:{hport}/"
    r = curl("--socks5-hostname", f"127.0.0.1:{port}", "--proxy-user", "bob:one:two", url)
    assert r.returncode == 0, r.stderr
    r = curl("--socks5-hostname", f"127.0.0.1:{port}", "--proxy-user", "eve:nope", url)
    assert r.returncode != 0
    inst = capd.ctl("list", json_out=True)[0]
    assert inst["users"] == 2 and inst["handshake_timeout"] == 3
    # a bad users file fails the config check with file and line
    bad = tmp_path / "bad.conf"
    users2 = tmp_path / "users2"
    users2.write_text("ok:1\nnocolon\n")
    bad.write_text(f"[capd]\nspool = {tmp_path}/s\n[socks x]\nlisten = 127.0.0.1:{port}\nusers = {users2}\n")
    from conftest import CAPD
    r = subprocess.run([str(CAPD), "-t", "-c", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{users2}:2" in r.stderr + r.stdout


# ---------------------------------------------------------------- reply codes and bound addresses

def test_connect_reply_codes(capd):
    port = add_socks(capd, "--connect-timeout", "2")
    closed = free_port()
    s = s5_open(port)
    assert s5_request(s, 1, "127.0.0.1", closed)[0] == 0x05          # refused
    s.close()
    s = s5_open(port)
    s.sendall(b"\x05\x09\x00" + s5_addr("127.0.0.1", 80))            # unknown command
    assert s5_read_reply(s)[0] == 0x07
    assert closed_by_peer(s)
    s.close()
    s = s5_open(port)
    s.sendall(b"\x05\x01\x00\x07\x01\x02\x03\x04\x00\x50")           # bad ATYP
    assert s5_read_reply(s)[0] == 0x08
    assert closed_by_peer(s)
    s.close()
    reasons = [x.get("reason", "") for x in capd.ctl("sessions", json_out=True)]
    assert any("Connection refused" in r for r in reasons), reasons
    assert any("not supported" in r for r in reasons), reasons
    assert any("address type" in r for r in reasons), reasons


def test_connect_back_to_an_instance_the_connection_came_through(capd, echo_server):
    """A CONNECT from socks b back to socks a, by a client that came to b through
    a: only an instance's own address was refused, so such chains (and forward
    loops through a socks instance) could go round. b now refuses it with
    "not allowed by ruleset" (0x02, as dante refuses what its rules forbid; it was
    general failure, 0x01) and says why; a chain onward to a server works."""
    a, b = add_socks(capd, "--name", "a"), add_socks(capd, "--name", "b")
    for target, rep in ((("127.0.0.1", a), 2), (("127.0.0.1", echo_server.port), 0)):
        s = s5_open(a)
        assert s5_request(s, 1, "127.0.0.1", b)[0] == 0
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
        assert s5_request(s, 1, *target)[0] == rep
        if rep == 0:
            s.sendall(b"nested")
            assert recv_exact(s, 6) == b"nested"
        s.close()
    last = last_session(capd, lambda x: x["instance"] == "b" and x.get("reason", "").startswith("a loop"))
    assert last["reason"] == (f"a loop of capd instances: 127.0.0.1:{a} is instance a's address, "
                              "and this connection came through a already"), last


# SOCKS5 CONNECTs to NAME:PORT through 127.0.0.1:SOCKS, one connection each, run inside a
# namespace; prints {name: [reply code, what "ping" brought back or null]} as JSON.
NS_S5_CLIENT = r"""
import json, socket, struct, sys
sport, port, out = int(sys.argv[1]), int(sys.argv[2]), {}
for name in sys.argv[3:]:
    s = socket.create_connection(("127.0.0.1", sport), timeout=20)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name.encode() + struct.pack("!H", port))
    rep, echo = s.recv(10), None
    if rep[1] == 0:
        s.sendall(b"ping")
        s.shutdown(socket.SHUT_WR)
        echo = s.recv(100).decode()
    out[name] = [rep[1], echo]
    s.close()
print(json.dumps(out))
"""


def test_connect_reply_codes_for_names(netns, ns_etc, ns_capd, ns_python):
    """In a namespace of its own (its resolver answers nothing, its hosts file names the
    targets, and only lo is up): a name that does not resolve gets 0x04, one whose only
    address has no route 0x03, and one whose first address has no route is reached on its
    second."""
    with open(f"{ns_etc}/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n10.9.9.9 multi.test\n127.0.0.1 multi.test\n10.9.9.9 unrouted.test\n")
    with open(f"{ns_etc}/resolv.conf", "w") as f:
        f.write("nameserver 127.0.0.1\n")  # nothing listens there: a name not in hosts fails
    ns_python(netns, ECHO_SERVER, "127.0.0.1", 7700)
    c = ns_capd(netns, "[socks s]\nlisten = 127.0.0.1:7701\n")
    r = sh("ip", "netns", "exec", netns, "/usr/bin/python3", "-c", NS_S5_CLIENT, 7701, 7700,
           "no-such-host.invalid", "unrouted.test", "multi.test")
    got = json.loads(r.stdout)
    assert got == {"no-such-host.invalid": [4, None], "unrouted.test": [3, None], "multi.test": [0, "ping"]}, got
    ss = c.wait_sessions(lambda ss: len([s for s in ss if s["state"] == "closed"]) >= 3)
    by = {s.get("target_name", "").split(":")[0]: s for s in ss}
    assert "Network is unreachable" in by["unrouted.test"]["reason"], by
    assert by["multi.test"]["target"] == "127.0.0.1:7700", by


def test_connect_reply_has_real_bound_address(capd):
    peer = PeerServer()
    try:
        port = add_socks(capd)
        s = s5_open(port)
        rep, bhost, bport = s5_request(s, 1, "127.0.0.1", peer.port)
        assert rep == 0
        seen = recv_all(s).decode().split()
        assert seen == [bhost, str(bport)]  # the server saw exactly the address capd reported
        s.close()
        s = s4_request(port, 1, "127.0.0.1", peer.port, b"joe")
        rep = recv_exact(s, 8)
        assert rep[1] == 0x5a
        seen = recv_all(s).decode().split()
        assert seen == [socket.inet_ntoa(rep[4:8]), str(struct.unpack("!H", rep[2:4])[0])]
        s.close()
        s = s4_request(port, 1, "127.0.0.1", free_port())
        assert recv_exact(s, 8)[1] == 0x5b
        s.close()
    finally:
        peer.close()


def test_pipelined_handshake_and_early_data(capd, echo_server):
    """Greeting, request and the first payload in one segment."""
    port = add_socks(capd)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00" + s5_addr("127.0.0.1", echo_server.port) + b"early bytes")
    assert recv_exact(s, 2) == b"\x05\x00"
    assert s5_read_reply(s)[0] == 0
    assert recv_exact(s, 11) == b"early bytes"
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b""
    s.close()


# ---------------------------------------------------------------- other clients

JAVA_SRC = """
import java.io.*;
import java.net.*;
import java.nio.charset.StandardCharsets;

public class SocksClient {
    public static void main(String[] a) throws Exception {
        try (Socket s = new Socket(a[0], Integer.parseInt(a[1]))) {
            OutputStream o = s.getOutputStream();
            o.write(("GET /java.txt HTTP/1.0\\r\\nHost: " + a[0] + "\\r\\n\\r\\n").getBytes(StandardCharsets.US_ASCII));
            o.flush();
            InputStream in = s.getInputStream();
            ByteArrayOutputStream b = new ByteArrayOutputStream();
            byte[] buf = new byte[4096];
            int n;
            while ((n = in.read(buf)) > 0) b.write(buf, 0, n);
            System.out.write(b.toByteArray());
            System.out.flush();
        }
    }
}
"""


def test_java_client(capd, http_server, tmp_path):
    hport, www = http_server
    (www / "java.txt").write_text("through java\n")
    port = add_socks(capd)
    jdir = tmp_path / "java"
    jdir.mkdir()
    (jdir / "SocksClient.java").write_text(JAVA_SRC)
    r = subprocess.run(["javac", "SocksClient.java"], cwd=jdir, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    # a JDK sends no loopback destination through SOCKS: use a name only our hosts file knows
    hosts = tmp_path / "java-hosts"
    hosts.write_text("127.0.0.1 capd-test.example\n")
    r = subprocess.run(["java", f"-Djdk.net.hosts.file={hosts}", "-DsocksProxyHost=127.0.0.1",
                        f"-DsocksProxyPort={port}", "-cp", str(jdir), "SocksClient", "capd-test.example",
                        str(hport)], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(b"through java\n"), r.stdout
    s = last_session(capd)
    assert s["proto"] in ("socks5", "socks4")
    assert s["target"] == f"127.0.0.1:{hport}"


def test_proxychains(capd, http_server, tmp_path):
    hport, www = http_server
    (www / "pc.txt").write_text("via proxychains\n")
    port = add_socks(capd)
    conf = tmp_path / "proxychains.conf"
    conf.write_text("strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n"
                    f"[ProxyList]\nsocks5 127.0.0.1 {port}\n")
    r = subprocess.run(["proxychains4", "-q", "-f", str(conf), "curl", "-sS", "--max-time", "20",
                        f"http://127.0.0.1:{hport}/pc.txt"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"via proxychains\n"
    s = last_session(capd)
    assert s["proto"] == "socks5" and s["target"] == f"127.0.0.1:{hport}"


# ---------------------------------------------------------------- BIND

@pytest.mark.parametrize("ver", [5, 4])
def test_bind_two_replies(capd, ver):
    port = add_socks(capd)
    if ver == 5:
        c = s5_open(port)
        rep, bhost, bport = s5_request(c, 2, "127.0.0.1", 0)
        assert rep == 0
    else:
        c = s4_request(port, 2, "127.0.0.1", 0, b"ftp")
        r1 = recv_exact(c, 8)
        assert r1[1] == 0x5a
        bhost, bport = socket.inet_ntoa(r1[4:8]), struct.unpack("!H", r1[2:4])[0]
    assert bhost == "127.0.0.1" and bport != 0
    # the "server" connects to the announced address, like an FTP active-mode data connection
    srv = socket.create_connection((bhost, bport), timeout=10)
    if ver == 5:
        rep, phost, pport = s5_read_reply(c)
        assert rep == 0
    else:
        r2 = recv_exact(c, 8)
        assert r2[1] == 0x5a
        phost, pport = socket.inet_ntoa(r2[4:8]), struct.unpack("!H", r2[2:4])[0]
    assert (phost, pport) == srv.getsockname()
    payload = os.urandom(200000)
    srv.sendall(payload)
    srv.shutdown(socket.SHUT_WR)
    assert recv_exact(c, len(payload)) == payload
    c.sendall(b"226 transfer complete\r\n")
    c.shutdown(socket.SHUT_WR)
    assert recv_all(srv) == b"226 transfer complete\r\n"
    assert recv_all(c) == b""
    c.close()
    srv.close()
    s = last_session(capd)
    assert s["proto"] == f"socks{ver}"
    assert s["target"] == f"127.0.0.1:{pport}"
    assert s["bytes_down"] == len(payload)
    assert "bind" in s["note"]


@pytest.mark.parametrize("ver", [5, 4])
def test_bind_to_a_name_with_port_0(capd, ver):
    """BIND naming the expected peer by name with port 0 (its port unknown, as
    for an FTP data connection) got 0x04 (SOCKS4a 0x5b) with "cannot resolve
    localhost:0: unknown": c-ares refuses the service "0". The name resolves
    and the peer is taken."""
    port = add_socks(capd)
    if ver == 5:
        c = s5_open(port)
        rep, bhost, bport = s5_request(c, 2, "localhost", 0)
    else:
        c = s4_request(port, 2, None, 0, b"ftp", name="localhost")
        r1 = recv_exact(c, 8)
        rep = 0 if r1[1] == 0x5a else r1[1]
        bhost, bport = socket.inet_ntoa(r1[4:8]), struct.unpack("!H", r1[2:4])[0]
    assert rep == 0, last_session(capd)
    srv = socket.create_connection((bhost, bport), timeout=10)
    if ver == 5:
        assert s5_read_reply(c)[0] == 0
    else:
        assert recv_exact(c, 8)[1] == 0x5a
    srv.sendall(b"150 here")
    assert recv_exact(c, 8) == b"150 here"
    c.close()
    srv.close()


def test_bind_not_intercepted_on_tls_instance(capd):
    """A BIND peer is not a server: plain bytes pass even with tls = yes."""
    port = add_socks(capd, "--tls", "--no-tls-verify")
    c = s5_open(port)
    rep, bhost, bport = s5_request(c, 2, "127.0.0.1", 0)
    assert rep == 0
    srv = socket.create_connection((bhost, bport), timeout=10)
    assert s5_read_reply(c)[0] == 0
    c.sendall(b"PORT 127,0,0,1\r\n")
    assert recv_exact(srv, 16) == b"PORT 127,0,0,1\r\n"
    srv.sendall(b"200 ok\r\n")
    assert recv_exact(c, 8) == b"200 ok\r\n"
    c.close()
    srv.close()



def test_bind_ends_when_its_client_goes(capd):
    """A client that closes while BIND waits for its peer ends the wait at once:
    the announced port stops listening and no peer is taken for nobody."""
    port = add_socks(capd, "--connect-timeout", "30")
    c = s5_open(port)
    rep, bhost, bport = s5_request(c, 2, "127.0.0.1", 0)
    assert rep == 0
    c.close()
    s = last_session(capd, timeout=5)
    assert "client closed during BIND" in s["reason"], s
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((bhost, bport), timeout=5)


def test_bind_timeout_gets_failure_reply(capd):
    port = add_socks(capd, "--connect-timeout", "300ms")
    c = s5_open(port)
    assert s5_request(c, 2, "127.0.0.1", 0)[0] == 0
    rep = s5_read_reply(c)[0]
    assert rep == 0x06
    assert closed_by_peer(c)
    last_session(capd, lambda s: "BIND timed out" in s.get("reason", ""))


# ---------------------------------------------------------------- UDP ASSOCIATE

def udp_header(host, port):
    return b"\x00\x00\x00" + s5_addr(host, port)


def parse_udp_reply(d):
    assert d[:3] == b"\x00\x00\x00"
    if d[3] == 1:
        return socket.inet_ntoa(d[4:8]), struct.unpack("!H", d[8:10])[0], d[10:]
    if d[3] == 4:
        return socket.inet_ntop(socket.AF_INET6, d[4:20]), struct.unpack("!H", d[20:22])[0], d[22:]
    raise AssertionError(d[:10])


def udp_associate(port, echo_port, first):
    """A SOCKS5 UDP association through port whose first datagram (first) came back
    from the echo server at echo_port: (control connection, UDP socket, relay host, port)."""
    c = s5_open(port)
    rep, rhost, rport = s5_request(c, 3, "0.0.0.0", 0)
    assert rep == 0
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.sendto(udp_header("127.0.0.1", echo_port) + first, (rhost, rport))
    assert parse_udp_reply(u.recv(100))[2] == b"echo:" + first
    return c, u, rhost, rport


def test_udp_associate(capd):
    echo = UdpEcho()
    try:
        port = add_socks(capd)
        c = s5_open(port)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        u.settimeout(5)
        rep, rhost, rport = s5_request(c, 3, "0.0.0.0", 0)
        assert rep == 0 and rhost == "127.0.0.1" and rport != 0
        msgs = [b"one", os.urandom(1200), b"three"]
        for m in msgs:
            u.sendto(udp_header("127.0.0.1", echo.port) + m, (rhost, rport))
            host, p, data = parse_udp_reply(u.recv(70000))
            assert (host, p) == ("127.0.0.1", echo.port)
            assert data == b"echo:" + m
        # by name too: the first waits for the name to resolve, the second finds it remembered
        for m in (b"named", b"named again"):
            u.sendto(udp_header("localhost", echo.port) + m, (rhost, rport))
            assert parse_udp_reply(u.recv(70000)) == ("127.0.0.1", echo.port, b"echo:" + m)
        # a fragment is dropped
        u.sendto(b"\x00\x00\x01" + s5_addr("127.0.0.1", echo.port) + b"frag", (rhost, rport))
        with pytest.raises(socket.timeout):
            u.settimeout(0.7)
            u.recv(70000)
        ss = capd.wait_sessions(lambda ss: any(s["proto"] == "udp" for s in ss))
        udp = [s for s in ss if s["proto"] == "udp"][0]
        ctrl = [s for s in ss if s["proto"] == "socks5"][0]
        assert udp["target"] == f"127.0.0.1:{echo.port}"
        assert udp["client"] == "127.0.0.1:%d" % u.getsockname()[1]
        assert udp["state"] == "open" and ctrl["state"] == "open"
        assert f"via session {ctrl['id']}" in udp["note"]
        # closing the control connection ends the association
        c.close()
        capd.wait_sessions(lambda ss: all(s["state"] == "closed" for s in ss))
        u.settimeout(0.7)
        u.sendto(udp_header("127.0.0.1", echo.port) + b"late", (rhost, rport))
        with pytest.raises(socket.timeout):
            u.recv(70000)
        udp = capd.session(udp["id"])
        assert udp["bytes_up"] == sum(map(len, msgs)) + len(b"named") + len(b"named again")

        capd.flush()
        if not capd.pcaps():
            pytest.skip("spool writes no pcapng yet")
        found = b""
        for p in capd.pcaps():
            r = tshark("-r", p, "-Y", f"udp.port == {echo.port}", "-T", "fields", "-e", "udp.srcport",
                       "-e", "udp.dstport", "-e", "udp.payload")
            found += r.stdout.encode()
        assert b"one".hex().encode() in found
        assert (b"echo:three").hex().encode() in found
        assert b"frag".hex().encode() not in found
    finally:
        echo.close()


def test_udp_association_control_reset_is_not_called_a_handshake_error(capd):
    """A UDP association's control connection ended by an RST (a client killed, or
    closing with SO_LINGER 0): the open session's reason said "client error during
    handshake", though its handshake was long done and datagrams had flowed."""
    echo = UdpEcho()
    try:
        port = add_socks(capd)
        c, u, rhost, rport = udp_associate(port, echo.port, b"hi")
        cid = [s for s in capd.ctl("sessions", json_out=True) if s["proto"] == "socks5"][0]["id"]
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        ss = capd.wait_sessions(lambda ss: all(s["state"] == "closed" for s in ss))
        ctrl = [s for s in ss if s["id"] == cid][0]
        assert ctrl["reason"] == "client error: Connection reset by peer", ctrl
    finally:
        echo.close()


def test_udp_datagrams_to_a_name_show_it(capd):
    """SOCKS5 UDP datagrams to a name: a CONNECT to a name shows it as target_name, the
    datagram session showed only the address it resolved to. It now shows the name;
    one to a literal has none."""
    echo, other = UdpEcho(), UdpEcho()
    try:
        port = add_socks(capd)
        c = s5_open(port)
        rep, rhost, rport = s5_request(c, 3, "0.0.0.0", 0)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(5)
        # the second finds the name remembered; the third is a literal
        for host, p in (("localhost", echo.port), ("localhost", echo.port), ("127.0.0.1", other.port)):
            u.sendto(udp_header(host, p) + b"m", (rhost, rport))
            assert parse_udp_reply(u.recv(100))[2] == b"echo:m"
        ss = capd.wait_sessions(lambda ss: len([s for s in ss if s["proto"] == "udp"]) == 2)
        by = {s["target"]: s for s in ss if s["proto"] == "udp"}
        assert by[f"127.0.0.1:{echo.port}"].get("target_name") == f"localhost:{echo.port}", by
        assert not by[f"127.0.0.1:{other.port}"].get("target_name"), by
        c.close()
    finally:
        echo.close()
        other.close()


def test_udp_associate_with_auth_and_announced_port(capd):
    echo = UdpEcho()
    try:
        port = add_socks(capd, "--auth", "u:p")
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        u.settimeout(5)
        c = s5_open(port, "u", "p")
        rep, rhost, rport = s5_request(c, 3, "127.0.0.1", u.getsockname()[1])
        assert rep == 0
        # a datagram from another port of the same host is not this association's
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other.settimeout(0.7)
        other.sendto(udp_header("127.0.0.1", echo.port) + b"stranger", (rhost, rport))
        with pytest.raises(socket.timeout):
            other.recv(100)
        u.sendto(udp_header("127.0.0.1", echo.port) + b"mine", (rhost, rport))
        assert parse_udp_reply(u.recv(100))[2] == b"echo:mine"
        c.close()
    finally:
        echo.close()


def test_udp_association_past_64_endpoints(capd):
    """An association keeps at most 64 endpoints (one session each): the 65th and
    later were dropped without a word for the association's life, which cuts a
    DHT node or a resolver walking many servers off. Now the quietest endpoint's
    session is closed to make room, as a NAT table does."""
    echo = UdpEcho()
    peers = []
    try:
        port = add_socks(capd)
        for _ in range(70):
            r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            r.bind(("127.0.0.1", 0))
            r.settimeout(2)
            peers.append(r)
        c, u, rhost, rport = udp_associate(port, echo.port, b"first")
        for i, r in enumerate(peers):
            u.sendto(udp_header("127.0.0.1", r.getsockname()[1]) + b"to %d" % i, (rhost, rport))
            d, up = r.recvfrom(100)  # up: the association's own socket toward the endpoints
            assert d == b"to %d" % i, i
        # the echo's flow went quiet first: it made room, and comes back as a new session
        ss = capd.wait_sessions(lambda ss: any("evicted" in s.get("reason", "") for s in ss))
        gone = [s for s in ss if "evicted" in s.get("reason", "")]
        assert gone[0]["target"] == f"127.0.0.1:{echo.port}", gone
        u.sendto(udp_header("127.0.0.1", echo.port) + b"again", (rhost, rport))
        assert parse_udp_reply(u.recv(100))[2] == b"echo:again"
        ss = capd.ctl("sessions", json_out=True)
        assert len([s for s in ss if s["proto"] == "udp" and s["state"] == "open"]) == 64
        # a stranger the client never sent to makes no room: dropped, nobody evicted
        evicted = len([s for s in ss if "evicted" in s.get("reason", "")])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            for _ in range(3):
                stranger.sendto(b"unsolicited", up)
        time.sleep(0.3)
        ss = capd.ctl("sessions", json_out=True)
        assert len([s for s in ss if "evicted" in s.get("reason", "")]) == evicted
        assert len([s for s in ss if s["proto"] == "udp" and s["state"] == "open"]) == 64
        assert not [s for s in ss if s["proto"] == "udp" and s.get("bytes_down") and "unsolicited" in str(s)]
        c.close()
    finally:
        echo.close()
        for r in peers:
            r.close()



@pytest.mark.parametrize("end", ["close", "kill"])
def test_udp_association_ends_on_a_session_thread(capd_factory, end):
    """The control connection lives on a session thread, its datagram sessions on
    the main loop (with idle_timeout, a timer there): ending the association from
    the control side (its close, or capctl kill) must end them as the main loop's,
    not abort capd."""
    echo = UdpEcho()
    port = free_port_tcp_udp()
    c = capd_factory(f"[socks s]\nlisten = {port}\nidle_timeout = 30s\n", settings="workers = 2")
    try:
        ctl = s5_open(port)
        rep, rhost, rport = s5_request(ctl, 3, "0.0.0.0", 0)
        assert rep == 0
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(5)
        u.sendto(udp_header("127.0.0.1", echo.port) + b"ping", (rhost, rport))
        assert parse_udp_reply(u.recv(100))[2] == b"echo:ping"
        ss = c.wait_sessions(lambda ss: any(s["proto"] == "udp" for s in ss))
        if end == "close":
            ctl.close()
        else:
            c.ctl("kill", [s for s in ss if s["proto"] == "socks5"][0]["id"])
        c.wait_sessions(lambda ss: all(s["state"] == "closed" for s in ss))
        assert c.proc.poll() is None, c.log()[-3000:]
        # and it goes on serving associations
        ctl = s5_open(port)
        rep, rhost, rport = s5_request(ctl, 3, "0.0.0.0", 0)
        u.sendto(udp_header("127.0.0.1", echo.port) + b"again", (rhost, rport))
        assert parse_udp_reply(u.recv(100))[2] == b"echo:again"
        ctl.close()
        u.close()
    finally:
        echo.close()
    assert c.stop() == 0


def test_udp_datagram_not_sent_is_not_captured(capd):
    """A datagram the kernel refuses (to port 0) did not cross: no bytes counted for it."""
    echo = UdpEcho()
    try:
        port = add_socks(capd)
        ctl = s5_open(port)
        rep, rhost, rport = s5_request(ctl, 3, "0.0.0.0", 0)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(5)
        u.sendto(udp_header("127.0.0.1", 0) + b"nowhere", (rhost, rport))
        u.sendto(udp_header("127.0.0.1", echo.port) + b"there", (rhost, rport))
        assert parse_udp_reply(u.recv(100))[2] == b"echo:there"
        ss = capd.ctl("sessions", json_out=True)
        to_zero = [s for s in ss if s["proto"] == "udp" and s["target"] == "127.0.0.1:0"]
        assert all(s["bytes_up"] == 0 for s in to_zero), to_zero
        sent = [s for s in ss if s["proto"] == "udp" and s["target"] == f"127.0.0.1:{echo.port}"]
        assert [(s["bytes_up"], s["bytes_down"]) for s in sent] == [(5, 10)]
        ctl.close()
    finally:
        echo.close()


def test_two_open_associations_from_one_address(capd):
    """Two associations that leave their port open (0.0.0.0:0) from one address: the
    first datagram belongs to the one that asked first."""
    echo = UdpEcho()
    try:
        port = add_socks(capd)
        a = s5_open(port)
        _, rhost, rport = s5_request(a, 3, "0.0.0.0", 0)
        b = s5_open(port)
        assert s5_request(b, 3, "0.0.0.0", 0)[0] == 0
        ctrl = {s["client"]: s["id"] for s in capd.ctl("sessions", json_out=True) if s["proto"] == "socks5"}
        ua = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ua.settimeout(5)
        ua.sendto(udp_header("127.0.0.1", echo.port) + b"from a", (rhost, rport))
        assert parse_udp_reply(ua.recv(100))[2] == b"echo:from a"
        udp = capd.wait_sessions(lambda ss: any(s["proto"] == "udp" for s in ss))
        note = [s for s in udp if s["proto"] == "udp"][0]["note"]
        a_id = ctrl["127.0.0.1:%d" % a.getsockname()[1]]
        assert f"via session {a_id}" in note, note
        a.close()
        b.close()
    finally:
        echo.close()


# A nameserver on 127.0.0.1:53 that answers every question DELAY seconds late, those for names
# late* LATE seconds (argv: DELAY LATE TELL): every A question gets 127.0.0.1, an AAAA none.
# Prints each name once it answered its A question, and says "asked NAME" to 127.0.0.1:TELL as
# it gets the A question for a name late*.
NS_SLOW_DNS = r"""
import socket, sys, threading
import dns.message, dns.rdatatype, dns.rrset
delay, late, tell, out = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), threading.Lock()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 53))
print("ready", flush=True)
def answer(data, peer):
    q = dns.message.from_wire(data)
    r = dns.message.make_response(q)
    if q.question[0].rdtype == dns.rdatatype.A:
        r.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", "A", "127.0.0.1"))
    u.sendto(r.to_wire(), peer)
    if q.question[0].rdtype == dns.rdatatype.A:
        with out:  # answers go out on timer threads: one whole line at a time
            print(q.question[0].name.to_text(omit_final_dot=True), flush=True)
while True:
    data, peer = u.recvfrom(65535)
    q = dns.message.from_wire(data).question[0]
    threading.Timer(late if q.name.to_text().startswith("late") else delay, answer, (data, peer)).start()
    if q.rdtype == dns.rdatatype.A and q.name.to_text().startswith("late"):
        u.sendto(b"asked " + q.name.to_text(omit_final_dot=True).encode(), ("127.0.0.1", tell))
"""

# A SOCKS5 client in a namespace: a UDP echo on 127.0.0.1:ECHO, one UDP association through
# 127.0.0.1:SOCKS, then one datagram per argument NAME/TEXT to NAME:ECHO, all at once; prints as
# JSON the first WANT replies (or what came in 2 s). Then it sends to late1.test and late2.test and
# ends the association once NS_SLOW_DNS tells (on TELL) it was asked both: while they resolve.
NS_S5_UDP_NAMES = r"""
import json, socket, struct, sys, threading
sport, eport, tport, want = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
told = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
told.bind(("127.0.0.1", tport))
told.settimeout(2)
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.bind(("127.0.0.1", eport))
def echo():
    while True:
        d, a = srv.recvfrom(65536)
        srv.sendto(b"echo:" + d, a)
threading.Thread(target=echo, daemon=True).start()
t = socket.create_connection(("127.0.0.1", sport), timeout=5)
t.sendall(b"\x05\x01\x00")
assert t.recv(2) == b"\x05\x00"
t.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
rep = t.recv(10)
assert rep[1] == 0, rep
relay = (socket.inet_ntoa(rep[4:8]), struct.unpack("!H", rep[8:10])[0])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 0))
u.settimeout(2)
def send(m):
    name = m.split("/")[0]
    u.sendto(b"\0\0\0\x03" + bytes([len(name)]) + name.encode() + struct.pack("!H", eport) + m.encode(), relay)
for m in sys.argv[5:]:
    send(m)
got = []
try:
    while len(got) < want:
        got.append(u.recv(65536)[10:].decode())
except socket.timeout:
    pass
print(json.dumps(got), flush=True)
send("late1.test/x")
send("late2.test/x")
asked = {told.recv(100), told.recv(100)}
assert asked == {b"asked late1.test", b"asked late2.test"}, asked
t.close()
"""


def test_udp_datagrams_to_names_resolving_at_once(netns, ns_etc, ns_capd, ns_python):
    """A SOCKS5 UDP datagram to a name waits while the name resolves, but one to a
    second name meanwhile was dropped without a word: a client talking to two hosts by
    name at once (a game's lobby and stats hosts, a resolver walking servers) lost the
    first datagrams to the second. Each name now resolves on its own (4 at once per
    association; a fifth meanwhile is dropped), its datagrams wait in their order, and an
    association ended while names resolve cancels every resolution."""
    with open(f"{ns_etc}/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n")
    with open(f"{ns_etc}/resolv.conf", "w") as f:
        f.write("nameserver 127.0.0.1\n")
    # late1.test and late2.test are answered 0.25 s late: time for the association to end first
    dnsd = ns_python(netns, NS_SLOW_DNS, 0.1, 0.25, 7743)
    c = ns_capd(netns, "[socks s]\nlisten = 127.0.0.1:7741\n")
    msgs = ["lobby.test/1", "stats.test/1", "lobby.test/2", "stats.test/2", "c.test/1", "d.test/1", "e.test/1"]
    r = sh("ip", "netns", "exec", netns, "/usr/bin/python3", "-c", NS_S5_UDP_NAMES, 7741, 7742, 7743, 6, *msgs,
           check=False)
    got = json.loads(r.stdout.splitlines()[0])
    assert sorted(got) == sorted("echo:" + m for m in msgs[:-1]), (got, c.log()[-3000:])
    for name in ("lobby.test", "stats.test"):
        assert [m for m in got if m.startswith(f"echo:{name}/")] == [f"echo:{name}/1", f"echo:{name}/2"], got
    assert "s: udp: datagram to e.test dropped: 4 names resolving already" in c.log(), c.log()[-3000:]
    # the association ended with late1.test and late2.test resolving: their answers find nothing
    assert r.returncode == 0, r.stderr
    answered, deadline = "", time.time() + 5
    while not ("late1.test\n" in answered and "late2.test\n" in answered):
        assert select.select([dnsd.stdout], [], [], max(0, deadline - time.time()))[0], answered
        chunk = os.read(dnsd.stdout.fileno(), 4096).decode()
        assert chunk, answered  # the nameserver is gone
        answered += chunk
    time.sleep(0.05)
    assert c.proc.poll() is None, c.log()[-3000:]
    ss = c.wait_sessions(lambda ss: ss and all(s["state"] == "closed" for s in ss))
    assert [s["bytes_up"] for s in ss if s["proto"] == "udp"] == [sum(len(m) for m in msgs[:-1])], ss


def test_name_that_outlasts_connect_timeout_says_it_did_not_resolve(netns, ns_etc, ns_capd, ns_python):
    """A CONNECT to a name the resolver answers only after connect_timeout: the
    session's reason was "connect timed out", sending the reader to the target when
    no connect had even begun; it now says the name did not resolve in time. The
    reply stays 0x06."""
    with open(f"{ns_etc}/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n")
    with open(f"{ns_etc}/resolv.conf", "w") as f:
        f.write("nameserver 127.0.0.1\n")
    ns_python(netns, NS_SLOW_DNS, 5, 5, 7763)
    ns_python(netns, ECHO_SERVER, "127.0.0.1", 7760)
    c = ns_capd(netns, "[socks s]\nlisten = 127.0.0.1:7761\nconnect_timeout = 300ms\n")
    r = sh("ip", "netns", "exec", netns, "/usr/bin/python3", "-c", NS_S5_CLIENT, 7761, 7760, "slow.test")
    assert json.loads(r.stdout) == {"slow.test": [6, None]}, r.stdout
    s = c.wait_sessions(lambda ss: ss and ss[-1]["state"] == "closed")[-1]
    assert s["reason"] == "cannot resolve slow.test:7760: timed out", s


def test_bind_name_that_outlasts_connect_timeout_says_it_did_not_resolve(netns, ns_etc, ns_capd, ns_python):
    """BIND to a name the resolver answers only after connect_timeout (BIND's clock):
    the reason was "BIND timed out waiting for the peer", though no port was open yet
    for any peer to reach; it now says the name did not resolve in time (still 0x06)."""
    with open(f"{ns_etc}/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n")
    with open(f"{ns_etc}/resolv.conf", "w") as f:
        f.write("nameserver 127.0.0.1\n")
    ns_python(netns, NS_SLOW_DNS, 5, 5, 7773)
    c = ns_capd(netns, "[socks s]\nlisten = 127.0.0.1:7771\nconnect_timeout = 300ms\n")
    client = ("import socket\ns = socket.create_connection(('127.0.0.1', 7771), timeout=10)\n"
              "s.sendall(b'\\x05\\x01\\x00'); assert s.recv(2) == b'\\x05\\x00'\n"
              "s.sendall(b'\\x05\\x02\\x00\\x03\\x09slow.test\\x00\\x15'); print(s.recv(10).hex())\n")
    r = sh("ip", "netns", "exec", netns, "/usr/bin/python3", "-c", client)
    assert r.stdout.strip()[:4] == "0506", r.stdout
    s = c.wait_sessions(lambda ss: ss and ss[-1]["state"] == "closed")[-1]
    assert s["reason"] == "socks5: BIND: cannot resolve slow.test:21: timed out", s


def test_early_data_beyond_handshake_room_waits_for_connect(capd):
    """Bytes a client sends while capd still connects wait for the tunnel, however
    many: past the handshake's room the client is simply not read."""
    srv, fill = syn_hole()  # capd's SYN goes unanswered until the queue is drained
    try:
        port = add_socks(capd)
        s = s5_open(port)
        s.sendall(b"\x05\x01\x00" + s5_addr("127.0.0.1", srv.getsockname()[1]))
        payload = os.urandom(6000)
        s.sendall(payload)
        time.sleep(0.5)
        srv.settimeout(10)
        got = None
        deadline = time.time() + 15
        while got is None and time.time() < deadline:
            c, peer = srv.accept()
            if peer[1] in [f.getsockname()[1] for f in fill]:
                c.close()
                continue
            got = c
        assert got is not None
        assert s5_read_reply(s)[0] == 0
        got.settimeout(10)
        data = b""
        while len(data) < len(payload):
            d = got.recv(65536)
            if not d:
                break
            data += d
        assert data == payload
        got.close()
        s.close()
    finally:
        for f in fill:
            f.close()
        srv.close()


# ---------------------------------------------------------------- IPv6

def test_ipv6_listen_and_target(capd):
    e6 = EchoServer("::1")
    try:
        port = add_socks(capd, host="::1")
        s = s5_open(port, host="::1")
        rep, bhost, _ = s5_request(s, 1, "::1", e6.port)
        assert rep == 0 and bhost == "::1"
        s.sendall(b"over six")
        assert recv_exact(s, 8) == b"over six"
        s.close()
        ss = capd.ctl("sessions", json_out=True)
        assert ss[0]["client"].startswith("[::1]:")
        assert ss[0]["target"] == f"[::1]:{e6.port}"
        assert ss[0]["proto"] == "socks5"
    finally:
        e6.close()


def test_ipv6_udp_associate(capd):
    echo = UdpEcho("::1")
    try:
        port = add_socks(capd, host="::1")
        c = s5_open(port, host="::1")
        rep, rhost, rport = s5_request(c, 3, "::", 0)
        assert rep == 0 and rhost == "::1"
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        u.bind(("::1", 0))
        u.settimeout(5)
        u.sendto(udp_header("::1", echo.port) + b"six", (rhost, rport))
        host, p, data = parse_udp_reply(u.recv(1000))
        assert (host, p, data) == ("::1", echo.port, b"echo:six")
        c.close()
    finally:
        echo.close()


def test_socks4_bind_over_ipv6_is_refused_at_once(capd):
    """SOCKS4 BIND with DSTIP 0.0.0.0 to an instance on ::1: the port opened on ::1,
    which a SOCKS4 reply cannot hold, so the client was granted 0.0.0.0:0 (no peer
    can be told where to connect) and got 0x5B only at connect_timeout. It is now
    refused at once, saying why."""
    port = add_socks(capd, "--connect-timeout", "5", host="::1")
    s = socket.create_connection(("::1", port), timeout=10)
    s.sendall(b"\x04\x02\x00\x15" + socket.inet_aton("0.0.0.0") + b"ftp\0")
    t = time.time()
    assert recv_exact(s, 8)[:2] == b"\x00\x5b"
    assert time.time() - t < 2
    s.close()
    ss = capd.wait_sessions(lambda ss: ss and ss[-1]["state"] == "closed")
    assert ss[-1]["reason"] == "socks4: BIND: its port would be IPv6, which a SOCKS4 reply cannot name", ss[-1]


def test_bind_by_name(capd):
    port = add_socks(capd)
    c = s5_open(port)
    rep, bhost, bport = s5_request(c, 2, "localhost", 21)
    assert rep == 0 and bhost == "127.0.0.1"
    srv = socket.create_connection((bhost, bport), timeout=10)
    assert s5_read_reply(c)[0] == 0
    srv.sendall(b"data")
    assert recv_exact(c, 4) == b"data"
    c.close()
    srv.close()


# ---------------------------------------------------------------- bad input

def test_bad_input_keeps_serving(capd, echo_server):
    port = add_socks(capd, "--handshake-timeout", "300ms")

    def still_serves():
        s = s5_open(port)
        assert s5_request(s, 1, "127.0.0.1", echo_server.port)[0] == 0
        s.sendall(b"ping")
        assert recv_exact(s, 4) == b"ping"
        s.close()

    cases = [
        os.urandom(64),                      # random bytes (first byte 4 or 5 is unlikely to parse)
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # wrong protocol
        b"\x06\x01\x00",                     # wrong version
        b"\x05\x00",                         # no methods
        b"\x05\x01\x00\x04\x01\x00\x01",     # request with version 4 after a v5 greeting
        b"\x04\x01\x00\x50" + b"\x01\x02\x03\x04" + b"u" * 600,  # SOCKS4 user id past the budget
        b"\x05\xff" + bytes(range(255)),     # 255 methods, none acceptable
    ]
    for data in cases:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(data)
        assert closed_by_peer(s), data[:16]
        s.close()
    still_serves()

    # truncated greeting, then the client goes away
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"\x05\x02\x00")
    s.close()
    # slow handshake past handshake_timeout: closed by capd
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"\x05\x01")
    t0 = time.time()
    assert closed_by_peer(s, timeout=5)
    assert 0.15 < time.time() - t0 < 4
    s.close()
    # a request that never finishes after a good greeting
    s = s5_open(port)
    s.sendall(b"\x05\x01\x00\x03\x20abc")
    assert closed_by_peer(s, timeout=5)
    s.close()
    still_serves()

    ss = capd.wait_sessions(lambda ss: sum(1 for s in ss if s["state"] == "closed") >= 12)
    reasons = [s.get("reason", "") for s in ss]
    assert "handshake timed out" in reasons, reasons
    assert any(r.startswith("socks: unknown version") for r in reasons), reasons
    assert any("client closed during handshake" in r for r in reasons), reasons
    assert any("handshake too large" in r or "too long" in r for r in reasons), reasons
    assert not [s for s in ss if s["state"] != "closed"]
    # the "socks4 with v5 request" case got the SOCKS5 failure reply, not silence
    assert any("bad request" in r for r in reasons), reasons


def s5_auth_raw(port, user, password):
    """Greets with username/password and sends raw bytes as the name; returns (socket, status)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"\x05\x01\x02")
    assert recv_exact(s, 2) == b"\x05\x02"
    s.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
    return s, recv_exact(s, 2)[1]


def test_user_name_not_utf8_keeps_note_and_reason(capd, echo_server):
    """A name in Latin-1 ('J\\xfcrgen', as a Windows client may send) is not
    UTF-8: the session's note and reason are JSON strings, so they used to
    vanish from capctl sessions and the events, the reason of a failed login too."""
    open_port = add_socks(capd)
    s, status = s5_auth_raw(open_port, b"J\xfcrgen", b"pw")
    assert status == 0
    assert s5_request(s, 1, "127.0.0.1", echo_server.port)[0] == 0
    s.close()
    st = last_session(capd, lambda x: x["instance"] == f"socks-{open_port}")
    assert st.get("note") == f"socks5 connect 127.0.0.1:{echo_server.port} user=J?rgen", st
    # a name in UTF-8 stays as it is
    s, status = s5_auth_raw(open_port, "Jürgen".encode(), b"pw")
    assert s5_request(s, 1, "127.0.0.1", echo_server.port)[0] == 0
    s.close()
    st = last_session(capd, lambda x: x["instance"] == f"socks-{open_port}" and "Jürgen" in x.get("note", ""))

    auth_port = add_socks(capd, "--auth", "bob:pw")
    s, status = s5_auth_raw(auth_port, b"J\xfcrgen", b"pw")
    assert status != 0
    assert closed_by_peer(s)
    s.close()
    st = last_session(capd, lambda x: x["instance"] == f"socks-{auth_port}")
    assert st.get("reason") == "socks5: auth failed for user J?rgen", st

    # SOCKS4's user id is any bytes too
    s = s4_request(open_port, 1, "127.0.0.1", echo_server.port, user=b"\xff\xfeadmin")
    assert recv_exact(s, 8)[1] == 0x5a
    s.close()
    st = last_session(capd, lambda x: x["proto"] == "socks4")
    assert st.get("note") == f"socks4 connect 127.0.0.1:{echo_server.port} user=??admin", st


def test_unknown_method_gets_ff(capd):
    port = add_socks(capd)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"\x05\x01\x01")  # GSSAPI only
    assert recv_exact(s, 2) == b"\x05\xff"
    assert closed_by_peer(s)
    s.close()
    port2 = add_socks(capd, "--auth", "a:b")
    s = socket.create_connection(("127.0.0.1", port2), timeout=5)
    s.sendall(b"\x05\x01\x00")
    assert recv_exact(s, 2) == b"\x05\xff"
    assert closed_by_peer(s)
    s.close()
    s = socket.create_connection(("127.0.0.1", port2), timeout=5)
    s.sendall(b"\x05\x01\x02\x01\x01a\x01c")
    assert recv_exact(s, 4) == b"\x05\x02\x01\x01"
    assert closed_by_peer(s)
    s.close()
    # a user name with a newline cannot forge a log line
    s = socket.create_connection(("127.0.0.1", port2), timeout=5)
    s.sendall(b"\x05\x01\x02\x01\x05ev\nil\x01c")
    assert recv_exact(s, 4) == b"\x05\x02\x01\x01"
    assert closed_by_peer(s)
    s.close()
    last_session(capd, lambda s: s.get("reason") == "socks5: auth failed for user ev?il")
    assert "ev\nil" not in capd.log()


def test_many_concurrent_handshakes(capd, echo_server):
    """A burst of clients, every one served, none left open."""
    port = add_socks(capd)
    errors = []

    def one(i):
        try:
            s = s5_open(port)
            assert s5_request(s, 1, "127.0.0.1", echo_server.port)[0] == 0
            m = f"msg {i}".encode()
            s.sendall(m)
            assert recv_exact(s, len(m)) == m
            s.close()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(60)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors, errors[:3]
    capd.wait_sessions(lambda ss: len(ss) == 60 and all(s["state"] == "closed" for s in ss))


def test_exposed_without_users_warns(capd_factory):
    port = free_port(host="0.0.0.0")
    capd = capd_factory(f"[socks open]\nlisten = 0.0.0.0:{port}\nexpose = yes\n")
    wait_port(port)
    assert "open proxy" in capd.log()
    # a UDP ASSOCIATE on a wildcard relay names the address the client used
    s = s5_open(port)
    rep, rhost, rport = s5_request(s, 3, "0.0.0.0", 0)
    assert rep == 0 and rhost == "127.0.0.1" and rport != 0  # the TCP port, unless UDP had it taken
    s.close()


def test_exposed_with_users_and_socks4_warns(capd_factory, http_server):
    """Users and `socks4 = yes` on an exposed instance: SOCKS4 has no password, so
    anyone reaching the port is let through (curl --socks4 fetched a page), yet
    nothing was logged, as if the users guarded it; it now warns as an open proxy."""
    hport, _ = http_server
    port = free_port(host="0.0.0.0")
    capd = capd_factory(f"[socks guarded]\nlisten = 0.0.0.0:{port}\nexpose = yes\nauth = bob:pw\nsocks4 = yes\n")
    wait_port(port)
    r = curl("--socks4", f"127.0.0.1:{port}", f"http://127.0.0.1:{hport}/")
    assert r.returncode == 0, r.stderr
    assert "guarded: exposed on 0.0.0.0:%d with socks4 = yes: SOCKS4 needs no password, this is an open proxy" \
        % port in capd.log(), capd.log()[-2000:]


def test_reload_keeps_config_socks(capd_factory, http_server):
    """The [socks main] section of a config runs and serves."""
    hport, _ = http_server
    port = free_port()
    capd = capd_factory(f"[socks main]\nlisten = 127.0.0.1:{port}\n")
    r = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://localhost:{hport}/")
    assert r.stdout == b"hello from the origin\n"
    inst = capd.ctl("list", json_out=True)[0]
    assert inst["type"] == "socks" and inst["udp"] == f"127.0.0.1:{port}"


def test_two_loose_udp_associations_from_one_host(capd):
    """Two UDP ASSOCIATEs from one host that both leave DST.ADDR:PORT as zeros
    (many clients do: they cannot know their port ahead) could not be told
    apart on one relay socket: the first datagram of the second was taken as
    the first's, counted in its session and ended with its control connection.
    The second gets a relay socket of its own (its reply's BND.PORT), as dante
    gives every association; each one's datagrams are its own."""
    echo = UdpEcho()
    try:
        port = add_socks(capd)
        a, b = s5_open(port), s5_open(port)
        _, ha, pa = s5_request(a, 3, "0.0.0.0", 0)
        _, hb, pb = s5_request(b, 3, "0.0.0.0", 0)
        assert pa != pb and ha == hb == "127.0.0.1"
        assert capd.ctl("list", json_out=True)[0]["udp"] == f"127.0.0.1:{pa}"  # the instance's stays
        ua, ub = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
        for u in (ua, ub):
            u.bind(("127.0.0.1", 0))
            u.settimeout(5)
        ub.sendto(udp_header("127.0.0.1", echo.port) + b"b first", (hb, pb))  # the second speaks first
        assert parse_udp_reply(ub.recv(100))[2] == b"echo:b first"
        ua.sendto(udp_header("127.0.0.1", echo.port) + b"a", (ha, pa))
        assert parse_udp_reply(ua.recv(100))[2] == b"echo:a"
        ss = capd.wait_sessions(lambda ss: len([s for s in ss if s["proto"] == "udp"]) == 2)
        ctrl = sorted(s["id"] for s in ss if s["proto"] == "socks5")
        via = {s["client"]: s["note"] for s in ss if s["proto"] == "udp"}
        assert f"via session {ctrl[1]}" in via["127.0.0.1:%d" % ub.getsockname()[1]], via
        assert f"via session {ctrl[0]}" in via["127.0.0.1:%d" % ua.getsockname()[1]], via
        # the first's control connection goes: the second's association stays, on its socket
        a.close()
        capd.wait_sessions(lambda ss: capd.session(ctrl[0])["state"] == "closed")
        ub.sendto(udp_header("127.0.0.1", echo.port) + b"b again", (hb, pb))
        assert parse_udp_reply(ub.recv(100))[2] == b"echo:b again"
        b.close()
        capd.wait_sessions(lambda ss: all(s["state"] == "closed" for s in ss))
        ub.settimeout(0.7)  # its socket went with it
        ub.sendto(udp_header("127.0.0.1", echo.port) + b"late", (hb, pb))
        with pytest.raises(socket.timeout):
            ub.recv(100)
    finally:
        echo.close()


def test_connect_timeout_0_is_not_cut_by_the_handshake_timeout(capd):
    """connect_timeout = 0 sets no limit of capd's own on a connect, yet a
    CONNECT still ran on what was left of handshake_timeout: curl through an
    instance with handshake_timeout 300ms got 0x06 (reason "connect timed
    out") at 0.3 s from a server that answered its SYN a second later. The
    request ends the client's part; the connect has only its own clock."""
    srv, fill = syn_hole()  # capd's SYN goes unanswered until the queue is drained
    filled = [f.getsockname()[1] for f in fill]

    def serve():
        time.sleep(0.8)
        srv.settimeout(15)
        while True:
            try:
                c, peer = srv.accept()
            except OSError:
                return
            if peer[1] in filled:
                c.close()
                continue
            with c:
                head = b""
                while b"\r\n\r\n" not in head:
                    d = c.recv(4096)
                    if not d:
                        break
                    head += d
                c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nslow\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        port = add_socks(capd, "--connect-timeout", "0", "--handshake-timeout", "300ms")
        r = curl("--socks5", f"127.0.0.1:{port}", f"http://127.0.0.1:{srv.getsockname()[1]}/")
        assert r.returncode == 0 and r.stdout == b"slow\n", (r.stderr, capd.log()[-1500:])
        s = last_session(capd, lambda x: x["proto"] == "socks5")
        assert "timed out" not in s["reason"] and s["bytes_down"] > 0, s
    finally:
        srv.close()
        for f in fill:
            f.close()


def test_malformed_greeting_and_auth_get_their_failure_reply(capd):
    """A greeting offering no method (NMETHODS 0) and an RFC 1929 message that
    cannot be one (version other than 1, a NUL inside the name) were answered
    with a bare close: a client waiting for the method or the status saw only
    EOF. They now get X'FF' (no acceptable method) and status 1 (failure), and
    a reason saying which. A bad SOCKS4 or 4a request is listed as such, not
    as "socks"."""
    port = add_socks(capd, "--auth", "bob:pw", "--socks4")
    for data, reply in ((b"\x05\x00", b"\x05\xff"),
                        (b"\x05\x01\x02\x02\x03bob\x02pw", b"\x05\x02\x01\x01"),
                        (b"\x05\x01\x02\x01\x03b\x00b\x02pw", b"\x05\x02\x01\x01"),
                        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00", b"\x00\x5b" + bytes(6)),
                        (b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 300, b"\x00\x5b" + bytes(6))):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(data)
        assert recv_exact(s, len(reply)) == reply, data
        assert closed_by_peer(s)
        s.close()
    ss = capd.wait_sessions(lambda ss: len([s for s in ss if s["state"] == "closed"]) == 5)
    ss.sort(key=lambda s: s["id"])  # in the order sent: two may end in one millisecond, listed either way
    assert [(s["proto"], s["reason"]) for s in ss] == [
        ("socks5", "socks5: bad greeting: no methods offered"),
        ("socks5", "socks5: bad auth message: version 0x02, not 1"),
        ("socks5", "socks5: bad auth message: a NUL byte in the user name or password"),
        ("socks4a", "socks4a: bad request: bad host name"),
        ("socks4", "socks4: bad request: user id too long")], ss
    for s in ss:
        assert f"session {s['id']} socks/socks-{port} " in capd.log()
    # and the instance still serves
    s = s5_open(port, "bob", "pw")
    s.close()


def test_refusal_while_the_client_still_sends_is_a_fin_not_a_reset(capd):
    """A client that sends data behind its request (optimistic data, up to an
    upload) and is refused (here 0x05, the target port closed): capd sent the
    reply, read 16 KiB of the rest and closed with more unread, which is an
    RST; the client read ECONNRESET after the reply, and a stack that drops
    received data on a reset (Windows') lost the reply too. The socket now
    lingers after the reply and FIN, reading and dropping, as http does."""
    port = add_socks(capd)
    for ver in (5, 4):
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        if ver == 5:
            head, reply = b"\x05\x01\x00\x05\x01\x00" + s5_addr("127.0.0.1", free_port()), b"\x05\x00\x05\x05"
        else:
            head = b"\x04\x01" + struct.pack("!H", free_port()) + socket.inet_aton("127.0.0.1") + b"\0"
            reply = b"\x00\x5b"
        errors = []

        def send():
            try:
                c.sendall(head + os.urandom(1 << 20))
            except OSError as e:
                errors.append(e)

        t = threading.Thread(target=send)
        t.start()
        got = b""
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                got += d
        except ConnectionResetError:
            got += b"<reset>"
        t.join(15)
        c.close()
        assert got.startswith(reply) and not got.endswith(b"<reset>"), (ver, got)
        assert not errors, (ver, errors)
    ss = capd.wait_sessions(lambda ss: len([s for s in ss if s["state"] == "closed"]) == 2)
    assert all("Connection refused" in s["reason"] for s in ss), ss


def test_empty_user_name_is_not_noted(capd, echo_server):
    """An RFC 1929 name of 0 bytes (let in by an instance without users) was
    noted as "user=" with nothing after it, in the session's note and in the
    log; a failed one read "auth failed for user " and stopped. The note now
    has no user, as a SOCKS4 request with an empty user id, and the failure
    says the name was empty."""
    port = add_socks(capd)
    s, status = s5_auth_raw(port, b"", b"pw")
    assert status == 0
    assert s5_request(s, 1, "127.0.0.1", echo_server.port)[0] == 0
    s.close()
    st = last_session(capd)
    assert st["note"] == f"socks5 connect 127.0.0.1:{echo_server.port}", st
    auth = add_socks(capd, "--auth", "bob:pw")
    s, status = s5_auth_raw(auth, b"", b"")
    assert status == 1 and closed_by_peer(s)
    s.close()
    st = last_session(capd, lambda x: x["instance"] == f"socks-{auth}")
    assert st["reason"] == "socks5: auth failed for an empty user name", st


def test_refused_request_shows_what_it_asked_for(capd):
    """A request refused before any connect (SOCKS4 on an instance with users,
    a command capd does not know) had an empty TARGET in capctl sessions, so
    that only the note told where it wanted to go; a request an http instance
    refuses shows what it asked for. So does this one now."""
    port = add_socks(capd, "--auth", "bob:pw")
    s = s4_request(port, 1, "127.0.0.1", 8080, b"joe")
    assert recv_exact(s, 8)[1] == 0x5b
    s.close()
    s = s5_open(port, "bob", "pw")
    s.sendall(b"\x05\x09\x00" + s5_addr("::1", 443))
    assert s5_read_reply(s)[0] == 0x07
    s.close()
    s = s5_open(port, "bob", "pw")
    s.sendall(b"\x05\x09\x00" + s5_addr("example.test", 80))
    assert s5_read_reply(s)[0] == 0x07
    s.close()
    ss = capd.wait_sessions(lambda ss: len([s for s in ss if s["state"] == "closed"]) == 3)
    ss.sort(key=lambda s: s["id"])  # in the order sent, not of their ends on two workers
    assert [s["target"] for s in ss] == ["127.0.0.1:8080", "[::1]:443", "example.test:80"], ss
    table = capd.ctl("sessions").stdout
    assert "127.0.0.1:8080" in table and "example.test:80" in table, table


def test_bind_peer_that_cannot_be_accepted_fails_at_once(capd):
    """A BIND peer that came while capd had no descriptor left: accept failed
    (EMFILE), the connection stayed in the backlog, the listener stayed
    readable and capd spun on it until connect_timeout, then answered 0x06
    "BIND timed out waiting for the peer", though the peer had come. The BIND
    now fails at once with 0x01 and says why."""
    port = add_socks(capd, "--connect-timeout", "20")
    c = s5_open(port)
    rep, bhost, bport = s5_request(c, 2, "127.0.0.1", 0)
    assert rep == 0
    pid = capd.proc.pid
    with open(f"/proc/{pid}/limits") as f:
        soft = f.read().split("Max open files")[1].split()[0]
    # no new descriptor at all: a limit at the lowest one free then was undone by a
    # descriptor capd closed after (capctl add's connection, reaped a loop pass later)
    sh("prlimit", "--pid", pid, "--nofile=0:")
    peer = socket.socket()
    try:
        t = time.time()
        try:
            peer.connect((bhost, bport))
        except ConnectionResetError:
            pass  # refused already: the listener went with the BIND
        assert s5_read_reply(c)[0] == 0x01
        assert time.time() - t < 10
    finally:
        peer.close()
        sh("prlimit", "--pid", pid, f"--nofile={soft}:")
    c.close()
    s = last_session(capd)
    assert s["reason"] == "socks5: BIND: cannot accept the peer: Too many open files", s


def test_bind_ends_when_its_client_goes_after_much_early_data(capd):
    """Regression: a client that sent more early data than the handshake buffer holds
    (2 KiB) while BIND waited for its peer, then closed, was not noticed until
    connect_timeout: with the buffer full capd stopped reading the client, and so
    never saw its FIN. The wait now ends at the close, as with less early data, and
    with more early data the peer still gets every byte once it comes."""
    port = add_socks(capd, "--connect-timeout", "60")
    c = s5_open(port)
    rep, bhost, bport = s5_request(c, 2, "127.0.0.1", 0)
    assert rep == 0
    c.sendall(os.urandom(6000))
    time.sleep(0.3)   # read up to the buffer's end first, then the FIN
    c.close()
    s = last_session(capd, timeout=5)
    assert s["reason"] == "client closed during BIND", s
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((bhost, bport), timeout=5)
    # a client that stays: the peer comes and gets it all, the client the answer
    c = s5_open(port)
    rep, bhost, bport = s5_request(c, 2, "127.0.0.1", 0)
    early = os.urandom(100000)
    threading.Thread(target=c.sendall, args=(early,), daemon=True).start()
    time.sleep(0.3)
    srv = socket.create_connection((bhost, bport), timeout=10)
    assert s5_read_reply(c)[0] == 0
    assert recv_exact(srv, len(early)) == early
    srv.sendall(b"200 ok\r\n")
    assert recv_exact(c, 8) == b"200 ok\r\n"
    c.close()
    srv.close()


def test_bind_capture_shows_the_peer_connecting(capd):
    """Regression: the capture of a BIND connection showed the client opening it toward
    the peer (the client's SYN, as for CONNECT), though the peer connected to capd. The
    peer's SYN now comes first; each side's bytes stay its own."""
    port = add_socks(capd)
    c = s5_open(port)
    rep, bhost, bport = s5_request(c, 2, "127.0.0.1", 0)
    assert rep == 0
    srv = socket.create_connection((bhost, bport), timeout=10)
    peer = srv.getsockname()
    assert s5_read_reply(c)[0] == 0
    srv.sendall(b"220 peer\r\n")
    assert recv_exact(c, 10) == b"220 peer\r\n"
    c.sendall(b"client\r\n")
    assert recv_exact(srv, 8) == b"client\r\n"
    c.close()
    assert recv_all(srv) == b""
    srv.close()
    s = last_session(capd)
    assert s["target"] == f"{peer[0]}:{peer[1]}", s
    capd.flush()
    pcap, up, down = pcap_with(capd, s["id"])
    assert (up, down) == (b"client\r\n", b"220 peer\r\n")
    r = tshark("-r", pcap, "-Y", f'tcp.flags.syn == 1 && frame.comment contains "capd session {s["id"]} "',
               "-T", "fields", "-e", "tcp.srcport", "-e", "tcp.flags.ack")
    syns = [line.split("\t") for line in r.stdout.splitlines()]
    assert [(p, a in ("1", "True")) for p, a in syns] == [(str(peer[1]), False), (s["client"].split(":")[1], True)], syns


def held_up(capd, seconds):
    """Stops capd (SIGSTOP: as a loaded machine holds it up) for `seconds` around
    the with block's body, then lets it go on."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def hold():
        sigstop(capd.proc)
        try:
            yield
            time.sleep(seconds)
        finally:
            capd.proc.send_signal(signal.SIGCONT)
    return hold()


@pytest.mark.parametrize("workers", [1, 2])
def test_handshake_timeout_spares_a_greeting_sent_while_capd_was_held_up(capd_factory, echo_server, workers):
    """Regression: handshake_timeout was judged on the loop's clock, which stands
    still while capd is not scheduled (held up under load, or SIGSTOP), and after
    such a pause libev ran the expired timer before the read. A client that sent
    its greeting while capd was stopped past handshake_timeout (1 s) was closed as
    "handshake timed out" with its greeting unread. It now gets its time again."""
    capd = capd_factory(settings=f"workers = {workers}")
    port = add_socks(capd, "--handshake-timeout", "1s")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        capd.wait_sessions(lambda ss: ss and ss[-1]["state"] == "handshake")  # accepted: its clock runs
        with held_up(capd, 1.3):
            c.sendall(b"\x05\x01\x00")
        assert recv_exact(c, 2) == b"\x05\x00"
        assert s5_request(c, 1, "127.0.0.1", echo_server.port)[0] == 0
        c.sendall(b"ping")
        assert recv_exact(c, 4) == b"ping"
    # a client that sends nothing still goes at the deadline
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        t = time.monotonic()
        assert closed_by_peer(c, timeout=8)
        assert time.monotonic() - t < 6
    assert last_session(capd)["reason"] == "handshake timed out"



def test_bind_spares_a_peer_that_came_while_capd_was_held_up(capd):
    """Regression: BIND's wait for its peer (connect_timeout) was judged on the
    loop's clock, which stands still while capd is not scheduled, and after such a
    pause libev ran the expired timer before the accept. A peer that connected
    while capd was stopped past connect_timeout (1 s) waited in the backlog while
    the client got 0x06 "BIND timed out waiting for the peer". The peer now counts."""
    port = add_socks(capd, "--connect-timeout", "1s")
    c = s5_open(port)
    rep, bhost, bport = s5_request(c, 2, "127.0.0.1", 0)
    assert rep == 0
    with held_up(capd, 1.3):
        peer = socket.create_connection((bhost, bport), timeout=10)  # the kernel takes it into the backlog
    with peer:
        assert s5_read_reply(c)[0] == 0
        peer.sendall(b"220 peer\r\n")
        assert recv_exact(c, 10) == b"220 peer\r\n"
    c.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_udp_associate_spares_datagrams_sent_while_capd_was_held_up(capd_factory, workers):
    """Regression: a UDP association's idle clock (its control connection's
    idle_timeout) was judged on the loop's clock, which stands still while capd
    is not scheduled, and after such a pause libev ran the expired timer before
    the read. A datagram sent while capd was stopped past idle_timeout (1 s)
    waited unread while the association and its control connection were closed
    as "idle timeout"; the datagram was then dropped, no answer. It now counts.
    With one loop the timer always ran first; with workers the control
    connection's thread raced the relay's."""
    capd = capd_factory(settings=f"workers = {workers}")
    echo = UdpEcho()
    try:
        port = add_socks(capd, "--idle-timeout", "1s")
        c = s5_open(port)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        u.settimeout(5)
        rep, rhost, rport = s5_request(c, 3, "0.0.0.0", 0)
        assert rep == 0
        u.sendto(udp_header("127.0.0.1", echo.port) + b"one", (rhost, rport))
        assert parse_udp_reply(u.recv(70000))[2] == b"echo:one"
        with held_up(capd, 1.3):
            u.sendto(udp_header("127.0.0.1", echo.port) + b"two", (rhost, rport))
        assert parse_udp_reply(u.recv(70000))[2] == b"echo:two"
        # quiet from here: the association still ends at idle_timeout
        assert closed_by_peer(c, timeout=8)
        ctrl = last_session(capd, lambda s: s["proto"] == "socks5")
        assert ctrl["reason"] == "idle timeout", ctrl
        c.close()
        u.close()
    finally:
        echo.close()


# A SOCKS5 client in a namespace: greets 127.0.0.1:SOCKS, sends CMD (1 CONNECT, 2 BIND) to
# NAME:PORT, prints "sent", then the reply in hex (argv: SOCKS CMD NAME PORT).
NS_S5_SENT = r"""
import socket, struct, sys
sport, cmd, name, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.create_connection(("127.0.0.1", sport), timeout=20)
s.sendall(b"\x05\x01\x00")
assert s.recv(2) == b"\x05\x00"
s.sendall(bytes([5, cmd, 0, 3, len(name)]) + name.encode() + struct.pack("!H", port))
print("sent", flush=True)
print(s.recv(10).hex(), flush=True)
"""


@pytest.mark.parametrize("cmd", [1, 2])
def test_name_answered_while_capd_was_held_up_resolves(netns, ns_etc, ns_capd, ns_python, cmd):
    """Regression: connect_timeout (BIND's clock too) was judged on the loop's clock,
    which stands still while capd is not scheduled (held up under load, SIGSTOP), and
    after such a pause libev ran the expired timer before the resolver's read. A name
    the nameserver answered in 0.3 s, while capd was stopped past connect_timeout
    (1 s), got 0x06 and "cannot resolve slow.test:7790: timed out" (BIND: "socks5:
    BIND: cannot resolve ..."), the answer unread. The answer now counts."""
    import signal
    with open(f"{ns_etc}/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n")
    with open(f"{ns_etc}/resolv.conf", "w") as f:
        f.write("nameserver 127.0.0.1\n")
    ns_python(netns, NS_SLOW_DNS, 0.3, 0.3, 7793)
    ns_python(netns, ECHO_SERVER, "127.0.0.1", 7790)
    c = ns_capd(netns, "[socks s]\nlisten = 127.0.0.1:7791\nconnect_timeout = 1s\n")
    p = subprocess.Popen(["ip", "netns", "exec", netns, "/usr/bin/python3", "-c", NS_S5_SENT, "7791", str(cmd),
                          "slow.test", "7790"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "sent"
        time.sleep(0.05)  # the request on its way to capd, the question to the nameserver
        sigstop(c.proc)
        try:
            time.sleep(1.3)
        finally:
            c.proc.send_signal(signal.SIGCONT)
        rep = p.stdout.readline().strip()
    finally:
        p.wait(20)
    assert rep[:4] == "0500", (rep, c.log()[-2000:])


def session_time(stamp):
    """A session's "started"/"ended" as seconds."""
    import datetime
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def test_udp_sessions_end_when_their_association_ends(capd_factory):
    """Regression: with workers, the control connection of an association lives on
    a worker and ends its datagram sessions as the main loop's, whose clock had
    stood still since that loop last woke: a datagram at 02:35:05, the TCP
    connection closed at 02:35:10 (python client), and `capctl sessions --json`
    said the UDP session ended at 02:35:05.210, five seconds before its
    association. Its end is now the close's time."""
    capd = capd_factory(settings="workers = 2")
    echo = UdpEcho()
    try:
        port = add_socks(capd)
        c, u, rhost, rport = udp_associate(port, echo.port, b"ping")
        time.sleep(2.5)  # nothing for the main loop to do meanwhile (no capctl call)
        c.close()
        ss = capd.wait_sessions(lambda ss: len(ss) == 2 and all(s["state"] == "closed" for s in ss))
        ctrl = [s for s in ss if s["proto"] == "socks5"][0]
        udp = [s for s in ss if s["proto"] == "udp"][0]
        assert udp["reason"] == "udp association ended", udp
        assert abs(session_time(udp["ended"]) - session_time(ctrl["ended"])) < 1.0, (udp, ctrl)
        u.close()
    finally:
        echo.close()


# A one-line HTTP origin on 127.0.0.1 PORT (argv) in a namespace; "ready" once it listens.
NS_HTTP_ORIGIN = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("ready", flush=True)
s.serve_forever()
"""

# GET / from NAME:PORT through the SOCKS server on 127.0.0.1:SOCKS, by SOCKS5 (ATYP 3) and
# SOCKS4a, with the name as given (curl would send 127.1 as the address 127.0.0.1, as it
# parses it itself); prints {name: [SOCKS5 reply code, SOCKS4 reply code, body or null]}.
NS_SOCKS_NAMES = r"""
import json, socket, struct, sys
sport, port, out = int(sys.argv[1]), int(sys.argv[2]), {}
def get(s):
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    d = b""
    while (x := s.recv(4096)):
        d += x
    return d.split(b"\r\n\r\n", 1)[-1].decode()
for name in sys.argv[3:]:
    s = socket.create_connection(("127.0.0.1", sport), timeout=20)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name.encode() + struct.pack("!H", port))
    rep = s.recv(10)
    body = get(s) if rep[1] == 0 else None
    s.close()
    s = socket.create_connection(("127.0.0.1", sport), timeout=20)
    s.sendall(b"\x04\x01" + struct.pack("!H", port) + b"\x00\x00\x00\x01" + b"\x00" + name.encode() + b"\x00")
    rep4 = s.recv(8)
    body4 = get(s) if rep4[1] == 90 else None
    s.close()
    out[name] = [rep[1], rep4[1], body if body == body4 else [body, body4]]
print(json.dumps(out))
"""


def test_numeric_host_forms_and_localhost_dot_through_socks_and_http(netns, ns_etc, ns_capd, ns_python):
    """Regression: a SOCKS5 (ATYP 3), SOCKS4a or HTTP proxy request naming the target
    127.1, 2130706433, 0x7f.1 or 0177.0.0.1 (which glibc's getaddrinfo takes, as inet_aton
    does: wget through the HTTP proxy sends them as typed) or localhost. (curl
    --socks5-hostname, --socks4a, -x) got 0x04 / 91 / 502 'cannot resolve': c-ares 1.18 took
    them for names and asked the DNS. They are now addresses (and localhost. is localhost),
    found without the resolver; 127.1. stays a name. In a namespace whose resolver is a
    closed loopback port (so no name leaves the box) and whose hosts file has localhost only."""
    with open(f"{ns_etc}/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n")
    with open(f"{ns_etc}/resolv.conf", "w") as f:
        f.write("nameserver 127.0.0.1\n")  # nothing listens there
    ns_python(netns, NS_HTTP_ORIGIN, 7700)
    c = ns_capd(netns, "[socks s]\nlisten = 127.0.0.1:7701\n[http h]\nlisten = 127.0.0.1:7702\n")
    numeric = ("127.1", "2130706433", "0x7f.1", "0177.0.0.1")
    r = sh("ip", "netns", "exec", netns, "/usr/bin/python3", "-c", NS_SOCKS_NAMES, 7701, 7700, *numeric,
           "LocalHost.", "127.1.")
    got = json.loads(r.stdout)
    want = {h: [0, 90, "ok\n"] for h in (*numeric, "LocalHost.")}
    want["127.1."] = [4, 91, None]  # a name, as for getaddrinfo: the (closed) resolver says no
    assert got == want, got
    for host in numeric:
        r = sh("ip", "netns", "exec", netns, "wget", "-q", "-O-", "-T", "10", "-t", "1", "-e", "use_proxy=yes",
               "-e", "http_proxy=http://127.0.0.1:7702", f"http://{host}:7700/", check=False)
        assert r.returncode == 0 and r.stdout == "ok\n", (host, r.stdout, r.stderr)
    for flag, proxy in (("--socks5-hostname", "127.0.0.1:7701"), ("--socks4a", "127.0.0.1:7701"),
                        ("-x", "http://127.0.0.1:7702")):
        r = sh("ip", "netns", "exec", netns, "curl", "-sS", "--max-time", "10", flag, proxy,
               "http://localhost.:7700/", check=False)
        assert r.returncode == 0 and r.stdout == "ok\n", (flag, r.stdout, r.stderr)
    ss = c.wait_sessions(lambda ss: sum(s["state"] == "closed" for s in ss) >= 19)
    assert sum(s.get("target") == "127.0.0.1:7700" for s in ss) == 17, ss


def test_config_check_warns_of_exposed_and_open_proxy(capd_factory):
    """`capd -t` printed the promisc-on-any warning with its line, but not what a start
    of the same file logs: "listens on X, beyond loopback" and the SOCKS open-proxy
    warnings. It now prints them as "file:line: warning: ..." (exit 0), each once; a
    real start still logs each of them once."""
    from conftest import CAPD
    p1, p2 = free_port(host="0.0.0.0"), free_port(host="0.0.0.0")
    conf = (f"[socks open]\nlisten = 0.0.0.0:{p1}\nexpose = yes\n"
            f"[socks s4]\nlisten = 0.0.0.0:{p2}\nexpose = yes\nauth = bob:pw\nsocks4 = yes\n")
    capd = capd_factory(conf, start=False)
    r = subprocess.run([str(CAPD), "-t", "-c", str(capd.conf_path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = capd.conf_path.read_text().splitlines()
    ln = {k: lines.index(k) + 1 for k in ("expose = yes", "socks4 = yes")}
    second_expose = len(lines) - lines[::-1].index("expose = yes")
    assert r.stderr.splitlines() == [
        f"capd: {capd.conf_path}:{ln['expose = yes']}: warning: open listens on 0.0.0.0:{p1}, beyond loopback",
        f"capd: {capd.conf_path}:{ln['expose = yes']}: warning: open: exposed on 0.0.0.0:{p1} with no users: "
        "this is an open proxy",
        f"capd: {capd.conf_path}:{second_expose}: warning: s4 listens on 0.0.0.0:{p2}, beyond loopback",
        f"capd: {capd.conf_path}:{ln['socks4 = yes']}: warning: s4: exposed on 0.0.0.0:{p2} with socks4 = yes: "
        "SOCKS4 needs no password, this is an open proxy"], r.stderr
    capd.start()
    log = capd.log()
    for want in (f"open listens on 0.0.0.0:{p1}, beyond loopback", f"s4 listens on 0.0.0.0:{p2}, beyond loopback",
                 f"open: exposed on 0.0.0.0:{p1} with no users", f"s4: exposed on 0.0.0.0:{p2} with socks4 = yes"):
        assert log.count(want) == 1, (want, log[-3000:])
    assert "warning:" not in log, log[-3000:]


def test_bad_auth_entry_keeps_its_password_out_of_the_log(capd_factory):
    from conftest import CAPD
    """A bad `auth = user:password` (an empty user, a password over 255 bytes) was
    refused with the whole value quoted: a reload of such a file wrote the password
    to capd's log (the journal) and capctl's answer, as did `capd -t` and instance.add.
    The message now names the user alone, and a value without ':' (likely a password
    alone) is not shown."""
    port = free_port()
    capd = capd_factory(f"[socks s]\nlisten = 127.0.0.1:{port}\nauth = bob:pw\n")
    for entry, want in ((":Sesame-one", "bad auth for user ''"),
                        ("bob:Sesame-two" + "x" * 150 + "\n  " + "x" * 150, "bad auth for user 'bob'"),
                        ("Sesame-three", "bad auth (no ':', so not shown)")):
        secret = "Sesame"
        capd.write_conf(f"[socks s]\nlisten = 127.0.0.1:{port}\nauth = bob:pw\nauth = {entry}\n")
        entry = entry.replace("\n  ", "")
        r = capd.ctl("reload", check=False)
        assert r.returncode != 0 and want in r.stderr and secret not in r.stderr, r.stderr
        assert "expected user:password (user 1 to 255 bytes, password up to 255)" in r.stderr, r.stderr
        t = subprocess.run([str(CAPD), "-t", "-c", str(capd.conf_path)], capture_output=True, text=True, timeout=30)
        assert t.returncode == 1 and want in t.stderr and secret not in t.stderr, t.stderr
        e = capd.rpc("instance.add", {"type": "socks", "listen": str(free_port()), "auth": [entry]})
        assert want in e["error"]["message"] and secret not in e["error"]["message"], e
    log = capd.log()
    assert log.count("reload refused") >= 3 and "Sesame" not in log, log[-3000:]


# A nameserver on 127.0.0.1:53 that answers every query NXDOMAIN and appends each name
# asked to the file argv[1]: what a namespace's resolver was asked.
NS_DNS_LOG = r"""
import socket, sys, dns.message, dns.rcode
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 53))
print("ready", flush=True)
while True:
    data, peer = u.recvfrom(65535)
    q = dns.message.from_wire(data)
    with open(sys.argv[1], "a") as f:
        f.write(q.question[0].name.to_text() + "\n")
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.NXDOMAIN)
    u.sendto(r.to_wire(), peer)
"""

# A SOCKS client in a namespace: a TCP and a UDP echo on [::1]:ECHO, then per argument NAME
# a SOCKS5 CONNECT (ATYP 3), a SOCKS4a CONNECT and a SOCKS5 UDP datagram to NAME:ECHO through
# [::1]:SOCKS; prints {NAME: [rep5, rep4a, "what came back over TCP", "over UDP"]} as JSON.
NS_S5_BRACKETS = r"""
import json, socket, struct, sys, threading
sport, eport = int(sys.argv[1]), int(sys.argv[2])
ls = socket.socket(socket.AF_INET6)
ls.bind(("::1", eport))
ls.listen(8)
us = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
us.bind(("::1", eport))
def tcp_echo():
    while True:
        c, _ = ls.accept()
        c.sendall(c.recv(100))
        c.close()
def udp_echo():
    while True:
        d, a = us.recvfrom(65536)
        us.sendto(b"echo:" + d, a)
threading.Thread(target=tcp_echo, daemon=True).start()
threading.Thread(target=udp_echo, daemon=True).start()
def greet():
    s = socket.create_connection(("::1", sport), timeout=5)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    return s
def talk(s, ok):
    if not ok:
        return None
    s.sendall(b"ping")
    return s.recv(100).decode()
out = {}
for name in sys.argv[3:]:
    n = name.encode()
    s = greet()
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(n)]) + n + struct.pack("!H", eport))
    rep = s.recv(4)
    s.recv(16 if rep[3] == 4 else 4)
    s.recv(2)
    body = talk(s, rep[1] == 0)
    s.close()
    s4 = socket.create_connection(("::1", sport), timeout=5)
    s4.sendall(b"\x04\x01" + struct.pack("!H", eport) + b"\0\0\0\x01\0" + n + b"\0")
    rep4 = s4.recv(8)
    body4 = talk(s4, rep4[1] == 90)
    s4.close()
    t = greet()
    t.sendall(b"\x05\x03\x00\x04" + bytes(18))
    r = t.recv(22)
    relay = (socket.inet_ntop(socket.AF_INET6, r[4:20]), struct.unpack("!H", r[20:22])[0])
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.bind(("::1", 0))
    u.settimeout(1)
    u.sendto(b"\0\0\0\x03" + bytes([len(n)]) + n + struct.pack("!H", eport) + b"dgram", relay)
    try:
        d = u.recv(65536)
        udp = d[4 + 16 + 2:].decode() if d[3] == 4 else d.decode(errors="replace")
    except socket.timeout:
        udp = None
    t.close()
    out[name] = [rep[1], rep4[1], body if body == body4 else [body, body4], udp]
print(json.dumps(out))
"""


def test_bracketed_ipv6_address_as_a_name_is_the_address(netns, ns_etc, ns_capd, ns_python, tmp_path):
    """Regression: a SOCKS5 (ATYP 3) or SOCKS4a request, or a SOCKS5 UDP datagram, naming
    the target "[::1]", an IPv6 address in brackets as a client passing a URL's host on as
    typed sends it (java.net.URL.getHost() keeps them), went to the DNS as the name "[::1]"
    and failed with 0x04 / 91 (the datagram was dropped). It is now the address ::1, with no
    question to the resolver; any other name with brackets is refused at once, also unasked.
    In a namespace whose resolver (a loopback logger) says no to everything."""
    with open(f"{ns_etc}/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n")
    with open(f"{ns_etc}/resolv.conf", "w") as f:
        f.write("nameserver 127.0.0.1\n")
    asked = tmp_path / "asked"
    asked.write_text("")
    ns_python(netns, NS_DNS_LOG, asked)
    c = ns_capd(netns, "[socks s]\nlisten = [::1]:7701\nsocks4 = yes\n")
    r = sh("ip", "netns", "exec", netns, "/usr/bin/python3", "-c", NS_S5_BRACKETS, 7701, 7700,
           "[::1]", "[0:0::1]", "[nope.test]", "[::1")
    got = json.loads(r.stdout)
    assert got == {"[::1]": [0, 90, "ping", "echo:dgram"], "[0:0::1]": [0, 90, "ping", "echo:dgram"],
                   "[nope.test]": [4, 91, None, None], "[::1": [4, 91, None, None]}, got
    assert asked.read_text() == "", asked.read_text()
    ss = c.wait_sessions(lambda ss: sum(s["state"] == "closed" and s["proto"] != "udp" for s in ss) >= 12)
    assert sum(s.get("target") == "[::1]:7700" for s in ss if s["proto"] != "udp") == 4, ss
    assert sum(s.get("reason") == "socks5: bad request: bad host name" for s in ss) == 2, ss


# An echo server on [::]:PORT, one connection at a time, and a UDP one ("echo:" first) on
# the same port; "ready" once they listen.
NS_ECHO6 = r"""
import socket, sys, threading
s = socket.socket(socket.AF_INET6)
s.bind(("::", int(sys.argv[1])))
s.listen(8)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.bind(("::", int(sys.argv[1])))
def udp():
    while True:
        d, a = u.recvfrom(65536)
        u.sendto(b"echo:" + d, a)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(c.recv(100))
    c.close()
"""

# A SOCKS5 client: per argument PROXY (an IPv6 address, maybe with %zone), a CONNECT
# (ATYP 4) to TARGET:PORT through [PROXY]:SPORT and a "ping", then a UDP association and a
# datagram "dgram" to TARGET:PORT; prints {PROXY: [rep, echo, UDP reply or null]}.
NS_S5_LINK = r"""
import json, socket, struct, sys
sport, target, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
out = {}
for proxy in sys.argv[4:]:
    s = socket.create_connection((proxy, sport), timeout=5)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, target) + struct.pack("!H", port))
    rep = s.recv(22)
    body = None
    if rep[1] == 0:
        s.sendall(b"ping")
        body = s.recv(100).decode()
    s.close()
    t = socket.create_connection((proxy, sport), timeout=5)
    t.sendall(b"\x05\x01\x00")
    assert t.recv(2) == b"\x05\x00"
    t.sendall(b"\x05\x03\x00\x04" + bytes(18))
    r = t.recv(22)
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.settimeout(1)
    relay = socket.getaddrinfo(proxy, struct.unpack("!H", r[20:22])[0], socket.AF_INET6, socket.SOCK_DGRAM)[0][4]
    u.sendto(b"\0\0\0\x04" + socket.inet_pton(socket.AF_INET6, target) + struct.pack("!H", port) + b"dgram", relay)
    try:
        udp = u.recv(65536)[22:].decode()
    except socket.timeout:
        udp = None
    t.close()
    out[proxy] = [rep[1], body, udp]
print(json.dumps(out))
"""


# An HTTP proxy client: per argument PROXY, a CONNECT to [TARGET]:PORT through [PROXY]:HPORT
# and a "ping"; prints {PROXY: [status line, echo]}.
NS_HTTP_LINK = r"""
import json, socket, sys
hport, target, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
out = {}
for proxy in sys.argv[4:]:
    s = socket.create_connection((proxy, hport), timeout=5)
    s.sendall(f"CONNECT [{target}]:{port} HTTP/1.1\r\nHost: [{target}]:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        d = s.recv(1000)
        if not d:
            break
        head += d
    body = None
    if head.startswith(b"HTTP/1.1 200"):
        s.sendall(b"ping")
        body = s.recv(100).decode()
    s.close()
    out[proxy] = [head.split(b"\r\n")[0].decode(), body]
print(json.dumps(out))
"""


def test_link_local_target_takes_the_clients_link(netns, ns_capd, ns_python):
    """Regression: a CONNECT to a link-local IPv6 target (ATYP 4 fe80::b: SOCKS has no
    room for an interface, and curl --socks5 drops the %zone of http://[fe80::b%25eth0]/)
    failed with 0x01, "connect to [fe80::b]:P: Invalid argument", as did an HTTP proxy's
    CONNECT [fe80::b]:P (502). A client that came over a link-local address now reaches the
    target on its own link; one that came otherwise gets 0x03 (502) and a reason that says
    why. (A UDP datagram to fe80::b got through before too: the kernel picks the link.)
    Two namespaces joined by a veth pair with fe80::a / fe80::b and fd00:cafe::1 / ::2
    (their own ULA) on it."""
    peer = f"{netns}p"
    sh("ip", "netns", "add", peer)
    try:
        sh("ip", "-n", peer, "link", "set", "lo", "up")
        sh("ip", "link", "add", "v6a", "netns", netns, "type", "veth", "peer", "name", "v6b", "netns", peer)
        for ns, dev, ll, ula in ((netns, "v6a", "fe80::a", "fd00:cafe::1"), (peer, "v6b", "fe80::b", "fd00:cafe::2")):
            sh("ip", "-n", ns, "addr", "add", f"{ll}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "addr", "add", f"{ula}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        ns_python(peer, NS_ECHO6, 7700)
        c = ns_capd(netns, "[socks s]\nlisten = [::]:7701\nexpose = yes\n"
                           "[http h]\nlisten = [::]:7702\nexpose = yes\nconnect_ports = 7700\n")
        r = sh("ip", "netns", "exec", peer, "/usr/bin/python3", "-c", NS_S5_LINK, 7701, "fe80::b", 7700,
               "fe80::a%v6b", "fd00:cafe::1")
        assert json.loads(r.stdout) == {"fe80::a%v6b": [0, "ping", "echo:dgram"], "fd00:cafe::1": [3, None, "echo:dgram"]}, \
            (r.stdout, c.log()[-2000:])
        r = sh("ip", "netns", "exec", peer, "/usr/bin/python3", "-c", NS_HTTP_LINK, 7702, "fe80::b", 7700,
               "fe80::a%v6b", "fd00:cafe::1")
        got = json.loads(r.stdout)
        assert got["fe80::a%v6b"] == ["HTTP/1.1 200 Connection Established", "ping"], got
        assert got["fd00:cafe::1"][0].startswith("HTTP/1.1 502"), got
        ss = c.wait_sessions(lambda ss: sum(s["state"] == "closed" and s["proto"] != "udp" for s in ss) == 6)
        ss.sort(key=lambda s: s["id"])  # listed open first, then by when they ended
        tcp = [s for s in ss if s["proto"] in ("socks5", "connect") and "associate" not in s.get("note", "")]
        assert [s["target"] for s in tcp] == ["[fe80::b%v6a]:7700", "[fe80::b]:7700"] * 2, ss
        why = "link-local target [fe80::b]:7700 names no interface: reach capd over a link-local address of its link"
        assert tcp[1]["reason"] == why and why in tcp[3]["reason"], ss
    finally:
        subprocess.run(["ip", "netns", "del", peer], capture_output=True)


def test_long_reason_is_kept_whole_in_sessions(capd):
    """`capctl sessions` cut a closed session's reason at 159 bytes (a fixed buffer in
    its history record), where the log kept it whole: a long TLS reason lost the
    OpenSSL words at its end. A refused SOCKS5 user of 200 bytes makes a reason as
    long; capctl now shows what the log says."""
    port = free_port()
    capd.ctl("add", "socks", "--port", port, "--auth", "alice:pw", "--name", "longwhy")
    user = b"u" * 199 + b"Z"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"\x05\x01\x02")
        assert c.recv(2) == b"\x05\x02"
        c.sendall(b"\x01" + bytes([len(user)]) + user + b"\x02pw")
        assert c.recv(2) == b"\x01\x01"
    ss = capd.wait_sessions(lambda ss: any(s["state"] == "closed" for s in ss))
    why = f"socks5: auth failed for user {user.decode()}"
    assert [s["reason"] for s in ss] == [why], ss
    assert why in capd.log()


def test_reload_reads_a_changed_users_file(capd_factory, http_server, tmp_path):
    """Regression: a reload (SIGHUP here, as systemctl reload sends) did not read the
    users file again when the config's text was unchanged, so a password changed or a
    user added in the file was refused until a restart. A file that reads otherwise
    now restarts the instance, as a changed key does; one that became bad fails the
    reload with its file and line, and the users in force stay."""
    hport, _ = http_server
    port = free_port()
    users = tmp_path / "users"
    users.write_text("bob:old\n")
    capd = capd_factory(f"[socks lab]\nlisten = 127.0.0.1:{port}\nusers = {users}\n")
    url = f"http://127.0.0.1:{hport}/"

    def ok(cred):
        return curl("--socks5", f"127.0.0.1:{port}", "--proxy-user", cred, url).returncode == 0

    def hup(n):
        capd.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while capd.log().count(f"reloaded {capd.conf_path}") < n:
            assert time.time() < deadline, capd.log()[-2000:]
            time.sleep(0.02)

    assert ok("bob:old")
    users.write_text("bob:new\neve:pw\n")
    hup(1)
    assert ok("bob:new") and ok("eve:pw") and not ok("bob:old")
    assert f"instance lab removed: changed by reload: {users} changed" in capd.log()
    assert capd.ctl("list", json_out=True)[0]["users"] == 2
    users.write_text("bob:new\nnocolon\n")
    r = capd.ctl("reload", check=False)
    assert r.returncode == 1 and f"{users}:2: expected name:password" in r.stderr, r.stderr
    assert ok("bob:new") and ok("eve:pw")


# An HTTP origin on PORT (argv[1]) of 127.0.0.0/8 and ::1 (one socket for both) whose body
# is the address the client reached: the start of the namespace scripts below.
NS_ADDR_ORIGIN = r"""
import http.server, socket, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.connection.getsockname()[0].removeprefix("::ffff:").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
s = S(("::", int(sys.argv[1])), H)
threading.Thread(target=s.serve_forever, daemon=True).start()
"""


# NS_ADDR_ORIGIN in a namespace, and a nameserver on 127.0.0.1:53 that prints each name it
# is asked (and answers REFUSED); "ready" once both listen.
NS_LOCALHOST_WORLD = NS_ADDR_ORIGIN + r"""
import dns.message, dns.rcode
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 53))
print("ready", flush=True)
while True:
    data, peer = u.recvfrom(65535)
    q = dns.message.from_wire(data)
    print(q.question[0].name.to_text(omit_final_dot=True), flush=True)
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.REFUSED)
    u.sendto(r.to_wire(), peer)
"""


def test_localhost_names_are_loopback_without_a_dns_query(netns, ns_etc, ns_capd, ns_python):
    """RFC 6761 6.3: "localhost" and every name below it are the loopback, and a resolver
    must not ask the DNS (curl, the browsers and systemd-resolved answer them themselves).
    capd's resolver sent app.localhost to the nameserver: a query left the box and the
    client got host unreachable. Now, for every user of the resolver (a SOCKS5 name, an
    HTTP proxy's URL and CONNECT, forward's and reverse's upstream), such a name gets the
    hosts file's line for itself, else localhost's, else 127.0.0.1 and ::1, and the
    namespace's nameserver hears nothing of it."""
    with open(f"{ns_etc}/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n::1 localhost\n127.0.0.5 own.localhost\n")
    with open(f"{ns_etc}/resolv.conf", "w") as f:
        f.write("nameserver 127.0.0.1\n")  # the watcher: the namespace's only resolver
    world = ns_python(netns, NS_LOCALHOST_WORLD, 7790)
    c = ns_capd(netns, "[socks s]\nlisten = 127.0.0.1:7791\n"
                       "[http h]\nlisten = 127.0.0.1:7792\nconnect_ports = 7790\n"
                       "[forward f]\nlisten = 127.0.0.1:7793\nto = Svc.LOCALHOST:7790\n"
                       "[reverse r]\nlisten = 127.0.0.1:7794\ndefault = web.localhost.:7790\n")

    def curl(*args):
        r = sh("ip", "netns", "exec", netns, "curl", "-sS", "--max-time", "10", *args, check=False)
        return r.stdout or r.stderr.strip()

    socks = ("--socks5-hostname", "127.0.0.1:7791")
    assert curl(*socks, "http://app.localhost:7790/") == "127.0.0.1"
    assert curl("-x", "http://127.0.0.1:7792", "http://A.b.LocalHost:7790/") == "127.0.0.1"
    assert curl("-p", "-x", "http://127.0.0.1:7792", "http://tunnel.localhost:7790/") == "127.0.0.1"
    assert curl("http://127.0.0.1:7793/") == "127.0.0.1"
    assert curl("http://127.0.0.1:7794/") == "127.0.0.1"
    assert curl(*socks, "http://own.localhost:7790/") == "127.0.0.5"  # the name's own line
    with open(f"{ns_etc}/hosts", "w") as f:  # the same file (inode) the namespace sees
        f.write("::1 localhost\n")
    assert curl(*socks, "http://app.localhost:7790/") == "::1"  # what the hosts file says
    with open(f"{ns_etc}/hosts", "w") as f:
        f.write("# no localhost\n")
    assert curl(*socks, "http://app.localhost:7790/") == "127.0.0.1"  # 127.0.0.1 and ::1, v4 first
    # a name the nameserver is asked for last: what came before it is all capd asked
    sh("ip", "netns", "exec", netns, "dig", "@127.0.0.1", "+tries=1", "+time=2", "last.test", check=False)
    asked = []
    while not asked or asked[-1] != "last.test":
        assert select.select([world.stdout], [], [], 5)[0], asked
        line = world.stdout.readline()
        assert line, asked
        asked.append(line.strip())
    assert asked == ["last.test"], asked
    targets = {s["target"] for s in c.ctl("sessions", json_out=True)}
    assert {"127.0.0.1:7790", "127.0.0.5:7790", "[::1]:7790"} <= targets, targets


# Two nameservers, 127.0.0.1:53 ("1") and 127.0.0.2:53 ("2"): every A question gets
# 127.0.0.11 from the first and 127.0.0.12 from the second, AAAA none; the first holds
# its answers to slow.* back 1.5 s. Each query is printed as "SERVER TYPE NAME". Beside
# them NS_ADDR_ORIGIN on port argv[1].
NS_TWO_RESOLVERS = NS_ADDR_ORIGIN + r"""
import dns.message, dns.rdatatype, dns.rrset
lock = threading.Lock()
def serve(n):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((f"127.0.0.{n}", 53))
    while True:
        data, peer = u.recvfrom(65535)
        q = dns.message.from_wire(data)
        name = q.question[0].name.to_text(omit_final_dot=True)
        with lock:
            print(n, dns.rdatatype.to_text(q.question[0].rdtype), name, flush=True)
        r = dns.message.make_response(q)
        if q.question[0].rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", "A", f"127.0.0.1{n}"))
        if n == 1 and name.startswith("slow."):
            threading.Timer(1.5, u.sendto, (r.to_wire(), peer)).start()
        else:
            u.sendto(r.to_wire(), peer)
for n in (1, 2):
    threading.Thread(target=serve, args=(n,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def test_resolv_conf_change_is_followed(netns, ns_etc, ns_capd, ns_python):
    """Regression: capd read /etc/resolv.conf once, at start, and asked its nameservers for
    every name until it was restarted, after DHCP, NetworkManager or an analyst had moved the
    box to other ones (glibc's getaddrinfo notices a changed file at its next call). Now a
    name resolved a second or more after the last look finds a changed file and goes to its
    new nameservers; a name asked of the old ones still gets their answer, and their
    channel is closed once it has."""
    with open(f"{ns_etc}/resolv.conf", "w") as f:
        f.write("nameserver 127.0.0.1\n")
    world = ns_python(netns, NS_TWO_RESOLVERS, 7795)
    c = ns_capd(netns, "[socks s]\nlisten = 127.0.0.1:7796\n", settings="workers = 1\n")

    def curl(*args):
        return sh("ip", "netns", "exec", netns, "curl", "-sS", "--max-time", "10",
                  "--socks5-hostname", "127.0.0.1:7796", *args, check=False)

    # os.read, not readline: select() does not see what a file object buffered
    unread = [""]

    def asked_until(last):
        """The whole lines the world printed up to last, which is the last of them."""
        while True:
            *lines, rest = unread[0].split("\n")
            if last in lines:
                i = lines.index(last) + 1
                unread[0] = "\n".join(lines[i:] + [rest])
                return lines[:i]
            assert select.select([world.stdout], [], [], 5)[0], lines
            unread[0] += os.read(world.stdout.fileno(), 65536).decode()

    assert curl("http://app.test:7795/").stdout == "127.0.0.11"
    slow = subprocess.Popen(["ip", "netns", "exec", netns, "curl", "-sS", "--max-time", "10",
                             "--socks5-hostname", "127.0.0.1:7796", "http://slow.test:7795/"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    asked_until("1 A slow.test")  # in flight at the first nameserver
    looked = time.time()
    with open(f"{ns_etc}/resolv.conf", "w") as f:  # in place: the file the namespace sees
        f.write("# moved\nnameserver 127.0.0.2\n")
    time.sleep(max(0, looked + 1.2 - time.time()))  # a second since capd last looked
    r = curl("http://app.test:7795/")
    assert r.stdout == "127.0.0.12", r.stderr
    out, err = slow.communicate(timeout=15)
    assert out == "127.0.0.11", err  # the old nameserver's answer still counted
    log = c.log()
    assert "/etc/resolv.conf changed: names are asked of 127.0.0.2 from now on" in log, log
    assert "resolver: the last answer of the nameservers before is in: their channel is closed" in log, log
    sh("ip", "netns", "exec", netns, "dig", "@127.0.0.1", "+tries=1", "+time=2", "last.test", check=False)
    later = asked_until("1 A last.test")  # all the nameservers heard after the change
    assert "2 A app.test" in later and not [x for x in later if x.startswith("1 ") and "app.test" in x], later


# ---------------------------------------------------------------- refusals in the capture

def socks_decoded(f, port):
    """tshark's SOCKS dissector over refused_flow f (capd's port decoded as SOCKS, as
    it is on 1080): one line a packet it decoded, the fields that tell the steps."""
    r = tshark("-r", f["pcap"], "-d", f"tcp.port=={port},socks", "-Y", f"socks && tcp.port=={port}",
               "-T", "fields", "-E", "separator=|", "-e", "socks.version", "-e", "socks.auth_method",
               "-e", "socks.auth_accepted_method",
               "-e", "socks.username", "-e", "socks.password", "-e", "socks.auth_status", "-e", "socks.results",
               "-e", "socks.command", "-e", "socks.dstport", "-e", "_ws.expert")
    assert r.returncode == 0, r.stderr
    return [line.split("|")[:9] for line in r.stdout.splitlines()]


def test_socks5_auth_failure_is_captured(capd, http_server):
    """curl --socks5 with a wrong password failed, and the capture held nothing of it.
    Now the refused handshake is there as it went, between curl's port and the
    instance's address: curl's greeting, capd's choice of username/password, curl's
    credentials, capd's failure status; then capd's FIN and curl's. tshark's SOCKS
    dissector reads it step by step."""
    hport, _ = http_server
    port = add_socks(capd, "--auth", "bob:s3cret")
    r = curl("--socks5", f"127.0.0.1:{port}", "--proxy-user", "bob:wrong", f"http://127.0.0.1:{hport}/")
    assert r.returncode != 0
    s = last_session(capd, lambda s: "auth failed" in s.get("reason", ""))
    f = refused_flow(capd, s, 2)
    assert (f["client"], f["server"]) == (s["client"], f"127.0.0.1:{port}"), f
    greeting = f["up"][:2 + f["up"][1]]
    assert greeting[0] == 5 and 2 in greeting[2:], f
    assert f["up"] == greeting + b"\x01\x03bob\x05wrong" and f["down"] == b"\x05\x02\x01\x01", f
    assert f["ends"] == [("s", "FIN"), ("c", "FIN")], f
    # version, methods, method chosen, user, password, auth status
    assert [x[:6] for x in socks_decoded(f, port)] == [
        ["5", ",".join(str(m) for m in greeting[2:]), "", "", "", ""], ["5", "", "2", "", "", ""],
        ["5", "", "", "bob", "wrong", ""], ["5", "", "", "", "", "1"]], socks_decoded(f, port)


def test_socks4_refusal_is_captured(capd, http_server):
    """curl --socks4 to an instance whose users SOCKS4 cannot give: the capture has
    curl's request and capd's 0x5B reply, which tshark decodes as SOCKS4."""
    hport, _ = http_server
    port = add_socks(capd, "--auth", "bob:s3cret")
    r = curl("--socks4", f"127.0.0.1:{port}", f"http://127.0.0.1:{hport}/")
    assert r.returncode != 0
    s = last_session(capd, lambda s: s["proto"] == "socks4")
    f = refused_flow(capd, s, 2)
    assert f["server"] == f"127.0.0.1:{port}" and f["client"] == s["client"], f
    assert f["up"] == b"\x04\x01" + struct.pack(">H", hport) + socket.inet_aton("127.0.0.1") + b"\x00", f
    assert f["down"] == b"\x00\x5b" + bytes(6), f
    # version, results, command, port
    assert [[x[0]] + x[6:] for x in socks_decoded(f, port)] == [["4", "", "1", str(hport)], ["0", "91", "", "0"]]


def test_socks5_refused_request_is_captured(capd):
    """A SOCKS5 request capd refuses (a command it does not serve) after the method
    choice: greeting, method, request, the 0x07 reply, in the capture in that order."""
    port = add_socks(capd)
    s = s5_open(port)
    req = b"\x05\x09\x00" + s5_addr("127.0.0.1", 9)
    s.sendall(req)
    reply = recv_all(s)
    s.close()
    assert reply[:2] == b"\x05\x07", reply
    ss = last_session(capd, lambda x: "not supported" in x.get("reason", ""))
    f = refused_flow(capd, ss, 2)
    assert f["up"] == b"\x05\x01\x00" + req and f["down"] == b"\x05\x00" + reply, f
    r = tshark("-r", f["pcap"], "-Y", f"tcp.len > 0 && tcp.port == {port}", "-T", "fields", "-e", "tcp.payload")
    assert r.stdout.split() == ["050100", "0500", req.hex(), reply.hex()], r.stdout


@pytest.mark.parametrize("end", ["timeout", "rst"])
def test_unfinished_socks5_handshake_is_captured(capd, end):
    """A SOCKS5 handshake that ended with no reply of capd's (handshake_timeout, or
    the client's reset halfway through its request) was in no capture. It is now
    there as far as it went, between the client and the instance's address: the
    greeting, capd's method choice, what came of the request; then capd's FIN at the
    timeout, or the client's RST."""
    port = add_socks(capd, "--handshake-timeout", "1s")
    greeting, part = b"\x05\x01\x00", b"\x05\x01\x00\x01\x7f\x00"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        me = "%s:%d" % c.getsockname()
        c.sendall(greeting)
        assert recv_exact(c, 2) == b"\x05\x00"
        if end == "timeout":
            assert c.recv(100) == b""
        else:
            c.sendall(part)
            time.sleep(0.2)  # read by capd before the reset
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s = last_session(capd)
    f = refused_flow(capd, s, 1)
    assert (f["client"], f["server"]) == (me, f"127.0.0.1:{port}"), f
    want = [("s", "FIN")] if end == "timeout" else [("c", "RST")]
    assert f["up"] == greeting + (part if end == "rst" else b"") and f["down"] == b"\x05\x00", f
    assert f["ends"] == want, (f, s)
