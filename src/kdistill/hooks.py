"""Capture the outputs of named submodules with forward hooks.

The recorder owns its hooks and the dict they write into: :meth:`pop` hands the
captured features over and empties the dict, :meth:`close` removes the hooks.
The model itself is never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from kdistill.errors import HookNotFiredError, LayerNotFoundError, did_you_mean

# Prefixes that wrappers add to module names (DistributedDataParallel, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def first_tensor(output: Any) -> Tensor:
    """The default feature rule: the first tensor found depth-first in ``output``.

    A tensor is itself; a tuple or list yields its first tensor; a mapping (a dict
    or a Hugging Face ``ModelOutput``, whose first field is the main output, e.g.
    ``last_hidden_state``) yields its first tensor value. Pass your own function as
    ``feature_fn`` when a layer's main output is elsewhere.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        candidates = list(output.values())
    elif isinstance(output, (tuple, list)):
        candidates = list(output)
    else:
        candidates = []
    for value in candidates:
        try:
            return first_tensor(value)
        except TypeError:
            continue
    raise TypeError(f"no tensor found in a layer output of type {type(output).__name__}")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside ``DistributedDataParallel`` / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def strip_wrapper_prefixes(path: str) -> str:
    """``module._orig_mod.layer2`` → ``layer2``: paths as seen on the unwrapped model."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if path.startswith(prefix):
                path, changed = path[len(prefix) :], True
    return path


def find_module(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    """The submodule at dotted ``path``; an unknown path raises with the closest names."""
    model = unwrap(model)
    path = strip_wrapper_prefixes(path)
    modules = dict(model.named_modules())
    if path not in modules or path == "":
        names = [name for name in modules if name]
        raise LayerNotFoundError(
            f"{role} has no layer {path!r}{did_you_mean(path, names)} (`kdistill inspect` lists the layers)"
        )
    return modules[path]


class StopForward(Exception):
    """Raised by a recorder with ``stop_when_complete`` once every layer has been captured."""


class FeatureRecorder:
    """Records the outputs of the layers at ``paths`` of ``model`` on every forward.

    Args:
        model: the model to observe; wrappers such as DDP are looked through.
        paths: dotted paths as in ``model.named_modules()``.
        feature_fn: extracts a tensor from a layer's output (default :func:`first_tensor`).
        role: ``"teacher"`` or ``"student"``, used in error messages.

    While ``stop_when_complete`` is true, the hooks raise :class:`StopForward` as soon as every
    layer has been captured, so the rest of the forward pass is skipped; whoever sets it catches
    that and sets it back (other calls of the model are unaffected).
    """

    def __init__(
        self,
        model: nn.Module,
        paths: Iterable[str],
        feature_fn: Callable[[Any], Tensor] = first_tensor,
        role: str = "model",
    ) -> None:
        self.role = role
        self.stop_when_complete = False
        self.paths = list(dict.fromkeys(strip_wrapper_prefixes(p) for p in paths))
        self._feature_fn = feature_fn
        self._features: dict[str, Tensor] = {}
        modules = [find_module(model, path, role) for path in self.paths]  # fail before hooking
        self._handles = [module.register_forward_hook(self._hook(path)) for path, module in zip(self.paths, modules)]

    def _hook(self, path: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self._features[path] = self._feature_fn(output)
            if self.stop_when_complete and len(self._features) == len(self.paths):
                raise StopForward

        return hook

    def clear(self) -> None:
        """Forget anything captured so far (call before a forward pass)."""
        self._features.clear()

    def pop(self) -> dict[str, Tensor]:
        """The features of the last forward pass, by path; the recorder is emptied.

        Raises:
            HookNotFiredError: a recorded layer did not run in that pass.
        """
        features, self._features = self._features, {}
        missing = [path for path in self.paths if path not in features]
        if missing:
            raise HookNotFiredError(
                f"{self.role} layer {missing[0]!r} did not run during the forward pass; "
                "choose a layer that the model's forward actually calls"
            )
        return features

    def close(self) -> None:
        """Remove the hooks; the model is as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._features.clear()

    def __enter__(self) -> FeatureRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
