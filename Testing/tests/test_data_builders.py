"""Tests of the data builders: Colin27/AAL from mricron-data, phantoms, the folder loader and augmentation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from FastSAM3DLib.data import (
    HELDOUT_STRUCTURES,
    STRUCTURES,
    TRAIN_STRUCTURES,
    Colin27,
    augment,
    find_mricron_templates,
    grid_mismatch,
    iter_folder_labels,
    label_volume_ml,
    load_colin27,
    make_phantom,
    read_aal_names,
    smooth_noise,
    write_colin27_sample,
)
from FastSAM3DLib.data import colin27 as colin27_module
from FastSAM3DLib.data.phantoms import CT_BONE_HU, CT_CLIP_HU, CT_SOFT_TISSUE_HU, SHAPE_KINDS


@pytest.fixture(scope="module")
def colin() -> Colin27:
    try:
        directory = find_mricron_templates()
    except FileNotFoundError as error:
        pytest.skip(f"Colin27 tests need the Debian package mricron-data: {error}")
    return load_colin27(directory)


# --- Colin27 -------------------------------------------------------------------------------------


def test_colin27_labels_resolve_on_ch2_grid(colin: Colin27) -> None:
    assert colin.image.GetPixelID() == sitk.sitkFloat32
    assert colin.image.GetSize() == (181, 217, 181)
    assert colin.image.GetSpacing() == (1.0, 1.0, 1.0)
    assert tuple(colin.labels) == STRUCTURES
    assert not set(TRAIN_STRUCTURES) & set(HELDOUT_STRUCTURES)
    for name, label in colin.labels.items():
        assert label.GetPixelID() == sitk.sitkUInt8, name
        assert grid_mismatch(label, colin.image) is None, name
        values = sitk.GetArrayViewFromImage(label)
        assert values.max() == 1 and values.min() == 0, name


def test_aal_names(colin: Colin27) -> None:
    names = read_aal_names(colin.directory / "aal.nii.txt")
    assert len(names) == 116
    assert names[73] == "Putamen_L" and names[116] == "Vermis_10"


def test_colin27_volumes_are_plausible(colin: Colin27) -> None:
    volumes = {name: label_volume_ml(label) for name, label in colin.labels.items()}
    # AAL on the MNI-sized Colin27 brain: putamen ~8 ml, larger than a typical native putamen (~5 ml).
    assert 4.0 < volumes["putamen_l"] < 10.0
    assert 1000.0 < volumes["brain"] < 1800.0
    assert 100.0 < volumes["cerebellum"] < 250.0
    for name in STRUCTURES:
        if name not in ("brain", "cerebellum"):
            assert 1.0 < volumes[name] < 15.0, (name, volumes[name])


def test_colin27_left_is_patient_left(colin: Colin27) -> None:
    """LPS: patient left is +x, so every *_l structure's centroid has x > 0."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    for name, label in colin.labels.items():
        if name.endswith(("_l", "_r")):
            stats.Execute(label)
            x = stats.GetCentroid(1)[0]
            assert (x > 0) == name.endswith("_l"), (name, x)


def test_colin27_sample(colin: Colin27, tmp_path: Path) -> None:
    json_path = write_colin27_sample(tmp_path, colin=colin)
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) < 400_000
    description = json.loads(json_path.read_text())
    assert "Holmes" in description["attribution"] and "Tzourio-Mazoyer" in description["attribution"]
    assert description["license"] == "BSD-3-Clause"
    image = sitk.ReadImage(str(tmp_path / description["image"]))
    label = sitk.ReadImage(str(tmp_path / description["label"]))
    assert image.GetPixelID() == sitk.sitkInt16 and image.GetSpacing() == (2.0, 2.0, 2.0)
    assert grid_mismatch(label, image) is None
    assert abs(description["label_volume_ml"] - label_volume_ml(colin.labels["putamen_l"])) < 1.0
    point = description["click_point_lps_mm"]
    assert label[label.TransformPhysicalPointToIndex(point)] == 1
    full = colin.labels["putamen_l"]
    assert full[full.TransformPhysicalPointToIndex(point)] == 1


def test_missing_templates_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(colin27_module, "MRICRON_TEMPLATE_DIRS", (tmp_path,))
    monkeypatch.setattr(colin27_module.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y mricron-data"):
        find_mricron_templates()


# --- Phantoms ------------------------------------------------------------------------------------


def _arrays(phantom) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(sitk.GetArrayFromImage(im) for im in (phantom.image, phantom.label, phantom.instances))


def test_phantom_is_deterministic() -> None:
    a = make_phantom(np.random.default_rng(7), (64, 64, 64))
    b = make_phantom(np.random.default_rng(7), (64, 64, 64))
    c = make_phantom(np.random.default_rng(8), (64, 64, 64))
    for x, y in zip(_arrays(a), _arrays(b)):
        np.testing.assert_array_equal(x, y)
    assert a.image.GetSpacing() == b.image.GetSpacing() and a.image.GetOrigin() == b.image.GetOrigin()
    assert a.image.GetDirection() == b.image.GetDirection() and a.kinds == b.kinds
    assert not np.array_equal(_arrays(a)[0], _arrays(c)[0])


def test_phantom_target_and_geometry() -> None:
    for seed in range(8):
        phantom = make_phantom(np.random.default_rng(seed), (64, 72, 56))
        image, label, instances = _arrays(phantom)
        assert phantom.image.GetSize() == (64, 72, 56) and image.dtype == np.float32
        assert label.dtype == np.uint8 and int(label.sum()) > 1000
        np.testing.assert_array_equal(label, instances == phantom.target_id)
        assert set(np.unique(instances)) - {0} == set(phantom.kinds)
        assert set(phantom.kinds.values()) <= set(SHAPE_KINDS) and phantom.kinds[1] == "body"
        for other in (phantom.label, phantom.instances):
            assert grid_mismatch(other, phantom.image) is None


def test_phantom_128_is_fast() -> None:
    start = time.perf_counter()
    phantom = make_phantom(np.random.default_rng(0))
    elapsed = time.perf_counter() - start
    assert phantom.image.GetSize() == (128, 128, 128)
    assert elapsed < 2.0  # about 0.25 s on one free core; generous for a shared machine


def test_phantom_intensity_ranges() -> None:
    for seed in range(4):
        image, _, instances = _arrays(make_phantom(np.random.default_rng(seed), (64, 64, 64), modality="mr"))
        assert image.min() >= 0.0
        if (instances == 0).sum() > 500:
            assert np.median(image[instances == 0]) < 0.3 * np.median(image[instances == 1])
    for seed in range(4):
        phantom = make_phantom(np.random.default_rng(seed), (64, 64, 64), modality="ct")
        image, _, instances = _arrays(phantom)
        assert CT_CLIP_HU[0] <= image.min() and image.max() <= CT_CLIP_HU[1]
        if (instances == 0).sum() > 500:
            assert abs(np.median(image[instances == 0]) + 1000.0) < 30.0
        for instance in phantom.kinds:
            core = ndimage.binary_erosion(instances == instance, iterations=2)
            if core.sum() < 50:
                continue
            median = float(np.median(image[core]))
            soft = CT_SOFT_TISSUE_HU[0] - 25 <= median <= CT_SOFT_TISSUE_HU[1] + 25
            bone = CT_BONE_HU[0] - 100 <= median <= CT_BONE_HU[1] + 100
            assert soft or bone, (seed, instance, phantom.kinds[instance], median)


def test_phantom_spacing_is_sometimes_anisotropic() -> None:
    ratios = []
    for seed in range(12):  # thick slices are drawn with probability 0.25: seeds 3 and 10 here
        spacing = make_phantom(np.random.default_rng(seed), (40, 40, 40)).image.GetSpacing()
        ratios.append(max(spacing) / min(spacing))
    assert any(r > 2.0 for r in ratios) and any(r == 1.0 for r in ratios)
    spacing = make_phantom(np.random.default_rng(0), (40, 40, 40), anisotropic=True).image.GetSpacing()
    assert max(spacing) / min(spacing) > 2.0


def test_smooth_noise_has_unit_variance() -> None:
    field = smooth_noise(np.random.default_rng(0), (64, 64, 64), 6.0)
    assert field.shape == (64, 64, 64) and field.dtype == np.float32
    assert 0.6 < field.std() < 1.4 and abs(field.mean()) < 0.5


# --- Folder loader -------------------------------------------------------------------------------


def _write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _dataset(root: Path) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = {"case_a": np.zeros((8, 9, 10), np.uint8), "case_b": np.zeros((8, 9, 10), np.uint8)}
    labels["case_a"][1:4, 1:4, 1:4] = 1
    labels["case_a"][5:7, 5:8, 5:9] = 2
    labels["case_b"][2:6, 2:6, 2:6] = 3
    _write(root / "imagesTr" / "case_a_0000.nii.gz", rng.random((8, 9, 10)).astype(np.float32))
    _write(root / "imagesTr" / "case_b.nii.gz", rng.random((8, 9, 10)).astype(np.float32))
    for case_id, label in labels.items():
        _write(root / "labelsTr" / f"{case_id}.nii.gz", label)
    return labels


def test_folder_yields_every_label(tmp_path: Path) -> None:
    labels = _dataset(tmp_path)
    samples = list(iter_folder_labels(tmp_path))
    assert [(s.case_id, s.label_value) for s in samples] == [("case_a", 1), ("case_a", 2), ("case_b", 3)]
    for case_id, image, value, binary in samples:
        assert binary.GetPixelID() == sitk.sitkUInt8 and grid_mismatch(binary, image) is None
        np.testing.assert_array_equal(sitk.GetArrayFromImage(binary), labels[case_id] == value)


def test_folder_missing_label_names_the_file(tmp_path: Path) -> None:
    _dataset(tmp_path)
    _write(tmp_path / "imagesTr" / "case_c_0000.nii.gz", np.zeros((8, 9, 10), np.float32))
    with pytest.raises(FileNotFoundError, match=r"case_c_0000\.nii\.gz.*labelsTr/case_c\.nii\.gz"):
        list(iter_folder_labels(tmp_path))


def test_folder_missing_image_and_grid_mismatch(tmp_path: Path) -> None:
    _dataset(tmp_path)
    _write(tmp_path / "labelsTr" / "case_d.nii.gz", np.zeros((8, 9, 10), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"labelsTr/case_d\.nii\.gz"):
        list(iter_folder_labels(tmp_path))
    (tmp_path / "labelsTr" / "case_d.nii.gz").unlink()
    _write(tmp_path / "labelsTr" / "case_b.nii.gz", np.ones((8, 9, 10), np.uint8), spacing=(1.0, 1.0, 2.0))
    with pytest.raises(ValueError, match=r"case_b\.nii\.gz.*spacing"):
        list(iter_folder_labels(tmp_path))


# --- Augmentation --------------------------------------------------------------------------------


def test_augment_keeps_shape_and_binary_label() -> None:
    phantom = make_phantom(np.random.default_rng(3), (64, 64, 64))
    image, label, _ = _arrays(phantom)
    for seed in range(6):
        out_image, out_label = augment(image, label, np.random.default_rng(seed))
        assert out_image.shape == image.shape and out_image.dtype == np.float32
        assert out_label.shape == label.shape and out_label.dtype == np.uint8
        assert set(np.unique(out_label)) <= {0, 1} and np.isfinite(out_image).all()
    again = augment(image, label, np.random.default_rng(5))
    np.testing.assert_array_equal(again[0], out_image)
    np.testing.assert_array_equal(again[1], out_label)


def test_augment_128_crop_and_bad_shapes() -> None:
    image = np.random.default_rng(0).random((128, 128, 128), dtype=np.float32)
    label = np.zeros((128, 128, 128), np.uint8)
    label[40:90, 40:90, 40:90] = 1
    out_image, out_label = augment(image, label, np.random.default_rng(1))
    assert out_image.shape == (128, 128, 128) and out_label.sum() > 0
    with pytest.raises(ValueError):
        augment(image, label[:-1], np.random.default_rng(0))


# --- MNI152 (nilearn's copy): an unseen subject for development checks --------------------------


def test_mni152_targets_are_plausible_anatomy() -> None:
    pytest.importorskip("nilearn", reason="the MNI152 template comes with nilearn (test extra)")
    from FastSAM3DLib.data import interior_point
    from FastSAM3DLib.data.mni152 import STRUCTURES, load_mni152

    template = load_mni152()
    assert template.image.GetSize() == (197, 233, 189) and template.image.GetSpacing() == (1.0, 1.0, 1.0)
    masks = {name: sitk.GetArrayFromImage(template.labels[name]) > 0 for name in STRUCTURES}
    volumes_ml = {name: mask.sum() / 1000.0 for name, mask in masks.items()}
    assert 1400 < volumes_ml["brain"] < 1900 and 400 < volumes_ml["white_matter"] < 800 and 10 < volumes_ml["ventricles"] < 40
    assert not (masks["ventricles"] & masks["brain"]).any()  # a cavity of the brain, not part of it
    assert (masks["white_matter"] & ~masks["brain"]).sum() < 0.01 * masks["white_matter"].sum()
    # The ventricles lie deep: their interior-most point (in a lateral ventricle) is within 3 cm of the midline.
    _, point = interior_point(template.labels["ventricles"])
    assert abs(point[0]) < 30.0 and abs(point[1]) < 40.0 and abs(point[2]) < 40.0
    # Dark (CSF) on the T1, brighter white matter around them.
    t1 = sitk.GetArrayFromImage(template.image)
    assert t1[masks["ventricles"]].mean() < 0.5 * t1[masks["white_matter"]].mean()


def test_mni152_missing_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from FastSAM3DLib.data import mni152

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install nilearn"):
        mni152.find_mni152()
