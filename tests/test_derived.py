"""``backbones.ops.derived``: values derived from parameters follow every change of them, and nothing else."""
from __future__ import annotations

import copy
import io
import pickle

import torch
from torch import nn

from backbones import create_backbone
from backbones.ops.derived import derived


def test_rebuilt_when_a_source_changes_and_only_then() -> None:
    layer = nn.Linear(3, 2)
    builds = []

    def transposed() -> torch.Tensor:
        builds.append(1)
        return layer.weight.detach().t().contiguous()

    def get() -> torch.Tensor:
        return derived(layer, "wt", (layer.weight, layer.bias), transposed)

    first = get()
    assert get() is first and len(builds) == 1
    with torch.no_grad():
        layer.weight.add_(1.0)  # in place, as an optimizer step
    assert torch.equal(get(), layer.weight.detach().t()) and len(builds) == 2
    layer.load_state_dict({"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
    assert torch.equal(get(), torch.ones(3, 2)) and len(builds) == 3
    layer.weight = nn.Parameter(torch.full((2, 3), 2.0))  # replaced
    assert torch.equal(get(), torch.full((3, 2), 2.0)) and len(builds) == 4
    layer.bias.data = torch.ones(2)  # new storage behind the same tensor
    get()
    assert len(builds) == 5 and get() is get()
    for shape, count in (((4, 3), 6), ((4, 3), 6), ((5, 3), 7), ((4, 3), 8)):  # a key: one value, the last key's
        derived(layer, "wt", (layer.weight, layer.bias), transposed, key=shape)
        assert len(builds) == count
    # kept outside the module: copies and pickles carry no cache and build their own
    clone = copy.deepcopy(layer)
    assert derived(clone, "wt", (clone.weight, clone.bias), lambda: "clone's") == "clone's"
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    assert pickle.loads(pickle.dumps(layer)).weight.shape == (2, 3)


def test_streamed_vim_follows_in_place_parameter_updates() -> None:
    """Streamed inference reads its kernels' constants from ``derived``: after an in-place update (as an
    optimizer step makes) of A, D, the conv taps and the biases, its output is the plain path's again."""
    model = create_backbone("vim_test").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        before = model(x)[0]  # builds the constants
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "A_b_log", ".D", ".D_b", "conv1d.weight", "conv1d_b.bias", "dt_proj.bias")):
                p.add_(0.3 * torch.randn(p.shape))
        want = model(x)[0]  # the plain path (no inference mode)
    assert not torch.allclose(want, before, atol=1e-3)
    with torch.inference_mode():
        got = model(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
