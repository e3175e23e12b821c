"""Bridges to other training frameworks, each in its own module.

Nothing here is imported by the core or by ``import kdistill``: a module is loaded only when
named (``from kdistill.integrations.transformers import DistillationTrainer``), and only then
imports the framework it bridges (docs/architecture.md, "The layers").
"""
