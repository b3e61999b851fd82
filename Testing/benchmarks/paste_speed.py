"""Paste-back cost on Colin27's 1 mm grid for objects of controlled size: ``CropPaster.mask`` for a
later click (the previous call's logits slightly moved) and for a first click, and ``values`` (the
full trilinear field, used for probabilities and uncertainty), beside direct ``grid_sample`` of
every voxel (``preprocess.sample_crop_logits``) as the reference.

The logits are signed distances to spheres (radius in low-res cells of 6 mm): 2 cells is a
putamen-sized object, 5 a cerebellum hemisphere, 12 the whole brain.

Usage::

    python Testing/benchmarks/paste_speed.py [--repeats 15] [--json-out FILE]
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
import torch  # noqa: E402

from FastSAM3DLib.data import load_colin27  # noqa: E402
from FastSAM3DLib.paste import CropPaster  # noqa: E402
from FastSAM3DLib.preprocess import CropGrid, index_to_physical, sample_crop_logits  # noqa: E402


def sphere(radius_cells: float, shift=(0.0, 0.0, 0.0)) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"), -1)
    center = torch.tensor([16.0, 16.0, 16.0]) + torch.tensor(shift)
    return (radius_cells - (grid - center).norm(dim=-1))[None, None]


def timed(function, repeats):
    function()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    torch.set_num_threads(2)
    image = load_colin27().image
    crop = CropGrid.around(index_to_physical(image, (np.asarray(image.GetSize()) - 1) / 2))
    rows = []
    for radius in (2.0, 5.0, 12.0):
        before, after = sphere(radius), sphere(radius, (0.25, -0.15, 0.1))
        paster = CropPaster(crop, image, 32)
        state = {"flip": False}

        def later():  # alternate between two nearby fields: every call is a "later click"
            state["flip"] = not state["flip"]
            return paster.mask(after if state["flip"] else before)

        def first():
            return CropPaster(crop, image, 32).mask(after)

        row = {
            "radius_cells": radius,
            "mask_voxels": int(paster.mask(after).sum()),
            "region_voxels": int(np.prod(paster.region.size)),
            "later_click_mask": timed(later, args.repeats),
            "first_click_mask (incl. building the paster)": timed(first, max(3, args.repeats // 3)),
            "values": timed(lambda: paster.values(after), max(3, args.repeats // 3)),
            "reference grid_sample of every voxel": timed(lambda: sample_crop_logits(after, crop, image, paster.region), 3),
        }
        rows.append(row)
        print(f"sphere radius {radius:4.1f} cells ({row['mask_voxels']} of {row['region_voxels']} voxels):")
        for key, value in row.items():
            if isinstance(value, tuple):
                print(f"    {key:46s} wall {value[0] * 1e3:8.1f} ms   cpu {value[1] * 1e3:8.1f} ms")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
