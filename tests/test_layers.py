"""The floor plan, held by the imports: the model library (`wan`) in its layers, each importing only those below it,
and knowing nothing of the service (Cog, the environment, media files); the service above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The library's layers, bottom up (wan/__init__.py states them); a module imports its own layer and those before.
WAN_LAYERS = ("configs", "model", "encoders", "loading", "generation", "runtime", "reference", "testing")
# The service's parts, bottom up: media in and out, the service package, Cog's entry point.
SERVICE_LAYERS = ("src", "service", "predict")
# What the library must not know: Cog, the service, media files.
NOT_IN_THE_LIBRARY = {"cog", "coglet", "service", "src", "predict", "av", "soundfile", "librosa", "pyloudnorm"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, text: str | None = None) -> set[str]:
    """Every module `path` (or `text` as if it stood there) imports, relative imports resolved, wherever the import
    statement stands."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module)
    return found


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def rank(module: str) -> int | None:
    """The layer of a project module (library layers first, then the service's); None for other packages."""
    parts = module.split(".")
    if parts[0] == "wan":
        return WAN_LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in WAN_LAYERS else -1
    if parts[0] in SERVICE_LAYERS:
        return len(WAN_LAYERS) + SERVICE_LAYERS.index(parts[0])
    return None


@pytest.mark.parametrize("path", sources("wan", "service", "src") + [REPO / "predict.py"], ids=module_name)
def test_every_import_points_down(path):
    own = rank(module_name(path))
    upward = [target for target in imports(path) if (layer := rank(target)) is not None and layer > own]
    assert not upward, f"{module_name(path)} (layer {own}) imports from above it: {upward}"


@pytest.mark.parametrize("path", sources("wan"), ids=module_name)
def test_the_library_knows_nothing_of_the_service(path):
    known = {target.split(".")[0] for target in imports(path)} & NOT_IN_THE_LIBRARY
    assert not known, f"{module_name(path)} imports {sorted(known)}"
    text = path.read_text()
    reads = [word for word in ("environ.get", "environ[", "getenv", "environ.copy") if word in text]
    assert not reads, f"{module_name(path)} reads the environment ({reads}): the service's settings do that"


def test_the_check_would_see_an_upward_import():
    # The walk resolves relative imports: `from ..runtime.plans import x` in wan/model/ is found as wan.runtime.plans.
    module = REPO / "wan" / "model" / "dit.py"
    found = imports(module, "import torch\n\ndef f():\n    from ..runtime.plans import RESIDENT\n")
    assert found == {"torch", "wan.runtime.plans"}
    assert rank("wan.runtime.plans") > rank(module_name(module)) and rank("torch") is None


def test_the_layers_are_those_the_package_states():
    stated = (REPO / "wan" / "__init__.py").read_text()
    assert all(f"{layer} (" in stated or f"{layer} ->" in stated or f"`{layer}`" in stated for layer in WAN_LAYERS)
    assert {p.name for p in (REPO / "wan").iterdir() if p.is_dir() and not p.name.startswith("__")} | {
        p.stem for p in (REPO / "wan").glob("*.py") if p.stem != "__init__"
    } == set(WAN_LAYERS)
