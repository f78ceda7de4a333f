"""The layout of the tests themselves: helpers live in helper modules (``tests/rows.py``,
``tests/http.py``, ...), so no test module imports another test module."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def module_name(path: Path) -> str:
    """The dotted name a file under the repository root is imported as."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imported(tree: ast.Module, name: str) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of every module or name the module ``name`` imports, anywhere
    in it (inside functions too); relative imports resolved against its package."""
    package = name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            parts = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join([*parts, *([node.module] if node.module else [])])
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def named_test_module(dotted: str) -> str | None:
    """The test module under ``tests`` that ``dotted`` names or names something in, if any."""
    parts = dotted.split(".")
    if parts[0] != "tests":
        return None
    for end, part in enumerate(parts[1:], start=2):
        if part.startswith("test_"):
            return ".".join(parts[:end])
    return None


def imports_of_test_modules(source: str, name: str) -> set[tuple[int, str]]:
    """``(line, test module)`` for each import of a test module in the module ``name``."""
    found = set()
    for line, dotted in imported(ast.parse(source), name):
        module = named_test_module(dotted)
        if module is not None:
            found.add((line, module))
    return found


def test_no_test_module_imports_another() -> None:
    """Every ``tests/**/test_*.py`` imports only helpers (conftest, rows, http, ...), never
    another test module: shared helpers belong in a helper module."""
    modules = sorted(TESTS.rglob("test_*.py"))
    assert len(modules) > 10, f"found only {len(modules)} test modules under {TESTS}"
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in modules
        for line, module in sorted(
            imports_of_test_modules(path.read_text(encoding="utf-8"), module_name(path))
        )
    ]
    assert not offenders, "test modules import other test modules (move the helpers):\n" + (
        "\n".join(offenders)
    )


def test_the_check_sees_every_form_of_import() -> None:
    """Absolute, from-package, relative and function-local imports of a test module are all
    caught; helper modules and test-free names are not."""
    source = (
        "from tests.web.test_pages import form_token\n"
        "from tests.web import test_pages\n"
        "import tests.svdfarm.test_actions\n"
        "from .test_pages import job_id_from\n"
        "from ..worker import test_claims\n"
        "def helper() -> None:\n"
        "    from tests.test_restarts import wait\n"
        "from tests.rows import add_worker\n"
        "from tests.http import form_token as token\n"
        "from tests.browser.conftest import Farm\n"
        "import unittest, pytest_timeout\n"
    )
    assert imports_of_test_modules(source, "tests.web.test_security") == {
        (1, "tests.web.test_pages"),
        (2, "tests.web.test_pages"),
        (3, "tests.svdfarm.test_actions"),
        (4, "tests.web.test_pages"),
        (5, "tests.worker.test_claims"),
        (7, "tests.test_restarts"),
    }
