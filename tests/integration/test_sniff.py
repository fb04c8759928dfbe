"""Passive capture: sniff instances (issue 7).

Network tests run in network namespaces and veth pairs each test creates and
deletes itself; capd runs inside one of them (`ip netns exec`), its control
socket is a path, so capctl reaches it from here. Loopback tests use a
namespace of their own too, so their `lo` carries only the test's traffic.
"""

import os
import shutil
import socket
import struct
import subprocess
import time

import pytest

from conftest import CAPD, ECHO_SERVER, EchoServer, follow_tcp, free_port, next_seq, sh, tshark

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 for network namespaces")

class NetPair:
    """Two namespaces joined by a veth pair: a (10.200.N.1) and b (10.200.N.2), /30."""

    def __init__(self):
        n = next_seq()
        tag = f"{os.getpid() % 100000}{n}"
        self.a, self.b = f"capsnA{tag}", f"capsnB{tag}"
        self.va, self.vb = f"csa{tag}"[:15], f"csb{tag}"[:15]
        net = 200 + (os.getpid() + n) % 50
        self.ip_a, self.ip_b = f"10.200.{net}.1", f"10.200.{net}.2"
        self.made = []
        try:
            for ns in (self.a, self.b):
                sh("ip", "netns", "add", ns)
                self.made.append(ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", self.a, "link", "add", self.va, "type", "veth", "peer", "name", self.vb,
               "netns", self.b)
            sh("ip", "-n", self.a, "addr", "add", f"{self.ip_a}/30", "dev", self.va)
            sh("ip", "-n", self.b, "addr", "add", f"{self.ip_b}/30", "dev", self.vb)
            sh("ip", "-n", self.a, "link", "set", self.va, "up")
            sh("ip", "-n", self.b, "link", "set", self.vb, "up")
        except Exception:
            self.delete()
            raise

    def run(self, ns, *args, **kw):
        return sh("ip", "netns", "exec", ns, *args, **kw)

    def popen(self, ns, *args, **kw):
        return subprocess.Popen(["ip", "netns", "exec", ns, *map(str, args)], **kw)

    def delete(self):
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made = []


@pytest.fixture
def netpair():
    p = NetPair()
    yield p
    p.delete()


def pcapng_ifaces(path):
    """[(name, linktype, snaplen, tsresol)] of every Interface Description Block in path."""
    data = open(path, "rb").read()
    out, off, endian = [], 0, "<"
    while off + 12 <= len(data):
        btype, blen = struct.unpack_from(endian + "II", data, off)
        if btype == 0x0A0D0D0A:
            endian = "<" if data[off + 8:off + 12] == b"\x4d\x3c\x2b\x1a" else ">"
            blen = struct.unpack_from(endian + "I", data, off + 4)[0]
        if blen < 12 or off + blen > len(data):
            break
        if btype == 1:
            linktype, _, snaplen = struct.unpack_from(endian + "HHI", data, off + 8)
            name, tsresol, o = None, 6, off + 16
            while o + 4 <= off + blen - 4:
                code, olen = struct.unpack_from(endian + "HH", data, o)
                if code == 0:
                    break
                val = data[o + 4:o + 4 + olen]
                if code == 2:
                    name = val.decode(errors="replace")
                elif code == 9:
                    tsresol = val[0]
                o += 4 + ((olen + 3) & ~3)
            out.append((name, linktype, snaplen, tsresol))
        off += blen
    return out


def all_ifaces(c):
    got = []
    for f in c.pcaps():
        got += pcapng_ifaces(f)
    return got


def spool_file(c):
    """The single spool file of this capd (tests stay below the rotation size)."""
    files = c.pcaps()
    assert len(files) == 1, files
    return files[0]


def wait_packets(c, name, n, timeout=10):
    deadline = time.time() + timeout
    while True:
        inst = next(i for i in c.ctl("list", json_out=True) if i["name"] == name)
        if inst["packets"] >= n or time.time() > deadline:
            return inst
        time.sleep(0.1)


ECHO_CLIENT = r"""
import socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = bytes((i * 7 + i // 251) & 0xff for i in range(size))
s = socket.create_connection((host, port), timeout=10)
s.sendall(payload)
s.shutdown(socket.SHUT_WR)
got = bytearray()
while True:
    d = s.recv(65536)
    if not d:
        break
    got += d
s.close()
sys.exit(0 if bytes(got) == payload else 3)
"""

def payload_of(size):
    return bytes((i * 7 + i // 251) & 0xff for i in range(size))


@pytest.fixture
def ns_echo(netpair, ns_python):
    """Echo servers in namespace b; returns start(port)."""
    return lambda port: ns_python(netpair.b, ECHO_SERVER, netpair.ip_b, port)


def test_veth_conversation_every_packet(netpair, ns_capd, ns_echo, tmp_path):
    """Issue 7: capd sniffs one veth end while a client in one namespace talks to
    a server in the other; every packet (compared with dumpcap on the far end)
    is in the spool with the Ethernet link type, and follow rebuilds the payload."""
    port = 7000 + os.getpid() % 1000
    c = ns_capd(netpair.a, f"[sniff wire]\ninterface = {netpair.va}\n")
    ns_echo(port)
    ref = tmp_path / "ref.pcapng"
    dc = netpair.popen(netpair.b, "dumpcap", "-q", "-i", netpair.vb, "-f", f"tcp port {port}",
                       "-w", ref, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 15
        while not ref.exists() or ref.stat().st_size == 0:
            assert time.time() < deadline and dc.poll() is None, dc.stderr.read() if dc.poll() is not None else ""
            time.sleep(0.1)
        time.sleep(0.3)
        size = 300_000
        netpair.run(netpair.a, "/usr/bin/python3", "-c", ECHO_CLIENT, netpair.ip_b, port, size, timeout=30)
        time.sleep(0.5)
    finally:
        dc.terminate()
        dc.wait(10)
    c.flush()
    inst = wait_packets(c, "wire", 10)
    assert inst["state"] == "running" and inst["listen"] == netpair.va and inst["type"] == "sniff"
    assert inst["dropped_kernel"] == 0 and inst["dropped_spool"] == 0
    c.stop()

    pcap = spool_file(c)
    ifaces = pcapng_ifaces(pcap)
    assert ("wire", 1, 262144, 9) in ifaces, ifaces  # LINKTYPE_ETHERNET, nanoseconds

    flt = f"tcp.port=={port}"
    mine = tshark("-r", pcap, "-Y", flt, "-T", "fields", "-e", "frame.interface_name",
                  "-e", "eth.src", "-e", "tcp.seq_raw", "-e", "tcp.len").stdout.split("\n")
    theirs = tshark("-r", ref, "-Y", flt, "-T", "fields", "-e", "frame.interface_name",
                    "-e", "eth.src", "-e", "tcp.seq_raw", "-e", "tcp.len").stdout.split("\n")
    mine = [line.split("\t", 1)[1] for line in mine if line]
    theirs = [line.split("\t", 1)[1] for line in theirs if line]
    assert len(theirs) > 10
    assert sorted(mine) == sorted(theirs), (len(mine), len(theirs))
    up, down = follow_tcp(pcap, 0)
    assert up == payload_of(size) and down == payload_of(size)


def test_filter_limits_capture(netpair, ns_capd, ns_echo):
    """Issue 7: traffic on a port the filter leaves out is absent."""
    p1 = 7100 + os.getpid() % 800
    p2 = p1 + 1
    c = ns_capd(netpair.a, f"[sniff f]\ninterface = {netpair.va}\nfilter = tcp port {p1}\nsnaplen = 128\n")
    ns_echo(p1)
    ns_echo(p2)
    for port in (p1, p2):
        netpair.run(netpair.a, "/usr/bin/python3", "-c", ECHO_CLIENT, netpair.ip_b, port, 5000)
    c.flush()
    inst = wait_packets(c, "f", 8)
    assert inst["filter"] == f"tcp port {p1}" and inst["snaplen"] == 128
    c.stop()
    pcap = spool_file(c)
    r = tshark("-r", pcap, "-T", "fields", "-e", "tcp.dstport", "-e", "tcp.srcport",
               "-e", "frame.cap_len", "-e", "frame.len")
    rows = [line.split("\t") for line in r.stdout.splitlines() if line]
    assert rows and all(str(p1) in row[:2] for row in rows), rows[:5]
    assert not any(str(p2) in row[:2] for row in rows)
    # truncated to the snap length, original length kept
    assert all(int(row[2]) <= 128 for row in rows)
    assert any(int(row[3]) > 128 for row in rows)


def test_proxy_and_lo_sniffer_share_the_spool(netns, ns_capd, ns_python):
    """Issue 7: a forward proxy's session and a sniffer on lo in one spool:
    both interfaces are present (raw IP and Ethernet) and tshark reads the file."""
    # the echo server and the proxy live in the namespace; its lo carries only this test
    port, proxy = 7300, 7301
    ns_python(netns, ECHO_SERVER, "127.0.0.1", port)
    c = ns_capd(netns, f"[forward fw]\nlisten = 127.0.0.1:{proxy}\nto = 127.0.0.1:{port}\n"
                       f"[sniff lo]\ninterface = lo\nfilter = tcp port {proxy}\n")
    sh("ip", "netns", "exec", netns, "/usr/bin/python3", "-c", ECHO_CLIENT, "127.0.0.1", proxy, 20000)
    c.flush()
    wait_packets(c, "lo", 6)
    c.wait_sessions(lambda ss: ss and all(s["state"] == "closed" for s in ss))
    c.flush()
    c.stop()
    pcap = spool_file(c)
    ifaces = {i[0]: i[1] for i in pcapng_ifaces(pcap)}
    assert ifaces.get("fw") == 101 and ifaces.get("lo") == 1, ifaces
    r = tshark("-r", pcap, "-T", "fields", "-e", "frame.interface_name", "-e", "tcp.port")
    assert r.returncode == 0, r.stderr
    seen = {line.split("\t")[0] for line in r.stdout.splitlines() if line}
    assert seen == {"fw", "lo"}, seen


def test_any_is_linux_cooked(netns, ns_capd, ns_python):
    """Issue 7: interface = any works, with the Linux cooked link type."""
    c = ns_capd(netns)
    r = c.ctl("add", "sniff", "--interface", "any", json_out=True)
    assert r["name"] == "sniff-any" and r["listen"] == "any"
    port = 7400
    ns_python(netns, ECHO_SERVER, "127.0.0.1", port)
    sh("ip", "netns", "exec", netns, "/usr/bin/python3", "-c", ECHO_CLIENT, "127.0.0.1", port, 1000)
    inst = wait_packets(c, "sniff-any", 6)
    assert inst["packets"] >= 6 and inst["linktype"] in ("LINUX_SLL", "LINUX_SLL2")
    c.flush()
    c.stop()
    ifaces = {i[0]: i[1] for i in all_ifaces(c)}
    assert ifaces["sniff-any"] in (113, 276), ifaces
    r = tshark("-r", spool_file(c), "-Y", f"sll && tcp.port=={port}")
    assert len(r.stdout.splitlines()) >= 6, r.stdout + r.stderr


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_bad_interface_and_filter_refused(netpair, ns_capd):
    """Issue 7: a bad interface or filter fails `capctl add` with exit 1 and the
    reason, and leaves nothing half-started (no instance, no descriptor)."""
    c = ns_capd(netpair.a)
    time.sleep(0.2)  # control connections are closed on the loop pass after they end
    before = fds(c.proc.pid)
    r = c.ctl("add", "sniff", "--interface", "nosuch0", check=False)
    assert r.returncode == 1 and "no interface 'nosuch0'" in r.stderr, r.stderr
    r = c.ctl("add", "sniff", "--interface", netpair.va, "--filter", "tcp port", check=False)
    assert r.returncode == 1 and "bad filter 'tcp port'" in r.stderr and "syntax error" in r.stderr, r.stderr
    # well formed, but not for this link type: only the real device can tell
    r = c.ctl("add", "sniff", "--interface", "any", "--filter", "wlan host 01:02:03:04:05:06", check=False)
    assert r.returncode == 1 and "bad filter" in r.stderr, r.stderr
    sh("ip", "-n", netpair.a, "link", "set", netpair.va, "down")
    r = c.ctl("add", "sniff", "--interface", netpair.va, check=False)
    assert r.returncode == 1 and f"{netpair.va} is down" in r.stderr, r.stderr
    sh("ip", "-n", netpair.a, "link", "set", netpair.va, "up")
    assert c.ctl("list", json_out=True) == []
    time.sleep(0.2)
    assert fds(c.proc.pid) <= before
    # and the config checker catches the syntax with file:line
    bad = c.dir / "bad.conf"
    bad.write_text("[capd]\n[sniff x]\ninterface = lo\nfilter = port port\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and "bad.conf:4: bad filter" in r.stderr, r.stderr
    r = c.ctl("add", "sniff", "--interface", netpair.va, json_out=True)
    assert r["state"] == "running"


def test_interface_down_fails_instance_daemon_lives(netpair, ns_capd):
    """Issue 7: the interface going down marks the sniffer failed with the reason;
    it stays listed and capd keeps serving."""
    c = ns_capd(netpair.a)
    c.ctl("add", "sniff", "--interface", netpair.va, "--name", "wire")
    sh("ip", "-n", netpair.a, "link", "set", netpair.va, "down")
    deadline = time.time() + 10
    while True:
        inst = c.ctl("list", json_out=True)[0]
        if inst["state"] == "failed" or time.time() > deadline:
            break
        time.sleep(0.1)
    assert inst["state"] == "failed" and "went down" in inst["error"], inst
    assert "packets" in inst
    assert c.ctl("status").returncode == 0
    r = c.ctl("list")
    assert "failed" in r.stdout and "went down" in r.stdout
    c.ctl("remove", "wire")
    assert c.ctl("list", json_out=True) == []


def test_missing_permission_names_cap_net_raw(netns, ns_capd):
    """Issue 7: without CAP_NET_RAW the error says which capability is needed."""
    if shutil.which("capsh") is None:
        pytest.skip("capsh (libcap2-bin) is not installed")
    c = ns_capd(netns, wrap=["capsh", "--drop=cap_net_raw", "--", "-c", 'exec "$0" "$@"'])
    r = c.ctl("add", "sniff", "--interface", "lo", check=False)
    assert r.returncode == 1 and "CAP_NET_RAW" in r.stderr, r.stderr
    assert c.ctl("list", json_out=True) == []


def test_capture_status_counts_sniffers(netns, ns_capd):
    """Issue 7: capctl capture status shows per-sniffer packets and drops."""
    c = ns_capd(netns, "[sniff lo]\ninterface = lo\n")
    sh("ip", "netns", "exec", netns, "/usr/bin/python3", "-c",
       "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
       "for i in range(4): s.sendto(b'x', ('127.0.0.1', 9))")
    wait_packets(c, "lo", 4)
    r = c.ctl("capture", "status")
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("sniffer:")), "")
    assert "lo on lo (running)" in line and "dropped kernel 0, spool 0" in line, r.stdout
    assert int(line.split(": ")[-1].split()[0]) >= 4, line
    j = c.ctl("capture", "status", json_out=True)
    assert "file" in j


def test_reload_keeps_unchanged_sniffer_and_restarts_changed(netns, ns_capd):
    """A reload leaves an unchanged [sniff] section running (its counters go on)
    and restarts one whose filter changed."""
    c = ns_capd(netns, "[sniff lo]\ninterface = lo\nfilter = udp port 9\n")
    send = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for i in range(3): s.sendto(b'x', ('127.0.0.1', 9))")
    sh("ip", "netns", "exec", netns, "/usr/bin/python3", "-c", send)
    assert wait_packets(c, "lo", 3)["packets"] >= 3
    c.ctl("reload")
    inst = c.ctl("list", json_out=True)[0]
    assert inst["packets"] >= 3 and inst["filter"] == "udp port 9"
    c.write_conf("[sniff lo]\ninterface = lo\nfilter = udp port 10\n")
    c.ctl("reload")
    inst = c.ctl("list", json_out=True)[0]
    assert inst["state"] == "running" and inst["filter"] == "udp port 10" and inst["packets"] == 0, inst
