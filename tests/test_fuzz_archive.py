"""Fuzzing real packs (issue 6): a malformed, truncated or modified pack ends in ArchiveError, never in a
crash, a hang or another exception, and a corrupted pack never computes a wrong answer.

The test process writes every mutated file first: cases at fixed places (a truncation and a bit flip at the
edges and the middle of every region: header, manifest, padding, each blob; blob table edits; hand-made
hostile files) and cases Hypothesis draws (derandomized, so every run tests the same files). One worker
process (``fuzz_worker.py``) then loads each file in turn, calls it on its stored example inputs and
verifies every hash. A worker that dies or hangs is restarted after the case it was on, and that case fails.

``AOTPACK_FUZZ_EXAMPLES=N`` draws N cases per test and pack instead of the CI budget, e.g.
``AOTPACK_FUZZ_EXAMPLES=3000 .venv/bin/python -m pytest -q tests/test_fuzz_archive.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import queue
import random
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import zstandard
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from aotpack_runtime import format as fmt
from archive_tools import join, split, with_blob, zstd_frame
from conftest import ROOT

EXAMPLES = int(os.environ.get("AOTPACK_FUZZ_EXAMPLES", "200"))
CASE_SECONDS = 20  # one load + call + verify of these packs takes well under a second
STARTUP_SECONDS = 120
MAX_WORKERS = 5  # a worker that dies is replaced, this many times at most
WORKER = pathlib.Path(__file__).with_name("fuzz_worker.py")

# What each case must end in, besides what is always wrong: a crash, a hang, an exception that is not an
# aotpack error, or GuardError anywhere but in the call.
ORIGINAL = "original"  # the pack itself: loads, runs, verifies; its answer is the reference
REFUSED = "refused"    # load and verify raise ArchiveError
DETECTED = "detected"  # verify raises ArchiveError
CLEAN = "clean"        # nothing more (a bit flip inside a zstd frame may leave its content intact; an
#                        edited manifest with its hash recomputed describes a different, consistent pack)


@dataclass
class Case:
    label: str
    data: bytes
    expect: str
    # The manifest is the original's (only other bytes were damaged): every byte that is used is checked
    # against it, so a call that works must give the original's answer.
    same_answer: bool = False


# ---------------------------------------------------------------------------------------------------
# A real pack, taken apart


@dataclass(frozen=True)
class Region:
    name: str
    start: int
    end: int
    kind: str  # header, manifest, padding, stored (an uncompressed blob) or zstd


class Pack:
    """A pack's bytes, its manifest, and where each region lies."""

    def __init__(self, data: bytes):
        self.data = data
        self.version, self.manifest, _ = split(data)
        mlen = fmt.HEADER.unpack(data[:fmt.HEADER_SIZE])[3]
        self.region_start = start = fmt.align(fmt.HEADER_SIZE + mlen)
        regions = [Region("header", 0, fmt.HEADER_SIZE, "header"),
                   Region("manifest", fmt.HEADER_SIZE, fmt.HEADER_SIZE + mlen, "manifest"),
                   Region("padding after the manifest", fmt.HEADER_SIZE + mlen, start, "padding")]
        pos = start
        for b in self.manifest["blobs"]:
            begin = start + b["offset"]
            regions.append(Region(f"padding before {b['name']}", pos, begin, "padding"))
            regions.append(Region(f"blob {b['name']}", begin, begin + b["stored_size"],
                                  "zstd" if b["compression"] == "zstd" else "stored"))
            pos = begin + b["stored_size"]
        self.regions = [r for r in regions if r.end > r.start]

    def region_at(self, pos: int) -> Region:
        return next(r for r in self.regions if r.start <= pos < r.end)

    def expect_for(self, mutated: bytes) -> str:
        """What a same-length overwrite allows, from the regions of the bytes it changed."""
        changed = [i for i, (a, b) in enumerate(zip(self.data, mutated)) if a != b]
        kinds = {self.region_at(i).kind for i in changed}
        if kinds & {"header", "manifest"}:
            return REFUSED
        if kinds & {"padding", "stored"}:
            return DETECTED
        return CLEAN

    def edited(self, edit: Callable[[dict], Any]) -> bytes:
        """The pack with ``edit(manifest)`` applied, in canonical form, with the header hash recomputed."""
        manifest = json.loads(json.dumps(self.manifest))
        edit(manifest)
        return self.with_manifest_bytes(fmt.canonical_json(manifest))

    def with_manifest_bytes(self, raw: bytes) -> bytes:
        """The pack with this manifest text (the header hash recomputed) and the same blob region."""
        return join(self.version, raw, self.data[self.region_start:])

    @property
    def manifest_text(self) -> bytes:
        return fmt.canonical_json(self.manifest)


def flip(data: bytes, pos: int, bit: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


# ---------------------------------------------------------------------------------------------------
# Cases at fixed places


BAD_NAMES = ["../../etc/passwd", "/abs/path", "a/../b", "..", "x\\y", "", "a//b", "a/", "C:x", "a\x00b",
             "é", "x" * 257]


def region_cases(pack: Pack) -> list[Case]:
    """A truncation and a bit flip at the start, the middle and the end of every region."""
    cases = []
    for r in pack.regions:
        for cut in sorted({r.start, r.start + 1, (r.start + r.end) // 2, r.end - 1} & set(range(r.start, r.end))):
            cases.append(Case(f"truncated at byte {cut} ({r.name})", pack.data[:cut], REFUSED, True))
        for pos, bit in ((r.start, 0), ((r.start + r.end) // 2, 3), (r.end - 1, 7)):
            data = flip(pack.data, pos, bit)
            cases.append(Case(f"bit {bit} of byte {pos} flipped ({r.name})", data, pack.expect_for(data), True))
    cases.append(Case("one zero byte appended", pack.data + b"\x00", REFUSED, True))
    cases.append(Case("64 zero bytes appended", pack.data + b"\x00" * 64, REFUSED, True))
    return cases


def blob_table_cases(pack: Pack) -> list[Case]:
    """Each blob record edited, the header hash recomputed so that the reader gets past it."""
    cases = []
    blobs = pack.manifest["blobs"]

    def case(i: int, label: str, expect: str, **fields) -> None:
        def edit(m):
            m["blobs"][i].update(fields)
        cases.append(Case(f"blob table: {blobs[i]['name']} {label}", pack.edited(edit), expect))

    for i, b in enumerate(blobs):
        other = blobs[(i + 1) % len(blobs)]
        case(i, "offset + 64", REFUSED, offset=b["offset"] + 64)
        case(i, "offset 2**40", REFUSED, offset=1 << 40)
        # A zstd frame is read only where its content is needed (code found in the code cache is not).
        case(i, "stored_size + 1", REFUSED if b["compression"] == "none" else DETECTED,
             stored_size=b["stored_size"] + 1)
        case(i, "stored_size 2**40", REFUSED, stored_size=1 << 40)
        case(i, "stored_size 2**40 + 1", REFUSED, stored_size=(1 << 40) + 1)
        case(i, "stored_size -1", REFUSED, stored_size=-1)
        case(i, "size + 1", DETECTED, size=b["size"] + 1)
        case(i, "size 2**40", DETECTED, size=1 << 40)
        toggled = "none" if b["compression"] == "zstd" else "zstd"
        case(i, f"compression {toggled}", DETECTED, compression=toggled)
        if toggled == "none":
            case(i, "compression none, size = stored_size", DETECTED, compression="none", size=b["stored_size"])
        if other["sha256"] != b["sha256"]:
            case(i, f"sha256 of {other['name']}", DETECTED, sha256=other["sha256"])
        case(i, f"named {other['name']!r} (twice in the table)", REFUSED, name=other["name"])
        for name in BAD_NAMES:
            case(i, f"named {name!r}", REFUSED, name=name)
    return cases


def region_swap_cases(pack: Pack) -> list[Case]:
    """The stored bytes of two blobs of the same stored size exchanged (the manifest untouched)."""
    blobs = [r for r in pack.regions if r.name.startswith("blob ")]
    cases = []
    for i, a in enumerate(blobs):
        for b in blobs[i + 1:]:
            if a.end - a.start != b.end - b.start or pack.data[a.start:a.end] == pack.data[b.start:b.end]:
                continue
            out = bytearray(pack.data)
            out[a.start:a.end], out[b.start:b.end] = pack.data[b.start:b.end], pack.data[a.start:a.end]
            out = bytes(out)
            cases.append(Case(f"stored bytes of {a.name} and {b.name} swapped", out, pack.expect_for(out), True))
    return cases


def _zstd_bomb(content_size: int) -> bytes:
    """A valid zstd frame that declares ``content_size`` bytes and holds them as 128 KiB RLE blocks."""
    frame = bytearray(b"\x28\xb5\x2f\xfd\xe0")  # magic; single segment, 8-byte content size, no checksum
    frame += content_size.to_bytes(8, "little")
    block = 128 << 10
    left = content_size
    while left:
        n = min(block, left)
        left -= n
        header = (int(left == 0)) | (1 << 1) | (n << 3)  # last block flag, block type RLE, regenerated size
        frame += header.to_bytes(3, "little") + b"\x00"
    return bytes(frame)


def hostile_files(pack: Pack) -> list[Case]:
    """Files made by hand to attack the reader: garbage, nesting, sizes and counts at the limits."""
    rng = random.Random(6)
    garbage = bytes(rng.randrange(256) for _ in range(4096))

    def with_raw_manifest(raw: bytes) -> bytes:  # no blobs; the header hash right
        return join(1, raw, b"")

    cases = [
        Case("empty file", b"", REFUSED),
        Case("random bytes", garbage, REFUSED),
        Case("magic, then random bytes", fmt.MAGIC + garbage, REFUSED),
        Case("manifest of random bytes (hash right)", with_raw_manifest(garbage), REFUSED),
        Case("manifest nested 100000 deep", with_raw_manifest(b"[" * 100_000 + b"]" * 100_000), REFUSED),
        Case("manifest of 16 MiB of spaces", with_raw_manifest(b" " * fmt.MAX_MANIFEST_BYTES), REFUSED),
        Case("manifest one byte over the limit",
             fmt.HEADER.pack(fmt.MAGIC, 1, 0, fmt.MAX_MANIFEST_BYTES + 1, b"\x00" * 32) + pack.data[fmt.HEADER_SIZE:],
             REFUSED),
        Case("manifest of JSON null", with_raw_manifest(b"null"), REFUSED),
        Case("manifest with a 5000-digit number", pack.with_manifest_bytes(
            re.sub(rb'"format_version":\d+', b'"format_version":' + b"1" * 5000, pack.manifest_text)), REFUSED),
        Case("manifest with 1e999", pack.with_manifest_bytes(
            re.sub(rb'"format_version":\d+', b'"format_version":1e999', pack.manifest_text)), REFUSED),
        Case("manifest with a lone surrogate escape", pack.with_manifest_bytes(
            pack.manifest_text.replace(b'"format":"aotpack"', b'"format":"aotpack","zz":"\\ud800"')), REFUSED),
    ]

    # A 10 MB manifest that lists 50,000 empty blobs and weights: read in a second only if the reader never
    # does work quadratic in the number of blobs.
    n = 50_000
    many = dict(pack.manifest, example=None,
                blobs=[{"name": f"w/{i}", "offset": 0, "stored_size": 0, "size": 0, "compression": "none",
                        "sha256": hashlib.sha256(b"").hexdigest()} for i in range(n)],
                weights=[{"name": f"{i}", "blob": f"w/{i}", "dtype": "float32", "shape": [0]} for i in range(n)])
    many["blobs"].reverse()  # weights then look up blobs from the far end of the table
    cases.append(Case(f"{n} empty blobs and weights", with_raw_manifest(fmt.canonical_json(many)), CLEAN))

    # The first example input stored in a zstd frame of 2 MiB (RLE blocks) that declares 64 GiB.
    bomb = _zstd_bomb(64 << 30)
    region = pack.data[pack.region_start:]
    offset = fmt.align(len(region))
    manifest = json.loads(json.dumps(pack.manifest))
    manifest["blobs"].append({"name": "example/bomb", "offset": offset, "stored_size": len(bomb),
                              "size": 64 << 30, "compression": "zstd", "sha256": "0" * 64})
    example = manifest["example"] if "methods" not in manifest else manifest["methods"][0]["example"]
    example["leaves"][0]["blob"] = "example/bomb"
    cases.append(Case("zstd bomb: a 2 MiB blob that declares 64 GiB", join(
        pack.version, fmt.canonical_json(manifest), region + b"\x00" * (offset - len(region)) + bomb), CLEAN))
    # Within the expansion limit: 1 MiB of random bytes and RLE blocks that expand to 1 GiB, checked (and
    # found wrong) through fixed buffers.
    bomb = zstd_frame(1 << 30, random.Random(7).randbytes(1 << 20))
    manifest["blobs"][-1].update(stored_size=len(bomb), size=(1 << 30) + (1 << 20))
    cases.append(Case("zstd bomb: a 1 MiB blob that expands 1000-fold to 1 GiB", join(
        pack.version, fmt.canonical_json(manifest), region + b"\x00" * (offset - len(region)) + bomb), CLEAN))

    # Native code cut short, or with its program headers pointing past its end, its hashes fixed: the dynamic
    # loader would map pages past the end of the file and die of SIGBUS reading them (the archive itself is
    # consistent, so only the load refuses it; test_load_checks asserts the refusal).
    rec = next(b for b in pack.manifest["blobs"] if b["name"] == "code/0.so")
    stored = region[rec["offset"]:rec["offset"] + rec["stored_size"]]
    library = zstandard.ZstdDecompressor().decompress(stored) if rec["compression"] == "zstd" else stored
    for cut in (64, len(library) // 2, len(library) - 1):
        cases.append(Case(f"code/0.so cut to {cut} of {len(library)} bytes, hashes fixed",
                          with_blob(pack.data, "code/0.so", library[:cut]), CLEAN))
    phoff = int.from_bytes(library[32:40], "little")
    grown = bytearray(library)
    grown[phoff + 32:phoff + 40] = (len(library) * 2).to_bytes(8, "little")  # the first segment's p_filesz
    cases.append(Case("code/0.so whose first segment reaches past its end, hashes fixed",
                      with_blob(pack.data, "code/0.so", bytes(grown)), CLEAN))
    return cases


def name_swap_cases(pack: Pack) -> list[Case]:
    """Two blob records exchange names: every hash still matches, but each name now holds the other's bytes
    (code that is not a shared object, weights of another size, example inputs that are not tensors)."""
    blobs = pack.manifest["blobs"]
    cases = []
    for i in range(len(blobs)):
        for j in range(i + 1, len(blobs)):
            def edit(m, i=i, j=j):
                m["blobs"][i]["name"], m["blobs"][j]["name"] = m["blobs"][j]["name"], m["blobs"][i]["name"]
            cases.append(Case(f"names of {blobs[i]['name']} and {blobs[j]['name']} swapped", pack.edited(edit),
                              CLEAN))
    return cases


# ---------------------------------------------------------------------------------------------------
# Cases Hypothesis draws


INTERESTING_INTS = [0, 1, -1, 63, 64, 65, 2**31 - 1, 2**32, 2**40, 2**40 + 1, 2**48, 2**63 - 1, 2**64, -2**63, 10**600,
                    -10**600]


def json_values() -> st.SearchStrategy:
    scalars = (st.none() | st.booleans() | st.sampled_from(INTERESTING_INTS) | st.integers(-100, 100)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                      max_size=3), max_leaves=6)


def _position(draw, pack: Pack, length: int) -> int:
    """A byte position: anywhere, or in a region picked first (so that small regions are hit too)."""
    if draw(st.booleans()):
        return draw(st.integers(0, length - 1))
    r = draw(st.sampled_from(pack.regions))
    return draw(st.integers(r.start, r.end - 1))


def draw_bit_flips(draw, pack: Pack) -> Case:
    data = bytearray(pack.data)
    flips = []
    for _ in range(draw(st.integers(1, 8))):
        pos, bit = _position(draw, pack, len(data)), draw(st.integers(0, 7))
        data[pos] ^= 1 << bit
        flips.append((pos, bit))
    assume(bytes(data) != pack.data)
    return Case(f"(byte, bit) {flips} flipped", bytes(data), pack.expect_for(bytes(data)), True)


def draw_overwrite(draw, pack: Pack) -> Case:
    pos = _position(draw, pack, len(pack.data))
    junk = draw(st.binary(min_size=1, max_size=64))[: len(pack.data) - pos]
    data = pack.data[:pos] + junk + pack.data[pos + len(junk):]
    assume(data != pack.data)
    return Case(f"{len(junk)} bytes overwritten at {pos}", data, pack.expect_for(data), True)


def draw_truncation(draw, pack: Pack) -> Case:
    cut = _position(draw, pack, len(pack.data))
    return Case(f"truncated at byte {cut}", pack.data[:cut], REFUSED, True)


def draw_insertion(draw, pack: Pack) -> Case:
    pos = len(pack.data) if draw(st.booleans()) else _position(draw, pack, len(pack.data))
    junk = draw(st.binary(min_size=1, max_size=64))
    return Case(f"{len(junk)} bytes inserted at {pos}", pack.data[:pos] + junk + pack.data[pos:], REFUSED, True)


def draw_deletion(draw, pack: Pack) -> Case:
    pos = _position(draw, pack, len(pack.data))
    n = draw(st.integers(1, 64))
    return Case(f"{n} bytes deleted at {pos}", pack.data[:pos] + pack.data[pos + n:], REFUSED, True)


def draw_header_field(draw, pack: Pack) -> Case:
    """version, flags or manifest length changed; with a new length, the hash of the new span is written
    where the file has one, so the reader gets past the hash to the JSON."""
    magic, version, flags, mlen, sha = fmt.HEADER.unpack(pack.data[:fmt.HEADER_SIZE])
    field = draw(st.sampled_from(["version", "flags", "manifest length"]))
    bits = 64 if field == "manifest length" else 32
    value = draw(st.sampled_from(INTERESTING_INTS) | st.integers(0, 2 * mlen + 64)) % (1 << bits)
    if field == "version":
        version = value
    elif field == "flags":
        flags = value
    else:
        mlen = value
        span = pack.data[fmt.HEADER_SIZE: fmt.HEADER_SIZE + mlen]
        if len(span) == mlen:
            sha = hashlib.sha256(span).digest()
    data = fmt.HEADER.pack(magic, version, flags, mlen, sha) + pack.data[fmt.HEADER_SIZE:]
    assume(data != pack.data)
    return Case(f"header {field} = {value}", data, REFUSED)


KEY = re.compile(rb'[{,]"([^"\\]*)":')


def draw_manifest_text(draw, pack: Pack) -> Case:
    """Text the reader must refuse, under a right hash: duplicate keys, whitespace, bytes that are not
    UTF-8, non-JSON numbers, or a random JSON document."""
    text = pack.manifest_text
    keys = list(KEY.finditer(text))
    kind = draw(st.sampled_from(["duplicate key", "whitespace", "not UTF-8", "NaN", "random document"]))
    if kind == "duplicate key":
        m = draw(st.sampled_from(keys))
        value = fmt.canonical_json(draw(json_values()))
        raw = text[: m.start() + 1] + b'"' + m.group(1) + b'":' + value + b"," + text[m.start() + 1:]
    elif kind == "whitespace":
        m = draw(st.sampled_from(keys))
        raw = text[: m.end()] + draw(st.sampled_from([b" ", b"\n", b"\t", b"\r\n"])) + text[m.end():]
    elif kind == "not UTF-8":
        pos = draw(st.integers(0, len(text) - 1))
        raw = text[:pos] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])) + text[pos + 1:]
    elif kind == "NaN":
        numbers = list(re.finditer(rb":(-?\d+)(?=[,}\]])", text))
        m = draw(st.sampled_from(numbers))
        raw = text[: m.start(1)] + draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"])) \
            + text[m.end(1):]
    else:
        raw = fmt.canonical_json(draw(json_values()))
    return Case(kind, pack.with_manifest_bytes(raw), REFUSED)


def draw_blob_record(draw, pack: Pack) -> Case:
    """One field of one blob record set to an arbitrary value, the hash recomputed."""
    i = draw(st.integers(0, len(pack.manifest["blobs"]) - 1))
    key = draw(st.sampled_from(["name", "offset", "stored_size", "size", "sha256", "compression", None]))
    value = draw(json_values())

    def edit(m):
        if key is None:  # the record itself replaced
            m["blobs"][i] = value
        else:
            m["blobs"][i][key] = value
    data = pack.edited(edit)
    assume(data != pack.data)
    return Case(f"blobs[{i}].{key} = {value!r}", data, CLEAN)


def _places(node: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """Every place in a JSON document: (path of keys and indexes, value)."""
    out = [(path, node)]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _places(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _places(v, path + (i,))
    return out


def draw_manifest_edit(draw, pack: Pack) -> Case:
    """Anywhere in the manifest: a value replaced (by any JSON, or by another value of the manifest so that
    names and sizes stay plausible), a key removed or added, a list element removed or repeated."""
    manifest = json.loads(json.dumps(pack.manifest))
    places = _places(manifest)[1:]
    scalars = [v for _, v in places if not isinstance(v, (dict, list))]
    keys = sorted({k for path, _ in places for k in path if isinstance(k, str)})
    path, old = draw(st.sampled_from(places))
    parent = manifest
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    op = draw(st.sampled_from(["replace", "replace with a manifest value", "nudge", "remove", "repeat", "add key"]))
    if op == "replace":
        parent[last] = draw(json_values())
    elif op == "replace with a manifest value":
        parent[last] = draw(st.sampled_from(scalars))
    elif op == "nudge":
        assume(type(old) is int)
        parent[last] = old + draw(st.sampled_from([-64, -1, 1, 64, 1 << 40]))
    elif op == "remove":
        del parent[last]
    elif op == "repeat":
        assume(isinstance(parent, list))
        parent.insert(last, old)
    else:
        assume(isinstance(old, dict))
        old[draw(st.sampled_from(keys))] = draw(json_values() | st.sampled_from(scalars))
    data = pack.with_manifest_bytes(fmt.canonical_json(manifest))
    assume(data != pack.data)
    return Case(f"{op} at {list(path)}", data, CLEAN)


def drawn_cases(pack: Pack, families: list, n: int) -> list[Case]:
    """``n`` cases drawn by Hypothesis from ``families`` (derandomized: the same cases on every run)."""
    cases: list[Case] = []
    seen: set[bytes] = set()

    # Hypothesis is used here as a generator: the checks run later, in one worker process for all cases.
    @settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def collect(data):
        family = data.draw(st.sampled_from(families))
        case = family(data.draw, pack)
        digest = hashlib.sha256(case.data).digest()
        if digest not in seen:
            seen.add(digest)
            cases.append(Case(f"{family.__name__[5:]}: {case.label}", case.data, case.expect, case.same_answer))

    collect()
    return cases


# ---------------------------------------------------------------------------------------------------
# Running the cases in a worker process, and judging the outcomes


def _stage_kind(outcome: str | None) -> str | None:
    return outcome if outcome in (None, "ok") else outcome.split(":", 1)[0]


def judge(case: Case, result: dict | str, reference: list | None) -> str | None:
    """Why this outcome is wrong for this case, or None."""
    if isinstance(result, str):
        return result
    allowed = {"load": ("ok", "ArchiveError"), "call": (None, "ok", "ArchiveError", "GuardError"),
               "verify": ("ok", "ArchiveError")}
    for stage, kinds in allowed.items():
        if _stage_kind(result[stage]) not in kinds:
            return f"{stage}: {result[stage]}"
    if case.expect == ORIGINAL and not result["load"] == result["call"] == result["verify"] == "ok":
        return f"the unmodified pack does not load, run and verify: {result}"
    if case.expect == REFUSED and not (_stage_kind(result["load"]) == _stage_kind(result["verify"]) == "ArchiveError"):
        return f"not refused: load {result['load']}, verify {result['verify']}"
    if case.expect == DETECTED and _stage_kind(result["verify"]) != "ArchiveError":
        return "verify did not detect the change"
    if case.same_answer and result["digest"] is not None and result["digest"] != reference:
        return "SILENTLY WRONG: the call worked and its outputs differ from the unmodified pack's"
    return None


def _stream(proc: subprocess.Popen, lines: queue.Queue) -> None:
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)


def run_in_worker(cases: list[Case], workdir: pathlib.Path, worker: pathlib.Path = WORKER,
                  case_seconds: int = CASE_SECONDS, slack: int = 15) -> list[dict | str]:
    """Each case's result line from the worker, or a sentence saying how the worker died or hung on it (no
    line ``slack`` seconds after its own time limit)."""
    files = []
    for i, case in enumerate(cases):
        path = workdir / f"case-{i:05d}.pack"
        path.write_bytes(case.data)
        files.append({"id": i, "path": str(path)})
    results: dict[int, dict | str] = {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for _ in range(MAX_WORKERS):
        todo = [f for f in files if f["id"] not in results]
        if not todo:
            break
        (workdir / "cases.json").write_text(json.dumps(todo))
        with open(workdir / "worker-stderr.txt", "w+") as stderr:
            proc = subprocess.Popen([sys.executable, str(worker), str(workdir / "cases.json"),
                                     str(workdir / "cache"), str(case_seconds)],
                                    stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=str(ROOT))
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_stream, args=(proc, lines), daemon=True).start()
            current = None
            hung = False
            timeout = STARTUP_SECONDS  # the first line waits for torch to import, later ones for one case
            while True:
                try:
                    line = lines.get(timeout=timeout)
                except queue.Empty:
                    hung = True
                    proc.kill()
                    break
                if line is None:
                    break
                timeout = case_seconds + slack
                event = json.loads(line)
                if "start" in event:
                    current = event["start"]
                else:
                    results[event["end"]] = event
                    current = None
            proc.wait()
            stderr.seek(0)
            tail = stderr.read()[-3000:]
        if current is None:
            assert len(results) == len(cases), f"the fuzz worker failed outside any case:\n{tail}"
            break
        results[current] = (f"the worker hung (no result after {timeout} s)" if hung else
                            f"the worker died with exit status {proc.returncode}") + f"; its stderr ends:\n{tail}"
    for f in files:
        results.setdefault(f["id"], f"not run: the worker died {MAX_WORKERS} times before it")
    return [results[i] for i in range(len(cases))]


def check_cases(cases: list[Case], workdir: pathlib.Path) -> None:
    assert cases[0].expect == ORIGINAL
    results = run_in_worker(cases, workdir)
    reference = results[0]["digest"] if isinstance(results[0], dict) else None
    failures = []
    for i, (case, result) in enumerate(zip(cases, results)):
        why = judge(case, result, reference)
        path = workdir / f"case-{i:05d}.pack"
        if why is None:
            path.unlink()  # keep only the files that fail, to reproduce them
        else:
            failures.append(f"- {case.label} [{path.name}, expected {case.expect}]: {why}")
    slowest = max((r["seconds"], c.label) for c, r in zip(cases, results) if isinstance(r, dict))
    print(f"{len(cases)} cases, slowest {slowest[0]} s ({slowest[1]})")
    assert not failures, f"{len(failures)} of {len(cases)} fuzz cases failed (files in {workdir}):\n" + \
        "\n".join(failures[:40])


BYTE_FAMILIES = [draw_bit_flips, draw_overwrite, draw_truncation, draw_insertion, draw_deletion, draw_header_field,
                 draw_manifest_text, draw_blob_record]


@pytest.fixture(params=["mlp", "multi_io", "two_tower"])
def pack(request) -> Pack:
    return Pack(request.getfixturevalue(f"{request.param}_pack").path.read_bytes())


def test_corrupt_packs_fail_cleanly(pack, tmp_path):
    """Damaged bytes and impossible blob tables: refused, or detected before any damaged byte is used."""
    cases = [Case("original", pack.data, ORIGINAL)]
    cases += region_cases(pack) + blob_table_cases(pack) + region_swap_cases(pack) + hostile_files(pack)
    cases += drawn_cases(pack, BYTE_FAMILIES, EXAMPLES)
    check_cases(cases, tmp_path)


def test_edited_manifests_fail_cleanly(pack, tmp_path):
    """Manifests edited anywhere, with every hash consistent: a clean error or a pack that works."""
    cases = [Case("original", pack.data, ORIGINAL)]
    cases += name_swap_cases(pack) + drawn_cases(pack, [draw_manifest_edit], EXAMPLES)
    check_cases(cases, tmp_path)


def test_a_worker_that_dies_or_hangs_names_the_case(tmp_path):
    """The harness itself: a crash and a hang are each pinned on the case that was running, and the cases
    after them still run."""
    fake = tmp_path / "fake_worker.py"
    fake.write_text(
        "import json, os, signal, sys, time\n"
        "for case in json.load(open(sys.argv[1])):\n"
        "    print(json.dumps({'start': case['id']}), flush=True)\n"
        "    if case['id'] == 1: os.kill(os.getpid(), signal.SIGSEGV)\n"
        "    if case['id'] == 2: time.sleep(60)\n"
        "    print(json.dumps({'end': case['id'], 'load': 'ok', 'call': 'ok', 'verify': 'ok', 'digest': [],\n"
        "                      'seconds': 0}), flush=True)\n")
    results = run_in_worker([Case(str(i), b"", CLEAN) for i in range(4)], tmp_path, fake, case_seconds=1, slack=2)
    assert isinstance(results[0], dict) and isinstance(results[3], dict)
    assert results[1].startswith(f"the worker died with exit status {-signal.SIGSEGV}")
    assert results[2].startswith("the worker hung (no result after 3 s)")
