"""Imports point one way (../shared/docs/DESIGN.md), so the code reads top to bottom:

    bottom (model/errors, files, cli, options, svg) <- model/ + lora.py <- data/ <- training/, evaluation/
    <- scripts (train.py, eval.py, demo.py, bench/*): leaves that nothing but tests imports.
A private helper of the bench scripts (bench/_name.py) sits just below them: only bench scripts
import it.

Every import statement of every project file is parsed (function-level imports too), so adding a
wrong-way import fails here, naming the file and the module it imports.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOTTOM = {"model.errors", "model.files", "model.cli", "model.options", "model.svg"}
SCRIPTS = {"train", "eval", "demo"}
# layer -> the layers it may import (itself included)
ALLOWED = {"bottom": {"bottom"}, "model": {"bottom", "model"}, "data": {"bottom", "model", "data"},
           "training": {"bottom", "model", "data", "training"},
           "evaluation": {"bottom", "model", "data", "evaluation"},
           "bench_helper": {"bottom", "model", "data", "training", "evaluation"},
           "script": {"bottom", "model", "data", "training", "evaluation", "bench_helper"}}


def layer(module: str) -> str | None:
    """The layer of a project module ('model.llama', 'lora', 'bench.train'), None for others."""
    top = module.split(".")[0]
    if module in BOTTOM:
        return "bottom"
    if top in ("model", "lora"):
        return "model"
    if top in ("data", "training", "evaluation"):
        return top
    if top == "bench" and module.split(".")[-1].startswith("_"):
        return "bench_helper"
    if top in SCRIPTS or top == "bench":
        return "script"
    return None


def project_files() -> list[Path]:
    files = [p for d in ("model", "data", "training", "evaluation", "bench") for p in (ROOT / d).glob("*.py")]
    return files + [ROOT / f"{name}.py" for name in ("lora", *SCRIPTS)]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `import x` / `from x import y` (y too, when x is a package)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                    if (ROOT / node.module.replace(".", "/") / f"{a.name}.py").exists()]
    return out


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts)


def test_the_layer_map_knows_every_project_file():
    assert all(layer(module_name(p)) for p in project_files())


@pytest.mark.parametrize("path", project_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    here = layer(module_name(path))
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {mod} ({layer(mod)} layer)"
             for line, mod in imports_of(path)
             if layer(mod) and mod != module_name(path) and layer(mod) not in ALLOWED[here]]
    scripts = [f"{path.relative_to(ROOT)}:{line} imports the script {mod}"
               for line, mod in imports_of(path) if mod.split(".")[0] in SCRIPTS | {"bench"}
               and module_name(path).split(".")[0] != mod.split(".")[0]]
    assert not wrong + scripts, "\n".join(wrong + scripts)


def test_the_check_catches_a_wrong_way_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from training.config import Config\n")
    assert (2, "training.config") in imports_of(bad) and "training" not in ALLOWED["data"]


def test_a_bench_script_may_import_the_bench_helper_but_not_another_script():
    assert layer("bench._isa") == "bench_helper" and layer("bench.train") == "script"
    assert "bench_helper" in ALLOWED["script"] and "script" not in ALLOWED["script"]
    assert all("bench_helper" not in allowed for name, allowed in ALLOWED.items() if name != "script")
