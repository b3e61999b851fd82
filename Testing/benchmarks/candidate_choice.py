"""What choosing a lone click's candidate mask gives, per structure, through ``Session``.

One click per structure at its interior-most voxel (the evaluation's first click), or ``--clicks N``
clicks at random voxels of it (where users click: a click in the white matter to get the brain);
Dice of the model's pick and of every candidate on the image's grid, with the predicted IoUs, on
Colin27 or on MNI152 (a subject no training run has seen). Prints a table and writes JSON. Needs a
model with candidate masks (``config["first_click_multimask"]``).

Usage: python Testing/benchmarks/candidate_choice.py [--model PATH] [--data colin27|mni152]
       [--click interior|random] [--clicks N] [--seed S] [--precision fp32] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from FastSAM3DLib import Session, load_model  # noqa: E402
from FastSAM3DLib.clicks import dice, next_click  # noqa: E402
from FastSAM3DLib.data import load_colin27  # noqa: E402
from FastSAM3DLib.data.mni152 import load_mni152  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="weights (default: the bundled model)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--data", choices=("colin27", "mni152"), default="colin27")
    parser.add_argument("--click", choices=("interior", "random"), default="interior",
                        help="the structure's interior-most voxel, or random voxels of it")
    parser.add_argument("--clicks", type=int, default=1, help="clicks per structure (random clicks only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="candidate-choice.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.click == "interior" and args.clicks != 1:
        parser.error("--clicks > 1 needs --click random: a structure has one interior-most voxel")
    subject = load_colin27() if args.data == "colin27" else load_mni152()
    session = Session(load_model(args.model, device="cpu"), precision=args.precision, prefetch=False)
    session.set_image(subject.image)
    rng = np.random.default_rng(args.seed)
    rows = []
    print(f"{'structure':14s} {'pick':>6s}   candidates (Dice)     predicted IoU")
    for name, label in subject.labels.items():
        truth = sitk.GetArrayFromImage(label).astype(bool)
        for _ in range(args.clicks):
            click = next_click(np.zeros_like(truth), truth, rng, args.click)
            handle = session.new_object()
            session.add_point(subject.image.TransformIndexToPhysicalPoint([int(v) for v in click.index[::-1]]), object=handle)

            def score() -> float:
                return dice(sitk.GetArrayFromImage(session.predict(handle)).astype(bool), truth)

            pick = score()
            ious, _ = session.candidates(handle)
            if not ious:
                raise SystemExit(f"{args.model or 'the bundled model'} has no candidate masks for a lone click")
            per_candidate = []
            for index in range(len(ious)):
                session.choose_candidate(index, handle)
                per_candidate.append(score())
            rows.append({"structure": name, "click": [int(v) for v in click.index], "pick": pick, "candidates": per_candidate, "predicted_iou": ious})
            print(f"{name:14s} {pick:6.3f}   " + " ".join(f"{v:.3f}" for v in per_candidate) + "   " + " ".join(f"{v:.2f}" for v in ious), flush=True)
    summary = {"mean_pick": float(np.mean([r["pick"] for r in rows])),
               "mean_best_candidate": float(np.mean([max(r["candidates"]) for r in rows]))}
    print(f"mean Dice: the model's pick {summary['mean_pick']:.3f}, the best candidate {summary['mean_best_candidate']:.3f}")
    settings = {"model": args.model, "data": args.data, "click": args.click, "clicks": args.clicks, "seed": args.seed, "precision": args.precision}
    Path(args.json).write_text(json.dumps({**settings, "rows": rows, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
