"""The way into a build that the Python API (``aotpack.build``), the CLI (``aotpack build``) and
``build-many``'s workers share: build options from their plain values, the build cache from its setting, a
model file loaded, and the pipeline run.

May not: print, exit or read the environment itself: progress goes to the callback given, errors propagate
(the CLI turns them into exit codes), and the build cache's default folder is ``buildcache``'s to find.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Sequence

from aotpack_runtime.errors import BuildError

from .buildcache import BuildCache
from .options import DEFAULT_CPU_THREADS, BuildOptions

ProgressFn = Callable[[str], None]


def options(*, cpu_isa: str | None = None, devices: Sequence[str] = ("cpu",), cuda_archs: Any = (),
            without_gpu: bool = False, cpu_threads: int | None = None, onednn_convs: bool = True) -> BuildOptions:
    """The resolved :class:`BuildOptions` for these values, so that a bad option is a ``BuildError`` before
    the model runs. ``cuda_archs`` is ``"80,90"``, one int, or a list of either."""
    archs = tuple(cuda_archs) if isinstance(cuda_archs, (list, tuple)) else (cuda_archs,)
    return BuildOptions(cpu_isa=cpu_isa, devices=tuple(devices), cuda_archs=archs, without_gpu=without_gpu,
                        cpu_threads=DEFAULT_CPU_THREADS if cpu_threads is None else cpu_threads,
                        onednn_convs=onednn_convs).resolved()


def cache_setting(no_cache: bool, cache_dir: str | os.PathLike | None) -> Any:
    """The ``cache`` argument of :func:`build` for the CLI's ``--no-cache`` and ``--cache-dir``: ``False``,
    that folder, or ``True`` (the default folder)."""
    return False if no_cache else (cache_dir or True)


def build(model: Any, example_inputs: tuple, output: str | pathlib.Path, *, options: BuildOptions, cache: Any,
          progress: ProgressFn | None, source: str, example_kwargs: dict | None = None, dynamic_shapes: Any = None,
          specializations: Sequence = (), cache_positions: Any = None, threads: int | None = None,
          model_file: Any = None, methods: Any = None, weights: str = "internal"):
    """Run the pipeline (``pipeline.build``) with the build cache ``cache`` names (``True``: the default
    folder, a path: that folder, ``False``/``None``: none); return its ``BuildReport``. ``methods``: the
    program's methods (name -> ``aotpack.Method``), see ``pipeline.build``. ``weights="external"`` moves the
    weights into a safetensors file beside the pack, which the pack pins (``reweight.externalize``; the build
    cache keeps the whole pack)."""
    from .pipeline import build as run

    if weights not in ("internal", "external"):
        raise BuildError(f"weights={weights!r}: use 'internal' (in the pack) or 'external' (a file beside it)")
    if weights == "external":
        from .reweight import external_file_for

        external_file_for(output)  # a name it cannot use is an error before the build
    report = run(model, example_inputs, output, example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes,
               specializations=specializations, options=options, progress=progress,
               cache_positions=cache_positions, cache=BuildCache.open(cache), source=source, threads=threads,
               model_file=model_file, methods=methods)
    if weights == "external":
        from .reweight import externalize

        report.weights_file = externalize(report.output)
        if progress is not None:
            progress(f"      weights: moved to {report.weights_file}, pinned by the pack; ship the two files together")
    return report


def build_file(target: str, output: str | pathlib.Path, *, options: BuildOptions, cache: Any,
               progress: ProgressFn | None, dynamic_shapes: Any = None, threads: int | None = None,
               weights: str = "internal"):
    """Load the model file ``target`` (``FILE.py`` or ``FILE.py:NAME``, see ``modelfile``) and :func:`build`
    it (its ``methods`` too, where it defines them); ``dynamic_shapes``, when given, replaces the file's (a
    ``BuildError`` for a file that defines methods: each method has its own)."""
    from . import sourcekey

    if progress is not None:
        progress(f"loading {target}")
    spec, model_file = sourcekey.load(target)
    if spec.methods is not None and dynamic_shapes is not None:
        raise BuildError(f"--dynamic does not apply to {target}, which defines methods: give each method's "
                         "dynamic_shapes in its aotpack.Method")
    return build(spec.model, spec.example_inputs, output, options=options, cache=cache, progress=progress,
                 source=target, example_kwargs=spec.example_kwargs,
                 dynamic_shapes=dynamic_shapes if dynamic_shapes is not None else spec.dynamic_shapes,
                 specializations=spec.specializations, cache_positions=spec.cache_positions, threads=threads,
                 model_file=model_file, methods=spec.methods, weights=weights)
