"""Palu quality on the project's needle-llama (CPU, a few minutes): perplexity and passkey retrieval
of the unpatched model next to Palu-50% made four ways.

    python benchmarks/palu_quality.py [--model models/needle-llama] [--out benchmarks/results/palu_quality_needle_llama.json]

Rows: unpatched; plain SVD with uniform ranks (no data); whitening + Fisher rank allocation (the
paper's Palu), with latents in the model's dtype and at 4 and 3 bits (Hadamard-rotated). Perplexity
is measured on the bundled held-out text, retrieval on passkeys at a grid of lengths and depths
(``kvpress.eval``); the KV cache bytes are the cache's real tensors after answering.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import kvpress
from kvpress.calibration.palu import PaluCalibration, calibrate_palu
from kvpress.eval.cli import EvalConfig, environment, load_model, run_eval
from kvpress.methods import METHODS
from kvpress.methods.palu import Palu

METHODS.setdefault("palu", Palu)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/needle-llama")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--multiple", type=int, default=16, help="rank granularity (the model's groups are 128 wide)")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-len", type=int, default=1024)
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--depths", type=int, default=5)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--out", default="benchmarks/results/palu_quality_needle_llama.json")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, "cpu", "float32")
    folder = Path(tempfile.mkdtemp(prefix="palu_quality_"))
    started = time.time()
    common = dict(ratio=args.ratio, group_size=args.group_size, multiple=args.multiple,
                  samples=args.calib_samples, seq_len=args.calib_len)
    configs = {
        "svd-uniform": calibrate_palu(model, tokenizer, folder / "svd", PaluCalibration(
            **common, allocation="uniform", decomposition="svd"), progress=False),
        "whiten-fisher": calibrate_palu(model, tokenizer, folder / "palu", PaluCalibration(**common), progress=False),
    }
    calibration_s = time.time() - started
    print(f"calibrated in {calibration_s:.0f} s; ranks (whiten-fisher): {configs['whiten-fisher'].ranks()}", flush=True)

    variants = {
        "unpatched": None,
        f"palu-{args.ratio:.0%} plain SVD, uniform ranks": dict(config=folder / "svd"),
        f"palu-{args.ratio:.0%} whitening + Fisher": dict(config=folder / "palu"),
        f"palu-{args.ratio:.0%} whitening + Fisher, 4-bit latents": dict(config=folder / "palu", bits=4, quant_group=16),
        f"palu-{args.ratio:.0%} whitening + Fisher, 3-bit latents": dict(config=folder / "palu", bits=3, quant_group=16),
    }
    eval_config = EvalConfig(tasks=["ppl", "passkey"], lengths=[int(x) for x in args.lengths.split(",")],
                             depths=[i / max(1, args.depths - 1) for i in range(args.depths)], samples=args.samples,
                             ppl_context=1024, ppl_tokens=args.ppl_tokens, progress=False)
    rows = []
    for name, setting in variants.items():
        if setting is not None:
            kvpress.patch(model, "palu", **setting)
        t = time.time()
        result = run_eval(model, tokenizer, eval_config)
        if setting is not None:
            kvpress.unpatch(model)
        longest = max(eval_config.lengths)
        passkey = result["passkey"]
        rows.append({
            "variant": name, "perplexity": result["ppl"]["perplexity"], "passkey": passkey["accuracy"],
            "passkey_by_length": passkey["by_length"],
            "kv_bytes_vs_dense": passkey["cache_bytes"][longest] / passkey["dense_cache_bytes"][longest],
            "seconds": round(time.time() - t, 1),
        })
        print(rows[-1], flush=True)

    print(f"\n| variant | perplexity | passkey | KV cache vs dense at {max(eval_config.lengths)} |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['perplexity']:.3f} | {r['passkey']:.0%} | {r['kv_bytes_vs_dense']:.3f} |")
    out = {"env": environment(model), "options": vars(args), "calibration_s": round(calibration_s, 1),
           "ranks": {k: c.ranks() for k, c in configs.items()}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
