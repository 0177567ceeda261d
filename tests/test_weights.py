"""Pretrained weights: sources, safe reading, strict matching with a report, and ``arena convert``.

Every checkpoint here is written by the test itself; downloads are patched to fail the way they
do offline, so nothing reaches the network.
"""
from __future__ import annotations

import argparse
import pathlib
import urllib.error
from typing import Any

import huggingface_hub
import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from arena.cli import main as arena_main
from arena.convert import convert
from backbones import Backbone, FeatureInfo, TimmBackbone, as_pyramid, create_backbone, list_backbones
from backbones import _registry
from backbones._features import pretrained_cfg_for
from backbones._weights import LoadReport, load_pretrained, read_checkpoint

TIMM_TINY = ["convnext_test", "maxvit_test", "mambaout_test", "timm/test_vit"]


def _meta(name: str) -> Backbone:
    with torch.device("meta"):
        return create_backbone(name)


_TINY = {n: _meta(n) for n in list_backbones("*_test")}
NATIVE_TINY = [n for n, m in _TINY.items() if not isinstance(m, TimmBackbone)]
REPARAM_TINY = [n for n, m in _TINY.items() if hasattr(m, "reparameterize")]


# --- a native-style family: official keys differ from ours, with a train and a deploy form ----------------
class RepConv(nn.Module):
    """3x3 + 1x1 convs in train form, one 3x3 conv in deploy form (same function)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(x) + (self.conv1(x) if self.conv1 is not None else 0)

    def reparameterize(self) -> None:
        with torch.no_grad():
            self.conv3.weight += F.pad(self.conv1.weight, [1, 1, 1, 1])
            self.conv3.bias += self.conv1.bias
        self.conv1 = None


class TinyNative(Backbone):
    """Levels at strides 4 and 8, a grid position embedding, a reparameterizable block, a ``head``."""

    def __init__(self, *, num_classes: int = 0, img_size: int = 64, out_indices: Any = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // 4) ** 2, 8))
        self.block = RepConv(8)
        self.down = nn.Conv2d(8, 16, 2, stride=2)
        self.head = nn.Linear(16, num_classes) if num_classes else None
        self.all_feature_info = FeatureInfo((8, 16), (4, 8), 16)
        self.set_out_indices(out_indices)
        self.input_multiple = 8
        self.pretrained_cfg = pretrained_cfg_for(
            img_size, url="https://example.org/releases/tiny_native_in1k.pth", classifier="head")

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        h, w = x.shape[-2:]
        x = x + self.pos_embed.transpose(1, 2).reshape(1, 8, h, w)
        x = self.block(x)
        return [x, self.down(x)]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x)[-1].mean((2, 3))

    def get_classifier(self) -> nn.Module:
        if self.head is None:
            return super().get_classifier()
        return self.head

    def reparameterize(self) -> None:
        self.block.reparameterize()


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: TinyNative) -> dict[str, torch.Tensor]:
    """The official release calls the stem ``patch_embed``."""
    out = {k.replace("patch_embed.", "stem.", 1): v for k, v in state_dict.items()}
    return {k: v for k, v in out.items() if model.head is not None or not k.startswith("head.")}


def official(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights in the official key layout."""
    return {k.replace("stem.", "patch_embed.", 1): v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def tiny_native(monkeypatch: pytest.MonkeyPatch) -> str:
    """``tiny_native`` registered for the duration of one test."""
    monkeypatch.setitem(_registry._REGISTRY, "tiny_native",
                        _registry.Entry("tiny_native", TinyNative, "baseline", True))
    return "tiny_native"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> pathlib.Path:
    """No network: downloads fail as they do offline; the torch hub cache is a fresh folder."""

    def no_url(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError(f"[Errno -3] Temporary failure in name resolution: {url}")

    def no_hub(repo_id: str, filename: str, **kwargs: Any) -> str:
        raise LocalEntryNotFoundError("offline mode is enabled and the file is not in the cache")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_url)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    return tmp_path / "torch_home"


def outputs(model: Backbone, size: int = 64) -> list[torch.Tensor]:
    """Every level, then the logits (or the embedding without a classifier), in eval mode, fixed input."""
    model.eval()
    size = model.fixed_input_size or size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            last = model.logits(x)
        except ValueError:  # built without a classifier
            last = model.embed(x)
        return [*model(x), last]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 0.0) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0 if atol == 0 else 1e-4)


def assert_same_weights(model: nn.Module, reference: nn.Module, skip: str | None = None) -> None:
    """``model`` holds exactly ``reference``'s tensors (except those under the prefix ``skip``)."""
    got, want = model.state_dict(), reference.state_dict()
    if skip is None:
        assert got.keys() == want.keys()
    for k, v in want.items():
        if skip is None or not k.startswith(skip):
            assert torch.equal(got[k], v), k


def no_files_but(folder: pathlib.Path, *names: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


# --- sources, wrappers and formats -------------------------------------------------------------------------
WRAPPERS = {
    "bare": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 3},
    "model": lambda sd: {"model": sd, "optimizer": {"lr": 0.1}, "args": argparse.Namespace(lr=0.1)},
    "model_ema": lambda sd: {"model_ema": sd, "epoch": 3},
    "model_and_ema": lambda sd: {"model": sd, "model_ema": {k: torch.zeros_like(v) for k, v in sd.items()}},
    "module": lambda sd: {"module": sd},
    "ddp_prefix": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize(("wrapper", "suffix"), [(w, ".pth") for w in WRAPPERS] + [("bare", ".pt"), ("bare", ".bin")])
def test_pickled_checkpoint_in_every_wrapper_loads(tmp_path: pathlib.Path, wrapper: str, suffix: str) -> None:
    src = create_backbone("convnext_test")
    path = tmp_path / f"weights{suffix}"
    torch.save(WRAPPERS[wrapper](src.model.state_dict()), path)  # timm's official layout
    assert_same_weights(create_backbone("convnext_test", pretrained=str(path)), src)


def test_safetensors_file_loads(tmp_path: pathlib.Path) -> None:
    src = create_backbone("convnext_test")
    save_file(src.model.state_dict(), tmp_path / "w.safetensors")
    report = load_pretrained(model := create_backbone("convnext_test"), tmp_path / "w.safetensors")
    assert report.ok and report.loaded == report.total == len(model.state_dict())
    assert_same_weights(model, src)


@pytest.mark.parametrize("name", TIMM_TINY)
def test_timm_layout_keeps_or_drops_the_classifier(tmp_path: pathlib.Path, name: str) -> None:
    arch = create_backbone(name).timm_name
    size = _meta(name).fixed_input_size
    reference = timm.create_model(arch, **({"img_size": size} if size else {})).eval()
    torch.save(reference.state_dict(), tmp_path / "official.pth")

    with_head = create_backbone(name, num_classes=1000, pretrained=str(tmp_path / "official.pth")).eval()
    x = torch.randn(1, 3, size or 64, size or 64)
    with torch.no_grad():
        torch.testing.assert_close(with_head.logits(x), reference(x))

    backbone_only = create_backbone(name)
    report = load_pretrained(backbone_only, tmp_path / "official.pth")
    assert report.ok and report.classifier.startswith("dropped (1000 classes")


def test_lightning_checkpoint_transfers_the_backbone(tmp_path: pathlib.Path) -> None:
    classifier = create_backbone("convnext_test")
    head = nn.Linear(classifier.embed_dim, 5)
    state = {**{f"backbone.{k}": v for k, v in classifier.state_dict().items()},
             **{f"head.fc.{k}": v for k, v in head.state_dict().items()}}
    torch.save({"epoch": 2, "global_step": 40, "pytorch-lightning_version": "2.6.0", "state_dict": state,
                "optimizer_states": [], "lr_schedulers": [], "hyper_parameters": {"lr": 1e-3}, "loops": {},
                "callbacks": {}}, tmp_path / "last.ckpt")

    detector_backbone = create_backbone("convnext_test", out_indices=(1, 2, 3))
    report = load_pretrained(detector_backbone, tmp_path / "last.ckpt")
    assert report.ok and report.loaded == report.total
    assert report.ignored == ["head.fc.weight", "head.fc.bias"]
    assert "head.* (2 tensors)" in report.table()
    assert_same_weights(detector_backbone, classifier)


def test_lightning_checkpoint_of_a_pyramid_transfers_the_inner_model(tmp_path: pathlib.Path) -> None:
    dense = as_pyramid(create_backbone("timm/test_vit", img_size=64))
    state = {f"backbone.{k}": v for k, v in dense.state_dict().items()}
    state["head.cls.weight"] = torch.zeros(3, 64)
    torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": state}, tmp_path / "seg.ckpt")
    model = create_backbone("timm/test_vit", img_size=64, pretrained=str(tmp_path / "seg.ckpt"))
    assert_same_weights(model, dense.inner)


# --- native families ------------------------------------------------------------------------------------------
def test_native_filter_maps_the_official_layout_and_drops_the_classifier(tmp_path: pathlib.Path) -> None:
    release = TinyNative(num_classes=1000)
    torch.save({"model": official(release)}, tmp_path / "release.pth")
    same = TinyNative(num_classes=1000)
    assert load_pretrained(same, tmp_path / "release.pth").classifier == "loaded (1000 classes)"
    assert_same_weights(same, release)

    backbone = TinyNative()
    report = load_pretrained(backbone, tmp_path / "release.pth")
    assert report.ok and report.classifier.startswith("dropped (1000 classes")
    assert_same_weights(backbone, release, skip="head.")


@pytest.mark.parametrize("name", NATIVE_TINY)
def test_native_family_round_trips_through_convert(tmp_path: pathlib.Path, name: str) -> None:
    torch.manual_seed(0)
    release = create_backbone(name, num_classes=10)
    torch.save({"model": release.state_dict()}, tmp_path / "release.pth")
    loaded = create_backbone(name, num_classes=10, pretrained=str(tmp_path / "release.pth"))
    assert loaded.state_dict().keys() == release.state_dict().keys()
    assert all(torch.equal(v, release.state_dict()[k]) for k, v in loaded.state_dict().items())

    report, meta = convert(tmp_path / "release.pth", tmp_path / "out.safetensors", backbone=name, num_classes=10)
    assert report.ok and meta["form"] == "train" and meta["backbone"] == name
    converted = create_backbone(name, num_classes=10, pretrained=str(tmp_path / "out.safetensors")).eval()
    assert_same_weights(converted, release)
    x = torch.randn(1, 3, release.fixed_input_size or 64, release.fixed_input_size or 64)
    with torch.no_grad():
        assert torch.equal(converted.logits(x), release.eval().logits(x))


@pytest.mark.parametrize("name", REPARAM_TINY)
def test_reparameterized_convert_loads_into_a_train_form_model(tmp_path: pathlib.Path, name: str) -> None:
    torch.manual_seed(0)
    release = create_backbone(name).eval()
    for m in release.modules():  # non-trivial BatchNorm statistics, so folding them is tested
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(release.state_dict(), tmp_path / "train.pth")
    _, meta = convert(tmp_path / "train.pth", tmp_path / "deploy.safetensors", backbone=name, reparameterize=True)
    assert meta["form"] == "deploy"
    model = create_backbone(name)
    report = load_pretrained(model, tmp_path / "deploy.safetensors")
    assert report.ok and report.reparameterized
    assert_same(outputs(model), outputs(release), atol=1e-4)


def test_reparameterized_convert_of_a_native_model(tmp_path: pathlib.Path, tiny_native: str) -> None:
    release = TinyNative()
    torch.save({"state_dict": official(release)}, tmp_path / "release.pth")
    report, meta = convert(tmp_path / "release.pth", tmp_path / "deploy.safetensors", backbone=tiny_native,
                           reparameterize=True)
    with safe_open(str(tmp_path / "deploy.safetensors"), "pt") as f:
        assert f.metadata()["form"] == "deploy" and "block.conv1.weight" not in f.keys()
    model = create_backbone(tiny_native, pretrained=str(tmp_path / "deploy.safetensors"))
    assert model.block.conv1 is None
    assert_same(outputs(model), outputs(release), atol=1e-5)


# --- resizing -----------------------------------------------------------------------------------------------
def test_classifier_is_reinitialized_for_another_class_count(tmp_path: pathlib.Path) -> None:
    src = create_backbone("convnext_test", num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "in1k.pth")
    model = create_backbone("convnext_test", num_classes=10)
    fresh = model.get_classifier().weight.clone()
    report = load_pretrained(model, tmp_path / "in1k.pth")
    assert report.ok and report.classifier == "re-initialized (checkpoint has 1000 classes, the model 10)"
    assert torch.equal(model.get_classifier().weight, fresh)
    assert_same_weights(model, src, skip="model.head.fc.")


def test_classifier_missing_from_the_checkpoint_is_refused(tmp_path: pathlib.Path) -> None:
    torch.save(create_backbone("convnext_test").state_dict(), tmp_path / "backbone.pth")
    with pytest.raises(ValueError, match=r"(?s)missing from the checkpoint.*model\.head\.fc\.weight"):
        create_backbone("convnext_test", num_classes=1000, pretrained=str(tmp_path / "backbone.pth"))


@pytest.mark.parametrize("layout", ["official", "ours"])
def test_position_embedding_is_resized(tmp_path: pathlib.Path, layout: str) -> None:
    src = create_backbone("timm/test_vit", img_size=64)
    torch.save(src.model.state_dict() if layout == "official" else src.state_dict(), tmp_path / "w.pth")
    model = create_backbone("timm/test_vit", img_size=96, pretrained=str(tmp_path / "w.pth"))
    report = load_pretrained(model, tmp_path / "w.pth")
    assert report.resized == [("model.pos_embed", (1, 17, 64), (1, 37, 64))]
    expected = timm.layers.resample_abs_pos_embed(src.model.pos_embed.detach(), [6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(model.model.pos_embed.detach(), expected)


def test_native_grid_position_embedding_is_resized(tmp_path: pathlib.Path) -> None:
    torch.save(TinyNative(img_size=32).state_dict(), tmp_path / "w.pth")
    model = TinyNative(img_size=64)
    report = load_pretrained(model, tmp_path / "w.pth")
    assert report.ok and report.resized == [("pos_embed", (1, 64, 8), (1, 256, 8))]
    assert outputs(model)[0].shape[-1] == 16


@pytest.mark.parametrize("layout", ["official", "ours"])
def test_relative_position_tables_are_resized(tmp_path: pathlib.Path, layout: str) -> None:
    src = create_backbone("maxvit_test", img_size=64)
    torch.save(src.model.state_dict() if layout == "official" else src.state_dict(), tmp_path / "w.pth")
    model = create_backbone("maxvit_test", img_size=128)
    report = load_pretrained(model, tmp_path / "w.pth")
    tables = [k for k in model.state_dict() if k.endswith("relative_position_bias_table")]
    assert report.ok and sorted(k for k, _, _ in report.resized) == sorted(tables)
    assert all(old[0] == 9 and new[0] == 49 for _, old, new in report.resized)  # windows 2x2 -> 4x4
    assert outputs(model)[-1].shape == (1, model.embed_dim)


# --- strictness and the report ----------------------------------------------------------------------------------
def test_strict_refuses_a_partial_checkpoint_and_loads_nothing(tmp_path: pathlib.Path) -> None:
    state = create_backbone("convnext_test").model.state_dict()
    del state["stages.3.blocks.0.mlp.fc2.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["stem.0.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "partial.pth")

    model = create_backbone("convnext_test")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_pretrained(model, tmp_path / "partial.pth")
    message = str(err.value)
    for fragment in ("model.stages.3.blocks.0.mlp.fc2.weight", "model.extra.weight",
                     "model.stem.0.bias checkpoint [7], model [24]", "backbone.pretrained_strict=false"):
        assert fragment in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    create_backbone("convnext_test", pretrained=str(tmp_path / "partial.pth"), pretrained_strict=False)
    report = load_pretrained(model, tmp_path / "partial.pth", strict=False)
    assert not report.ok and report.loaded == report.total - 2
    assert report.missing == ["model.stages.3.blocks.0.mlp.fc2.weight"]
    assert report.unexpected == ["model.extra.weight"]
    assert report.mismatched == [("model.stem.0.bias", (7,), (24,))]
    assert torch.equal(model.model.stem[0].weight, state["stem.0.weight"])


def test_report_table_lists_every_section() -> None:
    report = LoadReport("w.pth", "convnext_test", loaded=3, total=5, missing=[f"k{i}" for i in range(10)],
                        mismatched=[("a", (1,), (2,))], ignored=["head.w", "head.b"])
    table = report.table(limit=3)
    assert table.splitlines()[0].split() == ["source", "w.pth"]
    assert "3/5 tensors" in table and "... and 7 more" in table and "a checkpoint [1], model [2]" in table
    assert "head.* (2 tensors)" in table and not report.ok


def test_checkpoint_of_another_architecture_names_the_best_match(tmp_path: pathlib.Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = [n for n in list_backbones() if _registry.backbone_entry(n).tiny]
    monkeypatch.setattr(_registry, "list_backbones", lambda: tiny)  # candidates: the tiny models, for speed
    torch.save({"model": create_backbone("convnext_test").model.state_dict()}, tmp_path / "convnext.pth")
    with pytest.raises(ValueError, match=r"(?s)does not fit mambaout_test.*registered backbone 'convnext_test'"):
        create_backbone("mambaout_test", pretrained=str(tmp_path / "convnext.pth"))
    torch.save({"x.weight": torch.zeros(3)}, tmp_path / "unrelated.pth")
    with pytest.raises(ValueError, match=r"(?s)no tensor of the checkpoint fits convnext_test.*matches no registered"):
        create_backbone("convnext_test", pretrained=str(tmp_path / "unrelated.pth"), pretrained_strict=False)


# --- bad input ------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs code: it creates the file named in ``marker``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_unsafe_pickle_is_refused_without_running_code(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "code_ran"
    state = create_backbone("convnext_test").state_dict()
    torch.save({"state_dict": state, "extra": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"(?s)builtins\.exec.*refused.*arena convert .*--trust-pickle"):
        create_backbone("convnext_test", pretrained=str(tmp_path / "evil.pth"))
    with pytest.raises(ValueError, match="refused"):
        convert(tmp_path / "evil.pth", tmp_path / "out.safetensors", backbone="convnext_test")
    assert not marker.exists()
    no_files_but(tmp_path, "evil.pth")


def test_trusted_pickle_with_foreign_objects_converts(tmp_path: pathlib.Path) -> None:
    src = create_backbone("convnext_test")
    torch.save({"model": src.state_dict(), "args": {"output_dir": pathlib.Path("/runs/1")}}, tmp_path / "t.pth")
    with pytest.raises(ValueError, match=r"pathlib\.PosixPath"):
        load_pretrained(create_backbone("convnext_test"), tmp_path / "t.pth")
    assert arena_main(["convert", str(tmp_path / "t.pth"), str(tmp_path / "t.safetensors"),
                       "--backbone", "convnext_test", "--trust-pickle"]) == 0
    assert_same_weights(create_backbone("convnext_test", pretrained=str(tmp_path / "t.safetensors")), src)


def _truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_and_corrupt_files_are_refused(tmp_path: pathlib.Path, suffix: str) -> None:
    state = create_backbone("convnext_test").state_dict()
    path = tmp_path / f"w{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, path)
    _truncate(path)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        create_backbone("convnext_test", pretrained=str(path))
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        convert(path, tmp_path / "out.safetensors", backbone="convnext_test")
    no_files_but(tmp_path, path.name)


def test_missing_file_and_unknown_kinds_of_source(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'/no/such/weights.pth' does not exist.*hf-hub:org/repo"):
        create_backbone("convnext_test", pretrained="/no/such/weights.pth")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported extension; accepted: \.safetensors"):
        create_backbone("convnext_test", pretrained=str(tmp_path / "w.txt"))
    with pytest.raises(ValueError, match="pretrained must be one of"):
        create_backbone("convnext_test", pretrained=3)
    torch.save({"epoch": 1, "note": "no weights"}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match=r"holds no state dict: its keys are \['epoch', 'note'\]"):
        create_backbone("convnext_test", pretrained=str(tmp_path / "empty.pth"))


# --- remote sources, offline ---------------------------------------------------------------------------------
def test_default_hub_weights_offline_say_what_to_fetch() -> None:
    with pytest.raises(FileNotFoundError) as err:
        create_backbone("convnext_test", pretrained=True)
    message = str(err.value)
    assert "hf-hub:timm/test_convnext.r160_in1k: model.safetensors is not in the Hugging Face cache" in message
    assert "hf download timm/test_convnext.r160_in1k model.safetensors" in message
    assert "backbone.pretrained=/path/to/model.safetensors" in message


def test_timm_tag_and_hub_id_offline() -> None:
    for source in ("timm:test_convnext.r160_in1k", "hf-hub:timm/test_convnext.r160_in1k"):
        with pytest.raises(FileNotFoundError, match="model.safetensors is not in the Hugging Face cache"):
            create_backbone("convnext_test", pretrained=source)
    with pytest.raises(ValueError, match=r"unknown timm pretrained tag 'test_convnext\.nope'.*r160_in1k"):
        create_backbone("convnext_test", pretrained="timm:test_convnext.nope")


def test_default_release_url_offline_names_the_cache_path(offline: pathlib.Path) -> None:
    cached = offline / "hub" / "checkpoints" / "tiny_native_in1k.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_pretrained(TinyNative(), True)
    message = str(err.value)
    assert "could not download https://example.org/releases/tiny_native_in1k.pth" in message
    assert f"place it at {cached}" in message and "backbone.pretrained=/path/to/tiny_native_in1k.pth" in message

    release = TinyNative()
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": official(release)}, cached)
    model = TinyNative()
    report = load_pretrained(model, "true")
    assert report.ok and report.source == f"https://example.org/releases/tiny_native_in1k.pth (default) ({cached})"
    assert_same_weights(model, release)


def test_hub_repo_without_safetensors_gives_its_bin_file(tmp_path: pathlib.Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    src = create_backbone("convnext_test")
    torch.save(src.model.state_dict(), tmp_path / "pytorch_model.bin")

    def hub(repo_id: str, filename: str, revision: str | None = None) -> str:
        assert (repo_id, revision) == ("org/repo", "v1")
        if filename == "model.safetensors":
            raise EntryNotFoundError(f"404: {filename}")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    report = load_pretrained(model := create_backbone("convnext_test"), "hf-hub:org/repo@v1")
    assert report.source == f"hf-hub:org/repo@v1 ({tmp_path / 'pytorch_model.bin'})"
    assert_same_weights(model, src)


def test_model_without_registered_weights() -> None:
    with pytest.raises(ValueError, match=r"maxvit_test has no registered pretrained weights; pass a local file"):
        create_backbone("maxvit_test", pretrained=True)


# --- arena convert -------------------------------------------------------------------------------------------
def test_convert_writes_metadata_atomically_and_never_overwrites(tmp_path: pathlib.Path) -> None:
    src = create_backbone("convnext_test", num_classes=1000)
    torch.save({"model": src.model.state_dict()}, tmp_path / "release.pth")
    out = tmp_path / "w.safetensors"
    argv = ["convert", str(tmp_path / "release.pth"), str(out), "--backbone", "convnext_test", "--num-classes", "1000"]
    assert arena_main(argv) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("backbone", "variant", "form", "num_classes")} == {
        "backbone": "convnext_test", "variant": "test_convnext", "form": "train", "num_classes": "1000"}
    assert meta["source"] == str(tmp_path / "release.pth")
    no_files_but(tmp_path, "release.pth", "w.safetensors")
    model = create_backbone("convnext_test", num_classes=1000, pretrained=str(out))
    assert_same(outputs(model), outputs(src))

    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        arena_main(argv)
    assert out.read_bytes() == before
    assert arena_main([*argv[:-2], "--overwrite"]) == 0  # drops the classifier this time
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["num_classes"] == "0" and "model.head.fc.weight" not in f.keys()
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        convert(tmp_path / "release.pth", tmp_path / "w.pth", backbone="convnext_test")
    with pytest.raises(ValueError, match="has no reparameterize"):
        convert(tmp_path / "release.pth", tmp_path / "x.safetensors", backbone="convnext_test", reparameterize=True)
    no_files_but(tmp_path, "release.pth", "w.safetensors")


def test_read_checkpoint_exposes_safetensors_metadata(tmp_path: pathlib.Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "a.safetensors", metadata={"form": "deploy"})
    ckpt = read_checkpoint(tmp_path / "a.safetensors")
    assert ckpt.metadata == {"form": "deploy"} and torch.equal(ckpt.state_dict["a"], torch.ones(2))


def test_hydra_overrides_reach_the_loader(tmp_path: pathlib.Path, make_cfg: Any) -> None:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    src = create_backbone("convnext_test")
    state = src.model.state_dict()
    del state["stages.3.blocks.0.mlp.fc2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    overrides = ("backbone=convnext_test", f"backbone.pretrained={tmp_path / 'partial.pth'}")
    with pytest.raises(InstantiationException, match="backbone.pretrained_strict=false"):
        instantiate(make_cfg(*overrides).backbone)
    model = instantiate(make_cfg(*overrides, "++backbone.pretrained_strict=false").backbone)
    assert_same_weights(model, src, skip="model.stages.3.blocks.0.mlp.fc2.")
    for source in ("timm:convnext_tiny.fb_in22k", "hf-hub:timm/convnext_tiny.fb_in22k@main"):  # unquoted values
        assert make_cfg(f"backbone.pretrained={source}").backbone.pretrained == source
