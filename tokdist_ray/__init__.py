"""tokdist-ray: Token Distillation for new tokens, at cluster scale."""

from .api import TokenDistillation
from .config import (
    DistillationConfig,
    FileDataSource,
    GeneratedDataSource,
    HFDataSource,
    OutputEmbeddingInit,
)

__all__ = [
    "TokenDistillation",
    "DistillationConfig",
    "FileDataSource",
    "GeneratedDataSource",
    "HFDataSource",
    "OutputEmbeddingInit",
]
__version__ = "0.1.0"
