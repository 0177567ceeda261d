"""Pretrained weights: where they come from, how they are read safely, and how they are matched.

Sources, for ``create_backbone(name, pretrained=...)`` and ``backbone.pretrained=...``:

* ``True`` -- the registered default: the timm pretrained tag of a timm-backed model, the
  official release (``pretrained_cfg["url"]`` or ``["hf_hub_id"]``) of a native one. Downloads go
  to the torch hub cache (URLs) or the Hugging Face cache (hub ids).
* a local file: ``.safetensors``, ``.pth``, ``.pt``, ``.bin``, ``.ckpt``, ``.pth.tar``; a bare state
  dict or one wrapped in ``state_dict``, ``model``, ``module``, ``model_ema`` or ``state_dict_ema``,
  including this project's Lightning checkpoints (only the ``backbone.*`` part is taken).
* ``hf-hub:org/repo[@revision]`` -- a Hugging Face repository (``model.safetensors``, else
  ``pytorch_model.bin``).
* ``timm:<model>.<tag>`` -- any timm pretrained tag, e.g. ``timm:convnext_tiny.fb_in22k``.
* ``https://...`` -- a checkpoint URL.

Pickled files are read with ``torch.load(weights_only=True)``: tensors and plain containers only
(plus ``argparse.Namespace``, which training scripts store as ``args``). A checkpoint that needs
any other object unpickled is refused, never executed.

Loading is strict: the report (``LoadReport``) lists missing, unexpected and shape-mismatched
keys, and a checkpoint with any of them is refused unless ``strict=False``. Two differences are
adaptations, not errors: a classifier whose class count differs from the model's is dropped (the
model keeps its own, freshly initialized one, or none with ``num_classes=0``), and absolute
position embeddings and relative-position tables are resized to the model's resolution.

A checkpoint whose keys all exist in the model (``arena convert`` output, Lightning checkpoints,
``model.state_dict()``) is used as is; any other goes through the family's
``checkpoint_filter_fn(state_dict, model)`` (timm's own filter for timm-backed models), which maps
the official key layout, train or deploy form, to the model's. A wrapper holding both plain and
EMA weights gives the plain ones (``state_dict``/``model``), as official evaluations use them,
unless the model's ``pretrained_cfg["state_dict_key"]`` names the one its release is evaluated
with (GLNet-16g: ``model_ema``).

>>> import tempfile, torch
>>> from backbones import create_backbone
>>> path = tempfile.mkdtemp() + "/weights.pth"
>>> torch.save({"model": create_backbone("convnext_test").state_dict()}, path)
>>> report = load_pretrained(create_backbone("convnext_test"), path)
>>> report.ok, report.loaded == report.total
(True, True)
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import pickle
import re
import sys
import urllib.parse
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import torch
from torch import Tensor, nn

from ._features import TimmBackbone
from ._registry import TIMM_PREFIX

_logger = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
TIMM_TAG_PREFIX = "timm:"
URL_PREFIXES = ("https://", "http://")
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
WRAPPER_KEYS = ("state_dict", "model", "module", "model_ema", "state_dict_ema")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
# Checkpoints of this project hold the backbone under these attribute names: the task module's
# ``backbone`` and, for single-stride models in dense tasks, the simple pyramid's ``inner``.
BACKBONE_PREFIXES = ("backbone.", "inner.")
SOURCES_HELP = (
    "pretrained=true (registered default), a local .safetensors/.pth/.pt/.bin/.ckpt file, "
    "hf-hub:org/repo, timm:<model>.<tag> or an https:// URL"
)

StateDict = dict[str, Tensor]
Shape = tuple[int, ...]


@dataclass
class Checkpoint:
    """A state dict as read from a source, before it is matched to a model."""

    state_dict: StateDict
    source: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadReport:
    """What loading a checkpoint did: the keys that did not fit and the adaptations made.

    Keys are named as in ``model.state_dict()``. ``ok`` is what strict loading requires.
    """

    source: str
    model: str
    loaded: int = 0
    total: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)  # key, checkpoint, model
    resized: list[tuple[str, Shape, Shape]] = field(default_factory=list)  # position tables
    classifier: str = "none"
    ignored: list[str] = field(default_factory=list)  # checkpoint keys outside the backbone (task heads)
    reparameterized: bool = False  # model switched to deploy form to match a deploy-form checkpoint

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def table(self, limit: int = 8) -> str:
        """The report as an aligned two-column table, one key per line, long lists cut to ``limit``."""
        rows: list[tuple[str, list[str]]] = [
            ("source", [self.source]),
            ("model", [self.model + (" (reparameterized to deploy form)" if self.reparameterized else "")]),
            ("loaded", [f"{self.loaded}/{self.total} tensors"]),
            ("classifier", [self.classifier]),
            ("resized", [f"{k} {list(a)} -> {list(b)}" for k, a, b in self.resized]),
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mismatched", [f"{k} checkpoint {list(a)}, model {list(b)}" for k, a, b in self.mismatched]),
            ("ignored", _group_by_prefix(self.ignored)),
        ]
        lines = []
        for name, values in rows:
            shown = values[:limit] + ([f"... and {len(values) - limit} more"] if len(values) > limit else [])
            for i, value in enumerate(shown or ["-"]):
                lines.append(f"  {name if i == 0 else '':<11} {value}")
        return "\n".join(lines)


def _group_by_prefix(keys: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    for k in keys:
        head = k.split(".")[0]
        counts[head] = counts.get(head, 0) + 1
    return [f"{head}.* ({n} tensors)" for head, n in counts.items()]


# --- sources ----------------------------------------------------------------------------------------
def read_checkpoint(source: Any, model: nn.Module | None = None, *, trust_pickle: bool = False) -> Checkpoint:
    """Fetch (when remote) and read ``source`` into a flat state dict.

    ``model`` is needed for ``source=True`` (its registered default). ``trust_pickle=True`` lets
    ``torch.load`` unpickle arbitrary objects: only for ``arena convert --trust-pickle`` on files
    from a trusted origin, never when loading a model.
    """
    if isinstance(source, str) and source.lower() == "true":
        source = True
    if source is True:
        if model is None:
            raise ValueError("pretrained=True means the model's registered default weights; pass the model too")
        location, filename = default_location(model)
        path, described = _fetch(location, filename), f"{location} (default)"
    elif isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith(TIMM_TAG_PREFIX):
            location, filename = _timm_tag_location(text[len(TIMM_TAG_PREFIX):])
            path, described = _fetch(location, filename), text
        elif text.startswith(HUB_PREFIX) or text.startswith(URL_PREFIXES):
            path, described = _fetch(text), text
        else:
            path, described = Path(text).expanduser(), text
    else:
        raise ValueError(f"pretrained must be one of {SOURCES_HELP}; got {source!r}")
    obj, metadata = _read_file(path, trust_pickle=trust_pickle)
    if described != str(path):
        described = f"{described} ({path})"
    prefer = ((getattr(model, "pretrained_cfg", None) or {}).get("state_dict_key"),) if model is not None else ()
    return Checkpoint(_unwrap(obj, described, prefer=tuple(k for k in prefer if k)), described, metadata)


def default_location(model: nn.Module) -> tuple[str, str | None]:
    """Where the registered default weights of ``model`` live: a URL or ``hf-hub:`` id, and a file name."""
    cfgs = [getattr(model, "pretrained_cfg", None) or {}]
    if isinstance(model, TimmBackbone):  # timm/<name> models keep the source in timm's own cfg only
        cfgs.append(model.model.pretrained_cfg)
    for cfg in cfgs:
        if cfg.get("hf_hub_id"):
            return HUB_PREFIX + cfg["hf_hub_id"], cfg.get("hf_hub_filename")
        if cfg.get("url"):
            return cfg["url"], None
    name = getattr(model, "backbone_name", type(model).__name__)
    raise ValueError(
        f"{name} has no registered pretrained weights; pass a local file instead "
        f"(pretrained=/path/to/weights.safetensors, or backbone.pretrained=... from Hydra)"
    )


def _timm_tag_location(tag: str) -> tuple[str, str | None]:
    import timm
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(tag)
    except RuntimeError:  # timm's answer for a known architecture with an unknown tag
        cfg = None
    if cfg is None:
        arch = tag.split(".")[0]
        known = timm.list_pretrained(f"{arch}.*") if timm.is_model(arch) else []
        raise ValueError(
            f"unknown timm pretrained tag {tag!r}; "
            + (f"tags of {arch}: {', '.join(known)}" if known else "list them with timm.list_pretrained('<model>*')")
        )
    if cfg.hf_hub_id:
        return HUB_PREFIX + cfg.hf_hub_id, cfg.hf_hub_filename
    if cfg.url:
        return cfg.url, None
    raise ValueError(f"timm tag {tag!r} has no downloadable weights (no hub id or URL)")


def _fetch(location: str, filename: str | None = None) -> Path:
    """A local path for a remote ``location``: the cached copy, downloaded first when missing."""
    if location.startswith(HUB_PREFIX):
        return _hub_file(location[len(HUB_PREFIX):], filename)
    return _url_file(location)


def _url_file(url: str) -> Path:
    name = Path(urllib.parse.urlparse(url).path).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(cached), progress=False)
        except OSError as e:  # urllib's URLError/HTTPError and socket errors
            raise FileNotFoundError(
                f"could not download {url} ({e}). Without network access, download {name} elsewhere and place "
                f"it at {cached} (the torch hub cache, $TORCH_HOME/hub/checkpoints), or pass its local path: "
                f"pretrained=/path/to/{name} (backbone.pretrained=/path/to/{name})"
            ) from e
    return cached


def _hub_file(hub_id: str, filename: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    names = (filename,) if filename else HUB_FILES
    offline: LocalEntryNotFoundError | None = None
    for name in names:
        try:
            return Path(huggingface_hub.hf_hub_download(repo, name, revision=revision or None))
        except LocalEntryNotFoundError as e:  # not cached and the hub unreachable: try the next name's cache
            offline = offline or e
        except EntryNotFoundError:
            continue
    if offline is None:
        raise FileNotFoundError(f"{HUB_PREFIX}{hub_id} has none of {', '.join(names)}")
    name = names[0]
    raise FileNotFoundError(
        f"{HUB_PREFIX}{hub_id}: {name} is not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) "
        f"and the hub cannot be reached ({offline}). Where there is network, run `hf download {repo} {name}` and "
        f"copy the cache here (or point HF_HUB_CACHE at it), or download "
        f"https://huggingface.co/{repo}/resolve/{revision or 'main'}/{name} and pass its path: "
        f"pretrained=/path/to/{name} (backbone.pretrained=/path/to/{name})"
    ) from offline


# --- reading files -------------------------------------------------------------------------------------
def _read_file(path: Path, *, trust_pickle: bool) -> tuple[Any, dict[str, str]]:
    """The object stored in ``path`` and its safetensors metadata (empty for pickles)."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {str(path)!r} does not exist; pass {SOURCES_HELP}")
    if not path.name.endswith(FILE_SUFFIXES):
        raise ValueError(f"{path} has an unsupported extension; accepted: {', '.join(FILE_SUFFIXES)}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable .safetensors file ({e}); it is truncated or corrupt: "
                             f"download or convert it again") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle), {}
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # torch's wording for a refused (not a damaged) pickle
            raise ValueError(f"{path} is not a readable checkpoint ({e}); it is truncated or corrupt") from e
        raise ValueError(
            f"{path} needs arbitrary objects unpickled{_unsafe_globals(path)}, which could run code, so it is "
            f"refused. If its origin is trusted, convert it once in a trusted environment: `arena convert {path} "
            f"OUT.safetensors --backbone NAME --trust-pickle`, or re-save only its tensors "
            f"(torch.save(checkpoint['model'], 'weights.pth')) and load that file"
        ) from e
    except (RuntimeError, EOFError, KeyError, ValueError) as e:  # what torch.load raises on damaged files
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); it is truncated or "
                         f"corrupt: download or save it again") from e


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, ValueError):  # a legacy (non-zip) pickle: torch cannot list its globals
        return ""
    return f" ({', '.join(names)})" if names else ""


def _unwrap(obj: Any, source: str, *, prefer: tuple[str, ...] = ()) -> StateDict:
    """The flat state dict inside a checkpoint: wrapper keys removed (``prefer``'s first), DDP/compile
    prefixes stripped."""
    from timm.models import clean_state_dict

    while True:
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict")
        if any(isinstance(v, Tensor) for v in obj.values()):
            break
        key = next((k for k in prefer + WRAPPER_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
        if key is None:
            raise ValueError(f"{source} holds no state dict: its keys are {sorted(map(str, obj))[:12]}, none of them "
                             f"tensors or one of the wrappers {', '.join(WRAPPER_KEYS)}")
        obj = obj[key]
    return clean_state_dict({k: v for k, v in obj.items() if isinstance(v, Tensor)})


# --- matching ---------------------------------------------------------------------------------------
def load_pretrained(model: nn.Module, source: Any, *, strict: bool = True) -> LoadReport:
    """Load weights from ``source`` into ``model`` and return the report (also logged).

    ``strict=True`` refuses, with the report in a ``ValueError``, a checkpoint with missing,
    unexpected or shape-mismatched keys; ``strict=False`` loads what fits. A checkpoint that
    is refused loads nothing.
    """
    return load_checkpoint(model, read_checkpoint(source, model), strict=strict)


def load_checkpoint(model: nn.Module, checkpoint: Checkpoint, *, strict: bool = True) -> LoadReport:
    """Match ``checkpoint`` to ``model`` (family filter, classifier, position tables) and load it."""
    name = getattr(model, "backbone_name", type(model).__name__)
    report = LoadReport(checkpoint.source, name)
    target, prefix, filter_fn = _target(model)
    state_dict = _backbone_part(checkpoint.state_dict, target.state_dict().keys(), prefix, report)
    if (checkpoint.metadata.get("form") == "deploy" and hasattr(model, "reparameterize")
            and state_dict.keys() != target.state_dict().keys()):
        with torch.no_grad():
            model.reparameterize()
        report.reparameterized = True
    expected = target.state_dict()
    raw_shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    matched = state_dict
    if filter_fn is not None and not state_dict.keys() <= expected.keys():
        matched = filter_fn(dict(state_dict), target)
    report.resized = [(prefix + k, raw_shapes[k], tuple(v.shape)) for k, v in matched.items()
                      if k in raw_shapes and math.prod(raw_shapes[k]) != v.numel()]
    matched, fresh = _match_classifier(model, target, matched, raw_shapes, expected, report)
    matched = _resize_position_tables(target, matched, expected, prefix, report)

    to_load = {k: v for k, v in matched.items() if k in expected and v.shape == expected[k].shape}
    report.loaded, report.total = len(to_load), len(expected)
    report.missing = [prefix + k for k in expected if k not in matched and k not in fresh]
    report.unexpected = [prefix + k for k in matched if k not in expected]
    report.mismatched = [(prefix + k, tuple(v.shape), tuple(expected[k].shape)) for k, v in matched.items()
                         if k in expected and v.shape != expected[k].shape]
    if not to_load or (strict and not report.ok):
        raise ValueError(_refusal(report, state_dict))
    target.load_state_dict(to_load, strict=False)
    (_logger.info if report.ok else _logger.warning)("pretrained weights\n%s", report.table())
    return report


def _target(model: nn.Module) -> tuple[nn.Module, str, Callable[[StateDict, nn.Module], StateDict] | None]:
    """The module whose official layout checkpoints use, its key prefix in ``model``, and its family filter."""
    inner, prefix = (model.model, "model.") if isinstance(model, TimmBackbone) else (model, "")
    return inner, prefix, getattr(sys.modules[type(inner).__module__], "checkpoint_filter_fn", None)


def _backbone_part(state_dict: StateDict, expected: Collection[str], prefix: str, report: LoadReport) -> StateDict:
    """Keep the ``backbone.``/``inner.`` part of a task or pyramid checkpoint and drop ``model``'s own prefix."""
    for part in BACKBONE_PREFIXES:
        if any(k.startswith(part) for k in state_dict) and not any(k.startswith(part) for k in expected):
            report.ignored += [k for k in state_dict if not k.startswith(part)]
            state_dict = {k[len(part):]: v for k, v in state_dict.items() if k.startswith(part)}
    if prefix and all(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _classifier_prefixes(model: nn.Module, target: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the classifier: the built one's name, else ``pretrained_cfg["classifier"]``."""
    try:
        built = model.get_classifier()
    except ValueError:  # built with num_classes=0
        built = None
    if built is not None:
        names: Any = [n for n, m in target.named_modules() if m is built]
    else:
        names = (getattr(target, "pretrained_cfg", None) or {}).get("classifier") or ()
    return tuple(n + "." for n in ([names] if isinstance(names, str) else names))


def _num_classes(shapes: Mapping[str, Shape], keys: list[str]) -> int:
    weight = next((k for k in keys if k.endswith(".weight")), keys[0])
    return shapes[weight][0]


def _match_classifier(model: nn.Module, target: nn.Module, state_dict: StateDict, raw_shapes: dict[str, Shape],
                      expected: StateDict, report: LoadReport) -> tuple[StateDict, set[str]]:
    """Drop the checkpoint's classifier when the model has none or another class count.

    Returns the state dict and the model's classifier keys that keep their fresh initialization.
    """
    prefixes = _classifier_prefixes(model, target)
    raw_keys = [k for k in raw_shapes if k.startswith(prefixes)]
    ckpt_keys = [k for k in state_dict if k.startswith(prefixes)]
    model_keys = [k for k in expected if k.startswith(prefixes)]
    if not raw_keys:
        report.classifier = "missing from the checkpoint" if model_keys else "none"
        return state_dict, set()
    classes = _num_classes(raw_shapes, raw_keys)
    if not model_keys:
        report.classifier = f"dropped ({classes} classes; the model was built with num_classes=0)"
    elif ckpt_keys and all(k in expected and state_dict[k].shape == expected[k].shape for k in ckpt_keys):
        report.classifier = f"loaded ({classes} classes)"
        return state_dict, set()
    else:
        report.classifier = (f"re-initialized (checkpoint has {classes} classes, the model "
                             f"{_num_classes({k: tuple(v.shape) for k, v in expected.items()}, model_keys)})")
    return {k: v for k, v in state_dict.items() if k not in ckpt_keys}, set(model_keys)


POS_EMBED_SUFFIXES = ("pos_embed", "pos_embedding", "absolute_pos_embed")
REL_POS_TABLE_SUFFIX = "relative_position_bias_table"
REL_POS_INDEX_SUFFIX = "relative_position_index"


def _resize_position_tables(target: nn.Module, state_dict: StateDict, expected: StateDict, prefix: str,
                            report: LoadReport) -> StateDict:
    """Resize absolute position embeddings and relative-position tables to the model's resolution."""
    out = dict(state_dict)
    for k, v in state_dict.items():
        if k not in expected or v.shape == expected[k].shape:
            continue
        want = tuple(expected[k].shape)
        try:
            if k.endswith(POS_EMBED_SUFFIXES):
                out[k] = _resize_abs_pos_embed(target, v, want)
            elif k.endswith(REL_POS_TABLE_SUFFIX):
                out[k] = _resize_rel_pos_table(target, k, v, want)
            elif k.endswith(REL_POS_INDEX_SUFFIX):
                out[k] = expected[k]  # derived from the window size, not learned: keep the model's own
            else:
                continue
        except (AssertionError, RuntimeError, ValueError):  # a layout timm's helpers cannot resize: stays mismatched
            continue
        report.resized.append((prefix + k, tuple(v.shape), want))
    return out


def _resize_abs_pos_embed(target: nn.Module, v: Tensor, want: Shape) -> Tensor:
    from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc

    if v.ndim == 4:
        if v.shape[1] == want[1]:  # NCHW
            return resample_abs_pos_embed_nhwc(v.permute(0, 2, 3, 1), list(want[2:])).permute(0, 3, 1, 2)
        return resample_abs_pos_embed_nhwc(v, list(want[1:3]))
    if v.ndim != 3:
        raise ValueError(f"cannot resize a {v.ndim}-d position embedding")
    num_prefix = 0 if getattr(target, "no_embed_class", False) else getattr(target, "num_prefix_tokens", None)
    if num_prefix is None:
        num_prefix = next((p for p in range(9) if _is_square(v.shape[1] - p) and _is_square(want[1] - p)), None)
        if num_prefix is None:
            raise ValueError("position embedding grids are not square")
    grid = getattr(getattr(target, "patch_embed", None), "grid_size", None)
    if not grid or math.prod(grid) + num_prefix != want[1]:
        grid = (math.isqrt(want[1] - num_prefix),) * 2
    return resample_abs_pos_embed(v, new_size=list(grid), num_prefix_tokens=num_prefix)


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _resize_rel_pos_table(target: nn.Module, key: str, v: Tensor, want: Shape) -> Tensor:
    from timm.layers import resize_rel_pos_bias_table, to_2tuple

    window = getattr(target.get_submodule(key.rpartition(".")[0]), "window_size", None)
    if window is None:  # a table spans (2h-1) x (2w-1) offsets
        sides = want[1:] if len(want) == 3 else (math.isqrt(want[0]),) * 2
        window = tuple((s + 1) // 2 for s in sides)
    return resize_rel_pos_bias_table(v, new_window_size=to_2tuple(window), new_bias_shape=want)


def _refusal(report: LoadReport, state_dict: StateDict) -> str:
    """The error text for a refused checkpoint: the report, the closest registered layout, the way out."""
    head = f"no tensor of the checkpoint fits {report.model}" if not report.loaded else (
        f"the checkpoint does not fit {report.model} exactly")
    lines = [f"{head}:", report.table()]
    if report.loaded < report.total / 2:
        best = best_matching_backbone(state_dict)
        lines.append(f"its layout matches the registered backbone {best!r}: create_backbone({best!r}, pretrained=...) "
                     f"or backbone={best}" if best else "its layout matches no registered backbone")
    if report.loaded:
        lines.append("to load the tensors that fit anyway: create_backbone(..., pretrained_strict=False), "
                     "backbone.pretrained_strict=false, or load_pretrained(model, source, strict=False)")
    return "\n".join(lines)


def best_matching_backbone(state_dict: Mapping[str, Tensor]) -> str | None:
    """The registered backbone sharing most (key, shape) pairs with ``state_dict``, if at least half.

    Candidates are built on the meta device (no memory, no weights); keys of timm-backed
    candidates are compared without the adapter's ``model.`` prefix, as official timm files have them.
    """
    from ._registry import list_backbones

    if state_dict and all(k.startswith("model.") for k in state_dict):
        state_dict = {k[len("model."):]: v for k, v in state_dict.items()}
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    scores = {}
    for name in list_backbones():
        layout = _registered_layout(name)
        scores[name] = sum(shapes.get(k) == s for k, s in layout.items()) / max(len(layout), len(shapes), 1)
    best = max(scores, key=scores.__getitem__, default=None)
    return best if best is not None and scores[best] >= 0.5 else None


@lru_cache(maxsize=None)
def _registered_layout(name: str) -> dict[str, Shape]:
    from ._registry import create_backbone

    with torch.device("meta"):
        target, _, _ = _target(create_backbone(name))
    return {k: tuple(v.shape) for k, v in target.state_dict().items()}


# --- tags: the named weights of an architecture (timm's ``<name>.<tag>``) ------------------------------------
TAG_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
RANDOM = "random"
# words of a tag (or of a timm architecture) that say how the weights were pretrained
_CLIP_WORDS = re.compile(r"clip|openai|laion\w*|siglip\d*|metaclip|datacomp\w*|dfn\w*|webli")
_SELF_SUPERVISED_WORDS = re.compile(r"dino(v\d)?|mae|ibot|moco(v\d)?|simclr(v\d)?|byol|swav|mim|beit(v\d)?|data2vec")
_SUPERVISED_WORDS = {"in1k": "supervised-in1k", "in12k": "supervised-in12k", "in21k": "supervised-in22k",
                     "in22k": "supervised-in22k"}
# classifier sizes that only ImageNet-12k/22k training gives (1000 classes may be a fine-tuning head)
_SUPERVISED_CLASSES = {11821: "supervised-in12k", 21841: "supervised-in22k", 21843: "supervised-in22k"}


def check_tag(tag: Any) -> str:
    """``tag`` if it can name weights (letters, digits, ``_``, ``-``): it becomes part of directory and row names."""
    if not isinstance(tag, str) or not TAG_PATTERN.fullmatch(tag):
        raise ValueError(f"weights tag {tag!r} must be letters, digits, '_' or '-' (e.g. fb_in22k, in1k, shapes): "
                         f"it names the weights in run directories and leaderboard rows")
    return tag


def split_tag(name: str) -> tuple[str, str | None]:
    """``"convnext_tiny.fb_in22k"`` -> ``("convnext_tiny", "fb_in22k")``; a name without a tag -> ``(name, None)``."""
    arch, dot, tag = name.partition(".")
    return arch, (check_tag(tag) if dot else None)


@lru_cache(maxsize=None)
def _release_cfg(name: str) -> dict[str, Any]:
    """``pretrained_cfg`` of the registered backbone ``name``, built on the meta device (no memory, no weights)."""
    from ._registry import create_backbone

    with torch.device("meta"):
        return dict(create_backbone(name).pretrained_cfg)


def _timm_architecture(name: str) -> str | None:
    """The timm architecture behind ``name`` (``timm/<arch>`` or a timm-backed entry), ``None`` for native ones."""
    return name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else _release_cfg(name).get("architecture")


def _release(name: str) -> dict[str, Any]:
    """Where the registered default weights of ``name`` come from: ``tag``, ``hf_hub_id``, ``url`` (empty: none)."""
    if name.startswith(TIMM_PREFIX):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name[len(TIMM_PREFIX):])
        cfg = cfg.to_dict() if cfg is not None else {}
    else:
        cfg = _release_cfg(name)
    return cfg if cfg.get("hf_hub_id") or cfg.get("url") else {}


def pretrained_tags(name: str) -> list[str]:
    """The tags ``create_backbone(name, pretrained=True, tag=...)`` loads: every timm pretrained tag of a
    timm-backed architecture, the official release of a native one (none for models without weights).

    >>> "fb_in22k" in pretrained_tags("convnext_tiny"), pretrained_tags("unireplknet_t")
    (True, ['in1k'])
    """
    release = _release(name)
    if not release:
        return []
    arch = _timm_architecture(name)
    if arch is None:
        return [release["tag"]] if release.get("tag") else []
    import timm

    return [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]


def default_tag(name: str) -> str | None:
    """The tag of the weights ``pretrained=True`` loads without a tag; ``None`` when ``name`` has none."""
    return _release(name).get("tag")


def tag_source(name: str, tag: str) -> str | bool:
    """The ``pretrained=`` source of ``name``'s weights under ``tag``; ``ValueError`` naming the known tags."""
    tags = pretrained_tags(name)
    if tag not in tags:
        known = f"its tags: {', '.join(tags)}" if tags else "it has no published weights"
        raise ValueError(f"{name} has no pretrained weights tagged {tag!r}; {known}. A local file takes any tag: "
                         f"backbone={name} backbone.pretrained=/path/to/weights.safetensors backbone.tag={tag}")
    arch = _timm_architecture(name)
    return f"{TIMM_TAG_PREFIX}{arch}.{tag}" if arch is not None else True


def tagged_cfg(name: str, tag: str) -> dict[str, Any]:
    """The preprocessing (mean, std, interpolation, crop) that ``name``'s weights under ``tag`` were trained with."""
    arch = _timm_architecture(name)
    if arch is None:
        return {}
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(f"{arch}.{tag}").to_dict()
    return {k: cfg[k] for k in ("mean", "std", "interpolation", "crop_pct") if cfg.get(k) is not None}


def pretraining_of(tag: str | None, architecture: str = "", num_classes: int | None = None) -> str:
    """How weights were pretrained, read from their names: ``clip``, ``self-supervised``,
    ``supervised-in22k``/``-in12k``/``-in1k``, else ``unknown``; ``none`` without a tag (random init).

    Only the part of the tag before ``_ft_`` counts (``fb_in22k_ft_in1k`` was pretrained on
    ImageNet-22k); the architecture's words count too (``vit_base_patch16_clip_224.openai``), and
    ``num_classes`` of timm's ``pretrained_cfg`` decides when no word does.

    >>> pretraining_of("fb_in22k_ft_in1k"), pretraining_of("openai", "vit_base_patch16_clip_224"), pretraining_of(None)
    ('supervised-in22k', 'clip', 'none')
    """
    if tag is None:
        return "none"
    words = re.split(r"[_./-]", f"{architecture}_{tag.split('_ft_')[0]}".lower())
    if any(_CLIP_WORDS.fullmatch(w) for w in words):
        return "clip"
    if any(_SELF_SUPERVISED_WORDS.fullmatch(w) for w in words):
        return "self-supervised"
    found = [_SUPERVISED_WORDS[w] for w in words if w in _SUPERVISED_WORDS]
    return found[0] if found else _SUPERVISED_CLASSES.get(num_classes, "unknown")


@lru_cache(maxsize=None)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:8]


def file_digest(path: str | Path) -> str:
    """The first 8 hex digits of the file's sha256 (computed once per file version)."""
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _file_stem(path: str) -> str:
    name = Path(urllib.parse.urlparse(path).path).name
    stem = next((name[:-len(s)] for s in FILE_SUFFIXES if name.endswith(s)), Path(name).stem)
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-") or "weights"


@dataclass(frozen=True)
class WeightsId:
    """What a backbone's weights are: an architecture, the tag naming its weights (``None``: random init),
    ``weights`` (``random``, the tag of a registered release, ``file:<file name>@<sha256 prefix>``, or the
    hub id / URL) and ``pretraining`` (see ``pretraining_of``)."""

    architecture: str
    tag: str | None
    weights: str
    pretraining: str

    @property
    def entry(self) -> str:
        """What a battle compares: ``<architecture>`` untrained, ``<architecture>.<tag>`` with weights."""
        return self.architecture if self.tag is None else f"{self.architecture}.{self.tag}"


def identify_weights(name: str, pretrained: Any = None, tag: str | None = None) -> WeightsId:
    """The ``WeightsId`` of ``create_backbone(name, pretrained, tag=tag)``, without building it.

    The tag is ``tag`` when given, else: the registered default's tag (``pretrained=True``), the part
    after the dot of ``timm:<model>.<tag>``, or the file name of a local file, URL or hub repository.

    >>> identify_weights("convnext_tiny", "timm:convnext_tiny.fb_in22k").entry
    'convnext_tiny.fb_in22k'
    """
    arch, name_tag = split_tag(name)
    tag = check_tag(tag) if tag is not None else name_tag
    if pretrained in (None, False):
        return WeightsId(arch, None, RANDOM, "none")
    source = "true" if pretrained is True else str(pretrained)
    if source.lower() == "true":
        tag = tag or default_tag(arch) or "default"
        release = _timm_architecture(arch)
        return WeightsId(arch, tag, tag, pretraining_of(tag, release or arch, _timm_classes(release, tag)))
    if source.startswith(TIMM_TAG_PREFIX):
        release, _, source_tag = source[len(TIMM_TAG_PREFIX):].partition(".")
        tag = tag or check_tag(source_tag or "default")
        return WeightsId(arch, tag, tag, pretraining_of(source_tag, release, _timm_classes(release, source_tag)))
    if source.startswith(HUB_PREFIX) or source.startswith(URL_PREFIXES):
        tag = tag or _file_stem(source.split("@")[0])
        return WeightsId(arch, tag, source, pretraining_of(tag))
    path = Path(source).expanduser()
    tag = tag or _file_stem(source)
    weights = f"file:{path.name}@{file_digest(path)}" if path.is_file() else f"file:{path.name}"
    return WeightsId(arch, tag, weights, pretraining_of(tag))


def _timm_classes(arch: str | None, tag: str | None) -> int | None:
    """``num_classes`` of timm's ``pretrained_cfg`` for ``arch.tag`` (``None`` when timm has no such weights)."""
    if arch is None or tag is None:
        return None
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(f"{arch}.{tag}")
    except RuntimeError:  # timm's answer for a known architecture with an unknown tag
        return None
    return cfg.num_classes if cfg is not None else None
