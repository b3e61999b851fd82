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

from ..errors import ImageError

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
    """(stem, suffix) of a readable image file name, or None for other files (and for hidden ones,
    such as the ``._CASE.nii.gz`` resource forks macOS leaves on shared drives)."""
    if path.name.startswith("."):
        return None
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
      ValueError: one case has two images for channel 0 (``CASE.nii.gz`` and ``CASE_0000.nii.gz``),
        or two label maps (``CASE.nrrd`` and ``CASE.nii.gz``).
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
        if split is None:
            continue
        if split[0] in labels:
            raise ValueError(f"{path}: case {split[0]!r} already has the label map {labels[split[0]]}")
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


def read_label_map(case: FolderCase) -> sitk.Image:
    """Read one case's label map strictly (a truncated file is refused) and check its values.

    Raises:
      ValueError (``ImageError``): unreadable, truncated, not a 3D scalar map, or holding negative
        or non-integer values; the message names the file.
    """
    from ..io import read_image

    label = read_image(case.label_path)
    if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(f"{case.label_path}: expected a 3D label map of one value per voxel, got a {label.GetDimension()}D image "
                         f"with {label.GetNumberOfComponentsPerPixel()} components per voxel")
    values = sitk.GetArrayViewFromImage(label)
    if np.issubdtype(values.dtype, np.floating) and not np.array_equal(values, np.round(values)):
        raise ImageError(f"{case.label_path}: label map has non-integer values")
    if values.min() < 0:
        raise ImageError(f"{case.label_path}: label map has negative values")
    return label


def read_case(case: FolderCase, label: Optional[sitk.Image] = None) -> Tuple[sitk.Image, sitk.Image]:
    """Read one case's image and integer label map (or take the label map already read), strictly,
    checking the image as the session will and that the two share a grid.

    Raises:
      ValueError (``ImageError``): as :func:`read_label_map`; an unreadable, truncated or invalid
        image (the message names the file); or grids that differ (the message names both files).
    """
    from ..io import read_image, validate_image

    if label is None:
        label = read_label_map(case)
    image = read_image(case.image_path)
    validate_image(image, str(case.image_path))
    mismatch = grid_mismatch(label, image)
    if mismatch is not None:
        raise ImageError(f"{case.label_path}: label grid differs from image {case.image_path}: {mismatch}")
    return image, label


def check_case_header(case: FolderCase, label: sitk.Image) -> None:
    """Check a case's image from its header alone (every voxel present, 3D, one value per voxel, on
    the label map's grid), so that a bad case of a dataset is reported before any case is used.

    Raises:
      ValueError (``ImageError``): naming the file and what was expected.
    """
    from ..io import read_image_information

    header = read_image_information(case.image_path)
    if header.GetDimension() != 3 or header.GetNumberOfComponents() != 1:
        raise ImageError(f"{case.image_path}: expected a 3D volume of one value per voxel, got a {header.GetDimension()}D image "
                         f"with {header.GetNumberOfComponents()} components per voxel")
    mismatch = grid_mismatch(label, header)
    if mismatch is not None:
        raise ImageError(f"{case.label_path}: label grid differs from image {case.image_path}: {mismatch}")


def read_label_names(root: Union[str, Path]) -> Dict[int, str]:
    """Label value -> name from ``root/dataset.json`` if there is one (nnU-Net v2 ``{"name": value}``
    or v1 ``{"value": "name"}``); {} otherwise. Region labels (lists of values) are left out.

    Raises:
      ValueError: dataset.json is not valid JSON.
    """
    import json

    path = Path(root) / "dataset.json"
    if not path.is_file():
        return {}
    try:
        labels = json.loads(path.read_text()).get("labels", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{path}: not a valid dataset.json ({error})") from None
    names: Dict[int, str] = {}
    for key, value in labels.items() if isinstance(labels, dict) else ():
        if isinstance(value, int) and not isinstance(value, bool):
            names[value] = str(key)
        elif isinstance(key, str) and key.isdigit() and isinstance(value, str):
            names[int(key)] = value
    return names


def checked_label_maps(
    root: Union[str, Path], progress: Optional[bool] = None, desc: str = "reading labels"
) -> Iterator[Tuple[FolderCase, sitk.Image]]:
    """Every case of a folder with its label map, read strictly, and its image's header checked
    (:func:`check_case_header`), so that a bad file is reported before any image is read.

    Arguments:
      progress: show a tqdm bar (None: where the output is a terminal).

    Raises:
      FileNotFoundError, ValueError: as :func:`find_cases`, :func:`read_label_map` and
        :func:`check_case_header`.
    """
    from tqdm import tqdm

    for case in tqdm(find_cases(root), desc=desc, unit="case", leave=False, disable=None if progress is None else not progress):
        label = read_label_map(case)
        check_case_header(case, label)
        yield case, label


def target_values(label: sitk.Image, names: Dict[int, str]) -> List[Tuple[int, int]]:
    """(value, voxel count) of each target of a label map: its foreground values but one that
    ``names`` (:func:`read_label_names`) calls "ignore"."""
    values, counts = np.unique(sitk.GetArrayViewFromImage(label), return_counts=True)
    return [(v, c) for v, c in zip(values.tolist(), counts.tolist()) if v > 0 and names.get(int(v)) != "ignore"]


class CaseCache:
    """The folder case read last (its image and label map) and the target mask made last: a
    dataset's cases are read one at a time, and a case's other targets reuse its read."""

    def __init__(self) -> None:
        self.case: Optional[FolderCase] = None
        self.image: Optional[sitk.Image] = None
        self.labels: Optional[sitk.Image] = None
        self.target: Optional[Tuple[FolderCase, int, sitk.Image]] = None

    def read(self, case: FolderCase) -> Tuple[sitk.Image, sitk.Image]:
        """The case's image and label map (:func:`read_case`)."""
        if case != self.case:
            self.case = self.image = self.labels = self.target = None  # the previous case is released first
            self.image, self.labels = read_case(case)
            self.case = case
        return self.image, self.labels

    def mask(self, case: FolderCase, value: int) -> sitk.Image:
        """uint8 0/1 mask of ``value`` in the case's label map."""
        labels = self.read(case)[1]
        if self.target is None or self.target[:2] != (case, value):
            self.target = (case, value, sitk.Cast(labels == value, sitk.sitkUInt8))
        return self.target[2]


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
