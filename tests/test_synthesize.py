"""The synthesize stage: sources, shards, split, index, bad input, S3."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.core import imageio
from tasks.core.errors import AbairError
from tasks.data.sources import Source, list_sources, split_sources
from tasks.data.synthesize import synthesize
from tests.conftest import write_png

MEMBERS = {"clean.png", "degraded.png", "mask.png", "json"}


def read_tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def all_samples(out: Path, index: dict) -> dict[str, dict[str, dict[str, bytes]]]:
    return {split: {k: v for shard in index["splits"][split]["shards"] for k, v in read_tar_samples(out / shard).items()}
            for split in ("train", "val")}


def test_shards_follow_the_contract(tmp_path, photo_folder, synth_cfg):
    out = tmp_path / "shards"
    index = synthesize(synth_cfg, source=str(photo_folder), out=str(out), progress=False)

    assert json.loads((out / "index.json").read_text()) == index
    assert index["classes"] == synth_cfg["classes"]
    assert index["counts"]["samples"] == 4 * synth_cfg["samples_per_image"]
    assert index["counts"]["sources_used"] == 4 and index["counts"]["sources_skipped"] == 0
    samples = all_samples(out, index)
    train, val = samples["train"], samples["val"]
    assert len(train) == index["splits"]["train"]["samples"] and len(val) == index["splits"]["val"]["samples"]
    assert len(val) > 0 and len(train) > 0
    # Keys are unique across the whole shard set and every sample has all four members.
    assert not set(train) & set(val)
    for members in [*train.values(), *val.values()]:
        assert set(members) == MEMBERS
        clean = imageio.decode(members["clean.png"], "clean")
        degraded = imageio.decode(members["degraded.png"], "degraded")
        mask = imageio.decode(members["mask.png"], "mask")
        meta = json.loads(members["json"])
        assert clean.shape == degraded.shape == (48, 48, 3) and clean.dtype == np.uint8
        assert mask.shape == (48, 48) and mask.dtype == np.uint8
        assert mask.max() < 2 ** len(synth_cfg["classes"])
        # Untouched pixels are byte-identical between clean and degraded.
        assert np.array_equal(clean[mask == 0], degraded[mask == 0])
        assert meta["source"] and len(meta["crop"]) == 4 and meta["seed"] == synth_cfg["seed"]
        applied = {d["name"] for region in meta["regions"] for d in region["degradations"]}
        in_mask = {c for i, c in enumerate(synth_cfg["classes"]) if (mask >> i & 1).any()}
        assert in_mask == applied
    # The split is by source image: no source on both sides.
    train_sources = {json.loads(m["json"])["source"] for m in train.values()}
    val_sources = {json.loads(m["json"])["source"] for m in val.values()}
    assert not train_sources & val_sources
    assert train_sources == set(index["splits"]["train"]["sources"])
    # Pixel fractions in the index match the masks.
    masks = [imageio.decode(m["mask.png"], "m") for s in samples.values() for m in s.values()]
    for i, name in enumerate(synth_cfg["classes"]):
        expected = np.mean([(m >> i & 1).mean() for m in masks])
        assert index["pixel_fractions"][name] == pytest.approx(expected, abs=1e-5)


def test_shards_read_back_with_webdataset(tmp_path, photo_folder, synth_cfg):
    import webdataset as wds

    out = tmp_path / "shards"
    index = synthesize(synth_cfg, source=str(photo_folder), out=str(out), progress=False)
    urls = [str(out / s) for s in index["splits"]["train"]["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("rgb8")
    keys = []
    for sample in dataset:
        assert sample["clean.png"].shape == (48, 48, 3)
        assert sample["mask.png"].ndim in (2, 3)
        assert isinstance(sample["json"], dict)
        keys.append(sample["__key__"])
    assert len(keys) == len(set(keys)) == index["splits"]["train"]["samples"]


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path, photo_folder, synth_cfg):
    one = synthesize({**synth_cfg, "workers": 1}, source=str(photo_folder), out=str(tmp_path / "a"), progress=False)
    two = synthesize({**synth_cfg, "workers": 2}, source=str(photo_folder), out=str(tmp_path / "b"), progress=False)
    assert one == two
    for shard in one["splits"]["train"]["shards"] + one["splits"]["val"]["shards"]:
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    other = synthesize({**synth_cfg, "seed": 1}, source=str(photo_folder), out=str(tmp_path / "c"), progress=False)
    shard = other["splits"]["train"]["shards"][0]
    if shard in one["splits"]["train"]["shards"]:
        assert (tmp_path / "c" / shard).read_bytes() != (tmp_path / "a" / shard).read_bytes()


def test_bad_sources_are_reported_not_fatal(tmp_path, photo_folder, synth_cfg, photos):
    (photo_folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = (photo_folder / "coffee.png").read_bytes()
    (photo_folder / "truncated.png").write_bytes(good[: len(good) // 3])
    (photo_folder / "empty.jpg").write_bytes(b"")
    write_png(photo_folder / "gray.png", cv2.cvtColor(photos["astronaut"][:100, :100], cv2.COLOR_RGB2GRAY))
    write_png(photo_folder / "tiny.png", photos["astronaut"][:10, :10])
    (photo_folder / "notes.txt").write_text("not an image")

    index = synthesize(synth_cfg, source=str(photo_folder), out=str(tmp_path / "shards"), progress=False)
    reasons = {s["source"]: s["reason"] for s in index["skipped"]}
    assert index["counts"]["sources_used"] == 4
    assert index["counts"]["sources_skipped"] == 5 == len(reasons)
    assert "not a readable image" in reasons["corrupt.png"]
    assert "truncated.png" in reasons
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["gray.png"] == "grayscale only"
    assert reasons["tiny.png"].startswith("too small")
    assert "notes.txt" not in reasons


def test_empty_or_missing_source_is_one_clear_error(tmp_path, synth_cfg):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AbairError, match=r"empty: no images found"):
        synthesize(synth_cfg, source=str(tmp_path / "empty"), out=str(tmp_path / "out"), progress=False)
    with pytest.raises(AbairError, match=r"nope: folder not found"):
        synthesize(synth_cfg, source=str(tmp_path / "nope"), out=str(tmp_path / "out"), progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(AbairError, match=r"no usable images \(1 skipped"):
        synthesize(synth_cfg, source=str(tmp_path / "bad"), out=str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_failed_run_keeps_the_previous_shards(tmp_path, photo_folder, synth_cfg):
    out = tmp_path / "shards"
    first = synthesize(synth_cfg, source=str(photo_folder), out=str(out), progress=False)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(AbairError):
        synthesize({**synth_cfg, "classes": ["rain", "nope"]}, source=str(photo_folder), out=str(out), progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "index.json").read_text()) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shards")]


def test_split_is_by_source_and_stable(synth_cfg):
    sources = [Source(f"img{i:02d}.png", f"/x/img{i:02d}.png", "1") for i in range(20)]
    train, val = split_sources(sources, 0.25, seed=0)
    assert len(val) == 5 and len(train) == 15 and not {s.id for s in train} & {s.id for s in val}
    # The split depends on the images, not on the order they were listed in.
    shuffled = sources[::-1]
    train_r, val_r = split_sources(shuffled, 0.25, seed=0)
    assert {s.id for s in val_r} == {s.id for s in val}
    assert {s.id for s in split_sources(sources, 0.25, seed=1)[1]} != {s.id for s in val}
    # ... and a tiny source set still gets one validation image.
    train2, val2 = split_sources(sources[:2], 0.25, seed=0)
    assert len(train2) == 1 and len(val2) == 1


def test_builtin_samples_are_colour_photos():
    sources = list_sources("samples")
    assert len(sources) >= 6 and all(s.id.startswith("samples/") for s in sources)


def test_unknown_class_is_rejected_before_any_work(tmp_path, photo_folder, synth_cfg):
    with pytest.raises(AbairError, match=r"unknown degradation\(s\) \['fog'\]"):
        synthesize({**synth_cfg, "classes": ["rain", "fog"]}, source=str(photo_folder),
                   out=str(tmp_path / "o"), progress=False)
    nine = ["noise"] * 9
    with pytest.raises(AbairError, match="mask has 8 bits"):
        synthesize({**synth_cfg, "classes": nine}, source=str(photo_folder), out=str(tmp_path / "o"), progress=False)


def test_synthesize_from_and_to_s3(tmp_path, s3_endpoint, s3_bucket, photos, synth_cfg):
    client, bucket = s3_bucket
    for name in ("astronaut", "chelsea", "coffee"):
        buf = cv2.imencode(".png", cv2.cvtColor(photos[name][:150, :150], cv2.COLOR_RGB2BGR))[1].tobytes()
        client.put_object(Bucket=bucket, Key=f"clean/{name}.png", Body=buf)
    client.put_object(Bucket=bucket, Key="clean/broken.jpg", Body=b"nope")
    client.put_object(Bucket=bucket, Key="elsewhere/other.png", Body=b"not listed")

    cfg = {**synth_cfg, "endpoint_url": s3_endpoint, "workers": 2}
    index = synthesize(cfg, source=f"s3://{bucket}/clean", out=f"s3://{bucket}/shards/v1", progress=False)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="shards/v1/")["Contents"])
    shards = index["splits"]["train"]["shards"] + index["splits"]["val"]["shards"]
    assert keys == sorted([f"shards/v1/{s}" for s in shards] + ["shards/v1/index.json"])
    assert index["counts"]["sources_used"] == 3 and index["skipped"] == [{"source": "broken.jpg", "reason": "not a readable image (corrupt or unsupported format)"}]
    stored = json.loads(client.get_object(Bucket=bucket, Key="shards/v1/index.json")["Body"].read())
    assert stored == index
    # The shards on S3 are the same bytes a local run writes.
    local_src = tmp_path / "clean"
    for name in ("astronaut", "chelsea", "coffee"):
        write_png(local_src / f"{name}.png", photos[name][:150, :150])
    local = synthesize(synth_cfg, source=str(local_src), out=str(tmp_path / "local"), progress=False)
    assert local["splits"]["train"]["samples"] == index["splits"]["train"]["samples"]
    for shard in shards:
        body = client.get_object(Bucket=bucket, Key=f"shards/v1/{shard}")["Body"].read()
        assert body == (tmp_path / "local" / shard).read_bytes()


def test_source_manifest_changes_with_content_only(tmp_path, photo_folder, photos):
    import os

    from tasks.data.manifest import source_manifest, write_manifest

    first = source_manifest(str(photo_folder))
    assert len(first["files"]) == 4
    out = tmp_path / "manifest.json"
    assert write_manifest(first, out) and not write_manifest(first, out)
    # Touching a file (new mtime, same bytes) is not a change...
    os.utime(photo_folder / "coffee.png", (1, 1))
    assert source_manifest(str(photo_folder))["hash"] == first["hash"]
    # ... a new image or an edited one is.
    write_png(photo_folder / "new.png", photos["rocket"][:120, :120])
    added = source_manifest(str(photo_folder))
    assert added["hash"] != first["hash"] and len(added["files"]) == 5
    write_png(photo_folder / "new.png", photos["rocket"][:120, :121])
    assert source_manifest(str(photo_folder))["hash"] != added["hash"]
    assert source_manifest("samples")["hash"] == source_manifest("samples")["hash"]
