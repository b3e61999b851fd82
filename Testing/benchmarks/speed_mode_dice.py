"""The Dice cost of each speed mode against fp32, the number ``precision="auto"`` relies on.

Runs the evaluation protocol (``fastsam3d evaluate``: Colin27, 10 interactions, click mode
"all") once per speed mode with the same trained weights, and prints each mode's Dice@5 cost
(fp32 minus the mode, mean over the structures) in the form of
``FastSAM3DLib.quantize.MEASURED_DICE5_COST``. The weights are ``--model``, else the bundled
model, else the newest training checkpoint under ``~/.cache/fastsam3d/runs/*/checkpoints/`` (say
so when quoting: an undertrained model's cost need not be a trained one's).

Usage::

    python Testing/benchmarks/speed_mode_dice.py [--model PATH] [--out DIR] [--clicks 10] [--modes int8 ...] [--seeds 0 1 2]

With several click seeds each mode is compared with fp32 on the same seed (paired), and the cost
printed is the mean over seeds, with the per-seed values beside it: one seed's difference is
mostly click trajectories parting after near-ties and moves by a few hundredths between seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from FastSAM3DLib.checkpoint import bundled_model_path, load_model  # noqa: E402
from FastSAM3DLib.evaluate import Variant, colin27_cases, evaluate, precision_costs, summaries_by_variant, write_outputs  # noqa: E402
from FastSAM3DLib.quantize import FAST_MODES, int8_available  # noqa: E402


def newest_checkpoint() -> Path | None:
    runs = sorted(Path.home().glob(".cache/fastsam3d/runs/*/checkpoints/*.pt"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--out", default="speed-mode-dice")
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--structures", nargs="+")
    parser.add_argument("--modes", nargs="+", help="speed modes to compare with fp32 (default: every one this machine runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="click seeds (paired comparison per seed)")
    args = parser.parse_args()
    if args.clicks < 5:
        parser.error("--clicks must be at least 5: the cost that precision=\"auto\" reads is the Dice@5 difference")
    path = args.model or bundled_model_path() or newest_checkpoint()
    if path is None:
        print("no weights: pass --model PATH", file=sys.stderr)
        return 2
    model = load_model(path, device="cpu")
    modes = ["fp32"] + [m for m in (args.modes or FAST_MODES) if m != "fp32" and (int8_available() or not m.startswith("int8"))]
    variants = [Variant("model", mode, "all", "point") for mode in modes]
    cases = colin27_cases(args.structures)
    per_seed: dict = {}
    for seed in args.seeds:
        results = evaluate(cases, variants, model=model, clicks=args.clicks, seed=seed)
        summaries = summaries_by_variant(results)
        meta = {"title": f"speed-mode Dice cost, {path}, seed {seed}", "model": str(path), "clicks": args.clicks, "seed": seed}
        write_outputs(Path(args.out) / f"seed{seed}", results, summaries, meta)
        for cost in precision_costs(summaries):
            per_seed.setdefault(cost["precision"], []).append(cost)
    costs = []
    for mode, rows in per_seed.items():
        values = [r["dice@5_cost"] for r in rows]
        costs.append({
            "precision": mode, "seeds": args.seeds, "dice@5_cost": float(np.mean(values)), "dice@5_cost_per_seed": values,
            "dice@5": float(np.mean([r["dice@5"] for r in rows])), "fp32_dice@5": float(np.mean([r["fp32_dice@5"] for r in rows])),
            "mean_dice_cost": float(np.mean([r["mean_dice_cost"] for r in rows])),
        })
        print(f"{mode:12s} Dice@5 {costs[-1]['dice@5']:.4f} (fp32 {costs[-1]['fp32_dice@5']:.4f})  cost {costs[-1]['dice@5_cost']:+.4f}"
              f" (per seed {', '.join(f'{v:+.4f}' for v in values)})   mean-over-clicks cost {costs[-1]['mean_dice_cost']:+.4f}")
    print("MEASURED_DICE5_COST = " + json.dumps({c["precision"]: round(c["dice@5_cost"], 4) for c in costs}))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "costs.json").write_text(json.dumps({"model": str(path), "clicks": args.clicks, "costs": costs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
