"""Deploy form vs train form: CPU inference throughput of the reparameterized large-kernel models.

    python benchmarks/reparam_speed.py [--models unireplknet_t replknet_31b] [--batch 4] [--size 224]
                                       [--repeats 5] [--threads 1]

For each model the train form (in eval mode, with BatchNorm statistics and layer scales
randomized so the check is not trivial) and its ``reparameterize()``-d copy run interleaved in
one process on the same batch; the table gives best-of-N images/s (CPU time of the process with
one thread, see ``time_interleaved``), the speed-up, and the largest output difference relative
to the output scale. A second row times only the part that reparameterization rewrites, the
first large-kernel token mixer (UniRepLKNet: stage-2 dwconv + BN, 13x13 with five dilated
branches; RepLKNet: stage-1 31x31 + 5x5 large-kernel conv), on its input shape.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbones import create_backbone  # noqa: E402
from backbones.replknet import RepLKNet  # noqa: E402
from timing import time_interleaved, timing_args  # noqa: E402


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Trained-looking BatchNorm statistics and affine maps, layer scales and GRN gains (``gamma``),
    so that every merge is exercised and the residual branches matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))


def token_mixer(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """The first large-kernel token mixer and the feature level whose shape its input has."""
    if isinstance(model, RepLKNet):
        return model.stages[0].blocks[0].large_kernel, 0
    block = model.stages[1][0]
    return torch.nn.Sequential(block.dwconv, block.norm), 1


def main() -> None:
    args = timing_args(__doc__, models=dict(nargs="+", default=["unireplknet_t", "replknet_31b"]),
                       size=dict(type=int, default=224))
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"inference, batch {args.batch} at {args.size}x{args.size}, {torch.get_num_threads()} threads, CPU, "
          f"best of {args.repeats}")
    print(f"{'model':<16}{'part':<13}{'train img/s':>13}{'deploy img/s':>14}{'speed-up':>10}{'max |diff| / scale':>20}")
    for name in args.models:
        torch.manual_seed(0)
        train = create_backbone(name).eval()
        randomize_(train)
        deploy = copy.deepcopy(train)
        deploy.reparameterize()
        (mixer_train, level), (mixer_deploy, _) = token_mixer(train), token_mixer(deploy)
        with torch.no_grad():
            ref = train(x)
            y = torch.randn_like(ref[level])
            cases = {"whole model": (x, train, deploy), "token mixer": (y, mixer_train, mixer_deploy)}
            for part, (inp, a, b) in cases.items():
                out_a, out_b = a(inp), b(inp)
                pairs = zip(out_a, out_b) if isinstance(out_a, list) else [(out_a, out_b)]
                diff = max(((u - v).abs().max() / u.abs().max()).item() for u, v in pairs)
                t = time_interleaved({"train": lambda: a(inp), "deploy": lambda: b(inp)}, args.repeats)
                print(f"{name:<16}{part:<13}{args.batch / t['train']:>13.2f}{args.batch / t['deploy']:>14.2f}"
                      f"{t['train'] / t['deploy']:>9.2f}x{diff:>20.1e}")


if __name__ == "__main__":
    main()
