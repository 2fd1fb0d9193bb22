"""The toolchain a build runs with (aotpack/toolchain.py): the compiler wrapper and its prefix maps, private
build folders. The parts that meet Inductor's private hooks are tested in test_torch_private.py."""
from __future__ import annotations

from aotpack import toolchain


def test_private_build_dirs_restores_environment(tmp_path, monkeypatch):
    import os
    import tempfile

    monkeypatch.setenv("TMPDIR", "/somewhere")
    with toolchain.private_build_dirs(str(tmp_path)):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
        assert tempfile.gettempdir() == str(tmp_path / "tmp")
    assert os.environ["TMPDIR"] == "/somewhere"


def test_compiler_wrapper_maps_host_paths(tmp_path):
    """The wrapper Inductor calls as its compiler adds -ffile-prefix-map for Python, torch and the build
    folder (from the environment), so __FILE__ names no host path; its path is the same for every build."""
    import os
    import shutil
    import subprocess

    wrapper = toolchain.compiler_wrapper(str(tmp_path / "bin"), shutil.which("g++"))
    assert wrapper == toolchain.compiler_wrapper(str(tmp_path / "bin"), shutil.which("g++"))
    assert os.path.basename(wrapper) == "g++"  # Inductor recognises GCC by the name
    root = tmp_path / "scratch-folder"
    root.mkdir()
    (root / "f.cpp").write_text('const char* where() { return __FILE__; }\n'
                                f'const char* kernel() {{ return "{root}/k.fatbin"; }}\n')
    env = dict(os.environ, **{toolchain.BUILD_ROOT_ENV: str(root)})
    subprocess.run([wrapper, "-c", str(root / "f.cpp"), "-o", str(root / "f.o")], check=True, env=env)
    data = (root / "f.o").read_bytes()
    assert b"/aotpack/build/f.cpp" in data and b"/aotpack/build/k.fatbin" in data  # __FILE__ and a literal
    assert str(root).encode() not in data
