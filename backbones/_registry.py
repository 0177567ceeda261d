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


def check_backbone_name(name: str) -> str:
    """``name`` if it is registered or ``timm/<a timm model>``; ``ValueError`` naming the closest names otherwise."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")
    if not name.startswith(TIMM_PREFIX):
        backbone_entry(name)
        return name
    import timm

    timm_name = name[len(TIMM_PREFIX):]
    if not timm.is_model(timm_name):
        close = difflib.get_close_matches(timm_name, timm.list_models(), n=5, cutoff=0.5)
        raise ValueError(f"unknown timm model {timm_name!r}; closest timm names: "
                         f"{', '.join(TIMM_PREFIX + c for c in close) or 'none'}")
    return name


def create_backbone(name: str, pretrained: Any = None, *, tag: str | None = None, pretrained_strict: bool = True,
                    **overrides: Any) -> Backbone:
    """Build a registered backbone (or ``timm/<name>``) and optionally load weights.

    ``pretrained``: ``None``/``False`` for random init, ``True`` for the registered default
    source, a local checkpoint path, or a hub id (see ``backbones._weights``); ``pretrained_strict=False``
    loads what fits instead of refusing a checkpoint that does not match exactly. ``tag`` names the
    weights, as in timm's ``<name>.<tag>`` (which ``name`` may also be): with ``pretrained=True`` the
    architecture's weights of that tag are loaded (``pretrained_tags(name)`` lists them); with another
    source it only names them. ``overrides`` go to the entrypoint (``out_indices``, ``img_size``,
    ``drop_path_rate``, ...).

    >>> b = create_backbone("convnext_test")
    >>> b.feature_info.strides
    (4, 8, 16, 32)
    """
    from ._weights import check_tag, load_pretrained, split_tag, tag_source, tagged_cfg

    name, name_tag = split_tag(name)
    check_backbone_name(name)
    if name_tag is not None and tag is not None and name_tag != tag:
        raise ValueError(f"two tags for one backbone: {name}.{name_tag} and tag={tag!r}; give one")
    tag = check_tag(tag) if tag is not None else name_tag
    if tag is not None and pretrained in (None, False):
        raise ValueError(f"tag {tag!r} names pretrained weights, but pretrained={pretrained!r} means random init: "
                         f"pass pretrained=True to load {name}.{tag} (backbone.pretrained=true), or the file it "
                         f"names, or drop the tag")
    released = tag is not None and (pretrained is True or str(pretrained).lower() == "true")
    if released:
        pretrained = tag_source(name, tag)
    if name.startswith(TIMM_PREFIX):
        model: Backbone = TimmBackbone(name[len(TIMM_PREFIX):], **overrides)
    else:
        model = backbone_entry(name).fn(**overrides)
    model.backbone_name = name
    if released:
        model.pretrained_cfg.update(tag=tag, **tagged_cfg(name, tag))
    if pretrained not in (None, False):
        load_pretrained(model, pretrained, strict=pretrained_strict)
    return model
