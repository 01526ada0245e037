"""MInference quality on the test models (issue 12): attention recall per layer, and retrieval accuracy
of the patched model next to the unpatched one, through the evaluation harness (kvpress.eval).

    python benchmarks/minference_quality.py --model models/needle-llama \\
        --config searched=models/needle-llama/kvpress-minference.safetensors --config default \\
        --tasks passkey,multikey,multivalue,kvlookup --lengths 8192 --depths 5 --samples 2 \\
        --out benchmarks/results/minference_quality_needle_llama.json
    python benchmarks/minference_quality.py --model smollm2 --chat --config searched=FILE --config default \\
        --tasks passkey,people --lengths 1024,2048 --depths 5 --samples 2 --out ...

``--config NAME=FILE`` evaluates a saved config (the project's file or the reference's JSON);
``--config default`` the runtime's no-config rule: every head VS with the reference's (1000, 6096)
scaled by ``T / 131072`` (at least 30 / 50; ``calibration.minference.default_budget``);
``--config NAME=scaled:F`` every head VS with ``calibration.minference.scaled_budget(T, F)`` (the
forced 30 columns and 100 diagonals plus the reference's other 970 / 5996 times ``T / 131072``,
each at least ``F``), built per length. Every config
gets ``--min-length`` (default 0), since the default 131072 would run these short-context models
dense. Recall (share of each query's true attention mass the index keeps, queries past T / 12;
``calibration.minference.attention_recall``) is measured on the unpatched model on one prompt per
task at the longest length (needle at depth 0.5), exactly as the harness tokenizes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import kvpress
from kvpress.calibration.minference import (
    attention_recall, block_rows_mask, budget_config, default_budget, scaled_budget, vs_block_mask,
)
from kvpress.kernels import minference_reference
from kvpress.eval.cli import EvalConfig, environment, load_model, parse_depths, read_text, run_eval
from kvpress.eval.harness import folds_leading_space
from kvpress.eval.tasks import make_sample
from kvpress.methods.minference import MInferenceConfig


def prompt_ids(tokenizer, sample) -> torch.Tensor:
    """The prompt's ids as ``kvpress.eval.harness.answer`` feeds them to the model."""
    prompt = sample.prompt
    if prompt.endswith(" ") and folds_leading_space(tokenizer):
        prompt = prompt[:-1]
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=not sample.chat).input_ids


def describe_config(config, lengths: list[int]) -> dict:
    """What a config keeps: its pattern counts, or its rule's budget per length."""
    if isinstance(config, int):
        return {"rule": f"VS (30 + max({config}, ceil(970 T / 131072)), 100 + max({config}, ceil(5996 T / 131072)))",
                "budget_per_length": {n: scaled_budget(n, config) for n in lengths}}
    if config.patterns is None:
        return {"rule": "VS (1000, 6096) x T / 131072, at least (30, 50)",
                "budget_per_length": {n: default_budget(n) for n in lengths}}
    counts = Counter(p for layer in config.patterns for p in layer.values())
    return {"patterns": {f"{name}({a}, {b})": n for (name, a, b), n in counts.most_common()},
            "search_scores_mean": float(config.scores.mean()) if config.scores is not None else None}


def accuracy_table(results: dict) -> dict:
    """{task: {"all": accuracy, length: accuracy}} of a run_eval result."""
    return {t: {"all": r["accuracy"], **{str(n): v for n, v in r["by_length"].items()}}
            for t, r in results.items() if "accuracy" in r}


def merge(parts: list[dict]) -> dict:
    """One run_eval result from runs over disjoint lengths (accuracy: mean over lengths)."""
    out = json.loads(json.dumps(parts[0]))
    for part in parts[1:]:
        for task, r in part.items():
            for key in ("grid", "by_length", "cache_bytes", "dense_cache_bytes"):
                if key in r:
                    out[task][key].update(r[key])
            if "examples" in r:
                out[task]["examples"] += r["examples"]
            if "seconds" in r:
                out[task]["seconds"] += r["seconds"]
    for r in out.values():
        if "by_length" in r:
            r["accuracy"] = sum(r["by_length"].values()) / len(r["by_length"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder, or 'smollm2' (kvpress.testbed.smollm2_path())")
    p.add_argument("--config", action="append", default=[],
                   help="NAME=FILE (saved config) or 'default' (no config: the scaled default budget); repeatable")
    p.add_argument("--min-length", type=int, default=0, help="MInferenceConfig.min_length of every config (default 0)")
    p.add_argument("--tasks", default="passkey,multikey,multivalue,kvlookup")
    p.add_argument("--lengths", default="8192")
    p.add_argument("--depths", default="5")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="chat-template prompts (instruction models)")
    p.add_argument("--haystack", default="heldout")
    p.add_argument("--no-eval", action="store_true", help="attention recall only")
    p.add_argument("--no-recall", action="store_true", help="retrieval accuracy only")
    p.add_argument("--recall-tasks", default=None, help="tasks whose prompt the recall is measured on (default: --tasks)")
    p.add_argument("--exact-masks", action="store_true",
                   help="keep the reference's per-query masks on the CPU path (default: the per-query-block masks of "
                   "calibration.minference, equal to them and tested so, several times faster)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="results JSON")
    a = p.parse_args(argv)
    if not a.exact_masks:  # the CPU path (dense attention under the index's mask) builds its masks per query block
        minference_reference.vs_mask, minference_reference.block_mask = vs_block_mask, block_rows_mask
    if a.model == "smollm2":
        from kvpress.testbed import smollm2_path

        a.model = str(smollm2_path())
    tasks = [t for t in a.tasks.split(",") if t]
    lengths = [int(n) for n in a.lengths.split(",") if n]
    cfg = EvalConfig(tasks=tasks, lengths=lengths, depths=parse_depths(a.depths), samples=a.samples, seed=a.seed,
                     haystack=a.haystack, progress=False, chat=a.chat)
    configs = {}
    for item in a.config or ["default"]:
        name, _, path = item.partition("=")
        if path and not path.startswith("scaled:") and not Path(path).exists():
            print(f"{name}: {path} not found, skipped", flush=True)
            continue
        if path.startswith("scaled:"):
            configs[name] = int(path.split(":")[1])  # a rule, built per length
        else:
            configs[name] = (MInferenceConfig.load(path, min_length=a.min_length) if path
                             else MInferenceConfig(min_length=a.min_length))

    model, tokenizer = load_model(a.model, a.device, a.dtype)
    haystack = read_text(a.haystack)
    recall_inputs = [prompt_ids(tokenizer, make_sample(t, tokenizer, haystack, max(lengths), 0.5, seed="recall",
                                                       chat=a.chat)) for t in (a.recall_tasks or a.tasks).split(",") if t]
    report = {"model": a.model, "eval": {k: v for k, v in vars(cfg).items() if k != "progress"},
              "min_length": a.min_length, "environment": environment(model),
              "recall_prompts": {"tasks": (a.recall_tasks or a.tasks).split(","), "length": max(lengths), "depth": 0.5,
                                 "tokens": [x.shape[-1] for x in recall_inputs], "scored_from": "T / 12"},
              "unpatched": None, "configs": {}}
    started = time.time()

    def save():  # after every configuration, so that a run stopped early keeps what it measured
        report["seconds"] = round(time.time() - started, 1)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(report, indent=1))

    if not a.no_eval:
        report["unpatched"] = {"accuracy": None, "results": run_eval(model, tokenizer, cfg)}
        report["unpatched"]["accuracy"] = accuracy_table(report["unpatched"]["results"])
        print(f"unpatched: {json.dumps(report['unpatched']['accuracy'])} ({time.time() - started:.0f} s)", flush=True)
        save()
    for name, config in configs.items():
        entry = {"config": describe_config(config, lengths)}
        t0 = time.time()
        at = (lambda n: budget_config(n, config, min_length=a.min_length)) if isinstance(config, int) else (lambda n: config)
        if not a.no_recall:
            entry["recall"] = attention_recall(model, recall_inputs, at(max(lengths)))
            r = entry["recall"]
            print(f"{name}: recall {r['recall']:.4f} (last 64 queries {r['recall_last']:.4f}), density "
                  f"{r['density']:.4f}; per layer " + " ".join(f"{x:.3f}" for x in r["recall_per_layer"]), flush=True)
        if not a.no_eval:
            parts = []
            for group in ([[n] for n in lengths] if isinstance(config, int) else [lengths]):
                kvpress.patch(model, "minference", config=at(group[0]))
                try:
                    parts.append(run_eval(model, tokenizer, dataclasses.replace(cfg, lengths=group)))
                finally:
                    kvpress.unpatch(model)
            entry["results"] = merge(parts)
            entry["accuracy"] = accuracy_table(entry["results"])
            base = report["unpatched"]["accuracy"]
            entry["delta_points"] = {t: {n: round(100 * (v - base[t][n]), 2) for n, v in row.items()}
                                     for t, row in entry["accuracy"].items()}
            entry["worst_delta_points"] = min(d for row in entry["delta_points"].values() for d in row.values())
            print(f"{name}: {json.dumps(entry['accuracy'])}; worst delta {entry['worst_delta_points']:+.1f} points", flush=True)
        entry["seconds"] = round(time.time() - t0, 1)
        report["configs"][name] = entry
        save()
    if a.out:
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
