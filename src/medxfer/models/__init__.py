"""Model registry: ``create_model(arch, weights=..., num_classes=...)`` and ``list_models()``."""

from __future__ import annotations

from medxfer.models import backbones as _backbones  # noqa: F401  (registers the models)
from medxfer.models.registry import Built, Preprocess, create_model, list_models, register_model

__all__ = ["Built", "Preprocess", "create_model", "list_models", "register_model"]
