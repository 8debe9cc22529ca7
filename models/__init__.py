"""Torch modules of ABAIR: Restormer-family backbone, adapter kinds (LoRA, AdaptIR) and their bank,
degradation estimator, and the Restorer that puts them behind one call. See each module's docstring.

    backbone.py   the architecture          tiling.py      exact and local tiled inference
    identity.py   fingerprint, backbone file checkpoint.py  safetensors files, their errors
    adapters/     adapter kinds and the bank estimator.py   Phase III's weights per adapter
    restorer.py   the whole system behind one call
"""

from models.adapters import AdapterBank, read_adapter_metadata
from models.backbone import SIZES, Backbone, BackboneConfig, build_backbone
from models.checkpoint import AdapterError, CheckpointError
from models.estimator import Estimator, EstimatorConfig, load_estimator, save_estimator
from models.identity import fingerprint, load_backbone, read_backbone_metadata, restoration_state_dict, save_backbone
from models.restorer import Restorer, param_counts

__all__ = [
    "SIZES", "Backbone", "BackboneConfig", "build_backbone", "fingerprint", "load_backbone", "read_backbone_metadata",
    "restoration_state_dict", "save_backbone", "AdapterBank", "read_adapter_metadata", "AdapterError",
    "CheckpointError", "Estimator", "EstimatorConfig", "load_estimator", "save_estimator", "Restorer", "param_counts",
]
