"""Hydra wiring: the ``backbone`` config group and the resolvers the configs use.

Every registered backbone is an option of the ``backbone`` group, and so is every timm model as
``timm/<name>`` and every entry ``<name>.<tag>`` (an architecture with named weights). None of
them has a YAML file: ``BackboneConfigSource`` answers Hydra's questions about the group when
they are asked, so only the options a run names are ever built, validated (with close matches
when unknown) and composed, whether they come from the command line, a sweep, an experiment
config, a checkpoint's overrides or ``hydra.compose``.

``register_configs()`` must run before Hydra composes (``train.py``, ``eval.py`` and tests call it).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

from backbones import TIMM_PREFIX, list_backbones
from backbones._registry import check_backbone_name
from backbones._weights import WeightsId, identify_weights, split_tag, tag_source

GROUP = "backbone"


def slug(text: Any) -> str:
    """``text`` with every run of characters other than letters, digits, ``_``, ``.``, ``-`` replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text))


def backbone_node(option: str) -> dict[str, Any]:
    """The config of one ``backbone=<option>``: what ``create_backbone`` receives.

    ``option`` is a registered name, ``timm/<timm name>``, or either with ``.<tag>``: the
    architecture's weights of that tag (``pretrained=true``, ``tag=<tag>``). ``ValueError`` with
    the closest names, or the known tags, when it names nothing.
    """
    name, tag = split_tag(option)
    check_backbone_name(name)
    if tag is not None:
        tag_source(name, tag)
    return {"_target_": "backbones.create_backbone", "name": name, "pretrained": tag is not None or None,
            "tag": tag, "pretrained_strict": True, "img_size": "${oc.select:data.image_size,null}"}


class BackboneConfigSource(ConfigSource):
    """The ``backbone`` config group, each option built when Hydra asks for it (see the module docstring).

    Hydra lists the registered names as the group's options; ``timm/<name>`` and ``<name>.<tag>``
    are answered without being listed, as there are thousands.
    """

    @staticmethod
    def scheme() -> str:
        return "arena-backbones"

    def available(self) -> bool:
        return True

    @staticmethod
    def _option(config_path: str) -> str | None:
        """``"backbone/timm/resnet50.yaml"`` -> ``"timm/resnet50"``; ``None`` outside the group."""
        path = config_path.strip("/")
        path = path[: -len(".yaml")] if path.endswith(".yaml") else path
        return path[len(GROUP) + 1:] if path.startswith(GROUP + "/") else None

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in (GROUP, GROUP + "/" + TIMM_PREFIX.rstrip("/"))

    def is_config(self, config_path: str) -> bool:
        option = self._option(config_path)
        if option is None or option == TIMM_PREFIX.rstrip("/"):
            return False
        # unknown names and tags are refused by load_config, whose error names the closest ones
        return option in list_backbones() or option.startswith(TIMM_PREFIX) or "." in option

    def load_config(self, config_path: str) -> ConfigResult:
        option = self._option(config_path)
        return ConfigResult(config=OmegaConf.create(backbone_node(option)), path=f"{self.full_path()}{option}",
                            provider=self.provider, header={"package": GROUP})

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        path = config_path.strip("/")
        if path == "" and results_filter in (None, ObjectType.GROUP):
            return [GROUP]
        if path == GROUP and results_filter in (None, ObjectType.CONFIG):
            return list_backbones()
        return []


class BackboneSearchPath(SearchPathPlugin):
    """Puts ``BackboneConfigSource`` on every config search path of this process."""

    def manipulate_search_path(self, search_path: Any) -> None:
        search_path.append(provider="arena", path=f"{BackboneConfigSource.scheme()}://")


def register_configs() -> None:
    """Make the ``backbone`` group and the ``slug``/``entry``/``dataset_name`` resolvers available to Hydra
    (idempotent)."""
    plugins = Plugins.instance()
    plugins.register(BackboneConfigSource)
    plugins.register(BackboneSearchPath)
    if not OmegaConf.has_resolver("slug"):
        OmegaConf.register_new_resolver("slug", slug)
    if not OmegaConf.has_resolver("entry"):
        OmegaConf.register_new_resolver("entry", lambda backbone: slug(weights_id(backbone).entry))
    if not OmegaConf.has_resolver("dataset_name"):
        from arena.data.base import dataset_name

        OmegaConf.register_new_resolver("dataset_name", dataset_name)


def weights_id(backbone: Mapping[str, Any]) -> WeightsId:
    """Architecture, tag, weights and pretraining of a ``backbone`` config (see ``identify_weights``)."""
    return identify_weights(backbone["name"], backbone.get("pretrained"), backbone.get("tag"))


def entry_fields(backbone: Mapping[str, Any]) -> dict[str, str]:
    """The record's ``weights``, ``pretraining`` and ``entry`` of a ``backbone`` config."""
    wid = weights_id(backbone)
    return {"weights": wid.weights, "pretraining": wid.pretraining, "entry": wid.entry}


def check_backbone_override(argv: Sequence[str]) -> None:
    """Fail fast, with close names or known tags, on an unknown ``backbone=...`` on the command line.

    Values are read as Hydra reads them, so sweeps (``backbone=a,b``, ``choice(a,b)``) are checked
    option by option; ``glob(...)`` selects only existing names and needs no check.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    parser = OverridesParser.create()
    for arg in argv:
        if not arg.startswith("backbone="):
            continue
        override = parser.parse_override(arg)
        if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
            continue
        names = override.sweep_string_iterator() if override.is_discrete_sweep() else [
            override.get_value_element_as_str()]
        for name in names:
            try:
                backbone_node(name)
            except ValueError as e:
                raise SystemExit(f"backbone={name}: {e}") from None


def resolve_data_config(backbone: Any, image_size: int | None = None) -> dict[str, Any]:
    """timm's preprocessing for ``backbone`` (mean, std, interpolation, crop), at ``image_size`` if set."""
    from timm.data import resolve_data_config as timm_resolve

    cfg = timm_resolve({}, model=backbone)
    if image_size is not None:
        cfg["input_size"] = (3, int(image_size), int(image_size))
    return cfg
