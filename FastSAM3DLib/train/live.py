"""Training crops made on the fly from whole labelled volumes, on the training device.

A pool (:mod:`.pool`) is made ahead of time on the CPU with SimpleITK. This makes a fresh crop for
every sample with PyTorch alone, on the device that trains: a crop grid like the session's
(:class:`~FastSAM3DLib.preprocess.CropGrid`: 128^3 voxels of 1.5 mm along R, A, S) centred near the
label as :func:`jittered_center` places it, turned and scaled about its centre (sometimes with a
smooth elastic displacement), sampled with ``grid_sample`` (linear; the label linear then >= 0.5, as
:func:`~FastSAM3DLib.train.pool.prepare_crop` does), flipped, changed in intensity as
:func:`FastSAM3DLib.data.augment` does, and normalised like the session's input. On a GPU a crop
costs milliseconds, and neither SimpleITK nor a pool on disk is needed: what a borrowed GPU
machine without SimpleITK and with little room for data can run (``Testing/device_train.sh``).

The volumes come from a pack written by :func:`write_pack` (``fastsam3d train pack``): one ``.npz``
with the image in model order (i, j, k along R, A, S) on a 1 mm grid, its structures as the bits of
one integer array, their names, which of them are the held-out group of the generalisation check, and
the LPS position of voxel (0, 0, 0) (pack millimetres ``p`` are at LPS ``origin_lps + (-p0, -p1, p2)``).

Procedural phantoms, the other half of the pool, cannot be packed: :class:`PhantomFeed` makes them
in worker processes on the training machine's CPU cores (:func:`phantom_crop`: NumPy and SciPy, the
pool's recipe) and hands them out from a buffer on the device, so the device never waits for them.
"""

from __future__ import annotations

import math
import multiprocessing
import queue
import traceback
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..crops import (
    CANONICAL_DIRECTION,
    CROP_SIZE,
    CROP_SPACING,
    ELASTIC_MAX_VOX,
    P_AFFINE,
    P_BIAS,
    P_ELASTIC,
    P_FLIP,
    P_GAMMA,
    P_LOW_RESOLUTION,
    P_NOISE,
    P_SCALE_SHIFT,
    IntensitySettings,
    normalize_crop,
    padding_value,
    random_affine,
)

PACK_SPACING = 1.0
PHANTOM_MIN_VOXELS = 500  # label voxels a phantom crop keeps, as in the pool that trained the campaign file


def jittered_center(
    bbox_min: np.ndarray, bbox_max: np.ndarray, rng: np.random.Generator, max_jitter_mm: float = 40.0
) -> np.ndarray:
    """A crop centre near a label's bounding box (mm) that keeps the box inside the crop when it fits.

    The jitter along each axis is uniform within ``max_jitter_mm`` and the room the box leaves
    in a 128^3 crop of 1.5 mm voxels (less a 4 mm margin).
    """
    center = (bbox_min + bbox_max) / 2.0
    half_extent = np.abs(bbox_max - bbox_min) / 2.0
    room = np.clip(CROP_SIZE * CROP_SPACING / 2.0 - half_extent - 4.0, 0.0, max_jitter_mm)
    return center + rng.uniform(-1.0, 1.0, 3) * room


def write_pack(path: str | Path) -> Dict[str, object]:
    """Write Colin27 (Debian ``mricron-data``) and its structures as a pack for :class:`LiveCrops`.

    The T1 and each structure mask are resampled with SimpleITK onto a 1 mm grid whose index axes
    point to R, A, S (the session's crop orientation), linearly (masks then >= 0.5). The file is
    written beside ``path`` and renamed into place.

    Returns:
      a summary: path, shape, structures.

    Raises:
      ValueError: ``path`` does not end in ``.npz``, or a structure is empty on the pack grid.
    """
    import SimpleITK as sitk

    from ..data.colin27 import HELDOUT_STRUCTURES, STRUCTURES, load_colin27
    from ..staging import StagedFile, commit_staged

    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: a pack is an .npz file; expected a name like colin27-pack.npz")
    colin = load_colin27()
    image = colin.image
    size = np.asarray(image.GetSize())
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint([float(c) for c in (size - 1) * np.array(b)])
                        for b in np.ndindex(2, 2, 2)])
    # Model-order index axes (R, A, S) are -x, -y, +z in LPS: start at the corner with the largest x, y.
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    origin = np.array([hi[0], hi[1], lo[2]])
    shape = np.floor((hi - lo) / PACK_SPACING).astype(int) + 1
    reference = sitk.Image([int(v) for v in shape], sitk.sitkUInt8)
    reference.SetSpacing([PACK_SPACING] * 3)
    reference.SetOrigin(origin.tolist())
    reference.SetDirection(CANONICAL_DIRECTION.flatten().tolist())

    def on_grid(volume: sitk.Image) -> np.ndarray:
        out = sitk.Resample(volume, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return np.ascontiguousarray(sitk.GetArrayViewFromImage(out).transpose(2, 1, 0))

    names = [name for name in STRUCTURES if name in colin.labels]
    bits = np.zeros(tuple(shape), dtype=np.int32)
    for index, name in enumerate(names):
        mask = on_grid(sitk.Cast(colin.labels[name], sitk.sitkFloat32)) >= 0.5
        if not mask.any():
            raise ValueError(f"Colin27 structure {name}: no voxel on the pack grid")
        bits |= mask.astype(np.int32) << index
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(
        image=on_grid(image).astype(np.float32), bits=bits, names=np.array(names),
        heldout=np.array([name in HELDOUT_STRUCTURES for name in names]), spacing=np.float32(PACK_SPACING),
        origin_lps=origin, source=np.array("Colin27 (MNI ch2) T1 + AAL structures + brain mask, Debian mricron-data"),
    )
    stage = StagedFile(path)
    try:
        stage.write(lambda tmp: np.savez_compressed(tmp, **arrays))
        commit_staged([stage])
    finally:
        stage.discard()
    return {"path": str(path), "shape": [int(v) for v in shape], "structures": names}


class LiveCrops:
    """Random augmented training crops of a pack's structures, made on ``device``.

    Arguments:
      pack: a file written by :func:`write_pack`.
      device: where the volumes live and the crops are made.
      heldout: leave out the pack's held-out structures (the generalisation check).
      structures: only these structures (None: all the pack has, less the held-out ones with ``heldout``).
      weights: how often each structure is drawn, relative to 1 for those not named (e.g. less of the
        brain: a pool with phantoms has few large targets, and the IoU head learns that prior).
      augment: spatial and intensity augmentation (off: the plain crop, for checks).
      min_volume_mm3: a crop whose label covers at most this volume is drawn again (DESIGN.md §5
        skips labels of at most 1000 voxels of 1 mm).

    Raises:
      ValueError: the pack lacks a field or a named structure, or no structure is left.
    """

    def __init__(
        self, pack: str | Path, device: torch.device | str = "cpu", *, heldout: bool = True,
        structures: Optional[Sequence[str]] = None, weights: Optional[Dict[str, float]] = None,
        augment: bool = True, min_volume_mm3: float = 1000.0,
    ) -> None:
        with np.load(pack, allow_pickle=False) as data:
            missing = {"image", "bits", "names", "heldout", "spacing"} - set(data.files)
            if missing:
                raise ValueError(f"{pack}: not a training pack (missing {', '.join(sorted(missing))})")
            names = [str(n) for n in data["names"]]
            held = dict(zip(names, (bool(h) for h in data["heldout"])))
            image, bits, spacing = data["image"], data["bits"], float(data["spacing"])
        unknown = [s for s in list(structures or []) + list(weights or {}) if s not in held]
        if unknown:
            raise ValueError(f"{pack}: no structure {', '.join(unknown)}; it has {', '.join(names)}")
        chosen = list(structures) if structures is not None else [n for n in names if not (heldout and held[n])]
        chosen = [n for n in chosen if (weights or {}).get(n, 1.0) > 0]
        if not chosen:
            raise ValueError(f"{pack}: no structure left to train on")
        self.device = torch.device(device)
        self.structures = chosen
        self.augment, self.spacing = augment, spacing
        self.min_voxels = min_volume_mm3 / CROP_SPACING**3  # in crop voxels
        draw = np.array([(weights or {}).get(n, 1.0) for n in chosen], dtype=np.float64)
        self._draw = draw / draw.sum()
        self._bit = {name: names.index(name) for name in chosen}
        self._image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(self.device)[None, None]
        self._bits = torch.from_numpy(np.ascontiguousarray(bits)).to(self.device)
        self._boxes: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        for name in chosen:
            inside = np.nonzero((bits >> self._bit[name]) & 1)
            self._boxes[name] = (np.array([a.min() for a in inside]) * spacing, np.array([a.max() for a in inside]) * spacing)
        self.shape = tuple(int(n) for n in image.shape)

    def sample(self, batch_size: int, rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
        """``batch_size`` crops: images and 0/1 targets B x 1 x 128^3 (float32, on the device), and their structures.

        A crop whose label is too small (augmentation moved it out, or shrank it) is replaced by a
        new draw, of any structure.

        Raises:
          RuntimeError: 32 draws in a row were too small (the pack's structures are, for these settings).
        """
        images, targets, names = [], [], []
        for _ in range(batch_size):
            for _ in range(32):
                name = self.structures[int(rng.choice(len(self.structures), p=self._draw))]
                image, target = self.crop(name, rng)
                if float(target.sum()) > self.min_voxels:
                    break
            else:
                raise RuntimeError(f"32 crops in a row had labels of at most {self.min_voxels:.0f} voxels")
            images.append(image)
            targets.append(target)
            names.append(name)
        return torch.stack(images)[:, None], torch.stack(targets)[:, None], names

    def crop(self, name: str, rng: np.random.Generator, center_mm: Optional[Sequence[float]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """One crop of structure ``name``: (normalised image, 0/1 target), each 128^3 float32 in model order.

        ``center_mm`` (in the pack's frame: voxel index times spacing) places the crop's voxel
        (64, 64, 64); None jitters it around the structure.
        """
        center = np.asarray(center_mm, dtype=np.float64) if center_mm is not None else jittered_center(*self._boxes[name], rng)
        matrix = np.eye(3)
        elastic = self.augment and rng.random() < P_ELASTIC
        if elastic or (self.augment and rng.random() < P_AFFINE):
            matrix = random_affine(rng)
        # Crop voxel u sits at center + matrix @ (u - 64) * 1.5 mm (CropGrid.around puts voxel 64 at the centre).
        offsets = (torch.arange(CROP_SIZE, device=self.device, dtype=torch.float32) - CROP_SIZE // 2) * CROP_SPACING
        grid = torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij"), dim=-1)  # 128^3 x 3 (mm)
        grid = grid @ torch.as_tensor(matrix.T, dtype=torch.float32, device=self.device)
        if elastic:
            magnitude = rng.uniform(1.0, ELASTIC_MAX_VOX) * CROP_SPACING
            correlation = rng.uniform(16.0, 32.0)
            field = torch.stack([_smooth_noise(rng, correlation, self.device) for _ in range(3)], dim=-1)
            grid = grid + magnitude * field
        position = (grid + torch.as_tensor(center, dtype=torch.float32, device=self.device)) / self.spacing  # pack voxels
        sizes = torch.tensor(self.shape, dtype=torch.float32, device=self.device)
        normalised = (2.0 * position / (sizes - 1) - 1.0).flip(-1)[None]  # grid_sample wants (x, y, z) = (k, j, i)
        # As SimpleITK resamples the session's crops: edge values up to half a voxel out, zero beyond.
        inside = ((position >= -0.5) & (position <= sizes - 0.5)).all(dim=-1)
        image = F.grid_sample(self._image, normalised, mode="bilinear", padding_mode="border", align_corners=True)[0, 0] * inside
        mask = ((self._bits >> self._bit[name]) & 1).to(torch.float32)[None, None]
        target = (F.grid_sample(mask, normalised, mode="bilinear", padding_mode="border", align_corners=True)[0, 0] >= 0.5) & inside
        if self.augment:
            flips = [axis for axis in range(3) if rng.random() < P_FLIP]
            if flips:
                image, target = image.flip(flips), target.flip(flips)
            image = _intensity(image, rng)
        return _normalize(image), target.to(torch.float32)


def _smooth_noise(rng: np.random.Generator, correlation_vox: float, device: torch.device) -> torch.Tensor:
    """A smooth random field on the 128^3 crop, zero mean and unit variance, correlated over about
    ``correlation_vox`` voxels: white noise on a coarse lattice, interpolated linearly."""
    nodes = max(2, int(math.ceil(CROP_SIZE / correlation_vox)) + 1)
    coarse = torch.from_numpy(rng.standard_normal((1, 1, nodes, nodes, nodes), dtype=np.float32)).to(device)
    field = F.interpolate(coarse, size=(CROP_SIZE,) * 3, mode="trilinear", align_corners=True)[0, 0]
    return (field - field.mean()) / field.std().clamp_min(1e-6)


def _intensity(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The intensity changes of :func:`FastSAM3DLib.data.augment` on one 128^3 crop."""
    low, high = float(image.min()), float(image.max())
    spread = float(image.std()) or 1.0
    if rng.random() < P_GAMMA and high > low:
        gamma = math.exp(rng.uniform(-0.4, 0.4))
        image = low + (high - low) * ((image - low) / (high - low)) ** gamma
    if rng.random() < P_BIAS:
        strength = rng.uniform(0.05, 0.3)
        image = low + (image - low) * torch.exp(strength * _smooth_noise(rng, rng.uniform(48.0, 96.0), image.device))
    if rng.random() < P_SCALE_SHIFT:
        image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1) * spread
    if rng.random() < P_LOW_RESOLUTION:
        factor = np.ones(3)
        if rng.random() < 0.5:
            factor[:] = rng.uniform(1.5, 3.0)
        else:
            factor[int(rng.integers(0, 3))] = rng.uniform(2.0, 4.0)
        small = F.interpolate(image[None, None], size=[max(2, int(round(CROP_SIZE / f))) for f in factor], mode="trilinear", align_corners=False)
        image = F.interpolate(small, size=(CROP_SIZE,) * 3, mode="trilinear", align_corners=False)[0, 0]
    if rng.random() < P_NOISE:  # drawn on the device (no 8 MB copy per crop), seeded from rng
        generator = torch.Generator(device=image.device).manual_seed(int(rng.integers(2**62)))
        noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
        image = image + noise * rng.uniform(0.0, 0.1) * spread
    return image


def _normalize(image: torch.Tensor) -> torch.Tensor:
    """Z-normalise over the voxels > 0 (or, with none, those above the minimum), as the session does
    (:func:`FastSAM3DLib.crops.normalize_crop`, MR rule); a crop of one value gives zeros."""
    foreground = image > 0
    if not bool(foreground.any()):
        foreground = image > image.min()
        if not bool(foreground.any()):
            return torch.zeros_like(image)
    values = image[foreground]
    return (image - values.mean()) / values.std(unbiased=False).clamp_min(1e-8)


# -- phantoms -----------------------------------------------------------------------------------


def phantom_crop(
    rng: np.random.Generator, *, min_voxels: int = PHANTOM_MIN_VOXELS, ct_window_fraction: float = 0.5,
    augment_crop: bool = True, max_tries: int = 8,
) -> Tuple[np.ndarray, np.ndarray, str]:
    """One training crop of a new procedural phantom whose label keeps more than ``min_voxels`` voxels.

    Raises:
      RuntimeError: ``max_tries`` phantoms in a row left at most ``min_voxels`` label voxels in the crop.

    See :func:`draw_phantom_crop`, which makes each try.
    """
    for _ in range(max_tries):
        image, label, name = draw_phantom_crop(rng, min_voxels=min_voxels, ct_window_fraction=ct_window_fraction, augment_crop=augment_crop)
        if int(label.sum()) > min_voxels:
            return image, label, name
    raise RuntimeError(f"{max_tries} phantoms in a row left at most {min_voxels} label voxels in their crop")


def draw_phantom_crop(
    rng: np.random.Generator, *, min_voxels: int = PHANTOM_MIN_VOXELS, ct_window_fraction: float = 0.5,
    augment_crop: bool = True,
) -> Tuple[np.ndarray, np.ndarray, str]:
    """A crop of a new procedural phantom, made as the pool makes its phantom entries, without SimpleITK.

    The phantom (:func:`~FastSAM3DLib.data.phantoms.make_phantom_arrays`, a target of more than
    ``min_voxels`` voxels) is resampled onto a session crop grid centred near its target as
    :func:`jittered_center` places it (linear; the label linear then >= 0.5; edge values up to half
    a voxel out, as SimpleITK resamples, and beyond them what the session pads with:
    :func:`~FastSAM3DLib.crops.padding_value`), augmented with
    :func:`FastSAM3DLib.data.augment`, and normalised with the MR rule or, for a share
    ``ct_window_fraction`` of CT phantoms, the CT window. The generator is drawn from in the pool's
    order, so the pool's entries are these crops.

    Returns:
      (image 128^3 float32 normalised, label 128^3 uint8 0/1, description "phantom:<modality>:<kind>"),
      model order (i, j, k). The label may have been cropped or augmented down to few voxels.
    """
    from scipy import ndimage

    from ..data.augment import augment
    from ..data.phantoms import make_phantom_arrays

    phantom = make_phantom_arrays(rng, size=None, min_target_voxels=min_voxels)
    ct = phantom.modality == "ct" and rng.random() < ct_window_fraction
    label = phantom.label
    to_lps = phantom.direction * np.asarray(phantom.spacing, dtype=np.float64)[None, :]  # index (x, y, z) -> LPS offset
    inside = np.nonzero(label)
    low = np.array([a.min() for a in reversed(inside)], dtype=np.float64)
    high = np.array([a.max() for a in reversed(inside)], dtype=np.float64)
    corners = np.array([np.where(b, high, low) for b in np.ndindex(2, 2, 2)]) @ to_lps.T + np.asarray(phantom.origin)
    center = jittered_center(corners.min(axis=0), corners.max(axis=0), rng)
    crop_origin = center - CANONICAL_DIRECTION @ np.full(3, CROP_SPACING * (CROP_SIZE // 2))
    # Crop index u (i, j, k) -> phantom index (x, y, z) = A u + b; the phantom's arrays are indexed (z, y, x).
    from_lps = np.linalg.inv(to_lps)
    matrix = (from_lps @ CANONICAL_DIRECTION * CROP_SPACING)[::-1]
    offset = (from_lps @ (crop_origin - np.asarray(phantom.origin)))[::-1]
    shape = (CROP_SIZE,) * 3
    axes = np.arange(CROP_SIZE, dtype=np.float64)
    within = np.ones(shape, dtype=bool)
    for a, n in enumerate(label.shape):
        position = (matrix[a, 0] * axes[:, None, None] + matrix[a, 1] * axes[None, :, None]
                    + matrix[a, 2] * axes[None, None, :] + offset[a])
        within &= (position >= -0.5) & (position <= n - 0.5)
    settings = IntensitySettings(mode="ct") if ct else IntensitySettings()
    outside = padding_value(float(phantom.image.min()), float(phantom.image.max()), settings)  # as the session pads
    raw = np.where(within, ndimage.affine_transform(phantom.image, matrix, offset, output_shape=shape, order=1, mode="nearest"),
                   np.float32(outside))
    target = (ndimage.affine_transform(label.astype(np.float32), matrix, offset, output_shape=shape, order=1,
                                       mode="nearest") >= 0.5) & within
    if augment_crop:
        raw, target = augment(raw.astype(np.float32), target, rng)
    image = normalize_crop(raw, settings)
    return image, target.astype(np.uint8), f"phantom:{phantom.modality}:{phantom.kinds.get(phantom.target_id, '?')}"


def _phantom_worker(out: "multiprocessing.Queue", seed: Tuple[int, ...], worker: int) -> None:
    """Put phantom crops on ``out`` until the parent process is gone (crop ``n`` of worker ``w`` from
    the generator (*seed, w, n)); a crop that fails is reported and skipped, ten in a row end the worker."""
    parent = multiprocessing.parent_process()
    failures = 0
    for number in range(2**62):
        try:
            image, label, name = phantom_crop(np.random.default_rng((*seed, worker, number)))
        except Exception:  # one bad phantom must not end the feed; ten in a row is a broken worker
            traceback.print_exc()
            failures += 1
            if failures == 10:
                raise
            continue
        failures = 0
        item = (image.astype(np.float16), np.packbits(label), name)
        while True:
            try:
                out.put(item, timeout=5.0)
                break
            except queue.Full:
                if parent is not None and not parent.is_alive():
                    return


class PhantomFeed:
    """Phantom training crops made by worker processes while the device trains.

    Workers (:func:`phantom_crop`, about 0.6 s of one CPU core each) fill a queue; :meth:`sample`
    moves what has arrived into a buffer of the ``buffer`` newest crops on ``device`` and draws from
    it (uniformly, randomly flipped), so a step never waits for the workers once the buffer holds
    a crop per worker. Crops are reused when the workers make fewer than are drawn: ``received`` and
    ``drawn`` count both.

    Arguments:
      workers: worker processes (e.g. the machine's cores less two).
      device: where the buffer lives and the crops are returned.
      seed: integers the workers' crops are reproducible from (their interleaving is not).
      buffer: crops kept for reuse.

    Use as a context manager, or call :meth:`close`: the workers are stopped there (and stop by
    themselves when this process is gone).
    """

    def __init__(self, workers: int, device: torch.device | str = "cpu", *, seed: Sequence[int] = (0,), buffer: int = 64) -> None:
        if workers < 1 or buffer < 1:
            raise ValueError(f"a phantom feed needs at least one worker and a buffer of one crop, got {workers}, {buffer}")
        self.device = torch.device(device)
        self.capacity = buffer
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds a CUDA context
        self._queue = context.Queue(maxsize=2 * workers)
        seed = tuple(int(v) for v in seed)
        self._workers = [context.Process(target=_phantom_worker, args=(self._queue, seed, w), daemon=True) for w in range(workers)]
        for process in self._workers:
            process.start()
        self._crops: List[Tuple[torch.Tensor, torch.Tensor, str]] = []
        self._next = 0  # the buffer slot the next arrival replaces
        self._lost = 0  # workers known to have exited
        self.received = 0
        self.drawn = 0

    def _check_workers(self) -> None:
        """Raise when every worker has exited; warn once per newly exited one."""
        exited = [process for process in self._workers if not process.is_alive()]
        if len(exited) == len(self._workers):
            codes = ", ".join(str(process.exitcode) for process in self._workers)
            raise RuntimeError(f"every phantom worker has exited (exit codes {codes}); their errors are printed above")
        if len(exited) > self._lost:
            self._lost = len(exited)
            warnings.warn(f"{len(exited)} of {len(self._workers)} phantom workers have exited; the others go on", RuntimeWarning)

    def _get(self, block: bool):
        """The next crop from the queue; None when not blocking and there is none."""
        waited = 0.0
        while True:
            try:
                return self._queue.get(block=block, timeout=5.0 if block else None)
            except queue.Empty:
                if not block:
                    return None
            waited += 5.0
            self._check_workers()
            if waited >= 600:
                raise RuntimeError("no phantom crop arrived in 10 minutes: the feed's workers are stuck")

    def _receive(self, wanted: int) -> None:
        """Move every crop that has arrived into the buffer, waiting until it holds ``wanted``."""
        while True:
            item = self._get(block=len(self._crops) < wanted)
            if item is None:
                return
            image, bits, name = item
            label = np.unpackbits(bits, count=CROP_SIZE**3).reshape((CROP_SIZE,) * 3)
            crop = (torch.from_numpy(image).to(self.device), torch.from_numpy(label).to(self.device, torch.bool), name)
            if len(self._crops) < self.capacity:
                self._crops.append(crop)
            else:
                self._crops[self._next] = crop
                self._next = (self._next + 1) % self.capacity
            self.received += 1

    def sample(self, batch_size: int, rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
        """``batch_size`` crops: images and 0/1 targets B x 1 x 128^3 (float32, on the device), and their names.

        The first call waits for a crop from each worker (or a full buffer), so early batches vary too.
        """
        self._check_workers()
        self._receive(wanted=min(len(self._workers), self.capacity))
        images, targets, names = [], [], []
        for _ in range(batch_size):
            image, target, name = self._crops[int(rng.integers(len(self._crops)))]
            flips = [axis for axis in range(3) if rng.random() < P_FLIP]
            images.append(image.flip(flips) if flips else image)
            targets.append(target.flip(flips) if flips else target)
            names.append(name)
        self.drawn += batch_size
        return torch.stack(images).float()[:, None], torch.stack(targets).float()[:, None], names

    def close(self) -> None:
        for process in self._workers:
            if process.is_alive():
                process.terminate()
        for process in self._workers:
            process.join(timeout=10)
        self._queue.close()
        self._queue.cancel_join_thread()

    def __enter__(self) -> "PhantomFeed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
