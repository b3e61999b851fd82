"""Training crops made on the fly from a Colin27 pack (``FastSAM3DLib.train.live``), and training from
them where SimpleITK is not installed (as on a borrowed GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from FastSAM3DLib import preprocess
from FastSAM3DLib.data.colin27 import HELDOUT_STRUCTURES, find_mricron_templates, load_colin27
from FastSAM3DLib.train import live
from FastSAM3DLib.train.live import LiveCrops, write_pack
from FastSAM3DLib.train.pool import prepare_crop

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    try:
        find_mricron_templates()
    except FileNotFoundError as error:
        pytest.skip(f"the Colin27 pack needs the Debian package mricron-data: {error}")
    path = tmp_path_factory.mktemp("pack") / "colin27.npz"
    write_pack(path)
    return path


def test_crop_grid_constants_are_the_sessions():
    assert (live.CROP_SIZE, live.CROP_SPACING) == (preprocess.CROP_SIZE, preprocess.CROP_SPACING)


def test_live_crop_is_the_pool_crop(pack):
    """Without augmentation a live crop is what SimpleITK resamples for the same centre (the pool's path)."""
    colin = load_colin27()
    crops = LiveCrops(pack, augment=False, heldout=False)
    origin = np.load(pack)["origin_lps"]
    rng = np.random.default_rng(0)
    for name in ("putamen_l", "hippocampus_r", "brain"):
        center_mm = np.mean(crops._boxes[name], axis=0) + rng.uniform(-10, 10, 3)
        image, target = crops.crop(name, rng, center_mm=center_mm)
        center_lps = origin + np.array([-1.0, -1.0, 1.0]) * center_mm  # pack axes are R, A, S
        expected_image, expected_target = prepare_crop(colin.image, colin.labels[name], rng, augment_crop=False, center_lps=center_lps)
        assert np.array_equal(target.numpy() > 0, expected_target > 0), name
        assert np.corrcoef(image.numpy().ravel(), expected_image.ravel())[0, 1] > 0.999, name  # faces: ITK keeps edge values half a voxel out
        # The same comparison one voxel off fails it: the check sees a misplaced grid.
        shifted = np.roll(image.numpy(), 1, axis=0)
        assert np.corrcoef(shifted.ravel(), expected_image.ravel())[0, 1] < 0.99, name


def test_live_batches_are_seeded_augmented_and_filtered(pack):
    crops = LiveCrops(pack)
    assert not set(HELDOUT_STRUCTURES) & set(crops.structures) and len(crops.structures) == 8
    images, targets, names = crops.sample(3, np.random.default_rng(5))
    again, _, names_again = crops.sample(3, np.random.default_rng(5))
    other, _, _ = crops.sample(3, np.random.default_rng(6))
    assert images.shape == targets.shape == (3, 1, 128, 128, 128) and images.dtype == torch.float32
    assert torch.equal(images, again) and names == names_again and not torch.equal(images, other)
    assert set(torch.unique(targets).tolist()) <= {0.0, 1.0}
    assert crops.min_voxels == pytest.approx(1000 / 1.5**3) and all(float(t.sum()) > crops.min_voxels for t in targets)
    assert bool(torch.isfinite(images).all()) and all(0.5 < float(image.std()) < 3.0 for image in images)
    everything = LiveCrops(pack, heldout=False)
    assert everything.structures == [str(n) for n in np.load(pack)["names"]]
    # Every structure, the small ones too, gives crops (DESIGN.md: labels of at most 1000 mm^3 are skipped).
    for name in ("amygdala_l", "pallidum_r"):
        _, target = everything.crop(name, np.random.default_rng(0))
        assert float(target.sum()) > everything.min_voxels, name


def test_live_weights_set_how_often_structures_are_drawn(pack):
    crops = LiveCrops(pack, weights={"brain": 0.0, "cerebellum": 4.0})
    assert "brain" not in crops.structures
    draws = np.random.default_rng(0).choice(len(crops.structures), size=20000, p=crops._draw)
    shares = np.bincount(draws, minlength=len(crops.structures)) / draws.size
    cerebellum = crops.structures.index("cerebellum")
    assert shares[cerebellum] == pytest.approx(4 / (4 + 6), abs=0.02)  # 6 other structures at weight 1
    with pytest.raises(ValueError, match="no structure spleen"):
        LiveCrops(pack, weights={"spleen": 1.0})


def test_bad_packs_are_refused_with_the_reason(pack, tmp_path):
    with pytest.raises(ValueError, match="no structure thalamus_x"):
        LiveCrops(pack, structures=["thalamus_x"])
    with pytest.raises(ValueError, match="a pack is an .npz file"):
        write_pack(tmp_path / "pack.zip")
    not_a_pack = tmp_path / "other.npz"
    np.savez(not_a_pack, image=np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"other.npz: not a training pack \(missing bits, heldout, names, spacing\)"):
        LiveCrops(not_a_pack)


def test_training_and_export_run_without_simpleitk(pack, tmp_path):
    """What ``Testing/device_train.sh`` runs on a machine without SimpleITK: 2 steps of a tiny model, then the export."""
    script = f"""
import sys
sys.modules["SimpleITK"] = None  # not installed
from FastSAM3DLib.train.cli import main
assert main(["interactive", "--live", {str(pack)!r}, "--live-weights", "brain=0", "--model", "tiny", "--steps", "2", "--run-dir", {str(tmp_path / "run")!r},
             "--device", "cpu", "--click-iters", "2", "--eval-every", "0", "--log-every", "1", "--multimask", "--iou-weight", "1"]) == 0
assert main(["export", {str(tmp_path / "run" / "checkpoints" / "last.pt")!r}, "--out", {str(tmp_path / "m.safetensors")!r}]) == 0
"""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # progress bars, whatever the locale
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, encoding="utf-8", errors="replace",
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["config"]["live"] == str(pack)
    from FastSAM3DLib.checkpoint import read_model_card

    card = read_model_card(tmp_path / "m.safetensors")
    assert card["trained_structures"] == sorted(set(LiveCrops(pack).structures) - {"brain"})
    assert "no phantoms" in card["data"]


def test_distillation_refuses_a_pack(pack):
    from FastSAM3DLib.train.distill import DistillConfig, train_distill

    with pytest.raises(ValueError, match="--live is for `train interactive`"):
        train_distill(DistillConfig(teacher="teacher.pth", live=str(pack)))
