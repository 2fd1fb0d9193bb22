"""Shared fixtures. Real packs are built once per test session (an Inductor compile is 5-30 s here) and
shared; every cache a build or load writes goes to a session folder that is removed at the end."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

_session_tmp = tempfile.mkdtemp(prefix="aotpack-tests-")
os.environ["AOTPACK_CACHE_DIR"] = os.path.join(_session_tmp, "cache")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_session_tmp, "inductor")
os.environ["AOTPACK_BUILD_CACHE"] = os.path.join(_session_tmp, "build-cache")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_session_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def session_dir() -> pathlib.Path:
    return pathlib.Path(_session_tmp)


class Built:
    """A pack built from an example file, with the model and inputs it came from."""

    def __init__(self, name: str, path: pathlib.Path, spec):
        self.name = name
        self.path = path
        self.model = spec.model
        self.args = spec.example_inputs
        self.kwargs = spec.example_kwargs


_built: dict[str, Built] = {}


def build_example(name: str, session_dir: pathlib.Path) -> Built:
    """Build ``examples/NAME.py`` once per session (``NAME`` may name a subfolder: ``llm/llama``)."""
    if name not in _built:
        import aotpack
        from aotpack.modelfile import load_model_file

        spec = load_model_file(str(EXAMPLES / f"{name}.py"))
        out = session_dir / f"{name.replace('/', '-')}.pack"
        aotpack.build(spec.model, spec.example_inputs, out, example_kwargs=spec.example_kwargs,
                      dynamic_shapes=spec.dynamic_shapes)
        _built[name] = Built(name, out, spec)
    return _built[name]


@pytest.fixture(scope="session")
def mlp_pack(session_dir) -> Built:
    return build_example("mlp", session_dir)


@pytest.fixture(scope="session")
def convnet_pack(session_dir) -> Built:
    return build_example("convnet", session_dir)


@pytest.fixture(scope="session")
def multi_io_pack(session_dir) -> Built:
    return build_example("multi_io", session_dir)


@pytest.fixture(scope="session", params=["mlp", "convnet", "multi_io"])
def example_pack(request, session_dir) -> Built:
    return build_example(request.param, session_dir)


def run_python(code: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python process (the same interpreter), returning the completed process."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=str(ROOT))


@pytest.fixture(scope="session", params=["llama", "qwen3", "gemma2"])
def llm_pack(request, session_dir) -> Built:
    """A tiny decoder with a static KV cache (examples/llm/), built into a stateful pack."""
    return build_example(f"llm/{request.param}", session_dir)


@pytest.fixture(scope="session")
def llama_pack(session_dir) -> Built:
    return build_example("llm/llama", session_dir)


class Counter:
    """A stateful model: a step counter (a 0-d buffer whose old value is read) and a rolling history."""

    @staticmethod
    def make():
        import torch

        class CounterModel(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("count", torch.zeros(()))
                self.register_buffer("history", torch.zeros(4))
                self.scale = torch.nn.Parameter(torch.tensor(2.0))

            def forward(self, x):
                self.count.add_(1)
                self.history.copy_(torch.cat([x.sum().reshape(1), self.history[:-1]]))
                return x * self.count * self.scale, self.history.sum()

        return CounterModel().eval()


@pytest.fixture(scope="session")
def counter_pack(session_dir) -> pathlib.Path:
    """A small pack with state (Counter), built once per session."""
    import torch

    import aotpack

    path = session_dir / "counter.pack"
    if not path.exists():
        aotpack.build(Counter.make(), (torch.ones(3),), path)
    return path


@pytest.fixture(scope="session")
def corpus_pack(session_dir) -> pathlib.Path:
    """The corpus of tests/corpus.py as one pack: one entry per group of models (the dynamic group first, with
    its dynamic shapes; the others as specializations), compiled in parallel."""
    import aotpack
    import corpus

    model = corpus.Corpus().eval()
    groups = list(corpus.GROUPS)
    main = groups[-1]
    path = session_dir / "corpus.pack"
    aotpack.build(model, (main, corpus.group_inputs(corpus.GROUPS[main], 0, 0)), path,
                  dynamic_shapes={"group": None, **corpus.group_dynamic_shapes(corpus.GROUPS[main])},
                  specializations=[(g, corpus.group_inputs(corpus.GROUPS[g], 0, 0)) for g in groups if g != main])
    return path
