"""Click-simulated interactive training (``fastsam3d train interactive``), DESIGN.md §5/§6.

One training step, per crop of the batch:

1. the image encoder embeds the 128^3 crop once;
2. a first click is placed in the label (its interior-most voxel, or a random one);
3. ``click_iters`` times: decode with the clicks so far (all of them, or only the newest) and the
   previous low-res logits as mask prompt (all-zero logits at first, as the public training and
   validation code and the Session do: a model trained with "no mask" there answers the Session's
   first click badly); add DiceCE (+ an IoU-head MSE) against
   the target at the loss grid; simulate the next click in the error region of this prediction.

With ``multimask`` the first decode trains SAM's three candidate masks for a lone click, which
does not say which of the nested structures around it is meant (a nucleus or the brain around
it). SAM back-propagates the lowest-loss candidate; here each target trains the candidate of its
size class instead (``multimask_bins``, fractions of the crop: small, medium, large), so that
every target trains a known candidate from the first step: a CPU campaign has a few thousand
steps, and in a tiny-model probe (two nested targets behind the same click) candidates started as
copies of one trained output had not split under the min-loss rule after 150 steps. The
single-mask output keeps its own loss, the IoU head learns the IoU of all four outputs, and the
candidate with the highest predicted IoU is fed back, as the Session picks it
(:meth:`Sam3D.uses_multimask`), or with ``best_feedback`` the candidate that fits the target best:
a head that always picks the small candidate would otherwise leave the corrective clicks no chance
to learn refining a large first mask (which users get from a better head, or by taking another candidate).

The loss is averaged over the iterations that carry gradients (the first one's two terms counted
as two with ``multimask``): all of them by default, or the first plus ``grad_iters - 1`` random
ones (the others run without autograd, which on a CPU saves about two thirds of their cost while
the model still learns from the states they lead to).

By default the loss and the simulated clicks live on the decoder's 32^3 grid (the target is the
4^3-average of the 128^3 label): that is what the decoder predicts, and it spares a 128^3
upsampling and distance transform per iteration. Every random choice of step ``s`` on rank ``r``
comes from ``numpy.random.default_rng((seed, r, s))`` and ``torch.manual_seed`` of the same, so a
resumed run continues exactly as an uninterrupted one.

Outputs (rank 0 only), under ``run_dir``: ``checkpoints/last.pt`` (every ``checkpoint_minutes``,
at the end, and when Ctrl-C or SIGTERM stops the run: :mod:`.signals`; state dicts and numbers only,
loadable with ``torch.load(weights_only=True)``), ``checkpoints/step_NNNNNN.pt`` snapshots at each
evaluation, ``metrics.json`` and ``curves.png``. A run resumes from ``last.pt`` with the checkpoint's
architecture and start (``model``, ``init``), which the recorded configuration then names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..build import CONFIGS, build_model, count_parameters, model_config
from ..clicks import next_click_lowres
from ..errors import CheckpointError, FastSAM3DInputError
from ..modeling import Sam3D, select_by_iou
from . import ddp
from .losses import segmentation_loss
from .live import LiveCrops, PhantomFeed
from .paths import DEFAULT_CACHE, DEFAULT_POOL
from .signals import StopSignals, stop_exception

logger = logging.getLogger(__name__)

DEFAULT_RUNS = DEFAULT_CACHE / "runs"
DEFAULT_MODEL = "fastsam3d-384"
# Settings in a model's config that change neither its weights nor its layers: a run may change them.
NOT_ARCHITECTURE = ("name", "source", "sha256", "decoder_dropout", "first_click_multimask")


@dataclass
class InteractiveConfig:
    """Everything a run needs; stored in its checkpoints.

    Attributes:
      run_dir: where checkpoints, metrics and plots go (outside the repository).
      pool_dir: the prepared crop pool (:mod:`FastSAM3DLib.train.pool`).
      live: a pack (:func:`FastSAM3DLib.train.live.write_pack`) to make every crop from on the training
        device instead (:class:`~FastSAM3DLib.train.live.LiveCrops`; no pool, no SimpleITK).
      live_weights: with ``live``, how often each named structure is drawn relative to the others (1).
      live_phantoms: with ``live``, the expected share of each batch that is procedural phantoms, made
        by ``phantom_workers`` processes on the machine's CPU cores (:class:`~FastSAM3DLib.train.live.PhantomFeed`;
        0 = the machine's cores less two, shared by the ranks on it); the pool's share is a half.
      pool_size: build the pool up to this many entries first if it has fewer (0: use it as it is).
      model: a ``build.CONFIGS`` name: the architecture of a fresh model (None: ``DEFAULT_MODEL``, or
        that of ``init``); a run resumed from its checkpoint, or started from ``init``, refuses another.
      init: weights to start a new run from (any file ``load_model`` reads); a run that resumes
        from its checkpoint keeps the start it had (a different ``init`` is ignored with a warning).
      steps: total optimizer steps of the run (a resumed run continues up to it).
      max_minutes: stop (with a checkpoint) after this much wall time in this process; 0 = no limit.
      batch_size: crops per step and rank.
      click_iters: decode/click iterations per crop.
      grad_iters: iterations carrying gradients (None: all).
      prompt_mode: "all" clicks so far in each decode, or only the "newest".
      p_interior: probability that a simulated click is the interior-most error voxel (else uniform).
      loss_grid: "low" (the decoder's 32^3) or "full" (logits upsampled to 128^3).
      iou_weight: weight of the IoU-head MSE (default 0: from scratch, even 0.1 drove the one-sample
        overfit into the empty-mask collapse; train the IoU head once masks are learned).
      multimask: train the three candidate masks on the first click (see the module docstring); a
        model without them starts them as copies of the single-mask output
        (:func:`seed_multimask_tokens`) and is marked ``config["first_click_multimask"]``.
      multimask_bins: target size (fraction of the crop's voxels) separating the small, medium and
        large candidates. The defaults, read from pool ``train-s0``: Colin27's nuclei (0.02-0.24 %)
        and the smaller half of the phantoms are small; the larger phantoms (up to 5.7 %) and the
        cerebellum (1.8-4.1 %) medium; the brain (15-37 %) large. Needs ``iou_weight`` > 0: the
        IoU head picks the candidate.
      best_feedback: with ``multimask``, the probability (per crop) that the first click feeds back
        the candidate with the highest actual IoU instead of the IoU head's pick.
      pos_weight: foreground weight in the cross-entropy of "dicece" (1: MONAI's DiceCELoss).
      loss: "dicebalanced" (default: Dice + class-balanced CE; plain DiceCE and DiceFocal collapsed to
        empty masks on small targets from scratch), "dicece" (MONAI DiceCELoss) or "dicefocal".
      balance_cap: for "dicebalanced": one foreground voxel weighs at most this many background
        voxels (0: fully balanced).
      decoder_lr_mult: learning-rate multiplier of the prompt encoder and mask decoder.
      iou_head_lr_mult: learning-rate multiplier of the IoU head (on top of ``decoder_lr_mult``):
        Adam's steps do not grow with ``iou_weight``, so a head that is slow to learn needs this.
      lr, weight_decay, warmup_steps, schedule ("constant" or "cosine"), min_lr_ratio, grad_clip: AdamW.
      autocast: "auto" (bf16 on CUDA with bf16 support, off on CPU), "bf16" or "off".
      freeze_encoder: train only the prompt encoder and decoder (the distillation fine-tune).
      heldout: leave out pool entries of ``HELDOUT_STRUCTURES`` (the generalisation check).
      seed, threads, log_every, checkpoint_minutes, eval_every, eval_clicks, device.
    """

    run_dir: str = str(DEFAULT_RUNS / "interactive")
    pool_dir: str = str(DEFAULT_POOL / "train-s0")
    live: Optional[str] = None
    live_weights: Optional[Dict[str, float]] = None
    live_phantoms: float = 0.0
    phantom_workers: int = 0
    pool_size: int = 0
    model: Optional[str] = None
    init: Optional[str] = None
    steps: int = 10000
    max_minutes: float = 0.0
    batch_size: int = 1
    click_iters: int = 11
    grad_iters: Optional[int] = None
    prompt_mode: str = "all"
    p_interior: float = 0.5
    loss_grid: str = "low"
    iou_weight: float = 0.0
    multimask: bool = False
    multimask_bins: Tuple[float, float] = (0.003, 0.08)
    best_feedback: float = 0.0
    pos_weight: float = 1.0
    loss: str = "dicebalanced"
    balance_cap: float = 0.0
    lr: float = 1e-4
    decoder_lr_mult: float = 1.0
    iou_head_lr_mult: float = 1.0
    weight_decay: float = 0.1
    warmup_steps: int = 100
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    autocast: str = "auto"
    freeze_encoder: bool = False
    heldout: bool = True
    seed: int = 0
    threads: Optional[int] = None
    log_every: int = 10
    checkpoint_minutes: float = 5.0
    eval_every: int = 500
    eval_clicks: int = 5
    device: str = "auto"

    def validate(self) -> None:
        """Raise FastSAM3DInputError (a ValueError) on inconsistent settings."""
        if self.model is not None and self.model not in CONFIGS:
            raise FastSAM3DInputError(f"--model {self.model!r}: unknown architecture; expected one of {', '.join(CONFIGS)}")
        if self.prompt_mode not in ("all", "newest"):
            raise FastSAM3DInputError(f"prompt_mode must be 'all' or 'newest', got {self.prompt_mode!r}")
        if self.loss_grid not in ("low", "full"):
            raise FastSAM3DInputError(f"loss_grid must be 'low' or 'full', got {self.loss_grid!r}")
        if self.schedule not in ("constant", "cosine"):
            raise FastSAM3DInputError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise FastSAM3DInputError(f"autocast must be 'auto', 'bf16' or 'off', got {self.autocast!r}")
        if self.loss not in ("dicece", "dicebalanced", "dicefocal"):
            raise FastSAM3DInputError(f"loss must be 'dicece', 'dicebalanced' or 'dicefocal', got {self.loss!r}")
        # The neutral values are the defaults: anything else was asked for, and would be ignored.
        if self.pos_weight != 1.0 and self.loss != "dicece":
            raise FastSAM3DInputError(f"--pos-weight {self.pos_weight} weighs the cross-entropy of --loss dicece only; this run uses --loss {self.loss}")
        if self.balance_cap != 0.0 and self.loss != "dicebalanced":
            raise FastSAM3DInputError(f"--balance-cap {self.balance_cap} belongs to --loss dicebalanced only; this run uses --loss {self.loss}")
        if self.click_iters < 1 or self.batch_size < 1 or self.steps < 0:
            raise FastSAM3DInputError("click_iters and batch_size must be at least 1, steps at least 0")
        if self.grad_iters is not None and not 1 <= self.grad_iters <= self.click_iters:
            raise FastSAM3DInputError(f"grad_iters must be in 1..click_iters ({self.click_iters}), got {self.grad_iters}")
        low, high = self.multimask_bins
        if not 0 < low < high < 1:
            raise FastSAM3DInputError(f"multimask_bins must be two increasing fractions in (0, 1), got {self.multimask_bins}")
        if self.multimask and self.iou_weight <= 0:
            raise FastSAM3DInputError("multimask training needs iou_weight > 0 (--iou-weight): the IoU head picks among the candidates")
        if not 0.0 <= self.best_feedback <= 1.0:
            raise FastSAM3DInputError(f"best_feedback is a probability, in [0, 1]; got {self.best_feedback}")
        if self.best_feedback and not self.multimask:
            raise FastSAM3DInputError("best_feedback chooses among the candidate masks: it needs multimask")
        if not 0.0 <= self.live_phantoms <= 1.0:
            raise FastSAM3DInputError(f"live_phantoms is a share of each batch, in [0, 1]; got {self.live_phantoms}")
        if self.live_phantoms and not self.live:
            raise FastSAM3DInputError("live_phantoms needs live (a pack): a pool has its phantoms already")
        if self.live_weights and not self.live:
            raise FastSAM3DInputError("--live-weights weighs the structures of a pack: it needs --live (a pool's crops are drawn uniformly)")
        if self.phantom_workers < 0:
            raise FastSAM3DInputError(f"phantom_workers must be 0 (the machine's cores less two) or more, got {self.phantom_workers}")


def architecture_differences(config: Dict[str, Any], other: Dict[str, Any]) -> List[str]:
    """The architecture settings (see ``NOT_ARCHITECTURE``) in which two model configs differ, as "key a != b"."""
    keys = sorted(k for k in set(config) | set(other) if k not in NOT_ARCHITECTURE)
    # JSON-normalised: a config read back from a checkpoint has lists where a fresh one may have tuples.
    a, b = json.loads(json.dumps({k: config.get(k) for k in keys})), json.loads(json.dumps({k: other.get(k) for k in keys}))
    return [f"{k} {a[k]} != {b[k]}" for k in keys if a[k] != b[k]]


def check_model_option(name: Optional[str], config: Dict[str, Any], what: str, remedy: str) -> None:
    """Refuse a ``--model`` (``name``; None: not given) whose architecture is not that of a model's ``config``.

    Arguments:
      what: where the model comes from, for the message (e.g. "run/checkpoints/last.pt holds").
      remedy: how to train ``name`` instead, for the message.
    """
    if name is None:
        return
    differences = architecture_differences(config, model_config(name))
    if differences:
        raise FastSAM3DInputError(f"--model {name}: {what} a {config.get('name', 'custom')!r} model, another architecture "
                                  f"({'; '.join(differences)}); {remedy}")


def seed_multimask_tokens(model: Sam3D) -> None:
    """Start the multimask outputs as copies of the trained single-mask output.

    A model trained without them has untrained multimask tokens, hypernetworks and IoU outputs;
    copies of output 0 (and of its IoU estimate) give each size class a working mask to
    specialise from, and leave the model's answers as they were. Marks the model
    ``config["first_click_multimask"]``.
    """
    decoder = model.mask_decoder
    iou_out = decoder.iou_prediction_head.layers[-1]
    sources = [decoder.mask_tokens.weight[0], *decoder.output_hypernetworks_mlps[0].parameters(), iou_out.weight[0], iou_out.bias[0]]
    with torch.no_grad():
        for k in range(1, decoder.num_mask_tokens):
            targets = [decoder.mask_tokens.weight[k], *decoder.output_hypernetworks_mlps[k].parameters(), iou_out.weight[k], iou_out.bias[k]]
            for source, target in zip(sources, targets):
                target.copy_(source)
    model.config["first_click_multimask"] = True


def low_res_targets(targets: torch.Tensor, low: int) -> Tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Targets B x 1 x S^3 in {0, 1} on the decoder's L^3 grid (L = ``low``).

    Returns:
      the coverage of each coarse voxel (B x 1 x L^3), the binary target as float (coverage >= 0.5;
      any coverage for a thin label that would vanish), and as NumPy bool B x L^3 and B x S^3 (full).
    """
    size = targets.shape[-1]
    soft_low = F.avg_pool3d(targets, kernel_size=size // low) if size != low else targets
    binary = soft_low >= 0.5
    empty = binary.flatten(1).sum(1) == 0
    if empty.any():  # thin labels: any coverage counts on the coarse grid
        binary[empty] = soft_low[empty] > 0
    return soft_low, binary.float(), binary[:, 0].cpu().numpy(), targets[:, 0].bool().cpu().numpy()


def click_mode(rng: np.random.Generator, p_interior: float) -> str:
    """A simulated click's kind: "interior" (the interior-most error voxel) with probability ``p_interior``, else "random"."""
    return "interior" if rng.random() < p_interior else "random"


def _hard_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` (B x M x ...) with a binary target (B x 1 x ...): B x M."""
    hard = (logits > 0).float()
    inter = (hard * target).flatten(2).sum(2)
    union = ((hard + target) > 0).float().flatten(2).sum(2)
    return inter / union.clamp_min(1.0)


def autocast_dtype(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype to use, or None for fp32.

    "auto" turns bf16 on only on CUDA devices that support it: on CPUs without native bf16
    (AVX-512-BF16/AMX) bf16 autocast was measured several times slower than fp32 here.
    """
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def lr_factor(step: int, cfg: InteractiveConfig) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then constant or cosine to ``min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class InteractiveStep(nn.Module):
    """The click-simulation loop of one training step as a module, so DDP can wrap it.

    ``forward(images, targets, rng)`` with images B x 1 x S^3 (normalised) and targets
    B x 1 x S^3 in {0, 1} returns the loss and a dict of floats (mean low-res Dice after the
    first and the last click, the number of gradient iterations).
    """

    def __init__(self, model: Sam3D, cfg: InteractiveConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.loss_fn = segmentation_loss(cfg.loss, cfg.pos_weight, cfg.balance_cap)

    def _mode(self, rng: np.random.Generator) -> str:
        return click_mode(rng, self.cfg.p_interior)

    def _mask_loss(self, low: torch.Tensor, loss_target: torch.Tensor) -> torch.Tensor:
        """The segmentation loss of B x 1 x 32^3 logits on the loss grid (upsampled to it for "full")."""
        if self.cfg.loss_grid == "full":
            low = F.interpolate(low, size=loss_target.shape[-3:], mode="trilinear", align_corners=False)
        return self.loss_fn(low, loss_target)

    def size_class(self, targets: torch.Tensor) -> torch.Tensor:
        """The candidate (1 small, 2 medium, 3 large) each target of B x 1 x S^3 trains: B indices."""
        fraction = targets.flatten(1).mean(1)
        bins = torch.tensor(self.cfg.multimask_bins, dtype=fraction.dtype, device=fraction.device)
        return 1 + torch.bucketize(fraction, bins)

    def _first_multimask(
        self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor, previous: torch.Tensor,
        loss_target: torch.Tensor, binary_low: torch.Tensor, classes: torch.Tensor, dtype: Optional[torch.dtype],
        best: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The first decode with the candidate masks trained (see the module docstring).

        Arguments:
          classes: B candidate indices, from :meth:`size_class`.
          best: B booleans: feed back the candidate with the highest actual IoU instead of the pick.

        Returns:
          the loss (single-mask loss + each sample's size-class candidate loss + the IoU head's
          MSE over all 4 outputs, weighted) and the fed-back logits B x 1 x 32^3: the candidate
          with the highest predicted IoU, as the Session picks it (where ``best``: the one that fits).
        """
        model, cfg = self.model, self.cfg
        with torch.autocast(embedding.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=previous)
            low, iou = model.mask_decoder.predict_masks(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense)
        low, iou = low.float(), iou.float()
        candidate = low[torch.arange(low.shape[0], device=low.device), classes].unsqueeze(1)
        with torch.no_grad():
            actual_iou = _hard_iou(low, binary_low)
        loss = (
            self._mask_loss(low[:, :1], loss_target)
            + self._mask_loss(candidate, loss_target)
            + cfg.iou_weight * F.mse_loss(iou, actual_iou)
        )
        chosen, _ = select_by_iou(low[:, 1:], torch.where(best[:, None], actual_iou[:, 1:], iou[:, 1:]))
        return loss, chosen

    def forward(self, images: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
        cfg, model = self.cfg, self.model
        dtype = autocast_dtype(cfg.autocast, images.device)
        batch = images.shape[0]
        soft_low, binary_low, low_np, full_np = low_res_targets(targets, model.low_res_size[0])
        loss_target = soft_low if cfg.loss_grid == "low" else targets

        with torch.autocast(images.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            if cfg.freeze_encoder:
                with torch.no_grad():
                    embedding = model.image_encoder(images)
            else:
                embedding = model.image_encoder(images)

        empty_low = np.zeros_like(low_np[0])
        clicks: List[List[Tuple[Tuple[int, int, int], bool]]] = []
        for b in range(batch):
            click = next_click_lowres(empty_low, low_np[b], full_np[b], rng, self._mode(rng))
            clicks.append([click] if click is not None else [((64, 64, 64), True)])

        if cfg.grad_iters is None or cfg.grad_iters >= cfg.click_iters:
            grad_set = set(range(cfg.click_iters))
        else:
            others = rng.choice(np.arange(1, cfg.click_iters), size=cfg.grad_iters - 1, replace=False)
            grad_set = {0, *map(int, others)}

        total = images.new_zeros(())
        terms = 0
        grad_iterations = 0
        previous = images.new_zeros((batch, 1, *model.low_res_size))
        dices: List[float] = []
        for it in range(cfg.click_iters):
            chosen = [c if cfg.prompt_mode == "all" else c[-1:] for c in clicks]
            coords = torch.tensor([[list(c[0]) for c in row] for row in chosen], dtype=torch.float32, device=images.device)
            labels = torch.tensor([[float(c[1]) for c in row] for row in chosen], dtype=torch.float32, device=images.device)
            with_grad = it in grad_set and torch.is_grad_enabled()
            if it == 0 and cfg.multimask:
                classes = self.size_class(targets)
                # No draw unless asked for: seeded runs of the other recipes keep their random sequence.
                best = rng.random(batch) < cfg.best_feedback if cfg.best_feedback else np.zeros(batch, dtype=bool)
                best = torch.from_numpy(best).to(images.device)
                with torch.set_grad_enabled(with_grad):
                    loss, low = self._first_multimask(embedding, coords, labels, previous, loss_target, binary_low, classes, dtype, best)
                if with_grad:
                    total = total + loss
                    terms += 2  # mask 0 and the candidate
                    grad_iterations += 1
                previous = low.detach()
            else:
                with torch.set_grad_enabled(with_grad), torch.autocast(
                    images.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
                ):
                    low, iou = model.decode(embedding, coords, labels, previous)
                low = low.float()
                if with_grad:
                    with torch.no_grad():
                        actual_iou = _hard_iou(low, binary_low)[:, 0]
                    total = total + self._mask_loss(low, loss_target) + cfg.iou_weight * F.mse_loss(iou[:, 0].float(), actual_iou)
                    terms += 1
                    grad_iterations += 1
                previous = low.detach()
            pred_np = (previous[:, 0] > 0).cpu().numpy()
            inter_np = (pred_np & low_np).reshape(batch, -1).sum(1)
            denominator = pred_np.reshape(batch, -1).sum(1) + low_np.reshape(batch, -1).sum(1)
            dices.append(float(np.mean(2.0 * inter_np / np.maximum(denominator, 1))))
            if it == cfg.click_iters - 1:
                break
            for b in range(batch):
                click = next_click_lowres(pred_np[b], low_np[b], full_np[b], rng, self._mode(rng))
                if click is None:  # perfect on the coarse grid: confirm with another click inside
                    inside = np.flatnonzero(full_np[b])
                    index = np.unravel_index(int(inside[rng.integers(inside.size)]), full_np[b].shape)
                    click = (tuple(int(i) for i in index), True)
                clicks[b].append(tuple(click))
        loss = total / max(terms, 1)
        return loss, {"dice_first": dices[0], "dice_last": dices[-1], "grad_iters": float(grad_iterations)}


def sample_batch(
    pool_dir: Path, entries: Sequence[Dict], batch_size: int, rng: np.random.Generator, flip: bool = True
) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """``batch_size`` random pool crops (random flips), as tensors B x 1 x S^3 (image float32, target 0/1 float32)."""
    from .pool import load_entry

    images, targets, names = [], [], []
    for _ in range(batch_size):
        entry = entries[int(rng.integers(len(entries)))]
        image, label = load_entry(pool_dir, entry)
        axes = tuple(a for a in range(3) if flip and rng.random() < 0.5)
        image = np.flip(image, axes) if axes else image
        label = np.flip(label, axes) if axes else label
        images.append(np.asarray(image, dtype=np.float32))
        targets.append(np.asarray(label, dtype=np.float32))
        names.append(str(entry.get("structure", "?")))
    return torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(targets)[:, None]), names


def usable_entries(pool_dir: Path, heldout: bool) -> List[Dict]:
    """Pool entries for training; with ``heldout`` the held-out Colin27 structures are left out."""
    from ..data.colin27 import HELDOUT_STRUCTURES
    from .pool import read_index

    entries = read_index(pool_dir)
    if heldout:
        entries = [e for e in entries if not (e.get("source") == "colin27" and e.get("structure") in HELDOUT_STRUCTURES)]
    return entries


def _checkpoint_payload(model: Sam3D, optimizer: torch.optim.Optimizer, step: int, cfg: InteractiveConfig, elapsed: float) -> Dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "elapsed_s": float(elapsed),
        "config": json.dumps(dataclasses.asdict(cfg)),
        "model_config": json.dumps({k: v for k, v in model.config.items() if k not in ("source", "sha256")}),
    }


def save_checkpoint(path: Path, payload: Dict[str, Any]) -> None:
    """Atomically ``torch.save`` a checkpoint payload (tensors, numbers, strings only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """A training checkpoint, read safely (``weights_only=True``)."""
    return torch.load(str(path), map_location="cpu", weights_only=True)


def model_from_checkpoint(payload: Dict[str, Any]) -> Sam3D:
    """The model stored in a training checkpoint (fp32, eval mode)."""
    config = json.loads(payload["model_config"])
    model = build_model({k: v for k, v in config.items() if k != "name"})
    model.config["name"] = config.get("name", "custom")
    model.load_state_dict(payload["model"])
    return model


def _parameter_groups(model: Sam3D, parameters: List[nn.Parameter], cfg: InteractiveConfig) -> List[Dict[str, Any]]:
    """AdamW groups: the image encoder, the prompt encoder and decoder, the IoU head (last, in parameter order)."""
    encoder_ids = {id(p) for p in model.image_encoder.parameters()}
    iou_ids = {id(p) for p in model.mask_decoder.iou_prediction_head.parameters()}
    groups = [
        {"params": [p for p in parameters if id(p) in encoder_ids], "lr_mult": 1.0},
        {"params": [p for p in parameters if id(p) not in encoder_ids | iou_ids], "lr_mult": cfg.decoder_lr_mult},
        {"params": [p for p in parameters if id(p) in iou_ids], "lr_mult": cfg.decoder_lr_mult * cfg.iou_head_lr_mult},
    ]
    return [g for g in groups if g["params"]]


def _trained_parameters(model: Sam3D, freeze_encoder: bool) -> List[nn.Parameter]:
    """The parameters a run with ``freeze_encoder`` trains, in the model's order."""
    frozen = {id(p) for p in model.image_encoder.parameters()} if freeze_encoder else set()
    return [p for p in model.parameters() if id(p) not in frozen]


def resumed_optimizer_state(
    saved: Dict[str, Any], saved_freeze_encoder: bool, model: Sam3D, optimizer: torch.optim.Optimizer
) -> Dict[str, Any]:
    """A saved optimizer state rewritten for ``optimizer``'s parameters and groups (to ``load_state_dict``).

    The state is keyed by position: the saved run numbered the parameters it trained (all, or all
    but the image encoder's with ``saved_freeze_encoder``) group after group. Its groups, those of
    :func:`_parameter_groups` or an older split with the IoU head inside the decoder group, both
    list them in the model's order (the IoU head's come last). So each parameter's moments follow
    it by name into this run's groups; a parameter this run trains for the first time (the encoder
    after a frozen-encoder run) starts without moments, and the group settings are this run's.

    Raises:
      CheckpointError: the saved state does not fit the model (another parameter count or shape).
    """
    names = {id(p): name for name, p in model.named_parameters()}
    saved_params = _trained_parameters(model, saved_freeze_encoder)
    saved_ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(saved_ids) != len(saved_params):
        raise CheckpointError(f"the checkpoint's optimizer state holds {len(saved_ids)} parameters; "
                              f"the model trains {len(saved_params)} with freeze_encoder={saved_freeze_encoder}")
    by_name = {names[id(p)]: saved["state"][i] for i, p in zip(saved_ids, saved_params) if i in saved["state"]}
    state = optimizer.state_dict()
    current = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in zip((i for group in state["param_groups"] for i in group["params"]), current):
        moments = by_name.get(names[id(param)])
        if moments is None:
            continue
        if moments["exp_avg"].shape != param.shape:
            raise CheckpointError(f"the checkpoint's optimizer state of {names[id(param)]} has shape "
                                  f"{tuple(moments['exp_avg'].shape)}, the parameter {tuple(param.shape)}")
        state["state"][index] = moments
    return state


def architecture_name(model: Sam3D) -> Optional[str]:
    """The ``build.CONFIGS`` name of the model's architecture (its own name if that fits), or None for another one."""
    names = [model.config.get("name"), *CONFIGS]
    return next((n for n in names if n in CONFIGS and not architecture_differences(model.config, model_config(n))), None)


def _initial_model(cfg: InteractiveConfig) -> Sam3D:
    if cfg.init:
        from ..checkpoint import load_model

        model = load_model(cfg.init, device="cpu")
        check_model_option(cfg.model, model.config, f"--init {cfg.init} is", "leave --model out to train the architecture of --init")
        logger.info("initialised from %s", cfg.init)
        model.config.pop("source", None)
        model.config.pop("sha256", None)
        return model
    torch.manual_seed(cfg.seed)  # the same fresh weights on every rank and every rerun
    return build_model(cfg.model or DEFAULT_MODEL)


def _plot(history: List[Dict], evals: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(steps, [h["loss"] for h in history], lw=0.8)
    axes[0].set(xlabel="step", ylabel="loss (mean over log interval)", title="training loss")
    axes[1].plot(steps, [h["dice_first"] for h in history], lw=0.8, label="train Dice@1 (32³)")
    axes[1].plot(steps, [h["dice_last"] for h in history], lw=0.8, label="train Dice@last (32³)")
    for key, style in (("seen", "o-"), ("heldout", "s-")):
        points = [(e["step"], e["summary"][key]["dice@5"]) for e in evals if key in e.get("summary", {}) and "dice@5" in e["summary"][key]]
        if points:
            axes[1].plot(*zip(*points), style, label=f"Colin27 {key} Dice@5")
    axes[1].set(xlabel="step", ylabel="Dice", ylim=(0, 1), title="Dice")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_quick_eval(model: Sam3D, step: int, clicks: int, heldout: bool) -> Dict[str, Any]:
    """Colin27 Dice per click on a few seen and the held-out structures (see :mod:`.quick_eval`)."""
    from ..data.colin27 import HELDOUT_STRUCTURES
    from .quick_eval import SEEN_EVAL, evaluate_colin27, summarize

    started = time.time()
    names = list(SEEN_EVAL) + list(HELDOUT_STRUCTURES)
    results = evaluate_colin27(model, names, clicks=clicks)
    groups = {"seen": SEEN_EVAL, "heldout" if heldout else "trained_heldout_set": HELDOUT_STRUCTURES}
    summary = summarize(results, groups)
    logger.info("step %d eval (%.0f s): %s", step, time.time() - started, json.dumps(summary))
    return {"step": step, "results": results, "summary": summary, "seconds": time.time() - started}


def train_interactive(cfg: InteractiveConfig) -> Dict[str, Any]:
    """Run (or resume) interactive training.

    Returns:
      {"step", "model"} on every rank, plus "history" and "evals" on rank 0.
    """
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = ddp.setup(cfg.device)
    run_dir, pool_dir = Path(cfg.run_dir), Path(cfg.pool_dir)
    last = run_dir / "checkpoints" / "last.pt"
    payload = load_checkpoint(last) if last.exists() else None
    recorded: Dict[str, Any] = json.loads(payload.get("config", "{}")) if payload is not None else {}
    if payload is not None:  # settings the checkpoint decides, checked before any work
        check_model_option(cfg.model, json.loads(payload["model_config"]), f"the run's checkpoint {last} holds",
                           "to train another architecture, start a new run (another --run-dir)")
        if cfg.init and cfg.init != recorded.get("init"):
            logger.warning("--init %s ignored: %s resumes from its checkpoint (the run started from %s); --init only starts a new run",
                           cfg.init, run_dir, recorded.get("init") or "a fresh model")
        cfg = dataclasses.replace(cfg, init=recorded.get("init"))

    live: Optional[LiveCrops] = None
    if cfg.live:
        live = LiveCrops(cfg.live, info.device, heldout=cfg.heldout, weights=cfg.live_weights)
        source = f"live crops of {len(live.structures)} structures from {cfg.live}"
    else:
        from .pool import PoolSpec, build_pool, empty_pool_error, read_index, read_spec

        if info.is_main and cfg.pool_size and len(read_index(pool_dir)) < cfg.pool_size:
            from ..data.colin27 import STRUCTURES, TRAIN_STRUCTURES

            # A pool is extended as it was built (build_pool refuses another recipe).
            spec = read_spec(pool_dir) or PoolSpec(structures=tuple(TRAIN_STRUCTURES if cfg.heldout else STRUCTURES), seed=cfg.seed)
            build_pool(pool_dir, dataclasses.replace(spec, size=cfg.pool_size))
        ddp.barrier()
        entries = usable_entries(pool_dir, cfg.heldout)
        if not entries:
            raise empty_pool_error(pool_dir)
        source = f"{len(entries)} pool entries"

    if payload is not None:
        model = model_from_checkpoint(payload)
        start_step, elapsed_before = int(payload["step"]), float(payload.get("elapsed_s", 0.0))
        logger.info("resuming %s at step %d", last, start_step)
    else:
        model = _initial_model(cfg)
        start_step, elapsed_before = 0, 0.0
    cfg = dataclasses.replace(cfg, model=architecture_name(model))  # what is recorded: the architecture trained
    if cfg.multimask and model.mask_decoder.num_mask_tokens != 4:
        raise FastSAM3DInputError(f"multimask training needs 3 multimask outputs; this decoder has {model.mask_decoder.num_mask_tokens - 1}")
    if not cfg.multimask and model.config.get("first_click_multimask"):
        raise FastSAM3DInputError(
            "this model answers a first click with its candidate masks (config first_click_multimask); "
            "train it with --multimask (and --iou-weight > 0), or the candidates go stale while the decoder moves"
        )
    if cfg.multimask and not model.config.get("first_click_multimask"):
        seed_multimask_tokens(model)
        logger.info("multimask outputs started from copies of the single-mask output")
    model = model.to(info.device).train()
    if cfg.freeze_encoder:
        model.image_encoder.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_parameter_groups(model, parameters, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if payload is not None:
        saved_freeze = bool(recorded.get("freeze_encoder", False))
        if saved_freeze != cfg.freeze_encoder:
            logger.info("the run trained %s; now %s: moments of the parameters trained before are kept",
                        *(("the decoder only" if frozen else "the whole model") for frozen in (saved_freeze, cfg.freeze_encoder)))
        optimizer.load_state_dict(resumed_optimizer_state(payload["optimizer"], saved_freeze, model, optimizer))
    step_module: nn.Module = InteractiveStep(model, cfg)
    if info.distributed:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[info.device.index] if info.device.type == "cuda" else None, find_unused_parameters=True
        )

    metrics_path = run_dir / "metrics.json"
    history: List[Dict] = []
    evals: List[Dict] = []
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if metrics_path.exists() and payload is not None:
            previous = json.loads(metrics_path.read_text())
            history = [h for h in previous.get("history", []) if h["step"] <= start_step]
            evals = [e for e in previous.get("evals", []) if e["step"] <= start_step]
        logger.info(
            "model %s: %.1f M parameters; %s; %d rank(s) on %s; autocast %s",
            model.config.get("name"), count_parameters(model) / 1e6, source, info.world_size, info.device,
            autocast_dtype(cfg.autocast, info.device),
        )

    def write_outputs(step: int, elapsed: float) -> None:
        save_checkpoint(last, _checkpoint_payload(model, optimizer, step, cfg, elapsed))
        summary = {
            "config": dataclasses.asdict(cfg),
            "model_config": {k: v for k, v in model.config.items() if k not in ("source", "sha256")},
            "step": step,
            "elapsed_s": elapsed,
            "world_size": info.world_size,
            "history": history,
            "evals": evals,
        }
        tmp = metrics_path.with_name(".metrics.json.tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, metrics_path)
        _plot(history, evals, run_dir / "curves.png")

    started = time.time()
    last_save = started
    window: Dict[str, List[float]] = {"loss": [], "dice_first": [], "dice_last": [], "seconds": []}
    step = start_step
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", disable=not info.is_main)
    phantoms: Optional[PhantomFeed] = None
    if cfg.live_phantoms and step < cfg.steps:
        # The machine's cores less two, shared by the ranks on it.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = cfg.phantom_workers or max(1, (cores - 2) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        phantoms = PhantomFeed(workers, info.device, seed=(cfg.seed, info.rank, step))  # resumed: new phantoms
        logger.info("phantom crops from %d worker processes, %.0f %% of each batch on average", workers, 100 * cfg.live_phantoms)
    with StopSignals() as stop_signals:  # Ctrl-C, SIGTERM: stop after the step under way, with its checkpoint
        try:
            while step < cfg.steps:
                t0 = time.time()
                rng = np.random.default_rng((cfg.seed, info.rank, step))
                torch.manual_seed((cfg.seed * 1_000_003 + info.rank * 7_919 + step) % (2**63))
                if live is not None:
                    from_phantoms = int(rng.binomial(cfg.batch_size, cfg.live_phantoms)) if phantoms is not None else 0
                    parts = [source.sample(n, rng) for source, n in ((live, cfg.batch_size - from_phantoms), (phantoms, from_phantoms)) if n]
                    images, targets = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
                else:
                    images, targets, _ = sample_batch(pool_dir, entries, cfg.batch_size, rng)
                    images, targets = images.to(info.device, non_blocking=True), targets.to(info.device, non_blocking=True)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * group.get("lr_mult", 1.0) * lr_factor(step, cfg)
                loss, stats = step_module(images, targets, rng)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
                optimizer.step()
                step += 1
                window["loss"].append(float(loss.detach()))
                window["dice_first"].append(stats["dice_first"])
                window["dice_last"].append(stats["dice_last"])
                window["seconds"].append(time.time() - t0)
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    record = {"step": step, "lr": optimizer.param_groups[0]["lr"], "time_s": elapsed_before + time.time() - started}
                    record.update({k: ddp.all_reduce_mean(float(np.mean(v)), info) for k, v in window.items()})
                    if info.is_main:
                        history.append(record)
                        bar.set_postfix(loss=f"{record['loss']:.3f}", d1=f"{record['dice_first']:.2f}", dN=f"{record['dice_last']:.2f}", s=f"{record['seconds']:.2f}")
                        logger.info("step %d loss %.4f dice@1 %.3f dice@last %.3f %.2f s/step", step, record["loss"], record["dice_first"], record["dice_last"], record["seconds"])
                    window = {k: [] for k in window}
                if info.is_main and cfg.eval_every and step % cfg.eval_every == 0:
                    evals.append(run_quick_eval(model, step, cfg.eval_clicks, cfg.heldout))
                    save_checkpoint(run_dir / "checkpoints" / f"step_{step:06d}.pt", {"model": model.state_dict(), "step": step, "model_config": _checkpoint_payload(model, optimizer, step, cfg, 0.0)["model_config"]})
                now = time.time()
                out_of_time = bool(cfg.max_minutes) and now - started > cfg.max_minutes * 60
                # Rank 0's answers, so that every rank stops after the same step and none waits for one that has gone.
                stop, signum = ddp.broadcast_ints([out_of_time, stop_signals.signum or 0], info)
                if info.is_main and (now - last_save > cfg.checkpoint_minutes * 60 or stop or signum):
                    write_outputs(step, elapsed_before + now - started)
                    last_save = time.time()
                if signum:
                    if info.is_main:
                        logger.warning("stopped by a signal after step %d; %s holds it: rerun the command to resume", step, last)
                    raise stop_exception(signum)
                if stop:
                    logger.info("stopping at step %d: max_minutes reached", step)
                    break
        finally:
            bar.close()
            if phantoms is not None:
                phantoms.close()
                logger.info("phantom crops: %d made, %d drawn", phantoms.received, phantoms.drawn)
    if info.is_main:
        write_outputs(step, elapsed_before + time.time() - started)
    ddp.barrier()
    ddp.cleanup()
    result: Dict[str, Any] = {"step": step, "model": model}
    if info.is_main:
        result.update(history=history, evals=evals)
    return result
