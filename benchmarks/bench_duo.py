"""DuoAttention speed and memory: per-layer kernels and an 8B-shaped model end to end.

    python benchmarks/bench_duo.py --parts layer,e2e,tpot,maxctx     # on a CUDA GPU (H100 80GB in the README)

Parts (each compares against dense attention measured in the same run):
  layer  decode attention of one layer (one query token) over 32K/128K/512K cached tokens with 25%
         and 50% retrieval heads vs dense SDPA decode, next to the bytes-read bound (kept cache
         bytes / device copy bandwidth measured here) and the time of a plain read of as many
         bytes; streaming-head (A-shape) prefill at 32K/128K vs dense SDPA causal prefill; shapes of
         Llama-3-8B (32 q / 8 KV heads) and of an MHA model (32 / 32), head dim 128, bf16. Kernel
         tile settings are swept first and the best used. (``floor``: the plain reads alone.)
  e2e    a LlamaForCausalLM with Llama-3-8B dimensions (32 layers) and random bf16 weights: chunked
         prefill, then time per output token and peak memory at 32K and 128K, unpatched (the
         model's own sdpa, DynamicCache) vs Duo (25% / 50% retrieval heads).
  tpot   time per output token of those variants at 8K/32K/128K, measured interleaved (rounds of
         one decode step per variant), so that a host whose speed drifts affects all alike.
  maxctx the longest context that runs on the GPU for each variant, searched by real runs of the
         last prefill chunk and a few decode steps over a cache filled to that length.
Writes ``benchmarks/results/duo_<part>_<device>.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
import triton
import triton.language as tl

import kvpress
from kvpress import kernels
from kvpress.kernels import decode as decode_mod
from kvpress.kernels import prefill as prefill_mod

K = 1024
SINK, RECENT = 64, 256
SHAPES = {"gqa": (32, 8), "mha": (32, 32)}  # (query heads, KV heads), Llama-3-8B and Llama-2-7B
D = 128


def bench(fn, rep_ms=200):
    """Median time of ``fn`` in seconds (CUDA events via triton.testing.do_bench, L2 flushed)."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") * 1e-3
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


_FLUSH = {}


def graph_time(fn, replays=30, flush="read"):
    """GPU time of ``fn`` in seconds with no CPU launch overhead and a cold L2: ``flush(); fn()`` is
    captured in a CUDA graph and timed per replay with events (median), minus the flush alone.

    ``flush="read"`` evicts L2 by reading a 256 MiB buffer, so L2 holds clean lines only, as in a
    decode step, where the ops before attention read weights and write a few activations.
    ``flush="write"`` zeroes the buffer (what ``triton.testing.do_bench`` does): L2 is then full of
    dirty lines, and ``fn`` also pays for writing them back (~50 MB) as it evicts them."""
    if not torch.cuda.is_available():
        return bench(fn)
    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.zeros(64 << 20, dtype=torch.float32, device="cuda")

    def timed(body):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()
            body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        times = sorted(start.elapsed_time(end) for start, end in events)
        return times[len(times) // 2] * 1e-3

    buf = _FLUSH["buf"]
    evict = {"read": lambda: buf.amax(), "write": lambda: buf.zero_()}[flush]
    return timed(lambda: (evict(), fn())) - timed(evict)


def copy_bandwidth(dev):
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = (1 << 30) if dev == "cuda" else (1 << 20)
    a, b = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
    a.random_()
    return 2 * n / bench(lambda: b.copy_(a))


def environment():
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    import transformers
    import triton

    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda, "commit": commit}


def head_split(hkv, frac):
    """Retrieval KV heads (a fixed spread-out choice) and streaming KV heads for a fraction."""
    r = round(frac * hkv)
    order = torch.randperm(hkv, generator=torch.Generator().manual_seed(0))
    return order[:r].sort().values, order[r:].sort().values


def rand(*shape, dev, dtype=torch.bfloat16):
    return torch.randn(*shape, device=dev, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# decode


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


@triton.jit
def _read_kernel(X, Out, per_program, BLOCK: tl.constexpr):
    """Sum ``per_program`` elements of ``X`` per program: nothing but reading memory."""
    start = tl.program_id(0).to(tl.int64) * per_program
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(0, per_program, BLOCK):
        acc += tl.load(X + start + offset + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(Out + tl.program_id(0), tl.sum(acc))


def read_floor_rows(dev, bw, sizes_mb=(134.4, 268.7, 536.9, 2147.5), programs=(132, 264, 528, 1056, 2112)):
    """What reading the kept cache costs with nothing else to do: the fastest of a plain Triton read
    kernel over several grid sizes, and torch's sum, on buffers of the decode cases' byte counts,
    timed like the decode (CUDA graph, L2 flushed by reading)."""
    rows = []
    block = 4096
    for mb in sizes_mb:
        n = round(mb * 1e6 / 2 / (block * max(programs))) * block * max(programs)
        x = rand(n, dev=dev)
        out = torch.empty(max(programs), device=dev, dtype=torch.float32)
        times = {p: graph_time(lambda p=p: _read_kernel[(p,)](x, out, n // p, BLOCK=block, num_warps=8))
                 for p in programs}
        t_sum = graph_time(lambda: x.sum(dtype=torch.float32))
        best = min(times, key=times.get)
        nbytes = 2 * n
        rows.append({"bytes": nbytes, "read_us": {str(p): t * 1e6 for p, t in times.items()}, "best_programs": best,
                     "best_read_us": times[best] * 1e6, "torch_sum_us": t_sum * 1e6, "bound_us": nbytes / bw * 1e6})
        print(f"read floor {nbytes / 1e6:.1f} MB: best Triton read {times[best] * 1e6:.1f} us ({best} programs; "
              + ", ".join(f"{p}: {t * 1e6:.1f}" for p, t in times.items()) + f"), torch sum {t_sum * 1e6:.1f} us, "
              f"bound {nbytes / bw * 1e6:.1f} us", flush=True)
        del x
    return rows


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
# end to end


def llama8b_config(smoke=False):
    """Llama-3-8B dimensions (``smoke``: the same heads, tiny everything else, for a CPU check)."""
    from transformers import LlamaConfig

    size = dict(vocab_size=512, hidden_size=256, intermediate_size=512) if smoke else \
        dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336)
    return LlamaConfig(**size, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=1 << 22, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False)


def build_model(dev, smoke=False):
    from transformers import LlamaForCausalLM

    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = LlamaForCausalLM(llama8b_config(smoke))
    torch.set_default_dtype(torch.float32)
    model.config.use_cache = True
    return model.eval().requires_grad_(False)


def random_duo_config(frac, layers=32, kv_heads=8):
    """Duo gates drawn at random, ``frac`` of the KV heads retrieval (speed and memory only)."""

    gates = torch.rand(layers, kv_heads, generator=torch.Generator().manual_seed(1))
    return kvpress.DuoConfig(gates=gates, sink=SINK, recent=RECENT, sparsity=1 - frac)


@contextlib.contextmanager
def variant(model, name):
    """``model`` as the variant ``name`` for the duration of the block; yields a cache factory.

    ``unpatched``: the model's own sdpa attention with torch's backend choice, ``DynamicCache``;
    ``unpatched-flash``: the same with SDPA limited to flash (memory-efficient where flash does not
    apply: masked prefill chunks); ``duoNN``: Duo with NN% retrieval heads (random gates)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import DynamicCache

    if name.startswith("duo"):
        kvpress.patch(model, "duo", config=random_duo_config(int(name[3:]) / 100))
        try:
            yield lambda: kvpress.make_cache(model)
        finally:
            kvpress.unpatch(model)
    else:
        no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        with sdpa_kernel(no_cudnn) if name == "unpatched-flash" else contextlib.nullcontext():
            yield lambda: DynamicCache(config=model.config)


@torch.inference_mode()
def run_context(model, L, chunk, new_tokens, dev, make_cache):
    """Prefill L random tokens in chunks of ``chunk``, then ``new_tokens`` greedy decode steps.
    Returns prefill seconds, median time per output token (s), peak allocated bytes of the
    prefill and of the decode, and the cache's bytes (``kvpress.kv_cache_bytes``)."""

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, model.config.vocab_size, (1, L), device=dev)
    cache = make_cache()
    t0 = time.perf_counter()
    for s in range(0, L, chunk):
        out = model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    t_prefill = time.perf_counter() - t0
    peak_prefill = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    tok = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(new_tokens):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    tpot = sorted(times[2:])[len(times[2:]) // 2]
    peak_decode = torch.cuda.max_memory_allocated()
    gpu_per_token = gpu_busy(lambda: model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1))
    cache_bytes = kvpress.kv_cache_bytes(cache)
    del cache, out, ids
    return t_prefill, tpot, peak_prefill, peak_decode, cache_bytes, gpu_per_token


def gpu_busy(step, n=4):
    """GPU time per call of ``step`` (sum of its kernels' and copies' durations, torch profiler):
    what a decode step costs the GPU, apart from the Python overhead of eager transformers."""
    try:
        from torch.autograd import DeviceType

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                step()
            torch.cuda.synchronize()
        return sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) * 1e-6 / n
    except Exception as error:  # the profiler is a nice-to-have here
        print(f"gpu_busy failed: {error!r}")
        return float("nan")


def e2e_rows(model, dev, lengths, fracs, chunk, new_tokens):
    """Prefill time, TPOT, GPU time per token, peaks and KV bytes per variant and length. Unpatched
    runs twice (see ``variant``): with torch's default SDPA backend choice (cuDNN on the H100 with
    torch 2.11, whose decode call costs ~1.8 ms of CPU each) and with SDPA limited to flash."""
    rows = []
    for name in ["unpatched", "unpatched-flash"] + [f"duo{int(f * 100)}" for f in fracs]:
        with variant(model, name) as make_cache:
            run_context(model, 4 * K, min(chunk, 2 * K), 3, dev, make_cache)  # warm-up: compile, allocate
            for L in lengths:
                t_pre, tpot, peak_pre, peak_dec, cache_bytes, gpu_tok = run_context(model, L, chunk, new_tokens, dev, make_cache)
                rows.append({"variant": name, "tokens": L, "prefill_s": t_pre, "tpot_ms": tpot * 1e3,
                             "gpu_ms_per_token": gpu_tok * 1e3, "peak_GiB": max(peak_pre, peak_dec) / 2**30,
                             "peak_prefill_GiB": peak_pre / 2**30, "peak_decode_GiB": peak_dec / 2**30,
                             "kv_GiB": cache_bytes / 2**30})
                print(f"e2e {name} {L // K}K: prefill {t_pre:.1f} s, TPOT {tpot * 1e3:.2f} ms (GPU busy {gpu_tok * 1e3:.2f} ms), "
                      f"peak prefill {peak_pre / 2**30:.2f} / decode {peak_dec / 2**30:.2f} GiB, KV {cache_bytes / 2**30:.2f} GiB",
                      flush=True)
    return rows


def shared_twin(model):
    """Another model object over the same weights (no copy), with its own config and modules: one
    can be patched while the other is not."""
    import copy

    with torch.device("meta"):
        twin = type(model)(copy.deepcopy(model.config))
    twin.load_state_dict(model.state_dict(), assign=True)
    twin.model.rotary_emb = model.model.rotary_emb  # its buffers are not in the state dict
    return twin.eval()


@torch.inference_mode()
def tpot_rows(model, dev, lengths, names, steps, chunk, batch=1):
    """Time per output token of the variants ``names``, measured interleaved: each variant's cache
    is filled to L tokens (``fill_cache``), then rounds of one decode step per variant, so that the
    host's varying speed affects all alike. Median of ``steps`` rounds (after 3 warm-up rounds);
    ``host_ms``: the time until the forward returns, before the GPU has finished (launch time)."""
    twins = {name: shared_twin(model) for name in names}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    rows = []
    with contextlib.ExitStack() as stack:
        factories = {name: stack.enter_context(variant(twins[name], name)) for name in names if name.startswith("duo")}
        for L in lengths:
            caches = {}
            for name in names:
                cache = factories[name]() if name in factories else transformers.DynamicCache(config=model.config)
                fill_cache(twins[name], cache, L, chunk, dev, batch)
                caches[name] = cache
            times = {name: [] for name in names}
            host = {name: [] for name in names}
            tok = torch.ones(batch, 1, dtype=torch.long, device=dev)
            for step in range(steps + 3):
                for name in names:
                    flash = name == "unpatched-flash"
                    with variant(twins[name], name) if flash else contextlib.nullcontext():
                        sync()
                        t = time.perf_counter()
                        twins[name](input_ids=tok, past_key_values=caches[name], use_cache=True, logits_to_keep=1)
                        t_host = time.perf_counter() - t
                        sync()
                    if step >= 3:
                        times[name].append(time.perf_counter() - t)
                        host[name].append(t_host)
            for name in names:
                ts = sorted(times[name])
                rows.append({"variant": name, "tokens": L, "batch": batch, "tpot_ms": ts[len(ts) // 2] * 1e3,
                             "tpot_p10_ms": ts[len(ts) // 10] * 1e3, "tpot_p90_ms": ts[9 * len(ts) // 10] * 1e3,
                             "host_ms": sorted(host[name])[len(ts) // 2] * 1e3,
                             "kv_GiB": kvpress.kv_cache_bytes(caches[name]) / 2**30})
                print(f"tpot {name} {L // K}K x{batch}: median {rows[-1]['tpot_ms']:.2f} ms, host {rows[-1]['host_ms']:.2f} ms "
                      f"(p10 {rows[-1]['tpot_p10_ms']:.2f}, p90 {rows[-1]['tpot_p90_ms']:.2f})", flush=True)
            del caches
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# longest context that fits


@torch.inference_mode()
def fill_cache(model, cache, tokens, chunk, dev, batch=1):
    """Append ``tokens`` tokens of random K/V (``batch`` rows) to every layer of ``cache``, ``chunk``
    at a time: the tensors a chunked prefill leaves in the cache (same updates, same growth), without
    its compute."""

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = torch.randn(batch, cfg.num_key_value_heads, chunk, head_dim, device=dev, dtype=model.dtype)
    press = kvpress.cache.is_kvpress_cache(cache)
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        if press:  # what the patched model's forward hooks do for each chunk
            kvpress.cache.begin_forward(cache, None, batch, n, dev)
        for layer in range(cfg.num_hidden_layers):
            held, _ = cache.update(kv[:, :, :n], kv[:, :, :n], layer)
            if press:  # Duo layers reserve room; the attention would write the tokens
                held.write_new()
        if press:
            kvpress.cache.end_forward(cache)


def check_fill(model, make_cache, chunk, dev, L=None):
    """``fill_cache`` leaves a cache of exactly the bytes a real chunked prefill of as many tokens
    leaves (checked at ``L`` tokens, default 3.5 chunks); raises if not. Returns ``L``."""
    L = L or 7 * chunk // 2
    real, filled = make_cache(), make_cache()
    with torch.inference_mode():
        ids = torch.randint(0, model.config.vocab_size, (1, L), device=dev)
        for start in range(0, L, chunk):
            model(input_ids=ids[:, start:start + chunk], past_key_values=real, use_cache=True, logits_to_keep=1)
    fill_cache(model, filled, L, chunk, dev)
    if kvpress.kv_cache_bytes(real) != kvpress.kv_cache_bytes(filled) or real.get_seq_length() != filled.get_seq_length():
        raise AssertionError(f"fill_cache: {kvpress.kv_cache_bytes(filled)} bytes, a real prefill {kvpress.kv_cache_bytes(real)}")
    return L


def fits(model, make_cache, L, chunk, dev, decode_steps=4):
    """Whether a context of ``L`` tokens runs on the GPU: the cache is filled to ``L - chunk`` tokens
    (``fill_cache``), then the last prefill chunk and ``decode_steps`` decode steps run for real.
    Returns (fits, peak allocated bytes, KV cache bytes)."""

    def attempt():
        cache = make_cache()
        fill_cache(model, cache, L - chunk, chunk, dev)
        with torch.inference_mode():
            ids = torch.randint(0, model.config.vocab_size, (1, chunk), device=dev)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            for _ in range(decode_steps):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True,
                            logits_to_keep=1)
        return kvpress.kv_cache_bytes(cache)

    cuda = torch.device(dev).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        ok, cache_bytes = True, attempt()
    except torch.OutOfMemoryError:
        ok, cache_bytes = False, None
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.empty_cache()
    return ok, peak, cache_bytes


def longest_fitting(probe, lo, hi, step):
    """The largest multiple of ``step`` for which ``probe`` holds, searched from the bracket [lo, hi)
    (widened when wrong), assuming it holds below some length and fails above."""
    while lo > step and not probe(lo):
        lo, hi = lo // 2, lo
    while probe(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    return lo


def max_context_rows(model, dev, fracs, chunk, brackets, step, search=longest_fitting):
    """Longest context for which the last prefill chunk and decode run, per variant (``search``)."""
    rows = []
    for name in ["unpatched"] + [f"duo{int(f * 100)}" for f in fracs]:
        probes = []
        with variant(model, name) as make_cache:

            def probe(L):
                t = time.perf_counter()
                ok, peak, kv_bytes = fits(model, make_cache, L, chunk, dev)
                probes.append({"tokens": L, "fits": ok, "peak_GiB": peak / 2**30,
                               "kv_GiB": kv_bytes / 2**30 if ok else None, "seconds": time.perf_counter() - t})
                print(f"max context {name} {L // K}K: {'fits' if ok else 'out of memory'}, peak {peak / 2**30:.2f} GiB "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)
                return ok

            checked = check_fill(model, make_cache, chunk, dev)
            print(f"fill_cache check {name}: {checked} tokens filled hold the bytes of {checked} prefilled", flush=True)
            best = search(probe, *brackets[name], step)
        rows.append({"variant": name, "max_tokens": best, "step": step, "probes": probes})
        print(f"max context {name}: {best // K}K tokens", flush=True)
    for row in rows:
        row["vs_unpatched"] = row["max_tokens"] / rows[0]["max_tokens"]
    return rows


# ----------------------------------------------------------------------------------------------


def table(title, rows, cols):
    print(f"\n{title}")
    print(" | ".join(c for c, _ in cols))
    for r in rows:
        print(" | ".join(fmt.format(r[c]) if c in r else "-" for c, fmt in cols))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="layer", help="comma-separated: layer, floor, e2e, tpot, maxctx")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script, on CPU too)")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--prefill-sweep", action="store_true", help="also sweep the prefill tiles (the defaults came from one)")
    p.add_argument("--e2e-lengths", default="32768,131072")
    p.add_argument("--e2e-chunk", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--tpot-lengths", default="8192,32768,131072")
    p.add_argument("--tpot-steps", type=int, default=40)
    p.add_argument("--tpot-batch", type=int, default=1, help="sequences per decode step (tpot part)")
    p.add_argument("--tpot-variants", default="unpatched,unpatched-flash,duo50,duo25")
    p.add_argument("--maxctx-step", type=int, default=16384, help="resolution of the longest-context search")
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    tag = env["device"].replace(" ", "_").replace("/", "_")
    print(env, flush=True)

    if "layer" in a.parts:
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
        (out_dir / f"duo_layer_{tag}.json").write_text(json.dumps(res, indent=1))
        table("Decode attention, one layer (bf16, D=128, batch 1), time in us", res["decode"],
              [("shape", "{}"), ("tokens", "{}"), ("retrieval_frac", "{:.2f}"), ("dense_us", "{:.1f}"),
               ("duo_us", "{:.1f}"), ("speedup", "{:.2f}x"), ("bound_us", "{:.1f}"), ("of_bound", "{:.2f}"),
               ("duo_GBps", "{:.0f}"), ("dense_eager_us", "{:.1f}"), ("duo_eager_us", "{:.1f}")])
        table("Prefill attention, one layer, all heads (bf16), time in ms", res["prefill"],
              [("shape", "{}"), ("tokens", "{}"), ("dense_ms", "{:.2f}"), ("stream_ms", "{:.3f}"),
               ("speedup", "{:.1f}x"), ("duo50_ms", "{:.2f}")])

    model = build_model(dev, a.smoke) if any(x in a.parts for x in ("e2e", "tpot", "maxctx")) else None
    if a.parts == "floor":  # only the read floor (also part of "layer")
        bw = copy_bandwidth(dev)
        res = {"env": env, "copy_bandwidth_Bps": bw, "read_floor": read_floor_rows(dev, bw)}
        (out_dir / f"duo_floor_{tag}.json").write_text(json.dumps(res, indent=1))

    if "e2e" in a.parts:
        lengths = [int(x) for x in a.e2e_lengths.split(",")]
        rows = e2e_rows(model, dev, lengths, [0.5, 0.25], a.e2e_chunk, a.new_tokens)
        res = {"env": env, "rows": rows, "chunk": a.e2e_chunk, "sink": SINK, "recent": RECENT}
        (out_dir / f"duo_e2e_{tag}.json").write_text(json.dumps(res, indent=1))
        table("End to end, Llama-3-8B shape, random bf16 weights, batch 1", rows,
              [("variant", "{}"), ("tokens", "{}"), ("prefill_s", "{:.1f}"), ("tpot_ms", "{:.2f}"),
               ("gpu_ms_per_token", "{:.2f}"), ("peak_GiB", "{:.2f}"), ("kv_GiB", "{:.2f}")])

    if "tpot" in a.parts:
        lengths = [int(x) for x in a.tpot_lengths.split(",")] if not a.smoke else [1024]
        names = a.tpot_variants.split(",")
        rows = tpot_rows(model, dev, lengths, names, a.tpot_steps if not a.smoke else 2, a.e2e_chunk, a.tpot_batch)
        res = {"env": env, "rows": rows, "sink": SINK, "recent": RECENT}
        suffix = (f"_batch{a.tpot_batch}" if a.tpot_batch > 1 else "") + ("_" + a.tpot_lengths.replace(",", "_")
                                                                           if a.tpot_lengths != "8192,32768,131072" else "")
        (out_dir / f"duo_tpot{suffix}_{tag}.json").write_text(json.dumps(res, indent=1))
        table(f"Time per output token, interleaved variants, Llama-3-8B shape, batch {a.tpot_batch}", rows,
              [("variant", "{}"), ("tokens", "{}"), ("tpot_ms", "{:.2f}"), ("tpot_p10_ms", "{:.2f}"),
               ("tpot_p90_ms", "{:.2f}"), ("host_ms", "{:.2f}"), ("kv_GiB", "{:.2f}")])

    if "maxctx" in a.parts:
        if a.smoke:  # nothing runs out of memory on the CPU: one probe per variant checks the code
            brackets = {name: (1024, 2048) for name in ("unpatched", "duo50", "duo25")}
            rows = max_context_rows(model, dev, [0.5, 0.25], 512, brackets, 1024,
                                    search=lambda probe, lo, hi, step: lo if probe(lo) else 0)
        else:
            brackets = {"unpatched": (256 * K, 768 * K), "duo50": (640 * K, 1536 * K), "duo25": (1280 * K, 3072 * K)}
            rows = max_context_rows(model, dev, [0.5, 0.25], a.e2e_chunk, brackets, a.maxctx_step)
        res = {"env": env, "rows": rows, "chunk": a.e2e_chunk, "gpu_bytes": torch.cuda.get_device_properties(0).total_memory
               if dev == "cuda" else None, "sink": SINK, "recent": RECENT}
        (out_dir / f"duo_maxctx_{tag}.json").write_text(json.dumps(res, indent=1))
        table("Longest context that runs (last prefill chunk + 4 decode steps), Llama-3-8B shape", rows,
              [("variant", "{}"), ("max_tokens", "{}"), ("vs_unpatched", "{:.2f}x")])


if __name__ == "__main__":
    main()
