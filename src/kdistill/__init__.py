"""kdistill: knowledge distillation for PyTorch models.

``from kdistill import Distiller, FeaturePair`` is all the library use needs;
see the README for the 15-line example.

This module imports the torch-only core and nothing else (docs/architecture.md): no
``kdistill.integrations.hf``/``transformers``, no YAML, plotting, config, data, trainer or pipeline module, so a
library user pays for none of them. tests/test_layering.py checks it in a fresh interpreter.
"""

from kdistill.core.adapters import build_adapter
from kdistill.core.distiller import Distiller, FeaturePair
from kdistill.core.errors import (
    CheckpointError,
    ClassCountError,
    ConfigError,
    FeatureShapeError,
    HookNotFiredError,
    KDistillError,
    LayerNotFoundError,
    NonFiniteLossError,
)
from kdistill.core.hooks import FeatureRecorder
from kdistill.core.losses import FEATURE_LOSSES, RESPONSE_LOSSES, register_feature_loss, register_response_loss
from kdistill.core.vocabulary import PrunedVocabulary

__version__ = "0.1.0"

__all__ = [
    "FEATURE_LOSSES",
    "RESPONSE_LOSSES",
    "CheckpointError",
    "ClassCountError",
    "ConfigError",
    "Distiller",
    "FeaturePair",
    "FeatureRecorder",
    "FeatureShapeError",
    "HookNotFiredError",
    "KDistillError",
    "LayerNotFoundError",
    "NonFiniteLossError",
    "PrunedVocabulary",
    "__version__",
    "build_adapter",
    "register_feature_loss",
    "register_response_loss",
]
