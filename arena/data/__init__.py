"""Datamodules: the embedded ``shapes`` scenes and real on-disk formats."""
from .base import ArenaDataModule, detection_collate, normalize
from .coco import CocoDetectionDataModule
from .det_transforms import DetectionDataModule
from .imagefolder import ImageFolderDataModule
from .masks import MaskFolderDataModule, VOCSegmentationDataModule
from .shapes import CLASSES, ShapesDataModule, render_scene
from .voc import VOCDetectionDataModule

__all__ = ["ArenaDataModule", "ImageFolderDataModule", "ShapesDataModule", "CLASSES", "render_scene",
           "detection_collate", "normalize", "MaskFolderDataModule", "VOCSegmentationDataModule",
           "CocoDetectionDataModule", "VOCDetectionDataModule", "DetectionDataModule"]
