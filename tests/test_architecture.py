"""The data path reads one way: schedule (ints) <- merge (tensors) <- engine <- adapters <- patch <- callback / CLI.

The import graph of the package's modules (every import, lazy ones inside functions included; the package's own
``__init__`` is a facade and left out) must have no cycle, and the core layers must not import the layers above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dsm_lightning"
LAYERS = [
    *("errors", "config", "schedule", "merge", "engine", "adapters", "patch", "inspection", "regional", "adaptive"),
    *("outputs", "guard", "calibration", "measure", "sampling", "export", "callback", "app"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            if not node.module:  # from . import x: x may be a module
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dsm_lightning"):
            found.add(node.module)
    return found


def graph() -> dict:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        if name == "dsm_lightning":
            continue
        edges[name] = {m for m in imports_of(path) if m in modules and m != name and m != "dsm_lightning"}
    return edges


def test_no_import_cycle():
    edges = graph()
    state: dict = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [node])


def test_core_layers_import_only_downwards():
    edges = graph()

    def layer(module: str) -> int:
        top = module.split(".")[1] if "." in module else module
        return LAYERS.index(top) if top in LAYERS else -1

    for module, targets in edges.items():
        if layer(module) < 0:
            continue
        for target in targets:
            if layer(target) >= 0:
                assert layer(target) <= layer(module), f"{module} imports {target}, a layer above it"


def test_every_module_attribute_of_the_package_is_the_module():
    """``import dsm_lightning.<module> as m`` gives the module: no function or class re-exported by the package
    shadows a module of the same name."""
    import importlib

    import dsm_lightning

    for path in PACKAGE.glob("*.py"):
        if path.stem.startswith("_"):
            continue
        module = importlib.import_module(f"dsm_lightning.{path.stem}")
        assert getattr(dsm_lightning, path.stem) is module, f"dsm_lightning.{path.stem} is shadowed"


def test_the_library_never_imports_the_app():
    """``dsm_lightning.app`` (command line, LightningModule, DataModule, writer) sits on top of the library."""
    for module, targets in graph().items():
        if module.startswith("dsm_lightning.app") or module == "dsm_lightning.__main__":
            continue
        assert not any(t.startswith("dsm_lightning.app") for t in targets), f"{module} imports the app"


def test_no_module_imports_another_modules_private_names():
    """A ``_name`` belongs to its module: shared state and helpers get a public name in the module that owns them
    (e.g. ``state`` for the patch record and the compile mark)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dsm_lightning")):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(f"{path.relative_to(PACKAGE)} imports {private} from {node.module or '.'}")
    assert not found, "\n".join(found)


_BLOCK_JSONARGPARSE = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "jsonargparse":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Block())
"""


@pytest.mark.slow  # two fresh interpreters (about 20 s)
def test_the_library_and_the_callback_need_no_app_extra(tmp_path):
    """``pip install dsm-lightning`` alone (no ``app`` extra): the library and the callback import and patch a ViT;
    the command line answers with one line naming the extra."""
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(_BLOCK_JSONARGPARSE)
    env = {"PYTHONPATH": f"{tmp_path}:{PACKAGE.parent}", "PATH": "/usr/bin:/bin"}
    library = (
        "import timm, dsm_lightning as d; from dsm_lightning import DSMCallback; DSMCallback(delay=4); "
        "m = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=64); d.apply_dsm(m); "
        "import sys; assert 'jsonargparse' not in sys.modules; print('ok')"
    )
    run = subprocess.run([sys.executable, "-c", library], env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    cli = subprocess.run(
        [sys.executable, "-m", "dsm_lightning", "predict"], env=env, capture_output=True, text=True, check=False
    )
    assert cli.returncode == 1 and cli.stdout == "", cli.stderr
    assert cli.stderr.strip().splitlines() == [
        "dsm-lightning: error: the command line needs the app extra (jsonargparse not installed); "
        "fix: pip install 'dsm-lightning[app]'"
    ]
