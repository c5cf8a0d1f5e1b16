"""Rules of the house that reading the code can check: no private name crosses a module boundary, and model
code imports no distributed machinery (parallelism is applied from sparselm/parallel)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OURS = ("sparselm", "tools", "support")


def _python_files(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py"))


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            yield node.lineno, None, [a.name for a in node.names]


def test_no_underscore_name_is_imported_from_another_module():
    found = [f"{path.relative_to(REPO)}:{line}: from {module} import {name}"
             for path in _python_files("sparselm", "tools", "tests")
             for line, module, names in _imports(path)
             if module and module.split(".")[0] in OURS
             for name in names if name.startswith("_") and not name.startswith("__")]
    assert not found, "private names used across modules (make them public or move the caller):\n" + "\n".join(found)


@pytest.mark.parametrize("banned", ["torch.distributed", "deepspeed", "megatron"])
def test_model_code_imports_no_distributed_machinery(banned):
    found = [f"{path.relative_to(REPO)}:{line}"
             for path in _python_files("sparselm/model")
             for line, module, names in _imports(path)
             for target in ([module] if module else names)
             if target == banned or target.startswith(banned + ".")]
    assert not found, f"model code imports {banned}: " + ", ".join(found)
