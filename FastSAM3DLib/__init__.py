"""FastSAM3D engine: the FastSAM3D / SAM-Med3D models, checkpoint loading, interactive sessions.

Plain Python + PyTorch + NumPy + SimpleITK; it never imports Slicer. ``Session`` (and with it
SimpleITK) loads on first use, so the models, and training from a pack (``fastsam3d train
interactive --live``), run where SimpleITK is not installed.
"""

import importlib
from typing import Any, Callable, Dict, Mapping

from .build import CONFIGS, build_model, count_parameters, infer_config
from .checkpoint import bundled_model_path, convert_checkpoint, load_image_encoder, load_model, save_model
from .errors import CheckpointError, FastSAM3DInputError, ImageError, PromptError


def _getattr_on_first_use(package: str, sources: Mapping[str, str], namespace: Dict[str, Any]) -> Callable[[str], Any]:
    """A PEP 562 module ``__getattr__`` importing each name of ``sources`` from its submodule (name ->
    relative module) when first asked for, and keeping it in ``namespace`` (the package's globals)."""

    def getattr_(name: str) -> Any:
        if name in sources:
            value = getattr(importlib.import_module(sources[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return getattr_


_ON_FIRST_USE = {"Session": ".session", "IntensitySettings": ".crops", "BoundaryRefinement": ".paste"}
__getattr__ = _getattr_on_first_use(__name__, _ON_FIRST_USE, globals())

__version__ = "0.1.0"

__all__ = [
    "BoundaryRefinement",
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
