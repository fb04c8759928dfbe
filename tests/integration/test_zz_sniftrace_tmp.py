import socket, subprocess, time, os, textwrap
from conftest import CAPCTL
from test_trace import closed_sessions, trace, PY, session_bytes

def test_spawns(capd, http_server):
    port, www = http_server
    (www / "f").write_bytes(b"A" * 5000)
    script = textwrap.dedent(f"""
        import os, subprocess, sys, threading, socket
        subprocess.run(["curl", "-sS", "-o", "/dev/null", "http://127.0.0.1:{port}/f"], check=True)
        pid = os.posix_spawn("/usr/bin/curl", ["curl", "-sS", "-o", "/dev/null", "http://127.0.0.1:{port}/f"], os.environ)
        os.waitpid(pid, 0)
        def t():
            s = socket.create_connection(("127.0.0.1", {port}))
            s.sendall(b"GET /f HTTP/1.0\\r\\n\\r\\n")
            while s.recv(65536): pass
        ts = [threading.Thread(target=t) for _ in range(6)]
        [x.start() for x in ts]
        pid = os.fork()
        if pid == 0:
            os.execv("/usr/bin/curl", ["curl", "-sS", "-o", "/dev/null", "http://127.0.0.1:{port}/f"])
        [x.join() for x in ts]
        os.waitpid(pid, 0)
        print("ok")
    """)
    r = trace(capd, PY, "-c", script, name="sp")
    print(r.stderr)
    ss = closed_sessions(capd, "sp", 9)
    for s in ss: print(s["note"], s["bytes_up"], s["bytes_down"])
    assert len(ss) == 9
    assert all(s["bytes_down"] > 5000 for s in ss)
