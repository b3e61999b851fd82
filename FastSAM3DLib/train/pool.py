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
so a pool is reproducible and can be extended later by running the builder again with the same
recipe (``<pool>/spec.json`` records it; another recipe is refused, as its entries would not be
what spec.json says).

The labelled crops come from Colin27 (:mod:`FastSAM3DLib.data.colin27`) or, with ``PoolSpec.data``,
from the user's own imagesTr/labelsTr folders (:mod:`FastSAM3DLib.data.folder`): every label value
of every case is a structure, cropped like Colin27's and normalised with the session's default
(MR) rule.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from ..crops import CROP_SPACING
from ..data.folder import CaseCache, FolderCase
from ..errors import FastSAM3DInputError
from ..preprocess import CropGrid, IntensitySettings, image_padding_value, normalize_crop, resample_to_crop
from .live import draw_phantom_crop, jittered_center
from .paths import DEFAULT_POOL

logger = logging.getLogger(__name__)

INDEX_NAME = "index.jsonl"
SPEC_NAME = "spec.json"
SOURCES = ("colin27", "phantom", "data")


@dataclass(frozen=True)
class PoolSpec:
    """What a pool holds.

    Attributes:
      size: number of entries to have in the pool.
      phantom_fraction: share of entries made from procedural phantoms; the rest are labelled crops,
        each of a structure drawn uniformly from those of ``colin27`` and ``data``.
      structures: Colin27 structures to crop (None: ``TRAIN_STRUCTURES``; never the held-out ones
        unless named here).
      colin27: crop Colin27's ``structures``.
      data: imagesTr/labelsTr folders (absolute paths) whose label values are structures too (see
        :func:`scan_data`).
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
    colin27: bool = True
    data: Tuple[str, ...] = ()


@dataclass(frozen=True)
class DataTarget:
    """One label value of one case of a user's folder: a structure of the pool."""

    case: FolderCase
    value: int
    name: str


def looks_like_dataset(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a labelled dataset (``imagesTr/`` or ``labelsTr/``) rather than a pool."""
    return any((Path(folder) / name).is_dir() for name in ("imagesTr", "labelsTr"))


def empty_pool_error(pool_dir: str | os.PathLike) -> FastSAM3DInputError:
    """The error for a pool with no usable entry, saying how to make one."""
    pool_dir = Path(pool_dir)
    if looks_like_dataset(pool_dir):
        return FastSAM3DInputError(
            f"{pool_dir} is a labelled dataset (imagesTr/, labelsTr/), not a pool of prepared crops: make its crops into a "
            f"folder of their own, e.g. `fastsam3d train pool --data {pool_dir} --out {DEFAULT_POOL / pool_dir.name}`, "
            "and pass that folder as --pool"
        )
    if read_index(pool_dir):
        return FastSAM3DInputError(f"{pool_dir}: every entry of the pool is a held-out Colin27 structure; "
                                   "train on them with --include-heldout, or add other crops to the pool")
    return FastSAM3DInputError(f"{pool_dir}: the training pool is empty; build it with `fastsam3d train pool --out {pool_dir}`")


def read_spec(pool_dir: str | os.PathLike) -> Optional[PoolSpec]:
    """The recipe a pool was built with (its ``spec.json``), or None if it has none."""
    path = Path(pool_dir) / SPEC_NAME
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FastSAM3DInputError(f"{path}: not valid JSON ({error})") from None
    names = {f.name for f in dataclasses.fields(PoolSpec)}
    values = {k: v for k, v in recorded.items() if k in names}
    for key in ("structures", "data"):  # JSON lists
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    return PoolSpec(**values)


def _settled_spec(pool_dir: Path, spec: PoolSpec) -> PoolSpec:
    """The spec.json to write for filling ``pool_dir`` with ``spec``: refuses another recipe for a
    pool that has entries, and keeps the larger size (the entries that are there stay)."""
    if not read_index(pool_dir):
        return spec
    recorded = read_spec(pool_dir)
    if recorded is None:
        raise FastSAM3DInputError(f"{pool_dir}: holds pool entries but no {SPEC_NAME}, so what they are is unknown; "
                                  "build the pool in a new folder (another --out)")
    differing = [f.name for f in dataclasses.fields(PoolSpec)
                 if f.name != "size" and getattr(recorded, f.name) != getattr(spec, f.name)]
    if differing:
        listed = "; ".join(f"{name}: {getattr(recorded, name)!r} there, {getattr(spec, name)!r} asked" for name in differing)
        raise FastSAM3DInputError(f"{pool_dir} was built with another recipe ({listed}); extend it with the settings it was "
                                  "built with, or build a pool of these in another folder (another --out)")
    return dataclasses.replace(spec, size=max(spec.size, recorded.size))


def scan_data(folders: Sequence[str | os.PathLike], min_voxels: int, progress: bool = True) -> List[DataTarget]:
    """The structures of imagesTr/labelsTr folders: every label value of every case (but one named
    "ignore" in the folder's dataset.json) that could fill more than ``min_voxels`` voxels of a
    crop's 1.5 mm grid.

    Every label map is read and every image's header checked here, so that a bad file is reported
    before any crop is made; the images are read when their crops are made.

    Raises:
      FastSAM3DInputError: a folder that is not a readable dataset (the message names the file).
    """
    from ..data.folder import checked_label_maps, read_label_names, target_values

    targets: List[DataTarget] = []
    skipped = 0
    for folder in folders:
        try:
            names = read_label_names(folder)
            for case, label in checked_label_maps(folder, progress, desc=f"labels of {Path(folder).name}"):
                crop_voxels_per_voxel = math.prod(label.GetSpacing()) / CROP_SPACING**3
                for value, count in target_values(label, names):
                    if count * crop_voxels_per_voxel <= min_voxels:
                        skipped += 1
                        continue
                    targets.append(DataTarget(case, int(value), names.get(int(value), f"label {int(value)}")))
        except FastSAM3DInputError:
            raise
        except (OSError, ValueError) as error:  # a missing folder or file, two images of one case
            raise FastSAM3DInputError(f"--data {folder}: {error}") from None
    logger.info("%d structures in %s; %d skipped (at most %d voxels on the crop grid)",
                len(targets), ", ".join(map(str, folders)), skipped, min_voxels)
    return targets


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
    """Lazily loaded source volumes, one copy per process, and the user data's structures (set in
    each worker process by :func:`_set_targets`) with the case read last."""

    colin = None
    cases = CaseCache()
    targets: Sequence[DataTarget] = ()

    @classmethod
    def colin27(cls):
        if cls.colin is None:
            from ..data.colin27 import load_colin27

            cls.colin = load_colin27()
        return cls.colin

    @classmethod
    def mask(cls, target: DataTarget) -> Tuple[sitk.Image, sitk.Image]:
        """The image of a target's case and the target's 0/1 mask (the case read last is kept)."""
        return cls.cases.read(target.case)[0], cls.cases.mask(target.case, target.value)


def _set_targets(targets: Sequence[DataTarget]) -> None:
    _Sources.targets = targets


def make_entry(
    spec: PoolSpec, index: int, max_tries: int = 8, targets: Sequence[DataTarget] = ()
) -> Optional[Tuple[np.ndarray, np.ndarray, Dict]]:
    """Entry ``index`` of a pool: (image float32, label uint8, description), or None if every try was too small.

    Arguments:
      targets: the structures of ``spec.data`` (:func:`scan_data`).
    """
    from ..data.colin27 import TRAIN_STRUCTURES

    rng = np.random.default_rng((spec.seed, index))
    structures = (tuple(spec.structures) if spec.structures else TRAIN_STRUCTURES) if spec.colin27 else ()
    labelled = [*structures, *targets]  # the Colin27 names first: a pool without data draws as it always did
    for _ in range(max_tries):
        if rng.random() < spec.phantom_fraction or not labelled:
            image, label, name = draw_phantom_crop(rng, min_voxels=spec.min_voxels, ct_window_fraction=spec.ct_window_fraction,
                                                   augment_crop=spec.augment)
            info = {"source": "phantom", "structure": name.split(":", 1)[1]}
        else:
            structure = labelled[int(rng.integers(len(labelled)))]
            if isinstance(structure, DataTarget):
                image, label = prepare_crop(*_Sources.mask(structure), rng, augment_crop=spec.augment)
                info = {"source": "data", "structure": structure.name, "case": structure.case.case_id,
                        "data": str(Path(structure.case.label_path).parent.parent)}
            else:
                colin = _Sources.colin27()
                image, label = prepare_crop(colin.image, colin.labels[str(structure)], rng, augment_crop=spec.augment)
                info = {"source": "colin27", "structure": str(structure)}
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
    return index, make_entry(spec, index, targets=_Sources.targets)


def build_pool(
    pool_dir: str | os.PathLike = DEFAULT_POOL, spec: PoolSpec = PoolSpec(), workers: int = 1, progress: bool = True
) -> List[Dict]:
    """Fill ``pool_dir`` up to ``spec.size`` entries (entries already there are kept).

    Arguments:
      pool_dir: the cache folder (created).
      spec: what to put in it; also written to ``spec.json`` beside the index (with the larger of
        its size and the recorded one).
      workers: processes making entries in parallel.
      progress: show tqdm bars.

    Returns:
      the pool's index entries.

    Raises:
      FastSAM3DInputError: ``pool_dir`` is a labelled dataset, or holds a pool of another recipe
        (the message names the settings that differ), or ``spec`` asks for labelled crops but has
        no structure to crop.
    """
    pool_dir = Path(pool_dir)
    if looks_like_dataset(pool_dir):
        raise FastSAM3DInputError(f"{pool_dir} is a labelled dataset (imagesTr/, labelsTr/): the pool goes into a folder of its "
                                  f"own (e.g. --out {DEFAULT_POOL / pool_dir.name}); the dataset is its --data")
    spec = dataclasses.replace(spec, data=tuple(str(Path(folder).resolve()) for folder in spec.data))
    settled = _settled_spec(pool_dir, spec)
    done = {int(e["index"]) for e in read_index(pool_dir)}
    todo = [i for i in range(spec.size) if i not in done]
    targets = scan_data(spec.data, spec.min_voxels, progress) if spec.data and todo else []
    if todo and spec.phantom_fraction < 1 and not (spec.colin27 or targets):
        raise FastSAM3DInputError(f"{', '.join(spec.data) or 'the pool'}: no structure above {spec.min_voxels} voxels to crop "
                                  "(lower --min-voxels, add --colin27, or make phantoms only with --phantom-fraction 1)")
    pool_dir.mkdir(parents=True, exist_ok=True)
    (pool_dir / SPEC_NAME).write_text(json.dumps(dataclasses.asdict(settled), indent=2) + "\n")
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
            with multiprocessing.get_context("spawn").Pool(workers, initializer=_set_targets, initargs=(targets,)) as pool:
                for index, made in pool.imap_unordered(_worker, jobs):
                    store(index, made)
        else:
            _set_targets(targets)
            for job in jobs:
                store(*_worker(job))
    bar.close()
    return read_index(pool_dir)
