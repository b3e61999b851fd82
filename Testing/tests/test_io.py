"""Reading users' files: DICOM series folders, and geometry preserved through the formats Slicer users have."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FastSAM3DLib import ImageError
from FastSAM3DLib.io import load_image, read_image, validate_image, write_image_atomic


def _write_dicom_series(array: np.ndarray, spacing, origin, folder: Path, series_uid="1.2.826.0.1.3680043.2.1125.1.1234567890",
                        description="", skip=(), position_decimals=4) -> None:
    """One CT slice per file, with the tags ITK/GDCM use to rebuild the volume's geometry (slices
    ``skip`` left out)."""
    for z in range(array.shape[0]):
        if z in skip:
            continue
        slice_image = sitk.GetImageFromArray(array[z : z + 1].astype(np.int16))
        slice_image.SetSpacing((spacing[0], spacing[1], spacing[2]))
        slice_image.SetOrigin((origin[0], origin[1], origin[2] + z * spacing[2]))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        tags = {
            "0008|0060": "CT",
            "0020|000e": series_uid,
            "0020|000d": series_uid + ".0",
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{v:.{position_decimals}f}" for v in (origin[0], origin[1], origin[2] + z * spacing[2])),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing[1]:.4f}\\{spacing[0]:.4f}",
            "0018|0050": f"{spacing[2]:.4f}",
            "0008|0018": f"{series_uid}.{z + 1}",
            "0008|103e": description,
        }
        for key, value in tags.items():
            slice_image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{series_uid[-4:]}_slice_{z:03d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_series_folder_is_read_with_its_geometry(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=(12, 20, 24)).astype(np.int16)
    spacing, origin = (0.8, 0.8, 2.5), (-10.0, 20.0, 30.0)
    _write_dicom_series(array, spacing, origin, tmp_path)
    image = load_image(tmp_path)
    assert image.GetSize() == (24, 20, 12)
    assert np.allclose(image.GetSpacing(), spacing, atol=1e-3)
    assert np.allclose(image.GetOrigin(), origin, atol=1e-3)
    assert np.array_equal(sitk.GetArrayFromImage(image), array)


def test_a_folder_of_several_series_is_read_only_when_one_is_chosen(tmp_path, capsys):
    """Found by review: a DICOM folder holding several series (a localizer beside the scan) was read
    as its first series without a word, and a series with a missing slice was read on a stretched grid."""
    from FastSAM3DLib import build_model, save_model
    from FastSAM3DLib.cli import main

    rng = np.random.default_rng(1)
    scan = rng.integers(-1000, 1000, size=(12, 20, 24)).astype(np.int16)
    scout = rng.integers(-1000, 1000, size=(3, 20, 24)).astype(np.int16)
    scan_uid, scout_uid = "1.2.826.0.1.3680043.2.1125.1.1111", "1.2.826.0.1.3680043.2.1125.1.2222"
    _write_dicom_series(scan, (0.8, 0.8, 2.5), (-10.0, 20.0, 30.0), tmp_path, scan_uid, "T1 axial")
    _write_dicom_series(scout, (0.8, 0.8, 5.0), (-10.0, 20.0, 30.0), tmp_path, scout_uid, "localizer")
    with pytest.raises(ImageError, match=rf"holds 2 DICOM series; choose one .*{scan_uid} \(12 files, 'T1 axial'\); "
                                         rf"{scout_uid} \(3 files, 'localizer'\)"):
        read_image(tmp_path)
    assert np.array_equal(sitk.GetArrayFromImage(read_image(tmp_path, series=scan_uid)), scan)
    with pytest.raises(ImageError, match="has no series 9.9"):
        read_image(tmp_path, series="9.9")

    model = tmp_path.parent / "tiny.safetensors"
    save_model(build_model("tiny"), model)
    out = tmp_path.parent / "m.nrrd"
    common = ["--voxel", "--point", "12,10,6", "--model", str(model), "--out", str(out)]
    assert main(["segment", str(tmp_path), *common]) == 2 and "--series UID" in capsys.readouterr().err
    assert main(["segment", str(tmp_path), "--series", scan_uid, *common]) == 0
    assert sitk.ReadImage(str(out)).GetSize() == (24, 20, 12)

    gap = tmp_path.parent / "gap"
    gap.mkdir()
    _write_dicom_series(scan, (0.8, 0.8, 2.5), (-10.0, 20.0, 30.0), gap, skip=(5,))
    with pytest.raises(ImageError, match=r"not evenly spaced \(gaps from 2.5 to 5 mm"):
        read_image(gap)
    # Positions stored to 0.1 mm (gaps of 1.2 and 1.3 mm for 1.25 mm slices) are not a missing slice.
    rounded = tmp_path.parent / "rounded"
    rounded.mkdir()
    _write_dicom_series(scan, (0.8, 0.8, 1.25), (-10.0, 20.0, 30.0), rounded, position_decimals=1)
    assert read_image(rounded).GetSize() == (24, 20, 12)


def test_folder_without_dicom_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageError, match="folder holds no DICOM series"):
        read_image(tmp_path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_geometry_round_trip(tmp_path, suffix):
    image = sitk.GetImageFromArray(np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32))
    image.SetSpacing((0.7, 1.1, 3.0))
    image.SetOrigin((5.0, -3.0, 12.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    path = tmp_path / f"image{suffix}"
    write_image_atomic(image, path)
    back = load_image(path)
    assert back.GetSize() == image.GetSize()
    assert np.allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-5)
    assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_values_beyond_float32_are_refused():
    """The model computes in float32: a float64 volume with values past its range would become inf."""
    array = np.random.default_rng(0).normal(size=(8, 8, 8))
    array[2, 3, 4] = 5e38
    with pytest.raises(ImageError, match=r"reach 5e\+38, beyond the 3.4e\+38 that the model's float32 arithmetic holds"):
        validate_image(sitk.GetImageFromArray(array))
    validate_image(sitk.GetImageFromArray(array.clip(-1e38, 1e38)))


def test_the_pictures_slices_are_those_of_the_whole_display_grid():
    """The overlay picture resamples three slices only (a 512 x 512 x 40 volume of 6 mm slices was
    resampled whole to 0.3 mm: 3.6 GB, found by review); each is the whole grid's slice exactly."""
    from FastSAM3DLib.visualize import _display_grid, _slice_of

    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 10, (20, 50, 60)).astype(np.float32))
    image.SetSpacing((0.7, 0.9, 3.0))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    grid, size = _display_grid(image)
    whole = sitk.Image(size, sitk.sitkUInt8)
    whole.SetSpacing(grid.GetSpacing())
    whole.SetOrigin(grid.GetOrigin())
    whole.SetDirection(grid.GetDirection())
    full = sitk.GetArrayFromImage(sitk.Resample(image, whole, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    assert size == (60, 64, 86)  # 0.7 mm isotropic over the image
    for axis, index, cut in ((2, 40, lambda v: v[40]), (1, 20, lambda v: v[:, 20, :]), (0, 30, lambda v: v[:, :, 30])):
        one = sitk.Resample(image, _slice_of(grid, size, axis, index), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        np.testing.assert_allclose(sitk.GetArrayFromImage(one).squeeze(), cut(full), atol=1e-4)
