"""A miniature Google Landmarks v2 in the dataset's published layout, for the tests (and the
synthesis_scale benchmark):

    ROOT/train/images_000.tar ...           members a/b/c/<16-hex id>.jpg (and their folders)
    ROOT/md5sum/train/md5.images_000.txt    `md5sum` output: "<md5>  images_000.tar"
    ROOT/train.csv, train_clean.csv, train_attribution.csv, train_label_to_category.csv, index.csv, test.csv
"""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Photo:
    id: str              # 16 hex characters
    landmark: str
    jpeg: bytes
    clean: bool = True   # listed in train_clean.csv
    license: str = "CC BY 2.0"
    author: str = "A. Photographer"
    title: str = "File:Somewhere.jpg"

    @property
    def url(self) -> str:
        return f"https://upload.example.org/{self.id}.jpg"

    @property
    def member(self) -> str:
        return f"{self.id[0]}/{self.id[1]}/{self.id[2]}/{self.id}.jpg"


def image_id(n: int, salt: str = "") -> str:
    return hashlib.sha256(f"{salt}{n}".encode()).hexdigest()[:16]


def jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def tar_bytes(photos: list[Photo]) -> bytes:
    """A tar like the published ones: the a/b/c/ folders, then the JPEGs (fixed mtimes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        folders = sorted({p.member.rsplit("/", 1)[0][:i] for p in photos for i in (1, 3, 5)})
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_500_000_000
            tar.addfile(info)
        for photo in photos:
            info = tarfile.TarInfo(photo.member)
            info.size, info.mode, info.mtime = len(photo.jpeg), 0o644, 1_500_000_000
            tar.addfile(info, io.BytesIO(photo.jpeg))
    return buf.getvalue()


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_gldv2(root: Path, tars: list[list[Photo]], wrong_md5: tuple[int, ...] = (), md5_beside: bool = False,
                extra_train_rows: list[Photo] = ()) -> Path:
    """Write the layout; `wrong_md5`: tars whose published md5 is wrong; `md5_beside`: md5 files
    next to the tars (where download-dataset.sh leaves them) instead of md5sum/train/."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    md5_dir = root / "train" if md5_beside else root / "md5sum" / "train"
    md5_dir.mkdir(parents=True, exist_ok=True)
    for n, photos in enumerate(tars):
        data = tar_bytes(photos)
        (root / "train" / f"images_{n:03d}.tar").write_bytes(data)
        digest = hashlib.md5(data).hexdigest()
        if n in wrong_md5:
            digest = hashlib.md5(data + b"tampered").hexdigest()
        (md5_dir / f"md5.images_{n:03d}.txt").write_text(f"{digest}  images_{n:03d}.tar\n")
    photos = [p for t in tars for p in t] + list(extra_train_rows)
    write_csv(root / "train.csv", ["id", "url", "landmark_id"], [[p.id, p.url, p.landmark] for p in photos])
    clean: dict[str, list[str]] = {}
    for p in photos:
        if p.clean:
            clean.setdefault(p.landmark, []).append(p.id)
    write_csv(root / "train_clean.csv", ["landmark_id", "images"], [[lm, " ".join(ids)] for lm, ids in sorted(clean.items())])
    write_csv(root / "train_attribution.csv", ["id", "url", "author", "license", "title"],
              [[p.id, p.url, p.author, p.license, p.title] for p in photos])
    write_csv(root / "train_label_to_category.csv", ["landmark_id", "category"],
              [[lm, f"http://commons.wikimedia.org/wiki/Category:Landmark_{lm}"] for lm in sorted({p.landmark for p in photos})])
    write_csv(root / "index.csv", ["id"], [[image_id(n, "index")] for n in range(3)])
    write_csv(root / "test.csv", ["id"], [[image_id(n, "test")] for n in range(3)])
    return root


def upload(root: Path, client, bucket: str, prefix: str) -> str:
    """The same layout under s3://bucket/prefix; returns that URI."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"


@dataclass
class MiniGld:
    """What the tests' miniature holds, by design."""
    root: Path
    tars: list[list[Photo]]
    not_clean: Photo        # in train.csv, missing from train_clean.csv
    corrupt: Photo          # in train_clean.csv, not a JPEG
    wrong_md5_tar: int      # its published md5 does not match
    big_landmark: str       # one landmark with several images, over two tars
    landmarks: list[str] = field(default_factory=list)

    def usable(self) -> list[Photo]:
        """The images that make samples: clean, decodable, in a tar whose md5 matches."""
        return [p for n, t in enumerate(self.tars) if n != self.wrong_md5_tar for p in t
                if p.clean and p is not self.corrupt]


def mini_gldv2(root: Path, photos: dict[str, np.ndarray]) -> MiniGld:
    """Three tars: 000 (5 images, one not in train_clean.csv), 001 (5 images, one corrupt JPEG),
    002 (3 images, its md5 file wrong); landmark 100 has four images over tars 000 and 001."""
    sources = [photos[name] for name in ("astronaut", "chelsea", "coffee", "rocket")]

    def crop(n: int) -> bytes:
        img = sources[n % 4]
        y, x = 7 * n % (img.shape[0] - 48), 11 * n % (img.shape[1] - 64)
        return jpeg(np.ascontiguousarray(img[y:y + 48, x:x + 64]))

    licenses = ["CC BY 2.0", "CC BY-SA 3.0", "CC BY 4.0", "CC BY-SA 4.0"]
    plan = [("100", 0), ("100", 0), ("101", 0), ("102", 0), ("103", 0),
            ("100", 1), ("100", 1), ("104", 1), ("104", 1), ("105", 1),
            ("106", 2), ("107", 2), ("107", 2)]
    made = [Photo(image_id(n), landmark, crop(n), license=licenses[n % 4],
                  author=f'Author {n}, "the {landmark}"', title=f"File:Landmark {landmark} ({n}).jpg")
            for n, (landmark, _) in enumerate(plan)]
    not_clean = made[4] = Photo(made[4].id, "103", made[4].jpeg, clean=False)
    corrupt = made[8] = Photo(made[8].id, "104", b"\xff\xd8\xff\xe0 not really a jpeg", license="CC BY 2.0")
    tars = [[p for p, (_, t) in zip(made, plan) if t == n] for n in range(3)]
    write_gldv2(root, tars, wrong_md5=(2,))
    return MiniGld(root, tars, not_clean, corrupt, 2, "100", sorted({lm for lm, _ in plan}))
