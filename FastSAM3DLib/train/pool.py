"""A pool of prepared training crops, built once and read by every training step.

Making a training sample (a phantom scene, a resampled and augmented Colin27 crop) costs about a
second of CPU; a training step on two cores costs about as much. So samples are made ahead of time
into a cache folder (outside the repository) and training only reads them:

``<pool>/index.jsonl``                one JSON line per entry: id, source, structure, label voxels
``<pool>/<id>_image.npy``             128^3 float16, the normalised model input (model order i, j, k)
``<pool>/<id>_label.npy``             128^3 uint8 0/1, the target

Every entry is made exactly as the interactive session prepares an image: resampled onto a
:class:`~FastSAM3DLib.preprocess.CropGrid` (1.5 mm, canonical orientation, 128^3) with
:func:`~FastSAM3DLib.preprocess.resample_to_crop` (phantoms with the same resampling in SciPy,
:func:`~FastSAM3DLib.train.live.draw_phantom_crop`, which a GPU machine without SimpleITK also runs),
augmented (:func:`FastSAM3DLib.data.augment`), then normalised with
:func:`~FastSAM3DLib.preprocess.normalize_crop`. Crops are centred near the
label, jittered so that its bounding box stays inside. Labels with at most ``min_voxels`` voxels
in the crop are skipped (DESIGN.md §5). Entry ``i`` is drawn from ``numpy.random.default_rng((seed, i))``,
so a pool is reproducible and can be extended later by running the builder again.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from ..preprocess import CropGrid, IntensitySettings, image_padding_value, normalize_crop, resample_to_crop
from .live import draw_phantom_crop, jittered_center
from .paths import DEFAULT_POOL

logger = logging.getLogger(__name__)

INDEX_NAME = "index.jsonl"
SOURCES = ("colin27", "phantom")


@dataclass(frozen=True)
class PoolSpec:
    """What a pool holds.

    Attributes:
      size: number of entries to have in the pool.
      phantom_fraction: share of entries made from procedural phantoms; the rest are Colin27.
      structures: Colin27 structures to crop (None: ``TRAIN_STRUCTURES``; never the held-out ones
        unless named here).
      min_voxels: labels with at most this many voxels in the 128^3 crop are skipped.
      augment: apply :func:`FastSAM3DLib.data.augment` to every crop.
      ct_window_fraction: share of CT phantoms normalised with the CT window instead of the MR rule.
      seed: entry ``i`` uses ``default_rng((seed, i))``.
    """

    size: int = 400
    phantom_fraction: float = 0.5
    structures: Optional[Tuple[str, ...]] = None
    min_voxels: int = 1000
    augment: bool = True
    ct_window_fraction: float = 0.5
    seed: int = 0


def label_bbox_lps(label: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS bounding box of a mask's voxel centres (min corner, max corner)."""
    array = sitk.GetArrayViewFromImage(label)
    nonzero = np.nonzero(array)
    if not nonzero[0].size:
        raise ValueError("empty label has no bounding box")
    lo = [int(a.min()) for a in reversed(nonzero)]
    hi = [int(a.max()) for a in reversed(nonzero)]
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])], dtype=float)
    physical = np.array([label.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    return physical.min(axis=0), physical.max(axis=0)


def prepare_crop(
    image: sitk.Image,
    label: sitk.Image,
    rng: np.random.Generator,
    *,
    augment_crop: bool = True,
    intensity: IntensitySettings = IntensitySettings(),
    center_lps: Optional[Sequence[float]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """One training crop of an image and binary label, as the session would see it.

    Arguments:
      image, label: SimpleITK images on one grid (any spacing, orientation).
      rng: the generator (jitter and augmentation).
      augment_crop: apply :func:`FastSAM3DLib.data.augment` before normalisation.
      intensity: the normalisation settings (MR rule or CT window).
      center_lps: crop centre; None jitters around the label's bounding box.

    Returns:
      (image, label): 128^3 float32 normalised input and uint8 0/1 label, model order (i, j, k).
    """
    if center_lps is None:
        center_lps = jittered_center(*label_bbox_lps(label), rng)
    crop = CropGrid.around(center_lps)
    raw = resample_to_crop(image, crop, default=image_padding_value(image, intensity))  # padded as the session pads
    target = resample_to_crop(sitk.Cast(label, sitk.sitkFloat32), crop) >= 0.5
    if augment_crop:
        from ..data.augment import augment

        raw, target = augment(raw, target, rng)
    return normalize_crop(raw, intensity), np.asarray(target, dtype=np.uint8)


class _Sources:
    """Lazily loaded source volumes, one copy per process."""

    colin = None

    @classmethod
    def colin27(cls):
        if cls.colin is None:
            from ..data.colin27 import load_colin27

            cls.colin = load_colin27()
        return cls.colin


def make_entry(spec: PoolSpec, index: int, max_tries: int = 8) -> Optional[Tuple[np.ndarray, np.ndarray, Dict]]:
    """Entry ``index`` of a pool: (image float32, label uint8, description), or None if every try was too small."""
    from ..data.colin27 import TRAIN_STRUCTURES

    rng = np.random.default_rng((spec.seed, index))
    structures = tuple(spec.structures) if spec.structures else TRAIN_STRUCTURES
    for _ in range(max_tries):
        if rng.random() < spec.phantom_fraction:
            image, label, name = draw_phantom_crop(rng, min_voxels=spec.min_voxels, ct_window_fraction=spec.ct_window_fraction,
                                                   augment_crop=spec.augment)
            info = {"source": "phantom", "structure": name.split(":", 1)[1]}
        else:
            colin = _Sources.colin27()
            structure = str(structures[int(rng.integers(len(structures)))])
            image, label = prepare_crop(colin.image, colin.labels[structure], rng, augment_crop=spec.augment)
            info = {"source": "colin27", "structure": structure}
        voxels = int(label.sum())
        if voxels > spec.min_voxels:
            return image, label, {**info, "voxels": voxels}
    logger.warning("pool entry %d: no label above %d voxels after %d tries; skipped", index, spec.min_voxels, max_tries)
    return None


def read_index(pool_dir: str | os.PathLike) -> List[Dict]:
    """The entries of a pool (complete ones only), in the order they were written."""
    path = Path(pool_dir) / INDEX_NAME
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written by a concurrent builder
                continue
    return entries


def load_entry(pool_dir: str | os.PathLike, entry: Dict, mmap: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(image float16 128^3, label uint8 128^3) of one pool entry (memory-mapped by default)."""
    pool_dir = Path(pool_dir)
    mode = "r" if mmap else None
    return (
        np.load(pool_dir / f"{entry['id']}_image.npy", mmap_mode=mode),
        np.load(pool_dir / f"{entry['id']}_label.npy", mmap_mode=mode),
    )


def _write_entry(pool_dir: Path, entry_id: str, image: np.ndarray, label: np.ndarray) -> None:
    for suffix, array in (("image", image.astype(np.float16)), ("label", label.astype(np.uint8))):
        final = pool_dir / f"{entry_id}_{suffix}.npy"
        tmp = pool_dir / f".{entry_id}_{suffix}.tmp.npy"
        np.save(tmp, array)
        os.replace(tmp, final)


def _worker(args: Tuple[PoolSpec, int]) -> Tuple[int, Optional[Tuple[np.ndarray, np.ndarray, Dict]]]:
    spec, index = args
    return index, make_entry(spec, index)


def build_pool(
    pool_dir: str | os.PathLike = DEFAULT_POOL, spec: PoolSpec = PoolSpec(), workers: int = 1, progress: bool = True
) -> List[Dict]:
    """Fill ``pool_dir`` up to ``spec.size`` entries (entries already there are kept).

    Arguments:
      pool_dir: the cache folder (created).
      spec: what to put in it; also written to ``spec.json`` beside the index.
      workers: processes making entries in parallel.
      progress: show a tqdm bar.

    Returns:
      the pool's index entries.
    """
    pool_dir = Path(pool_dir)
    pool_dir.mkdir(parents=True, exist_ok=True)
    (pool_dir / "spec.json").write_text(json.dumps(spec.__dict__, indent=2, default=list) + "\n")
    done = {int(e["index"]) for e in read_index(pool_dir)}
    todo = [i for i in range(spec.size) if i not in done]
    logger.info("pool %s: %d entries present, making %d", pool_dir, len(done), len(todo))
    bar = tqdm(total=len(todo), desc="pool", unit="crop", disable=not progress)
    with open(pool_dir / INDEX_NAME, "a") as index_file:

        def store(index: int, made: Optional[Tuple[np.ndarray, np.ndarray, Dict]]) -> None:
            bar.update(1)
            if made is None:
                return
            image, label, info = made
            entry_id = f"{spec.seed:03d}_{index:06d}"
            _write_entry(pool_dir, entry_id, image, label)
            index_file.write(json.dumps({"id": entry_id, "index": index, **info}) + "\n")
            index_file.flush()

        jobs: Iterable = ((spec, i) for i in todo)
        if workers > 1:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for index, made in pool.imap_unordered(_worker, jobs):
                    store(index, made)
        else:
            for job in jobs:
                store(*_worker(job))
    bar.close()
    return read_index(pool_dir)
