"""Assemble the ABAIR system from its component files: backbone, adapter files, estimator.

The component files are the contract between stages (and what the registry versions): a folder
`checkpoints/` with backbone.safetensors, adapters/<name>.safetensors and estimator.safetensors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core.errors import AbairError
from tasks.core.paths import ADAPTER_DIR, BACKBONE_FILE, ESTIMATOR_FILE

if TYPE_CHECKING:  # torch comes with the models, when a system loads: the file names alone stay light
    import torch



def adapter_files(adapters_dir: str | Path) -> list[Path]:
    folder = Path(adapters_dir)
    if not folder.is_dir():
        raise AbairError(folder, "adapter folder not found (run the `adapters` stage first)")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise AbairError(folder, "no adapter files (*.safetensors)")
    return files


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_bank(backbone, files: list[Path]):
    """An AdapterBank configured from the first file's metadata, holding every adapter file."""
    from models.adapters import AdapterBank, read_adapter_options

    kind, options = read_adapter_options(files[0])
    bank = AdapterBank(backbone, kind, options)
    for path in files:
        bank.load(path)
    return bank


def load_system(backbone_path: str | Path, adapters_dir: str | Path | None = None,
                estimator_path: str | Path | None = None, device: str | torch.device = "cpu",
                keep_seg_head: bool = False):
    """A models.restorer.Restorer from files; adapters and estimator optional.

    keep_seg_head: keep the Phase I segmentation head (the pixel-wise mode's `seg` source reads
    its per-pixel probabilities); otherwise it is dropped, as it changes no restored pixel."""
    from models.identity import load_backbone
    from models.estimator import load_estimator
    from models.restorer import Restorer

    backbone = load_backbone(backbone_path)
    if not keep_seg_head:
        backbone.drop_seg_head()
    bank = load_bank(backbone, adapter_files(adapters_dir)) if adapters_dir is not None else None
    estimator = load_estimator(estimator_path) if estimator_path is not None else None
    if estimator is not None and bank is not None:
        missing = [n for n in (estimator.class_names or []) if n not in bank]
        if missing:
            raise AbairError(estimator_path, f"expects adapters {missing} that {adapters_dir} does not hold")
    restorer = Restorer(backbone, bank, estimator)
    return restorer.to(device).eval()


def load_system_dir(folder: str | Path, device: str | torch.device = "cpu", keep_seg_head: bool = False):
    """The same from one folder laid out as checkpoints/ (used by `abair restore DIR`)."""
    folder = Path(folder)
    if not (folder / BACKBONE_FILE).is_file():
        raise AbairError(folder, f"not a model folder (no {BACKBONE_FILE})")
    adapters = folder / ADAPTER_DIR if (folder / ADAPTER_DIR).is_dir() else None
    estimator = folder / ESTIMATOR_FILE if (folder / ESTIMATOR_FILE).is_file() else None
    return load_system(folder / BACKBONE_FILE, adapters, estimator, device, keep_seg_head)
