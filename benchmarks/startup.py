"""CPU time of start-up: ``python train.py --help`` and a tiny run up to its first step.

    python benchmarks/startup.py [--repeats 3]

Every command runs in a fresh interpreter from the repository root; the figure is its CPU time
(user + system of the child process, from ``getrusage``) and its wall time, the median of
``--repeats`` runs. Rows:

* ``import torch, torchvision, lightning, timm`` -- the floor every start-up pays;
* ``train.py --help`` -- composing the default config and printing the option groups;
* ``run start-up`` -- what ``train.py`` does before fitting: compose (``backbone=<name>``),
  instantiate backbone, data, task module and trainer (``arena.run.build_run``), for a
  registered name, a ``timm/<name>`` model and an entry ``<name>.<tag>`` given a local file.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.accelerator=cpu", "logger=csv", "trainer.enable_progress_bar=false", "data.num_train=64"]


def build(overrides: list[str], out: str) -> None:
    """Compose ``train`` with ``overrides`` and build the run (the child of a ``run start-up`` row)."""
    sys.path.insert(0, str(ROOT))
    from hydra import compose, initialize_config_dir

    from arena.config import register_configs
    from arena.run import build_run

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*FAST, f"paths.output_dir={out}", *overrides])
        build_run(cfg, out)


def measure(cmd: list[str], repeats: int) -> tuple[float, float]:
    """Median CPU seconds (user + system) and wall seconds of ``cmd`` run ``repeats`` times."""
    cpu, wall = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--build", nargs="*", help=argparse.SUPPRESS)  # child mode: overrides of one run
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.build is not None:
            return build(args.build, tmp)
        import torch

        from backbones import create_backbone

        weights = Path(tmp) / "shapes.pth"
        torch.save(create_backbone("convnext_test").state_dict(), weights)
        me = [sys.executable, str(Path(__file__).resolve()), "--build"]
        rows = {
            "import torch, torchvision, lightning, timm": [sys.executable, "-c",
                                                           "import torch, torchvision, lightning, timm"],
            "train.py --help": [sys.executable, "train.py", "--help"],
            "run start-up, backbone=convnext_test": [*me, "backbone=convnext_test"],
            "run start-up, backbone=timm/resnet18": [*me, "backbone=timm/resnet18"],
            f"run start-up, backbone=convnext_test.shapes ({weights.name})": [
                *me, "backbone=convnext_test", f"backbone.pretrained={weights}", "backbone.tag=shapes"],
        }
        print(f"{'command':<62} {'CPU s':>7} {'wall s':>7}   (median of {args.repeats})")
        for label, cmd in rows.items():
            cpu, wall = measure(cmd, args.repeats)
            print(f"{label:<62} {cpu:7.2f} {wall:7.2f}")


if __name__ == "__main__":
    main()
