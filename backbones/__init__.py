"""The backbone zoo: one registry, one feature contract.

>>> from backbones import create_backbone, list_backbones
>>> model = create_backbone("convnext_test")
>>> [c for c, s in model.feature_info]
[24, 32, 48, 64]
"""
from ._features import Backbone, FeatureInfo, SimpleFeaturePyramid, TimmBackbone, as_pyramid
from ._registry import FAMILIES, TIMM_PREFIX, backbone_entry, create_backbone, list_backbones, register_backbone

# Importing a family module registers its entrypoints.
from . import timm_family  # noqa: E402,F401  isort: skip
from . import vim, vmamba  # noqa: E402,F401
from . import glmix, vit_comer  # noqa: E402,F401
from . import replknet, unireplknet  # noqa: E402,F401

__all__ = [
    "Backbone", "FeatureInfo", "SimpleFeaturePyramid", "TimmBackbone", "as_pyramid", "FAMILIES", "TIMM_PREFIX",
    "backbone_entry", "create_backbone", "list_backbones", "register_backbone",
]
