"""FastSAM3D engine: the FastSAM3D / SAM-Med3D models, checkpoint loading, interactive sessions.

Plain Python + PyTorch + NumPy + SimpleITK; it never imports Slicer. ``Session`` (and with it
SimpleITK) loads on first use, so the models, and training from a pack (``fastsam3d train
interactive --live``), run where SimpleITK is not installed.
"""

import importlib

from .build import CONFIGS, build_model, count_parameters, infer_config
from .checkpoint import bundled_model_path, convert_checkpoint, load_image_encoder, load_model, save_model
from .errors import CheckpointError, FastSAM3DInputError, ImageError, PromptError

_ON_FIRST_USE = {"Session": ".session", "IntensitySettings": ".crops"}


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        value = getattr(importlib.import_module(_ON_FIRST_USE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "CONFIGS",
    "CheckpointError",
    "FastSAM3DInputError",
    "ImageError",
    "IntensitySettings",
    "PromptError",
    "Session",
    "build_model",
    "bundled_model_path",
    "convert_checkpoint",
    "count_parameters",
    "infer_config",
    "load_image_encoder",
    "load_model",
    "save_model",
]
