"""Training and test data: Colin27/AAL from ``mricron-data``, procedural phantoms, nnU-Net-style
folders of user data, and augmentation.

The phantoms and the augmentation need NumPy and SciPy only; the Colin27 and folder readers
(SimpleITK) load on first use of one of their names, so phantoms are made where SimpleITK is not
installed, as on a borrowed GPU machine.
"""

from .. import _getattr_on_first_use
from .augment import augment
from .phantoms import Phantom, PhantomArrays, make_phantom, make_phantom_arrays, smooth_noise

_ON_FIRST_USE = {
    **dict.fromkeys(
        ("ATTRIBUTION", "HELDOUT_STRUCTURES", "STRUCTURES", "TRAIN_STRUCTURES", "Colin27", "find_mricron_templates",
         "interior_point", "label_volume_ml", "load_colin27", "read_aal_names", "write_colin27_sample"),
        ".colin27",
    ),
    **dict.fromkeys(("FolderCase", "LabelSample", "find_cases", "grid_mismatch", "iter_folder_labels", "read_case"), ".folder"),
}

__all__ = sorted(["augment", "Phantom", "PhantomArrays", "make_phantom", "make_phantom_arrays", "smooth_noise", *_ON_FIRST_USE])
__getattr__ = _getattr_on_first_use(__name__, _ON_FIRST_USE, globals())
