"""Task heads. Each takes the backbone's ``feature_info`` and nothing else from it."""
from .classification import ClassificationHead

__all__ = ["ClassificationHead"]
