"""A strict pcapng reader for the tests: every rule of draft-ietf-opsawg-pcapng
that a writer must keep, checked block by block. check(path) returns the blocks
it read and raises AssertionError naming the offset of the first broken rule;
Wireshark's readers forgive much of this, so tshark alone would not notice.

Run as a script on files to print what is wrong with each."""

import struct
import sys
from pathlib import Path

SHB, IDB, PB, SPB, NRB, ISB, EPB, DSB = 0x0A0D0D0A, 1, 2, 3, 4, 5, 6, 0xA
CUSTOM = (0x00000BAD, 0x40000BAD)
CUSTOM_OPTS = (2988, 2989, 19372, 19373)
KNOWN = {SHB, IDB, NRB, ISB, EPB, DSB, SPB, *CUSTOM}
# option code -> (fixed length or None for variable, minimum length, repeatable, utf-8 string)
COMMON = {1: (None, 0, True, True)}
OPTS = {
    SHB: {2: (None, 0, False, True), 3: (None, 0, False, True), 4: (None, 0, False, True)},
    IDB: {2: (None, 0, False, True), 3: (None, 0, False, True), 4: (8, 8, True, False),
          5: (17, 17, True, False), 6: (6, 6, False, False), 7: (8, 8, False, False),
          8: (8, 8, False, False), 9: (1, 1, False, False), 10: (1, 1, False, False),
          11: (None, 1, False, False), 12: (None, 0, False, True), 13: (1, 1, False, False),
          14: (8, 8, False, False), 15: (None, 0, False, True), 16: (8, 8, False, False),
          17: (8, 8, False, False)},
    EPB: {2: (4, 4, False, False), 3: (None, 1, True, False), 4: (8, 8, False, False),
          5: (8, 8, False, False), 6: (4, 4, False, False), 7: (None, 1, True, False)},
    ISB: {2: (8, 8, False, False), 3: (8, 8, False, False), 4: (8, 8, False, False),
          5: (8, 8, False, False), 6: (8, 8, False, False), 7: (8, 8, False, False),
          8: (8, 8, False, False)},
    NRB: {2: (None, 0, True, True), 3: (4, 4, False, False), 4: (16, 16, False, False)},
    DSB: {},
}
# libpcap DLT_ values that are no LINKTYPE_ (pcapng wants LINKTYPE_ values): DLT_RAW on Linux
# and OpenBSD (LINKTYPE_RAW is 101), DLT_ATM_RFC1483 (100), DLT_SLIP/PPP_BSDOS, OpenBSD's
# DLT_PFLOG and DLT_PFSYNC, DLT_ATM_CLIP (106), and 2-5, 7 and 13, never assigned
NOT_LINKTYPES = {2, 3, 4, 5, 7, 11, 12, 13, 14, 15, 16, 17, 18, 19}


class Strict:
    def __init__(self, data, name="?"):
        self.d, self.name = data, name
        self.blocks = []
        self.sections = []

    def fail(self, off, msg):
        raise AssertionError(f"{self.name} @{off:#x}: {msg}")

    def u16(self, off):
        return struct.unpack_from(self.e + "H", self.d, off)[0]

    def u32(self, off):
        return struct.unpack_from(self.e + "I", self.d, off)[0]

    def u64(self, off):
        return struct.unpack_from(self.e + "Q", self.d, off)[0]

    def utf8(self, off, raw, what):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as ex:
            self.fail(off, f"{what} is not UTF-8: {raw[:80]!r} ({ex})")

    def options(self, btype, off, end):
        """Reads the option list from off to end: {code: [values]}."""
        table = {**COMMON, **OPTS.get(btype, {})}
        got, seen_end = {}, False
        while off < end:
            if seen_end:
                self.fail(off, f"block {btype:#x}: bytes after opt_endofopt")
            if off + 4 > end:
                self.fail(off, f"block {btype:#x}: option header runs past the block")
            code, length = self.u16(off), self.u16(off + 2)
            vend = off + 4 + length
            pend = off + 4 + ((length + 3) & ~3)
            if pend > end:
                self.fail(off, f"block {btype:#x}: option {code} ({length} bytes) runs past the block")
            val = self.d[off + 4:vend]
            if any(self.d[vend:pend]):
                self.fail(vend, f"block {btype:#x}: option {code}'s padding is not zero")
            if code == 0:
                if length != 0:
                    self.fail(off, f"block {btype:#x}: opt_endofopt with length {length}")
                seen_end = True
            elif code in CUSTOM_OPTS:
                if length < 4:
                    self.fail(off, f"block {btype:#x}: custom option {code} without a PEN")
                if code in (2988, 19372):
                    self.utf8(off, val[4:], f"custom option {code}")
            elif code in table:
                fixed, minimum, multi, text = table[code]
                if fixed is not None and length != fixed:
                    self.fail(off, f"block {btype:#x}: option {code} is {length} bytes, not {fixed}")
                if length < minimum:
                    self.fail(off, f"block {btype:#x}: option {code} is {length} bytes, under {minimum}")
                if not multi and code in got:
                    self.fail(off, f"block {btype:#x}: option {code} repeated")
                if text:
                    self.utf8(off, val, f"block {btype:#x} option {code}")
            elif code & 0x8000 == 0:
                self.fail(off, f"block {btype:#x}: unknown option {code}")
            got.setdefault(code, []).append(val)
            off = pend
        if got and not seen_end:
            self.fail(end, f"block {btype:#x}: option list without opt_endofopt")
        return got

    def read(self):
        d, off = self.d, 0
        if len(d) < 28:
            self.fail(0, "shorter than a Section Header Block")
        sec = None
        while off < len(d):
            if off + 12 > len(d):
                self.fail(off, f"{len(d) - off} bytes at the end, not a block")
            btype_raw = d[off:off + 4]
            if btype_raw == b"\x0a\x0d\x0d\x0a":
                magic = d[off + 8:off + 12]
                if magic == b"\x4d\x3c\x2b\x1a":
                    self.e = "<"
                elif magic == b"\x1a\x2b\x3c\x4d":
                    self.e = ">"
                else:
                    self.fail(off, f"bad byte-order magic {magic.hex()}")
            elif sec is None:
                self.fail(off, "the file does not begin with a Section Header Block")
            btype, blen = self.u32(off), self.u32(off + 4)
            if blen < 12 or blen % 4:
                self.fail(off, f"block {btype:#x}: total length {blen} (under 12 or not a multiple of 4)")
            if off + blen > len(d):
                self.fail(off, f"block {btype:#x}: total length {blen} runs {off + blen - len(d)} bytes past the end")
            trail = self.u32(off + blen - 4)
            if trail != blen:
                self.fail(off, f"block {btype:#x}: trailing total length {trail} != {blen}")
            if btype not in KNOWN and not btype & 0x80000000:
                self.fail(off, f"unknown block type {btype:#x}")
            body, bend = off + 8, off + blen - 4
            if btype == SHB:
                if sec is not None:
                    self.end_section(sec, off)
                sec = self.shb(off, body, bend)
            else:
                getattr(self, {IDB: "idb", EPB: "epb", ISB: "isb", NRB: "nrb", DSB: "dsb", SPB: "spb"}.get(
                    btype, "custom"), lambda *a: None)(sec, btype, off, body, bend)
            self.blocks.append((btype, off, blen))
            off += blen
        self.end_section(sec, off)
        return self

    def end_section(self, sec, off):
        if sec["length"] != 0xFFFFFFFFFFFFFFFF and sec["length"] != off - sec["end"]:
            self.fail(sec["start"], f"section length {sec['length']} but the section holds {off - sec['end']} bytes")
        self.sections.append(sec)

    def shb(self, off, body, bend):
        if bend - body < 16:
            self.fail(off, "SHB too short")
        major, minor, slen = self.u16(body + 4), self.u16(body + 6), self.u64(body + 8)
        if (major, minor) != (1, 0):
            self.fail(off, f"SHB version {major}.{minor}, writers must write 1.0")
        if slen != 0xFFFFFFFFFFFFFFFF and slen % 4:
            self.fail(off, f"section length {slen} not a multiple of 4")
        opts = self.options(SHB, body + 16, bend)
        return {"start": off, "end": bend + 4, "length": slen, "opts": opts, "idbs": [], "isb": {}}

    def idb(self, sec, btype, off, body, bend):
        if bend - body < 8:
            self.fail(off, "IDB too short")
        link, reserved, snap = self.u16(body), self.u16(body + 2), self.u32(body + 4)
        if reserved:
            self.fail(off, "IDB reserved field not zero")
        if link in NOT_LINKTYPES or link >= 0x8000:
            self.fail(off, f"IDB link type {link} is a libpcap DLT_ value or reserved, not a LINKTYPE_")
        opts = self.options(IDB, body + 8, bend)
        res = opts.get(9, [b"\x06"])[0][0]
        if res & 0x80 or res not in (3, 6, 9):
            self.fail(off, f"if_tsresol {res:#x}: capd writes 6 or 9")
        if 11 in opts and opts[11][0][0] == 0:
            self.utf8(off, opts[11][0][1:], "if_filter")
        sec["idbs"].append({"link": link, "snap": snap, "tsresol": res, "opts": opts, "off": off,
                            "last_ts": None})

    def iface(self, sec, off, i, what):
        if i >= len(sec["idbs"]):
            self.fail(off, f"{what} names interface {i}, but the section has {len(sec['idbs'])} IDBs before it")
        return sec["idbs"][i]

    def epb(self, sec, btype, off, body, bend):
        if bend - body < 20:
            self.fail(off, "EPB too short")
        i = self.u32(body)
        idb = self.iface(sec, off, i, "EPB")
        ts = (self.u32(body + 4) << 32) | self.u32(body + 8)
        cap, orig = self.u32(body + 12), self.u32(body + 16)
        if cap > orig:
            self.fail(off, f"EPB captured length {cap} > original length {orig}")
        if idb["snap"] and cap > idb["snap"]:
            self.fail(off, f"EPB captured length {cap} > snaplen {idb['snap']}")
        dend = body + 20 + ((cap + 3) & ~3)
        if dend > bend:
            self.fail(off, f"EPB captured length {cap} runs past the block")
        if any(self.d[body + 20 + cap:dend]):
            self.fail(off, "EPB packet padding is not zero")
        opts = self.options(EPB, dend, bend)
        if 2 in opts:
            flags = struct.unpack(self.e + "I", opts[2][0])[0]
            if flags & 3 == 3:
                self.fail(off, f"epb_flags {flags:#x}: direction 3 is not defined")
            if (flags >> 2) & 7 > 4:
                self.fail(off, f"epb_flags {flags:#x}: reception type {(flags >> 2) & 7} is not defined")
        self.packets.append({"off": off, "iface": i, "ts": ts, "cap": cap, "orig": orig, "opts": opts,
                             "data": memoryview(self.d)[body + 20:body + 20 + cap]})

    def isb(self, sec, btype, off, body, bend):
        if bend - body < 12:
            self.fail(off, "ISB too short")
        i = self.u32(body)
        self.iface(sec, off, i, "ISB")
        ts = (self.u32(body + 4) << 32) | self.u32(body + 8)
        opts = self.options(ISB, body + 12, bend)
        vals = {c: struct.unpack(self.e + "Q", v[0])[0] for c, v in opts.items() if c in range(2, 9)}
        if 2 in vals and 3 in vals and vals[2] > vals[3]:
            self.fail(off, f"isb_starttime {vals[2]} after isb_endtime {vals[3]}")
        prev = sec["isb"].get(i)
        if prev is not None:
            if ts < prev["ts"]:
                self.fail(off, f"ISB of interface {i} dated {ts}, before the previous one's {prev['ts']}")
            for c in (4, 5, 6, 7, 8):
                if c in vals and c in prev["vals"] and vals[c] < prev["vals"][c]:
                    self.fail(off, f"ISB counter {c} of interface {i} went down: {prev['vals'][c]} -> {vals[c]}")
        sec["isb"][i] = {"ts": ts, "vals": vals}
        self.isbs.append({"off": off, "iface": i, "ts": ts, "vals": vals})

    def nrb(self, sec, btype, off, body, bend):
        p = body
        while True:
            if p + 4 > bend:
                self.fail(p, "NRB records without nrb_record_end")
            rtype, rlen = self.u16(p), self.u16(p + 2)
            pend = p + 4 + ((rlen + 3) & ~3)
            if pend > bend:
                self.fail(p, "NRB record runs past the block")
            val = self.d[p + 4:p + 4 + rlen]
            if rtype == 0:
                if rlen:
                    self.fail(p, "nrb_record_end with a length")
                p = pend
                break
            if rtype in (1, 2):
                alen = 4 if rtype == 1 else 16
                names = val[alen:]
                if rlen <= alen or not names.endswith(b"\0"):
                    self.fail(p, "NRB record without a zero-terminated name")
                for n in names[:-1].split(b"\0"):
                    self.utf8(p, n, "NRB name")
            p = pend
        self.options(NRB, p, bend)

    def dsb(self, sec, btype, off, body, bend):
        if bend - body < 8:
            self.fail(off, "DSB too short")
        n = self.u32(body + 4)
        if body + 8 + ((n + 3) & ~3) > bend:
            self.fail(off, f"DSB secrets length {n} runs past the block")
        if any(self.d[body + 8 + n:body + 8 + ((n + 3) & ~3)]):
            self.fail(off, "DSB padding is not zero")
        self.options(DSB, body + 8 + ((n + 3) & ~3), bend)

    def spb(self, sec, btype, off, body, bend):
        self.iface(sec, off, 0, "SPB")

    def custom(self, sec, btype, off, body, bend):
        if btype in CUSTOM and bend - body < 4:
            self.fail(off, "custom block without a PEN")


def check(path):
    """Reads path strictly; returns the reader (its .blocks, .sections, .packets, .isbs)."""
    s = Strict(Path(path).read_bytes(), str(path))
    s.packets, s.isbs = [], []
    return s.read()


if __name__ == "__main__":
    bad = 0
    for f in sys.argv[1:]:
        try:
            r = check(f)
            print(f"{f}: ok, {len(r.blocks)} blocks, {len(r.packets)} packets, {len(r.sections)} sections")
        except AssertionError as ex:
            bad += 1
            print(f"BAD {ex}")
    sys.exit(1 if bad else 0)
