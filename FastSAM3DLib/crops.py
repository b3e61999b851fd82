"""What a model crop is, how it is normalised and how training crops are augmented: the grid, the
intensity rule, the augmentation's numbers and its random affine map, shared by the session's
preprocessing (:mod:`FastSAM3DLib.preprocess`), the pool's NumPy augmentation
(:mod:`FastSAM3DLib.data.augment`) and the crops made on the training device
(:mod:`FastSAM3DLib.train.live`). NumPy only, so the SimpleITK-free training path can import it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

CROP_SIZE = 128
CROP_SPACING = 1.5
# Index axes pointing to patient Right, Anterior, Superior, written in LPS world coordinates.
CANONICAL_DIRECTION = np.diag([-1.0, -1.0, 1.0])

P_FLIP = 0.5  # per axis
P_AFFINE = 0.5
P_ELASTIC = 0.2
P_GAMMA = 0.3
P_BIAS = 0.3
P_SCALE_SHIFT = 0.5
P_LOW_RESOLUTION = 0.2
P_NOISE = 0.3

MAX_ROTATION_DEG = 15.0
SCALE_RANGE = (0.85, 1.15)
ELASTIC_MAX_VOX = 3.0


def rotation(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation matrix from three angles about the array axes 0, 1 and 2 (applied in that order)."""
    matrix = np.eye(3)
    for axis, angle in enumerate(angles_rad):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        matrix = r @ matrix
    return matrix


def random_affine(rng: np.random.Generator) -> np.ndarray:
    """The 3 x 3 map of a random augmentation about the crop centre (output offset -> input offset): a
    rotation of up to ``MAX_ROTATION_DEG`` about each axis, then a scaling drawn from ``SCALE_RANGE``
    with up to 5 % more per axis."""
    matrix = rotation(np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)))
    return matrix @ np.diag(1.0 / (rng.uniform(*SCALE_RANGE) * rng.uniform(0.95, 1.05, 3)))


@dataclass(frozen=True)
class IntensitySettings:
    """How crops are normalised.

    ``mode="mr"`` is the public pipeline: z-normalise with the mean/std of voxels > 0 (see
    :func:`normalize_crop` for a crop with none). ``mode="ct"``
    first clips to ``window`` (Hounsfield units) and shifts it so the window's lower end is 0,
    so air and padding do not enter the statistics.
    """

    mode: str = "mr"
    window: Tuple[float, float] = (-160.0, 240.0)

    def __post_init__(self) -> None:
        if self.mode not in ("mr", "ct"):
            raise ValueError(f"intensity mode must be 'mr' or 'ct', got {self.mode!r}")
        if not self.window[0] < self.window[1]:
            raise ValueError(f"CT window must be (low, high) with low < high, got {self.window}")


def normalize_crop(array: np.ndarray, settings: IntensitySettings = IntensitySettings()) -> np.ndarray:
    """Z-normalise a crop over its foreground (float32 result).

    The foreground is the voxels > 0 (the public pipeline: MR background is 0). Where none are (an
    image whose values are all negative, e.g. shifted), it is the voxels above the crop's minimum,
    which gives that image the crop its unshifted values would have; a crop of one value is
    returned zeroed. A foreground of one value (a mask, a label map, a CT clipped at its window's top)
    has no spread to divide by: its contrast to the crop's lowest value sets the scale instead, so the
    rest of the crop lies at -1, not at -1e10 (the public pipeline refuses such an image). Statistics
    accumulate in float64: float32 squares overflow above ~1e19.
    """
    values = array.astype(np.float32, copy=True)
    if settings.mode == "ct":
        low, high = settings.window
        values = np.clip(values, low, high) - low
    foreground = values > 0
    if not foreground.any():
        foreground = values > values.min()
        if not foreground.any():
            return np.zeros_like(values)
    selected = values[foreground]
    mean, std = float(selected.mean(dtype=np.float64)), float(selected.std(dtype=np.float64))
    if std <= 1e-6 * abs(mean):
        std = mean - float(values.min())
        if std <= 0:
            return np.zeros_like(values)
    return (values - np.float32(mean)) / np.float32(std)


def padding_value(low: float, high: float, settings: IntensitySettings = IntensitySettings()) -> float:
    """What a crop holds outside an image whose values span [low, high]: the CT window's low end
    (air), else 0 (the public pipeline's MR background), or the image's minimum where no voxel is
    above 0 (a shifted image, whose brightest value 0 would otherwise be)."""
    if settings.mode == "ct":
        return float(settings.window[0])
    return 0.0 if high > 0 else float(low)
