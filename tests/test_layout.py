"""The README's layout section and the modules agree: every module is named there, every name there is a module,
and each module opens with a docstring that says what it owns and what it may not touch."""
from __future__ import annotations

import ast
import re

import pytest

from conftest import ROOT

PACKAGES = ("aotpack", "runtime", "cli")
PRIVATE = ("_torch", "_torch_text", "_cuda_offline")  # named by path in the paragraph under the list


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Layout\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def _bullet(package: str) -> str:
    """The layout's list item of ``package/``, up to the next item or paragraph."""
    match = re.search(rf"^- `{package}/`.*?(?=^- |\n\n)", _layout(), re.S | re.M)
    assert match, f"the README's layout section has no item for {package}/"
    return match.group(0)


def _modules(package: str) -> set[str]:
    return {p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}


@pytest.mark.parametrize("package", PACKAGES)
def test_the_layout_names_every_module_and_only_modules(package):
    named = set(re.findall(r"`([a-z_]+)`", _bullet(package)))
    modules = _modules(package)
    public = {m for m in modules if m not in PRIVATE}
    assert public - named == set(), f"modules of {package}/ the README's layout does not name"
    for m in modules & set(PRIVATE):
        assert f"`{package}/{m}.py`" in _layout(), m
    stale = {n for n in named if n not in modules and re.fullmatch(r"[a-z]+", n) and (ROOT / package / n).exists()}
    assert stale == set()


def test_each_name_the_layout_gives_a_module_is_a_file():
    for package in ("aotpack", "runtime"):
        # "`name` for ..." and "`name` (...)" introduce a module
        introduced = re.findall(r"`([a-z_]+)` (?:for|\(|and `)", _bullet(package))
        assert introduced, package
        missing = [n for n in introduced if n not in _modules(package)]
        assert missing == [], f"the layout names {missing} in {package}/, which has no such module"
    for path in re.findall(r"`((?:aotpack|runtime|tests)/\w+\.py)`", _layout()):
        assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for package in PACKAGES
                                         for p in (ROOT / package).glob("*.py")))
def test_each_module_opens_with_what_it_owns_and_may_not_do(path):
    doc = ast.get_docstring(ast.parse((ROOT / path).read_text()))
    assert doc, f"{path} has no opening docstring"
    assert "May not:" in doc, f"{path}'s docstring has no 'May not:' line"
