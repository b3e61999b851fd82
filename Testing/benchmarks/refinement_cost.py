"""What the boundary refinement costs a click: first and later clicks through ``Session`` on Colin27,
with the default ``BoundaryRefinement`` and without (``refinement=None``), interleaved session by
session, for structures of different sizes (the band's voxels are the cost).

The clicks follow the evaluation protocol (the interior-most voxel, then corrective clicks in the
error region shown), so the two variants' later clicks differ where their masks differ.

Usage::

    python Testing/benchmarks/refinement_cost.py --model CHECKPOINT [--structures putamen_l brain]
        [--precision int8] [--sessions 3] [--clicks 8] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from FastSAM3DLib import Session, load_model  # noqa: E402
from FastSAM3DLib.data import interior_point, load_colin27  # noqa: E402
from FastSAM3DLib.evaluate import simulated_click  # noqa: E402
from FastSAM3DLib.paste import BoundaryRefinement  # noqa: E402

VARIANTS = {"refined (default)": BoundaryRefinement(), "model only": None}


def one_session(model, image, gt, first_point, precision, refinement, clicks, seed) -> dict:
    """First click and corrective clicks in one session: wall times and paste times (s)."""
    session = Session(model, precision=precision, prefetch=True, refinement=refinement)
    try:
        start = time.perf_counter()
        session.set_image(image)
        session.add_point(first_point, True)
        region, local = session.predict_region()
        first = time.perf_counter() - start
        pred = np.zeros(gt.shape, dtype=bool)
        pred[region.slices()] = local > 0
        rng = np.random.default_rng(seed)
        later, paste = [], []
        for number in range(clicks):
            click = simulated_click(image, gt, pred, rng, "interior" if number < 1 else "random")
            if click is None:
                break
            start = time.perf_counter()
            session.add_point(click.point_lps, click.positive)
            changed, delta = session.predict_changes()
            later.append(time.perf_counter() - start)
            paste.append(session.last_timings["paste_s"])
            pred[changed.slices()] = delta > 0
        return {"first": first, "later": later, "paste": paste}
    finally:
        session.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="trained checkpoint (realistic masks)")
    parser.add_argument("--structures", nargs="+", default=["putamen_l", "thalamus_l", "brain"])
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--sessions", type=int, default=3, help="sessions per variant and structure (3)")
    parser.add_argument("--clicks", type=int, default=8, help="corrective clicks per session (8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", help="also write the medians here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    colin = load_colin27()
    report = []
    print(f"{'structure':12s} {'variant':18s} {'first click':>12s} {'later click':>12s} {'paste':>9s}")
    for structure in args.structures:
        label = colin.labels[structure]
        gt = sitk.GetArrayViewFromImage(label) > 0
        _, first_point = interior_point(label)
        runs = {name: [] for name in VARIANTS}
        for seed in range(args.sessions):
            for name, refinement in VARIANTS.items():
                runs[name].append(one_session(model, colin.image, gt, first_point, args.precision, refinement, args.clicks, seed))
        for name, sessions in runs.items():
            row = {
                "structure": structure, "variant": name,
                "first_click_ms": 1e3 * statistics.median(s["first"] for s in sessions),
                "later_click_ms": 1e3 * statistics.median(t for s in sessions for t in s["later"]),
                "later_paste_ms": 1e3 * statistics.median(t for s in sessions for t in s["paste"]),
            }
            report.append(row)
            print(f"{structure:12s} {name:18s} {row['first_click_ms']:10.0f}ms {row['later_click_ms']:10.1f}ms "
                  f"{row['later_paste_ms']:7.1f}ms")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
