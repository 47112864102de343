"""The layering rule, enforced by parsing imports: reference -> kernels -> functional -> nn -> integrations."""

import ast
import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "fastlayers"
LAYERS = ["reference", "kernels", "functional", "nn", "integrations"]
# top-level modules usable by the layers at or right of the given rank
SHARED = {"utils": 0, "backends": 2, "configs": 3, "sparsity_config": 0, "inference_config": 0}


def _layer_of(path: pathlib.Path) -> str | None:
    rel = path.relative_to(SRC).parts
    return rel[0] if rel[0] in LAYERS else None


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        top_level = node in tree.body
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, top_level, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, top_level, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: use absolute imports (from fastlayers...)")


def test_layers_import_only_to_their_left():
    bad = []
    for path in SRC.rglob("*.py"):
        layer = _layer_of(path)
        for mod, _, line in _imports(path):
            parts = mod.split(".")
            if parts[0] != "fastlayers" or len(parts) < 2:
                continue
            target = parts[1]
            if layer is None:
                continue  # package root modules (cli, __init__) may import everything
            rank = LAYERS.index(layer)
            if target in LAYERS and LAYERS.index(target) > rank:
                bad.append(f"{path.relative_to(SRC)}:{line} ({layer}) imports {mod}")
            if target in SHARED and SHARED[target] > rank:
                bad.append(f"{path.relative_to(SRC)}:{line} ({layer}) imports {mod}")
            if target in {"cli", "bench"}:
                bad.append(f"{path.relative_to(SRC)}:{line} ({layer}) imports {mod}")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_reference_imports_only_torch_and_stdlib():
    allowed = {
        "torch",
        "math",
        "typing",
        "dataclasses",
        "functools",
        "collections",
        "itertools",
        "__future__",
        "fastlayers",
    }
    bad = []
    for path in (SRC / "reference").rglob("*.py"):
        for mod, _, line in _imports(path):
            root = mod.split(".")[0]
            if root not in allowed or (
                root == "fastlayers" and not mod.startswith("fastlayers.reference") and mod != "fastlayers.utils"
            ):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_triton_imported_at_module_level_only_in_kernels_triton():
    bad = []
    for path in SRC.rglob("*.py"):
        inside = path.relative_to(SRC).parts[:2] == ("kernels", "triton")
        for mod, top_level, line in _imports(path):
            if mod.split(".")[0] == "triton" and top_level and not inside:
                bad.append(f"{path.relative_to(SRC)}:{line} imports triton at module level")
            if mod.startswith("fastlayers.kernels.triton") and top_level and not inside:
                bad.append(f"{path.relative_to(SRC)}:{line} imports a Triton kernel module at module level")
    assert not bad, "\n".join(bad)


def test_import_without_triton():
    """`import fastlayers` works when triton cannot be imported (simulated with a meta-path blocker)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fastlayers, fastlayers.functional, fastlayers.nn\n"
        "from fastlayers.utils import is_triton_available\n"
        "assert not is_triton_available()\n"
        "assert 'triton' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
