"""The package's layers: tasks and models import nothing from the layers above them; registries are complete on import."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "finegrain"
ABOVE = ("finegrain.predict", "finegrain.train", "finegrain.deploy", "finegrain.serve")


@pytest.mark.parametrize("module", ["finegrain.tasks", "finegrain.models"])
def test_importing_a_lower_layer_loads_nothing_above_it(module):
    code = (f"import sys, {module}\n"
            f"print(sorted(m for m in sys.modules if m.startswith({ABOVE!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing {module} loaded {out}"


@pytest.mark.parametrize("folder", ["tasks", "models"])
def test_no_module_under_a_lower_layer_imports_from_above(folder):
    """Also the imports inside functions, which the fresh-interpreter test cannot see."""
    allowed = ("finegrain.tasks", "finegrain.models", "finegrain.registry")
    for path in (SRC / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("finegrain"):
                    assert name.startswith(allowed), f"{path.relative_to(SRC)} imports {name}"


def test_registries_are_complete_on_import_finegrain():
    code = ("import finegrain\n"
            "print(','.join(finegrain.TASKS.names())); print(','.join(finegrain.DATASETS.names()))")
    tasks, readers = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(tasks.split(",")) == {"supervised", "fgvc", "wsdan", "racnn", "parts", "parts-weak", "transfg", "distill", "detection",
                                     "protonet", "relationnet", "maml", "fewshot_baseline"}
    assert set(readers.split(",")) == {"folder", "csv", "cub", "nabirds", "dogs", "cars", "aircraft", "flowers102"}


def test_every_reader_says_how_to_recognise_its_layout():
    from finegrain.data import DATASETS

    for name in DATASETS.names():
        info = DATASETS.info(name)
        assert callable(info.get("detect")) and isinstance(info.get("priority"), int), name
