"""Refit a trained model's IoU head so that it tells its candidate masks apart.

Training with candidate masks (``--multimask``) trains, for each target, only the candidate of its
size class; most targets are small, so the IoU head learns to rate the candidates in one fixed order
whatever was clicked (the campaign file rated small > medium > large for every Colin27 structure:
the brain's pick had Dice 0.01, its large candidate 0.84). What the head reads, the IoU token after
the decoder's transformer, no longer changes once the rest of the model is fixed. So this stage runs
the frozen model once over a pool of prepared crops, records that token and the actual IoU of every
output for simulated clicks, and fits the head alone on those pairs: minutes of CPU instead of a
training run. The masks the model draws are unchanged; only which candidate a session shows (and the
IoU it reports) moves.

``fastsam3d train iou-head --model M --pool DIR --out F`` does it and prints the picked candidates'
IoU before and after, on crops held out of the fit.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import read_model_card
from ..clicks import next_click_lowres
from ..errors import FastSAM3DInputError
from ..modeling import Sam3D
from .export import export_model, load_weights
from .interactive import _hard_iou, click_mode, low_res_targets
from .pool import load_entry, read_index


@dataclass
class IouSamples:
    """Decodes of a frozen model, as the IoU head sees them.

    Attributes:
      tokens: N x C, the IoU token the head reads.
      actual: N x M, each output's IoU with the target on the 32^3 grid (as training measures it).
      weight: N x M, 1 where an output counts (all outputs of a lone first click, where the session
        picks among candidates; output 0 of later clicks, the mask a session shows then), else 0.
      first: N bool, a lone first click.
      crop: N, the pool entry each decode came from (the validation split is by crop).
    """

    tokens: torch.Tensor
    actual: torch.Tensor
    weight: torch.Tensor
    first: torch.Tensor
    crop: torch.Tensor


def collect_samples(
    model: Sam3D,
    pool_dir: str | os.PathLike,
    crops: int,
    first_clicks: int = 6,
    later_clicks: int = 2,
    p_interior: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> IouSamples:
    """Decode simulated clicks on ``crops`` pool entries (drawn with ``seed``) and record what the head reads.

    Per crop: one embedding, ``first_clicks`` lone first clicks, each followed by ``later_clicks``
    corrective clicks on the best candidate's mask (the one a well-fitted head would show). A click is
    at the interior-most error voxel with probability ``p_interior``, else at a random one. First clicks
    are random by default, as users place them: the interior-most voxel of a large structure lies
    inside smaller ones (the brain's in the deep grey nuclei), and fitting to those clicks taught the
    head to answer "brain" to a click in the thalamus (on Colin27's interior-most clicks the picks'
    mean Dice fell from 0.40 to 0.19; with random first clicks it rose to 0.42).
    """
    if model.mask_decoder.num_mask_tokens < 2:
        raise FastSAM3DInputError("this model has no candidate masks: there is nothing for its IoU head to choose")
    entries = read_index(pool_dir)
    if not entries:
        raise FastSAM3DInputError(f"{pool_dir}: no pool entries (build one with `fastsam3d train pool`)")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(entries))[:crops]
    decoder = model.mask_decoder
    captured: Dict[str, torch.Tensor] = {}
    # The head's input is the decoder's IoU token; a hook reads it without restating the decoder.
    hook = decoder.iou_prediction_head.register_forward_hook(lambda module, inputs, output: captured.update(token=inputs[0]))
    tokens, actual, first, crop_ids = [], [], [], []
    device = next(model.parameters()).device
    low = model.low_res_size
    try:
        model.eval()
        with torch.no_grad():
            pe = model.prompt_encoder.get_dense_pe()
            for crop_id, index in enumerate(tqdm(chosen, desc="IoU samples", unit="crop", disable=not progress)):
                image, label = load_entry(pool_dir, entries[index])
                x = torch.from_numpy(np.asarray(image, dtype=np.float32))[None, None].to(device)
                target = torch.from_numpy(np.asarray(label, dtype=np.float32))[None, None]
                _, binary, low_np, full_np = low_res_targets(target, low[0])
                low_np, full_np, binary = low_np[0], full_np[0], binary.to(device)
                embedding = model.image_encoder(x)
                for _ in range(first_clicks):
                    mode = click_mode(rng, p_interior)
                    click = next_click_lowres(np.zeros_like(low_np), low_np, full_np, rng, mode)
                    if click is None:
                        break
                    clicks = [click]
                    previous = torch.zeros((1, 1, *low), device=device)
                    for it in range(1 + later_clicks):
                        coords = torch.tensor([[list(c[0]) for c in clicks]], dtype=torch.float32, device=device)
                        labels = torch.tensor([[float(c[1]) for c in clicks]], device=device)
                        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=previous)
                        logits, _ = decoder.predict_masks(embedding, pe, sparse, dense)
                        ious = _hard_iou(logits.float(), binary)[0]
                        tokens.append(captured["token"][0].float().cpu())
                        actual.append(ious.cpu())
                        first.append(it == 0)
                        crop_ids.append(crop_id)
                        shown = 1 + int(ious[1:].argmax()) if it == 0 else 0
                        previous = logits[:, shown : shown + 1]
                        mode = click_mode(rng, p_interior)
                        click = next_click_lowres((previous[0, 0] > 0).cpu().numpy(), low_np, full_np, rng, mode)
                        if click is None:
                            break
                        clicks.append(click)
    finally:
        hook.remove()
    if not tokens:
        raise FastSAM3DInputError(f"{pool_dir}: no usable clicks in {len(chosen)} crops (empty labels?)")
    first_t = torch.tensor(first)
    actual_t = torch.stack(actual)
    weight = torch.zeros_like(actual_t)
    weight[:, 0] = 1.0
    weight[first_t] = 1.0
    return IouSamples(torch.stack(tokens), actual_t, weight, first_t, torch.tensor(crop_ids))


def pick_quality(head: torch.nn.Module, samples: IouSamples, rows: torch.Tensor) -> Dict[str, float]:
    """How well ``head`` picks among the candidates (outputs 1..M-1) on the first clicks among ``rows``.

    Returns:
      picked: mean actual IoU of the candidate the head rates best; best: of the best candidate
      (what a perfect head gets); agree: share of clicks where the two are the same candidate;
      mse: the weighted squared error over all ``rows``.
    """
    with torch.no_grad():
        predicted = head(samples.tokens[rows])
    weight, actual = samples.weight[rows], samples.actual[rows]
    mse = float((((predicted - actual) ** 2) * weight).sum() / weight.sum().clamp_min(1.0))
    first = samples.first[rows]
    predicted, actual = predicted[first, 1:], actual[first, 1:]
    picked = actual.gather(1, predicted.argmax(1, keepdim=True))[:, 0]
    return {
        "picked": float(picked.mean()),
        "best": float(actual.max(1).values.mean()),
        "agree": float((predicted.argmax(1) == actual.argmax(1)).float().mean()),
        "mse": mse,
        "first_clicks": int(first.sum()),
    }


def fit_iou_head(
    model: Sam3D,
    samples: IouSamples,
    epochs: int = 500,
    lr: float = 3e-4,
    weight_decay: float = 0.1,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> Dict[str, Dict[str, float]]:
    """Fit ``model``'s IoU head (in place) to ``samples``; every other weight is left as it is.

    Full-batch AdamW on the weighted squared error. A ``val_fraction`` of the crops is held out; the
    epoch whose head picks best there is kept (checked every 10 epochs; between equal picks, the one
    with the smaller error; the head as it was if none is better), so the held-out figures chose the
    epoch and are slightly optimistic.

    Returns:
      pick_quality of the head before and after, on the fitted and held-out crops:
      ``{"before_fit", "before_held_out", "after_fit", "after_held_out"}``.
    """
    generator = np.random.default_rng(seed)
    crops = samples.crop.unique().numpy()
    held = set(generator.choice(crops, size=max(1, int(round(val_fraction * len(crops)))), replace=False).tolist())
    held_out = torch.tensor([int(c) in held for c in samples.crop])
    fit_rows = ~held_out
    if not fit_rows.any():
        raise ValueError("every crop was held out: collect more crops or lower val_fraction")
    head = model.mask_decoder.iou_prediction_head
    report = {"before_fit": pick_quality(head, samples, fit_rows), "before_held_out": pick_quality(head, samples, held_out)}
    torch.manual_seed(seed)
    trained = copy.deepcopy(head).float().cpu().train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=lr, weight_decay=weight_decay)
    x, y, w = samples.tokens[fit_rows], samples.actual[fit_rows], samples.weight[fit_rows]
    before = report["before_held_out"]
    best_state, best_score = copy.deepcopy(trained.state_dict()), (before["picked"], -before["mse"])
    for epoch in tqdm(range(1, epochs + 1), desc="IoU head", unit="epoch", disable=not progress):
        loss = (((trained(x) - y) ** 2) * w).sum() / w.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if epoch % 10 == 0:
            quality = pick_quality(trained, samples, held_out)
            score = (quality["picked"], -quality["mse"])  # picks first; between equal picks, the closer IoUs
            if score > best_score:
                best_state, best_score = copy.deepcopy(trained.state_dict()), score
    device = next(head.parameters()).device
    with torch.no_grad():
        for name, value in head.state_dict().items():
            value.copy_(best_state[name].to(device, value.dtype))
    report["after_fit"] = pick_quality(head, samples, fit_rows)
    report["after_held_out"] = pick_quality(head, samples, held_out)
    return report


def refit_iou_head(
    model_path: str | os.PathLike,
    pool_dir: str | os.PathLike,
    out: str | os.PathLike,
    crops: int = 800,
    first_clicks: int = 6,
    later_clicks: int = 2,
    p_interior: float = 0.0,
    epochs: int = 500,
    lr: float = 3e-4,
    weight_decay: float = 0.1,
    seed: int = 0,
    dtype: str = "auto",
    notes: str = "",
) -> Dict[str, Dict[str, float]]:
    """Load a model, refit its IoU head on a pool and export it; returns the report of :func:`fit_iou_head`.

    The card is the input file's (for a ``.safetensors``) with ``iou_head_refit`` added: the pool,
    the sample counts, the settings and the report.
    """
    model = load_weights(model_path)
    samples = collect_samples(model, pool_dir, crops, first_clicks, later_clicks, p_interior, seed=seed)
    report = fit_iou_head(model, samples, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed)
    card: Dict = read_model_card(model_path) if str(model_path).endswith(".safetensors") else {}
    card.pop("storage_dtype", None)
    card["iou_head_refit"] = {
        "from": Path(model_path).name,
        "pool": str(pool_dir),
        "crops": int(samples.crop.unique().numel()),
        "decodes": int(samples.tokens.shape[0]),
        "first_clicks": int(samples.first.sum()),
        "settings": {"later_clicks": later_clicks, "p_interior": p_interior, "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "seed": seed},
        "report": report,
        "notes": notes,
    }
    export_model(model, out, dtype, card)
    return report


def format_report(report: Dict[str, Dict[str, float]]) -> List[str]:
    """The report as printable lines: picked vs best candidate IoU before and after, per split."""
    lines = [f"{'':22s} {'picked IoU':>10s} {'best IoU':>9s} {'agree':>6s} {'mse':>7s} {'clicks':>6s}"]
    for key, row in report.items():
        lines.append(f"{key.replace('_', ' '):22s} {row['picked']:10.3f} {row['best']:9.3f} {row['agree']:6.2f} {row['mse']:7.4f} {row['first_clicks']:6d}")
    return lines
