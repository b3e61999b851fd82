"""What the Slicer Logic adds to a click, on real MRML nodes (``slicer-core``), for a small and a large volume.

A volume node and a segmentation node are built in an MRML scene (random CT-like voxels), and
``FastSAM3DLogic.segmentFromPoints`` is called with a growing list of clicks near the centre. The
engine is the real ``Session`` around the sphere-oracle model of ``Testing/oracles.py`` (tiny encoder,
a decoder with a known answer), so the time measured is the Logic's own work plus a cheap decode:
moving the mask from the session into the segment, undo bookkeeping, geometry. Prints, per volume, the
median of the later clicks' total time and of the session's part.

Usage: python Testing/benchmarks/logic_click_latency.py [--clicks 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "FastSAM3D"))
sys.path.insert(0, str(REPO / "Testing"))

import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

import FastSAM3DLogic as FL  # noqa: E402
from oracles import sphere_oracle_model  # noqa: E402

VOLUMES = (((181, 217, 181), (1.0, 1.0, 1.0)), ((512, 512, 300), (0.7, 0.7, 1.0)))


def scene_with(dims, spacing):
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "volume")
    data = vtk.vtkImageData()
    data.SetDimensions(dims)
    data.AllocateScalars(vtk.VTK_SHORT, 1)
    voxels = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars())
    voxels[:] = np.random.default_rng(0).integers(-100, 100, voxels.size)
    volume.SetAndObserveImageData(data)
    volume.SetSpacing(spacing)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return scene, volume, segmentation, segmentation.GetSegmentation().AddEmptySegment("target")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=6, help="later clicks timed per volume")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    FL.ensureSegmentationConverterRules()
    print(f"{'volume':<16}{'voxels':>12}{'first s':>9}{'later ms':>10}{'session ms':>12}")
    for dims, spacing in VOLUMES:
        model, _ = sphere_oracle_model(20.0)
        logic = FL.FastSAM3DLogic(model=model, device="cpu")
        scene, volume, segmentation, segment = scene_with(dims, spacing)  # the scene must outlive the clicks
        centre = np.array([d * s / 2 for d, s in zip(dims, spacing)])
        points = [centre]
        start = time.perf_counter()
        logic.segmentFromPoints(volume, segmentation, segment, np.array(points), [1])
        first = time.perf_counter() - start
        totals, sessions = [], []
        rng = np.random.default_rng(0)
        for _ in range(args.clicks):
            points.append(centre + rng.uniform(-3, 3, 3))
            start = time.perf_counter()
            result = logic.segmentFromPoints(volume, segmentation, segment, np.array(points), [1] * len(points))
            totals.append(time.perf_counter() - start)
            sessions.append(result.timings.get("total_s", float("nan")))
        name = "x".join(str(d) for d in dims)
        print(f"{name:<16}{int(np.prod(dims)):>12}{first:>9.2f}{1000 * statistics.median(totals):>10.0f}"
              f"{1000 * statistics.median(sessions):>12.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
