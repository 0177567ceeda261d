"""Cost of the up-front data checks next to one epoch of data loading, on the shared real datasets.

    python benchmarks/data_checks.py [--datasets ../shared/datasets] [--workers 0] [--backbone convnext_test] [--steps 3]

For each data config (cifar10_small, bccd_voc, facemask_coco, camvid) the run is built as
``train.py task=<its task> data=<it> backbone=<backbone>`` builds it, then, side by side in one
process: the setup checks of every split with ``data.verify=header`` (the default) and
``data.verify=full``; one epoch of the training loader (decoding and augmentation, no model);
and ``--steps`` training steps (forward, backward, AdamW) on loaded batches. The training epoch
is the loading epoch plus the steps per epoch times the median step. A warm-up check pass first
puts the files in the page cache for all. Printed: seconds, and the checks over the training
epoch and over the loading epoch alone (a bound that holds for any model).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from arena.config import register_configs  # noqa: E402
from arena.data.base import SPLITS  # noqa: E402
from arena.data.checks import DataCheck  # noqa: E402
from arena.run import build_run  # noqa: E402
from detection_step import model_step  # noqa: E402

SETS = {"cifar10_small": "classification", "bccd_voc": "detection", "facemask_coco": "detection",
        "camvid": "segmentation"}


def timed_check(dm, verify: str, workers: int) -> tuple[float, int]:
    """Seconds to check every split as ``verify`` says, and the number of images read."""
    check = DataCheck(verify=verify, workers=workers)
    t0 = time.perf_counter()
    dm.check_data(check)
    seconds = time.perf_counter() - t0
    check.raise_if_any(dm.name)
    return seconds, len(check.seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=str(ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--workers", type=int, default=0, help="loader workers and check threads (0: one thread)")
    parser.add_argument("--backbone", default="convnext_test",
                        help="the model of the training steps; the default, the smallest, gives the shortest epoch")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per dataset, after one warm-up")
    args = parser.parse_args()
    if not Path(args.datasets).is_dir():
        raise SystemExit(f"--datasets {args.datasets!r} does not exist; point it at the shared datasets folder")
    register_configs()
    print(f"{'data':<14} {'images':>7} {'header s':>9} {'full s':>8} {'load epoch s':>13} {'train epoch s':>14} "
          f"{'header/train':>13} {'full/train':>11} {'header/load':>12}")
    for data, task in SETS.items():
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"task={task}", f"data={data}", f"backbone={args.backbone}",
                                                          f"paths.datasets_dir={args.datasets}", "logger=none",
                                                          f"data.num_workers={args.workers}", "paths.output_dir=/tmp"])
        run = build_run(cfg, "/tmp")
        dm = run.datamodule
        for split in SPLITS:
            dm.datasets[split] = dm.make_dataset(split)
        timed_check(dm, "header", args.workers)  # warm-up: the page cache holds the files for everything below
        header, images = timed_check(dm, "header", args.workers)
        full, _ = timed_check(dm, "full", args.workers)
        dm.checked = True
        batches = [batch for _, batch in zip(range(args.steps + 1), dm.train_dataloader())]
        t0 = time.perf_counter()
        for _ in dm.train_dataloader():
            pass
        load = time.perf_counter() - t0
        run.module.train()
        optimizer = torch.optim.AdamW([p for p in run.module.parameters() if p.requires_grad], lr=1e-4)
        step = []
        for batch in batches:
            t0 = time.perf_counter()
            model_step(run.module, optimizer, batch)
            step.append(time.perf_counter() - t0)
        train = load + len(dm.train_dataloader()) * statistics.median(step[1:])
        print(f"{data:<14} {images:>7} {header:>9.2f} {full:>8.2f} {load:>13.2f} {train:>14.1f} "
              f"{header / train:>12.1%} {full / train:>11.1%} {header / load:>12.1%}")


if __name__ == "__main__":
    main()
