"""Values derived from parameters (a weight transposed or exponentiated into a kernel's layout), computed
once per version of the parameters instead of on every call.

``derived`` caches ``build()`` per (module, name) and rebuilds it when a source tensor is replaced (another
object or storage) or modified in place (its version counter moves: optimizer steps, ``load_state_dict``,
``copy_`` under ``no_grad``). Writes through ``.data`` escape the version counter, as they escape autograd.
The cache is held outside the module (a weak-keyed table), so modules pickle, copy and free as before.
"""
from __future__ import annotations

import weakref
from typing import Callable, Hashable, Sequence, TypeVar

import torch
from torch import nn

T = TypeVar("T")
# owner -> name -> (key, [(weakref to source, its version, its data pointer)], value)
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple]] = weakref.WeakKeyDictionary()


def derived(owner: nn.Module, name: str, sources: Sequence[torch.Tensor], build: Callable[[], T],
            key: Hashable = None) -> T:
    """``build()``, computed again only when a tensor of ``sources`` or ``key`` (say, an input shape the value
    depends on) has changed since the last call. One value is kept per (owner, name)."""
    store = _CACHE.setdefault(owner, {})
    hit = store.get(name)
    if hit is not None and hit[0] == key and len(hit[1]) == len(sources) and all(
            ref() is t and version == t._version and ptr == t.data_ptr()
            for (ref, version, ptr), t in zip(hit[1], sources)):
        return hit[2]  # type: ignore[return-value]
    value = build()
    store[name] = (key, [(weakref.ref(t), t._version, t.data_ptr()) for t in sources], value)
    return value
