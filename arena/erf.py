"""``arena erf``: the effective receptive field of any backbone, as a heat map.

The ERF (Luo et al., 2016), measured as in RepLKNet (Ding et al., 2022, Fig. 1): for each image,
the gradient of the central pixel of a feature level (its ReLU'd channels summed) with respect
to the input; its absolute value, summed over input channels, is averaged over images. Maps are
drawn log-scaled (large kernels spread weak contributions far from the centre) so large-kernel,
attention and state-space models can be compared by eye. ``area_ratios`` gives the numbers:
the smallest centred square holding a fraction ``t`` of the total contribution.

    arena erf backbone=unireplknet_t images=8 size=384 out=erf_unireplknet_t.png
    arena erf backbone=convnext_tiny images=path/to/jpgs pretrained=true
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # torch is imported where used, so `arena --help` stays fast
    import torch
    from torch import nn

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


def compute_erf(model: nn.Module, images: torch.Tensor, *, level: int = -1, batch_size: int = 4) -> torch.Tensor:
    """The ERF of ``model``'s output ``level`` (an index into ``model(x)``) over ``images`` [N, 3, H, W] -> [H, W].

    Runs in eval mode (BatchNorm uses its running statistics, so images do not interact and a
    batch's summed output gives every image its own gradient); the model's mode is restored.
    """
    import torch

    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    try:
        for chunk in images.split(batch_size):
            x = chunk.detach().clone().requires_grad_(True)
            feats = model(x)
            try:
                f = feats[level]
            except IndexError:
                raise ValueError(f"level must index the model's {len(feats)} output levels, got {level}") from None
            centre = f[:, :, f.shape[-2] // 2, f.shape[-1] // 2]
            (grad,) = torch.autograd.grad(torch.relu(centre).sum(), x)
            total += grad.abs().sum(dim=(0, 1)).double().cpu()
    finally:
        model.train(was_training)
    return (total / images.shape[0]).float()


def area_ratios(erf: torch.Tensor, thresholds: Sequence[float] = THRESHOLDS) -> dict[float, float]:
    """For each ``t``: the area (fraction of the image) of the smallest centred square holding ``t`` of the ERF."""
    h, w = erf.shape
    total = float(erf.sum())
    cy, cx = h // 2, w // 2
    sums = [float(erf[max(cy - r, 0):cy + r + 1, max(cx - r, 0):cx + r + 1].sum()) for r in range(max(h, w) // 2 + 1)]
    out = {}
    for t in thresholds:
        r = next((i for i, s in enumerate(sums) if total > 0 and s / total >= t), len(sums) - 1)
        side_h, side_w = min(2 * r + 1, h), min(2 * r + 1, w)
        out[t] = side_h * side_w / (h * w)
    return out


def log_scale(erf: torch.Tensor, *, decades: float = 3.0) -> torch.Tensor:
    """``log10`` of the map relative to its maximum, clipped to ``decades`` and mapped to [0, 1]."""
    import torch

    rel = erf / erf.max().clamp_min(torch.finfo(erf.dtype).tiny)
    return (torch.log10(rel.clamp_min(10.0 ** -decades)) + decades) / decades


def load_images(source: str | int, size: int, *, mean: Sequence[float], std: Sequence[float],
                seed: int = 0) -> torch.Tensor:
    """``source`` images as a normalized [N, 3, size, size] batch: a count (random Gaussian images) or a folder."""
    import torch

    if isinstance(source, int) or str(source).isdigit():
        n = int(source)
        if n < 1:
            raise ValueError(f"images must be a positive count or a folder of images, got {source!r}")
        return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"images={source!r} is neither a count nor a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    from PIL import Image

    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    batch = []
    for p in files:
        with Image.open(p) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
        batch.append((t.permute(2, 0, 1).float() / 255 - m) / s)
    return torch.stack(batch)


def plot_erf(erf: torch.Tensor, out: str | Path, *, title: str = "") -> Path:
    """Save the log-scaled map as a PNG heat map (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5.4), dpi=100)
    im = ax.imshow(log_scale(erf).numpy(), cmap="RdYlGn", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.046, pad=0.04,
                 label="log10 contribution (relative to max, 3 decades)")
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


# --- the command -------------------------------------------------------------------------------------
_OPTIONS = {"backbone": None, "images": "4", "size": "384", "out": None, "level": "-1", "pretrained": None,
            "batch_size": "4"}


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    opts = dict(_OPTIONS)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in _OPTIONS:
            raise ValueError(f"expected key=value with key one of {sorted(_OPTIONS)}, got {item!r}")
        opts[key] = value
    if not opts["backbone"]:
        raise ValueError("backbone=<name> is required (see `arena list`)")
    return opts


def _pretrained(value: str | None) -> Any:
    if value is None or value.lower() in ("false", "none", "0"):
        return None
    return True if value.lower() == "true" else value


def _cmd_erf(args: argparse.Namespace) -> int:
    from backbones import create_backbone

    opts = _parse_overrides(args.overrides)
    size, level = int(opts["size"]), int(opts["level"])
    model = create_backbone(opts["backbone"], pretrained=_pretrained(opts["pretrained"]))
    model.check_input_size(size, size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    images = load_images(opts["images"], size, mean=cfg.get("mean", (0.485, 0.456, 0.406)),
                         std=cfg.get("std", (0.229, 0.224, 0.225)))
    erf = compute_erf(model, images, level=level, batch_size=int(opts["batch_size"]))
    stride = model.feature_info.strides[level]
    ratios = area_ratios(erf)
    out = opts["out"] or f"erf_{opts['backbone'].replace('/', '_')}.png"
    title = (f"{opts['backbone']}  level {level} (stride {stride})  {len(images)} images @ {size}\n"
             + "  ".join(f"{int(t * 100)}%: {100 * r:.2f}%" for t, r in ratios.items()) + "  of the area")
    plot_erf(erf, out, title=title)
    print(f"{opts['backbone']}: ERF of level {level} (stride {stride}), {len(images)} images at {size}x{size}")
    for t, r in ratios.items():
        print(f"  {int(t * 100):>3}% of the contribution within a centred square covering {100 * r:.2f}% of the image")
    print(f"saved {out}")
    return 0


def add_erf(sub: argparse._SubParsersAction) -> None:
    """The ``arena erf`` subcommand (Hydra-style ``key=value`` arguments)."""
    p = sub.add_parser("erf", help="effective receptive field heat map of a backbone",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="+", metavar="key=value",
                   help=f"backbone=<name> (required); images=N|<dir> (default {_OPTIONS['images']}); "
                        f"size=S ({_OPTIONS['size']}); out=<png>; level=L ({_OPTIONS['level']}); "
                        f"pretrained=true|<source>; batch_size=B ({_OPTIONS['batch_size']})")
    p.set_defaults(func=_cmd_erf)


__all__ = ["compute_erf", "area_ratios", "log_scale", "load_images", "plot_erf", "add_erf"]
