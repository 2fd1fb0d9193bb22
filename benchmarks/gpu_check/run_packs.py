"""Run the packs in benchmarks/gpu_check/packs (built without a GPU on a CPU host by torch 2.11, see
build-packs.sh) and compare them with the eager model of the example they came from.

On a GPU: each pack's CUDA entry runs on cuda:0 (inputs moved there) and must match eager on the same GPU, and
its CPU entry must match eager on the CPU. Without a GPU only the CPU entries run, and each line says why the
CUDA entry did not. One line per pack; exit status 1 if any pack fails.

Usage: python benchmarks/gpu_check/run_packs.py
"""
from __future__ import annotations

import pathlib
import sys
import traceback
import warnings

import torch
import torch.utils._pytree as pytree

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKS = ROOT / "benchmarks" / "gpu_check" / "packs"


def _to(device: str, tree):
    return pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, tree)


def _error(got, expected) -> float:
    """Largest error of any output relative to that output's scale; inf if the structures differ."""
    a, a_spec = pytree.tree_flatten(got)
    e, e_spec = pytree.tree_flatten(expected)
    if a_spec != e_spec:
        return float("inf")
    worst = 0.0
    for x, y in zip(a, e):
        if isinstance(y, torch.Tensor) and y.numel():
            scale = max(y.abs().max().item(), 1e-6)
            worst = max(worst, (x.float().cpu() - y.float().cpu()).abs().max().item() / scale)
    return worst


def run_pack(path: pathlib.Path, gpu: bool) -> tuple[bool, str]:
    import aotpack
    from aotpack.modelfile import load_model_file

    spec = load_model_file(str(ROOT / "examples" / f"{path.stem}.py"))
    args, kwargs = spec.example_inputs, spec.example_kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "built without a GPU" and, here without one, "cannot run CUDA"
        pkg = aotpack.load(path)
    cuda = pkg.manifest.entries[1].cuda.to_json()
    built = f"built without a GPU by torch {pkg.manifest.producer['torch']} for {', '.join(cuda['archs'])}"
    with torch.no_grad():
        cpu_err = _error(pkg(*args, **kwargs), spec.model(*args, **kwargs))
        if not gpu:
            from aotpack_runtime.platform import cuda_unavailable_reason

            return cpu_err <= 1e-4, (f"{path.name} ({built}): CPU entry max error {cpu_err:.1e} vs eager; CUDA "
                                     f"entry not run: {cuda_unavailable_reason()}")
        major, minor = torch.cuda.get_device_capability(0)
        gpu_args, gpu_kwargs = _to("cuda:0", (args, kwargs))
        model = spec.model.to("cuda:0")
        if pkg.select(*gpu_args, **gpu_kwargs).device != "cuda":
            return False, f"{path.name}: CUDA inputs did not select the CUDA entry"
        got = pkg(*gpu_args, **gpu_kwargs)
        torch.cuda.synchronize()
        cuda_err = _error(got, model(*gpu_args, **gpu_kwargs))
    ok = cpu_err <= 1e-4 and cuda_err <= 1e-4
    return ok, (f"{path.name} ({built}): on {torch.cuda.get_device_name(0)} (sm_{major}{minor}) CUDA entry max "
                f"error {cuda_err:.1e} vs eager on the GPU; CPU entry {cpu_err:.1e}")


def main() -> int:
    gpu = torch.cuda.is_available()
    packs = sorted(PACKS.glob("*.pack"))
    if not packs:
        print(f"no packs in {PACKS}: run bash benchmarks/gpu_check/build-packs.sh", file=sys.stderr)
        return 1
    failed = 0
    for path in packs:
        try:
            ok, line = run_pack(path, gpu)
        except Exception as e:  # reported per pack; the next one still runs
            ok, line = False, f"{path.name}: {type(e).__name__}: {e}"
            traceback.print_exc()
        failed += not ok
        print(("ok    " if ok else "FAIL  ") + line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
