"""Time per output token with CUDA-graph decode (issue #15): kvpress's eager and graph decode
against transformers' eager decode and its StaticCache + torch.compile ("reduce-overhead") decode.

Llama-3-8B shape, random bf16 weights, the cache filled to L tokens with random K/V
(``common.fill_cache``), then ``--steps`` decode steps after 3 warm-up steps (the graph variants
capture in their first step; the compiled variant compiles in its first ones). One variant at a
time (each holds only its own cache). Per row: median TPOT (and p10/p90), host time until the
forward returned, peak allocated memory over fill and decode, the cache's bytes, and the bytes
floor: the weights read once (the input embedding excepted: one row) plus the cache bytes a step
must read, over the measured copy bandwidth (read + write counted). Variants:

  eager           transformers, sdpa, DynamicCache
  static-compile  transformers, sdpa, StaticCache(max_cache_len = L + steps + 8), forward compiled
                  with torch.compile(mode="reduce-overhead") (part ``compile``: compiles per shape)
  dense, duo50, duo25         kvpress eager decode (duoNN: NN% retrieval heads, random gates,
                              sink 64, recent 256)
  dense-graph, duo50-graph, duo25-graph   the same with kvpress.patch(..., decode="graph"), which
                              fuses the model's small ops on CUDA (kvpress.graph.fuse, the default parts)
  NAME@L, NAME@LxB            NAME only at L tokens (and batch B; default 1)
  NAME/PARTS                  with the fused parts PARTS ("none", "all", or some of norm, rotary, mlp,
                              residual, next_norm, qkv, gate_up, gemv, gemv_norm joined by "+"): for a
                              graph variant instead of the default ones, for an eager one on top of
                              transformers' ops

A row whose cache cannot fit the GPU is skipped (estimated from its bytes; "skipped" in the JSON).
The ``check`` part prefills 8K real tokens and generates 64 greedy tokens with Duo 25% eager and
graph, both with the fused ops: they must be the same tokens (and, for information, where eager
decode with transformers' own ops first differs).

    python benchmarks/bench_graph.py --parts check,tpot --batch 1,4      # the table (8K-512K)
    python benchmarks/bench_graph.py --parts compile --batch 1,4         # transformers static + compile
    python benchmarks/bench_graph.py --parts profile                     # ~30 s: where a Duo 25% graph step's GPU time goes
    python benchmarks/bench_graph.py --parts gemm                        # ~10 s: the projections' GEMMs, split and fused
    python benchmarks/bench_graph.py --smoke                             # CPU, tiny model, seconds

Writes ``benchmarks/results/graph_<part>_batch<B>_<device>.json`` (rewritten after every row, so a
run cut short by a time limit keeps what it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from pathlib import Path

import torch

import common
import kvpress
import kvpress.graph

K = 1024
KVPRESS_VARIANTS = ["dense", "dense-graph", "duo50", "duo50-graph", "duo25", "duo25-graph"]
SINK, RECENT = 64, 256
# issue #15's targets at 128K, batch 1 (ms), and the most a graph variant may take over its floor at 32K
TARGETS_128K = {"duo25-graph": 6.0, "duo50-graph": 7.0, "dense-graph": 9.5}
FLOOR_RATIO_32K = 1.3


def duo_config(fraction, layers):
    """Duo gates drawn at random, ``fraction`` of the KV heads retrieval heads (speed and memory only)."""
    gates = torch.rand(layers, 8, generator=torch.Generator().manual_seed(1))
    return kvpress.DuoConfig(gates=gates, sink=SINK, recent=RECENT, sparsity=1 - fraction)


def retrieval_fraction(name):
    return 1.0 if name.startswith(("dense", "eager", "static")) else int(name[3:5]) / 100


@contextlib.contextmanager
def variant(model, name, max_len):
    """``model`` as variant ``name`` inside the block; yields an empty-cache factory."""
    name, _, parts = name.partition("/")
    parts = parts.replace("+", ",")
    if name == "eager":
        yield lambda: __import__("transformers").DynamicCache(config=model.config)
    elif name == "static-compile":
        from transformers import StaticCache

        model.forward = torch.compile(model.forward, mode="reduce-overhead")
        try:
            yield lambda: StaticCache(config=model.config, max_cache_len=max_len)
        finally:
            del model.forward
    else:
        method, _, graph = name.partition("-")
        options = {"decode": "graph"} if graph else {}
        config = None if method == "dense" else duo_config(retrieval_fraction(method), model.config.num_hidden_layers)
        before = kvpress.graph.FUSE
        kvpress.graph.FUSE = parts if graph and parts else "default"  # read when the graph runner is installed
        try:
            with common.kvpress_variant(model, "dense" if method == "dense" else "duo", config, **options) as make_cache:
                if parts and not graph:
                    kvpress.graph.fuse(model._kvpress_patch.patcher, model, parts)
                yield make_cache
        finally:
            kvpress.graph.FUSE = before


def weight_bytes(model):
    """Bytes a decode step reads of the weights: all of them but the input embedding (one row)."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) - embed.numel() * embed.element_size()


def cache_read_bytes(model, name, L, batch):
    """Bytes of cache a decode step must read at L tokens: K and V of every retrieval head over L
    tokens, of every streaming head over sink + recent."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * batch  # K and V, bf16
    r = retrieval_fraction(name)
    return per_token * (r * L + (1 - r) * min(L, SINK + RECENT))


@torch.inference_mode()
def measure(model, name, L, batch, steps, chunk, dev):
    """One row: fill a cache of ``name`` to L tokens, then 3 + ``steps`` decode steps."""
    arg = common.cache_argument(model)
    with variant(model, name, L + steps + 8) as make_cache:
        common._empty_cache(dev)
        common._reset_peak(dev)
        cache = make_cache()
        t = time.perf_counter()
        common.fill_cache(model, cache, L, chunk, dev, batch)
        fill_s = time.perf_counter() - t
        tok = torch.ones(batch, 1, dtype=torch.long, device=dev)
        times, host = [], []
        for step in range(steps + 3):
            common._sync(dev)
            t = time.perf_counter()
            model(input_ids=tok, **{arg: cache}, use_cache=True, logits_to_keep=1)
            t_host = time.perf_counter() - t
            common._sync(dev)
            if step >= 3:
                times.append(time.perf_counter() - t)
                host.append(t_host)
        peak = common._peak(dev)
        kv = kvpress.kv_cache_bytes(cache)
        runner = vars(model).get("_kvpress_graph")
        captures = runner.captures if runner is not None else None
        del cache
    times.sort()
    return {"variant": name, "tokens": L, "batch": batch, "tpot_ms": times[len(times) // 2] * 1e3,
            "tpot_p10_ms": times[len(times) // 10] * 1e3, "tpot_p90_ms": times[9 * len(times) // 10] * 1e3,
            "host_ms": sorted(host)[len(host) // 2] * 1e3, "peak_GiB": peak / 2**30, "kv_GiB": kv / 2**30,
            "fill_s": fill_s, "graph_captures": captures}


def fits(model, name, L, batch, dev):
    """Whether a cache of ``name`` at L tokens fits the GPU beside the weights (with 15% to spare)."""
    if dev != "cuda":
        return True
    full = name.startswith(("eager", "static", "dense"))
    need = weight_bytes(model) + cache_read_bytes(model, name if not full else "dense", L, batch) * (1.1 if full else 1.06)
    return need < 0.85 * torch.cuda.get_device_properties(0).total_memory


def tpot_part(model, names, lengths, batch, steps, chunk, dev, bw, rows=None, save=None):
    """Rows of ``names`` x ``lengths`` appended to ``rows``; ``save(rows)`` after each. A name
    ``NAME@L`` (``NAME@LxB``) is measured only at L tokens (and batch B, default 1)."""
    rows = [] if rows is None else rows
    weights = weight_bytes(model)
    for L in lengths:
        for name in names:
            name, _, only = name.partition("@")
            if only and (int(only.partition("x")[0]) != L or int(only.partition("x")[2] or 1) != batch):
                continue
            if not fits(model, name, L, batch, dev):
                rows.append({"variant": name, "tokens": L, "batch": batch, "skipped": "does not fit"})
                print(f"{name} {L // K}K x{batch}: skipped (does not fit)", flush=True)
                if save:
                    save(rows)
                continue
            try:
                row = measure(model, name, L, batch, steps, chunk, dev)
            except torch.OutOfMemoryError:
                rows.append({"variant": name, "tokens": L, "batch": batch, "skipped": "out of memory"})
                print(f"{name} {L // K}K x{batch}: out of memory", flush=True)
                torch.cuda.empty_cache()
                if save:
                    save(rows)
                continue
            row["floor_ms"] = (weights + cache_read_bytes(model, name, L, batch)) / bw * 1e3
            row["vs_floor"] = row["tpot_ms"] / row["floor_ms"]
            rows.append(row)
            print(f"{name} {L // K}K x{batch}: TPOT {row['tpot_ms']:.2f} ms (p10 {row['tpot_p10_ms']:.2f}, p90 "
                  f"{row['tpot_p90_ms']:.2f}; host {row['host_ms']:.2f}), floor {row['floor_ms']:.2f} ms "
                  f"({row['vs_floor']:.2f}x), peak {row['peak_GiB']:.1f} GiB, KV {row['kv_GiB']:.2f} GiB", flush=True)
            if save:
                save(rows)
    return rows


def targets(rows):
    """Issue #15's done criteria, checked on the rows that were measured."""
    out = {}
    for r in rows:
        if "tpot_ms" not in r or r["batch"] != 1:
            continue
        if r["tokens"] == 128 * K and r["variant"] in TARGETS_128K:
            out[f"{r['variant']} 128K <= {TARGETS_128K[r['variant']]} ms"] = r["tpot_ms"] <= TARGETS_128K[r["variant"]]
        if r["tokens"] == 32 * K and r["variant"].endswith("-graph"):
            out[f"{r['variant']} 32K <= {FLOOR_RATIO_32K}x floor"] = r["vs_floor"] <= FLOOR_RATIO_32K
    return out


@torch.inference_mode()
def check_part(model, dev, L, new_tokens):
    """Greedy tokens after a real prefill of L tokens: Duo 25% graph (fused ops) against Duo 25% eager
    with the same fused ops (must be equal), and against eager with transformers' ops (information)."""
    ids = torch.randint(0, model.config.vocab_size, (1, L), device=dev, generator=torch.Generator(dev).manual_seed(0))
    runs = {}
    for name in ("duo25/default", "duo25-graph", "duo25"):
        with variant(model, name, 0):
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            runs[name] = out[0, L:].tolist()

    def first_difference(a, b):
        return next((i for i, (x, y) in enumerate(zip(runs[a], runs[b])) if x != y), None)

    same = runs["duo25/default"] == runs["duo25-graph"]
    first, vs_plain = first_difference("duo25/default", "duo25-graph"), first_difference("duo25", "duo25-graph")
    print(f"check: Duo 25% graph {'==' if same else '!='} eager (same fused ops) over {new_tokens} greedy tokens after "
          f"{L} (first difference at {first}); against eager with transformers' ops: first difference at {vs_plain}",
          flush=True)
    return {"tokens": L, "new_tokens": new_tokens, "same": same, "first_difference": first,
            "first_difference_vs_transformers_ops": vs_plain, "eager": runs["duo25/default"], "graph": runs["duo25-graph"],
            "eager_transformers_ops": runs["duo25"]}


@torch.inference_mode()
def profile_part(model, name, L, batch, chunk, dev):
    """Where the GPU time of one decode step of ``name`` goes (torch profiler over 4 steps after
    warm-up): kernels per step, their summed time, and the 15 largest by total time. The gap between
    the TPOT and the summed kernel time is launch latency between the many small kernels."""
    from torch.autograd import DeviceType

    arg = common.cache_argument(model)
    with variant(model, name, L + 16) as make_cache:
        cache = make_cache()
        common.fill_cache(model, cache, L, chunk, dev, batch)
        tok = torch.ones(batch, 1, dtype=torch.long, device=dev)
        step = functools.partial(model, input_ids=tok, use_cache=True, logits_to_keep=1, **{arg: cache})
        for _ in range(3):
            step()
        common._sync(dev)
        activity = torch.profiler.ProfilerActivity.CUDA if dev == "cuda" else torch.profiler.ProfilerActivity.CPU
        kind = DeviceType.CUDA if dev == "cuda" else DeviceType.CPU  # CPU (smoke): ops instead of kernels
        with torch.profiler.profile(activities=[activity]) as prof:
            for _ in range(4):
                step()
            common._sync(dev)
        kernels = {}
        for e in prof.events():
            if e.device_type == kind:
                count, total = kernels.get(e.name, (0, 0.0))
                kernels[e.name] = (count + 1, total + e.time_range.elapsed_us())
        del cache
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]
    res = {"variant": name, "tokens": L, "batch": batch,
           "kernels_per_step": sum(c for c, _ in kernels.values()) / 4,
           "kernel_ms_per_step": sum(t for _, t in kernels.values()) / 4e3,
           "top": [{"name": n[:120], "per_step": c / 4, "ms_per_step": t / 4e3} for n, (c, t) in top]}
    print(f"profile {name} {L // K}K x{batch}: {res['kernels_per_step']:.0f} kernels per step, "
          f"{res['kernel_ms_per_step']:.2f} ms of kernel time", flush=True)
    for row in res["top"]:
        print(f"  {row['ms_per_step']:7.3f} ms  {row['per_step']:6.1f}x  {row['name']}", flush=True)
    return res


# BLOCK_N, BLOCK_K, warps, stages, one row through tl.dot (else multiply-and-sum; one-row batches only)
GEMV_CONFIGS = [(16, 256, 4, 4, True), (16, 512, 8, 3, True), (32, 256, 4, 3, True), (16, 128, 4, 6, True),
                (16, 256, 4, 4, False), (8, 512, 4, 4, False), (32, 512, 8, 3, False)]


@torch.inference_mode()
def gemm_part(model, batches, dev, bw):
    """The decode step's projections at M = batch rows: cuBLAS as transformers runs them (q, k, v,
    gate, up apart), cuBLAS over the concatenated weights (q/k/v, gate/up), and the Triton GEMV of
    the ``gemv`` fused part (``kernels.fused.linear``) in a few tile settings (``GEMV_CONFIGS``, the
    first the default): GPU time per call with a cold L2 (``common.graph_time``) and weight bytes/s."""
    from kvpress.kernels import fused

    cfg = model.config
    layer = model.model.layers[0]
    att, mlp = layer.self_attn, layer.mlp
    weights = {"q": att.q_proj.weight, "k": att.k_proj.weight, "v": att.v_proj.weight, "o": att.o_proj.weight,
               "gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight, "down": mlp.down_proj.weight,
               "lm_head": model.lm_head.weight}
    weights["qkv"] = torch.cat([weights["q"], weights["k"], weights["v"]])
    weights["gate_up"] = torch.cat([weights["gate"], weights["up"]])
    defaults = (fused.GEMV_BLOCK_N, fused.GEMV_BLOCK_K, fused.GEMV_WARPS, fused.GEMV_STAGES, fused.GEMV_DOT_ONE_ROW)
    tiles = dict(fused.GEMV_TILES)
    fused.GEMV_TILES.clear()  # the sweep sets the module's settings (restored at the end)
    rows = []

    def add(name, kind, batch, w, fn):
        t = common.graph_time(fn)
        nbytes = w.numel() * w.element_size()
        rows.append({"gemm": name, "kind": kind, "batch": batch, "shape": list(w.shape), "us": t * 1e6,
                     "TBps": nbytes / t / 1e12, "floor_us": nbytes / bw * 1e6})
        print(f"gemm {name:8s} {kind:18s} x{batch} {tuple(w.shape)}: {t * 1e6:7.1f} us, {nbytes / t / 1e12:.2f} TB/s "
              f"(floor {nbytes / bw * 1e6:.1f} us)", flush=True)

    for batch in batches:
        for name, w in weights.items():
            x = torch.randn(batch, 1, w.shape[1], device=dev, dtype=w.dtype)
            add(name, "cublas", batch, w, functools.partial(torch.nn.functional.linear, x, w))
            if name in ("k", "v", "gate", "up") or dev != "cuda":
                continue
            for config in GEMV_CONFIGS:
                if batch > 1 and not config[4]:
                    continue
                fused.GEMV_BLOCK_N, fused.GEMV_BLOCK_K, fused.GEMV_WARPS, fused.GEMV_STAGES, fused.GEMV_DOT_ONE_ROW = config
                try:
                    y = fused.linear(x, w)
                    if fused._GEMV_FAILED:  # it fell back to F.linear: nothing of the GEMV to time
                        print(f"gemm {name} gemv {config}: does not build here", flush=True)
                        fused._GEMV_FAILED.clear()
                        continue
                    err = ((y.float() - torch.nn.functional.linear(x, w).float()).norm() / y.float().norm()).item()
                    kind = "gemv" + "x".join(map(str, config[:4])) + ("dot" if config[4] else "sum")
                    add(name, kind, batch, w, functools.partial(fused.linear, x, w))
                    rows[-1]["rel_err"] = err
                except Exception as error:  # a tile setting that does not compile or fit: say so, go on
                    print(f"gemm {name} gemv {config}: {type(error).__name__}: {str(error)[:200]}", flush=True)
                finally:
                    fused.GEMV_BLOCK_N, fused.GEMV_BLOCK_K, fused.GEMV_WARPS, fused.GEMV_STAGES, fused.GEMV_DOT_ONE_ROW = defaults
    fused.GEMV_TILES.update(tiles)
    for batch in batches:
        per = {}
        for r in rows:
            if r["batch"] == batch:
                per.setdefault(r["gemm"], {})[r["kind"]] = r["us"]
        split = sum(per[n]["cublas"] for n in ("q", "k", "v", "o", "gate", "up", "down"))
        joined = sum(per[n]["cublas"] for n in ("qkv", "o", "gate_up", "down"))
        best = {n: min(per[n].values()) for n in ("qkv", "o", "gate_up", "down")}
        gemv = {n: min((t for k, t in per[n].items() if k.startswith("gemv")), default=float("nan")) for n in best}
        print(f"gemm x{batch} per layer: cuBLAS apart {split:.1f} us, cuBLAS concatenated {joined:.1f} us, "
              f"best GEMV {sum(gemv.values()):.1f} us, best of all {sum(best.values()):.1f} us "
              f"(x{cfg.num_hidden_layers} layers: {split * cfg.num_hidden_layers / 1e3:.2f} / "
              f"{joined * cfg.num_hidden_layers / 1e3:.2f} / {sum(gemv.values()) * cfg.num_hidden_layers / 1e3:.2f} ms)",
              flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="check,tpot", help="comma-separated: check, tpot, compile, profile, gemm")
    p.add_argument("--profile", default="duo25-graph:131072", help="variant:length of the profile part")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--lengths", default="8192,32768,131072,524288")
    p.add_argument("--variants", default=",".join(["eager"] + KVPRESS_VARIANTS))
    p.add_argument("--compile-lengths", default="32768,131072")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per row (after 3 warm-up steps)")
    p.add_argument("--chunk", type=int, default=16384, help="tokens per fill chunk (up to 1/4 of L)")
    p.add_argument("--tag", default="", help="suffix of the JSON names (e.g. _round2)")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny 2-layer model on CPU: checks the script in seconds")
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    torch.manual_seed(0)
    if a.smoke:
        torch.set_num_threads(1)
    model = common.build_model(dev, smoke=a.smoke, layers=2 if a.smoke else 32)
    env = common.environment()
    tag = common.device_tag(env) + a.tag
    out_dir = Path(a.out or (Path(__file__).parent / "results"))
    parts = a.parts.split(",")
    batches = [int(b) for b in a.batch.split(",")]
    lengths = [int(x) for x in a.lengths.split(",")] if not a.smoke else [300]
    bw = common.copy_bandwidth(dev)
    print(f"{env['device']}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write), weights read per step "
          f"{weight_bytes(model) / 1e9:.2f} GB", flush=True)
    base = {"env": env, "copy_bandwidth_Bps": bw, "weight_bytes": weight_bytes(model), "sink": SINK, "recent": RECENT,
            "steps": a.steps}
    cols = [("variant", "{}"), ("tokens", "{}"), ("batch", "{}"), ("tpot_ms", "{:.2f}"), ("floor_ms", "{:.2f}"),
            ("vs_floor", "{:.2f}"), ("host_ms", "{:.2f}"), ("peak_GiB", "{:.1f}"), ("kv_GiB", "{:.2f}"), ("skipped", "{}")]
    steps = 2 if a.smoke else a.steps
    if "check" in parts:
        res = {**base, "check": check_part(model, dev, 300 if a.smoke else 8192, 8 if a.smoke else 64)}
        common.write_json(out_dir / f"graph_check_{tag}.json", res)
    if "gemm" in parts:
        gemm_batches = sorted(set(batches) | {1, 4})
        common.write_json(out_dir / f"graph_gemm_{tag}.json", {**base, "rows": gemm_part(model, gemm_batches, dev, bw)})
    if "profile" in parts:
        name, length = a.profile.split(":")
        length = 300 if a.smoke else int(length)
        res = {**base, "profile": profile_part(model, name, length, batches[0], min(a.chunk, max(length // 4, 128)), dev)}
        common.write_json(out_dir / f"graph_profile_{name.replace('/', '_')}_batch{batches[0]}_{tag}.json", res)
    for part, names, part_lengths in (("tpot", a.variants.split(","), lengths),
                                      ("compile", ["static-compile"], [int(x) for x in a.compile_lengths.split(",")])):
        if part not in parts:
            continue
        part_lengths = [300] if a.smoke else part_lengths
        for batch in batches:
            path = out_dir / f"graph_{part}_batch{batch}_{tag}.json"
            rows = []

            def save(rows, path=path):
                common.write_json(path, {**base, "rows": rows, "targets": targets(rows)})

            for L in part_lengths:
                chunk = 128 if a.smoke else min(a.chunk, max(L // 4, 128))
                tpot_part(model, names, [L], batch, steps, chunk, dev, bw, rows=rows, save=save)
            common.table(f"TPOT ({part}), Llama-3-8B shape, batch {batch}", rows, cols)
            for what, ok in targets(rows).items():
                print(f"target {what}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
