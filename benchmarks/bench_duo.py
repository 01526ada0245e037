"""DuoAttention speed and memory: per-layer kernels and an 8B-shaped model end to end.

    python benchmarks/bench_duo.py --parts layer,e2e,tpot,maxctx     # on a CUDA GPU
    python benchmarks/bench_duo.py --smoke                           # every part, tiny shapes, CPU too

Timing, the environment record, the 8B-shaped model and the e2e / tpot / maxctx runners are
``benchmarks/common.py``'s (shared by every method's benchmark); this script adds Duo's cases.

Parts (each compares against dense attention measured in the same run):
  layer  decode attention of one layer (one query token) over 32K/128K/512K cached tokens with 25%
         and 50% retrieval heads vs dense SDPA decode (and, when kvpress has the ``dense`` method,
         its decode kernel over the full cache: ``dense_kvpress_*``), next to the bytes-read bound
         (kept cache bytes / device copy bandwidth measured here) and the time of a plain read of
         as many bytes; streaming-head (A-shape) prefill at 32K/128K vs dense SDPA causal prefill;
         shapes of Llama-3-8B (32 q / 8 KV heads) and of an MHA model (32 / 32), head dim 128,
         bf16. Kernel tile settings are swept first and the best used. (``floor``: the plain reads
         alone.)
  e2e    a LlamaForCausalLM with Llama-3-8B dimensions (32 layers) and random bf16 weights: chunked
         prefill, then time per output token and peak memory at 32K and 128K, unpatched (the
         model's own sdpa, DynamicCache) vs kvpress dense (when registered) vs Duo (25% / 50%
         retrieval heads).
  tpot   time per output token of those variants at 8K/32K/128K, measured interleaved (rounds of
         one decode step per variant), so that a host whose speed drifts affects all alike.
  maxctx the longest context that runs on the GPU for each variant, searched by real runs of the
         last prefill chunk and a few decode steps over a cache filled to that length.
Writes ``benchmarks/results/duo_<part>_<device>.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import kvpress
from kvpress import kernels
from kvpress.kernels import decode as decode_mod
from kvpress.kernels import prefill as prefill_mod

import common
from common import D, K, bench, build_model, copy_bandwidth, environment, graph_time, rand, read_floor_rows

SINK, RECENT = 64, 256
SHAPES = {"gqa": (32, 8), "mha": (32, 32)}  # (query heads, KV heads), Llama-3-8B and Llama-2-7B


def head_split(hkv, frac):
    """Retrieval KV heads (a fixed spread-out choice) and streaming KV heads for a fraction."""
    r = round(frac * hkv)
    order = torch.randperm(hkv, generator=torch.Generator().manual_seed(0))
    return order[:r].sort().values, order[r:].sort().values


# ----------------------------------------------------------------------------------------------
# decode


def has_dense_kernel():
    """Whether kvpress has the dense method and its grouped-attention kernel entry."""
    return "dense" in kvpress.METHODS and hasattr(kernels, "grouped_attention")


def dense_group(k, v):
    """The dense method's cache of one layer as its kernel sees it: one group of every KV head
    keeping every token (``kvpress.cache.HeadGroup``, window None)."""
    from kvpress.cache import HeadGroup

    B, hkv, T, _ = k.shape
    rank = torch.arange(T, device=k.device, dtype=torch.int32)[None].expand(B, T)
    return HeadGroup(heads=torch.arange(hkv, device=k.device), k=k, v=v, rank=rank)


def decode_case(T, hq, hkv, frac, dev, cap_extra=1024):
    """Inputs of one decode step as the Duo runtime makes them: full K/V are views of a larger
    buffer; the stream buffer is the kept window (sinks + recent) ++ the new token."""
    rh, sh = head_split(hkv, frac)
    R, S = len(rh), len(sh)
    fk = rand(1, R, T + cap_extra, D, dev=dev)[:, :, :T]
    fv = rand(1, R, T + cap_extra, D, dev=dev)[:, :, :T]
    full_rank = torch.arange(T, device=dev, dtype=torch.int32)[None]
    stream_rank = torch.cat([torch.arange(SINK), torch.arange(T - 1 - RECENT, T)]).int().to(dev)[None]
    C = stream_rank.shape[1]
    sk, sv = rand(1, S, C, D, dev=dev), rand(1, S, C, D, dev=dev)
    q = rand(1, hq, 1, D, dev=dev)
    q_rank = torch.tensor([[T - 1]], device=dev, dtype=torch.int32)
    args = (q, fk, fv, full_rank, sk, sv, stream_rank, q_rank, rh.to(dev), sh.to(dev), D ** -0.5, SINK, RECENT)
    kept_bytes = 2 * (R * T + S * C) * D * 2
    return args, kept_bytes


def decode_rows(lengths, fracs, shapes, dev, bw):
    rows = []
    for shape in shapes:
        hq, hkv = SHAPES[shape]
        for T in lengths:
            q = rand(1, hq, 1, D, dev=dev)
            k, v = rand(1, hkv, T, D, dev=dev), rand(1, hkv, T, D, dev=dev)
            dense = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)  # noqa: E731
            t_dense, t_dense_eager = graph_time(dense), bench(dense)
            t_dense_dirty = graph_time(dense, flush="write")
            dense_bytes = 2 * hkv * T * D * 2
            kvdense = {}
            if has_dense_kernel():  # the dense method's decode: one group of every head, kvpress's kernel
                group = dense_group(k, v)
                q_rank = torch.tensor([[T - 1]], device=dev, dtype=torch.int32)
                fn = lambda: kernels.grouped_attention(q, [group], q_rank, D ** -0.5)  # noqa: E731
                try:
                    ref = dense().float()
                    err_kd = ((fn().float() - ref).norm() / ref.norm()).item()
                    t_kd = graph_time(fn)
                    kvdense = {"dense_kvpress_us": t_kd * 1e6, "dense_kvpress_eager_us": bench(fn) * 1e6,
                               "dense_kvpress_of_bound": t_kd / (dense_bytes / bw), "dense_kvpress_rel_err": err_kd}
                    print(f"decode {shape} {T // K}K dense (kvpress): {t_kd * 1e6:.1f} us, bound "
                          f"{dense_bytes / bw * 1e6:.1f} us, err vs SDPA {err_kd:.1e}", flush=True)
                except Exception as error:  # a new kernel path: record the failure, keep measuring Duo
                    kvdense = {"dense_kvpress_error": repr(error)}
                    print(f"decode {shape} {T // K}K dense (kvpress) failed: {error!r}", flush=True)
                del group, fn
            del k, v
            for frac in fracs:
                args, kept = decode_case(T, hq, hkv, frac, dev)
                out = kernels.split_cache_attention(*args)
                ref = kernels.reference.split_cache_attention(*args)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                duo = lambda: kernels.split_cache_attention(*args)  # noqa: E731
                t, t_eager, t_dirty = graph_time(duo), bench(duo), graph_time(duo, flush="write")
                rows.append({
                    "shape": shape, "tokens": T, "retrieval_frac": frac, "dense_us": t_dense * 1e6,
                    "dense_bytes": dense_bytes, "duo_us": t * 1e6, "kept_bytes": kept,
                    "dense_eager_us": t_dense_eager * 1e6, "duo_eager_us": t_eager * 1e6,
                    "bound_us": kept / bw * 1e6, "speedup": t_dense / t, "of_bound": t / (kept / bw),
                    "duo_GBps": kept / t / 1e9, "rel_err": err,
                    # the same with a dirty L2 (flushed by writing): both pay for the write-back
                    "dense_dirty_us": t_dense_dirty * 1e6, "duo_dirty_us": t_dirty * 1e6,
                    "speedup_dirty": t_dense_dirty / t_dirty, "of_bound_dirty": t_dirty / (kept / bw),
                    **kvdense,
                })
                print(f"decode {shape} {T // K}K {frac:.0%}: dense {t_dense * 1e6:.1f} us, duo {t * 1e6:.1f} us "
                      f"({t_dense / t:.2f}x), bound {kept / bw * 1e6:.1f} us, eager dense {t_dense_eager * 1e6:.1f} / "
                      f"duo {t_eager * 1e6:.1f} us, dirty L2 dense {t_dense_dirty * 1e6:.1f} / duo {t_dirty * 1e6:.1f} us, "
                      f"err {err:.1e}", flush=True)
                del args
    return rows


def sweep_decode(T, dev, bw):
    """Pick decode tile settings (BLOCK_N, warps, stages, programs per SM, most splits per head) on
    GQA 128K 25%/50%: the sum of time / bound decides."""
    cases = [decode_case(T, 32, 8, f, dev) for f in (0.25, 0.5)]
    names = ("BLOCK_N", "NUM_WARPS", "NUM_STAGES", "PROGRAMS_PER_SM", "MAX_SPLITS")
    base = {name: getattr(decode_mod, name) for name in names}
    grid = [dict(zip(names, values)) for values in [
        (32, 4, 3, 2, 128), (32, 4, 4, 2, 128), (64, 4, 3, 2, 128), (64, 4, 3, 1, 128), (128, 4, 2, 1, 128),
        (32, 4, 3, 3, 512), (32, 4, 3, 4, 512), (32, 4, 2, 4, 512), (32, 4, 4, 4, 512), (64, 4, 2, 3, 512),
        (64, 4, 3, 3, 512), (64, 4, 2, 4, 512), (32, 2, 3, 6, 1024), (32, 2, 4, 8, 1024), (64, 8, 3, 2, 512),
        (128, 8, 2, 2, 512), (32, 8, 4, 2, 512), (64, 8, 2, 3, 512)]]
    results = []

    def run(cfg):
        for name, value in {**base, **cfg}.items():
            setattr(decode_mod, name, value)
        times = [graph_time(lambda: kernels.split_cache_attention(*args)) for args, _ in cases]
        score = sum(t / (kept / bw) for t, (_, kept) in zip(times, cases))  # sum of time / bound
        results.append({**base, **cfg, "us_25": times[0] * 1e6, "us_50": times[1] * 1e6, "score": score})
        print(f"decode sweep {cfg}: 25% {times[0] * 1e6:.1f} us, 50% {times[1] * 1e6:.1f} us", flush=True)
        return score

    best = min(grid, key=run)
    base.update(best)
    pps = best["PROGRAMS_PER_SM"]
    base["PROGRAMS_PER_SM"] = min([pps, pps + 1, 2 * pps], key=lambda p: run({**best, "PROGRAMS_PER_SM": p}))
    for name, value in base.items():
        setattr(decode_mod, name, value)
    return base, results


# ----------------------------------------------------------------------------------------------
# prefill


def prefill_case(L, hq, hkv, frac, dev):
    rh, sh = head_split(hkv, frac)
    r = torch.arange(L, device=dev, dtype=torch.int32)[None]
    q = rand(1, hq, L, D, dev=dev)
    k, v = rand(1, hkv, L, D, dev=dev), rand(1, hkv, L, D, dev=dev)
    # the runtime gives retrieval heads their own tensors and streaming heads the prompt's
    fk, fv = k[:, rh.to(dev)].contiguous(), v[:, rh.to(dev)].contiguous()
    sk, sv = k[:, sh.to(dev)].contiguous(), v[:, sh.to(dev)].contiguous()
    args = (q, fk, fv, r, sk, sv, r, r, rh.to(dev), sh.to(dev), D ** -0.5, SINK, RECENT)
    return args, (q, k, v)


def sweep_prefill(L, dev):
    args, _ = prefill_case(L, 32, 8, 0.0, dev)
    base = dict(ROWS=prefill_mod.ROWS, BLOCK_N=prefill_mod.BLOCK_N, NUM_WARPS=prefill_mod.NUM_WARPS,
                NUM_STAGES=prefill_mod.NUM_STAGES)
    grid = [dict(ROWS=r, BLOCK_N=n, NUM_WARPS=w, NUM_STAGES=s) for r, n, w, s in
            [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3),
             (64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2), (256, 64, 8, 2)]]
    results = []

    def run(cfg):
        for name, value in cfg.items():
            setattr(prefill_mod, name, value)
        t = bench(lambda: kernels.split_cache_attention(*args), rep_ms=100)
        results.append({**cfg, "ms": t * 1e3})
        print(f"prefill sweep {cfg}: {t * 1e3:.2f} ms", flush=True)
        return t

    best = min(grid, key=run)
    for name, value in best.items():
        setattr(prefill_mod, name, value)
    return best, results


def prefill_rows(lengths, shapes, dev):
    rows = []
    for shape in shapes:
        hq, hkv = SHAPES[shape]
        for L in lengths:
            args, (q, k, v) = prefill_case(L, hq, hkv, 0.0, dev)  # every head streaming
            t_dense = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv))
            t = bench(lambda: kernels.split_cache_attention(*args))
            row = {"shape": shape, "tokens": L, "dense_ms": t_dense * 1e3, "stream_ms": t * 1e3,
                   "speedup": t_dense / t}
            if L <= 32 * K:  # check against flex-free exact math on a slice of queries
                out = kernels.split_cache_attention(*args)
                sl = slice(L - 2048, L)
                ref = kernels.reference.rank_attention(q[:, :, sl], k, v, args[7][:, sl], args[3], D ** -0.5,
                                                       SINK, RECENT)
                row["rel_err"] = ((out[:, :, sl].float() - ref.float()).norm() / ref.float().norm()).item()
            del args
            for frac in (0.5,):  # a whole Duo layer: retrieval heads by SDPA, streaming heads A-shape
                dargs, _ = prefill_case(L, hq, hkv, frac, dev)
                row[f"duo{int(frac * 100)}_ms"] = bench(lambda: kernels.split_cache_attention(*dargs)) * 1e3
                del dargs
            rows.append(row)
            print(f"prefill {shape} {L // K}K: dense {t_dense * 1e3:.2f} ms, streaming {t * 1e3:.3f} ms "
                  f"({t_dense / t:.1f}x), duo50 layer {row['duo50_ms']:.2f} ms", flush=True)
            del q, k, v
    return rows


def chunk_row(dev, T=128 * K, chunk=8 * K):
    """Retrieval heads in chunked prefill (the Triton causal kernel): last chunk of a 128K prompt."""
    hq, hkv = SHAPES["gqa"]
    rh, sh = head_split(hkv, 0.5)
    R = len(rh)
    k, v = rand(1, R, T, D, dev=dev), rand(1, R, T, D, dev=dev)
    q = rand(1, hq, chunk, D, dev=dev)
    r = torch.arange(T, device=dev, dtype=torch.int32)[None]
    out = torch.empty_like(q)
    fn = lambda: prefill_mod.prefill_attention(q, k, v, r[:, T - chunk:], r, D ** -0.5, heads=rh.to(dev),  # noqa: E731
                                               group=hq // hkv, out=out)
    t = bench(fn)
    flops = 4 * R * (hq // hkv) * chunk * (T - chunk / 2) * D
    print(f"retrieval chunk {chunk // K}K at {T // K}K, {R} KV heads: {t * 1e3:.2f} ms, {flops / t / 1e12:.0f} TFLOP/s")
    return {"tokens": T, "chunk": chunk, "kv_heads": R, "ms": t * 1e3, "tflops": flops / t / 1e12}


def sdpa_check(dev, L=128 * K):
    """Duo prefill of the retrieval heads goes through SDPA flash: time it against SDPA alone."""
    hq, hkv = SHAPES["gqa"]
    rh, _ = head_split(hkv, 0.5)
    R, G = len(rh), hq // hkv
    q, k, v = rand(1, R * G, L, D, dev=dev), rand(1, R, L, D, dev=dev), rand(1, R, L, D, dev=dev)
    r = torch.arange(L, device=dev, dtype=torch.int32)[None]
    out = torch.empty(1, hq, L, D, device=dev, dtype=q.dtype)
    qq = torch.empty(1, hq, L, D, device=dev, dtype=q.dtype)
    used = kernels._causal_sdpa(qq, k, v, r, r, rh.to(dev), G, D ** -0.5, None, out)
    t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    t_path = bench(lambda: kernels._causal_sdpa(qq, k, v, r, r, rh.to(dev), G, D ** -0.5, None, out))
    print(f"retrieval prefill 128K, {R} KV heads: SDPA path used {used}; SDPA alone {t_sdpa * 1e3:.1f} ms, "
          f"through kvpress {t_path * 1e3:.1f} ms", flush=True)
    return {"sdpa_path_used": used, "sdpa_ms": t_sdpa * 1e3, "kvpress_ms": t_path * 1e3}


# ----------------------------------------------------------------------------------------------
# variants of the 8B-shaped model (end to end, tpot, maxctx): the runners are common's


def random_duo_config(frac, layers=32, kv_heads=8):
    """Duo gates drawn at random, ``frac`` of the KV heads retrieval (speed and memory only)."""

    gates = torch.rand(layers, kv_heads, generator=torch.Generator().manual_seed(1))
    return kvpress.DuoConfig(gates=gates, sink=SINK, recent=RECENT, sparsity=1 - frac)


def has_dense():
    """Whether kvpress has the ``dense`` method (full cache through kvpress's kernels)."""
    return "dense" in kvpress.METHODS


def variant(model, name):
    """``model`` as the variant ``name`` for the duration of the block; yields a cache factory.

    ``unpatched`` / ``unpatched-flash``: ``common.baseline_variant``; ``dense``: kvpress's dense
    method (every token of every head, kvpress's cache and kernels); ``duoNN``: Duo with NN%
    retrieval heads (random gates)."""
    if name.startswith("duo"):
        return common.kvpress_variant(model, "duo", random_duo_config(int(name[3:]) / 100,
                                                                      layers=model.config.num_hidden_layers))
    if name == "dense":
        if not has_dense():
            raise ValueError("variant 'dense' needs kvpress's dense method, which this kvpress lacks; "
                             "leave 'dense' out of the variants")
        return common.kvpress_variant(model, "dense")
    return common.baseline_variant(model, name)


def e2e_variants(fracs):
    """The e2e part's variants: both baselines, dense (when kvpress has it), Duo per fraction."""
    return ["unpatched", "unpatched-flash"] + (["dense"] if has_dense() else []) + [f"duo{int(f * 100)}" for f in fracs]


# the tpot part's default variants; ``dense`` is dropped when kvpress lacks it
TPOT_VARIANTS = "unpatched,unpatched-flash,dense,duo50,duo25"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=None, help="comma-separated: layer, floor, e2e, tpot, maxctx "
                   "(default: layer; with --smoke: layer,e2e,tpot,maxctx)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results; with --smoke: a "
                   "temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and a 4-layer model: checks the script in "
                   "seconds, on CPU too (no CUDA graphs there)")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--prefill-sweep", action="store_true", help="also sweep the prefill tiles (the defaults came from one)")
    p.add_argument("--e2e-lengths", default="32768,131072")
    p.add_argument("--e2e-chunk", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--tpot-lengths", default="8192,32768,131072")
    p.add_argument("--tpot-steps", type=int, default=40)
    p.add_argument("--tpot-batch", type=int, default=1, help="sequences per decode step (tpot part)")
    p.add_argument("--tpot-variants", default=TPOT_VARIANTS,
                   help="comma-separated: unpatched, unpatched-flash, dense, duoNN (NN%% retrieval heads); "
                   "dense is dropped from the default when kvpress lacks it")
    p.add_argument("--maxctx-step", type=int, default=16384, help="resolution of the longest-context search")
    a = p.parse_args()
    parts = a.parts or ("layer,e2e,tpot,maxctx" if a.smoke else "layer")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out_dir = Path(a.out or (tempfile.mkdtemp(prefix="kvpress_bench_duo_smoke_") if a.smoke
                             else Path(__file__).parent / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    tag = common.device_tag(env)
    print(env, flush=True)
    if a.smoke and dev == "cpu":
        torch.set_num_threads(1)  # a check, not a measurement: one thread does not fight a busy host's cores
    if a.smoke:  # tiny lengths: the 8B heads over a few hundred tokens
        chunk, e2e_lengths, warmup, tpot_lengths, tpot_steps = 256, [600], 256, [512], 2
    else:
        chunk, e2e_lengths, warmup = a.e2e_chunk, [int(x) for x in a.e2e_lengths.split(",")], 4 * K
        tpot_lengths, tpot_steps = [int(x) for x in a.tpot_lengths.split(",")], a.tpot_steps

    if "layer" in parts:
        bw = copy_bandwidth(dev)
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
        res = {"env": env, "copy_bandwidth_Bps": bw, "sink": SINK, "recent": RECENT, "head_dim": D, "dtype": "bf16"}
        if a.smoke:
            dec_len, pre_len, shapes = [1000], [700], ["gqa"]
        else:
            dec_len, pre_len, shapes = [32 * K, 128 * K, 512 * K], [32 * K, 128 * K], ["gqa", "mha"]
        if not a.no_sweep and not a.smoke:
            res["decode_config"], res["decode_sweep"] = sweep_decode(128 * K, dev, bw)
            if a.prefill_sweep:
                res["prefill_config"], res["prefill_sweep"] = sweep_prefill(32 * K, dev)
        res["decode"] = decode_rows(dec_len, [0.25, 0.5], shapes, dev, bw)
        if not a.smoke:
            res["read_floor"] = read_floor_rows(dev, bw)
        res["prefill"] = prefill_rows(pre_len, shapes, dev)
        if not a.smoke:
            res["retrieval_chunk"] = chunk_row(dev)
            res["retrieval_sdpa"] = sdpa_check(dev)
        common.write_json(out_dir / f"duo_layer_{tag}.json", res)
        common.table("Decode attention, one layer (bf16, D=128, batch 1), time in us", res["decode"],
                     [("shape", "{}"), ("tokens", "{}"), ("retrieval_frac", "{:.2f}"), ("dense_us", "{:.1f}"),
                      ("duo_us", "{:.1f}"), ("speedup", "{:.2f}x"), ("bound_us", "{:.1f}"), ("of_bound", "{:.2f}"),
                      ("duo_GBps", "{:.0f}"), ("dense_eager_us", "{:.1f}"), ("duo_eager_us", "{:.1f}"),
                      ("dense_kvpress_us", "{:.1f}"), ("dense_kvpress_of_bound", "{:.2f}")])
        common.table("Prefill attention, one layer, all heads (bf16), time in ms", res["prefill"],
                     [("shape", "{}"), ("tokens", "{}"), ("dense_ms", "{:.2f}"), ("stream_ms", "{:.3f}"),
                      ("speedup", "{:.1f}x"), ("duo50_ms", "{:.2f}")])

    model = None
    if any(x in parts for x in ("e2e", "tpot", "maxctx")):
        model = build_model(dev, a.smoke, layers=4 if a.smoke else 32)
    if parts == "floor":  # only the read floor (also part of "layer")
        bw = copy_bandwidth(dev)
        res = {"env": env, "copy_bandwidth_Bps": bw, "read_floor": read_floor_rows(dev, bw)}
        common.write_json(out_dir / f"duo_floor_{tag}.json", res)

    if "e2e" in parts:
        rows = common.e2e_rows(model, dev, e2e_lengths, e2e_variants([0.5, 0.25]), variant, chunk, a.new_tokens,
                               warmup_tokens=warmup)
        res = {"env": env, "rows": rows, "chunk": chunk, "sink": SINK, "recent": RECENT}
        common.write_json(out_dir / f"duo_e2e_{tag}.json", res)
        common.table("End to end, Llama-3-8B shape, random bf16 weights, batch 1", rows,
                     [("variant", "{}"), ("tokens", "{}"), ("prefill_s", "{:.1f}"), ("tpot_ms", "{:.2f}"),
                      ("gpu_ms_per_token", "{:.2f}"), ("peak_GiB", "{:.2f}"), ("kv_GiB", "{:.2f}")])

    if "tpot" in parts:
        names = a.tpot_variants.split(",")
        if a.tpot_variants == TPOT_VARIANTS and not has_dense():
            names.remove("dense")
            print("tpot: kvpress has no dense method; measuring without it", flush=True)
        rows = common.tpot_rows(model, dev, tpot_lengths, names, variant, tpot_steps, chunk, a.tpot_batch)
        res = {"env": env, "rows": rows, "sink": SINK, "recent": RECENT}
        suffix = (f"_batch{a.tpot_batch}" if a.tpot_batch > 1 else "") + ("_" + a.tpot_lengths.replace(",", "_")
                                                                           if a.tpot_lengths != "8192,32768,131072" else "")
        common.write_json(out_dir / f"duo_tpot{suffix}_{tag}.json", res)
        common.table(f"Time per output token, interleaved variants, Llama-3-8B shape, batch {a.tpot_batch}", rows,
                     [("variant", "{}"), ("tokens", "{}"), ("tpot_ms", "{:.2f}"), ("tpot_p10_ms", "{:.2f}"),
                      ("tpot_p90_ms", "{:.2f}"), ("host_ms", "{:.2f}"), ("kv_GiB", "{:.2f}")])

    if "maxctx" in parts:
        names = ["unpatched", "duo50", "duo25"]
        if a.smoke:  # nothing runs out of memory on the CPU: one probe per variant checks the code
            rows = common.max_context_rows(model, dev, names, variant, 128, {name: (512, 1024) for name in names}, 512,
                                           search=lambda probe, lo, hi, step: lo if probe(lo) else 0)
        else:
            brackets = {"unpatched": (256 * K, 768 * K), "duo50": (640 * K, 1536 * K), "duo25": (1280 * K, 3072 * K)}
            rows = common.max_context_rows(model, dev, names, variant, chunk, brackets, a.maxctx_step)
        res = {"env": env, "rows": rows, "chunk": chunk, "gpu_bytes": torch.cuda.get_device_properties(0).total_memory
               if dev == "cuda" else None, "sink": SINK, "recent": RECENT}
        common.write_json(out_dir / f"duo_maxctx_{tag}.json", res)
        common.table("Longest context that runs (last prefill chunk + 4 decode steps), Llama-3-8B shape", rows,
                     [("variant", "{}"), ("max_tokens", "{}"), ("vs_unpatched", "{:.2f}x")])


if __name__ == "__main__":
    main()
