"""The torch-only core: losses, hooks, adapters, the ``Distiller`` and the model-calling helpers.

Modules here import torch, the standard library and each other, nothing else: not the application
one folder up (config, data, trainer, pipeline, cache, CLI …) and not ``kdistill.integrations``
(docs/architecture.md; tests/test_layering.py enforces it). ``from kdistill import Distiller`` is
the public way in; the modules are importable as ``kdistill.core.<module>``.
"""
