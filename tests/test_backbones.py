"""The registry and the feature contract, over every registered backbone.

Full-size variants are checked on the ``meta`` device (shapes without compute or memory); tiny
``*_test`` variants run for real on CPU, forward and backward.
"""
from __future__ import annotations

import pytest
import torch

from backbones import (FAMILIES, Backbone, FeatureInfo, as_pyramid, backbone_entry, create_backbone,
                       list_backbones, register_backbone)

ALL = list_backbones()
TINY = [n for n in ALL if backbone_entry(n).tiny]
FULL = [n for n in ALL if not backbone_entry(n).tiny]


def check_contract(model: Backbone, x: torch.Tensor, *, embed: bool = True) -> None:
    """Features at the strides and channels ``feature_info`` states; with ``embed``, the embedding's width too."""
    feats = model(x)
    info = model.feature_info
    assert isinstance(info, FeatureInfo) and len(feats) == len(info)
    for f, (c, s) in zip(feats, info):
        assert f.ndim == 4 and f.shape[0] == x.shape[0], f.shape
        assert f.shape[1] == c, (f.shape, c)
        assert (f.shape[2], f.shape[3]) == (x.shape[2] // s, x.shape[3] // s), (f.shape, s, x.shape)
    assert list(info.strides) == sorted(info.strides)
    if embed:
        emb = model.embed(x)
        assert emb.shape == (x.shape[0], info.embed_dim)


def test_every_family_has_a_tiny_variant_and_models() -> None:
    for fam in ("hybrid", "multi-axis", "state-space", "baseline"):
        assert list_backbones(family=fam, include_tiny=False), fam
        assert [n for n in TINY if backbone_entry(n).family == fam], fam


@pytest.mark.parametrize("name", FULL)
@pytest.mark.parametrize("res", [224, 256])
def test_full_variants_contract_on_meta(name: str, res: int) -> None:
    """Every full variant's features at 224 and 256 px, its embedding at 224 (the embedding of another
    resolution is checked on every family's tiny variant: a second forward pass on meta tensors costs
    seconds where ops are decomposed in Python)."""
    with torch.device("meta"):
        model = create_backbone(name, img_size=res).eval()
        check_contract(model, torch.empty(1, 3, res, res), embed=res == 224)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("res", [64, 96])
def test_tiny_variants_contract_on_cpu(name: str, res: int) -> None:
    torch.manual_seed(0)
    model = create_backbone(name, img_size=res)
    x = torch.randn(2, 3, res, res)
    check_contract(model.eval(), x)
    model.train()
    loss = sum(f.float().mean() for f in model(x)) + model.embed(x).float().mean()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_out_indices_select_levels(name: str) -> None:
    model = create_backbone(name, img_size=64)
    n = len(model.all_feature_info)
    model = create_backbone(name, img_size=64, out_indices=(n - 1,))
    assert len(model.feature_info) == 1
    (f,) = model(torch.randn(1, 3, 64, 64))
    assert f.shape[1] == model.feature_info.channels[0]


def test_simple_pyramid_for_single_stride_models() -> None:
    vit = create_backbone("timm/test_vit", img_size=64)
    assert vit.feature_info.strides == (16,)
    pyr = as_pyramid(vit)
    assert pyr.feature_info.strides == (4, 8, 16, 32)
    check_contract(pyr, torch.randn(2, 3, 64, 64))
    hier = create_backbone("convnext_test")
    assert as_pyramid(hier) is hier


def test_list_backbones_wildcards_and_families() -> None:
    assert "mambaout_tiny" in list_backbones("*mamba*")
    assert all("mamba" in n for n in list_backbones("*mamba*"))
    assert set(list_backbones(family="baseline")) <= set(ALL)
    assert "convnext_test" not in list_backbones("convnext*", include_tiny=False)
    with pytest.raises(ValueError, match="family must be one of"):
        list_backbones(family="transformer")
    assert set(FAMILIES) >= {backbone_entry(n).family for n in ALL}


def test_unknown_backbone_lists_close_names() -> None:
    with pytest.raises(ValueError, match="convnext_tiny"):
        create_backbone("convnxt_tiny")
    with pytest.raises(ValueError, match="closest timm names: timm/resnet50"):
        create_backbone("timm/resnet5O")


def test_any_timm_model_through_prefix() -> None:
    m = create_backbone("timm/resnet18")
    assert m.feature_info.strides == (4, 8, 16, 32)
    assert m.feature_info.channels == (64, 128, 256, 512)
    check_contract(m.eval(), torch.randn(1, 3, 64, 64))


def test_bad_resolution_is_refused_with_the_fix() -> None:
    m = create_backbone("convnext_test")
    with pytest.raises(ValueError, match="divisible by 32.*64x64"):
        m(torch.randn(1, 3, 50, 50))
    fixed = create_backbone("maxvit_test", img_size=64)
    with pytest.raises(ValueError, match="img_size=96"):
        fixed(torch.randn(1, 3, 96, 96))


def test_register_rejects_unknown_family() -> None:
    with pytest.raises(ValueError, match="family must be one of"):
        register_backbone(lambda **kw: None, family="cnn")


def test_bad_out_indices() -> None:
    with pytest.raises(ValueError, match="out_indices"):
        create_backbone("convnext_test", out_indices=(2, 1))
