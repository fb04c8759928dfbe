"""Issue 4: UDP forwarding (`forward` with `udp = yes`), the datagram relay
shared with SOCKS5 UDP ASSOCIATE: one UDP session per client address,
both directions captured as UDP, ended by idle_timeout."""

import os
import socket
import subprocess
import time

import pytest

from conftest import sigstop, UdpEcho, UdpServer, check_pcap_clean, free_port_tcp_udp, tshark


@pytest.fixture
def udp_echo():
    e = UdpEcho()
    yield e
    e.close()




def udp_client(host="127.0.0.1"):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    u = socket.socket(fam, socket.SOCK_DGRAM)
    u.bind((host, 0))
    u.settimeout(5)
    return u


def test_forward_udp_both_ways(capd, udp_echo):
    port = free_port_tcp_udp()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{udp_echo.port}", "--udp")
    inst = capd.ctl("list", json_out=True)[0]
    assert inst["udp"] is True
    a, b = udp_client(), udp_client()
    sent = {a: [], b: []}
    for i in range(5):
        for u in (a, b):
            m = f"{u.getsockname()[1]}-{i}-".encode() + os.urandom(100 * i)
            u.sendto(m, ("127.0.0.1", port))
            d, src = u.recvfrom(70000)
            assert d == b"echo:" + m
            assert src == ("127.0.0.1", port)
            sent[u].append(m)
    ss = capd.wait_sessions(lambda ss: len([s for s in ss if s["proto"] == "udp"]) == 2)
    for u in (a, b):
        s = [s for s in ss if s["client"] == f"127.0.0.1:{u.getsockname()[1]}"][0]
        assert s["target"] == f"127.0.0.1:{udp_echo.port}"
        assert s["instance"] == f"forward-{port}"
        assert s["bytes_up"] == sum(map(len, sent[u]))
        assert s["bytes_down"] == sum(len(m) + 5 for m in sent[u])
        assert s["state"] == "open"

    # TCP still forwards on the same port (to the same host:port, nothing listens: closed)
    capd.flush()
    if not capd.pcaps():
        pytest.skip("spool writes no pcapng yet")

    def captured():
        rows = []
        for p in capd.pcaps():
            r = tshark("-r", p, "-Y", f"udp.port == {udp_echo.port}", "-T", "fields", "-e", "udp.srcport",
                       "-e", "udp.dstport", "-e", "udp.payload")
            rows += [l.split("\t") for l in r.stdout.splitlines() if l.strip()]
        return rows

    # a datagram is captured once sent: the last echo may reach the spool a moment after us
    capd.flush_until(lambda: len(captured()) >= 2 * (len(sent[a]) + len(sent[b])))
    rows = captured()
    up = [bytes.fromhex(r[2]) for r in rows if r[1] == str(udp_echo.port)]
    down = [bytes.fromhex(r[2]) for r in rows if r[0] == str(udp_echo.port)]
    assert sorted(up) == sorted(sent[a] + sent[b])
    assert sorted(down) == sorted(b"echo:" + m for m in sent[a] + sent[b])
    # the client endpoints are the real ones
    assert {r[0] for r in rows if r[1] == str(udp_echo.port)} == {str(a.getsockname()[1]), str(b.getsockname()[1])}



def test_empty_datagrams_are_captured(capd):
    """An empty datagram crosses like any other and is captured as one."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent.settimeout(5)
    sport = silent.getsockname()[1]
    port = free_port_tcp_udp()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{sport}", "--udp")
    u = udp_client()
    for m in (b"", b"four", b""):
        u.sendto(m, ("127.0.0.1", port))
        assert silent.recvfrom(100)[0] == m
    silent.close()

    def lengths():
        lens = []
        for p in capd.pcaps():
            r = tshark("-r", p, "-Y", f"udp.port == {sport}", "-T", "fields", "-e", "udp.length")
            lens += [int(x) for x in r.stdout.split()]
        return lens

    capd.flush_until(lambda: len(lengths()) >= 3)
    lens = lengths()
    assert lens == [8, 12, 8], lens


def test_forward_udp_idle_timeout(capd, udp_echo):
    port = free_port_tcp_udp()
    capd.ctl("add", "forward", "--port", port, "--to", f"localhost:{udp_echo.port}", "--udp",
             "--idle-timeout", "300ms")
    u = udp_client()
    u.sendto(b"hi", ("127.0.0.1", port))
    assert u.recv(100) == b"echo:hi"
    ss = capd.wait_sessions(lambda ss: ss and ss[-1]["state"] == "closed", timeout=6)
    assert ss[-1]["reason"] == "idle timeout"
    # the same client comes back: a new session
    u.sendto(b"again", ("127.0.0.1", port))
    assert u.recv(100) == b"echo:again"
    ss = capd.wait_sessions(lambda ss: len(ss) == 2)
    assert ss[-1]["id"] != ss[0]["id"]


def test_forward_udp_ipv6_and_kill(capd):
    e6 = UdpEcho("::1")
    try:
        port = free_port_tcp_udp("::1")
        capd.ctl("add", "forward", "--port", port, "--bind", "::1", "--to", f"[::1]:{e6.port}", "--udp")
        u = udp_client("::1")
        u.sendto(b"six", ("::1", port))
        assert u.recv(100) == b"echo:six"
        ss = capd.wait_sessions(lambda ss: len(ss) == 1)
        assert ss[0]["client"].startswith("[::1]:") and ss[0]["target"] == f"[::1]:{e6.port}"
        # capctl kill ends the session; the next datagram starts a new one
        capd.ctl("kill", ss[0]["id"])
        capd.wait_sessions(lambda ss: ss[0]["state"] == "closed")
        u.sendto(b"more", ("::1", port))
        assert u.recv(100) == b"echo:more"
        capd.wait_sessions(lambda ss: len(ss) == 2 and ss[-1]["state"] == "open")
        # removing the instance ends its datagram sessions
        capd.ctl("remove", f"forward-{port}")
        capd.wait_sessions(lambda ss: all(s["state"] == "closed" for s in ss))
    finally:
        e6.close()


def test_forward_udp_ipv6_largest_datagram_captured_whole(capd):
    """IPv6 carries UDP payloads up to 65527 bytes (IPv4 65507). They crossed the relay
    whole, but the capture cut every IPv6 datagram past 65487 bytes (where its one
    synthetic packet would pass 65535 bytes) to 65487, with a comment saying so. Such a
    datagram is now captured as the two IPv6 fragments loopback itself makes of it, and
    tshark reassembles the whole payload both ways."""
    n = 65527
    target = UdpServer(lambda d: d[::-1], "::1")  # the reply as long as the request
    try:
        port = free_port_tcp_udp("::1")
        capd.ctl("add", "forward", "--port", port, "--bind", "::1", "--to", f"[::1]:{target.port}", "--udp")
        u = udp_client("::1")
        m = os.urandom(n)
        u.sendto(m, ("::1", port))
        assert u.recv(70000) == m[::-1]
        ss = capd.wait_sessions(lambda ss: ss and ss[0]["bytes_down"] == n)
        assert ss[0]["bytes_up"] == n
        u.close()
    finally:
        target.close()
    assert capd.stop() == 0  # flushes the capture
    payloads = []
    for p in capd.pcaps():
        r = tshark("-r", p, "-d", "udp.port==1-65535,data", "-Y", "udp", "-T", "fields", "-e", "udp.length",
                   "-e", "udp.payload")
        assert r.returncode == 0, r.stderr
        payloads += [(int(f[0]), bytes.fromhex(f[1])) for f in (l.split("\t") for l in r.stdout.splitlines())]
        check_pcap_clean(p)
    assert payloads == [(8 + n, m), (8 + n, m[::-1])], [(l, len(d)) for l, d in payloads]


def test_forward_udp_port_in_use_fails(capd):
    port = free_port_tcp_udp()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        r = capd.ctl("add", "forward", "--port", port, "--to", "127.0.0.1:9", "--udp", check=False)
        assert r.returncode == 1
        assert "udp" in r.stderr
    assert capd.ctl("list", json_out=True) == []


def test_forward_udp_many_clients(capd, udp_echo):
    """Each client address is its own association (hashed lookup), replies go to the right one."""
    port = free_port_tcp_udp()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{udp_echo.port}", "--udp")
    clients = [udp_client() for _ in range(40)]
    for rnd in range(2):
        for i, u in enumerate(clients):
            u.sendto(f"c{i} r{rnd}".encode(), ("127.0.0.1", port))
        for i, u in enumerate(clients):
            assert u.recv(100) == f"echo:c{i} r{rnd}".encode()
    ss = capd.wait_sessions(lambda ss: len(ss) == 40)
    by_client = {s["client"]: s for s in ss}
    assert len(by_client) == 40
    for i, u in enumerate(clients):
        s = by_client[f"127.0.0.1:{u.getsockname()[1]}"]
        assert s["bytes_up"] == 2 * len(f"c{i} r0")
        assert s["bytes_down"] == 2 * len(f"echo:c{i} r0")
    for u in clients:
        u.close()


# A SOCKS5 client whose UDP socket is connect()ed to the relay address the reply named
# (as PySocks does); argv: proxy host, proxy port, echo port. Prints what came back or "timeout".
NS_CONNECTED_UDP_CLIENT = r"""
import socket, struct, sys, threading
host, port, echo = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.bind(("127.0.0.1", echo))
def serve():
    d, a = srv.recvfrom(65536)
    srv.sendto(d, a)
threading.Thread(target=serve, daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 0))
t = socket.create_connection((host, port), timeout=5)
t.sendall(b"\x05\x01\x00")
assert t.recv(2) == b"\x05\x00"
t.sendall(b"\x05\x03\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", u.getsockname()[1]))
rep = t.recv(10)
assert rep[1] == 0, rep
bnd = (socket.inet_ntoa(rep[4:8]), struct.unpack("!H", rep[8:10])[0])
u.connect(bnd)
u.settimeout(3)
u.send(b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", echo) + b"ping")
try:
    d = u.recv(65536)
    print(bnd[0], d[10:].decode())
except socket.timeout:
    print(bnd[0], "timeout")
"""


def test_wildcard_relay_answers_from_the_address_the_client_used(netns, ns_capd):
    """A relay listening on every address sent replies from whatever address the route
    picked (127.0.0.1 here), and a client that connect()ed its UDP socket to the address
    it was told (127.0.0.2) dropped them. Each datagram's destination is now the
    reply's source (IP_PKTINFO)."""
    ns_capd(netns, "[socks s]\nlisten = *:7711\nexpose = yes\n")
    r = subprocess.run(["ip", "netns", "exec", netns, "/usr/bin/python3", "-c", NS_CONNECTED_UDP_CLIENT,
                        "127.0.0.2", "7711", "7712"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["127.0.0.2", "ping"], r.stdout


# A UDP echo server on ADDR PORT (argv), for a namespace the test process is not in.
NS_UDP_ECHO = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    d, a = u.recvfrom(70000)
    u.sendto(b"echo:" + d, a)
"""

# Connected UDP clients (as dig and nc -u): each takes only replies from where it sent.
NS_UDP_CLIENTS = r"""
import socket, sys
for dst in sys.argv[2:]:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(2)
    c.connect((dst, int(sys.argv[1])))
    c.send(b"to " + dst.encode())
    try:
        print(dst, c.recv(100).decode().replace(" ", "_"))
    except OSError as e:
        print(dst, type(e).__name__)
"""


def test_forward_udp_on_a_wildcard_replies_from_the_address_written_to(netns, ns_python, ns_capd):
    """listen = 0.0.0.0 with udp = yes: replies left from the kernel's pick of
    source (127.0.0.1 for a client of 127.0.0.2, the primary address of a
    multi-homed box), so a connected client (dig, nc -u) never saw one. They now
    leave from the address the client sent to (IP_PKTINFO), as the dns instance's do."""
    tport, port = 61000 + os.getpid() % 2000, 63000 + os.getpid() % 2000
    ns_python(netns, NS_UDP_ECHO, "127.0.0.1", tport)
    c = ns_capd(netns, f"[forward any]\nlisten = 0.0.0.0:{port}\nexpose = yes\nudp = yes\n"
                       f"to = 127.0.0.1:{tport}\n")
    r = subprocess.run(["ip", "netns", "exec", netns, "/usr/bin/python3", "-c", NS_UDP_CLIENTS, str(port),
                        "127.0.0.1", "127.0.0.2", "127.0.0.3"], capture_output=True, text=True, timeout=30)
    got = dict(l.split() for l in r.stdout.splitlines())
    assert got == {a: f"echo:to_{a}" for a in ("127.0.0.1", "127.0.0.2", "127.0.0.3")}, c.log()[-2000:]


def test_forward_udp_target_that_does_not_resolve_is_logged(netns, ns_etc, ns_capd):
    """A forward's UDP target name that did not resolve left no trace above debug level:
    datagrams vanished and nothing said why. Now a warning, once per client."""
    with open(f"{ns_etc}/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n")
    with open(f"{ns_etc}/resolv.conf", "w") as f:
        f.write("nameserver 127.0.0.1\n")  # nothing listens there: the name fails
    c = ns_capd(netns, "[forward u]\nlisten = 127.0.0.1:7731\nudp = yes\nto = no-such-host.invalid:53\n")
    # one client (one socket): a datagram, and a second one once the first's name has failed
    send = "import socket, sys\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n" \
           "u.sendto(b'x', ('127.0.0.1', 7731))\nsys.stdin.readline()\nu.sendto(b'y', ('127.0.0.1', 7731))\n"
    p = subprocess.Popen(["ip", "netns", "exec", netns, "/usr/bin/python3", "-c", send], stdin=subprocess.PIPE)
    deadline = time.time() + 10
    while "u: udp: cannot resolve no-such-host.invalid" not in c.log() and time.time() < deadline:
        time.sleep(0.05)
    p.communicate(b"go\n", timeout=30)
    assert p.returncode == 0
    deadline = time.time() + 10
    while c.log().count("u: udp: cannot resolve no-such-host.invalid") < 2 and time.time() < deadline:
        time.sleep(0.1)
    log = c.log()
    assert log.count("u: udp: cannot resolve no-such-host.invalid") == 2, log[-2000:]
    assert log.count("datagrams dropped") == 1, log[-2000:]  # the warning; the next at debug


def test_stop_does_not_wait_for_udp_flows(capd, udp_echo):
    """SIGTERM gives open TCP sessions 2 s to finish; a UDP flow ends only at its
    idle timeout, so capd does not wait for it, and its datagrams are in the
    capture it flushes on the way out."""
    port = free_port_tcp_udp()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{udp_echo.port}", "--udp")
    u = udp_client()
    u.sendto(b"ping-at-stop", ("127.0.0.1", port))
    assert u.recvfrom(100)[0] == b"echo:ping-at-stop"
    capd.wait_sessions(lambda ss: any(s["proto"] == "udp" and s["state"] == "open" for s in ss))
    t = time.monotonic()
    assert capd.stop() == 0
    assert time.monotonic() - t < 1.0
    payloads = set()
    for p in capd.pcaps():
        r = tshark("-r", p, "-Y", "udp", "-T", "fields", "-e", "data.data")
        assert r.returncode == 0, r.stderr
        payloads |= {bytes.fromhex(x) for x in r.stdout.split()}
    assert payloads == {b"ping-at-stop", b"echo:ping-at-stop"}


@pytest.mark.parametrize("to", ["127.0.0.1", "0.0.0.0", "[::ffff:127.0.0.1]"])
def test_forward_udp_to_its_own_address_is_not_a_loop(capd, to):
    """`udp = yes` with `to` naming the instance's own port (127.0.0.1:PORT, or
    0.0.0.0:PORT, which the kernel sends to 127.0.0.1): the relay sent each datagram
    to itself, took it back as a new client's and sent it again, for ever: one
    datagram made 4096 associations and sessions, and kept capturing ~16000 packets
    a second until the instance was removed. It is now dropped, with one warning."""
    port = free_port_tcp_udp()
    name = f"forward-{port}"
    capd.ctl("add", "forward", "--port", port, "--to", f"{to}:{port}", "--udp")
    u = udp_client()
    u.sendto(b"round", ("127.0.0.1", port))
    u.sendto(b"again", ("127.0.0.1", port))
    deadline = time.time() + 5
    while "this instance's own address; datagrams dropped" not in capd.log() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    inst = capd.ctl("list", json_out=True)[0]
    assert inst["sessions"] == 0 and inst["bytes_up"] == 0, inst
    assert capd.ctl("sessions", json_out=True) == []
    log = capd.log()
    assert log.count(f"{name}: udp: target {to}:{port} is this instance's own address; datagrams dropped") == 1, \
        log[-2000:]


def test_forward_udp_loop_between_two_instances_is_dropped(capd, udp_echo):
    """`udp = yes` on a forwarding to b and b to a: only an instance's own address
    was caught, so one datagram went round a and b as a new client of each at every
    lap (one datagram: 1000 sessions and capd's 1024 descriptors in a second). The
    relay that would send it back to an instance it came through drops it, with one
    warning; a chain without a loop (c -> d -> echo) still answers."""
    a, b, c, d = (free_port_tcp_udp() for _ in range(4))
    capd.ctl("add", "forward", "--port", a, "--to", f"127.0.0.1:{b}", "--udp", "--name", "a")
    capd.ctl("add", "forward", "--port", b, "--to", f"127.0.0.1:{a}", "--udp", "--name", "b")
    capd.ctl("add", "forward", "--port", c, "--to", f"127.0.0.1:{d}", "--udp", "--name", "c")
    capd.ctl("add", "forward", "--port", d, "--to", f"127.0.0.1:{udp_echo.port}", "--udp", "--name", "e")
    u = udp_client()
    u.sendto(b"chained", ("127.0.0.1", c))
    assert u.recvfrom(100)[0] == b"echo:chained"
    u.sendto(b"round", ("127.0.0.1", a))
    u.sendto(b"again", ("127.0.0.1", a))
    deadline = time.time() + 5
    while "came through a already; dropped" not in capd.log() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    ss = [x for x in capd.ctl("sessions", json_out=True) if x["instance"] in ("a", "b")]
    assert len(ss) == 1 and ss[0]["instance"] == "a" and ss[0]["bytes_up"] == 10, ss
    assert capd.log().count(f"b: udp: a loop of capd instances: target 127.0.0.1:{a} is instance a's "
                            "address, and these datagrams came through a already; dropped") == 1, capd.log()[-2000:]


def test_forward_udp_to_a_name_shows_it(capd, udp_echo):
    """A forward whose `to` is a name: its TCP sessions show the name (target_name),
    its UDP sessions showed only the address, so `capctl sessions --json` could not
    tell what the datagrams were for. They now carry the name too."""
    port = free_port_tcp_udp()
    capd.ctl("add", "forward", "--port", port, "--to", f"localhost:{udp_echo.port}", "--udp")
    u = udp_client()
    u.sendto(b"x", ("127.0.0.1", port))
    assert u.recvfrom(100)[0] == b"echo:x"
    s = capd.wait_sessions(lambda ss: any(s["proto"] == "udp" for s in ss))[0]
    assert s["target"] == f"127.0.0.1:{udp_echo.port}", s
    assert s.get("target_name") == f"localhost:{udp_echo.port}", s


def test_forward_udp_spares_datagrams_sent_while_capd_was_held_up(capd, udp_echo):
    """Regression: a UDP association's idle_timeout was judged on the loop's clock,
    which stands still while capd is not scheduled (held up under load, or
    SIGSTOP), and after such a pause libev ran the expired timer before the read.
    A datagram sent while capd was stopped past idle_timeout (1 s) found its
    association ended as "idle timeout" and started a new one: one conversation
    became two sessions. The datagram that waited unread now counts."""
    import signal
    port = free_port_tcp_udp()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{udp_echo.port}", "--udp", "--idle-timeout", "1s")
    u = udp_client()
    u.sendto(b"one", ("127.0.0.1", port))
    assert u.recv(100) == b"echo:one"
    sigstop(capd.proc)
    try:
        u.sendto(b"two", ("127.0.0.1", port))
        time.sleep(1.3)
    finally:
        capd.proc.send_signal(signal.SIGCONT)
    assert u.recv(100) == b"echo:two"
    ss = [s for s in capd.ctl("sessions", json_out=True) if s["proto"] == "udp"]
    assert len(ss) == 1 and ss[0]["bytes_up"] == 6, ss
    # quiet from here: the association still ends at idle_timeout
    s = capd.wait_sessions(lambda ss: ss and all(s["state"] == "closed" for s in ss), timeout=10)[0]
    assert s["reason"] == "idle timeout", s
    u.close()


def test_forward_udp_burst_from_many_clients_while_capd_is_busy(capd, udp_echo):
    """Regression: 300 clients each sending one datagram at once to a forward with
    udp = yes (python sockets, 127.0.0.1-5) lost 61 of them: the relay's socket kept
    the kernel's default receive buffer (212992 bytes, some 250 small datagrams),
    so a burst that came while capd was busy making the clients' sessions was
    dropped unseen (ss -uam: d61 on capd's port), in the capture too, and those
    clients timed out. The socket now asks for 1 MiB, as the dns instance's does.
    Here capd is held (SIGSTOP) while 200 clients send 5 datagrams each."""
    import signal
    port = free_port_tcp_udp()
    capd.ctl("add", "forward", "--port", port, "--to", f"127.0.0.1:{udp_echo.port}", "--udp")
    clients = [udp_client() for _ in range(200)]
    sigstop(capd.proc)
    try:
        for rnd in range(5):
            for i, u in enumerate(clients):
                u.sendto(b"c%03d r%d" % (i, rnd), ("127.0.0.1", port))
    finally:
        capd.proc.send_signal(signal.SIGCONT)
    deadline = time.time() + 30
    while True:  # every datagram sent on to the target is counted
        ss = capd.ctl("sessions", json_out=True)
        got = sum(s["bytes_up"] for s in ss) // 7
        if got == 1000 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert (len(ss), got) == (200, 1000), f"{1000 - got} of 1000 datagrams lost, {len(ss)} clients seen"
    for u in clients:
        u.close()


# A UDP echo server on ADDR PORT (argv), IPv4 or IPv6, for a namespace the test process is not in.
NS_UDP_ECHO_ANY = NS_UDP_ECHO.replace("socket.AF_INET,", "socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET,")


def test_forward_udp_to_a_name_sends_to_getaddrinfos_first_address(netns, ns_etc, ns_python, ns_capd):
    """Regression: a forward with udp = yes whose `to` names a host with an IPv6 and an
    IPv4 address (::1 and 127.0.0.1 in the hosts file) sent its datagrams to 127.0.0.1,
    where getaddrinfo, and so dig, put ::1 first (RFC 6724): a UDP server bound to ::1
    alone never got them, and the client timed out. capd's resolver put IPv4 first for
    every caller, which suits a TCP connect that tries each address in turn, but a
    datagram goes to one address: it now goes to getaddrinfo's first."""
    with open(f"{ns_etc}/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n::1 localhost\n127.0.0.1 dual.test\n::1 dual.test\n")
    with open(f"{ns_etc}/resolv.conf", "w") as f:
        f.write("nameserver 127.0.0.1\n")  # the name is in the hosts file: no query is needed
    tport, port = 61000 + os.getpid() % 2000, 63000 + os.getpid() % 2000
    first = subprocess.run(["ip", "netns", "exec", netns, "/usr/bin/python3", "-c",
                            "import socket; print(socket.getaddrinfo('dual.test', 53, type=socket.SOCK_DGRAM)[0][4][0])"],
                           capture_output=True, text=True, timeout=30)
    assert first.stdout.strip() == "::1", first  # what every getaddrinfo program sends to
    ns_python(netns, NS_UDP_ECHO_ANY, "::1", tport)
    # localhost is answered from the hosts file without c-ares (RFC 6761): the same order
    c = ns_capd(netns, f"[forward f]\nlisten = 127.0.0.1:{port}\nudp = yes\nto = dual.test:{tport}\n"
                       f"[forward l]\nlisten = 127.0.0.1:{port + 1}\nudp = yes\nto = localhost:{tport}\n")
    for p, name in ((port, "dual.test"), (port + 1, "localhost")):
        r = subprocess.run(["ip", "netns", "exec", netns, "/usr/bin/python3", "-c", NS_UDP_CLIENTS, str(p),
                            "127.0.0.1"], capture_output=True, text=True, timeout=30)
        assert r.stdout.split() == ["127.0.0.1", "echo:to_127.0.0.1"], (name, r.stdout, r.stderr, c.log()[-2000:])
        s = c.wait_sessions(lambda ss: any(s["proto"] == "udp" and s.get("target_name") == f"{name}:{tport}"
                                           for s in ss))
        s = [x for x in s if x.get("target_name") == f"{name}:{tport}"][0]
        assert s["target"] == f"[::1]:{tport}", s
