"""UniRepLKNet and RepLKNet: large-kernel ops, exact structural reparameterization, official layouts.

Official-layout state dicts are built here from the key names and shapes of the official code
(AILab-CVC/UniRepLKNet ``unireplknet.py``, DingXiaoH/RepLKNet-pytorch ``replknet.py``), not from
the models under test, and must load with ``strict=True`` after ``checkpoint_filter_fn``.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import pytest
import timm
import torch
import torch.nn.functional as F

from arena.bench import count_flops, count_params
from backbones import create_backbone, list_backbones
from backbones import replknet as rlk
from backbones import unireplknet as url
from backbones.ops import autotune, scan_cpu
from backbones.ops.large_kernel import (STRATEGIES, DepthwiseConv2d, center_pad, depthwise_conv2d,
                                        dilate_kernel, tuned_strategy)

UNIREPLKNET = ["unireplknet_a", "unireplknet_f", "unireplknet_p", "unireplknet_n", "unireplknet_t", "unireplknet_s",
               "unireplknet_b"]
REPLKNET = ["replknet_31b", "replknet_31l"]
SMALL_DIMS = dict(dims=(8, 16, 24, 32))  # full depths and kernel plans, small widths
SMALL_CHANNELS = dict(channels=(8, 16, 24, 32))
# official Dilated Reparam Block branches of the 13x13 kernel: (kernel, dilation)
OFFICIAL_BRANCHES_13 = ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy shared CPU, thread barriers cost more than they save here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights and BatchNorm running statistics, so that every merge is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.5 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def assert_same_outputs(a: list[torch.Tensor], b: list[torch.Tensor], rel: float = 1e-4) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        scale = x.abs().max().item()
        assert scale > 0
        assert (x - y).abs().max().item() <= rel * scale, ((x - y).abs().max().item(), scale)


# --- ops -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [3, 13, 31])
def test_depthwise_strategies_agree(k: int) -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 6, 14, 14), torch.randn(6, 1, k, k), torch.randn(6)
    ref = F.conv2d(x, w, b, padding=k // 2, groups=6)
    for s in STRATEGIES:
        y = depthwise_conv2d(x, w, b, strategy=s)
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref, atol=1e-3, rtol=1e-4)


def test_depthwise_dilation_and_errors() -> None:
    x, w = torch.randn(1, 4, 20, 20), torch.randn(4, 1, 3, 3)
    ref = F.conv2d(x, w, padding=3, dilation=3, groups=4)
    for s in ("plain", "channels_last"):
        torch.testing.assert_close(depthwise_conv2d(x, w, dilation=3, strategy=s), ref)
    with pytest.raises(ValueError, match="dilation=1"):
        depthwise_conv2d(x, w, dilation=2, strategy="fft")
    with pytest.raises(ValueError, match="strategy must be one of"):
        depthwise_conv2d(x, w, strategy="winograd")
    with pytest.raises(ValueError, match="odd"):
        DepthwiseConv2d(4, 4)


@pytest.mark.parametrize("fastest", ["plain", "channels_last", "compiled"])
def test_tuned_strategy_times_the_candidates_once_per_shape(monkeypatch, fastest: str) -> None:
    monkeypatch.setattr(autotune, "_PICKS", {})
    timed = []

    def fake_seconds(fn):  # each candidate is `lambda s=strategy: ...`
        fn()
        timed.append(fn.__defaults__[0])
        return 1.0 if fn.__defaults__[0] == fastest else 2.0

    monkeypatch.setattr(autotune, "_seconds", fake_seconds)
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 13, 13)
    compiled = scan_cpu.kernel() is not None  # inference (no autograd) times the compiled kernel too
    n = 3 if compiled else 2
    want = fastest if compiled or fastest != "compiled" else "plain"
    assert tuned_strategy(x, w) == want
    assert len(timed) == n * (1 + autotune.ROUNDS)  # within the clear margin: all rounds
    assert tuned_strategy(x.clone(), w) == want and len(timed) == n * (1 + autotune.ROUNDS)  # cached per shape
    assert tuned_strategy(torch.randn(1, 4, 7, 9), w) == want  # 63 pixels: the same power-of-two bucket as 64
    assert len(timed) == n * (1 + autotune.ROUNDS)
    tuned_strategy(x.contiguous(memory_format=torch.channels_last), w)  # another input layout: timed again
    assert len(timed) == 2 * n * (1 + autotune.ROUNDS)
    # above 13x13 NCHW is not timed: channels-last untimed under autograd, else against the compiled kernel
    assert tuned_strategy(x.requires_grad_(), torch.randn(4, 1, 15, 15)) == "channels_last"
    assert len(timed) == 2 * n * (1 + autotune.ROUNDS)
    with torch.no_grad():
        big = tuned_strategy(x, torch.randn(4, 1, 15, 15))
    assert big == ("compiled" if compiled and fastest == "compiled" else "channels_last")
    assert set(timed[2 * n * (1 + autotune.ROUNDS):]) == ({"channels_last", "compiled"} if compiled else set())
    torch.testing.assert_close(depthwise_conv2d(x.detach(), w), depthwise_conv2d(x.detach(), w, strategy="plain"))


@pytest.mark.skipif(scan_cpu.kernel() is None, reason="needs the compiled CPU kernels (a C compiler)")
def test_depthwise_module_transposes_its_taps_once_per_weight_version(monkeypatch) -> None:
    """The compiled kernel's [k * k, C] taps are made once per weight version (the timed candidate takes the
    module's cached ones): not on every forward (a strided copy of the weight per block, about 1% of
    UniRepLKNet-T's batch-1 forward)."""
    from backbones.ops import large_kernel

    monkeypatch.setattr(autotune, "_PICKS", {})
    monkeypatch.setattr(autotune, "_seconds", lambda fn: (fn(), 1.0 if fn.__defaults__[0] == "compiled" else 2.0)[1])
    made, conv_taps = [], large_kernel.conv_taps
    monkeypatch.setattr(large_kernel, "conv_taps", lambda w: made.append(1) or conv_taps(w))
    m = DepthwiseConv2d(16, 13, bias=True)
    x = torch.randn(1, 16, 14, 14)
    with torch.no_grad():
        first = m(x)
        assert len(made) == 1
        for _ in range(3):
            torch.testing.assert_close(m(x), first)
        assert len(made) == 1
        m.weight.mul_(2)  # a new weight version: its taps once more
        torch.testing.assert_close(m(x), 2 * first - m.bias.view(1, -1, 1, 1))
        m(x)
        assert len(made) == 2


@pytest.mark.skipif(scan_cpu.kernel() is None, reason="needs the compiled CPU kernels (a C compiler)")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 80, 56, 56, 3), (2, 16, 14, 15, 13), (1, 24, 7, 7, 13), (3, 13, 9, 11, 5),
                                   (1, 8, 5, 6, 31), (2, 40, 10, 10, 1)])
def test_compiled_depthwise_conv_matches_pytorch_and_pools(shape: tuple[int, ...], threads: int, set_threads) -> None:
    """Odd channel counts (a partial vector), maps narrower than the kernel, rows that are not a whole number
    of 8-pixel tiles, one or two threads; the pooled mean of forward_pooled equals the output's mean."""
    b, c, h, w, k = shape
    torch.manual_seed(0)
    m = DepthwiseConv2d(c, k, bias=True, strategy="compiled")
    x = torch.randn(b, c, h, w)
    ref = F.conv2d(x, m.weight, m.bias, padding=k // 2, groups=c)
    set_threads(threads)
    with torch.no_grad():
        y, pooled = m.forward_pooled(x)
        y_nchw_in = m(x.contiguous())
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_nchw_in, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref.mean((2, 3)), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        m.weight.mul_(2)  # the cached taps follow the weight
        torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, padding=k // 2, groups=c), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="without autograd"):
        m(x)  # the weight requires grad
    with torch.no_grad(), pytest.raises(ValueError, match="without dilation"):
        depthwise_conv2d(x, m.weight, dilation=2, strategy="compiled")


def test_compiled_depthwise_conv_is_counted_and_traced_as_pytorch_conv() -> None:
    """Under a dispatch mode (FLOP counting) the compiled strategy computes by PyTorch's conv, which is counted."""
    m = DepthwiseConv2d(8, 13, strategy="compiled").requires_grad_(False)
    x = torch.randn(1, 8, 14, 14)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        y = m(x)
    assert counter.get_total_flops() == 2 * 8 * 14 * 14 * 13 * 13
    torch.testing.assert_close(y, F.conv2d(x, m.weight, padding=6, groups=8), rtol=1e-5, atol=1e-5)


def test_depthwise_conv_module_is_a_conv2d() -> None:
    m = DepthwiseConv2d(8, 5, dilation=2, bias=True)
    ref = torch.nn.Conv2d(8, 8, 5, padding=4, dilation=2, groups=8, bias=True)
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 8, 16, 16)
    torch.testing.assert_close(m(x), ref(x))


def test_dilated_kernel_equals_dilated_conv() -> None:
    x, w = torch.randn(1, 3, 21, 21), torch.randn(3, 1, 3, 3)
    dense = center_pad(dilate_kernel(w, 4), 13)
    assert dense.shape == (3, 1, 13, 13)
    torch.testing.assert_close(F.conv2d(x, dense, padding=6, groups=3),
                               F.conv2d(x, w, padding=4, dilation=4, groups=3), atol=1e-5, rtol=1e-5)


# --- reparameterization: train form == deploy form ----------------------------------------------------
@pytest.mark.parametrize("name", UNIREPLKNET)
def test_unireplknet_reparam_is_exact_for_every_kernel_plan(name: str) -> None:
    torch.manual_seed(0)
    model = randomize_(create_backbone(name, **SMALL_DIMS)).eval()
    plan = [b.kernel_size for s in model.stages for b in s]
    assert plan.count(3) >= 2 and plan.count(13) >= 6
    x = torch.randn(1, 3, 64, 64)  # stage 2 at 8x8: every tap of every dilated branch is used
    with torch.no_grad():
        ref, ref_embed = model(x), model.embed(x)
        deployed = copy.deepcopy(model)
        deployed.reparameterize()
        assert deployed.deploy and not model.deploy
        assert_same_outputs(ref, deployed(x))
        assert_same_outputs([ref_embed], [deployed.embed(x)])
        # the deploy form built directly holds exactly the reparameterized weights
        built = create_backbone(name, deploy=True, **SMALL_DIMS).eval()
        built.load_state_dict(deployed.state_dict(), strict=True)
        assert_same_outputs(ref, built(x))
    assert count_params(deployed) < count_params(model)


@pytest.mark.parametrize("name", REPLKNET)
def test_replknet_reparam_is_exact(name: str) -> None:
    torch.manual_seed(0)
    model = randomize_(create_backbone(name, **SMALL_CHANNELS)).eval()
    assert [s.blocks[0].large_kernel.kernel_size for s in model.stages] == [31, 29, 27, 13]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        deployed = timm.utils.reparameterize_model(model)  # a copy, through timm's walker
        assert deployed.deploy and not model.deploy
        assert_same_outputs(ref, deployed(x))
        built = create_backbone(name, deploy=True, **SMALL_CHANNELS).eval()
        built.load_state_dict(deployed.state_dict(), strict=True)
        assert_same_outputs(ref, built(x))


def test_timm_walker_and_reparameterize_agree_on_unireplknet() -> None:
    model = randomize_(create_backbone("unireplknet_test")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = timm.utils.reparameterize_model(model)
        model.reparameterize()
        model.reparameterize()  # idempotent
        assert a.state_dict().keys() == model.state_dict().keys()
        assert_same_outputs(model(x), a(x), rel=1e-6)


# --- official key layouts ------------------------------------------------------------------------------
def bn_keys(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def official_unireplknet_layout(depths, dims, kernel_sizes, *, deploy: bool, num_classes: int) -> dict:
    """Key -> shape of the official UniRepLKNet (``num_classes`` head, train or deploy form)."""
    d0 = dims[0]
    s = {"downsample_layers.0.0.weight": (d0 // 2, 3, 3, 3), "downsample_layers.0.0.bias": (d0 // 2,),
         "downsample_layers.0.1.weight": (d0 // 2,), "downsample_layers.0.1.bias": (d0 // 2,),
         "downsample_layers.0.3.weight": (d0, d0 // 2, 3, 3), "downsample_layers.0.3.bias": (d0,),
         "downsample_layers.0.4.weight": (d0,), "downsample_layers.0.4.bias": (d0,)}
    for i in range(1, 4):
        s |= {f"downsample_layers.{i}.0.weight": (dims[i], dims[i - 1], 3, 3),
              f"downsample_layers.{i}.0.bias": (dims[i],),
              f"downsample_layers.{i}.1.weight": (dims[i],), f"downsample_layers.{i}.1.bias": (dims[i],)}
    for i, (depth, d) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p, k, h = f"stages.{i}.{j}", kernel_sizes[i][j], 4 * d
            if k == 13:
                s[f"{p}.dwconv.lk_origin.weight"] = (d, 1, 13, 13)
                if deploy:
                    s[f"{p}.dwconv.lk_origin.bias"] = (d,)
                else:
                    s |= bn_keys(f"{p}.dwconv.origin_bn", d)
                    for bk, r in OFFICIAL_BRANCHES_13:
                        s[f"{p}.dwconv.dil_conv_k{bk}_{r}.weight"] = (d, 1, bk, bk)
                        s |= bn_keys(f"{p}.dwconv.dil_bn_k{bk}_{r}", d)
            else:
                s[f"{p}.dwconv.weight"] = (d, 1, k, k)
                if deploy:
                    s[f"{p}.dwconv.bias"] = (d,)
            if not deploy:
                s |= bn_keys(f"{p}.norm", d)
            s |= {f"{p}.se.down.weight": (d // 4, d, 1, 1), f"{p}.se.down.bias": (d // 4,),
                  f"{p}.se.up.weight": (d, d // 4, 1, 1), f"{p}.se.up.bias": (d,),
                  f"{p}.pwconv1.1.weight": (h, d), f"{p}.pwconv1.1.bias": (h,),
                  f"{p}.act.1.gamma": (1, 1, 1, h), f"{p}.pwconv2.0.weight": (d, h)}
            if deploy:
                s[f"{p}.pwconv2.0.bias"] = (d,)
            else:
                s |= {f"{p}.act.1.beta": (1, 1, 1, h), f"{p}.gamma": (d,)} | bn_keys(f"{p}.pwconv2.2", d)
    s |= {"norm.weight": (dims[-1],), "norm.bias": (dims[-1],),
          "head.weight": (num_classes, dims[-1]), "head.bias": (num_classes,)}
    return s


def official_replknet_layout(kernels, layers, channels, *, deploy: bool, num_classes: int) -> dict:
    """Key -> shape of the official RepLKNet (small kernel 5, ``num_classes`` head)."""
    c0 = channels[0]
    s = {}
    for i, shape in enumerate([(c0, 3, 3, 3), (c0, 1, 3, 3), (c0, c0, 1, 1), (c0, 1, 3, 3)]):
        s |= {f"stem.{i}.conv.weight": shape} | bn_keys(f"stem.{i}.bn", c0)
    for i, (k, n, c) in enumerate(zip(kernels, layers, channels)):
        for j in range(n):
            p, q = f"stages.{i}.blocks.{2 * j}", f"stages.{i}.blocks.{2 * j + 1}"
            s |= bn_keys(f"{p}.prelkb_bn", c) | {f"{p}.pw1.conv.weight": (c, c, 1, 1)} | bn_keys(f"{p}.pw1.bn", c)
            if deploy:
                s |= {f"{p}.large_kernel.lkb_reparam.weight": (c, 1, k, k), f"{p}.large_kernel.lkb_reparam.bias": (c,)}
            else:
                s |= {f"{p}.large_kernel.lkb_origin.conv.weight": (c, 1, k, k),
                      f"{p}.large_kernel.small_conv.conv.weight": (c, 1, 5, 5)}
                s |= bn_keys(f"{p}.large_kernel.lkb_origin.bn", c) | bn_keys(f"{p}.large_kernel.small_conv.bn", c)
            s |= {f"{p}.pw2.conv.weight": (c, c, 1, 1)} | bn_keys(f"{p}.pw2.bn", c)
            s |= bn_keys(f"{q}.preffn_bn", c) | bn_keys(f"{q}.pw1.bn", 4 * c)
            s |= {f"{q}.pw1.conv.weight": (4 * c, c, 1, 1)}
            s |= {f"{q}.pw2.conv.weight": (c, 4 * c, 1, 1)} | bn_keys(f"{q}.pw2.bn", c)
        if i < 3:
            nxt = channels[i + 1]
            s |= {f"transitions.{i}.0.conv.weight": (nxt, c, 1, 1), f"transitions.{i}.1.conv.weight": (nxt, 1, 3, 3)}
            s |= bn_keys(f"transitions.{i}.0.bn", nxt) | bn_keys(f"transitions.{i}.1.bn", nxt)
    s |= bn_keys("norm", channels[-1]) | {"head.weight": (num_classes, channels[-1]), "head.bias": (num_classes,)}
    return s


def random_state(layout: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(100)
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(shape, generator=g)
        else:
            out[k] = 0.2 * torch.randn(shape, generator=g)
    return out


UNI_TEST = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), kernel_sizes=((3,), (13,), (13, 3), (13,)))
RLK_TEST = dict(kernels=(31, 29, 27, 13), layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))


def uni_layout(deploy: bool, num_classes: int = 1000) -> dict:
    return official_unireplknet_layout(UNI_TEST["depths"], UNI_TEST["dims"], UNI_TEST["kernel_sizes"],
                                       deploy=deploy, num_classes=num_classes)


def rlk_layout(deploy: bool, num_classes: int = 1000) -> dict:
    return official_replknet_layout(RLK_TEST["kernels"], RLK_TEST["layers"], RLK_TEST["channels"],
                                    deploy=deploy, num_classes=num_classes)


FAMILIES = [("unireplknet_test", url.checkpoint_filter_fn, uni_layout),
            ("replknet_test", rlk.checkpoint_filter_fn, rlk_layout)]


@pytest.mark.parametrize("name,filter_fn,layout", FAMILIES)
@pytest.mark.parametrize("ckpt_deploy,model_deploy", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("num_classes", [0, 1000])
def test_official_layout_loads_strictly(name: str, filter_fn: Callable, layout: Callable, ckpt_deploy: bool,
                                        model_deploy: bool, num_classes: int) -> None:
    official = random_state(layout(ckpt_deploy))
    model = create_backbone(name, deploy=model_deploy, num_classes=num_classes)
    result = model.load_state_dict(filter_fn(dict(official), model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    if num_classes:
        torch.testing.assert_close(model.get_classifier().weight, official["head.weight"])


@pytest.mark.parametrize("name,filter_fn,layout", FAMILIES)
def test_train_checkpoint_into_deploy_model_keeps_the_function(name: str, filter_fn: Callable,
                                                               layout: Callable) -> None:
    official = random_state(layout(False))
    train = create_backbone(name).eval()
    train.load_state_dict(filter_fn(dict(official), train), strict=True)
    deploy = create_backbone(name, deploy=True).eval()
    deploy.load_state_dict(filter_fn(dict(official), deploy), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_same_outputs(train(x), deploy(x))


@pytest.mark.parametrize("name,filter_fn,layout", FAMILIES)
def test_deploy_checkpoint_into_train_model_is_refused(name: str, filter_fn: Callable, layout: Callable) -> None:
    model = create_backbone(name)
    with pytest.raises(ValueError, match="deploy=True"):
        filter_fn(random_state(layout(True)), model)


@pytest.mark.parametrize("wrapper", ["model", "module", None])
def test_official_file_loads_through_create_backbone(tmp_path, wrapper: str | None) -> None:
    official = random_state(uni_layout(False))
    path = tmp_path / "unireplknet_test.pth"
    torch.save({wrapper: official} if wrapper else official, path)
    model = create_backbone("unireplknet_test", pretrained=str(path))
    expected = {k: v for k, v in url.checkpoint_filter_fn(dict(official), model).items()}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k])


# --- shapes, counts, errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["unireplknet_test", "replknet_test"])
def test_tiny_feature_shapes_and_strides(name: str) -> None:
    model = create_backbone(name).eval()
    assert model.family == "large-kernel" and model.feature_info.strides == (4, 8, 16, 32)
    for res in (64, 96):
        with torch.no_grad():
            feats = model(torch.randn(1, 3, res, res))
        assert [tuple(f.shape[1:]) for f in feats] == [(c, res // s, res // s) for c, s in model.feature_info]
    picked = create_backbone(name, out_indices=(1, 3))
    assert picked.feature_info.strides == (8, 32) and len(picked(torch.randn(1, 3, 64, 64))) == 2


def test_registered_names() -> None:
    assert list_backbones("unireplknet_*") == sorted(UNIREPLKNET + ["unireplknet_test"])
    assert list_backbones("replknet_*") == sorted(REPLKNET + ["replknet_test"])


# (name, paper params in M incl. the 1000-class head, paper GMACs at 224, GMACs tolerance)
# The paper rounds UniRepLKNet-A's 0.64 GMACs to one decimal (0.6G); the others are within 1%.
PAPER = [("unireplknet_a", 4.4, 0.6, 0.05), ("unireplknet_t", 31.0, 4.9, 0.05 * 4.9),
         ("replknet_31b", 79.0, 15.3, 0.05 * 15.3)]


@pytest.mark.parametrize("name,params_m,gmacs,tol", PAPER)
def test_params_and_flops_match_the_papers(name: str, params_m: float, gmacs: float, tol: float) -> None:
    with torch.device("meta"):
        model = create_backbone(name, num_classes=1000, deploy=True)
        p, f = count_params(model) / 1e6, count_flops(model, 224) / 2e9
    assert abs(p - params_m) <= 0.02 * params_m, p
    assert abs(f - gmacs) <= tol, f


def test_constructor_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="kernel_size must be one of"):
        create_backbone("unireplknet_test", kernel_sizes=((3,), (13,), (13, 4), (13,)))
    with pytest.raises(ValueError, match="stage 2 has depth 2 but 1 kernel sizes"):
        create_backbone("unireplknet_test", kernel_sizes=((3,), (13,), (13,), (13,)))
    with pytest.raises(ValueError, match="small_kernel"):
        create_backbone("replknet_test", large_kernel_sizes=(3, 3, 3, 3))
    with pytest.raises(ValueError, match="num_classes=N"):
        create_backbone("replknet_test").get_classifier()


@pytest.mark.parametrize("chunk", [url.SQUARES_CHUNK, 16])  # one partial sum, or one per pixel row
def test_grn_matches_convnext_v2_formula(monkeypatch, chunk):
    """GRN: (gamma * N(x) + 1) * x + beta with N(x) = ||x||_2 over H, W / its mean over channels (ConvNeXt-V2)."""
    monkeypatch.setattr(url, "SQUARES_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 8, generator=g)  # NHWC
    grn = url.GlobalResponseNorm(8)
    with torch.no_grad():
        grn.gamma.copy_(torch.randn(1, 1, 1, 8, generator=g))
        grn.beta.copy_(torch.randn(1, 1, 1, 8, generator=g))
    gx = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
    want = (grn.gamma * (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)) + 1) * x + grn.beta
    assert torch.allclose(grn(x), want, atol=1e-6)
    x = x.clone()
    x[..., 3] = 0  # a dead channel: finite gradients, as with vector_norm
    x.requires_grad_(True)
    grn(x).sum().backward()
    assert torch.isfinite(x.grad).all()


# --- the block's layout-keeping forward against the official formulation ---------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_pointwise_conv_equals_linear_on_nhwc(channels_last: bool, batch: int) -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 8, generator=g), torch.randn(24, generator=g)
    for size in (4, 8):  # 16 pixels <= 24 outputs: x is scaled; 64 > 24: the weight is
        x = torch.randn(batch, 8, size, size, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        scale = torch.rand(batch, 8, generator=g) + 0.5
        for bias in (None, b):
            for s in (None, scale):
                xs = x if s is None else x * s[:, :, None, None]
                want = F.linear(xs.permute(0, 2, 3, 1), w, bias).permute(0, 3, 1, 2)
                before = x.clone()
                got = url.pointwise_conv(x, w, bias, s)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
                assert torch.equal(x, before)  # overwrite=False leaves the input alone
        y = x.clone()
        torch.testing.assert_close(url.pointwise_conv(y, w, b, scale, overwrite=True),
                                   url.pointwise_conv(x, w, b, scale), atol=1e-5, rtol=1e-5)


def official_block_forward(block: url.UniRepLKNetBlock, x: torch.Tensor) -> torch.Tensor:
    """The official block: SE on NCHW, then NHWC Linear -> GELU -> GRN (ConvNeXt-V2) -> Linear, BN, layer scale."""
    y = block.norm(block.dwconv(x))
    se = block.se
    y = y * torch.sigmoid(se.up(F.relu(se.down(F.adaptive_avg_pool2d(y, 1)))))
    y = F.gelu(block.pwconv1(y.permute(0, 2, 3, 1)))
    gx = torch.linalg.vector_norm(y, dim=(1, 2), keepdim=True)
    y = (block.grn.gamma * (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)) + 1) * y
    if block.grn.beta is not None:
        y = y + block.grn.beta
    y = block.pwconv2_bn(block.pwconv2(y).permute(0, 3, 1, 2))
    if block.gamma is not None:
        y = y * block.gamma.view(1, -1, 1, 1)
    return x + y


# inference by the CPU path (each of the candidates autotune picks from: "onednn" forces the first of
# each site, "onednn-second" the second, "mkl" the last) with the compiled GRN kernel or PyTorch's GRN,
# or by the general path
@pytest.mark.parametrize("path", ["onednn", "onednn-second", "mkl", "onednn-torch-grn", "general"])
@pytest.mark.parametrize("deploy", [False, True])
@pytest.mark.parametrize("kernel_size,size", [(3, 12), (13, 4), (13, 8)])  # maps above and below Cout pixels
def test_block_equals_the_official_formulation(monkeypatch, path: str, deploy: bool, kernel_size: int,
                                               size: int) -> None:
    onednn = path != "general"
    if not onednn:
        monkeypatch.setattr(url, "_ONEDNN_LINEAR", None)
    elif url._ONEDNN_LINEAR is None:
        pytest.skip("PyTorch built without oneDNN")
    if path == "onednn-torch-grn":
        monkeypatch.setenv("ARENA_SCAN_KERNEL", "torch")
    pick = {"onednn-second": 1, "mkl": -1}.get(path, 0)
    monkeypatch.setattr(autotune, "fastest", lambda key, runs, default: list(runs)[min(pick, len(runs) - 1)])
    block = randomize_(url.UniRepLKNetBlock(16, kernel_size, deploy=deploy)).eval()
    g = torch.Generator().manual_seed(1)
    for batch in (1, 2):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(batch, 16, size, size, generator=g).contiguous(memory_format=fmt)
            with torch.no_grad():
                assert url.fused_inference(block, x) == onednn
                want = official_block_forward(block, x)
                before = x.clone()
                got = block(x)  # in place on its own intermediates only
                assert torch.equal(x, before)
            assert_same_outputs([want], [got], rel=1e-5)
            # inference by oneDNN answers channels-last; otherwise the residual keeps x's format (one image: either)
            out_fmt = torch.channels_last if onednn else fmt
            assert got.is_contiguous(memory_format=out_fmt) or (batch == 1 and not onednn)
            xg = x.clone().requires_grad_(True)
            assert not url.fused_inference(block, xg)
            out = block(xg)  # with autograd: the general path, out of place
            assert_same_outputs([want], [out.detach()], rel=1e-5)
            assert out.is_contiguous(memory_format=fmt) or batch == 1
            out.sum().backward()
            assert torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 4, 4, 64), (3, 5, 7, 37), (2, 9, 9, 130)])  # full and partial channel blocks
def test_compiled_grn_equals_the_module(shape: tuple[int, ...], threads: int, gelu: bool, bias: bool,
                                        set_threads) -> None:
    lib = scan_cpu.kernel()
    if lib is None:
        pytest.skip("no C compiler for the compiled kernels")
    g = torch.Generator().manual_seed(0)
    grn = url.GlobalResponseNorm(shape[-1], bias=False)
    grn.gamma.data = torch.randn(grn.gamma.shape, generator=g)
    x = torch.randn(shape, generator=g)
    x[0, ..., 1] = 0.0  # an all-zero channel: scale 1, no NaN
    b = torch.randn(shape[-1], generator=g) if bias else None
    pre = x if b is None else x + b
    want = grn(F.gelu(pre) if gelu else pre).detach()
    set_threads(threads)
    got = x.clone()
    assert scan_cpu.grn_(lib, got, grn.gamma.detach(), bias=b, gelu=gelu) is got  # in place
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        scan_cpu.grn_(lib, x.permute(0, 2, 1, 3), grn.gamma.detach())
    with pytest.raises(ValueError, match="bias fp32"):
        scan_cpu.grn_(lib, x.clone(), grn.gamma.detach(), bias=torch.zeros(shape[-1] + 1))


def test_compiled_gelu_is_as_accurate_as_pytorchs() -> None:
    """GRN with gamma 0 is the identity, so grn_(gelu=True) shows the compiled GELU alone: against the exact
    GELU in fp64 it errs no more than PyTorch's own (both about 2e-7 of max(|x|, 1)); far tails are x and 0."""
    lib = scan_cpu.kernel()
    if lib is None:
        pytest.skip("no C compiler for the compiled kernels")
    x = torch.linspace(-12, 12, 240_001)
    got = scan_cpu.grn_(lib, x.clone().view(1, -1, 1), torch.zeros(1), gelu=True).view(-1).double()
    exact = 0.5 * x.double() * torch.special.erfc(-x.double() / math.sqrt(2))
    scale = x.double().abs().clamp(min=1)
    err, torch_err = ((got - exact).abs() / scale).max().item(), ((F.gelu(x).double() - exact).abs() / scale).max().item()
    assert err < 3e-7 and torch_err < 3e-7, (err, torch_err)
    special = torch.tensor([1e18, -1e18, 7.0, -7.0, 0.0, float("nan")])  # one image each (GRN per image)
    out = scan_cpu.grn_(lib, special.clone().view(-1, 1, 1), torch.zeros(1), gelu=True).view(-1)
    assert out[:5].tolist() == F.gelu(special[:5]).tolist() == [special[0].item(), 0.0, 7.0, 0.0, 0.0]
    assert out[5].isnan()


def test_packed_conv_is_the_conv_and_follows_its_weight() -> None:
    """The stem's and downsamples' convs in inference, with oneDNN weights reordered once per weight version
    and input shape: the same output as the module in either input layout, and again after an update."""
    if url._ONEDNN_CONV is None:
        pytest.skip("PyTorch built without oneDNN")
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(24, 48, 3, stride=2, padding=1)
    for fmt in (torch.channels_last, torch.contiguous_format):
        for shape in ((1, 24, 14, 14), (3, 24, 9, 9)):
            x = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
            with torch.no_grad():
                assert_same_outputs([conv(x)], [url.packed_conv(conv, x)], rel=1e-5)
                conv.weight.add_(1.0)  # as an optimizer step: the next call reorders the new weight
                assert_same_outputs([conv(x)], [url.packed_conv(conv, x)], rel=1e-5)


def test_inference_path_is_counted_like_the_general_one(monkeypatch) -> None:
    """The oneDNN GEMMs of inference have a FLOP formula: ``count_flops`` (no autograd, so that path) agrees."""
    if url._ONEDNN_LINEAR is None:
        pytest.skip("PyTorch built without oneDNN")
    model = create_backbone("unireplknet_test", deploy=True)
    fused = count_flops(model, 64, batch_size=2)
    monkeypatch.setattr(url, "_ONEDNN_LINEAR", None)
    assert fused == count_flops(model, 64, batch_size=2) > 0


def test_each_stage_runs_in_one_memory_format() -> None:
    """With autograd each stage keeps its format (NCHW where a 5-13 kernel is); inference runs channels-last."""
    model = create_backbone("unireplknet_test", deploy=True).eval()  # kernels (3,), (13,), (13, 3), (13,)
    assert model.stage_formats == (torch.channels_last,) + (torch.contiguous_format,) * 3
    seen = []
    for i, stage in enumerate(model.stages):
        for block in stage:
            block.register_forward_pre_hook(lambda m, inp, i=i: seen.append((i, inp[0].is_contiguous(
                memory_format=model.stage_formats[i] if torch.is_grad_enabled() else torch.channels_last))))
    x = torch.randn(2, 3, 64, 64)
    model(x)
    with torch.no_grad():
        inference = model(x)
    assert len(seen) == 10 and all(ok for _, ok in seen)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in inference) or url._ONEDNN_LINEAR is None


