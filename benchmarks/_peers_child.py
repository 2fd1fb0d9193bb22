"""One step of the peer comparison in a fresh process, run by ``bench.py --peers``:
``python _peers_child.py MODE RESULT_JSON MODEL FOLDER [THREADS CALLS WARMUP ROUNDS]``.

``prepare`` builds the pack (``FOLDER/MODEL.pack``) and exports the ONNX model (``FOLDER/MODEL.onnx``,
``torch.onnx.export(..., dynamo=True)``), and writes each step's seconds or error. ``latency`` runs with
``THREADS`` intra-op threads (torch, ONNX Runtime's ``intra_op_num_threads``, OpenVINO's
``INFERENCE_NUM_THREADS``; ``OMP_NUM_THREADS`` is set by the parent), checks every contender's output against
eager, and times them in turns: ``ROUNDS`` rounds of ``CALLS // ROUNDS`` calls each after ``WARMUP`` calls.
A contender whose package is not installed is reported as skipped, with the reason.
"""
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import peer_models

TOLERANCE = 1e-4  # max |contender - eager| / max(1, max |eager|)


def attempt(fn) -> dict:
    start = time.perf_counter()
    try:
        fn()
    except Exception as e:  # a failed step is a result, not the end of the run
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    return {"seconds": time.perf_counter() - start}


def prepare(name: str, folder: Path) -> dict:
    import aotpack

    model, args = peer_models.make(name)

    def onnx_export():
        import onnx  # noqa: F401 - the exporter needs it; a clear "not installed" when it is missing
        import onnxscript  # noqa: F401

        torch.onnx.export(model, args, str(folder / f"{name}.onnx"), dynamo=True, external_data=False)

    return {"aotpack": attempt(lambda: aotpack.build(model, args, folder / f"{name}.pack", progress=False)),
            "onnx": attempt(onnx_export)}


def contenders(name: str, folder: Path, threads: int) -> tuple[dict, dict, dict, torch.Tensor]:
    """``{contender: call()}`` (each returns a torch tensor), ``{contender: skip reason}``, ``{contender:
    error}`` and eager's output."""
    import aotpack

    model, args = peer_models.make(name)
    with torch.inference_mode():
        ref = model(*args)
    calls, skipped, failed = {}, {}, {}

    def eager():
        with torch.inference_mode():
            return model(*args)

    calls["eager"] = eager

    def aotpack_():
        pkg = aotpack.load(folder / f"{name}.pack")

        def call():
            with torch.inference_mode():
                return pkg(*args)

        return call

    onnx_path = folder / f"{name}.onnx"
    feeds_np = [a.numpy() for a in args]

    def onnxruntime():
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        feed = {i.name: a for i, a in zip(session.get_inputs(), feeds_np)}
        return lambda: torch.from_numpy(session.run(None, feed)[0])

    def openvino():
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU",
                                      {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                       # float32 like the others: OpenVINO computes in bfloat16 by default
                                       # on a CPU that has it (avx512_bf16, AMX)
                                       "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()

        def call():
            request.infer(feeds_np)
            return torch.from_numpy(request.get_output_tensor(0).data.copy())

        return call

    for contender, make in (("aotpack", aotpack_), ("onnxruntime", onnxruntime), ("openvino", openvino)):
        try:
            calls[contender] = make()
        except ImportError as e:  # aotpack is never skipped: this script needs it
            if contender == "aotpack":
                raise
            skipped[contender] = f"not installed ({e}); pip install aotpack[bench]"
        except Exception as e:  # e.g. no pack or no ONNX model: its step failed (see the prepare step)
            traceback.print_exc()
            failed[contender] = f"{type(e).__name__}: {str(e)[:400]}"
    return calls, skipped, failed, ref


def latency(name: str, folder: Path, threads: int, calls: int, warmup: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    fns, skipped, failed, ref = contenders(name, folder, threads)
    result: dict = {c: {"skipped": why} for c, why in skipped.items()}
    result.update({c: {"error": why} for c, why in failed.items()})
    scale = max(1.0, ref.abs().max().item())
    for c, fn in list(fns.items()):
        try:
            diff = (fn().float() - ref).abs().max().item() / scale
        except Exception as e:
            traceback.print_exc()
            result[c] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            del fns[c]
            continue
        result[c] = {"rel_diff_vs_eager": diff, "within_tolerance": diff <= TOLERANCE}
        for _ in range(warmup):
            fn()
    samples: dict = {c: [] for c in fns}
    for _ in range(rounds):
        for c, fn in fns.items():
            for _ in range(max(1, calls // rounds)):
                start = time.perf_counter()
                fn()
                samples[c].append(time.perf_counter() - start)
    for c, s in samples.items():
        result[c]["median_us"] = 1e6 * statistics.median(s)
        result[c]["calls"] = len(s)
    return result


def main(mode: str, result_path: str, name: str, folder: str, *rest: str) -> None:
    folder_path = Path(folder)
    if mode == "prepare":
        result = prepare(name, folder_path)
    elif mode == "latency":
        threads, calls, warmup, rounds = map(int, rest)
        result = latency(name, folder_path, threads, calls, warmup, rounds)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
