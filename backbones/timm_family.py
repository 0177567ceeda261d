"""Registrations backed by timm: each entrypoint is a timm architecture behind the feature contract.

Names follow the papers' variant names; the timm architecture is the first argument of ``_timm``
and its default pretrained tag (or the one pinned with ``tag=``) is recorded in
``pretrained_cfg`` as ``architecture``/``tag``/``hf_hub_id``/``url``, so ``pretrained=True`` resolves
to ``timm/<architecture>.<tag>``. ``tag`` is ``None`` where timm has no weights for the
architecture (the paper-exact CoAtNets; use the ``coatnet_*_rw`` variants for weights).
``*_test`` entries are real instances of the same classes with small widths and depths, for
fast tests; those whose shapes differ from their architecture's advertise no weights.

Families: multi-axis attention (MaxViT), hybrids (Next-ViT, CoAtNet, FastViT), and the
baselines (ConvNeXt, Swin, ResNet-50, DeiT/ViT) plus MambaOut, the state-space control without
an SSM. MaxViT and CoAtNet attend over windows/grids sized from the input, so they are built for
one input size (``img_size=``, default 224) and refuse others with a message naming it. Swin is
built for ``img_size`` too. DeiT is single-stride (16): ``embed`` is its class token, and dense
heads wrap it with ``as_pyramid``; it is built with ``dynamic_img_size=True`` so any multiple of 16
works.
"""
from __future__ import annotations

from typing import Any

from ._features import Backbone, TimmBackbone
from ._registry import register_backbone


# For test variants whose widths/depths differ from the architecture's: no weights fit them.
_NO_WEIGHTS = {"pretrained_cfg_overlay": {"hf_hub_id": None, "url": None, "tag": None}}


def _record_source(backbone: TimmBackbone, arch: str, tag: str | None) -> TimmBackbone:
    """Store the timm architecture and pretrained tag (with its hub id / URL) in ``pretrained_cfg``."""
    src = dict(getattr(backbone.model, "pretrained_cfg", None) or {})
    has_weights = bool(src.get("hf_hub_id") or src.get("url"))
    backbone.pretrained_cfg.update(
        architecture=arch,
        tag=(tag or src.get("tag")) if has_weights else None,
        hf_hub_id=src.get("hf_hub_id") or None,
        url=src.get("url") or None,
    )
    return backbone


def _timm(arch: str, family: str, *, tag: str | None = None, cls: type[TimmBackbone] = TimmBackbone,
          **kwargs: Any) -> Backbone:
    name = f"{arch}.{tag}" if tag else arch
    return _record_source(cls(name, family=family, **kwargs), arch, tag)


class FastViTBackbone(TimmBackbone):
    """FastViT behind the feature contract, with the structural reparameterization for inference.

    >>> b = fastvit_test().eval()
    >>> b.reparameterize()
    """

    def reparameterize(self) -> None:
        """Fold the train-time branches (MobileOne/RepMixer/RepCPE) into single convs, in place."""
        from timm.utils.model import reparameterize_model

        reparameterize_model(self.model, inplace=True)


# --- baseline: ConvNeXt -------------------------------------------------------------------------
@register_backbone(family="baseline", tiny=True)
def convnext_test(**kw: Any) -> Backbone:
    return _timm("test_convnext", "baseline", **kw)


@register_backbone(family="baseline")
def convnext_atto(**kw: Any) -> Backbone:
    return _timm("convnext_atto", "baseline", **kw)


@register_backbone(family="baseline")
def convnext_tiny(**kw: Any) -> Backbone:
    return _timm("convnext_tiny", "baseline", **kw)


@register_backbone(family="baseline")
def convnext_small(**kw: Any) -> Backbone:
    return _timm("convnext_small", "baseline", **kw)


@register_backbone(family="baseline")
def convnext_base(**kw: Any) -> Backbone:
    return _timm("convnext_base", "baseline", **kw)


# --- baseline: Swin (windows of 7; built for img_size) ---------------------------------------------
@register_backbone(family="baseline", tiny=True)
def swin_test(**kw: Any) -> Backbone:
    return _timm("swin_tiny_patch4_window7_224", "baseline", **{
        "img_size": 64, "embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), **_NO_WEIGHTS, **kw})


@register_backbone(family="baseline")
def swin_tiny(**kw: Any) -> Backbone:
    return _timm("swin_tiny_patch4_window7_224", "baseline", **{"tag": "ms_in1k", **kw})


@register_backbone(family="baseline")
def swin_small(**kw: Any) -> Backbone:
    return _timm("swin_small_patch4_window7_224", "baseline", **{"tag": "ms_in1k", **kw})


@register_backbone(family="baseline")
def swin_base(**kw: Any) -> Backbone:
    return _timm("swin_base_patch4_window7_224", "baseline", **{"tag": "ms_in1k", **kw})


# --- baseline: ResNet-50 -----------------------------------------------------------------------------
@register_backbone(family="baseline", tiny=True)
def resnet_test(**kw: Any) -> Backbone:
    return _timm("test_resnet", "baseline", **kw)


@register_backbone(family="baseline")
def resnet50(**kw: Any) -> Backbone:
    return _timm("resnet50", "baseline", **kw)


# --- baseline: plain ViT / DeiT (single stride 16, class-token embedding) ---------------------------
@register_backbone(family="baseline", tiny=True)
def vit_test(**kw: Any) -> Backbone:
    return _timm("test_vit", "baseline", **{"img_size": 64, "dynamic_img_size": True, **kw})


@register_backbone(family="baseline")
def deit_tiny(**kw: Any) -> Backbone:
    return _timm("deit_tiny_patch16_224", "baseline", **{"dynamic_img_size": True, **kw})


@register_backbone(family="baseline")
def deit_small(**kw: Any) -> Backbone:
    return _timm("deit_small_patch16_224", "baseline", **{"dynamic_img_size": True, **kw})


@register_backbone(family="baseline")
def deit_base(**kw: Any) -> Backbone:
    return _timm("deit_base_patch16_224", "baseline", **{"dynamic_img_size": True, **kw})


# --- multi-axis attention: MaxViT (window = grid = input / 32) ------------------------------------
@register_backbone(family="multi-axis", tiny=True)
def maxvit_test(**kw: Any) -> Backbone:
    return _timm("test_maxvit", "multi-axis", **{"img_size": 64, **kw})


@register_backbone(family="multi-axis")
def maxvit_pico(**kw: Any) -> Backbone:
    """timm's smallest MaxViT (7.5M), for CPU-sized comparisons."""
    return _timm("maxvit_pico_rw_256", "multi-axis", **{"img_size": 256, **kw})


@register_backbone(family="multi-axis")
def maxvit_tiny(**kw: Any) -> Backbone:
    return _timm("maxvit_tiny_tf_224", "multi-axis", **{"img_size": 224, **kw})


@register_backbone(family="multi-axis")
def maxvit_small(**kw: Any) -> Backbone:
    return _timm("maxvit_small_tf_224", "multi-axis", **{"img_size": 224, **kw})


@register_backbone(family="multi-axis")
def maxvit_base(**kw: Any) -> Backbone:
    return _timm("maxvit_base_tf_224", "multi-axis", **{"img_size": 224, **kw})


# --- hybrid: Next-ViT ------------------------------------------------------------------------------
@register_backbone(family="hybrid", tiny=True)
def nextvit_test(**kw: Any) -> Backbone:
    # Next-ViT's stage widths are fixed inside timm's NextViT; depths (1, 1, 5, 1) is its smallest
    # valid layout (stage 3 repeats 4 conv blocks + 1 transformer block).
    return _timm("nextvit_small", "hybrid", **{"depths": (1, 1, 5, 1), "stem_chs": (16, 8, 16), **_NO_WEIGHTS, **kw})


@register_backbone(family="hybrid")
def nextvit_small(**kw: Any) -> Backbone:
    return _timm("nextvit_small", "hybrid", **kw)


@register_backbone(family="hybrid")
def nextvit_base(**kw: Any) -> Backbone:
    return _timm("nextvit_base", "hybrid", **kw)


@register_backbone(family="hybrid")
def nextvit_large(**kw: Any) -> Backbone:
    return _timm("nextvit_large", "hybrid", **kw)


# --- hybrid: CoAtNet (paper configs; *_rw are timm's variants with released weights) ------------------
@register_backbone(family="hybrid", tiny=True)
def coatnet_test(**kw: Any) -> Backbone:
    return _timm("test_coatnet", "hybrid", **{"img_size": 64, **kw})


@register_backbone(family="hybrid")
def coatnet_0(**kw: Any) -> Backbone:
    return _timm("coatnet_0_224", "hybrid", **{"img_size": 224, **kw})


@register_backbone(family="hybrid")
def coatnet_1(**kw: Any) -> Backbone:
    return _timm("coatnet_1_224", "hybrid", **{"img_size": 224, **kw})


@register_backbone(family="hybrid")
def coatnet_2(**kw: Any) -> Backbone:
    return _timm("coatnet_2_224", "hybrid", **{"img_size": 224, **kw})


@register_backbone(family="hybrid")
def coatnet_0_rw(**kw: Any) -> Backbone:
    return _timm("coatnet_0_rw_224", "hybrid", **{"img_size": 224, **kw})


@register_backbone(family="hybrid")
def coatnet_1_rw(**kw: Any) -> Backbone:
    return _timm("coatnet_1_rw_224", "hybrid", **{"img_size": 224, **kw})


@register_backbone(family="hybrid")
def coatnet_2_rw(**kw: Any) -> Backbone:
    return _timm("coatnet_2_rw_224", "hybrid", **{"img_size": 224, **kw})


# --- hybrid: FastViT (call .reparameterize() before timing inference) ------------------------------
@register_backbone(family="hybrid", tiny=True)
def fastvit_test(**kw: Any) -> Backbone:
    return _timm("fastvit_sa12", "hybrid", cls=FastViTBackbone, **{
        "layers": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128), **_NO_WEIGHTS, **kw})


@register_backbone(family="hybrid")
def fastvit_t8(**kw: Any) -> Backbone:
    return _timm("fastvit_t8", "hybrid", cls=FastViTBackbone, **kw)


@register_backbone(family="hybrid")
def fastvit_sa12(**kw: Any) -> Backbone:
    return _timm("fastvit_sa12", "hybrid", cls=FastViTBackbone, **kw)


@register_backbone(family="hybrid")
def fastvit_sa36(**kw: Any) -> Backbone:
    return _timm("fastvit_sa36", "hybrid", cls=FastViTBackbone, **kw)


@register_backbone(family="hybrid")
def fastvit_ma36(**kw: Any) -> Backbone:
    return _timm("fastvit_ma36", "hybrid", cls=FastViTBackbone, **kw)


# --- state-space control without an SSM: MambaOut -------------------------------------------------
@register_backbone(family="state-space", tiny=True)
def mambaout_test(**kw: Any) -> Backbone:
    return _timm("test_mambaout", "state-space", **kw)


@register_backbone(family="state-space")
def mambaout_femto(**kw: Any) -> Backbone:
    return _timm("mambaout_femto", "state-space", **kw)


@register_backbone(family="state-space")
def mambaout_tiny(**kw: Any) -> Backbone:
    return _timm("mambaout_tiny", "state-space", **kw)


@register_backbone(family="state-space")
def mambaout_small(**kw: Any) -> Backbone:
    return _timm("mambaout_small", "state-space", **kw)


@register_backbone(family="state-space")
def mambaout_base(**kw: Any) -> Backbone:
    return _timm("mambaout_base", "state-space", **kw)
