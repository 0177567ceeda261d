"""Entries (architecture x weights) and the lazily answered ``backbone`` config group."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from hydra import compose
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from safetensors.torch import save_file

from arena.config import backbone_node, check_backbone_override, entry_fields
from arena.records import config_hash, make_record, read_record, write_record
from arena.run import build_run, finish_run
from backbones import create_backbone
from backbones._weights import identify_weights, pretrained_tags, pretraining_of, tag_source, tagged_cfg


def _sha8(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


# --- <name>.<tag> ---------------------------------------------------------------------------------------------

def test_timm_tag_entry() -> None:
    node = backbone_node("convnext_tiny.fb_in22k")
    assert (node["name"], node["pretrained"], node["tag"]) == ("convnext_tiny", True, "fb_in22k")
    assert tag_source("convnext_tiny", "fb_in22k") == "timm:convnext_tiny.fb_in22k"
    assert entry_fields(node) == {"weights": "fb_in22k", "pretraining": "supervised-in22k",
                                  "entry": "convnext_tiny.fb_in22k"}
    # the default tag of pretrained=true is named too
    assert entry_fields({"name": "convnext_tiny", "pretrained": True})["entry"] == "convnext_tiny.in12k_ft_in1k"


def test_native_tags_name_their_official_releases() -> None:
    node = backbone_node("vim_tiny.in1k")
    assert (node["name"], node["pretrained"], node["tag"]) == ("vim_tiny", True, "in1k")
    assert tag_source("vim_tiny", "in1k") is True  # the release pretrained_cfg["url"] points to
    assert entry_fields(node) == {"weights": "in1k", "pretraining": "supervised-in1k", "entry": "vim_tiny.in1k"}
    assert pretrained_tags("unireplknet_b") == ["in22k_ft_in1k_384"]
    assert identify_weights("unireplknet_b", True).pretraining == "supervised-in22k"
    assert pretrained_tags("vim_test") == []  # test variants have no weights


def test_unknown_tag_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="vim_tiny has no pretrained weights tagged 'in22k'; its tags: in1k"):
        backbone_node("vim_tiny.in22k")
    with pytest.raises(ValueError, match="its tags: .*fb_in22k"):
        create_backbone("convnext_tiny.fb_in2k", pretrained=True)
    with pytest.raises(ValueError, match="vim_test has no pretrained weights tagged 'in1k'; it has no published"):
        backbone_node("vim_test.in1k")
    with pytest.raises(ValueError, match="letters, digits"):
        create_backbone("convnext_test", pretrained=True, tag="a/b")
    with pytest.raises(ValueError, match="means random init"):
        create_backbone("convnext_test", tag="shapes")


def test_released_tag_offline_fails_with_the_way_out() -> None:
    # HF_HUB_OFFLINE=1 (conftest): the tag resolves to timm's hub file, which is not cached
    with pytest.raises(FileNotFoundError, match="test_convnext.r160_in1k: model.safetensors is not in the Hugging"):
        create_backbone("convnext_test.r160_in1k", pretrained=True)


def test_tag_preprocessing_follows_the_weights() -> None:
    assert tagged_cfg("timm/vit_base_patch16_224", "augreg_in21k")["mean"] == (0.5, 0.5, 0.5)
    assert tagged_cfg("vim_tiny", "in1k") == {}  # native: the model's own pretrained_cfg describes its release


@pytest.mark.parametrize("arch, tag, expected", [
    ("convnext_tiny", "fb_in22k_ft_in1k", "supervised-in22k"),
    ("convnext_tiny", "in12k_ft_in1k_384", "supervised-in12k"),
    ("resnet50", "a1_in1k", "supervised-in1k"),
    ("vit_base_patch16_clip_224", "openai", "clip"),
    ("convnext_base", "clip_laion2b_augreg_ft_in12k_in1k", "clip"),
    ("vit_small_patch14_dinov2", "lvd142m", "self-supervised"),
    ("vit_base_patch16_224", "mae", "self-supervised"),
    ("resnet50", "fb_swsl_ig1b_ft_in1k", "unknown"),  # pretrained on Instagram hashtags: no word says so
    ("convnext_test", "shapes", "unknown"),
])
def test_pretraining_from_names(arch: str, tag: str, expected: str) -> None:
    assert pretraining_of(tag, arch) == expected
    assert pretraining_of(None, arch) == "none"


def test_pretraining_from_timm_class_count() -> None:
    assert pretraining_of("x", num_classes=21841) == "supervised-in22k"
    assert pretraining_of("x", num_classes=1000) == "unknown"  # a fine-tuning head says nothing of pretraining
    assert identify_weights("timm/resnet50", True, "fb_swsl_ig1b_ft_in1k").pretraining == "unknown"


# --- local files ----------------------------------------------------------------------------------------------

def test_tagless_file_is_named_by_its_file_name_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "shapes_v2.pth.tar"
    torch.save(create_backbone("convnext_test").state_dict(), path)
    wid = identify_weights("convnext_test", str(path))
    assert (wid.tag, wid.entry, wid.pretraining) == ("shapes_v2", "convnext_test.shapes_v2", "unknown")
    assert wid.weights == f"file:shapes_v2.pth.tar@{_sha8(path)}"
    assert identify_weights("convnext_test", str(path), "mine").entry == "convnext_test.mine"
    assert identify_weights("convnext_test", str(tmp_path / "epoch=3-step=9.ckpt")).tag == "epoch-3-step-9"


def test_two_weights_of_one_architecture_are_two_cells_and_records(make_cfg, tmp_path: Path) -> None:
    torch.manual_seed(1)
    state = create_backbone("convnext_test").state_dict()
    weights = tmp_path / "pretrained_here.safetensors"
    save_file(state, weights)
    records, cells = [], []
    for extra in ([], [f"backbone.pretrained={weights}", "backbone.tag=shapes"]):
        cfg = make_cfg("experiment=battle", "backbone=convnext_test", "trainer.fast_dev_run=true", *extra)
        cell = tmp_path / "battle" / cfg.hydra.sweep.subdir
        run = build_run(cfg, cell)
        run.trainer.test(run.module, datamodule=run.datamodule)
        records.append(finish_run(run, stage="eval"))
        cells.append(cell)
        if extra:
            assert torch.equal(run.backbone.state_dict()["model.stem.0.weight"], state["model.stem.0.weight"])
    assert [c.relative_to(tmp_path / "battle").parts[3] for c in cells] == ["convnext_test", "convnext_test.shapes"]
    random, tagged = (read_record(c) for c in cells)
    assert random == records[0] and tagged == records[1]
    assert (random["backbone"], random["weights"], random["pretraining"], random["entry"]) == (
        "convnext_test", "random", "none", "convnext_test")
    assert (tagged["backbone"], tagged["weights"], tagged["pretraining"], tagged["entry"]) == (
        "convnext_test", f"file:pretrained_here.safetensors@{_sha8(weights)}", "unknown", "convnext_test.shapes")
    assert random["config_hash"] != tagged["config_hash"]
    save_file({k: v + 1 for k, v in state.items()}, weights)  # retrained in place: another run
    assert config_hash(make_cfg("experiment=battle", "backbone=convnext_test", "trainer.fast_dev_run=true",
                                f"backbone.pretrained={weights}", "backbone.tag=shapes")) != tagged["config_hash"]


def test_records_without_entry_fields_read_as_untrained(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("backbone=convnext_test")
    old = make_record(stage="train", status="complete", cfg=cfg, family="baseline", metrics={"acc1": 0.5},
                      params=1, flops=1, wall_time_s=1.0, run_dir=tmp_path, primary_metric="acc1")
    for key in ("weights", "pretraining", "entry"):
        del old[key]
    write_record(tmp_path, old)
    rec = read_record(tmp_path)
    assert (rec["weights"], rec["pretraining"], rec["entry"]) == ("random", "none", "convnext_test")


# --- the backbone config group, answered lazily ---------------------------------------------------------------

def test_backbone_group_is_lazy_and_reaches_timm(make_cfg) -> None:
    cfg = make_cfg("backbone=timm/test_vit", "data.image_size=32")
    assert "backbone" not in ConfigStore.instance().repo  # nothing registered up front
    assert cfg.backbone.name == "timm/test_vit" and cfg.backbone.pretrained is None
    model = instantiate(cfg.backbone)
    assert model.backbone_name == "timm/test_vit" and model.feature_info.strides == (16,)
    tagged = compose(config_name="train", overrides=["backbone=timm/convnext_tiny.fb_in22k"])
    assert (tagged.backbone.name, tagged.backbone.tag, tagged.backbone.pretrained) == (
        "timm/convnext_tiny", "fb_in22k", True)


def test_unknown_timm_name_fails_fast_with_close_matches(make_cfg) -> None:
    with pytest.raises(ValueError, match="unknown timm model 'resnet5'; closest timm names: timm/resnet50"):
        make_cfg("backbone=timm/resnet5")
    with pytest.raises(SystemExit, match="backbone=timm/resnet5: unknown timm model"):
        check_backbone_override(["backbone=convnext_test,timm/resnet5"])
    with pytest.raises(SystemExit, match="backbone=vim_tiny.in22k: vim_tiny has no pretrained weights"):
        check_backbone_override(["backbone=choice(convnext_test,vim_tiny.in22k)"])
    check_backbone_override(["backbone=glob(*mamba*)", "backbone=convnext_tiny.fb_in22k,timm/resnet18"])
