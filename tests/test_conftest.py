"""The test session's own setup: importing conftest changes nothing; the session's caches are set for every
test and every process a test starts."""
from __future__ import annotations

import json
import os
import pathlib

from conftest import ROOT, SESSION_CACHES, run_python


def test_importing_conftest_has_no_side_effects(tmp_path):
    env = {name: str(tmp_path / f"mine-{name}") for name in SESSION_CACHES}
    env["TMPDIR"] = str(tmp_path)
    code = ("import json, os, sys; before = dict(os.environ); sys.path.insert(0, 'tests'); import conftest; "
            "print(json.dumps({'changed': sorted(k for k in set(before) | set(os.environ) "
            "if before.get(k) != os.environ.get(k)), 'session': conftest._session}))")
    proc = run_python(code, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout)
    assert seen == {"changed": [], "session": {}}
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no session folder made


def test_every_cache_points_into_the_session_folder_here_and_in_a_fresh_process(session_dir):
    here = {name: os.environ[name] for name in SESSION_CACHES}
    for name, sub in SESSION_CACHES.items():
        assert pathlib.Path(here[name]) == session_dir / sub, name
    proc = run_python(f"import json, os; print(json.dumps({{n: os.environ.get(n) for n in {list(SESSION_CACHES)!r}}}))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == here
    assert session_dir.is_dir() and not str(session_dir).startswith(str(ROOT))
