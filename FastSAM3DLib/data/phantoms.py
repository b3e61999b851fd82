"""Procedural 3D phantoms: labelled shapes with realistic MR- or CT-like appearance.

A phantom is a scene of objects painted into an instance map (later objects overwrite earlier
ones, which makes touching and nested objects), turned into an image by giving every instance an
intensity and a texture, then degrading it as a scanner would: partial-volume blur, a
multiplicative bias field (MR) and Gaussian or Rician noise. One object of the scene is the
target; its binary mask is the label.

Shapes are built in millimetres, so anisotropic voxels sample the same objects more coarsely along
one axis. Every random choice comes from the ``numpy.random.Generator`` passed in, so a seed gives
the same phantom on every machine.

Array axis order is NumPy's (z, y, x); ``size`` and spacing given to or read from SimpleITK are in
its (x, y, z) order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:  # SimpleITK only for make_phantom: the arrays are made without it (training devices lack it)
    import SimpleITK as sitk

logger = logging.getLogger(__name__)

Modality = Literal["mr", "ct"]

#: Intensity ranges of CT phantoms, in Hounsfield units.
CT_AIR_HU = -1000.0
CT_SOFT_TISSUE_HU = (0.0, 80.0)
CT_BONE_HU = (300.0, 1500.0)
CT_CLIP_HU = (-1024.0, 3071.0)

#: Shape kinds an instance can have (values of ``Phantom.kinds``).
SHAPE_KINDS = ("body", "blob", "tube", "shell", "nested_outer", "nested_inner", "touching", "distractor")

_MAX_ATTEMPTS = 20


@dataclass(frozen=True)
class Phantom:
    """One procedural phantom.

    Attributes:
      image: float32 image. MR: arbitrary positive units, background (air) near 0. CT: Hounsfield
        units clipped to ``CT_CLIP_HU``: air -1000, soft tissue 0-80, bone 300-1500 (before blur
        and noise).
      label: uint8 binary mask (0/1) of the target object, on the image's grid.
      instances: uint16 instance map on the image's grid: 0 air, 1 the body, 2.. the objects.
      target_id: the instance id the label was made from (``label == (instances == target_id)``).
      kinds: shape kind of every instance id present in ``instances`` (0 excluded), from ``SHAPE_KINDS``.
      modality: ``"mr"`` or ``"ct"``.
    """

    image: sitk.Image
    label: sitk.Image
    instances: sitk.Image
    target_id: int
    kinds: Dict[int, str]
    modality: Modality


@dataclass(frozen=True)
class PhantomArrays:
    """One procedural phantom as NumPy arrays and its grid (what :class:`Phantom` holds, without SimpleITK).

    Attributes:
      image: float32 (z, y, x) image (see :class:`Phantom`).
      instances: uint16 (z, y, x) instance map; the label is ``instances == target_id``.
      target_id, kinds, modality: as in :class:`Phantom`.
      spacing: voxel size in mm, SimpleITK (x, y, z) order.
      origin: LPS mm of voxel (0, 0, 0).
      direction: 3 x 3, column ``a`` the LPS direction of index axis ``a`` (x, y, z).
    """

    image: np.ndarray
    instances: np.ndarray
    target_id: int
    kinds: Dict[int, str]
    modality: Modality
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: np.ndarray

    @property
    def label(self) -> np.ndarray:
        """uint8 (z, y, x) 0/1 mask of the target."""
        return (self.instances == self.target_id).astype(np.uint8)


def smooth_noise(
    rng: np.random.Generator,
    shape: Sequence[int],
    correlation_vox: Union[float, Sequence[float]],
) -> np.ndarray:
    """A smooth Gaussian random field with zero mean and unit variance at every voxel.

    Coarse white noise on a lattice with node spacing ``correlation_vox`` is interpolated with
    separable Gaussian weights (three small matrix products), so the cost is about
    ``prod(shape) * shape[-1] / correlation_vox`` multiply-adds and there is no per-voxel loop.

    Arguments:
      rng: the random generator.
      shape: output shape, any number of voxels per axis (NumPy order).
      correlation_vox: distance between independent values, in voxels; one number or one per axis
        (use ``mm / spacing`` for a physical length). Values below 1 are treated as 1.

    Returns:
      float32 array of ``shape``.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3:
        raise ValueError(f"smooth_noise expects a 3D shape, got {shape}")
    correlation = np.broadcast_to(np.asarray(correlation_vox, dtype=np.float64), (3,))
    weights = []
    for n, c in zip(shape, correlation):
        c = max(float(c), 1.0)
        nodes = (np.arange(int(np.ceil((n - 1) / c)) + 3) - 1.0) * c
        w = np.exp(-0.5 * ((np.arange(n)[:, None] - nodes[None, :]) / (0.5 * c)) ** 2)
        w[w < 1e-6] = 0.0  # no denormals: they slow float32 arithmetic many-fold
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        weights.append(w.astype(np.float32))
    coarse = rng.standard_normal(tuple(w.shape[1] for w in weights), dtype=np.float32)
    out = np.tensordot(weights[0], coarse, axes=(1, 0))  # (n0, b, c)
    out = np.matmul(weights[1], out)  # (n0, n1, c)
    # One 2D product for the largest step (a batched matmul here is far slower).
    out = out.reshape(-1, out.shape[-1]) @ np.ascontiguousarray(weights[2].T)
    return out.reshape(shape)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix (det +1)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@dataclass
class _Scene:
    """The instance map under construction, in NumPy axis order, with geometry in millimetres."""

    instances: np.ndarray  # uint16 (D, H, W)
    spacing: np.ndarray  # (3,) mm per voxel, NumPy axis order
    kinds: Dict[int, str] = field(default_factory=dict)
    parents: Dict[int, int] = field(default_factory=dict)  # instance -> surrounding instance
    bone: Dict[int, bool] = field(default_factory=dict)  # CT: paint this instance as bone

    @property
    def fov(self) -> np.ndarray:
        """Field of view per axis in mm."""
        return np.asarray(self.instances.shape) * self.spacing

    def box(self, center: np.ndarray, radius: np.ndarray) -> Optional[Tuple[slice, ...]]:
        """Voxel slices covering ``center ± radius`` (mm, per axis), clipped; None if empty."""
        lo = np.maximum(np.floor((center - radius) / self.spacing).astype(int), 0)
        hi = np.minimum(np.ceil((center + radius) / self.spacing).astype(int) + 1, self.instances.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def coords(self, box: Tuple[slice, ...], center: np.ndarray) -> List[np.ndarray]:
        """Broadcastable per-axis coordinates (mm) of the voxel centres in ``box``, relative to ``center``."""
        out = []
        for axis, s in enumerate(box):
            c = np.arange(s.start, s.stop, dtype=np.float32) * np.float32(self.spacing[axis]) - np.float32(center[axis])
            shape = [1, 1, 1]
            shape[axis] = c.size
            out.append(c.reshape(shape))
        return out

    def paint(
        self, box: Optional[Tuple[slice, ...]], mask: np.ndarray, kind: str, parent: int = 1, bone: bool = False
    ) -> int:
        """Write a new instance where ``mask`` (shaped like ``box``) is true; returns its id.

        Objects other than the body (``parent`` 0) are clipped to it: nothing floats in the air.
        """
        new_id = len(self.kinds) + 1
        if box is not None:
            region = self.instances[box]
            region[mask & (region != 0) if parent else mask] = new_id
        self.kinds[new_id] = kind
        self.parents[new_id] = parent
        self.bone[new_id] = bone
        return new_id


def _blob_mask(
    scene: _Scene,
    rng: np.random.Generator,
    center: np.ndarray,
    axes: np.ndarray,
    *,
    roughness: float,
    exponent: float = 2.0,
    shell_mm: Optional[float] = None,
) -> Tuple[Optional[Tuple[slice, ...]], np.ndarray]:
    """A deformed superquadric (ellipsoid when ``exponent`` is 2), solid or as a shell.

    Arguments:
      center: centre in mm (NumPy axis order, from the first voxel's centre).
      axes: the three semi-axes in mm before rotation.
      roughness: relative radial deformation by smooth noise (0 = exact shape).
      exponent: superquadric exponent (< 2 diamond-like, > 2 box-like).
      shell_mm: if given, keep only a wall of this thickness (mm) inside the surface.

    Returns:
      (box, mask): voxel slices and the boolean mask over them; box None when outside the grid.
    """
    rotation = _random_rotation(rng)
    bound = np.linalg.norm(axes) * (1.0 + 2.5 * roughness)
    box = scene.box(center, np.full(3, bound))
    if box is None:
        return None, np.zeros((0, 0, 0), dtype=bool)
    z, y, x = scene.coords(box, center)
    q = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=np.float32)
    for row, a in zip(rotation.T.astype(np.float32), axes):
        u = (row[0] * z + row[1] * y + row[2] * x) / np.float32(a)
        q += u * u if exponent == 2.0 else np.abs(u) ** np.float32(exponent)
    q = np.sqrt(q) if exponent == 2.0 else q ** np.float32(1.0 / exponent)
    radius = np.ones_like(q)
    if roughness > 0:
        correlation = float(np.mean(axes)) * rng.uniform(0.4, 1.0) / scene.spacing
        radius += np.float32(roughness) * np.clip(smooth_noise(rng, q.shape, correlation), -2.5, 2.5)
    mask = q < radius
    if shell_mm is not None:
        mask &= q >= radius - np.float32(shell_mm / float(np.mean(axes)))
    return box, mask


def _tube_mask(
    scene: _Scene, rng: np.random.Generator, start: np.ndarray, radius_mm: float, length_mm: float, branches: int
) -> Tuple[Optional[Tuple[slice, ...]], np.ndarray]:
    """A tube of varying radius around a smooth random curve, optionally with branches.

    The curve is a random walk of the direction; the tube is the union of balls along it, painted
    one small box per curve point (no per-voxel loop).

    Returns:
      (box, mask) as for ``_blob_mask``.
    """
    step = max(radius_mm / 3.0, float(scene.spacing.min()) / 2.0)
    curves = []
    origin, direction, length = start, rng.standard_normal(3), length_mm
    for _ in range(branches + 1):
        n = max(int(length / step), 2)
        points = np.empty((n, 3))
        point, d = origin.astype(np.float64), direction / np.linalg.norm(direction)
        for i in range(n):
            points[i] = point
            d = d + rng.normal(0.0, 0.12, 3)
            d /= np.linalg.norm(d)
            point = point + step * d
        radii = radius_mm * np.exp(0.2 * np.interp(np.arange(n), np.linspace(0, n - 1, 4), rng.standard_normal(4)))
        curves.append((points, radii))
        k = int(rng.integers(n // 4, max(n // 4 + 1, 3 * n // 4)))
        origin, direction, length = points[k], rng.standard_normal(3), length_mm * rng.uniform(0.3, 0.7)
    all_points = np.concatenate([p for p, _ in curves])
    all_radii = np.concatenate([r for _, r in curves])
    lo, hi = all_points.min(axis=0) - all_radii.max(), all_points.max(axis=0) + all_radii.max()
    box = scene.box((lo + hi) / 2, (hi - lo) / 2)
    if box is None:
        return None, np.zeros((0, 0, 0), dtype=bool)
    mask = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    offset = np.array([s.start for s in box])
    for point, r in zip(all_points, all_radii):
        ball = scene.box(point, np.full(3, r))
        if ball is None:
            continue
        z, y, x = scene.coords(ball, point)
        local = tuple(slice(b.start - o, b.stop - o) for b, o in zip(ball, offset))
        mask[local] |= (z * z + y * y + x * x) <= np.float32(r * r)
    return box, mask


def _random_center(scene: _Scene, rng: np.random.Generator, spread: float = 0.35) -> np.ndarray:
    """A point within ``spread`` of the field of view around its centre (mm)."""
    return scene.fov * (0.5 + rng.uniform(-spread, spread, 3))


def _add_blob(scene: _Scene, rng: np.random.Generator, size_mm: float, kind: str, center: Optional[np.ndarray] = None) -> int:
    """Paint one deformed blob of typical radius ``size_mm``; returns its id."""
    center = _random_center(scene, rng) if center is None else center
    axes = size_mm * rng.uniform(0.6, 1.4, 3)
    exponent = 2.0 if rng.random() < 0.7 else float(rng.uniform(1.2, 4.0))
    box, mask = _blob_mask(scene, rng, center, axes, roughness=float(rng.uniform(0.0, 0.3)), exponent=exponent)
    return scene.paint(box, mask, kind, bone=bool(rng.random() < 0.2))


def _add_object(scene: _Scene, rng: np.random.Generator, size_mm: float) -> None:
    """Paint one main object of a random kind (the touching and nested kinds paint two)."""
    kind = str(rng.choice(["blob", "blob", "tube", "shell", "nested", "touching"]))
    if kind == "blob":
        _add_blob(scene, rng, size_mm, "blob")
    elif kind == "tube":
        radius = size_mm * rng.uniform(0.2, 0.45)
        length = size_mm * rng.uniform(3, 8)
        box, mask = _tube_mask(scene, rng, _random_center(scene, rng), radius, length, int(rng.integers(0, 3)))
        scene.paint(box, mask, "tube", bone=bool(rng.random() < 0.3))
    elif kind == "shell":
        axes = size_mm * rng.uniform(0.8, 1.3, 3)
        thickness = max(rng.uniform(0.12, 0.3) * size_mm, 1.5 * float(scene.spacing.min()))
        roughness = float(rng.uniform(0, 0.15))
        box, mask = _blob_mask(scene, rng, _random_center(scene, rng), axes, roughness=roughness, shell_mm=thickness)
        scene.paint(box, mask, "shell", bone=bool(rng.random() < 0.5))
    elif kind == "nested":
        center = _random_center(scene, rng)
        axes = size_mm * rng.uniform(0.9, 1.4, 3)
        box, mask = _blob_mask(scene, rng, center, axes, roughness=float(rng.uniform(0, 0.2)))
        outer = scene.paint(box, mask, "nested_outer")
        inner_center = center + rng.uniform(-0.2, 0.2, 3) * axes
        inner_axes = axes * rng.uniform(0.3, 0.6)
        box, mask = _blob_mask(scene, rng, inner_center, inner_axes, roughness=float(rng.uniform(0, 0.2)))
        scene.paint(box, mask, "nested_inner", parent=outer)
    else:
        first = _add_blob(scene, rng, size_mm, "touching")
        points = np.argwhere(scene.instances == first) * scene.spacing  # (N, 3) mm
        if len(points) == 0:
            return
        # Second blob centred just outside the first one's surface along a random direction.
        center = points.mean(axis=0)
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        along = np.abs((points - center) @ direction).max()
        second_size = size_mm * rng.uniform(0.6, 1.1)
        _add_blob(scene, rng, second_size, "touching", center=center + direction * (along + 0.8 * second_size))


def _build_scene(
    rng: np.random.Generator, shape: Tuple[int, int, int], spacing: np.ndarray, modality: Modality, scale: float = 1.0
) -> _Scene:
    """The instance map: body, 1-3 main objects, 2-8 distractors, and in CT sometimes a bony shell.

    Object sizes are fractions of the field of view's geometric mean side (capped at twice its
    smallest side, so thick-slice volumes do not get objects wider than their in-plane extent),
    times ``scale``.
    """
    scene = _Scene(np.zeros(shape, dtype=np.uint16), spacing)
    fov = scene.fov
    body_axes = fov / 2 * rng.uniform(0.75, 1.2, 3)
    body_center = fov / 2 + rng.uniform(-0.05, 0.05, 3) * fov
    box, mask = _blob_mask(scene, rng, body_center, body_axes, roughness=float(rng.uniform(0, 0.08)))
    scene.paint(box, mask, "body", parent=0)
    if modality == "ct" and rng.random() < 0.4:
        thickness = float(rng.uniform(3.0, 8.0))
        box, mask = _blob_mask(scene, rng, fov / 2, body_axes * rng.uniform(0.7, 0.9), roughness=0.05, shell_mm=thickness)
        scene.paint(box, mask, "shell", bone=True)
    side = min(float(np.exp(np.log(fov).mean())), 2.0 * float(fov.min())) * scale
    for _ in range(int(rng.integers(1, 4))):
        _add_object(scene, rng, side * rng.uniform(0.08, 0.22))
    for _ in range(int(rng.integers(2, 9))):
        size = side * rng.uniform(0.03, 0.1)
        if rng.random() < 0.7:
            _add_blob(scene, rng, size, "distractor")
        else:
            box, mask = _tube_mask(scene, rng, _random_center(scene, rng, 0.45), size * 0.4, size * rng.uniform(3, 8), 0)
            scene.paint(box, mask, "distractor", bone=bool(rng.random() < 0.3))
    return scene


def _intensities(rng: np.random.Generator, scene: _Scene, modality: Modality, present: np.ndarray) -> np.ndarray:
    """Mean intensity per instance id (index 0 = air): MR relative units in [0, 1], CT in HU.

    Every object differs from the instance around it (its parent) by at least a minimum contrast,
    so each one has a visible, if sometimes faint, edge.
    """
    n = len(scene.kinds) + 1
    means = np.zeros(n, dtype=np.float32)
    if modality == "ct":
        means[0] = CT_AIR_HU
        means[1] = rng.uniform(20.0, 60.0)
        min_contrast = 12.0
    else:
        means[1] = rng.uniform(0.2, 0.6)
        min_contrast = 0.08
    for i in range(2, n):
        if not present[i]:
            continue
        parent_mean = means[scene.parents[i]]
        for _ in range(100):
            if modality == "ct":
                value = rng.uniform(*(CT_BONE_HU if scene.bone[i] else CT_SOFT_TISSUE_HU))
            else:
                value = rng.uniform(0.05, 1.0)
            if abs(value - parent_mean) >= min_contrast:
                break
        means[i] = value
    return means


def _render(rng: np.random.Generator, scene: _Scene, modality: Modality) -> np.ndarray:
    """The float32 image of a scene: intensities, textures, partial-volume blur, bias, noise."""
    instances = scene.instances
    present = np.bincount(instances.ravel(), minlength=len(scene.kinds) + 1) > 0
    means = _intensities(rng, scene, modality, present)
    unit = 1.0 if modality == "mr" else 30.0  # texture and noise scale: MR relative units, CT ~HU
    fine_amp = (rng.uniform(0.0, 0.06, means.size) * unit).astype(np.float32)
    coarse_amp = (rng.uniform(0.0, 0.08, means.size) * unit).astype(np.float32)
    fine_amp[0] = coarse_amp[0] = 0.0
    fine = smooth_noise(rng, instances.shape, rng.uniform(1.5, 4.0) / scene.spacing * scene.spacing.min())
    coarse = smooth_noise(rng, instances.shape, rng.uniform(10.0, 30.0) / scene.spacing)
    image = np.take(means, instances)
    fine *= np.take(fine_amp, instances)
    coarse *= np.take(coarse_amp, instances)
    image += fine
    image += coarse
    # Partial-volume blur: a point spread function of a fraction of a voxel on every axis.
    image = ndimage.gaussian_filter(image, sigma=float(rng.uniform(0.3, 0.9)), truncate=3.0)
    if modality == "mr":
        if rng.random() < 0.8:
            bias = smooth_noise(rng, instances.shape, rng.uniform(40.0, 120.0) / scene.spacing)
            bias *= np.float32(rng.uniform(0.05, 0.4))
            image *= np.exp(bias, out=bias)
        sigma = np.float32(rng.uniform(0.005, 0.04))
        noise = rng.standard_normal(instances.shape, dtype=np.float32)
        noise *= sigma
        image += noise
        if rng.random() < 0.7:  # Rician: magnitude of a complex signal with Gaussian noise
            image *= image
            noise = rng.standard_normal(instances.shape, dtype=np.float32)
            noise *= sigma
            noise *= noise
            image += noise
            np.sqrt(image, out=image)
        else:
            np.maximum(image, 0.0, out=image)
        image *= np.float32(10.0 ** rng.uniform(0.0, 3.5))  # arbitrary scanner units
    else:
        noise = rng.standard_normal(instances.shape, dtype=np.float32)
        noise *= np.float32(rng.uniform(3.0, 30.0))
        image += noise
        np.clip(image, *CT_CLIP_HU, out=image)
    return image.astype(np.float32, copy=False)


def _sample_spacing(rng: np.random.Generator, anisotropic: bool) -> np.ndarray:
    """Voxel spacing in mm (NumPy axis order): isotropic 0.6-1.6 mm, or thin in-plane with one thick axis."""
    if not anisotropic:
        return np.full(3, rng.uniform(0.6, 1.6))
    spacing = np.full(3, rng.uniform(0.5, 1.0))
    thick_axis = 0 if rng.random() < 0.7 else int(rng.integers(1, 3))
    spacing[thick_axis] = rng.uniform(2.5, 5.0)
    return spacing


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    """Identity, or sometimes a random axis permutation with flips (as scanners store volumes)."""
    if rng.random() < 0.7:
        return np.eye(3)
    direction = np.eye(3)[rng.permutation(3)]
    return direction * rng.choice([-1.0, 1.0], size=3)[None, :]


def make_phantom(
    rng: np.random.Generator,
    size: Optional[Tuple[int, int, int]] = (128, 128, 128),
    *,
    modality: Optional[Modality] = None,
    anisotropic: Optional[bool] = None,
    min_target_voxels: int = 1000,
) -> Phantom:
    """Make one random phantom as SimpleITK images (arguments and errors of :func:`make_phantom_arrays`,
    which draws the same phantom from the same generator state)."""
    import SimpleITK as sitk

    arrays = make_phantom_arrays(rng, size, modality=modality, anisotropic=anisotropic, min_target_voxels=min_target_voxels)

    def to_image(array: np.ndarray) -> sitk.Image:
        out = sitk.GetImageFromArray(array)
        out.SetSpacing(arrays.spacing)
        out.SetOrigin(arrays.origin)
        out.SetDirection(tuple(float(d) for d in arrays.direction.ravel()))
        return out

    return Phantom(
        image=to_image(arrays.image),
        label=to_image(arrays.label),
        instances=to_image(arrays.instances),
        target_id=arrays.target_id,
        kinds=arrays.kinds,
        modality=arrays.modality,
    )


def make_phantom_arrays(
    rng: np.random.Generator,
    size: Optional[Tuple[int, int, int]] = (128, 128, 128),
    *,
    modality: Optional[Modality] = None,
    anisotropic: Optional[bool] = None,
    min_target_voxels: int = 1000,
) -> PhantomArrays:
    """Make one random phantom (NumPy and SciPy only).

    Arguments:
      rng: the only source of randomness: the same generator state gives the same phantom.
      size: image size in voxels, SimpleITK (x, y, z) order; None draws each side from 96-160.
      modality: ``"mr"`` or ``"ct"`` intensities; None picks one at random.
      anisotropic: thick-slice spacing (e.g. 0.7 x 0.7 x 3 mm); None: with probability 0.25.
      min_target_voxels: the target object has more voxels than this.

    Returns:
      a :class:`PhantomArrays`: the image and instance map on one grid.

    Raises:
      ValueError: for a size too small to hold a target of ``min_target_voxels``.
      RuntimeError: no object grew past ``min_target_voxels`` in 20 redraws (not seen in practice:
        objects grow with every redraw).
    """
    if size is None:
        size = tuple(int(s) for s in rng.integers(96, 161, 3))
    if len(size) != 3 or min(size) < 16:
        raise ValueError(f"size must be three sides of at least 16 voxels, got {size}")
    if min_target_voxels >= 0.2 * np.prod(size):
        raise ValueError(f"min_target_voxels={min_target_voxels} is too large for size {size}")
    if modality is None:
        modality = "ct" if rng.random() < 0.5 else "mr"
    elif modality not in ("mr", "ct"):
        raise ValueError(f"modality must be 'mr' or 'ct', got {modality!r}")
    if anisotropic is None:
        anisotropic = bool(rng.random() < 0.25)
    shape = tuple(int(s) for s in size[::-1])
    spacing = _sample_spacing(rng, anisotropic)

    for attempt in range(_MAX_ATTEMPTS):
        # Objects grow with every redraw, so small or thin-sliced grids still get a large enough target.
        scene = _build_scene(rng, shape, spacing, modality, scale=1.0 + 0.25 * attempt)
        counts = np.bincount(scene.instances.ravel(), minlength=len(scene.kinds) + 1)
        large = [i for i, kind in scene.kinds.items() if kind != "body" and counts[i] > min_target_voxels]
        candidates = [i for i in large if scene.kinds[i] != "distractor"] or large
        if candidates:
            break
        logger.debug("phantom attempt %d had no object above %d voxels; redrawing", attempt, min_target_voxels)
    else:
        raise RuntimeError(f"no object above {min_target_voxels} voxels after {_MAX_ATTEMPTS} scenes of size {size}")
    target_id = int(rng.choice(candidates))
    image = _render(rng, scene, modality)

    direction = _random_direction(rng)
    spacing_xyz = tuple(float(s) for s in spacing[::-1])
    fov_xyz = np.asarray(size) * np.asarray(spacing_xyz)
    origin = direction @ (-fov_xyz / 2) + rng.uniform(-50.0, 50.0, 3)

    kinds = {i: kind for i, kind in scene.kinds.items() if counts[i] > 0}
    return PhantomArrays(
        image=image,
        instances=scene.instances,
        target_id=target_id,
        kinds=kinds,
        modality=modality,
        spacing=spacing_xyz,
        origin=tuple(float(o) for o in origin),
        direction=direction,
    )
