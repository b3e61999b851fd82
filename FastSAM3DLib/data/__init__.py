"""Training and test data: Colin27/AAL from ``mricron-data``, procedural phantoms, nnU-Net-style
folders of user data, and augmentation."""

from .augment import augment
from .colin27 import (
    ATTRIBUTION,
    HELDOUT_STRUCTURES,
    STRUCTURES,
    TRAIN_STRUCTURES,
    Colin27,
    find_mricron_templates,
    interior_point,
    label_volume_ml,
    load_colin27,
    read_aal_names,
    write_colin27_sample,
)
from .folder import FolderCase, LabelSample, find_cases, grid_mismatch, iter_folder_labels, read_case
from .phantoms import Phantom, make_phantom, smooth_noise

__all__ = [
    "ATTRIBUTION",
    "HELDOUT_STRUCTURES",
    "STRUCTURES",
    "TRAIN_STRUCTURES",
    "Colin27",
    "FolderCase",
    "LabelSample",
    "Phantom",
    "augment",
    "find_cases",
    "find_mricron_templates",
    "grid_mismatch",
    "interior_point",
    "iter_folder_labels",
    "label_volume_ml",
    "load_colin27",
    "make_phantom",
    "read_aal_names",
    "read_case",
    "smooth_noise",
    "write_colin27_sample",
]
