"""The interactive evaluation protocol (simulated clicks, Dice after each), run through the real :class:`Session`.

For every case (one binary target on one image) and every **variant** (a method — the model or
the classical marker-watershed baseline — with its speed mode, click mode and first prompt):

1. the first interaction is a click at the target's interior-most voxel (or, with
   ``prompt="box"``, the target's bounding box);
2. each later click is simulated by :func:`FastSAM3DLib.clicks.next_click` on the current
   prediction, **in the image's own grid**: the next interaction of the first two is at the
   interior-most error voxel (deepest in millimetres, so anisotropic grids do not change it),
   later ones uniformly from the error region; the click's voxel centre
   is converted to LPS millimetres and given to the session like a user's click;
3. the prediction is the session's mask on the image's grid; Dice against the target is
   computed there after every interaction.

Reported per case and overall: Dice after 1, 3, 5 and 10 interactions (those within the run's
budget), and NoC@80 / NoC@90 (the number of interactions to reach Dice 0.8 / 0.9; a case that never
does counts as the click budget, the usual convention, and is also counted as not reached). Colin27
structures are marked "seen" or "held-out" by the ``trained_structures`` of the model's card (our
exports list the Colin27 structures of the training pool); without one, and on other data,
"unknown". The MNI152 template's targets (``--data mni152``) are the group "new subject": no
training run of ours sees that template.

The simulated user's random choices come from a generator seeded by ``seed`` and the case's
name, so a run is reproducible and adding a case does not change the others' clicks.

Click simulation, Dice and the distance transforms run on the bounding box of target and
prediction (plus a one-voxel margin), which gives exactly the answers of the whole grid: outside
it both masks are empty.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import platform
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .clicks import dice, next_click
from .errors import FastSAM3DInputError

if TYPE_CHECKING:
    from .data.folder import CaseCache, FolderCase

logger = logging.getLogger(__name__)

DICE_AT = (1, 3, 5, 10)
NOC_AT = (0.8, 0.9)
METHODS = ("model", "watershed")
PROMPTS = ("point", "box")
CLICK_MODES = ("all", "newest")


# -- cases --------------------------------------------------------------------------------------


@dataclass
class Case:
    """One target: an image and a binary mask on its grid.

    Attributes:
      name: unique name (structure, or ``case_id:label``).
      image: the image.
      label: uint8 0/1 mask on the image's grid.
      group: "seen", "held-out" or "unknown" (was the target's kind in the model's training set).
    """

    name: str
    image: sitk.Image
    label: sitk.Image
    group: str = "unknown"


def colin27_cases(structures: Optional[Sequence[str]] = None, trained: Optional[Sequence[str]] = None) -> List[Case]:
    """Colin27 structures (default: all of ``STRUCTURES``) as cases.

    ``trained``: the structures the model was trained on (:func:`trained_structures`); the cases
    are then marked "seen" or "held-out", else "unknown".

    Raises:
      FastSAM3DInputError: an unknown structure name.
      FileNotFoundError: mricron-data is not installed.
    """
    from .data import STRUCTURES, load_colin27

    names = list(structures) if structures else list(STRUCTURES)
    unknown = [n for n in names if n not in STRUCTURES]
    if unknown:
        raise FastSAM3DInputError(f"--structures: unknown Colin27 structure(s) {', '.join(unknown)}; expected some of {', '.join(STRUCTURES)}")
    colin = load_colin27()

    def group(name: str) -> str:
        return "unknown" if trained is None else "seen" if name in trained else "held-out"

    return [Case(n, colin.image, colin.labels[n], group(n)) for n in names]


def mni152_cases(structures: Optional[Sequence[str]] = None) -> List[Case]:
    """The MNI152 template's structures (:mod:`FastSAM3DLib.data.mni152`) as cases of the group
    "new subject": no training run of ours uses this template.

    Raises:
      FastSAM3DInputError: an unknown structure name, or nilearn (which ships the template) is missing.
    """
    from .data.mni152 import STRUCTURES, load_mni152

    names = list(structures) if structures else list(STRUCTURES)
    unknown = [n for n in names if n not in STRUCTURES]
    if unknown:
        raise FastSAM3DInputError(f"--structures: unknown MNI152 structure(s) {', '.join(unknown)}; expected some of {', '.join(STRUCTURES)}")
    try:
        template = load_mni152()
    except FileNotFoundError as error:
        raise FastSAM3DInputError(f"--data mni152: {error}") from None
    return [Case(n, template.image, template.labels[n], "new subject") for n in names]


class FolderTarget:
    """One label value of one case of an imagesTr/labelsTr folder, read when it is evaluated, so
    that a dataset's images are not all in memory at once (a :class:`Case` otherwise)."""

    group = "unknown"

    def __init__(self, case: "FolderCase", value: int, reader: "CaseCache") -> None:
        self.case, self.value, self._reader = case, value, reader
        self.name = f"{case.case_id}:{value}"

    @property
    def image(self) -> sitk.Image:
        return self._reader.read(self.case)[0]

    @property
    def label(self) -> sitk.Image:
        return self._reader.mask(self.case, self.value)


def folder_cases(root: str | Path, labels: Optional[Sequence[str]] = None) -> List[FolderTarget]:
    """Every foreground value of every case of an imagesTr/labelsTr folder (optionally only
    ``labels``: label values, ``case:value`` names, or label names from its dataset.json, whose
    "ignore" label is never a target).

    Every label map is read and every image's header checked here (a truncated, unreadable or
    mismatched file is reported before any case is evaluated); the images themselves are read one
    case at a time during the evaluation, where their voxel values (NaN, constant) are checked.

    Raises:
      FileNotFoundError, ValueError: as :func:`FastSAM3DLib.data.folder.find_cases` and the checks
        (the message names the file); FastSAM3DInputError: a wanted label that no case holds.
    """
    from .data.folder import CaseCache, checked_label_maps, read_label_names, target_values

    names = read_label_names(root)
    wanted = list(dict.fromkeys(labels or []))
    matched = set()
    reader, targets = CaseCache(), []
    for case, label in checked_label_maps(root):
        for value, _count in target_values(label, names):
            keys = {f"{case.case_id}:{value}", str(value)} | ({names[value]} if value in names else set())
            if wanted and not keys & set(wanted):
                continue
            matched |= keys
            targets.append(FolderTarget(case, value, reader))
    missing = [w for w in wanted if w not in matched]
    if missing:
        known = ", ".join(f"{v} ({n})" for v, n in sorted(names.items())) or "label values, or case:value names"
        raise FastSAM3DInputError(f"{root}: --structures {' '.join(missing)}: no case holds such a label (known: {known})")
    if not targets:
        raise FastSAM3DInputError(f"{root}: no labelled targets found")
    return targets


# -- methods ------------------------------------------------------------------------------------


class Interactor:
    """A method under evaluation: prompts in, a mask on the image's grid out."""

    name = "method"

    def start(self, image: sitk.Image) -> None:
        raise NotImplementedError

    def add_point(self, point_lps: Sequence[float], positive: bool) -> None:
        raise NotImplementedError

    def add_box(self, corner_a: Sequence[float], corner_b: Sequence[float]) -> None:
        raise NotImplementedError

    def predict(self) -> np.ndarray:
        """The current mask: uint8 (z, y, x) array on the image's grid."""
        raise NotImplementedError

    def finish(self) -> None:
        pass


class ModelInteractor(Interactor):
    """The model through :class:`Session` (one session per case; the model and its fast paths are shared)."""

    name = "model"

    def __init__(self, model, precision: str = "auto", click_mode: str = "all", refine: bool = True) -> None:
        self.model, self.precision, self.click_mode, self.refine = model, precision, click_mode, refine
        self.session = None
        self.resolved_precision: Optional[str] = None

    def start(self, image: sitk.Image) -> None:
        from .paste import BoundaryRefinement
        from .session import Session

        self.session = Session(self.model, precision=self.precision, click_mode=self.click_mode, prefetch=False,
                               refinement=BoundaryRefinement() if self.refine else None)
        self.resolved_precision = self.session.precision
        self.session.set_image(image)

    def add_point(self, point_lps, positive):
        self.session.add_point(point_lps, positive=positive)

    def add_box(self, corner_a, corner_b):
        self.session.add_box(corner_a, corner_b)

    def predict(self) -> np.ndarray:
        image = self.session.image
        region, local = self.session.predict_region()
        mask = np.zeros(tuple(reversed(image.GetSize())), dtype=np.uint8)
        if not region.empty:
            mask[region.slices()] = local
        return mask

    def finish(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


class WatershedInteractor(Interactor):
    """The classical baseline: marker-controlled watershed on the gradient magnitude (SimpleITK).

    It sees what the model sees: the image resampled to the model's crop (128^3 voxels of 1.5 mm,
    centred on the first prompt), cut to the part of the crop the image covers. Positive clicks
    seed the object (a ball of ``seed_radius_mm``), negative clicks and the faces of that box seed
    the background; with a box, everything outside the
    box is background and its centre an object seed. The gradient magnitude (recursive Gaussian,
    ``sigma_mm``) is computed once per case; each prediction is one watershed, returned on the
    image's grid (nearest neighbour).
    """

    name = "watershed"

    def __init__(self, sigma_mm: float = 1.5, seed_radius_mm: float = 3.0, crop_size: int = 128) -> None:
        self.sigma_mm, self.seed_radius_mm, self.crop_size = sigma_mm, seed_radius_mm, crop_size
        self.image: Optional[sitk.Image] = None

    def start(self, image: sitk.Image) -> None:
        self.image = image
        self.points: List[Tuple[np.ndarray, bool]] = []
        self.box: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self.crop = None
        self.gradient: Optional[sitk.Image] = None

    def _open(self, center_lps: Sequence[float]) -> None:
        from .preprocess import CropGrid

        crop = CropGrid.around(center_lps, size=self.crop_size)
        # The part of the crop the image covers (its corners' crop indices), as a smaller grid.
        size = np.asarray(self.image.GetSize())
        corners = np.array([[a, b, c] for a in (-0.5, size[0] - 0.5) for b in (-0.5, size[1] - 0.5) for c in (-0.5, size[2] - 0.5)])
        physical = np.array([self.image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
        index = crop.to_index(physical)
        self.start = np.clip(np.floor(index.min(0)).astype(int), 0, crop.size - 1)
        stop = np.clip(np.ceil(index.max(0)).astype(int) + 1, 1, crop.size)
        self.shape = stop - self.start  # model-order (x, y, z of the crop image)
        self.crop = crop
        reference = sitk.Image([int(v) for v in self.shape], sitk.sitkUInt8)
        reference.SetSpacing([crop.spacing] * 3)
        reference.SetDirection(crop.reference_image().GetDirection())
        reference.SetOrigin([float(v) for v in crop.to_physical(self.start)[0]])
        resampled = sitk.Resample(self.image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        self.gradient = sitk.GradientMagnitudeRecursiveGaussian(resampled, self.sigma_mm)

    def _crop_index(self, point: Sequence[float]) -> np.ndarray:
        """LPS -> index (x, y, z) in the watershed's grid (the covered part of the crop)."""
        return self.crop.to_index(np.asarray(point, dtype=np.float64))[0] - self.start

    def add_point(self, point_lps, positive):
        if self.crop is None:
            self._open(point_lps)
        self.points.append((np.asarray(point_lps, dtype=np.float64), bool(positive)))

    def add_box(self, corner_a, corner_b):
        a, b = np.asarray(corner_a, dtype=np.float64), np.asarray(corner_b, dtype=np.float64)
        if self.crop is None:
            self._open((a + b) / 2)
        self.box = (a, b)

    def predict(self) -> np.ndarray:
        full = np.zeros(tuple(reversed(self.image.GetSize())), dtype=np.uint8)
        if self.crop is None:
            return full
        n = self.shape  # (x, y, z)
        markers = np.zeros(tuple(int(v) for v in n[::-1]), dtype=np.uint8)  # (z, y, x)
        markers[[0, -1], :, :] = markers[:, [0, -1], :] = markers[:, :, [0, -1]] = 2
        seeds: List[Tuple[np.ndarray, int]] = []
        if self.box is not None:
            ia, ib = self._crop_index(self.box[0]), self._crop_index(self.box[1])
            lo = np.clip(np.floor(np.minimum(ia, ib)).astype(int), 0, n)
            hi = np.clip(np.ceil(np.maximum(ia, ib)).astype(int) + 1, 0, n)
            outside = np.ones_like(markers, dtype=bool)
            outside[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = False
            markers[outside] = 2
            seeds.append(((ia + ib) / 2, 1))
        seeds.extend((self._crop_index(p), 1 if positive else 2) for p, positive in self.points)
        radius = int(np.ceil(self.seed_radius_mm / self.crop.spacing))
        zz, yy, xx = np.ogrid[-radius : radius + 1, -radius : radius + 1, -radius : radius + 1]
        ball = (xx**2 + yy**2 + zz**2) * self.crop.spacing**2 <= self.seed_radius_mm**2
        padded = np.pad(markers, radius)
        for index, value in seeds:  # later seeds win, like later clicks
            c = np.round(index).astype(int)
            if np.any(c < 0) or np.any(c >= n):
                continue
            view = padded[c[2] : c[2] + 2 * radius + 1, c[1] : c[1] + 2 * radius + 1, c[0] : c[0] + 2 * radius + 1]
            view[ball] = value
        markers = padded[radius:-radius, radius:-radius, radius:-radius] if radius else padded
        if not (markers == 1).any():
            return full
        marker_image = sitk.GetImageFromArray(np.ascontiguousarray(markers))
        marker_image.CopyInformation(self.gradient)
        labels = sitk.MorphologicalWatershedFromMarkers(self.gradient, marker_image, markWatershedLine=False, fullyConnected=False)
        back = sitk.Resample(labels == 1, self.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        return sitk.GetArrayFromImage(back)


# -- the protocol -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One configuration under evaluation."""

    method: str = "model"
    precision: str = "auto"
    click_mode: str = "all"
    prompt: str = "point"

    @property
    def label(self) -> str:
        if self.method != "model":
            return f"{self.method} ({self.prompt})"
        return f"model {self.precision}/{self.click_mode} ({self.prompt})"


@dataclass
class CaseResult:
    case: str
    group: str
    variant: Variant
    dice: List[float]
    clicks: List[dict] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    resolved_precision: Optional[str] = None

    def dice_at(self, k: int) -> float:
        if not 1 <= k <= len(self.dice):
            raise ValueError(f"case {self.case}: Dice@{k} asked for, but it ran {len(self.dice)} interactions")
        return self.dice[k - 1]

    def noc(self, threshold: float) -> Tuple[int, bool]:
        """(interactions to reach ``threshold``, whether it was reached within the budget)."""
        for number, value in enumerate(self.dice, 1):
            if value >= threshold:
                return number, True
        return len(self.dice), False


def _case_seed(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def _bounding_box(*masks: np.ndarray) -> Tuple[slice, ...]:
    """Slices of the bounding box of the union of masks, grown by one voxel (clipped to the array)."""
    union = np.zeros(masks[0].shape, dtype=bool)
    for mask in masks:
        union |= mask
    if not union.any():
        return tuple(slice(0, 1) for _ in union.shape)
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        slices.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, union.shape[axis])))
    return tuple(slices)


@dataclass(frozen=True)
class ImageClick:
    """A simulated click on an image: its voxel (x, y, z), its LPS point and its polarity."""

    index_xyz: Tuple[int, int, int]
    point_lps: Tuple[float, float, float]
    positive: bool


def simulated_click(image: sitk.Image, gt: np.ndarray, pred: np.ndarray, rng: np.random.Generator, mode: str) -> Optional[ImageClick]:
    """The next click of the protocol (:func:`~FastSAM3DLib.clicks.next_click`, ``mode`` "interior" or
    "random") for a prediction ``pred`` of ``gt`` (bool (z, y, x) arrays on ``image``'s grid),
    computed on the bounding box of the two, with distances in millimetres; None when the
    prediction has no error."""
    box = _bounding_box(gt, pred)
    click = next_click(pred[box], gt[box], rng, mode, spacing=image.GetSpacing()[::-1])
    if click is None:
        return None
    index = tuple(int(i + s.start) for i, s in zip(click.index, box))[::-1]
    return ImageClick(index, tuple(image.TransformIndexToPhysicalPoint(index)), bool(click.positive))


def label_box_lps(label: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    """Two opposite corners (LPS mm) of the label's bounding box, at the outer faces of its voxels:
    the LPS-aligned box around the eight corners of its box of voxels (on an oblique grid two
    corners alone do not span the label)."""
    nonzero = np.nonzero(sitk.GetArrayViewFromImage(label))
    low = np.array([axis.min() for axis in reversed(nonzero)], dtype=np.float64) - 0.5
    high = np.array([axis.max() for axis in reversed(nonzero)], dtype=np.float64) + 0.5
    corners = np.array([label.TransformContinuousIndexToPhysicalPoint(np.where(bits, high, low).tolist())
                        for bits in np.ndindex(2, 2, 2)])
    return corners.min(0), corners.max(0)


def run_case(interactor: Interactor, case: Case, variant: Variant, clicks: int, seed: int) -> CaseResult:
    """Simulate ``clicks`` interactions on one case; Dice after each (see the module docstring)."""
    gt = sitk.GetArrayViewFromImage(case.label) > 0
    if not gt.any():
        raise FastSAM3DInputError(f"case {case.name}: the label is empty")
    rng = _case_seed(seed, case.name)
    result = CaseResult(case.name, case.group, variant, [])
    pred = np.zeros(gt.shape, dtype=bool)
    interactor.start(case.image)
    try:
        for number in range(clicks):
            start = time.perf_counter()
            if number == 0 and variant.prompt == "box":
                a, b = label_box_lps(case.label)
                interactor.add_box(a, b)
                result.clicks.append({"box_lps": [a.tolist(), b.tolist()]})
            else:
                corrective = number - (1 if variant.prompt == "box" else 0)
                click = simulated_click(case.image, gt, pred, rng, "interior" if corrective < 2 else "random")
                if click is None:  # perfect already: the simulated user stops clicking
                    result.dice.append(result.dice[-1] if result.dice else 1.0)
                    result.seconds.append(0.0)
                    continue
                interactor.add_point(click.point_lps, click.positive)
                result.clicks.append({"index_xyz": list(click.index_xyz), "point_lps": list(click.point_lps), "positive": click.positive})
            pred = interactor.predict() > 0
            result.seconds.append(time.perf_counter() - start)
            box = _bounding_box(gt, pred)
            result.dice.append(float(dice(pred[box], gt[box])))
        result.resolved_precision = getattr(interactor, "resolved_precision", None)
    finally:
        interactor.finish()
    return result


# -- summaries ----------------------------------------------------------------------------------


def summarize(results: Sequence[CaseResult]) -> Dict[str, float]:
    """Mean Dice@k (for the k of ``DICE_AT`` within the budget), mean NoC@t and failures@t (not
    reached within the budget) over a set of case results."""
    summary: Dict[str, float] = {"cases": len(results)}
    if not results:
        return summary
    budget = min(len(r.dice) for r in results)
    for k in DICE_AT:
        if k <= budget:
            summary[f"dice@{k}"] = float(np.mean([r.dice_at(k) for r in results]))
    for t in NOC_AT:
        nocs = [r.noc(t) for r in results]
        summary[f"noc@{int(t * 100)}"] = float(np.mean([n for n, _ in nocs]))
        summary[f"fail@{int(t * 100)}"] = int(sum(not ok for _, ok in nocs))
    summary["mean_dice_curve"] = [float(v) for v in np.mean([r.dice for r in results], axis=0)]
    return summary


def summaries_by_variant(results: Sequence[CaseResult]) -> Dict[Variant, Dict[str, Dict[str, float]]]:
    """Per variant: "overall", "seen", "held-out", "unknown" (those present) and each case."""
    out: Dict[Variant, Dict[str, Dict[str, float]]] = {}
    variants = list(dict.fromkeys(r.variant for r in results))
    for variant in variants:
        own = [r for r in results if r.variant == variant]
        table = {"overall": summarize(own)}
        for group in ("seen", "held-out", "unknown"):
            members = [r for r in own if r.group == group]
            if members and len({r.group for r in own}) > 1:
                table[group] = summarize(members)
        for r in own:
            table[r.case] = summarize([r])
        out[variant] = table
    return out


def _dice_key(summary: Dict[str, float], preferred: int = 5) -> str:
    """``dice@5``, or the latest Dice@k the run has when its budget was below 5 clicks."""
    return f"dice@{max(k for k in DICE_AT if k <= preferred and f'dice@{k}' in summary)}"


def compare_click_modes(summaries: Dict[Variant, Dict[str, Dict[str, float]]]) -> List[dict]:
    """For each model configuration evaluated with both click modes: which measured better.

    Better = higher mean Dice over clicks 1..N (the area under the Dice-vs-clicks curve), ties
    broken by Dice@5.
    """
    verdicts = []
    for variant in summaries:
        if variant.method != "model" or variant.click_mode != "all":
            continue
        other = Variant(variant.method, variant.precision, "newest", variant.prompt)
        if other not in summaries:
            continue
        a, b = summaries[variant]["overall"], summaries[other]["overall"]
        key = _dice_key(a)
        auc_a, auc_b = float(np.mean(a["mean_dice_curve"])), float(np.mean(b["mean_dice_curve"]))
        better = "all" if (auc_a, a[key]) >= (auc_b, b[key]) else "newest"
        verdicts.append({
            "precision": variant.precision, "prompt": variant.prompt,
            "all": {"mean_dice": auc_a, key: a[key]},
            "newest": {"mean_dice": auc_b, key: b[key]},
            "better": better,
        })
    return verdicts


def precision_costs(summaries: Dict[Variant, Dict[str, Dict[str, float]]]) -> List[dict]:
    """Dice@5 cost (fp32 minus mode) of each speed mode evaluated beside precision fp32 (Dice@k with
    the budget's last k of ``DICE_AT`` when it was under 5 clicks; ``at`` says which)."""
    costs = []
    for variant, table in summaries.items():
        if variant.method != "model" or variant.precision == "fp32":
            continue
        reference = Variant("model", "fp32", variant.click_mode, variant.prompt)
        if reference not in summaries:
            continue
        ref, own = summaries[reference]["overall"], table["overall"]
        key = _dice_key(ref)
        costs.append({
            "precision": variant.precision, "click_mode": variant.click_mode, "prompt": variant.prompt, "at": int(key[5:]),
            key: own[key], f"fp32_{key}": ref[key], f"{key}_cost": ref[key] - own[key],
            "mean_dice_cost": float(np.mean(ref["mean_dice_curve"]) - np.mean(own["mean_dice_curve"])),
        })
    return costs


def format_table(summaries: Dict[Variant, Dict[str, Dict[str, float]]], groups: Dict[str, str], per_case: bool = True) -> str:
    """A plain-text table: one row per (variant, case / group).

    Dice@k beyond the run's budget is "-"; NoC@t is marked ">N" for a case that never reached t
    within its N interactions, and a group's mean is followed by how many of its cases did not.
    """
    head = ["variant", "target", "group"] + [f"Dice@{k}" for k in DICE_AT] + ["NoC@80", "NoC@90"]

    def noc(s: Dict[str, float], t: int) -> str:
        failed = s[f"fail@{t}"]
        if s["cases"] == 1 and failed:
            return f">{s[f'noc@{t}']:.0f}"
        return f"{s[f'noc@{t}']:.1f}" + (f" ({failed} not reached)" if failed else "")

    rows = []
    for variant, table in summaries.items():
        names = [n for n in table if n not in ("overall", "seen", "held-out", "unknown")] if per_case else []
        for name in names + [g for g in ("seen", "held-out", "unknown") if g in table] + ["overall"]:
            s = table[name]
            group = groups.get(name, "") if name in names else f"{s['cases']} cases"
            rows.append([variant.label, name, group] + [f"{s[f'dice@{k}']:.3f}" if f"dice@{k}" in s else "-" for k in DICE_AT]
                        + [noc(s, 80), noc(s, 90)])
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(v).ljust(w) if i < 3 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


# -- outputs ------------------------------------------------------------------------------------


def write_outputs(out_dir: Path, results: Sequence[CaseResult], summaries, meta: dict) -> Dict[str, Path]:
    """per_click.csv, summary.csv, results.json, dice_vs_clicks.png, structures.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("per_click.csv", "summary.csv", "results.json", "dice_vs_clicks.png", "structures.png")}
    with open(paths["per_click.csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "precision", "click_mode", "prompt", "case", "group", "interaction", "dice", "seconds"])
        for r in results:
            v = r.variant
            for number, (value, seconds) in enumerate(zip(r.dice, r.seconds), 1):
                writer.writerow([v.method, (r.resolved_precision or v.precision) if v.method == "model" else "", v.click_mode if v.method == "model" else "", v.prompt, r.case, r.group, number, f"{value:.6f}", f"{seconds:.4f}"])
    with open(paths["summary.csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "precision", "click_mode", "prompt", "target", "cases"] + [f"dice@{k}" for k in DICE_AT]
                        + ["noc@80", "noc@90", "fail@80", "fail@90"])
        for variant, table in summaries.items():
            for name, s in table.items():
                writer.writerow([variant.method, variant.precision if variant.method == "model" else "", variant.click_mode if variant.method == "model" else "",
                                 variant.prompt, name, s["cases"]] + [f"{s[f'dice@{k}']:.4f}" if f"dice@{k}" in s else "" for k in DICE_AT]
                                + [f"{s['noc@80']:.2f}", f"{s['noc@90']:.2f}", s["fail@80"], s["fail@90"]])
    document = {
        **meta,
        "variants": [
            {"variant": vars(v) | {"label": v.label}, "summary": table}
            for v, table in summaries.items()
        ],
        "click_mode_comparison": compare_click_modes(summaries),
        "precision_costs": precision_costs(summaries),
        "cases": [
            {"case": r.case, "group": r.group, "variant": vars(r.variant), "resolved_precision": r.resolved_precision,
             "dice": r.dice, "seconds": r.seconds, "interactions": r.clicks}
            for r in results
        ],
    }
    paths["results.json"].write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    paths["dice_vs_clicks.png"].write_bytes(plot_dice_curves(summaries, meta.get("title", "")))
    paths["structures.png"].write_bytes(plot_structures(summaries, meta.get("title", "")))
    return paths


def plot_dice_curves(summaries, title: str = "") -> bytes:
    """Mean Dice after each interaction, one line per variant (solid overall; dashed seen, dotted held-out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=110)
    for index, (variant, table) in enumerate(summaries.items()):
        color = f"C{index % 10}"
        for group, style in (("overall", "-"), ("seen", "--"), ("held-out", ":")):
            if group not in table:
                continue
            curve = table[group]["mean_dice_curve"]
            label = variant.label if group == "overall" else f"{variant.label}, {group}"
            ax.plot(range(1, len(curve) + 1), curve, style, color=color, marker="o" if group == "overall" else None, ms=3, label=label)
    ax.set_xlabel("interactions (clicks; a box counts as one)")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Dice vs clicks")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def plot_structures(summaries, title: str = "") -> bytes:
    """Per-target Dice@1 / @5 / @10 bars for each variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(summaries)
    targets = [n for n in next(iter(summaries.values())) if n not in ("overall", "seen", "held-out", "unknown")] if summaries else []
    fig, axes = plt.subplots(len(variants), 1, figsize=(max(6, 0.55 * len(targets) + 2), 2.6 * max(len(variants), 1)), dpi=110, squeeze=False)
    width = 0.27
    for ax, variant in zip(axes[:, 0], variants):
        table = summaries[variant]
        x = np.arange(len(targets))
        for offset, k in zip((-width, 0, width), (1, 5, 10)):
            if targets and f"dice@{k}" in table[targets[0]]:
                ax.bar(x + offset, [table[t][f"dice@{k}"] for t in targets], width, label=f"Dice@{k}")
        ax.set_xticks(x)
        ax.set_xticklabels(targets, rotation=35, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(variant.label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=3, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def load_results(path: str | Path) -> List[CaseResult]:
    """The case results of a ``results.json`` written by :func:`write_outputs` (to re-plot or re-summarize)."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    return [
        CaseResult(c["case"], c["group"], Variant(**c["variant"]), list(c["dice"]), list(c.get("interactions", [])),
                   list(c.get("seconds", [])), c.get("resolved_precision"))
        for c in document["cases"]
    ]


# -- running ------------------------------------------------------------------------------------


def evaluate(
    cases: Sequence[Case],
    variants: Sequence[Variant],
    *,
    model=None,
    clicks: int = 10,
    seed: int = 0,
    progress: bool = True,
    make_interactor: Optional[Callable[[Variant], Interactor]] = None,
    refine: bool = True,
) -> List[CaseResult]:
    """Run every variant on every case; returns the results in (variant, case) order.

    ``make_interactor`` overrides how a variant's method is built (tests use it for stand-ins);
    ``refine=False`` evaluates the model's masks without the session's boundary refinement.
    """
    from tqdm import tqdm

    if clicks < 1:
        raise FastSAM3DInputError(f"--clicks must be at least 1, got {clicks}")
    if any(v.method == "model" for v in variants) and model is None and make_interactor is None:
        raise FastSAM3DInputError("the model method needs a model")
    results = []
    bar = tqdm(total=len(cases) * len(variants), desc="evaluate", unit="case", disable=not progress, leave=False)
    try:
        for variant in variants:
            for case in cases:
                if make_interactor is not None:
                    interactor: Interactor = make_interactor(variant)
                elif variant.method == "model":
                    interactor = ModelInteractor(model, variant.precision, variant.click_mode, refine=refine)
                else:
                    interactor = WatershedInteractor()
                result = run_case(interactor, case, variant, clicks, seed)
                results.append(result)
                bar.set_postfix_str(f"{variant.label} {case.name} Dice@1 {result.dice[0]:.2f} @{clicks} {result.dice[-1]:.2f}")
                bar.update()
    finally:
        bar.close()
    return results


def _variants(args: argparse.Namespace) -> List[Variant]:
    methods = list(dict.fromkeys(args.method + (["watershed"] if args.baseline == "watershed" else [])))
    click_modes = list(CLICK_MODES) if args.click_mode == "both" else [args.click_mode]
    variants = []
    for method in methods:
        for prompt in args.prompt:
            if method == "model":
                variants.extend(Variant("model", p, c, prompt) for p in args.precision for c in click_modes)
            else:
                variants.append(Variant(method, "", "", prompt))
    return variants


def trained_structures(model_path: Optional[str | Path]) -> Optional[Tuple[str, ...]]:
    """The Colin27 structures a model was trained on, from its card (None: no card says).

    ``model_path`` None means the bundled model. The card lists what the last training run's pool
    held; a run started from other weights also inherits what those saw.
    """
    from .checkpoint import bundled_model_path, read_model_card

    path = model_path or bundled_model_path()
    if path is None or not Path(path).exists():
        return None
    trained = read_model_card(path).get("trained_structures")
    return tuple(str(name) for name in trained) if isinstance(trained, list) else None


def _check_output_folder(folder: Path) -> None:
    """Refuse, before any work, an output folder that could not be made or written to: a file, or
    under a file or a folder without write permission (the results come at the end of the run)."""
    if folder.exists() and not folder.is_dir():
        raise FastSAM3DInputError(f"--out {folder}: exists and is not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FastSAM3DInputError(f"--out {folder}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FastSAM3DInputError(f"--out {folder}: {existing} is not writable")


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import check_device_option
    from .session import PRECISIONS

    if args.threads < 0:
        raise FastSAM3DInputError(f"--threads {args.threads}: expected a number of threads, or 0 for torch's default")
    check_device_option(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    for precision in args.precision:
        if precision not in PRECISIONS:
            raise FastSAM3DInputError(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    variants = _variants(args)
    out_dir = Path(args.out)
    _check_output_folder(out_dir)
    if args.data == "colin27":
        cases = colin27_cases(args.structures, trained_structures(args.model) if any(v.method == "model" for v in variants) else None)
    elif args.data == "mni152":
        cases = mni152_cases(args.structures)
    else:
        root = Path(args.data)
        if not root.is_dir():
            raise FastSAM3DInputError(f"--data {root}: expected 'colin27', 'mni152' or a folder with imagesTr/ and labelsTr/")
        try:
            cases = folder_cases(root, args.structures)
        except (FileNotFoundError, ValueError) as error:
            raise FastSAM3DInputError(f"--data {root}: {error}") from None
    model = None
    model_info: Dict[str, object] = {}
    if any(v.method == "model" for v in variants):
        from .build import count_parameters
        from .checkpoint import load_model

        model = load_model(args.model, device=args.device)
        model_info = {"source": model.config.get("source"), "sha256": model.config.get("sha256"),
                      "architecture": model.config.get("name"), "parameters": count_parameters(model)}
    started = time.time()
    results = evaluate(cases, variants, model=model, clicks=args.clicks, seed=args.seed, progress=not args.no_progress,
                       refine=not args.no_refine)
    summaries = summaries_by_variant(results)
    groups = {c.name: c.group for c in cases}
    meta = {
        "title": f"{args.data}: {len(cases)} targets, {args.clicks} interactions, seed {args.seed}",
        "data": args.data,
        "clicks": args.clicks,
        "seed": args.seed,
        "protocol": "clicks 1-2 at the interior-most error voxel, later uniform in the error region, simulated and scored in the image grid",
        "model": model_info,
        "resolved_precisions": sorted({r.resolved_precision for r in results if r.resolved_precision}),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seconds": time.time() - started,
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
    }
    paths = write_outputs(out_dir, results, summaries, meta)
    print(format_table(summaries, groups, per_case=not args.overall_only))
    for verdict in compare_click_modes(summaries):
        print(f"click mode ({verdict['precision']}, {verdict['prompt']}): all {verdict['all']['mean_dice']:.3f} vs newest "
              f"{verdict['newest']['mean_dice']:.3f} mean Dice over clicks -> {verdict['better']} is better")
    for cost in precision_costs(summaries):
        k = cost["at"]
        print(f"speed mode {cost['precision']} ({cost['click_mode']}, {cost['prompt']}): Dice@{k} {cost[f'dice@{k}']:.4f} vs fp32 "
              f"{cost[f'fp32_dice@{k}']:.4f}, cost {cost[f'dice@{k}_cost']:+.4f}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def add_subparser(subparsers) -> None:
    """Register ``fastsam3d evaluate``."""
    parser = subparsers.add_parser(
        "evaluate",
        help="interactive evaluation (Dice per click, NoC) on Colin27, the MNI152 template or an imagesTr/labelsTr folder",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--data", default="colin27",
                        help="'colin27' (default), 'mni152' (a subject no training run sees; needs nilearn) or a folder with imagesTr/ and labelsTr/")
    parser.add_argument("--structures", nargs="+", help="Colin27 / MNI152 structure names, or label values / case:value names of a folder")
    parser.add_argument("--clicks", type=int, default=10, help="interactions per case (10)")
    parser.add_argument("--model", help="checkpoint (.pth/.safetensors); default: the bundled model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", nargs="+", default=["auto"], help="speed mode(s) of the model; several are compared (fp32 is the reference)")
    parser.add_argument("--click-mode", default="all", choices=list(CLICK_MODES) + ["both"], help="decode with all clicks, the newest, or compare both")
    parser.add_argument("--method", nargs="+", default=["model"], choices=list(METHODS), help="what to evaluate (model, watershed)")
    parser.add_argument("--baseline", choices=["watershed"], help="also evaluate the classical baseline (same as adding --method watershed)")
    parser.add_argument("--prompt", nargs="+", default=["point"], choices=list(PROMPTS), help="first interaction: a click at the interior-most voxel, or the bounding box")
    parser.add_argument("--no-refine", action="store_true",
                        help="the model's masks without the boundary refinement (see FastSAM3DLib.paste.BoundaryRefinement)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", required=True, help="output folder (CSV, JSON, PNG)")
    parser.add_argument("--overall-only", action="store_true", help="print only group and overall rows")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=cmd_evaluate)
