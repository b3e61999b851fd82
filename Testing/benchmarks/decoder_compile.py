"""Would ``torch.compile`` make a later click fast enough? The restated decoder (``FastDecoder``) of
the full-size student, eager and compiled (inductor), fp32 and int8, one run.

Times one decode of a 128^3 crop embedding with 5 clicks and a previous mask (what a later click
decodes), the four variants interleaved round by round (``FastSAM3DLib.benchmark.run_interleaved``),
medians over ``--repeats`` rounds; also the time of the first compiled call (the compilation;
inductor caches it on disk, so a second run of this script shows the warm-cache figure), the
largest difference from the eager result, and a second prompt count (a later click has one more
click than the one before: with ``dynamic=True`` that must not recompile). Prints a table and
writes JSON.

Usage: python Testing/benchmarks/decoder_compile.py [--model NAME] [--repeats 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from FastSAM3DLib.benchmark import Measurement, run_interleaved  # noqa: E402
from FastSAM3DLib.build import build_model  # noqa: E402
from FastSAM3DLib.quantize import FastDecoder  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fastsam3d", help="architecture (random weights; the decoder's cost does not depend on them)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model).eval()
    generator = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        embedding = model.image_encoder(torch.randn(1, 1, 128, 128, 128, generator=generator))
        previous = torch.randn(1, 1, *model.low_res_size, generator=generator)
        prompts = {}
        for count in (5, 6):
            coords = torch.rand(1, count, 3, generator=generator) * 127
            labels = (torch.rand(1, count, generator=generator) > 0.3).float()
            prompts[count] = (coords, labels)
        timed = []  # (row, eager, compiled)
        for int8 in (False, True):
            decoder = FastDecoder(model, int8=int8).eval()
            reference = decoder(embedding, *prompts[5], previous)[0]
            compiled_decoder = torch.compile(decoder, dynamic=True)
            start = time.perf_counter()
            result = compiled_decoder(embedding, *prompts[5], previous)[0]
            compile_s = time.perf_counter() - start
            start = time.perf_counter()
            compiled_decoder(embedding, *prompts[6], previous)
            next_count_s = time.perf_counter() - start
            name = "int8" if int8 else "fp32"
            eager = Measurement("decode", f"{name} eager", lambda d=decoder: d(embedding, *prompts[5], previous))
            compiled = Measurement("decode", f"{name} compiled", lambda d=compiled_decoder: d(embedding, *prompts[5], previous))
            row = {
                "decoder": name,
                "first_compiled_call_s": compile_s,
                "one_more_click_first_call_s": next_count_s,
                "max_abs_difference": float((result - reference).abs().max()),
            }
            timed.append((row, eager, compiled))
        run_interleaved([m for _, *pair in timed for m in pair], args.repeats, torch.device("cpu"))
    for row, eager, compiled in timed:
        row["eager_ms"] = 1e3 * eager.summary()["median_s"]
        row["compiled_ms"] = 1e3 * compiled.summary()["median_s"]
        rows.append(row)
    print(f"decode, {args.model}, {args.threads} threads, 5 clicks (medians of {args.repeats})")
    print(f"{'decoder':8s} {'eager':>9s} {'compiled':>9s} {'compile':>9s} {'+1 click':>9s} {'max |diff|':>11s}")
    for row in rows:
        print(f"{row['decoder']:8s} {row['eager_ms']:7.1f}ms {row['compiled_ms']:7.1f}ms {row['first_compiled_call_s']:8.1f}s "
              f"{row['one_more_click_first_call_s']:8.2f}s {row['max_abs_difference']:11.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "threads": args.threads, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
