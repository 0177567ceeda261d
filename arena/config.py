"""Hydra wiring: every registered backbone (and every timm model as ``timm/<name>``) is an option
of the ``backbone`` config group, so ``backbone=<name>`` works for any of them without a YAML file.

``register_configs()`` must run before Hydra composes (``train.py``, ``eval.py`` and tests call it).
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from backbones import TIMM_PREFIX, list_backbones

_registered = False


def backbone_node(name: str) -> dict[str, Any]:
    """The config of one backbone option: what ``create_backbone`` receives."""
    return {"_target_": "backbones.create_backbone", "name": name, "pretrained": None, "pretrained_strict": True,
            "img_size": "${oc.select:data.image_size,null}"}


def register_configs() -> None:
    """Register backbone options and the ``slug`` and ``dataset_name`` resolvers (idempotent)."""
    global _registered
    if _registered:
        return
    import timm

    cs = ConfigStore.instance()
    for name in list_backbones():
        cs.store(group="backbone", name=name, node=backbone_node(name))
    for name in timm.list_models():
        cs.store(group="backbone/timm", name=name, node=backbone_node(TIMM_PREFIX + name), package="backbone")
    if not OmegaConf.has_resolver("slug"):
        OmegaConf.register_new_resolver("slug", lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "-", str(s)))
    if not OmegaConf.has_resolver("dataset_name"):
        from arena.data.base import dataset_name

        OmegaConf.register_new_resolver("dataset_name", dataset_name)
    _registered = True


def check_backbone_override(argv: Sequence[str]) -> None:
    """Fail fast, with close names, on an unknown ``backbone=<name>`` on the command line.

    Hydra would list every option (over a thousand with timm's); this names the closest ones.
    """
    import timm

    for arg in argv:
        if not arg.startswith("backbone="):
            continue
        values = arg.split("=", 1)[1]
        for name in values.split(","):  # multirun sweeps: backbone=a,b,c
            if name.startswith(TIMM_PREFIX):
                pool, bare = [TIMM_PREFIX + n for n in timm.list_models()], name
            else:
                pool, bare = list_backbones(), name
            if bare not in pool:
                close = difflib.get_close_matches(bare, pool, n=5, cutoff=0.5)
                hint = f"closest: {', '.join(close)}" if close else "run `arena list` to see them"
                raise SystemExit(f"unknown backbone {name!r}; {hint}. "
                                 f"Any timm model is reachable as backbone={TIMM_PREFIX}<timm name>.")


def resolve_data_config(backbone: Any, image_size: int | None = None) -> dict[str, Any]:
    """timm's preprocessing for ``backbone`` (mean, std, interpolation, crop), at ``image_size`` if set."""
    from timm.data import resolve_data_config as timm_resolve

    cfg = timm_resolve({}, model=backbone)
    if image_size is not None:
        cfg["input_size"] = (3, int(image_size), int(image_size))
    return cfg
