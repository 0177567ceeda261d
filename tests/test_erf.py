"""The effective receptive field: shape, centring, kernel-size ordering, area ratios, plot and command."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from arena.cli import main
from arena.erf import area_ratios, compute_erf, load_images, log_scale, plot_erf
from backbones import create_backbone


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def centre_of_mass(erf: torch.Tensor) -> tuple[float, float]:
    h, w = erf.shape
    total = erf.sum()
    ys = (erf.sum(1) * torch.arange(h)).sum() / total
    xs = (erf.sum(0) * torch.arange(w)).sum() / total
    return float(ys), float(xs)


@pytest.mark.parametrize("name,level", [("unireplknet_test", -1), ("replknet_test", 0), ("convnext_test", 1)])
def test_erf_shape_and_centre(name: str, level: int) -> None:
    torch.manual_seed(0)
    model = create_backbone(name)
    size = 96  # odd-sized levels (3x3 at stride 32): the central pixel sits on the image centre
    erf = compute_erf(model, torch.randn(3, 3, size, size), level=level, batch_size=2)
    assert erf.shape == (size, size) and erf.dtype == torch.float32
    assert (erf >= 0).all() and erf.sum() > 0
    stride = model.feature_info.strides[level]
    cy, cx = centre_of_mass(erf)
    centre = (size - 1) / 2
    assert abs(cy - centre) <= stride / 2 + 1 and abs(cx - centre) <= stride / 2 + 1, (cy, cx, stride)
    assert model.training  # the mode is restored


def test_erf_averages_per_image_gradients() -> None:
    model = create_backbone("replknet_test")
    images = torch.randn(4, 3, 64, 64)
    together = compute_erf(model, images, batch_size=4)
    one_by_one = sum(compute_erf(model, images[i:i + 1]) for i in range(4)) / 4
    torch.testing.assert_close(together, one_by_one, rtol=1e-4, atol=1e-9)


def test_larger_kernels_give_a_wider_erf() -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 3, 96, 96)
    wide = compute_erf(create_backbone("replknet_test").eval(), images, level=0)
    torch.manual_seed(0)
    narrow = compute_erf(create_backbone("replknet_test", large_kernel_sizes=(3, 3, 3, 3), small_kernel=None),
                         images, level=0)
    assert area_ratios(wide)[0.99] > 2 * area_ratios(narrow)[0.99]


def test_area_ratios_on_known_maps() -> None:
    point = torch.zeros(21, 21)
    point[10, 10] = 1.0
    assert area_ratios(point) == {t: 1 / 441 for t in (0.2, 0.3, 0.5, 0.99)}
    flat = area_ratios(torch.ones(101, 101), thresholds=(0.25, 1.0))
    assert abs(flat[0.25] - 0.25) < 0.02 and flat[1.0] == 1.0


def test_log_scale_range() -> None:
    erf = torch.tensor([[1e-6, 1e-3], [1e-1, 1.0]])
    torch.testing.assert_close(log_scale(erf), torch.tensor([[0.0, 0.0], [2 / 3, 1.0]]))


def test_load_images_from_count_and_folder(tmp_path) -> None:
    assert load_images(3, 32, mean=(0, 0, 0), std=(1, 1, 1)).shape == (3, 3, 32, 32)
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    batch = load_images(str(tmp_path), 32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert batch.shape == (2, 3, 32, 32)
    torch.testing.assert_close(batch[0, :, 5, 5], torch.tensor([1.0, -1.0, -1.0]))
    with pytest.raises(FileNotFoundError, match="neither a count nor a folder"):
        load_images(str(tmp_path / "missing"), 32, mean=(0, 0, 0), std=(1, 1, 1))


def test_plot_writes_a_png(tmp_path) -> None:
    out = plot_erf(torch.rand(32, 32), tmp_path / "sub" / "erf.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_erf_command(tmp_path, capsys) -> None:
    out = tmp_path / "erf.png"
    assert main(["erf", "backbone=unireplknet_test", "images=2", "size=64", f"out={out}", "level=0"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "stride 4" in printed and "99%" in printed
    with pytest.raises(ValueError, match="key one of"):
        main(["erf", "backbone=unireplknet_test", "imgs=2"])
    with pytest.raises(ValueError, match="divisible by 32"):
        main(["erf", "backbone=unireplknet_test", "size=70"])
