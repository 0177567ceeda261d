"""Classification head on the backbone's pooled embedding.

``linear_probe=True`` puts a BatchNorm without affine parameters before the linear layer, as
BoB and MAE do for frozen features, so features of any scale are probed fairly.
"""
from __future__ import annotations

import torch
from torch import nn

from backbones import FeatureInfo


class ClassificationHead(nn.Module):
    """Linear classifier over ``embed(x)``.

    >>> head = ClassificationHead(FeatureInfo((8,), (32,), embed_dim=8), num_classes=3)
    >>> head(torch.zeros(2, 8)).shape
    torch.Size([2, 3])
    """

    def __init__(self, feature_info: FeatureInfo, *, num_classes: int, linear_probe: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        dim = feature_info.embed_dim
        self.norm = nn.BatchNorm1d(dim, affine=False) if linear_probe else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(embedding)))
