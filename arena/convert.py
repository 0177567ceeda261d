"""``arena convert``: any accepted weights source -> one ``.safetensors`` file in the model's own layout.

The output holds ``model.state_dict()`` after strict loading (family key remapping, classifier
and position-table adaptation done once), optionally reparameterized to the deploy form, with
metadata saying what it is: ``backbone``, ``variant``, ``form`` (train/deploy), ``num_classes``
and ``source``. It is written atomically and never replaces an existing file unless asked.

    arena convert convnext_tiny_1k_224.pth convnext_tiny.safetensors --backbone convnext_tiny --num-classes 1000
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .records import atomic_path

if TYPE_CHECKING:
    from backbones._weights import LoadReport


def convert(
    source: Any,
    out: str | Path,
    *,
    backbone: str,
    num_classes: int = 0,
    reparameterize: bool = False,
    overwrite: bool = False,
    trust_pickle: bool = False,
    strict: bool = True,
) -> tuple[LoadReport, dict[str, str]]:
    """Load ``source`` strictly into ``backbone`` and write ``model.state_dict()`` to ``out``.

    Returns the load report and the metadata written. ``trust_pickle`` unpickles arbitrary objects: only for files from a trusted origin, in a
    trusted environment. Nothing is written when any step fails.
    """
    import torch
    from safetensors.torch import save_file

    from backbones import TimmBackbone, create_backbone
    from backbones._weights import load_checkpoint, read_checkpoint

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got {str(out)!r}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    model = create_backbone(backbone, num_classes=num_classes).eval()
    if reparameterize and not hasattr(model, "reparameterize"):
        raise ValueError(f"{backbone} has no reparameterize(); convert without --reparameterize")
    checkpoint = read_checkpoint(source, model, trust_pickle=trust_pickle)
    report = load_checkpoint(model, checkpoint, strict=strict)
    if reparameterize:
        with torch.no_grad():
            model.reparameterize()
    variant = model.timm_name if isinstance(model, TimmBackbone) else type(model).__name__
    metadata = {
        "format": "pt",
        "backbone": backbone,
        "variant": variant,
        "form": "deploy" if reparameterize or report.reparameterized or getattr(model, "deploy", False) else "train",
        "num_classes": str(num_classes),
        "source": checkpoint.source,
        "producer": f"backbone-arena {__version__}",
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return report, metadata


def _cmd_convert(args: argparse.Namespace) -> int:
    report, metadata = convert(args.source, args.out, backbone=args.backbone, num_classes=args.num_classes,
                               reparameterize=args.reparameterize, overwrite=args.overwrite,
                               trust_pickle=args.trust_pickle, strict=not args.no_strict)
    print(report.table())
    print(f"wrote {args.out} ({', '.join(f'{k}={v}' for k, v in metadata.items() if k != 'format')})")
    return 0


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="any weights source -> .safetensors in the backbone's own layout",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a local checkpoint, hf-hub:org/repo, timm:<model>.<tag>, a URL, or 'true' "
                                  "for the backbone's registered default")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--backbone", required=True, help="registered backbone name (see `arena list`)")
    p.add_argument("--num-classes", type=int, default=0,
                   help="keep the source's classifier with this many classes (e.g. 1000 to check a published "
                        "top-1); 0 (default) drops it")
    p.add_argument("--reparameterize", action="store_true", help="save the deploy form (model.reparameterize())")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-strict", action="store_true", help="convert what fits instead of refusing a partial match")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle arbitrary objects in SOURCE; this can run code: only for trusted files")
    p.set_defaults(func=_cmd_convert)
