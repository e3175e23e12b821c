"""Capture the outputs of named submodules with forward hooks.

The recorder owns its hooks and the dict they write into: :meth:`pop` hands the
captured features over and empties the dict, :meth:`close` removes the hooks.
The model itself is never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from kdistill.core.calls import first_tensor  # re-export: the default feature rule lived here
from kdistill.core.errors import HookNotFiredError, LayerNotFoundError, did_you_mean

# Prefixes that wrappers add to module names (DistributedDataParallel, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _wrapped(model: nn.Module) -> tuple[nn.Module, str] | None:
    """``(inner model, the prefix its names get)`` when ``model`` is a real wrapper, else None.

    Only ``DistributedDataParallel`` / ``DataParallel`` (``.module``) and ``torch.compile``'s
    ``OptimizedModule`` (``._orig_mod``) count: a user's model whose backbone attribute happens to
    be called ``module`` is a model, not a wrapper.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module, "module."
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        return inner, "_orig_mod."
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``
    wrappers (any nesting); any other model is returned as it is."""
    while (wrapped := _wrapped(model)) is not None:
        model = wrapped[0]
    return model


def strip_wrapper_prefixes(path: str) -> str:
    """``module._orig_mod.layer2`` → ``layer2``: paths as seen on the unwrapped model.

    Strips blindly; :func:`resolve_path` strips only the prefixes that a model's wrappers add.
    """
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if path.startswith(prefix):
                path, changed = path[len(prefix) :], True
    return path


def resolve_path(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The unwrapped model and ``path`` as seen on it: each real wrapper around ``model`` may have
    added its prefix (``module.`` for DDP, ``_orig_mod.`` for ``torch.compile``), which is removed;
    a path on a model that is not wrapped is kept whole (``module.0`` of a model whose backbone is
    ``self.module`` stays ``module.0``), and so is a path that names a layer of the inner model."""
    while (wrapped := _wrapped(model)) is not None:
        model, prefix = wrapped
        # A prefix is the wrapper's only when the inner model has no layer of that full name.
        if path.startswith(prefix) and path not in dict(model.named_modules()):
            path = path[len(prefix) :]
    return model, path


def find_module(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    """The submodule at dotted ``path``; an unknown path raises with the closest names."""
    model, path = resolve_path(model, path)
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

    With ``on_demand=True`` the hooks record only between :meth:`clear` and :meth:`pop`, so forward
    passes that are not distillation steps (a teacher-cache build, an evaluation) leave nothing
    behind: the recorder never keeps a batch's features, and their memory, alive.

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
        *,
        on_demand: bool = False,
    ) -> None:
        self.role = role
        self.stop_when_complete = False
        self.paths = list(dict.fromkeys(resolve_path(model, p)[1] for p in paths))
        self._feature_fn = feature_fn
        self._features: dict[str, Tensor] = {}
        self._on_demand = on_demand
        self._armed = not on_demand
        modules = [find_module(model, path, role) for path in self.paths]  # fail before hooking
        self._handles = [module.register_forward_hook(self._hook(path)) for path, module in zip(self.paths, modules)]

    def _hook(self, path: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self._armed:
                return
            self._features[path] = self._feature_fn(output)
            if self.stop_when_complete and len(self._features) == len(self.paths):
                raise StopForward

        return hook

    def clear(self) -> None:
        """Forget anything captured so far (call before a forward pass); arms an on-demand recorder."""
        self._features.clear()
        self._armed = True

    def pop(self) -> dict[str, Tensor]:
        """The features of the last forward pass, by path; the recorder is emptied.

        Raises:
            HookNotFiredError: a recorded layer did not run in that pass.
        """
        features, self._features = self._features, {}
        self._armed = not self._on_demand
        missing = [path for path in self.paths if path not in features]
        if missing:
            raise HookNotFiredError(
                f"{self.role} layer {missing[0]!r} did not run during the forward pass; "
                "choose a layer that the model's forward actually calls"
            )
        return features

    def discard(self) -> None:
        """Forget anything captured and, for an on-demand recorder, stop recording until the next
        :meth:`clear` (for a pass that failed before :meth:`pop`)."""
        self._features.clear()
        self._armed = not self._on_demand

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
