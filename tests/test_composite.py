"""The degradation CutMix generator: the mask marks exactly what changed, regions partition the
image, the sample kinds, determinism, validation and physical order."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

import degradations
from degradations import composite

CLASSES = ["rain", "haze", "noise", "blur", "lowlight"]
SEVERITY = {name: (0.2, 1.0) for name in degradations.names()}


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photo on the 8-bit grid, 64x80 (not square, to catch transposed axes)."""
    import skimage.data

    rgb = skimage.data.astronaut()[:400, :500]
    return cv2.resize(rgb, (80, 64), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def changed(out: np.ndarray, img: np.ndarray) -> np.ndarray:
    return (out != img).any(axis=2)


def check_mask_matches_changes(img, out, mask, info, classes, strong=("noise",)):
    """Pixels without a bit are untouched; every bit lies on pixels its degradation changed."""
    assert mask.dtype == np.uint8 and mask.shape == img.shape[:2]
    assert mask.max() < 2 ** len(classes)
    assert np.array_equal(out[mask == 0], img[mask == 0])  # bit-identical outside the mask
    diff = changed(out, img)
    for bit, name in enumerate(classes):
        on = (mask >> bit & 1).astype(bool)
        if on.any() and name in strong:
            assert diff[on].mean() > 0.95, (name, diff[on].mean())
    applied = {d["name"] for region in info["regions"] for d in region["degradations"]}
    in_mask = {name for bit, name in enumerate(classes) if (mask >> bit & 1).any()}
    assert applied == in_mask


def test_single_whole_crop_sets_one_bit_everywhere(photo):
    severity = {"noise": (0.5, 1.0)}
    out, mask, info = composite.apply(photo, np.random.default_rng(0), ["noise"], severity, p_clean=0.0, p_single=1.0)
    assert info["kind"] == "single" and len(info["regions"]) == 1
    region = info["regions"][0]
    assert region["shape"] == "full" and region["area"] == 1.0 and region["bbox"] == [0, 0, 64, 80]
    assert (mask == 1).all()
    assert changed(out, photo).mean() > 0.95
    check_mask_matches_changes(photo, out, mask, info, ["noise"])


def test_single_picks_one_class_for_the_whole_crop(photo):
    seen = set()
    for seed in range(30):
        out, mask, info = composite.apply(photo, np.random.default_rng(seed), CLASSES, SEVERITY, p_clean=0.0,
                                          p_single=1.0)
        (region,) = info["regions"]
        (step,) = region["degradations"]
        bit = 1 << CLASSES.index(step["name"])
        assert (mask == bit).all()
        lo, hi = SEVERITY[step["name"]]
        assert lo <= step["severity"] <= hi
        seen.add(step["name"])
    assert seen == set(CLASSES)


@pytest.mark.parametrize("seed", range(12))
def test_multi_region_mask_marks_exactly_the_changed_pixels(seed, photo):
    # Three regions, one strong degradation each or none: a leak of noise outside its region,
    # a mask bit on the wrong region, or a region left out shows up.
    classes = ["noise", "haze", "rain"]
    severity = {"noise": (0.5, 1.0), "haze": (0.5, 1.0), "rain": (0.5, 1.0)}
    out, mask, info = composite.apply(photo, np.random.default_rng(seed), classes, severity, regions=(3, 3),
                                      degradations_per_region=(0, 1), p_clean=0.0, p_single=0.0)
    assert info["kind"] == "composite" and len(info["regions"]) == 3
    check_mask_matches_changes(photo, out, mask, info, classes)
    for region in info["regions"]:
        assert len(region["degradations"]) <= 1


@pytest.mark.parametrize("seed", range(8))
def test_noise_region_changes_all_its_pixels_and_nothing_else(seed, photo):
    classes = ["noise", "blur"]
    severity = {"noise": (0.5, 1.0), "blur": (0.5, 1.0)}
    out, mask, info = composite.apply(photo, np.random.default_rng(seed), classes, severity, regions=(3, 3),
                                      degradations_per_region=(1, 1), p_clean=0.0, p_single=0.0)
    noise_pixels = (mask & 1).astype(bool)
    diff = changed(out, photo)
    if noise_pixels.any():
        assert diff[noise_pixels].mean() > 0.95
    # No region is clean here, so every pixel carries exactly one bit.
    assert set(np.unique(mask)) <= {1, 2}
    check_mask_matches_changes(photo, out, mask, info, classes)


def test_stacked_degradations_set_several_bits(photo):
    out, mask, info = composite.apply(photo, np.random.default_rng(3), CLASSES, SEVERITY, regions=(1, 1),
                                      degradations_per_region=(3, 3), p_clean=0.0, p_single=0.0)
    (region,) = info["regions"]
    names = [d["name"] for d in region["degradations"]]
    assert len(names) == len(set(names)) == 3
    expected = sum(1 << CLASSES.index(n) for n in names)
    assert (mask == expected).all()


@pytest.mark.parametrize("part", [0, 1])
def test_every_registered_degradation_can_be_a_class(photo, part):
    # the mask has 8 bits: the registry is covered in two overlapping sets of at most 8 classes
    names = degradations.names()
    classes = names[:composite.MAX_CLASSES] if part == 0 else names[-composite.MAX_CLASSES:]
    for seed in range(10):
        out, mask, info = composite.apply(photo, np.random.default_rng(seed), classes, SEVERITY,
                                          degradations_per_region=(1, 3), p_clean=0.0, p_single=0.0)
        assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
        check_mask_matches_changes(photo, out, mask, info, classes, strong=())


@pytest.mark.parametrize("shape_fraction", [0.0, 1.0])
@pytest.mark.parametrize("size", [(64, 80), (48, 48), (5, 7)])
def test_regions_partition_the_image(shape_fraction, size):
    height, width = size
    for seed in range(20):
        rng = np.random.default_rng(seed)
        count = int(rng.integers(1, 5))
        labels, shapes = composite.region_layout(rng, height, width, count, shape_fraction)
        assert labels.shape == (height, width) and len(shapes) == count
        # A label map is a partition by construction; each label must also be non-empty.
        assert set(np.unique(labels)) == set(range(count))
        if count > 1 and shape_fraction == 0.0:
            assert shapes == ["rect"] * count
            for label in range(count):  # a rectangle is exactly its bounding box
                y0, x0, y1, x1 = composite.bounding_box(labels == label)
                assert (labels[y0:y1, x0:x1] == label).all()


def test_both_layouts_occur_and_blobs_are_not_rectangles():
    shapes = []
    for seed in range(40):
        labels, kinds = composite.region_layout(np.random.default_rng(seed), 64, 64, 3, 0.5)
        shapes += kinds
        if kinds[0] == "blob":
            boxes = [composite.bounding_box(labels == k) for k in range(3)]
            assert sum((y1 - y0) * (x1 - x0) for y0, x0, y1, x1 in boxes) > 64 * 64  # boxes overlap
    assert "blob" in shapes and "rect" in shapes


def test_region_count_and_areas_in_info(photo):
    for seed in range(30):
        out, mask, info = composite.apply(photo, np.random.default_rng(seed), CLASSES, SEVERITY, regions=(2, 3),
                                          p_clean=0.0, p_single=0.0)
        assert 2 <= len(info["regions"]) <= 3
        assert sum(r["area"] for r in info["regions"]) == pytest.approx(1.0)
        for region in info["regions"]:
            y0, x0, y1, x1 = region["bbox"]
            assert 0 <= y0 < y1 <= 64 and 0 <= x0 < x1 <= 80
            assert 0 <= len(region["degradations"]) <= 3


def test_p_clean_one_leaves_the_image_alone(photo):
    out, mask, info = composite.apply(photo, np.random.default_rng(0), CLASSES, SEVERITY, p_clean=1.0)
    assert info == {"kind": "clean", "regions": []}
    assert out is not photo and np.array_equal(out, photo)
    assert mask.dtype == np.uint8 and not mask.any()


def test_kinds_follow_the_probabilities(photo):
    kinds = [composite.apply(photo, np.random.default_rng(seed), ["noise"], SEVERITY, p_clean=0.2, p_single=0.5)[2]
             ["kind"] for seed in range(300)]
    assert 0.12 < kinds.count("clean") / 300 < 0.28
    assert 0.3 < kinds.count("single") / 300 < 0.5  # 0.8 * 0.5 = 0.4


def test_info_is_json_and_deterministic_per_seed(photo):
    before = photo.copy()
    for seed in range(15):
        out, mask, info = composite.apply(photo, np.random.default_rng(seed), CLASSES, SEVERITY)
        assert json.loads(json.dumps(info)) == info
        again = composite.apply(photo, np.random.default_rng(seed), CLASSES, SEVERITY)
        assert out.tobytes() == again[0].tobytes() and np.array_equal(mask, again[1]) and info == again[2]
    a = composite.apply(photo, np.random.default_rng(1), CLASSES, SEVERITY, p_clean=0.0)
    b = composite.apply(photo, np.random.default_rng(2), CLASSES, SEVERITY, p_clean=0.0)
    assert a[0].tobytes() != b[0].tobytes()
    assert np.array_equal(photo, before)  # the input is never modified


def test_physical_order_in_info(photo):
    classes = ["noise", "blur", "haze", "jpeg"]
    for seed in range(8):
        out, mask, info = composite.apply(photo, np.random.default_rng(seed), classes, SEVERITY, regions=(1, 1),
                                          degradations_per_region=(3, 4), p_clean=0.0, p_single=0.0)
        names = [d["name"] for d in info["regions"][0]["degradations"]]
        order = ["haze", "blur", "noise", "jpeg"]
        assert names == [n for n in order if n in names]


def test_apply_chain_sorts_by_physical_order(photo):
    steps = [("noise", 0.5), ("jpeg", 0.5), ("haze", 0.5)]
    out, records = composite.apply_chain(photo, np.random.default_rng(0), steps)
    assert [r["name"] for r in records] == ["haze", "noise", "jpeg"]
    # Same as applying them one after the other, in that order, from the same rng.
    rng = np.random.default_rng(0)
    expected = photo
    for name in ("haze", "noise", "jpeg"):
        expected, _ = degradations.get(name).apply(expected, rng, 0.5)
    assert np.array_equal(out, expected)
    # Options pass through as a third element.
    _, records = composite.apply_chain(photo, np.random.default_rng(0), [("blur", 0.5, {"kind": "defocus"})])
    assert records[0]["params"]["kind"] == "defocus"


def test_validation_errors(photo):
    rng = np.random.default_rng(0)
    too_many = degradations.names() + ["noise"]
    with pytest.raises(ValueError, match="at most 8"):
        composite.apply(photo, rng, too_many, SEVERITY)
    with pytest.raises(ValueError, match="nope"):
        composite.apply(photo, rng, ["noise", "nope"], SEVERITY)
    with pytest.raises(ValueError, match="severity"):
        composite.apply(photo, rng, ["noise", "haze"], {"noise": (0.2, 1.0)})
    with pytest.raises(ValueError, match="lo <= hi"):
        composite.apply(photo, rng, ["noise"], {"noise": (0.8, 0.2)})
    with pytest.raises(ValueError, match="regions"):
        composite.apply(photo, rng, ["noise"], SEVERITY, regions=(0, 2))
    with pytest.raises(ValueError, match="duplicates"):
        composite.apply(photo, rng, ["noise", "noise"], SEVERITY)
    with pytest.raises(ValueError, match="unknown degradation"):
        composite.apply_chain(photo, rng, [("nope", 0.5)])


def test_blur_region_sees_real_context(photo):
    # A blurred rectangle next to untouched pixels: inside the region the result equals blurring
    # the whole image (context, not a reflected border), up to the margin.
    classes = ["blur"]
    for seed in range(10):
        out, mask, info = composite.apply(photo, np.random.default_rng(seed), classes, {"blur": (1.0, 1.0)},
                                          regions=(2, 2), degradations_per_region=(1, 1), shape_fraction=0.0,
                                          p_clean=0.0, p_single=0.0)
        for region in info["regions"]:
            params = region["degradations"][0]["params"]
            if params["kind"] == "gaussian":
                full, _ = degradations.get("blur").apply(photo, np.random.default_rng(0), 1.0, kind="gaussian")
                y0, x0, y1, x1 = region["bbox"]
                np.testing.assert_allclose(out[y0:y1, x0:x1], full[y0:y1, x0:x1], atol=2e-3)
                return
    pytest.skip("no gaussian blur region drawn")
