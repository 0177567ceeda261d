"""Every task x data config composes, and each pair a datamodule serves runs one fast_dev_run step.

Data configs that point at ``../shared/datasets`` run only where those folders exist.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from train import train

CONF = Path(__file__).resolve().parents[1] / "conf"
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("task", TASKS)
def test_task_data_pair_fast_dev_run(make_cfg, tmp_path: Path, task: str, data: str) -> None:
    cfg = make_cfg(f"task={task}", f"data={data}", "backbone=convnext_test", "trainer.fast_dev_run=true",
                   "data.batch_size=2")
    missing = [k for k in cfg.data if OmegaConf.is_missing(cfg.data, k)]  # unresolved: data.name derives from root
    if missing:
        pytest.skip(f"data={data} is generic: it needs {sorted(missing)} (exercised by the format's own tests)")
    root = cfg.data.get("root")
    if root is not None and not Path(root).exists():
        pytest.skip(f"{root} is absent on this machine")
    try:
        instantiate(cfg.data, task=task, data_config={})
    except Exception as e:  # hydra wraps the datamodule's ValueError
        if "serves the tasks" in str(e):
            pytest.skip(f"data={data} does not serve task={task}")
        raise
    rec = train(cfg, tmp_path)
    assert rec["status"] == "complete" and rec["task"] == task
    assert rec["primary_metric"] in rec["metrics"]


def test_every_task_is_served_by_shapes(make_cfg) -> None:
    for task in TASKS:
        cfg = make_cfg(f"task={task}")
        dm = instantiate(cfg.data, task=cfg.task.name, data_config={})
        assert dm.num_classes >= 2
