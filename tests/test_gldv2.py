"""Google Landmarks v2 as published, distributed synthesis and a manifest that scales:

- the default shard set (built-in samples, default params) has the recorded bytes
  (tests/fixtures/default_shards.sha256), on any CPU: a second run with numpy's SIMD dispatch,
  OpenBLAS's kernel and OpenCV's AVX-512 paths switched makes the same bytes;
- a miniature GLDv2 in the published layout (gldv2_fixture.py: three tars, the CSVs, md5 files
  with one wrong md5, one corrupt JPEG, one id missing from train_clean.csv, one landmark with
  four images over two tars), read locally and from the moto S3 server: filtering, md5 while
  streaming (one read per tar), attribution, licenses, split by landmark, skip reasons, the
  bad-share rule, resume after a killed unit, the same bytes whatever the runner;
- the manifest: one entry per tar (the published md5), loose files by cached content hash.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gldv2_fixture import mini_gldv2, upload
from tasks.core import storage
from tasks.core.errors import AbairError
from tasks.data import gldv2, synthesize as synth
from tasks.data.manifest import source_manifest
from tasks.data.synthesize import synthesize
from tests.test_synthesize import read_tar_samples

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "tests" / "fixtures" / "default_shards.sha256"


def spec(root, **options) -> str:
    query = {"split": "train", "subset": "clean", **options}
    return f"gldv2:{root}?" + "&".join(f"{k}={v}" for k, v in query.items())


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def mini(tmp_path_factory, photos):
    return mini_gldv2(tmp_path_factory.mktemp("gld") / "gldv2", photos)


@pytest.fixture(scope="module")
def gld_cfg(project_params) -> dict:
    cfg = copy.deepcopy(project_params["synthesize"])
    cfg.update(crop_size=32, samples_per_image=2, workers=1, shard_maxcount=3, min_size=32, val_fraction=0.34)
    return cfg


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, mini, gld_cfg):
    """One run over the local miniature, counting how each tar was read."""
    out = tmp_path_factory.mktemp("local") / "shards"
    opened, read_whole = [], []
    real_open, real_read = storage.open_read, storage.read_bytes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage, "open_read", lambda uri, *a, **k: (opened.append(str(uri)), real_open(uri, *a, **k))[1])
        patch.setattr(storage, "read_bytes", lambda uri, *a, **k: (read_whole.append(str(uri)), real_read(uri, *a, **k))[1])
        index = synthesize(gld_cfg, source=spec(mini.root), out=str(out), progress=False)
    return {"out": out, "index": index, "opened": opened, "read_whole": read_whole}


# ------------------------------------------------------------------------------------------------
# the default is unchanged


def shard_hashes(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files_of(folder).items()}


def test_default_samples_shards_are_byte_identical_to_the_record(tmp_path, project_params):
    """The built-in samples with the default params: the same files, byte for byte, as recorded.
    (When synthesis was cut into units, the code before and after the change made the same bytes;
    the record was remade when the float steps whose last bits depend on the CPU were replaced, and
    again when OpenCV's IPP calls were turned off.)"""
    expected = dict(line.split()[::-1] for line in BASELINE.read_text().splitlines())
    index = synthesize(project_params["synthesize"], out=str(tmp_path / "shards"), progress=False)
    assert shard_hashes(tmp_path / "shards") == expected
    assert "units" not in index and "licenses" not in index


# What differs between the x86-64 CPUs these machines have (AVX2 with or without AVX-512),
# switched in a child process: numpy's AVX-512 code paths, the OpenBLAS kernel (picked per CPU at
# load time), OpenCV's AVX-512 paths and the code path of Intel IPP inside OpenCV (degradations
# turns IPP off; with it on, this switch alone changes the bytes). Each once changed a few pixels
# or a colour matrix's last digit in the sidecar JSON, so the shards' hashes (and DVC's cache)
# differed from machine to machine.
OTHER_CPU = {"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
             "OPENBLAS_CORETYPE": "Sandybridge",
             "OPENCV_CPU_DISABLE": "AVX512-SKX,AVX512-CLX,AVX_VNNI",
             "OPENCV_IPP": "sse42"}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the switched features are x86-64 ones")
def test_default_samples_shards_have_the_same_bytes_on_another_cpu(tmp_path):
    expected = dict(line.split()[::-1] for line in BASELINE.read_text().splitlines())
    script = ("import sys, yaml; from tasks.data.synthesize import synthesize; "
              "synthesize(yaml.safe_load(open('params.yaml'))['synthesize'], out=sys.argv[1], progress=False)")
    env = {**os.environ, **OTHER_CPU, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "shards")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shard_hashes(tmp_path / "shards") == expected


# ------------------------------------------------------------------------------------------------
# the source


def test_the_spec_and_its_errors(tmp_path):
    parsed = gldv2.parse_spec("gldv2:/data/gldv2?split=train&subset=clean&tars=0-3,7,10-11")
    assert parsed == gldv2.GldSpec("/data/gldv2", "train", "clean", (0, 1, 2, 3, 7, 10, 11))
    assert gldv2.parse_spec("gldv2:s3://bucket/gld/") == gldv2.GldSpec("s3://bucket/gld", "train", "all", None)
    assert gldv2.parse_spec("gldv2:rel/gld?split=index&tars=all").split == "index"
    for bad, problem in [("gldv2:/d?split=val", "split='val'"), ("gldv2:/d?subset=dirty", "subset='dirty'"),
                         ("gldv2:/d?split=test&subset=clean", "train split only"), ("gldv2:/d?tars=9-2", "tars='9-2'"),
                         ("gldv2:/d?tar=1", "unknown option"), ("gldv2:?split=train", "no root folder")]:
        with pytest.raises(AbairError, match=problem):
            gldv2.parse_spec(bad)
    with pytest.raises(AbairError, match=r"train: no images_NNN.tar"):
        gldv2.GldCatalog(spec(tmp_path))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "images_000.tar").write_bytes(b"")
    with pytest.raises(AbairError, match=r"train_clean.csv: not found \(nor under metadata/\)"):
        gldv2.GldCatalog(spec(tmp_path))


def test_rules_on_the_local_miniature(local_run, mini, gld_cfg):
    out, index = local_run["out"], local_run["index"]
    usable = mini.usable()
    by_id = {p.id: p for t in mini.tars for p in t}

    # filtering: the id missing from train_clean.csv is left out and counted, never read as a source
    assert index["filtered"] == {"not in train_clean.csv": 1}
    used = index["splits"]["train"]["sources"] + index["splits"]["val"]["sources"]
    assert sorted(used) == sorted(f"gldv2/train/{p.id}" for p in usable)
    # skip reasons: the corrupt JPEG is one skipped source; the tar whose md5 does not match is
    # one unusable unit, its images counted, none of its output kept
    assert index["skipped"] == [{"source": f"gldv2/train/{mini.corrupt.id}",
                                 "reason": "not a readable image (corrupt or unsupported format)"}]
    (bad_unit,) = index["skipped_units"]
    assert bad_unit["unit"] == "images_002" and bad_unit["reason"].startswith("md5 mismatch (")
    assert bad_unit["images"] == 3 and not bad_unit["images_estimated"] and index["units"] == 3
    assert not any("images_002" in name for name in os.listdir(out))
    # every file of the set: shards named after their unit, the attribution, the index; no markers
    shards = index["splits"]["train"]["shards"] + index["splits"]["val"]["shards"]
    assert sorted(os.listdir(out)) == sorted(shards + ["index.json", "ATTRIBUTION.csv"])
    assert all(name.split("-")[1] in ("images_000", "images_001") for name in shards)
    assert not (out.parent / ".shards.partial").exists()
    assert index["counts"]["samples"] == gld_cfg["samples_per_image"] * len(usable)

    # md5 computed while streaming: each tar opened once as a stream, never read whole
    tars = [u for u in local_run["opened"] if u.endswith(".tar")]
    assert sorted(tars) == sorted(str(mini.root / "train" / f"images_{n:03d}.tar") for n in range(3))
    assert not [u for u in local_run["read_whole"] if u.endswith(".tar")]

    # attribution: every sample carries its image's fields from the CSVs
    samples = {}
    for shard in shards:
        samples.update({k: json.loads(v["json"]) for k, v in read_tar_samples(out / shard).items()})
    for meta in samples.values():
        photo = by_id[meta["source"].rsplit("/", 1)[1]]
        assert meta["attribution"] == {"id": photo.id, "landmark_id": photo.landmark, "url": photo.url,
                                       "author": photo.author, "license": photo.license, "title": photo.title}
    # licenses counted per sample; share-alike named; ATTRIBUTION.csv one row per image used
    expected = {}
    for photo in usable:
        expected[photo.license] = expected.get(photo.license, 0) + gld_cfg["samples_per_image"]
    assert index["licenses"] == expected and index["share_alike"] == ["CC BY-SA 3.0", "CC BY-SA 4.0"]
    rows = list(csv.DictReader(io.StringIO((out / "ATTRIBUTION.csv").read_text())))
    assert sorted(r["id"] for r in rows) == sorted(p.id for p in usable)
    for row in rows:
        photo = by_id[row["id"]]
        assert (row["author"], row["license"], row["title"], row["url"], row["landmark_id"]) == \
               (photo.author, photo.license, photo.title, photo.url, photo.landmark)
        assert row["split"] in ("train", "val") and row["samples"] == str(gld_cfg["samples_per_image"])

    # split by landmark: no landmark on both sides; the landmark with four images on one side
    side = {}
    for split in ("train", "val"):
        for source in index["splits"][split]["sources"]:
            side.setdefault(by_id[source.rsplit("/", 1)[1]].landmark, set()).add(split)
    assert all(len(sides) == 1 for sides in side.values()), side
    assert index["splits"]["val"]["samples"] > 0 and index["splits"]["train"]["samples"] > 0
    big = [p for p in usable if p.landmark == mini.big_landmark]
    assert len(big) == 4 and len(side[mini.big_landmark]) == 1


def test_split_is_by_landmark_whatever_tars_are_chosen(mini, gld_cfg):
    from tasks.data.sources import Source, split_keys, split_sources

    whole = gldv2.GldCatalog(spec(mini.root))
    part = gldv2.GldCatalog(spec(mini.root, tars="0"))
    assert whole.split_keys() == part.split_keys() == sorted(set(mini.landmarks) - {"103"})
    assert [u.name for u in part.units(1)] == ["images_000"]
    # grouped sources split as their group: the four images of one landmark stay together
    sources = [Source(f"img{i}", "", "", group=str(i % 3)) for i in range(12)]
    train, val = split_sources(sources, 0.34, seed=0)
    assert {s.group for s in train}.isdisjoint({s.group for s in val}) and len(val) == 4
    assert split_keys(["b", "a", "c"], 0.34, 0) == split_keys(["c", "a", "b"], 0.34, 0)


def test_the_index_split_with_md5_files_beside_its_tars(tmp_path, photos, gld_cfg):
    """index/ as download-dataset.sh leaves it (md5 files beside the tars): ids from index.csv,
    landmarks from index_image_to_landmark.csv, every image CC0 or public domain."""
    from gldv2_fixture import Photo, image_id, jpeg, tar_bytes, write_csv

    root = tmp_path / "gldv2"
    made = [Photo(image_id(n, "index"), str(7 + n % 2), jpeg(photos["coffee"][10 * n:10 * n + 48, :64])) for n in range(3)]
    (root / "index").mkdir(parents=True)
    data = tar_bytes(made)
    (root / "index" / "images_000.tar").write_bytes(data)
    (root / "index" / "md5.images_000.txt").write_text(f"{hashlib.md5(data).hexdigest()}  images_000.tar\n")
    write_csv(root / "index.csv", ["id"], [[p.id] for p in made[:2]])   # the third is not listed
    write_csv(root / "index_image_to_landmark.csv", ["id", "landmark_id"], [[p.id, p.landmark] for p in made])
    index = synthesize({**gld_cfg, "val_fraction": 0.5}, source=f"gldv2:{root}?split=index", out=str(tmp_path / "o"),
                       progress=False)
    assert index["licenses"] == {gldv2.PUBLIC_DOMAIN: 4} and index["share_alike"] == []
    assert index["filtered"] == {"not in index.csv": 1} and not index["skipped_units"]
    (val,) = index["splits"]["val"]["sources"]
    (train,) = index["splits"]["train"]["sources"]
    assert {val, train} == {f"gldv2/index/{p.id}" for p in made[:2]}
    meta = json.loads(next(iter(read_tar_samples(tmp_path / "o" / index["splits"]["val"]["shards"][0]).values()))["json"])
    photo = next(p for p in made if val.endswith(p.id))
    assert meta["attribution"] == {"id": photo.id, "landmark_id": photo.landmark, "license": gldv2.PUBLIC_DOMAIN}


def test_missing_tar_and_the_bad_share(tmp_path, mini, gld_cfg, monkeypatch):
    root = tmp_path / "gldv2"
    shutil.copytree(mini.root, root)
    (root / "train" / "images_001.tar").unlink()
    index = synthesize(gld_cfg, source=spec(root), out=str(tmp_path / "a"), progress=False)
    reasons = {u["unit"]: u for u in index["skipped_units"]}
    assert reasons["images_001"]["reason"] == f"missing tar ({root / 'train' / 'images_001.tar'})"
    # a missing tar counts as many images as the tars that were read held on average (4 and 3)
    assert reasons["images_001"]["images"] == 4 and reasons["images_001"]["images_estimated"]
    assert reasons["images_002"]["reason"].startswith("md5 mismatch")
    # 7 bad of 11: more than a share of 0.5 fails the run, naming the units; nothing usable always does
    with pytest.raises(AbairError, match=r"7 of 11 sources are bad, more than synthesize.max_bad_fraction 0.5 .*"
                                         r"2 unusable unit\(s\): \{'missing tar': 1, 'md5 mismatch': 1\}"):
        synthesize({**gld_cfg, "max_bad_fraction": 0.5}, source=spec(root), out=str(tmp_path / "b"), progress=False)
    with pytest.raises(AbairError, match=r"no usable images .*unusable unit"):
        synthesize(gld_cfg, source=spec(root, tars="1-2"), out=str(tmp_path / "c"), progress=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    # the failed run kept its finished tar: with the knob raised, the re-run makes only the unusable
    # tar's images again (it is read again: it may have been fixed)
    made, real_item = [], synth.synthesize_item
    monkeypatch.setattr(synth, "synthesize_item", lambda job: (made.append(job[0].source.id), real_item(job))[1])
    again = synthesize({**gld_cfg, "max_bad_fraction": 0.7}, source=spec(root), out=str(tmp_path / "b"), progress=False)
    assert sorted(made) == sorted(f"gldv2/train/{p.id}" for p in mini.tars[2] if p.clean) and again == index


def test_resume_after_a_killed_unit(tmp_path, mini, gld_cfg, local_run, monkeypatch):
    out = tmp_path / "shards"
    first_of_001 = f"gldv2/train/{mini.tars[1][0].id}"
    made, real_item = [], synth.synthesize_item

    def killed_at_001(job):
        if job[0].source.id == first_of_001:
            raise RuntimeError("worker killed")
        made.append(job[0].source.id)
        return real_item(job)

    monkeypatch.setattr(synth, "synthesize_item", killed_at_001)
    with pytest.raises(RuntimeError, match="worker killed"):
        synthesize(gld_cfg, source=spec(mini.root), out=str(out), progress=False)
    work = tmp_path / ".shards.partial"
    assert sorted(os.listdir(work / ".units")) == ["images_000.json"] and not out.exists()
    assert not list(work.glob(".unit-*"))

    # killed again, between publishing images_001's shards and writing its marker
    monkeypatch.setattr(synth, "synthesize_item", real_item)
    real_marker = synth.Workspace.write_marker
    monkeypatch.setattr(synth.Workspace, "write_marker", lambda self, unit, record: (_ for _ in ()).throw(
        RuntimeError("killed before the marker")) if unit == "images_001" else real_marker(self, unit, record))
    with pytest.raises(RuntimeError, match="before the marker"):
        synthesize(gld_cfg, source=spec(mini.root), out=str(out), progress=False)
    assert any("images_001" in name for name in os.listdir(work))   # published, but not marked done

    # the re-run keeps images_000 (not made again), redoes images_001, and ends with the same bytes
    monkeypatch.setattr(synth.Workspace, "write_marker", real_marker)
    made.clear()
    monkeypatch.setattr(synth, "synthesize_item", lambda job: (made.append(job[0].source.id), real_item(job))[1])
    index = synthesize(gld_cfg, source=spec(mini.root), out=str(out), progress=False)
    assert made and not {f"gldv2/train/{p.id}" for p in mini.tars[0]} & set(made)
    assert index == local_run["index"]
    assert files_of(out) == files_of(local_run["out"]) and not work.exists()


def test_same_bytes_whatever_the_workers_and_on_dask_workers(tmp_path, mini, gld_cfg, local_run):
    distributed = pytest.importorskip("distributed")

    two = synthesize({**gld_cfg, "workers": 2}, source=spec(mini.root), out=str(tmp_path / "two"), progress=False)
    assert two == local_run["index"] and files_of(tmp_path / "two") == files_of(local_run["out"])
    # each unit in a Dask worker process of its own (spawned: the job travels pickled)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        on_dask = synthesize(gld_cfg, source=spec(mini.root), out=str(tmp_path / "dask"), progress=False,
                             run_units=lambda jobs: client.gather(client.map(synth.run_unit, jobs, pure=False)))
    assert on_dask == local_run["index"] and files_of(tmp_path / "dask") == files_of(local_run["out"])


@pytest.mark.slow
def test_runner_dask_through_prefects_task_runner(tmp_path, mini, gld_cfg, local_run, prefect_harness):
    """`synthesize.runner: dask` as `abair synthesize` runs it: one Prefect task per unit on a
    local Dask cluster (Prefect's test server and the cluster take 20-45 s to start here)."""
    pytest.importorskip("prefect_dask")
    from flows.synthesize import run_synthesize, units_runner

    cfg = {**gld_cfg, "runner": "dask", "workers": 2}
    assert units_runner(gld_cfg) is None and units_runner(cfg) is not None
    on_dask = run_synthesize(cfg, source=spec(mini.root), out=str(tmp_path / "dask"), progress=False)
    assert on_dask == local_run["index"] and files_of(tmp_path / "dask") == files_of(local_run["out"])


def test_the_miniature_on_s3(tmp_path, mini, gld_cfg, local_run, s3_endpoint, s3_bucket, monkeypatch):
    client, bucket = s3_bucket
    root = upload(mini.root, client, bucket, "gld")
    opened, real_open = [], storage.open_read
    monkeypatch.setattr(storage, "open_read", lambda uri, *a, **k: (opened.append(str(uri)), real_open(uri, *a, **k))[1])
    cfg = {**gld_cfg, "endpoint_url": s3_endpoint}
    index = synthesize(cfg, source=spec(root), out=f"s3://{bucket}/shards", progress=False)
    assert {k: v for k, v in index.items() if k != "source"} == {k: v for k, v in local_run["index"].items() if k != "source"}
    assert sorted(u for u in opened if u.endswith(".tar")) == [f"{root}/train/images_{n:03d}.tar" for n in range(3)]
    listed = {o["Key"][len("shards/"):] for o in client.list_objects_v2(Bucket=bucket, Prefix="shards/")["Contents"]}
    assert listed == set(os.listdir(local_run["out"]))   # no markers left behind
    for name in listed - {"index.json"}:
        body = client.get_object(Bucket=bucket, Key=f"shards/{name}")["Body"].read()
        assert body == (local_run["out"] / name).read_bytes(), name
    manifest = source_manifest(spec(root), s3_endpoint, cache=tmp_path / "cache")
    assert [f[0] for f in manifest["files"]] == [f"train/images_{n:03d}.tar" for n in range(3)] + [
        "train.csv", "train_attribution.csv", "train_clean.csv"]


# ------------------------------------------------------------------------------------------------
# units of loose files, the unit function on its own


def test_loose_files_in_units_make_the_same_samples(tmp_path, photo_folder, synth_cfg):
    one = synthesize(synth_cfg, source=str(photo_folder), out=str(tmp_path / "one"), progress=False)
    cut = {**synth_cfg, "unit_files": 3}
    two = synthesize(cut, source=str(photo_folder), out=str(tmp_path / "cut"), progress=False)
    assert two["units"] == 2 and two["params_hash"] == one["params_hash"] and two["splits"]["val"]["sources"] == \
        one["splits"]["val"]["sources"]
    assert all(name.startswith(("train-files-00000", "val-files-00000")) for name in os.listdir(tmp_path / "cut")
               if name.endswith(".tar"))

    def samples(folder: Path) -> dict:
        return {k: v for p in folder.glob("*.tar") for k, v in read_tar_samples(p).items()}
    assert samples(tmp_path / "cut") == samples(tmp_path / "one")
    parallel = synthesize({**cut, "workers": 2}, source=str(photo_folder), out=str(tmp_path / "par"), progress=False)
    assert parallel == two and files_of(tmp_path / "par") == files_of(tmp_path / "cut")


def test_a_unit_runs_alone_and_is_kept_once_done(tmp_path, photo_folder, synth_cfg):
    from tasks.data.catalogs import open_catalog

    workspace = synth.Workspace.for_out(str(tmp_path / "shards"), None)
    jobs = synth.plan({**synth_cfg, "unit_files": 3}, open_catalog(str(photo_folder)), workspace)
    assert [len(j.unit.sources) for j in jobs] == [3, 1] and workspace.prepare({j.unit.name: j.key for j in jobs}) == []
    record = synth.run_unit(jobs[1])
    assert record["images"] == 1 and record["problem"] is None
    assert json.loads((tmp_path / ".shards.partial" / ".units" / "files-000001.json").read_text()) == record
    shards = [s for split in record["splits"].values() for s in split["shards"]]
    assert shards and all((tmp_path / ".shards.partial" / s).is_file() for s in shards)
    assert synth.run_unit(jobs[1]) == record   # done: returned from its marker, not made again
    # another key (other params) drops the marker and its shards
    assert workspace.prepare({jobs[1].unit.name: "other"}) == []
    assert not any((tmp_path / ".shards.partial" / s).exists() for s in shards)


# ------------------------------------------------------------------------------------------------
# the manifest


def test_manifest_lists_tars_by_published_md5_and_reads_no_image(tmp_path, mini, monkeypatch):
    from tasks.data import manifest as manifest_module

    root = tmp_path / "gldv2"
    shutil.copytree(mini.root, root)
    hashed, real_hash = [], manifest_module.content_hash
    monkeypatch.setattr(manifest_module, "content_hash", lambda path: (hashed.append(Path(path).name), real_hash(path))[1])
    monkeypatch.setattr(storage, "open_read", lambda uri, *a, **k: pytest.fail(f"the manifest opened {uri}"))
    cache = tmp_path / "cache"
    first = source_manifest(spec(root), cache=cache)
    md5s = {n: (root / "md5sum" / "train" / f"md5.images_{n:03d}.txt").read_text().split()[0] for n in range(3)}
    assert first["files"][:3] == [[f"train/images_{n:03d}.tar", (root / "train" / f"images_{n:03d}.tar").stat().st_size,
                                   f"md5:{md5s[n]}"] for n in range(3)]
    assert [f[0] for f in first["files"][3:]] == ["train.csv", "train_attribution.csv", "train_clean.csv"]
    assert sorted(hashed) == ["train.csv", "train_attribution.csv", "train_clean.csv"]   # CSVs by content, tars never
    hashed.clear()
    os.utime(root / "train" / "images_000.tar", (1, 1))
    os.utime(root / "train_clean.csv", (1, 1))
    assert source_manifest(spec(root), cache=cache) == first and hashed == ["train_clean.csv"]   # a touch: nothing new
    hashed.clear()
    assert source_manifest(spec(root), cache=cache) == first and hashed == []                    # warm: nothing read
    (root / "md5sum" / "train" / "md5.images_001.txt").write_text(f"{'0' * 32}  images_001.tar\n")
    changed = source_manifest(spec(root), cache=cache)
    assert changed["hash"] != first["hash"] and changed["files"][1][2] == f"md5:{'0' * 32}"
    with (root / "train_clean.csv").open("a") as f:
        f.write("999,ffffffffffffffff\n")
    assert source_manifest(spec(root), cache=cache)["files"][5] != first["files"][5]


def test_loose_manifest_hashes_a_file_again_only_when_it_changed(tmp_path, photo_folder, photos, monkeypatch):
    from tasks.data import manifest as manifest_module
    from conftest import write_png

    hashed, real_hash = [], manifest_module.content_hash
    monkeypatch.setattr(manifest_module, "content_hash", lambda path: (hashed.append(Path(path).name), real_hash(path))[1])
    monkeypatch.setenv("ABAIR_CACHE_DIR", str(tmp_path / "env-cache"))
    first = source_manifest(str(photo_folder))
    assert len(hashed) == 4 and (tmp_path / "env-cache" / "content-hashes").is_dir()
    hashed.clear()
    assert source_manifest(str(photo_folder)) == first and hashed == []
    os.utime(photo_folder / "coffee.png", (1, 1))   # a touch: hashed again, the same entry
    assert source_manifest(str(photo_folder)) == first and hashed == ["coffee.png"]
    write_png(photo_folder / "coffee.png", photos["coffee"][:180, :221])   # an edit: a new entry
    edited = source_manifest(str(photo_folder))
    assert edited["hash"] != first["hash"] and [f[0] for f in edited["files"]] == [f[0] for f in first["files"]]


# ------------------------------------------------------------------------------------------------
# where the licenses go


def test_the_license_summary_reaches_the_registry(local_run, tmp_path):
    from tasks.registry import store as registry
    from tasks.registry.register import data_license, license_tag, register, share_alike_note
    from conftest import make_components

    shards = str(local_run["out"])
    summary = data_license(shards)
    index = local_run["index"]
    assert summary == {"licenses": index["licenses"], "samples": index["counts"]["samples"], "source": index["source"],
                       "share_alike": ["CC BY-SA 3.0", "CC BY-SA 4.0"], "attribution": f"{shards}/ATTRIBUTION.csv"}
    tag = license_tag(summary)
    assert tag.endswith(f"(samples); full list: {shards}/ATTRIBUTION.csv") and "CC BY-SA 3.0: 6" in tag
    assert "share-alike images (CC BY-SA 3.0, CC BY-SA 4.0: 10 of 16 samples)" in share_alike_note(summary)
    assert share_alike_note(None) == ""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "index.json").write_text(json.dumps({"format": "abair-shards/1", "counts": {"samples": 1}}))
    assert data_license(str(tmp_path / "plain")) is None   # a source without licenses: no summary

    saved = {}

    def save_restorer(checkpoints, path, metadata=None):
        saved.update(metadata)
        Path(path).mkdir(parents=True)
        (Path(path) / "MLmodel").write_text(json.dumps(metadata))
        return Path(path)

    result = register(make_components(tmp_path / "model"), {"summary/all/sw/psnr": 20.0}, params="lic", data="d",
                      suite="s", commit="c", save_restorer=save_restorer, licenses=summary)
    version = registry.registry_client().get_model_version("abair-restorer", result["restorer"]["version"])
    assert version.tags["abair.data_license"] == tag and saved["data_license"] == summary
    assert "Trained on share-alike images" in version.description


def test_the_gld_profile(tmp_path):
    from tasks.core.params import load_params
    from tasks.core.profiles import apply_profile

    params = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", params)
    apply_profile("gld", params, profiles=ROOT / "profiles")
    values = load_params(params)
    parsed = gldv2.parse_spec(values["synthesize"]["source"])
    assert parsed.split == "train" and parsed.subset == "clean"
    assert values["pretrain"]["model"]["size"] == "base" and values["evaluate"]["defaults"]["clean"] == "samples"
