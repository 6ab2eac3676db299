"""The structure the code keeps (docs/architecture.md), checked on its source: what import-linter
(`scripts/check`) cannot see. Each test names the rule it holds."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import fastboot
from fastboot.errors import FastbootError

PACKAGE = Path(fastboot.__file__).parent
#: Where an engine may be named in code: its adapters, and the models it loads.
ENGINE_HOMES = ("engines", "models")
#: The longest a function in fastboot/ may be (lines, docstring included).
MAX_FUNCTION_LINES = 120


def modules() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def docstrings(tree: ast.Module) -> set[int]:
    """ids of the string constants that are docstrings (of a module, class or function, or
    an attribute's docstring right after it)."""
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for stmt in body:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                found.add(id(stmt.value))
    return found


def test_only_the_engine_adapters_name_an_engine() -> None:
    """No code outside engines/ and models/ imports vLLM or SGLang, refers to an adapter by
    name, or spells an engine's own settings (VLLM_*, SGLANG_*): it goes through the protocol."""
    pattern = re.compile(r"vllm|sglang", re.IGNORECASE)
    setting = re.compile(r"^(VLLM|SGLANG)_|^(vllm|sglang)$")
    offences = []
    for path, tree in modules():
        if path.relative_to(PACKAGE).parts[0] in ENGINE_HOMES:
            continue
        skip = docstrings(tree)
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(a.name for a in node.names)]
            elif isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.FunctionDef | ast.ClassDef):
                names = [node.name]
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in skip
                and setting.search(node.value)
            ):
                offences.append(f"{path}:{node.lineno}: {node.value!r}")
            offences += [f"{path}:{node.lineno}: {n}" for n in names if pattern.search(n)]
    assert not offences, "\n".join(offences)


def test_no_function_is_longer_than_the_limit() -> None:
    long = [
        f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "\n".join(long)


def test_no_two_public_classes_share_a_name() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for path, tree in modules():
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where[node.name].append(str(path.relative_to(PACKAGE)))
    assert not {name: paths for name, paths in where.items() if len(paths) > 1}


def test_every_exception_is_a_fastboot_error_and_errors_py_lists_it() -> None:
    """One tree rooted at FastbootError, drawn in fastboot/errors.py's docstring. Stop (SIGINT/
    SIGTERM) is the one exception on purpose: like KeyboardInterrupt it must pass every
    `except FastbootError`."""
    import importlib

    listed = fastboot.errors.__doc__ or ""
    missing, outside = [], []
    for path, tree in modules():
        if path.name == "__main__.py":
            continue  # importing it runs the CLI
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        module = importlib.import_module(name)
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            cls = getattr(module, node.name)
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                continue
            if cls.__name__ != "Stop" and not issubclass(cls, FastbootError):
                outside.append(f"{name}.{cls.__name__}")
            if not cls.__name__.startswith("_") and not re.search(rf"\b{cls.__name__}\b", listed):
                missing.append(f"{name}.{cls.__name__}")
    assert not outside, f"not FastbootErrors: {outside}"
    assert not missing, f"not in errors.py's docstring: {missing}"


def test_function_level_imports_of_fastboot_say_why() -> None:
    """An import inside a function hides an arrow from import-linter and from a reader: it
    stays only where it keeps start-up fast (torch, vllm, trio, pyfuse3 ...) or breaks a
    necessary cycle, with the reason in a comment on its line or above its run of imports."""
    unexplained = []
    for path, tree in modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if (
                    isinstance(inner, ast.ImportFrom)
                    and (inner.module or "").startswith("fastboot")
                    and not _explained(lines, inner.lineno - 1)
                ):
                    unexplained.append(f"{path}:{inner.lineno}: {lines[inner.lineno - 1]}")
    assert not unexplained, "\n".join(unexplained)


def _explained(lines: list[str], index: int) -> bool:
    """Line index has a comment, or the first line above its run of import lines is one."""
    if "#" in lines[index]:
        return True
    while index > 0 and lines[index - 1].strip().startswith(("from ", "import ")):
        index -= 1
    return lines[index - 1].strip().startswith("#")


def test_test_modules_have_unique_names() -> None:
    """pytest imports test modules by basename (no packages under tests/unit and
    tests/integration): two files of one name stop the whole run at collection."""
    tests = Path(__file__).resolve().parents[1]
    names = [p.name for p in tests.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
