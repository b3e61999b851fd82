"""Labelled user data in the nnU-Net layout: ``imagesTr/`` beside ``labelsTr/``.

A case ``CASE`` has its image as ``imagesTr/CASE_0000.nii.gz`` (nnU-Net's channel suffix; only
channel 0 is used) or ``imagesTr/CASE.nii.gz``, and its label map as ``labelsTr/CASE.nii.gz``.
Other file types SimpleITK reads (``.nii``, ``.nrrd``, ``.mha``, ``.mhd``) work the same way.
Every foreground value of a label map is one binary target.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class FolderCase:
    """One image/label pair on disk."""

    case_id: str
    image_path: Path
    label_path: Path


class LabelSample(NamedTuple):
    """One binary target of one case, as yielded by ``iter_folder_labels``.

    Attributes:
      case_id: the case name (file name without channel suffix and extension).
      image: the case's image as read (any pixel type, shared by all labels of the case).
      label_value: the value of this target in the label map.
      label: uint8 binary mask (0/1) of that value on the image's grid.
    """

    case_id: str
    image: sitk.Image
    label_value: int
    label: sitk.Image


def grid_mismatch(image: sitk.Image, reference: sitk.Image, tolerance: float = 1e-4) -> Optional[str]:
    """How two images' voxel grids differ, or None if they are the same grid.

    Arguments:
      tolerance: relative to the reference's smallest spacing for origins and spacings (mm), and
        absolute for direction cosines.

    Returns:
      a short description such as ``"size (10, 10, 10) != (10, 10, 12)"``, or None.
    """
    if image.GetSize() != reference.GetSize():
        return f"size {image.GetSize()} != {reference.GetSize()}"
    scale = tolerance * min(reference.GetSpacing())
    for name, a, b, tol in (
        ("spacing", image.GetSpacing(), reference.GetSpacing(), scale),
        ("origin", image.GetOrigin(), reference.GetOrigin(), scale),
        ("direction", image.GetDirection(), reference.GetDirection(), tolerance),
    ):
        if not np.allclose(a, b, rtol=0.0, atol=tol):
            return f"{name} {tuple(round(v, 6) for v in a)} != {tuple(round(v, 6) for v in b)}"
    return None


def _split_name(path: Path) -> Optional[Tuple[str, str]]:
    """(stem, suffix) of a readable image file name, or None for other files."""
    for suffix in IMAGE_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)], suffix
    return None


def find_cases(root: Union[str, Path], images_dir: str = "imagesTr", labels_dir: str = "labelsTr") -> List[FolderCase]:
    """Pair every image in ``root/images_dir`` with its label in ``root/labels_dir``.

    Returns:
      the cases sorted by case id.

    Raises:
      FileNotFoundError: a folder is missing or empty, or an image has no label (or a label no
        image); the message names the file and the path that was expected.
      ValueError: one case has two images for channel 0 (``CASE.nii.gz`` and ``CASE_0000.nii.gz``).
    """
    root = Path(root)
    image_root, label_root = root / images_dir, root / labels_dir
    for folder in (image_root, label_root):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: folder not found (expected {images_dir}/ and {labels_dir}/ under {root})")

    images: Dict[str, Path] = {}
    other_channels = 0
    for path in sorted(image_root.iterdir()):
        split = _split_name(path)
        if split is None:
            continue
        stem = split[0]
        match = _CHANNEL.match(stem)
        if match and match["channel"] != "0000":
            other_channels += 1
            continue
        case_id = match["case"] if match else stem
        if case_id in images:
            raise ValueError(f"{path}: case {case_id!r} already has the image {images[case_id]}")
        images[case_id] = path
    if other_channels:
        logger.info("%s: ignoring %d files of channels other than _0000", image_root, other_channels)

    labels: Dict[str, Path] = {}
    for path in sorted(label_root.iterdir()):
        split = _split_name(path)
        if split is not None:
            labels[split[0]] = path

    if not images:
        raise FileNotFoundError(f"{image_root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    for case_id, image_path in images.items():
        if case_id not in labels:
            expected = label_root / f"{case_id}{_split_name(image_path)[1]}"
            raise FileNotFoundError(f"{image_path}: no label for case {case_id!r} (expected {expected})")
    for case_id, label_path in labels.items():
        if case_id not in images:
            expected = image_root / f"{case_id}_0000{_split_name(label_path)[1]}"
            raise FileNotFoundError(f"{label_path}: no image for case {case_id!r} (expected {expected})")
    return [FolderCase(case_id, images[case_id], labels[case_id]) for case_id in sorted(images)]


def read_case(case: FolderCase) -> Tuple[sitk.Image, sitk.Image]:
    """Read one case's image and integer label map, checking they share a grid.

    Raises:
      ValueError: the grids differ, or the label map holds negative or non-integer values; the
        message names both files.
    """
    image = sitk.ReadImage(str(case.image_path))
    label = sitk.ReadImage(str(case.label_path))
    if image.GetNumberOfComponentsPerPixel() != 1 or label.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{case.image_path} / {case.label_path}: expected single-component images")
    mismatch = grid_mismatch(label, image)
    if mismatch is not None:
        raise ValueError(f"{case.label_path}: label grid differs from image {case.image_path}: {mismatch}")
    values = sitk.GetArrayViewFromImage(label)
    if np.issubdtype(values.dtype, np.floating) and not np.array_equal(values, np.round(values)):
        raise ValueError(f"{case.label_path}: label map has non-integer values")
    if values.min() < 0:
        raise ValueError(f"{case.label_path}: label map has negative values")
    return image, label


def iter_folder_labels(
    root: Union[str, Path], images_dir: str = "imagesTr", labels_dir: str = "labelsTr"
) -> Iterator[LabelSample]:
    """Yield one ``LabelSample`` per foreground value present in each case's label map.

    All cases are paired first (``find_cases``), so a missing file is reported before any work.
    Cases are read one at a time; the image is read once per case.

    Raises:
      FileNotFoundError, ValueError: as ``find_cases`` and ``read_case``.
    """
    for case in find_cases(root, images_dir, labels_dir):
        image, label = read_case(case)
        values = sitk.GetArrayViewFromImage(label)
        present = np.unique(values)
        for value in present[present > 0]:
            binary = sitk.GetImageFromArray((values == value).astype(np.uint8))
            binary.CopyInformation(image)
            yield LabelSample(case.case_id, image, int(value), binary)
