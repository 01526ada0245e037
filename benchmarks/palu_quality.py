"""Palu quality: perplexity and passkey retrieval of the unpatched model next to Palu made several
ways, on needle-llama (the project's test model) or SmolLM2-135M-Instruct (the real-model test bed).

    python benchmarks/palu_quality.py [--model models/needle-llama] [--group-size 4] [--ratio 0.5]
    python benchmarks/palu_quality.py --model smollm2 --chat --group-size 1 --tasks ppl,passkey
    python benchmarks/palu_quality.py --frontier 1:0.25,1:0.5,1:0.75,2:0.5,4:0.5 --device cuda
    python benchmarks/palu_quality.py --model smollm2 --sweep --calib-samples 16 --sweep-snapshots 4

Rows at the main setting (``--group-size``, ``--ratio``): unpatched; plain SVD with uniform ranks
(no data); whitening + Fisher rank allocation (the paper's Palu), with latents in the model's dtype
and at 4 and 3 bits (Hadamard-rotated); whitening with uniform ranks (Fisher's share). ``--frontier gs:ratio,...`` adds whitening + Fisher rows
(and 4-bit) at other group sizes and ratios (the quality side of ``bench_palu.py layer``); one
statistics pass serves every setting. Perplexity is measured on the bundled held-out text, retrieval
on passkeys at a grid of lengths and depths (``kvpress.eval``); ``passkey_where_unpatched`` is the
accuracy over the cells the unpatched model gets right (small models retrieve only some cells). The
KV cache bytes are the cache's real tensors after answering. Decode runs the reference path
(``KVPRESS_KERNELS=reference`` unless set): the numbers are the method's, the kernel's own
agreement with it is what ``tests/test_palu_kernels.py`` checks.

``--sweep`` measures instead what makes the calibration good, by perplexity only (fast: the
unquantised Palu model computes exactly the keys and values of ``k_proj`` / ``v_proj`` weights
replaced by ``up @ down``, so each setting is one perplexity pass of the model with substituted
weights; the first setting is also run patched to show the two agree): the amount of calibration
text (``--sweep-snapshots``: statistics after the first n samples of the same pass), groups of one
KV head vs all heads (up to ``--group-size``), Fisher vs uniform ranks, plain SVD, K/V rank splits,
layers kept dense (the budget shared by the others) and kept-rank ratios (``--sweep-ratios``).
"""

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KVPRESS_KERNELS", "reference")


import kvpress  # noqa: E402
import torch  # noqa: E402

from kvpress.adapters import describe  # noqa: E402
from kvpress.calibration.palu import (  # noqa: E402
    PaluCalibration, allocate_ranks, calibrate_palu, calibration_batches, collect_statistics, dense_weight, head_groups,
    layer_factors, uniform_rank, whitening,
)
from kvpress.eval.harness import evaluate_task, perplexity  # noqa: E402
from kvpress.eval.tasks import load_corpus  # noqa: E402
from kvpress.eval.cli import EvalConfig, environment, load_model, read_text, run_eval  # noqa: E402
from kvpress.methods import METHODS  # noqa: E402
from kvpress.methods.palu import Palu, PaluConfig  # noqa: E402
from kvpress.testbed import smollm2_path  # noqa: E402

METHODS.setdefault("palu", Palu)


def parse_frontier(text: str) -> list[tuple[int, float]]:
    out = []
    for item in filter(None, text.split(",")):
        gs, ratio = item.split(":")
        out.append((int(gs), float(ratio)))
    return out


def retrieval(model, tokenizer, task: str, cfg: EvalConfig, haystack: str) -> dict:
    """``kvpress.eval.evaluate_task``'s result for ``task``, with its per-cell scores as ``scores
    {(length, depth, sample): score}`` (to compare variants cell by cell)."""
    r = evaluate_task(model, tokenizer, task, haystack, cfg.lengths, cfg.depths, cfg.samples, cfg.seed,
                      cfg.num_needles, progress=False, chat=cfg.chat).to_dict()
    r["scores"] = {(n, d, i): value for n, d, i, value in r["scores"]}
    return r


def accuracy_where(reference: dict, scores: dict) -> float | None:
    """Mean score over the cells the reference (the unpatched model) gets right (score > 0.5); cells
    are keys ``(length, depth, sample)`` of both dicts."""
    kept = [cell for cell, value in reference.items() if value > 0.5]
    return sum(scores[cell] for cell in kept) / len(kept) if kept else None


def substituted_perplexity(model, tokenizer, factors: dict, args) -> float:
    """Held-out perplexity with every ``k_proj`` / ``v_proj`` weight replaced by ``up @ down`` (per
    group): what unquantised Palu computes, without its cache. Weights restored afterwards."""
    modules = [(m.k_proj, m.v_proj) for m in describe(model).attention_modules]
    saved = [(k.weight.data.clone(), v.weight.data.clone()) for k, v in modules]
    try:
        for i, pair in enumerate(modules):
            for side, proj in zip("kv", pair):
                weight = dense_weight(factors[f"{i}.{side}.up"], factors[f"{i}.{side}.down"])
                proj.weight.data.copy_(weight.to(proj.weight.device, proj.weight.dtype))
        return perplexity(model, tokenizer, load_corpus("heldout"), args.ppl_context, args.ppl_tokens, False)["perplexity"]
    finally:
        for (k, v), (wk, wv) in zip(modules, saved):
            k.weight.data.copy_(wk)
            v.weight.data.copy_(wv)


def make_factors(model, stats, ranks: torch.Tensor, gs: int, whiten: bool) -> dict:
    """Factors for given per-group ranks ``[L, 2]`` (full rank = the exact weight)."""
    groups = model.config.num_key_value_heads // gs
    factors = {}
    for i, module in enumerate(describe(model).attention_modules):
        factors.update(layer_factors(i, module, groups, ranks[i], whitening(stats["xtx"][i]) if whiten else None))
    return factors


def sweep(model, tokenizer, args, out_path: Path) -> None:
    """``--sweep``: perplexity over calibration choices (module docstring)."""
    snapshots = sorted({int(x) for x in args.sweep_snapshots.split(",") if x} | {args.calib_samples})
    started = time.time()
    all_stats = collect_statistics(model, calibration_batches(tokenizer, args.calib_samples, args.calib_len, 0),
                                   fisher=True, progress=False, snapshots=snapshots)
    stats = all_stats[args.calib_samples]
    stats_s = time.time() - started
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    head_dim = describe(model).shape.head_dim
    ratio, gs_all = args.ratio, head_groups(kv_heads, args.group_size)[0]
    rows = []

    def step(gs):
        return min(args.multiple, gs * head_dim // 4)

    def fisher(gs, ratio_, scores=None):
        scores = stats["fisher"] if scores is None else scores
        return allocate_ranks(scores, gs * head_dim, kv_heads // gs, ratio_, step(gs))

    def split(gs, k, v):  # the same ranks in every layer, in steps of 8
        return torch.tensor([[uniform_rank(gs * head_dim, f, min(8, step(gs))) for f in (k, v)]] * layers)

    def dense(gs, ratio_, keep):
        rest = [i for i in range(layers) if i not in keep]
        ranks = torch.full((layers, 2), gs * head_dim, dtype=torch.long)
        ranks[rest] = fisher(gs, (ratio_ * layers - len(keep)) / len(rest), stats["fisher"][rest])
        return ranks

    def run(label, gs, ranks, whiten=True, stats_=None, patched=False):
        t = time.time()
        factors = make_factors(model, stats_ or stats, ranks, gs, whiten)
        row = {"variant": label, "group_size": gs, "kept_rank": ranks.double().mean().item() / (gs * head_dim),
               "perplexity": substituted_perplexity(model, tokenizer, factors, args),
               "ranks": {"k": ranks[:, 0].tolist(), "v": ranks[:, 1].tolist()}}
        if patched:  # the same factors through the Palu runtime: the substitution computes the same model
            kvpress.patch(model, "palu", config=PaluConfig(factors=factors, group_size=gs))
            try:
                row["perplexity_patched"] = perplexity(model, tokenizer, load_corpus("heldout"), args.ppl_context,
                                                       args.ppl_tokens, False)["perplexity"]
            finally:
                kvpress.unpatch(model)
        row["seconds"] = round(time.time() - t, 1)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "ranks"}, flush=True)
        out = {"env": environment(model), "options": vars(args), "statistics_s": round(stats_s, 1), "rows": rows}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=1))

    rows.append({"variant": "unpatched", "perplexity": perplexity(model, tokenizer, load_corpus("heldout"), args.ppl_context,
                                                                  args.ppl_tokens, False)["perplexity"]})
    print(rows[-1], flush=True)
    run(f"gs={gs_all} whitening + Fisher", gs_all, fisher(gs_all, ratio), patched=True)
    for gs in sorted({1, gs_all}):
        for n in snapshots[:-1]:
            run(f"gs={gs} whitening + Fisher, {n} x {args.calib_len} calibration tokens", gs, allocate_ranks(
                all_stats[n]["fisher"], gs * head_dim, kv_heads // gs, ratio, step(gs)), stats_=all_stats[n])
        if gs != gs_all:
            run(f"gs={gs} whitening + Fisher", gs, fisher(gs, ratio))
        run(f"gs={gs} whitening, uniform ranks", gs, split(gs, ratio, ratio))
        run(f"gs={gs} plain SVD, uniform ranks", gs, split(gs, ratio, ratio), whiten=False)
        for k in (ratio - 0.25, ratio - 0.125, ratio + 0.125, ratio + 0.25):
            run(f"gs={gs} whitening, uniform ranks, K {k:.3g} / V {2 * ratio - k:.3g}", gs, split(gs, k, 2 * ratio - k))
    for keep in ([0], [layers - 1], [0, 1]):
        run(f"gs={gs_all} whitening + Fisher, layers {keep} dense", gs_all, dense(gs_all, ratio, keep))
    for r in (float(x) for x in args.sweep_ratios.split(",") if x):
        run(f"gs={gs_all} whitening + Fisher, {r:.0%}", gs_all, fisher(gs_all, r))
        run(f"gs={gs_all} whitening, uniform ranks, {r:.0%}", gs_all, split(gs_all, r, r))
    print(f"wrote {out_path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/needle-llama", help="a model folder, or 'smollm2' (the test bed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--frontier", default="", help="extra whitening + Fisher settings, gs:ratio,...")
    parser.add_argument("--multiple", type=int, default=16, help="rank granularity")
    parser.add_argument("--quant-group", type=int, default=16, help="latent channels per scale when quantised")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-len", type=int, default=1024)
    parser.add_argument("--tasks", default="ppl,passkey")
    parser.add_argument("--chat", action="store_true", help="prompts in the tokenizer's chat template")
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--depths", type=int, default=5)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--ppl-context", type=int, default=1024)
    parser.add_argument("--only", default="", help="comma-separated kinds to run: unpatched, svd, fisher, uniform "
                        "(whitening, uniform ranks), 4bit, 3bit (default all; the frontier settings get fisher, uniform and 4bit)")
    parser.add_argument("--sweep", action="store_true", help="perplexity over calibration choices (module docstring)")
    parser.add_argument("--sweep-snapshots", default="4", help="--sweep: also calibrate on the first n samples")
    parser.add_argument("--sweep-ratios", default="0.6,0.75", help="--sweep: other kept-rank ratios")
    parser.add_argument("--out", default=None, help="default benchmarks/results/palu_quality_<model>[_sweep].json")
    args = parser.parse_args()

    path = str(smollm2_path()) if args.model == "smollm2" else args.model
    name = "smollm2" if args.model == "smollm2" else Path(args.model).name.replace("-", "_")
    out_path = Path(args.out or f"benchmarks/results/palu_quality_{name}{'_sweep' if args.sweep else ''}.json")
    model, tokenizer = load_model(path, args.device, args.dtype)
    if args.sweep:
        return sweep(model, tokenizer, args, out_path)
    folder = Path(tempfile.mkdtemp(prefix="palu_quality_"))
    started = time.time()
    batches = calibration_batches(tokenizer, args.calib_samples, args.calib_len, 0)
    stats = collect_statistics(model, batches, fisher=True, progress=False)
    common = dict(samples=args.calib_samples, seq_len=args.calib_len)
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else \
        model.config.hidden_size // model.config.num_attention_heads

    def multiple(gs):  # rank granularity: --multiple, at most a quarter of the group's width
        return min(args.multiple, max(1, min(gs, model.config.num_key_value_heads) * head_dim // 4))
    settings = [(args.group_size, args.ratio)] + [s for s in parse_frontier(args.frontier) if s != (args.group_size, args.ratio)]
    configs, uniforms = {}, {}
    for gs, ratio in settings:
        configs[gs, ratio] = calibrate_palu(model, tokenizer, folder / f"palu_{gs}_{ratio}", PaluCalibration(
            ratio=ratio, group_size=gs, multiple=multiple(gs), **common), progress=False, stats=stats)
        uniforms[gs, ratio] = calibrate_palu(model, tokenizer, folder / f"uniform_{gs}_{ratio}", PaluCalibration(
            ratio=ratio, group_size=gs, allocation="uniform", multiple=multiple(gs), **common), progress=False, stats=stats)
    main_gs, main_ratio = settings[0]
    svd = calibrate_palu(model, tokenizer, folder / "svd", PaluCalibration(
        ratio=main_ratio, group_size=main_gs, allocation="uniform", decomposition="svd", multiple=multiple(main_gs),
        **common), progress=False)
    calibration_s = time.time() - started
    print(f"calibrated {len(configs) + 1} settings in {calibration_s:.0f} s", flush=True)

    def label(gs, ratio, extra=""):
        return f"palu-{ratio:.0%} gs={configs[gs, ratio].group_size}{extra}"

    qg = dict(quant_group=args.quant_group)
    variants = {"unpatched": (None, None, None)}
    variants[f"palu-{main_ratio:.0%} gs={svd.group_size} plain SVD, uniform ranks"] = (main_gs, main_ratio, dict(config=folder / "svd"))
    for i, (gs, ratio) in enumerate(settings):
        config = dict(config=folder / f"palu_{gs}_{ratio}")
        variants[label(gs, ratio, " whitening + Fisher")] = (gs, ratio, config)
        variants[label(gs, ratio, " whitening, uniform ranks")] = (gs, ratio, dict(config=folder / f"uniform_{gs}_{ratio}"))
        variants[label(gs, ratio, " whitening + Fisher, 4-bit latents")] = (gs, ratio, dict(config, bits=4, **qg))
        if i == 0:
            variants[label(gs, ratio, " whitening + Fisher, 3-bit latents")] = (gs, ratio, dict(config, bits=3, **qg))

    if args.only:
        kinds = set(args.only.split(","))

        def kind(label_):
            return ("unpatched" if label_ == "unpatched" else "svd" if "plain SVD" in label_ else
                    "4bit" if "4-bit" in label_ else "3bit" if "3-bit" in label_ else
                    "uniform" if "uniform ranks" in label_ else "fisher")
        variants = {k: v for k, v in variants.items() if kind(k) in kinds}
    tasks = args.tasks.split(",")
    eval_config = EvalConfig(tasks=tasks, lengths=[int(x) for x in args.lengths.split(",")],
                             depths=[i / max(1, args.depths - 1) for i in range(args.depths)], samples=args.samples,
                             ppl_context=args.ppl_context, ppl_tokens=args.ppl_tokens, progress=False, chat=args.chat)
    retrieval_tasks = [t for t in tasks if t != "ppl"]
    haystack = read_text(eval_config.haystack)
    ppl_config = dataclasses.replace(eval_config, tasks=["ppl"])
    rows, reference = [], {}
    for label_, (gs, ratio, setting) in variants.items():
        if setting is not None:
            kvpress.patch(model, "palu", **setting)
        t = time.time()
        try:
            result = run_eval(model, tokenizer, ppl_config) if "ppl" in tasks else {}
            for task in retrieval_tasks:
                result[task] = retrieval(model, tokenizer, task, eval_config, haystack)
        finally:
            if setting is not None:
                kvpress.unpatch(model)
        row = {"variant": label_, "group_size": gs, "ratio": ratio, "bits": (setting or {}).get("bits"),
               "perplexity": result["ppl"]["perplexity"] if "ppl" in result else None}
        kv = None
        for task in retrieval_tasks:
            r = result[task]
            if setting is None:
                reference[task] = r["scores"]
            row[task] = r["accuracy"]
            row[f"{task}_where_unpatched"] = accuracy_where(reference[task], r["scores"]) if task in reference else None
            row[f"{task}_by_length"] = r["by_length"]
            row[f"{task}_scores"] = [[*cell, value] for cell, value in r["scores"].items()]  # length, depth, sample, score
            longest = max(eval_config.lengths)
            kv = r["cache_bytes"][longest] / r["dense_cache_bytes"][longest]
        row["kv_bytes_vs_dense"] = kv
        if setting is not None:
            config = svd if "plain SVD" in label_ else uniforms[gs, ratio] if "uniform" in label_ else configs[gs, ratio]
            row["kept_rank"] = config.kept_ratio()
        row["seconds"] = round(time.time() - t, 1)
        rows.append(row)
        print(row, flush=True)
        out = {"env": environment(model), "options": vars(args), "calibration_s": round(calibration_s, 1),
               "ranks": {f"gs={gs} ratio={ratio}": c.ranks() for (gs, ratio), c in configs.items()} | {"svd-uniform": svd.ranks()},
               "rows": rows}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=1))

    cols = ["perplexity"] + [f"{t}_where_unpatched" for t in retrieval_tasks] + ["kv_bytes_vs_dense"]
    print("\n| variant | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols]
        print(f"| {r['variant']} | " + " | ".join(cells) + " |")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
