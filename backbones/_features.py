"""The feature contract every backbone follows, the timm adapter, and the simple pyramid.

A backbone is an ``nn.Module`` whose ``forward(x)`` returns a list of NCHW feature maps with
ascending strides, described by ``feature_info`` (channels and stride per returned level and
the width of ``embed(x)``, the model's own pooled image embedding). Heads read
``feature_info`` and nothing else from the backbone.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DENSE_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class FeatureInfo:
    """Channels and stride of each returned level, plus the embedding width.

    >>> info = FeatureInfo(channels=(64, 128), strides=(8, 16), embed_dim=128)
    >>> list(info)
    [(64, 8), (128, 16)]
    """

    channels: tuple[int, ...]
    strides: tuple[int, ...]
    embed_dim: int

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.strides) or not self.channels:
            raise ValueError(
                f"FeatureInfo needs one channel count per stride, got channels={self.channels} "
                f"strides={self.strides}"
            )
        if list(self.strides) != sorted(self.strides):
            raise ValueError(f"FeatureInfo strides must ascend, got {self.strides}")

    def __len__(self) -> int:
        return len(self.channels)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self.channels, self.strides))

    def select(self, indices: Sequence[int]) -> "FeatureInfo":
        return FeatureInfo(
            tuple(self.channels[i] for i in indices), tuple(self.strides[i] for i in indices), self.embed_dim
        )


def default_out_indices(strides: Sequence[int]) -> tuple[int, ...]:
    """The last level of each dense stride (4-32); the last level when none is dense."""
    last: dict[int, int] = {}
    for i, s in enumerate(strides):
        if s in DENSE_STRIDES:
            last[s] = i
    return tuple(sorted(last.values())) or (len(strides) - 1,)


class Backbone(nn.Module):
    """Base class: subclasses implement ``forward_levels`` (all levels) and ``embed``.

    Subclasses set ``self.all_feature_info`` (every level ``forward_levels`` returns) and call
    ``self.set_out_indices``. ``input_multiple`` is what input sides must be divisible by and
    ``fixed_input_size`` the only size a model takes, when it has one. ``embed_modules`` names
    the submodules only ``embed`` uses (the pooled head): ``prune_to_features`` drops them;
    ``feature_modules`` those ``embed`` never uses: ``freeze_feature_modules`` freezes them.
    """

    family: str = "baseline"
    all_feature_info: FeatureInfo
    out_indices: tuple[int, ...]
    input_multiple: int = 32
    fixed_input_size: int | None = None
    pretrained_cfg: dict[str, Any]
    embed_modules: tuple[str, ...] = ()
    feature_modules: tuple[str, ...] = ()
    features_only: bool = False  # set by prune_to_features: embed() raises
    pruned_keys: frozenset[str] = frozenset()  # state-dict keys prune_to_features removed

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "embed" in cls.__dict__:  # every family's embed() refuses to run once the pooled head is gone
            cls.embed = _refused_when_pruned(cls.__dict__["embed"])

    def prune_to_features(self) -> "Backbone":
        """Drop every parameter ``forward`` does not use: the pooled head, and layers past the last returned level.

        For tasks that read only feature levels (detection, segmentation): each remaining
        parameter then gets a gradient from the task's loss, which DistributedDataParallel
        requires, and the optimiser holds no state or weight decay for unused weights.
        Afterwards ``embed`` raises and ``out_indices`` are fixed; checkpoints that still hold the
        dropped tensors load, those tensors being ignored. Returns ``self``.

        >>> from backbones import create_backbone
        >>> b = create_backbone("convnext_test").prune_to_features()
        >>> sorted(b.pruned_keys)
        ['model.head.norm.bias', 'model.head.norm.weight']
        """
        if self.features_only:
            return self
        before = set(self.state_dict())
        self._drop_embed_modules()
        self.pruned_keys = frozenset(before - set(self.state_dict()))
        self.features_only = True
        self.register_load_state_dict_pre_hook(_skip_pruned_keys)
        return self

    def _drop_embed_modules(self) -> None:
        """Remove what only ``embed`` uses; families list it in ``embed_modules``."""
        for name in self.embed_modules:
            owner_name, _, leaf = name.rpartition(".")
            owner = self.get_submodule(owner_name)
            if getattr(owner, leaf, None) is not None:
                setattr(owner, leaf, None)

    def freeze_feature_modules(self) -> "Backbone":
        """Freeze the submodules ``embed`` never uses, for tasks that read only ``embed``; returns ``self``.

        They get no gradient from such a task (so no update either), and DistributedDataParallel
        refuses trainable parameters without one.
        """
        for name in self.feature_modules:
            self.get_submodule(name).requires_grad_(False)
        return self

    def set_out_indices(self, out_indices: Sequence[int] | None) -> None:
        if self.features_only:
            raise ValueError(f"{type(self).__name__} was pruned to out_indices={self.out_indices} by "
                             f"prune_to_features(); set out_indices when building it (backbone.out_indices)")
        n = len(self.all_feature_info)
        if out_indices is None:
            out_indices = default_out_indices(self.all_feature_info.strides)
        out_indices = tuple(i % n if -n <= i < n else i for i in out_indices)
        bad = [i for i in out_indices if not 0 <= i < n]
        if bad or list(out_indices) != sorted(set(out_indices)):
            raise ValueError(
                f"out_indices must be distinct ascending level indices in [0, {n - 1}], got {out_indices}; "
                f"levels are (channels, stride) {list(self.all_feature_info)}"
            )
        self.out_indices = out_indices

    @property
    def feature_info(self) -> FeatureInfo:
        return self.all_feature_info.select(self.out_indices)

    @property
    def embed_dim(self) -> int:
        return self.all_feature_info.embed_dim

    def check_input_size(self, height: int, width: int) -> None:
        """Raise ``ValueError`` naming the accepted sizes when this model cannot take HxW."""
        name = type(self).__name__
        if self.fixed_input_size is not None and (height, width) != (self.fixed_input_size,) * 2:
            raise ValueError(
                f"{name} was built for {self.fixed_input_size}x{self.fixed_input_size} inputs, got "
                f"{height}x{width}; build it with img_size={height} (backbone.img_size={height}) "
                f"or resize the data to {self.fixed_input_size}"
            )
        m = self.input_multiple
        if height % m or width % m:
            raise ValueError(
                f"{name} needs input sides divisible by {m}, got {height}x{width}; "
                f"use e.g. {max(m, round(height / m) * m)}x{max(m, round(width / m) * m)} (data.image_size)"
            )

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input_size(x.shape[-2], x.shape[-1])
        levels = self.forward_levels(x)
        return [levels[i] for i in self.out_indices]

    def get_classifier(self) -> nn.Module:
        """The model's own classifier (built with ``num_classes > 0``), under its official name."""
        raise ValueError(f"{type(self).__name__} was built without a classifier; create it with num_classes=N")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores from the model's own classifier on its embedding (for checking pretrained weights)."""
        return self.get_classifier()(self.embed(x))


def _refused_when_pruned(embed: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(embed)
    def guarded(self: Backbone, x: torch.Tensor) -> torch.Tensor:
        if self.features_only:
            raise ValueError(
                f"this backbone ({type(self).__name__}) was built for features only: prune_to_features() removed "
                f"its pooled head, so embed() is unavailable. Tasks that read embed() (classification) keep it; "
                f"build the backbone again without pruning to use embed()")
        return embed(self, x)

    return guarded


def _skip_pruned_keys(module: Backbone, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: ignore tensors of modules ``prune_to_features`` removed (older checkpoints)."""
    for key in module.pruned_keys:
        state_dict.pop(prefix + key, None)


def pretrained_cfg_for(input_size: int | Sequence[int] = 224, **kw: Any) -> dict[str, Any]:
    """A timm-style ``pretrained_cfg`` so ``timm.data.resolve_data_config`` works on any backbone.

    ``input_size`` is a side length or timm's own ``(C, H, W)``.
    """
    size = (3, input_size, input_size) if isinstance(input_size, int) else tuple(int(v) for v in input_size)
    cfg = dict(input_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
               interpolation="bicubic", crop_pct=0.875, num_classes=1000)
    cfg.update(kw)
    return cfg


def _to_nchw(t: torch.Tensor, channels: int) -> torch.Tensor:
    if t.ndim == 4 and t.shape[1] != channels and t.shape[-1] == channels:
        return t.permute(0, 3, 1, 2).contiguous()
    return t


class TimmBackbone(Backbone):
    """Any timm model behind the feature contract, via ``forward_intermediates``.

    >>> b = TimmBackbone("test_convnext")
    >>> [tuple(f.shape) for f in b(torch.zeros(1, 3, 64, 64))]
    [(1, 24, 16, 16), (1, 32, 8, 8), (1, 48, 4, 4), (1, 64, 2, 2)]
    """

    def __init__(
        self,
        model: str | nn.Module,
        *,
        out_indices: Sequence[int] | None = None,
        family: str = "baseline",
        img_size: int | None = None,
        num_classes: int = 0,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        import timm

        if isinstance(model, str):
            model = _create_timm(model, img_size=img_size, num_classes=num_classes, **model_kwargs)
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"timm model {type(model).__name__} has no forward_intermediates; it cannot be a backbone")
        if num_classes == 0:
            model.reset_classifier(0)
        self.model = model
        self.family = family
        info = model.feature_info
        strides = tuple(int(f["reduction"]) for f in info)
        embed_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        self.all_feature_info = FeatureInfo(tuple(int(f["num_chs"]) for f in info), strides, embed_dim)
        self.set_out_indices(out_indices)
        self.input_multiple = max(strides)
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        self.pretrained_cfg = pretrained_cfg_for(**{k: v for k, v in cfg.items() if k in
                                                    ("input_size", "mean", "std", "interpolation", "crop_pct")})
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        dynamic = getattr(getattr(model, "patch_embed", None), "dynamic_img_size", False) or getattr(
            model, "dynamic_img_size", False)
        if isinstance(size, (tuple, list)) and not dynamic:
            self.fixed_input_size = int(size[0])
        elif img_size is not None and "img_size" in _init_params(type(model)) and not dynamic:
            self.fixed_input_size = int(img_size)
        self.timm_name = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = self.model.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
        full = [None] * len(self.all_feature_info)
        for i, o in zip(self.out_indices, outs):
            full[i] = _to_nchw(o, self.all_feature_info.channels[i])
        return full

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x.shape[-2], x.shape[-1])
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def _drop_embed_modules(self) -> None:
        """timm's own pruning: final norm, pooled head and blocks after the last returned level."""
        self.model.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)

    def get_classifier(self) -> nn.Module:
        """timm's own classifier, kept when built with ``num_classes > 0``."""
        if not self.model.num_classes:
            return super().get_classifier()
        return self.model.get_classifier()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return _prefix_matcher(self.model.group_matcher(coarse=coarse), "model.")

    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.model, "no_weight_decay", lambda: set())()
        return {f"model.{n}" for n in nwd}


def _init_params(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)


def _create_timm(name: str, *, img_size: int | None, num_classes: int, **kwargs: Any) -> nn.Module:
    import timm

    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, num_classes=num_classes, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(name, num_classes=num_classes, **kwargs)


def _prefix_matcher(matcher: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Re-root a timm ``group_matcher`` (regex strings or lists of (regex, order)) under ``prefix``."""
    import re

    def fix(pattern: str) -> str:
        return "^" + re.escape(prefix) + pattern[1:] if pattern.startswith("^") else re.escape(prefix) + pattern

    out: dict[str, Any] = {}
    for k, v in matcher.items():
        if isinstance(v, str):
            out[k] = fix(v)
        else:
            out[k] = [(fix(p), order) for p, order in v]
    return out


class SimpleFeaturePyramid(Backbone):
    """ViTDet's simple pyramid: one stride-16 map -> strides 4, 8, 16, 32 (deconv, identity, pool).

    Wraps a single-stride backbone so dense heads see four levels; ``embed`` is the inner
    model's own embedding.
    """

    def __init__(self, backbone: Backbone, *, out_channels: int | None = None) -> None:
        super().__init__()
        if len(backbone.feature_info) != 1:
            raise ValueError(f"SimpleFeaturePyramid wraps single-level backbones, got {backbone.feature_info}")
        (c, s), = backbone.feature_info
        if s != 16:
            raise ValueError(f"SimpleFeaturePyramid expects a stride-16 level, got stride {s}")
        self.inner = backbone
        self.family = backbone.family
        oc = out_channels or c
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(c, c // 2, 2, 2), nn.GroupNorm(1, c // 2), nn.GELU(),
                          nn.ConvTranspose2d(c // 2, oc, 2, 2)),
            nn.ConvTranspose2d(c, oc, 2, 2),
            nn.Conv2d(c, oc, 1),
            nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(c, oc, 1)),
        ])
        self.all_feature_info = FeatureInfo((oc,) * 4, DENSE_STRIDES, backbone.embed_dim)
        self.set_out_indices(None)
        self.input_multiple = max(32, backbone.input_multiple)
        self.fixed_input_size = backbone.fixed_input_size
        self.pretrained_cfg = backbone.pretrained_cfg

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        (f,) = self.inner(x)
        return [m(f) if i in self.out_indices else None for i, m in enumerate(self.scales)]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.embed(x)

    def _drop_embed_modules(self) -> None:
        """The inner model's pooled head, and the scales of levels not returned."""
        self.inner.prune_to_features()
        for i in range(len(self.scales)):
            if i not in self.out_indices:
                self.scales[i] = nn.Identity()


def as_pyramid(backbone: Backbone, strides: Sequence[int] = DENSE_STRIDES) -> Backbone:
    """What a dense head asks for: the backbone itself if it has several levels (returning only those
    at ``strides``, when it has them, so nothing is computed for a level no head reads), else a
    simple pyramid."""
    if len(backbone.feature_info) > 1:
        read = tuple(i for i in backbone.out_indices if backbone.all_feature_info.strides[i] in strides)
        if read and read != backbone.out_indices:
            backbone.set_out_indices(read)
        return backbone
    pyr = SimpleFeaturePyramid(backbone)
    pyr.set_out_indices([DENSE_STRIDES.index(s) for s in strides])
    return pyr


__all__ = ["FeatureInfo", "Backbone", "TimmBackbone", "SimpleFeaturePyramid", "as_pyramid",
           "pretrained_cfg_for", "default_out_indices"]
