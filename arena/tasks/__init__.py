"""One LightningModule per task: loss, metrics, optimiser param groups, record metrics."""
from .base import MODES, TaskModule
from .classification import ClassificationTask
from .detection import DetectionTask
from .retrieval import KNNTask, RetrievalTask
from .segmentation import SegmentationTask

__all__ = ["MODES", "TaskModule", "ClassificationTask", "SegmentationTask", "DetectionTask", "RetrievalTask", "KNNTask"]
