"""Reading and checking users' images, and writing results without ever leaving a half-written file."""

from __future__ import annotations

import gzip
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import ImageError
from .staging import OutputError, StagedFile, commit_staged  # noqa: F401 (OutputError: part of this module's API)

ImageLike = Union[sitk.Image, str, os.PathLike]

_FLOAT_TYPES = {sitk.sitkFloat32, sitk.sitkFloat64}
_CHUNK_VOXELS = 1 << 24
_ITK_WARNINGS = threading.Lock()
_GZIP_MAGIC = b"\x1f\x8b"
_VECTOR_COMPONENTS = {
    sitk.sitkVectorUInt8: sitk.sitkUInt8, sitk.sitkVectorInt8: sitk.sitkInt8, sitk.sitkVectorUInt16: sitk.sitkUInt16,
    sitk.sitkVectorInt16: sitk.sitkInt16, sitk.sitkVectorUInt32: sitk.sitkUInt32, sitk.sitkVectorInt32: sitk.sitkInt32,
    sitk.sitkVectorFloat32: sitk.sitkFloat32, sitk.sitkVectorFloat64: sitk.sitkFloat64,
}


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(2) == _GZIP_MAGIC


def _data_length(path: Path) -> int:
    """Bytes of the file's content: its size, or for a gzip file the length of the whole decompressed stream.

    SimpleITK zero-fills a truncated .gz without complaint, so a gzip stream is always read to its end
    here (in chunks: memory stays small); a cut-off or corrupt stream is an ImageError.
    """
    if not _is_gzip(path):
        return path.stat().st_size
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while True:
                chunk = stream.read(1 << 22)
                if not chunk:
                    return total
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as error:
        raise ImageError(f"{path}: the compressed file is truncated or corrupt ({error})") from None


def _read_head(path: Path, count: int) -> bytes:
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rb") as stream:
            return stream.read(count)
    except (EOFError, OSError, zlib.error) as error:
        raise ImageError(f"{path}: the compressed file is truncated or corrupt ({error})") from None


def _nifti_layout(head: bytes) -> Optional[Tuple[int, int, bool]]:
    """(vox_offset, voxel data bytes, data in the same file) from a NIfTI-1/-2 or Analyze header, or None.

    Read from the header itself, not from SimpleITK's pixel type: a NIfTI file with a scaling slope or
    intercept (usual for CT) is stored as int16 but read as float32.
    """
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            vox_offset = struct.unpack(endian + "f", head[108:112])[0]
            single = head[344:347] == b"n+1"
            minimum = 352 if single else 0  # a single-file NIfTI-1's voxels never start inside its header
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            vox_offset = struct.unpack(endian + "q", head[168:176])[0]
            single = head[4:7] == b"n+2"
            minimum = 544 if single else 0
            break
    else:
        return None
    rank = dims[0]
    if not 1 <= rank <= 7 or any(d < 1 for d in dims[1 : rank + 1]) or bitpix < 1 or not np.isfinite(vox_offset):
        return None  # malformed: SimpleITK's own reader reports it
    voxels = int(np.prod([int(d) for d in dims[1 : rank + 1]], dtype=object))
    return max(int(vox_offset), minimum), (voxels * int(bitpix) + 7) // 8, single


def _sibling(path: Path, old: str, new: str) -> Optional[Path]:
    """``a.hdr(.gz)`` -> ``a.img(.gz)`` (or the other way), whichever exists, keeping the case of the suffix."""
    name = path.name
    lower = name.lower()
    stem = name[: lower.rindex(old)]
    for candidate in (new, new + ".gz", new.upper(), new.upper() + ".gz"):
        other = path.with_name(stem + candidate)
        if other.exists():
            return other
    return None


def _check_complete(path: Path, reader: sitk.ImageFileReader, lengths: Dict[Path, int]) -> None:
    """Raise ImageError when the file holds fewer voxel bytes than its header declares.

    SimpleITK's MetaImage (.mha/.mhd) and NRRD readers refuse such files themselves; its NIfTI,
    Analyze, GIPL and VTK readers silently zero-fill the missing part, so those are checked here
    against the header. Other formats are left to their readers. ``lengths`` caches content lengths.
    """
    io_name = reader.GetImageIO() or reader.GetImageIOFromFileName(str(path))
    lower = path.name.lower()
    if io_name == "NiftiImageIO":
        header_path = data_path = path
        if lower.endswith((".img", ".img.gz")):
            header_path = _sibling(path, ".img", ".hdr") or path
        elif lower.endswith((".hdr", ".hdr.gz")):
            data_path = _sibling(path, ".hdr", ".img") or path
        layout = _nifti_layout(_read_head(header_path, 540))
        if layout is None:
            return
        offset, needed, single = layout
        if not single and header_path == data_path:
            return  # an Analyze/NIfTI pair whose other half is missing: the reader reports that
        required = offset + needed
    elif io_name == "GiplImageIO":
        data_path, required = path, 256 + _declared_bytes(reader)
    elif io_name == "VTKImageIO":
        if b"BINARY" not in _read_head(path, 512).upper():
            return  # ASCII VTK: its text is longer than the voxel bytes, nothing to compare
        data_path, required = path, _declared_bytes(reader)
    else:
        return
    if data_path not in lengths:
        lengths[data_path] = _data_length(data_path)
    actual = lengths[data_path]
    if actual < required:
        compressed = " after decompression" if _is_gzip(data_path) else ""
        raise ImageError(
            f"{data_path}: the file is truncated: it holds {actual} bytes{compressed}, its header declares "
            f"{required} bytes (header and voxels); refusing it, because the missing voxels would silently "
            "read as zeros"
        )


def _declared_bytes(reader: sitk.ImageFileReader) -> int:
    sizes = {
        sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
        sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8,
    }
    component = sizes.get(reader.GetPixelID(), 1)
    for vector, scalar in _VECTOR_COMPONENTS.items():
        if reader.GetPixelID() == vector:
            component = sizes[scalar]
    return int(np.prod(reader.GetSize(), dtype=object)) * reader.GetNumberOfComponents() * component


def _reader_message(error: RuntimeError) -> str:
    """A one-line reason from an ITK exception (whose last line can be a misleading errno text)."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "MetaImageIO" in text and "cannot be read" in text:
        return "the MetaImage voxel data could not be read completely (truncated file, or its data file is missing or short)"
    nrrd = [line for line in lines if line.startswith("[nrrd]")]
    if nrrd:  # teem's innermost message is the specific one
        return nrrd[-1]
    for line in lines:
        if line.startswith("ITK ERROR:"):
            message = line.split("): ", 1)[-1]
            reasons = [r for r in lines if r.startswith("Reason:")]
            return f"{message} ({reasons[-1]})" if reasons else message
    return lines[-1] if lines else "unknown error"


def read_image(path: Union[str, os.PathLike], series: Optional[str] = None) -> sitk.Image:
    """Read any image SimpleITK reads (NIfTI, NRRD, MHA, ...) or a DICOM series folder, strictly.

    A file whose voxel data is shorter than its header declares (a cut-off download or copy) is
    refused, for every format, instead of being zero-filled as some SimpleITK readers would do.
    A DICOM folder must hold one series, or ``series`` (a Series Instance UID) says which; its
    slices must be evenly spaced (a missing slice would stretch the volume's geometry).

    Raises:
      ImageError: missing/unreadable/truncated file, a folder with no DICOM series, with several
        and none chosen (the message lists them), or with unevenly spaced slices.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such image file or folder")
    if path.is_dir():
        return _read_dicom_series(path, series)
    if series is not None:
        raise ImageError(f"{path}: a DICOM series ({series}) was chosen, but this is a file, not a DICOM folder")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty")
    reader = _complete_file_reader(path)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise ImageError(f"{path}: not a readable image ({_reader_message(error)})") from None


def _read_dicom_series(path: Path, series: Optional[str]) -> sitk.Image:
    # ITK prints warnings of its own (a folder without a series, uneven slices); the errors below
    # say it better. The switch is process-wide: one lock, so that concurrent reads restore it right.
    with _ITK_WARNINGS:
        shown = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            found = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
            files = {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid)) for uid in found}
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if not found:
        raise ImageError(f"{path}: folder holds no DICOM series (expected DICOM files, or give an image file)")
    if (series is None and len(found) > 1) or (series is not None and series not in files):

        def describe(uid: str) -> str:
            header = sitk.ImageFileReader()
            header.SetFileName(files[uid][0])
            header.ReadImageInformation()
            description = header.GetMetaData("0008|103e").strip() if header.HasMetaDataKey("0008|103e") else ""
            return f"{uid} ({len(files[uid])} files{f', {description!r}' if description else ''})"

        listed = "; ".join(describe(uid) for uid in sorted(found, key=lambda uid: -len(files[uid])))
        asked = f"has no series {series}" if series is not None else f"holds {len(found)} DICOM series"
        raise ImageError(f"{path}: folder {asked}; choose one (fastsam3d segment --series UID, or "
                         f"read_image(folder, series=UID)): {listed}")
    chosen = files[series if series is not None else found[0]]
    _check_even_slices(path, chosen)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(chosen)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise ImageError(f"{path}: could not read its DICOM series: {_reader_message(error)}") from None


def _check_even_slices(path: Path, files: List[str]) -> None:
    """Raise ImageError if a series' slice positions (along their normal) are not evenly spaced."""
    if len(files) < 3:
        return
    positions = []
    normal = None
    for name in files:
        header = sitk.ImageFileReader()
        header.SetFileName(name)
        header.ReadImageInformation()
        if not (header.HasMetaDataKey("0020|0032") and header.HasMetaDataKey("0020|0037")):
            return  # no positions to check (ITK then spaces the slices by their header)
        position = np.array([float(v) for v in header.GetMetaData("0020|0032").split("\\")])
        if normal is None:
            cosines = np.array([float(v) for v in header.GetMetaData("0020|0037").split("\\")])
            normal = np.cross(cosines[:3], cosines[3:])
        positions.append(float(position @ normal))
    gaps = np.diff(np.sort(positions))
    # A missing slice doubles a gap; positions stored to 0.1 mm vary a gap by far less.
    if gaps.size and (gaps.max() - gaps.min()) > max(0.01, 0.2 * np.median(gaps)):
        raise ImageError(
            f"{path}: the series' slices are not evenly spaced (gaps from {gaps.min():.3g} to {gaps.max():.3g} mm: a "
            "missing or duplicated slice?); a volume read from it would have the wrong geometry"
        )


def validate_image(image: sitk.Image, name: str = "image") -> Tuple[float, float]:
    """Raise ImageError unless the image is a 3D scalar volume with finite, non-constant values
    (within float32's range); return its lowest and highest value."""
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
    largest = float(np.finfo(np.float32).max)
    if max(abs(low), abs(high)) > largest:
        raise ImageError(
            f"{name}: voxel values reach {max(abs(low), abs(high)):.3g}, beyond the {largest:.3g} that the model's "
            "float32 arithmetic holds; rescale the image first"
        )
    return low, high


def load_image(source: ImageLike, name: Optional[str] = None) -> sitk.Image:
    """A validated image from a SimpleITK image or a path; ``name`` is how errors call it (default:
    the path, or "image")."""
    return load_image_with_range(source, name)[0]


def load_image_with_range(source: ImageLike, name: Optional[str] = None) -> Tuple[sitk.Image, float, float]:
    """:func:`load_image`, and the image's lowest and highest value (found by the validation)."""
    image = source if isinstance(source, sitk.Image) else read_image(source)
    low, high = validate_image(image, name or ("image" if isinstance(source, sitk.Image) else str(source)))
    return image, low, high


def write_error_reason(error: BaseException) -> str:
    """Why writing an output failed, in one line (ITK's exceptions shortened)."""
    return _reader_message(error) if isinstance(error, RuntimeError) else str(error)


def check_image_file(path: Union[str, os.PathLike]) -> None:
    """Raise ImageError unless the image file at ``path`` holds every voxel its header declares.

    Used on files we have just written: SimpleITK's NIfTI writer reports a full disk only on
    stderr and leaves a truncated file behind.
    """
    _complete_file_reader(Path(path))


def read_image_information(path: Union[str, os.PathLike]) -> sitk.ImageFileReader:
    """An image file's header (size, spacing, origin, direction, pixel type, through the reader's
    getters) without its voxels, after checking that the file holds every voxel it declares.

    Raises:
      ImageError: missing, empty, unreadable or truncated file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty")
    return _complete_file_reader(path)


def _complete_file_reader(path: Path) -> sitk.ImageFileReader:
    """A reader with the header of ``path`` read, after checking that the file holds every voxel
    the header declares (a gzip stream must decompress whole); raises ImageError otherwise."""
    lengths: Dict[Path, int] = {}
    if _is_gzip(path):
        lengths[path] = _data_length(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ImageError(f"{path}: not a readable image ({_reader_message(error)})") from None
    _check_complete(path, reader, lengths)
    return reader


def write_image_atomic(image: sitk.Image, path: Union[str, os.PathLike], compress: bool = True) -> None:
    """Write an image to ``path`` via a temporary file beside it and a rename.

    The written file is checked to hold every voxel before it replaces anything. On any error the
    temporary files are removed and an existing file at ``path`` is untouched.

    Raises:
      ImageError: ``path`` is a folder or its folder does not exist.
      OutputError: the image could not be written completely (e.g. the disk is full).
    """
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: is a folder; expected an output file name like mask.nii.gz")
    if not path.parent.exists():
        raise ImageError(f"{path.parent}: output folder does not exist")
    stage = StagedFile(path)
    try:
        stage.write(lambda tmp: sitk.WriteImage(image, tmp, compress), check=check_image_file, explain=write_error_reason)
        commit_staged([stage])
    finally:
        stage.discard()


def write_bytes_atomic(data: bytes, path: Union[str, os.PathLike]) -> None:
    """Write bytes via a temporary file and a rename (nothing is left behind on failure)."""
    stage = StagedFile(path)
    try:
        stage.write(lambda tmp: Path(tmp).write_bytes(data))
        commit_staged([stage])
    finally:
        stage.discard()
