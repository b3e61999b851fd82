"""How ``Session.uncertainty`` time grows with the number of stochastic decodes, on Colin27.

One click on the left putamen, then ``uncertainty(n)`` for each n (both methods), medians over
``--repeats`` calls; prints a table and writes JSON. Also reports the session's embedding cache
(bytes held for the one crop) and the time of one plain later click (decode + paste) for comparison.

Usage: python Testing/benchmarks/uncertainty_scaling.py [--model PATH] [--n 2 4 8 16 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from FastSAM3DLib import Session, load_model  # noqa: E402
from FastSAM3DLib.data import interior_point, load_colin27  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="weights (default: the bundled model)")
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    colin = load_colin27()
    _, point = interior_point(colin.labels["putamen_l"])
    session = Session(model, device="cpu", prefetch=False)
    session.set_image(colin.image)
    session.add_point(point)
    session.predict()
    decode = []
    for k in range(args.repeats):
        session.add_point(point)
        session.predict()
        decode.append(session.last_timings["total_s"])
        session.undo()
    rows = []
    for method in ("mc-dropout", "click-jitter"):
        for n in args.n:
            times = []
            for k in range(args.repeats):
                start = time.perf_counter()
                session.uncertainty(n=n, method=method, seed=k)
                times.append(time.perf_counter() - start)
            rows.append({"method": method, "n": n, "median_s": statistics.median(times)})
    report = {
        "model": str(args.model or "bundled"),
        "precision": session.precision,
        "threads": args.threads,
        "later_click_median_s": statistics.median(decode),
        "cached_embedding_bytes": session.cached_bytes(),
        "rows": rows,
    }
    print(f"later click (decode + paste): {1000 * report['later_click_median_s']:.0f} ms; "
          f"embedding cache holds {report['cached_embedding_bytes'] / 2**10:.0f} KiB")
    print(f"{'method':<14}{'n':>4}{'median s':>10}")
    for row in rows:
        print(f"{row['method']:<14}{row['n']:>4}{row['median_s']:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
