"""Colin27 (the MNI "ch2" single-subject T1 MRI) with AAL labels, from Debian's ``mricron-data``.

The package installs ``ch2.nii.gz`` (T1, 181 x 217 x 181, 1 mm), ``ch2bet.nii.gz`` (the same
with the skull removed), ``aal.nii.gz`` (116 AAL regions on the same grid) and ``aal.nii.txt``
(lines ``INDEX NAME CODE``). This module builds binary click targets from them: the deep grey
structures whose borders are visible on the T1, the cerebellum and the whole brain. Cortical AAL
regions have no visible borders and are not offered.

The volumes are read from the installed package at run time and never copied into the project;
``write_colin27_sample`` writes the small downsampled demo sample with its attribution.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .folder import grid_mismatch

logger = logging.getLogger(__name__)

MRICRON_PACKAGE = "mricron-data"
MRICRON_TEMPLATE_DIRS = (Path("/usr/share/mricron/templates"),)
_REQUIRED_FILES = ("ch2.nii.gz", "ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt")

#: Structures used for training (deep grey nuclei, cerebellum, whole brain).
TRAIN_STRUCTURES = (
    "caudate_l",
    "caudate_r",
    "putamen_l",
    "putamen_r",
    "pallidum_l",
    "pallidum_r",
    "cerebellum",
    "brain",
)
#: Structures never trained on: the generalisation check.
HELDOUT_STRUCTURES = ("hippocampus_l", "hippocampus_r", "amygdala_l", "amygdala_r", "thalamus_l", "thalamus_r")
#: Every structure ``load_colin27`` provides.
STRUCTURES = TRAIN_STRUCTURES + HELDOUT_STRUCTURES

#: Structures that are single AAL regions (lower-cased AAL names).
_AAL_SINGLE = tuple(name for name in STRUCTURES if name not in ("cerebellum", "brain"))
#: AAL name prefixes whose union is the cerebellum (hemispheres and vermis).
_CEREBELLUM_PREFIXES = ("Cerebelum_", "Vermis_")

ATTRIBUTION = (
    "Colin27 (MNI 'ch2') T1 MRI template and AAL atlas labels, from the Debian package mricron-data "
    "(MRIcron, Copyright 2006-2010 Chris Rorden, BSD-3-Clause). "
    "Holmes CJ, Hoge R, Collins L, Woods R, Toga AW, Evans AC. Enhancement of MR images using "
    "registration for signal averaging. J Comput Assist Tomogr 1998;22(2):324-333. "
    "Tzourio-Mazoyer N, Landeau B, Papathanassiou D, et al. Automated anatomical labeling of "
    "activations in SPM using a macroscopic anatomical parcellation of the MNI MRI single-subject "
    "brain. NeuroImage 2002;15(1):273-289."
)


@dataclass(frozen=True)
class Colin27:
    """The Colin27 T1 and its click-target masks.

    Attributes:
      image: T1 MRI, float32, 181 x 217 x 181 voxels of 1 mm (SimpleITK x, y, z), LPS geometry as read.
      labels: structure name (``STRUCTURES``) -> uint8 binary mask (0/1) on ``image``'s grid.
      directory: the templates folder the volumes were read from.
    """

    image: sitk.Image
    labels: Dict[str, sitk.Image]
    directory: Path


def _has_templates(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _REQUIRED_FILES)


def find_mricron_templates() -> Path:
    """The folder holding the ``mricron-data`` templates (ch2, ch2bet, aal).

    Looks in ``/usr/share/mricron/templates``, then wherever ``dpkg -L mricron-data`` says
    ``ch2.nii.gz`` was installed.

    Raises:
      FileNotFoundError: the package is not installed; the message says how to install it.
    """
    for directory in MRICRON_TEMPLATE_DIRS:
        if _has_templates(directory):
            return directory
    dpkg = shutil.which("dpkg")
    if dpkg is not None:
        listing = subprocess.run([dpkg, "-L", MRICRON_PACKAGE], capture_output=True, text=True, check=False)
        for line in listing.stdout.splitlines():
            path = Path(line.strip())
            if path.name == "ch2.nii.gz" and _has_templates(path.parent):
                return path.parent
    raise FileNotFoundError(
        f"Colin27/AAL templates ({', '.join(_REQUIRED_FILES)}) not found in "
        f"{', '.join(str(d) for d in MRICRON_TEMPLATE_DIRS)} or in the files of the Debian package "
        f"{MRICRON_PACKAGE}; install it with: apt-get install -y {MRICRON_PACKAGE}"
    )


def read_aal_names(path: Union[str, Path]) -> Dict[int, str]:
    """Parse ``aal.nii.txt``: one ``INDEX NAME CODE`` line per region (CRLF line ends, blank end line).

    Returns:
      label value in ``aal.nii.gz`` -> AAL region name (e.g. ``73 -> "Putamen_L"``).

    Raises:
      ValueError: a line does not have that form; the message names the file and line.
    """
    names: Dict[int, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="ascii").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not fields[0].isdigit():
            raise ValueError(f"{path}:{number}: expected 'INDEX NAME CODE', got {line!r}")
        names[int(fields[0])] = fields[1]
    return names


def _aal_values(names: Dict[int, str]) -> Dict[str, List[int]]:
    """Structure name -> AAL label values making it (cerebellum: all Cerebelum_* and Vermis_*)."""
    by_name = {name.lower(): value for value, name in names.items()}
    values: Dict[str, List[int]] = {}
    for structure in _AAL_SINGLE:
        if structure not in by_name:
            raise ValueError(f"AAL region {structure!r} not in the AAL name list")
        values[structure] = [by_name[structure]]
    values["cerebellum"] = sorted(v for v, name in names.items() if name.startswith(_CEREBELLUM_PREFIXES))
    if not values["cerebellum"]:
        raise ValueError("no Cerebelum_*/Vermis_* regions in the AAL name list")
    return values


def _on_grid(image: sitk.Image, reference: sitk.Image, what: str) -> sitk.Image:
    """``image`` itself if it is on ``reference``'s grid, else resampled onto it (nearest neighbour)."""
    mismatch = grid_mismatch(image, reference)
    if mismatch is None:
        return image
    logger.warning("%s is not on the ch2 grid (%s); resampling it (nearest neighbour)", what, mismatch)
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())


def _brain_mask(bet: sitk.Image) -> sitk.Image:
    """ch2bet > 0, largest connected component, holes filled (uint8 0/1)."""
    components = sitk.RelabelComponent(sitk.ConnectedComponent(bet > 0), sortByObjectSize=True)
    return sitk.Cast(sitk.BinaryFillhole(components == 1, fullyConnected=False, foregroundValue=1), sitk.sitkUInt8)


def load_colin27(directory: Optional[Union[str, Path]] = None) -> Colin27:
    """Read the Colin27 T1 and build the masks of ``STRUCTURES`` on its grid.

    Arguments:
      directory: folder with ch2.nii.gz, ch2bet.nii.gz, aal.nii.gz and aal.nii.txt; None finds
        the installed package (``find_mricron_templates``).

    Raises:
      FileNotFoundError: the templates are not installed.
    """
    directory = find_mricron_templates() if directory is None else Path(directory)
    image = sitk.Cast(sitk.ReadImage(str(directory / "ch2.nii.gz")), sitk.sitkFloat32)
    aal = _on_grid(sitk.ReadImage(str(directory / "aal.nii.gz")), image, "aal.nii.gz")
    bet = _on_grid(sitk.ReadImage(str(directory / "ch2bet.nii.gz")), image, "ch2bet.nii.gz")
    regions = sitk.GetArrayViewFromImage(aal)
    labels: Dict[str, sitk.Image] = {}
    for structure, values in _aal_values(read_aal_names(directory / "aal.nii.txt")).items():
        mask = sitk.GetImageFromArray(np.isin(regions, values).astype(np.uint8))
        mask.CopyInformation(image)
        labels[structure] = mask
    brain = _brain_mask(bet)
    brain.CopyInformation(image)
    labels["brain"] = brain
    return Colin27(image=image, labels={name: labels[name] for name in STRUCTURES}, directory=directory)


def label_volume_ml(label: sitk.Image) -> float:
    """Volume of the non-zero voxels of a mask, in millilitres."""
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(label)))
    return voxels * float(np.prod(label.GetSpacing())) / 1000.0


def interior_point(label: sitk.Image) -> Tuple[Tuple[int, int, int], Tuple[float, float, float]]:
    """The label's interior-most voxel: the maximum of its distance transform (in mm).

    Returns:
      (index, point): the voxel index (x, y, z) and its centre in physical LPS millimetres.

    Raises:
      ValueError: the label is empty.
    """
    mask = sitk.GetArrayViewFromImage(label) > 0
    if not mask.any():
        raise ValueError("empty label has no interior point")
    distance = ndimage.distance_transform_edt(mask, sampling=label.GetSpacing()[::-1])
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(distance)), mask.shape)[::-1])
    return index, tuple(float(c) for c in label.TransformIndexToPhysicalPoint(index))


def _cube_grid(reference: sitk.Image, center: Sequence[float], side_mm: float, spacing_mm: float) -> sitk.Image:
    """An empty image: a cube of ``side_mm`` with ``spacing_mm`` voxels centred on the physical
    point ``center`` (LPS mm), axes along ``reference``'s direction."""
    n = max(int(round(side_mm / spacing_mm)), 1)
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    grid = sitk.Image([n, n, n], sitk.sitkUInt8)
    grid.SetSpacing([float(spacing_mm)] * 3)
    grid.SetDirection([float(d) for d in direction.ravel()])
    grid.SetOrigin([float(o) for o in np.asarray(center) - direction @ np.full(3, (n - 1) * spacing_mm / 2)])
    return grid


def write_colin27_sample(
    out_dir: Union[str, Path],
    spacing_mm: float = 2.0,
    *,
    side_mm: float = 128.0,
    structure: str = "putamen_l",
    colin: Optional[Colin27] = None,
) -> Path:
    """Write the small demo sample: downsampled T1, one structure's mask, and a JSON description.

    The sample is a cube centred on the brain (128 mm holds the deep grey nuclei, thalami,
    hippocampi and most of the cerebrum). Files written in ``out_dir``: ``colin27_t1.nii.gz``
    (int16), ``colin27_<structure>.nii.gz`` (uint8 0/1) and ``colin27_sample.json`` with the file
    names, spacing, the structure's volume, a suggested click (its interior-most voxel, as an
    index and in physical LPS mm) and ``ATTRIBUTION``. About 240 KB at 2 mm and 128 mm.

    Arguments:
      out_dir: created if missing; existing sample files are overwritten.
      spacing_mm: isotropic voxel size of the sample.
      side_mm: side of the sample cube.
      structure: which of ``STRUCTURES`` to include.
      colin: an already loaded ``load_colin27()``; None loads it.

    Returns:
      the path of the JSON file.
    """
    if spacing_mm < 1.0:
        raise ValueError(f"spacing_mm must be at least the source's 1 mm, got {spacing_mm}")
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; expected one of {', '.join(STRUCTURES)}")
    colin = load_colin27() if colin is None else colin
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Anti-aliasing: a Gaussian whose FWHM makes up the resolution lost (1 mm -> spacing_mm).
    sigma = float(np.sqrt(max(spacing_mm**2 - max(colin.image.GetSpacing()) ** 2, 0.0)) / (2 * np.sqrt(2 * np.log(2))))
    brain = sitk.LabelShapeStatisticsImageFilter()
    brain.Execute(colin.labels["brain"])
    grid = _cube_grid(colin.image, brain.GetCentroid(1), side_mm, spacing_mm)

    def downsample(image: sitk.Image) -> sitk.Image:
        smoothed = sitk.SmoothingRecursiveGaussian(image, sigma) if sigma > 0 else image
        return sitk.Resample(smoothed, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)

    t1 = sitk.Cast(sitk.Round(sitk.Clamp(downsample(colin.image), lowerBound=-32768, upperBound=32767)), sitk.sitkInt16)
    # Label: the smoothed mask is the fraction of each new voxel inside; keep voxels at least half in.
    label = sitk.Cast(downsample(sitk.Cast(colin.labels[structure], sitk.sitkFloat32)) >= 0.5, sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(label).any():
        raise ValueError(f"{structure} lies outside the {side_mm} mm sample cube")

    image_name, label_name = "colin27_t1.nii.gz", f"colin27_{structure}.nii.gz"
    sitk.WriteImage(t1, str(out_dir / image_name), useCompression=True)
    sitk.WriteImage(label, str(out_dir / label_name), useCompression=True)
    index, point = interior_point(label)
    description = {
        "image": image_name,
        "label": label_name,
        "structure": structure,
        "spacing_mm": float(spacing_mm),
        "size_voxels": list(t1.GetSize()),
        "label_volume_ml": round(label_volume_ml(label), 3),
        "click_index_xyz": list(index),
        "click_point_lps_mm": [round(c, 3) for c in point],
        "source": f"Debian package {MRICRON_PACKAGE}: ch2.nii.gz, aal.nii.gz",
        "license": "BSD-3-Clause",
        "attribution": ATTRIBUTION,
    }
    json_path = out_dir / "colin27_sample.json"
    json_path.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote the Colin27 sample (%s, %.1f mm) to %s", structure, spacing_mm, out_dir)
    return json_path
