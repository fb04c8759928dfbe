"""capctl's own side of its contract: replies of any size, `add TYPE --help`,
addresses it can reject itself (exit 2), and --users paths made absolute."""

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from conftest import CAPCTL, CAPD, Listener, apart, free_port

ADD_TYPES = ("forward", "socks", "http", "reverse", "dns", "sniff")


def capctl(*args, sock, cwd=None, timeout=20):
    """Runs capctl; a capctl that hangs fails the test instead of holding up the run."""
    try:
        return subprocess.run([str(CAPCTL), "-s", str(sock), *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        pytest.fail(f"capctl {' '.join(map(str, args))} hung for {timeout}s")


class FakeCapd(Listener):
    """A control socket that answers the first request of each connection with reply(request)
    (bytes, sent as they are), then holds the connection open as capd does (hold) or closes it."""

    def __init__(self, path, reply, hold=True):
        self.reply, self.hold = reply, hold
        self.done = threading.Event()
        super().__init__(path=path, backlog=4)

    def handle(self, c, peer):
        apart(self.serve, c)

    def serve(self, c):
        with c:
            data = b""
            while b"\n" not in data:
                d = c.recv(65536)
                if not d:
                    return
                data += d
            try:
                c.sendall(self.reply(json.loads(data.split(b"\n")[0])))
            except OSError:
                return
            if self.hold:
                self.done.wait(60)

    def close(self):
        self.done.set()
        super().close()


@pytest.fixture
def fake_capd(tmp_path):
    """fake_capd(reply, hold=True) -> the socket path of a FakeCapd."""
    made = []

    def make(reply, hold=True):
        path = tmp_path / f"fake{len(made)}.sock"
        made.append(FakeCapd(path, reply, hold))
        return path

    yield make
    for f in made:
        f.close()


def sessions_of(size):
    """Session objects (the shape in DESIGN.md) adding up to more than size bytes of JSON."""
    out, total = [], 0
    while total <= size:
        i = len(out) + 1
        s = {"id": i, "instance": "socks-1080", "proto": "socks5", "client": f"127.0.0.1:{10000 + i % 50000}",
             "target": f"host{i}.example.test:443", "state": "open", "bytes_up": i, "bytes_down": 2 * i,
             "started": "2026-11-25T20:21:03Z"}
        out.append(s)
        total += len(json.dumps(s)) + 1
    return out


def session_list_reply(sessions, cut=False):
    def reply(req):
        assert req["method"] == "session.list"
        line = json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": sessions}).encode() + b"\n"
        return line[:len(line) // 2] if cut else line
    return reply


# ---------------------------------------------------------------- replies over 1 MiB

def test_sessions_reply_over_1mib(fake_capd):
    """capd answers session.list in one line, past 1 MiB with ~5,000 sessions: capctl
    used to skip such a line as too long and wait for ever for the reply."""
    sessions = sessions_of(2 * 1024 * 1024)
    sock = fake_capd(session_list_reply(sessions))
    r = capctl("--json", "sessions", sock=sock)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == sessions
    r = capctl("sessions", sock=sock)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[0] == "ID" and len(lines) == len(sessions) + 1
    assert lines[-1].split()[:2] == [str(len(sessions)), "socks-1080"]


def test_reply_cut_short_is_an_error(fake_capd):
    """Half a long reply and then EOF: one message and exit 1, no hang."""
    sock = fake_capd(session_list_reply(sessions_of(2 * 1024 * 1024), cut=True), hold=False)
    r = capctl("sessions", sock=sock)
    assert r.returncode == 1
    assert r.stderr == "capctl: capd closed the connection\n"
    assert r.stdout == ""


# ---------------------------------------------------------------- add TYPE --help

@pytest.mark.parametrize("typ", ADD_TYPES)
def test_add_help(tmp_path, typ):
    """capctl(1), the usage line and the completion offer `add TYPE --help`; it used to
    print the options and then call --help an unknown option (exit 2). No capd needed."""
    for args in (["add", typ, "--help"], ["add", typ, "--port", "1", "--help"]):
        r = capctl(*args, sock=tmp_path / "none.sock")
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
        assert r.stdout.startswith(f"usage: capctl add {typ} ")
    assert ("--port PORT" in r.stdout) == (typ != "sniff")
    want = {"forward": "--to", "socks": "--users", "http": "--connect-ports", "reverse": "--route",
            "dns": "--answer", "sniff": "--interface"}[typ]
    assert want in r.stdout


def test_add_help_without_type(tmp_path):
    r = capctl("add", "--help", sock=tmp_path / "none.sock")
    assert r.returncode == 0 and r.stderr == ""
    assert "forward socks http reverse dns sniff" in r.stdout
    r = capctl("add", sock=tmp_path / "none.sock")
    assert r.returncode == 2 and r.stdout == "" and "usage" in r.stderr


def test_help_lines_and_tail_usage(tmp_path):
    """capctl -h: no line ends in a space (commands without arguments had one);
    the bare tail usage names every option, --backlog and events' --json too."""
    r = capctl("-h", sock=tmp_path / "none.sock")
    assert r.returncode == 0 and "  list\n" in r.stdout
    assert [x for x in r.stdout.splitlines() if x.endswith(" ")] == []
    r = capctl("tail", sock=tmp_path / "none.sock")
    assert r.returncode == 2 and "--backlog SIZE" in r.stderr and "tail events [--json]" in r.stderr


# ---------------------------------------------------------------- malformed addresses: exit 2

@pytest.mark.parametrize("bind", ["999.1.1.1", "1.2.3", "::g", "[::1", "example.test", "127.0.0.1:80", ""])
def test_add_bad_bind_is_usage_error(capd, bind):
    """capctl(1): exit 2 for a malformed address. capd refused it, exit 1."""
    r = capd.ctl("add", "socks", "--port", free_port(), "--bind", bind, check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("capctl: --bind: bad address") and repr(bind) in r.stderr.replace('"', "'")
    assert capd.ctl("list", json_out=True) == []


@pytest.mark.parametrize("bind", ["::ffff:127.0.0.1", "[::ffff:127.0.0.1]"])
def test_add_v4_mapped_bind_names_the_v4_address(capd, bind):
    """An IPv4-mapped --bind passed as loopback, then bind(2) failed with only
    "Invalid argument" (capd's IPv6 listeners are IPv6-only): capctl and capd now
    say what to write instead."""
    port = free_port()
    r = capd.ctl("add", "socks", "--port", port, "--bind", bind, check=False)
    assert (r.returncode, r.stderr) == (2, f"capctl: --bind: listen address '[::ffff:127.0.0.1]:{port}' is "
                                           "IPv4-mapped: write 127.0.0.1\n")
    r = capd.rpc("instance.add", {"type": "socks", "listen": f"[::ffff:127.0.0.1]:{port}"})
    assert "IPv4-mapped: write 127.0.0.1" in r["error"]["message"], r
    assert capd.ctl("list", json_out=True) == []


@pytest.mark.parametrize("bind,listen", [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]"), ("[::1]", "[::1]")])
def test_add_good_bind(capd, bind, listen):
    port = free_port(host=bind.strip("[]"))
    out = capd.ctl("--json", "add", "socks", "--port", port, "--bind", bind).stdout
    assert json.loads(out)["listen"] == f"{listen}:{port}"


@pytest.mark.parametrize("typ,args", [
    ("reverse", ["--route", "a.test=nope"]),
    ("reverse", ["--route", "a.test=[::g]:80"]),
    ("reverse", ["--route", "a.test"]),
    ("dns", ["--answer", "a.test=999.1.1.1"]),
    ("dns", ["--answer", "a.test=host.test"]),
    ("dns", ["--answer", "a.test"]),
])
def test_add_bad_rule_address_is_usage_error(capd, typ, args):
    """The addresses inside --route and --answer rules, as --to's already were."""
    r = capd.ctl("add", typ, "--port", free_port(), *args, check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"capctl: {args[0]}: ")
    assert capd.ctl("list", json_out=True) == []


def test_add_good_rules(capd):
    capd.ctl("add", "reverse", "--port", free_port(), "--route", "a.test=127.0.0.1:80",
             "--route", "*.b.test=[::1]:8080", "--default", "c.test:80")
    capd.ctl("add", "dns", "--port", free_port(), "--answer", "a.test=127.0.0.1", "--answer", "*=[::1]")
    assert len(capd.ctl("list", json_out=True)) == 2


# ---------------------------------------------------------------- --users FILE: absolute

@pytest.mark.parametrize("typ", ["socks", "http"])
def test_add_users_relative_path(capd, tmp_path, typ):
    """capd opens the file from its own working directory (/ under systemd): a path relative
    to the user's was not found there, exit 1. Here capctl runs in a folder capd is not in."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "capctl-users.txt").write_text("bob:one\neve:two\n")
    for i, users in enumerate((["--users", "sub/capctl-users.txt"], ["--users=./sub/../sub/capctl-users.txt"])):
        r = capctl("add", typ, "--port", free_port(), "--name", f"u{i}", *users, sock=capd.sock, cwd=work)
        assert r.returncode == 0, r.stderr + capd.log()[-2000:]
    insts = capd.ctl("list", json_out=True)
    assert len(insts) == 2
    # socks counts its users; http says whether it asks for any
    assert all(i["users"] == 2 if typ == "socks" else i["auth"] is True for i in insts)


def test_add_users_missing_file(capd, tmp_path):
    for path, why in (("no-such-users.txt", "No such file or directory"),
                      (str(tmp_path / "nope" / "users"), "No such file or directory"),
                      (str(tmp_path), "is a folder")):
        r = capctl("add", "socks", "--port", free_port(), "--users", path, sock=capd.sock, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"capctl: --users: {path}") and why in r.stderr
    assert capd.ctl("list", json_out=True) == []


def test_add_bad_auth_is_usage_error(tmp_path):
    """--auth without its colon was capd's to refuse (exit 1); capctl sees it itself."""
    for bad in ("nocolon", ":pw"):
        r = capctl("add", "socks", "--port", free_port(), "--auth", bad, sock=tmp_path / "none")
        assert r.returncode == 2 and "expected user:password" in r.stderr, r.stderr


@pytest.mark.parametrize("typ", ["socks", "http"])
def test_add_auth_over_255_bytes_is_usage_error(capd, tmp_path, typ):
    """RFC 1929 bounds a user name and a password to 255 bytes each: capctl sent a longer
    one on and capd refused it (exit 1) with "expected user:password", which did not say
    what was wrong. capctl now says so (exit 2); capd's message gives the bounds, in a
    config file with its file and line."""
    long = "x" * 256
    for auth, why in ((f"{long}:p", "the user name is 256 bytes: RFC 1929 allows 1 to 255"),
                      (f"u:{long}", "the password is 256 bytes: RFC 1929 allows up to 255")):
        r = capctl("add", typ, "--port", free_port(), "--auth", "ok:pw", "--auth", auth, sock=capd.sock)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert r.stderr == f"capctl: --auth: {why}\n", r.stderr
    assert capd.ctl("list", json_out=True) == []
    capd.ctl("add", typ, "--port", free_port(), "--auth", "x" * 255 + ":" + "y" * 255)
    r = capd.rpc("instance.add", {"type": typ, "listen": str(free_port()), "auth": [f"u:{long}"]})
    assert "(user 1 to 255 bytes, password up to 255)" in r["error"]["message"], r
    conf = tmp_path / "auth.conf"
    conf.write_text(f"[capd]\ncontrol = {tmp_path}/t.sock\nspool = {tmp_path}/spool\nhosts_file = {tmp_path}/hosts\n\n"
                    f"[{typ} a]\nlisten = 127.0.0.1:{free_port()}\nauth = u:{'y' * 150}\n  {'y' * 110}\n")
    r = subprocess.run([str(CAPD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=20)
    assert r.returncode != 0 and f"{conf}:8: bad auth" in r.stderr, r.stderr
    assert "(user 1 to 255 bytes, password up to 255)" in r.stderr, r.stderr


def test_users_folder_over_rpc_is_refused(capd, tmp_path):
    """capctl refuses a folder itself; sent over raw RPC (or in capd.conf) it loaded as zero users."""
    r = capd.rpc("instance.add", {"type": "socks", "listen": str(free_port()), "users": str(tmp_path)})
    assert "error" in r and "Is a directory" in r["error"]["message"], r


@pytest.mark.parametrize("args,msg", [
    (["dns", "--port", "PORT", "--answer", "*=127.0.0.1", "--ttl", "3000000000"],
     "--ttl: bad number '3000000000' (0 to 2147483647)"),
    (["dns", "--port", "PORT", "--answer", "*=127.0.0.1", "--ttl", "abc"], "--ttl: bad number 'abc' (0 to 2147483647)"),
    (["sniff", "--interface", "lo", "--snaplen", "262145"], "--snaplen: bad number '262145' (0 to 262144)"),
    (["http", "--port", "PORT", "--max-header-size", "1023"], "--max-header-size: size '1023' out of range (1K to 64K)"),
    (["reverse", "--port", "PORT", "--default", "127.0.0.1:9", "--max-header-size=1M"],
     "--max-header-size: size '1M' out of range (1K to 64K)"),
    (["http", "--port", "PORT", "--tls", "--tls-timeout", "0"], "--tls-timeout: duration '0' out of range (more than 0)"),
    (["socks", "--port", "PORT", "--tls", "--tls-timeout=0ms"], "--tls-timeout: duration '0ms' out of range (more than 0)"),
])
def test_add_number_out_of_range_is_usage_error(capd, args, msg):
    """A number capd refuses for its range (--ttl 3000000000) reached capd and exited 1,
    while a malformed one (--ttl abc) was capctl's usage error: both are now exit 2, and the
    message says the range."""
    args = [free_port() if a == "PORT" else a for a in args]
    r = capctl("add", *args, sock=capd.sock)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr == f"capctl: {msg}\n", r.stderr
    assert capd.ctl("list", json_out=True) == []


@pytest.mark.parametrize("args,msg", [
    (["http", "--port", "PORT", "--tls", "--tls-capture", "bogus"], "--tls-capture: bad value 'bogus' (plain or both)"),
    (["socks", "--port", "PORT", "--tls", "--tls-capture="], "--tls-capture: bad value '' (plain or both)"),
    (["sniff", "--interface", ""], "--interface: bad interface name ''"),
    (["sniff", "--interface", "a/b"], "--interface: bad interface name 'a/b'"),
    (["sniff", "--interface", "x" * 16], f"--interface: bad interface name '{'x' * 16}'"),
])
def test_add_malformed_word_is_usage_error(capd, args, msg):
    """--tls-capture other than plain or both, and an --interface that cannot be an interface's
    name (empty, a slash or space, 16 bytes or more), were capd's to refuse (exit 1)."""
    args = [free_port() if a == "PORT" else a for a in args]
    r = capctl("add", *args, sock=capd.sock)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr == f"capctl: {msg}\n", r.stderr
    assert capd.ctl("list", json_out=True) == []
    capd.ctl("add", "http", "--port", free_port(), "--tls", "--tls-capture", "both")


@pytest.mark.parametrize("args", [
    ["http", "--connect-ports", ""],
    ["http", "--connect-ports=,"],
    ["socks", "--tls", "--tls-passthrough", ""],
    ["forward", "--to", "127.0.0.1:9", "--tls-auto", "--tls-passthrough= , "],
    ["http", "--tls", "--tls-passthrough", "\t"],
])
def test_add_empty_list_is_usage_error(tmp_path, args):
    """Known item 1: `--tls-passthrough ''` was sent on and taken as no name at all (exit 0),
    and `--connect-ports ''` was capd's to refuse (exit 1). An empty list is a mistake that
    capctl sees itself (exit 2), before it looks for capd."""
    r = capctl("add", args[0], "--port", free_port(), *args[1:], sock=tmp_path / "none.sock")
    opt = next(a for a in args if a.startswith("--") and ("ports" in a or "passthrough" in a)).split("=")[0]
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"capctl: {opt}: the list is empty\n")


@pytest.mark.parametrize("ports,msg", [
    ("443,x", "bad port 'x' (1 to 65535, or * alone)"),
    ("0", "bad port '0' (1 to 65535, or * alone)"),
    ("443 65536", "bad port '65536' (1 to 65535, or * alone)"),
    ("443\t8443", "bad port '443\t8443' (1 to 65535, or * alone)"),
    ("443,*", "'*' means every port: give it alone, not in a list"),
    (",".join(map(str, range(1, 66))), "more than 64 ports (* is every port)"),
])
def test_add_bad_connect_ports_is_usage_error(tmp_path, ports, msg):
    """Known item 2: --connect-ports was checked only by capd (exit 1 with capd's message)
    while every other malformed value was capctl's usage error (exit 2)."""
    r = capctl("add", "http", "--port", free_port(), "--connect-ports", ports, sock=tmp_path / "none.sock")
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"capctl: --connect-ports: {msg}\n")


def test_add_good_connect_ports(capd):
    """What capd takes, capctl lets through: commas, blanks, 64 ports, * alone."""
    for i, ports in enumerate(("443, 8443", "443 8443,,9443", ",".join(map(str, range(1, 65))), "*")):
        capd.ctl("add", "http", "--port", free_port(), "--name", f"h{i}", "--connect-ports", ports)
    got = {i["name"]: i["connect_ports"] for i in capd.ctl("list", json_out=True)}
    assert got == {"h0": [443, 8443], "h1": [443, 8443, 9443], "h2": list(range(1, 65)), "h3": "*"}


def test_infinite_duration_is_refused(capd):
    """1e308h reads as a finite number of hours but is infinite in seconds: capctl and capd
    took it, and the instance's JSON then lost the key (json_real() refuses infinity)."""
    r = capctl("add", "socks", "--port", free_port(), "--handshake-timeout", "1e308h", sock=capd.sock)
    assert (r.returncode, r.stderr) == (2, "capctl: --handshake-timeout: bad duration '1e308h'\n"), r
    r = capd.rpc("instance.add", {"type": "socks", "listen": str(free_port()), "handshake_timeout": "1e308h"})
    assert "bad duration for 'handshake_timeout': '1e308h'" in r["error"]["message"], r
    assert capd.ctl("list", json_out=True) == []


@pytest.mark.parametrize("name", ["a b", "a'b", 'a"b', "a/b", "a\\b", "a\tb", "n" * 65])
@pytest.mark.parametrize("cmd", [["add", "forward", "--port", "PORT", "--to", "127.0.0.1:9", "--name"],
                                 ["trace", "--name"]])
def test_bad_new_instance_name_is_usage_error(tmp_path, cmd, name):
    """A name capd refuses for a new instance (a space, a quote, a slash, a control character,
    over 64 bytes) reached capd and exited 1; capctl sees it itself, as it does an empty one."""
    args = [free_port() if a == "PORT" else a for a in cmd] + [name] + (["--", "true"] if cmd[0] == "trace" else [])
    r = capctl(*args, sock=tmp_path / "none.sock")
    what = "--name" if cmd[0] == "add" else "trace --name"
    assert (r.returncode, r.stdout) == (2, ""), r
    assert r.stderr == (f"capctl: {what}: bad instance name '{name}' (1 to 64 bytes, no spaces, quotes, "
                        "slashes or control characters)\n"), r.stderr


def test_good_new_instance_names(capd):
    for name in ("n" * 64, "ünï-1", "a.b_c:d"):
        capd.ctl("add", "forward", "--port", free_port(), "--to", "127.0.0.1:9", "--name", name)
    assert len(capd.ctl("list", json_out=True)) == 3


def test_add_reverse_without_route_or_default_is_usage_error(tmp_path):
    """`add reverse --port P` alone reached capd, which refused it (exit 1), while `add forward`
    without --to was already capctl's usage error (exit 2)."""
    r = capctl("add", "reverse", "--port", free_port(), sock=tmp_path / "none.sock")
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.startswith("usage: capctl add reverse ")
    assert r.stderr.endswith("capctl: add reverse needs --route PATTERN=HOST:PORT or --default HOST:PORT\n"), r.stderr


def test_add_number_at_the_ends_of_its_range(capd):
    """The ends of each range are still taken (capd agrees)."""
    capd.ctl("add", "dns", "--port", free_port(), "--answer", "*=127.0.0.1", "--ttl", "2147483647")
    capd.ctl("add", "http", "--port", free_port(), "--max-header-size", "1K")
    capd.ctl("add", "http", "--port", free_port(), "--max-header-size", "64K")
    capd.ctl("add", "http", "--port", free_port(), "--tls", "--tls-timeout", "1ms")
    assert len(capd.ctl("list", json_out=True)) == 4


# ---------------------------------------------------------------- list: the INFO column

def test_list_names_tls_once(fake_capd):
    """capctl list said "tls yes, tls yes" for every intercepting instance: two helpers
    each added the TLS mode to INFO."""
    base = {"type": "socks", "listen": "127.0.0.1:1080", "state": "running", "sessions": 0,
            "bytes_up": 0, "bytes_down": 0}
    insts = [{**base, "name": "t1", "tls": "yes"},
             {**base, "name": "t2", "tls": "auto", "auth": True, "tls_passthrough_auto": ["a.test", "b.test"]},
             {**base, "name": "t3", "type": "forward", "to": "127.0.0.1:443", "tls": "yes"},
             {**base, "name": "t4", "tls": "no"}]

    def reply(req):
        assert req["method"] == "instance.list"
        return json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": insts}).encode() + b"\n"

    r = capctl("list", sock=fake_capd(reply))
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert rows["t1"].endswith("  tls yes"), rows["t1"]
    assert rows["t2"].endswith("  auth, tls auto, passthrough (clients rejected the certificate): a.test b.test"), rows
    assert rows["t3"].endswith("  to 127.0.0.1:443, tls yes"), rows["t3"]
    assert "tls" not in rows["t4"]


# ---------------------------------------------------------------- output that cannot be written

@pytest.mark.parametrize("args", [("status",), ("list",), ("--json", "sessions"), ("ca", "export"),
                                  ("ca", "export", "--der")])
def test_output_that_cannot_be_written_fails(capd, args):
    """`capctl ca export > ca.pem` on a full disk must not exit 0 with an empty file."""
    with open("/dev/full", "w") as full:
        r = subprocess.run([str(CAPCTL), "-s", str(capd.sock), *args], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=20)
    assert r.returncode == 1, r.stderr
    assert "cannot write" in r.stderr and "No space left" in r.stderr
    # a reader that goes away early is not an error
    r = subprocess.run(f"'{CAPCTL}' -s '{capd.sock}' {' '.join(args)} | head -c 1 >/dev/null; "
                       "echo ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True,
                       text=True, timeout=20)
    assert r.stdout.strip() in ("0", "141") and "cannot write" not in r.stderr


# ---------------------------------------------------------------- tables

def test_table_columns_line_up_with_utf8_names(capd):
    """Widths count characters, not bytes: a name with "ü" does not shift the columns after it."""
    for name in ("ünïcode-forward", "plain"):
        capctl("add", "forward", "--port", free_port(), "--to", "127.0.0.1:9", "--name", name, sock=capd.sock)
    r = capctl("list", sock=capd.sock)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    assert lines[1].index(" forward ") == lines[2].index(" forward ") == lines[0].index(" TYPE "), r.stdout


# ---------------------------------------------------------------- values that are not UTF-8: exit 2

NOT_UTF8 = "\udcff"  # the byte 0xff on the command line (os.fsencode)


@pytest.mark.parametrize("args", [
    ["add", "socks", "--port", "PORT", "--auth", "u:pw" + NOT_UTF8],
    ["add", "forward", "--port", "PORT", "--to", "127.0.0.1:9", "--name", "f" + NOT_UTF8],
    ["add", "forward", "--port", "PORT", "--to", "127.0.0.1:9", "--name=f" + NOT_UTF8],
    ["sessions", "--instance", "f" + NOT_UTF8],
    ["remove", "f" + NOT_UTF8],
    ["capture", "follow", "--instance=f" + NOT_UTF8],
])
def test_value_not_utf8_is_usage_error(capd, args):
    """json_string() refuses bytes that are not UTF-8 and the key was then left out without
    a word: `add socks --auth` came up as an open proxy (auth false, exit 0), --name fell back
    to the default name, `sessions --instance` listed every instance's sessions, remove said
    'needs "name"', and capture follow streamed every instance."""
    capd.ctl("add", "forward", "--port", free_port(), "--to", "127.0.0.1:9", "--name", "keep")
    args = [free_port() if a == "PORT" else a for a in args]
    r = capctl(*args, sock=capd.sock, timeout=5)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "" and r.stderr.startswith("capctl: ") and "is not UTF-8 text" in r.stderr
    assert [i["name"] for i in capd.ctl("list", json_out=True)] == ["keep"]


# ---------------------------------------------------------------- empty instance names: exit 2

@pytest.mark.parametrize("args,what", [
    (["sessions", "--instance="], "--instance"),
    (["sessions", "--instance", ""], "--instance"),
    (["remove", ""], "remove"),
    (["capture", "follow", "--instance="], "--instance"),
    (["add", "forward", "--port", "PORT", "--to", "127.0.0.1:9", "--name", ""], "--name"),
    (["add", "forward", "--port", "PORT", "--to", "127.0.0.1:9", "--name="], "--name"),
    (["trace", "--name=", "--", "true"], "trace --name"),
])
def test_empty_instance_name_is_usage_error(capd, args, what):
    """An empty instance name reached capd, which answered "no instance " or "bad instance
    name ''" (exit 1): no instance has an empty name, so capctl refuses it as it does other
    empty values."""
    capd.ctl("add", "forward", "--port", free_port(), "--to", "127.0.0.1:9", "--name", "keep")
    args = [free_port() if a == "PORT" else a for a in args]
    r = capctl(*args, sock=capd.sock, timeout=10)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "" and r.stderr == f"capctl: {what}: the instance name is empty\n", r.stderr
    assert [i["name"] for i in capd.ctl("list", json_out=True)] == ["keep"]


# ---------------------------------------------------------------- an option given twice: exit 2

@pytest.mark.parametrize("args,opt", [
    (["add", "forward", "--port", "PORT", "--port", "PORT", "--to", "127.0.0.1:9"], "--port"),
    (["add", "forward", "--port", "PORT", "--bind", "127.0.0.1", "--bind=::1", "--to", "127.0.0.1:9"], "--bind"),
    (["sessions", "--instance", "keep", "--instance", "other"], "--instance"),
    (["sessions", "--instance=other", "--instance", "keep"], "--instance"),
    (["capture", "follow", "--instance", "keep", "--instance=other"], "--instance"),
    (["trace", "--name", "a", "--name=b", "--", "true"], "trace: --name"),
    (["trace", "--pid", "2147483646", "-p", "2147483645"], "trace: --pid"),
])
def test_option_given_twice_is_usage_error(capd, args, opt):
    """add --port, --bind, sessions and capture follow --instance and trace --name and --pid
    given twice took the last silently (add listened on the second port, sessions listed
    another instance's sessions) where add's other options say "given twice"."""
    capd.ctl("add", "forward", "--port", free_port(), "--to", "127.0.0.1:9", "--name", "keep")
    args = [free_port() if a == "PORT" else a for a in args]
    r = capctl(*args, sock=capd.sock, timeout=10)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "" and r.stderr == f"capctl: {opt} given twice\n", r.stderr
    assert [i["name"] for i in capd.ctl("list", json_out=True)] == ["keep"]


# ---------------------------------------------------------------- instance names: no control characters

@pytest.mark.parametrize("name", ["x\ny", "x\ry", "\x1b[2Jx", "x\x7fy", "x\x01y", "x\ty"])
def test_add_name_with_control_character_is_refused(capd, name):
    """A newline, carriage return or escape in --name was taken ("no spaces" held only for
    ' ' and tab): capctl list's table broke over two lines and the escape reached the terminal.
    capctl refuses such a name itself (exit 2); capd refuses it over RPC."""
    r = capd.ctl("add", "forward", "--port", free_port(), "--to", "127.0.0.1:9", "--name", name, check=False)
    assert r.returncode == 2 and "bad instance name" in r.stderr, (r.returncode, r.stdout, r.stderr)
    reply = capd.rpc("instance.add", {"type": "forward", "listen": str(free_port()), "to": "127.0.0.1:9",
                                      "name": name})
    assert "bad instance name" in reply["error"]["message"], reply
    assert capd.ctl("list", json_out=True) == []


def test_add_name_utf8_still_accepted(capd):
    capd.ctl("add", "forward", "--port", free_port(), "--to", "127.0.0.1:9", "--name", "café-ü")
    assert [i["name"] for i in capd.ctl("list", json_out=True)] == ["café-ü"]


@pytest.mark.parametrize("word,what", [("s", "ambiguous"), ("sn", None), ("so", None), ("x", "unknown")])
def test_add_type_prefix(tmp_path, word, what):
    """capctl(1): words may be shortened to a unique prefix. 's' (socks or sniff) was called
    an unknown instance type."""
    r = capctl("add", word, "--help", sock=tmp_path / "none")
    if what is None:
        assert r.returncode == 0 and r.stdout.startswith("usage: capctl add s"), r.stderr
    else:
        assert r.returncode == 2 and r.stderr.startswith(f"capctl: {what} instance type '{word}'"), r.stderr


# ---------------------------------------------------------------- --timeout

def test_timeout_against_a_stopped_capd(capd):
    """capctl status waited for ever on a capd that was SIGSTOPped (or wedged). --timeout
    SECONDS bounds a request's connect, send and reply: past it, one line and exit 1. A
    stream (tail events) is not cut by it."""
    os.kill(capd.proc.pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        r = capd.ctl("--timeout", "0.5", "status", check=False, timeout=10)
        took = time.monotonic() - t
        assert r.returncode == 1 and r.stderr == (
            f"capctl: no reply from capd at {capd.sock} within 0.5 s (--timeout): it is stopped or wedged\n"), r
        assert 0.4 < took < 5, took
        r = capd.ctl("--timeout=0.3", "list", "--json", check=False, timeout=10)
        assert r.returncode == 1 and "no reply from capd" in r.stderr, r
    finally:
        os.kill(capd.proc.pid, signal.SIGCONT)
    assert capd.ctl("--timeout", "5", "status", json_out=True)["pid"] == capd.proc.pid
    tail = subprocess.Popen([str(CAPCTL), "-s", str(capd.sock), "--timeout", "0.2", "tail", "events"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1)
        assert tail.poll() is None, tail.stderr.read()
    finally:
        tail.kill()
        tail.wait()


@pytest.mark.parametrize("arg", [["--timeout"], ["--timeout", "x"], ["--timeout=-1"], ["--timeout=nan"],
                                 ["--timeout", "1e9"], ["--timeout="]])
def test_timeout_bad_value_is_usage(tmp_path, arg):
    r = subprocess.run([str(CAPCTL), "-s", str(tmp_path / "none"), *arg, "status"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("capctl: --timeout"), r


# ---------------------------------------------------------------- COMMAND --help, --version's output

@pytest.mark.parametrize("cmd,usage", [(["status"], "usage: capctl status\n"), (["kill"], "usage: capctl kill ID\n"),
                                       (["sess"], "usage: capctl sessions [--instance NAME] [--open]\n"),
                                       (["trace"], "usage: capctl trace [--name N] -- COMMAND [ARGS...] | --pid PID\n")])
def test_command_help_is_its_usage_and_exit_0(tmp_path, cmd, usage):
    """`capctl kill --help` said "kill: '--help' is not a session id", `capctl status --help`
    printed its usage as an error (exit 2), `trace --help` "unknown option": only
    `add TYPE --help` answered. COMMAND --help (or -h) prints its usage line on stdout, exit 0,
    without asking capd."""
    for h in ("--help", "-h"):
        r = capctl(*cmd, h, sock=tmp_path / "none")
        assert (r.returncode, r.stdout, r.stderr) == (0, usage, ""), r


def test_version_output_that_cannot_be_written_fails(tmp_path):
    """capctl --version > /dev/full exited 0 having printed nothing; -h and every command
    already failed there ("cannot write the output", exit 1)."""
    with open("/dev/full", "w") as full:
        r = subprocess.run([str(CAPCTL), "--version"], stdout=full, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 1 and "cannot write the output" in r.stderr, r


def test_double_dash_ends_the_global_options(capd):
    """`capctl -s SOCK -- status` said "unknown option --" (exit 2): "--" ends the global
    options, as getopt's does, so a script may put it before a command word it computed."""
    r = capd.ctl("--", "status", check=False)
    assert r.returncode == 0 and r.stdout.startswith("capd "), r
    r = capd.ctl("--", check=False)
    assert r.returncode == 2 and r.stdout == "" and "usage: capctl" in r.stderr, r


# ---------------------------------------------------------------- an option without its value: exit 2

@pytest.mark.parametrize("args,opt", [
    (["-s"], "-s"), (["--socket"], "--socket"), (["--timeout"], "--timeout"),
    (["status", "--json", "--timeout"], None),  # after the command it is no global option
    (["tail", "session", "3", "--dir"], "--dir"), (["tail", "session", "--dir"], "--dir"),
    (["tail", "session", "3", "--backlog"], "--backlog"), (["tail", "session", "3", "--dir", "--json"], "--dir"),
    (["sessions", "--instance"], "--instance"), (["capture", "follow", "--instance"], "--instance"),
    (["trace", "--name"], "--name"), (["trace", "-n"], "-n"), (["trace", "--pid"], "--pid"), (["trace", "-p"], "-p"),
    (["add", "socks", "--port"], "--port"), (["add", "socks", "--port", "1080", "--bind"], "--bind"),
    (["add", "forward", "--port", "1", "--to"], "--to"), (["add", "socks", "--port", "1", "--name"], "--name"),
    (["add", "http", "--port", "1", "--connect-ports"], "--connect-ports"),
    (["add", "sniff", "--interface"], "--interface"), (["add", "dns", "--port", "1", "--ttl"], "--ttl"),
])
def test_option_without_its_value_is_usage_error(tmp_path, args, opt):
    """`capctl tail session 3 --dir` said "--dir takes c2s or s2c, not ''" (and --backlog "not
    ''"), -s "needs a path", --timeout "needs a number of seconds", --instance "needs a name",
    trace --pid "needs a process id": one message for every option given last without its
    value, "OPTION needs a value", exit 2, before capd is asked (there is none here)."""
    if args[0] in ("-s", "--socket"):
        r = subprocess.run([str(CAPCTL), *args], capture_output=True, text=True, timeout=20)
    else:
        r = capctl(*args, sock=tmp_path / "none")
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    if opt is None:  # the usage line, then what was wrong
        assert r.stderr.splitlines()[-1] == "capctl: unknown option --timeout", r.stderr
    else:
        assert r.stderr == f"capctl: {opt} needs a value\n", r.stderr


@pytest.mark.parametrize("args,why", [([], "no command given"), (["--json"], "no command given"),
                                      (["--"], "no command given"), (["add"], "add needs an instance type")])
def test_missing_command_says_what_was_wrong(tmp_path, args, why):
    """`capctl` alone and `capctl add` alone printed a usage text and exited 2, but no line
    said what was wrong, unlike every other usage error ("capctl: unknown command 'x'"). The
    usage stays, and a last line says it."""
    r = capctl(*args, sock=tmp_path / "none")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith("usage: capctl"), r
    assert r.stderr.splitlines()[-1] == f"capctl: {why}", r.stderr


@pytest.mark.parametrize("args,usage", [
    (["hosts", "add", "--help"], "usage: capctl hosts add NAME [ADDR] | remove NAME | list | clear\n"),
    (["capture", "follow", "--help"], "usage: capctl capture status | rotate | sync | follow [--instance NAME]\n"),
    (["ca", "export", "-h"], "usage: capctl ca export [--der]\n"),
    (["tail", "session", "3", "--help"],
     "usage: capctl tail session ID [--hex|--text|--raw] [--dir c2s|s2c] [--backlog SIZE] | events\n"),
])
def test_help_after_a_sub_command_is_its_usage(tmp_path, args, usage):
    """capctl(1): --help after a command prints its usage line, exit 0. After a sub-command it
    was taken as an argument: `capctl hosts add --help` said "'--help' is not a valid host
    name" and `capture follow --help`, `ca export -h` printed the usage as an error (exit 2).
    The words of the command trace runs stay its own."""
    r = capctl(*args, sock=tmp_path / "none")
    assert (r.returncode, r.stdout, r.stderr) == (0, usage, ""), r
    r = capctl("trace", "--", "sh", "-c", "echo ran", "--help", sock=tmp_path / "none")
    assert "usage" not in r.stdout, r


@pytest.mark.parametrize("arg", ["0x10", "1e1", " 5", "5 ", "+5", "0x1p3"])
def test_timeout_takes_decimal_seconds_only(tmp_path, arg):
    """--timeout went through strtod, which also read "0x10" (16 s), "1e1", " 5" and hex
    floats, where every other number capctl takes is plain decimal: refused, exit 2."""
    r = subprocess.run([str(CAPCTL), "-s", str(tmp_path / "none"), "--timeout", arg, "status"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and r.stderr.startswith(f"capctl: --timeout: '{arg}' is not a number"), r
    r = subprocess.run([str(CAPCTL), "-s", str(tmp_path / "none"), "--timeout", ".5", "status"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "cannot reach capd" in r.stderr, r


@pytest.mark.parametrize("args,opt,of", [
    (["reverse", "--default", "127.0.0.1:9", "--tls", "--tls-passthrough", "a.test"], "--tls-passthrough",
     "forward, socks, http"),
    (["reverse", "--default", "127.0.0.1:9", "--tls", "--no-tls-auto-passthrough"], "--no-tls-auto-passthrough",
     "forward, socks, http"),
    (["dns", "--answer", "a.test=127.0.0.1", "--udp"], "--udp", "forward"),
])
def test_add_option_of_another_type_is_usage_error(tmp_path, args, opt, of):
    """capctl.1: --tls-passthrough and --no-tls-auto-passthrough are not for reverse, but
    capctl sent them on and capd refused them (exit 1, after looking for capd) where every
    other option of the wrong type is capctl's usage error (exit 2); `add reverse --help`
    listed them. Refused before capd is asked, saying which types take the option."""
    r = capctl("add", args[0], "--port", free_port(), *args[1:], sock=tmp_path / "none.sock")
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.splitlines()[-1] == f"capctl: unknown option {opt} for add {args[0]} (an option of {of})", r
    r = capctl("add", args[0], "--help", sock=tmp_path / "none.sock")
    assert r.returncode == 0 and opt not in r.stdout.split("[--name NAME]", 1)[1], r.stdout


def test_capd_stopping_under_a_stream_is_exit_1(capd):
    """capctl(1) EXIT STATUS: a capd that stops while tail events or capture follow reads
    from it ends them with "capd closed the connection" and exit 1 (the page said nothing
    of it: a script could not know whether the stream ended or failed)."""
    before = capd.log().count("control: connection from")
    procs = [subprocess.Popen([str(CAPCTL), "-s", str(capd.sock), *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
             for args in (["tail", "events"], ["capture", "follow"])]
    deadline = time.monotonic() + 10
    while capd.log().count("control: connection from") < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # their requests follow the connections
    assert capd.stop() == 0
    for p in procs:
        try:
            _, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"{p.args} went on after capd stopped")
        assert (p.returncode, err) == (1, "capctl: capd closed the connection\n"), (p.args, p.returncode, err)


def test_list_shows_tls_timeout_and_no_auto_passthrough(capd):
    """capctl list named tls_verify, tls_capture and tls_passthrough when not the
    default, but not tls_timeout nor tls_auto_passthrough = no: two instances that
    behave differently looked the same. They follow in the same style; defaults say
    nothing."""
    capd.ctl("add", "forward", "--port", free_port(), "--name", "f1", "--to", "127.0.0.1:9", "--tls",
             "--no-tls-verify", "--no-tls-auto-passthrough", "--tls-timeout", "5s")
    capd.ctl("add", "socks", "--port", free_port(), "--name", "s1", "--tls-auto", "--tls-timeout", "1500ms")
    capd.ctl("add", "http", "--port", free_port(), "--name", "h1", "--tls", "--tls-timeout", "20")
    rows = {line.split()[0]: line for line in capd.ctl("list").stdout.splitlines()[1:]}
    assert rows["f1"].endswith("  to 127.0.0.1:9, tls yes, verify no, auto passthrough no, timeout 5s"), rows
    assert rows["s1"].endswith("  tls auto, timeout 1.5s"), rows
    assert rows["h1"].endswith("  connect ports 443, tls yes"), rows


@pytest.mark.parametrize("args,why", [
    (["status", "x"], "unexpected argument 'x'"), (["list", "--all"], "unknown option --all"),
    (["reload", "now"], "unexpected argument 'now'"), (["remove"], "remove needs an instance name"),
    (["remove", "a", "b"], "unexpected argument 'b'"), (["kill"], "kill needs a session id"),
    (["kill", "3", "4"], "unexpected argument '4'"), (["sessions", "--bogus"], "unknown option --bogus"),
    (["sessions", "fw"], "unexpected argument 'fw'"),
    (["capture"], "capture needs status, rotate, sync or follow"),
    (["capture", "bogus"], "unknown capture command 'bogus' (status, rotate, sync or follow)"),
    (["capture", "s"], "ambiguous capture command 's' (status, rotate, sync or follow)"),
    (["capture", "status", "x"], "unexpected argument 'x'"), (["capture", "follow", "fw"], "unexpected argument 'fw'"),
    (["tail"], "tail needs session or events"),
    (["tail", "bogus"], "unknown tail command 'bogus' (session or events)"),
    (["tail", "events", "x"], "unexpected argument 'x'"), (["tail", "session"], "tail session needs a session id"),
    (["tail", "session", "3", "--bin"], "unknown option --bin"), (["tail", "session", "3", "4"], "unexpected argument '4'"),
    (["ca"], "ca needs export"), (["ca", "import"], "unknown ca command 'import' (export)"),
    (["ca", "export", "--pem"], "unknown option --pem"),
    (["hosts"], "hosts needs add, remove, list or clear"), (["hosts", "add"], "hosts add needs a name"),
    (["hosts", "add", "a.test", "::1", "x"], "unexpected argument 'x'"),
    (["hosts", "remove"], "hosts remove needs a name"), (["hosts", "list", "x"], "unexpected argument 'x'"),
    (["hosts", "clear", "x"], "unexpected argument 'x'"),
])
def test_bad_call_says_what_was_wrong(tmp_path, args, why):
    """capctl(1) walked command by command: a bad call of most commands printed only
    "capctl: usage: ..." (exit 2) — `capctl capture bogus`, `capctl list --all`,
    `capctl kill 3 4`, `capctl ca export --pem` — without saying which word was wrong,
    unlike `capctl hosts bogus` and `capctl add`. The usage line stays, and a last line
    says what was wrong (an unknown sub-command alone, naming the valid ones, as hosts)."""
    r = capctl(*args, sock=tmp_path / "none")
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.splitlines()[-1] == f"capctl: {why}", r.stderr
    assert "cannot reach" not in r.stderr, r.stderr


@pytest.mark.parametrize("flags,why", [
    (["--tls", "--tls-auto"], "--tls-auto conflicts with --tls given before it"),
    (["--tls-auto", "--tls"], "--tls conflicts with --tls-auto given before it"),
])
def test_add_conflicting_tls_flags_refused(tmp_path, flags, why):
    """`capctl add socks --port P --tls --tls-auto` added an instance in tls = auto: the
    last of two contradicting flags silently won, and the admin who meant --tls got
    connections that do not start with a ClientHello passed through uncaptured. Both
    set the key tls; together they are a usage error that names the two. Refused by
    capctl itself, before any capd is asked."""
    r = capctl("add", "socks", "--port", "1080", *flags, sock=tmp_path / "none")
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.splitlines()[-1] == f"capctl: {why}", r.stderr
    assert "cannot reach" not in r.stderr, r.stderr


def test_list_shows_capture_and_timeouts_as_added(capd):
    """`capctl add socks --no-capture --idle-timeout 5s --connect-timeout 1500ms` worked,
    but `capctl list` showed none of the three, table or --json: the instance looked
    like one of every default. The table's INFO names them when not the default (0 for
    connect_timeout as "none"); --json has idle_timeout and connect_timeout always."""
    capd.ctl("add", "socks", "--port", free_port(), "--name", "s1", "--no-capture", "--idle-timeout", "5s",
             "--connect-timeout", "1500ms")
    capd.ctl("add", "forward", "--port", free_port(), "--name", "f1", "--to", "127.0.0.1:9",
             "--connect-timeout", "0")
    capd.ctl("add", "http", "--port", free_port(), "--name", "h1")
    rows = {line.split()[0]: line for line in capd.ctl("list").stdout.splitlines()[1:]}
    assert rows["s1"].endswith("  no capture, idle timeout 5s, connect timeout 1.5s"), rows
    assert rows["f1"].endswith("  to 127.0.0.1:9, connect timeout none"), rows
    assert rows["h1"].endswith("  connect ports 443"), rows
    got = {i["name"]: i for i in capd.ctl("list", json_out=True)}
    assert (got["s1"]["capture"], got["s1"]["idle_timeout"], got["s1"]["connect_timeout"]) == (False, 5, 1.5)
    assert (got["h1"]["capture"], got["h1"]["idle_timeout"], got["h1"]["connect_timeout"]) == (True, 0, 10)


def test_add_bad_auth_never_shows_the_password(tmp_path):
    """`--auth :pw` printed "bad ':pw'", echoing the password to the terminal (and to a
    CI's log), where capd names the user alone. capctl now says what is wrong without
    the value: an empty user name, or no ':' (so the whole value may be the password)."""
    for bad, why in ((":s3cret-pw", "--auth: the user name is empty: expected user:password"),
                     ("s3cret-pw", "--auth: bad value (no ':', so not shown): expected user:password")):
        for typ in ("socks", "http"):
            r = capctl("add", typ, "--port", free_port(), "--auth", bad, sock=tmp_path / "none")
            assert r.returncode == 2, (r.returncode, r.stderr)
            assert why in r.stderr and "s3cret" not in r.stderr + r.stdout, r.stderr


def test_add_help_shows_required_options_and_their_values(tmp_path):
    """`capctl add forward --help` showed "[--to X]" and `add sniff --help`
    "[--interface X]": bracketed as if optional, though capctl refuses the command
    without them ("add forward needs --to HOST:PORT"), and every value as X. The two
    are now unbracketed, as capctl(1) has them, and each value is named (HOST:PORT,
    SIZE, T), a repeatable one with "..."."""
    out = {}
    for typ in ADD_TYPES:
        r = capctl("add", typ, "--help", sock=tmp_path / "none.sock")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        out[typ] = r.stdout
        assert not re.search(r" X[] ]", r.stdout), r.stdout
    assert " --to HOST:PORT " in out["forward"] and "[--to" not in out["forward"], out["forward"]
    assert " --interface IFACE " in out["sniff"] and "[--interface" not in out["sniff"], out["sniff"]
    assert "[--route PATTERN[/PATH]=HOST:PORT ...] [--default HOST:PORT]" in out["reverse"], out["reverse"]
    assert "[--answer PATTERN=ADDR ...] [--upstream HOST[:PORT]]" in out["dns"], out["dns"]
    assert "[--max-header-size SIZE] [--header-timeout T]" in out["http"], out["http"]
    # the line a mistake prints is the same one, before the reason
    r = capctl("add", "forward", "--port", "1", sock=tmp_path / "none.sock")
    assert r.returncode == 2 and r.stderr == out["forward"] + "capctl: add forward needs --to HOST:PORT\n", r.stderr


@pytest.mark.parametrize("typ", ["socks", "http"])
def test_add_users_link_keeps_its_name(capd, tmp_path, typ):
    """capctl sent a relative --users FILE through realpath(3), so capd named the link's
    target (and an absolute one as it was typed), where a config file's users = FILE is
    made absolute and cleaned but keeps the link's name (path_clean). capctl now sends
    that same path; capd's message about the file shows it."""
    work = tmp_path / "work"
    (work / "real").mkdir(parents=True)
    (work / "real" / "users.txt").write_text("bob:one\nnocolon\n")
    (work / "link.txt").symlink_to("real/users.txt")
    for users in ("link.txt", "./real/../link.txt", f"{work}//./link.txt"):
        r = capctl("add", typ, "--port", free_port(), "--users", users, sock=capd.sock, cwd=work)
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith(f"capctl: {work}/link.txt:2: expected name:password"), (users, r.stderr)
    assert capd.ctl("list", json_out=True) == []
