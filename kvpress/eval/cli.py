"""`kvpress-eval`: long-context retrieval accuracy, KV cache bytes and perplexity of a model.

    kvpress-eval --model models/needle-llama --tasks passkey,multikey,ppl \
        --lengths 1024,2048,4096,8192 --depths 11 --samples 4 --out results.json --heatmap passkey.png

Add `--duo-config FILE` to evaluate the model patched with DuoAttention (`kvpress.patch`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from .harness import evaluate_task, heatmap, perplexity
from .tasks import TASKS, load_corpus


@dataclass
class EvalConfig:
    """What to evaluate. Lengths in tokens; depths as fractions of the haystack."""

    tasks: list[str] = field(default_factory=lambda: ["passkey", "multikey", "multivalue", "kvlookup", "ppl"])
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    depths: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])
    samples: int = 2  # per (length, depth) cell
    seed: int = 0
    num_needles: int | None = None  # None: the task's default (tasks.DEFAULT_NEEDLES)
    haystack: str = "heldout"  # "heldout", "train" (bundled corpus) or a path to a text file
    ppl_text: str = "heldout"  # same choices
    ppl_context: int = 2048
    ppl_tokens: int = 65536
    progress: bool = True


def read_text(name: str) -> str:
    """The bundled corpus split `name`, or the contents of the file `name`."""
    if name in ("heldout", "train"):
        return load_corpus(name)
    with open(name, encoding="utf-8") as f:
        return f.read()


def run_eval(model, tokenizer, cfg: EvalConfig) -> dict:
    """Evaluate `model` on `cfg`; returns a JSON-ready dict {task: result, "ppl": ...}."""
    results = {}
    haystack = read_text(cfg.haystack)
    for task in cfg.tasks:
        t0 = time.time()
        if task == "ppl":
            results["ppl"] = perplexity(
                model, tokenizer, read_text(cfg.ppl_text), cfg.ppl_context, cfg.ppl_tokens, cfg.progress
            )
        else:
            r = evaluate_task(
                model,
                tokenizer,
                task,
                haystack,
                cfg.lengths,
                cfg.depths,
                cfg.samples,
                cfg.seed,
                cfg.num_needles,
                cfg.progress,
            )
            results[task] = r.to_dict()
        results[task]["seconds"] = round(time.time() - t0, 2)
    return results


def load_model(path: str, device: str, dtype: str):
    """Model and tokenizer from a local folder or hub name (offline if cached), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return model, tokenizer


def patch_duo(model, config_path: str, sparsity: float | None = None, threshold: float | None = None):
    """Patch `model` with DuoAttention from a saved DuoConfig, optionally re-binarising the gates
    (`sparsity`: fraction of streaming heads, or `threshold`: gate of a retrieval head)."""
    import kvpress

    options = {k: v for k, v in (("sparsity", sparsity), ("threshold", threshold)) if v is not None}
    config = kvpress.DuoConfig.load(config_path, **options)
    kvpress.patch(model, "duo", config=config)
    return config


def duo_summary(config) -> dict:
    """The settings of a DuoConfig and its binarised retrieval-head mask, as JSON."""
    heads = config.retrieval_heads()
    return {
        "sink": config.sink,
        "recent": config.recent,
        "sparsity": config.sparsity,
        "threshold": config.threshold,
        "retrieval_heads": heads.int().tolist(),
        "retrieval_fraction": heads.float().mean().item(),
    }


def environment(model) -> dict:
    """Versions and device, recorded with every result."""
    import transformers

    dev = model.device
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": str(model.dtype),
    }


def parse_list(text: str, kind=float) -> list:
    return [kind(x) for x in text.split(",") if x]


def parse_depths(text: str) -> list[float]:
    """"11": eleven evenly spaced depths in [0, 1]; "0,0.5,1": those depths."""
    if text.isdigit():
        n = int(text)
        return [round(i / max(n - 1, 1), 4) for i in range(n)]
    return parse_list(text)


def main(argv=None):
    p = argparse.ArgumentParser(prog="kvpress-eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder or hub name")
    p.add_argument("--tasks", default="passkey,multikey,multivalue,kvlookup,ppl", help=f"any of {TASKS + ('ppl',)}")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="context lengths in tokens")
    p.add_argument("--depths", default="11", help="a count of evenly spaced depths in [0,1] (11), or depths (0.5 or 0,0.5,1)")
    p.add_argument("--samples", type=int, default=2, help="samples per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-needles", type=int, default=None, help="keys / values / pairs per sample")
    p.add_argument("--haystack", default="heldout", help="'heldout', 'train' or a text file")
    p.add_argument("--ppl-text", default="heldout", help="'heldout', 'train' or a text file")
    p.add_argument("--ppl-context", type=int, default=2048)
    p.add_argument("--ppl-tokens", type=int, default=65536)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--duo-config", default=None, help="a saved kvpress.DuoConfig: evaluate the patched model")
    p.add_argument("--duo-sparsity", type=float, default=None, help="override: fraction of streaming heads")
    p.add_argument("--duo-threshold", type=float, default=None, help="override: gate threshold for retrieval heads")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--heatmap", default=None, help="write the passkey heatmap PNG here (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    depths = parse_depths(a.depths)
    cfg = EvalConfig(
        tasks=a.tasks.split(","),
        lengths=parse_list(a.lengths, int),
        depths=depths,
        samples=a.samples,
        seed=a.seed,
        num_needles=a.num_needles,
        haystack=a.haystack,
        ppl_text=a.ppl_text,
        ppl_context=a.ppl_context,
        ppl_tokens=a.ppl_tokens,
        progress=not a.no_progress,
    )
    torch.manual_seed(a.seed)
    model, tokenizer = load_model(a.model, a.device, a.dtype)
    duo = None
    if a.duo_config:
        duo = patch_duo(model, a.duo_config, a.duo_sparsity, a.duo_threshold)
    t0 = time.time()
    results = run_eval(model, tokenizer, cfg)
    report = {
        "model": a.model,
        "duo_config": a.duo_config,
        "duo": duo_summary(duo) if duo is not None else None,
        "config": asdict(cfg),
        "environment": environment(model),
        "seconds": round(time.time() - t0, 2),
        "results": results,
    }
    for task, r in results.items():
        if task == "ppl":
            print(f"ppl       perplexity {r['perplexity']:.3f}  bits/byte {r['bits_per_byte']:.3f}  ({r['tokens']} tokens)")
        else:
            by_len = "  ".join(f"{n}:{100 * v:.0f}%" for n, v in r["by_length"].items())
            n_max = max(r["cache_bytes"])
            ratio = r["cache_bytes"][n_max] / r["dense_cache_bytes"][n_max]
            print(f"{task:<10}{100 * r['accuracy']:5.1f}%  [{by_len}]  KV bytes at {n_max}: {ratio:.2f} of dense")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    if a.heatmap and "passkey" in results:
        if not heatmap(results["passkey"], a.heatmap, title=f"passkey, {a.model}"):
            print("matplotlib is not installed: no heatmap")
    return report


if __name__ == "__main__":
    main()
