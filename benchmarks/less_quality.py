"""LESS quality on the project's test model (CPU, minutes): perplexity gap recovered and retrieval.

For each policy (Lambda: sinks + recent window; H2O: heavy hitters + recent window) at a budget
where the policy alone clearly loses quality, rows: the unpatched model, the policy alone,
"Baseline+" (the policy with as many extra tokens as the state's memory), LESS with untrained
(random) maps and LESS with maps trained here (``--maps``: one or more sizes, each trained layer by layer on
activations captured once per policy; or ``--trained-lambda/--trained-h2o DIR``). Columns: held-out perplexity per byte, the share of the
policy's perplexity gap recovered, passkey retrieval accuracy with the real runtime
(``kvpress.patch(model, "less", ...)`` + ``generate``), KV cache bytes.

Perplexity is teacher-forced over whole windows through the decode-by-decode simulation
(``less_reference.simulate``: every position sees what a decode step at that position sees; the
run checks it against the runtime's decode on one window and reports the largest logit gap).

    python benchmarks/less_quality.py --out benchmarks/results/less_quality_needle_llama.json
    python benchmarks/less_quality.py --device cuda --train-samples 256 --maps r8h128,q-r8h512 ...  (H200, ~1 min)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kvpress
from kvpress.adapters import describe
from kvpress.calibration.less import (Activations, LessTraining, bytes_per_layer_sample, capture_group, free_bytes,
                                     spill_budget, text_windows, train_layer)
from kvpress.kernels import less_reference as R
from kvpress.methods.less import Less, LessConfig, simulated



def register() -> None:
    """Make ``kvpress.patch(model, "less")`` available even where the registry does not list it yet."""
    from kvpress.methods import METHODS

    METHODS.setdefault("less", Less)


@torch.no_grad()
def window_nll(model, windows, config: LessConfig | None, skip: int) -> torch.Tensor:
    """Mean NLL per token of each window ``[W]``, over the positions from ``skip`` on (every variant must
    use the same ``skip``, the policy's budget: before it nothing is evicted and all variants agree).
    Windows go in batches of at most ~512 MiB of logits (the policy's eviction loop runs once per batch)."""
    ids = torch.cat(windows)
    per = max(1, 2**27 // (ids.shape[1] * model.config.vocab_size))
    out = []
    for start in range(0, ids.shape[0], per):
        batch = ids[start : start + per]
        with simulated(model, config):
            logits = model(batch, use_cache=False).logits[:, :-1].float()
        losses = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none").view(batch.shape[0], -1)
        out.append(losses[:, skip:].mean(dim=1))
    return torch.cat(out)


def heldout_windows(tokenizer, count: int, length: int) -> list[torch.Tensor]:
    """``count`` disjoint windows of ``length`` tokens (BOS first when the tokenizer adds one), evenly
    spaced over the held-out corpus (never seen in training)."""
    from kvpress.eval.tasks import load_corpus

    prefix = tokenizer.encode("", add_special_tokens=True)
    ids = tokenizer.encode(load_corpus("heldout"), add_special_tokens=False, verbose=False)
    body = length - len(prefix)
    if count * body > len(ids):
        raise ValueError(f"the held-out corpus has {len(ids)} tokens: at most {len(ids) // body} windows of {length}")
    step = len(ids) // count
    return [torch.tensor([prefix + ids[i * step : i * step + body]]) for i in range(count)]


def perplexity(nll: torch.Tensor) -> float:
    """exp of the mean NLL over windows (all windows have the same length)."""
    return math.exp(nll.mean().item())


def gap_recovered(nll: torch.Tensor, only: torch.Tensor, full: torch.Tensor) -> tuple[float, float]:
    """Share of the policy's perplexity gap won back, and its standard error over windows (paired:
    a delta-method estimate from the per-window NLLs, ``std / sqrt(W)`` of the per-window shares'
    linearisation)."""
    p, o, f = (math.exp(x.mean().item()) for x in (nll, only, full))
    share = (o - p) / (o - f)
    # d share / d mean-NLL of each variant, then the per-window linearised share
    lin = (o * (only - only.mean()) * (1 / (o - f) - (o - p) / (o - f) ** 2)
           - p * (nll - nll.mean()) / (o - f) + f * (full - full.mean()) * (o - p) / (o - f) ** 2)
    return share, (lin.std() / math.sqrt(len(nll))).item() if len(nll) > 1 else float("nan")


@torch.no_grad()
def runtime_gap(model, ids, config: LessConfig, prompt: int) -> float:
    """Largest |logit| difference between the runtime (prefill ``prompt`` tokens, then decode token by
    token) and the simulation started at the same point."""
    with simulated(model, config):
        ref = model(ids, use_cache=False).logits[0, prompt - 1 : -1].float()
    kvpress.patch(model, "less", config=config)
    try:
        cache = kvpress.make_cache(model)
        out = [model(ids[:, :prompt], cache=cache).logits[0, -1:]]
        for i in range(prompt, ids.shape[1] - 1):
            out.append(model(ids[:, i : i + 1], cache=cache).logits[0, -1:])
    finally:
        kvpress.unpatch(model)
    return (torch.cat(out).float() - ref).abs().max().item()


def retrieval(model, tokenizer, config: LessConfig | None, lengths, depths, samples, chat: bool = False) -> dict:
    from kvpress.eval.cli import EvalConfig, run_eval

    eval_config = EvalConfig(tasks=["passkey"], lengths=lengths, depths=depths, samples=samples, progress=False, chat=chat)
    if config is not None:
        kvpress.patch(model, "less", config=config)
    try:
        result = run_eval(model, tokenizer, eval_config)["passkey"]
    finally:
        if config is not None:
            kvpress.unpatch(model)
    return {"accuracy": result["accuracy"], "cache_bytes": result["cache_bytes"], "dense_cache_bytes": result["dense_cache_bytes"]}


def parse_maps(spec: str) -> dict:
    """``r8h128`` -> rank 8, hidden 128, one state per KV head; ``q-r8h128``: one state per query head."""
    heads = "query" if spec.startswith("q-") else "kv"
    body = spec[2:] if heads == "query" else spec
    try:
        rank, hidden = body[1:].split("h")
        assert body[0] == "r"
        return dict(rank=int(rank), hidden=int(hidden), state_heads=heads)
    except (ValueError, AssertionError, IndexError):
        raise ValueError(f"bad --maps entry {spec!r}: write rRANKhHIDDEN, e.g. r8h128, or q-r8h128 for a state per query head") from None


def train_maps(model, tokenizer, base: LessConfig, specs: list[str], training: LessTraining, work: Path, log) -> dict:
    """Capture every layer's activations once for ``base``'s policy, then train the maps of each
    spec on them (``calibration.less.train_layer``, layer by layer). Yields (spec, (config, losses))
    as each is trained."""
    info = describe(model)
    shape = info.shape
    device = next(model.parameters()).device
    windows = list(text_windows(tokenizer, training.samples, training.length, training.seed))
    itemsize = torch.finfo(torch.float32).bits // 8
    needed = shape.num_layers * training.samples * bytes_per_layer_sample(shape, training.length, itemsize)
    if needed > spill_budget(work / "spill", float("inf"), training.in_memory):
        raise ValueError(f"the activations of every layer take {needed / 1e9:.1f} GB, more than 90% of the "
                         f"{free_bytes(work) / 1e9:.1f} GB free under {work}; free disk space, point --work "
                         "elsewhere, or lower --train-samples")
    store = Activations(work / "spill", training.in_memory, device)
    t0 = time.perf_counter()
    capture_group(model, info, list(range(shape.num_layers)), windows, base, store, torch.float32, False,
                  training.capture_batch)
    log(f"{base.policy}: captured {training.samples} x {training.length} tokens in {time.perf_counter() - t0:.0f} s")
    for spec in specs:
        t0 = time.perf_counter()
        config = LessConfig(**{**base.fields_dict(), **parse_maps(spec)})
        layers, losses = [], {}
        for layer in range(shape.num_layers):
            with torch.enable_grad():
                w, loss = train_layer(info.attention_modules[layer], store, config, shape, training, device, False)
            layers.append(w.to(device="cpu"))
            losses[layer] = {k: v for k, v in loss.items() if k != "history"}
        ratios = " ".join(f"{v['mse_less'] / v['mse_sparse']:.2f}" for v in losses.values())
        log(f"{base.policy} {spec}: trained in {time.perf_counter() - t0:.0f} s; held-out MSE LESS / sparse per layer: {ratios}")
        yield spec, (LessConfig(**{**config.fields_dict(), "layers": layers, "model_shape": shape}), losses)
    store.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/needle-llama")
    parser.add_argument("--policies", default="lambda,h2o")
    parser.add_argument("--sink", type=int, default=4, help="Lambda's sinks (tokens)")
    parser.add_argument("--recent", type=int, default=60, help="Lambda's recent window; H2O splits sink+recent "
                        "evenly between heavy hitters and its window")
    parser.add_argument("--maps", default="r8h128", help="comma-separated map sizes to train: rRANKhHIDDEN "
                        "(q-rRANKhHIDDEN: a state per query head); each gets its own row and Baseline+")
    parser.add_argument("--train-samples", type=int, default=16)
    parser.add_argument("--train-length", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--halve-every", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-3, help="(the reference's 1e-3 needs ~10x more steps)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--capture-batch", type=int, default=8)
    parser.add_argument("--trained-lambda", help="trained LESS config folders (comma-separated) for the Lambda rows "
                        "(skips training)")
    parser.add_argument("--trained-h2o", help="the same for the H2O rows")
    parser.add_argument("--save-maps", help="write each trained config folder under this folder (POLICY-SPEC)")
    parser.add_argument("--train-only", action="store_true", help="train and --save-maps, no evaluation (evaluate "
                        "later, elsewhere, with --trained-POLICY)")
    parser.add_argument("--eval-windows", type=int, default=6)
    parser.add_argument("--eval-length", type=int, default=1024)
    parser.add_argument("--passkey-lengths", default="1024")
    parser.add_argument("--passkey-depths", default="0.2,0.5,0.8")
    parser.add_argument("--passkey-samples", type=int, default=1)
    parser.add_argument("--chat", action="store_true", help="passkey prompts in the chat template (instruction models)")
    parser.add_argument("--spill", action="store_true", help="captured activations go to --work on disk, "
                        "not memory (a 30-layer model)")
    parser.add_argument("--work", default="/tmp/kvpress_less_quality", help="where activations spill (CPU)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (the model stays fp32; captured activations stay in its memory)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.train_only and not args.save_maps:
        parser.error("--train-only needs --save-maps DIR (where the trained maps go)")
    if args.threads:
        torch.set_num_threads(args.threads)
    register()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()

    def log(text):
        print(f"[{time.perf_counter() - started:5.0f} s] {text}", flush=True)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    shape = describe(model).shape
    windows = [w.to(args.device) for w in heldout_windows(tokenizer, args.eval_windows, args.eval_length)]
    total = args.sink + args.recent
    specs = [s for s in args.maps.split(",") if s]
    for spec in specs:
        parse_maps(spec)
    policies = {
        "lambda": LessConfig(policy="lambda", sink=args.sink, heavy=0, recent=args.recent),
        "h2o": LessConfig(policy="h2o", sink=0, heavy=total // 2, recent=total - total // 2),
    }
    policies = {name: policies[name] for name in args.policies.split(",")}
    training = LessTraining(samples=args.train_samples, length=args.train_length, epochs=args.epochs,
                            halve_every=args.halve_every, lr=args.lr, batch_size=args.batch_size,
                            val_fraction=args.val_fraction, capture_batch=args.capture_batch,
                            in_memory=not args.spill, spill_gb=1e9)
    lengths = [int(x) for x in args.passkey_lengths.split(",")]
    depths = [float(x) for x in args.passkey_depths.split(",")]
    skip = total  # every variant is scored from the policies' budget on (before it nothing is evicted)
    full_nll = window_nll(model, windows, None, skip)
    full_ppl = perplexity(full_nll)
    rows = {"full (unpatched)": {"ppl": full_ppl, "window_ppl": full_nll.exp().tolist(),
                                 **retrieval(model, tokenizer, None, lengths, depths, args.passkey_samples, args.chat)}}
    log(f"full: ppl {full_ppl:.4f}")
    checks, losses = {}, {}

    def write():
        longest = max(lengths)
        lines = ["| variant | ppl (held-out, per token) | gap recovered | passkey | KV bytes at %d |" % longest,
                 "|---|---|---|---|---|"]
        for label, row in rows.items():
            gap, se = row.get("gap_recovered"), row.get("gap_recovered_se")
            gap = "" if gap is None else f"{gap:.0%}" + ("" if not se or math.isnan(se) else f" ± {se:.0%}")
            lines.append(f"| {label} | {row['ppl']:.4f} | {gap} | {row['accuracy']:.0%} | "
                         f"{row['cache_bytes'][longest] / 1024:.0f} KiB |")
        table = "\n".join(lines)
        if args.out:
            payload = {"args": vars(args), "rows": rows, "table": table, "training_losses": losses,
                       "runtime_vs_simulation_max_logit_gap": checks, "torch": torch.__version__,
                       "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                       "seconds": time.perf_counter() - started}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(payload, indent=1, default=str) + "\n")
        return table

    def add(label, config, only=None):
        nll = window_nll(model, windows, config, skip)
        rows[label] = {"ppl": perplexity(nll), "window_ppl": nll.exp().tolist(),
                       **retrieval(model, tokenizer, config, lengths, depths, args.passkey_samples, args.chat)}
        if only is not None and perplexity(only) != full_ppl:
            rows[label]["gap_recovered"], rows[label]["gap_recovered_se"] = gap_recovered(nll, only, full_nll)
        log(f"{label}: ppl {rows[label]['ppl']:.4f} gap recovered {rows[label].get('gap_recovered', 0):.3f} "
            f"passkey {rows[label]['accuracy']:.2f}")
        write()
        return nll

    for name, base in policies.items():
        trained_dir = getattr(args, f"trained_{name}")
        if trained_dir:
            loaded = [LessConfig.load(folder) for folder in trained_dir.split(",")]
            trained = iter([(f"r{c.rank}h{c.hidden}" if c.state_heads == "kv" else f"q-r{c.rank}h{c.hidden}", (c, None))
                            for c in loaded])
        else:
            trained = train_maps(model, tokenizer, base, specs, training, Path(args.work), log)
        if not args.train_only:
            only = add(f"{name} only", LessConfig.random(shape, **{**base.fields_dict(), "state": False}), None)
            rows[f"{name} only"]["gap_recovered"] = 0.0
            add(f"LESS {name}, untrained maps", LessConfig.random(shape, **base.fields_dict()), only)
        done_plus = set()
        for spec, (config, loss) in trained:  # each spec saved and evaluated as soon as it is trained
            label = f"LESS {name}, trained {spec}"
            losses[label] = loss
            if args.save_maps:
                config.save(Path(args.save_maps) / f"{name}-{spec}")
            if args.train_only:
                log(f"saved {name}-{spec}")
                write()
                continue
            per_kv = shape.num_heads // shape.num_kv_heads if config.state_heads == "query" else 1
            extra = R.tokens_of_state(shape.head_dim, config.rank, 4, per_kv)
            if extra not in done_plus:
                done_plus.add(extra)
                plus = dict(recent=base.recent + extra) if name == "lambda" else dict(heavy=base.heavy + extra)
                add(f"{name} Baseline+ (+{extra} tokens)",
                    LessConfig.random(shape, **{**base.fields_dict(), **plus, "state": False}), only)
            add(label, config, only)
            rows[label]["baseline_plus_tokens"] = extra
            checks[label] = runtime_gap(model, windows[0][:, :256], config, prompt=base.budget.budget)
            write()
    print(write())
    print("runtime decode vs simulation, largest logit gap:", checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
