"""Loads fuzzed packs one after the other, in a process of its own, and says how each load ended.

Run by tests/test_fuzz_archive.py as ``python fuzz_worker.py CASES_JSON CACHE_DIR CASE_SECONDS``, where
CASES_JSON lists ``{"id": ..., "path": ...}``. For each case it prints one JSON line before it starts
(``{"start": id}``), so that if the process dies of a signal or hangs in native code the parent knows
which file did it, and one line when it ends:

    {"end": id, "load": OUTCOME, "call": OUTCOME | null, "verify": OUTCOME, "digest": [...] | null,
     "seconds": float}

An OUTCOME is ``"ok"``, ``"ArchiveError: ..."``, ``"GuardError: ..."``, or, for anything else (the bugs
the fuzz test looks for), ``"BUG <type>: <message>"`` followed by the innermost frames of the traceback.
``digest`` fingerprints the outputs of a call that worked, so the parent can tell a right answer from a
silently wrong one. A case that runs past CASE_SECONDS is interrupted with SIGALRM and ends as
``"TIMEOUT"`` (native code that never returns to Python is caught by the parent's own timeout instead).
"""
from __future__ import annotations

import faulthandler
import hashlib
import json
import resource
import signal
import sys
import time
import traceback

# Allocations a pack asks for are part of what is tested: cap the address space, so an allocation the
# loader failed to bound becomes an exception here instead of exhausting the machine. Torch with one
# thread needs well under 1 GiB of it.
_ADDRESS_SPACE = 6 << 30
resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE, _ADDRESS_SPACE))
faulthandler.enable()  # on a segfault, the Python stack goes to stderr for the parent's report

import torch  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402

import aotpack  # noqa: E402
from aotpack_runtime.archive import Archive  # noqa: E402

torch.set_num_threads(1)  # the same reductions in every call, so digests of right answers are equal


class CaseTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that no ``except Exception`` in the code under test eats it."""


def _on_alarm(signum, frame):
    raise CaseTimeout


def _outcome(fn):
    """Run ``fn``; return (outcome text, its result or None)."""
    try:
        return "ok", fn()
    except (aotpack.ArchiveError, aotpack.GuardError) as e:
        return f"{type(e).__name__}: {e}", None
    except CaseTimeout:
        raise
    except BaseException as e:  # noqa: BLE001 - anything else is what the test is looking for
        frames = "".join(traceback.format_tb(e.__traceback__)[-3:])
        return f"BUG {type(e).__name__}: {str(e)[:500]}\n{frames}", None


def _digest(out) -> list:
    leaves, spec = pytree.tree_flatten(out)
    parts = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            parts.append(f"{t.dtype}{list(t.shape)}:{hashlib.sha256(raw).hexdigest()}")
        else:
            parts.append(repr(leaf))
    return parts


def run_case(path: str, cache_dir: str) -> dict:
    result: dict = {"call": None, "digest": None}
    result["load"], pkg = _outcome(lambda: aotpack.load(path, cache_dir=cache_dir))
    if pkg is not None:
        def call():
            method = next(iter(pkg.methods))  # forward, or the first of a pack's several methods
            args, kwargs = pkg.example_inputs(method)
            return _digest(pkg.methods[method](*args, **kwargs))
        result["call"], result["digest"] = _outcome(call)
    result["verify"], _ = _outcome(lambda: Archive.open(path).verify())
    return result


def main() -> None:
    cases_file, cache_dir, case_seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(cases_file) as f:
        cases = json.load(f)
    signal.signal(signal.SIGALRM, _on_alarm)
    for case in cases:
        print(json.dumps({"start": case["id"]}), flush=True)
        start = time.perf_counter()
        signal.alarm(case_seconds)
        try:
            result = run_case(case["path"], cache_dir)
        except CaseTimeout:
            result = {"load": "TIMEOUT", "call": None, "verify": "TIMEOUT", "digest": None}
        finally:
            signal.alarm(0)
        result.update({"end": case["id"], "seconds": round(time.perf_counter() - start, 3)})
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
