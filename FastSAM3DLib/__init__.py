"""FastSAM3D engine: the FastSAM3D / SAM-Med3D models, checkpoint loading, interactive sessions.

Plain Python + PyTorch + NumPy + SimpleITK; it never imports Slicer.
"""

from .build import CONFIGS, build_model, count_parameters, infer_config
from .checkpoint import bundled_model_path, convert_checkpoint, load_image_encoder, load_model, save_model
from .errors import CheckpointError, FastSAM3DInputError, ImageError, PromptError
from .preprocess import IntensitySettings
from .session import Session

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
