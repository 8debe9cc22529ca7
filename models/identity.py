"""A backbone's identity and its checkpoint file.

The restoration weights (what a backbone restores with, whatever adapters or heads are attached),
their fingerprint (what an adapter file records, so it only ever loads onto the backbone it was
trained on), and the backbone's safetensors file (weights, config and fingerprint).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from models.backbone import Backbone, BackboneConfig
from models.checkpoint import (CheckpointError, check_tensors, merge_metadata, metadata_json, read_checkpoint,
                               save_atomic)

BACKBONE_FORMAT = "abair-backbone"


def restoration_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The restoration weights under their plain names, as if no adapter were attached.

    Leaves out the segmentation head and every adapter tensor; looks through adapter wrappers
    (modules with `wraps_base_layer`) to their base layer, and takes a merged LoRA layer's
    original weight, so attaching, merging or dropping anything leaves this dict unchanged.
    """
    state: dict[str, torch.Tensor] = {}

    def visit(module: nn.Module, prefix: str, originals: Mapping[str, torch.Tensor]) -> None:
        if getattr(module, "wraps_base_layer", False):
            visit(module.base_layer, prefix, module.original_base_tensors())
            return
        for name, param in module.named_parameters(recurse=False):
            state[prefix + name] = originals.get(name, param)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                state[prefix + name] = buf
        for name, child in module.named_children():
            if module is model and name == "seg_head":
                continue
            visit(child, f"{prefix}{name}.", {})

    visit(model, "", {})
    return state


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor in row-major order, any dtype (bfloat16 included)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def fingerprint(backbone: nn.Module) -> str:
    """sha256 (16 hex chars) over the restoration weights: names, dtypes, shapes and bytes.

    Independent of adapters (attached, merged or not), of the segmentation head and of the memory
    format; it changes when any restoration weight changes.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(restoration_state_dict(backbone).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()[:16]


def save_backbone(model: Backbone, path: str | os.PathLike, extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the backbone (restoration weights + seg head if present, no adapters) to safetensors.

    Metadata: format, config (JSON of BackboneConfig), fingerprint, plus `extra_metadata`.
    Atomic: temporary name in the same folder, then os.replace.
    """
    tensors = dict(restoration_state_dict(model))
    if model.seg_head is not None:
        tensors.update({f"seg_head.{k}": v for k, v in model.seg_head.state_dict().items()})
    reserved = {"format": BACKBONE_FORMAT, "config": model.config.to_json(), "fingerprint": fingerprint(model)}
    return save_atomic(tensors, path, merge_metadata(reserved, extra_metadata))


def read_backbone_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a backbone checkpoint, without building the network."""
    _, metadata = read_checkpoint(path, BACKBONE_FORMAT)
    return metadata


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu") -> Backbone:
    """Build the backbone described by a checkpoint's config and load its weights.

    Raises CheckpointError naming the file when it is missing, unreadable, not a backbone, or its
    tensors do not match its config or its recorded fingerprint.
    """
    tensors, metadata = read_checkpoint(path, BACKBONE_FORMAT)
    try:
        config = BackboneConfig.from_dict(metadata_json(path, metadata, "config"))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(path, f"invalid backbone config ({exc})") from None
    model = Backbone(config)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())  # a checkpoint saved in bfloat16 loads as bfloat16 (and keeps its fingerprint)
    expected = model.state_dict()
    check_tensors(expected, tensors, path)
    model.load_state_dict(tensors)
    recorded = metadata.get("fingerprint")
    if recorded is not None and recorded != fingerprint(model):
        raise CheckpointError(path, f"weights do not match the recorded fingerprint {recorded} (corrupt file?)")
    if config.seg_classes and "classes" in metadata:
        # what each channel of the segmentation head stands for (the pixel-wise mode's `seg` source)
        model.seg_class_names = list(metadata_json(path, metadata, "classes"))
    return model.to(device)
