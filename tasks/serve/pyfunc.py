"""`abair-restorer` as an MLflow pyfunc: the exact component files plus the code that runs them.

    model = mlflow.pyfunc.load_model("models:/abair-restorer@champion")
    restored = model.predict(image)             # uint8 HxWx3 -> uint8 HxWx3
    pixel_wise = model.predict(image, params={"mode": "pw", "pw_source": "seg"})

predict returns images only. Weights, where this code reports them (inference.restore_image, the
`abair restore` line), stay one vector per image, adapters then keep: in mode pw, the weight map's
mean over the image (models.restorer.weights_summary).

The model folder holds the component files as pyfunc artifacts, in the checkpoints/ layout
(artifacts/backbone.safetensors, artifacts/adapters/*.safetensors, artifacts/estimator.safetensors),
and a snapshot of the `models` package and of the few `tasks` modules the model class runs
(code_paths), so it loads in a process that has torch, mlflow, safetensors and OpenCV but not
this project. The registry writes it through `save_restorer`, which its callers pass in.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np

from tasks.core.paths import ADAPTER_DIR, BACKBONE_FILE, ESTIMATOR_FILE
from tasks.core.errors import AbairError
from tasks.serve import memory
from tasks.serve.inference import (DEFAULT_MAX_PIXELS, load_restorer, mode_problem, planar_float_rgb,
                                   restore_rgb, to_stored)

ROOT = Path(__file__).resolve().parents[2]
# What the model class imports at load and predict time: bundled beside the whole `models`
# package, and nothing else of `tasks` (no training, evaluation or registry code in a model).
SERVING_CODE = ("tasks/__init__.py", "tasks/core/__init__.py", "tasks/core/errors.py", "tasks/core/device.py",
                "tasks/core/components.py", "tasks/core/paths.py", "tasks/serve/__init__.py", "tasks/serve/inference.py",
                "tasks/serve/memory.py", "tasks/serve/pyfunc.py")
# tiling auto: exact where it fits memory_budget, else local; an image no tiling fits is refused
# (tasks/serve/memory.py, as `abair restore` does). pw_source: the pw mode's weight-map source
# (dense | seg; None: what the system has).
DEFAULT_CONFIG = {"mode": "sw", "device": "auto", "max_pixels": DEFAULT_MAX_PIXELS, "tiling": "auto",
                  "memory_budget": "2GB", "pw_source": None}
# What the model folder needs at load time besides its bundled code (versions as in pyproject).
PIP_REQUIREMENTS = ["torch==2.13.0", "mlflow==3.17.2", "safetensors>=0.4", "numpy>=1.26", "opencv-python-headless>=4.9",
                    "boto3>=1.34"]


def signature():
    """uint8 HxWx3 in, uint8 HxWx3 out, any size; `mode` (sw | oh | pw | none) and `pw_source`
    (dense | seg) per call."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    image = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))])
    return ModelSignature(inputs=image, outputs=image, params=ParamSchema([ParamSpec("mode", "string", "sw"),
                                                                              ParamSpec("pw_source", "string", None)]))


def input_example() -> np.ndarray:
    """A 16x16 colour ramp: small enough to store with every version."""
    y, x = np.mgrid[0:16, 0:16]
    return np.stack([x * 16, y * 16, (x + y) * 8], axis=2).astype(np.uint8)


class RestorerModel(mlflow.pyfunc.PythonModel):
    """predict(image or list of images, params={"mode": "sw" | "oh" | "pw" | "none", "pw_source": "dense" | "seg"})
    -> restored uint8 image(s)."""

    def load_context(self, context):
        config = {**DEFAULT_CONFIG, **(context.model_config or {})}
        self.mode = config["mode"]
        self.pw_source = config.get("pw_source")
        self.max_pixels = config["max_pixels"]
        self.tiling = config["tiling"]
        self.memory_budget = memory.parse_bytes(config.get("memory_budget"))
        if self.tiling not in memory.TILINGS:
            raise ValueError(f"tiling must be one of {memory.TILINGS}, got {self.tiling!r}")
        # the segmentation head stays (a few thousand parameters, never run in the other modes), so
        # that any call may ask for the seg weight maps
        self.restorer = load_restorer(context.artifacts["backbone"], context.artifacts["adapters"],
                                      context.artifacts["estimator"], config["device"], keep_seg_head=True)

    def options(self, params) -> tuple[str, str | None]:
        """(mode, pw_source) of one call: its params over the load-time configuration; ValueError
        when they do not go together or the system lacks the asked-for weight-map source."""
        params = params or {}
        mode = params.get("mode") or self.mode
        pw_source = params.get("pw_source") or (self.pw_source if mode == "pw" else None)
        problem = mode_problem(mode, pw_source)
        if problem is not None:
            raise ValueError(f"{problem[0]} {problem[1]}")
        return mode, self.restorer.resolve_pw_source(pw_source) if mode == "pw" else None

    # np.ndarray tells MLflow not to derive a schema from the hint: the signature is the schema
    def predict(self, context, model_input: np.ndarray, params=None):
        mode, pw_source = self.options(params)
        single = isinstance(model_input, np.ndarray) and model_input.ndim == 3
        images = [model_input] if single else list(model_input)
        outputs = []
        for i, image in enumerate(images):
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {i}: expected uint8 HxWx3, got {image.dtype} {image.shape}")
            if min(image.shape[:2]) < 2:
                raise ValueError(f"image {i}: {image.shape[1]}x{image.shape[0]} is too small to restore (2x2 at least)")
            try:
                plan = memory.plan_restore(self.restorer, *image.shape[:2], self.max_pixels, self.tiling,
                                           self.memory_budget, mode, pw_source)
            except memory.DoesNotFit as exc:
                raise ValueError(f"image {i}: {exc}") from None
            restored, _ = restore_rgb(self.restorer, planar_float_rgb(image), mode, self.max_pixels, plan.restore_tiling,
                                      pw_source)
            outputs.append(to_stored(restored, np.uint8))
        return outputs[0] if single else outputs


def _stage_code(folder: Path) -> list[str]:
    """The `models` package and the serving modules of `tasks`, without caches, as code_paths
    (which copies folders verbatim)."""
    shutil.copytree(ROOT / "models", folder / "models", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for relpath in SERVING_CODE:
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / relpath, folder / relpath)
    return [str(folder / "models"), str(folder / "tasks")]


def save_restorer(checkpoints: str | Path, path: str | Path, metadata: dict | None = None) -> Path:
    """Write the pyfunc model folder for the components in `checkpoints` to `path` (must not exist)."""
    checkpoints = Path(checkpoints)
    artifacts = {"backbone": checkpoints / BACKBONE_FILE, "adapters": checkpoints / ADAPTER_DIR,
                 "estimator": checkpoints / ESTIMATOR_FILE}
    for key, artifact in artifacts.items():
        if not artifact.exists():
            raise AbairError(artifact, f"missing: the {key} is needed to build the restorer model")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    # the model class is pickled by reference to tasks.serve.pyfunc (bundled below), not by value, so
    # MLflow's warning about pickled code does not apply
    pyfunc_log.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="abair-code-") as tmp:
            mlflow.pyfunc.save_model(
                path=str(path), python_model=RestorerModel(), artifacts={k: str(v) for k, v in artifacts.items()},
                code_paths=_stage_code(Path(tmp)), signature=signature(), input_example=input_example(),
                pip_requirements=PIP_REQUIREMENTS, model_config=dict(DEFAULT_CONFIG), metadata=metadata or {})
    finally:
        pyfunc_log.setLevel(level)
    return Path(path)
