"""Training pipeline: click simulator, one-sample overfit, exact resume, 2-process DDP, distillation,
model soups and the IoU-head refit; what a run does when stopped by a signal or resumed with other
settings, pools from the user's labelled folders, and the command line's refusals.

Everything runs on the "tiny" configurations and one- or two-crop pools written into temporary folders,
so the whole file takes about two minutes on two CPU cores.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from FastSAM3DLib import load_model, save_model
from FastSAM3DLib.build import build_model
from FastSAM3DLib.checkpoint import read_model_card
from FastSAM3DLib.clicks import Click, dice, next_click, next_click_lowres
from FastSAM3DLib.errors import CheckpointError, FastSAM3DInputError
from FastSAM3DLib.train.cli import main as train_main
from FastSAM3DLib.train.distill import DistillConfig, active_layers, distill_encoder, layer_pairs, train_distill
from FastSAM3DLib.train.export import average_checkpoints
from FastSAM3DLib.train.interactive import (InteractiveConfig, InteractiveStep, _checkpoint_payload, load_checkpoint, low_res_targets,
                                           save_checkpoint, seed_multimask_tokens, train_interactive)
from FastSAM3DLib.train.pool import INDEX_NAME, PoolSpec, _write_entry, build_pool, read_index

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------------------------
# Click simulator


def _random_masks(seed: int, shape=(12, 13, 14)):
    rng = np.random.default_rng(seed)
    gt = ndimage.binary_dilation(rng.random(shape) < 0.01, iterations=2)
    pred = ndimage.binary_dilation(rng.random(shape) < 0.01, iterations=2)
    return pred, gt


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_interior_click_is_the_deepest_error_voxel(seed: int) -> None:
    pred, gt = _random_masks(seed)
    click = next_click(pred, gt, np.random.default_rng(0), "interior")
    fn, fp = gt & ~pred, pred & ~gt
    if not (fn.any() or fp.any()):
        assert click is None
        return
    assert isinstance(click, Click)
    error = fn if click.positive else fp
    assert error[click.index], "the click lies in the error region of its polarity"
    depth = {name: ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1, 1:-1] for name, m in (("fn", fn), ("fp", fp))}
    deepest = max(depth["fn"].max(), depth["fp"].max())
    assert depth["fn" if click.positive else "fp"][click.index] == pytest.approx(deepest)
    assert click.positive == (depth["fn"].max() >= depth["fp"].max())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_random_click_in_error_region_positive_iff_false_negative(seed: int) -> None:
    pred, gt = _random_masks(seed)
    click = next_click(pred, gt, np.random.default_rng(seed), "random")
    if not (pred ^ gt).any():
        assert click is None
        return
    assert (pred ^ gt)[click.index]
    assert click.positive == bool(gt[click.index] and not pred[click.index])
    assert click == next_click(pred, gt, np.random.default_rng(seed), "random"), "deterministic given the generator"


def test_no_error_gives_no_click_and_bad_mode_raises() -> None:
    gt = np.zeros((5, 5, 5), bool)
    gt[2, 2, 2] = True
    assert next_click(gt, gt, np.random.default_rng(0)) is None
    with pytest.raises(ValueError):
        next_click(~gt, gt, np.random.default_rng(0), "nearest")
    assert dice(gt, gt) == 1.0


def test_lowres_click_lands_on_a_voxel_of_its_polarity() -> None:
    rng = np.random.default_rng(3)
    full = np.zeros((32, 32, 32), bool)
    full[8:20, 10:22, 5:17] = True
    low = full.reshape(8, 4, 8, 4, 8, 4).mean(axis=(1, 3, 5)) >= 0.5
    for _ in range(10):
        click = next_click_lowres(np.zeros_like(low), low, full, rng, "random")
        assert click.positive and full[click.index]
        click = next_click_lowres(np.ones_like(low), low, full, rng, "random")
        assert not click.positive and not full[click.index]


# ----------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def one_crop_pool(tmp_path_factory) -> Path:
    """A pool holding one 128^3 crop: a bright ball (radius 24 voxels) on a noisy background."""
    pool = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    grid = np.indices((128, 128, 128)).astype(np.float32)
    label = (((grid - np.array([60, 70, 64], np.float32)[:, None, None, None]) ** 2).sum(0) <= 24**2).astype(np.uint8)
    image = (label * 2.0 + rng.normal(0.0, 0.3, label.shape)).astype(np.float32)
    _write_entry(pool, "000_000000", image, label)
    (pool / INDEX_NAME).write_text(json.dumps({"id": "000_000000", "index": 0, "source": "phantom", "structure": "ball", "voxels": int(label.sum())}) + "\n")
    assert len(read_index(pool)) == 1
    return pool


def _tiny_config(run_dir: Path, pool: Path, **overrides) -> InteractiveConfig:
    base = dict(
        run_dir=str(run_dir), pool_dir=str(pool), model="tiny", steps=4, click_iters=3, lr=1e-3, warmup_steps=2,
        eval_every=0, log_every=1, checkpoint_minutes=1e9, threads=1, device="cpu",
    )
    base.update(overrides)
    return InteractiveConfig(**base)


@pytest.mark.slow
def test_one_sample_overfit_learns_the_mask(tmp_path: Path, one_crop_pool: Path) -> None:
    cfg = _tiny_config(tmp_path / "run", one_crop_pool, steps=40)
    history = train_interactive(cfg)["history"]
    first = np.mean([h["loss"] for h in history[:5]])
    last = np.mean([h["loss"] for h in history[-5:]])
    assert last < 0.6 * first, f"loss fell only from {first:.3f} to {last:.3f}"
    assert np.mean([h["dice_last"] for h in history[-5:]]) > 0.5, "the mask is learned, not the empty collapse"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 40 and (tmp_path / "run" / "curves.png").exists()


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path: Path, one_crop_pool: Path) -> None:
    train_interactive(_tiny_config(tmp_path / "straight", one_crop_pool, steps=4))
    train_interactive(_tiny_config(tmp_path / "resumed", one_crop_pool, steps=2))
    half = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert half["step"] == 2
    train_interactive(_tiny_config(tmp_path / "resumed", one_crop_pool, steps=4))
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert resumed["step"] == straight["step"] == 4
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


@pytest.mark.slow
def test_freeze_encoder_from_the_command_line_trains_only_the_decoder(tmp_path: Path, one_crop_pool: Path) -> None:
    torch.manual_seed(0)
    save_model(build_model("tiny"), tmp_path / "start.safetensors")
    run = tmp_path / "run"
    assert train_main(["interactive", "--freeze-encoder", "--pool", str(one_crop_pool), "--model", "tiny", "--init",
                       str(tmp_path / "start.safetensors"), "--steps", "3", "--click-iters", "2", "--lr", "1e-3",
                       "--warmup-steps", "1", "--run-dir", str(run), "--device", "cpu", "--threads", "1",
                       "--eval-every", "0", "--log-every", "1"]) == 0
    trained = load_checkpoint(run / "checkpoints" / "last.pt")
    assert trained["step"] == 3 and json.loads(trained["config"])["freeze_encoder"] is True
    start = load_model(tmp_path / "start.safetensors", device="cpu").state_dict()
    encoder = [k for k in start if k.startswith("image_encoder.")]
    decoder = [k for k in start if k.startswith("mask_decoder.") and k.endswith("weight")]
    assert encoder and decoder
    for key in encoder:
        assert torch.equal(trained["model"][key], start[key]), key
    assert any(not torch.equal(trained["model"][key], start[key]) for key in decoder)


@pytest.mark.parametrize("radius, candidate", [(6, 1), (20, 2), (50, 3)])
def test_first_click_trains_the_candidate_of_the_target_size(radius: int, candidate: int) -> None:
    """Multimask training: besides mask 0, only the candidate of the target's size class
    (small / medium / large) learns from a target; the candidates start as copies of mask 0."""
    torch.manual_seed(0)
    model = build_model("tiny")
    seed_multimask_tokens(model)
    assert model.config["first_click_multimask"]
    grid = np.indices((128, 128, 128)).astype(np.float32)
    label = (((grid - 64.0) ** 2).sum(0) <= radius**2).astype(np.float32)
    image = torch.from_numpy(label + np.random.default_rng(0).normal(0.0, 0.3, label.shape).astype(np.float32))[None, None]
    target = torch.from_numpy(label)[None, None]
    with torch.no_grad():
        embedding = model.image_encoder(image)
        sparse, dense = model.prompt_encoder(points=(torch.tensor([[[64.0, 64.0, 64.0]]]), torch.ones(1, 1)), boxes=None, masks=None)
        masks, iou = model.mask_decoder.predict_masks(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense)
    for k in range(1, 4):
        torch.testing.assert_close(masks[:, k], masks[:, 0])
        torch.testing.assert_close(iou[:, k], iou[:, 0])

    model.train()
    cfg = InteractiveConfig(model="tiny", multimask=True, iou_weight=1.0, click_iters=2)
    step = InteractiveStep(model, cfg)
    assert int(step.size_class(target)) == candidate
    loss, stats = step(image, target, np.random.default_rng(0))
    loss.backward()
    touched = [
        k for k, mlp in enumerate(model.mask_decoder.output_hypernetworks_mlps)
        if any(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())
    ]
    assert touched == [0, candidate]
    assert model.mask_decoder.iou_prediction_head.layers[-1].weight.grad.abs().sum() > 0
    assert stats["grad_iters"] == 2.0


def test_best_feedback_feeds_back_the_fitting_candidate_not_the_pick() -> None:
    """``best_feedback``: the first click's fed-back mask is the candidate with the highest actual IoU
    where the draw says so, else the IoU head's pick; without it the random sequence is not touched."""
    torch.manual_seed(0)
    model = build_model("tiny")
    seed_multimask_tokens(model)
    model.eval()
    decoder = model.mask_decoder
    with torch.no_grad():
        # Three different candidates (shifted hypernetwork output biases) and a head that rates the first best;
        # the asserts below check that the best-fitting one is another.
        for k, shift in ((1, -4.0), (2, 0.0), (3, 4.0)):
            decoder.output_hypernetworks_mlps[k].layers[-1].bias.add_(shift)
        decoder.iou_prediction_head.layers[-1].bias.copy_(torch.tensor([0.0, 5.0, 0.0, -5.0]))
    grid = np.indices((128, 128, 128)).astype(np.float32)
    label = (((grid - 64.0) ** 2).sum(0) <= 40**2).astype(np.float32)
    image = torch.from_numpy(label + np.random.default_rng(0).normal(0.0, 0.3, label.shape).astype(np.float32))[None, None]
    target = torch.from_numpy(label)[None, None].expand(2, -1, -1, -1, -1)
    images = image.expand(2, -1, -1, -1, -1)
    coords, labels = torch.full((2, 1, 3), 64.0), torch.ones(2, 1)
    previous = torch.zeros(2, 1, 32, 32, 32)

    step = InteractiveStep(model, InteractiveConfig(model="tiny", multimask=True, iou_weight=1.0, best_feedback=0.5))
    soft, binary, _, _ = low_res_targets(target, 32)
    with torch.no_grad():
        embedding = model.image_encoder(images)
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=previous)
        low, iou = decoder.predict_masks(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense)
        actual = [float((((low[0, k] > 0) & (binary[0, 0] > 0)).sum()) / (((low[0, k] > 0) | (binary[0, 0] > 0)).sum())) for k in range(4)]
        pick, fitting = 1 + int(iou[0, 1:].argmax()), 1 + int(np.argmax(actual[1:]))
        assert pick == 1 and fitting != pick, (actual, iou)
        _, fed = step._first_multimask(embedding, coords, labels, previous, soft, binary, step.size_class(target), None,
                                       torch.tensor([False, True]))
    torch.testing.assert_close(fed[0, 0], low[0, pick])
    torch.testing.assert_close(fed[1, 0], low[1, fitting])

    # The option draws from the step's generator (one number per crop) only when it is on.
    after = []
    for best_feedback in (0.0, 0.5):
        rng = np.random.default_rng(7)
        step = InteractiveStep(model, InteractiveConfig(model="tiny", multimask=True, iou_weight=1.0, best_feedback=best_feedback, click_iters=1))
        with torch.no_grad():
            step(image, target[:1], rng)
        after.append(rng)
    after[0].random(1)
    assert after[0].random() == after[1].random()
    with pytest.raises(ValueError, match="needs multimask"):
        InteractiveConfig(best_feedback=0.5).validate()


@pytest.mark.slow
def test_resume_splits_an_older_optimizer_state_and_applies_the_iou_head_rate(tmp_path: Path, one_crop_pool: Path) -> None:
    """A checkpoint whose optimizer kept the IoU head in the decoder group resumes with the head's own rate."""
    train_interactive(_tiny_config(tmp_path / "run", one_crop_pool, steps=2))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    encoder, decoder, head = payload["optimizer"]["param_groups"]
    payload["optimizer"]["param_groups"] = [encoder, {**decoder, "params": decoder["params"] + head["params"]}]
    torch.save(payload, last)
    result = train_interactive(_tiny_config(tmp_path / "run", one_crop_pool, steps=3, iou_head_lr_mult=10.0))
    assert result["step"] == 3
    groups = load_checkpoint(last)["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups] == [len(encoder["params"]), len(decoder["params"]), len(head["params"])]
    assert groups[2]["lr"] == pytest.approx(10.0 * groups[1]["lr"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, run_dir: str, pool: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cfg = _tiny_config(Path(run_dir), Path(pool), steps=3)
    result = train_interactive(cfg)
    torch.save(result["model"].state_dict(), Path(out) / f"rank{rank}.pt")
    if rank == 0:
        (Path(out) / "history.json").write_text(json.dumps(result["history"]))


@pytest.mark.slow
def test_two_process_ddp_ranks_agree(tmp_path: Path, one_crop_pool: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "run"), str(one_crop_pool), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]


# ----------------------------------------------------------------------------------------------
# Distillation


def test_layer_pairs_follow_student_i_teacher_2i() -> None:
    assert layer_pairs(6, 12) == [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]
    assert [active_layers(s, 40, 3) for s in (0, 10, 20, 30, 39)] == [(1, False), (2, False), (3, False), (3, True), (3, True)]


@pytest.mark.slow
def test_distillation_loss_falls(tmp_path: Path, one_crop_pool: Path) -> None:
    from FastSAM3DLib import build_model, save_model

    torch.manual_seed(0)
    teacher_path = tmp_path / "teacher.safetensors"
    save_model(build_model("tiny-teacher"), teacher_path)
    cfg = DistillConfig(
        run_dir=str(tmp_path / "distill"), pool_dir=str(one_crop_pool), model="tiny", teacher=str(teacher_path),
        distill_steps=16, distill_lr=3e-3, warmup_steps=1, finetune_steps=0, threads=1, device="cpu",
    )
    distilled = distill_encoder(cfg)
    history = json.loads((tmp_path / "distill" / "distill_metrics.json").read_text())["history"]
    stage = [h["loss"] for h in history if h["neck"]]  # the last stage: all blocks and the neck
    assert len(stage) >= 3 and stage[-1] < stage[0]
    first_stage = [h["loss"] for h in history if h["layers"] == 1]
    assert first_stage[-1] < 0.7 * first_stage[0]
    assert load_checkpoint(distilled)["step"] == 16


def test_balanced_loss_limits_match_its_definition() -> None:
    from FastSAM3DLib.train.losses import DiceBalancedCE, _DiceCE, dice_ce_loss

    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 8, 8, 8), (torch.rand(2, 1, 8, 8, 8) > 0.9).float()
    balanced = DiceBalancedCE()(logits, target)
    assert torch.allclose(DiceBalancedCE(cap=1e9)(logits, target), balanced)
    # cap 1: no reweighting at all, i.e. plain DiceCE (MONAI's when installed).
    assert torch.allclose(DiceBalancedCE(cap=1.0)(logits, target), _DiceCE()(logits, target), atol=1e-5)
    assert torch.allclose(dice_ce_loss()(logits, target), _DiceCE()(logits, target), atol=1e-5)


def test_average_of_runs_is_the_mean_of_their_weights(tmp_path: Path) -> None:
    """``train average`` (the model soup): every weight is the mean of the ingredients', the card lists
    them, and files of another architecture are refused by name with nothing written."""
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model("tiny")
        optimizer = torch.optim.AdamW(model.parameters())
        path = tmp_path / f"run{seed}.pt"
        save_checkpoint(path, _checkpoint_payload(model, optimizer, 10 * (seed + 1), InteractiveConfig(model="tiny"), 360.0))
        paths.append(path)
    out = tmp_path / "soup.safetensors"
    assert train_main(["average", *map(str, paths), "--out", str(out), "--dtype", "float32", "--notes", "three seeds"]) == 0
    soup = load_model(out, device="cpu").state_dict()
    states = [load_checkpoint(p)["model"] for p in paths]
    for key, value in soup.items():
        assert torch.allclose(value, sum(s[key] for s in states) / 3, atol=1e-6), key
    assert not torch.equal(soup["image_encoder.patch_embed.proj.weight"], states[0]["image_encoder.patch_embed.proj.weight"])
    card = read_model_card(out)
    assert [i["step"] for i in card["average_of"]] == [10, 20, 30] and [i["wall_time_hours"] for i in card["average_of"]] == [0.1] * 3
    assert card["steps"] is None and card["wall_time_hours"] is None
    assert card["notes"] == "three seeds" and card["training_checkpoint"] == "run2.pt"

    torch.manual_seed(0)
    save_model(build_model("tiny-teacher"), tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"other.safetensors: its architecture differs .* block_kinds"):
        average_checkpoints([paths[0], tmp_path / "other.safetensors"], tmp_path / "refused.safetensors")
    with pytest.raises(CheckpointError, match="at least two"):
        average_checkpoints([paths[0]], tmp_path / "refused.safetensors")
    assert not (tmp_path / "refused.safetensors").exists()


@pytest.fixture(scope="module")
def two_size_pool(tmp_path_factory) -> Path:
    """A pool of two 128^3 crops: a small ball (radius 7) and a large one (radius 40), each on noise."""
    pool = tmp_path_factory.mktemp("two-size-pool")
    rng = np.random.default_rng(1)
    grid = np.indices((128, 128, 128)).astype(np.float32)
    lines = []
    for index, radius in enumerate((7, 40)):
        label = (((grid - 64.0) ** 2).sum(0) <= radius**2).astype(np.uint8)
        image = (label * 2.0 + rng.normal(0.0, 0.3, label.shape)).astype(np.float32)
        entry_id = f"000_{index:06d}"
        _write_entry(pool, entry_id, image, label)
        lines.append(json.dumps({"id": entry_id, "index": index, "source": "phantom", "structure": f"ball{radius}", "voxels": int(label.sum())}))
    (pool / INDEX_NAME).write_text("\n".join(lines) + "\n")
    return pool


def test_iou_head_refit_changes_only_the_head_and_fits_it(tmp_path: Path, two_size_pool: Path) -> None:
    """``train iou-head``: the exported file differs from its input in the IoU head only, the head's
    error on the decodes it was fitted to falls, and the card records the refit over the input's card."""
    from FastSAM3DLib.train.iou_head import collect_samples, pick_quality

    torch.manual_seed(0)
    start = tmp_path / "start.safetensors"
    save_model(build_model("tiny"), start, {"model_card": json.dumps({"name": "start", "notes": "input card"})})
    out = tmp_path / "refit.safetensors"
    assert train_main(["iou-head", "--model", str(start), "--pool", str(two_size_pool), "--out", str(out), "--crops", "2",
                       "--first-clicks", "3", "--later-clicks", "1", "--epochs", "300", "--lr", "1e-3", "--dtype", "float32"]) == 0
    before, after = load_model(start, device="cpu"), load_model(out, device="cpu")
    head = "mask_decoder.iou_prediction_head."
    old_state, new_state = before.state_dict(), after.state_dict()
    for key, value in old_state.items():
        if not key.startswith(head):
            assert torch.equal(new_state[key], value), key
    assert any(not torch.equal(new_state[key], old_state[key]) for key in old_state if key.startswith(head))

    samples = collect_samples(before, two_size_pool, crops=2, first_clicks=3, later_clicks=1, seed=0, progress=False)
    assert samples.first.sum() == 6 and samples.tokens.shape == (12, 48)
    every = torch.ones(len(samples.crop), dtype=torch.bool)
    old_fit = pick_quality(before.mask_decoder.iou_prediction_head, samples, every)
    new_fit = pick_quality(after.mask_decoder.iou_prediction_head, samples, every)
    assert new_fit["mse"] < 0.5 * old_fit["mse"], (old_fit, new_fit)
    assert new_fit["picked"] >= old_fit["picked"] and new_fit["best"] == old_fit["best"]

    card = read_model_card(out)
    assert card["name"] == "start" and card["notes"] == "input card"
    refit = card["iou_head_refit"]
    assert refit["from"] == "start.safetensors" and refit["crops"] == 2 and refit["first_clicks"] == 6
    assert refit["report"]["after_fit"]["mse"] < refit["report"]["before_fit"]["mse"]

    with pytest.raises(FastSAM3DInputError, match="no pool entries"):
        collect_samples(before, tmp_path, crops=2, progress=False)


# ----------------------------------------------------------------------------------------------
# Stopping, resuming with other settings, and the command line's refusals


def _save_tiny(path: Path, seed: int, name: str = "tiny") -> Path:
    torch.manual_seed(seed)
    save_model(build_model(name), path)
    return path


def _run_until_logged(command: list, pattern: str, timeout_s: float = 240.0):
    """Start ``python -m FastSAM3DLib.train.cli COMMAND`` and return (process, stderr lines so far, match)
    once a line of its log matches ``pattern``; its stderr keeps being read by a thread into the list."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "FastSAM3DLib.train.cli", *command], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + timeout_s
    while time.time() < deadline and process.poll() is None:
        found = next((m for m in map(re.compile(pattern).search, list(lines)) if m), None)
        if found:
            return process, lines, reader, found
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"{pattern!r} not logged in {timeout_s} s:\n{''.join(lines)[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("command, signum, status", [("interactive", signal.SIGINT, 130), ("distill", signal.SIGTERM, 143)])
def test_a_signal_stops_training_with_the_checkpoint_of_the_last_step(tmp_path: Path, one_crop_pool: Path, caplog,
                                                                       command: str, signum: int, status: int) -> None:
    """Ctrl-C or SIGTERM: the run writes the checkpoint of its last completed step (long before the
    periodic one) and exits with the usual status; a rerun continues from that step."""
    run = tmp_path / "run"
    common = ["--pool", str(one_crop_pool), "--model", "tiny", "--run-dir", str(run), "--device", "cpu", "--threads", "1",
              "--log-every", "1", "--checkpoint-minutes", "1000", "--warmup-steps", "1"]
    if command == "interactive":
        args = ["interactive", *common, "--steps", "1000", "--click-iters", "1", "--eval-every", "0"]
        checkpoint, logged = run / "checkpoints" / "last.pt", r"step (\d+) loss"
    else:
        teacher = _save_tiny(tmp_path / "teacher.safetensors", 0, "tiny-teacher")
        args = ["distill", *common, "--teacher", str(teacher), "--distill-steps", "1000", "--finetune-steps", "0"]
        checkpoint, logged = run / "checkpoints" / "distill_last.pt", r"distill step (\d+) loss"
    process, lines, reader, _ = _run_until_logged(args, logged.replace(r"(\d+)", "2"))
    process.send_signal(signum)
    assert process.wait(timeout=120) == status, "".join(lines)[-3000:]
    reader.join(timeout=10)
    saved = load_checkpoint(checkpoint)
    last_logged = max(int(m.group(1)) for m in map(re.compile(logged).search, lines) if m)
    assert saved["step"] >= last_logged >= 2, "the checkpoint holds every step the run had logged"
    if command == "interactive":
        assert json.loads((run / "metrics.json").read_text())["step"] == saved["step"]
    else:
        assert json.loads((run / "distill_metrics.json").read_text())["step"] == saved["step"]

    with caplog.at_level(logging.INFO):
        if command == "interactive":
            result = train_interactive(_tiny_config(run, one_crop_pool, steps=saved["step"] + 1, click_iters=1, warmup_steps=1))
            assert result["step"] == saved["step"] + 1
            assert f"at step {saved['step']}" in caplog.text
        else:
            cfg = DistillConfig(run_dir=str(run), pool_dir=str(one_crop_pool), model="tiny", teacher=str(tmp_path / "teacher.safetensors"),
                                distill_steps=1000, finetune_steps=0, max_minutes=1e-9, warmup_steps=1, threads=1, device="cpu")
            assert distill_encoder(cfg) is None
            assert load_checkpoint(checkpoint)["step"] == saved["step"] + 1


@pytest.mark.slow
def test_resume_after_switching_freeze_encoder_keeps_the_moments_of_shared_parameters(tmp_path: Path, one_crop_pool: Path) -> None:
    """A decoder-only fine-tune continued with full training (and back): the optimizer keeps the moments
    of the parameters trained before, starts the encoder's, and a frozen encoder stays as it was."""
    run = tmp_path / "run"
    names = [name for name, _ in build_model("tiny").named_parameters()]
    encoder = [n for n in names if n.startswith("image_encoder.")]
    last = run / "checkpoints" / "last.pt"
    train_interactive(_tiny_config(run, one_crop_pool, steps=1, click_iters=1, freeze_encoder=True))
    assert sum(len(g["params"]) for g in load_checkpoint(last)["optimizer"]["param_groups"]) == len(names) - len(encoder)

    train_interactive(_tiny_config(run, one_crop_pool, steps=2, click_iters=1))
    state = load_checkpoint(last)["optimizer"]["state"]  # keyed by position; parameters without gradients have none
    steps = {name: float(state[i]["step"]) for i, name in enumerate(names) if i in state}
    assert {steps[n] for n in encoder} == {1.0} and {steps[n] for n in steps if n not in encoder} == {2.0}

    before = load_checkpoint(last)["model"]
    train_interactive(_tiny_config(run, one_crop_pool, steps=3, click_iters=1, freeze_encoder=True))
    payload = load_checkpoint(last)
    assert {float(moments["step"]) for moments in payload["optimizer"]["state"].values()} == {3.0}
    for key in encoder:
        assert torch.equal(payload["model"][key], before[key]), key


@pytest.mark.slow
def test_resume_refuses_another_architecture_and_records_what_was_trained(tmp_path: Path, one_crop_pool: Path, caplog) -> None:
    run = tmp_path / "run"
    train_interactive(_tiny_config(run, one_crop_pool, steps=1, click_iters=1))
    with pytest.raises(FastSAM3DInputError, match=r"--model tiny-teacher: the run's checkpoint .* 'tiny' model.*block_kinds.*another --run-dir"):
        train_interactive(_tiny_config(run, one_crop_pool, steps=2, click_iters=1, model="tiny-teacher"))

    other = _save_tiny(tmp_path / "other.safetensors", 5)
    with caplog.at_level(logging.WARNING):
        train_interactive(_tiny_config(run, one_crop_pool, steps=2, click_iters=1, model=None, init=str(other)))
    assert "--init" in caplog.text and "ignored" in caplog.text
    for recorded in (json.loads(load_checkpoint(run / "checkpoints" / "last.pt")["config"]),
                     json.loads((run / "metrics.json").read_text())["config"]):
        assert recorded["init"] is None and recorded["model"] == "tiny"

    # A new run from --init trains (and records) the architecture of --init, and refuses another --model.
    train_interactive(_tiny_config(tmp_path / "from-init", one_crop_pool, steps=1, click_iters=1, model=None, init=str(other)))
    recorded = json.loads((tmp_path / "from-init" / "metrics.json").read_text())["config"]
    assert recorded["model"] == "tiny" and recorded["init"] == str(other)
    with pytest.raises(FastSAM3DInputError, match=r"--model fastsam3d-384: --init .*other.safetensors is a 'tiny' model"):
        train_interactive(_tiny_config(tmp_path / "refused", one_crop_pool, steps=1, model="fastsam3d-384", init=str(other)))


@pytest.mark.slow
def test_distillation_keeps_its_teacher_and_settings_and_stops_at_max_minutes(tmp_path: Path, one_crop_pool: Path, caplog) -> None:
    teacher = _save_tiny(tmp_path / "teacher.safetensors", 0, "tiny-teacher")
    other = _save_tiny(tmp_path / "other.safetensors", 1, "tiny-teacher")

    def config(**overrides) -> DistillConfig:
        base = dict(run_dir=str(tmp_path / "run"), pool_dir=str(one_crop_pool), model="tiny", teacher=str(teacher), distill_steps=2,
                    finetune_steps=0, warmup_steps=1, threads=1, device="cpu", log_every=1)
        return DistillConfig(**{**base, **overrides})

    with caplog.at_level(logging.INFO):
        done = distill_encoder(config())
    assert load_checkpoint(done)["step"] == 2 and "distill step 2 loss" in caplog.text
    with pytest.raises(FastSAM3DInputError, match=r"distilled.pt holds another distillation \(--teacher .*teacher.safetensors .*"
                                                   r"other.safetensors .*\).*another --run-dir"):
        distill_encoder(config(teacher=str(other)))
    with pytest.raises(FastSAM3DInputError, match="--distill-steps 2 there, 3 asked"):
        distill_encoder(config(distill_steps=3))
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(teacher.read_bytes())
    assert distill_encoder(config(teacher=str(moved))) == done, "the same teacher (by content) moved elsewhere"

    # --max-minutes covers the distillation: stopped after its first step, with a checkpoint, and no fine-tune.
    result = train_distill(config(run_dir=str(tmp_path / "timed"), distill_steps=50, finetune_steps=5, max_minutes=1e-9))
    assert result == {"distilled": None}
    assert load_checkpoint(tmp_path / "timed" / "checkpoints" / "distill_last.pt")["step"] == 1
    assert not (tmp_path / "timed" / "finetune").exists()


def test_export_reads_a_weights_file_and_needs_out(tmp_path: Path, capsys) -> None:
    weights = tmp_path / "weights.safetensors"
    torch.manual_seed(0)
    model = build_model("tiny")
    save_model(model, weights, {"model_card": json.dumps({"name": "start", "notes": "input card"})})
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    for source in (weights, plain):
        out = tmp_path / f"{source.stem}-export.safetensors"
        assert train_main(["export", str(source), "--out", str(out), "--dtype", "float32", "--notes", "exported"]) == 0
        for key, value in load_model(out, device="cpu").state_dict().items():
            assert torch.equal(value, model.state_dict()[key]), key
        card = read_model_card(out)
        assert card["exported_from"] == source.name and card["notes"] == "exported" and card["architecture"] in ("tiny", "inferred")
    assert read_model_card(tmp_path / "weights-export.safetensors")["name"] == "start", "the file's own card is kept"

    for command in (["export", str(weights)], ["average", str(weights), str(plain)], ["export", "--help"]):
        with pytest.raises(SystemExit):
            train_main(command)
    usage = capsys.readouterr()
    assert "the following arguments are required: --out" in usage.err
    assert re.search(r"usage: .* --out OUT", usage.out) and "[--out OUT]" not in usage.out


@pytest.fixture(scope="module")
def user_dataset(tmp_path_factory) -> Path:
    """An imagesTr/labelsTr folder of two 48^3 cases at 1.5 mm: label 1 ("ball") of about 3000 voxels,
    label 2 of 33 voxels (too small for a pool with --min-voxels 500)."""
    root = tmp_path_factory.mktemp("user-data")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "ball": 1, "speck": 2}}))
    grid = np.indices((48, 48, 48)).astype(np.float32)
    rng = np.random.default_rng(0)
    for case, center in (("case0", 20.0), ("case1", 26.0)):
        distance = np.sqrt(((grid - center) ** 2).sum(0))
        labels = np.where(distance <= 9, 1, 0).astype(np.uint8)
        labels[np.sqrt(((grid - 40.0) ** 2).sum(0)) <= 2] = 2
        for array, folder, name in ((100.0 + 200.0 * (labels > 0) + rng.normal(0, 10, labels.shape), "imagesTr", f"{case}_0000"),
                                    (labels, "labelsTr", case)):
            image = sitk.GetImageFromArray(array.astype(np.float32 if folder == "imagesTr" else np.uint8))
            image.SetSpacing((1.5, 1.5, 1.5))
            sitk.WriteImage(image, str(root / folder / f"{name}.nii.gz"))
    return root


def test_pool_from_a_users_labelled_folder(tmp_path: Path, user_dataset: Path, one_crop_pool: Path) -> None:
    """``train pool --data DIR``: crops of every label of every case (named from dataset.json) above
    --min-voxels, no Colin27 unless asked; spec.json records the source. A dataset folder is no pool."""
    pool = tmp_path / "pool"
    assert train_main(["pool", "--data", str(user_dataset), "--out", str(pool), "--size", "4", "--phantom-fraction", "0",
                       "--no-augment", "--min-voxels", "500"]) == 0
    entries = read_index(pool)
    assert len(entries) == 4
    assert {e["source"] for e in entries} == {"data"} and {e["structure"] for e in entries} == {"ball"}
    assert {e["case"] for e in entries} <= {"case0", "case1"} and min(e["voxels"] for e in entries) > 500
    spec = json.loads((pool / "spec.json").read_text())
    assert spec["data"] == [str(user_dataset.resolve())] and spec["colin27"] is False and spec["size"] == 4

    with pytest.raises(FastSAM3DInputError, match=r"user-data\d* is a labelled dataset .*--data .*--pool") as refused:
        train_interactive(_tiny_config(tmp_path / "run", user_dataset))
    assert f"--out {user_dataset}`" not in str(refused.value)
    assert train_main(["pool", "--out", str(user_dataset), "--size", "1"]) == 2
    assert not (user_dataset / INDEX_NAME).exists()


@pytest.mark.slow
def test_a_pool_is_extended_only_with_its_recipe_and_spec_json_stays_true(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    spec = PoolSpec(size=2, phantom_fraction=1.0, augment=False, min_voxels=500)
    assert len(build_pool(pool, spec, progress=False)) == 2
    for other, field in ((PoolSpec(size=3, phantom_fraction=1.0, augment=False, min_voxels=500, seed=1), "seed"),
                         (PoolSpec(size=3, phantom_fraction=0.5, augment=False, min_voxels=500), "phantom_fraction"),
                         (PoolSpec(size=3, phantom_fraction=1.0, augment=True, min_voxels=500), "augment")):
        with pytest.raises(FastSAM3DInputError, match=rf"built with another recipe \({field}: .*another --out"):
            build_pool(pool, other, progress=False)
    assert len(build_pool(pool, PoolSpec(size=1, phantom_fraction=1.0, augment=False, min_voxels=500), progress=False)) == 2
    recorded = json.loads((pool / "spec.json").read_text())
    assert recorded["size"] == 2 and recorded["seed"] == 0 and recorded["phantom_fraction"] == 1.0


def test_ignored_or_inconsistent_options_are_refused_as_bad_input(tmp_path: Path) -> None:
    for settings, message in (
        (dict(pos_weight=2.0), r"--pos-weight 2.0 .* --loss dicece only"),
        (dict(loss="dicece", balance_cap=5.0), r"--balance-cap 5.0 .* --loss dicebalanced only"),
        (dict(live_weights={"brain": 0.5}), r"--live-weights .* needs --live"),
        (dict(model="tiny-typo"), r"--model 'tiny-typo': unknown"),
        (dict(multimask=True), r"needs iou_weight > 0 \(--iou-weight\)"),
    ):
        with pytest.raises(FastSAM3DInputError, match=message):
            InteractiveConfig(**settings).validate()
    InteractiveConfig(loss="dicece", pos_weight=2.0).validate()
    InteractiveConfig(balance_cap=5.0).validate()

    empty = tmp_path / "empty-pool"
    empty.mkdir()
    with pytest.raises(FastSAM3DInputError, match="the training pool is empty"):
        train_interactive(_tiny_config(tmp_path / "run", empty))
    assert train_main(["interactive", "--pool", str(empty), "--run-dir", str(tmp_path / "run"), "--device", "cpu"]) == 2
