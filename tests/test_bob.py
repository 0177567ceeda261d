"""BoB's OOD test sets and its aggregation over five task types."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from arena.leaderboard import build_leaderboard, record_settings
from tests.conftest import ROOT
from tests.test_train import _write_imagefolder
from train import train


def test_classification_on_shapes_records_the_sketch_ood_set(make_cfg, tmp_path: Path) -> None:
    rec = train(make_cfg("backbone=convnext_test", "trainer.fast_dev_run=true"), tmp_path)
    m = rec["metrics"]
    assert {"acc1", "ood/sketch/acc1", "ood/sketch/acc5", "ood/sketch/loss"} <= set(m)
    assert 0.0 <= m["ood/sketch/acc1"] <= m["ood/sketch/acc5"] <= 1.0
    assert ("ood", "shapes>sketch", "acc1", m["ood/sketch/acc1"]) in record_settings(rec)


def test_imagefolder_ood_sets_are_checked_up_front_and_recorded(make_cfg, tmp_path: Path) -> None:
    root = _write_imagefolder(tmp_path / "data")
    shifted = _write_imagefolder(tmp_path / "shifted", classes=("b", "c"), per_class=2) / "train"  # a class subset
    common = ["backbone=convnext_test", "data=imagefolder", f"data.root={root}", "data.image_size=32",
              "data.num_workers=0", "data.batch_size=4", "trainer.max_epochs=1"]
    rec = train(make_cfg(*common, f"data.ood_tests={{shift: '{shifted}'}}"), tmp_path / "run")
    assert 0.0 <= rec["metrics"]["ood/shift/acc1"] <= 1.0 and "acc1" in rec["metrics"]
    with pytest.raises(Exception, match=r"data.ood_tests.bad: class folders \['zebra'\]"):  # via Hydra
        _write_imagefolder(tmp_path / "zoo", classes=("a", "zebra"), per_class=1)
        train(make_cfg(*common, f"data.ood_tests={{bad: '{tmp_path / 'zoo' / 'train'}'}}"), tmp_path / "bad")
    with pytest.raises(Exception, match="data.ood_tests.gone=.* does not exist"):
        train(make_cfg(*common, f"data.ood_tests={{gone: '{tmp_path / 'nowhere'}'}}"), tmp_path / "gone")
    assert not (tmp_path / "bad" / "checkpoints").exists()  # refused before training


METRIC = {"classification": "acc1", "detection": "map", "segmentation": "miou", "retrieval": "map_at_r"}


def rec(backbone: str, task: str, metrics: dict[str, float], mode: str = "fine_tune",
        dataset: str = "shapes") -> dict:
    return {"schema_version": 1, "status": "complete", "stage": "train", "backbone": backbone, "family": "baseline",
            "task": task, "mode": mode, "dataset": dataset, "seed": 0, "config_hash": f"{backbone}{task}{mode}",
            "primary_metric": METRIC[task], "metrics": metrics, "params": 1e6, "flops": 1e9, "image_size": 64,
            "wall_time_s": 1.0, "versions": {}, "created": "2026-01-01T00:00:00", "run_dir": "", "error": None}


def bob_records() -> list[dict]:
    """Three backbones over the five task types, with mask AP, a kNN probe and two OOD sets."""
    out = []
    for b, (acc, ood, knn, box, mask, miou, mapr, sk2) in {
        "x": (0.9, 0.5, 0.6, 0.30, 0.20, 0.5, 0.4, 0.2),
        "y": (0.7, 0.6, 0.7, 0.10, 0.25, 0.6, 0.1, 0.4),
        "z": (0.5, 0.1, 0.2, 0.20, 0.30, 0.4, 0.7, 0.3),
    }.items():
        out += [rec(b, "classification", {"acc1": acc, "ood/sketch/acc1": ood, "ood/sketch/acc5": 1.0}),
                rec(b, "classification", {"acc1": knn, "ood/sketch/acc1": sk2}, mode="knn"),
                rec(b, "detection", {"map": box, "segm_map": mask, "map_50": 0.9}),
                rec(b, "segmentation", {"miou": miou}),
                rec(b, "retrieval", {"map_at_r": mapr, "map": 0.5}, mode="frozen")]
    return out


def _z(values: list[float]) -> np.ndarray:
    v = np.asarray(values)
    return (v - v.mean()) / v.std()


def test_bob_aggregation_over_five_task_types() -> None:
    board = build_leaderboard(bob_records())
    t = board.table.set_index("entry")
    # by hand: z per setting over x, y, z; the mean within each task type; the mean over the five types
    types = {
        "classification": [_z([0.9, 0.7, 0.5]), _z([0.6, 0.7, 0.2])],  # fine-tune and kNN
        "detection": [_z([0.30, 0.10, 0.20]), _z([0.20, 0.25, 0.30])],  # box AP and mask AP
        "segmentation": [_z([0.5, 0.6, 0.4])],
        "retrieval": [_z([0.4, 0.1, 0.7])],
        "ood": [_z([0.5, 0.6, 0.1]), _z([0.2, 0.4, 0.3])],  # sketch after fine-tuning and after kNN
    }
    per_type = {task: np.mean(zs, axis=0) for task, zs in types.items()}
    for task, expected in per_type.items():
        assert t.loc[["x", "y", "z"], f"score_{task}"].tolist() == pytest.approx(expected.tolist())
    overall = np.mean(list(per_type.values()), axis=0)
    assert t.loc[["x", "y", "z"], "score"].tolist() == pytest.approx(overall.tolist())
    assert (t["coverage"] == "8/8").all()
    assert t.loc["y", "ood/shapes>sketch/fine_tune:acc1"] == pytest.approx(0.6)
    assert t.loc["z", "detection/shapes/fine_tune:segm_map"] == pytest.approx(0.30)
    assert t.loc["x", "retrieval/shapes/frozen:map_at_r"] == pytest.approx(0.4)


def test_an_ood_set_one_backbone_lacks_is_listed_missing() -> None:
    records = bob_records()
    records[0]["metrics"].pop("ood/sketch/acc1")  # x's fine-tuned classification without its OOD set
    board = build_leaderboard(records)
    missing = board.missing
    assert missing[["entry", "task", "dataset", "mode", "metric"]].values.tolist() == [
        ["x", "ood", "shapes>sketch", "fine_tune", "acc1"]]
    t = board.table.set_index("entry")
    assert t.loc["x", "coverage"] == "7/8" and pd.isna(t.loc["x", "rank"])
    assert t.loc["x", "score_ood"] == pytest.approx(_z([0.2, 0.4, 0.3])[0])  # the OOD setting it has


MINI = {"mini_shapes_ft": ("classification", "shapes", "fine_tune"),
        "mini_cifar10_lp": ("classification", "cifar10_small", "linear_probe"),
        "mini_cifar10_knn": ("classification", "cifar10_small", "knn"),
        "mini_cifar10_retrieval": ("retrieval", "cifar10_small", "frozen"),
        "mini_bccd_detection": ("detection", "bccd_voc", "fine_tune"),
        "mini_camvid_segmentation": ("segmentation", "camvid", "fine_tune")}


def compose_cfg(*overrides: str) -> DictConfig:
    """The composed ``train`` config (with Hydra's), without the tests' shapes shortcuts."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def test_bob_mini_grid_composes_every_setting_and_weights() -> None:
    from hydra.utils import get_class

    cfg = compose_cfg("experiment=bob_mini", "+bob_setting=mini_shapes_ft", "+weights=random")
    params = cfg.hydra.sweeper.params
    assert set(params["+bob_setting"].split(",")) == set(MINI) and params["+weights"] == "random,shapes"
    assert len(params.backbone.split(",")) == 2
    for i, (setting, want) in enumerate(MINI.items()):
        weights = ("random", "shapes")[i % 2]
        cfg = compose_cfg("experiment=bob_mini", f"+bob_setting={setting}", f"+weights={weights}",
                          "backbone=convnext_atto")
        assert (cfg.task.name, cfg.data.name, cfg.task.mode) == want
        assert get_class(cfg.task.module._target_).name == want[0]
        pretrained = cfg.backbone.pretrained
        assert (pretrained is None) == (weights == "random")
        assert weights == "random" or pretrained.endswith("pretrained/convnext_atto-shapes/checkpoints/last.ckpt")


def test_bob_settings_compose_with_the_roots_given() -> None:
    roots = ["bob.imagenet=/d/in1k", "bob.imagenet_ood={r: /d/in-r}", "bob.coco=/d/coco", "bob.ade20k=/d/ade",
             "bob.ade20k_classes=[wall,sky]", "bob.retrieval=/d/cub", "bob.retrieval_name=cub200"]
    want = {"imagenet_ft": ("classification", "imagenet", "fine_tune", "/d/in1k"),
            "imagenet_lp": ("classification", "imagenet", "linear_probe", "/d/in1k"),
            "imagenet_knn": ("classification", "imagenet", "knn", "/d/in1k"),
            "coco_detection": ("detection", "coco", "fine_tune", "/d/coco"),
            "ade20k_segmentation": ("segmentation", "ade20k", "fine_tune", "/d/ade"),
            "retrieval": ("retrieval", "cub200", "frozen", "/d/cub")}
    for setting, (task, data, mode, root) in want.items():
        cfg = compose_cfg("experiment=bob", f"+bob_setting={setting}", "backbone=convnext_atto", *roots)
        assert (cfg.task.name, cfg.data.name, cfg.task.mode, cfg.data.root) == (task, data, mode, root)
    assert compose_cfg("experiment=bob", "+bob_setting=imagenet_ft", *roots).data.ood_tests == {"r": "/d/in-r"}


def test_pretrain_callback_runs_only_for_missing_local_weights(tmp_path: Path, monkeypatch) -> None:
    from omegaconf import OmegaConf

    from arena import bob
    from arena.records import write_json_atomic

    calls = []
    monkeypatch.setattr(bob.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or
                        type("Done", (), {"returncode": 1, "stderr": "boom"})())
    callback = bob.PretrainCallback(out_dir=str(tmp_path), suffix="shapes", overrides=["data=shapes"])
    wanted = str(tmp_path / "net-shapes" / "checkpoints" / "last.ckpt")
    job = lambda pretrained: OmegaConf.create({"backbone": {"name": "net", "pretrained": pretrained}})  # noqa: E731
    callback.on_job_start(job(None))
    callback.on_job_start(job("/elsewhere/weights.safetensors"))
    assert calls == []
    callback.on_job_start(job(wanted))  # a failing pretraining is logged, not raised: the cell records the failure
    assert calls[0][-3:] == ["backbone=net", "data=shapes", f"hydra.run.dir={tmp_path / 'net-shapes'}"]
    write_json_atomic(tmp_path / "net-shapes" / "metrics.json", {**rec("net", "classification", {}), "status": "complete"})
    callback.on_job_start(job(wanted))
    assert len(calls) == 1  # done once: reused


def test_bob_mini_cell_with_shapes_weights_pretrains_them_first(tmp_path: Path) -> None:
    """One bob_mini cell, shrunk: the callback trains the shapes weights, the cell loads them as entry <arch>.shapes."""
    import json
    import subprocess
    import sys

    small = ["data.num_train=32", "data.num_val=16", "data.num_test=16", "data.batch_size=16", "trainer.max_epochs=1"]
    pretrain = ",".join(f"'{o}'" for o in ["task=classification", "data=shapes", "logger=csv", *small])
    cell = tmp_path / "cell"
    subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=bob_mini", "+bob_setting=mini_shapes_ft",
                    "+weights=shapes", "backbone=convnext_test", f"paths.log_dir={tmp_path}", *small,
                    f"hydra.callbacks.pretrain.overrides=[{pretrain}]", f"hydra.run.dir={cell}"],
                   check=True, cwd=ROOT, capture_output=True)
    pretrained = json.loads((tmp_path / "pretrained" / "convnext_test-shapes" / "metrics.json").read_text())
    record = json.loads((cell / "metrics.json").read_text())
    assert pretrained["status"] == record["status"] == "complete"
    assert record["entry"] == "convnext_test.shapes" and record["weights"].startswith("file:last.ckpt@")
    assert "ood/sketch/acc1" in record["metrics"]
