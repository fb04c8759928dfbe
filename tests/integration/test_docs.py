"""Documentation coverage (issue 10): every config key the parser accepts and
every capctl command, sub-command and option is in its man page, and every
config key in the example config. The lists come from the code itself, so a
key or command added without its documentation fails here.

  [capd] keys:        daemon/conf.c, conf_capd_key()'s strcmp(key, "...")
  keys of every type: daemon/params.c, params_common_keys[]
  per-type keys:      the keys array of each `const struct proto proto_X` in daemon/*.c
  capctl commands:    ctl/capctl.c's cmds[] -> each `const struct cmd cmd_X = { "name", "usage" }`
  capctl add options: ctl/cmd-add.c's option table
  capd options:       daemon/capd.c's getopt string; signals from its ev_signal_init calls
"""

import grp
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import CAPCTL, CAPD, SANITIZED

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man"

pytestmark = pytest.mark.skipif(SANITIZED, reason="reads the sources, not capd: the normal build's run has it")


def src(path):
    return (ROOT / path).read_text()


def strip_c_comments(text):
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def capd_keys():
    text = strip_c_comments(src("daemon/conf.c"))
    body = text[text.index("conf_capd_key(struct conf_parse"):]
    body = body[:body.index("\n}\n")]
    keys = re.findall(r'strcmp\(key,\s*"([a-z_]+)"\)', body)
    assert len(keys) >= 10, keys
    return sorted(set(keys))


def c_string_array(text, name):
    m = re.search(r"\b" + re.escape(name) + r"\[\]\s*=\s*\{(.*?)\};", text, re.S)
    assert m, name
    return re.findall(r'"([^"]*)"', m.group(1))


def common_keys():
    keys = c_string_array(strip_c_comments(src("daemon/params.c")), "params_common_keys")
    return sorted(set(keys) - {"type", "name"})


def proto_keys():
    """{type: [keys]} for every protocol module in daemon/."""
    out = {}
    for f in sorted((ROOT / "daemon").glob("*.c")):
        text = strip_c_comments(f.read_text())
        for m in re.finditer(r"const struct proto proto_\w+\s*=\s*\{(.*?)\};", text, re.S):
            body = m.group(1)
            name = re.search(r'\.name\s*=\s*"([a-z]+)"', body).group(1)
            km = re.search(r"\.keys\s*=\s*(\w+)", body)
            out[name] = c_string_array(text, km.group(1)) if km else []
    assert {"forward", "sniff"} <= set(out), out
    return out


def capctl_commands():
    """[(name, usage)] in the order of capctl's command table."""
    table = strip_c_comments(src("ctl/capctl.c"))
    m = re.search(r"cmds\[\]\s*=\s*\{(.*?)\};", table, re.S)
    syms = re.findall(r"&(cmd_\w+)", m.group(1))
    defs = {}
    for f in (ROOT / "ctl").glob("*.c"):
        text = strip_c_comments(f.read_text())
        for d in re.finditer(r"const struct cmd (cmd_\w+)\s*=\s*\{\s*\"([a-z-]+)\",\s*((?:\"[^\"]*\"\s*)+)", text):
            usage = "".join(re.findall(r'"([^"]*)"', d.group(3)))
            defs[d.group(1)] = (d.group(2), usage)
    missing = [s for s in syms if s not in defs]
    assert not missing, missing
    return [defs[s] for s in syms]


def man_lines(page):
    return (MAN / page).read_text().splitlines()


def it_lines(page):
    return [ln for ln in man_lines(page) if ln.startswith(".It")]


def words(line):
    return set(re.findall(r"[A-Za-z0-9_.*-]+", line))


def subsections(page):
    """{.Ss title: text} of a page."""
    out, title, buf = {}, None, []
    for ln in man_lines(page) + [".Sh END"]:
        if ln.startswith(".Ss ") or ln.startswith(".Sh "):
            if title is not None:
                out[title] = "\n".join(buf)
            title = ln[4:].strip('"') if ln.startswith(".Ss ") else None
            buf = []
        elif title is not None:
            buf.append(ln)
    return out


def documented_key(text, key):
    """key appears as the head of a list item: `.It Cm key` (optionally with = value)."""
    return any(ln.startswith(".It") and key in words(ln) for ln in text.splitlines())


def test_every_capd_key_in_capd_conf_5():
    page = "\n".join(man_lines("capd.conf.5"))
    missing = [k for k in capd_keys() if not documented_key(page, k)]
    assert not missing, f"[capd] keys missing from man/capd.conf.5: {missing}"


def test_every_common_key_in_capd_conf_5():
    page = "\n".join(man_lines("capd.conf.5"))
    missing = [k for k in common_keys() if not documented_key(page, k)]
    assert not missing, f"instance keys missing from man/capd.conf.5: {missing}"


def test_every_instance_type_and_key_in_capd_conf_5():
    """Each type has a subsection [TYPE NAME] listing its keys (the tls* keys
    may live in the TLS subsection the types share)."""
    subs = subsections("capd.conf.5")
    tls_text = "\n".join(t for title, t in subs.items() if "TLS" in title)
    problems = []
    for typ, keys in proto_keys().items():
        texts = [t for title, t in subs.items() if re.search(r"\[" + typ + r"\b", title)]
        if not texts:
            problems.append(f"no subsection [{typ} NAME]")
            continue
        for k in keys:
            if not (documented_key(texts[0], k) or (k.startswith("tls") and documented_key(tls_text, k))):
                problems.append(f"[{typ}] {k}")
    assert not problems, f"missing from man/capd.conf.5: {problems}"


def test_every_key_in_the_example_config():
    text = src("conf/capd.conf")
    keys = set(capd_keys()) | set(common_keys())
    for ks in proto_keys().values():
        keys |= set(ks)
    missing = sorted(k for k in keys if not re.search(r"^[;#]?\s*" + re.escape(k) + r"\s*=", text, re.M)
                     and not re.search(r"\b" + re.escape(k) + r"\s*=", text))
    assert not missing, f"keys missing from conf/capd.conf: {missing}"


def test_every_capctl_command_in_capctl_1():
    its = it_lines("capctl.1")
    missing = [name for name, _ in capctl_commands()
               if not any(re.search(r"\bCm " + re.escape(name) + r"\b", ln) for ln in its)]
    assert not missing, f"capctl commands missing from man/capctl.1: {missing}"


def test_every_capctl_subcommand_and_option_in_capctl_1():
    """Sub-commands (`capture rotate`, `hosts clear`, `tail events`) head an item;
    every option a usage line or the add table names is there as Fl."""
    page = "\n".join(man_lines("capctl.1"))
    its = "\n".join(it_lines("capctl.1"))
    problems = []
    for name, usage in capctl_commands():
        for alt in usage.split("|"):
            alt = re.sub(r"\[[^]]*\]", "", alt).strip()
            first = alt.split()[0] if alt.split() else ""
            if re.fullmatch(r"[a-z][a-z-]*", first) and not re.search(
                    r"\bCm " + re.escape(name) + r"\b.*\b" + re.escape(first) + r"\b", its):
                problems.append(f"{name} {first}")
        for opt in re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)", usage):
            if not re.search(r"\bFl -" + re.escape(opt) + r"\b", page):
                problems.append(f"{name} --{opt}")
    add = strip_c_comments(src("ctl/cmd-add.c"))
    for opt in sorted(set(re.findall(r'"--([a-z][a-z0-9-]*)"', add))):
        if not re.search(r"\bFl -" + re.escape(opt) + r"\b", page):
            problems.append(f"add --{opt}")
    for typ in proto_keys():
        if typ != "trace" and not re.search(r"\b" + typ + r"\b", its):
            problems.append(f"add {typ}")
    assert not problems, f"missing from man/capctl.1: {problems}"


def test_capd_options_and_signals_in_capd_8():
    text = strip_c_comments(src("daemon/capd.c"))
    optstring = re.search(r'getopt(?:_long)?\(argc, argv, "([^"]+)"', text).group(1)
    page = "\n".join(man_lines("capd.8"))
    problems = [f"-{o}" for o in optstring.replace(":", "") if o != "h"
                and not re.search(r"\bFl " + o + r"\b", page)]
    # and the long forms (getopt_long's table: capd --help, --version)
    problems += [f"--{o}" for o in re.findall(r'\{ "([a-z-]+)", (?:no|required)_argument', text)
                 if not re.search(r"\bFl -" + o + r"\b", page)]
    for sig in sorted(set(re.findall(r"ev_signal_init\([^,]+,[^,]+,\s*(SIG[A-Z]+)\)", text))):
        if not re.search(r"\b" + sig + r"\b", page):
            problems.append(sig)
    assert not problems, f"missing from man/capd.8: {problems}"


@pytest.mark.parametrize("page", ["capd.8", "capctl.1", "capd.conf.5"])
def test_pages_have_the_sections_users_look_for(page):
    heads = {ln[4:].strip('"') for ln in man_lines(page) if ln.startswith(".Sh ")}
    want = {"NAME", "SYNOPSIS", "DESCRIPTION", "FILES", "EXAMPLES", "SEE ALSO"}
    if page != "capd.conf.5":
        want.add("EXIT STATUS")
    assert want <= heads, want - heads


def test_every_rpc_method_in_capd_8():
    """capd.8 lists the JSON-RPC methods for clients other than capctl: capture.sync was
    missing from that list (capctl.1 named it; the list did not). The list comes from the
    method tables in daemon/*.c."""
    methods = set()
    for f in sorted((ROOT / "daemon").glob("*.c")):
        methods |= set(re.findall(r'\{\s*"([a-z]+\.[a-z_]+)",\s*rpc_\w+', strip_c_comments(f.read_text())))
    assert {"daemon.status", "capture.sync", "hosts.clear"} <= methods, methods
    page = man_lines("capd.8")
    missing = sorted(m for m in methods if not any(re.fullmatch(r"\.Li " + re.escape(m) + r"( [,.])?", ln)
                                                   for ln in page))
    assert not missing, f"RPC methods missing from man/capd.8: {missing}"


def test_every_tail_notice_in_capctl_1():
    """`capctl tail session` prints notices among the data ("[... N bytes dropped ...]");
    "[... N bytes before the backlog ...]", which --backlog 0 prints at once, and tail
    events' "[... N events dropped ...]" were in no page, so a reader (or a script) could
    not tell what they meant. Each notice format in ctl/cmd-tail.c is in capctl.1, with a
    number in it."""
    text = strip_c_comments(src("ctl/cmd-tail.c"))
    # a session's notices name the direction first ("%s": "s2c "), as a chunk's header does
    notices = re.findall(r'"\[\.\.\. (?:%s)?%ll[ud] ([a-z ]+) \.\.\.\](?:\\n)?"', text)
    assert {"bytes dropped", "events dropped"} <= set(notices), notices
    page = "\n".join(man_lines("capctl.1"))
    missing = [n for n in notices
               if not re.search(r"\[\.\.\. (?:[cs]2[cs] )?\d+ " + re.escape(n) + r" \.\.\.\]", page)]
    assert not missing, f"tail notices missing from man/capctl.1: {missing}"


def needed_fl(line):
    """The "Fl -x" pairs of an mdoc line outside its optional parts (Oo .. Oc, and
    Op to the end of the line), joined by spaces."""
    depth, words, prev = 0, [], None
    for w in line.split():
        if w == "Oo":
            depth += 1
        elif w == "Oc":
            depth -= 1
        elif w == "Op":
            break
        elif depth == 0 and prev == "Fl":
            words.append("Fl " + w)
        prev = w
    return " ".join(words)


def test_add_items_and_usage_agree_on_required_options():
    """capctl(1)'s `add forward --port port --to host:port` and `add sniff --interface
    iface` items show the option the type needs unbracketed, while `capctl add forward
    --help` printed "[--to X]" and `add sniff --help` "[--interface X]"; and the page's
    `add reverse` item showed --route as needed where one --route or a --default is.
    Both now bracket the same options."""
    page = "\n".join(man_lines("capctl.1")).replace("\\\n", " ")
    for typ in [t for t in proto_keys() if t != "trace"]:
        item = re.search(r"^\.It Cm add " + typ + r" (.*)$", page, re.M)
        assert item, typ
        man = {"-" + o for o in re.findall(r"Fl (-[a-z][a-z0-9-]*)", needed_fl(item.group(1)))}
        r = subprocess.run([str(CAPCTL), "add", typ, "--help"], capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        usage = r.stdout.split(f"capctl add {typ} ", 1)[1]
        depth, code = 0, set()
        for w in usage.replace("[", " [ ").replace("]", " ] ").split():
            depth += (w == "[") - (w == "]")
            if depth == 0 and w.startswith("--"):
                code.add(w)
        assert man == code, (typ, sorted(man), sorted(code))


def example_lines():
    """(file, line) of every command a user would paste: README's sh blocks, the
    man pages' literal blocks and .Dl lines, prompts and trailing comments gone."""
    raw = [("README.md", ln) for b in re.findall(r"```sh\n(.*?)```", src("README.md"), re.S)
           for ln in b.splitlines()]
    for page in ("capd.8", "capctl.1", "capd.conf.5"):
        literal = False
        for ln in man_lines(page):
            if ln.startswith(".Bd -literal") or ln.startswith(".Ed"):
                literal = ln.startswith(".Bd")
            elif literal or ln.startswith(".Dl "):
                raw.append((page, ln.removeprefix(".Dl ").replace("\\&", "").replace("\\(dq", '"')))
    return [(f, re.sub(r"\s+#\s.*$", "", re.sub(r"^\s*[$#] ", "", ln))) for f, ln in raw]


def add_table():
    """{type: {option}} that `capctl add TYPE` takes, from ctl/cmd-add.c's table."""
    text = strip_c_comments(src("ctl/cmd-add.c"))
    macros = dict(re.findall(r'#define (\w+) "([^"]*)"', text))
    types = [t for t in proto_keys() if t != "trace"]
    out = {t: {"--port", "--bind", "--help", "--json"} if t != "sniff" else {"--help", "--json"} for t in types}
    for who, opt in re.findall(r'\{\s*(NULL|\w+|"[^"]*"),\s*"(--[a-z-]+)",', text):
        who = types if who == "NULL" else (macros[who] if who in macros else who.strip('"')).split()
        for t in who:
            out[t].add(opt)
    return out


def test_every_capctl_example_takes_its_options():
    """Each capctl line a user copies from README.md or a man page names a command,
    and a sub-command, that capctl has, only options that command (for add, that
    type) takes, and what `add TYPE` cannot do without (--to, --interface, --port)."""
    cmds = dict(capctl_commands())
    adds = add_table()
    needs = {"forward": ["--to"], "sniff": ["--interface"], "reverse": ["--route", "--default"]}
    problems, seen = [], 0
    for where, ln in example_lines():
        for seg in re.split(r'\$\(|\||&&|;|\)|"|>', ln):
            m = re.search(r"(?:^|\s)capctl\s+(.*)", seg)
            if not m:
                continue
            seen += 1
            argv = [a.strip("'") for a in m.group(1).split()]
            while argv and argv[0] in ("--json", "-s", "--timeout"):
                argv = argv[2:] if argv[0] != "--json" else argv[1:]
            cmd, rest = argv[0], [a for a in argv[1:] if a != "--json"]
            rest = rest[:rest.index("--")] if "--" in rest else rest
            opts = {a.split("=")[0] for a in rest if a.startswith("--")}
            if cmd not in cmds:
                problems.append(f"{where}: {ln}: no command {cmd}")
            elif cmd == "add":
                typ = rest[0]
                if opts - adds.get(typ, set()):
                    problems.append(f"{where}: {ln}: add {typ} takes no {sorted(opts - adds.get(typ, set()))}")
                for need in [needs.get(typ, [])] + ([["--port"]] if typ != "sniff" else []):
                    if need and not opts & set(need):
                        problems.append(f"{where}: {ln}: add {typ} needs {' or '.join(need)}")
            else:
                usage = cmds[cmd]
                subs = [w[0] for w in (a.split() for a in usage.split("|")) if w and re.fullmatch(r"[a-z]+", w[0])]
                if subs and (not rest or rest[0] not in subs):
                    problems.append(f"{where}: {ln}: {cmd} takes {subs}")
                unknown = opts - set(re.findall(r"--[a-z][a-z0-9-]*", usage))
                if unknown:
                    problems.append(f"{where}: {ln}: {cmd} takes no {sorted(unknown)}")
    assert seen >= 20, seen
    assert not problems, problems


def test_capd_conf_5_examples_pass_capd_t(tmp_path):
    """The sections capd.conf(5)'s EXAMPLES show, all in one file, are a configuration
    `capd -t` calls good (the control socket, spool and state made local, and
    control_group the caller's own group when there is no group capd yet)."""
    page = "\n".join(man_lines("capd.conf.5"))
    examples = page.split("\n.Sh EXAMPLES\n", 1)[1].split("\n.Sh ", 1)[0]
    blocks = [b for b in re.findall(r"^\.Bd -literal[^\n]*\n(.*?)^\.Ed$", examples, re.S | re.M)
              if b.startswith("[")]
    text = "\n".join(blocks)
    assert text.count("[capd]") == 1 and text.count("[") >= 5, text
    try:
        grp.getgrnam("capd")
    except KeyError:
        text = text.replace("control_group = capd", f"control_group = {grp.getgrgid(os.getgid()).gr_name}")
    text = text.replace("[capd]\n", f"[capd]\ncontrol = {tmp_path}/c.sock\nspool = {tmp_path}/sp\n"
                        f"state_dir = {tmp_path}/st\nhosts_file = {tmp_path}/hosts\n", 1)
    (tmp_path / "capd.conf").write_text(text)
    r = subprocess.run([str(CAPD), "-t", "-c", str(tmp_path / "capd.conf")], capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 0 and "configuration is good (5 instances)" in r.stdout, (r.stderr, text)
