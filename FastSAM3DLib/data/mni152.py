"""The ICBM 2009a MNI152 template as a second, unseen subject for development checks.

nilearn ships the template in its package data (``nilearn/datasets/data``): a T1 with the skull
already removed and grey- and white-matter probability maps, 197 x 233 x 189 voxels of 1 mm. From
them this module builds click targets no training run of ours has seen, on a subject none has seen:

``brain``
    grey + white matter >= 0.5, its largest connected part (cerebrum, cerebellum, brain stem).
``ventricles``
    the largest cavity the brain encloses (the lateral and third ventricles): filled brain minus brain.
``white_matter``
    white matter >= 0.5, its largest connected part.

They are for evaluation only: training on them would end their use as an unseen-subject check. The
files are read from the installed nilearn package (found without importing nilearn, whose own
dependencies are not needed here).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

STRUCTURES = ("brain", "ventricles", "white_matter")
_FILES = {kind: f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm")}
ATTRIBUTION = (
    "ICBM 2009a nonlinear symmetric MNI152 template (McConnell Brain Imaging Centre, Montreal Neurological "
    "Institute), as shipped by nilearn. Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased "
    "nonlinear average age-appropriate brain templates from birth to adulthood. NeuroImage 2009;47:S102."
)


@dataclass(frozen=True)
class MNI152:
    """The template T1 and its click-target masks.

    Attributes:
      image: T1 (skull removed), float32, 1 mm, LPS geometry as read.
      labels: structure name (``STRUCTURES``) -> uint8 binary mask (0/1) on ``image``'s grid.
      directory: the folder the files were read from.
    """

    image: sitk.Image
    labels: Dict[str, sitk.Image]
    directory: Path


def find_mni152() -> Path:
    """The nilearn package-data folder holding the template files.

    Raises:
      FileNotFoundError: nilearn is not installed (or lacks the files); the message says how to install it.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is not None and spec.submodule_search_locations:
        directory = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
        if all((directory / name).is_file() for name in _FILES.values()):
            return directory
    raise FileNotFoundError(
        f"the MNI152 template files ({', '.join(_FILES.values())}) come with nilearn, which is not installed "
        "here: pip install nilearn (or the test extra: pip install -e '.[test]')"
    )


def _largest_part(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def load_mni152(directory: Optional[Union[str, Path]] = None) -> MNI152:
    """Read the template and build the masks of ``STRUCTURES`` (see the module docstring).

    Raises:
      FileNotFoundError: the files are not installed (``find_mni152``).
      ValueError: the maps do not share the T1's grid.
    """
    directory = find_mni152() if directory is None else Path(directory)
    image = sitk.Cast(sitk.ReadImage(str(directory / _FILES["t1"])), sitk.sitkFloat32)
    maps = {}
    for kind in ("gm", "wm"):
        probability = sitk.ReadImage(str(directory / _FILES[kind]))
        if probability.GetSize() != image.GetSize() or not np.allclose(probability.GetOrigin(), image.GetOrigin()):
            raise ValueError(f"{directory / _FILES[kind]}: not on the grid of {_FILES['t1']}")
        maps[kind] = sitk.GetArrayFromImage(probability).astype(np.float32) / 255.0
    brain = _largest_part(maps["gm"] + maps["wm"] >= 0.5)
    masks = {
        "brain": brain,
        "ventricles": _largest_part(ndimage.binary_fill_holes(brain) & ~brain),
        "white_matter": _largest_part(maps["wm"] >= 0.5),
    }
    labels = {}
    for name in STRUCTURES:
        label = sitk.GetImageFromArray(masks[name].astype(np.uint8))
        label.CopyInformation(image)
        labels[name] = label
    return MNI152(image=image, labels=labels, directory=directory)
