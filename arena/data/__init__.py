"""Datamodules: the embedded ``shapes`` scenes and real on-disk formats."""
from .base import ArenaDataModule, detection_collate, normalize
from .imagefolder import ImageFolderDataModule
from .shapes import CLASSES, ShapesDataModule, render_scene

__all__ = ["ArenaDataModule", "ImageFolderDataModule", "ShapesDataModule", "CLASSES", "render_scene",
           "detection_collate", "normalize"]
