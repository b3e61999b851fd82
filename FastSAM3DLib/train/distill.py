"""Layer-wise progressive distillation (``fastsam3d train distill --teacher PATH``), DESIGN.md §5.

The teacher's image encoder is frozen. Student block ``i`` (1-based) learns to reproduce teacher
block ``i * T / S`` (``2i`` for the 6-block student of a 12-block teacher) on the same crops, with an
MSE on the B x 8 x 8 x 8 x C token grids; then the neck outputs. Layers are added progressively: the
``distill_steps`` are split into S + 1 stages, stage ``k`` matching blocks 1..k (the last stage adds
the neck). When student and teacher widths differ, a learned linear projection maps the student's
tokens to the teacher's width (training-only; it is not part of the exported model).

If the teacher file is a full model with the student's prompt width, its prompt encoder and mask
decoder initialise the student's (as the public FastSAM3D did). The second phase is the decoder
fine-tune: :func:`FastSAM3DLib.train.interactive.train_interactive` with the encoder frozen,
``finetune_steps`` steps, in ``<run_dir>/finetune``. Both phases resume from their checkpoints and
run under ``torchrun`` (DDP); ``max_minutes`` is the wall time of both together, and Ctrl-C or SIGTERM
stops either after its step under way, with a checkpoint (:mod:`.signals`). A run directory keeps
its distillation: a rerun with another teacher (by content) or other ``DISTILL_SETTINGS`` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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

from ..build import build_model
from ..errors import FastSAM3DInputError
from ..modeling import ImageEncoderViT3D, Sam3D
from . import ddp
from .interactive import (DEFAULT_MODEL, DEFAULT_RUNS, InteractiveConfig, autocast_dtype, check_model_option, load_checkpoint,
                          model_from_checkpoint, sample_batch, save_checkpoint, train_interactive, usable_entries)
from .signals import StopSignals, stop_exception

logger = logging.getLogger(__name__)

# What makes the distilled encoder (with the teacher's content): a run directory keeps them.
DISTILL_SETTINGS = ("distill_steps", "distill_lr", "accumulate")


@dataclass
class DistillConfig(InteractiveConfig):
    """:class:`InteractiveConfig` (used by the fine-tune phase) plus the distillation phase.

    Attributes:
      teacher: teacher checkpoint (full or encoder-only; anything ``load_image_encoder`` reads).
      distill_steps: optimizer steps of the encoder distillation, over all stages.
      distill_lr: AdamW learning rate of the distillation (public: 8e-4 with weight decay 0.1).
      accumulate: gradient-accumulation micro-steps per optimizer step (public: 10).
      finetune_steps: decoder fine-tune steps with the encoder frozen (0: skip).
    """

    run_dir: str = str(DEFAULT_RUNS / "distill")
    teacher: str = ""
    distill_steps: int = 2000
    distill_lr: float = 8e-4
    accumulate: int = 1
    finetune_steps: int = 1000

    def validate(self) -> None:
        """Raise FastSAM3DInputError (a ValueError) on inconsistent settings."""
        super().validate()
        if not self.teacher:
            raise FastSAM3DInputError("distillation needs --teacher PATH")
        if self.live:
            raise FastSAM3DInputError("distillation reads a crop pool (--pool); --live is for `train interactive`")
        if self.distill_steps < 0 or self.finetune_steps < 0 or self.accumulate < 1:
            raise FastSAM3DInputError("distill_steps and finetune_steps must be at least 0, accumulate at least 1")


def layer_pairs(student_depth: int, teacher_depth: int) -> List[Tuple[int, int]]:
    """0-based (student block, teacher block) pairs: student block i+1 <-> teacher block (i+1)*T/S."""
    if student_depth < 1 or teacher_depth < student_depth:
        raise FastSAM3DInputError(f"the teacher needs at least as many blocks as the student: student {student_depth}, teacher {teacher_depth}")
    return [(i, (i + 1) * teacher_depth // student_depth - 1) for i in range(student_depth)]


def active_layers(step: int, total_steps: int, student_depth: int) -> Tuple[int, bool]:
    """(number of student blocks matched, whether the neck is matched) at ``step`` of the progressive schedule."""
    stages = student_depth + 1
    stage = min(stages - 1, step * stages // max(total_steps, 1))
    return min(stage + 1, student_depth), stage == stages - 1


class DistillLoss(nn.Module):
    """Student encoder + width projections; ``forward(x, teacher_blocks, teacher_neck, n, neck)`` -> MSE loss.

    Arguments of forward:
      x: B x 1 x 128^3 crops.
      teacher_blocks: the teacher's block outputs (B x 8 x 8 x 8 x C_t each), all of them.
      teacher_neck: B x C x 8 x 8 x 8.
      n: how many student blocks are matched; neck: whether the neck is.
    """

    def __init__(self, student: ImageEncoderViT3D, teacher: ImageEncoderViT3D) -> None:
        super().__init__()
        self.student = student
        self.pairs = layer_pairs(len(student.blocks), len(teacher.blocks))
        s_width, t_width = student.pos_embed.shape[-1], teacher.pos_embed.shape[-1]
        self.block_proj = nn.ModuleList(nn.Linear(s_width, t_width) if s_width != t_width else nn.Identity() for _ in self.pairs)
        s_out, t_out = student.neck[0].out_channels, teacher.neck[0].out_channels
        self.neck_proj = nn.Conv3d(s_out, t_out, 1) if s_out != t_out else nn.Identity()

    def forward(
        self, x: torch.Tensor, teacher_blocks: Sequence[torch.Tensor], teacher_neck: torch.Tensor, n: int, neck: bool
    ) -> torch.Tensor:
        out, blocks = self.student.forward_with_intermediates(x)
        losses = [F.mse_loss(self.block_proj[i](blocks[s].float()), teacher_blocks[t].float()) for i, (s, t) in enumerate(self.pairs[:n])]
        if neck:
            losses.append(F.mse_loss(self.neck_proj(out.float()), teacher_neck.float()))
        # Every parameter takes part in every step (zero-weighted when inactive) so DDP's buckets stay fixed.
        unused = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        return torch.stack(losses).mean() + unused


def _student_and_teacher(cfg: DistillConfig, device: torch.device, payload: Optional[Dict[str, Any]] = None) -> Tuple[Sam3D, ImageEncoderViT3D]:
    """The teacher's encoder, and the student: that of ``payload`` (a distillation checkpoint) to resume,
    else a new one (from ``init``, or ``model`` with the teacher's prompt encoder and decoder when they fit)."""
    from ..checkpoint import load_image_encoder, load_model
    from ..errors import CheckpointError

    teacher = load_image_encoder(cfg.teacher, device="cpu").to(device).eval().requires_grad_(False)
    if payload is not None:
        return model_from_checkpoint(payload).to(device), teacher
    if cfg.init:
        student = load_model(cfg.init, device="cpu")
        check_model_option(cfg.model, student.config, f"--init {cfg.init} is", "leave --model out to distil the architecture of --init")
        student.config.pop("source", None)
        student.config.pop("sha256", None)
    else:
        student = build_model(cfg.model or DEFAULT_MODEL)
        try:
            full = load_model(cfg.teacher, device="cpu")
        except CheckpointError:
            full = None
        if full is not None and full.config.get("prompt_dim") == student.config.get("prompt_dim"):
            for part in ("prompt_encoder", "mask_decoder"):
                try:
                    getattr(student, part).load_state_dict(getattr(full, part).state_dict())
                    logger.info("student %s initialised from the teacher", part)
                except RuntimeError as error:  # different decoder sizes: keep the random init
                    logger.info("teacher %s not reusable (%s)", part, str(error).splitlines()[0])
    return student.to(device), teacher


def _check_same_distillation(cfg: DistillConfig, payload: Dict[str, Any], path: Path, teacher_sha256: Optional[str]) -> None:
    """Refuse to continue or reuse the distillation in ``path`` with another teacher or other settings.

    The teachers are compared by content where both sha256 are known (a teacher may move), else by path.
    """
    recorded = json.loads(payload.get("config", "{}"))
    differences = []
    recorded_sha256 = payload.get("teacher_sha256")
    if recorded_sha256 and teacher_sha256:
        if recorded_sha256 != teacher_sha256:
            differences.append(f"--teacher {recorded.get('teacher')} (sha256 {recorded_sha256[:12]}...) there, "
                               f"{cfg.teacher} (sha256 {teacher_sha256[:12]}...) asked")
    elif recorded.get("teacher") != cfg.teacher:
        differences.append(f"--teacher {recorded.get('teacher')} there, {cfg.teacher} asked")
    for name in DISTILL_SETTINGS:
        if name in recorded and recorded[name] != getattr(cfg, name):
            differences.append(f"--{name.replace('_', '-')} {recorded[name]} there, {getattr(cfg, name)} asked")
    if cfg.init and cfg.init != recorded.get("init"):
        differences.append(f"--init {recorded.get('init')} there, {cfg.init} asked")
    if differences:
        raise FastSAM3DInputError(f"{path} holds another distillation ({'; '.join(differences)}): to distil with these settings, "
                                  "use another --run-dir (or rerun with the ones it was made with)")
    check_model_option(cfg.model, json.loads(payload["model_config"]), f"{path} holds",
                       "to distil another architecture, use another --run-dir")


def distill_encoder(cfg: DistillConfig) -> Optional[Path]:
    """Phase 1: progressive layer-wise distillation.

    Returns:
      the student checkpoint (``distilled.pt``), or None where ``max_minutes`` stopped it first (a
      rerun continues it).

    Raises:
      FastSAM3DInputError: bad settings, an empty pool, or a run directory that holds a distillation
        with another teacher or other ``DISTILL_SETTINGS`` (:func:`_check_same_distillation`).
      KeyboardInterrupt, SystemExit(143): Ctrl-C or SIGTERM, after writing the last step's checkpoint.
    """
    from ..checkpoint import sha256_file

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    info = ddp.setup(cfg.device)
    run_dir, pool_dir = Path(cfg.run_dir), Path(cfg.pool_dir)
    ckpt_dir = run_dir / "checkpoints"
    last, done_path = ckpt_dir / "distill_last.pt", ckpt_dir / "distilled.pt"
    teacher_sha256 = sha256_file(cfg.teacher) if Path(cfg.teacher).is_file() else None  # a finished distillation needs no teacher
    if done_path.exists():
        _check_same_distillation(cfg, load_checkpoint(done_path), done_path, teacher_sha256)
        logger.info("distillation already finished: %s", done_path)
        return done_path
    payload = load_checkpoint(last) if last.exists() else None
    if payload is not None:
        _check_same_distillation(cfg, payload, last, teacher_sha256)
    entries = usable_entries(pool_dir, cfg.heldout)
    if not entries:
        from .pool import empty_pool_error

        raise empty_pool_error(pool_dir)
    student, teacher = _student_and_teacher(cfg, info.device, payload)
    loss_module = DistillLoss(student.image_encoder, teacher).to(info.device).train()
    optimizer = torch.optim.AdamW(loss_module.parameters(), lr=cfg.distill_lr, weight_decay=cfg.weight_decay)
    step = 0
    history: List[Dict[str, Any]] = []
    if payload is not None:
        loss_module.load_state_dict(payload["loss_module"])
        optimizer.load_state_dict(payload["optimizer"])
        step = int(payload["step"])
        history = json.loads(payload.get("history", "[]"))
        logger.info("resuming distillation at step %d", step)
    wrapped: nn.Module = loss_module
    if info.distributed:
        wrapped = nn.parallel.DistributedDataParallel(loss_module, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    dtype = autocast_dtype(cfg.autocast, info.device)
    depth = len(student.image_encoder.blocks)

    def save(final: bool) -> None:
        model_config = json.dumps({k: v for k, v in student.config.items() if k not in ("source", "sha256")})
        recorded = json.dumps({**dataclasses.asdict(cfg), "model": cfg.model or student.config.get("name")})
        payload = {"model": student.state_dict(), "loss_module": loss_module.state_dict(), "optimizer": optimizer.state_dict(),
                   "step": step, "history": json.dumps(history), "config": recorded, "model_config": model_config,
                   "teacher_sha256": teacher_sha256}
        save_checkpoint(last, payload)
        if final:
            save_checkpoint(done_path, {"model": student.state_dict(), "step": step, "model_config": model_config, "config": recorded,
                                        "teacher_sha256": teacher_sha256})
        (run_dir / "distill_metrics.json").write_text(json.dumps({"step": step, "history": history}, indent=1))

    last_save = time.time()
    bar = tqdm(total=cfg.distill_steps, initial=step, desc="distill", unit="step", disable=not info.is_main)
    with StopSignals() as stop_signals:  # Ctrl-C, SIGTERM: stop after the step under way, with its checkpoint
        try:
            while step < cfg.distill_steps:
                n, neck = active_layers(step, cfg.distill_steps, depth)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.distill_lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for micro in range(cfg.accumulate):
                    rng = np.random.default_rng((cfg.seed, info.rank, step, micro))
                    images, _, _ = sample_batch(pool_dir, entries, cfg.batch_size, rng)
                    images = images.to(info.device)
                    with torch.no_grad(), torch.autocast(info.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                        teacher_neck, teacher_blocks = teacher.forward_with_intermediates(images)
                    with torch.autocast(info.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                        loss = wrapped(images, teacher_blocks, teacher_neck, n, neck) / cfg.accumulate
                    loss.backward()
                    total += float(loss.detach())
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(loss_module.parameters(), cfg.grad_clip)
                optimizer.step()
                step += 1
                bar.update(1)
                total = ddp.all_reduce_mean(total, info)
                if info.is_main:
                    history.append({"step": step, "loss": total, "layers": n, "neck": neck})
                    bar.set_postfix(loss=f"{total:.4f}", layers=n)
                    if step % cfg.log_every == 0 or step == cfg.distill_steps:
                        logger.info("distill step %d loss %.5f (%d blocks%s)", step, total, n, " + neck" if neck else "")
                out_of_time = bool(cfg.max_minutes) and time.time() - started > cfg.max_minutes * 60
                # Rank 0's answers, so that every rank stops after the same step and none waits for one that has gone.
                stop, signum = ddp.broadcast_ints([out_of_time and step < cfg.distill_steps, stop_signals.signum or 0], info)
                if info.is_main and (time.time() - last_save > cfg.checkpoint_minutes * 60 or stop or signum):
                    save(False)
                    last_save = time.time()
                if signum:
                    if info.is_main:
                        logger.warning("distillation stopped by a signal after step %d; %s holds it: rerun the command to resume", step, last)
                    raise stop_exception(signum)
                if stop:
                    logger.info("distillation stopped at step %d of %d: max_minutes reached; rerun the command to resume",
                                step, cfg.distill_steps)
                    ddp.barrier()
                    return None
        finally:
            bar.close()
    if info.is_main:
        save(True)
    ddp.barrier()
    return done_path


def train_distill(cfg: DistillConfig) -> Dict[str, Any]:
    """Both phases: encoder distillation, then the decoder fine-tune with the encoder frozen, within
    ``max_minutes`` together; returns {"distilled": its path or None if unfinished, "finetune": its result}."""
    started = time.time()
    cfg.validate()
    distilled = distill_encoder(cfg)
    result: Dict[str, Any] = {"distilled": str(distilled) if distilled else None}
    minutes_left = cfg.max_minutes - (time.time() - started) / 60.0
    if distilled is not None and cfg.finetune_steps > 0 and (not cfg.max_minutes or minutes_left > 0):
        init = Path(cfg.run_dir) / "distilled.safetensors"
        if int(os.environ.get("RANK", "0")) == 0 and not init.exists():
            from ..checkpoint import save_model

            save_model(model_from_checkpoint(load_checkpoint(distilled)), init)
        ddp.barrier()
        names = {f.name for f in dataclasses.fields(InteractiveConfig)}
        finetune = InteractiveConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})
        finetune.run_dir = str(Path(cfg.run_dir) / "finetune")
        finetune.init = str(init)
        finetune.steps = cfg.finetune_steps
        finetune.freeze_encoder = True
        finetune.max_minutes = minutes_left if cfg.max_minutes else 0.0
        result["finetune"] = train_interactive(finetune)
    else:
        ddp.cleanup()
    return result
