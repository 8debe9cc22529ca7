"""Backbone, estimator, restorer: shapes, checkpoints, modes, tiling, parameter budgets."""

from __future__ import annotations

import json

import pytest
import torch

from models.adapters import AdapterBank
from models.backbone import SIZES, BackboneConfig, LayerNorm2d, build_backbone
from models.checkpoint import CheckpointError
from models.estimator import Estimator, load_estimator, save_estimator
from models.identity import fingerprint, load_backbone, read_backbone_metadata, save_backbone
from models.restorer import Restorer, param_counts
from models.tiling import tile_starts

CLASSES = ["rain", "haze", "noise", "blur", "lowlight"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    return build_backbone("tiny", seg_classes=len(CLASSES)).eval()


def smooth_images(b=1, h=96, w=96, noise=0.03):
    """Photo-like test images: smooth content plus a little noise, in [0, 1]."""
    base = torch.rand(b, 3, max(h // 10, 2), max(w // 10, 2))
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="bicubic", align_corners=False)
    return (x + noise * torch.randn_like(x)).clamp(0, 1)


# -- backbone ----------------------------------------------------------------------------------


def test_layernorm_matches_restormer_withbias():
    norm = LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 6, 5, 7)
    tokens = x.flatten(2).transpose(1, 2)                       # Restormer: b (h w) c
    mu = tokens.mean(-1, keepdim=True)
    var = tokens.var(-1, keepdim=True, unbiased=False)
    ref = (tokens - mu) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias
    ref = ref.transpose(1, 2).reshape(2, 6, 5, 7)
    torch.testing.assert_close(norm(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm(x.to(memory_format=torch.channels_last)), ref, atol=1e-5, rtol=1e-5)


BUDGETS = {"tiny": (0, 1_000_000), "base": (24e6, 28e6), "large": (50e6, 65e6)}


@pytest.mark.parametrize("size", ["tiny", "base", "large"])
def test_forward_odd_size_and_parameter_budget(size):
    # (adapters on every size: tests/test_models_adapters.py::test_bank_forward_odd_size_both_kinds)
    model = build_backbone(size, seg_classes=3).eval()
    low, high = BUDGETS[size]
    assert low <= param_counts(model)["backbone"] < high
    x = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        restored, seg = model(x, with_seg=True)
    assert restored.shape == x.shape
    assert seg.shape == (1, 3, 37, 53)


def test_prompt_variant_and_tiny_input(tiny):
    model = build_backbone("tiny", prompt=True).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 37, 53)).shape == (2, 3, 37, 53)
        assert model(torch.rand(1, 3, 5, 3)).shape == (1, 3, 5, 3)   # smaller than the multiple: replicate pad
        assert tiny(torch.rand(1, 3, 1, 1)).shape == (1, 3, 1, 1)


def test_lora_targets_addressable_by_suffix(tiny):
    names = [n for n, _ in tiny.named_modules()]
    for suffix in ("attn.qkv", "attn.project_out", "ffn.project_in", "ffn.project_out"):
        assert any(n.endswith("." + suffix) for n in names), suffix


def test_estimator_budget():
    assert param_counts(estimator=Estimator(len(CLASSES)))["estimator"] < 1_000_000


def test_drop_seg_head_changes_no_pixel():
    model = build_backbone("tiny", seg_classes=5).eval()
    x = torch.rand(2, 3, 40, 44)
    before_fp = fingerprint(model)
    with torch.no_grad():
        restored, _ = model(x, with_seg=True)
        model.drop_seg_head()
        after = model(x)
    assert torch.equal(restored, after)
    assert model.seg_head is None and model.config.seg_classes == 0
    assert fingerprint(model) == before_fp
    with pytest.raises(RuntimeError):
        model(x, with_seg=True)


def test_fingerprint_tracks_weights_not_adapters_or_layout():
    model = build_backbone("tiny", seg_classes=5)
    fp = fingerprint(model)
    assert len(fp) == 16 and fp == fingerprint(model)
    model.to(memory_format=torch.channels_last)
    assert fingerprint(model) == fp
    with torch.no_grad():
        model.seg_head[0].weight.add_(1.0)
    assert fingerprint(model) == fp
    bank = AdapterBank(model, kind="lora")
    bank.add("rain")
    assert fingerprint(model) == fp
    with torch.no_grad():
        for p in bank.parameters_of("rain"):
            p.add_(0.1)
    bank.merge("rain")
    assert fingerprint(model) == fp
    bank.unmerge()
    with torch.no_grad():
        model.patch_embed.weight[0, 0, 0, 0] += 1e-3
    assert fingerprint(model) != fp


def test_backbone_checkpoint_round_trip(tmp_path):
    model = build_backbone("tiny", seg_classes=5, prompt=True).eval()
    path = save_backbone(model, tmp_path / "backbone.safetensors", extra_metadata={"epoch": 3, "note": "x"})
    assert not list(tmp_path.glob(".*tmp*"))
    meta = read_backbone_metadata(path)
    assert meta["fingerprint"] == fingerprint(model) and json.loads(meta["epoch"]) == 3 and meta["note"] == "x"
    loaded = load_backbone(path).eval()
    assert loaded.config == model.config
    assert fingerprint(loaded) == fingerprint(model)
    x = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        a, sa = model(x, with_seg=True)
        b, sb = loaded(x, with_seg=True)
    assert torch.equal(a, b) and torch.equal(sa, sb)

    # saving a backbone that carries adapters stores the plain backbone
    bank = AdapterBank(model)
    bank.add("rain")
    again = save_backbone(model, tmp_path / "again.safetensors")
    assert read_backbone_metadata(again)["fingerprint"] == meta["fingerprint"]
    assert fingerprint(load_backbone(again)) == meta["fingerprint"]

    half = build_backbone("tiny").to(torch.bfloat16)
    loaded_half = load_backbone(save_backbone(half, tmp_path / "half.safetensors"))
    assert loaded_half.patch_embed.weight.dtype == torch.bfloat16 and fingerprint(loaded_half) == fingerprint(half)


def test_backbone_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.safetensors: file not found"):
        load_backbone(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(CheckpointError, match="junk.safetensors: unreadable"):
        load_backbone(junk)
    est = tmp_path / "estimator.safetensors"
    save_estimator(Estimator(2), est)
    with pytest.raises(CheckpointError, match="estimator.safetensors: is a 'abair-estimator' file"):
        load_backbone(est)
    good = save_backbone(build_backbone("tiny"), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_backbone(truncated)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown backbone size"):
        build_backbone("huge")
    with pytest.raises(ValueError, match="heads"):
        BackboneConfig(dim=10, heads=(1, 2, 3, 8))
    config = BackboneConfig.from_dict(json.loads(SIZES["base"].to_json()))
    assert config == SIZES["base"]


def test_autocast_bf16_and_channels_last(tiny):
    x = torch.rand(2, 3, 24, 32)
    with torch.no_grad():
        ref = tiny(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny(x)
        try:
            tiny.to(memory_format=torch.channels_last)
            out = tiny(x.to(memory_format=torch.channels_last))
        finally:
            tiny.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(low).all() and (low.float() - ref).abs().mean() < 0.05


# -- estimator -----------------------------------------------------------------------------------


def test_estimator_modes_and_growth(tmp_path):
    est = Estimator(len(CLASSES), class_names=CLASSES).eval()
    x = torch.rand(3, 3, 150, 90)
    with torch.no_grad():
        sw = est.weights(x, "sw")
        oh = est.weights(x, "oh")
        hot = est.weights(x, "sw", temperature=1e-4)
        logits = est(x)
    torch.testing.assert_close(sw.sum(1), torch.ones(3))
    assert set(oh.unique().tolist()) <= {0.0, 1.0} and torch.equal(oh.sum(1), torch.ones(3))
    assert torch.equal(oh.argmax(1), sw.argmax(1)) and hot.max(1).values.min() > 0.9

    assert est.add_output("snow") == 5 and est.class_names[-1] == "snow"
    with torch.no_grad():
        grown = est(x)
    assert grown.shape == (3, 6) and torch.equal(grown[:, :5], logits)

    path = save_estimator(est, tmp_path / "estimator.safetensors")
    loaded = load_estimator(path).eval()
    assert loaded.class_names == CLASSES + ["snow"]
    with torch.no_grad():
        assert torch.equal(loaded(x), grown)
    with torch.no_grad():
        small = est(torch.rand(1, 3, 20, 30))      # smaller than the native crops
    assert small.shape == (1, 6)


def random_bank(model, kind: str = "lora") -> AdapterBank:
    """One adapter per class with random non-zero tensors, so every adapter changes the output.
    LoRA tensors are drawn afresh; AdaptIR's are perturbed, as several start at the identity."""
    bank = AdapterBank(model, kind=kind)
    for name in CLASSES:
        bank.add(name)
        with torch.no_grad():
            for p in bank.parameters_of(name):
                if kind == "lora":
                    p.normal_(0, 0.05)
                else:
                    p.add_(torch.randn_like(p) * 0.05)
    return bank


def test_frozen_everything_but_estimator_gets_gradients():
    """Phase III end to end: backbone and adapters frozen, the loss trains only the estimator."""
    model = build_backbone("tiny")
    bank = random_bank(model)
    bank.freeze_backbone(trainable=[])
    est = Estimator(len(CLASSES))
    x = torch.rand(2, 3, 48, 48)
    with bank.weights(est.weights(x, "sw")[:, :-1]):
        loss = (model(x) - x).abs().mean()
    loss.backward()
    assert all(p.grad is not None for p in est.parameters())
    assert all(p.grad is None for p in model.parameters())


# -- restorer ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def system():
    torch.manual_seed(2)
    model = build_backbone("tiny").eval()
    bank = random_bank(model)
    est = Estimator(len(CLASSES), class_names=CLASSES)
    return Restorer(model, bank, est)


def test_restorer_modes(system):
    x = smooth_images(2, 37, 53)
    none, w_none = system.restore(x, mode="none")
    assert w_none is None and none.shape == x.shape and 0 <= none.min() and none.max() <= 1
    with torch.no_grad():
        assert torch.equal(none, system.backbone(x).clamp(0, 1))

    with pytest.raises(ValueError, match="oracle"):
        system.restore(x, mode="oracle")
    with pytest.raises(ValueError, match="mode must be"):
        system.restore(x, mode="magic")

    truth = torch.tensor([[0, 0, 1.0, 0, 0], [0, 1.0, 0, 0, 0]])
    oracle, w = system.restore(x, mode="oracle", weights=truth)
    # K weights given: keep 0 is appended (the weights returned follow `weight_names`)
    assert system.weight_names == [*CLASSES, "keep"]
    assert torch.equal(w, torch.cat([truth, torch.zeros(2, 1)], dim=1))
    with torch.no_grad(), system.bank.weights(truth):
        assert torch.equal(oracle, system.backbone(x).clamp(0, 1))

    # an estimator without do-no-harm: adapter weights sum to one, keep is 0
    sw, w_sw = system.restore(x, mode="sw")
    torch.testing.assert_close(w_sw[:, :-1].sum(1), torch.ones(2))
    assert torch.equal(w_sw[:, -1], torch.zeros(2))
    oh, w_oh = system.restore(x, mode="oh")
    assert torch.equal(w_oh[:, :-1].sum(1), torch.ones(2)) and torch.equal(w_oh.argmax(1), w_sw.argmax(1))
    assert not torch.equal(none, oh)  # the adapters do something


def test_keep_blends_the_input_back(system):
    """out = keep * input + (1 - keep) * network, per image; keep 1 returns the input exactly."""
    x = smooth_images(2, 37, 53)
    adapters = torch.tensor([[0, 0, 1.0, 0, 0], [0, 0.5, 0, 0, 0]])
    network, _ = system.restore(x, mode="oracle", weights=adapters)
    weights = torch.cat([adapters, torch.tensor([[1.0], [0.25]])], dim=1)
    out, used = system.restore(x, mode="oracle", weights=weights)
    assert torch.equal(used, weights)
    assert torch.equal(out[0], x[0])
    torch.testing.assert_close(out[1], 0.25 * x[1] + 0.75 * network[1])
    # tiles see the same keep: exact tiling stays equal to the whole image
    tiled, _ = system.restore(x, mode="oracle", weights=weights, tile=16)
    torch.testing.assert_close(tiled, out, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="keep must be in"):
        system.restore(x, mode="oracle", weights=torch.cat([adapters, torch.full((2, 1), 1.5)], dim=1))
    with pytest.raises(ValueError, match="weights must be"):
        system.restore(x, mode="oracle", weights=torch.zeros(2, 7))


def test_do_no_harm_estimator_weights(tmp_path):
    """base joins the softmax (adapter weights sum below one), keep comes from its own head and
    depends on what the network made of the input, oh gives all zeros when base wins, and all of
    it survives a save/load round trip."""
    torch.manual_seed(0)
    est = Estimator(len(CLASSES), width=8, crop_size=32, view_size=32, do_no_harm=True, class_names=CLASSES).eval()
    with torch.no_grad():
        est.keep_head[-1].weight.normal_(0, 0.5)  # as trained: keep depends on its inputs
    x = torch.rand(3, 3, 40, 40)
    restored = (x * 0.5).clamp(0, 1)
    w = est.weights(x, "sw", restored=restored)
    assert w.shape == (3, len(CLASSES) + 1)
    assert bool((w[:, :-1].sum(1) < 1).all()) and bool(((w[:, -1] > 0) & (w[:, -1] < 1)).all())
    torch.testing.assert_close(w[:, :-1], torch.softmax(est.logits(x), 1)[:, :-1])
    torch.testing.assert_close(w[:, -1], torch.sigmoid(est.keep_logit(x, restored)[:, 0]))
    assert not torch.allclose(est.keep(x, x), est.keep(x, restored))  # it looks at the output
    assert torch.equal(est.weights(x)[:, -1], torch.zeros(3))  # no output yet: keep not known
    with torch.no_grad():
        est.base.bias.fill_(100.0)  # base wins everywhere
    oh = est.weights(x, "oh")
    assert torch.equal(oh[:, :-1], torch.zeros(3, len(CLASSES)))
    save_estimator(est, tmp_path / "e.safetensors")
    again = load_estimator(tmp_path / "e.safetensors").eval()
    assert again.config.do_no_harm and torch.equal(again.weights(x, restored=restored), est.weights(x, restored=restored))


def test_the_estimator_serves_the_temperature_it_was_trained_with(system, tmp_path):
    """The SW temperature is part of the estimator (its keep head learned on blends made at it):
    weights, the Restorer's served mode and the saved file all use it unless a caller names another,
    and a file from before the config held it takes it from its metadata."""
    import json

    from safetensors.torch import load_file, save_file

    torch.manual_seed(2)
    est = Estimator(len(CLASSES), width=8, crop_size=32, view_size=32, do_no_harm=True, temperature=0.5,
                    class_names=CLASSES).eval()
    x = smooth_images(2, 40, 40)
    logits = est.logits(x)
    torch.testing.assert_close(est.weights(x)[:, :-1], torch.softmax(logits / 0.5, 1)[:, :-1])
    assert not torch.allclose(est.weights(x), est.weights(x, temperature=1.0))
    restorer = Restorer(system.backbone, system.bank, est)
    served, used = restorer.restore(x, mode="sw")
    at_half, used_half = restorer.restore(x, mode="sw", temperature=0.5)
    assert torch.equal(served, at_half) and torch.equal(used, used_half)
    _, used_one = restorer.restore(x, mode="sw", temperature=1.0)
    assert not torch.allclose(used[:, :-1], used_one[:, :-1])
    save_estimator(est, tmp_path / "e.safetensors", extra_metadata={"temperature": "0.5"})
    assert load_estimator(tmp_path / "e.safetensors").config.temperature == 0.5
    # an older file: no temperature in its config, the trained one in its metadata
    from safetensors import safe_open

    with safe_open(str(tmp_path / "e.safetensors"), "pt") as f:
        metadata = dict(f.metadata())
    config = json.loads(metadata["config"])
    del config["temperature"]
    metadata["config"] = json.dumps(config)
    save_file(load_file(tmp_path / "e.safetensors"), tmp_path / "old.safetensors", metadata=metadata)
    old = load_estimator(tmp_path / "old.safetensors").eval()
    assert old.config.temperature == 0.5 and torch.equal(old.weights(x), est.weights(x))
    with pytest.raises(ValueError, match="temperature"):
        Estimator(len(CLASSES), width=8, crop_size=32, view_size=32, temperature=0.0)


def test_restorer_fills_in_the_estimators_keep(system):
    """In the estimator's modes keep is asked once the network has run, on its output; the
    served image is exactly the blend, and explicit weights are taken as given."""
    torch.manual_seed(1)
    est = Estimator(len(CLASSES), width=8, crop_size=32, view_size=32, do_no_harm=True, class_names=CLASSES).eval()
    with torch.no_grad():
        est.keep_head[-1].weight.normal_(0, 0.5)
        est.keep_head[-1].bias.fill_(0.5)
    restorer = Restorer(system.backbone, system.bank, est)
    x = smooth_images(2, 40, 40)
    out, used = restorer.restore(x, mode="sw")
    adapters = used[:, :-1]
    network, _ = restorer.restore(x, mode="oracle", weights=adapters)
    keep = est.keep(x, network)[:, 0]
    torch.testing.assert_close(used[:, -1], keep)
    assert bool((keep > 0.05).all())
    torch.testing.assert_close(out, torch.lerp(network, x, keep.view(-1, 1, 1, 1)))
@pytest.mark.parametrize("row", [[0, 0, 0, 1.0, 0], [0.1, 0.2, 0.3, 0.25, 0.15]])
def test_restorer_merge_path_equals_per_sample_path(system, row):
    """Same weights for the whole batch: the restorer merges (one adapter or the blend) instead
    of running the per-sample path; the results agree and the weights are restored exactly."""
    x = smooth_images(2, 40, 40)
    same = torch.tensor([row] * 2)
    before = {k: v.clone() for k, v in system.backbone.state_dict().items()}
    merged, _ = system.restore(x, mode="oh" if max(row) == 1 else "oracle", weights=same)
    with torch.no_grad(), system.bank.weights(same):
        per_sample = system.backbone(x).clamp(0, 1)
    assert (merged - per_sample).abs().max() < 1e-5
    assert system.bank.merged is None
    after = system.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_restorer_names_reorder_to_bank_columns(system):
    x = smooth_images(1, 32, 32)
    reordered = Restorer(system.backbone, system.bank, names=["lowlight", "rain"])
    a, _ = reordered.restore(x, mode="oracle", weights=torch.tensor([[0.25, 0.75]]))
    b, _ = system.restore(x, mode="oracle", weights=torch.tensor([[0.75, 0, 0, 0, 0.25]]))
    assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["lora-merged", "lora-per-sample", "adaptir", "prompt"])
def test_exact_tiling_equals_whole_everywhere(variant, monkeypatch):
    """Tiled inside the blocks (two passes for MDTA's global attention), the result equals the
    whole-image one at every pixel, tile borders included, and no block ever runs whole."""
    torch.manual_seed(3)
    model = build_backbone("tiny", prompt=variant == "prompt").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)   # away from the initialisation's symmetries
    bank = random_bank(model, "adaptir" if variant == "adaptir" else "lora")
    restorer = Restorer(model, bank)
    x = smooth_images(2, 203, 150)
    weights = torch.tensor([[0.1, 0.2, 0.4, 0.2, 0.1], [0.1, 0.2, 0.4, 0.2, 0.1]])
    if variant in ("lora-per-sample", "adaptir"):
        weights = torch.tensor([[0.1, 0.2, 0.4, 0.2, 0.1], [0.0, 0.0, 0.0, 1.0, 0.0]])
    whole, _ = restorer.restore(x, mode="oracle", weights=weights)

    from models import backbone as backbone_module
    from models import tiling as tiling_module
    tile_counts = []
    real_halo_tiles = tiling_module.halo_tiles

    def counting_halo_tiles(*args, **kwargs):
        tiles = real_halo_tiles(*args, **kwargs)
        tile_counts.append(len(tiles))
        return tiles

    def whole_block(*_):
        raise AssertionError("a transformer block ran on the whole map")

    monkeypatch.setattr(tiling_module, "halo_tiles", counting_halo_tiles)
    monkeypatch.setattr(backbone_module.TransformerBlock, "forward", whole_block)
    tiled, _ = restorer.restore(x, mode="oracle", weights=weights, tile=64)
    budget, _ = restorer.restore(x, mode="oracle", weights=weights, max_pixels=64 * 64 + 100)
    monkeypatch.undo()

    assert max(tile_counts) >= 12            # 203 x 150 (padded to 208 x 152) in 64 px tiles
    # AdaptIR scales phases: where a phase sits at the +-pi cut, rounding differences of 1e-7
    # flip its sign and move that frequency's value (measured max 1e-4; whole-image inference
    # of a batch and of its images one at a time differs the same way: 7e-5)
    diff = (tiled - whole).abs()
    if variant == "adaptir":
        assert diff.max() < 1e-3 and diff.mean() < 1e-4
    else:
        assert diff.max() < 1e-5 and diff.mean() < 1e-6
    assert torch.equal(budget, tiled)        # the budget's largest side is 64


def test_tiny_tiles_and_tiling_errors(system):
    x = smooth_images(1, 40, 40)
    whole, _ = system.restore(x, mode="none")
    tiled, _ = system.restore(x, mode="none", tile=8)    # 8 px at level 1, 16 px (the floor) deeper
    assert (tiled - whole).abs().max() < 1e-5
    with pytest.raises(ValueError, match="tiling must be"):
        system.restore(x, mode="none", tile=32, tiling="approx")
    with pytest.raises(ValueError, match="at least 8"):
        system.restore(x, mode="none", tile=4)


def test_local_tiling_is_close_and_has_no_seams(system):
    """Independent tiles (tiling="local") cannot equal the whole image, since each tile's
    attention sees only its own pixels; the differences are small and spread evenly, and
    blending leaves no seam."""
    x = smooth_images(1, 256, 200)
    weights = torch.tensor([[0.1, 0.2, 0.4, 0.2, 0.1]])
    whole, _ = system.restore(x, mode="oracle", weights=weights)
    tiled, _ = system.restore(x, mode="oracle", weights=weights, tile=128, overlap=32, tiling="local")
    assert tiled.shape == whole.shape
    diff = (tiled - whole).abs()
    # measured: max about 0.02, mean about 0.002 at tile 128 (benchmarks/results/model_speed.md)
    assert 1e-4 < diff.mean() < 5e-3 and diff.max() < 0.05

    # seams: the horizontal/vertical steps across tile edges are no larger in the tiled image
    # than in the whole-image result at the same places, nor than the typical step elsewhere
    for axis, size in ((3, 200), (2, 256)):
        step_tiled = tiled.diff(dim=axis).abs().mean(dim=(0, 1, 5 - axis))
        step_whole = whole.diff(dim=axis).abs().mean(dim=(0, 1, 5 - axis))
        starts = tile_starts(size, 128, 32)
        edges = sorted({s - 1 for s in starts[1:]} | {s + 127 for s in starts[:-1]})
        assert (step_tiled[edges] <= step_whole[edges] * 1.25 + 2e-3).all()
        assert step_tiled[edges].mean() <= 1.5 * step_tiled.mean()

    # a memory budget picks the tile size; an image inside one tile runs whole
    budget, _ = system.restore(x, mode="oracle", weights=weights, max_pixels=128 * 128, tiling="local")
    assert torch.equal(budget, tiled)
    small, _ = system.restore(x[..., :100, :100], mode="oracle", weights=weights, tile=128, tiling="local")
    ref, _ = system.restore(x[..., :100, :100], mode="oracle", weights=weights)
    assert torch.equal(small, ref)


def test_param_counts_sum(system):
    counts = param_counts(system.backbone, system.bank, system.estimator)
    assert counts["adapters"] == sum(counts["per_adapter"].values()) == 5 * counts["per_adapter"]["rain"]
    assert counts["total"] == counts["backbone"] + counts["seg_head"] + counts["adapters"] + counts["estimator"]
    every = sum(p.numel() for p in system.backbone.parameters()) + counts["estimator"]
    assert counts["total"] == every
