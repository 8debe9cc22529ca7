"""Where the pipeline keeps things by default, relative to the project root: the one place these
names are spelled. dvc.yaml spells them again (DVC reads no Python); tests/test_layout.py keeps
the two in step."""

from __future__ import annotations

PARAMS = "params.yaml"

# data/: inputs made from the clean sources
SOURCE_MANIFEST = "data/source_manifest.json"
SHARDS = "data/shards"
EVAL_CACHE = "data/eval"

# checkpoints/: the component files, in the layout a components folder and the registry share
CHECKPOINTS = "checkpoints"
BACKBONE_FILE = "backbone.safetensors"
ADAPTER_DIR = "adapters"
ESTIMATOR_FILE = "estimator.safetensors"
BACKBONE = f"{CHECKPOINTS}/{BACKBONE_FILE}"
ADAPTERS = f"{CHECKPOINTS}/{ADAPTER_DIR}"
ESTIMATOR = f"{CHECKPOINTS}/{ESTIMATOR_FILE}"
PRETRAIN_STATE = f"{CHECKPOINTS}/pretrain.state.pt"

# reports/: what people and DVC read
REPORTS = "reports"
TRAINING_REPORTS = f"{REPORTS}/training"
ADAPTER_REPORTS = f"{TRAINING_REPORTS}/adapters"
METRICS = f"{REPORTS}/metrics.json"
REGISTRY_REPORT = f"{REPORTS}/registry.json"
