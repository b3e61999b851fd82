"""``fastsam3d benchmark``: one run that times what a user waits for, beside the arithmetic floor.

Everything is timed in the same process, interleaved round by round (each round runs every
measurement once), so machine load affects all of them alike; results are medians with the
interquartile range. Beside the model timings sit matrix multiplies of the student encoder's
FLOP count (fp32, int8, bf16), so each result also reads as a ratio to "what this machine's
fp32 arithmetic allows" — the figure that transfers between machines.

Measured:

* encoder per 128^3 crop for the full-size student ("fastsam3d"), the teacher ("sam-med3d") and
  the bundled architecture, in every speed mode available on the device;
* the **decoder** alone (prompt encoder + mask decoder of the full-size student, a later click's
  network work: previous logits and a few points) per speed mode: a click's figure that needs no
  image, so it runs where SimpleITK is missing (the lent GPU machines);
* on CUDA, the student's encoder and decoder also replayed as CUDA graphs (one launch instead of
  hundreds: what a GPU session could gain from capturing them);
* through :class:`Session` on Colin27 with the full-size student: the **first click**
  (``set_image`` + embedding + decode + paste, a fresh session each time) and **later clicks**
  (decode + paste of the mask in the image grid), per speed mode; with ``--session-model``, also
  that trained model and, when it is a narrower student, the same model widened to the full-size
  architecture (:mod:`FastSAM3DLib.widen`: full-size arithmetic, the trained model's masks);
* peak resident memory (RSS) after each phase.

Random weights give the right timings for the networks; the paste's cost depends on the mask, so
later clicks also report the mask size (and ``Testing/benchmarks/paste_speed.py`` times the
paste on controlled shapes).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import FastSAM3DInputError
from .modeling import Sam3D

logger = logging.getLogger(__name__)

ENCODER_MODELS = ("fastsam3d", "sam-med3d", "bundled")
WIDENED_TAG = "widened to full size"  # marks the session rows of a trained model widened to the full-size student


# -- machine ------------------------------------------------------------------------------------


def cpu_info() -> Dict[str, object]:
    """CPU model and the instruction-set extensions that decide which speed modes can be fast."""
    from .quantize import cpu_flags

    flags = cpu_flags()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    interesting = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {
        "model": model,
        "cores": os.cpu_count(),
        "extensions": [f for f in interesting if f in flags],
        "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if platform.system() != "Darwin" else peak / 2**20


def encoder_flops(name_or_config) -> int:
    """FLOPs (2 per multiply-add) of one encoder forward on a 128^3 crop, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from .attention import use_backend
    from .build import build_model

    with torch.device("meta"):
        model = build_model(name_or_config)
        x = torch.empty(1, model.image_encoder.patch_embed.proj.in_channels, *(model.img_size,) * 3)
    with torch.inference_mode(), use_backend("math"), FlopCounterMode(display=False) as counter:
        model.image_encoder(x)
    return int(counter.get_total_flops())


# -- timing -------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One timed thing: ``run()`` is called once per round (``rounds`` at most)."""

    group: str
    name: str
    run: Callable[[], object]
    rounds: Optional[int] = None
    flops: Optional[float] = None
    note: str = ""
    self_timed: bool = False  # run() returns (wall, cpu) seconds of the part that counts
    passive: bool = False  # filled by another measurement's run()
    seconds: List[float] = field(default_factory=list)
    cpu_seconds: List[float] = field(default_factory=list)
    round_of: List[int] = field(default_factory=list)  # the round each sample was taken in
    extra: Dict[str, object] = field(default_factory=dict)

    def summary(self) -> Dict[str, object]:
        values = sorted(self.seconds)
        out: Dict[str, object] = {"group": self.group, "name": self.name, "n": len(values), "note": self.note, **self.extra}
        if values:
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            out.update(median_s=float(median), q1_s=float(q1), q3_s=float(q3), min_s=float(values[0]),
                       cpu_median_s=float(statistics.median(self.cpu_seconds)))
            if self.flops:
                out["gflops_per_s"] = self.flops / median / 1e9
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _drop(m: Measurement, active: List[Measurement], error: BaseException) -> None:
    """Take a failed measurement out of the run, keeping why."""
    m.extra["failed"] = f"{type(error).__name__}: {error}"
    m.seconds.clear()
    m.cpu_seconds.clear()
    m.round_of.clear()
    active.remove(m)
    logger.warning("benchmark: %s: %s failed: %s", m.group, m.name, m.extra["failed"])


def run_interleaved(measurements: Sequence[Measurement], rounds: int, device: torch.device, warmup: bool = True, progress: bool = True,
                    tolerate_failures: bool = False) -> None:
    """Time every measurement once per round, round after round (after one untimed warm-up call).

    ``tolerate_failures``: a measurement that raises is dropped (with the samples it took) and its
    error kept in ``extra["failed"]`` (the report lists it) instead of ending the run.
    """
    from tqdm import tqdm

    active = [m for m in measurements if not m.passive]
    total = sum(min(rounds, m.rounds or rounds) + int(warmup) for m in active)
    bar = tqdm(total=total, desc="benchmark", unit="run", disable=not progress, leave=False)
    try:
        if warmup:
            for m in list(active):
                bar.set_postfix_str(f"warm-up {m.group}: {m.name}")
                try:
                    m.run()
                except Exception as error:
                    if not tolerate_failures:
                        raise
                    _drop(m, active, error)
                _sync(device)
                bar.update()
            for m in measurements:  # forget what the warm-up recorded
                m.seconds.clear()
                m.cpu_seconds.clear()
                m.round_of.clear()
                for value in m.extra.values():
                    if isinstance(value, list):
                        value.clear()
        for round_ in range(rounds):
            for m in list(active):
                if m.rounds is not None and round_ >= m.rounds:
                    continue
                bar.set_postfix_str(f"{m.group}: {m.name}")
                gc.collect()
                _sync(device)
                start, cpu = time.perf_counter(), time.process_time()
                try:
                    value = m.run()
                    _sync(device)
                except Exception as error:
                    if not tolerate_failures:
                        raise
                    _drop(m, active, error)
                    continue
                if m.self_timed:
                    m.seconds.append(value[0])
                    m.cpu_seconds.append(value[1])
                else:
                    m.seconds.append(time.perf_counter() - start)
                    m.cpu_seconds.append(time.process_time() - cpu)
                bar.update()
            for m in measurements:  # samples taken this round (passive ones fill theirs inside others' runs)
                m.round_of.extend([round_] * (len(m.seconds) - len(m.round_of)))
    finally:
        bar.close()


# -- what is measured ---------------------------------------------------------------------------


def _matmuls(flops: float, device: torch.device, native_bf16: bool, rounds: int) -> List[Measurement]:
    """Matrix multiplies of ``flops`` in fp32, bf16 and int8.

    Two fp32 shapes of the same FLOPs are timed: the student's own GEMM (512 tokens x 768 @
    768 x 3072, repeated) and one large square-ish multiply (2048 x 2048 @ 2048 x n, which streams
    ~100 MB through memory). The reference every ratio is taken against, "matmul fp32", is added
    after the run by :func:`add_fp32_reference`: per round, the faster of the two, so no target is
    met by picking the slower floor.
    """
    tokens, width, hidden = 512, 768, 3072
    repeats = max(1, int(round(flops / (2 * tokens * width * hidden))))
    x, w = torch.randn(tokens, width, device=device), torch.randn(width, hidden, device=device)

    def vit_shaped():
        for _ in range(repeats):
            y = x @ w
        return y

    out = [Measurement("floor", "matmul fp32 (ViT shapes)", vit_shaped, flops=2.0 * tokens * width * hidden * repeats,
                       note=f"{repeats} x ({tokens}x{width} @ {width}x{hidden})")]
    m = k = 2048
    n = max(1, int(round(flops / (2 * m * k))))
    exact = 2.0 * m * k * n
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    out.append(Measurement("floor", "matmul fp32 (square)", lambda: a @ b, flops=exact, note=f"{m}x{k} @ {k}x{n}"))
    emulated_bf16 = device.type == "cpu" and not native_bf16
    if emulated_bf16:
        # Emulated bf16 is ~50x slower than fp32: time 1/512 of the work and scale (noted).
        n16 = max(1, n // 512)
        ab, bb = a.bfloat16(), torch.randn(k, n16, device=device).bfloat16()
        scale = n / n16
        out.append(Measurement("floor", "matmul bf16", lambda: ab @ bb, rounds=min(rounds, 3), flops=2.0 * m * k * n16,
                               note=f"no native bf16 on this CPU: {m}x{k} @ {k}x{n16} timed, x{scale:.0f}",
                               extra={"scale": scale}))
    else:
        ab, bb = a.bfloat16(), b.bfloat16()
        out.append(Measurement("floor", "matmul bf16", lambda: ab @ bb, flops=exact))
    if device.type == "cpu":
        from .quantize import Int8Linear, int8_available

        if int8_available():
            layer = Int8Linear(w.T.contiguous(), None)

            def vit_shaped_int8():
                for _ in range(repeats):
                    y = layer(x)
                return y

            out.append(Measurement("floor", "matmul int8", vit_shaped_int8, flops=2.0 * tokens * width * hidden * repeats,
                                   note="same shapes, fbgemm dynamic int8 (activation quantisation included)"))
    return out


def _load_bundled_architecture():
    """The bundled model when installed (its real weights), else its architecture with random weights."""
    from .build import build_model
    from .checkpoint import bundled_model_path, load_model

    if bundled_model_path() is not None:
        return load_model(None, device="cpu"), "bundled weights"
    return build_model("fastsam3d-384"), "random weights (no bundled model in this install)"


def _encoder_measurements(names: Sequence[str], modes: Sequence[str], device: torch.device, native_bf16: bool, rounds: int,
                          heavy_rounds: int) -> List[Measurement]:
    from .build import build_model

    out = []
    x = torch.randn(1, 1, 128, 128, 128, device=device)
    for name in names:
        torch.manual_seed(0)
        if name == "bundled":
            model, note = _load_bundled_architecture()
            flops = encoder_flops(model.config)
        else:
            model, note = build_model(name), "random weights"
            flops = encoder_flops(name)
        model = model.to(device).eval()
        teacher = name == "sam-med3d"
        for mode in modes:
            slow = mode == "bf16" and device.type == "cpu" and not native_bf16
            if slow and name != "fastsam3d":
                continue  # emulated bf16 on the bigger encoders takes minutes; the student shows the point
            runner = _mode_runner(model, mode, device)
            if runner is None:
                continue
            path, autocast = runner
            encoder = model.image_encoder if path is None else path.encoder

            def run(encoder=encoder, autocast=autocast):
                # No autocast weight cache: a CUDA graph cannot capture it (and one forward casts each weight once).
                with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=autocast, cache_enabled=False):
                    return encoder(x)

            out.append(Measurement("encoder", f"{name} {mode}", run, rounds=1 if slow else (heavy_rounds if teacher else None), flops=flops,
                                   note=note + ("; bf16 emulated (no native bf16)" if slow else "")))
            if device.type == "cuda" and name == "fastsam3d":
                out.append(_graph_measurement("encoder", f"{name} {mode}", run, device, flops=flops, note=note))
    return out


def _mode_runner(model: Sam3D, mode: str, device: torch.device):
    """How a speed mode runs ``model`` on ``device``: (its fast path, or None for the model itself;
    whether under bf16 autocast), or None where the mode cannot run it."""
    from .quantize import check_mode, fast_path, runs_fast_path

    if not runs_fast_path(mode, device):
        return None, mode == "bf16"
    try:
        check_mode(model, mode)
    except ValueError:
        return None
    return fast_path(model, mode), False


def _cuda_graphed(run: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``run`` captured once as a CUDA graph; the returned callable replays it (same inputs and
    output buffers: a timing, not an API). ``run`` must not use autocast's weight cache."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm up on a side stream, as capture requires
        for _ in range(3):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def _graph_measurement(group: str, name: str, run: Callable[[], object], device: torch.device, **kwargs) -> Measurement:
    """``run`` replayed as a CUDA graph, named ``name + " (CUDA graph)"``; a capture that fails is
    reported in the row (no timing) rather than ending the run."""
    try:
        replay = _cuda_graphed(run, device)
    except Exception as error:  # noqa: BLE001 - recorded in the report
        logger.warning("benchmark: CUDA graph of %s failed: %s", name, error)
        return Measurement(group, f"{name} (CUDA graph)", lambda: None, passive=True,
                           extra={"failed": f"{type(error).__name__}: {error}"})
    return Measurement(group, f"{name} (CUDA graph)", replay, **kwargs)


def _decoder_measurements(modes: Sequence[str], device: torch.device, native_bf16: bool, points: int = 5) -> List[Measurement]:
    """A later click's network work per speed mode: the full-size student's prompt encoder and mask
    decoder with ``points`` clicks and the previous low-res logits as the mask prompt (random weights
    and inputs: its cost does not depend on them). On CUDA each mode is also timed as a CUDA graph."""
    from .build import build_model

    torch.manual_seed(0)
    model = build_model("fastsam3d").to(device).eval()
    grid = tuple(int(s) for s in model.prompt_encoder.image_embedding_size)
    embedding = torch.randn(1, model.prompt_encoder.embed_dim, *grid, device=device)
    coords = torch.rand(1, points, 3, device=device) * (model.img_size - 1)
    labels = (torch.arange(points, device=device) % 3 != 1).long()[None]  # positive and negative clicks
    previous = torch.randn(1, 1, *model.low_res_size, device=device) * 4.0
    out = []
    for mode in modes:
        if mode == "bf16" and not native_bf16:
            continue  # emulated bf16 says nothing about a machine that has it
        runner = _mode_runner(model, mode, device)
        if runner is None:
            continue
        path, autocast = runner
        decode = model.decode if path is None else path.decode

        def run(decode=decode, autocast=autocast, model=model):  # the fast path holds the model weakly
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=autocast, cache_enabled=False):
                return decode(embedding, coords, labels, previous)

        note = f"prompt encoder + mask decoder, {points} points + previous logits, random weights"
        out.append(Measurement("decoder", f"decoder {mode}", run, note=note))
        if device.type == "cuda":
            out.append(_graph_measurement("decoder", f"decoder {mode}", run, device, note=note))
    return out


def _colin27_case(structure: str):
    from .data import interior_point, load_colin27

    colin = load_colin27()
    if structure not in colin.labels:
        raise FastSAM3DInputError(f"--structure: unknown Colin27 structure {structure!r}; expected one of {', '.join(colin.labels)}")
    return colin.image, colin.labels[structure], interior_point(colin.labels[structure])[1]


def _session_measurements(model, image, label, first_point, modes: Sequence[str], later_clicks: int, seed: int,
                          suffix: str = "") -> List[Measurement]:
    """First click (fresh session each round) and later clicks per speed mode, through Session."""
    import SimpleITK as sitk

    from .evaluate import simulated_click
    from .session import Session

    gt = sitk.GetArrayViewFromImage(label) > 0
    out = []
    for mode in modes:
        first = Measurement("session", f"first click {mode}{suffix}", lambda: None, self_timed=True,
                            note="set_image + embed + decode + paste (predict_region), fresh session")
        later = Measurement("session", f"later click {mode}{suffix}", lambda: None, passive=True,
                            note="add_point + decode + the changed voxels (predict_changes), all corrective clicks")
        later_full = Measurement("session", f"later click {mode}{suffix} (full-image mask)", lambda: None, passive=True,
                                 note="as later click, then predict() for the whole grid")

        def run(mode=mode, first=first, later=later, later_full=later_full):
            session = Session(model, precision=mode, prefetch=True)
            try:
                start, cpu = time.perf_counter(), time.process_time()
                session.set_image(image)
                session.add_point(first_point, True)
                region, local = session.predict_region()
                elapsed_first = (time.perf_counter() - start, time.process_time() - cpu)
                first.extra.setdefault("breakdown", []).append(dict(session.last_timings))
                pred = np.zeros(gt.shape, dtype=bool)
                if not region.empty:
                    pred[region.slices()] = local > 0
                rng = np.random.default_rng(seed)
                times, cpus, times_full, voxels = [], [], [], []
                for number in range(later_clicks):
                    click = simulated_click(image, gt, pred, rng, "interior" if number < 1 else "random")
                    if click is None:
                        break
                    t, c = time.perf_counter(), time.process_time()
                    session.add_point(click.point_lps, click.positive)
                    changed, delta = session.predict_changes()
                    wall, cpu_ = time.perf_counter() - t, time.process_time() - c
                    if session.last_timings.get("wait_embed_s", 0.0) > 1e-3:
                        # The click fell outside the crop: it is a first click in a new crop, not a later click.
                        later.extra.setdefault("new_crop_clicks_s", []).append(wall)
                    else:
                        times.append(wall)
                        cpus.append(cpu_)
                        later.extra.setdefault("breakdown", []).append(dict(session.last_timings))
                        later.extra.setdefault("changed_box_voxels", []).append(0 if changed.empty else int(np.prod(changed.size)))
                        t = time.perf_counter()
                        session.predict()
                        times_full.append(wall + time.perf_counter() - t)
                    pred[changed.slices()] = delta > 0
                    voxels.append(int(pred.sum()))
                later.seconds.extend(times)
                later_full.seconds.extend(times_full)
                later.cpu_seconds.extend(cpus)
                later_full.cpu_seconds.extend(times_full)
                later.extra.setdefault("mask_voxels", []).extend(voxels)
                return elapsed_first
            finally:
                session.close()

        first.run = run
        out.extend([first, later, later_full])
    return out


def benchmark(
    *,
    device: str = "auto",
    rounds: int = 5,
    heavy_rounds: int = 3,
    threads: int = 2,
    modes: Optional[Sequence[str]] = None,
    encoders: Sequence[str] = ENCODER_MODELS,
    structure: str = "putamen_l",
    later_clicks: int = 8,
    session: bool = True,
    session_model: Optional[str] = None,
    seed: int = 0,
    progress: bool = True,
) -> Dict[str, object]:
    """Run the benchmark; returns the JSON-ready report (see the module docstring).

    ``session_model``: a checkpoint whose session timings are added (marked "[trained]"): random
    weights time the networks right, but their masks are noise, the worst case for the paste;
    a trained model's masks are what users see (its decoder is the student's, so later clicks
    cost the same network work).
    """
    from .build import build_model
    from .checkpoint import resolve_device
    from .quantize import int8_available, resolve_precision

    torch.set_num_threads(threads)
    dev = resolve_device(device)
    info = cpu_info()
    native_bf16 = dev.type == "cuda" or bool(info["native_bf16"])
    if modes is None:
        modes = ["fp32", "fp32-fast", "bf16"] + (["int8", "int8-sparse"] if dev.type == "cpu" and int8_available() else ["sparse"])
    report: Dict[str, object] = {
        "machine": {
            "cpu": info, "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "auto_mode": resolve_precision("auto", dev),
        "settings": {"rounds": rounds, "heavy_rounds": heavy_rounds, "modes": list(modes), "structure": structure, "later_clicks": later_clicks},
    }
    student_flops = encoder_flops("fastsam3d")
    report["student_encoder_gflop"] = student_flops / 1e9
    measurements: List[Measurement] = []
    peaks: Dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if session:
            torch.manual_seed(0)
            student = build_model("fastsam3d").to(dev).eval()
            image, label, point = _colin27_case(structure)
            session_modes = [m for m in modes if m != "bf16" or native_bf16]
            session_items = _session_measurements(student, image, label, point, session_modes, later_clicks, seed)
            if session_model:
                from .checkpoint import load_model

                trained = load_model(session_model, device=dev)
                report["session_model"] = {"path": str(session_model), "architecture": trained.config.get("embed_dim")}
                session_items += _session_measurements(trained, image, label, point, session_modes, later_clicks, seed,
                                                       suffix=f" [trained, width {trained.config.get('embed_dim')}]")
                full_size = _widened_to(trained, student)
                if full_size is not None:
                    report["session_model"]["widened_to_full_size"] = full_size.config["name"]
                    session_items += _session_measurements(full_size, image, label, point, session_modes, later_clicks, seed,
                                                           suffix=f" [trained, {WIDENED_TAG}]")
            floor = _matmuls(student_flops, dev, native_bf16, rounds)
            run_interleaved(floor + session_items, rounds, dev, progress=progress, tolerate_failures=dev.type == "cuda")
            floor.insert(0, add_fp32_reference(floor))
            paired_ratios(floor + session_items, floor[0])
            measurements += floor + session_items
            peaks["after session runs (student, Colin27)"] = peak_rss_mb()
            del student
        encoder_items = _encoder_measurements([e for e in encoders if e in ENCODER_MODELS], modes, dev, native_bf16, rounds, heavy_rounds)
        encoder_items += _decoder_measurements(modes, dev, native_bf16)
        floor2 = _matmuls(student_flops, dev, native_bf16, rounds)
        for m in floor2:
            m.group = "floor (encoder run)"
        # A lent GPU machine is spent on one call: there a mode that fails is reported, not fatal.
        run_interleaved(floor2 + encoder_items, rounds, dev, progress=progress, tolerate_failures=dev.type == "cuda")
        floor2.insert(0, add_fp32_reference(floor2))
        paired_ratios(floor2 + encoder_items, floor2[0])
        measurements += floor2 + encoder_items
        peaks["after encoder runs (incl. teacher)"] = peak_rss_mb()
    report["peak_rss_mb"] = peaks
    report["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["results"] = [m.summary() for m in measurements]
    report["ratios"] = _ratios(report["results"])
    report["targets"] = _targets(report)
    return report


def _find(results, group_prefix: str, name: str) -> Optional[dict]:
    for r in results:
        if r["group"].startswith(group_prefix) and r["name"] == name and "median_s" in r:
            return r
    return None


def _scaled(r: dict) -> float:
    return r["median_s"] * float(r.get("scale", 1.0))


def add_fp32_reference(floor: Sequence[Measurement]) -> Measurement:
    """The "matmul fp32" reference of a timed floor group: per round, the faster fp32 shape."""
    shapes = [m for m in floor if m.name.startswith("matmul fp32 (")]
    by_round: Dict[int, Tuple[float, float]] = {}  # round -> (wall, cpu) seconds of the faster shape
    for m in shapes:
        for wall, cpu, round_ in zip(m.seconds, m.cpu_seconds, m.round_of):
            if wall < by_round.get(round_, (float("inf"), 0.0))[0]:
                by_round[round_] = (wall, cpu)
    reference = Measurement(shapes[0].group, "matmul fp32", lambda: None, passive=True, flops=shapes[0].flops,
                            note="per round, the faster of the two fp32 shapes below")
    reference.round_of = sorted(by_round)
    reference.seconds = [by_round[r][0] for r in reference.round_of]
    reference.cpu_seconds = [by_round[r][1] for r in reference.round_of]
    return reference


def paired_ratios(measurements: Sequence[Measurement], floor: Measurement) -> None:
    """Per sample, its time over the floor's time in the same round; the median of those goes into
    ``extra["paired_ratio"]``: less sensitive to load that changes between rounds than a ratio of medians."""
    per_round = dict(zip(floor.round_of, floor.seconds))
    for m in measurements:
        ratios = [t / per_round[r] for t, r in zip(m.seconds, m.round_of) if r in per_round]
        if ratios:
            m.extra["paired_ratio"] = float(statistics.median(ratios))


def _ratios(results) -> Dict[str, float]:
    """Each session / encoder / decoder median over the fp32 matmul of the student's FLOPs timed in the same run."""
    ratios = {}
    for prefixes, floor_group in ((("session",), "floor"), (("encoder", "decoder"), "floor (encoder run)")):
        floor = next((r for r in results if r["group"] == floor_group and r["name"] == "matmul fp32" and "median_s" in r), None)
        if floor is None:
            continue
        for r in results:
            if r["group"] in prefixes and "median_s" in r:
                ratios[f"{r['name']} / fp32 matmul"] = r["median_s"] / floor["median_s"]
        prefix = prefixes[0]
        for r in results:
            if r["group"] == floor_group and r["name"] != "matmul fp32" and "median_s" in r:
                ratios[f"{r['name']} ({prefix} run) / fp32 matmul"] = _scaled(r) / floor["median_s"]
    return ratios


def _widened_to(model: Sam3D, full_size: Sam3D) -> Optional[Sam3D]:
    """``model`` widened (:func:`~FastSAM3DLib.widen.widen_model`) to ``full_size``'s architecture, or None.

    The full-size student's arithmetic with a trained model's masks: its encoder computes what the
    trained narrower encoder computes, so the paste and later clicks see realistic masks.
    """
    from .widen import widen_model

    width, target = model.config.get("embed_dim"), full_size.config.get("embed_dim")
    if not width or not target or target % width or target == width or model.config.get("window_size"):
        return None
    wide = widen_model(model, target // width)
    shapes = {k: v.shape for k, v in full_size.state_dict().items()}
    if {k: v.shape for k, v in wide.state_dict().items()} != shapes:
        return None
    return wide


def _targets(report) -> Dict[str, object]:
    """Issue 7's "done when" checks, from this run's numbers."""
    results = report["results"]
    out: Dict[str, object] = {}
    floor = _find(results, "floor", "matmul fp32")
    # The first-click target is stated for the full-size student: its random weights, or a trained
    # model widened to it (same arithmetic, realistic masks) when one was timed.
    firsts = [r for r in results if r["group"] == "session" and r["name"].startswith("first click") and "median_s" in r]
    widened = [r for r in firsts if WIDENED_TAG in r["name"]]
    firsts = widened or [r for r in firsts if "[trained" not in r["name"]]
    if floor and firsts:
        best = min(firsts, key=lambda r: r.get("paired_ratio", r["median_s"] / floor["median_s"]))
        ratio = best.get("paired_ratio", best["median_s"] / floor["median_s"])
        out["first_click"] = {"best_mode": best["name"], "ratio_to_fp32_matmul": ratio, "ratio_of_medians": best["median_s"] / floor["median_s"],
                              "target": 0.6, "met": ratio <= 0.6}
    laters = [r for r in results if r["group"] == "session" and r["name"].startswith("later click") and "full-image" not in r["name"] and "median_s" in r]
    trained = [r for r in laters if "[trained" in r["name"]]
    widened = [r for r in trained if WIDENED_TAG in r["name"]]
    laters = widened or trained or laters  # realistic masks when a trained model was timed
    if laters:
        best = min(laters, key=lambda r: r["median_s"])
        out["later_click"] = {"best_mode": best["name"], "median_ms": best["median_s"] * 1e3, "target_ms": 15.0, "met": best["median_s"] <= 0.015}
    students = [r for r in results if r["group"] == "encoder" and r["name"].startswith("fastsam3d ") and "median_s" in r]
    teacher = _find(results, "encoder", "sam-med3d fp32")
    if students and teacher:
        best = min(students, key=lambda r: r["median_s"])
        speedup = teacher["median_s"] / best["median_s"]
        out["student_vs_teacher"] = {"student": best["name"], "teacher": teacher["name"], "speedup": speedup, "target": 20.0, "met": speedup >= 20.0}
        same = _find(results, "encoder", "sam-med3d " + best["name"].split(" ", 1)[1])
        if same:
            out["student_vs_teacher"]["same_mode_speedup"] = same["median_s"] / best["median_s"]
    return out


def format_report(report: Dict[str, object]) -> str:
    """The table printed by ``fastsam3d benchmark`` (and pasted into the README)."""
    machine = report["machine"]
    cpu = machine["cpu"]
    lines = [
        f"machine: {cpu['model']} ({cpu['cores']} cores; {', '.join(cpu['extensions']) or 'no AVX2'}), "
        f"device {machine['device']}{' ' + machine['gpu'] if machine.get('gpu') else ''}, torch {machine['torch']}, "
        f"{machine['threads']} threads, load average {tuple(round(v, 1) for v in machine['load_average_start'] or ())}",
        f"student encoder: {report['student_encoder_gflop']:.1f} GFLOP per 128^3; 'auto' here = {report['auto_mode']}",
        "",
        f"{'what':52s} {'median':>10s} {'IQR':>19s} {'x fp32 matmul':>14s} {'paired':>7s}  note",
    ]
    floors = {r["group"]: r for r in report["results"] if r["name"] == "matmul fp32" and "median_s" in r}
    for r in report["results"]:
        if "median_s" not in r:
            continue
        scale = float(r.get("scale", 1.0))
        median, q1, q3 = (r[k] * scale for k in ("median_s", "q1_s", "q3_s"))
        floor_group = "floor" if r["group"] in ("floor", "session") else "floor (encoder run)"
        floor = floors.get(floor_group)
        ratio = f"{median / floor['median_s']:.3f}" if floor else ""
        unit, factor = ("ms", 1e3) if median < 10 else ("s", 1.0)
        name = f"{r['group']}: {r['name']}"
        paired = f"{r['paired_ratio'] * scale:.3f}" if "paired_ratio" in r else ""
        lines.append(f"{name:52s} {median * factor:8.1f}{unit:>2s} {q1 * factor:8.1f}-{q3 * factor:<8.1f}{unit:2s} {ratio:>12s} {paired:>7s}  {r.get('note', '')}")
    for r in report["results"]:
        if "failed" in r:
            lines.append(f"{r['group'] + ': ' + r['name']:52s} failed: {r['failed']}")
    lines.append("")
    for name, peak in report["peak_rss_mb"].items():
        lines.append(f"peak RSS {name}: {peak:.0f} MB")
    for name, target in report.get("targets", {}).items():
        lines.append(f"target {name}: {json.dumps(target)}")
    return "\n".join(lines)


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .checkpoint import check_device_option

    if args.rounds < 1:
        raise FastSAM3DInputError(f"--repeats must be at least 1, got {args.rounds}")
    if args.threads < 1:
        raise FastSAM3DInputError(f"--threads must be at least 1, got {args.threads}")
    check_device_option(args.device)
    json_path = Path(args.json) if args.json else None
    if json_path is not None and not json_path.parent.is_dir():
        raise FastSAM3DInputError(f"--json {json_path}: its folder {json_path.parent} does not exist")
    from .quantize import FAST_MODES

    modes = args.modes
    speed_modes = ("fp32",) + FAST_MODES  # not the session's list: that module needs SimpleITK, the GPU machines lack it
    for mode in modes or []:
        if mode not in speed_modes:
            raise FastSAM3DInputError(f"--modes: {mode!r} is not a speed mode ({', '.join(speed_modes)})")
    report = benchmark(
        device=args.device, rounds=args.rounds, heavy_rounds=min(args.rounds, args.heavy_repeats), threads=args.threads,
        modes=modes, encoders=args.encoders, structure=args.structure, later_clicks=args.later_clicks,
        session=not args.no_session, session_model=args.session_model, seed=args.seed, progress=not args.no_progress,
    )
    print(format_report(report))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {json_path}")
    return 0


def add_subparser(subparsers) -> None:
    """Register ``fastsam3d benchmark``."""
    parser = subparsers.add_parser("benchmark", help="time encoders, first and later clicks beside an equal-FLOP matmul",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--json", help="also write the full report here")
    parser.add_argument("--repeats", dest="rounds", type=int, default=5, help="interleaved rounds (5); medians and IQR over them")
    parser.add_argument("--heavy-repeats", type=int, default=3, help="rounds for the teacher encoder (3)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    parser.add_argument("--modes", nargs="+", help="speed modes to time (default: all available)")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODER_MODELS), choices=list(ENCODER_MODELS))
    parser.add_argument("--structure", default="putamen_l", help="Colin27 structure clicked in the session timings (putamen_l)")
    parser.add_argument("--later-clicks", type=int, default=8, help="corrective clicks timed per session (8)")
    parser.add_argument("--no-session", action="store_true", help="skip the Session / Colin27 timings")
    parser.add_argument("--session-model", help="also time the session with this trained checkpoint (realistic masks); a narrower student is also "
                        "timed widened to the full-size architecture, and the targets read those rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=cmd_benchmark)
