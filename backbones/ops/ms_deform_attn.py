"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch, built on ``grid_sample``.

Each query looks at ``n_points`` learned locations around its reference point on each of
``n_levels`` feature maps, per head, and takes their attention-weighted sum. Sampling is
bilinear with zeros outside the map, in the same pixel convention as the official CUDA kernel
(a location ``u`` in [0, 1] maps to pixel coordinate ``u * W - 0.5``), which is
``grid_sample(..., align_corners=False, padding_mode="zeros")``. It runs on any device,
including ``meta``, and is differentiable in the values, the locations and the weights.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Sample and mix multi-level values.

    Args:
        value: ``[B, S, heads, head_dim]``, the levels' maps flattened row-major and concatenated
            (``S = sum(h * w)``).
        spatial_shapes: ``(h, w)`` of each level, in the order of ``value``.
        sampling_locations: ``[B, Q, heads, levels, points, 2]``, normalised ``(x, y)`` in [0, 1].
        attention_weights: ``[B, Q, heads, levels, points]``.

    Returns:
        ``[B, Q, heads * head_dim]``.
    """
    b, s, heads, dim = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    if len(spatial_shapes) != levels or sum(h * w for h, w in spatial_shapes) != s:
        raise ValueError(
            f"spatial_shapes {list(spatial_shapes)} must give {levels} levels covering the {s} value tokens"
        )
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, v in enumerate(value.split([h * w for h, w in spatial_shapes], dim=1)):
        h, w = spatial_shapes[lvl]
        v = v.permute(0, 2, 3, 1).reshape(b * heads, dim, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * heads, q, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B*heads, dim, Q, levels*points] weighted by [B*heads, 1, Q, levels*points]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (stacked * weights).sum(-1).view(b, heads * dim, q)
    return out.transpose(1, 2)


class MSDeformAttn(nn.Module):
    """The attention module, with the official parameter names and initialisation.

    ``ratio`` shrinks the value width (``value_proj``: d_model -> d_model * ratio), as in
    ViT-Adapter / ViT-CoMer.

    >>> attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    >>> q, ref = torch.zeros(1, 6, 32), torch.full((1, 6, 1, 2), 0.5)
    >>> attn(q, ref, torch.zeros(1, 4 * 4 + 2 * 2, 32), [(4, 4), (2, 2)]).shape
    torch.Size([1, 6, 32])
    """

    def __init__(self, *, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 ratio: float = 1.0) -> None:
        super().__init__()
        value_dim = int(d_model * ratio)
        if value_dim % n_heads:
            raise ValueError(f"d_model * ratio = {value_dim} must be divisible by n_heads = {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on a ring per head (point k at distance k+1), weights uniform."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """``query`` [B, Q, C]; ``reference_points`` [B or 1, Q, levels or 1, 2] normalised (x, y);
        ``input_flatten`` [B, S, C], the levels of ``spatial_shapes`` flattened and concatenated."""
        b, q, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten).view(b, input_flatten.shape[1], heads, -1)
        offsets = self.sampling_offsets(query).view(b, q, heads, levels, points, 2)
        weights = self.attention_weights(query).view(b, q, heads, levels * points).softmax(-1)
        weights = weights.view(b, q, heads, levels, points)
        # offsets are in pixels of each level: normalise by (w, h)
        normalizer = query.new_tensor([(w, h) for h, w in spatial_shapes])
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn(value, spatial_shapes, locations, weights))


__all__ = ["ms_deform_attn", "MSDeformAttn"]
