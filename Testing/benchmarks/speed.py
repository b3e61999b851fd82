"""The benchmark behind the README's speed table: ``fastsam3d benchmark`` with the heavy settings.

Times, in one process and interleaved round by round, the equal-FLOP matrix multiplies (fp32,
bf16, int8), the encoders of the full-size student, the teacher and the bundled architecture in
every speed mode, and the first and later clicks through ``Session`` on Colin27; prints the table
and writes the JSON report.

Usage::

    python Testing/benchmarks/speed.py [--json-out FILE] [--repeats 7] [--device auto]

Quote medians and ratios to the fp32 matmul from one run: on a shared machine the absolute times
move with the load (the report records the load average before and after).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from FastSAM3DLib.benchmark import benchmark, format_report  # noqa: E402
from FastSAM3DLib.checkpoint import bundled_model_path  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-out", default="benchmark.json")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--heavy-repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--structure", default="putamen_l")
    parser.add_argument("--session-model", help="trained checkpoint for realistic later-click masks (default: the bundled model if installed)")
    args = parser.parse_args()
    report = benchmark(device=args.device, rounds=args.repeats, heavy_rounds=args.heavy_repeats, threads=args.threads,
                       structure=args.structure, later_clicks=8, session_model=args.session_model or bundled_model_path())
    print(format_report(report))
    Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
