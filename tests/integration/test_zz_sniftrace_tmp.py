import socket, subprocess, time, os, textwrap
from conftest import CAPCTL, UdpServer
from test_trace import closed_sessions, trace

def test_mm(capd):
    a = UdpServer(bytes.upper); b = UdpServer(lambda d: d[::-1] + b"!")
    r = trace(capd, "/tmp/sniftrace/c/mm", a.port, b.port, name="mm")
    print(r.stdout, r.stderr)
    ss = closed_sessions(capd, "mm", 2)
    got = sorted((s["target"], s["bytes_up"], s["bytes_down"]) for s in ss)
    print(got)
    assert got == sorted([(f"127.0.0.1:{a.port}", 6, 6), (f"127.0.0.1:{b.port}", 6, 7)])
