"""One LightningModule per task: loss, metrics, optimiser param groups, record metrics."""
from .base import MODES, TaskModule
from .classification import ClassificationTask

__all__ = ["MODES", "TaskModule", "ClassificationTask"]
