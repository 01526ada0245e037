"""One million tokens on one GPU: MInference prefill + DuoAttention decode, end to end (issue #18).

    python benchmarks/million.py                                   # 256K, 512K, 1M x Duo 50%, 25%
    python benchmarks/million.py --lengths 1048576 --retrieval 0.5 --out million.json
    python benchmarks/million.py --tiny                            # CPU, tiny model, seconds

The model: Llama-3-8B dimensions, rope theta 500000, ``max_position_embeddings`` 4M, random bf16
weights (``bench_minference.build_model``; ``--attention local``, the default, gives the q/k
projections a bias shared by each KV head's query heads so that attention decays with distance as
in trained models; ``random``: none, every score noise, the worst case for the dynamic index).

Per retrieval share (``--retrieval``: the fraction of KV heads that keep every token, chosen by
random gates, an ablation split) the model is patched once::

    kvpress.patch(model, "minference+duo", config={"minference": <the reference's published
                  Llama-3-8B patterns>, "duo": DuoConfig(sparsity=1 - retrieval)},
                  prefill_chunk_size=CHUNK, decode="graph")

and for each length a random prompt is prefilled in ``--chunk``-token chunks (retrieval heads
sparse through MInference, each chunk's index built against every previous key; streaming heads
through the A-shape kernel; the first chunk dense below ``min_length``), then ``--decode-tokens``
greedy tokens are decoded, replayed from a CUDA graph. Reported per run: time to first token
(prefill of the whole prompt, the first token's logits included) and the share of it in the
attention modules (GPU time between forward hooks: projections, RoPE, attention), time per output token (median
of the steps after the first two, which capture the graph), the seconds and the peak allocated
memory of each chunk, the peak of the whole run, the KV cache's bytes (``kvpress.kv_cache_bytes``).

``PYTORCH_CUDA_ALLOC_CONF`` defaults to ``expandable_segments:True`` here (set it, even empty, to
choose otherwise). The unpatched model is not prefilled (at 1M its dense attention alone would take ~10 minutes);
its outcome is whether its dense KV cache (``2 x layers x kv_heads x head_dim x tokens`` bf16:
128 GiB at 1M) can be allocated beside the weights: the allocation is attempted and an
out-of-memory error recorded.
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch touches CUDA

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_minference as bm  # noqa: E402
import common as c  # noqa: E402

import kvpress  # noqa: E402
from kvpress.methods.minference import MInferenceConfig  # noqa: E402

K = 1024
GiB = 2**30


def _peak(dev) -> float:
    return torch.cuda.max_memory_allocated() / GiB if c._is_cuda(dev) else 0.0


class AttentionTimer:
    """GPU time of the attention modules (projections, RoPE and attention) during prefill: CUDA events
    recorded by forward hooks, read after each chunk (no sync inside; CUDA only, removed before decode)."""

    def __init__(self, model, dev):
        self.events, self.handles = [], []
        if not c._is_cuda(dev):
            return
        for layer in model.model.layers:
            self.handles.append(layer.self_attn.register_forward_pre_hook(lambda *a: self._mark()))
            self.handles.append(layer.self_attn.register_forward_hook(lambda *a: self._mark()))

    def _mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)

    def take(self) -> float:
        """Seconds spent in attention modules since the last call (after a sync)."""
        pairs = zip(self.events[0::2], self.events[1::2])
        total = sum(start.elapsed_time(end) for start, end in pairs) / 1e3
        self.events = []
        return total

    def remove(self):
        for handle in self.handles:
            handle.remove()


@torch.inference_mode()
def run(model, L: int, chunk: int, decode_tokens: int, dev) -> dict:
    """Chunked prefill of ``L`` random tokens, then ``decode_tokens`` greedy decode steps."""
    arg = c.cache_argument(model)
    c._empty_cache(dev)
    c._reset_peak(dev)
    cache = kvpress.make_cache(model)
    ids = torch.randint(0, model.config.vocab_size, (1, L), device=dev)
    chunks = []
    timer = AttentionTimer(model, dev)
    c._sync(dev)
    t0 = time.perf_counter()
    for s in range(0, L, chunk):
        t = time.perf_counter()
        out = model(input_ids=ids[:, s:s + chunk], **{arg: cache}, use_cache=True, logits_to_keep=1)
        c._sync(dev)
        chunks.append({"tokens": min(L, s + chunk), "s": time.perf_counter() - t, "attention_s": timer.take(),
                       "peak_GiB": _peak(dev)})
    tok = out.logits[:, -1:].argmax(-1)
    c._sync(dev)
    ttft = time.perf_counter() - t0
    timer.remove()
    peak_prefill = _peak(dev)
    c._reset_peak(dev)
    times = []
    for _ in range(decode_tokens):
        c._sync(dev)
        t = time.perf_counter()
        out = model(input_ids=tok, **{arg: cache}, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        c._sync(dev)
        times.append(time.perf_counter() - t)
    steady = sorted(times[2:] or times)
    row = {"tokens": L, "chunk": chunk, "ttft_s": ttft, "attention_s": sum(x["attention_s"] for x in chunks),
           "tpot_ms": steady[len(steady) // 2] * 1e3,
           "tpot_first_steps_ms": [x * 1e3 for x in times[:2]], "peak_prefill_GiB": peak_prefill,
           "peak_decode_GiB": _peak(dev), "kv_GiB": kvpress.kv_cache_bytes(cache) / GiB, "chunks": chunks}
    del cache, out, ids
    c._empty_cache(dev)
    return row


def unpatched_outcome(model, L: int, dev) -> dict:
    """Whether the unpatched model's dense KV cache for ``L`` tokens can be allocated beside the weights."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    need = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * L * model.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    row = {"tokens": L, "dense_kv_GiB": need / GiB, "weights_GiB": weights / GiB}
    if c._is_cuda(dev):
        free, total = torch.cuda.mem_get_info()
        row.update(free_GiB=free / GiB, device_GiB=total / GiB)
    c._empty_cache(dev)
    try:
        buf = torch.empty(need, dtype=torch.uint8, device=dev)
        row.update(kv_allocates=True, outcome="the dense KV cache fits beside the weights (prefill not run)")
        del buf
    except torch.OutOfMemoryError as error:
        row.update(kv_allocates=False, outcome="out of memory", error=str(error).split("\n")[0][:300])
    c._empty_cache(dev)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="262144,524288,1048576")
    p.add_argument("--retrieval", default="0.5,0.25", help="fractions of KV heads that are retrieval heads")
    p.add_argument("--chunk", type=int, default=262144,
                   help="prefill chunk (tokens); 256K: half the index builds over the earlier keys of 128K chunks "
                        "(1M at 50%%: 41.9 s against 45.9 s) for ~24 GiB more activation peak")
    p.add_argument("--decode-tokens", type=int, default=12)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--attention", default="local", choices=["local", "random"])
    p.add_argument("--locality", type=float, default=0.6, help="size of the shared q/k bias (bench_minference.build_model)")
    p.add_argument("--patterns", default="published", choices=["published", "candidates", "default"],
                   help="MInference patterns of the retrieval heads (bench_minference.model_patterns)")
    p.add_argument("--union-heads", type=int, default=None, help="MInferenceConfig.union_heads (default: the config's)")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (checks the script; times mean nothing)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = "cpu" if args.tiny else "cuda"
    lengths = [384, 640] if args.tiny else [int(x) for x in args.lengths.split(",")]
    chunk = 256 if args.tiny else args.chunk
    layers = 2 if args.tiny else args.layers
    if args.tiny:
        torch.set_num_threads(1)
    env = c.environment()
    model = bm.build_model(dev, layers, args.attention, smoke=args.tiny, locality=args.locality)
    patterns = bm.model_patterns(args.patterns, layers, model.config.num_attention_heads)
    options = {"min_length": 256, "min_queries": 16, "max_density": 1e9} if args.tiny else {}
    if args.union_heads is not None:
        options["union_heads"] = args.union_heads
    minference = MInferenceConfig(patterns=patterns, **options)
    rope = getattr(model.config, "rope_parameters", None) or {}
    result = {"env": env, "model": {"layers": layers, "attention": args.attention, "locality": args.locality,
                                    "rope_theta": rope.get("rope_theta", getattr(model.config, "rope_theta", None)),
                                    "max_position_embeddings": model.config.max_position_embeddings},
              "minference": {"patterns": args.patterns,
                             "min_length": minference.min_length, "union_heads": minference.union_heads},
              "chunk": chunk, "runs": [], "unpatched": []}
    for L in lengths:
        result["unpatched"].append(unpatched_outcome(model, L, dev))
        print(f"unpatched {L // K}K: {result['unpatched'][-1]['outcome']} (dense KV "
              f"{result['unpatched'][-1]['dense_kv_GiB']:.1f} GiB)", flush=True)
    out = args.out or Path(__file__).resolve().parent / "results" / f"million_{c.device_tag(env)}.json"
    save = not args.tiny or args.out
    for retrieval in [float(x) for x in args.retrieval.split(",")]:
        duo = bm.random_duo(layers, model.config.num_key_value_heads, retrieval)
        kvpress.patch(model, "minference+duo", config={"minference": minference, "duo": duo},
                      prefill_chunk_size=chunk, decode="graph")
        try:
            # warm-up: one sparse chunk (T >= min_length), so the Triton kernels compile outside the timing
            run(model, min(lengths[0], 2 * chunk if args.tiny else max(chunk, minference.min_length)), chunk, 3, dev)
            for L in lengths:
                try:
                    row = run(model, L, chunk, args.decode_tokens, dev)
                except torch.OutOfMemoryError as error:
                    row = {"tokens": L, "chunk": chunk, "outcome": "out of memory", "error": str(error).split("\n")[0][:300],
                           "peak_GiB": _peak(dev)}
                    c._empty_cache(dev)
                row = {"retrieval": retrieval, **row}
                result["runs"].append(row)
                if save:  # a run cut short (timeout) still leaves the finished rows
                    c.write_json(out, {**result, "partial": True})
                if "ttft_s" in row:
                    print(f"minference+duo {retrieval:.0%} {L // K}K: TTFT {row['ttft_s']:.1f} s (attention modules "
                          f"{row['attention_s']:.1f} s), TPOT {row['tpot_ms']:.2f} ms, "
                          f"peak prefill {row['peak_prefill_GiB']:.1f} / decode {row['peak_decode_GiB']:.1f} GiB, "
                          f"KV {row['kv_GiB']:.2f} GiB; chunks (s): " + ", ".join(f"{x['s']:.2f}" for x in row["chunks"]),
                          flush=True)
                else:
                    print(f"minference+duo {retrieval:.0%} {L // K}K: {row['outcome']}", flush=True)
        finally:
            kvpress.unpatch(model)
    c.table("1M tokens on one GPU: minference+duo (TTFT s, TPOT ms, GiB)", [r for r in result["runs"] if "ttft_s" in r],
            [("retrieval", "{:.2f}"), ("tokens", "{:d}"), ("ttft_s", "{:.2f}"), ("attention_s", "{:.2f}"), ("tpot_ms", "{:.2f}"),
             ("peak_prefill_GiB", "{:.1f}"), ("peak_decode_GiB", "{:.1f}"), ("kv_GiB", "{:.2f}")])
    if save:
        c.write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
