"""examples/ci: the release flow's shell scripts run end to end (sign in the release job, verify and install on
the serving side, check reproducibility), with keys made here; the GitHub Actions workflow names only
scripts that exist and aotpack commands and options that exist."""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys

import click
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aotpack_cli.main import cli
from aotpack_runtime.archive import Archive
from archive_tools import blob_range, with_manifest
from conftest import ROOT
from helpers import assert_facts

CI = ROOT / "examples" / "ci"


def _key(folder: pathlib.Path, name: str) -> tuple[str, pathlib.Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    pub = folder / f"{name}.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return pem, pub


def _shim(folder: pathlib.Path, build_from: dict[str, pathlib.Path] | None = None) -> dict:
    """An environment whose `aotpack` is this interpreter's aotpack. With ``build_from``, `aotpack build ... -o
    OUT` copies a prebuilt pack instead of compiling: the one for the first key of ``build_from`` found in OUT's
    path, once it has checked that the model file it was given exists."""
    folder.mkdir(exist_ok=True)
    build = ""
    if build_from:
        cases = "\n".join(f'    *{k}*) cp "{v}" "$out" ;;' for k, v in build_from.items())
        build = f"""if [ "$1" = build ]; then
  model=${{2%%:*}}
  [ -f "$model" ] || {{ echo "error: model file $model does not exist" >&2; exit 1; }}
  out=""; prev=""
  for a in "$@"; do [ "$prev" = "-o" ] && out=$a; prev=$a; done
  case "$out" in
{cases}
  esac
  exit 0
fi
"""
    shim = folder / "aotpack"
    shim.write_text(f"#!/usr/bin/env bash\n{build}exec {sys.executable} -m aotpack \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    return dict(os.environ, PATH=f"{folder}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))


def _bash(script: str, *args, env: dict, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CI / script), *map(str, args)], env=env, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def release(mlp_pack, tmp_path_factory):
    """A release folder with a copy of the MLP pack, and the release key pair (private key as PEM text)."""
    folder = tmp_path_factory.mktemp("release")
    pack = folder / "model.pack"
    shutil.copyfile(mlp_pack.path, pack)
    pem, pub = _key(folder, "release")
    return folder, pack, pem, pub


def test_release_then_deploy(release, tmp_path):
    folder, pack, pem, pub = release
    env = _shim(tmp_path / "bin")
    r = _bash("sign-release.sh", pack, pub, env=dict(env, AOTPACK_SIGNING_KEY=pem))
    assert r.returncode == 0, r.stderr
    sha = hashlib.sha256(pack.read_bytes()).hexdigest()
    assert f"{pack}: OK\n  [ok] signature: signed by key " in r.stdout
    assert r.stdout.endswith(f"release: {sha}  {pack} (signature {pack}.sig)\n")

    served = tmp_path / "served"
    r = _bash("deploy.sh", pack, pub, served, env=env)
    assert r.returncode == 0, r.stderr
    assert f"deployed {served}/model.pack: {sha}\n" in r.stdout
    assert sorted(p.name for p in served.iterdir()) == ["model.pack", "model.pack.sig"]
    assert (served / "model.pack").read_bytes() == pack.read_bytes()
    assert (served / "model.pack.sig").read_bytes() == pathlib.Path(f"{pack}.sig").read_bytes()

    # A tampered pack, or a signature by another key, is refused and the deployed pack stays.
    bad = tmp_path / "incoming" / "model.pack"
    bad.parent.mkdir()
    data = bytearray(pack.read_bytes())
    start, end = blob_range(bytes(data), "code/0.so")
    data[start + 100] ^= 1
    bad.write_bytes(bytes(data))
    shutil.copyfile(f"{pack}.sig", f"{bad}.sig")
    r = _bash("deploy.sh", bad, pub, served, env=env)
    assert r.returncode == 1
    assert "  [FAIL] signature: " in r.stdout and "is not for this file" in r.stdout
    _, other_pub = _key(tmp_path, "other")
    r = _bash("deploy.sh", pack, other_pub, served, env=env)
    assert r.returncode == 1 and "made by another key" in r.stdout
    assert sorted(p.name for p in served.iterdir()) == ["model.pack", "model.pack.sig"]
    assert (served / "model.pack").read_bytes() == pack.read_bytes()


def test_sign_release_without_a_key_says_how_to_give_one(release, tmp_path):
    _, pack, _, pub = release
    env = _shim(tmp_path / "bin")
    env.pop("AOTPACK_SIGNING_KEY", None)
    env.pop("AOTPACK_SIGNING_KEY_FILE", None)
    r = _bash("sign-release.sh", pack, pub, env=env)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    assert_facts(r.stderr, "no signing key", "AOTPACK_SIGNING_KEY ", "PEM private key", "AOTPACK_SIGNING_KEY_FILE")


def test_check_reproducible_passes_identical_builds_and_names_the_cause_of_a_difference(release, tmp_path):
    """The script's logic (build twice, diff, verify and diff the shipped pack) with builds replaced by copies
    of one prebuilt pack; tests/test_reproducible.py builds for real."""
    _, pack, _, _ = release
    (tmp_path / "src").mkdir()
    model = tmp_path / "src" / "model.py"
    model.write_text("# builds are replaced by copies in this test\n")
    env = _shim(tmp_path / "same", {"/a/": pack, "/b/": pack})
    for given in ("src/model.py", str(model), "src/model.py:make", f"{model}:make"):  # relative or absolute
        r = _bash("check-reproducible.sh", given, pack, env=env, cwd=tmp_path)
        assert r.returncode == 0, (given, r.stdout + r.stderr)
        assert r.stdout.count("are identical") == 2 and f"{pack}: OK" in r.stdout

    compiler = Archive.open(pack).manifest.producer["compiler"]  # "g++ 12.2.0" on the CI image
    other = tmp_path / "other.pack"
    other.write_bytes(with_manifest(pack.read_bytes(), lambda m: m["producer"].update(compiler="g++ 99.1.0")))
    env = _shim(tmp_path / "differ", {"/a/": pack, "/b/": other})
    r = _bash("check-reproducible.sh", "src/model.py", env=env, cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0].endswith("/b/model.pack differ:")
    assert lines[1] == f"  cause: built with {compiler} vs 99.1.0"


def _commands(text: str) -> list[list[str]]:
    """Each `aotpack ...` command line in a script or workflow, as words (continuation lines joined)."""
    text = text.replace("\\\n", " ")
    start = r"(?:^[ \t]*|[;&|(][ \t]*)(?:[A-Z_]+=\S+[ \t]+)*"  # a command's start, after any VAR=value
    return [m.split() for m in re.findall(start + r"aotpack[ \t]+([a-z][^\n;&|)]*)", text, re.M)]


def test_workflow_and_scripts_use_real_commands_and_options():
    flow = yaml.safe_load((CI / "github-actions.yml").read_text())
    jobs = flow["jobs"]
    assert list(jobs) == ["build", "release", "verify"]
    assert jobs["release"]["needs"] == "build" and jobs["verify"]["needs"] == "release"
    runs = "\n".join(step.get("run", "") for job in jobs.values() for step in job["steps"])
    scripts = set(re.findall(r"examples/ci/([\w-]+\.sh)", runs))
    assert scripts == {"check-reproducible.sh", "sign-release.sh", "deploy.sh"}
    assert all((CI / s).is_file() for s in scripts)
    texts = [runs] + [(CI / s).read_text() for s in sorted(scripts)]
    seen = set()
    for words in (w for t in texts for w in _commands(t)):
        command = cli.commands.get(words[0])
        assert isinstance(command, click.Command), words
        options = {o for p in command.params for o in getattr(p, "opts", [])}
        for word in words[1:]:
            if word.startswith("-"):
                assert word in options, (words[0], word)
        seen.add(words[0])
    assert seen == {"build", "diff", "verify", "sign"}
