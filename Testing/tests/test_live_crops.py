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
from FastSAM3DLib.crops import IntensitySettings
from FastSAM3DLib.data.colin27 import HELDOUT_STRUCTURES, find_mricron_templates, load_colin27
from FastSAM3DLib.data.phantoms import make_phantom
from FastSAM3DLib.train import live
from FastSAM3DLib.train.live import LiveCrops, PhantomFeed, draw_phantom_crop, phantom_crop, write_pack
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


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_phantom_crop_is_the_simpleitk_recipe(seed):
    """A phantom crop made without SimpleITK (the pool's and the device's) is the crop SimpleITK makes of
    the same phantom with the same draws: resampled with SimpleITK, then augmented and normalised."""
    image, label, name = draw_phantom_crop(np.random.default_rng(seed), min_voxels=500)
    rng = np.random.default_rng(seed)
    phantom = make_phantom(rng, size=None, min_target_voxels=500)
    ct = phantom.modality == "ct" and rng.random() < 0.5
    expected_image, expected_label = prepare_crop(phantom.image, phantom.label, rng,
                                                  intensity=IntensitySettings(mode="ct") if ct else IntensitySettings())
    assert name == f"phantom:{phantom.modality}:{phantom.kinds[phantom.target_id]}"
    assert np.array_equal(label, expected_label)
    np.testing.assert_allclose(image, expected_image, atol=1e-4)
    plain, _, _ = draw_phantom_crop(np.random.default_rng(seed), min_voxels=500, augment_crop=False)
    assert not np.allclose(plain, image, atol=1e-2)


def test_phantom_crops_keep_enough_of_their_target(monkeypatch):
    rng = np.random.default_rng(5)
    for _ in range(3):
        assert phantom_crop(rng, min_voxels=2000)[1].sum() > 2000
    tries = []

    def cropped_away(rng, **settings):  # a phantom whose target the crop lost (e.g. augmentation moved it out)
        tries.append(settings)
        return np.zeros((128,) * 3, np.float32), np.zeros((128,) * 3, np.uint8), "phantom:mr:blob"

    monkeypatch.setattr(live, "draw_phantom_crop", cropped_away)
    with pytest.raises(RuntimeError, match="3 phantoms in a row left at most 500 label voxels"):
        phantom_crop(rng, max_tries=3)
    assert len(tries) == 3


def test_phantom_feed_buffers_the_newest_crops_and_stops_its_workers():
    with PhantomFeed(1, seed=(3,), buffer=2) as feed:
        rng = np.random.default_rng(0)
        images, targets, names = feed.sample(3, rng)
        assert images.shape == targets.shape == (3, 1, 128, 128, 128) and images.dtype == torch.float32
        assert all(name.startswith("phantom:") for name in names) and bool((targets.flatten(1).sum(1) > 500).all())
        while feed.received < 3:  # a third crop replaces the oldest of the two kept
            feed.sample(1, rng)
        assert len(feed._crops) == 2 and feed.drawn >= 4
        # The crops are the worker's: worker 0's first crop, from the generator (3, 0, 0).
        first, _, _ = phantom_crop(np.random.default_rng((3, 0, 0)))
        kept = [crop[0].float().numpy() for crop in feed._crops]
        assert not any(np.allclose(k, first, atol=1e-2) for k in kept)  # it was replaced
        workers = list(feed._workers)
    assert not any(process.is_alive() for process in workers)


def test_phantom_feed_says_when_its_workers_are_gone(tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "scipy.py").write_text('raise ImportError("scipy is broken here")\n')
    monkeypatch.syspath_prepend(str(broken))  # spawned workers start with this process's sys.path
    with PhantomFeed(1) as feed, pytest.raises(RuntimeError, match=r"every phantom worker has exited \(exit codes 1\)"):
        feed.sample(1, np.random.default_rng(0))


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
    """What ``Testing/device_train.sh`` runs on a machine without SimpleITK: 2 steps of a tiny model on
    pack crops and phantoms from a worker process, then the export. SimpleITK is hidden from the
    workers too (a stand-in module on PYTHONPATH that fails to import)."""
    hidden = tmp_path / "no-simpleitk"
    hidden.mkdir()
    (hidden / "SimpleITK.py").write_text('raise ImportError("SimpleITK is not installed here")\n')
    batch, share = 3, 0.5
    # The run draws each step's phantom count from the generator (seed 0, rank 0, step): this mixes both sources.
    phantom_draws = sum(int(np.random.default_rng((0, 0, step)).binomial(batch, share)) for step in range(2))
    assert 0 < phantom_draws < 2 * batch
    script = f"""
from FastSAM3DLib.train.cli import main
assert main(["interactive", "--live", {str(pack)!r}, "--live-weights", "brain=0", "--live-phantoms", "{share}", "--phantom-workers", "1",
             "--model", "tiny", "--steps", "2", "--batch-size", "{batch}", "--run-dir", {str(tmp_path / "run")!r},
             "--device", "cpu", "--click-iters", "2", "--eval-every", "0", "--log-every", "1", "--multimask", "--iou-weight", "1"]) == 0
assert main(["export", {str(tmp_path / "run" / "checkpoints" / "last.pt")!r}, "--out", {str(tmp_path / "m.safetensors")!r}]) == 0
"""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8",  # progress bars, whatever the locale
           "PYTHONPATH": os.pathsep.join([str(hidden), str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, encoding="utf-8", errors="replace",
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f", {phantom_draws} drawn" in done.stderr, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["config"]["live"] == str(pack) and metrics["config"]["live_phantoms"] == share
    from FastSAM3DLib.checkpoint import read_model_card

    card = read_model_card(tmp_path / "m.safetensors")
    assert card["trained_structures"] == sorted(set(LiveCrops(pack).structures) - {"brain"})
    assert "phantoms (50% of each batch on average)" in card["data"]


def test_phantoms_need_a_pack():
    from FastSAM3DLib.train.interactive import InteractiveConfig

    with pytest.raises(ValueError, match="live_phantoms needs live"):
        InteractiveConfig(live_phantoms=0.5).validate()
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        InteractiveConfig(live="pack.npz", live_phantoms=1.5).validate()


def test_distillation_refuses_a_pack(pack):
    from FastSAM3DLib.train.distill import DistillConfig, train_distill

    with pytest.raises(ValueError, match="--live is for `train interactive`"):
        train_distill(DistillConfig(teacher="teacher.pth", live=str(pack)))
