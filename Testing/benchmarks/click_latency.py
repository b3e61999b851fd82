"""First click (set_image + embed + decode + paste) vs later clicks in the same crop, through Session, on Colin27.

Prints one JSON line per model: medians over 3 fresh sessions x 5 corrective clicks, 2 threads.
Usage: python Testing/benchmarks/click_latency.py [--model PATH]
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch

from FastSAM3DLib import Session, build_model, load_model
from FastSAM3DLib.data import interior_point, load_colin27


def measure(model, image, point, sessions: int = 3, clicks: int = 5) -> dict:
    firsts, laters, calls = [], [], []
    for rep in range(sessions):
        session = Session(model, prefetch=False, precision="fp32")
        start = time.perf_counter()
        session.set_image(image)
        session.add_point(point)
        session.predict()
        firsts.append(time.perf_counter() - start)
        rng = np.random.default_rng(rep)
        for k in range(clicks):
            start = time.perf_counter()
            session.add_point(np.asarray(point) + rng.uniform(-4, 4, 3), positive=bool(k % 2))
            session.predict()
            laters.append(time.perf_counter() - start)
        calls.append(session.encoder_calls)
        session.close()
    first, later = statistics.median(firsts), statistics.median(laters)
    return {"first_click_median_s": first, "later_click_median_s": later, "ratio": later / first, "encoder_calls_per_session": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint to time besides the full-size random-weight student")
    args = parser.parse_args()
    torch.set_num_threads(2)
    colin = load_colin27()
    _, point = interior_point(colin.labels["putamen_l"])
    models = [("fastsam3d (random weights)", build_model("fastsam3d"))]
    if args.model:
        models.append((args.model, load_model(args.model, device="cpu")))
    for name, model in models:
        print(json.dumps({"model": name, **measure(model, colin.image, point)}))


if __name__ == "__main__":
    main()
