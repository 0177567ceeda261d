"""Train-step time of a detection run (data loading + augmentation + model step) vs the bare model step.

    python benchmarks/detection_step.py [--steps 10] [hydra overrides, e.g. data=bccd_voc task.head=fcos]

The run is composed like ``train.py task=detection <overrides>`` (by default that run: shapes,
fastvit_t8, FCOS). Each timed step takes the next batch from the run's own training loader (data
loading and augmentation) and does forward, backward and an AdamW step; the bare model step
repeats forward, backward and the optimiser step on one fixed batch. Steps alternate between the
two so that the machine's load affects both alike. Printed: medians of wall time per step, the
share of data loading in the run's step, and the run's step over the bare step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from arena.config import register_configs  # noqa: E402
from arena.run import build_run  # noqa: E402


def model_step(module: Any, optimizer: torch.optim.Optimizer, batch: Any) -> None:
    optimizer.zero_grad(set_to_none=True)
    module.training_step(batch, 0).backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args, overrides = parser.parse_known_args()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["task=detection", "logger=none", "trainer.accelerator=cpu",
                                                      "paths.output_dir=/tmp/detection_step",
                                                      *overrides])
    run = build_run(cfg, "/tmp/detection_step")
    module, dm = run.module, run.datamodule
    dm.setup("fit")
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    loader = iter(dm.train_dataloader())
    fixed = next(loader)
    model_step(module, optimizer, fixed)  # warm-up
    data, step, bare = [], [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        model_step(module, optimizer, batch)
        t2 = time.perf_counter()
        model_step(module, optimizer, fixed)
        t3 = time.perf_counter()
        data.append(t1 - t0)
        step.append(t2 - t0)
        bare.append(t3 - t2)
    med = statistics.median
    print(f"data={cfg.data.name} backbone={cfg.backbone.name} head={cfg.task.head} batch={dm.batch_size} "
          f"image_size={cfg.data.image_size} workers={dm.num_workers} steps={args.steps} "
          f"threads={torch.get_num_threads()}")
    print(f"{'':24s}{'median s/step':>14s}")
    print(f"{'run step (data + model)':24s}{med(step):14.3f}")
    print(f"{'  data loading + aug':24s}{med(data):14.3f}")
    print(f"{'bare model step':24s}{med(bare):14.3f}")
    print(f"data share of the run's step: {sum(data) / sum(step):.1%} (target < 15%)")
    print(f"run step / bare model step: {med(step) / med(bare):.2f}")


if __name__ == "__main__":
    main()
