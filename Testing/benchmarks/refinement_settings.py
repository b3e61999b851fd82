"""The boundary refinement's settings against each other on the development data: the evaluation
protocol (``fastsam3d evaluate``'s clicks and Dice, through ``Session``) once per setting, Colin27 and
MNI152, mean of Dice@1/3/5 over the click seeds. How the defaults of ``BoundaryRefinement`` were chosen.

Usage::

    python Testing/benchmarks/refinement_settings.py --model CHECKPOINT [--clicks 5] [--seeds 0 1 2 3]
        [--settings none 4:1 6:1 4:2 3:1] [--precision fp32-fast] [--json-out FILE]

A setting is ``band:alpha``, or ``none`` for the logits alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from FastSAM3DLib import load_model  # noqa: E402
from FastSAM3DLib.evaluate import ModelInteractor, Variant, colin27_cases, mni152_cases, run_case  # noqa: E402
from FastSAM3DLib.paste import BoundaryRefinement  # noqa: E402


class SettingInteractor(ModelInteractor):
    """The model through Session with a given refinement (None: the logits alone)."""

    def __init__(self, model, precision: str, refinement) -> None:
        super().__init__(model, precision)
        self.setting = refinement

    def start(self, image) -> None:
        super().start(image)
        self.session.refinement = self.setting


def parse_setting(text: str):
    if text == "none":
        return None
    band, alpha = (float(v) for v in text.split(":"))
    return BoundaryRefinement(alpha=alpha, band=band)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--settings", nargs="+", default=["none", "4:1", "6:1", "4:2", "3:1"])
    parser.add_argument("--precision", default="fp32-fast")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    variant = Variant("model", args.precision, "all", "point")
    report = []
    for data, cases in (("colin27", colin27_cases()), ("mni152", mni152_cases())):
        for setting in args.settings:
            dice = np.array([
                run_case(SettingInteractor(model, args.precision, parse_setting(setting)), case, variant, args.clicks, seed).dice
                for seed in args.seeds for case in cases
            ])
            at = [k for k in (1, 3, 5, 10) if k <= args.clicks]
            means = {f"dice@{k}": float(dice[:, k - 1].mean()) for k in at}
            report.append({"data": data, "setting": setting, **means, "mean": float(np.mean(list(means.values())))})
            print(f"{data:8s} {setting:6s} " + " ".join(f"{k} {v:.3f}" for k, v in means.items()) + f"  mean {report[-1]['mean']:.3f}",
                  flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
