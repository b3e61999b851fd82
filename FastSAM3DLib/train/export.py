"""Export a training checkpoint as the bundled model: safetensors + sha256 + a model card in the metadata.

``fastsam3d train export ~/.cache/fastsam3d/runs/<run>/checkpoints/last.pt`` writes
``Resources/Models/fastsam3d-bundled.safetensors`` (and its ``.sha256``) with
:func:`FastSAM3DLib.checkpoint.save_model`. Weights are stored in fp16 when fp32 would exceed the
repository's 50 MB budget; ``load_model`` reads them back into the fp32 model (``load_state_dict``
copies cast). The metadata carries the architecture (``config``) and a ``model_card`` JSON: data,
recipe, steps, wall time, hardware, the development Dice table if given, and known limits.
``fastsam3d train average A.pt B.pt ...`` exports the average of several runs' weights the same way.
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
from ..errors import CheckpointError
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


def _card(model: Sam3D, info: Dict[str, Any], checkpoint_name: str, notes: str) -> Dict[str, Any]:
    """The model card of a model trained by the run that ``info`` (step, wall time, recipe) describes."""
    recipe = info.get("recipe", {})
    trained = _trained_structures(recipe)
    if not recipe.get("live"):
        source = " + procedural MR/CT-like phantoms"
    elif recipe.get("live_phantoms"):
        source = (" made on the training device from a pack + procedural MR/CT-like phantoms "
                  f"({recipe['live_phantoms']:.0%} of each batch on average)")
    else:
        source = " made on the training device from a pack (no phantoms in this run)"
    return {
        "name": "fastsam3d-bundled",
        "architecture": model.config.get("name", "custom"),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "training_checkpoint": checkpoint_name,
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
    card = _card(model, info, Path(checkpoint).name, notes)
    if eval_json:
        report = json.loads(Path(eval_json).read_text())
        card["development_dice"] = {"summary": report.get("summary"), "per_structure": report.get("per_structure")}
    return export_model(model, out, dtype, card)


def load_weights(path: str | os.PathLike) -> Sam3D:
    """A model from a training checkpoint (``.pt`` with ``model_config``) or anything ``load_model`` reads."""
    from ..checkpoint import load_model
    from .interactive import load_checkpoint, model_from_checkpoint

    if str(path).endswith(".pt"):
        payload = load_checkpoint(path)
        if isinstance(payload, dict) and "model_config" in payload:
            return model_from_checkpoint(payload)
    return load_model(path, device="cpu")


def _architecture(model: Sam3D) -> Dict[str, Any]:
    return {k: v for k, v in model.config.items() if k not in ("name", "source", "sha256")}


def average_checkpoints(
    checkpoints: List[str | os.PathLike], out: str | os.PathLike = DEFAULT_EXPORT, dtype: str = "auto", notes: str = ""
) -> str:
    """Export the uniform average of the weights of several runs (a "model soup"); returns the sha256.

    Runs fine-tuned from the same weights stay in one basin of the loss, and their average is often
    better than each of them (Wortsman et al., ICML 2022); check it on the development evaluation
    before keeping it. The card is that of the last checkpoint's run, with ``average_of`` listing
    every ingredient (file, step, wall time) in place of one step count and wall time.

    Arguments:
      checkpoints: two or more training checkpoints (``.pt``) or weight files, all of one architecture.
      out, dtype, notes: as for :func:`export_checkpoint`.

    Raises:
      CheckpointError: fewer than two files, or a file whose architecture differs from the first's.
    """
    if len(checkpoints) < 2:
        raise CheckpointError(f"averaging needs at least two checkpoints; got {len(checkpoints)}")
    ingredients: List[Dict[str, Any]] = []
    for path in checkpoints:
        if str(path).endswith(".pt"):
            model, info = _load_training_model(path)
        else:
            model, info = load_weights(path), {"step": None, "elapsed_s": 0.0}
        ingredients.append({"file": str(path), "model": model, "info": info})
    first = ingredients[0]["model"]
    for item in ingredients[1:]:
        ours, theirs = _architecture(item["model"]), _architecture(first)
        if ours != theirs:
            changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise CheckpointError(f"{item['file']}: its architecture differs from {checkpoints[0]} in {', '.join(changed)}; "
                                  "only runs of one architecture can be averaged")
    states = [item["model"].state_dict() for item in ingredients]
    average = {key: sum(state[key].float() for state in states) / len(states) if value.is_floating_point() else value
               for key, value in states[0].items()}
    first.load_state_dict(average)
    last = ingredients[-1]
    card = _card(first, last["info"], Path(last["file"]).name, notes)
    card["average_of"] = [{"file": item["file"], "step": item["info"]["step"],
                           "wall_time_hours": round(item["info"]["elapsed_s"] / 3600.0, 2)} for item in ingredients]
    card["steps"] = card["wall_time_hours"] = None  # per ingredient above: runs continued from one another share steps
    return export_model(first, out, dtype, card)
