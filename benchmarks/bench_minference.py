"""MInference sparse prefill on the GPU: one layer shaped like Llama-3-8B, and time to first token.

    python benchmarks/bench_minference.py                          # layer: 8K .. 1M, crossover
    python benchmarks/bench_minference.py --parts layer --lengths 131072 --sweep   # tile sweep
    python benchmarks/bench_minference.py --parts ttft --ttft-lengths 131072,524288
    python benchmarks/bench_minference.py --smoke                  # CPU: tiny, checks the script runs

Layer part: 32 query heads, 8 KV heads, D 128, bf16, batch 1. Dense = torch SDPA causal prefill
(fused kernels) in the same run. MInference = ``sparse_prefill`` exactly as the runtime calls it,
index building included (and timed alone beside): "default" = every head VS (1000, 6096), the
reference's default; "local" = the same index with its diagonals replaced by the 6096 nearest the
main one (one run: the budget's least work, what a head whose attention decays with distance
selects); "mix" = a searched-looking mix of the reference's candidates over the heads
(A-shape (100, 800), VS (30, 800), (100, 750), (500, 700), (3500, 100)). Inputs: random q/k/v with
RoPE and a shared component (attention decays with distance, as in trained models, so diagonals
cluster near the main one) and a few heavy key columns (attention sinks); ``--inputs random``:
plain random tensors (diagonals spread: the worst case for slash ranges). Speed-ups and the
crossover length (shortest measured length from which sparse is faster at every longer length)
go into ``benchmarks/results/minference_layer_<device>.json``. For the VS heads of each variant the
VS kernel is also timed alone (index prepared) beside the work it runs (``kernels.minference.
vs_work``: 64-key tiles per query block, that work over dense causal attention's, TFLOP/s on it).

TTFT part: the 8B-shaped model (random weights), unpatched (SDPA) vs ``kvpress.patch(model,
"minference", min_length=0)`` with the reference default on every head, chunked prefill.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

from kvpress.kernels import minference as M  # noqa: E402
from kvpress.kernels import minference_reference as R  # noqa: E402
from kvpress.methods.minference import MInferenceConfig, plan_heads, sparse_prefill  # noqa: E402

K = 1024
HQ, HKV, D = 32, 8, 128
MIX = [("stream_llm", 100, 800), ("vertical_and_slash", 30, 800), ("vertical_and_slash", 100, 750),
       ("vertical_and_slash", 500, 700), ("vertical_and_slash", 3500, 100)]


def rope(x, theta=500000.0):
    L, d = x.shape[2], x.shape[3]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = torch.arange(L, device=x.device, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos().repeat(1, 2).to(x.dtype), ang.sin().repeat(1, 2).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def inputs(L, dev, dtype, kind, hq=HQ, hkv=HKV, d=D):
    torch.manual_seed(0)
    q = torch.randn(1, hq, L, d, device=dev, dtype=dtype)
    k = torch.randn(1, hkv, L, d, device=dev, dtype=dtype)
    v = torch.randn(1, hkv, L, d, device=dev, dtype=dtype)
    if kind == "rope":
        u = torch.randn(d, device=dev, dtype=dtype) * 0.6
        q.add_(u)
        k.add_(u)
        k[:, :, :: max(1, L // 64)] += 2 * u  # heavy columns: sinks
        q, k = rope(q), rope(k)
    return q.contiguous(), k.contiguous(), v


def elapsed(fn, dev, reps):
    """Median seconds of ``fn`` (CUDA events), after one warm-up call."""
    fn()
    if not c._is_cuda(dev):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def dense(q, k, v, scale):
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    with c.sdpa_kernel([c.SDPBackend.CUDNN_ATTENTION, c.SDPBackend.FLASH_ATTENTION], set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def configs(hq):
    return {"default": MInferenceConfig(patterns=[{}]),  # every head: the reference's VS (1000, 6096)
            "local": MInferenceConfig(patterns=[{}]),  # the same, diagonals replaced by the nearest 6096
            "mix": MInferenceConfig(patterns=[{h: MIX[h % len(MIX)] for h in range(hq)}])}


def vs_index(plan, q, k, rank, scale, local):
    """The VS index that ``sparse_prefill`` builds for ``plan``'s VS heads; ``local``: its diagonals
    replaced by the nearest ones (offsets 0, 1, ...: one run, the budget's least work)."""
    heads = torch.tensor(plan.vs, device=q.device)
    sizes = [torch.ones(q.shape[1], dtype=torch.long, device=q.device) for _ in range(2)]
    for size, values in zip(sizes, plan.vs_sizes):
        size[heads] = torch.tensor(values, device=q.device)
    vertical, slash = R.vs_index(q, k, rank, rank, scale, sizes[0], sizes[1], heads=heads)
    if local:
        n = torch.arange(slash.shape[-1], device=q.device, dtype=slash.dtype)
        slash = torch.where(slash < R.SENTINEL, n, slash)
    return heads, vertical, slash


def vs_kernel_stats(name, plan, q, k, v, rank, scale, dev, reps, local=False):
    """Time of the VS kernel alone (index prepared) and the work it really does: 64-key tiles run
    per query block (diagonal ranges cut into tiles + gathered columns) and TFLOP/s on those tiles."""
    heads, vertical, slash = vs_index(plan, q, k, rank, scale, local)
    prep = M.vs_prepare(rank, rank, vertical, slash)
    work = M.vs_work(prep)
    out = torch.empty_like(q)
    t_prep = elapsed(lambda: M.vs_prepare(rank, rank, vertical, slash), dev, reps)
    t_kernel = elapsed(lambda: M.vs_attention(q, k, v, rank, rank, vertical, slash, scale, heads=heads, out=out,
                                              plan=prep), dev, reps)
    tiles = work["diagonal_tiles"] + work["column_tiles"]
    blocks = max(1, work["query_blocks"])
    d, L = q.shape[-1], q.shape[2]
    causal = len(plan.vs) * L * (L + 1) / 2  # (query, key) pairs of dense causal attention
    stats = {"kernel_ms": t_kernel * 1e3, "prepare_ms": t_prep * 1e3,
             "keys_per_qblock": M.BLOCK_N * tiles / blocks,
             "useful_keys_per_qblock": (work["diagonal_keys"] + M.BLOCK_N * work["column_tiles"]) / blocks,
             "budget_keys": sum(a + b for a, b in zip(*plan.vs_sizes)) / len(plan.vs),
             "work_vs_dense": 64 * M.BLOCK_N * tiles / causal,
             "kernel_tflops": 4 * d * 64 * M.BLOCK_N * tiles / t_kernel / 1e12}
    if not local:
        runs = M.slash_runs(slash)[0]
        stats["slash_runs_mean"] = float((runs < R.SENTINEL).sum(-1).float().mean())
    return {f"{name}_vs_{key}" if key not in ("slash_runs_mean",) else f"{name}_{key}": value
            for key, value in stats.items()}


def layer_rows(lengths, dev, dtype, kind, variants, reps, shape=(HQ, HKV, D)):
    hq, hkv, d = shape
    scale = d ** -0.5
    use_triton = c._is_cuda(dev)
    rows = []
    for L in lengths:
        q, k, v = inputs(L, dev, dtype, kind, hq, hkv, d)
        rank = torch.arange(L, device=dev, dtype=torch.int32)[None]
        reps_L = reps if L <= 256 * K else 2
        t_dense = elapsed(lambda: dense(q, k, v, scale), dev, reps_L)
        row = {"tokens": L, "inputs": kind, "dense_ms": t_dense * 1e3,
               "dense_tflops": 2 * 2 * hq * d * L * (L + 1) / 2 / t_dense / 1e12}
        for name in variants:
            plan = plan_heads(configs(hq)[name], 0, list(range(hq)), L)
            local = name == "local"
            if local:  # index built as at run time, then the kernel under the local diagonals
                out = torch.empty_like(q)

                def run():
                    heads, vertical, slash = vs_index(plan, q, k, rank, scale, True)
                    if use_triton:
                        return M.vs_attention(q, k, v, rank, rank, vertical, slash, scale, heads=heads, out=out)
                    return R.vs_attention(q, k, v, rank, rank, vertical, slash, scale)
            else:
                def run():
                    return sparse_prefill(plan, q, k, v, rank, rank, scale, use_triton=use_triton)
            t = elapsed(run, dev, reps_L)
            t_index = elapsed(lambda: vs_index(plan, q, k, rank, scale, False), dev, reps_L) if plan.vs else 0.0
            row.update({f"{name}_ms": t * 1e3, f"{name}_index_ms": t_index * 1e3, f"{name}_speedup": t_dense / t})
            if plan.vs:
                row.update(vs_kernel_stats(name, plan, q, k, v, rank, scale, dev, reps_L, local))
        rows.append(row)
        print("layer " + ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                                   for key, value in row.items()), flush=True)
        del q, k, v
        c._empty_cache(dev)
    return rows


def crossover(rows, name):
    """Shortest measured length from which ``name`` is faster than dense at every longer length."""
    best = None
    for row in sorted(rows, key=lambda r: -r["tokens"]):
        if row[f"{name}_speedup"] <= 1.0:
            break
        best = row["tokens"]
    return best


def sweep_rows(L, dev, dtype, kind):
    rows = []
    defaults = M.NUM_WARPS, M.NUM_STAGES
    for warps in (4, 8):
        for stages in (1, 2, 3, 4):
            M.NUM_WARPS, M.NUM_STAGES = warps, stages
            try:
                row = layer_rows([L], dev, dtype, kind, ["default"], 5)[0]
            except Exception as error:  # noqa: BLE001 (a tile setting the GPU refuses: out of shared memory)
                print(f"sweep warps {warps} stages {stages}: {error}")
                continue
            rows.append({"num_warps": warps, "num_stages": stages, **row})
    M.NUM_WARPS, M.NUM_STAGES = defaults
    return rows


def ttft_rows(dev, lengths, chunk, smoke):
    model = c.build_model(dev, smoke=smoke)

    def variant(model, name):
        if name == "minference":
            return c.kvpress_variant(model, "minference", min_length=0)
        return c.baseline_variant(model, name)

    return c.e2e_rows(model, dev, lengths, ["unpatched", "minference"], variant, chunk, new_tokens=3,
                      warmup_tokens=min(4 * K, lengths[0]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="layer", help="comma-separated: layer, ttft")
    p.add_argument("--lengths", default="8192,16384,24576,32768,65536,131072,262144,524288,1048576")
    p.add_argument("--variants", default="default,local,mix")
    p.add_argument("--inputs", default="rope", choices=["rope", "random"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="also sweep the VS kernel's warps / stages at the first length")
    p.add_argument("--ttft-lengths", default="131072,524288")
    p.add_argument("--chunk", type=int, default=131072, help="prefill chunk of the ttft part (tokens)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script, times mean nothing)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    parts = args.parts.split(",")
    env = c.environment()
    result = {"env": env, "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": str(dtype)},
              "tiles": {"num_warps": M.NUM_WARPS, "num_stages": M.NUM_STAGES}}
    if "layer" in parts:
        lengths = [256, 512] if args.smoke else [int(x) for x in args.lengths.split(",")]
        shape = (4, 2, 32) if args.smoke else (HQ, HKV, D)
        variants = args.variants.split(",")
        rows = layer_rows(lengths, dev, dtype, args.inputs, variants, args.reps, shape)
        result["layer"] = rows
        result["crossover_tokens"] = {name: crossover(rows, name) for name in variants}
        c.table("one layer: dense SDPA vs MInference (index building included)", rows,
                [("tokens", "{:d}"), ("dense_ms", "{:.2f}")] + [(f"{n}_{x}", "{:.2f}") for n in variants
                                                                  for x in ("ms", "index_ms", "speedup")])
        c.table("VS kernel alone: the work it runs (64-key tiles) and its throughput", rows,
                [("tokens", "{:d}"), ("dense_tflops", "{:.0f}")] + [
                    (f"{n}_vs_{x}", f) for n in variants for x, f in (
                        ("kernel_ms", "{:.2f}"), ("keys_per_qblock", "{:.0f}"), ("work_vs_dense", "{:.3f}"),
                        ("kernel_tflops", "{:.0f}"))])
        print("crossover (tokens):", result["crossover_tokens"])
        if args.sweep and not args.smoke:
            result["sweep"] = sweep_rows(lengths[0], dev, dtype, args.inputs)
    if "ttft" in parts:
        lengths = [512] if args.smoke else [int(x) for x in args.ttft_lengths.split(",")]
        result["ttft"] = ttft_rows(dev, lengths, 256 if args.smoke else args.chunk, args.smoke)
    out = args.out or Path(__file__).resolve().parent / "results" / f"minference_{'_'.join(parts)}_{c.device_tag(env)}.json"
    if not args.smoke or args.out:
        c.write_json(out, result)
        print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
