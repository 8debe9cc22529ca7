"""Real pairs and fresh degradations in training: paired-data specs with held-out splits, the
real/synthetic mix, Phase I's redraw and learning curve, and the do-no-harm targets and keep step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.core.errors import AbairError
from tasks.data import reader
from tests.conftest import write_png
from tests.test_training import trained_backbone  # noqa: F401  (a fixture)


def pair_folder(root: Path, names: list[str], size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for name in names:
        clean = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        write_png(root / "target" / name, clean)
        write_png(root / "input" / name, (clean // 3).astype(np.uint8))
    return root


SCENES = [f"cam_ISO800_{scene}_{shot}.png" for scene in ("flower", "door", "desk", "book", "wall", "car") for shot in (1, 2, 3)]


def test_held_out_split_is_disjoint_stable_and_keeps_scenes_together(tmp_path):
    folder = pair_folder(tmp_path / "pairs", SCENES)
    spec = {"paths": [str(folder)], "holdout": 0.4, "group": "scene"}
    train, val = reader.open_paired(spec, "train"), reader.open_paired(spec, "val")
    assert set(train.names).isdisjoint(val.names) and sorted(train.names + val.names) == sorted(SCENES)
    scene = lambda n: n.rsplit("_", 1)[0]  # noqa: E731
    assert {scene(n) for n in train.names}.isdisjoint({scene(n) for n in val.names})
    # adding pairs never moves an existing one across the split
    pair_folder(folder, ["cam_ISO800_new_1.png", "cam_ISO800_new_2.png"])
    assert set(val.names) <= set(reader.open_paired(spec, "val").names)
    assert set(train.names) <= set(reader.open_paired(spec, "train").names)
    # by image: shots of one scene may land on both sides, but each name is on one side only
    by_image = {**spec, "group": "image"}
    assert set(reader.open_paired(by_image, "val").names).isdisjoint(reader.open_paired(by_image, "train").names)


def test_several_folders_and_the_short_form(tmp_path):
    a = pair_folder(tmp_path / "a", ["1.png", "2.png"])
    b = pair_folder(tmp_path / "b", ["1.png", "3.png"])
    both = reader.open_paired({"paths": [str(a), str(b)], "holdout": 0.0}, "all")
    assert both.names == ["0/1.png", "0/2.png", "1/1.png", "1/3.png"]
    degraded, clean = both.load("1/3.png")
    assert degraded.shape == clean.shape == (40, 40, 3)
    # the short form (a folder): every 10th pair by name is held out, as before
    c = pair_folder(tmp_path / "c", [f"{i:02d}.png" for i in range(20)], size=16)
    assert reader.open_paired(str(c), "val").names == ["00.png", "10.png"]
    assert len(reader.open_paired(str(c), "train")) == 18
    with pytest.raises(AbairError, match="unknown keys"):
        reader.paired_spec({"paths": [str(a)], "holdot": 0.2})
    with pytest.raises(AbairError, match="group in"):
        reader.paired_spec({"paths": [str(a)], "group": "camera"})
    with pytest.raises(AbairError, match="no pairs in the 'val' split"):
        reader.open_paired({"paths": [str(a)], "holdout": 0.0}, "val")


class Counting(torch.utils.data.IterableDataset):
    def __init__(self, value: int):
        super().__init__()
        self.value, self.segment = value, 0

    def __iter__(self):
        while True:
            yield self.value


def test_mixed_stream_draws_each_stream_by_its_share():
    stream = reader.MixedStream([Counting(0), Counting(1)], [0.25, 0.75], seed=3)
    items = [x for x, _ in zip(stream, range(4000))]
    assert abs(np.mean(items) - 0.75) < 0.03
    again = reader.MixedStream([Counting(0), Counting(1)], [0.25, 0.75], seed=3)
    assert [x for x, _ in zip(again, range(200))] == items[:200]


def test_adapter_trains_on_real_pairs_and_synthetic(tmp_path, tiny_shards, train_params, trained_backbone):
    from models.adapters import read_adapter_metadata
    from tasks.train.adapters import train_adapter
    from tasks.train.estimator import adapter_sources

    folder = pair_folder(tmp_path / "pairs", SCENES, size=48)
    spec = {"paths": [str(folder)], "holdout": 0.4, "group": "scene", "share": 0.5}
    cfg = {**train_params["adapters"], "data": {"noise": spec}}
    result = train_adapter(cfg, "noise", backbone_path=str(trained_backbone), shards=str(tiny_shards),
                           out_dir=str(tmp_path / "adapters"), reports=str(tmp_path / "reports"), progress=False)
    assert not result["skipped"] and len(result["losses"]) == cfg["steps"]
    meta = read_adapter_metadata(tmp_path / "adapters" / "noise.safetensors")
    assert json.loads(meta["data"]) == spec
    (source,) = adapter_sources([tmp_path / "adapters" / "noise.safetensors"])
    assert source["data"] == spec and source["share"] == 0.5


def test_redraw_gives_fresh_degradations_of_the_same_clean_crop(tiny_shards):
    from tasks.train.pretrain import PretrainSample

    index = reader.load_index(str(tiny_shards))
    assert index["generator"]["classes"] == index["classes"]
    sample = next(iter(reader.read_split(reader.shard_urls(str(tiny_shards), "train", index))))
    transform = PretrainSample(32, len(index["classes"]), index["generator"])
    draws = [transform.redraw(sample["clean"], np.random.default_rng(seed)) for seed in range(10)]
    degraded_draws = [d.tobytes() for d, m in draws if m.any()]
    assert len(degraded_draws) >= 6 and len(set(degraded_draws)) == len(degraded_draws)  # new each time
    for degraded, mask in draws:
        assert degraded.dtype == np.uint8 and degraded.shape == sample["clean"].shape
        untouched = mask == 0
        assert np.array_equal(degraded[untouched], sample["clean"][untouched])  # the mask says where
    assert any(mask.any() for _, mask in draws)
    # the same rng state gives the same bytes (runs stay reproducible)
    a, _ = transform.redraw(sample["clean"], np.random.default_rng(11))
    b, _ = transform.redraw(sample["clean"], np.random.default_rng(11))
    assert np.array_equal(a, b)


def test_pretrain_learning_curve(tmp_path, tiny_shards, train_params):
    from tasks.train.pretrain import chunk_ends, pretrain

    assert chunk_ends(0, 12, 4) == [4, 8, 12] and chunk_ends(5, 12, 4) == [8, 12] and chunk_ends(0, 12, 0) == [12]
    cfg = {**train_params["pretrain"], "val_every": 4, "redraw": True}
    pretrain(cfg, shards=str(tiny_shards), out=str(tmp_path / "b.safetensors"), state_path=str(tmp_path / "s.pt"),
             reports=str(tmp_path / "reports"), progress=False)
    rows = (tmp_path / "reports" / "pretrain_val.tsv").read_text().splitlines()
    assert rows[0] == "step\tpsnr_input\tpsnr_restored\tgain"
    steps = [int(r.split("\t")[0]) for r in rows[1:]]
    assert steps == [4, 8, 12]
    final = json.loads((tmp_path / "reports" / "pretrain.json").read_text())
    if final["val_samples"] <= 64:  # the same samples: the last point is the saved model's
        assert abs(float(rows[-1].split("\t")[3]) - final["val_psnr_gain"]) < 1e-3
    assert (tmp_path / "reports" / "pretrain_gain.png").stat().st_size > 1000


def test_faint_samples_are_within_faint_psnr_of_the_clean_crop():
    """Light rain at a low severity is visible streaks (27-29 dB off the clean crop): labelled
    `base`, it taught the estimator to leave real light rain alone. With faint_psnr, a faint draw
    further off than that is replaced by the clean crop; the target stays all base."""
    from tasks.core.metrics import psnr
    from tasks.train.estimator import EstimatorSample

    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32) / 64
    clean = (np.stack([0.3 + 0.4 * xx, 0.4 + 0.2 * yy, 0.5 - 0.2 * xx * yy], axis=2) * 255).astype(np.uint8)
    sample = {"clean": clean, "degraded": clean, "mask": np.zeros((64, 64), np.uint8)}
    rain = [{"name": "rain", "data": None, "share": 1.0, "severity": [0.15, 0.8], "sha256": ""}]

    def faint_psnrs(faint_psnr):
        transform = EstimatorSample(rain, ["rain"], 0.0, 64, base=True, p_clean=1.0, faint=0.1, faint_psnr=faint_psnr)
        values = []
        for seed in range(40):
            degraded, clean_t, target = transform(sample, np.random.default_rng(seed))
            assert target.tolist() == [0.0, 1.0]
            values.append(float(psnr(degraded[None], clean_t[None])[0]))
        return np.array(values)

    unchecked, checked = faint_psnrs(None), faint_psnrs(33.0)
    assert (unchecked < 30).sum() >= 5          # the severity alone lets visible streaks through as "faint"
    assert (checked >= 33).all()                 # none of them now
    assert (checked == 100).sum() > (unchecked == 100).sum()   # those draws became the clean crop (PSNR at its cap)


def test_estimator_targets_put_clean_samples_on_base(tiny_shards):
    from tasks.train.estimator import EstimatorSample

    index = reader.load_index(str(tiny_shards))
    sources = [{"name": n, "data": None, "share": 1.0, "severity": [0.5, 1.0], "sha256": ""} for n in ("noise", "haze")]
    samples = list(zip(reader.read_split(reader.shard_urls(str(tiny_shards), "train", index)), range(12)))
    clean_only = EstimatorSample(sources, index["classes"], 0.5, 48, base=True, p_clean=1.0, faint=0.05)
    for sample, i in samples:
        degraded, clean, target = clean_only(sample, np.random.default_rng(i))
        assert target.tolist() == [0.0, 0.0, 1.0]
        assert float((degraded - clean).abs().mean()) < 0.03  # clean, or barely degraded
    composite = EstimatorSample(sources, index["classes"], 0.0, 48, base=True, p_clean=0.0)
    for sample, i in samples:
        item = composite(sample, np.random.default_rng(i))
        if item is None:
            continue
        target = item[2]
        mask = sample["mask"]
        handled = [index["classes"].index(n) for n in ("noise", "haze")]
        touched = np.zeros(mask.shape, bool)
        for bit in handled:
            touched |= ((mask >> bit) & 1).astype(bool)
        raw_base = float((~touched).mean())
        raw = [float(((mask >> b) & 1).mean()) for b in handled] + [raw_base]
        assert np.allclose(target.numpy(), np.array(raw) / sum(raw), atol=1e-6)


def test_keep_step_learns_to_return_a_clean_input_the_network_would_spoil():
    """A network that ruins its input (random weights), clean samples: the keep step, trained on
    the cache of features and served-error moments, drives keep towards 1 so the served output
    is the input; the rest of the estimator stays as it was."""
    from models.adapters import AdapterBank
    from models.backbone import build_backbone
    from models.estimator import Estimator
    from tasks.train import loop
    from tasks.train.estimator import KeepCache, KeepHeads, keep_loss, keep_moments, keep_report

    torch.manual_seed(0)
    backbone = build_backbone("tiny").eval()
    bank = AdapterBank(backbone, "lora")
    bank.add("noise")
    estimator = Estimator(1, width=8, crops=1, crop_size=32, view_size=32, do_no_harm=True, class_names=["noise"])
    before = {k: v.clone() for k, v in estimator.state_dict().items() if not k.startswith("keep_head")}
    clean = torch.rand(4, 3, 32, 32)
    with torch.no_grad(), bank.weights(None):
        restored = backbone(clean).clamp(0, 1)
        features = torch.cat([estimator.features(clean), estimator.features(restored)], dim=1)
    assert float((restored - clean).abs().mean()) > 0.05  # it does spoil it
    cache = KeepCache(features, keep_moments(clean, restored, clean), torch.zeros(4))
    heads = KeepHeads.of(estimator)
    cfg = {"lr": 5e-2, "weight_decay": 0.0, "betas": [0.9, 0.999], "steps": 60, "batch": 4, "log_every": 10}
    batches = ((step, torch.arange(4)) for step in range(60))
    loop.fit(loop.Training(heads.parameters(), cfg, torch.device("cpu")), keep_loss(heads, cache),
             batches, cfg, 60, torch.device("cpu"), progress=False)
    with torch.no_grad():
        keep = estimator.eval().keep(clean, restored)[:, 0]
    assert float(keep.min()) > 0.9, keep
    report = keep_report(heads, cache)
    assert report["tone_share_mean"] is None   # no tone lock on this system
    assert report["psnr_served"] > report["psnr_network"] + 10 and report["worse_share"] == 0.0
    after = {k: v for k, v in estimator.state_dict().items() if not k.startswith("keep_head")}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_keep_harm_weight_leans_to_keeping_where_the_head_cannot_tell_samples_apart():
    """Two samples the head sees alike (same features): on one the network gains 6 dB, on the
    other it loses 6 dB. The plain loss settles on a keep between them and serves the second
    worse than its input; with the harm penalty keep rises until neither is made worse by more
    than the margin (0.1 dB). The penalty is exactly zero while nothing is made worse."""
    from tasks.train import loop
    from tasks.train.estimator import HARM_MARGIN_DB, KeepCache, KeepHeads, keep_loss, served_mse

    # per sample: error of the input (keep 1) and of the network (keep 0), independent errors; moments
    # (uu, dd, ee, ud, ue, de) with u = x - r, e = r - c, u.e = -|e|^2, no tone lock (d = 0)
    def moments(input_mse: float, network_mse: float) -> torch.Tensor:
        return torch.tensor([input_mse + network_mse, 0.0, network_mse, 0.0, -network_mse, 0.0])

    helped, hurt = moments(4e-3, 1e-3), moments(1e-3, 4e-3)
    quad = torch.stack([helped, hurt])
    features = torch.ones(2, 1)
    cache = KeepCache(features, quad, torch.zeros(2))

    def trained_keep(harm_weight: float) -> torch.Tensor:
        torch.manual_seed(0)
        head = torch.nn.Linear(1, 1)
        cfg = {"lr": 5e-2, "weight_decay": 0.0, "betas": [0.9, 0.999], "steps": 400, "batch": 2, "log_every": 100}
        loop.fit(loop.Training(list(head.parameters()), cfg, torch.device("cpu")),
                 keep_loss(KeepHeads(head), cache, harm_weight=harm_weight),
                 ((step, torch.arange(2)) for step in range(400)), cfg, 400, torch.device("cpu"), progress=False)
        with torch.no_grad():
            return torch.sigmoid(head(features)[:, 0])

    def change_db(keep: torch.Tensor) -> torch.Tensor:   # served against input, dB
        return 10 * torch.log10(served_mse(quad, torch.ones(2)) / served_mse(quad, keep))

    plain, careful = trained_keep(0.0), trained_keep(10.0)
    assert float(change_db(plain)[1]) < -0.5                  # the plain mean spoils the second
    assert float(change_db(careful).min()) >= -HARM_MARGIN_DB - 0.02
    assert float(careful[0]) > float(plain[0]) + 0.05         # at the price of part of the first's gain
    assert float(change_db(careful)[0]) > 0.5
    # nothing made worse: the penalty adds nothing
    head = torch.nn.Linear(1, 1)
    with torch.no_grad():
        head.weight.zero_(), head.bias.fill_(8.0)              # keep ~ 1
    rows = torch.arange(2)
    assert torch.equal(keep_loss(KeepHeads(head), cache, harm_weight=10.0)(rows)[0],
                       keep_loss(KeepHeads(head), cache)(rows)[0])


def test_keep_moments_give_the_served_error_at_every_keep_and_tone_share_and_its_minimum():
    """The six cached moments give the MSE of what is served, k * degraded + (1 - k) * (restored +
    s * correction), exactly for any keep k and tone share s; optimal_keep is its minimiser over
    keep on [0, 1] at a given share (1 when nothing depends on keep)."""
    from tasks.train.estimator import keep_moments, optimal_keep, served_mse

    gen = torch.Generator().manual_seed(3)
    degraded, restored, clean, correction = (torch.rand(5, 3, 16, 16, generator=gen) for _ in range(4))
    correction -= 0.5
    restored[4] = degraded[4]
    correction[4] = 0.0
    moments = keep_moments(degraded, restored, clean, correction)
    for k in (0.0, 0.3, 1.0):
        direct = (torch.lerp(restored, degraded, k) - clean).pow(2).flatten(1).mean(1)
        assert torch.allclose(served_mse(moments, torch.full((5,), k)), direct, atol=1e-6)
        for s in (0.0, 0.6, 1.0):
            direct = (torch.lerp(restored + s * correction, degraded, k) - clean).pow(2).flatten(1).mean(1)
            assert torch.allclose(served_mse(moments, torch.full((5,), k), torch.full((5,), s)), direct, atol=1e-6)
    grid = torch.linspace(0, 1, 201)
    for share in (None, torch.full((5,), 0.6)):
        best = optimal_keep(moments, share)
        for i in range(4):
            at = None if share is None else share[i:i + 1].expand(201)
            errors = served_mse(moments[i:i + 1].expand(201, 6), grid, at)
            assert float(served_mse(moments[i:i + 1], best[i:i + 1], None if share is None else share[i:i + 1])) \
                <= float(errors.min()) + 1e-7
        assert float(best[4]) == 1.0


def test_evaluation_set_of_held_out_pairs_and_first_n(tmp_path):
    """A paired set may be a mapping's held-out side (exactly the pairs training leaves out) or
    the first N pairs of a folder."""
    from tasks.evaluate.sets import load_set, parse_sets, set_folder

    folder = pair_folder(tmp_path / "pairs", SCENES, size=32)
    mapping = {"paths": [str(folder)], "holdout": 0.4, "group": "scene"}
    specs = parse_sets({"sets": [
        {"name": "held", "group": "known", "task": ["noise"], "path": mapping},
        {"name": "firsts", "group": "known", "task": ["noise"], "path": str(folder), "first": 4}]})
    held = load_set(specs[0], set_folder(specs[0], "", tmp_path / "cache"), 16)
    assert sorted(held.names) == reader.open_paired(mapping, "val").names
    assert set(held.names).isdisjoint(reader.open_paired({**mapping, "share": 0.5}, "train").names)
    assert "held-out 0.4 (by scene)" in specs[0].describe()
    firsts = load_set(specs[1], set_folder(specs[1], "", tmp_path / "cache"), 16)
    assert firsts.names == sorted(SCENES)[:4]
    with pytest.raises(AbairError, match="needs `holdout` > 0"):
        parse_sets({"sets": [{"name": "x", "group": "known", "path": {"paths": [str(folder)]}}]})
    with pytest.raises(AbairError, match="first must be a positive integer"):
        parse_sets({"sets": [{"name": "x", "group": "known", "path": str(folder), "first": 0}]})


def test_preview_puts_real_pairs_beside_the_model(tmp_path, project_params):
    from tasks.data.preview import write_preview

    folder = pair_folder(tmp_path / "pairs", ["a.png"], size=200)
    plain = write_preview(str(tmp_path / "plain.png"), project_params["synthesize"])
    sheet = write_preview(str(tmp_path / "sheet.png"), project_params["synthesize"], real={"noise": str(folder)})
    assert sheet.shape[0] == plain.shape[0] + 160 and (tmp_path / "sheet.png").stat().st_size > 0
    row = sheet[plain.shape[0]:]
    real_tile, synthetic = row[20:, :160].astype(float), row[20:, 2 * 160:3 * 160].astype(float)
    assert real_tile.std() > 0 and not np.array_equal(real_tile, synthetic)


def test_clean_crops_vary_in_exposure_and_sharpness_and_some_are_grey():
    from tasks.data.synthesize import vary_clean

    rng = np.random.default_rng(0)
    clean = rng.random((32, 32, 3)).astype(np.float32)
    assert vary_clean(clean, rng, {}) is clean
    assert vary_clean(clean, np.random.default_rng(1), {"p": 0.0, "exposure": [0.5, 0.5]}) is clean
    dim = vary_clean(clean, np.random.default_rng(1), {"p": 1.0, "exposure": [0.5, 0.5]})
    expected = np.round(np.clip(clean ** 2.2 * 0.5, 0, 1) ** (1 / 2.2) * 255) / 255
    assert np.allclose(dim, expected, atol=1e-6)
    soft = vary_clean(clean, np.random.default_rng(1), {"p": 1.0, "soften": [0.5, 0.5]})
    assert soft.std() < clean.std() * 0.8  # smoothed
    again = vary_clean(clean, np.random.default_rng(1), {"p": 1.0, "soften": [0.5, 0.5]})
    assert np.array_equal(soft, again)


def test_shards_hold_grey_crops(tiny_shards, tmp_path, project_params, photos):
    import copy

    from tasks.data.synthesize import synthesize

    root = tmp_path / "src"
    for name in ("astronaut", "chelsea"):
        write_png(root / f"{name}.png", photos[name][:96, :96])
    cfg = copy.deepcopy(project_params["synthesize"])
    cfg.update(crop_size=32, samples_per_image=20, workers=1, min_size=32, val_fraction=0.0, p_gray=0.5)
    synthesize(cfg, source=str(root), out=str(tmp_path / "shards"), progress=False)
    index = reader.load_index(str(tmp_path / "shards"))
    samples = list(reader.read_split(reader.shard_urls(str(tmp_path / "shards"), "train", index)))
    grey = [s for s in samples if np.array_equal(s["clean"][..., 0], s["clean"][..., 1])
            and np.array_equal(s["clean"][..., 1], s["clean"][..., 2])]
    assert 8 <= len(grey) <= 32, len(grey)  # about half of the 40


def test_keep_cache_restores_a_share_with_a_misapplied_adapter():
    """With p_misapplied = 1 every cached sample is restored by one adapter alone (drawn at
    random), so its served error at keep 0 is that adapter's; with 0, the estimator's blend's."""
    from torch.utils.data import IterableDataset

    from models.adapters import AdapterBank
    from models.backbone import build_backbone
    from models.estimator import Estimator
    from tasks.train.estimator import keep_cache

    torch.manual_seed(0)
    backbone = build_backbone("tiny").eval()
    bank = AdapterBank(backbone, "lora")
    for name in ("noise", "rain"):
        bank.add(name)
    with torch.no_grad():
        for p_name, p in backbone.named_parameters():
            if "lora" in p_name.lower() and ".rain" in p_name:
                p.normal_(0, 0.5)           # rain's adapter changes the output, noise's does nothing
    estimator = Estimator(2, width=8, crops=1, crop_size=16, view_size=16, do_no_harm=True, class_names=["noise", "rain"])
    gen = torch.Generator().manual_seed(1)
    items = [(torch.rand(3, 24, 24, generator=gen), torch.rand(3, 24, 24, generator=gen), torch.zeros(3)) for _ in range(8)]

    class Fixed(IterableDataset):
        segment = 0

        def __iter__(self):
            return iter(items)

    def error_alone(name):
        with torch.no_grad(), bank.weights(torch.tensor([[1.0 if n == name else 0.0 for n in bank.names]] * 8)):
            restored = backbone(torch.stack([d for d, _, _ in items])).clamp(0, 1)
        return (restored - torch.stack([c for _, c, _ in items])).pow(2).flatten(1).mean(1)

    quadratic = keep_cache(estimator, backbone, bank, ["noise", "rain"], 1.0, None, Fixed(), 8, 8,
                           torch.device("cpu"), False, p_misapplied=1.0, seed=0).moments
    alone = torch.stack([error_alone("noise"), error_alone("rain")])
    assert not torch.allclose(alone[0], alone[1])
    assert all(bool(torch.isclose(quadratic[i, 2], alone[:, i], rtol=1e-4).any()) for i in range(8))
    blended = keep_cache(estimator, backbone, bank, ["noise", "rain"], 1.0, None, Fixed(), 8, 8,
                         torch.device("cpu"), False, p_misapplied=0.0, seed=0).moments
    assert not all(bool(torch.isclose(blended[i, 2], alone[:, i], rtol=1e-4).any()) for i in range(8))
