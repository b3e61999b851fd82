"""``fastsam3d train ...``: argparse subcommands ``pool``, ``pack``, ``interactive``, ``distill``, ``eval``, ``export``,
``average``, ``iou-head``.

The top-level CLI hooks these in with :func:`add_train_subparsers` (each subcommand sets
``func``, called with the parsed namespace and returning an exit status), or runs
:func:`train_main` on the words after ``train``. Under ``torchrun`` use
``python -m FastSAM3DLib.train.cli interactive ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

logger = logging.getLogger(__name__)


def _add_interactive_options(parser: argparse.ArgumentParser, defaults) -> None:
    from .interactive import DEFAULT_MODEL

    parser.add_argument("--run-dir", default=defaults.run_dir, help="checkpoints, metrics.json, curves.png (default: %(default)s)")
    parser.add_argument("--pool", dest="pool_dir", default=defaults.pool_dir, help="prepared crop pool (default: %(default)s)")
    parser.add_argument("--live", default=None, metavar="PACK",
                        help="make every crop on the training device from this pack (`fastsam3d train pack`) instead of a pool")
    parser.add_argument("--live-weights", type=_weights, default=None, metavar="NAME=W[,NAME=W...]",
                        help="with --live: how often each named structure is drawn, relative to 1 for the others")
    parser.add_argument("--live-phantoms", type=float, default=defaults.live_phantoms, metavar="SHARE",
                        help="with --live: share of each batch made of procedural phantoms by CPU worker processes (0; the pool's is 0.5)")
    parser.add_argument("--phantom-workers", type=int, default=defaults.phantom_workers,
                        help="with --live-phantoms: worker processes (0: the machine's cores less two)")
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size, help="build the pool up to this many crops first (0: use as is)")
    parser.add_argument("--model", default=defaults.model,
                        help=f"architecture of a new run (build.CONFIGS name; default: {DEFAULT_MODEL}, or that of --init); "
                             "a run that resumes keeps its own")
    parser.add_argument("--init", default=None,
                        help="weights to start a new run from (e.g. the bundled model); a run that resumes from its checkpoint ignores it")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="total optimizer steps (default: %(default)s)")
    parser.add_argument("--max-minutes", type=float, default=defaults.max_minutes,
                        help="stop with a checkpoint after this wall time of the command (0: none); rerun it to resume")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="crops per step and rank (default: %(default)s)")
    parser.add_argument("--click-iters", type=int, default=defaults.click_iters, help="click iterations per crop (default: %(default)s)")
    parser.add_argument("--grad-iters", type=int, default=defaults.grad_iters, help="iterations with gradients: the first + random others (default: all)")
    parser.add_argument("--prompt-mode", choices=("all", "newest"), default=defaults.prompt_mode, help="clicks given to each decode")
    parser.add_argument("--p-interior", type=float, default=defaults.p_interior, help="probability of an interior-most click (else uniform)")
    parser.add_argument("--loss-grid", choices=("low", "full"), default=defaults.loss_grid, help="loss on the 32^3 logits or upsampled to 128^3")
    parser.add_argument("--iou-weight", type=float, default=defaults.iou_weight)
    parser.add_argument("--multimask", action="store_true", help="train the 3 candidate masks on the first click (by target size; the IoU head picks)")
    parser.add_argument("--multimask-bins", type=float, nargs=2, default=defaults.multimask_bins, metavar=("SMALL", "LARGE"),
                        help="target fractions of the crop separating the small/medium/large candidates (default: %(default)s)")
    parser.add_argument("--best-feedback", type=float, default=defaults.best_feedback, metavar="P",
                        help="--multimask: probability that the first click feeds back the best-fitting candidate, not the IoU head's pick")
    parser.add_argument("--loss", choices=("dicece", "dicebalanced", "dicefocal"), default=defaults.loss, help="segmentation loss (default: %(default)s)")
    parser.add_argument("--balance-cap", type=float, default=defaults.balance_cap, help="dicebalanced: max background voxels one foreground voxel weighs (0: fully balanced)")
    parser.add_argument("--pos-weight", type=float, default=defaults.pos_weight, help="foreground weight of the cross-entropy")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (default: %(default)s; >=2e-4 collapsed in probes)")
    parser.add_argument("--decoder-lr-mult", type=float, default=defaults.decoder_lr_mult, help="lr multiplier of prompt encoder + decoder")
    parser.add_argument("--iou-head-lr-mult", type=float, default=defaults.iou_head_lr_mult, help="lr multiplier of the IoU head (on top of --decoder-lr-mult)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--schedule", choices=("constant", "cosine"), default=defaults.schedule)
    parser.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    parser.add_argument("--autocast", choices=("auto", "bf16", "off"), default=defaults.autocast, help="bf16 autocast (auto: CUDA only)")
    parser.add_argument("--include-heldout", dest="heldout", action="store_false", help="train on the held-out Colin27 structures too")
    parser.add_argument("--heldout", dest="heldout", action="store_true", default=True, help="leave HELDOUT_STRUCTURES out (default)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads per process")
    parser.add_argument("--log-every", type=int, default=defaults.log_every, help="log the loss every N steps (default: %(default)s)")
    parser.add_argument("--checkpoint-minutes", type=float, default=defaults.checkpoint_minutes)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every, help="Colin27 quick eval every N steps (0: never)")
    parser.add_argument("--eval-clicks", type=int, default=defaults.eval_clicks)
    parser.add_argument("--device", default=defaults.device, help="auto, cpu or cuda")


def _weights(text: str) -> dict:
    """``brain=0.5,cerebellum=2`` -> {"brain": 0.5, "cerebellum": 2.0}."""
    weights = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not name.strip() or not weight >= 0:
            raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=WEIGHT with a weight >= 0, e.g. brain=0.5")
        weights[name.strip()] = weight
    return weights


def _config_from(args: argparse.Namespace, config_class):
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})


def _run_interactive(args: argparse.Namespace) -> int:
    from .interactive import InteractiveConfig, train_interactive

    train_interactive(_config_from(args, InteractiveConfig))
    return 0


def _run_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, train_distill

    train_distill(_config_from(args, DistillConfig))
    return 0


def _run_pool(args: argparse.Namespace) -> int:
    from ..data.colin27 import STRUCTURES, TRAIN_STRUCTURES
    from .pool import PoolSpec, build_pool

    colin27 = args.colin27 or not args.data  # Colin27 is the default source; with --data only when asked
    structures = tuple(STRUCTURES if args.include_heldout else TRAIN_STRUCTURES) if colin27 else None
    spec = PoolSpec(size=args.size, phantom_fraction=args.phantom_fraction, structures=structures, min_voxels=args.min_voxels,
                    augment=not args.no_augment, seed=args.seed, colin27=colin27, data=tuple(args.data or ()))
    entries = build_pool(args.out, spec, workers=args.workers)
    logger.info("pool %s holds %d crops", args.out, len(entries))
    return 0


def _run_pack(args: argparse.Namespace) -> int:
    from .live import write_pack

    summary = write_pack(args.out)
    logger.info("pack %s: %s voxels, %d structures (%s)", summary["path"], "x".join(map(str, summary["shape"])),
                len(summary["structures"]), ", ".join(summary["structures"]))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from ..data.colin27 import HELDOUT_STRUCTURES
    from .quick_eval import SEEN_EVAL, evaluate_colin27, summarize

    from .export import load_weights

    model = load_weights(args.weights)
    results = evaluate_colin27(model, list(SEEN_EVAL) + list(HELDOUT_STRUCTURES), clicks=args.clicks, seed=args.seed)
    report = {"weights": str(args.weights), "per_structure": results, "summary": summarize(results, {"seen": SEEN_EVAL, "heldout": HELDOUT_STRUCTURES})}
    print(json.dumps(report, indent=1))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    digest = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, notes=args.notes, eval_json=args.eval_json)
    logger.info("wrote %s (sha256 %s)", args.out, digest)
    return 0


def _run_average(args: argparse.Namespace) -> int:
    from .export import average_checkpoints

    digest = average_checkpoints(args.checkpoints, args.out, dtype=args.dtype, notes=args.notes)
    logger.info("wrote %s, the average of %d files (sha256 %s)", args.out, len(args.checkpoints), digest)
    return 0


def _run_iou_head(args: argparse.Namespace) -> int:
    from .iou_head import format_report, refit_iou_head

    report = refit_iou_head(
        args.model, args.pool, args.out, crops=args.crops, first_clicks=args.first_clicks, later_clicks=args.later_clicks,
        p_interior=args.p_interior, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
        dtype=args.dtype, notes=args.notes,
    )
    print("\n".join(format_report(report)))
    logger.info("wrote %s", args.out)
    return 0


def add_train_subparsers(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train`` with its subcommands to a top-level CLI's subparsers; returns the ``train`` parser.

    Each leaf parser sets ``func(args) -> exit status``.
    """
    from .distill import DistillConfig
    from .interactive import InteractiveConfig
    from .paths import DEFAULT_CACHE, DEFAULT_POOL

    train = subparsers.add_parser("train", help="train or distil models, build training pools, export weights")
    sub = train.add_subparsers(dest="train_command", required=True)

    pool = sub.add_parser("pool", help="build (or extend, with the same settings) a pool of prepared 128^3 training crops")
    pool.add_argument("--out", default=str(DEFAULT_POOL / "train-s0"), help="pool folder (default: %(default)s)")
    pool.add_argument("--size", type=int, default=1000)
    pool.add_argument("--phantom-fraction", type=float, default=0.5, help="share of procedural phantoms; the rest are labelled crops")
    pool.add_argument("--data", action="append", metavar="DIR",
                      help="crop the labels of your own imagesTr/labelsTr folder (each label value a structure; repeat for more "
                           "folders) instead of Colin27")
    pool.add_argument("--colin27", action="store_true", help="with --data: crop the Colin27 structures too (without --data they are the labelled crops)")
    pool.add_argument("--min-voxels", type=int, default=1000, help="skip labels with at most this many voxels in the crop")
    pool.add_argument("--include-heldout", action="store_true", help="also crop the held-out Colin27 structures")
    pool.add_argument("--no-augment", action="store_true")
    pool.add_argument("--workers", type=int, default=1)
    pool.add_argument("--seed", type=int, default=0)
    pool.set_defaults(func=_run_pool)

    pack = sub.add_parser("pack", help="write Colin27 and its structures as one .npz for crops made on the training device (--live)")
    pack.add_argument("--out", default=str(DEFAULT_CACHE / "colin27-pack.npz"), help="pack file (default: %(default)s)")
    pack.set_defaults(func=_run_pack)

    interactive = sub.add_parser("interactive", help="click-simulated interactive training (resumable)")
    _add_interactive_options(interactive, InteractiveConfig())
    interactive.add_argument("--freeze-encoder", action="store_true",
                             help="train only the prompt encoder and decoder (the image encoder runs without gradients)")
    interactive.set_defaults(func=_run_interactive)

    distill = sub.add_parser("distill", help="layer-wise progressive distillation from a teacher, then the decoder fine-tune")
    distill_defaults = DistillConfig()
    _add_interactive_options(distill, distill_defaults)
    distill.add_argument("--teacher", required=True,
                         help="teacher checkpoint (anything load_model/load_image_encoder reads); a run directory keeps its teacher")
    distill.add_argument("--distill-steps", type=int, default=distill_defaults.distill_steps, help="encoder distillation steps (all stages)")
    distill.add_argument("--distill-lr", type=float, default=distill_defaults.distill_lr)
    distill.add_argument("--accumulate", type=int, default=distill_defaults.accumulate, help="gradient accumulation steps")
    distill.add_argument("--finetune-steps", type=int, default=distill_defaults.finetune_steps, help="decoder fine-tune steps (encoder frozen)")
    distill.set_defaults(func=_run_distill, run_dir=str(Path(distill_defaults.run_dir)))

    evaluate = sub.add_parser("eval", help="quick Colin27 Dice-per-click check of a checkpoint")
    evaluate.add_argument("weights")
    evaluate.add_argument("--clicks", type=int, default=5)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(func=_run_eval)

    export = sub.add_parser("export", help="write a training checkpoint as the bundled safetensors model")
    export.add_argument("checkpoint", help="training checkpoint (.pt) or weights file (.safetensors, .pth)")
    export.add_argument("--out", required=True, help="safetensors file to write (and its .sha256 beside it)")
    export.add_argument("--dtype", choices=("float16", "float32", "auto"), default="auto", help="auto: fp16 if fp32 would exceed 50 MB")
    export.add_argument("--eval-json", default=None, help="a `train eval` report to put in the model card")
    export.add_argument("--notes", default="", help="free text for the model card")
    export.set_defaults(func=_run_export)

    average = sub.add_parser("average", help="write the average of several runs' weights (a model soup) as a safetensors model")
    average.add_argument("checkpoints", nargs="+", help="training checkpoints (.pt) or weight files of one architecture")
    average.add_argument("--out", required=True, help="safetensors file to write (and its .sha256 beside it)")
    average.add_argument("--dtype", choices=("float16", "float32", "auto"), default="auto", help="auto: fp16 if fp32 would exceed 50 MB")
    average.add_argument("--notes", default="", help="free text for the model card")
    average.set_defaults(func=_run_average)

    iou = sub.add_parser("iou-head", help="refit a model's IoU head so that it picks the candidate mask that fits (everything else frozen)")
    iou.add_argument("--model", required=True, help="the model (safetensors, or a training checkpoint .pt)")
    iou.add_argument("--pool", default=str(DEFAULT_POOL / "train-s0"), help="pool of prepared crops (default: %(default)s)")
    iou.add_argument("--out", required=True, help="safetensors file to write")
    iou.add_argument("--crops", type=int, default=800, help="pool entries to decode (default: %(default)s)")
    iou.add_argument("--first-clicks", type=int, default=6, help="lone first clicks per crop (default: %(default)s)")
    iou.add_argument("--later-clicks", type=int, default=2, help="corrective clicks after each first click (default: %(default)s)")
    iou.add_argument("--p-interior", type=float, default=0.0,
                     help="probability of a click at the interior-most error voxel (else uniform; default: %(default)s: users click anywhere)")
    iou.add_argument("--epochs", type=int, default=500)
    iou.add_argument("--lr", type=float, default=3e-4)
    iou.add_argument("--weight-decay", type=float, default=0.1)
    iou.add_argument("--seed", type=int, default=0)
    iou.add_argument("--dtype", choices=("float16", "float32", "auto"), default="auto", help="auto: fp16 if fp32 would exceed 50 MB")
    iou.add_argument("--notes", default="", help="free text for the model card")
    iou.set_defaults(func=_run_iou_head)
    return train


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``fastsam3d train`` on ``argv`` (the words after ``train``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="fastsam3d")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_subparsers(subparsers)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else list(argv))])
    return int(args.func(args) or 0)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m FastSAM3DLib.train.cli`` (logging to stderr): exit statuses as ``fastsam3d``'s
    (2 for bad input, 130 for Ctrl-C; SIGTERM during training exits 143)."""
    from ..errors import FastSAM3DInputError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return train_main(argv)
    except FastSAM3DInputError as error:
        print(f"fastsam3d: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastsam3d: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
