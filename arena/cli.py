"""The ``arena`` command: ``arena list | bench | leaderboard | convert | erf``.

Each subcommand lives in the module that owns its logic; this file only parses arguments.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .bench import add_bench
from .convert import add_convert
from .erf import add_erf
from .leaderboard import add_leaderboard


def _cmd_list(args: argparse.Namespace) -> int:
    import torch

    from backbones import FAMILIES, backbone_entry, create_backbone, list_backbones

    from .bench import count_flops, count_params

    names = list_backbones(args.pattern, include_tiny=args.tiny)
    if not names:
        print(f"no registered backbone matches {args.pattern!r}", file=sys.stderr)
        return 1
    for family in FAMILIES:
        fam = [n for n in names if backbone_entry(n).family == family]
        if not fam:
            continue
        print(f"{family}:")
        for n in fam:
            line = f"  {n:<28}"
            if not args.fast:
                with torch.device("meta"):
                    m = create_backbone(n)
                    params = count_params(m) / 1e6
                    form = ""
                    if hasattr(m, "reparameterize"):  # counted as deployed, as `arena bench` times it
                        with torch.no_grad():
                            m.eval().reparameterize()
                        form = " (deploy form)"
                    try:
                        macs = f"{count_flops(m, args.img_size) / 2e9:8.2f} GMACs"
                    except Exception as e:  # a size the model refuses: say so in the row
                        macs = f"  n/a ({type(e).__name__})"
                line += f"{params:8.2f} M params {macs} @{args.img_size}{form}"
            print(line)
    return 0


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="registered backbones by family, with params and GMACs (multiply-accumulates)")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. '*mamba*'")
    p.add_argument("--fast", action="store_true", help="names only, no params/FLOPs")
    p.add_argument("--tiny", action="store_true", help="include the tiny test variants")
    p.add_argument("--img-size", type=int, default=224)
    p.set_defaults(func=_cmd_list)


# Each entry adds one subcommand; modules that own a command contribute its adder here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_list, add_bench, add_leaderboard, add_convert,
                                                                   add_erf]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arena", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
