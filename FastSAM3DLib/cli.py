"""The ``fastsam3d`` command line.

Exit status: 0 done; 2 bad input (a message on stderr names the file or field and what was
expected; nothing is written and no existing output is touched); 1 an internal fault.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import FastSAM3DInputError

#: Session.precision values (session.PRECISIONS; repeated so that --help does not import torch).
SESSION_PRECISIONS = ("auto", "fp32", "bf16", "fp32-fast", "int8", "sparse", "int8-sparse")

logger = logging.getLogger("fastsam3d")

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO_ROOT / "Resources" / "Sample"
# Until bundled weights pass their bar (issue 5), the demo shows what the training campaign has made so far.
CAMPAIGN_MODEL = REPO_ROOT / "Resources" / "Training" / "fastsam3d-campaign.safetensors"


class UsageError(FastSAM3DInputError):
    """A command-line argument that cannot be used."""


def _triple(text: str, what: str, count: int = 3) -> Tuple[float, ...]:
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count or not all(np.isfinite(values)):
        example = {2: "-160,240", 3: "12.5,-30,8"}.get(count, "0,0,0,10,10,10")
        raise UsageError(f"{what}: expected {count} comma-separated numbers like {example}, got {text!r}")
    return values


class _OrderedPrompts(argparse.Action):
    """Keep --point / --negative / --box in the order given (clicks are sequential)."""

    def __call__(self, parser, namespace, values, option_string=None):
        prompts = list(getattr(namespace, "prompts", None) or [])
        prompts.append((self.dest, values))
        namespace.prompts = prompts


def _check_output_path(path: Optional[str], what: str, suffixes: Sequence[str]) -> Optional[Path]:
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{what} {out}: is a folder; expected a file name")
    if not out.parent.exists():
        raise UsageError(f"{what} {out}: its folder {out.parent} does not exist")
    if not out.name.lower().endswith(tuple(suffixes)):
        raise UsageError(f"{what} {out}: expected a file name ending in one of {', '.join(suffixes)}")
    if out.name.lower().endswith((".nii", ".nii.gz")) and not out.name.endswith((".nii", ".nii.gz")):
        raise UsageError(f"{what} {out}: write .nii / .nii.gz in lower case (SimpleITK's NIfTI writer knows no other)")
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"{what} {out}: its folder is not writable")
    return out


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _check_distinct_outputs(image: str, outputs: Dict[str, Optional[Path]]) -> None:
    """No output may be the input image or another output: the last write would silently win."""
    given = [(what, path) for what, path in outputs.items() if path is not None]
    for i, (what, path) in enumerate(given):
        if _same_file(path, Path(image)):
            raise UsageError(f"{what} {path}: is the input image; choose another file name (the image would be overwritten)")
        for other, other_path in given[:i]:
            if _same_file(path, other_path):
                raise UsageError(f"{what} {path}: is also given as {other}; each output needs its own file")


class _Outputs:
    """Collect outputs, then write them all (temp file + rename each) only when everything succeeded."""

    def __init__(self) -> None:
        self._writers: List[Tuple[Path, Callable[[str], None]]] = []

    def add(self, path: Path, write: Callable[[str], None]) -> None:
        self._writers.append((path, write))

    def commit(self) -> None:
        from .io import check_image_file, write_error_reason
        from .staging import StagedFile, commit_staged

        staged: List[StagedFile] = []
        try:
            for path, write in self._writers:
                staged.append(StagedFile(path))
                # An image is read back (header against content): SimpleITK's NIfTI writer does not
                # report a full disk, it leaves a truncated file.
                image = path.name.lower().endswith(IMAGE_SUFFIXES)
                staged[-1].write(write, check=check_image_file if image else None, explain=write_error_reason)
            commit_staged(staged)  # restores every earlier output if a later rename fails
        finally:
            for stage in staged:
                stage.discard()


def _load_model(args: argparse.Namespace):
    from .checkpoint import check_device_option, load_model

    check_device_option(args.device)
    return load_model(args.model, device=args.device, decoder_path=getattr(args, "decoder", None))


def _model_summary(model) -> Dict[str, object]:
    from .build import count_parameters

    return {
        "source": model.config.get("source"),
        "sha256": model.config.get("sha256"),
        "architecture": model.config.get("name"),
        "parameters": count_parameters(model),
    }


def _intensity(args: argparse.Namespace):
    from .preprocess import IntensitySettings

    if args.ct_window is None:
        return IntensitySettings()
    low, high = _triple(args.ct_window, "--ct-window", 2)
    try:
        return IntensitySettings(mode="ct", window=(low, high))
    except ValueError as error:
        raise UsageError(f"--ct-window: {error}") from None


def _parse_prompts(args: argparse.Namespace) -> List[Tuple[str, Tuple[float, ...]]]:
    """The prompts as (kind, numbers), checked before anything is loaded."""
    prompts = getattr(args, "prompts", None) or []
    if not prompts:
        raise UsageError("give at least one prompt: --point x,y,z (or --box x1,y1,z1,x2,y2,z2)")
    parsed = [(kind, _triple(text, f"--{kind}", 6 if kind == "box" else 3)) for kind, text in prompts]
    if args.candidate is not None and [kind for kind, _ in parsed] != ["point"]:
        raise UsageError("--candidate chooses among the masks of a lone first click: give exactly one --point and nothing else")
    return parsed


def _add_prompts(session, image, args: argparse.Namespace) -> List[Dict[str, object]]:
    from .preprocess import index_to_physical

    def to_lps(values: Tuple[float, ...]) -> np.ndarray:
        if args.voxel:
            return index_to_physical(image, values)
        if args.ras:
            return np.asarray([-values[0], -values[1], values[2]])
        return np.asarray(values)

    record = []
    for kind, values in _parse_prompts(args):
        if kind == "box":
            # The engine's box is axis-aligned in LPS. A box of voxel indices on an oblique grid is
            # not, and its two corners alone can span a flat LPS box: take the box around all eight.
            low, high = np.minimum(values[:3], values[3:]), np.maximum(values[:3], values[3:])
            corners = np.array([to_lps(tuple(np.where(bits, high, low))) for bits in np.ndindex(2, 2, 2)])
            a, b = corners.min(0), corners.max(0)
            session.add_box(a, b)
            record.append({"box_lps": [a.tolist(), b.tolist()]})
        else:
            point = to_lps(values)
            session.add_point(point, positive=kind == "point")
            record.append({"point_lps": point.tolist(), "positive": kind == "point"})
    return record


def _segment(args: argparse.Namespace) -> Dict[str, object]:
    """Run ``segment`` and write its outputs; returns the report ``--json`` prints."""
    import SimpleITK as sitk

    from .paste import BoundaryRefinement
    from .session import Session
    from .visualize import overlay_png

    out = _check_output_path(args.out, "--out", IMAGE_SUFFIXES)
    uncertainty_out = _check_output_path(args.uncertainty, "--uncertainty", IMAGE_SUFFIXES)
    png_out = _check_output_path(args.png, "--png", (".png",))
    _check_distinct_outputs(args.image, {"--out": out, "--uncertainty": uncertainty_out, "--png": png_out})
    if args.voxel and args.ras:
        raise UsageError("--voxel and --ras cannot be combined: points are either voxel indices or RAS millimetres")
    if uncertainty_out is None and (args.uncertainty_n is not None or args.uncertainty_method is not None):
        raise UsageError("--uncertainty-n and --uncertainty-method describe the map --uncertainty FILE writes: give --uncertainty too")
    args.uncertainty_n = 16 if args.uncertainty_n is None else args.uncertainty_n
    args.uncertainty_method = args.uncertainty_method or "mc-dropout"
    if uncertainty_out is not None and args.uncertainty_n < 2:
        raise UsageError(f"--uncertainty-n {args.uncertainty_n}: needs at least 2 stochastic decodes to measure a spread")
    if args.threads < 0:
        raise UsageError(f"--threads {args.threads}: expected a number of threads, or 0 for torch's default")
    _parse_prompts(args)
    intensity = _intensity(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = _load_model(args)
    model_s = time.perf_counter() - started
    refinement = None if args.no_refine else BoundaryRefinement()
    with Session(model, precision=args.precision, intensity=intensity, click_mode=args.click_mode, prefetch=False,
                 refinement=refinement) as session:
        started = time.perf_counter()
        if args.series is not None:
            from .io import read_image

            session.set_image(read_image(args.image, series=args.series), name=str(args.image))
        else:
            session.set_image(args.image)  # reads and validates the file once
        image = session.image
        read_s = time.perf_counter() - started
        start = time.perf_counter()
        prompts = _add_prompts(session, image, args)
        if args.candidate is not None:
            session.choose_candidate(args.candidate)
        mask = session.predict()
        segment_s = time.perf_counter() - start
        timings = {"model_load_s": model_s, "read_s": read_s, "segment_s": segment_s, **session.last_timings}
        outputs = _Outputs()
        outputs.add(out, lambda tmp: sitk.WriteImage(mask, tmp, True))
        if uncertainty_out is not None:
            start = time.perf_counter()
            # Only the spread is written: the mean is let go at once (0.7 GB of float32 on a big CT).
            spread = session.uncertainty(n=args.uncertainty_n, method=args.uncertainty_method)[1]
            timings["uncertainty_s"] = time.perf_counter() - start
            outputs.add(uncertainty_out, lambda tmp: sitk.WriteImage(spread, tmp, True))
        if png_out is not None:
            points = [(p["point_lps"], p["positive"]) for p in prompts if "point_lps" in p]
            picture = overlay_png(image, mask, points, title=Path(str(args.image)).name)
            outputs.add(png_out, lambda tmp: Path(tmp).write_bytes(picture))
        outputs.commit()
        array = sitk.GetArrayViewFromImage(mask)
        voxels = int(np.count_nonzero(array))
        return {
            "image": str(args.image),
            **({"series": args.series} if args.series is not None else {}),
            "output": str(out),
            "voxels": voxels,
            "volume_ml": voxels * float(np.prod(image.GetSpacing())) / 1000.0,
            "bounding_box_voxels": _bounding_box(array),
            "predicted_iou": session.predicted_iou(),
            "candidates": dict(zip(("predicted_iou", "shown"), session.candidates())),
            "prompts": prompts,
            "click_consistency": {"clicks": session.clicks_checked, "raw_model_violations": session.click_violations},
            "timings_s": timings,
            "model": _model_summary(model),
            "device": str(session.device),
            "precision": session.precision,
        }


def cmd_segment(args: argparse.Namespace) -> int:
    report = _segment(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"wrote {report['output']}: {report['voxels']} voxels, {report['volume_ml']:.2f} ml")
    return 0


def _bounding_box(array: np.ndarray) -> Optional[Dict[str, List[int]]]:
    nonzero = np.nonzero(array)
    if not nonzero[0].size:
        return None
    return {
        "start_xyz": [int(axis.min()) for axis in reversed(nonzero)],
        "stop_xyz": [int(axis.max()) + 1 for axis in reversed(nonzero)],
    }


def cmd_demo(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from .checkpoint import BUNDLED_MODEL_NAME, MODELS_DIR, CheckpointError, bundled_model_path, check_device_option
    from .io import load_image

    sample = Path(args.sample) if args.sample else SAMPLE_DIR
    info_path = sample / "colin27_sample.json"
    if not info_path.exists():
        raise UsageError(f"{info_path}: the demo sample is missing from this install")
    info = json.loads(info_path.read_text())
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir}: is a file; expected a folder (it is created if missing)")
    if args.model is None and bundled_model_path() is None:
        if not CAMPAIGN_MODEL.exists():
            raise CheckpointError(
                f"no bundled model weights in this install (looked for {MODELS_DIR / BUNDLED_MODEL_NAME}): "
                "run the demo with a checkpoint, `fastsam3d demo --model PATH`"
            )
        args.model = str(CAMPAIGN_MODEL)
        print(f"fastsam3d: no bundled model in this install yet; using the training campaign's current weights "
              f"({CAMPAIGN_MODEL}), which are below the quality bar of a bundled model "
              "(see Resources/Training/README.md)", file=sys.stderr)
    check_device_option(args.device)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path = sample / info["image"]
    args.image = str(image_path)
    args.prompts = [("point", ",".join(str(v) for v in info["click_point_lps_mm"]))]
    args.out = str(out_dir / "demo_mask.nii.gz")
    args.png = str(out_dir / "demo_overlay.png")
    args.uncertainty = args.uncertainty_n = args.uncertainty_method = None
    args.threads = 0
    args.voxel = args.ras = False
    args.ct_window = args.series = None
    args.click_mode = "all"
    args.no_refine = False
    args.candidate = None
    # With --json, stdout is the JSON object alone; the narration goes to stderr.
    narrate = sys.stderr if args.json else sys.stdout
    print(f"segmenting {info.get('structure', 'the sample structure')} in {image_path.name} from one click at LPS "
          f"{info['click_point_lps_mm']} mm", file=narrate)
    try:
        report = _segment(args)
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # nothing was written: leave no empty folder behind
        raise
    label_path = sample / info["label"] if info.get("label") else None
    if label_path is not None and label_path.exists():
        truth = sitk.GetArrayFromImage(load_image(label_path)) > 0
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(args.out)) > 0
        report["dice_against_label"] = float(2.0 * np.logical_and(truth, predicted).sum() / max(truth.sum() + predicted.sum(), 1))
    report.update(structure=info.get("structure"), overlay=args.png, data=info.get("attribution"))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"wrote {report['output']}: {report['voxels']} voxels, {report['volume_ml']:.2f} ml")
    if "dice_against_label" in report:
        print(f"Dice against the atlas label: {report['dice_against_label']:.3f}")
    print(f"overlay: {args.png}")
    if info.get("attribution"):
        print(f"data: {info['attribution']}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import SimpleITK as sitk
    import torch

    from . import __version__
    from .attention import available_backends, flash_attn_installed, get_backend
    from .checkpoint import bundled_model_path, read_checksum_file, sha256_file

    report: Dict[str, object] = {
        "fastsam3d": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "SimpleITK": sitk.Version.VersionString(),
        "numpy": np.__version__,
        "cuda_available": torch.cuda.is_available(),
        "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "cpu_bf16": _cpu_bf16(),
        "attention_backend": get_backend(),
        "attention_backends_available": available_backends(),
        "flash_attn_installed": flash_attn_installed(),
    }
    path = Path(args.model) if args.model else bundled_model_path()
    if path is None:
        report["model"] = "no bundled weights in this install; pass --model PATH"
    else:
        model_info: Dict[str, object] = {"path": str(path), "sha256": sha256_file(path) if path.exists() else None}
        expected = read_checksum_file(path) if path.exists() else None
        if expected is not None:
            model_info["checksum_verified"] = expected == model_info["sha256"]
        if model_info.get("checksum_verified") is False:
            # Report it rather than stop at load_model's refusal: this is where a user looks for why.
            model_info["error"] = f"the file's sha256 is not the one its {path.name}.sha256 records: it changed or is incomplete"
        elif args.model or path.exists():
            model = _load_model(args)
            model_info.update(_model_summary(model))
            model_info["block_kinds"] = model.config.get("block_kinds")
            model_info["embed_dim"] = model.config.get("embed_dim")
        report["model"] = model_info
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 2 if isinstance(report["model"], dict) and "error" in report["model"] else 0


def _cpu_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cmd_convert(args: argparse.Namespace) -> int:
    import uuid

    from .checkpoint import CheckpointError, convert_checkpoint, load_model, write_checksum_file

    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise UsageError(f"OUT {out}: expected a .safetensors file name")
    if out.is_dir() or not out.parent.is_dir():
        raise UsageError(f"OUT {out}: " + ("is a folder; expected a file name" if out.is_dir() else f"its folder {out.parent} does not exist"))
    # Converted beside OUT under a hidden name and checked to load as a complete model before it
    # replaces anything: a failed conversion leaves an existing OUT (and its checksum) untouched.
    staged = out.with_name(f".{out.stem}.{uuid.uuid4().hex[:8]}.safetensors")
    try:
        digest = convert_checkpoint(args.input, staged, trust=args.trust)
        try:
            load_model(staged, device="cpu")
        except CheckpointError as error:
            reason = str(error).replace(f"{staged}: ", "", 1)
            raise CheckpointError(f"{args.input}: converted, but the weights are not a complete model: {reason}") from None
        os.replace(staged, out)
        write_checksum_file(out, digest)
    finally:
        for leftover in (staged, staged.with_name(staged.name + ".sha256")):
            leftover.unlink(missing_ok=True)
    print(f"wrote {out} (sha256 {digest}) and {out}.sha256")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsam3d", description="Interactive 3D segmentation from clicks with FastSAM3D.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    def model_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", help="checkpoint (.pth/.safetensors); default: the bundled model")
        sub.add_argument("--decoder", help="full checkpoint supplying the decoder for an encoder-only --model")
        sub.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
        sub.add_argument("--precision", default="auto", choices=SESSION_PRECISIONS,
                         help="speed mode (default auto: the fastest mode whose measured Dice cost is negligible here; fp32 is exact)")

    segment = commands.add_parser("segment", help="segment a volume from clicks / a box")
    segment.add_argument("image", help="image file (NIfTI, NRRD, MHA, ...) or DICOM series folder")
    segment.add_argument("--point", action=_OrderedPrompts, metavar="X,Y,Z", help="positive click (repeatable)")
    segment.add_argument("--negative", action=_OrderedPrompts, metavar="X,Y,Z", help="negative click (repeatable)")
    segment.add_argument("--box", action=_OrderedPrompts, metavar="X1,Y1,Z1,X2,Y2,Z2", help="two opposite box corners")
    segment.add_argument("--candidate", type=int, metavar="K",
                         help="one --point only: show candidate mask K (0, 1, 2: small to large) instead of the model's pick")
    segment.add_argument("--series", metavar="UID", help="for a DICOM folder holding several series: the Series Instance UID to read")
    segment.add_argument("--voxel", action="store_true", help="coordinates are voxel indices (x, y, z) instead of LPS mm")
    segment.add_argument("--ras", action="store_true", help="coordinates are RAS mm (as Slicer shows them) instead of LPS mm")
    segment.add_argument("--out", required=True, help="output mask (.nii.gz, .nrrd, .mha)")
    segment.add_argument("--uncertainty", help="also write a per-voxel uncertainty map here")
    segment.add_argument("--uncertainty-n", type=int, help="stochastic decodes for --uncertainty (16)")
    segment.add_argument("--uncertainty-method", choices=["mc-dropout", "click-jitter"],
                         help="for --uncertainty: MC dropout (default) or the click-jitter ensemble")
    segment.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's own choice)")
    segment.add_argument("--png", help="write a three-plane overlay picture here")
    segment.add_argument("--json", action="store_true", help="print one JSON object describing the result")
    segment.add_argument("--ct-window", metavar="LOW,HIGH", help="CT intensity window in HU (default: MR z-normalisation)")
    segment.add_argument("--click-mode", default="all", choices=["all", "newest"], help="decode with all clicks or only the newest")
    segment.add_argument("--no-refine", action="store_true",
                         help="the model's mask without the boundary refinement (near the boundary the image's intensities help decide)")
    model_options(segment)
    segment.set_defaults(func=cmd_segment, prompts=[])

    demo = commands.add_parser("demo", help="segment the bundled Colin27 sample from one click")
    demo.add_argument("--out-dir", default="fastsam3d-demo", help="where to write the mask and overlay (./fastsam3d-demo)")
    demo.add_argument("--sample", help=argparse.SUPPRESS)
    demo.add_argument("--json", action="store_true")
    model_options(demo)
    demo.set_defaults(func=cmd_demo)

    info = commands.add_parser("info", help="versions, devices, attention backends, model")
    info.add_argument("--json", action="store_true")
    model_options(info)
    info.set_defaults(func=cmd_info)

    convert = commands.add_parser("convert-checkpoint", help="rewrite a checkpoint as weights-only safetensors")
    convert.add_argument("input", metavar="IN")
    convert.add_argument("output", metavar="OUT")
    convert.add_argument("--trust", action="store_true", help="allow full unpickling (runs code in the file: trusted sources only)")
    convert.set_defaults(func=cmd_convert)

    _add_optional_commands(commands)
    return parser


def _add_optional_commands(commands) -> None:
    """Subcommands that live in their own modules (training, evaluation, benchmarks)."""
    for module_name, function in (("train.cli", "add_train_subparsers"), ("evaluate", "add_subparser"), ("benchmark", "add_subparser")):
        try:
            module = __import__(f"{__package__}.{module_name}", fromlist=[function])
        except ImportError as error:
            logger.debug("command module %s unavailable: %s", module_name, error)
            continue
        getattr(module, function)(commands)


_VALUE_OPTIONS = ("--point", "--negative", "--box", "--ct-window")


def _join_negative_values(argv: Sequence[str]) -> List[str]:
    """``--point -60,20,-170`` -> ``--point=-60,20,-170``: argparse would take the value for an option.

    LPS coordinates are negative half of the time, so this must just work, also for an abbreviated
    option (``--neg``) and for values that are not numbers (which then get the option's own error).
    """
    joined: List[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        options = [o for o in _VALUE_OPTIONS if o.startswith(token)] if token.startswith("--") and len(token) > 3 else []
        if len(options) == 1 and following.startswith("-") and ("," in following or following[1:2].isdigit() or following[1:2] == "."):
            joined.append(f"{options[0]}={following}")
            i += 2
            continue
        joined.append(token)
        i += 1
    return joined


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    # Training is long work whose milestones (resumed at step N, wrote FILE and its sha256) are what its user reads.
    quiet = logging.INFO if args.command == "train" else logging.WARNING
    logging.basicConfig(level=logging.DEBUG if args.debug else quiet, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except FastSAM3DInputError as error:
        print(f"fastsam3d: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastsam3d: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # the system's fault, not ours or the user's input: a full disk, a lost mount
        if args.debug:
            raise
        print(f"fastsam3d: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # a fault of ours: report it plainly, traceback with --debug
        if args.debug:
            raise
        print(f"fastsam3d: internal error ({type(error).__name__}): {error}; rerun with --debug for details", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
