"""Peak memory of ``fastsam3d segment`` on a big CT: 512 x 512 x 700 int16 voxels of 0.7 x 0.7 x 0.8 mm.

Generates a body-like CT phantom in Hounsfield units (air, skin/fat, muscle, lungs, liver with a
lesion, kidneys, spleen, spine), writes it to a temporary NIfTI, and segments the liver lesion from
one click with a CT window, in a fresh process. It prints the whole child process's peak resident
memory (``VmHWM`` from ``/proc/self/status`` read by the child at exit, and the parent's
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` as an independent check) and the timings, as a table and as
one JSON object. Target: peak <= 3 GB.

Without bundled weights, the model is a random-weight full-size FastSAM3D student
(``save_model(build_model("fastsam3d"), path)``): memory and time do not depend on the weights'
values.

Usage::

    python Testing/benchmarks/big_ct_memory.py [--format nii.gz|nii] [--model PATH] [--keep DIR] [--json-out FILE]

This is a measurement, not a test: it prints figures; the only failure is the segmentation itself failing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
SIZE = (512, 512, 700)  # x, y, z voxels
SPACING = (0.7, 0.7, 0.8)  # mm
TARGET_BYTES = 3 * 1000**3
LESION_MM = (-60.0, 20.0, -170.0)  # LPS centre of the liver lesion (patient right = -x)
LESION_RADIUS_MM = 20.0

# The child: run the real command line in this process, then report the process's own peak memory.
_CHILD = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
start = time.perf_counter()
from FastSAM3DLib.cli import main
import_s = time.perf_counter() - start
status = main({argv!r})
fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
report = {{"status": status, "import_s": import_s, "wall_s": time.perf_counter() - start,
          "VmHWM_kB": int(fields["VmHWM"].split()[0]), "VmPeak_kB": int(fields["VmPeak"].split()[0])}}
print("@@CHILD@@" + json.dumps(report), file=sys.stderr)
sys.exit(status)
"""


def phantom_slices(z0: int, z1: int, rng: np.random.Generator) -> np.ndarray:
    """Slices z0..z1-1 of the phantom as int16 HU, (z, y, x) order."""
    nx, ny, nz = SIZE
    sx, sy, sz = SPACING
    origin = _origin()
    x = origin[0] + np.arange(nx) * sx  # LPS mm: +x to patient left
    y = origin[1] + np.arange(ny) * sy  # +y to posterior
    z = origin[2] + np.arange(z0, z1) * sz  # +z to superior
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij", sparse=True)
    hu = np.full((z1 - z0, ny, nx), -1000.0, dtype=np.float32)

    def ellipsoid(c, r):
        return ((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2 <= 1.0

    body = ((X / 165.0) ** 2 + ((Y - 10.0) / 115.0) ** 2 <= 1.0) & (Z > -540) & (Z < 10)
    inner = ((X / 152.0) ** 2 + ((Y - 10.0) / 103.0) ** 2 <= 1.0) & body
    hu = np.where(body, -100.0, hu)  # subcutaneous fat
    hu = np.where(inner, 45.0, hu)  # muscle / soft tissue
    for side in (-1, 1):
        hu = np.where(ellipsoid((side * 75.0, 5.0, -60.0), (55.0, 70.0, 120.0)) & inner, -850.0, hu)  # lungs
        hu = np.where(ellipsoid((side * 60.0, 65.0, -290.0), (28.0, 22.0, 50.0)), 30.0, hu)  # kidneys
    hu = np.where(ellipsoid((-55.0, 15.0, -190.0), (80.0, 70.0, 75.0)), 60.0, hu)  # liver
    hu = np.where(ellipsoid((85.0, 40.0, -200.0), (35.0, 30.0, 50.0)), 50.0, hu)  # spleen
    hu = np.where(ellipsoid(LESION_MM, (LESION_RADIUS_MM,) * 3), 110.0, hu)  # enhancing liver lesion
    spine = (X**2 + (Y - 80.0) ** 2 <= 18.0**2) & (Z > -520) & (Z < -20)
    hu = np.where(spine, 300.0, hu)
    hu = np.where(spine & (X**2 + (Y - 80.0) ** 2 >= 14.0**2), 900.0, hu)  # cortical bone
    hu += rng.normal(0.0, 12.0, hu.shape).astype(np.float32)  # quantum noise
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def _origin():
    nx, ny, nz = SIZE
    return (-(nx - 1) * SPACING[0] / 2.0, -(ny - 1) * SPACING[1] / 2.0, -(nz - 1) * SPACING[2] - 0.0)


def write_phantom(path: Path) -> float:
    """Write the phantom; return the seconds it took."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    nx, ny, nz = SIZE
    array = np.empty((nz, ny, nx), dtype=np.int16)
    step = 50
    for z0 in range(0, nz, step):
        array[z0 : z0 + step] = phantom_slices(z0, min(z0 + step, nz), rng)
    image = sitk.GetImageFromArray(array)
    del array
    image.SetSpacing(SPACING)
    image.SetOrigin(_origin())
    sitk.WriteImage(image, str(path), str(path).endswith(".gz"))
    return time.perf_counter() - start


def model_path(work: Path, given: str | None) -> tuple[Path, str]:
    if given:
        return Path(given), "given"
    sys.path.insert(0, str(REPO))
    from FastSAM3DLib.checkpoint import bundled_model_path

    bundled = bundled_model_path()
    if bundled is not None:
        return bundled, "bundled"
    import torch

    from FastSAM3DLib import build_model, save_model

    torch.manual_seed(0)
    path = work / "fastsam3d-random.safetensors"
    save_model(build_model("fastsam3d"), path)
    return path, "random-weight full-size FastSAM3D student"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="nii.gz", choices=["nii.gz", "nii"], help="file format of the generated CT")
    parser.add_argument("--model", help="checkpoint (default: bundled weights, else a random full-size student)")
    parser.add_argument("--keep", help="keep the CT, model and mask in this folder instead of a temporary one")
    parser.add_argument("--json-out", help="also write the JSON report here")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--uncertainty", type=int, metavar="N", help="also write an uncertainty map from N stochastic decodes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fastsam3d-bigct-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ct = work / f"big_ct.{args.format}"
        write_s = write_phantom(ct) if not ct.exists() else 0.0
        model, model_kind = model_path(work, args.model)
        out = work / "lesion_mask.nii.gz"
        argv = [
            # "--opt=value": argparse would take a value starting with "-" for an option name
            "segment", str(ct), "--point=" + ",".join(f"{v:g}" for v in LESION_MM), "--ct-window=-160,240",
            "--model", str(model), "--device", "cpu", "--precision", args.precision, "--out", str(out), "--json",
        ]
        if args.uncertainty:
            argv += ["--uncertainty", str(work / "lesion_uncertainty.nii.gz"), "--uncertainty-n", str(args.uncertainty)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        start = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", _CHILD.format(repo=str(REPO), argv=argv)], capture_output=True, text=True, env=env
        )
        wall_s = time.perf_counter() - start
        rusage_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        marker = [line for line in child.stderr.splitlines() if line.startswith("@@CHILD@@")]
        if child.returncode != 0 or not marker:
            print(child.stdout, child.stderr, sep="\n", file=sys.stderr)
            print(f"segmentation failed with exit status {child.returncode}", file=sys.stderr)
            return 1
        inner = json.loads(marker[-1][len("@@CHILD@@"):])
        result = json.loads(child.stdout)
        mask = sitk.ReadImage(str(out))
        truth_voxels = 4 / 3 * np.pi * LESION_RADIUS_MM**3 / np.prod(SPACING)
        report = {
            "image": {"size": list(SIZE), "spacing_mm": list(SPACING), "dtype": "int16", "format": args.format,
                      "file_bytes": ct.stat().st_size, "voxel_bytes": int(np.prod(SIZE)) * 2},
            "model": {"kind": model_kind, "sha256": result["model"]["sha256"], "parameters": result["model"]["parameters"]},
            "command": "fastsam3d " + " ".join(argv),
            "peak_rss_bytes": inner["VmHWM_kB"] * 1024,
            "peak_rss_bytes_getrusage_children": rusage_kb * 1024,
            "target_bytes": TARGET_BYTES,
            "within_target": inner["VmHWM_kB"] * 1024 <= TARGET_BYTES,
            "timings_s": {"write_phantom": write_s, "child_wall": wall_s, "import": inner["import_s"],
                          **{k: v for k, v in result["timings_s"].items()}},
            "mask": {"size": list(mask.GetSize()), "same_grid": mask.GetSize() == tuple(SIZE)
                     and np.allclose(mask.GetSpacing(), SPACING), "voxels": result["voxels"],
                     "lesion_voxels_expected": int(truth_voxels)},
            "cpu_threads": os.cpu_count(),
        }
    rows = [
        ("CT", f"{SIZE[0]}x{SIZE[1]}x{SIZE[2]} int16, {SPACING[0]}x{SPACING[1]}x{SPACING[2]} mm, .{args.format}"),
        ("voxel data", f"{report['image']['voxel_bytes'] / 1e6:.0f} MB"),
        ("model", f"{model_kind} ({report['model']['parameters'] / 1e6:.1f} M parameters)"),
        ("peak RSS (VmHWM)", f"{report['peak_rss_bytes'] / 1e9:.2f} GB"),
        ("peak RSS (getrusage)", f"{report['peak_rss_bytes_getrusage_children'] / 1e9:.2f} GB"),
        ("target", f"<= {TARGET_BYTES / 1e9:.0f} GB: {'met' if report['within_target'] else 'NOT met'}"),
    ] + [(f"time {k}", f"{v:.2f} s") for k, v in report["timings_s"].items()] + [
        ("mask", f"{report['mask']['voxels']} voxels on the input grid: {report['mask']['same_grid']}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
