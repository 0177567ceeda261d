"""Vim and VMamba: feature contract, official checkpoint layouts, position embeddings, sizes, training."""
from __future__ import annotations

import math

import pytest
import torch

from arena.bench import count_flops, count_params
from backbones import create_backbone, vim, vmamba
from backbones.ops import scan_cpu
from backbones.ops.selective_scan import selective_scan_ref
from backbones.vim import resize_mid_cls_pos_embed


# --- the official key layouts, written out from the hustvl/Vim and MzeroMiko/VMamba model code ------------------
def official_vim_layout(dim: int, depth: int, d_state: int = 16, grid: int = 14, num_classes: int = 1000,
                        d_conv: int = 4) -> dict[str, tuple[int, ...]]:
    di, r = 2 * dim, math.ceil(dim / 16)
    keys = {"patch_embed.proj.weight": (dim, 3, 16, 16), "patch_embed.proj.bias": (dim,),
            "pos_embed": (1, grid * grid + 1, dim), "cls_token": (1, 1, dim), "norm_f.weight": (dim,),
            "head.weight": (num_classes, dim), "head.bias": (num_classes,)}
    for i in range(depth):
        p = f"layers.{i}."
        keys[p + "norm.weight"] = (dim,)
        keys[p + "mixer.in_proj.weight"] = (2 * di, dim)
        keys[p + "mixer.out_proj.weight"] = (dim, di)
        for s in ("", "_b"):
            keys[p + f"mixer.conv1d{s}.weight"] = (di, 1, d_conv)
            keys[p + f"mixer.conv1d{s}.bias"] = (di,)
            keys[p + f"mixer.x_proj{s}.weight"] = (r + 2 * d_state, di)
            keys[p + f"mixer.dt_proj{s}.weight"] = (di, r)
            keys[p + f"mixer.dt_proj{s}.bias"] = (di,)
        keys[p + "mixer.A_log"] = keys[p + "mixer.A_b_log"] = (di, d_state)
        keys[p + "mixer.D"] = keys[p + "mixer.D_b"] = (di,)
    return keys


def official_vmamba_layout(dim: int, depths: tuple[int, ...], d_state: int = 1, ssm_ratio: float = 2.0,
                           num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    keys = {"patch_embed.0.weight": (dim // 2, 3, 3, 3), "patch_embed.0.bias": (dim // 2,),
            "patch_embed.2.weight": (dim // 2,), "patch_embed.2.bias": (dim // 2,),
            "patch_embed.5.weight": (dim, dim // 2, 3, 3), "patch_embed.5.bias": (dim,),
            "patch_embed.7.weight": (dim,), "patch_embed.7.bias": (dim,)}
    for i, depth in enumerate(depths):
        c = dim * 2 ** i
        di, r = int(ssm_ratio * c), math.ceil(c / 16)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            keys.update({
                p + "norm.weight": (c,), p + "norm.bias": (c,),
                p + "op.in_proj.weight": (di, c), p + "op.conv2d.weight": (di, 1, 3, 3),
                p + "op.x_proj_weight": (4, r + 2 * d_state, di), p + "op.dt_projs_weight": (4, di, r),
                p + "op.dt_projs_bias": (4, di), p + "op.A_logs": (4 * di, d_state), p + "op.Ds": (4 * di,),
                p + "op.out_norm.weight": (di,), p + "op.out_norm.bias": (di,), p + "op.out_proj.weight": (c, di),
                p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,),
            })
        if i + 1 < len(depths):
            keys.update({f"layers.{i}.downsample.1.weight": (2 * c, c, 3, 3), f"layers.{i}.downsample.1.bias": (2 * c,),
                         f"layers.{i}.downsample.3.weight": (2 * c,), f"layers.{i}.downsample.3.bias": (2 * c,)})
    c = dim * 2 ** (len(depths) - 1)
    keys.update({"classifier.norm.weight": (c,), "classifier.norm.bias": (c,),
                 "classifier.head.weight": (num_classes, c), "classifier.head.bias": (num_classes,)})
    return keys


def _random_state(layout: dict[str, tuple[int, ...]], device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: (0.02 * torch.randn(s, generator=g) if device == "cpu" else torch.empty(s, device=device))
            for k, s in layout.items()}


FULL_LAYOUTS = [
    ("vim_tiny", lambda nc: official_vim_layout(192, 24, num_classes=nc)),
    ("vim_small", lambda nc: official_vim_layout(384, 24, num_classes=nc)),
    ("vim_base", lambda nc: official_vim_layout(768, 24, num_classes=nc)),
    ("vmamba_tiny", lambda nc: official_vmamba_layout(96, (2, 2, 5, 2), num_classes=nc)),
    ("vmamba_tiny_s1l8", lambda nc: official_vmamba_layout(96, (2, 2, 8, 2), ssm_ratio=1.0, num_classes=nc)),
    ("vmamba_small", lambda nc: official_vmamba_layout(96, (2, 2, 15, 2), num_classes=nc)),
    ("vmamba_base", lambda nc: official_vmamba_layout(128, (2, 2, 15, 2), num_classes=nc)),
]


@pytest.mark.parametrize("name,layout", FULL_LAYOUTS, ids=[n for n, _ in FULL_LAYOUTS])
@pytest.mark.parametrize("num_classes", [1000, 0])
def test_official_layout_matches_every_key_and_shape(name, layout, num_classes):
    with torch.device("meta"):
        model = create_backbone(name, num_classes=num_classes)
    module = vim if name.startswith("vim") else vmamba
    mapped = module.checkpoint_filter_fn(_random_state(layout(1000), "meta"), model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected


@pytest.mark.parametrize("name,layout,module", [
    ("vim_test", official_vim_layout(32, 2, d_state=4, grid=4), vim),
    ("vmamba_test", official_vmamba_layout(16, (1, 1, 1, 1)), vmamba),
])
def test_official_state_dict_loads_strictly(name, layout, module, tmp_path):
    state = _random_state(layout)
    model = create_backbone(name, num_classes=1000).eval()
    result = model.load_state_dict(module.checkpoint_filter_fn(state, model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    head = "head.weight" if module is vim else "classifier.head.weight"
    assert torch.equal(model.get_classifier().weight, state[head])
    logits = model.logits(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()

    backbone = create_backbone(name)  # num_classes=0: the classifier is dropped
    result = backbone.load_state_dict(module.checkpoint_filter_fn(state, backbone), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    from backbones._weights import load_pretrained  # the generic loader unwraps "model" / "model_ema"
    path = tmp_path / "official.pth"
    torch.save({"model_ema": state, "epoch": 300}, path)
    report = load_pretrained(create_backbone(name), str(path))
    assert report.ok


def _to_official_vmamba(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This model's keys written back in the official layout (the inverse of the family's renames)."""
    renames = (("patch_embed.conv1.", "patch_embed.0."), ("patch_embed.norm1.", "patch_embed.2."),
               ("patch_embed.conv2.", "patch_embed.5."), ("patch_embed.norm2.", "patch_embed.7."),
               (".downsample.conv.", ".downsample.1."), (".downsample.norm.", ".downsample.3."))
    out = {}
    for k, v in state.items():
        for ours, theirs in renames:
            k = k.replace(ours, theirs)
        out[k] = v
    return out


def test_vmamba_official_dense_checkpoint_loads_strictly_and_matches(tmp_path):
    """mmdet/mmseg's Backbone_VSSM: outnorm0-3 on every level, no classifier, under ``backbone.``."""
    from backbones._weights import load_pretrained

    source = create_backbone("vmamba_test", out_norm=True).eval()
    with torch.no_grad():
        for i in range(4):  # trained norms, so that a model without them computes something else
            getattr(source, f"outnorm{i}").weight.normal_(1, 0.5)
            getattr(source, f"outnorm{i}").bias.normal_(0, 0.5)
    official = {k: v for k, v in _to_official_vmamba(source.state_dict()).items() if not k.startswith("classifier.")}
    layout = {k: s for k, s in official_vmamba_layout(16, (1, 1, 1, 1)).items() if not k.startswith("classifier.")}
    layout.update({f"outnorm{i}.{p}": (16 * 2 ** i,) for i in range(4) for p in ("weight", "bias")})
    assert {k: tuple(v.shape) for k, v in official.items()} == layout
    path = tmp_path / "upernet_vssm.pth"
    torch.save({"meta": {}, "state_dict": {**{f"backbone.{k}": v for k, v in official.items()},
                                           "decode_head.conv_seg.bias": torch.zeros(150)}}, path)

    model = create_backbone("vmamba_test", out_norm=True).eval()
    report = load_pretrained(model, str(path))
    assert report.ok
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), source(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out_norm=True"):
        load_pretrained(create_backbone("vmamba_test"), str(path))


def test_vmamba_classification_checkpoint_starts_a_dense_backbone(tmp_path):
    """As the official dense backbones start: the classification weights, fresh (identity) outnorms."""
    from backbones._weights import load_pretrained

    source = create_backbone("vmamba_test", num_classes=1000).eval()
    path = tmp_path / "vssm.pth"
    torch.save({"model": _to_official_vmamba(source.state_dict())}, path)
    model = create_backbone("vmamba_test", out_norm=True).eval()
    assert load_pretrained(model, str(path)).ok
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        levels = source.stage_outputs(x)
        for i, (a, b) in enumerate(zip(model(x), levels)):
            torch.testing.assert_close(a, getattr(model, f"outnorm{i}")(b), rtol=0, atol=0)
        torch.testing.assert_close(model.embed(x), source.embed(x), rtol=0, atol=0)


def test_vim_checkpoint_at_another_resolution_is_resized():
    layout = official_vim_layout(32, 2, d_state=4, grid=6)  # e.g. a 384 fine-tuned release, here 96 / 16
    state = _random_state(layout)
    model = create_backbone("vim_test")
    mapped = vim.checkpoint_filter_fn(state, model)
    assert mapped["pos_embed"].shape == model.pos_embed.shape
    assert torch.equal(mapped["pos_embed"][:, 8], state["pos_embed"][:, 18])  # the middle class entry is kept


def test_mid_cls_pos_embed_resize():
    grid = torch.arange(16.0).view(1, 16, 1).expand(1, 16, 3)
    pos = torch.cat([grid[:, :8], torch.full((1, 1, 3), -7.0), grid[:, 8:]], dim=1)  # 4x4 grid, class entry at 8
    same = resize_mid_cls_pos_embed(pos, (4, 4))
    assert torch.equal(same, pos)
    big = resize_mid_cls_pos_embed(pos, (6, 8))
    assert big.shape == (1, 49, 3)
    assert torch.equal(big[:, 24], torch.full((1, 3), -7.0))  # class entry in the new middle
    assert not (torch.cat([big[:, :24], big[:, 25:]], 1) == -7.0).any()
    constant = resize_mid_cls_pos_embed(torch.ones(1, 17, 3), (6, 8))
    assert torch.allclose(constant, torch.ones(1, 49, 3))


@pytest.mark.parametrize("name", ["vim_test", "vmamba_test"])
@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_features_follow_feature_info(name, size):
    model = create_backbone(name).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        feats, emb = model(x), model.embed(x)
    assert len(feats) == len(model.feature_info)
    for f, (c, s) in zip(feats, model.feature_info):
        assert f.shape == (2, c, size[0] // s, size[1] // s)
        assert torch.isfinite(f).all()
    assert emb.shape == (2, model.embed_dim)


def test_vim_single_level_and_pyramid():
    from backbones import as_pyramid

    model = create_backbone("vim_test")
    assert model.feature_info.strides == (16,) and model.family == "state-space"
    pyramid = as_pyramid(model)
    assert [tuple(f.shape[-2:]) for f in pyramid(torch.randn(1, 3, 64, 64))] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.randn(1, 3, 64, 72))


def test_vim_uses_both_directions_and_middle_cls():
    torch.manual_seed(0)
    model = create_backbone("vim_test").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        base = model.embed(x)
        model.layers[0].mixer.A_b_log.add_(1.0)  # only the backward-direction SSM changes
        assert not torch.allclose(model.embed(x), base)
        tokens, grid = model._forward_tokens(x)
        assert tokens.shape == (1, 17, 32) and torch.equal(tokens[:, 8], model.embed(x))


def test_vim_mixer_matches_conv1d_and_the_sequential_scan(monkeypatch):
    """BiMamba against the official "v2" forward written with nn.Conv1d on [B, C, L] and the reference scan."""
    import torch.nn.functional as F

    from backbones.ops.selective_scan import selective_scan_ref

    torch.manual_seed(0)
    mixer = create_backbone("vim_test").layers[0].mixer
    x = torch.randn(2, 9, mixer.in_proj.in_features)

    def reference(x: torch.Tensor) -> torch.Tensor:
        xz = mixer.in_proj(x).transpose(1, 2)
        outs = []
        for suffix, seq in (("", xz), ("_b", xz.flip(-1))):
            u, z = seq.chunk(2, dim=1)
            u = F.silu(getattr(mixer, "conv1d" + suffix)(u)[..., :u.shape[-1]])
            dt, B, C = getattr(mixer, "x_proj" + suffix)(u.transpose(1, 2)).split(
                [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
            dt_proj = getattr(mixer, "dt_proj" + suffix)
            A = -torch.exp(mixer.A_log if suffix == "" else mixer.A_b_log)
            y = selective_scan_ref(u, (dt @ dt_proj.weight.t()).transpose(1, 2), A, B.transpose(1, 2),
                                   C.transpose(1, 2), mixer.D if suffix == "" else mixer.D_b, z=z,
                                   delta_bias=dt_proj.bias, delta_softplus=True)
            outs.append(y if suffix == "" else y.flip(-1))
        return mixer.out_proj(((outs[0] + outs[1]) / 2).transpose(1, 2))

    results = []
    for fn, kernel in ((reference, "auto"), (mixer, "auto"), (mixer, "torch")):  # fused CPU path, then PyTorch's
        monkeypatch.setenv("ARENA_SCAN_KERNEL", kernel)
        mixer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad.clone() for p in mixer.parameters()])
    for result in results[1:]:
        for got, want in zip(result, results[0], strict=True):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dim", [37, 192])
def test_vim_rms_norm_kernel_matches_its_formula_and_gradients(monkeypatch, dim):
    """The fused RMSNorm (CPU fp32) against mamba_ssm's formula: output and both gradients, with a partial vector."""
    if scan_cpu.kernel() is None:
        pytest.skip("no fused CPU kernel here")
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 7, dim, generator=g) * 3, 1 + 0.1 * torch.randn(dim, generator=g)
    grad = torch.randn(3, 7, dim, generator=g)
    results = []
    for kernel in ("auto", "torch"):
        monkeypatch.setenv("ARENA_SCAN_KERNEL", kernel)
        norm = vim.RMSNorm(dim)
        norm.weight.data.copy_(w)
        leaf = x.clone().requires_grad_(True)
        y = norm(leaf)
        y.backward(grad)
        results.append((y.detach(), leaf.grad, norm.weight.grad))
    want = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5) * w
    assert torch.allclose(results[0][0], want, rtol=1e-6, atol=1e-6)
    for got, ref in zip(results[0], results[1]):
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_depthwise_conv_tokens_matches_conv1d_and_counts_its_flops(monkeypatch, kernel):
    """Every padding, a strided input view, 37 channels (two vectors and a partial one), C kernels and PyTorch."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from backbones.ops.token_conv import depthwise_conv_tokens

    monkeypatch.setenv("ARENA_SCAN_KERNEL", kernel)
    g = torch.Generator().manual_seed(0)
    c = 37
    wide, w, b = torch.randn(2, 9, 2 * c, generator=g), torch.randn(c, 4, generator=g), torch.randn(c, generator=g)
    for pad in range(4):
        grads = []
        for fn in (lambda x, w, b: depthwise_conv_tokens(x, w, b, pad=pad),
                   lambda x, w, b: F.conv1d(F.pad(x.transpose(1, 2), (pad, 0)), w[:, None], b, groups=c).transpose(1, 2)):
            leaves = [t.clone().requires_grad_(True) for t in (wide, w, b)]
            y = fn(leaves[0][..., c:], *leaves[1:])  # channels contiguous, tokens strided
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            grads.append([y.detach()] + [t.grad for t in leaves])
        for got, want in zip(*grads):
            assert torch.allclose(got, want, atol=1e-5), pad
    x = wide[..., :c]
    with FlopCounterMode(display=False) as counter:
        depthwise_conv_tokens(x, w, b, pad=3)
    assert counter.get_total_flops() == 2 * 2 * 9 * c * 4
    assert depthwise_conv_tokens(x.to("meta"), w.to("meta"), b.to("meta"), pad=1).shape == (2, 7, c)
    with pytest.raises(ValueError, match="at least k - pad tokens"):
        depthwise_conv_tokens(x[:, :2], w, b)
    with pytest.raises(ValueError, match=r"pad must be in \[0, k - 1\]"):
        depthwise_conv_tokens(x, w, b, pad=4)
    with pytest.raises(ValueError, match=r"weight \[C, k\]"):
        depthwise_conv_tokens(x, w[:5], b)


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_vmamba_cross_scan_routes(monkeypatch, kernel):
    """The route orders, and cross_merge as cross_scan's adjoint (each is the other's gradient), with the
    compiled one-pass reordering and in PyTorch."""
    monkeypatch.setenv("ARENA_SCAN_KERNEL", kernel)
    x = torch.arange(6.0).view(1, 2, 3, 1)  # a 2 x 3 map shared by the four routes
    routes = vmamba.cross_scan(x)[0, :, :, 0].t()
    assert routes.tolist() == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]
    assert torch.equal(vmamba.cross_merge(vmamba.cross_scan(x), 2, 3), 4 * x)
    assert torch.equal(vmamba.cross_scan(x[:, :, :, None].expand(1, 2, 3, 4, 1)), vmamba.cross_scan(x))
    per_route = torch.arange(24.0).view(1, 2, 3, 4, 1)  # route k reads its own channel slice
    assert vmamba.cross_scan(per_route)[0, :, 1, 0].tolist() == [1, 13, 5, 17, 9, 21]
    torch.manual_seed(0)
    x, ys = torch.randn(2, 3, 5, 19, requires_grad=True), torch.randn(2, 15, 4, 19, requires_grad=True)
    g_seq, g_map = torch.randn(2, 15, 4, 19), torch.randn(2, 3, 5, 19)
    (vmamba.cross_scan(x) * g_seq).sum().backward()
    (vmamba.cross_merge(ys, 3, 5) * g_map).sum().backward()
    rows, cols = g_seq[:, :, 0] + g_seq[:, :, 2].flip(1), g_seq[:, :, 1] + g_seq[:, :, 3].flip(1)
    assert torch.equal(x.grad, rows.view(2, 3, 5, 19) + cols.view(2, 5, 3, 19).transpose(1, 2))
    assert torch.equal(ys.grad, vmamba.cross_scan(g_map))


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_vmamba_inference_scans_routes_in_place(monkeypatch, size):
    """CPU inference mode scans each route through the map (no reordered copies) and gives the autograd
    path's levels within 1e-6 relative (only the order of the routes' sum differs)."""
    if scan_cpu.kernel() is None:
        pytest.skip("no fused CPU scan (no C compiler, or ARENA_SCAN_KERNEL=torch): nothing scans in place")
    calls, routes = [], vmamba.SS2D._scan_routes
    monkeypatch.setattr(vmamba.SS2D, "_scan_routes", lambda self, *a: calls.append(1) or routes(self, *a))
    torch.manual_seed(0)
    model = create_backbone("vmamba_test").eval()
    x = torch.randn(2, 3, *size)
    reference = model(x)  # autograd on: the differentiable path
    assert not calls
    with torch.inference_mode():
        levels = model(x)
    assert len(calls) == 4
    for got, want in zip(levels, reference):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def official_ss2d(op: vmamba.SS2D, x: torch.Tensor) -> torch.Tensor:
    """SS2D as the official ``v05_noz`` forward computes it, channels-first: the four routes stacked as
    [B, 4, D, L], per-route x / dt projections by einsum, the sequential reference scan, routes summed."""
    x = torch.nn.functional.silu(op.conv2d(torch.einsum("bchw,dc->bdhw", x, op.in_proj.weight)))
    b, d, h, w = x.shape
    rows, cols = x.flatten(2), x.transpose(2, 3).flatten(2)
    xs = torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)
    dt, B, C = torch.einsum("bkdl,kcd->bkcl", xs, op.x_proj_weight).split([op.dt_rank, op.d_state, op.d_state], 2)
    dt = torch.einsum("bkrl,kdr->bkdl", dt, op.dt_projs_weight)
    ys = selective_scan_ref(xs.flatten(1, 2), dt.flatten(1, 2), -torch.exp(op.A_logs), B, C, op.Ds,
                            delta_bias=op.dt_projs_bias.flatten(), delta_softplus=True).view(b, 4, d, h * w)
    rows, cols = ys[:, 0] + ys[:, 2].flip(-1), ys[:, 1] + ys[:, 3].flip(-1)
    y = rows.view(b, d, h, w) + cols.view(b, d, w, h).transpose(2, 3)
    y = torch.nn.functional.layer_norm(y.permute(0, 2, 3, 1), (d,), op.out_norm.weight, op.out_norm.bias)
    return torch.einsum("bhwd,cd->bchw", y, op.out_proj.weight)


@pytest.mark.parametrize("channels_last", [False, True])
def test_vmamba_ss2d_matches_the_official_formulation(channels_last):
    torch.manual_seed(0)
    op = vmamba.SS2D(16, d_state=2)
    x = torch.randn(2, 16, 5, 7)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    xr = x.detach().clone().requires_grad_(True)
    x.requires_grad_(True)
    y, y_ref = op(x), official_ss2d(op, xr)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *op.parameters()], g)
    grads_ref = torch.autograd.grad(y_ref, [xr, *op.parameters()], g)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_vmamba_route_dt_is_the_per_route_einsum_and_its_gradient():
    torch.manual_seed(0)
    proj = torch.randn(2, 15, 4, 9, dtype=torch.float64, requires_grad=True)  # dt is a view: [..., :R] of it
    weight = torch.randn(4, 11, 6, dtype=torch.float64, requires_grad=True)
    route_dt = lambda p, w: vmamba._RouteDt.apply(p[..., :6], w)  # noqa: E731
    torch.testing.assert_close(route_dt(proj, weight), torch.einsum("blkr,kdr->blkd", proj[..., :6], weight))
    assert torch.autograd.gradcheck(route_dt, (proj, weight))


@pytest.mark.parametrize("name,params_m,tolerance", [
    ("vim_tiny", 7, 0.025), ("vim_small", 26, 0.02), ("vim_base", 98, 0.02),
    ("vmamba_tiny", 30, 0.025), ("vmamba_tiny_s1l8", 30, 0.025), ("vmamba_small", 50, 0.02), ("vmamba_base", 89, 0.02),
])
def test_parameter_counts_match_the_papers(name, params_m, tolerance):
    """Papers count the 1000-class head; they round (Vim-Ti 7.15M -> "7M", VMamba-T 30.7M -> "30M")."""
    with torch.device("meta"):
        model = create_backbone(name, num_classes=1000)
    assert abs(count_params(model) / 1e6 - params_m) / params_m < tolerance


def test_vmamba_tiny_flops_include_the_scan():
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = create_backbone("vmamba_tiny", num_classes=1000)
        with FlopCounterMode(display=False) as counter:
            model.logits(torch.zeros(1, 3, 224, 224))
    assert abs(count_flops(model, 224) / 2 / 4.9e9 - 1) < 0.10  # the paper's 4.9G multiply-adds
    scan = counter.get_flop_counts()["Global"][torch.ops.backbone_arena.selective_scan]
    # per stage: blocks x 4 routes x d_inner x tokens x (9 d_state + 1 for D) multiply-adds, d_state = 1
    expected = sum(depth * 4 * (2 * 96 * 2 ** i) * (56 // 2 ** i) ** 2 * 10 for i, depth in enumerate((2, 2, 5, 2)))
    assert scan == 2 * expected


@pytest.mark.parametrize("name", ["vim_test", "vmamba_test"])
def test_trains_at_64(name):
    model = create_backbone(name, num_classes=3, drop_path_rate=0.1).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    loss = torch.nn.functional.cross_entropy(model.logits(x), y)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    opt.step()
    assert torch.isfinite(torch.nn.functional.cross_entropy(model.logits(x), y))


@pytest.mark.parametrize("name", ["vim_tiny", "vmamba_tiny"])
def test_builds_and_runs_on_meta(name):
    with torch.device("meta"):
        model = create_backbone(name)
        feats = model(torch.zeros(1, 3, 320, 256))
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 320 // s, 256 // s) for c, s in model.feature_info]


@pytest.mark.parametrize("name", ["vim_test", "vmamba_test"])
def test_bf16_autocast_close_to_fp32(name):
    torch.manual_seed(0)
    model = create_backbone(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.embed(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.embed(x)
    assert torch.isfinite(low).all()
    assert torch.nn.functional.cosine_similarity(low.float(), ref, dim=1).min() > 0.99
    model.train()  # a bf16-mixed training step (Lightning's precision=bf16-mixed on CPU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sum(f.float().mean() for f in model(x))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("thin", [True, False])  # projections by thin_matmul, or (too wide for it) by BLAS
@pytest.mark.parametrize("block", [vim.STREAM_BLOCK, 5, 2])
def test_vim_streamed_inference_matches_autograd_path(monkeypatch, block, thin):
    """CPU inference mode streams blocks of tokens (2 < the conv context of 3) and gives the same tokens."""
    if scan_cpu.kernel() is None:
        pytest.skip("no fused CPU scan (no C compiler, or ARENA_SCAN_KERNEL=torch): nothing streams")
    monkeypatch.setattr(vim, "STREAM_BLOCK", block)
    if not thin:
        monkeypatch.setattr(scan_cpu, "THIN_VECTORS", 0)
    calls, stream = [], vim.BiMamba.stream_
    monkeypatch.setattr(vim.BiMamba, "stream_", lambda self, *a: calls.append(1) or stream(self, *a))
    torch.manual_seed(0)
    model = create_backbone("vim_test").eval()
    x = torch.randn(2, 3, 64, 48)  # 12 patch tokens + the class token: blocks of 5 leave a part block
    reference, _ = model._forward_tokens(x)  # autograd on: the whole-sequence path
    with torch.no_grad():  # FLOP counting runs here: the plain path, whose scan is one counted op
        plain, _ = model._forward_tokens(x)
    assert not calls and torch.allclose(plain, reference, atol=1e-6)
    with torch.inference_mode():
        streamed, _ = model._forward_tokens(x)
    assert len(calls) == len(model.layers)
    assert (streamed - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_vim_flops_are_counted_whichever_scan_runs(monkeypatch):
    """FLOP counting (eval, no_grad) sees the scan and conv ops with their formulas, with the fused kernels on or off."""
    from arena.bench import count_flops

    model = create_backbone("vim_test")
    counts = []
    for kernel in ("auto", "torch"):
        monkeypatch.setenv("ARENA_SCAN_KERNEL", kernel)
        counts.append(count_flops(model, 64))
    assert counts[0] == counts[1] > 0
    monkeypatch.setenv("ARENA_SCAN_KERNEL", "auto")
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, 64, 64))
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert any("selective_scan" in op for op in ops) and any("depthwise_conv_tokens" in op for op in ops)
