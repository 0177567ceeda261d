"""Vision Mamba (Vim): a plain stack of bidirectional Mamba blocks over 16x16 patches.

Paper: "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space
Model" (Zhu et al., ICML 2024); official code hustvl/Vim (``vim/models_mamba.py`` and its
``mamba-1p1p1`` fork of ``mamba_ssm``). The released models are followed: "v2" bidirectional
blocks (the backward direction has its own conv1d / x_proj / dt_proj / A / D, in_proj and
out_proj are shared, the two directions are averaged), RMSNorm with the residual stream kept in
fp32, the class token inserted in the middle of the sequence, an absolute position embedding
(resized here when the input size changes). The selective scan is the pure-PyTorch op in
``backbones.ops.selective_scan``, so no CUDA build is needed.

The model has one level, the patch grid at stride 16 after the final norm (dense heads wrap it
with ``as_pyramid``); ``embed(x)`` is the class token after the final norm, as in the paper.

Inference on CPU (eval mode under ``torch.inference_mode``, the fused CPU scan available; FLOP
counting under ``no_grad`` sees the plain path) streams each block over the tokens, ``STREAM_BLOCK`` (512) at a time, and adds its result to the residual stream in place: a
forward pass keeps only the forward direction's scan output, a backward pass recomputes the
block's input projection (not the last block's, kept whole) and finishes it, and every scan
carries its state from block to block.
A layer then holds the residual stream and that scan output (3 + 6 MB at 1024 x 1024 for Vim-Ti)
instead of every projection of every token, and the same numbers come out
(``tests/test_state_space.py``).

>>> from backbones import create_backbone
>>> model = create_backbone("vim_test")
>>> [tuple(f.shape) for f in model(torch.zeros(1, 3, 64, 64))], tuple(model.embed(torch.zeros(1, 3, 64, 64)).shape)
([(1, 32, 4, 4)], (1, 32))
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, resample_abs_pos_embed, trunc_normal_
from torch import nn

from ._features import Backbone, FeatureInfo, pretrained_cfg_for
from ._registry import register_backbone
from .ops import autotune, scan_cpu
from .ops.derived import derived
from .ops.selective_scan import init_a_log, init_dt_bias, selective_scan
from .ops.token_conv import depthwise_conv_tokens

STREAM_BLOCK = 512  # tokens per step of streamed inference


class _RMSNormCPU(torch.autograd.Function):
    """RMSNorm by the fused CPU kernels: one pass per row forward and one backward (the formula's autograd
    graph is six elementwise passes forward and more backward)."""

    @staticmethod
    def forward(ctx, lib, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = scan_cpu.rms_norm(lib, x, weight, eps)
        ctx.lib = lib
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        return None, *scan_cpu.rms_norm_backward(ctx.lib, grad, x, weight, rstd), None


class RMSNorm(nn.Module):
    """Root-mean-square norm with a weight and no bias (``mamba_ssm``'s), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = scan_cpu.kernel_for(x) if self.weight.dtype == torch.float32 else None
        if lib is not None:
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return _RMSNormCPU.apply(lib, x, self.weight, self.eps)
            return scan_cpu.rms_norm(lib, x, self.weight, self.eps)[0]  # no autograd: the kernel alone
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def _conv_taps(taps: torch.Tensor, backward: bool) -> tuple[torch.Tensor, int]:
    """One direction's conv taps over time-major tokens and its padding: causal forward, anti-causal backward."""
    return (taps.flip(-1), 0) if backward else (taps, taps.shape[-1] - 1)


def _direction_inputs(lib, x: torch.Tensor, backward: bool, taps: torch.Tensor, conv_bias: torch.Tensor,
                      w_x: torch.Tensor, w_dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction's scan inputs from ``x`` [B, L, d_inner]: u = silu(conv(x)), the x_proj output, dt (before
    its bias)."""
    direction_taps, pad = _conv_taps(taps, backward)
    u = scan_cpu.token_conv(lib, x, direction_taps, conv_bias, pad=pad, length=x.shape[1], silu=True)
    return u, *_projections(u, w_x, w_dt)


def _projections(u: torch.Tensor, w_x: torch.Tensor, w_dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The x_proj output [B, L, dt_rank + 2 * d_state] of the conv output ``u`` and dt (before its bias)."""
    xdbl = _tokens_matmul(u, w_x.t())
    return xdbl, _tokens_matmul(xdbl[..., :w_dt.shape[1]], w_dt.t())


def _tokens_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` for tokens ``x`` [B, L, k] and ``w`` [k, n], one GEMM as ``autotune.matmul`` runs it fastest: the
    x and dt projections are thin (n or k 12-44), where which way round MKL takes a product matters."""
    return autotune.matmul(x.flatten(0, 1), w).view(*x.shape[:-1], w.shape[1])


def _b_c(xdbl: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B and C as [B, L, 1, d_state] views of the x_proj output [B, L, rank + 2 * d_state]."""
    n = (xdbl.shape[-1] - rank) // 2
    return xdbl[..., None, rank:rank + n], xdbl[..., None, rank + n:]


class _BiScan(torch.autograd.Function):
    """Both directions of ``BiMamba`` on fp32 CPU tensors by the fused kernels: time-major ``xz`` [B, L, 2 * d_inner]
    -> the directions' average, gated: (y_forward + y_backward) / 2 * silu(z), [B, L, d_inner].

    The same arithmetic as ``BiMamba._scan`` twice, without its copies: the backward direction's
    conv reads the tokens after each one and its scan runs from the last token to the first in
    place (no flipped copies), both scans write one sum, and the backward pass writes the
    gradient of ``xz`` in one tensor; the gate is a fused kernel too, and each direction's conv
    + SiLU gradients (input, taps, bias) come from one pass. Saved: each direction's conv output,
    x_proj output and dt, and the ungated sum; the conv's pre-activation is recomputed.
    """

    @staticmethod
    def forward(ctx, lib, xz: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        d = xz.shape[-1] // 2
        x, z = xz[..., :d], xz[..., d:]
        total = torch.empty_like(x)
        saved = []
        for backward, (taps, conv_bias, w_x, w_dt, dt_bias, A_log, D) in enumerate((params[:7], params[7:])):
            u, xdbl, dt = _direction_inputs(lib, x, bool(backward), taps, conv_bias, w_x, w_dt)
            B, C = _b_c(xdbl, w_dt.shape[1])
            scan_cpu.scan(lib, u, dt, -torch.exp(A_log), B, C, x.new_zeros(x.shape[0], B.shape[-1], d), D=D,
                          delta_bias=dt_bias, delta_softplus=True, reverse=bool(backward), out=total,
                          accumulate=bool(backward))
            saved += [u, xdbl, dt]
        ctx.lib = lib
        ctx.save_for_backward(xz, total, *saved, *params)
        return scan_cpu.gate(lib, total, z, scale=0.5)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xz, total, *rest = ctx.saved_tensors
        saved, params = rest[:6], rest[6:]
        lib, d = ctx.lib, xz.shape[-1] // 2
        x, z = xz[..., :d], xz[..., d:]
        grad_xz = torch.empty_like(xz)
        g = scan_cpu.gate_backward(lib, grad, total, z, grad_xz[..., d:], scale=0.5)  # each direction's output's
        grads = []
        for backward, (taps, conv_bias, w_x, w_dt, dt_bias, A_log, D) in enumerate((params[:7], params[7:])):
            u, xdbl, dt = saved[3 * backward:3 * backward + 3]
            B, C = _b_c(xdbl, w_dt.shape[1])
            A = -torch.exp(A_log)
            s = scan_cpu.scan_backward(lib, g, u, dt, A, B, C, D=D, delta_bias=dt_bias, delta_softplus=True,
                                       reverse=bool(backward))
            rank = w_dt.shape[1]
            grad_xdbl = torch.cat([_tokens_matmul(s["delta"], w_dt), s["B"][:, :, 0], s["C"][:, :, 0]], dim=-1)
            grad_w_dt = autotune.matmul(s["delta"].flatten(0, 1).t(), xdbl[..., :rank].flatten(0, 1))
            grad_u = s["u"]  # x_proj's part added in place by the GEMM (1.5x a product then an add, at Vim-Ti's shapes)
            grad_u.view(-1, d).addmm_(grad_xdbl.flatten(0, 1), w_x)
            grad_w_x = autotune.matmul(grad_xdbl.flatten(0, 1).t(), u.flatten(0, 1))
            direction_taps, pad = _conv_taps(taps, bool(backward))
            _, grad_taps, grad_conv_bias = scan_cpu.token_conv_backward(  # x's gradient: both directions' summed
                lib, x, direction_taps, grad_u, pad=pad, silu_bias=conv_bias, out=grad_xz[..., :d],
                accumulate=bool(backward))
            grads += [grad_taps.flip(-1) if backward else grad_taps, grad_conv_bias, grad_w_x, grad_w_dt,
                      s["delta_bias"], s["A"] * A, s["D"]]
        return None, grad_xz, *grads


class _Direction(NamedTuple):
    """One scan direction's own modules and parameters in ``BiMamba``."""
    conv: nn.Conv1d
    x_proj: nn.Linear
    dt_proj: nn.Linear
    A_log: nn.Parameter
    D: nn.Parameter


class BiMamba(nn.Module):
    """Mamba mixer scanning the sequence both ways ("v2"): shared in/out projections, per-direction SSMs.

    Parameter names are the official ones; the backward direction's carry a ``_b`` suffix.
    """

    def __init__(self, dim: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> None:
        super().__init__()
        self.d_inner = expand * dim
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        for suffix in ("", "_b"):
            setattr(self, "conv1d" + suffix, nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                                        padding=d_conv - 1))
            setattr(self, "x_proj" + suffix, nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            dt_proj = nn.Linear(self.dt_rank, self.d_inner)
            nn.init.uniform_(dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            with torch.no_grad():
                dt_proj.bias.copy_(init_dt_bias(self.d_inner))
            setattr(self, "dt_proj" + suffix, dt_proj)
        self.A_log = nn.Parameter(init_a_log(self.d_inner, d_state))
        self.A_b_log = nn.Parameter(init_a_log(self.d_inner, d_state))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D_b = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def _parts(self, suffix: str) -> _Direction:
        """The forward (``""``) or backward (``"_b"``) direction's modules and parameters (official names:
        ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log``, ``D_b``)."""
        backward = suffix == "_b"
        return _Direction(getattr(self, "conv1d" + suffix), getattr(self, "x_proj" + suffix),
                          getattr(self, "dt_proj" + suffix), self.A_b_log if backward else self.A_log,
                          self.D_b if backward else self.D)

    def _ssm_inputs(self, u: torch.Tensor, suffix: str) -> tuple[torch.Tensor, ...]:
        """One direction's scan inputs from time-major ``u`` [B, T, d_inner]: dt (before its bias), B, C, A, D, dt bias."""
        p = self._parts(suffix)
        dt, B, C = p.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, p.dt_proj.weight), B, C, -torch.exp(p.A_log.float()), p.D.float(), p.dt_proj.bias.float()

    def _scan(self, xz: torch.Tensor, suffix: str) -> torch.Tensor:
        """One direction on time-major [B, L, 2 * d_inner]: causal depthwise conv, SiLU, selective scan gated by z.

        Returns [B, d_inner, L] (a view of time-major memory)."""
        x, z = xz.split(self.d_inner, dim=-1)
        conv = self._parts(suffix).conv
        u = F.silu(depthwise_conv_tokens(x, conv.weight[:, 0], conv.bias, pad=conv.kernel_size[0] - 1))
        dt, B, C, A, D, dt_bias = self._ssm_inputs(u, suffix)
        return selective_scan(u.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D,
                              z=z.transpose(1, 2), delta_bias=dt_bias, delta_softplus=True)

    def _bi_scan_params(self, suffix: str) -> tuple[nn.Parameter | torch.Tensor, ...]:
        """One direction's parameters as ``_BiScan`` takes them: conv taps and bias, x_proj, dt_proj, dt bias, A_log, D."""
        p = self._parts(suffix)
        return p.conv.weight[:, 0], p.conv.bias, p.x_proj.weight, p.dt_proj.weight, p.dt_proj.bias, p.A_log, p.D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(x)  # [B, L, 2 * d_inner]
        # training on CPU: the fused kernels (under no_grad, as FLOP counting runs, the ops that count themselves)
        lib = scan_cpu.kernel_for(xz) if torch.is_grad_enabled() and self.d_state <= scan_cpu.MAX_STATE else None
        if lib is not None:
            return self.out_proj(_BiScan.apply(lib, xz, *self._bi_scan_params(""), *self._bi_scan_params("_b")))
        y = (self._scan(xz, "") + self._scan(xz.flip(1), "_b").flip(-1)) / 2
        return self.out_proj(y.transpose(1, 2))

    def _kernel_constants(self, lib, suffix: str) -> tuple[torch.Tensor | None, ...]:
        """One direction's constant inputs of the fused kernels, fp32 in the layouts they read: conv taps
        [d_inner, d_conv] (reversed for ``_b``, whose conv reads the tokens after), conv bias, A [d_inner,
        d_state] (views of contiguous [d_conv, d_inner] and [d_state, d_inner]), D, dt bias, x_proj's weight
        for ``scan_cpu.thin_matmul`` (None where its output is too wide for it) and dt_proj's transposed
        [dt_rank, d_inner]. Derived once per version of the parameters: streamed inference would otherwise
        recompute them in every block."""
        conv, x_proj, dt_proj, A_log, D = self._parts(suffix)

        def build() -> tuple[torch.Tensor | None, ...]:
            with torch.no_grad():
                taps = conv.weight[:, 0].float()
                taps = (taps if suffix == "" else taps.flip(-1)).t().contiguous().t()
                A = (-torch.exp(A_log.float())).t().contiguous().t()
                thin = scan_cpu.thin_fits(lib, x_proj.out_features)
                return (taps, conv.bias.float().contiguous(), A, D.float().contiguous(),
                        dt_proj.bias.float().contiguous(), scan_cpu.thin_weight(lib, x_proj.weight) if thin else None,
                        dt_proj.weight.float().t().contiguous())

        sources = (conv.weight, conv.bias, A_log, D, dt_proj.bias, x_proj.weight, dt_proj.weight)
        return derived(self, "kernel" + suffix, sources, build)

    def _scan_tokens(self, lib, x: torch.Tensor, suffix: str, h: torch.Tensor, *, pad: int, length: int,
                     **scan_kwargs) -> torch.Tensor:
        """One direction on ``length`` time-major tokens, read from the view ``x`` [B, T, d_inner] in place.

        Forward: the causal conv reads the d_conv - 1 tokens before the block (``pad`` of them
        missing at the start of the sequence), and the scan runs from ``h``; backward (``_b``): the
        anti-causal conv reads those after it (missing ones are zeros) and the scan runs from the
        last token to the first. ``h`` is updated to the state leaving the block; ``scan_kwargs``
        go to ``scan_cpu.scan`` (``out``, ``z``, ``accumulate``).
        """
        taps, conv_bias, A, D, dt_bias, x_proj_t, dt_proj_t = self._kernel_constants(lib, suffix)
        u = scan_cpu.token_conv(lib, x, taps, conv_bias, pad=pad, length=length, silu=True)
        if x_proj_t is None:
            xdbl, dt = _projections(u, self._parts(suffix).x_proj.weight, dt_proj_t.t())
        else:  # both projections by the kernel for thin outputs, in one pass over the tokens
            xdbl, dt = scan_cpu.thin_matmul(lib, u, x_proj_t, self.dt_rank + 2 * self.d_state, then=dt_proj_t)
        return scan_cpu.scan(lib, u, dt, A, *_b_c(xdbl, self.dt_rank), h, D=D, delta_bias=dt_bias,
                             delta_softplus=True, reverse=suffix == "_b", **scan_kwargs)

    def stream_(self, lib, residual: torch.Tensor, norm: nn.Module) -> None:
        """``residual += forward(norm(residual))`` in inference mode, ``STREAM_BLOCK`` tokens at a time.

        The forward direction runs first over the blocks and keeps its (gate-free) scan output;
        the backward direction then runs from the last block to the first, recomputing each
        block's input projection (but the last one's, which the forward direction keeps whole),
        adds the forward output and gates the sum in the same pass, and the block's result goes
        into the residual stream in place.
        The raw residual of the d_conv - 1 tokens after a block (its backward conv context) is
        kept aside before those tokens are updated.
        """
        b, L, _ = residual.shape
        ctx = self.conv1d.kernel_size[0] - 1
        w_x = self.in_proj.weight[:self.d_inner]
        forward = residual.new_empty(b, L, self.d_inner, dtype=torch.float32)
        h = residual.new_zeros(b, self.d_state, self.d_inner, dtype=torch.float32)
        blocks = [(t0, min(t0 + STREAM_BLOCK, L)) for t0 in range(0, L, STREAM_BLOCK)]
        for t0, t1 in blocks:  # forward direction, first block first
            lo = max(t0 - ctx, 0)
            # the last block's whole projection is kept: the backward direction starts there
            proj = F.linear(norm(residual[:, lo:t1]), self.in_proj.weight if t1 == L else w_x)
            self._scan_tokens(lib, proj[..., :self.d_inner], "", h, pad=ctx - (t0 - lo), length=t1 - t0,
                              out=forward[:, t0:t1])
        last_xz = proj[:, t0 - lo:]
        h.zero_()
        after = residual[:, L:]  # raw residual of the (up to ctx) tokens after the block
        for t0, t1 in reversed(blocks):  # backward direction, last block first, then both directions together
            if t0 > 0 or t1 < L:  # (a sequence of one block needs neither the rows nor the context kept aside)
                rows = torch.cat([residual[:, t0:t1], after], dim=1)
                after = rows[:, :ctx].clone()
            xz = last_xz if t1 == L else F.linear(norm(rows), self.in_proj.weight)
            y = self._scan_tokens(lib, xz[..., :self.d_inner], "_b", h, pad=0, length=t1 - t0,
                                  z=xz[:, :t1 - t0, self.d_inner:], out=forward[:, t0:t1], accumulate=True)
            residual[:, t0:t1].add_(F.linear(y, self.out_proj.weight), alpha=0.5)


class VimBlock(nn.Module):
    """RMSNorm -> mixer on the fp32 residual stream; the model adds the result back through ``drop_path``."""

    def __init__(self, dim: int, *, d_state: int, expand: int, drop_path: float) -> None:
        super().__init__()
        self.mixer = BiMamba(dim, d_state=d_state, expand=expand)
        self.norm = RMSNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        return self.mixer(self.norm(residual))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution (key names ``patch_embed.proj.*``)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Vim(Backbone):
    """Vision Mamba: patch embedding, middle class token, ``depth`` bidirectional Mamba blocks.

    ``img_size`` sets the grid of the learned position embedding; other input sizes (multiples of
    ``patch_size``) use it resized bicubically.
    """

    family = "state-space"
    embed_modules = ("head",)  # used by embed() only: dropped by prune_to_features()

    def __init__(self, *, embed_dim: int, depth: int = 24, d_state: int = 16, expand: int = 2,
                 patch_size: int = 16, img_size: int = 224, in_chans: int = 3, num_classes: int = 0,
                 drop_path_rate: float = 0.0, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size must be a multiple of patch_size={patch_size}, got {img_size}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier), got {num_classes}")
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size,) * 2
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid_size) + 1, embed_dim))
        # the official drop-path schedule is shifted by one: block i drops the output of block i - 1
        dpr = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList(
            VimBlock(embed_dim, d_state=d_state, expand=expand, drop_path=dpr[i]) for i in range(depth))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(embed_dim)
        if num_classes:
            self.head = nn.Linear(embed_dim, num_classes)
        self.num_classes = num_classes
        self.all_feature_info = FeatureInfo((embed_dim,), (patch_size,), embed_dim)
        self.set_out_indices(out_indices)
        self.input_multiple = patch_size
        self.pretrained_cfg = pretrained_cfg_for(img_size, classifier="head")
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if self.num_classes:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:  # GPT-2 style: residual output projections scaled by 1/sqrt(depth)
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(depth)

    def no_weight_decay(self) -> set[str]:
        """Position embedding, class token and the SSM's A and D (kept out of weight decay officially)."""
        ssm = (".A_log", ".A_b_log", ".D", ".D_b")
        return {"pos_embed", "cls_token"} | {n for n, _ in self.named_parameters() if n.endswith(ssm)}

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding for a grid, the class token's entry staying in the middle."""
        if grid == self.grid_size:
            return self.pos_embed
        return resize_mid_cls_pos_embed(self.pos_embed, grid)

    def _forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Final-normed tokens [B, 1 + h*w, C] (class token at index h*w // 2) and the grid (h, w)."""
        self.check_input_size(x.shape[-2], x.shape[-1])
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        # the patches and the class token are added into a copy of the position embedding: one [B, L, C] tensor
        residual = self._pos_embed(grid).float().repeat(x.shape[0], 1, 1)
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        mid = patches.shape[1] // 2
        residual[:, :mid] += patches[:, :mid]
        residual[:, mid] += self.cls_token[:, 0]
        residual[:, mid + 1:] += patches[:, mid:]
        del patches
        streaming = residual.device.type == "cpu" and torch.is_inference_mode_enabled() and not self.training
        lib = scan_cpu.kernel() if streaming else None
        if lib is not None:  # inference: the residual stream is updated in place, block by block (module doc)
            for layer in self.layers:
                layer.mixer.stream_(lib, residual, layer.norm)
            return self.norm_f(residual), grid
        hidden = None
        for layer in self.layers:  # block i adds block i - 1's output through its own drop path, as officially
            if hidden is not None:  # (one statement, so the previous output is freed before the next is made)
                residual, hidden = residual + layer.drop_path(hidden).float(), None
            hidden = layer(residual)
        return self.norm_f(residual + self.drop_path(hidden)), grid

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        tokens, (h, w) = self._forward_tokens(x)
        mid = h * w // 2
        patches = torch.cat([tokens[:, :mid], tokens[:, mid + 1:]], dim=1)
        return [patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens, (h, w) = self._forward_tokens(x)
        return tokens[:, h * w // 2]

    def get_classifier(self) -> nn.Module:
        if not self.num_classes:
            return super().get_classifier()
        return self.head


def resize_mid_cls_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a [1, 1 + h*w, C] position embedding whose class entry sits at index h*w // 2."""
    mid = (pos_embed.shape[1] - 1) // 2
    cls, patches = pos_embed[:, mid:mid + 1], torch.cat([pos_embed[:, :mid], pos_embed[:, mid + 1:]], dim=1)
    patches = resample_abs_pos_embed(patches, list(grid), num_prefix_tokens=0, antialias=False)
    new_mid = grid[0] * grid[1] // 2
    return torch.cat([patches[:, :new_mid], cls, patches[:, new_mid:]], dim=1)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: Vim) -> dict[str, torch.Tensor]:
    """Official hustvl/Vim keys are this model's; resize ``pos_embed`` and drop ``head`` when there is none."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("head.") and not model.num_classes:
            continue
        if k == "pos_embed" and v.shape != model.pos_embed.shape:
            v = resize_mid_cls_pos_embed(v, model.grid_size)
        out[k] = v
    return out


def _create_vim(variant: str, **kwargs: Any) -> Vim:
    model = Vim(**kwargs)
    model.pretrained_cfg.update(url=_URLS.get(variant), tag="in1k" if variant in _URLS else None)
    return model


# ImageNet-1k releases of the paper's models (the Hugging Face repos hustvl/Vim-*-midclstok).
_URLS = {
    "vim_tiny": "https://huggingface.co/hustvl/Vim-tiny-midclstok/resolve/main/vim_t_midclstok_76p1acc.pth",
    "vim_small": "https://huggingface.co/hustvl/Vim-small-midclstok/resolve/main/vim_s_midclstok_80p5acc.pth",
    "vim_base": "https://huggingface.co/hustvl/Vim-base-midclstok/resolve/main/vim_b_midclstok_81p9acc.pth",
}


@register_backbone(family="state-space", tiny=True)
def vim_test(**kw: Any) -> Vim:
    return _create_vim("vim_test", **{"embed_dim": 32, "depth": 2, "d_state": 4, "img_size": 64, **kw})


@register_backbone(family="state-space")
def vim_tiny(**kw: Any) -> Vim:
    return _create_vim("vim_tiny", **{"embed_dim": 192, **kw})


@register_backbone(family="state-space")
def vim_small(**kw: Any) -> Vim:
    return _create_vim("vim_small", **{"embed_dim": 384, **kw})


@register_backbone(family="state-space")
def vim_base(**kw: Any) -> Vim:
    return _create_vim("vim_base", **{"embed_dim": 768, **kw})
