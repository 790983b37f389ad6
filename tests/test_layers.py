"""The package's structure holds: layers declared once (pyproject.toml's `[tool.importlinter]`), no import cycle,
and imports inside functions only where a heavy or optional library justifies them, each saying why.

The flow a reader should see in the folders (io → detection → outputs → cohort → evaluate / learn → cli) is only
true while lower layers never reach up, and a circle of imports makes every module of it load with all the
others. import-linter reads every import statement, those inside functions included, so an import cannot hide
from these contracts by moving into a function.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wsiproc"
#: A function-level import says why it is not at the top, on its own line: `import keras  # lazy: loads TensorFlow`.
REASON = re.compile(r"#\s*lazy:\s*\S")
#: Libraries whose import costs seconds (or pulls TensorFlow in): never at a module's top, so `wsiproc run` on
#: the OpenVINO engine, `wsiproc info` and `import wsiproc` never pay for them.
NEVER_AT_TOP = ("tensorflow", "keras", "nncf", "matplotlib")


def _function_level_imports(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    yield inner


def _names(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement names, relative ones as '.' + name (the package's own)."""
    if isinstance(node, ast.ImportFrom):
        return [("." * node.level) + (node.module or "")] if node.level else [node.module or ""]
    return [alias.name for alias in node.names]


def _own(name: str) -> bool:
    return name.startswith(".") or name == "wsiproc" or name.startswith("wsiproc.")


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_declared_layers_hold_and_no_module_imports_in_a_circle() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache", "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout, result.stdout[-2000:]


def test_imports_inside_functions_are_of_heavy_or_optional_libraries_and_say_why() -> None:
    """The package's own modules are imported at the top (the graph has no circle to hide); inside a function
    only a library that is heavy or optional, with its reason. The CLI is the one exception: a command loads
    the package's machinery when it runs, so `wsiproc --help` and `wsiproc info` start in a fraction of a second."""
    problems = []
    for path in _modules():
        lines = path.read_text(encoding="utf-8").splitlines()
        in_cli = path.parent.name == "cli"
        for node in _function_level_imports(ast.parse("\n".join(lines))):
            rel = f"{path.relative_to(ROOT)}:{node.lineno}"
            names = _names(node)
            if any(_own(n) for n in names):
                if not in_cli:
                    problems.append(f"{rel}: imports the package's own {names[0]} inside a function")
                continue
            if not REASON.search(lines[node.lineno - 1]):
                problems.append(f"{rel}: `{lines[node.lineno - 1].strip()}` inside a function without `# lazy: <why>`")
    assert not problems, "\n".join(problems)


def test_heavy_libraries_are_never_imported_at_a_modules_top() -> None:
    found = []
    for path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in _names(node)
                          if n.split(".")[0] in NEVER_AT_TOP]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("code, message", [
    ("def f():\n    from .detection import loop\n", "imports the package's own .detection inside a function"),
    ("def f():\n    import keras\n", "without `# lazy: <why>`"),
])
def test_the_function_level_rule_catches_what_it_forbids(tmp_path: Path, monkeypatch, code: str, message: str) -> None:
    """The rule above is not vacuous: a module breaking it is reported, naming the file and line."""
    fake = tmp_path / "wsiproc"
    fake.mkdir()
    (fake / "bad.py").write_text(code, encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match=re.escape(message)) as info:
        test_imports_inside_functions_are_of_heavy_or_optional_libraries_and_say_why()
    assert "wsiproc/bad.py:2" in str(info.value)
