"""tokdist-ray: Token Distillation for new tokens, at cluster scale."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

# Exports load on first use (PEP 562), so Ray workers that only unpickle a light module
# (a mining actor, say) do not pay for importing torch and transformers.
_EXPORTS = {
    "TokenDistillation": ".api",
    "DistillationConfig": ".config",
    "FileDataSource": ".config",
    "GeneratedDataSource": ".config",
    "HFDataSource": ".config",
    "OutputEmbeddingInit": ".config",
    "OutputFitConfig": ".config",
}

if TYPE_CHECKING:
    from tokdist_ray.api import TokenDistillation
    from tokdist_ray.config import (
        DistillationConfig,
        FileDataSource,
        GeneratedDataSource,
        HFDataSource,
        OutputEmbeddingInit,
        OutputFitConfig,
    )

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tokdist_ray' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
