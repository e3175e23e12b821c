"""The layers stay apart: a torch-only core that imports nothing from the application or the
integrations, and a package ``__init__`` that loads only the core (issue #14, "Layers you can see";
docs/architecture.md draws the picture)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import kdistill
from kdistill import Distiller
from kdistill.core.errors import ClassCountError, VocabularyError

PACKAGE = Path(kdistill.__file__).parent

# The folder layout is the layering: kdistill/core/ (torch only), kdistill/integrations/ (bridges to
# other frameworks), and the application at the top level. A new module's folder places it.
CORE = {f"kdistill.core.{path.stem}" for path in (PACKAGE / "core").glob("*.py")} - {"kdistill.core.__init__"}
INTEGRATIONS = {f"kdistill.integrations.{path.stem}" for path in (PACKAGE / "integrations").glob("*.py")}
APPLICATION = {f"kdistill.{path.stem}" for path in PACKAGE.glob("*.py")} - {"kdistill.__init__"}

# What `from kdistill import Distiller, FeaturePair` must not load. tqdm is not listed: torch
# itself imports it (torch.hub), so its presence says nothing about kdistill.
HEAVY = ("transformers", "peft", "yaml", "matplotlib", "scipy", "PIL", "safetensors", "onnx")
NOT_LOADED_BY_THE_CORE = sorted(APPLICATION | INTEGRATIONS | {"kdistill.integrations"})


def _loaded_after(statement: str) -> dict[str, list[str]]:
    """The kdistill modules and the top-level packages in ``sys.modules`` after ``statement``, in
    a fresh interpreter (this process has long since imported everything)."""
    probe = (
        "import json, sys\n"
        f"{statement}\n"
        "print(json.dumps({'kdistill': sorted(m for m in sys.modules if m.startswith('kdistill')),"
        " 'top': sorted({m.split('.')[0] for m in sys.modules})}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_layer_lists_cover_every_module() -> None:
    # A guard for the tests below: the folders hold the modules the issue names.
    core = {"losses", "chunked", "hooks", "adapters", "distiller", "calls", "errors", "vocabulary"}
    assert {f"kdistill.core.{name}" for name in core} <= CORE
    application = {"config", "data", "models", "trainer", "pipeline", "cache", "report", "cli", "checkpoint"}
    assert {f"kdistill.{name}" for name in application} <= APPLICATION
    assert {"kdistill.integrations.hf", "kdistill.integrations.transformers"} <= INTEGRATIONS


def test_library_import_loads_only_the_core() -> None:
    loaded = _loaded_after("from kdistill import Distiller, FeaturePair")
    assert set(loaded["kdistill"]) - {"kdistill", "kdistill.core"} <= CORE
    assert [name for name in NOT_LOADED_BY_THE_CORE if name in loaded["kdistill"]] == []
    assert [name for name in HEAVY if name in loaded["top"]] == []


def test_library_import_adds_no_third_party_package_beyond_torch() -> None:
    # "Torch-only": whatever the core loads outside the standard library, torch loads too.
    torch_only = set(_loaded_after("import torch")["top"])
    with_core = set(_loaded_after("from kdistill import Distiller, FeaturePair")["top"])
    extra = sorted(name for name in with_core - torch_only - {"kdistill"} if name not in sys.stdlib_module_names)
    assert extra == []


def _kdistill_imports(path: Path) -> set[str]:
    """The kdistill modules and packages that ``path`` imports anywhere (top level or inside a
    function: a lazy import still ties the layers together), as dotted names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from kdistill.core import losses` imports the module kdistill.core.losses; `from
            # kdistill import Distiller` imports the package kdistill (its __init__ is checked too).
            modules = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path.name}: relative imports are not used in kdistill")
        else:
            continue
        names.update(module for module in modules if module.split(".")[0] == "kdistill")
    return names


def _third_party_imports(path: Path) -> set[str]:
    """The top-level packages outside the standard library and kdistill that ``path`` imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name != "kdistill"}


@pytest.mark.parametrize("module", sorted(CORE))
def test_core_module_imports_only_the_core_and_torch(module: str) -> None:
    path = PACKAGE / "core" / f"{module.rsplit('.', 1)[1]}.py"
    # Names imported from a core module (classes, functions) count as that module: they are
    # "kdistill.core.<module>.<name>"; anything else is outside the core.
    outside = {name for name in _kdistill_imports(path) if not name.startswith("kdistill.core")}
    assert sorted(outside) == []
    assert sorted(_third_party_imports(path) - {"torch"}) == []


def test_the_static_check_sees_lazy_and_package_imports(tmp_path: Path) -> None:
    # The checker itself must catch every spelling of an import of the application.
    source = tmp_path / "sample.py"
    source.write_text(
        "from kdistill.core import losses\n"
        "from kdistill import report\n"
        "import kdistill.trainer\n"
        "def f():\n"
        "    from kdistill.integrations.hf import shrink\n"
        "    import yaml\n"
    )
    imported = _kdistill_imports(source)
    outside_the_core = {name for name in imported if not name.startswith("kdistill.core")}
    assert outside_the_core == {
        "kdistill",
        "kdistill.report",
        "kdistill.trainer",
        "kdistill.integrations.hf",
        "kdistill.integrations.hf.shrink",
    }
    assert _third_party_imports(source) == {"yaml"}


def test_every_public_name_stays_importable() -> None:
    for name in kdistill.__all__:
        assert getattr(kdistill, name) is not None, name
    assert kdistill.Distiller is Distiller


def test_model_helpers_live_in_the_core_and_keep_their_old_homes() -> None:
    from kdistill.core import calls, distiller, hooks
    from kdistill.integrations import hf

    assert hooks.first_tensor is calls.first_tensor
    assert hf.check_vocabularies is calls.check_vocabularies
    for name in ("call_model", "default_logits", "token_mask", "split_labels"):
        assert getattr(distiller, name) is getattr(calls, name), name


class _Configured(nn.Module):
    """A model with a Hugging Face style ``config`` that is not a transformers object."""

    def __init__(self, **config: object) -> None:
        super().__init__()
        self.config = SimpleNamespace(**config)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_vocabulary_check_is_duck_typed() -> None:
    with pytest.raises(VocabularyError, match="100 vs 50"):
        Distiller(_Configured(vocab_size=100), _Configured(vocab_size=50))
    with pytest.raises(ClassCountError, match="label sets differ"):
        Distiller(_Configured(id2label={0: "a", 1: "b"}), _Configured(id2label={0: "b", 1: "a"}))
    # Same vocabulary, or a model without a config: nothing to refuse.
    Distiller(_Configured(vocab_size=100), _Configured(vocab_size=100))
    Distiller(_Configured(vocab_size=100), nn.Linear(4, 3))
