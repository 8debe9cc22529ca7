"""The tone lock (models/tone.py): which weights it follows, what it moves, its numpy twin in the
onnxruntime backend, and where it sits in the Restorer (after keep's judgement, before its blend;
only for systems trained with it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import tone
from models.adapters import AdapterBank
from models.backbone import BackboneConfig, build_backbone
from models.estimator import Estimator, load_estimator, save_estimator
from models.restorer import Restorer
from tasks.serve.backends import arrays

NAMES = ["rain", "haze", "noise", "blur", "lowlight"]


def test_the_share_counts_only_tone_free_kinds_and_the_backbone_alone():
    used = torch.tensor([[0.1, 0.2, 0.3, 0.1, 0.1, 0.7],     # rain, haze, noise, blur, lowlight, keep
                         [0.0, 0.0, 0.6, 0.4, 0.0, 0.0],     # all tone-free
                         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],     # all on the backbone alone
                         [0.5, 0.3, 0.0, 0.0, 0.4, 0.0]])    # over-full tone share: clamped at 0
    share = tone.tone_free_share(used, NAMES)
    torch.testing.assert_close(share, torch.tensor([[0.6], [1.0], [1.0], [0.0]]))
    assert tone.tone_columns(NAMES) == [0, 1, 4]
    # a kind the lock does not know (added by a user) is taken to change tone; keep never counts
    assert tone.tone_columns(["noise", "dehaze_v2", "jpeg"]) == [1]
    # a map: per pixel
    weight_map = torch.zeros(1, 6, 2, 3)
    weight_map[0, 4, 0] = 0.75
    assert tone.tone_free_share(weight_map, NAMES)[0, 0].tolist() == [[0.25] * 3, [1.0] * 3]


def test_a_constant_shift_is_taken_back_by_the_share():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(0.2, 0.6, (2, 3, 70, 45)).astype(np.float32))
    brightened = images + 0.2
    for share in (1.0, 0.5, 0.0):
        locked = tone.lock_tone(brightened.clone(), images, torch.full((2, 1), share))
        torch.testing.assert_close(locked, images + 0.2 * (1 - share), atol=2e-6, rtol=0)


def test_detail_stays_and_only_low_frequencies_move():
    """Zero-mean fine detail the network removed (denoising) stays removed; its brightening goes."""
    rng = np.random.default_rng(1)
    smooth = torch.linspace(0.2, 0.7, 128).view(1, 1, 1, 128).expand(1, 3, 128, 128).contiguous()
    noisy = (smooth + torch.from_numpy(rng.normal(0, 0.05, (1, 3, 128, 128)).astype(np.float32))).clamp(0, 1)
    network = (smooth * 1.3).clamp(0, 1)    # denoised, and brightened by 30 %
    locked = tone.lock_tone(network.clone(), noisy, torch.ones(1, 1))
    assert (locked - smooth).abs().mean() < 0.01 < (network - smooth).abs().mean()
    # the noise is not put back: what comes back is the noise's cell means, about 0.05 / 32
    assert (locked - smooth).std() < 0.01


def test_bands_give_the_same_result_as_one_pass():
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.random((1, 3, 200, 90), dtype=np.float32))
    network = torch.from_numpy(rng.random((1, 3, 200, 90), dtype=np.float32))
    share_map = torch.from_numpy(rng.random((1, 1, 4, 3), dtype=np.float32))
    for share in (torch.tensor([[0.8]]), share_map):
        whole = tone.lock_tone(network.clone(), images, share, band_rows=1000)
        banded = tone.lock_tone(network.clone(), images, share, band_rows=7)
        torch.testing.assert_close(banded, whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape, share_shape", [((1, 3, 61, 45), (1, 1)), ((2, 3, 300, 270), (2, 1)),
                                                ((1, 3, 130, 77), (1, 1, 5, 4))])
def test_the_numpy_twin_is_the_torch_lock(shape, share_shape):
    rng = np.random.default_rng(3)
    network, images = rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32)
    share = rng.random(share_shape, dtype=np.float32)
    expected = tone.lock_tone(torch.from_numpy(network.copy()), torch.from_numpy(images), torch.from_numpy(share))
    np.testing.assert_allclose(arrays.lock_tone(network, images, share), expected.numpy(), atol=2e-6, rtol=0)
    used = rng.random((2, len(NAMES) + 1), dtype=np.float32) / 3
    np.testing.assert_allclose(arrays.tone_free_share(used, NAMES),
                               tone.tone_free_share(torch.from_numpy(used), NAMES).numpy(), atol=1e-7)
    assert arrays.TONE_FREE_KINDS == tone.TONE_FREE_KINDS
    assert (arrays.TONE_CELL, arrays.TONE_BAND_ROWS) == (tone.CELL, tone.BAND_ROWS)


def small_system(tone_lock: bool, tone_calibration: bool = False) -> Restorer:
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 1, 1, 1)))
    backbone.register_forward_hook(lambda module, args, out: out + 0.15)   # it brightens everything it sees
    bank = AdapterBank(backbone, kind="lora", rank=2)
    for name in NAMES:
        bank.add(name)
    estimator = Estimator(len(NAMES), width=4, crops=1, crop_size=16, view_size=16, do_no_harm=True,
                          tone_lock=tone_lock, tone_calibration=tone_calibration, class_names=NAMES)
    return Restorer(backbone, bank, estimator).eval()


def test_the_restorer_locks_after_keep_and_only_when_trained_to():
    images = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(4)) * 0.5 + 0.2
    locked, unlocked = small_system(True), small_system(False)
    assert locked.tone_lock and not unlocked.tone_lock
    weights = torch.tensor([[0.0, 0.0, 0.6, 0.0, 0.3, 0.4]])      # noise 0.6, lowlight 0.3, keep 0.4
    raw, _ = unlocked.restore(images, mode="oracle", weights=weights[:, :5])     # keep 0
    served, _ = locked.restore(images, mode="oracle", weights=weights)
    network = tone.lock_tone(raw.clone(), images, torch.tensor([[0.7]]))
    torch.testing.assert_close(served, torch.lerp(network, images, 0.4), atol=1e-6, rtol=0)
    assert (raw.mean() - images.mean()) > 0.05 > abs(float(served.mean() - images.mean()))
    # the backbone alone (mode none) is the raw network in both
    torch.testing.assert_close(locked.restore(images, mode="none")[0], unlocked.restore(images, mode="none")[0])
    # asked for by the caller, whatever the estimator says
    assert Restorer(locked.backbone, locked.bank, locked.estimator, tone_lock=False).tone_lock is False


def test_the_flag_is_saved_with_the_estimator_and_old_files_have_none(tmp_path):
    estimator = Estimator(len(NAMES), width=4, crops=1, crop_size=16, view_size=16, tone_lock=True, class_names=NAMES)
    save_estimator(estimator, tmp_path / "estimator.safetensors")
    assert load_estimator(tmp_path / "estimator.safetensors").config.tone_lock is True
    old = Estimator(len(NAMES), width=4, crops=1, crop_size=16, view_size=16, class_names=NAMES)
    assert old.config.tone_lock is False


def test_a_tone_calibration_maps_the_share_in_the_estimators_modes():
    """With a tone calibration the lock's share is sigmoid(scale * logit(rule) + bias) in the
    estimator's modes (sw here); the caller's weights (oracle) keep the rule. Identity at the start."""
    images = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(4)) * 0.5 + 0.2
    system, plain = small_system(True, tone_calibration=True), small_system(False)
    calibration = system.estimator.tone_calibration
    rule = torch.tensor([0.0, 0.3, 0.7, 1.0])
    assert torch.allclose(calibration(rule), rule, atol=2e-4)
    for scale, bias in ((1.0, 0.0), (4.0, 1.0), (0.5, -2.0)):
        with torch.no_grad():
            calibration.scale.fill_(scale), calibration.bias.fill_(bias)
        served, used = system.restore(images, mode="sw")
        network, _ = plain.restore(images, mode="oracle", weights=used[:, :-1])
        share = torch.sigmoid(scale * torch.logit(tone.tone_free_share(used, NAMES).clamp(1e-4, 1 - 1e-4)) + bias)
        expected = torch.lerp(tone.lock_tone(network.clone(), images, share), images, float(used[0, -1]))
        torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)
        # the numpy twin the onnxruntime backend runs
        np.testing.assert_allclose(arrays.calibrated_tone_share(rule[:, None].numpy(), [scale, bias]),
                                   calibration(rule[:, None]).detach().numpy(), atol=1e-6)
    # the caller's weights: the rule's share (noise 0.6 + lowlight 0.3 -> 0.7), as without a calibration
    weights = torch.tensor([[0.0, 0.0, 0.6, 0.0, 0.3, 0.4]])
    served, _ = system.restore(images, mode="oracle", weights=weights)
    network, _ = plain.restore(images, mode="oracle", weights=weights[:, :5])
    torch.testing.assert_close(served, torch.lerp(tone.lock_tone(network.clone(), images, torch.tensor([[0.7]])),
                                                  images, 0.4), atol=1e-6, rtol=0)
    assert arrays.calibrated_tone_share(rule.numpy(), None) is not None
    np.testing.assert_array_equal(arrays.calibrated_tone_share(rule.numpy(), None), rule.numpy())


def test_the_tone_calibration_is_saved_and_needs_the_lock(tmp_path):
    from models.estimator import TONE_EPS

    assert TONE_EPS == arrays.TONE_EPS
    estimator = Estimator(len(NAMES), width=4, crops=1, crop_size=16, view_size=16, do_no_harm=True, tone_lock=True,
                          tone_calibration=True, class_names=NAMES)
    with torch.no_grad():
        estimator.tone_calibration.scale.fill_(3.0), estimator.tone_calibration.bias.fill_(1.5)
    save_estimator(estimator, tmp_path / "estimator.safetensors")
    loaded = load_estimator(tmp_path / "estimator.safetensors")
    assert loaded.config.tone_calibration is True
    assert (float(loaded.tone_calibration.scale), float(loaded.tone_calibration.bias)) == (3.0, 1.5)
    # the rest of the estimator draws the same random numbers with or without it
    torch.manual_seed(0)
    calibrated = Estimator(len(NAMES), width=4, do_no_harm=True, tone_lock=True, tone_calibration=True)
    torch.manual_seed(0)
    without = Estimator(len(NAMES), width=4, do_no_harm=True, tone_lock=True)
    assert all(torch.equal(v, calibrated.state_dict()[k]) for k, v in without.state_dict().items())
    for flags in ({"do_no_harm": True}, {"tone_lock": True}):
        with pytest.raises(ValueError, match="tone calibration"):
            Estimator(len(NAMES), width=4, tone_calibration=True, **flags)


def test_the_keep_step_learns_to_lock_where_tone_should_stay_and_not_where_it_should_change():
    """Two cached samples: a noisy photo the network brightens by mistake, with a rule share of 0.7
    (locking takes the brightening back: best share 1), and a dark photo it brightens as it should,
    with a rule share of 0.2 (a little noise weight; locking would darken it again: best share 0).
    Trained on the served error, the calibration maps 0.7 near 1 and 0.2 near 0, keep stays low on
    both (the network helps both once locked right), and the served result beats the rule's."""
    from tasks.train import loop
    from tasks.train.estimator import KeepCache, KeepHeads, keep_loss, keep_moments, keep_report
    from models.estimator import ToneCalibration

    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 32, 32, generator=gen) * 0.5 + 0.25
    noisy = clean[:1] + 0.1 * torch.randn(1, 3, 32, 32, generator=gen)
    dark = clean[1:] * 0.2
    degraded = torch.cat([noisy, dark])
    restored = clean + 0.02 * torch.randn(2, 3, 32, 32, generator=gen)
    restored[0] += 0.2                                               # wrongly brightened
    correction = tone.lock_tone(restored.clone(), degraded, torch.ones(2, 1)) - restored
    cache = KeepCache(torch.eye(2), keep_moments(degraded, restored, clean, correction), torch.tensor([0.7, 0.2]))
    torch.manual_seed(0)
    heads = KeepHeads(torch.nn.Linear(2, 1), ToneCalibration())
    cfg = {"lr": 5e-2, "weight_decay": 0.0, "betas": [0.9, 0.999], "steps": 400, "batch": 2, "log_every": 100}
    loop.fit(loop.Training(heads.parameters(), cfg, torch.device("cpu")), keep_loss(heads, cache),
             ((step, torch.arange(2)) for step in range(400)), cfg, 400, torch.device("cpu"), progress=False)
    with torch.no_grad():
        keep, share = heads(cache.features, cache.rule_share)
    assert float(share[0]) > 0.9 and float(share[1]) < 0.1, share
    assert float(keep.max()) < 0.2, keep
    learned = keep_report(heads, cache)
    rule = keep_report(KeepHeads(heads.keep_head, None, tone_lock=True), cache)
    assert learned["psnr_served"] > rule["psnr_served"] + 3 and learned["worse_share"] == 0.0
    assert learned["tone_share_mean"] == pytest.approx(float(share.mean())) and rule["tone_share_mean"] == \
        pytest.approx(0.45)


def test_keep_can_be_trained_on_the_unlocked_output_but_a_calibration_cannot():
    """keep_sees_lock false: the keep loss counts the network's unlocked output (no share), as the
    keep step did before it counted the lock; a tone calibration needs the lock in the loss, and
    train_estimator says so before it reads anything."""
    from tasks.core.errors import AbairError
    from tasks.train.estimator import KeepHeads, train_estimator

    locked = Estimator(len(NAMES), width=4, do_no_harm=True, tone_lock=True, class_names=NAMES)
    features = torch.zeros(3, locked.keep_head[0].in_features)
    rule = torch.tensor([0.2, 0.5, 0.9])
    assert torch.equal(KeepHeads.of(locked)(features, rule)[1], rule)
    assert KeepHeads.of(locked, sees_lock=False)(features, rule)[1] is None
    calibrated = Estimator(len(NAMES), width=4, do_no_harm=True, tone_lock=True, tone_calibration=True, class_names=NAMES)
    with pytest.raises(AbairError, match="keep_sees_lock"):
        KeepHeads.of(calibrated, sees_lock=False)
    with pytest.raises(AbairError, match="keep_sees_lock"):
        train_estimator({"tone_calibration": True, "keep_sees_lock": False}, shards="/nonexistent")
