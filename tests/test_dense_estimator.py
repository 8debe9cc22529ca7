"""The dense estimator head (issue 14's pixel-wise weight map): shapes and the weights contract,
the map with no spatial term equals the image-level SW weights, growth and checkpoints, the
per-pixel targets made from shard masks, the dense loss, and the IoU that scores the map."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from models.estimator import Estimator, load_estimator, resize_map, save_estimator
from tasks.train.estimator import (EstimatorSample, classify_loss, dense_cross_entropy, mask_columns,
                                   predicted_columns, segmentation_counts, segmentation_scores,
                                   target_map_from_mask, train_estimator)

NAMES = ["haze", "noise", "rain"]
LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_restorer_bf9d132.tar.gz"


def dense_estimator(base: bool = True, outputs: int = 3, seed: int = 0) -> Estimator:
    """A small dense estimator with both spatial terms at work: the cell gains as they start, the
    decoder's output layer (which starts at zero) drawn at random."""
    torch.manual_seed(seed)
    est = Estimator(outputs, width=4, crops=1, crop_size=16, view_size=32, do_no_harm=base, dense=True)
    with torch.no_grad():
        est.dense_head.out.weight.normal_(0, 0.5)
        est.dense_head.out.bias.normal_(0, 0.5)
    return est.eval()


@pytest.mark.parametrize("base", [True, False])
def test_weight_map_shape_and_weights_contract(base):
    est = dense_estimator(base)
    x = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        wm = est.weight_map(x)
    assert est.has_dense and est.map_size == (16, 16)
    assert wm.shape == (2, 4, 16, 16) and wm.dtype == torch.float32
    assert torch.equal(wm[:, 3], torch.zeros(2, 16, 16))                 # keep: filled in by the Restorer
    adapters = wm[:, :3]
    assert adapters.min() >= 0
    if base:
        # the rest of each pixel's weight is the backbone alone
        assert adapters.sum(1).max() <= 1.0 and adapters.sum(1).min() < 0.99
    else:
        torch.testing.assert_close(adapters.sum(1), torch.ones(2, 16, 16))
    assert adapters.std(dim=(2, 3)).min() > 1e-3                          # it is a map, not one vector


@pytest.mark.parametrize("base", [True, False])
def test_zero_spatial_term_gives_exactly_the_sw_weights(base):
    est = dense_estimator(base)
    x = torch.rand(3, 3, 48, 40)
    with torch.no_grad():
        assert not torch.allclose(est.weight_map(x)[:, :3], est.weights(x, "sw")[:, :3, None, None].expand(-1, -1, 16, 16))
        torch.nn.init.zeros_(est.dense_head.out.weight)
        torch.nn.init.zeros_(est.dense_head.out.bias)
        torch.nn.init.zeros_(est.dense_head.gain)
        for temperature in (1.0, 0.5):
            wm = est.weight_map(x, temperature)
            sw = est.weights(x, "sw", temperature)[:, :3, None, None].expand(-1, -1, 16, 16)
            assert torch.equal(wm[:, :3], sw)
        # a spatial term equal for every output and pixel shifts all logits alike: the same weights
        est.dense_head.out.bias.fill_(0.75)
        sw = est.weights(x, "sw")[:, :3, None, None].expand(-1, -1, 16, 16)
        torch.testing.assert_close(est.weight_map(x)[:, :3], sw, rtol=0, atol=1e-6)


def test_a_fresh_dense_head_gives_the_cell_logits():
    """Before training the decoder is silent and the gains are 1: each pixel gets the image-level
    head's logits for its cell of the trunk's last map, resized to the map."""
    est = Estimator(3, width=4, crops=1, crop_size=16, view_size=32, do_no_harm=True, dense=True).eval()
    x = torch.rand(2, 3, 32, 32)
    x[:, :, :, 16:] *= 0.2                                              # a dark right half
    with torch.no_grad():
        features, maps = est._look(x)
        assert maps[-1].shape[-2:] == (2, 2)                           # the last map of a 32 px view
        cells = est.cell_logits(maps[-1], features)
        _, pixels = est.logits_and_map(x)
    torch.testing.assert_close(pixels, resize_map(cells, (16, 16)), rtol=0, atol=1e-5)
    assert not torch.allclose(cells[:, :, :, 0], cells[:, :, :, 1])    # the halves differ


def test_cell_logits_apply_the_image_head_to_each_cell():
    """Cell (i, j) gets the head's logits for that cell's features as the pooled mean, no spread,
    and the image's native-crop features: checked cell by cell (a transposed layout would fail)."""
    est = Estimator(3, width=4, crops=1, crop_size=16, view_size=64, do_no_harm=True, dense=True).eval()
    x = torch.rand(2, 3, 48, 80)
    with torch.no_grad():
        features, maps = est._look(x)
        last = maps[-1]
        assert last.shape[-2:] == (4, 4)
        cells = est.cell_logits(last, features)
        c = last.shape[1]
        for i in range(4):
            for j in range(4):
                alone = torch.cat([last[:, :, i, j], torch.zeros(2, c), features[:, 2 * c:]], dim=1)
                torch.testing.assert_close(cells[:, :, i, j], est._image_logits(alone), rtol=0, atol=1e-6)


def test_the_dense_loss_trains_the_dense_head_alone():
    est = dense_estimator(base=True).train()
    x, target = torch.rand(2, 3, 32, 32), torch.softmax(torch.randn(2, 4, 32, 32), dim=1)
    dense_cross_entropy(est.logits_and_map(x)[1], target).backward()
    for name, param in est.named_parameters():
        if name.startswith("dense_head."):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None or not param.grad.any(), name


def test_a_dense_head_leaves_the_image_level_estimator_as_it_was_seed_for_seed():
    torch.manual_seed(3)
    plain = Estimator(3, width=4, crops=1, crop_size=16, view_size=32, do_no_harm=True)
    after_plain = torch.rand(4)
    torch.manual_seed(3)
    dense = Estimator(3, width=4, crops=1, crop_size=16, view_size=32, do_no_harm=True, dense=True)
    after_dense = torch.rand(4)
    assert torch.equal(after_plain, after_dense)                        # the same random numbers follow
    dense_state = dense.state_dict()
    assert all(torch.equal(v, dense_state[k]) for k, v in plain.state_dict().items())


def test_dense_head_adds_only_its_own_tensors_and_stays_light():
    plain = Estimator(5, width=12, crops=2, crop_size=48, view_size=64, do_no_harm=True)
    dense = Estimator(5, width=12, crops=2, crop_size=48, view_size=64, do_no_harm=True, dense=True)
    plain_keys, dense_keys = set(plain.state_dict()), set(dense.state_dict())
    assert plain_keys < dense_keys and all(k.startswith("dense_head.") for k in dense_keys - plain_keys)
    extra = sum(p.numel() for p in dense.dense_head.parameters())
    assert 2_000 <= extra <= 20_000, extra
    with pytest.raises(ValueError, match="no dense head"):
        plain.weight_map(torch.rand(1, 3, 64, 64))
    assert not plain.has_dense


def test_old_estimator_file_loads_without_a_dense_head(tmp_path):
    with tarfile.open(LEGACY) as tar:
        tar.extract("pyfunc/artifacts/estimator.safetensors", tmp_path, filter="data")
    old = load_estimator(tmp_path / "pyfunc" / "artifacts" / "estimator.safetensors").eval()
    assert not old.has_dense and old.config.dense is False
    assert not any(k.startswith("dense_head") for k in old.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        weights = old.weights(x, "sw")
    assert weights.shape == (1, old.num_outputs + 1)
    with pytest.raises(ValueError, match="no dense head"):
        old.weight_map(x)


def test_dense_save_load_round_trip(tmp_path):
    est = dense_estimator(base=True)
    est.class_names = list(NAMES)
    path = save_estimator(est, tmp_path / "estimator.safetensors")
    loaded = load_estimator(path).eval()
    x = torch.rand(2, 3, 36, 30)
    assert loaded.has_dense and loaded.config == est.config and loaded.class_names == NAMES
    with torch.no_grad():
        assert torch.equal(loaded.weight_map(x), est.weight_map(x))


@pytest.mark.parametrize("base", [True, False])
def test_add_output_grows_the_dense_head_keeping_old_outputs(base, tmp_path):
    est = dense_estimator(base)
    x = torch.rand(2, 3, 32, 32)
    old_weight, old_bias = est.dense_head.out.weight.clone(), est.dense_head.out.bias.clone()
    with torch.no_grad():
        est.dense_head.gain.copy_(torch.arange(3 + int(base), dtype=torch.float32) + 1)
    old_gain = est.dense_head.gain.detach().clone()
    with torch.no_grad():
        image_before, pixels_before = est.logits_and_map(x)
        assert est.add_output("snow") == 3
        image_after, pixels_after = est.logits_and_map(x)
    out = est.dense_head.out
    assert out.out_channels == 4 + int(base) and pixels_after.shape == (2, 4 + int(base), 16, 16)
    # old adapter channels copied exactly, the new one (index 3) zero, base (if any) moved after it
    old_rows = [0, 1, 2, 4] if base else [0, 1, 2]
    assert torch.equal(out.weight[old_rows], old_weight) and torch.equal(out.bias[old_rows], old_bias)
    assert not out.weight[3].any() and out.bias[3] == 0
    assert torch.equal(est.dense_head.gain.detach()[old_rows], old_gain) and est.dense_head.gain[3] == 0
    # so the old outputs' per-pixel logits are unchanged (a wider conv may round differently)
    torch.testing.assert_close(pixels_after[:, old_rows], pixels_before, rtol=0, atol=1e-6)
    # and the new output starts with no spatial term: its image-level logit everywhere
    torch.testing.assert_close(pixels_after[:, 3], image_after[:, 3, None, None].expand(-1, 16, 16), rtol=0, atol=1e-6)
    loaded = load_estimator(save_estimator(est, tmp_path / "grown.safetensors")).eval()
    with torch.no_grad():
        assert torch.equal(loaded.weight_map(x), est.weight_map(x))


# ---------------------------------------------------------------------------------------------
# targets

SHARD_CLASSES = ["rain", "haze", "noise", "jpeg"]          # bits 0..3; no adapter handles jpeg


def known_mask() -> np.ndarray:
    """2 x 3 mask: nothing | rain | haze+noise / jpeg only | rain+jpeg | rain+haze+noise."""
    return np.array([[0, 1, 2 | 4], [8, 1 | 8, 1 | 2 | 4]], np.uint8)


def test_target_map_from_a_known_mask():
    columns = mask_columns(SHARD_CLASSES, NAMES)
    assert columns == [2, 0, 1, -1]
    with_base = target_map_from_mask(known_mask(), columns, 3, base=True)
    expected = np.zeros((4, 2, 3), np.float32)      # haze, noise, rain, base
    expected[3, 0, 0] = 1                           # untouched: base
    expected[2, 0, 1] = 1                           # rain
    expected[[0, 1], 0, 2] = 0.5                    # haze + noise, uniform
    expected[3, 1, 0] = 1                           # jpeg only: no adapter for it, so base
    expected[2, 1, 1] = 1                           # rain + jpeg: rain
    expected[:3, 1, 2] = 1 / 3                      # rain + haze + noise
    np.testing.assert_allclose(with_base, expected, rtol=0, atol=1e-7)
    without = target_map_from_mask(known_mask(), columns, 3, base=False)
    np.testing.assert_allclose(without, expected[:3], rtol=0, atol=1e-7)  # base-only pixels: all zero (ignored)
    assert without[:, 0, 0].sum() == 0 and without[:, 1, 0].sum() == 0


def shard_sample(size: int = 32) -> dict:
    rng = np.random.default_rng(0)
    clean = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[:, : size // 2] = 1          # rain on the left half
    mask[: size // 4, size // 2:] = 2 | 4  # haze + noise on a top-right block; the rest untouched
    return {"clean": clean, "degraded": clean, "mask": mask}


def sources() -> list[dict]:
    return [{"name": n, "data": None, "share": 1.0, "severity": [0.3, 0.6], "sha256": ""} for n in NAMES]


def test_estimator_sample_gives_per_pixel_targets_for_every_kind():
    sample, rng = shard_sample(), np.random.default_rng(1)
    # composite: from the mask
    item = EstimatorSample(sources(), SHARD_CLASSES, 0.0, 32, base=True, dense=True)(sample, rng)
    assert len(item) == 4 and item[3].shape == (4, 32, 32)
    expected = target_map_from_mask(sample["mask"], mask_columns(SHARD_CLASSES, NAMES), 3, True)
    assert torch.equal(item[3], torch.from_numpy(expected))
    # single degradation: one-hot everywhere, the same as the image-level target
    _, _, target, pixels = EstimatorSample(sources(), SHARD_CLASSES, 1.0, 32, base=True, dense=True)(sample, rng)
    assert target.max() == 1 and torch.equal(pixels, target[:, None, None].expand(4, 32, 32))
    # clean or faint: all base
    _, _, target, pixels = EstimatorSample(sources(), SHARD_CLASSES, 0.0, 32, base=True, p_clean=1.0,
                                           dense=True)(sample, rng)
    assert torch.equal(pixels, torch.tensor([0.0, 0, 0, 1])[:, None, None].expand(4, 32, 32))
    # a degradation no adapter handles (the keep step's extra): all base
    _, _, _, pixels = EstimatorSample(sources(), SHARD_CLASSES, 0.0, 32, base=True, extra=("jpeg",), p_extra=1.0,
                                      dense=True)(sample, rng)
    assert torch.equal(pixels[3], torch.ones(32, 32)) and pixels[:3].sum() == 0
    # not dense: three members, as before
    assert len(EstimatorSample(sources(), SHARD_CLASSES, 0.0, 32, base=True)(sample, rng)) == 3


def test_batches_collate_with_and_without_maps():
    from torch.utils.data import default_collate

    sample = shard_sample()
    for dense, members in ((True, 4), (False, 3)):
        transform = EstimatorSample(sources(), SHARD_CLASSES, 0.5, 32, base=True, dense=dense)
        rng = np.random.default_rng(2)
        batch = default_collate([transform(sample, rng) for _ in range(3)])
        assert len(batch) == members and batch[0].shape == (3, 3, 32, 32)
        if dense:
            assert batch[3].shape == (3, 4, 32, 32)


# ---------------------------------------------------------------------------------------------
# loss

def test_dense_cross_entropy_averages_targets_and_ignores_uncovered_cells():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])      # 1 x 2 classes x 1 x 2 cells
    # the left cell (2 x 2 pixels at the target's resolution): half class 0, half class 1
    # the right cell: no target at all (ignored)
    target = torch.zeros(1, 2, 2, 4)
    target[0, 0, 0, :2] = 1.0
    target[0, 1, 1, :2] = 1.0
    log_p = torch.log_softmax(torch.tensor([2.0, 0.0]), 0)
    expected = -(0.5 * log_p[0] + 0.5 * log_p[1])
    torch.testing.assert_close(dense_cross_entropy(logits, target), expected)


def test_classify_loss_adds_the_dense_term_only_with_maps():
    est = dense_estimator(base=True)
    x, target = torch.rand(2, 3, 32, 32), torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 1]])
    target_map = target[:, :, None, None].expand(-1, -1, 32, 32).clone()
    plain, extra = classify_loss(est, torch.device("cpu"), 2.0)((x, x, target))
    assert extra == {}
    total, parts = classify_loss(est, torch.device("cpu"), 2.0)((x, x, target, target_map))
    torch.testing.assert_close(float(total.detach()), parts["image_loss"] + 2.0 * parts["dense_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["image_loss"], float(plain.detach()), rtol=1e-6, atol=1e-6)
    assert parts["dense_loss"] > 0


def test_dense_loss_overfits_a_tiny_batch():
    """Left half one degradation, right half another: the map learns to tell them apart."""
    torch.manual_seed(0)
    est = Estimator(2, width=4, crops=1, crop_size=16, view_size=32, do_no_harm=True, dense=True)
    x = torch.rand(4, 3, 32, 32) * 0.2
    x[:, :, :, :16] += 0.7                              # a bright left half
    target = torch.zeros(4, 3, 32, 32)
    target[:, 0, :, :16] = 1.0
    target[:, 1, :, 16:] = 1.0
    optimizer = torch.optim.Adam(est.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = dense_cross_entropy(est.logits_and_map(x)[1], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
    with torch.no_grad():
        predicted = predicted_columns(est.eval().weight_map(x), 32, 32, base=True)
    assert (predicted[:, :, :14] == 0).all() and (predicted[:, :, 18:] == 1).all()


# ---------------------------------------------------------------------------------------------
# scoring

def test_predicted_columns_lets_base_win_where_adapters_are_weak():
    wm = torch.zeros(1, 3, 1, 2)                      # 2 adapters + keep, two pixels
    wm[0, :2, 0, 0] = torch.tensor([0.6, 0.1])        # adapter 0 outweighs base (0.3)
    wm[0, :2, 0, 1] = torch.tensor([0.2, 0.3])        # base (0.5) wins
    assert predicted_columns(wm, 1, 2, base=True).tolist() == [[[0, 2]]]
    assert predicted_columns(wm, 1, 2, base=False).tolist() == [[[0, 1]]]


def test_iou_and_pixel_accuracy_on_a_hand_made_example():
    # columns: a, b, base; 2 x 3 pixels
    member = np.zeros((3, 2, 3), bool)
    member[0] = [[1, 1, 0], [0, 0, 0]]      # a
    member[1] = [[0, 1, 1], [0, 0, 0]]      # b (pixel (0,1) has both)
    member[2] = [[0, 0, 0], [1, 1, 1]]      # base
    predicted = np.array([[0, 1, 0], [2, 2, 0]])
    counts = segmentation_counts(predicted, member)
    # a: predicted {(0,0),(0,2),(1,2)}, true {(0,0),(0,1)} -> 1 / 4
    # b: predicted {(0,1)}, true {(0,1),(0,2)} -> 1 / 2
    # base: predicted {(1,0),(1,1)}, true {(1,0),(1,1),(1,2)} -> 2 / 3
    assert counts["intersection"].tolist() == [1, 1, 2] and counts["union"].tolist() == [4, 2, 3]
    assert counts["right"] == 4 and counts["scored"] == 6
    scores = segmentation_scores([counts, counts], ["a", "b", "base"])   # two identical images: same ratios
    assert scores["iou"] == pytest.approx({"a": 0.25, "b": 0.5, "base": 2 / 3})
    assert scores["mean_iou"] == pytest.approx((0.25 + 0.5 + 2 / 3) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(4 / 6) and scores["pixels"] == 12


def test_iou_without_base_leaves_unhandled_pixels_out_and_marks_absent_columns():
    member = np.zeros((2, 1, 3), bool)
    member[0, 0, 0] = True                  # pixel 0: a; pixels 1 and 2: nothing handled
    predicted = np.array([[0, 1, 1]])       # what is predicted on unhandled pixels does not count
    scores = segmentation_scores([segmentation_counts(predicted, member)], ["a", "b"])
    assert scores["iou"] == {"a": 1.0, "b": None}
    assert scores["mean_iou"] == 1.0 and scores["pixel_accuracy"] == 1.0 and scores["pixels"] == 1


# ---------------------------------------------------------------------------------------------
# Phase III end to end

def test_phase3_trains_and_scores_the_dense_head(tmp_path, tiny_shards, train_params):
    from conftest import make_components

    components = make_components(tmp_path / "checkpoints", names=("noise", "haze"))
    cfg = {**train_params["estimator"], "dense": True, "dense_weight": 1.0, "sw_steps": 0}
    out = tmp_path / "estimator.safetensors"
    summary = train_estimator(cfg, backbone_path=str(components / "backbone.safetensors"),
                              adapters_dir=str(components / "adapters"), shards=str(tiny_shards), out=str(out),
                              reports=str(tmp_path / "reports"), progress=False)
    est = load_estimator(out)
    assert est.has_dense and est.class_names == ["haze", "noise"]
    dense = summary["dense_val"]
    assert set(dense["iou"]) == {"haze", "noise", "base"} and dense["samples"] > 0 and dense["pixels"] > 0
    assert 0.0 <= dense["pixel_accuracy"] <= 1.0
    assert all(v is None or 0.0 <= v <= 1.0 for v in dense["iou"].values())
    import json

    report = json.loads((tmp_path / "reports" / "estimator.json").read_text())
    assert report["dense_val"] == dense and "val_accuracy" in report
    header = (tmp_path / "reports" / "estimator.tsv").read_text().splitlines()[0].split("\t")
    assert {"image_loss", "dense_loss"} <= set(header)


def test_phase3_fine_tunes_a_grown_dense_estimator(tmp_path, tiny_shards, train_params):
    """Adding a degradation: the current dense estimator grown by one output, then trained with
    `init` (its architecture wins over the params, its output order is kept)."""
    from conftest import make_components

    components = make_components(tmp_path / "checkpoints", names=("noise", "haze", "rain"))
    start = Estimator(2, width=4, crops=1, crop_size=16, view_size=32, do_no_harm=True, dense=True,
                      class_names=["haze", "noise"])
    start.add_output("rain")
    init = save_estimator(start, tmp_path / "grown.safetensors")
    cfg = {**train_params["estimator"], "dense": False, "sw_steps": 0}
    out = tmp_path / "estimator.safetensors"
    summary = train_estimator(cfg, backbone_path=str(components / "backbone.safetensors"),
                              adapters_dir=str(components / "adapters"), shards=str(tiny_shards), out=str(out),
                              reports=str(tmp_path / "reports"), progress=False, init=str(init))
    est = load_estimator(out)
    assert est.has_dense and est.class_names == ["haze", "noise", "rain"] and est.dense_head.out.out_channels == 4
    assert set(summary["dense_val"]["iou"]) == {"haze", "noise", "rain", "base"}


# ---------------------------------------------------------------------------------------------
# the Restorer's pw mode with this map

def test_restorer_pw_with_a_silent_dense_head_restores_like_sw():
    """Zero spatial term: the dense map is the SW weights at every pixel, so `pw` (default source:
    the dense head) gives SW's restoration, keep included, to float rounding."""
    from models.adapters import AdapterBank
    from models.backbone import build_backbone
    from models.restorer import Restorer, weights_summary

    torch.manual_seed(4)
    backbone = build_backbone("tiny").eval()
    bank = AdapterBank(backbone, kind="lora")
    for name in NAMES:
        bank.add(name)
        with torch.no_grad():
            for p in bank.parameters_of(name):
                p.normal_(0, 0.05)
    est = Estimator(3, width=4, crops=1, crop_size=16, view_size=32, do_no_harm=True, dense=True,
                    class_names=NAMES).eval()
    with torch.no_grad():
        est.dense_head.gain.zero_()
        est.keep_head[-1].bias.fill_(-1.0)                              # a visible keep
    restorer = Restorer(backbone, bank, est)
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        sw, sw_used = restorer.restore(x, mode="sw")
        pw, pw_used = restorer.restore(x, mode="pw")
    assert pw_used.shape[:2] == (2, 4) and pw_used.dim() == 4
    torch.testing.assert_close(weights_summary(pw_used), sw_used, rtol=0, atol=1e-6)
    torch.testing.assert_close(pw, sw, rtol=0, atol=2e-5)
