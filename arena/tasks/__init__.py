"""One LightningModule per task: loss, metrics, optimiser param groups, record metrics."""
from .base import MODES, TaskModule
from .classification import ClassificationTask
from .detection import DetectionTask
from .segmentation import SegmentationTask

__all__ = ["MODES", "TaskModule", "ClassificationTask", "SegmentationTask", "DetectionTask"]
