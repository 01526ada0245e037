"""Palu quality: perplexity and passkey retrieval of the unpatched model next to Palu made several
ways, on needle-llama (the project's test model) or SmolLM2-135M-Instruct (the real-model test bed).

    python benchmarks/palu_quality.py [--model models/needle-llama] [--group-size 4] [--ratio 0.5]
    python benchmarks/palu_quality.py --model smollm2 --chat --group-size 1 --tasks ppl,passkey
    python benchmarks/palu_quality.py --frontier 1:0.25,1:0.5,1:0.75,2:0.5,4:0.5 --device cuda

Rows at the main setting (``--group-size``, ``--ratio``): unpatched; plain SVD with uniform ranks
(no data); whitening + Fisher rank allocation (the paper's Palu), with latents in the model's dtype
and at 4 and 3 bits (Hadamard-rotated). ``--frontier gs:ratio,...`` adds whitening + Fisher rows
(and 4-bit) at other group sizes and ratios (the quality side of ``bench_palu.py layer``); one
statistics pass serves every setting. Perplexity is measured on the bundled held-out text, retrieval
on passkeys at a grid of lengths and depths (``kvpress.eval``); ``passkey_where_unpatched`` is the
accuracy over the cells the unpatched model gets right (small models retrieve only some cells). The
KV cache bytes are the cache's real tensors after answering. Decode runs the reference path
(``KVPRESS_KERNELS=reference`` unless set): the numbers are the method's, the kernel's own
agreement with it is what ``tests/test_palu_kernels.py`` checks.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KVPRESS_KERNELS", "reference")


import kvpress  # noqa: E402
from kvpress.calibration.palu import PaluCalibration, calibrate_palu, calibration_batches, collect_statistics  # noqa: E402
from kvpress.eval.cli import EvalConfig, environment, load_model, run_eval  # noqa: E402
from kvpress.methods import METHODS  # noqa: E402
from kvpress.methods.palu import Palu  # noqa: E402
from kvpress.testbed import smollm2_path  # noqa: E402

METHODS.setdefault("palu", Palu)


def parse_frontier(text: str) -> list[tuple[int, float]]:
    out = []
    for item in filter(None, text.split(",")):
        gs, ratio = item.split(":")
        out.append((int(gs), float(ratio)))
    return out


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
    parser.add_argument("--only", default="", help="comma-separated kinds to run: unpatched, svd, fisher, 4bit, 3bit "
                        "(default all; the frontier settings get fisher and 4bit)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/palu_quality_<model>.json")
    args = parser.parse_args()

    path = str(smollm2_path()) if args.model == "smollm2" else args.model
    name = "smollm2" if args.model == "smollm2" else Path(args.model).name.replace("-", "_")
    out_path = Path(args.out or f"benchmarks/results/palu_quality_{name}.json")
    model, tokenizer = load_model(path, args.device, args.dtype)
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
    configs = {}
    for gs, ratio in settings:
        configs[gs, ratio] = calibrate_palu(model, tokenizer, folder / f"palu_{gs}_{ratio}", PaluCalibration(
            ratio=ratio, group_size=gs, multiple=multiple(gs), **common), progress=False, stats=stats)
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
        variants[label(gs, ratio, " whitening + Fisher, 4-bit latents")] = (gs, ratio, dict(config, bits=4, **qg))
        if i == 0:
            variants[label(gs, ratio, " whitening + Fisher, 3-bit latents")] = (gs, ratio, dict(config, bits=3, **qg))

    if args.only:
        kinds = set(args.only.split(","))

        def kind(label_):
            return ("unpatched" if label_ == "unpatched" else "svd" if "plain SVD" in label_ else
                    "4bit" if "4-bit" in label_ else "3bit" if "3-bit" in label_ else "fisher")
        variants = {k: v for k, v in variants.items() if kind(k) in kinds}
    tasks = args.tasks.split(",")
    eval_config = EvalConfig(tasks=tasks, lengths=[int(x) for x in args.lengths.split(",")],
                             depths=[i / max(1, args.depths - 1) for i in range(args.depths)], samples=args.samples,
                             ppl_context=args.ppl_context, ppl_tokens=args.ppl_tokens, progress=False, chat=args.chat)
    retrieval = [t for t in tasks if t != "ppl"]
    rows, reference_cells = [], {}
    for label_, (gs, ratio, setting) in variants.items():
        if setting is not None:
            kvpress.patch(model, "palu", **setting)
        t = time.time()
        result = run_eval(model, tokenizer, eval_config)
        kv = None
        if setting is not None:
            kvpress.unpatch(model)
        row = {"variant": label_, "group_size": gs, "ratio": ratio, "bits": (setting or {}).get("bits"),
               "perplexity": result["ppl"]["perplexity"] if "ppl" in result else None}
        for task in retrieval:
            r = result[task]
            cells = [(e["length"], e["depth"], i) for i, e in enumerate(r["examples"])]
            scores = {cell: e["score"] for cell, e in zip(cells, r["examples"])}
            if setting is None:
                reference_cells[task] = [cell for cell, s in scores.items() if s > 0.5]
            kept = reference_cells.get(task, [])
            row[task] = r["accuracy"]
            row[f"{task}_where_unpatched"] = sum(scores[c] for c in kept) / len(kept) if kept else None
            row[f"{task}_by_length"] = r["by_length"]
            longest = max(eval_config.lengths)
            kv = r["cache_bytes"][longest] / r["dense_cache_bytes"][longest]
        row["kv_bytes_vs_dense"] = kv
        if setting is not None:
            config = configs.get((gs, ratio)) if "plain SVD" not in label_ else svd
            row["kept_rank"] = config.kept_ratio()
        row["seconds"] = round(time.time() - t, 1)
        rows.append(row)
        print(row, flush=True)
        out = {"env": environment(model), "options": vars(args), "calibration_s": round(calibration_s, 1),
               "ranks": {f"gs={gs} ratio={ratio}": c.ranks() for (gs, ratio), c in configs.items()} | {"svd-uniform": svd.ranks()},
               "rows": rows}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=1))

    cols = ["perplexity"] + [f"{t}_where_unpatched" for t in retrieval] + ["kv_bytes_vs_dense"]
    print("\n| variant | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols]
        print(f"| {r['variant']} | " + " | ".join(cells) + " |")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
