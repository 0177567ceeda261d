"""One name -> entrypoint registry for every backbone, native or timm-backed.

Entrypoints are tiny functions decorated with ``@register_backbone(family=...)`` whose body is a
dict of arguments (timm's convention). Any timm model is reachable as ``timm/<name>``.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

from ._features import Backbone, TimmBackbone

FAMILIES = ("hybrid", "multi-axis", "state-space", "large-kernel", "baseline")
TIMM_PREFIX = "timm/"


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable[..., Backbone]
    family: str
    tiny: bool  # a small test variant, not a model from a paper


_REGISTRY: dict[str, Entry] = {}


def register_backbone(fn: Callable[..., Backbone] | None = None, *, family: str, tiny: bool = False):
    """Register ``fn`` under its own name. Use as ``@register_backbone(family="hybrid")``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def deco(f: Callable[..., Backbone]) -> Callable[..., Backbone]:
        name = f.__name__
        if name in _REGISTRY and _REGISTRY[name].fn.__module__ != f.__module__:
            raise ValueError(f"backbone {name!r} is already registered by {_REGISTRY[name].fn.__module__}")
        _REGISTRY[name] = Entry(name, f, family, tiny)
        return f

    return deco(fn) if fn is not None else deco


def list_backbones(pattern: str = "*", *, family: str | None = None, include_tiny: bool = True) -> list[str]:
    """Registered names matching a shell-style ``pattern`` (e.g. ``"*mamba*"``), sorted.

    >>> "convnext_tiny" in list_backbones("convnext*")
    True
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return sorted(
        n for n, e in _REGISTRY.items()
        if fnmatch.fnmatchcase(n, pattern) and (family is None or e.family == family) and (include_tiny or not e.tiny)
    )


def backbone_entry(name: str) -> Entry:
    """The registry entry of ``name``; ``ValueError`` listing close names when unknown."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
    hint = f"closest registered names: {', '.join(close)}" if close else "see `arena list`"
    raise ValueError(
        f"unknown backbone {name!r}; {hint}. Any timm model is reachable as '{TIMM_PREFIX}<timm name>'."
    )


def create_backbone(name: str, pretrained: Any = None, *, pretrained_strict: bool = True, **overrides: Any) -> Backbone:
    """Build a registered backbone (or ``timm/<name>``) and optionally load weights.

    ``pretrained``: ``None``/``False`` for random init, ``True`` for the registered default
    source, a local checkpoint path, or a hub id (see ``backbones._weights``); ``pretrained_strict=False``
    loads what fits instead of refusing a checkpoint that does not match exactly. ``overrides`` go
    to the entrypoint (``out_indices``, ``img_size``, ``drop_path_rate``, ...).

    >>> b = create_backbone("convnext_test")
    >>> b.feature_info.strides
    (4, 8, 16, 32)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")
    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX):]
        import timm

        if not timm.is_model(timm_name.split(".")[0]):
            close = difflib.get_close_matches(timm_name, timm.list_models(), n=5, cutoff=0.5)
            raise ValueError(f"unknown timm model {timm_name!r}; closest timm names: {', '.join(close) or 'none'}")
        model = TimmBackbone(timm_name, **overrides)
    else:
        model = backbone_entry(name).fn(**overrides)
    model.backbone_name = name
    if pretrained not in (None, False):
        from ._weights import load_pretrained

        load_pretrained(model, pretrained, strict=pretrained_strict)
    return model
