"""Retrieval quality of DuoAttention configurations on one model, in one run.

Rows: the unpatched model; all KV heads streaming; and for every ``--config NAME=FILE`` and every
sparsity of ``--sparsity`` (fractions of streaming KV heads, comma-separated), the config at that
sparsity and its inverse (the same number of streaming heads, chosen among the config's retrieval
heads first). Columns: accuracy per task, the worst drop in any (length, depth) cell against the
unpatched model, and the KV cache bytes at the longest length relative to the unpatched cache.

    python benchmarks/duo_quality.py --model models/needle-llama \\
        --config calibrated=models/needle-llama/kvpress-duo.safetensors --sparsity 0.5,0.75,0.9 \\
        --out benchmarks/results/duo_quality.json
"""

import argparse
import json
from pathlib import Path

import torch

import kvpress
from kvpress.eval.cli import EvalConfig, environment, load_model, parse_depths, run_eval


def variants(configs: dict[str, Path], sparsities: list[float], sink: int, recent: int, shape, inverted_at=None,
             baselines=True) -> dict:
    """Name -> DuoConfig (None = unpatched)."""
    rows = {}
    if baselines:
        rows["full (unpatched)"] = None
        zeros = torch.zeros(shape.num_layers, shape.num_kv_heads)
        rows["all streaming"] = kvpress.DuoConfig.from_retrieval_mask(zeros.bool(), sink=sink, recent=recent)
    for name, path in configs.items():
        for sparsity in sparsities:
            config = kvpress.DuoConfig.load(path, sparsity=sparsity, sink=sink, recent=recent)
            retrieval = config.retrieval_heads()
            # inverted: the lowest gates become the retrieval heads (as many as above)
            inverted = kvpress.DuoConfig(gates=1 - config.gates, sparsity=sparsity).retrieval_heads()
            rows[f"{name} ({sparsity:.0%} streaming)"] = kvpress.DuoConfig.from_retrieval_mask(retrieval, sink=sink, recent=recent)
            if inverted_at is None or sparsity in inverted_at:
                rows[f"{name} inverted ({sparsity:.0%} streaming)"] = kvpress.DuoConfig.from_retrieval_mask(inverted, sink=sink, recent=recent)
    return rows


def worst_cell_drop(result: dict, reference: dict) -> float:
    return max(
        reference["grid"][n][d] - score for n, row in result["grid"].items() for d, score in row.items()
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", action="append", default=[], help="NAME=FILE of a saved DuoConfig (repeatable)")
    parser.add_argument("--sparsity", default="0.5", help="comma-separated fractions of streaming KV heads")
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--recent", type=int, default=256)
    parser.add_argument("--tasks", default="passkey,multikey", help="comma-separated tasks of kvpress-eval; 'ppl' adds perplexity")
    parser.add_argument("--ppl-tokens", type=int, default=65536, help="held-out tokens scored for perplexity")
    parser.add_argument("--ppl-context", type=int, default=2048, help="perplexity window in tokens")
    parser.add_argument("--inverted", default=None, help="sparsities that also get the inverted split (default: all)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the unpatched and all-streaming rows (a run split over processes; no table)")
    parser.add_argument("--chat", action="store_true", help="prompts in the tokenizer's chat template (instruction models)")
    parser.add_argument("--num-needles", type=int, default=None, help="keys / values / pairs per sample (default: the task's)")
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
        depths=parse_depths(args.depths), samples=args.samples, progress=False, chat=args.chat,
        num_needles=args.num_needles, ppl_tokens=args.ppl_tokens, ppl_context=args.ppl_context,
    )
    sparsities = [float(x) for x in args.sparsity.split(",")]
    results = {}
    inverted_at = None if args.inverted is None else [float(x) for x in args.inverted.split(",") if x]
    for name, config in variants(configs, sparsities, args.sink, args.recent, shape, inverted_at, not args.no_baselines).items():
        if config is not None:
            kvpress.patch(model, "duo", config=config)
        results[name] = run_eval(model, tokenizer, eval_config)
        if config is not None:
            kvpress.unpatch(model)
        print(name, {task: round(r.get("accuracy", r.get("perplexity", 0.0)), 3) for task, r in results[name].items()}, flush=True)

    if args.no_baselines:
        if args.out:
            payload = {"environment": environment(model), "args": vars(args), "results": results}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(payload, indent=1, default=str) + "\n")
        return
    reference = results["full (unpatched)"]
    longest = max(eval_config.lengths)
    retrieval = [t for t in eval_config.tasks if t != "ppl"]
    header = ["configuration"] + [f"{t} acc" for t in retrieval] + [f"{t} worst cell drop" for t in retrieval]
    header += ["perplexity"] * ("ppl" in eval_config.tasks) + [f"KV bytes at {longest} vs unpatched"] * bool(retrieval)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        cells = [f"{result[t]['accuracy']:.1%}" for t in retrieval]
        cells += [f"{worst_cell_drop(result[t], reference[t]):.1%}" for t in retrieval]
        if "ppl" in eval_config.tasks:
            cells.append(f"{result['ppl']['perplexity']:.3f}")
        if retrieval:
            first = retrieval[0]
            cells.append(f"{result[first]['cache_bytes'][longest] / reference[first]['cache_bytes'][longest]:.2f}x")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        payload = {"environment": environment(model), "args": vars(args), "results": results, "table": table}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
