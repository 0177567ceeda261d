"""Hybrid, multi-axis and baseline families: official key layouts, GLMix slots, FastViT
reparameterization, MaxViT's input-size refusal, recorded timm tags, and parameter counts
against the papers."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from arena.bench import count_params
from backbones import as_pyramid, create_backbone
from backbones import glmix, vit_comer
from backbones.glmix import GLMixBlock, SlotAttention
from backbones.timm_family import FastViTBackbone


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def _ln(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _linear(prefix: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (cout, cin), f"{prefix}.bias": (cout,)}


def _conv(prefix: str, cin: int, cout: int, k: int, groups: int = 1, bias: bool = True) -> dict[str, tuple[int, ...]]:
    out = {f"{prefix}.weight": (cout, cin // groups, k, k)}
    if bias:
        out[f"{prefix}.bias"] = (cout,)
    return out


def _materialise(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.tensor(3) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g))
            for k, s in shapes.items()}


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], filter_fn) -> None:
    result = model.load_state_dict(filter_fn(state_dict, model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


# --- ViT-CoMer -------------------------------------------------------------------------------------
# vit_comer_test: D=32, depth 4, ViT heads 2, conv_inplane 8, deform heads 2, 2 points,
# cffn 0.25 -> 8, mrfp ratio 1 -> 32, one extra CTI, img_size 64 -> 4x4 patch grid.
D, P, HEADS, POINTS, CFFN, MRFP, DEPTH = 32, 8, 2, 2, 8, 32, 4


def _official_deform(prefix: str) -> dict[str, tuple[int, ...]]:
    return {**_linear(f"{prefix}.sampling_offsets", D, HEADS * 3 * POINTS * 2),
            **_linear(f"{prefix}.attention_weights", D, HEADS * 3 * POINTS),
            **_linear(f"{prefix}.value_proj", D, D), **_linear(f"{prefix}.output_proj", D, D)}


def _official_cffn(prefix: str) -> dict[str, tuple[int, ...]]:
    return {**_linear(f"{prefix}.ffn.fc1", D, CFFN), **_conv(f"{prefix}.ffn.dwconv.dwconv", CFFN, CFFN, 3, CFFN),
            **_linear(f"{prefix}.ffn.fc2", CFFN, D), **_ln(f"{prefix}.ffn_norm", D)}


def _official_extractor(prefix: str) -> dict[str, tuple[int, ...]]:
    return {**_ln(f"{prefix}.query_norm", D), **_ln(f"{prefix}.feat_norm", D), **_official_deform(f"{prefix}.attn"),
            **_official_cffn(prefix)}


def _official_vit_comer_keys(mrfp: int = MRFP, cnn_feature_interaction: bool = True) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of Traffic-X/ViT-CoMer (ViTCoMer + comer_modules + base/vit.py): the
    segmentation layout by default; its detection layout has ``mrfp=D // 2`` and no ``cfinter``."""
    keys = {**_conv("patch_embed.proj", 3, D, 16), "pos_embed": (1, 1 + 16, D), "level_embed": (3, D)}
    for i in range(DEPTH):
        b = f"blocks.{i}"
        keys.update({**_ln(f"{b}.norm1", D), **_linear(f"{b}.attn.qkv", D, 3 * D), **_linear(f"{b}.attn.proj", D, D),
                     **_ln(f"{b}.norm2", D), **_linear(f"{b}.mlp.fc1", D, 4 * D), **_linear(f"{b}.mlp.fc2", 4 * D, D),
                     f"{b}.gamma1": (D,), f"{b}.gamma2": (D,)})
    keys.update({**_conv("spm.stem.0", 3, P, 3, bias=False), **_bn("spm.stem.1", P),
                 **_conv("spm.stem.3", P, P, 3, bias=False), **_bn("spm.stem.4", P),
                 **_conv("spm.stem.6", P, P, 3, bias=False), **_bn("spm.stem.7", P),
                 **_conv("spm.conv2.0", P, 2 * P, 3, bias=False), **_bn("spm.conv2.1", 2 * P),
                 **_conv("spm.conv3.0", 2 * P, 4 * P, 3, bias=False), **_bn("spm.conv3.1", 4 * P),
                 **_conv("spm.conv4.0", 4 * P, 4 * P, 3, bias=False), **_bn("spm.conv4.1", 4 * P),
                 **_conv("spm.fc1", P, D, 1), **_conv("spm.fc2", 2 * P, D, 1),
                 **_conv("spm.fc3", 4 * P, D, 1), **_conv("spm.fc4", 4 * P, D, 1)})
    for i in range(4):
        it = f"interactions.{i}"
        keys.update({**_ln(f"{it}.cti_tov.query_norm", D), **_ln(f"{it}.cti_tov.feat_norm", D),
                     **_official_deform(f"{it}.cti_tov.attn"), f"{it}.cti_tov.gamma": (D,),
                     **_official_cffn(f"{it}.cti_tov"),
                     **_ln(f"{it}.cti_toc.query_norm", D), **_ln(f"{it}.cti_toc.feat_norm", D),
                     **_linear(f"{it}.mrfp.fc1", D, mrfp), **_linear(f"{it}.mrfp.fc2", mrfp, D)})
        if cnn_feature_interaction:
            keys.update(_official_extractor(f"{it}.cti_toc.cfinter"))
        for j, k in ((1, 3), (2, 5), (3, 3), (4, 5), (5, 3), (6, 5)):
            keys.update(_conv(f"{it}.mrfp.dwconv.dwconv{j}", mrfp // 2, mrfp // 2, k, mrfp // 2))
        for j in (1, 2, 3):
            keys.update(_bn(f"{it}.mrfp.dwconv.bn{j}", mrfp))
    extra = "interactions.3.extra_CTIs.0"
    keys.update({**_ln(f"{extra}.query_norm", D), **_ln(f"{extra}.feat_norm", D), **_official_cffn(extra)})
    if cnn_feature_interaction:
        keys.update(_official_extractor(f"{extra}.cfinter"))
    keys.update({"up.weight": (D, D, 2, 2), "up.bias": (D,)})
    for i in range(1, 5):
        keys.update(_bn(f"norm{i}", D))
    return keys


def test_vit_comer_official_segmentor_checkpoint_loads_strictly():
    model = create_backbone("vit_comer_test")
    official = _materialise(_official_vit_comer_keys())
    # as saved by mmseg: backbone.* beside the decode heads
    ckpt = {f"backbone.{k}": v for k, v in official.items()}
    ckpt.update({"decode_head.conv_seg.weight": torch.zeros(150, 512, 1, 1),
                 "auxiliary_head.conv_seg.bias": torch.zeros(150)})
    _load_strict(model, ckpt, vit_comer.checkpoint_filter_fn)
    sd = model.state_dict()
    torch.testing.assert_close(sd["pos_embed"], official["pos_embed"][:, 1:])
    torch.testing.assert_close(sd["blocks.2.ls2.gamma"], official["blocks.2.gamma2"])
    torch.testing.assert_close(sd["interactions.3.extra_CTIs.0.cfinter.attn.value_proj.weight"],
                               official["interactions.3.extra_CTIs.0.cfinter.attn.value_proj.weight"])


def test_vit_comer_official_detector_checkpoint_loads_strictly_and_matches(tmp_path):
    """The COCO detection layout (MRFP hidden 0.5 x dim, no CNN-token interaction) as mmdet saves it:
    a model written out in that layout and loaded back computes exactly what it computed."""
    import re

    from backbones._weights import load_pretrained

    det = dict(mrfp_ratio=0.5, cnn_feature_interaction=False)  # what vit_comer_*_det set
    source = create_backbone("vit_comer_test", **det).eval()
    official = {re.sub(r"\.ls([12])\.gamma$", r".gamma\1", k): v for k, v in source.state_dict().items()}
    official["pos_embed"] = torch.cat([torch.zeros(1, 1, D), official["pos_embed"]], 1)  # the class-token slot
    assert {k: tuple(v.shape) for k, v in official.items()} == _official_vit_comer_keys(
        mrfp=D // 2, cnn_feature_interaction=False)
    path = tmp_path / "mask_rcnn_comer.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": {**{f"backbone.{k}": v for k, v in official.items()},
                                                      "rpn_head.rpn_cls.bias": torch.zeros(3)}}, path)
    model = create_backbone("vit_comer_test", **det).eval()
    report = load_pretrained(model, str(path))
    assert report.ok and report.loaded == report.total
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), source(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):  # the segmentation layout refuses it
        load_pretrained(create_backbone("vit_comer_test"), str(path))


@pytest.mark.parametrize("name,dim", [("vit_comer_tiny_det", 192), ("vit_comer_small_det", 384)])
def test_vit_comer_detection_variants_have_the_official_detector_layout(name, dim):
    with torch.device("meta"):
        sd = create_backbone(name).state_dict()
    assert sd["interactions.0.mrfp.fc1.weight"].shape == (dim // 2, dim)
    assert not any(".cfinter." in k for k in sd)


def test_vit_comer_loads_a_plain_timm_vit_into_its_vit_part():
    vit = timm.models.VisionTransformer(img_size=32, patch_size=16, embed_dim=D, depth=DEPTH, num_heads=2,
                                        num_classes=1000)
    model = create_backbone("vit_comer_test")
    result = model.load_state_dict(vit_comer.checkpoint_filter_fn(vit.state_dict(), model), strict=False)
    assert not result.unexpected_keys
    comer_parts = ("spm.", "interactions.", "level_embed", "up.", "norm1.", "norm2.", "norm3.", "norm4.")
    assert result.missing_keys and all(k.startswith(comer_parts) for k in result.missing_keys)
    torch.testing.assert_close(model.blocks[3].mlp.fc2.weight, vit.blocks[3].mlp.fc2.weight)
    torch.testing.assert_close(model.blocks[0].ls1.gamma, torch.ones(D))
    # the 2x2 grid of a 32px ViT is resized to the model's 4x4 grid
    assert model.pos_embed.shape == (1, 16, D)


def test_vit_comer_levels_at_other_sizes():
    model = create_backbone("vit_comer_test").eval()
    with torch.no_grad():
        levels = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in levels] == [(1, D, 16, 24), (1, D, 8, 12), (1, D, 4, 6), (1, D, 2, 3)]
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 3, 48, 64))


def test_vit_comer_layer_decay_groups_follow_the_official_recipe():
    from timm.optim import param_groups_layer_decay

    model = create_backbone("vit_comer_test")
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in param_groups_layer_decay(model, layer_decay=0.5)
             for p in g["params"]}
    assert scale["patch_embed.proj.weight"] == scale["pos_embed"] == 0.5 ** 5
    assert [scale[f"blocks.{i}.attn.qkv.weight"] for i in range(4)] == [0.5 ** 4, 0.5 ** 3, 0.5 ** 2, 0.5]
    assert scale["spm.fc1.weight"] == scale["interactions.0.cti_tov.gamma"] == scale["norm4.weight"] == 1.0


def test_vit_comer_rejects_bad_interaction_layout():
    with pytest.raises(ValueError, match=r"4 consecutive \[first, last\] spans"):
        create_backbone("vit_comer_test", interaction_indexes=((0, 1), (2, 3)))


# --- GLNet / GLMix --------------------------------------------------------------------------------
def _official_glnet_keys(dims, depths, modes, ratio, layerscale: bool, num_classes: int) -> dict[str, tuple]:
    """Key names and shapes of rayleizhu/GLMix models/glnet.py (ovlp stem, proj.norm, cpe 3, mlp_dw)."""
    keys = {**_conv("downsample_layers.0.1", 3, dims[0] // 2, 3), **_bn("downsample_layers.0.2", dims[0] // 2),
            **_conv("downsample_layers.0.4", dims[0] // 2, dims[0], 3), **_bn("downsample_layers.0.5", dims[0])}
    for i in range(1, 4):
        keys.update({**_conv(f"downsample_layers.{i}.0", dims[i - 1], dims[i], 3),
                     **_bn(f"downsample_layers.{i}.1", dims[i])})
    for i, (d, depth, mode) in enumerate(zip(dims, depths, modes)):
        h = int(ratio * d)
        for j in range(depth):
            b = f"stages.{i}.blocks.{j}"
            glmix_block = mode == "glmix" or (mode == "glmix.mha_nchw" and j % 2 == 0)
            attn = "relation_mha" if glmix_block else "mha_op"
            keys.update({**_conv(f"{b}.pos_conv", d, d, 3, d), **_ln(f"{b}.norm1", d), **_ln(f"{b}.norm2", d),
                         f"{b}.{attn}.in_proj_weight": (3 * d, d), f"{b}.{attn}.in_proj_bias": (3 * d,),
                         **_linear(f"{b}.{attn}.out_proj", d, d), **_conv(f"{b}.mlp.0", d, h, 1),
                         **_conv(f"{b}.mlp.1", h, h, 3, h), **_conv(f"{b}.mlp.3", h, d, 1)})
            if glmix_block:
                keys.update({f"{b}.slot_scale": (), **_conv(f"{b}.feature_conv.0", d, d, 1),
                             **_conv(f"{b}.feature_conv.1", d, d, 5, d), **_conv(f"{b}.feature_conv.2", d, d, 1)})
            if layerscale:
                keys.update({f"{b}.ls1.gamma": (1, d, 1, 1) if glmix_block else (d,), f"{b}.ls2.gamma": (1, d, 1, 1)})
    keys.update({**_bn("norm", dims[-1]), **_linear("head", dims[-1], num_classes)})
    return keys


@pytest.mark.parametrize("layerscale", [False, True])
def test_glnet_official_checkpoint_loads_strictly(layerscale):
    kw = {"layerscale": 1e-4} if layerscale else {}
    official = _materialise(_official_glnet_keys((16, 32, 64, 128), (1, 1, 2, 1),
                                                 ("glmix", "glmix", "glmix.mha_nchw", "mha_nchw"), 3, layerscale, 1000))
    headless = create_backbone("glnet_test", **kw)
    _load_strict(headless, official, glmix.checkpoint_filter_fn)
    with_head = create_backbone("glnet_test", num_classes=1000, **kw)
    _load_strict(with_head, official, glmix.checkpoint_filter_fn)
    torch.testing.assert_close(with_head.get_classifier().weight, official["head.weight"])
    with pytest.raises(ValueError, match="num_classes=N"):
        headless.get_classifier()


def test_glnet_16g_takes_the_ema_weights_of_an_official_checkpoint(tmp_path):
    """GLNet-16g's release is evaluated with its EMA; the other sizes with the plain weights."""
    from backbones._weights import load_pretrained

    plain, ema = create_backbone("glnet_test").state_dict(), create_backbone("glnet_test").state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in ema.items()}
    path = tmp_path / "glnet.pth"
    torch.save({"model": plain, "model_ema": ema}, path)
    model = create_backbone("glnet_test")
    load_pretrained(model, str(path))
    torch.testing.assert_close(model.state_dict()["norm.weight"], plain["norm.weight"])
    with torch.device("meta"):
        assert create_backbone("glnet_16g").pretrained_cfg["state_dict_key"] == "model_ema"
        assert "state_dict_key" not in create_backbone("glnet_4g").pretrained_cfg
    model.pretrained_cfg["state_dict_key"] = "model_ema"  # as glnet_16g has it
    load_pretrained(model, str(path))
    torch.testing.assert_close(model.state_dict()["norm.weight"], ema["norm.weight"])


def test_glnet_4g_official_layout_on_meta():
    shapes = _official_glnet_keys((64, 128, 256, 512), (4, 4, 18, 4), ("glmix", "glmix", "glmix.mha_nchw", "mha_nchw"),
                                  3, False, 1000)
    with torch.device("meta"):
        model = create_backbone("glnet_4g", num_classes=1000)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


def test_glmix_slots_are_per_pixel_distributions():
    model = create_backbone("glnet_test").eval()
    x = torch.randn(2, 3, 64, 96)
    maps = model.slots(x)
    # GLMix blocks: stage 1 (1), stage 2 (1), stage 3 (block 0 of 2; block 1 is plain attention)
    assert [tuple(m.shape) for m in maps] == [(2, 4, 16, 24), (2, 4, 8, 12), (2, 4, 4, 6)]
    for m in maps:
        torch.testing.assert_close(m.sum(1), torch.ones(m.shape[0], *m.shape[2:]))
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(model.forward_levels(x)[-1], ref[-1])
    with torch.device("meta"):
        glmix_blocks = sum(isinstance(m, GLMixBlock) for m in create_backbone("glnet_4g").modules())
    assert glmix_blocks == 4 + 4 + 9


def test_slot_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours, ref = SlotAttention(64, 2), nn.MultiheadAttention(64, 2, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 10, 64)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_glnet_rejects_non_square_slot_count():
    with pytest.raises(ValueError, match="square number.*got 5"):
        create_backbone("glnet_test", num_slots=5)


# --- timm-backed families ------------------------------------------------------------------------
def test_fastvit_reparameterize_keeps_outputs():
    torch.manual_seed(0)
    model = create_backbone("fastvit_test")
    assert isinstance(model, FastViTBackbone)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model(torch.randn(4, 3, 64, 64) * 2 + 0.5)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x) + [model.embed(x)]
    n_before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.reparameterize()
    n_after = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_after < n_before
    with torch.no_grad():
        after = model(x) + [model.embed(x)]
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_maxvit_refuses_other_sizes_with_a_clear_message():
    model = create_backbone("maxvit_test").eval()
    with pytest.raises(ValueError, match=r"built for 64x64 inputs, got 96x96; build it with img_size=96"):
        model(torch.zeros(1, 3, 96, 96))
    resized = create_backbone("maxvit_test", img_size=96).eval()
    with torch.no_grad():
        assert [f.shape[-1] for f in resized(torch.zeros(1, 3, 96, 96))] == [24, 12, 6, 3]


def test_timm_tags_are_recorded():
    with torch.device("meta"):
        maxvit, coatnet, swin, fastvit = (create_backbone(n) for n in ("maxvit_tiny", "coatnet_0", "swin_tiny",
                                                                       "fastvit_sa12"))
    assert (maxvit.pretrained_cfg["architecture"], maxvit.pretrained_cfg["tag"]) == ("maxvit_tiny_tf_224", "in1k")
    assert (coatnet.pretrained_cfg["architecture"], coatnet.pretrained_cfg["tag"]) == ("coatnet_0_224", None)
    assert swin.pretrained_cfg["tag"] == "ms_in1k" and swin.pretrained_cfg["url"].startswith("https://github.com/")
    assert fastvit.pretrained_cfg["hf_hub_id"] == "timm/fastvit_sa12.apple_in1k"


def test_nextvit_test_is_a_real_nextvit_without_weights():
    with torch.device("meta"):
        model = create_backbone("nextvit_test")
    assert isinstance(model.model, timm.models.nextvit.NextViT)
    assert model.feature_info.strides == (4, 8, 16, 32)
    # its depths differ from Next-ViT-S: no pretrained source may be advertised for it
    assert model.pretrained_cfg["hf_hub_id"] is None and model.model.pretrained_cfg.get("hf_hub_id") is None


def test_vit_embeds_with_class_token_and_wraps_into_a_pyramid():
    model = create_backbone("vit_test").eval()
    x = torch.randn(1, 3, 96, 96)  # dynamic_img_size: not the built 64
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), model.model.forward_features(x)[:, 0])
        assert model.feature_info.strides == (16,)
        assert [f.shape[-1] for f in as_pyramid(model)(x)] == [24, 12, 6, 3]


# --- parameter counts against the papers -----------------------------------------------------------
def _upernet_ade20k_params(c: int) -> int:
    """mmseg UPerHead (channels 512, pool scales 1/2/3/6) + FCN auxiliary head (256) on 4 levels of
    width ``c``, 150 classes: what the ViT-CoMer paper counts beside its backbone."""
    conv_bn = lambda cin, cout, k: cin * cout * k * k + 2 * cout  # noqa: E731 (conv without bias + BN)
    ppm = 4 * conv_bn(c, 512, 1)
    bottleneck = conv_bn(c + 4 * 512, 512, 3)
    laterals, fpn = 3 * conv_bn(c, 512, 1), 3 * conv_bn(512, 512, 3)
    fuse = conv_bn(4 * 512, 512, 3)
    aux = conv_bn(c, 256, 3) + 256 * 150 + 150
    return ppm + bottleneck + laterals + fpn + fuse + 512 * 150 + 150 + aux


@pytest.mark.parametrize("name, reported_m, extra", [
    ("maxvit_tiny", 31.0, "cls"), ("nextvit_small", 31.7, "cls"), ("coatnet_0", 25.0, "cls"),
    ("fastvit_sa12", 11.6, "cls"), ("glnet_4g", 27.0, "cls"),
    ("vit_comer_tiny", 38.7, "upernet"), ("vit_comer_small", 61.4, "upernet"),
])
def test_params_match_papers(name, reported_m, extra):
    with torch.device("meta"):
        model = create_backbone(name)
    n = count_params(model)
    width = model.embed_dim
    n += (width * 1000 + 1000) if extra == "cls" else _upernet_ade20k_params(width)
    assert abs(n / 1e6 - reported_m) / reported_m < 0.02, (name, n / 1e6, reported_m)
