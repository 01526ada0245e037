"""Retrieval quality of DuoAttention configurations on one model, in one run.

Rows: the unpatched model; all KV heads streaming; and for every ``--config NAME=FILE`` the config at
``--sparsity`` and its inverse (the other heads made retrieval heads). Columns: accuracy per task,
the worst drop in any (length, depth) cell against the unpatched model, and the KV cache bytes at the
longest length relative to the unpatched cache.

    python benchmarks/duo_quality.py --model models/needle-llama \\
        --config calibrated=models/needle-llama/kvpress-duo.safetensors --out benchmarks/results/duo_quality.json
"""

import argparse
import json
from pathlib import Path

import torch

import kvpress
from kvpress.eval.cli import EvalConfig, environment, load_model, parse_depths, run_eval


def variants(configs: dict[str, Path], sparsity: float, sink: int, recent: int, shape) -> dict:
    """Name -> DuoConfig (None = unpatched)."""
    rows = {"full (unpatched)": None}
    zeros = torch.zeros(shape.num_layers, shape.num_kv_heads)
    rows["all streaming"] = kvpress.DuoConfig.from_retrieval_mask(zeros.bool(), sink=sink, recent=recent)
    for name, path in configs.items():
        config = kvpress.DuoConfig.load(path, sparsity=sparsity, sink=sink, recent=recent)
        retrieval = config.retrieval_heads()
        rows[f"{name} ({1 - sparsity:.0%} retrieval)"] = kvpress.DuoConfig.from_retrieval_mask(retrieval, sink=sink, recent=recent)
        rows[f"{name} inverted"] = kvpress.DuoConfig.from_retrieval_mask(~retrieval, sink=sink, recent=recent)
    return rows


def worst_cell_drop(result: dict, reference: dict) -> float:
    return max(
        reference["grid"][n][d] - score for n, row in result["grid"].items() for d, score in row.items()
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", action="append", default=[], help="NAME=FILE of a saved DuoConfig (repeatable)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--recent", type=int, default=256)
    parser.add_argument("--tasks", default="passkey,multikey")
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--depths", default="11", help="a count of evenly spaced depths in [0, 1], or a list")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, args.device, args.dtype)
    shape = kvpress.adapters.describe(model).shape
    configs = dict(item.split("=", 1) for item in args.config)
    eval_config = EvalConfig(
        tasks=args.tasks.split(","), lengths=[int(x) for x in args.lengths.split(",")],
        depths=parse_depths(args.depths), samples=args.samples, progress=False,
    )
    results = {}
    for name, config in variants(configs, args.sparsity, args.sink, args.recent, shape).items():
        if config is not None:
            kvpress.patch(model, "duo", config=config)
        results[name] = run_eval(model, tokenizer, eval_config)
        if config is not None:
            kvpress.unpatch(model)
        print(name, {task: round(results[name][task]["accuracy"], 3) for task in eval_config.tasks}, flush=True)

    reference = results["full (unpatched)"]
    longest = max(eval_config.lengths)
    header = ["configuration"] + [f"{t} acc" for t in eval_config.tasks] + [f"{t} worst cell drop" for t in eval_config.tasks]
    lines = ["| " + " | ".join(header + [f"KV bytes at {longest} vs unpatched"]) + " |", "|" + "---|" * (len(header) + 1)]
    for name, result in results.items():
        first = eval_config.tasks[0]
        ratio = result[first]["cache_bytes"][longest] / reference[first]["cache_bytes"][longest]
        cells = [f"{result[t]['accuracy']:.1%}" for t in eval_config.tasks]
        cells += [f"{worst_cell_drop(result[t], reference[t]):.1%}" for t in eval_config.tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        payload = {"environment": environment(model), "args": vars(args), "results": results, "table": table}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
