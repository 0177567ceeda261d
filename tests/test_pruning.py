"""Pruning a backbone to its feature levels: what DDP needs for tasks that never call embed()."""
from __future__ import annotations

import pytest
import torch

from arena.tasks import ClassificationTask, DetectionTask, SegmentationTask
from backbones import as_pyramid, create_backbone, list_backbones

TINY = list_backbones("*_test")


def _input(backbone, batch: int = 2) -> torch.Tensor:
    side = backbone.fixed_input_size or backbone.input_multiple
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0))


def _unused(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("name", TINY)
def test_pruned_backbone_trains_every_parameter_and_refuses_embed(name: str) -> None:
    torch.manual_seed(0)
    backbone = as_pyramid(create_backbone(name)).eval()
    x = _input(backbone)
    with torch.no_grad():
        before = backbone(x)
    n_before = sum(p.numel() for p in backbone.parameters())
    backbone.prune_to_features()
    with torch.no_grad():
        after = backbone(x)
    assert [f.shape for f in after] == [f.shape for f in before]
    assert all(torch.equal(a, b) for a, b in zip(after, before)), "pruning changed the features"
    assert sum(p.numel() for p in backbone.parameters()) <= n_before
    sum(f.sum() for f in backbone.train()(x)).backward()
    assert _unused(backbone) == []
    with pytest.raises(ValueError, match="built for features only"):
        backbone.embed(x)


@pytest.mark.parametrize("name", [n for n in TINY if len(create_backbone(n).all_feature_info) > 1])
def test_pruned_to_coarser_levels_every_parameter_still_trains(name: str) -> None:
    """FCOS and RetinaNet read strides 8-32 only: nothing that feeds only stride 4 may stay (DDP)."""
    levels = tuple(range(1, len(create_backbone(name).all_feature_info)))
    backbone = create_backbone(name, out_indices=levels).prune_to_features()
    sum(f.sum() for f in backbone(_input(backbone))).backward()
    assert _unused(backbone) == []


@pytest.mark.parametrize("name", ["vit_test", "vim_test"])
def test_pyramid_prunes_the_scales_a_head_does_not_read(name: str) -> None:
    pyramid = as_pyramid(create_backbone(name), strides=(8, 16, 32)).prune_to_features()
    assert pyramid.feature_info.strides == (8, 16, 32)
    sum(f.sum() for f in pyramid(_input(pyramid))).backward()
    assert _unused(pyramid) == []
    assert not any(k.startswith("scales.0.") for k in pyramid.state_dict())
    with pytest.raises(ValueError, match="out_indices"):
        pyramid.set_out_indices((0, 1, 2, 3))


@pytest.mark.parametrize("name", ["convnext_test", "vmamba_test"])
def test_checkpoint_with_the_pooled_head_loads_into_a_pruned_backbone(name: str) -> None:
    full = create_backbone(name)
    pruned = create_backbone(name).prune_to_features()
    assert pruned.pruned_keys and pruned.pruned_keys <= set(full.state_dict())
    pruned.load_state_dict(full.state_dict(), strict=True)
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in pruned.state_dict().items())


def test_dense_tasks_prune_and_classification_keeps_embed() -> None:
    torch.manual_seed(0)
    seg = SegmentationTask(backbone=create_backbone("convnext_test"), num_classes=3, head="semantic_fpn",
                           head_kwargs={"channels": 16})
    x = torch.randn(2, 3, 64, 64)
    loss = seg.training_step((x, torch.randint(0, 3, (2, 64, 64))), 0)
    loss.backward()
    assert seg.backbone.features_only and _unused(seg) == []
    grouped = {id(p) for g in seg._backbone_groups() + seg._head_groups() for p in g["params"]}
    assert grouped == {id(p) for p in seg.parameters()}  # every optimised parameter is a trained one

    det = DetectionTask(backbone=create_backbone("resnet_test"), num_classes=3, head="retinanet", image_size=64,
                        fpn_channels=64)
    assert det.backbone.features_only and "model.fc.weight" not in dict(det.named_parameters())

    cls = ClassificationTask(backbone=create_backbone("convnext_test"), num_classes=3)
    assert not cls.backbone.features_only
    assert cls(x).shape == (2, 3)


@pytest.mark.parametrize("name", TINY)
def test_classification_trains_every_trainable_backbone_parameter(name: str) -> None:
    task = ClassificationTask(backbone=create_backbone(name), num_classes=3)
    x = _input(task.backbone)
    task.training_step((x, torch.tensor([0, 2])), 0).backward()
    assert _unused(task) == []
    assert sum(p.numel() for p in task.backbone.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize("head", ["faster_rcnn", "mask_rcnn", "retinanet", "fcos"])
def test_every_detection_head_trains_every_parameter(head: str) -> None:
    torch.manual_seed(0)
    task = DetectionTask(backbone=create_backbone("convnext_test"), num_classes=3, head=head, image_size=64,
                         fpn_channels=64)
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 4:30, 4:30] = masks[1, 20:50, 20:60] = 1
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0], [20.0, 20.0, 60.0, 50.0]]),
              "labels": torch.tensor([1, 2]), "masks": masks}
    task.training_step(([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], [target, target]), 0).backward()
    assert _unused(task) == []


def test_upernet_without_auxiliary_loss_drops_the_auxiliary_head() -> None:
    task = SegmentationTask(backbone=create_backbone("convnext_test"), num_classes=3, head="upernet", aux_weight=0.0,
                            head_kwargs={"channels": 16})
    assert task.head.aux is None
    task.training_step((torch.rand(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))), 0).backward()
    assert _unused(task) == []
