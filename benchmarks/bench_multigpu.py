"""kvpress beyond one GPU (issue #17): capacity with accelerate's device_map, speed with tensor parallelism.

    python benchmarks/bench_multigpu.py --parts tpot --out DIR             # 1 or 2 GPUs
    python benchmarks/bench_multigpu.py --save-checkpoint CKPT             # config only (--weights all: 16 GB)
    torchrun --nproc_per_node 2 benchmarks/bench_multigpu.py --tp --checkpoint CKPT --out DIR
    python benchmarks/bench_multigpu.py --parts maxctx --budget-s 240 --out DIR
    python benchmarks/bench_multigpu.py --smoke                            # CPU: every path, tiny model

A LlamaForCausalLM of Llama-3-8B dimensions (32 layers, 32 query / 8 KV heads of 128) with random
bf16 weights (``common.build_model``), batch 1, variants ``unpatched`` (the model's sdpa,
DynamicCache) and DuoAttention with 50% and 25% of the KV heads as retrieval heads (``duo50``,
``duo25``: random gates, sink 64, recent 256).

maxctx  the longest context that runs (the last prefill chunk of ``--chunk`` tokens and 4 decode
        steps, for real, over a cache filled to that length with random K/V), on one GPU and on two
        (``device_map``: layers 0-15 and the embeddings on GPU 0, layers 16-31 and the head on GPU 1,
        dispatched by accelerate as ``from_pretrained(device_map=...)`` does). Searched on a grid of
        ``--step`` tokens from a guess made of the free memory and the cache's bytes per token;
        within a time budget (``--budget-s``): a search cut short reports the longest length that ran
        and ``complete: false``.
tpot    time per output token at ``--tpot-tokens`` (128K), eager decode, median of ``--steps`` steps,
        on one GPU, with device_map across two, and tensor parallel (``--tp`` under torchrun: every
        rank loads ``--checkpoint`` with ``tp_plan="auto"`` and holds 4 of the 8 KV heads; the weights
        missing from a ``--save-checkpoint`` folder are initialised at random by transformers).

Results in
``--out`` (default benchmarks/results): ``multigpu_<parts>_<device>.json`` (``tpot`` and ``maxctx``
rows of schemes ``single`` and ``device_map``) and ``multigpu_tp_<device>.json`` (``tp2`` rows).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import kvpress
from kvpress.adapters import describe
from kvpress.cache import begin_forward, end_forward, is_kvpress_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

K = 1024
VARIANTS = {"unpatched": None, "duo50": 0.5, "duo25": 0.25}  # name -> fraction of retrieval KV heads
SINK, RECENT = 64, 256
CACHE_ARG: dict = {}  # id(model) -> its forward's cache keyword


def duo_config(frac: float, layers: int, kv_heads: int) -> kvpress.DuoConfig:
    """Random gates (fixed seed), ``frac`` of the model's KV heads retrieval heads."""
    gates = torch.rand(layers, kv_heads, generator=torch.Generator().manual_seed(1))
    return kvpress.DuoConfig(gates=gates, sink=SINK, recent=RECENT, sparsity=1 - frac)


@contextlib.contextmanager
def variant(model, name):
    """``model`` as variant ``name`` inside the block; yields an empty-cache factory."""
    if VARIANTS[name] is None:
        yield lambda: DynamicCache(config=model.config)
        return
    shape = describe(model).shape
    kvpress.patch(model, "duo", duo_config(VARIANTS[name], shape.num_layers, shape.num_kv_heads))
    try:
        yield lambda: kvpress.make_cache(model)
    finally:
        kvpress.unpatch(model)


def layer_devices(model) -> list[torch.device]:
    return [module.q_proj.weight.device for module in describe(model).attention_modules]


def sync(devices) -> None:
    for d in set(devices):
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.inference_mode()
def fill(model, cache, tokens: int, chunk: int) -> None:
    """Append ``tokens`` tokens of random K/V to every layer of ``cache`` on the layer's own device,
    ``chunk`` at a time, through the cache's own updates (what a chunked prefill leaves, without its
    compute; ``common.fill_cache`` for layers on several devices and a rank's local heads)."""
    info = describe(model)
    devices = layer_devices(model)
    kv = {d: torch.randn(1, info.num_kv_heads, chunk, info.shape.head_dim, device=d, dtype=model.dtype)
          for d in set(devices)}
    press = is_kvpress_cache(cache)
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        if press:
            begin_forward(cache, None, 1, n, devices[0])
        for i, d in enumerate(devices):
            held, _ = cache.update(kv[d][:, :, :n], kv[d][:, :, :n], i)
            if press:
                held.write_new()
        if press:
            end_forward(cache)


@torch.inference_mode()
def step(model, cache, tok):
    arg = CACHE_ARG.get(id(model)) or CACHE_ARG.setdefault(id(model), c.cache_argument(model))
    return model(input_ids=tok, **{arg: cache}, use_cache=True, logits_to_keep=1)


def tpot(model, make_cache, tokens: int, steps: int, fill_chunk: int) -> dict:
    """Median seconds of an eager decode step over a cache of ``tokens`` tokens (3 warm-up steps)."""
    devices = layer_devices(model)
    cache = make_cache()
    fill(model, cache, tokens, fill_chunk)
    tok = torch.ones(1, 1, dtype=torch.long, device=devices[0])
    times = []
    for i in range(steps + 3):
        sync(devices)
        t = time.perf_counter()
        step(model, cache, tok)
        sync(devices)
        if i >= 3:
            times.append(time.perf_counter() - t)
    times.sort()
    kv = kvpress.kv_cache_bytes(cache)
    total = kv
    if torch.distributed.is_initialized():
        from kvpress.parallel import total_kv_cache_bytes

        total = total_kv_cache_bytes(cache)
    del cache
    free_memory()
    return {"tokens": tokens, "tpot_ms": times[len(times) // 2] * 1e3, "tpot_p10_ms": times[len(times) // 10] * 1e3,
            "tpot_p90_ms": times[9 * len(times) // 10] * 1e3, "kv_GiB": kv / 2**30, "kv_total_GiB": total / 2**30}


def tpot_rows(model, scheme: str, a) -> list[dict]:
    rows = []
    for name in VARIANTS:
        with variant(model, name) as make_cache:
            tpot(model, make_cache, 4 * K, 2, a.fill_chunk)  # warm-up: kernels compiled, allocator primed
            row = {"scheme": scheme, "variant": name, **tpot(model, make_cache, a.tpot_tokens, a.steps, a.fill_chunk)}
        rows.append(row)
        print(f"tpot {scheme} {name} {a.tpot_tokens // K}K: {row['tpot_ms']:.2f} ms (p10 {row['tpot_p10_ms']:.2f}, "
              f"p90 {row['tpot_p90_ms']:.2f}), KV {row['kv_GiB']:.2f} GiB here, {row['kv_total_GiB']:.2f} GiB in all",
              flush=True)
    return rows


# -- longest context ------------------------------------------------------------------------------------


def fits(model, make_cache, L: int, chunk: int, fill_chunk: int, decode_steps: int = 4) -> bool:
    """Whether a context of ``L`` tokens runs: a cache filled to ``L - chunk`` tokens, then the last
    prefill chunk and ``decode_steps`` decode steps for real. Out of memory on any GPU: False."""
    devices = layer_devices(model)
    cache = out = None
    try:
        cache = make_cache()
        fill(model, cache, L - chunk, fill_chunk)
        ids = torch.randint(0, model.config.vocab_size, (1, chunk), device=devices[0])
        out = step(model, cache, ids)
        for _ in range(decode_steps):
            out = step(model, cache, out.logits[:, -1:].argmax(-1))
        sync(devices)
        return True
    except torch.OutOfMemoryError:
        return False
    except RuntimeError as error:  # an allocation failed outside the caching allocator (cuBLAS, Triton)
        if "out of memory" in str(error).lower() or "ALLOC_FAILED" in str(error):
            return False
        raise
    finally:
        del cache, out  # the output holds the cache too: both go before the memory is released
        free_memory()


def bytes_per_token(model, name: str, chunk: int) -> dict:
    """Bytes one more token of context costs on each device: K/V of the heads that keep every token;
    unpatched, also its prefill chunk's causal mask (``[chunk, T]`` bools, and their bf16 copy in SDPA)
    and one layer's K/V repeated to every query head (transformers' sdpa with a mask) on every device;
    kvpress, the ranks of the ledger (and their mirror on another device)."""
    info = describe(model)
    per_head = 2 * info.shape.head_dim * model.dtype.itemsize  # K and V
    if VARIANTS[name] is None:  # + the chunk's mask, and one layer's K/V repeated to the query heads (repeat_kv)
        heads, extra = [info.num_kv_heads] * info.shape.num_layers, 3 * chunk + info.num_heads * per_head
    else:
        config = duo_config(VARIANTS[name], info.shape.num_layers, info.shape.num_kv_heads)
        heads, extra = config.retrieval_heads().sum(dim=1).tolist(), 8
    per_device: dict = {}
    for d, h in zip(layer_devices(model), heads):
        per_device[d] = per_device.get(d, extra) + h * per_head
    return per_device


def guess_max(model, name: str, chunk: int, step_tokens: int) -> int:
    """Tokens the free memory of each device holds at this variant's bytes per token (less room for
    the last chunk's activations and, for kvpress, its buffers' spare capacity): where the search starts."""
    guesses = []
    for d, per_token in bytes_per_token(model, name, chunk).items():
        # free on the device, plus what torch's allocator keeps cached
        free = torch.cuda.mem_get_info(d)[0] + torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d) \
            if d.type == "cuda" else 2**34
        spare = 1.0 if VARIANTS[name] is None else 1.04  # AppendBuffer grows by 1/16
        guesses.append(int((free - 3 * 2**30) / (per_token * spare)))
    return max(step_tokens, min(guesses) // step_tokens * step_tokens)


def search(probe, guess: int, step_tokens: int, deadline: float, limit: int):
    """The longest multiple of ``step_tokens`` for which ``probe`` holds: galloping from ``guess`` to a
    bracket, then bisection, until ``deadline``. Returns (longest that held (0: none), shortest that
    failed (None: none), whether the two are one step apart)."""
    lo, hi, d = 0, None, step_tokens
    if probe(guess):
        lo = guess
    else:
        hi = guess
    while time.monotonic() < deadline:
        if hi is None:  # gallop up
            nxt = min(lo + d, limit // step_tokens * step_tokens)
            if nxt <= lo:
                break
        elif lo == 0:  # gallop down
            if hi <= step_tokens:
                break
            nxt = max(step_tokens, hi - d)
        elif hi - lo > step_tokens:  # bisect
            nxt = (lo + hi) // 2 // step_tokens * step_tokens
        else:
            break
        if probe(nxt):
            lo = nxt
        else:
            hi = nxt
        d *= 2
    return lo, hi, hi is not None and hi - lo <= step_tokens


def maxctx_rows(model, scheme: str, a, deadline: float, done=lambda rows: None) -> list[dict]:
    """The longest-context search of each variant; ``done(rows)`` after each (a later crash keeps them)."""
    rows = []
    names = a.variants.split(",")
    for i, name in enumerate(names):
        # each variant gets an equal share of the time left, so a slow search cannot starve the others
        share = time.monotonic() + (deadline - time.monotonic()) / (len(names) - i)
        probes = []
        with variant(model, name) as make_cache:

            def probe(L):
                t = time.perf_counter()
                ok = fits(model, make_cache, L, a.chunk, a.fill_chunk)
                probes.append({"tokens": L, "fits": ok, "seconds": round(time.perf_counter() - t, 1)})
                print(f"maxctx {scheme} {name} {L // K}K: {'fits' if ok else 'out of memory'} "
                      f"({time.perf_counter() - t:.1f} s)", flush=True)
                return ok

            guess = min(guess_max(model, name, a.chunk, a.step), a.limit)
            best, failed, complete = search(probe, guess, a.step, share, a.limit)
        rows.append({"scheme": scheme, "variant": name, "max_tokens": best, "first_failed": failed,
                     "complete": complete, "guess": guess, "step": a.step, "chunk": a.chunk, "probes": probes})
        print(f"maxctx {scheme} {name}: {best // K}K tokens{'' if complete else ' (search cut short)'}", flush=True)
        base = next((r["max_tokens"] for r in rows if r["variant"] == "unpatched"), 0)
        for row in rows:
            row["vs_unpatched"] = row["max_tokens"] / base if base else None
        done(rows)
    return rows


# -- schemes ----------------------------------------------------------------------------------------------


def split_across_gpus(model):
    """Dispatch ``model`` over GPUs 0 and 1 as ``from_pretrained(device_map=...)`` does (accelerate):
    the embeddings and the first half of the layers on GPU 0, the rest and the head on GPU 1."""
    from accelerate import dispatch_model

    n = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    device_map.update({f"model.layers.{i}": 0 if i < n // 2 else 1 for i in range(n)})
    return dispatch_model(model, device_map, skip_keys=model._skip_keys_device_placement), device_map


def main_run(a) -> None:
    """One GPU, then (with two) the same model dispatched over both: the parts asked for, each scheme."""
    start = time.monotonic()
    deadline = start + a.budget_s
    dev = "cuda:0" if torch.cuda.is_available() else "cpu"
    model = c.build_model(dev, smoke=a.smoke, max_positions=1 << 24, layers=2 if a.smoke else 32)
    env = c.environment()
    two = torch.cuda.device_count() >= 2
    parts = a.parts.split(",")
    res = {"env": env, "gpus": torch.cuda.device_count(), "parts": parts, "chunk": a.chunk, "fill_chunk": a.fill_chunk,
           "step": a.step, "tpot_tokens": a.tpot_tokens, "steps": a.steps, "sink": SINK, "recent": RECENT,
           "budget_s": a.budget_s, "tpot": [], "maxctx": []}
    out = Path(a.out) / f"multigpu_{'_'.join(parts)}_{c.device_tag(env)}{a.tag}.json"

    def save():
        res["seconds"] = time.monotonic() - start
        c.write_json(out, res)

    schemes = [s for s in a.schemes.split(",") if two or s == "single"]
    for scheme in schemes:
        if scheme == "device_map":
            model, res["device_map"] = split_across_gpus(model)
            free_memory()
        if "tpot" in parts:
            res["tpot"] += tpot_rows(model, scheme, a)
            save()
        if "maxctx" in parts:  # the time left: 2/5 for one GPU, the rest for two (their searches probe longer contexts)
            share = deadline if scheme == schemes[-1] else time.monotonic() + 0.4 * (deadline - time.monotonic())
            before = list(res["maxctx"])
            res["maxctx"] = before + maxctx_rows(model, scheme, a, share,
                                                 done=lambda rows: (res.update(maxctx=before + rows), save()))
            save()
    print(f"wrote {out} ({time.monotonic() - start:.0f} s)")
    if res["tpot"]:
        c.table("TPOT at %dK (ms)" % (a.tpot_tokens // K), res["tpot"],
                [("scheme", "{}"), ("variant", "{}"), ("tpot_ms", "{:.2f}"), ("kv_total_GiB", "{:.2f}")])
    if res["maxctx"]:
        c.table("Longest context that runs", res["maxctx"],
                [("scheme", "{}"), ("variant", "{}"), ("max_tokens", "{}"), ("vs_unpatched", "{:.2f}"), ("complete", "{}")])


def save_checkpoint(a) -> None:
    """The model for the tensor-parallel run: ``--weights all``: every random weight (16 GB at the full
    size); ``none``: the config and one small tensor, from_pretrained initialising the rest at random
    on each rank (its own shard only: seconds)."""
    from safetensors.torch import save_file

    t = time.perf_counter()
    folder = Path(a.save_checkpoint)
    if a.weights == "all":
        c.build_model("cuda:0" if torch.cuda.is_available() else "cpu", smoke=a.smoke, layers=2 if a.smoke else 32).save_pretrained(folder)
    else:
        config = c.llama8b_config(a.smoke, layers=2 if a.smoke else 32)
        config.save_pretrained(folder)
        save_file({"model.norm.weight": torch.ones(config.hidden_size, dtype=torch.bfloat16)},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
    print(f"saved the model ({a.weights} weights) to {folder} in {time.perf_counter() - t:.0f} s", flush=True)


def tp_run(a) -> None:
    """Under torchrun: every rank loads the checkpoint tensor parallel; rank 0 writes the TPOT rows."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    t = time.perf_counter()
    from kvpress.parallel import tensor_parallel_args

    model = AutoModelForCausalLM.from_pretrained(a.checkpoint, dtype=torch.bfloat16, **tensor_parallel_args()).eval()
    model.requires_grad_(False)
    load_s = time.perf_counter() - t
    heads = describe(model).heads
    print(f"rank {heads.rank}/{heads.world_size}: KV heads {list(heads.kv_heads)}, loaded in {load_s:.0f} s", flush=True)
    rows = tpot_rows(model, f"tp{heads.world_size}", a)
    if dist.get_rank() == 0:
        env = c.environment()
        res = {"env": env, "world_size": dist.get_world_size(), "kv_heads_per_rank": len(heads.kv_heads),
               "load_s": load_s, "tpot": rows, "sink": SINK, "recent": RECENT}
        out = Path(a.out) / f"multigpu_tp_{c.device_tag(env)}.json"
        c.write_json(out, res)
        print(f"wrote {out}")
    dist.barrier()
    dist.destroy_process_group()


def markdown_table(folder) -> str:
    """The docs/multigpu.md table from the JSON files in ``folder``."""
    import json

    rows = []
    for path in sorted(Path(folder).glob("multigpu_*.json")):
        res = json.loads(path.read_text())
        rows += [("maxctx", r) for r in res.get("maxctx", [])] + [("tpot", r) for r in res.get("tpot", [])]
    order = {"single": 0, "device_map": 1}
    rows.sort(key=lambda kr: (kr[0] != "maxctx", order.get(kr[1]["scheme"], 2)))
    cell = {}
    for kind, r in rows:
        if kind == "maxctx":
            if not r["max_tokens"]:
                text = f"< {r['first_failed'] // K}K (none that ran found)" if r["first_failed"] else "not measured"
            elif r["complete"]:
                text = f"{r['max_tokens'] // K}K"
            else:  # cut short: what ran, and the shortest that did not
                text = f">= {r['max_tokens'] // K}K" + (f", < {r['first_failed'] // K}K" if r["first_failed"] else "")
            cell[(f"longest context, {r['scheme']}", r["variant"])] = text
        else:
            cell[(f"TPOT at {r['tokens'] // K}K, {r['scheme']}", r["variant"])] = f"{r['tpot_ms']:.1f} ms"
    lines = ["| | " + " | ".join(VARIANTS) + " |", "| --- |" + " --- |" * len(VARIANTS)]
    for label in dict.fromkeys(k for k, _ in cell):
        lines.append(f"| {label} | " + " | ".join(cell.get((label, v), "") for v in VARIANTS) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--checkpoint", default=None, help="--tp: the model to load (written by --save-checkpoint)")
    p.add_argument("--save-checkpoint", default=None, help="write the model for the --tp run here, then exit")
    p.add_argument("--weights", choices=("none", "all"), default="none", help="what --save-checkpoint writes")
    p.add_argument("--tp", action="store_true", help="the tensor-parallel TPOT run (under torchrun)")
    p.add_argument("--parts", default="tpot,maxctx")
    p.add_argument("--tpot-tokens", type=int, default=128 * K)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--chunk", type=int, default=2 * K, help="the last prefill chunk (tokens)")
    p.add_argument("--fill-chunk", type=int, default=64 * K, help="tokens per random-K/V fill update")
    p.add_argument("--step", type=int, default=128 * K, help="resolution of the longest-context search (tokens)")
    p.add_argument("--limit", type=int, default=32 * K * K, help="longest context tried (tokens)")
    p.add_argument("--budget-s", type=float, default=300.0, help="seconds for the whole main run")
    p.add_argument("--schemes", default="single,device_map", help="single (one GPU), device_map (two): which run")
    p.add_argument("--variants", default=",".join(VARIANTS), help="maxctx: the variants searched (unpatched first)")
    p.add_argument("--tag", default="", help="appended to the JSON file's name")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: every path in seconds")
    p.add_argument("--table", default=None, help="print the markdown table of the JSON files in this folder, then exit")
    a = p.parse_args()
    if a.table:
        print(markdown_table(a.table))
        return
    if a.smoke:
        torch.set_num_threads(1)
        a.tpot_tokens, a.steps, a.chunk, a.fill_chunk, a.step, a.limit, a.budget_s = 512, 2, 64, 128, 256, 1024, 60.0
        if not a.tp and a.out == p.get_default("out"):
            import tempfile

            a.out = tempfile.mkdtemp(prefix="kvpress_multigpu_")
    if a.save_checkpoint:
        save_checkpoint(a)
    elif a.tp:
        if not a.checkpoint:
            p.error("--tp loads the model saved by the main run: pass --checkpoint")
        tp_run(a)
    else:
        main_run(a)


if __name__ == "__main__":
    main()
