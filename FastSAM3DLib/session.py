"""The interactive session: set a volume once, then click and get a 3D mask back, click after click.

In the manner of SAM's predictor: :meth:`Session.set_image` prepares the image and starts embedding
the most likely crop in the background; every prompt then costs a decode of that crop's cached
embedding plus the paste-back of what can change. Volumes bigger than one 128^3 crop at 1.5 mm get
more crops as clicks land elsewhere; embeddings are cached (LRU, bounded in bytes) and shared by
all objects of the session.

Coordinates: points are physical LPS millimetres (as ITK/SimpleITK use them) unless a ``*_voxel``
method is used, which takes SimpleITK (x, y, z) voxel indices of the set image.
"""

from __future__ import annotations

import copy
import logging
import numbers
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from .checkpoint import resolve_device
from .errors import PromptError
from .io import ImageLike, load_image_with_range
from .modeling import Sam3D, select_by_iou
from .paste import BoundaryRefinement, CropPaster
from .quantize import check_mode, fast_path, resolve_precision, runs_fast_path
from .preprocess import (
    CROP_SIZE,
    CROP_SPACING,
    CropGrid,
    IntensitySettings,
    Region,
    image_affine,
    index_to_physical,
    normalize_crop,
    padding_value,
    physical_to_index,
    resample_to_crop,
)

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, float], None]

# Clicks closer than this to a crop's faces (in crop voxels) open a crop centred on them instead.
CROP_MARGIN = 12
# Speed modes: "fp32" is the exact reference; the others are described in FastSAM3DLib.quantize.
PRECISIONS = ("auto", "fp32", "bf16", "fp32-fast", "int8", "sparse", "int8-sparse")
_model_locks: "weakref.WeakKeyDictionary[Sam3D, threading.Lock]" = weakref.WeakKeyDictionary()
_model_locks_guard = threading.Lock()
_cancel_state = threading.local()


class EmbeddingCancelled(RuntimeError):
    """A background embedding was abandoned because the session moved on (new image, closed)."""


def _model_lock(model: Sam3D) -> threading.Lock:
    """One lock per model: decodes toggle dropout modules, which must not leak into another thread's decode."""
    with _model_locks_guard:
        lock = _model_locks.get(model)
        if lock is None:
            lock = _model_locks[model] = threading.Lock()
        return lock


def _install_cancel_hooks(model: Sam3D) -> None:
    """Let a thread abandon an encoder forward between blocks (and report progress)."""
    if getattr(model.image_encoder, "_fastsam3d_hooks", False):
        return

    def make_hook(index: int, depth: int):
        def hook(module, inputs):
            check = getattr(_cancel_state, "check", None)
            if check is not None:
                check(index / depth)

        return hook

    depth = len(model.image_encoder.blocks)
    for index, block in enumerate(model.image_encoder.blocks):
        block.register_forward_pre_hook(make_hook(index, depth))
    model.image_encoder._fastsam3d_hooks = True


@dataclass(frozen=True)
class Prompt:
    """One user prompt: a point (``corner`` is None) or a box from ``point`` to ``corner`` (LPS mm)."""

    point: Tuple[float, float, float]
    positive: bool = True
    corner: Optional[Tuple[float, float, float]] = None

    @property
    def is_box(self) -> bool:
        return self.corner is not None

    @property
    def center(self) -> np.ndarray:
        if self.corner is None:
            return np.asarray(self.point)
        return (np.asarray(self.point) + np.asarray(self.corner)) / 2.0


@dataclass
class _Delivery:
    """What an object's previous prediction handed out: ``predict_changes`` is relative to it."""

    state: "_ObjectState"
    region: Region
    enforced: Dict[Tuple[int, int, int], int]
    box: Optional[Prompt]


@dataclass
class _ObjectState:
    prompts: List[Prompt] = field(default_factory=list)
    crops: List[CropGrid] = field(default_factory=list)
    logits: Dict[CropGrid, torch.Tensor] = field(default_factory=dict)
    decoded: Dict[CropGrid, int] = field(default_factory=dict)  # crop -> number of prompts decoded
    iou: Dict[CropGrid, float] = field(default_factory=dict)
    # A lone click's candidate masks (M x 32^3 logits, M predicted IoUs) and the one shown (None: the decoder's pick).
    candidates: Dict[CropGrid, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    chosen: Dict[CropGrid, Optional[int]] = field(default_factory=dict)
    checked: int = 0  # prompts whose click consistency has been counted
    history: List[tuple] = field(default_factory=list)

    def snapshot(self) -> tuple:
        return (list(self.prompts), list(self.crops), dict(self.logits), dict(self.decoded), dict(self.iou),
                dict(self.candidates), dict(self.chosen), self.checked)

    def restore(self, state: tuple) -> None:
        self.prompts, self.crops, self.logits, self.decoded, self.iou, self.candidates, self.chosen = (copy.copy(s) for s in state[:7])
        self.checked = state[7]


class Session:
    """An interactive segmentation session on one volume at a time.

    Arguments:
      model: a loaded model (``load_model``); it may be shared by several sessions and threads.
      device: "auto" keeps the model where it is; anything else moves the model there.
      precision: the speed mode. "fp32" (exact), "bf16" (GPUs: the image encoder under bfloat16
        autocast; CPUs with native bf16: bf16 encoder matrix multiplies, see
        FastSAM3DLib.quantize), "fp32-fast" (fp32 with the restructured
        decoder), "int8" (int8 encoder linear layers and decoder projections, x86 CPUs),
        "sparse" / "int8-sparse" (opt-in sparse encoder attention), or "auto": bf16 on CUDA; on
        a CPU the fastest mode whose measured Dice cost is within FastSAM3DLib.quantize's
        AUTO_MAX_DICE_COST (see ``quantize.resolve_precision``).
      intensity: crop normalisation (MR z-normalisation by default; a CT window is a setting).
      cache_bytes: memory budget of cached crop embeddings (LRU).
      click_mode: "all" decodes each crop with every click inside it; "newest" with only the
        latest one (the public evaluation's way).
      prefetch: start embedding the crop at the image centre as soon as an image is set.
      reuse_crops: decode an object's first prompt in a crop already embedded (the prefetched
        one, another object's) when it lies well inside it: no new embedding, but the mask then
        depends on what was embedded before, since the model's answer changes with where the object
        sits in its crop. False: an object's crops follow from its own prompts alone (its first
        prompt's crop is centred on it), so the same clicks give the same mask whatever came before,
        as in ``fastsam3d segment`` and ``evaluate`` (for label maps that must be reproducible).
      mc_dropout_rate: dropout rate for MC-dropout uncertainty when the model was trained without
        dropout (its configured rate is used otherwise).
      refinement: where the logits are within a band of 0 the image's intensities help decide
        (:class:`~FastSAM3DLib.paste.BoundaryRefinement`); None: the logits alone. Masks only:
        ``predict_proba`` and ``uncertainty`` are the model's own.
      progress_callback: called as ``callback(stage, fraction)`` from the embedding thread.
    """

    def __init__(
        self,
        model: Sam3D,
        device: str | torch.device = "auto",
        precision: str = "auto",
        *,
        intensity: IntensitySettings = IntensitySettings(),
        cache_bytes: int = 1 << 30,
        click_mode: str = "all",
        prefetch: bool = True,
        reuse_crops: bool = True,
        mc_dropout_rate: float = 0.1,
        refinement: Optional[BoundaryRefinement] = BoundaryRefinement(),
        progress_callback: Optional[ProgressCallback] = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if click_mode not in ("all", "newest"):
            raise ValueError(f"click_mode must be 'all' or 'newest', got {click_mode!r}")
        with _model_lock(model):  # another session's MC-dropout decode may have the dropout modules in training mode
            if device != "auto":
                model = model.to(resolve_device(device))
            self.model = model.eval()
        self.device = model.device
        self.precision = resolve_precision(precision, self.device)
        self._fast = runs_fast_path(self.precision, self.device)
        if self._fast:
            check_mode(model, self.precision)  # the fast path itself is built on first use
        self.intensity = intensity
        self.cache_bytes = int(cache_bytes)
        self.click_mode = click_mode
        self.prefetch = prefetch
        self.reuse_crops = reuse_crops
        self.mc_dropout_rate = mc_dropout_rate
        self._refinement = refinement
        self.progress_callback = progress_callback
        _install_cancel_hooks(model)

        self.encoder_calls = 0
        self.click_violations = 0
        self.clicks_checked = 0
        self.last_timings: Dict[str, float] = {}
        # Work for the next result, wherever it ran (a predict, or candidates() before it): its timings.
        self._next_timings: Dict[str, float] = {}
        self.progress: Dict[str, object] = {"stage": "idle", "fraction": 0.0}

        self._lock = threading.RLock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsam3d-embed")
        self._generation = 0
        self._image: Optional[sitk.Image] = None
        self._outside = 0.0  # a crop's value outside the image (MR rule), see set_image
        self._closed = False
        self._embeddings: "OrderedDict[CropGrid, torch.Tensor]" = OrderedDict()
        self._pending: Dict[CropGrid, Future] = {}
        self._pasters: Dict[CropGrid, CropPaster] = {}
        self._objects: Dict[int, _ObjectState] = {}
        self._delivered: Dict[int, _Delivery] = {}
        self._click_voxels: Dict[Prompt, Optional[Tuple[int, int, int]]] = {}
        self._next_object = 0

    @property
    def refinement(self) -> Optional[BoundaryRefinement]:
        """The boundary refinement of the masks (None: the logits alone)."""
        return self._refinement

    @refinement.setter
    def refinement(self, value: Optional[BoundaryRefinement]) -> None:
        """Change it keeping everything else (embeddings, prompts, logits): the next ``predict*``
        answers with the new rule, and ``predict_changes`` covers each object's whole region once
        (the crops' pasters are made anew)."""
        with self._lock:
            self._refinement = value
            self._pasters.clear()

    # -- image -----------------------------------------------------------------------------------

    @property
    def image(self) -> sitk.Image:
        if self._image is None:
            raise RuntimeError("no image is set: call Session.set_image(image) first")
        return self._image

    def set_image(self, image: ImageLike, wait: bool = False, name: Optional[str] = None) -> None:
        """Set the volume to segment (a SimpleITK image or a path); forgets all prompts and crops.

        Embedding of the crop at the image centre starts in the background at once (``wait=True``
        blocks until it is done). Raises ImageError for unusable images, naming the image ``name``
        (default: its path, or "image"), and RuntimeError on a closed session.
        """
        self._check_open()
        loaded, low, high = load_image_with_range(image, name)
        with self._lock:
            self._generation += 1
            self._image = loaded
            self._outside = padding_value(low, high, self.intensity)
            self._next_timings = {}
            self._embeddings.clear()
            self._pending.clear()
            self._pasters.clear()
            self._objects = {0: _ObjectState()}
            self._delivered.clear()
            self._click_voxels.clear()
            self._next_object = 1
        if self.prefetch:
            size = np.asarray(loaded.GetSize(), dtype=np.float64)
            center = index_to_physical(loaded, (size - 1) / 2.0)
            future = self._ensure_embedding(CropGrid.around(center))
            if wait:
                future.result()

    def close(self) -> None:
        """Abandon background work and release cached embeddings; the session cannot be used after."""
        with self._lock:
            self._closed = True
            self._generation += 1
            self._embeddings.clear()
            self._pending.clear()
            self._pasters.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- embeddings ------------------------------------------------------------------------------

    def _report(self, stage: str, fraction: float) -> None:
        self.progress = {"stage": stage, "fraction": float(fraction)}
        if self.progress_callback is not None:
            self.progress_callback(stage, float(fraction))

    def _embed(self, crop: CropGrid, generation: int) -> torch.Tensor:
        """Preprocess and encode one crop (runs on the embedding thread)."""

        def check(fraction: float) -> None:
            if generation != self._generation:
                raise EmbeddingCancelled("the session's image changed while embedding")
            self._report("embedding", fraction)

        _cancel_state.check = check
        try:
            start = time.perf_counter()
            check(0.0)
            array = resample_to_crop(self.image, crop, default=self._outside)
            tensor = torch.from_numpy(normalize_crop(array, self.intensity))[None, None].to(self.device)
            encoder = self.model.image_encoder
            if self._fast:  # its blocks share the model's blocks' hooks
                encoder = fast_path(self.model, self.precision).encoder
            autocast = self.precision == "bf16" and not self._fast
            with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=autocast):
                embedding = encoder(tensor)
            embedding = embedding.float()
            with self._lock:
                if generation != self._generation:
                    raise EmbeddingCancelled("the session's image changed while embedding")
                self.encoder_calls += 1
                self._embeddings[crop] = embedding
                # From now on the cache holds it: once evicted it is released (and embedded again if needed).
                self._pending.pop(crop, None)
                self._evict()
            self._next_timings["embed_s"] = time.perf_counter() - start
            self._report("ready", 1.0)
            return embedding
        finally:
            _cancel_state.check = None

    def _evict(self) -> None:
        total = sum(e.numel() * e.element_size() for e in self._embeddings.values())
        while total > self.cache_bytes and len(self._embeddings) > 1:
            _, dropped = self._embeddings.popitem(last=False)
            total -= dropped.numel() * dropped.element_size()

    def _ensure_embedding(self, crop: CropGrid) -> Future:
        self._check_open()
        with self._lock:
            if crop in self._embeddings:
                self._embeddings.move_to_end(crop)
                done: Future = Future()
                done.set_result(self._embeddings[crop])
                return done
            pending = self._pending.get(crop)
            # A failed embedding is not remembered: the next request tries again.
            failed = pending is not None and pending.done() and pending.exception() is not None
            if pending is not None and not pending.cancelled() and not failed:
                return pending
            future = self._executor.submit(self._embed, crop, self._generation)
            self._pending[crop] = future
            return future

    def _embedding(self, crop: CropGrid) -> torch.Tensor:
        start = time.perf_counter()
        embedding = self._ensure_embedding(crop).result()
        self._add_time("wait_embed_s", time.perf_counter() - start)
        return embedding

    def cached_bytes(self) -> int:
        """Bytes held by cached crop embeddings."""
        with self._lock:
            return sum(e.numel() * e.element_size() for e in self._embeddings.values())

    # -- objects and prompts ---------------------------------------------------------------------

    def new_object(self) -> int:
        """A handle for another object segmented on the same image (sharing the embeddings)."""
        self._check_open()
        self.image  # noqa: B018 - raises if no image is set
        with self._lock:
            handle = self._next_object
            self._next_object += 1
            self._objects[handle] = _ObjectState()
            return handle

    @property
    def objects(self) -> List[int]:
        return sorted(self._objects)

    def _object(self, handle: int) -> _ObjectState:
        self._check_open()  # every use of an object: a closed session answers nothing, even from its cache
        self.image  # noqa: B018
        if handle not in self._objects:
            raise PromptError(f"object {handle!r} does not exist (known: {self.objects}); use new_object()")
        return self._objects[handle]

    def _check_point(self, point: Sequence[float], what: str, inside: bool = True) -> Tuple[float, float, float]:
        """``point`` as three floats; unless ``inside`` is False, it must lie in the image (up to half a voxel out)."""
        values = np.asarray(point, dtype=np.float64).reshape(-1)
        if values.size != 3 or not np.all(np.isfinite(values)):
            raise PromptError(f"{what} must be three finite numbers (x, y, z), got {_fmt(np.asarray(point).reshape(-1))}")
        if not inside:
            return tuple(float(v) for v in values)
        index = physical_to_index(self.image, values)
        size = np.asarray(self.image.GetSize())
        if np.any(index < -0.5) or np.any(index > size - 0.5):
            low = index_to_physical(self.image, np.zeros(3))
            high = index_to_physical(self.image, size - 1)
            raise PromptError(
                f"{what} {_fmt(values)} (LPS mm) is outside the image: it falls at voxel {_fmt(index, 1)}, "
                f"the image has {_fmt(size, 0)} voxels (corner voxel centres at {_fmt(low, 1)} and {_fmt(high, 1)} mm)"
            )
        return tuple(float(v) for v in values)

    def _crop_for(self, state: _ObjectState, center: np.ndarray) -> CropGrid:
        """The crop a prompt at ``center`` is decoded in: the object's own, a cached one (``reuse_crops``),
        or a new one centred on it."""
        candidates = list(state.crops)
        if self.reuse_crops:
            candidates += [c for c in list(self._embeddings) + list(self._pending) if c not in state.crops]
        inside = [c for c in candidates if c.contains(center, margin=CROP_MARGIN)]
        if inside:
            return min(inside, key=lambda c: np.linalg.norm(c.to_index(center)[0] - c.size / 2))
        return CropGrid.around(center)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Session was closed (close() or the end of its with block): create a new Session")

    def _push(self, state: _ObjectState, prompt: Prompt) -> None:
        self._check_open()
        state.history.append(state.snapshot())
        state.prompts.append(prompt)
        crop = self._crop_for(state, prompt.center)
        if crop not in state.crops:
            state.crops.append(crop)
        self._ensure_embedding(crop)

    def add_point(self, point_lps: Sequence[float], positive: bool = True, object: int = 0) -> None:
        """Add a click at a physical point (LPS mm): positive (include) or negative (exclude)."""
        state = self._object(object)
        self._push(state, Prompt(self._check_point(point_lps, "point"), bool(positive)))

    def add_point_voxel(self, index_xyz: Sequence[float], positive: bool = True, object: int = 0) -> None:
        """Add a click at a voxel index (x, y, z) of the set image."""
        values = np.asarray(index_xyz, dtype=np.float64).reshape(-1)
        if values.size != 3 or not np.all(np.isfinite(values)):
            raise PromptError(f"voxel index must be three finite numbers (x, y, z), got {_fmt(values)}")
        self.add_point(index_to_physical(self.image, values), positive, object)

    def add_box(self, corner_lps: Sequence[float], opposite_lps: Sequence[float], object: int = 0) -> None:
        """Add a box given by two opposite corners (LPS mm); the object is segmented inside it.

        The box is axis-aligned in LPS; it may reach past the image (a box drawn at its edge, or
        around an oblique volume's corner) as long as its centre lies in the image.
        """
        state = self._object(object)
        a = self._check_point(corner_lps, "box corner", inside=False)
        b = self._check_point(opposite_lps, "opposite box corner", inside=False)
        extent = np.abs(np.asarray(a) - np.asarray(b))
        if np.any(extent < min(self.image.GetSpacing())):
            raise PromptError(f"box {_fmt(a)} - {_fmt(b)} is flat (extent {_fmt(extent)} mm): give two opposite corners of a 3D box")
        self._check_point((np.asarray(a) + np.asarray(b)) / 2.0, f"the centre of box {_fmt(a)} - {_fmt(b)}")
        field = CROP_SIZE * CROP_SPACING
        if np.any(extent > field):
            logger.warning("box %s - %s spans %s mm: the model sees %g mm at a time around its centre, and the "
                           "object beyond that is not segmented (clicks there add it)", _fmt(a), _fmt(b), _fmt(extent), field)
        self._push(state, Prompt(a, True, b))

    def _candidate_crop(self, state: _ObjectState) -> Optional[CropGrid]:
        """The crop holding the object's candidates while its only prompt is the click that made them."""
        self._update(state)
        if len(state.prompts) != 1 or not state.crops or state.crops[0] not in state.candidates:
            return None
        return state.crops[0]

    def candidates(self, object: int = 0) -> Tuple[List[float], Optional[int]]:
        """The candidate masks of an object's lone first click: their predicted IoUs, and which is shown.

        A single positive click does not say which of the nested structures around it is meant; a
        model trained for it (``config["first_click_multimask"]``) offers candidates (small to large)
        and the session shows the one with the highest predicted IoU.

        Returns:
          (predicted IoU per candidate, index of the shown one, or None for the decoder's pick);
          ([], None) when the object has no candidates (another prompt followed, or the model has none).
        """
        state = self._object(object)
        crop = self._candidate_crop(state)
        if crop is None:
            return [], None
        return [float(v) for v in state.candidates[crop][1]], state.chosen.get(crop)

    def choose_candidate(self, index: Optional[int], object: int = 0) -> None:
        """Show candidate ``index`` of :meth:`candidates` instead (None: back to the decoder's pick).

        The choice is undoable like a prompt, and the next click refines the shown mask.

        Raises:
          PromptError: the object has no candidates, or no candidate ``index``.
        """
        if index is not None and (isinstance(index, bool) or not isinstance(index, numbers.Integral)):
            raise PromptError(f"candidate must be None or a whole number (0, 1, 2: small to large), got {index!r}")
        state = self._object(object)
        crop = self._candidate_crop(state)
        if crop is None:
            raise PromptError(
                "there are no candidate masks to choose from: they come with a lone first positive click, "
                "from a model trained for them"
            )
        logits, iou = state.candidates[crop]
        if index is not None and not 0 <= index < len(iou):
            raise PromptError(f"candidate {index} does not exist: there are {len(iou)} (0 to {len(iou) - 1})")
        if index == state.chosen.get(crop):
            return
        state.history.append(state.snapshot())
        shown = int(iou.argmax()) if index is None else index
        state.logits[crop] = logits[shown][None, None]
        state.iou[crop] = float(iou[shown])
        state.chosen[crop] = index

    def undo(self, object: int = 0) -> bool:
        """Undo the last prompt (or candidate choice) of an object, restoring its previous mask exactly;
        False if nothing to undo."""
        state = self._object(object)
        if not state.history:
            return False
        state.restore(state.history.pop())
        return True

    def reset(self, object: int = 0) -> None:
        """Forget an object's prompts (the image and its embeddings stay)."""
        self._object(object)
        self._objects[object] = _ObjectState()

    def prompts(self, object: int = 0) -> List[Prompt]:
        return list(self._object(object).prompts)

    # -- decoding --------------------------------------------------------------------------------

    def _crop_prompts(self, state: _ObjectState, crop: CropGrid) -> Tuple[np.ndarray, np.ndarray, List[Prompt]]:
        """Point coordinates (crop voxel indices) and labels of the object's prompts decoded in ``crop``."""
        points: List[np.ndarray] = []
        labels: List[int] = []
        used: List[Prompt] = []
        prompts = [p for p in state.prompts if crop.contains(p.center)]
        if self.click_mode == "newest" and prompts:
            # A box stays in force: it sets the region, later clicks refine it.
            boxes = [p for p in prompts if p.is_box]
            prompts = ([boxes[-1]] if boxes and not prompts[-1].is_box else []) + [prompts[-1]]
        for prompt in prompts:
            used.append(prompt)
            if prompt.is_box:
                box_points, box_labels = box_to_points(crop, np.asarray(prompt.point), np.asarray(prompt.corner))
                points.extend(box_points)
                labels.extend(box_labels)
            else:
                points.append(crop.to_index(np.asarray(prompt.point))[0])
                labels.append(1 if prompt.positive else 0)
        index = np.clip(np.asarray(points, dtype=np.float32).reshape(-1, 3), 0, crop.size - 1)
        return index, np.asarray(labels, dtype=np.int64), used

    def _decode_crop(self, state: _ObjectState, crop: CropGrid) -> None:
        coords, labels, used = self._crop_prompts(state, crop)
        if not used:
            return
        if not any(p.positive for p in state.prompts if crop.contains(p.center)):
            # A crop opened by exclude clicks alone marks nothing: decoded, its mask would be the
            # model's guess with nothing to include, added to the object's. (All of the object's
            # prompts in the crop decide, not only those decoded: "newest" decodes one.)
            state.logits.pop(crop, None)
            state.iou.pop(crop, None)
            state.decoded[crop] = len(state.prompts)
            return
        embedding = self._embedding(crop)
        start = time.perf_counter()
        previous = state.logits.get(crop)
        labels_tensor = torch.from_numpy(labels)[None]
        # Only the object's very first prompt: a crop opened later by another click keeps the scale the user set.
        multimask = self.model.uses_multimask(labels_tensor, first=previous is None and len(used) == len(state.prompts))
        if previous is None:
            previous = torch.zeros((1, 1, *self.model.low_res_size), device=self.device)
        decode = fast_path(self.model, self.precision).decode if self._fast else self.model.decode
        with _model_lock(self.model), torch.inference_mode():
            logits, iou = decode(
                embedding,
                torch.from_numpy(coords)[None].to(self.device),
                labels_tensor.to(self.device),
                previous.to(self.device),
                multimask_output=multimask,
            )
        if multimask:
            state.candidates[crop] = (logits[0].float(), iou[0].float())
            state.chosen[crop] = None
            logits, iou = select_by_iou(logits, iou)
        else:
            state.candidates.pop(crop, None)
            state.chosen.pop(crop, None)
        state.logits[crop] = logits.float()
        state.iou[crop] = float(iou.reshape(-1)[0])
        state.decoded[crop] = len(state.prompts)
        self._add_time("decode_s", time.perf_counter() - start)

    def _add_time(self, key: str, seconds: float) -> None:
        self._next_timings[key] = self._next_timings.get(key, 0.0) + seconds

    def _update(self, state: _ObjectState) -> None:
        """Decode the crops that received prompts since their last decode."""
        for crop in state.crops:
            done = state.decoded.get(crop, 0)
            if done == len(state.prompts):
                continue
            if crop not in state.logits or any(crop.contains(p.center) for p in state.prompts[done:]):
                self._decode_crop(state, crop)
            else:
                state.decoded[crop] = len(state.prompts)

    def _paster(self, crop: CropGrid) -> CropPaster:
        with self._lock:
            paster = self._pasters.get(crop)
            if paster is None:
                paster = self._pasters[crop] = CropPaster(crop, self.image, self.model.low_res_size[0], self._refinement)
            return paster

    # -- results ---------------------------------------------------------------------------------

    def predict_region(self, object: int = 0) -> Tuple[Region, np.ndarray]:
        """The object's mask where it can be non-zero: the union of its crops' regions.

        Returns:
          the region (x, y, z voxel box of the set image) and a uint8 (z, y, x) array for it; the
          mask is 0 everywhere outside the region. GUIs update just this box.
        """
        return self._paste(object, changes_only=False)

    def predict_changes(self, object: int = 0) -> Tuple[Region, np.ndarray]:
        """What changed in the object's mask since this object's previous ``predict``,
        ``predict_region`` or ``predict_changes``: writing the returned array into that previous
        result at the returned box gives the current mask (on the first call, or after ``reset``,
        a new crop or another object's prediction in a shared crop, the box covers everything
        that may differ).

        A later click costs its decode plus the voxels along the mask's boundary that changed,
        not the volume: this is what a live view should call per click.

        Returns:
          the box (x, y, z voxel indices of the set image; empty when nothing changed) and the
          object's whole mask inside it, uint8 (z, y, x).
        """
        return self._paste(object, changes_only=True)

    def _paste(self, object: int, changes_only: bool) -> Tuple[Region, np.ndarray]:
        start_total = time.perf_counter()
        earlier = self._next_timings.get("decode_s", 0.0) + self._next_timings.get("wait_embed_s", 0.0)
        state = self._object(object)
        self._update(state)
        crops = [c for c in state.crops if c in state.logits]
        start = time.perf_counter()
        # The pasters once: a concurrent change of the refinement replaces them, for the next call.
        pasters = {crop: self._paster(crop) for crop in crops}
        region = Region((0, 0, 0), (0, 0, 0))
        changed = Region((0, 0, 0), (0, 0, 0))
        for crop in crops:
            paster = pasters[crop]
            region = region.union(paster.region)
            if paster.region.empty:
                continue
            with self._lock:
                shared = paster.owner is not state  # another object's logits are in its kept mask
                paster.owner = state
            box = paster.update(state.logits[crop])
            box = Region((0, 0, 0), paster.region.size) if shared else box
            if not box.empty:
                changed = changed.union(box.offset_by(paster.region.start))
        enforced = self._enforced(state)
        box_prompt = next((p for p in reversed(state.prompts) if p.is_box), None)
        previous = self._delivered.get(object)
        if previous is None or previous.state is not state or previous.region != region or previous.box != box_prompt:
            changed = region if previous is None else region.union(previous.region)
        else:
            for voxel in set(enforced.items()) ^ set(previous.enforced.items()):
                changed = changed.union(Region(voxel[0], tuple(v + 1 for v in voxel[0])))
        self._delivered[object] = _Delivery(state, region, enforced, box_prompt)
        out = changed if changes_only else region
        parts = []  # (overlap with the box, that crop's mask there)
        for crop in crops:
            paster = pasters[crop]
            overlap = out.intersection(paster.region)
            if not overlap.empty:
                parts.append((overlap, paster.read(overlap.relative_to(paster.region.start))))
        if len(parts) == 1 and parts[0][0] == out:
            mask = parts[0][1]  # one crop covers the box (the usual case): its copy is the answer
        else:
            mask = np.zeros(tuple(reversed(out.size)), dtype=np.uint8)
            for overlap, part in parts:
                mask[overlap.relative_to(out.start).slices()] |= part
        if not out.empty:
            self._apply_boxes(state, out, mask)
            self._enforce_clicks(state, out, mask, enforced, pasters)
        timings, self._next_timings = self._next_timings, {}
        timings["paste_s"] = time.perf_counter() - start
        timings["total_s"] = time.perf_counter() - start_total + earlier
        self.last_timings = {"decode_s": 0.0, **timings}
        return out, mask

    def _apply_boxes(self, state: _ObjectState, region: Region, mask: np.ndarray) -> None:
        boxes = [p for p in state.prompts if p.is_box]
        if not boxes or region.empty:
            return
        box = boxes[-1]
        low = np.minimum(box.point, box.corner)
        high = np.maximum(box.point, box.corner)
        zs, ys, xs = (np.arange(a, b) for a, b in zip(reversed(region.start), reversed(region.stop)))
        grid = np.stack(np.meshgrid(xs, ys, zs, indexing="ij"), axis=-1).reshape(-1, 3)
        matrix, origin = image_affine(self.image)
        physical = grid @ matrix.T + origin
        # Exactly the box the user drew (voxel centres inside it): nothing outside it may change.
        inside = np.all((physical >= low - 1e-6) & (physical <= high + 1e-6), axis=1)
        inside = inside.reshape(len(xs), len(ys), len(zs)).transpose(2, 1, 0)
        mask &= inside.astype(np.uint8)

    def _enforced(self, state: _ObjectState) -> Dict[Tuple[int, int, int], int]:
        """The clicked voxels (x, y, z of the set image) and the value each click fixes there (later clicks win)."""
        out: Dict[Tuple[int, int, int], int] = {}
        for prompt in state.prompts:
            voxel = self._click_voxel(prompt)
            if voxel is not None:
                out[voxel] = 1 if prompt.positive else 0
        return out

    def _click_voxel(self, prompt: Prompt) -> Optional[Tuple[int, int, int]]:
        """The set image's voxel (x, y, z) a click falls in; None for a box.

        Halves round up, as ITK's ``TransformPhysicalPointToIndex`` does; a click on the image's
        outer face (accepted up to half a voxel out) belongs to the voxel on that face.
        """
        if prompt.is_box:
            return None
        with self._lock:  # cached: every paste revisits every prompt; set_image clears it
            if prompt not in self._click_voxels:
                index = np.floor(physical_to_index(self.image, prompt.point) + 0.5).astype(int)
                index = np.clip(index, 0, np.asarray(self.image.GetSize()) - 1)
                self._click_voxels[prompt] = tuple(int(v) for v in index)
            return self._click_voxels[prompt]

    def _enforce_clicks(self, state: _ObjectState, region: Region, mask: np.ndarray, enforced: Dict[Tuple[int, int, int], int],
                        pasters: Dict[CropGrid, CropPaster]) -> None:
        """A positive click's voxel is always in the mask, a negative one's never (later clicks win).

        How often the model's own answer disagreed is counted once per click (``pasters``: this
        paste's, per decoded crop).
        """
        for number, prompt in enumerate(state.prompts):
            index = self._click_voxel(prompt) if number >= state.checked else None
            if index is None:
                continue
            voxel = Region(index, tuple(v + 1 for v in index))
            answer = np.zeros((1, 1, 1), dtype=np.uint8)  # the model's own answer there, before any correction
            for paster in pasters.values():
                if not voxel.intersection(paster.region).empty:
                    answer |= paster.read(voxel.relative_to(paster.region.start))
            self._apply_boxes(state, voxel, answer)
            self.clicks_checked += 1
            self.click_violations += int(bool(answer[0, 0, 0]) != prompt.positive)
        state.checked = len(state.prompts)
        for voxel, value in enforced.items():
            local = np.asarray(voxel) - np.asarray(region.start)
            if np.all(local >= 0) and np.all(local < np.asarray(region.size)):
                mask[tuple(int(v) for v in local[::-1])] = value

    def predict(self, object: int = 0) -> sitk.Image:
        """The object's mask as a uint8 SimpleITK image on the set image's exact grid."""
        region, local = self.predict_region(object)
        return self._region_image(region, local)

    def predict_proba(self, object: int = 0) -> sitk.Image:
        """The object's foreground probability (float32, sigmoid of the logits) on the set image's grid."""
        state = self._object(object)
        self._update(state)
        region, fields = self._crop_fields(state)
        probability = np.zeros(tuple(reversed(region.size)), dtype=np.float32)
        for local, crop in fields:
            values = self._paster(crop).values(state.logits[crop])
            target = probability[local.slices()]
            np.maximum(target, 1.0 / (1.0 + np.exp(-values.astype(np.float64))), out=target, casting="unsafe")
        return self._region_image(region, probability)

    def _crop_fields(self, state: _ObjectState) -> Tuple[Region, List[Tuple[Region, CropGrid]]]:
        """The union region of the object's decoded crops, and each crop's region relative to it."""
        crops = [c for c in state.crops if c in state.logits and not self._paster(c).region.empty]
        region = Region((0, 0, 0), (0, 0, 0))
        for crop in crops:
            region = region.union(self._paster(crop).region)
        fields = []
        for crop in crops:
            own = self._paster(crop).region
            fields.append((Region(
                tuple(a - r for a, r in zip(own.start, region.start)), tuple(b - r for b, r in zip(own.stop, region.start))
            ), crop))
        return region, fields

    def _region_image(self, region: Region, local: np.ndarray) -> sitk.Image:
        """An image on the set image's grid holding ``local`` ((z, y, x) array) in ``region``, 0 elsewhere.

        The full-size image is allocated once, by SimpleITK, and the region pasted into it in place:
        not a full numpy array plus the copy ``GetImageFromArray`` makes (for a float map of a
        512 x 512 x 700 CT, 0.7 GB less at the peak).
        """
        image = sitk.Image(self.image.GetSize(), sitk.sitkUInt8 if local.dtype == np.uint8 else sitk.sitkFloat32)
        image.CopyInformation(self.image)
        if not region.empty:
            image[tuple(slice(a, b) for a, b in zip(region.start, region.stop))] = sitk.GetImageFromArray(local)
        return image

    def predicted_iou(self, object: int = 0) -> Optional[float]:
        """The decoder's IoU estimate for the crop the object's newest prompt was decoded in (of the
        crops holding it, the one it lies most central in); None before any prompt."""
        state = self._object(object)
        self._update(state)
        if not state.prompts:
            return None
        newest = np.asarray(state.prompts[-1].center)
        holding = [c for c in state.crops if c.contains(newest) and c in state.iou]
        if not holding:
            return None
        crop = min(holding, key=lambda c: np.linalg.norm(c.to_index(newest)[0] - c.size / 2))
        return state.iou[crop]

    # -- uncertainty -----------------------------------------------------------------------------

    def uncertainty(
        self,
        n: int = 16,
        method: str = "mc-dropout",
        object: int = 0,
        measure: str = "entropy",
        seed: int = 0,
    ) -> Tuple[sitk.Image, sitk.Image]:
        """Mean foreground probability and a per-voxel uncertainty from ``n`` stochastic decodes.

        Arguments:
          n: number of stochastic decodes, batched in one decoder forward pass per crop.
          method: "mc-dropout" (decoder dropout active) or "click-jitter" (FastSAM-3DSlicer's
            method: each decode adds a random positive point drawn from the current mask).
          object: which object.
          measure: "entropy" (binary entropy of the mean probability, bits) or "variance".
          seed: makes the stochastic decodes reproducible.

        Returns:
          (mean probability, uncertainty) as float32 images on the set image's grid.
        """
        if method not in ("mc-dropout", "click-jitter"):
            raise ValueError(f"uncertainty method must be 'mc-dropout' or 'click-jitter', got {method!r}")
        if measure not in ("entropy", "variance"):
            raise ValueError(f"uncertainty measure must be 'entropy' or 'variance', got {measure!r}")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
            raise ValueError(f"n must be a whole number of at least 2 stochastic decodes, got {n!r}")
        state = self._object(object)
        self._update(state)
        region, fields = self._crop_fields(state)
        mean_region = np.zeros(tuple(reversed(region.size)), dtype=np.float32)
        unc_region = np.zeros_like(mean_region)
        generator = torch.Generator().manual_seed(seed)
        for local, crop in fields:
            probabilities = self._stochastic_decodes(state, crop, n, method, generator)
            mean = probabilities.mean(0)
            if measure == "variance":
                spread = probabilities.var(0, unbiased=False)
            else:
                p = mean.clamp(1e-6, 1 - 1e-6)
                spread = -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))
            paster = self._paster(crop)
            for field_, target in ((mean, mean_region), (spread, unc_region)):
                values = np.nan_to_num(paster.values(field_), neginf=0.0, copy=False)
                view = target[local.slices()]
                np.maximum(view, values, out=view, casting="unsafe")
        # Two full-size float maps are returned; hold no more than that at once.
        mean_image = self._region_image(region, mean_region)
        del mean_region
        return mean_image, self._region_image(region, unc_region)

    def _stochastic_decodes(
        self, state: _ObjectState, crop: CropGrid, n: int, method: str, generator: torch.Generator
    ) -> torch.Tensor:
        coords, labels, _ = self._crop_prompts(state, crop)
        embedding = self._embedding(crop)
        previous = state.logits[crop]
        batch_coords = torch.from_numpy(coords)[None].repeat(n, 1, 1)
        batch_labels = torch.from_numpy(labels)[None].repeat(n, 1)
        # A lone click's mask is one of its candidates: the stochastic decodes redo that choice, each its own
        # (the user's choice stays the user's).
        candidates = crop in state.candidates and method == "mc-dropout"
        chosen = state.chosen.get(crop)
        fed_back = torch.zeros_like(previous) if candidates else previous
        if method == "click-jitter":
            cells = torch.nonzero(previous[0, 0] > 0)
            if len(cells) == 0:
                cells = torch.nonzero(previous[0, 0] >= previous.max())
            scale = crop.size / previous.shape[-1]
            picks = cells[torch.randint(len(cells), (n,), generator=generator)].float()
            jitter = (picks + torch.rand((n, 3), generator=generator)) * scale - 0.5
            batch_coords = torch.cat([batch_coords, jitter[:, None, :].clamp(0, crop.size - 1)], dim=1)
            batch_labels = torch.cat([batch_labels, torch.ones((n, 1), dtype=torch.int64)], dim=1)
        decoder = self.model.mask_decoder
        dropouts = [m for m in decoder.modules() if isinstance(m, torch.nn.Dropout)]
        # Dropout draws from the global generator of the model's device: seeded here for
        # reproducibility, inside a fork so that the caller's random state is what it was (the
        # generator of that device only: torch.manual_seed would reseed every device's).
        cuda = self.device.type == "cuda"
        with _model_lock(self.model), torch.inference_mode(), torch.random.fork_rng(devices=[self.device] if cuda else []):
            saved = [(m, m.p, m.training) for m in dropouts]
            try:
                if method == "mc-dropout":
                    configured = float(self.model.config.get("decoder_dropout", 0.0))
                    rate = configured if configured > 0 else self.mc_dropout_rate
                    value = int(torch.randint(1 << 30, (1,), generator=generator))
                    if cuda:
                        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                        torch.cuda.default_generators[index].manual_seed(value)
                    elif self.device.type == "cpu":
                        torch.default_generator.manual_seed(value)
                    for module in dropouts:
                        module.p = rate
                        module.train()
                logits, iou = self.model.decode(
                    embedding,
                    batch_coords.to(self.device),
                    batch_labels.to(self.device),
                    fed_back.repeat(n, 1, 1, 1, 1).to(self.device),
                    multimask_output=candidates,
                )
                if candidates:
                    logits = logits[:, chosen : chosen + 1] if chosen is not None else select_by_iou(logits, iou)[0]
            finally:
                for module, p, training in saved:
                    module.p = p
                    module.train(training)
        return torch.sigmoid(logits[:, 0].float().cpu())


def _fmt(values: Sequence[float], digits: int = 2) -> str:
    """(1.5, -2.0, 3.25) style text for messages."""
    return "(" + ", ".join(f"{float(v):.{digits}f}" if digits else str(int(v)) for v in values) + ")"


def box_to_points(crop: CropGrid, corner_a: np.ndarray, corner_b: np.ndarray) -> Tuple[List[np.ndarray], List[int]]:
    """A box as prompts the public models understand: a positive point at its centre, negatives at its 8 corners.

    The public weights have no box embedding (DESIGN.md §4); the corners of a box drawn around an
    object lie outside it, and the centre of a compact object inside it. Output is also clipped
    to the box by the session.

    Returns:
      crop voxel indices (model order) and labels (1 positive, 0 negative).
    """
    low, high = np.minimum(corner_a, corner_b), np.maximum(corner_a, corner_b)
    center = crop.to_index((low + high) / 2.0)[0]
    corners = [crop.to_index(np.where(np.array(bits, dtype=bool), high, low))[0] for bits in np.ndindex(2, 2, 2)]
    return [center] + corners, [1] + [0] * len(corners)
