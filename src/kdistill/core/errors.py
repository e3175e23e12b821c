"""The project's exceptions.

Every problem that a user can cause (a bad config, an unknown layer, a corrupt
checkpoint) raises a subclass of :class:`KDistillError`. The command line turns
these into one line on stderr and a non-zero exit; anything else is a bug.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KDistillError(Exception):
    """Base class of every error a user can cause and fix."""


class LayerNotFoundError(KDistillError, KeyError):
    """A layer path does not name a submodule of the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class HookNotFiredError(KDistillError, RuntimeError):
    """A hooked layer did not run during the forward pass."""


class FeatureShapeError(KDistillError, ValueError):
    """No adapter can map a student feature onto its teacher feature."""


class ClassCountError(KDistillError, ValueError):
    """Teacher and student logits disagree on the number of classes."""


class VocabularyError(KDistillError, ValueError):
    """Teacher and student read different token vocabularies."""


class NonFiniteLossError(KDistillError, FloatingPointError):
    """A loss term became NaN or infinite."""

    def __init__(self, message: str, term: str | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.term = term
        self.step = step


class ConfigError(KDistillError, ValueError):
    """A configuration value or file is invalid."""


class CheckpointError(KDistillError, RuntimeError):
    """A checkpoint or weights file cannot be read safely or does not fit."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` choices most similar to ``name`` (for "did you mean" hints)."""
    choices = list(choices)
    matches = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not matches:  # fall back to substring matches, useful for deep paths
        matches = [c for c in choices if name and (name in c or c in name)][:n]
    return matches


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ``"; did you mean 'a', 'b'?"`` suffix, or an empty string."""
    matches = closest(name, choices)
    if not matches:
        return ""
    return "; did you mean " + ", ".join(repr(m) for m in matches) + "?"
