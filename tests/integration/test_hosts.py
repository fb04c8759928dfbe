"""Hosts-file redirection (issue 6): capctl hosts add/remove/list/clear against
a temp hosts file, lines outside capd's block untouched byte for byte, bad
names and addresses refused, restore at a clean stop, a dropped block put
back; and the real resolver (getent) inside a private mount namespace with a
bind-mounted /etc/hosts, which takes the in-place (EBUSY) path."""

import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from conftest import CAPCTL, CAPD

BEGIN = "# BEGIN capd: entries managed by capd (capctl hosts); do not edit"
END = "# END capd"
ORIG = b"127.0.0.1\tlocalhost\r\n# keep me as I am  \n\n::1 ip6-localhost ip6-loopback\n10.0.0.1 tail-entry"


@pytest.fixture
def hostsd(capd_factory, tmp_path):
    path = tmp_path / "hosts"
    path.write_bytes(ORIG)
    os.chmod(path, 0o640)
    c = capd_factory(settings=f"hosts_file = {path}")
    c.hosts = path
    return c


def block(*entries):
    return (BEGIN + "\n" + "".join(f"{a}\t{n}\n" for n, a in entries) + END + "\n").encode()



def test_reload_keeps_the_hosts_file_in_use(hostsd, tmp_path):
    """hosts_file changes only at restart: a reload naming another file leaves capd
    editing the one that holds its block, so the clean stop still takes the block away."""
    c, path = hostsd, hostsd.hosts
    c.ctl("hosts", "add", "www.example.test")
    other = tmp_path / "other-hosts"
    other.write_bytes(ORIG)
    c.write_conf(settings=f"hosts_file = {other}")
    c.ctl("reload")
    assert "hosts_file changes only at restart" in c.log()
    c.ctl("hosts", "add", "api.example.test")
    assert b"api.example.test" in path.read_bytes() and other.read_bytes() == ORIG
    assert c.stop() == 0
    assert b"example.test" not in path.read_bytes()  # no block left behind in the file capd wrote


def test_add_list_remove_clear(hostsd):
    c, path = hostsd, hostsd.hosts
    ino = path.stat().st_ino
    r = c.ctl("hosts", "add", "www.example.com")
    assert r.stdout.strip() == "www.example.com -> 127.0.0.1"
    assert path.stat().st_ino != ino  # replaced by a rename, not rewritten
    c.ctl("hosts", "add", "v6.test", "::1")
    c.ctl("hosts", "add", "other.test", "10.1.2.3")
    assert c.ctl("hosts", "list", json_out=True) == [
        {"name": "www.example.com", "addr": "127.0.0.1"},
        {"name": "v6.test", "addr": "::1"},
        {"name": "other.test", "addr": "10.1.2.3"},
    ]
    text = path.read_bytes()
    # the old text is kept byte for byte; the last line got the newline it lacked
    assert text == ORIG + b"\n" + block(("www.example.com", "127.0.0.1"), ("v6.test", "::1"), ("other.test", "10.1.2.3"))
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640  # the mode survives
    # adding a name again changes its address (of that family) in place
    c.ctl("hosts", "add", "v6.test", "::9")
    assert path.read_bytes() == ORIG + b"\n" + block(("www.example.com", "127.0.0.1"), ("v6.test", "::9"),
                                                     ("other.test", "10.1.2.3"))
    table = c.ctl("hosts", "list").stdout
    assert "NAME" in table and "v6.test" in table and "::9" in table
    c.ctl("hosts", "remove", "v6.test")
    assert path.read_bytes() == ORIG + b"\n" + block(("www.example.com", "127.0.0.1"), ("other.test", "10.1.2.3"))
    r = c.ctl("hosts", "remove", "v6.test", check=False)
    assert r.returncode == 1 and "no hosts entry for v6.test" in r.stderr
    r = c.ctl("hosts", "clear", json_out=True)
    assert r["removed"] == 2
    assert path.read_bytes() == ORIG + b"\n"
    assert c.ctl("hosts", "list", json_out=True) == []
    # lines after the block stay after it
    path.write_bytes(ORIG + b"\n")
    c.ctl("hosts", "add", "a.test")
    with open(path, "ab") as f:
        f.write(b"192.0.2.1 after.test\n")
    c.ctl("hosts", "add", "b.test", "10.0.0.2")
    assert path.read_bytes() == ORIG + b"\n" + block(("a.test", "127.0.0.1"), ("b.test", "10.0.0.2")) + \
        b"192.0.2.1 after.test\n"
    assert c.ctl("hosts", "clear").stdout == "removed 2 entries\n"
    assert path.read_bytes() == ORIG + b"\n192.0.2.1 after.test\n"
    c.ctl("hosts", "add", "a.test")
    assert c.ctl("hosts", "clear").stdout == "removed 1 entry\n"


def test_bad_names_and_addresses_refused(hostsd):
    c, path = hostsd, hostsd.hosts
    for args in (["add", "bad_name!"], ["add", "*.wild.test"], ["add", "a..b"], ["add", "-x.test"],
                 ["add", "1.2.3.4"], ["add", "ok.test", "1.2.3"], ["add", "ok.test", "::g"],
                 ["add", "ok.test", "host.test"], ["add", "ok.test", "1.2.3.4:80"], ["remove", "bad name"],
                 ["add"], ["remove"], ["frobnicate"], ["add", "a.test", "1.1.1.1", "extra"]):
        r = c.ctl("hosts", *args, check=False)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.splitlines()[-1].startswith("capctl: "), r.stderr  # what was wrong, last
    # capd checks too, for clients other than capctl
    for params in ({"name": "bad_name!"}, {"name": "ok.test", "addr": "999.1.1.1"}, {"addr": "1.1.1.1"},
                   {"name": "x.test.."}):
        rep = c.rpc("hosts.add", params)
        assert "error" in rep and rep["error"]["message"], rep
    assert path.read_bytes() == ORIG


def test_adding_an_entry_that_is_there_says_so(hostsd):
    """Regression (hosts add of a line that exists): adding a name with the address it already
    had changed nothing and said nothing, as if it had been added (capd logged it so too). It
    still changes nothing and exits 0, and says so; a new address says what it replaced."""
    c, path = hostsd, hostsd.hosts
    c.ctl("hosts", "add", "a.test")
    before, ino = path.read_bytes(), path.stat().st_ino
    for args in (["a.test"], ["a.test", "127.0.0.1"], ["A.Test", "127.0.0.1"]):  # names have no case
        r = c.ctl("hosts", "add", *args)
        assert r.stdout.strip() == f"{args[0]} -> 127.0.0.1", r.stdout
        assert r.stderr.strip() == f"capctl: {args[0]} pointed at 127.0.0.1 already; nothing changed", r.stderr
    assert path.read_bytes() == before and path.stat().st_ino == ino
    assert c.ctl("hosts", "add", "a.test", json_out=True) == {
        "name": "a.test", "addr": "127.0.0.1", "file": str(path), "already": True, "previous": "127.0.0.1",
        "kept": []}
    r = c.ctl("hosts", "add", "a.test", "127.0.0.2")
    assert r.stdout.strip() == "a.test -> 127.0.0.2 (was 127.0.0.1)" and r.stderr == ""
    assert c.ctl("hosts", "add", "b.test", json_out=True) == {
        "name": "b.test", "addr": "127.0.0.1", "file": str(path), "already": False, "previous": None, "kept": []}
    assert path.read_bytes() == ORIG + b"\n" + block(("a.test", "127.0.0.2"), ("b.test", "127.0.0.1"))
    assert "a.test -> 127.0.0.1 in" in c.log() and "a.test -> 127.0.0.1 already in" in c.log()


def test_a_line_before_the_block_that_maps_the_name_is_told(hostsd):
    """Regression: `hosts add NAME` when a line before capd's block maps NAME already
    (a pinned server) said NAME -> ADDR and exited 0, but resolvers take the first line:
    getent hosts and getaddrinfo's first address stayed the pinned one. The entry is still
    written (capd never touches lines outside its block); capctl now warns, --json says
    "shadowed", and capd logs it. The same address there is no conflict and no warning."""
    c, path = hostsd, hostsd.hosts
    path.write_bytes(ORIG + b"\n192.0.2.80  www.example.test  www  # pinned\n")
    r = c.ctl("hosts", "add", "WWW.example.test", "10.1.2.3")
    assert r.stdout.strip() == "WWW.example.test -> 10.1.2.3"
    assert r.stderr == (f"capctl: warning: line 6 of {path} maps WWW.example.test to 192.0.2.80 before capd's "
                        "block, and resolvers take that one\n"), r.stderr
    assert c.ctl("hosts", "add", "www", "10.1.2.4", json_out=True)["shadowed"] == {"line": 6, "addr": "192.0.2.80"}
    assert "maps www to 192.0.2.80 before capd's block" in c.log()
    r = c.ctl("hosts", "add", "www", "192.0.2.80")
    assert r.stderr == "" and "shadowed" not in c.ctl("hosts", "add", "www", "192.0.2.80", json_out=True)
    r = c.ctl("hosts", "add", "new.test")
    assert r.stderr == ""
    assert b"10.1.2.3\tWWW.example.test\n" in path.read_bytes()  # written all the same


def test_damaged_block_is_not_guessed(hostsd):
    c, path = hostsd, hostsd.hosts
    damaged = ORIG + b"\n# BEGIN capd\n127.0.0.1 half.test\n"
    path.write_bytes(damaged)
    r = c.ctl("hosts", "add", "x.test", check=False)
    assert r.returncode == 1 and "without" in r.stderr
    assert path.read_bytes() == damaged


def test_unreadable_file_is_no_empty_list(hostsd):
    """Regression (hosts list of a file capd cannot read): a hosts_file that is a directory
    listed as no entries and exited 0, while add on it failed. Only a file that does not
    exist has no entries; one that cannot be read is an error, as for add."""
    c, path = hostsd, hostsd.hosts
    c.ctl("hosts", "add", "a.test")
    path.rename(path.with_name("hosts.saved"))
    path.mkdir()
    r = c.ctl("hosts", "list", check=False)
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert f"cannot read {path}: Is a directory" in r.stderr, r.stderr
    path.rmdir()
    assert c.ctl("hosts", "list", json_out=True) == []  # no file: no entries
    path.with_name("hosts.saved").rename(path)
    assert c.ctl("hosts", "list", json_out=True) == [{"name": "a.test", "addr": "127.0.0.1"}]


def test_symlink_to_a_missing_file_is_kept(capd_factory, tmp_path):
    """Regression (hosts_file a symlink whose file is not there yet): realpath failed, capd
    wrote to the link's own path, and the rename replaced the symlink with a regular file;
    the file it pointed at was never made. The file is made where the link points now,
    through a chain of links, relative ones too."""
    (tmp_path / "gen").mkdir()
    link, mid = tmp_path / "hosts", tmp_path / "gen" / "mid"
    mid.symlink_to("hosts.real")  # relative to gen/
    link.symlink_to(mid)
    c = capd_factory(settings=f"hosts_file = {link}")
    c.ctl("hosts", "add", "a.test")
    assert link.is_symlink() and mid.is_symlink()
    assert (tmp_path / "gen" / "hosts.real").read_bytes() == block(("a.test", "127.0.0.1"))
    assert c.ctl("hosts", "list", json_out=True) == [{"name": "a.test", "addr": "127.0.0.1"}]
    assert c.stop() == 0  # hosts_restore takes the block away where it is
    assert link.is_symlink() and (tmp_path / "gen" / "hosts.real").read_bytes() == b""


def test_restore_at_clean_stop(capd_factory, tmp_path):
    path = tmp_path / "hosts"
    path.write_bytes(ORIG)
    c = capd_factory(settings=f"hosts_file = {path}")
    c.ctl("hosts", "add", "gone.test")
    assert b"gone.test" in path.read_bytes()
    assert c.stop() == 0
    assert path.read_bytes() == ORIG + b"\n"
    # hosts_restore = no: the block outlives capd, and the next capd adopts it
    c2 = capd_factory(settings=f"hosts_file = {path}\nhosts_restore = no")
    c2.ctl("hosts", "add", "kept.test")
    assert c2.stop() == 0
    assert block(("kept.test", "127.0.0.1")) in path.read_bytes()
    c3 = capd_factory(settings=f"hosts_file = {path}")
    assert c3.ctl("hosts", "list", json_out=True) == [{"name": "kept.test", "addr": "127.0.0.1"}]
    assert c3.stop() == 0
    assert path.read_bytes() == ORIG + b"\n"


def test_dropped_block_is_put_back(hostsd):
    c, path = hostsd, hostsd.hosts
    c.ctl("hosts", "add", "first.test")
    # another program rewrites the file without capd's block
    path.write_bytes(ORIG + b"\n10.9.9.9 written-by-someone-else\n")
    c.ctl("hosts", "add", "second.test")
    assert path.read_bytes() == ORIG + b"\n10.9.9.9 written-by-someone-else\n" + \
        block(("first.test", "127.0.0.1"), ("second.test", "127.0.0.1"))


def test_dropped_block_comes_back_by_itself(hostsd):
    c, path = hostsd, hostsd.hosts
    c.ctl("hosts", "add", "watched.test", "10.0.0.3")
    rewritten = ORIG + b"\n10.9.9.9 rewritten-by-a-runtime\n"
    path.write_bytes(rewritten)
    want = rewritten + block(("watched.test", "10.0.0.3"))
    deadline = time.time() + 8
    while path.read_bytes() != want and time.time() < deadline:
        time.sleep(0.1)
    assert path.read_bytes() == want
    while "put back" not in c.log() and time.time() < deadline + 2:
        time.sleep(0.05)  # the log line follows the write
    assert "put back" in c.log()
    # after clear capd leaves the file alone
    c.ctl("hosts", "clear")
    path.write_bytes(ORIG)
    time.sleep(2.5)
    assert path.read_bytes() == ORIG


def test_failed_add_does_not_come_back(capd_factory, tmp_path):
    """Regression: capd took a new entry set as written before the write, so an add that failed
    came back with the next edit. The write fails here because the file's name is so long that
    the temp file beside it cannot be named (ENAMETOOLONG; chattr +i does it too, but needs root)."""
    unwritable = tmp_path / ("h" * 250)
    unwritable.write_bytes(ORIG)
    writable = tmp_path / "hosts-ok"
    writable.write_bytes(ORIG)
    link = tmp_path / "hosts"
    link.symlink_to(unwritable)
    c = capd_factory(settings=f"hosts_file = {link}")
    r = c.ctl("hosts", "add", "ghost.test", check=False)
    assert r.returncode == 1 and "cannot write a temp file" in r.stderr, r.stderr
    assert unwritable.read_bytes() == ORIG
    link.unlink()
    link.symlink_to(writable)  # the same hosts_file, writable again
    c.ctl("hosts", "add", "real.test")
    assert writable.read_bytes() == ORIG + b"\n" + block(("real.test", "127.0.0.1"))
    assert c.ctl("hosts", "list", json_out=True) == [{"name": "real.test", "addr": "127.0.0.1"}]


# Appends a line to argv[1] about every millisecond until argv[2] exists, then prints how many:
# as a careful editor does, under the file's flock, on the file the path names once it has it.
APPENDER = r"""
import fcntl, os, sys, time
path, stop = sys.argv[1], sys.argv[2]
n = 0
while not os.path.exists(stop):
    line = f"10.77.{n // 250 % 250}.{n % 250 + 1}\tappended-{n}.test\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    fcntl.flock(fd, fcntl.LOCK_EX)
    if os.fstat(fd).st_ino != os.stat(path).st_ino:
        os.close(fd)  # replaced while we waited for the lock: the new file it is
        continue
    os.write(fd, line)
    os.close(fd)
    n += 1
    time.sleep(0.001)
print(n)
"""


def test_lines_appended_during_edits_are_kept(hostsd, tmp_path):
    """Regression: an edit read the file, wrote a temp copy and renamed it over the original
    without its lock, so lines another program appended meanwhile were lost (81 of 6642 over
    100 adds). capd now holds the file's flock from its read to the rename, so a writer that
    takes it too loses nothing (one that does not is caught by a check before the rename,
    bar a last moment that cannot be closed without the lock)."""
    c, path = hostsd, hostsd.hosts
    path.write_bytes(ORIG + b"\n")
    stop = tmp_path / "stop-appending"
    p = subprocess.Popen([sys.executable, "-c", APPENDER, str(path), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.05)
        for i in range(100):
            c.ctl("hosts", "add", f"n{i}.test")
    finally:
        stop.touch()
        out, _ = p.communicate(timeout=10)
    n = int(out)
    assert n > 100  # the appender ran all along
    text = path.read_bytes()
    lost = [i for i in range(n) if f"\tappended-{i}.test\n".encode() not in text]
    assert not lost, f"{len(lost)} of {n} appended lines lost: {lost[:10]}"
    assert text.startswith(ORIG + b"\n")
    assert [e["name"] for e in c.ctl("hosts", "list", json_out=True)] == [f"n{i}.test" for i in range(100)]
    assert not [f for f in os.listdir(path.parent) if ".capd-" in f]  # no temp file left behind


# The start of a script run in a mount namespace ($1 its folder, $2 capd, $3
# capctl): a private /etc (copies of what the resolver and the loader read) so
# no write lands in the real one; the script then writes $T/etc/hosts and binds it.
PRIVATE_ETC = r"""
set -e
T="$1"; CAPD="$2"; CAPCTL="$3"
mkdir -p "$T/etc"
for f in ld.so.cache ld.so.conf nsswitch.conf host.conf passwd group gai.conf; do
  [ -e "/etc/$f" ] && cp -a "/etc/$f" "$T/etc/" || true
done
# names not in hosts go to loopback, where nothing answers: no query leaves the box
printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' > "$T/etc/resolv.conf"
[ -d /etc/ld.so.conf.d ] && cp -a /etc/ld.so.conf.d "$T/etc/" || true
"""

NS_SCRIPT = PRIVATE_ETC + r"""
printf '127.0.0.1\tlocalhost\n# outside the block\n' > "$T/etc/hosts"
printf '127.0.0.1\tlocalhost\n# outside the block\n' > "$T/hosts.mounted"
mount --bind "$T/etc" /etc
mount --bind "$T/hosts.mounted" /etc/hosts
echo "before: $(getent hosts www.example.com || echo none)"
"$CAPD" -c "$T/capd.conf" > "$T/capd.log" 2>&1 &
PID=$!
for i in $(seq 100); do [ -S "$T/capd.sock" ] && break; sleep 0.05; done
"$CAPCTL" -s "$T/capd.sock" hosts add www.example.com
echo "after: $(getent hosts www.example.com)"
"$CAPCTL" -s "$T/capd.sock" hosts add v6.example.com ::1
echo "v6: $(getent ahosts v6.example.com | head -1)"
ls -a /etc | grep -c 'capd-backup' | sed 's/^/backups: /'
kill -TERM $PID
wait $PID && echo "capd exit: 0" || echo "capd exit: $?"
echo "stopped: $(getent hosts www.example.com || echo none)"
echo "--- hosts"
cat /etc/hosts
"""


def in_mount_ns(tmp_path, script, settings=""):
    """Runs script (sh; $1 the folder, $2 capd, $3 capctl) in a private mount namespace,
    where it binds a hosts file of the test's over /etc/hosts and starts capd on
    /etc/hosts with settings; returns (its stdout, everything to show on a failure)."""
    (tmp_path / "capd.conf").write_text(
        "[capd]\n"
        f"control = {tmp_path}/capd.sock\nspool = {tmp_path}/spool\nstate_dir = {tmp_path}/state\n"
        "hosts_file = /etc/hosts\n" + settings)
    (tmp_path / "ns.sh").write_text(script)
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", str(tmp_path / "ns.sh"), str(tmp_path),
                        str(CAPD), str(CAPCTL)], capture_output=True, text=True, timeout=60)
    log = (tmp_path / "capd.log").read_text() if (tmp_path / "capd.log").exists() else ""
    assert r.returncode == 0, r.stdout + r.stderr + log
    return r.stdout, log


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_real_resolver_in_a_mount_namespace(tmp_path):
    """Regression for issue 6: a bind-mounted /etc/hosts cannot be renamed over (EBUSY):
    capd rewrites it in place under flock after a backup, and getent sees the entry."""
    out, log = in_mount_ns(tmp_path, NS_SCRIPT, "log_level = debug\n")
    assert "before: none" in out, out
    assert "after: 127.0.0.1" in out and "www.example.com" in out, out + log
    assert "v6: ::1" in out, out + log
    assert "backups: 1" in out, out  # the in-place path saved the old text first
    assert "capd exit: 0" in out, out + log
    assert "stopped: none" in out, out + log  # hosts_restore removed the block at the clean stop
    assert out.split("--- hosts\n", 1)[1] == "127.0.0.1\tlocalhost\n# outside the block\n", out
    # the backup went to the private /etc, and the real one was never touched
    assert (tmp_path / "etc" / "hosts.capd-backup").exists()
    assert not os.path.exists("/etc/hosts.capd-backup")


def test_long_line_in_the_block_is_read_whole(capd_factory, tmp_path):
    """Regression: capd read each line of its block into 1024 bytes, so a line a person
    wrote there with many names (60 here, 1259 bytes) lost the names past the cut, and the
    one cut through ("name04") became an entry of its own: the next add wrote both into
    the file. A name cut at that size before the block (one such line) was matched too."""
    path = tmp_path / "hosts"
    names = [f"name{i:03d}.example.test" for i in range(60)]
    line = "10.0.0.1 " + " ".join(names)
    before = "10.0.0.9 " + " ".join(["x" * 60 + f"{i}.test" for i in range(15)]) + " zz.test\n"
    cut = before[:1023].split()[-1]  # the name the old code saw at the end of that line
    path.write_text(before + f"{BEGIN}\n{line}\n{END}\n")
    c = capd_factory(settings=f"hosts_file = {path}")
    assert [e["name"] for e in c.ctl("hosts", "list", json_out=True)] == names
    r = c.ctl("hosts", "add", "new.test", json_out=True)
    assert "shadowed" not in r
    r = c.ctl("hosts", "add", cut, "10.1.1.1", json_out=True)
    assert "shadowed" not in r, (cut, r)
    text = path.read_text()
    assert text.startswith(before)
    assert [ln.split("\t")[1] for ln in text.splitlines()[2:-1]] == names + ["new.test", cut]


def test_name_resolvers_read_as_an_address_refused(hostsd):
    """Regression: `capctl hosts add 1.2.3` said "1.2.3 -> 127.0.0.1" and wrote the line, but
    getaddrinfo reads such a name as an IPv4 address (inet_aton: 1.2.3 is 1.2.0.3, 123 is
    0.0.0.123, 0x7f.1 is 127.0.0.1) and never looks in the hosts file: the entry could
    never work. capctl and capd refuse it now, naming the address resolvers see."""
    c, path = hostsd, hostsd.hosts
    r = subprocess.run(["getent", "ahostsv4", "1.2.3"], capture_output=True, text=True)
    assert r.stdout.split()[:1] == ["1.2.0.3"]  # no lookup at all: the hosts file cannot change it
    for name, seen in (("1.2.3", "1.2.0.3"), ("123", "0.0.0.123"), ("0x7f.1", "127.0.0.1")):
        r = c.ctl("hosts", "add", name, check=False)
        assert r.returncode == 2 and f"resolvers read it as the address {seen}" in r.stderr, (name, r.stderr)
        rep = c.rpc("hosts.add", {"name": name})
        assert f"resolvers read it as the address {seen}" in rep["error"]["message"], rep
    assert path.read_bytes() == ORIG
    c.ctl("hosts", "add", "1.2.3.test")  # digits in a name are fine
    c.ctl("hosts", "add", "123abc")
    assert [e["name"] for e in c.ctl("hosts", "list", json_out=True)] == ["1.2.3.test", "123abc"]


def test_bracketed_ipv4_address_refused(hostsd):
    """Regression: `capctl hosts add x.test '[1.2.3.4]'` was taken quietly as 1.2.3.4 (capctl
    and capd both stripped the brackets whatever they held). Brackets are for IPv6 (RFC 3986
    IP-literal; capd's listen and upstream refuse [1.2.3.4] too): refused, saying so; an IPv6
    address in brackets still works."""
    c, path = hostsd, hostsd.hosts
    r = c.ctl("hosts", "add", "x.test", "[1.2.3.4]", check=False)
    assert r.returncode == 2 and "brackets are for IPv6 only" in r.stderr, r.stderr
    rep = c.rpc("hosts.add", {"name": "x.test", "addr": "[1.2.3.4]"})
    assert "brackets are for IPv6 (write 1.2.3.4)" in rep["error"]["message"], rep
    assert path.read_bytes() == ORIG
    assert c.ctl("hosts", "add", "x.test", "[::1]").stdout.strip() == "x.test -> ::1"
    assert path.read_bytes() == ORIG + b"\n" + block(("x.test", "::1"))


TWO_LINES_SCRIPT = PRIVATE_ETC + r"""
cp "$T/hosts.start" "$T/etc/hosts"
mount --bind "$T/etc" /etc
echo "before: $(getent ahosts web.test | cut -d' ' -f1 | sort -u | tr '\n' ' ')"
"$CAPD" -c "$T/capd.conf" > "$T/capd.log" 2>&1 &
PID=$!
for i in $(seq 100); do [ -S "$T/capd.sock" ] && break; sleep 0.05; done
"$CAPCTL" -s "$T/capd.sock" hosts add other.test
echo "after: $(getent ahosts web.test | cut -d' ' -f1 | sort -u | tr '\n' ' ')"
"$CAPCTL" -s "$T/capd.sock" hosts list
"$CAPCTL" -s "$T/capd.sock" hosts add web.test 10.0.0.9
echo "replaced: $(getent ahosts web.test | cut -d' ' -f1 | sort -u | tr '\n' ' ')"
kill -TERM $PID
wait $PID || true
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_two_lines_for_one_name_survive_an_edit(tmp_path):
    """Regression: a block where a person wrote two lines for one name (an IPv4 and an IPv6
    address, as /etc/hosts allows; getent ahosts gives both) was read as one address per name,
    the last line winning, and the next capctl edit of another name wrote the block back
    without the IPv4 line. Every line is kept now; adding that name itself points it at the
    address given for that address's family (and says which it had, and which line of the
    other family stays)."""
    (tmp_path / "hosts.start").write_text(
        f"127.0.0.1\tlocalhost\n{BEGIN}\n10.0.0.5\tweb.test\nfd00::5\tweb.test\n{END}\n")
    out, log = in_mount_ns(tmp_path, TWO_LINES_SCRIPT)
    assert "before: 10.0.0.5 fd00::5 \n" in out, out
    assert "after: 10.0.0.5 fd00::5 \n" in out, out + log
    assert [ln.split() for ln in out.splitlines() if ln.startswith("web.test") and "->" not in ln] == [
        ["web.test", "10.0.0.5"], ["web.test", "fd00::5"]], out
    assert "web.test -> 10.0.0.9 (was 10.0.0.5), keeps fd00::5 for IPv6" in out, out
    assert "replaced: 10.0.0.9 fd00::5 \n" in out, out + log


def test_longest_ipv6_address_in_brackets(hostsd):
    """Regression: capd refused an address longer than 46 bytes before taking its brackets
    off, so the longest IPv6 text (45 bytes) in brackets was 'not an IP address'."""
    c, path = hostsd, hostsd.hosts
    r = c.ctl("hosts", "add", "long.test", "[0000:0000:0000:0000:0000:ffff:255.255.255.255]")
    assert r.stdout.strip() == "long.test -> ::ffff:255.255.255.255"
    assert path.read_bytes() == ORIG + b"\n" + block(("long.test", "::ffff:255.255.255.255"))


PAIR_SCRIPT = PRIVATE_ETC + r"""
printf '127.0.0.1\tlocalhost\n' > "$T/etc/hosts"
mount --bind "$T/etc" /etc
"$CAPD" -c "$T/capd.conf" > "$T/capd.log" 2>&1 &
PID=$!
for i in $(seq 100); do [ -S "$T/capd.sock" ] && break; sleep 0.05; done
seen() { echo "$1: $(getent ahosts pair.test | cut -d' ' -f1 | sort -u | tr '\n' ' ')"; }
"$CAPCTL" -s "$T/capd.sock" hosts add pair.test
seen v4
"$CAPCTL" -s "$T/capd.sock" hosts add pair.test ::1
seen pair
"$CAPCTL" -s "$T/capd.sock" hosts add pair.test 127.0.0.2
seen v4-replaced
"$CAPCTL" -s "$T/capd.sock" hosts add pair.test ::2
seen v6-replaced
"$CAPCTL" -s "$T/capd.sock" hosts remove pair.test
seen removed
kill -TERM $PID
wait $PID || true
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_add_of_one_family_keeps_the_other(tmp_path):
    """Regression: `hosts add NAME ADDR` replaced every line of NAME in capd's block, so capctl
    alone could not give a name an IPv4 and an IPv6 address (getent ahosts gave only the last
    one added), and an IPv4 add left no trace of what it did to the IPv6 line. An add replaces
    only NAME's lines of ADDR's family and says which line of the other family stays; remove
    takes them all. Shown with the real resolver on a hosts file bound over a private /etc."""
    out, log = in_mount_ns(tmp_path, PAIR_SCRIPT, "hosts_restore = no\n")
    assert out.splitlines() == [
        "pair.test -> 127.0.0.1", "v4: 127.0.0.1 ",
        "pair.test -> ::1, keeps 127.0.0.1 for IPv4", "pair: 127.0.0.1 ::1 ",
        "pair.test -> 127.0.0.2 (was 127.0.0.1), keeps ::1 for IPv6", "v4-replaced: 127.0.0.2 ::1 ",
        "pair.test -> ::2 (was ::1), keeps 127.0.0.2 for IPv4", "v6-replaced: 127.0.0.2 ::2 ",
        "removed pair.test", "removed: "], out + log


def test_add_of_one_family_keeps_the_other_in_the_file(hostsd):
    """The same, in the file and in --json: `previous` is what the add replaced (its family's
    lines), `kept` the other family's addresses that stay; a line of the new family goes
    right after the name's line."""
    c, path = hostsd, hostsd.hosts
    c.ctl("hosts", "add", "pair.test", "::1")
    c.ctl("hosts", "add", "z.test")
    assert c.ctl("hosts", "add", "pair.test", "10.0.0.1", json_out=True) == {
        "name": "pair.test", "addr": "10.0.0.1", "file": str(path), "already": False, "previous": None,
        "kept": ["::1"]}
    assert path.read_bytes() == ORIG + b"\n" + block(("pair.test", "::1"), ("pair.test", "10.0.0.1"),
                                                     ("z.test", "127.0.0.1"))
    assert c.ctl("hosts", "add", "pair.test", "[::2]", json_out=True) == {
        "name": "pair.test", "addr": "::2", "file": str(path), "already": False, "previous": "::1",
        "kept": ["10.0.0.1"]}
    r = c.ctl("hosts", "add", "pair.test", "10.0.0.1")
    assert r.stdout == "pair.test -> 10.0.0.1, keeps ::2 for IPv6\n"
    assert r.stderr == "capctl: pair.test pointed at 10.0.0.1 already; nothing changed\n"
    assert path.read_bytes() == ORIG + b"\n" + block(("pair.test", "::2"), ("pair.test", "10.0.0.1"),
                                                     ("z.test", "127.0.0.1"))
    assert c.ctl("hosts", "remove", "pair.test").stdout == "removed pair.test\n"
    assert path.read_bytes() == ORIG + b"\n" + block(("z.test", "127.0.0.1"))


def test_unknown_params_of_hosts_methods_refused(hostsd):
    """Regression: hosts.add/remove/list/clear took any params key and ignored the rest, so
    {"name": "a.test"} sent to hosts.clear (meaning one name) cleared every entry, and a
    misspelt {"address": "10.0.0.1"} to hosts.add pointed the name at 127.0.0.1 and said
    so as a success. Keys a method does not take are refused (-32602) and nothing changes,
    as for the other methods."""
    c, path = hostsd, hostsd.hosts
    c.ctl("hosts", "add", "a.test")
    c.ctl("hosts", "add", "b.test")
    before = path.read_bytes()
    for method, params, key in (("hosts.clear", {"name": "a.test"}, "name"),
                                ("hosts.add", {"name": "c.test", "address": "10.0.0.1"}, "address"),
                                ("hosts.remove", {"name": "a.test", "addr": "127.0.0.1"}, "addr"),
                                ("hosts.list", {"name": "a.test"}, "name")):
        rep = c.rpc(method, params)
        assert rep.get("error", {}).get("code") == -32602 and f"'{key}'" in rep["error"]["message"], (method, rep)
    assert path.read_bytes() == before
    assert c.rpc("hosts.add", {"name": "c.test", "addr": "10.0.0.1"})["result"]["addr"] == "10.0.0.1"


def test_remove_of_a_name_no_entry_can_have_is_refused(hostsd):
    """Regression: hosts.remove {"name": "bad name"} (over the socket, as socat sends it)
    answered "no hosts entry for bad name" (-32001), as if such an entry could exist; capctl
    refuses the name itself, hosts.add refuses it with the reason. hosts.remove now says
    the name is not a valid host name (-32602), as hosts.add does."""
    c = hostsd
    for name, why in (("bad name", "is not a valid host name"), ("*.wild.test", "is not a valid host name"),
                      ("1.2.3", "resolvers read it as the address 1.2.0.3")):
        rep = c.rpc("hosts.remove", {"name": name})
        assert rep.get("error", {}).get("code") == -32602 and why in rep["error"]["message"], (name, rep)
    rep = c.rpc("hosts.remove", {"name": "ok.test"})
    assert rep["error"]["code"] == -32001 and "no hosts entry for ok.test" in rep["error"]["message"], rep


def test_log_counts_one_entry_in_the_singular(hostsd):
    """capd logged "1 entries cleared", "1 entries put back" and "removed capd's
    1 entries" for a block of one entry."""
    c, path = hostsd, hostsd.hosts
    c.ctl("hosts", "add", "one.test")
    c.ctl("hosts", "clear")
    assert f"hosts: 1 entry cleared from {path}" in c.log(), c.log()[-2000:]
    c.ctl("hosts", "add", "one.test")
    c.ctl("hosts", "add", "two.test")
    c.ctl("hosts", "clear")
    assert f"hosts: 2 entries cleared from {path}" in c.log(), c.log()[-2000:]
    c.ctl("hosts", "add", "one.test")
    path.write_bytes(ORIG)  # another program drops capd's block
    deadline = time.time() + 10
    while "put back" not in c.log() and time.time() < deadline:
        time.sleep(0.1)
    assert f"capd's block went missing from {path}: 1 entry put back" in c.log(), c.log()[-2000:]
    assert c.stop() == 0
    assert f"hosts: removed capd's 1 entry from {path}" in c.log(), c.log()[-2000:]


def test_trailing_dot_is_the_same_name_and_idn_gets_a_hint(hostsd):
    """capctl hosts add example.test. 127.0.0.1 was refused ("not a valid host name")
    while a dns answer rule takes the trailing dot; and bücher.test was refused with no
    word of the xn-- form, which --answer gives. The name goes in without its dot,
    for add and remove, from capctl and over the socket."""
    c, path = hostsd, hostsd.hosts
    r = c.ctl("hosts", "add", "example.test.", "127.0.0.1")
    assert r.stdout.strip() == "example.test -> 127.0.0.1", r.stdout
    assert path.read_bytes() == ORIG + b"\n" + block(("example.test", "127.0.0.1")), path.read_bytes()
    assert c.ctl("hosts", "remove", "example.test.").stdout.strip() == "removed example.test"
    assert b"test" not in path.read_bytes()
    rep = c.rpc("hosts.add", {"name": "rpc.test.", "addr": "10.0.0.7"})
    assert rep["result"]["name"] == "rpc.test", rep
    assert b"10.0.0.7\trpc.test\n" in path.read_bytes()
    assert "result" in c.rpc("hosts.remove", {"name": "rpc.test."})
    assert b"test" not in path.read_bytes()
    for args in (["add", "x.test.."], ["remove", "x.test.."], ["add", "."]):
        r = c.ctl("hosts", *args, check=False)
        assert r.returncode == 2 and "not a valid host name" in r.stderr, (args, r.stderr)
    for verb in ("add", "remove"):
        r = c.ctl("hosts", verb, "b\u00fccher.test", check=False)
        assert r.returncode == 2 and "xn-- form" in r.stderr, r.stderr
    rep = c.rpc("hosts.add", {"name": "b\u00fccher.test"})
    assert "xn-- form" in rep["error"]["message"], rep
    assert b"test" not in path.read_bytes()
