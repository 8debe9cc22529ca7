"""The pixel-wise mode's maths: per-pixel LoRA / AdaptIR weights, the map's resizing and padding,
the Restorer's "pw" mode against sw / oh / the backbone alone, and tiling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.adapters import AdapterBank, PixelWeights
from models.adapters.lora import LoRALayer
from models.backbone import build_backbone
from models.estimator import Estimator
from models.restorer import Restorer, bilinear_rows, map_window, weights_summary

CLASSES = ["rain", "haze", "noise", "blur", "lowlight"]


def smooth_images(b=1, h=96, w=96):
    base = torch.rand(b, 3, max(h // 10, 2), max(w // 10, 2))
    x = F.interpolate(base, size=(h, w), mode="bicubic", align_corners=False)
    return (x + 0.03 * torch.randn_like(x)).clamp(0, 1)


def random_system(kind: str = "lora", seg: bool = False) -> Restorer:
    torch.manual_seed(5)
    model = build_backbone("tiny", seg_classes=3 if seg else 0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    bank = AdapterBank(model, kind=kind)
    for name in CLASSES:
        bank.add(name)
        with torch.no_grad():
            for p in bank.parameters_of(name):
                p.normal_(0, 0.05) if kind == "lora" else p.add_(torch.randn_like(p) * 0.05)
    if seg:
        model.seg_class_names = ["rain", "haze", "noise"]
    return Restorer(model, bank, Estimator(len(CLASSES), class_names=CLASSES, do_no_harm=True))


@pytest.fixture(scope="module")
def system():
    return random_system()


def halves_map(b: int, h: int, w: int, left: int, right: int, k: int = len(CLASSES)) -> torch.Tensor:
    weight_map = torch.zeros(b, k, h, w)
    weight_map[:, left, :, : w // 2] = 1.0
    weight_map[:, right, :, w // 2:] = 1.0
    return weight_map


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("ranks", [(2, 2, 2), (1, 3, 2)])
def test_lora_layer_per_pixel_is_the_per_pixel_formula(layout, ranks):
    """out(p) = W x(p) + sum_k w_k(p) * scale_k * B_k A_k x(p), at every pixel, whatever the
    activations' memory layout (the blocks' are channels-last) and the ranks."""
    torch.manual_seed(0)
    layer = LoRALayer(torch.nn.Conv2d(6, 5, 1))
    for name, rank in zip("abc", ranks):
        layer.add_adapter(name, rank=rank, alpha=3.0)
        torch.nn.init.normal_(layer.lora_B[name])
    x = torch.randn(2, 6, 8, 8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight_map = torch.rand(2, 3, 8, 8) / 3
    layer.set_weights(PixelWeights(weight_map), ["a", "b", "c"])
    got = layer(x)
    expected = layer.base_layer(x)
    for k, name in enumerate("abc"):
        delta = layer.scaling[name] * torch.einsum("or,ri,bihw->bohw", layer.lora_B[name], layer.lora_A[name], x)
        expected = expected + weight_map[:, k:k + 1] * delta
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pixel_weights_area_average_each_level():
    weight_map = torch.rand(1, 2, 16, 24)
    levels = PixelWeights(weight_map)
    torch.testing.assert_close(levels.at((8, 12)), F.avg_pool2d(weight_map, 2))
    torch.testing.assert_close(levels.at((2, 3))[0, :, 1, 2], weight_map[0, :, 8:16, 16:24].mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="no level"):
        levels.at((5, 12))


def test_map_window_is_bilinear_resize_then_replicate_pad():
    weight_map = torch.rand(2, 3, 7, 5)
    resized = F.interpolate(weight_map, size=(37, 29), mode="bilinear", align_corners=False)
    padded = F.pad(resized, (0, 3, 0, 3), mode="replicate")                 # to 40 x 32
    whole = map_window(weight_map, (37, 29), slice(0, 37), slice(0, 29))
    torch.testing.assert_close(whole, padded, atol=1e-6, rtol=1e-5)
    # a window: rows 10-25, cols 4-21 of the resized map, padded to 16 x 24
    part = map_window(weight_map, (37, 29), slice(10, 25), slice(4, 21))
    expected = F.pad(resized[..., 10:25, 4:21], (0, 7, 0, 1), mode="replicate")
    torch.testing.assert_close(part, expected, atol=1e-6, rtol=1e-5)
    assert bilinear_rows(9, 1, torch.arange(9)).sum(1).eq(1).all()         # a 1-pixel map is constant


@pytest.mark.parametrize("kind", ["lora", "adaptir"])
def test_constant_map_equals_sw_and_one_hot_equals_oh(kind):
    restorer = system_of(kind)
    x = smooth_images(2, 45, 61)
    weights = torch.tensor([[0.1, 0.3, 0.2, 0.2, 0.1], [0.0, 0.5, 0.0, 0.0, 0.25]])
    image_level, _ = restorer.restore(x, mode="oracle", weights=weights)
    constant = weights[:, :, None, None].expand(-1, -1, 5, 7)
    pixelwise, used = restorer.restore(x, mode="pw", weights=constant)
    assert used.shape == (2, len(CLASSES) + 1, 5, 7)
    # to float rounding, which AdaptIR's phase branch amplifies (see test_models' tiling test)
    atol = 1e-3 if kind == "adaptir" else 2e-5
    torch.testing.assert_close(pixelwise, image_level, atol=atol, rtol=0)
    one_hot = torch.zeros(2, len(CLASSES)); one_hot[0, 2] = 1; one_hot[1, 4] = 1
    oh, _ = restorer.restore(x, mode="oh", weights=one_hot)
    pw_oh, _ = restorer.restore(x, mode="pw", weights=one_hot[:, :, None, None].expand(-1, -1, 9, 9))
    torch.testing.assert_close(pw_oh, oh, atol=atol, rtol=0)
    zeros, _ = restorer.restore(x, mode="pw", weights=torch.zeros(2, len(CLASSES), 3, 3))
    none, _ = restorer.restore(x, mode="none")
    assert torch.equal(zeros, none)   # no adapter runs at all


_systems: dict = {}


def system_of(kind: str) -> Restorer:
    if kind not in _systems:
        _systems[kind] = random_system(kind)
    return _systems[kind]


def test_regions_get_their_own_adapter(system):
    """Left half rain, right half lowlight: far from the seam each half is what that adapter alone
    gives (the receptive field of the whole network is the image, so only nearly)."""
    x = smooth_images(1, 32, 96)
    pw, _ = system.restore(x, mode="pw", weights=halves_map(1, 32, 96, 0, 4))
    rain, _ = system.restore(x, mode="oh", weights=torch.eye(5)[:1])
    lowlight, _ = system.restore(x, mode="oh", weights=torch.eye(5)[4:])
    left, right = pw[..., :, :24], pw[..., :, 72:]
    assert (left - rain[..., :, :24]).abs().mean() < 0.25 * (left - lowlight[..., :, :24]).abs().mean()
    assert (right - lowlight[..., :, 72:]).abs().mean() < 0.25 * (right - rain[..., :, 72:]).abs().mean()


@pytest.mark.parametrize("kind", ["lora", "adaptir"])
def test_exact_tiling_pw_equals_whole(kind):
    restorer = system_of(kind)
    x = smooth_images(2, 99, 75)
    weight_map = torch.rand(2, len(CLASSES), 6, 5)
    weight_map = weight_map / weight_map.sum(1, keepdim=True) * 0.9
    whole, _ = restorer.restore(x, mode="pw", weights=weight_map)
    tiled, _ = restorer.restore(x, mode="pw", weights=weight_map, tile=32)
    diff = (tiled - whole).abs()
    bound = 1e-3 if kind == "adaptir" else 1e-5   # AdaptIR's phase branch amplifies rounding (see test_models)
    assert diff.max() < bound


def test_local_tiling_pw_with_a_constant_map_equals_local_sw(system):
    x = smooth_images(1, 100, 120)
    weights = torch.tensor([[0.2, 0.1, 0.3, 0.2, 0.1]])
    sw_local, _ = system.restore(x, mode="oracle", weights=weights, tile=72, tiling="local")
    pw_local, _ = system.restore(x, mode="pw", weights=weights[:, :, None, None], tile=72, tiling="local")
    torch.testing.assert_close(pw_local, sw_local, atol=2e-5, rtol=0)
    # with a varying map, local tiling differs from the whole image as much as it does in sw
    varying = torch.rand(1, len(CLASSES), 4, 4) / len(CLASSES)
    local, _ = system.restore(x, mode="pw", weights=varying, tile=72, tiling="local")
    whole, _ = system.restore(x, mode="pw", weights=varying)
    sw_whole, _ = system.restore(x, mode="oracle", weights=weights)
    assert (local - whole).abs().mean() < 1.5 * (sw_local - sw_whole).abs().mean()


def test_keep_map_and_summary(system):
    x = smooth_images(1, 32, 48)
    weights = torch.zeros(1, len(CLASSES) + 1, 2, 2)
    weights[:, 0] = 0.5
    weights[:, -1, :, 0] = 1.0                      # keep the left column of the map entirely
    out, used = system.restore(x, mode="pw", weights=weights)
    assert torch.equal(used, weights)
    assert (out[..., :, :8] - x[..., :, :8]).abs().max() < 1e-6   # keep 1 there: the input comes back
    assert (out[..., :, 40:] - x[..., :, 40:]).abs().mean() > 1e-3
    torch.testing.assert_close(weights_summary(used), weights.mean(dim=(2, 3)))
    flat = torch.rand(3, 6)
    assert weights_summary(flat) is flat and weights_summary(None) is None


def test_pw_errors(system):
    x = smooth_images(1, 32, 32)
    with pytest.raises(ValueError, match="sum to at most one"):
        system.restore(x, mode="pw", weights=torch.ones(1, len(CLASSES), 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        system.restore(x, mode="pw", weights=-torch.ones(1, len(CLASSES), 2, 2))
    with pytest.raises(ValueError, match="pixel-wise weights must be"):
        system.restore(x, mode="pw", weights=torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="pw_source must be"):
        system.restore(x, mode="pw", pw_source="magic")
    with pytest.raises(ValueError, match="segmentation head"):
        system.restore(x, mode="pw", pw_source="seg")


def test_seg_source_maps_the_head_to_adapter_columns():
    """The seg head knows rain, haze and noise: their columns come from its probabilities, the
    other adapters' from the estimator's image-level weights; every pixel sums to at most one."""
    restorer = random_system(seg=True)
    x = smooth_images(2, 40, 56)
    out, used = restorer.restore(x, mode="pw", pw_source="seg")
    assert used.shape == (2, len(CLASSES) + 1, 5, 7)          # 8x8-pixel cells
    assert bool((used[:, :len(CLASSES)].sum(1) <= 1 + 1e-6).all())
    with torch.no_grad():
        _, seg_logits = restorer.backbone(x, with_seg=True)
        probs = F.avg_pool2d(torch.sigmoid(seg_logits), 8, ceil_mode=True)
        image_level = restorer.estimator.weights(x, "sw")[:, :len(CLASSES)]
    raw = torch.cat([probs, image_level[:, 3:, None, None].expand(-1, -1, 5, 7)], dim=1)
    expected = raw / raw.sum(1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(used[:, :len(CLASSES)], expected, atol=1e-6, rtol=1e-5)
    assert restorer.resolve_pw_source() == "seg"             # no dense estimator: the seg head
    direct, _ = restorer.restore(x, mode="pw", weights=used)
    torch.testing.assert_close(out, direct, atol=1e-6, rtol=0)
