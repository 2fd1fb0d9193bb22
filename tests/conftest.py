"""Shared fixtures. Real packs are built once per test session (an Inductor compile is 5-30 s here) and
shared; every cache a build or load writes goes to a session folder that is removed at the end."""
from __future__ import annotations

import copy
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# Each cache a build or a load writes, as the variable that points it at a folder of the session's: the code
# cache, Inductor's own cache and the build cache.
SESSION_CACHES = {"AOTPACK_CACHE_DIR": "cache", "TORCHINDUCTOR_CACHE_DIR": "inductor",
                  "AOTPACK_BUILD_CACHE": "build-cache"}
_session: dict = {}  # "dir": the session folder; "saved": the variables' values before pytest_configure


def pytest_configure(config):
    """Make the session folder and point every cache at it through the environment, before any test module
    is imported: this process and every process a test starts read and write there, never the user's caches."""
    folder = tempfile.mkdtemp(prefix="aotpack-tests-")
    _session.update(dir=folder, saved={name: os.environ.get(name) for name in SESSION_CACHES})
    for name, sub in SESSION_CACHES.items():
        os.environ[name] = os.path.join(folder, sub)


def pytest_unconfigure(config):
    """Remove the session folder and give the variables back their values."""
    if "dir" not in _session:
        return
    for name, value in _session.pop("saved").items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(_session.pop("dir"), ignore_errors=True)


@pytest.fixture(scope="session")
def session_dir() -> pathlib.Path:
    return pathlib.Path(_session["dir"])


class Built:
    """A pack built once per session, with the model and example inputs it came from: what every pack fixture
    returns."""

    def __init__(self, name: str, path: pathlib.Path, model, args: tuple, kwargs: dict | None = None):
        self.name = name
        self.path = path
        self.model = model
        self.args = args
        self.kwargs = kwargs or {}


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
        _built[name] = Built(name, out, spec.model, spec.example_inputs, spec.example_kwargs)
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
def counter_pack(session_dir) -> Built:
    """A small pack with state (Counter), built once per session."""
    import torch

    import aotpack

    path = session_dir / "counter.pack"
    model, args = Counter.make(), (torch.ones(3),)
    if not path.exists():
        aotpack.build(model, args, path)
    return Built("counter", path, model, args)


class WeightsModel:
    """A model with every kind of weight new weights must reach: a Linear with its bias, a one-element
    parameter, a scale buffer, a batch norm in eval, an lm_head tied to the embedding, a non-persistent
    buffer, a tensor constant created in forward, a submodule forward never uses, and two weights the code
    reads only through an op on them alone whose elements are all equal at build (a 0-d gate through exp, a
    Gemma-style norm weight of zeros through 1 + w)."""

    @staticmethod
    def make(seed: int = 0):
        import torch

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(16, 8)
                self.lin = torch.nn.Linear(8, 8)
                self.bn = torch.nn.BatchNorm1d(8)
                self.head = torch.nn.Linear(8, 16, bias=False)
                self.head.weight = self.emb.weight
                self.one = torch.nn.Parameter(torch.tensor([0.25]))
                self.register_buffer("scale", torch.tensor([1.5]))
                self.register_buffer("shift", torch.tensor([0.125]), persistent=False)
                self.unused = torch.nn.Linear(3, 3)
                # read only through ops on the weight alone, with all elements equal at build time
                self.gate = torch.nn.Parameter(torch.tensor(0.5))
                self.norm = torch.nn.Parameter(torch.zeros(8))

            def forward(self, idx):
                h = self.lin(self.emb(idx)).transpose(1, 2)
                h = self.bn(h).transpose(1, 2) * (1 + self.norm)
                return self.head(h) * self.scale * self.gate.exp() + self.one + self.shift + \
                    torch.tensor([1.0, -1.0]).sum()

        torch.manual_seed(seed)
        model = Model()
        with torch.no_grad():  # running statistics that are not the defaults
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
            if seed:  # other seeds: trained-looking values where seed 0 has uniform ones
                model.gate.fill_(0.5 - seed)
                model.norm.uniform_(-0.5, 0.5)
        return model.eval()

    @staticmethod
    def args():
        import torch

        return (torch.tensor([[1, 5, 9, 15], [0, 2, 4, 6]]),)


@pytest.fixture(scope="session")
def weights_pack(session_dir) -> Built:
    """WeightsModel built once per session."""
    import aotpack

    path = session_dir / "weights.pack"
    model, args = WeightsModel.make(), WeightsModel.args()
    if not path.exists():
        aotpack.build(model, args, path)
    return Built("weights", path, model, args)


@pytest.fixture(scope="session")
def weights_pack_other(session_dir) -> Built:
    """WeightsModel with other weights (seed 1), built in full: what ``reweight`` must give byte for byte."""
    import aotpack

    path = session_dir / "weights-other.pack"
    model, args = WeightsModel.make(seed=1), WeightsModel.args()
    if not path.exists():
        aotpack.build(model, args, path)
    return Built("weights-other", path, model, args)


@pytest.fixture(scope="session")
def corpus_pack(session_dir) -> Built:
    """The corpus of tests/corpus.py as one pack: one entry per group of models (the dynamic group first, with
    its dynamic shapes; the others as specializations), compiled in parallel."""
    import aotpack
    import corpus

    model = corpus.Corpus().eval()
    groups = list(corpus.GROUPS)
    main = groups[-1]
    path = session_dir / "corpus.pack"
    args = (main, corpus.group_inputs(corpus.GROUPS[main], 0, 0))
    aotpack.build(model, args, path,
                  dynamic_shapes={"group": None, **corpus.group_dynamic_shapes(corpus.GROUPS[main])},
                  specializations=[(g, corpus.group_inputs(corpus.GROUPS[g], 0, 0)) for g in groups if g != main])
    return Built("corpus", path, model, args)


# Run in a fresh process: load the pack (the runtime only), call every group on every input set, and save what
# came back and what the inputs hold afterwards (a pack writes into the inputs its model writes into).
_FRESH = """
import sys, torch
import torch.utils._pytree as pytree
import aotpack_runtime
pkg = aotpack_runtime.load({pack!r})
calls = torch.load({calls!r})
results = []
for group, label, inputs in calls:
    out = pkg(group, inputs)
    # copies: outputs may view one storage as several dtypes (view_as_real), which torch.save refuses
    results.append(pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (out, inputs)))
torch.save({{"results": results,
            "build_side": sorted(m for m in sys.modules
                                 if m.startswith(("torch._dynamo", "torch._inductor", "aotpack.")))}},
           {out!r})
"""


@pytest.fixture(scope="session")
def corpus_run(corpus_pack, session_dir) -> dict:
    """Per model: (max error over every input set, the input sets it was checked on); or the failure."""
    import torch

    import corpus

    model = corpus.Corpus().eval()
    calls = [(g, label, inputs) for g in corpus.GROUPS for label, inputs in corpus.input_sets(g)]
    calls_file, out_file = session_dir / "corpus-calls.pt", session_dir / "corpus-results.pt"
    torch.save(calls, calls_file)
    proc = run_python(_FRESH.format(pack=str(corpus_pack.path), calls=str(calls_file), out=str(out_file)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(out_file)
    assert fresh["build_side"] == [], f"the fresh process imported {fresh['build_side']}"
    report: dict = {}
    for (group, label, inputs), (out, inputs_after) in zip(calls, fresh["results"]):
        eager_inputs = copy.deepcopy(inputs)
        with torch.no_grad():
            expected = model(group, eager_inputs)
        for name in corpus.GROUPS[group]:
            entry = report.setdefault(name, {"error": 0.0, "sets": [], "failure": None})
            if entry["failure"]:
                continue
            try:
                err = max(corpus.max_error(out[name], expected[name]),
                          corpus.max_error(inputs_after[name], eager_inputs[name]))  # what it wrote into
            except AssertionError as e:
                entry["failure"] = f"{label}: {e}"
                continue
            entry["error"] = max(entry["error"], err)
            entry["sets"].append(label)
    if os.environ.get("AOTPACK_CORPUS_TABLE"):
        _write_table(report, pathlib.Path(os.environ["AOTPACK_CORPUS_TABLE"]))
    return report


def _write_table(report: dict, path: pathlib.Path) -> None:
    """The corpus table of docs/MODELS.md, from this run."""
    import corpus

    rows = ["| model | pattern | outcome | max error |", "|---|---|---|---|"]
    for c in corpus.CASES:
        if c.refused:
            rows.append(f"| `{c.name}` | {c.what} | refused at build (`CaptureError`) | - |")
        else:
            r = report[c.name]
            outcome = "matches eager" if r["failure"] is None and r["error"] <= c.rel else f"FAILS: {r['failure']}"
            sets = len(r["sets"])
            error = "0" if r["error"] == 0 else f"{r['error']:.0e}"
            rows.append(f"| `{c.name}` | {c.what} | {outcome} ({sets} input sets) | {error} |")
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="session")
def seq2seq_pack(session_dir) -> Built:
    """A pack of two methods sharing weights and state (tests/programs.py): ``encode`` writes the
    cross-attention cache that ``decode`` reads while writing its own self-attention cache."""
    import aotpack
    import programs

    path = session_dir / "seq2seq.pack"
    model = programs.TinySeq2Seq().eval()
    if not path.exists():
        aotpack.build(model, None, path, methods=programs.seq2seq_methods(model))
    return Built("seq2seq", path, model, ())


@pytest.fixture(scope="session")
def two_tower_pack(session_dir) -> Built:
    """A stateless pack of two encoders that share one projection (tests/programs.py)."""
    import aotpack
    import programs

    path = session_dir / "two-tower.pack"
    model = programs.TwoTower().eval()
    if not path.exists():
        aotpack.build(model, None, path, methods=programs.two_tower_methods(model))
    return Built("two-tower", path, model, ())


@pytest.fixture(scope="session")
def shared_view_pack(session_dir) -> Built:
    """A pack of two methods that read one tensor under two names: two weight records of one blob
    (tests/programs.py)."""
    import aotpack
    import programs

    path = session_dir / "shared-view.pack"
    model = programs.SharedView().eval()
    if not path.exists():
        aotpack.build(model, None, path, methods=programs.shared_view_methods(model))
    return Built("shared-view", path, model, ())


@pytest.fixture(scope="session")
def llama_methods_pack(session_dir) -> Built:
    """The tiny Llama of examples/llm behind the static-cache wrapper, as two methods of its forward sharing
    one KV cache: ``prefill`` (1 to 63 tokens) and ``decode`` (exactly one token). Built by ``aotpack build``
    from the model file (its module-level ``methods``)."""
    from click.testing import CliRunner

    from cli.main import cli

    path = session_dir / "llama-methods.pack"
    if not path.exists():
        result = CliRunner().invoke(cli, ["build", str(EXAMPLES / "llm" / "llama_methods.py"), "-o", str(path)])
        assert result.exit_code == 0, result.output
    return Built("llama-methods", path, None, ())


@pytest.fixture(scope="session")
def t5_pack(session_dir) -> Built:
    """A tiny T5 through transformers' seq2seq export wrappers, as a pack of ``encode`` and ``decode``."""
    import aotpack
    import programs

    path = session_dir / "t5.pack"
    program = programs.t5_program()
    if not path.exists():
        aotpack.build(program, None, path, methods=programs.t5_methods(program))
    return Built("t5", path, program, ())


@pytest.fixture(scope="session")
def whisper_pack(session_dir) -> Built:
    """A tiny Whisper through transformers' static-cache decoder wrapper, as a pack of ``encode`` (log-mel
    features) and ``decode`` (one token, the encoder output given to every step)."""
    import aotpack
    import programs

    path = session_dir / "whisper.pack"
    program = programs.whisper_program()
    if not path.exists():
        aotpack.build(program, None, path, methods=programs.whisper_methods(program))
    return Built("whisper", path, program, ())


@pytest.fixture(scope="session")
def whisper_cross_pack(session_dir) -> Built:
    """The tiny Whisper as a program whose ``encode`` writes the cross-attention keys and values into the
    state once, and whose ``decode`` reads them (tests/programs.py ``WhisperCrossCached``)."""
    import aotpack
    import programs

    path = session_dir / "whisper-cross.pack"
    program = programs.WhisperCrossCached(programs.whisper_model()).eval()
    if not path.exists():
        aotpack.build(program, None, path, methods=programs.whisper_methods(program, cross_cached=True))
    return Built("whisper-cross", path, program, ())


@pytest.fixture(scope="session")
def clip_pack(session_dir) -> Built:
    """A tiny Hugging Face ``CLIPModel`` as a pack of ``encode_text`` and ``encode_image`` (tests/programs.py)."""
    import aotpack
    import programs

    path = session_dir / "clip.pack"
    model = programs.clip_model()
    if not path.exists():
        aotpack.build(model, None, path, methods=programs.clip_methods())
    return Built("clip", path, model, ())


@pytest.fixture(scope="session")
def linearnet_pack(session_dir) -> tuple:
    """(model, args, path) of ``programs.LinearNet`` built once: large linears routed to oneDNN."""
    import aotpack
    import programs
    import torch

    torch.manual_seed(0)
    model, args = programs.LinearNet().eval(), (torch.rand(64, 128) * 2 - 1,)
    path = session_dir / "linearnet.pack"
    if not path.exists():
        aotpack.build(model, args, path)
    return model, args, path
