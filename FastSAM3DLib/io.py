"""Reading and checking users' images, and writing results without ever leaving a half-written file."""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from pathlib import Path
from typing import Union

import numpy as np
import SimpleITK as sitk

from .errors import ImageError

ImageLike = Union[sitk.Image, str, os.PathLike]

_FLOAT_TYPES = {sitk.sitkFloat32, sitk.sitkFloat64}
_CHUNK_VOXELS = 1 << 24


def _check_gzip_complete(path: Path) -> None:
    """SimpleITK zero-fills a truncated .gz without complaint: read the stream to its end ourselves."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as error:
        raise ImageError(f"{path}: the compressed file is truncated or corrupt ({error})") from None


def _check_raw_size(path: Path, image: sitk.Image) -> None:
    """For uncompressed NIfTI/MHA/NRRD, the file must hold at least the declared voxel bytes."""
    name = path.name.lower()
    if not name.endswith((".nii", ".mha", ".nrrd")):
        return
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if "gzip" in reader.GetMetaData("encoding").lower() if reader.HasMetaDataKey("encoding") else False:
        return
    if name.endswith(".mha") and reader.HasMetaDataKey("CompressedData") and reader.GetMetaData("CompressedData").strip().lower() == "true":
        return
    needed = int(np.prod(image.GetSize())) * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    if path.stat().st_size < needed:
        raise ImageError(f"{path}: the file is truncated: it holds {path.stat().st_size} bytes, the header declares {needed} bytes of voxels")


def read_image(path: Union[str, os.PathLike]) -> sitk.Image:
    """Read any image SimpleITK reads (NIfTI, NRRD, MHA, ...) or a DICOM series folder, strictly.

    Raises:
      ImageError: missing/unreadable/truncated file, or a folder with no DICOM series.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such image file or folder")
    if path.is_dir():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise ImageError(f"{path}: folder holds no DICOM series (expected DICOM files, or give an image file)")
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        try:
            return reader.Execute()
        except RuntimeError as error:
            raise ImageError(f"{path}: could not read its DICOM series: {error}") from None
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty")
    if path.name.lower().endswith(".gz"):
        _check_gzip_complete(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise ImageError(f"{path}: not a readable image ({first_line})") from None
    _check_raw_size(path, image)
    return image


def validate_image(image: sitk.Image, name: str = "image") -> None:
    """Raise ImageError unless the image is a 3D scalar volume with finite, non-constant values."""
    dimension = image.GetDimension()
    if dimension != 3:
        raise ImageError(f"{name}: expected a 3D volume, got a {dimension}D image of size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(
            f"{name}: expected a single-channel (scalar) volume, got {image.GetNumberOfComponentsPerPixel()} components "
            f"per voxel ({image.GetPixelIDTypeAsString()}); convert colour/vector images to one channel first"
        )
    if min(image.GetSize()) < 1:
        raise ImageError(f"{name}: the volume is empty (size {image.GetSize()})")
    spacing = np.asarray(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ImageError(f"{name}: voxel spacing must be positive and finite, got {tuple(spacing)}")
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise ImageError(f"{name}: the direction matrix is singular or not finite: {tuple(direction.flatten())}")
    if not np.all(np.isfinite(image.GetOrigin())):
        raise ImageError(f"{name}: the origin is not finite: {image.GetOrigin()}")
    view = sitk.GetArrayViewFromImage(image).reshape(-1)
    low, high = np.inf, -np.inf
    bad = 0
    for start in range(0, view.size, _CHUNK_VOXELS):
        chunk = view[start : start + _CHUNK_VOXELS]
        if image.GetPixelID() in _FLOAT_TYPES:
            finite = np.isfinite(chunk)
            if not finite.all():
                bad += int((~finite).sum())
                chunk = chunk[finite]
        if chunk.size:
            low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    if bad:
        raise ImageError(f"{name}: contains {bad} NaN or infinite voxel values; fix or mask them before segmenting")
    if not high > low:
        raise ImageError(f"{name}: every voxel has the same value ({low:g}); there is nothing to segment")


def load_image(source: ImageLike) -> sitk.Image:
    """A validated image from a SimpleITK image or a path."""
    if isinstance(source, sitk.Image):
        validate_image(source)
        return source
    image = read_image(source)
    validate_image(image, str(source))
    return image


def write_image_atomic(image: sitk.Image, path: Union[str, os.PathLike], compress: bool = True) -> None:
    """Write an image to ``path`` via a temporary file in the same folder and a rename.

    On any error the temporary file is removed and an existing file at ``path`` is untouched.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: is a folder; expected an output file name like mask.nii.gz")
    if not path.parent.exists():
        raise ImageError(f"{path.parent}: output folder does not exist")
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".gz") else path.suffix
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix or ".nii.gz", dir=path.parent)
    os.close(handle)
    try:
        sitk.WriteImage(image, tmp, compress)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(data: bytes, path: Union[str, os.PathLike]) -> None:
    """Write bytes via a temporary file and a rename (nothing is left behind on failure)."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
