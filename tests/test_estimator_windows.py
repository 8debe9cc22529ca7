"""The estimator looks at a photo in windows the size of its training samples (models/estimator.py,
`window` / `keep_window`), so it sees the photo at the scale it learned."""

from __future__ import annotations

import pytest
import torch

from models.estimator import Estimator, grid_origins, load_estimator, save_estimator


def make(window=None, keep_window=None, windows=9, seed=0) -> Estimator:
    torch.manual_seed(seed)
    est = Estimator(3, width=4, crops=1, crop_size=16, view_size=24, do_no_harm=True, class_names=["a", "b", "c"],
                    window=window, keep_window=keep_window, windows=windows).eval()
    with torch.no_grad():  # a keep head that answers (a fresh one is constant)
        for param in est.keep_head.parameters():
            param.add_(torch.randn(param.shape) * 0.5)
    return est


def noisy(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 3, h, w, generator=g) * 0.6 + 0.2)


def test_grid_origins_cover_the_image_edge_to_edge():
    assert grid_origins(320, 480, 96, 9) == [(y, x) for y in (0, 112, 224) for x in (0, 192, 384)]
    # a non-square count: the extra windows go along the longer side
    assert grid_origins(100, 300, 50, 6) == [(y, x) for y in (0, 50) for x in (0, 125, 250)]
    assert grid_origins(300, 100, 50, 6) == [(y, x) for y in (0, 125, 250) for x in (0, 50)]
    # one window: the centre; an image smaller than the window: every window at the origin
    assert grid_origins(100, 60, 20, 1) == [(40, 20)]
    assert grid_origins(30, 40, 64, 4) == [(0, 0)] * 4


def test_a_photo_made_of_copies_of_a_sample_is_seen_as_that_sample():
    """A 3 x 3 mosaic of one training-size sample: the windows are the copies, so the windowed
    features are the sample's own, while the whole-image view (3x downscaled) sees something else."""
    est = make(window=32)
    sample = noisy(32, 32)
    mosaic = sample.repeat(1, 1, 3, 3)
    with torch.no_grad():
        own = est.features(sample)
        windowed = est.features(mosaic)
        whole = est.features_at(mosaic, None)
    torch.testing.assert_close(windowed, own, rtol=0, atol=1e-6)
    assert (whole - own).abs().max() > 1e-3


def test_windowed_features_are_the_mean_over_the_grid_windows():
    est = make(window=32, windows=4)
    x = torch.cat([noisy(48, 80, 1), noisy(48, 80, 2)])
    with torch.no_grad():
        expected = torch.stack([est.features_at(x[:, :, y:y + 32, x0:x0 + 32], None)
                                for y, x0 in grid_origins(48, 80, 32, 4)]).mean(0)
        torch.testing.assert_close(est.features(x), expected, rtol=1e-5, atol=1e-6)
        # images in a batch stay apart
        torch.testing.assert_close(est.features(x[1:]), expected[1:], rtol=1e-5, atol=1e-6)


def test_a_sample_no_larger_than_the_window_is_looked_at_whole():
    """Training batches are the window's size: their features are exactly the unwindowed ones, so
    training is unchanged by the setting."""
    plain, windowed = make(), make(window=32)
    windowed.load_state_dict(plain.state_dict())
    for h, w in [(32, 32), (20, 28)]:
        x = noisy(h, w)
        with torch.no_grad():
            torch.testing.assert_close(windowed.features(x), plain.features(x), rtol=0, atol=0)


def test_weights_and_keep_use_their_own_windows():
    est = make(window=32, keep_window=16, windows=4)
    x, restored = noisy(64, 64, 3), noisy(64, 64, 4)
    with torch.no_grad():
        logits = est._image_logits(est.features_at(x, 32))
        torch.testing.assert_close(est.logits(x), logits)
        keep_in = torch.cat([est.features_at(x, 16), est.features_at(restored, 16)], dim=1)
        torch.testing.assert_close(est.keep(x, restored), torch.sigmoid(est.keep_head(keep_in)))
        # the keep head's windows matter: at the classification window it answers differently
        other = torch.cat([est.features_at(x, 32), est.features_at(restored, 32)], dim=1)
        assert (torch.sigmoid(est.keep_head(other)) - est.keep(x, restored)).abs().max() > 1e-4


def test_windows_round_trip_and_older_files_load_whole(tmp_path):
    est = make(window=32, keep_window=16, windows=4)
    save_estimator(est, tmp_path / "w.safetensors")
    back = load_estimator(tmp_path / "w.safetensors")
    assert (back.config.window, back.config.keep_window, back.config.windows) == (32, 16, 4)
    x = noisy(64, 96)
    with torch.no_grad():
        torch.testing.assert_close(back.logits(x), est.logits(x), rtol=0, atol=0)

    # a file written before the setting existed: its config has no window keys
    import json
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    for key in ("window", "keep_window", "windows"):
        config.pop(key)
    meta["config"] = json.dumps(config)
    save_file(load_file(str(tmp_path / "w.safetensors")), str(tmp_path / "old.safetensors"), metadata=meta)
    old = load_estimator(tmp_path / "old.safetensors")
    assert old.config.window is None and old.config.keep_window is None
    with torch.no_grad():
        torch.testing.assert_close(old.features(x), old.features_at(x, None), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [({"window": 0}, "window"), ({"keep_window": -4}, "keep_window"),
                                             ({"windows": 0}, "windows")])
def test_bad_window_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Estimator(2, **kwargs)


def test_the_dense_map_reads_the_whole_view_while_the_image_weights_read_windows():
    torch.manual_seed(0)
    est = Estimator(3, width=4, crops=1, crop_size=16, view_size=24, do_no_harm=True, dense=True,
                    window=32, windows=4).eval()
    whole = Estimator(3, width=4, crops=1, crop_size=16, view_size=24, do_no_harm=True, dense=True).eval()
    whole.load_state_dict(est.state_dict())
    x = noisy(64, 96, 5)
    with torch.no_grad():
        image, pixels = est.logits_and_map(x)
        torch.testing.assert_close(image, est.logits(x), rtol=0, atol=0)
        # the spatial term comes from the whole-image view, as without windows
        whole_image, whole_pixels = whole.logits_and_map(x)
        spatial = pixels - image[:, :, None, None]
        whole_spatial = whole_pixels - whole_image[:, :, None, None]
        assert spatial.shape == whole_spatial.shape == (1, 4, 12, 12)
