"""Task heads. Each takes the backbone's ``feature_info`` and nothing else from it."""
from .classification import ClassificationHead
from .detection import HEADS as DETECTION_HEADS
from .detection import build_detector
from .necks import FPN, BackboneWithFPN
from .segmentation import HEADS as SEGMENTATION_HEADS
from .segmentation import MLPHead, SemanticFPNHead, UPerNetHead, build_segmentation_head

__all__ = ["ClassificationHead", "SEGMENTATION_HEADS", "UPerNetHead", "SemanticFPNHead", "MLPHead",
           "build_segmentation_head", "DETECTION_HEADS", "build_detector", "FPN", "BackboneWithFPN"]
