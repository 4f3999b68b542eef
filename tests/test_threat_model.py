"""docs/security.md's threat model names, in each cell, the test that proves it: every test it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}


def test_every_test_the_threat_model_names_exists() -> None:
    text = (ROOT / "docs" / "security.md").read_text()
    table = text[text.index("## Threat model"):text.index("## The trust model")]
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", table)
    assert len(named) >= 40, named  # the table cites a test in each cell
    missing = [f"{file}::{name}" for file, name in named if name not in _tests_in(ROOT / "tests" / file)]
    assert not missing, missing
