"""Export a training checkpoint as a bundled-style model: safetensors + sha256 + a model card in the metadata.

``fastsam3d train export ~/.cache/fastsam3d/runs/<run>/checkpoints/last.pt --out FILE.safetensors``
writes ``FILE.safetensors`` (and its ``.sha256``) with :func:`FastSAM3DLib.checkpoint.save_model`;
the output is always named, so that no test export lands in ``Resources/Models`` as the bundled
model (copy a file there once it has earned it). A weights file (``.safetensors``, ``.pth``) is
exported the same way, with its own card if it has one. Weights are stored in fp16 when fp32 would exceed the
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

from ..checkpoint import save_model
from ..errors import CheckpointError, FastSAM3DInputError
from ..modeling import Sam3D

logger = logging.getLogger(__name__)

SIZE_LIMIT_BYTES = 50 * 1000 * 1000

KNOWN_LIMITS = (
    "Trained on one real subject (Colin27 T1 with AAL deep structures and brain mask, heavily "
    "augmented) plus procedural MR/CT-like phantoms, on CPU for a few hours: far less data and compute "
    "than the public FastSAM3D/SAM-Med3D weights. Expect weak results on real CT anatomy, on structures "
    "unlike those seen, and on images far from a 1.5 mm T1 appearance. Decoder trained with dropout 0.1 "
    "(usable for MC-dropout uncertainty)."
)


def _training_payload(path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The contents of a training checkpoint (a ``torch.save`` dict with ``model_config``), or None
    for any other file: a weights file, or one that only ``load_model`` can read or explain."""
    from .interactive import load_checkpoint

    if Path(path).suffix == ".safetensors":
        return None
    try:
        payload = load_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a weights-only torch file; load_model says what it is
        return None
    return payload if isinstance(payload, dict) and "model_config" in payload else None


def _load_any(path: str | os.PathLike) -> tuple[Sam3D, Optional[Dict[str, Any]]]:
    """(model, training info: step, wall time, recipe) of a training checkpoint, or (model, None) of a
    weights file (read with :func:`FastSAM3DLib.checkpoint.load_model`).

    Raises:
      CheckpointError: a file that is neither (the message says what it is).
    """
    from ..checkpoint import load_model
    from .interactive import model_from_checkpoint

    payload = _training_payload(path)
    if payload is None:
        return load_model(path, device="cpu"), None
    info: Dict[str, Any] = {"step": int(payload.get("step", 0)), "elapsed_s": float(payload.get("elapsed_s", 0.0))}
    if "config" in payload:
        info["recipe"] = json.loads(payload["config"])
    return model_from_checkpoint(payload), info


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


def _data(recipe: Dict[str, Any]) -> str:
    """What the run trained on: its live pack, or the sources its pool's spec.json names."""
    colin27 = ("Colin27 T1 (Debian mricron-data ch2/aal/ch2bet) training structures "
               f"{'(hippocampus, amygdala, thalamus held out)' if recipe.get('heldout', True) else '(all deep structures)'}")
    if recipe.get("live_phantoms"):
        sources = (colin27 + " made on the training device from a pack + procedural MR/CT-like phantoms "
                   f"({recipe['live_phantoms']:.0%} of each batch on average)")
    elif recipe.get("live"):
        sources = colin27 + " made on the training device from a pack (no phantoms in this run)"
    else:
        spec = None
        if recipe.get("pool_dir") and Path(recipe["pool_dir"]).is_dir():
            from .pool import read_spec  # SimpleITK: only for a pool

            spec = read_spec(recipe["pool_dir"])
        parts = [colin27] if spec is None or spec.colin27 else []
        if spec is not None and spec.data:
            parts.append(f"labelled user data ({', '.join(spec.data)})")
        if spec is None or spec.phantom_fraction > 0:
            parts.append("procedural MR/CT-like phantoms")
        sources = " + ".join(parts)
    return sources + "; crops made like the session's preprocessing, augmented"


def _card(model: Sam3D, info: Dict[str, Any], checkpoint_name: str, notes: str) -> Dict[str, Any]:
    """The model card of a model trained by the run that ``info`` (step, wall time, recipe) describes."""
    recipe = info.get("recipe", {})
    trained = _trained_structures(recipe)
    return {
        "name": "fastsam3d-bundled",
        "architecture": model.config.get("name", "custom"),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "training_checkpoint": checkpoint_name,
        "steps": info["step"],
        "wall_time_hours": round(info["elapsed_s"] / 3600.0, 2),
        "hardware": _hardware(),
        "data": _data(recipe),
        "recipe": recipe,
        # What `fastsam3d evaluate` marks "seen" (None: the pool could not be read here).
        "trained_structures": trained,
        "known_limits": KNOWN_LIMITS,
        "notes": notes,
    }


def export_model(model: Sam3D, out: str | os.PathLike, dtype: str = "auto", card: Optional[Dict[str, Any]] = None) -> str:
    """Save ``model`` as safetensors (fp16 if ``dtype`` says so, or "auto" and fp32 would pass 50 MB).

    Returns:
      the sha256 of the written file.
    """
    if dtype not in ("auto", "float16", "float32"):
        raise FastSAM3DInputError(f"dtype must be auto, float16 or float32, got {dtype!r}")
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
    out: str | os.PathLike,
    dtype: str = "auto",
    notes: str = "",
    eval_json: Optional[str | os.PathLike] = None,
) -> str:
    """Export a training checkpoint (``last.pt``/``step_*.pt``) or a weights file with a model card; returns the sha256.

    Arguments:
      checkpoint: a checkpoint written by interactive or distillation training (its card describes
        the run), or a weights file ``load_model`` reads (its card is the file's own, if any, with
        ``exported_from`` added).
      out: the safetensors path.
      dtype: "auto", "float16" or "float32".
      notes: free text for the card (e.g. which run, what changed).
      eval_json: a report of ``fastsam3d train eval`` (its summary and per-structure Dice go in the card).
    """
    from ..checkpoint import read_model_card

    model, info = _load_any(checkpoint)
    if info is not None:
        card = _card(model, info, Path(checkpoint).name, notes)
    else:
        card = {**read_model_card(checkpoint), "exported_from": Path(checkpoint).name, "architecture": model.config.get("name", "custom"),
                "parameters": int(sum(p.numel() for p in model.parameters()))}
        card.pop("storage_dtype", None)  # export_model records this file's
        if notes:
            card["notes"] = notes
    if eval_json:
        report = json.loads(Path(eval_json).read_text())
        card["development_dice"] = {"summary": report.get("summary"), "per_structure": report.get("per_structure")}
    return export_model(model, out, dtype, card)


def load_weights(path: str | os.PathLike) -> Sam3D:
    """A model from a training checkpoint (``.pt`` with ``model_config``) or anything ``load_model`` reads."""
    return _load_any(path)[0]


def _architecture(model: Sam3D) -> Dict[str, Any]:
    return {k: v for k, v in model.config.items() if k not in ("name", "source", "sha256")}


def average_checkpoints(
    checkpoints: List[str | os.PathLike], out: str | os.PathLike, dtype: str = "auto", notes: str = ""
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
        model, info = _load_any(path)
        ingredients.append({"file": str(path), "model": model, "info": info or {"step": None, "elapsed_s": 0.0}})
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
