"""Export a training checkpoint as the bundled model: safetensors + sha256 + a model card in the metadata.

``fastsam3d train export ~/.cache/fastsam3d/runs/<run>/checkpoints/last.pt`` writes
``Resources/Models/fastsam3d-bundled.safetensors`` (and its ``.sha256``) with
:func:`FastSAM3DLib.checkpoint.save_model`. Weights are stored in fp16 when fp32 would exceed the
repository's 50 MB budget; ``load_model`` reads them back into the fp32 model (``load_state_dict``
copies cast). The metadata carries the architecture (``config``) and a ``model_card`` JSON: data,
recipe, steps, wall time, hardware, the development Dice table if given, and known limits.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..checkpoint import MODELS_DIR, BUNDLED_MODEL_NAME, save_model
from ..modeling import Sam3D

logger = logging.getLogger(__name__)

DEFAULT_EXPORT = MODELS_DIR / BUNDLED_MODEL_NAME
SIZE_LIMIT_BYTES = 50 * 1000 * 1000

KNOWN_LIMITS = (
    "Trained on one real subject (Colin27 T1 with AAL deep structures and brain mask, heavily "
    "augmented) plus procedural MR/CT-like phantoms, on CPU for a few hours: far less data and compute "
    "than the public FastSAM3D/SAM-Med3D weights. Expect weak results on real CT anatomy, on structures "
    "unlike those seen, and on images far from a 1.5 mm T1 appearance. Decoder trained with dropout 0.1 "
    "(usable for MC-dropout uncertainty)."
)


def _load_training_model(checkpoint: str | os.PathLike) -> tuple[Sam3D, Dict[str, Any]]:
    from .interactive import load_checkpoint, model_from_checkpoint

    payload = load_checkpoint(checkpoint)
    model = model_from_checkpoint(payload)
    info: Dict[str, Any] = {"step": int(payload.get("step", 0)), "elapsed_s": float(payload.get("elapsed_s", 0.0))}
    if "config" in payload:
        info["recipe"] = json.loads(payload["config"])
    return model, info


def _hardware() -> str:
    """The machine the export runs on (where the last training ran, in our scripts)."""
    where = f"{platform.machine()} CPU ({os.cpu_count()} cores)"
    if torch.cuda.is_available():
        where += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{where}, torch {torch.__version__}"


def _trained_structures(recipe: Dict[str, Any]) -> Optional[List[str]]:
    """The Colin27 structures in the run's training pool or live pack (as the run filtered them), or
    None if neither is readable here. A run started from other weights (``init``) also inherits what
    those saw."""
    from .interactive import usable_entries
    from .live import LiveCrops

    if recipe.get("live"):
        if not Path(recipe["live"]).is_file():
            return None
        return sorted(LiveCrops(recipe["live"], heldout=bool(recipe.get("heldout", True)), weights=recipe.get("live_weights")).structures)
    pool = recipe.get("pool_dir")
    if not pool or not Path(pool).is_dir():
        return None
    entries = usable_entries(Path(pool), bool(recipe.get("heldout", True)))
    return sorted({str(e["structure"]) for e in entries if e.get("source") == "colin27"})


def export_model(
    model: Sam3D, out: str | os.PathLike = DEFAULT_EXPORT, dtype: str = "auto", card: Optional[Dict[str, Any]] = None
) -> str:
    """Save ``model`` as safetensors (fp16 if ``dtype`` says so, or "auto" and fp32 would pass 50 MB).

    Returns:
      the sha256 of the written file.
    """
    if dtype not in ("auto", "float16", "float32"):
        raise ValueError(f"dtype must be auto, float16 or float32, got {dtype!r}")
    fp32_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    half = dtype == "float16" or (dtype == "auto" and fp32_bytes > SIZE_LIMIT_BYTES)
    export = model.to("cpu")
    if half:
        import copy

        export = copy.deepcopy(export).half()
    metadata = {"model_card": json.dumps({**(card or {}), "storage_dtype": "float16" if half else "float32"})}
    digest = save_model(export, out, metadata)
    size = Path(out).stat().st_size
    if size > SIZE_LIMIT_BYTES:
        logger.warning("%s is %.1f MB, above the 50 MB budget", out, size / 1e6)
    logger.info("exported %s (%.1f MB, %s)", out, size / 1e6, "fp16" if half else "fp32")
    return digest


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike = DEFAULT_EXPORT,
    dtype: str = "auto",
    notes: str = "",
    eval_json: Optional[str | os.PathLike] = None,
) -> str:
    """Export a training checkpoint (``last.pt``/``step_*.pt``) with a model card; returns the sha256.

    Arguments:
      checkpoint: a checkpoint written by interactive or distillation training.
      out: the safetensors path (default: the bundled model in ``Resources/Models``).
      dtype: "auto", "float16" or "float32".
      notes: free text for the card (e.g. which run, what changed).
      eval_json: a report of ``fastsam3d train eval`` (its summary and per-structure Dice go in the card).
    """
    model, info = _load_training_model(checkpoint)
    recipe = info.get("recipe", {})
    trained = _trained_structures(recipe)
    if not recipe.get("live"):
        source = " + procedural MR/CT-like phantoms"
    elif recipe.get("live_phantoms"):
        source = (" made on the training device from a pack + procedural MR/CT-like phantoms "
                  f"({recipe['live_phantoms']:.0%} of each batch on average)")
    else:
        source = " made on the training device from a pack (no phantoms in this run)"
    card: Dict[str, Any] = {
        "name": "fastsam3d-bundled",
        "architecture": model.config.get("name", "custom"),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "training_checkpoint": Path(checkpoint).name,
        "steps": info["step"],
        "wall_time_hours": round(info["elapsed_s"] / 3600.0, 2),
        "hardware": _hardware(),
        "data": (
            "Colin27 T1 (Debian mricron-data ch2/aal/ch2bet) training structures "
            f"{'(hippocampus, amygdala, thalamus held out)' if recipe.get('heldout', True) else '(all deep structures)'}"
            + source
            + "; crops made like the session's preprocessing, augmented"
        ),
        "recipe": recipe,
        # What `fastsam3d evaluate` marks "seen" (None: the pool could not be read here).
        "trained_structures": trained,
        "known_limits": KNOWN_LIMITS,
        "notes": notes,
    }
    if eval_json:
        report = json.loads(Path(eval_json).read_text())
        card["development_dice"] = {"summary": report.get("summary"), "per_structure": report.get("per_structure")}
    return export_model(model, out, dtype, card)
