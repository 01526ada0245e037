"""Shared measurement code of the kvpress benchmarks: every method's benchmark (``bench_duo.py``,
``bench_minference.py``, ``bench_palu.py``, ``bench_less.py``) times, builds its model and records
its results through this module, so that all are measured the same way; a method's script adds
only its own cases (kernels, configs, variants).

    import common as c          # the benchmarks folder is on sys.path when a script in it runs

API (times in seconds, sizes in bytes, unless a name says otherwise):

Timing
  bench(fn, rep_ms=200)               median time of ``fn`` (``triton.testing.do_bench``: CUDA
                                      events, L2 flushed by writing); on CPU one call's wall time
  graph_time(fn, replays=30, flush="read")
                                      GPU time of ``fn`` replayed in a CUDA graph with a cold L2
                                      (flushed by *reading* 256 MiB; ``"write"``: by zeroing it),
                                      the flush's own time subtracted; on CPU ``bench(fn)``
  copy_bandwidth(dev)                 device copy bandwidth, bytes read + written per second
  read_floor_rows(dev, bw, sizes_mb=..., programs=...)
                                      rows: what a plain read of as many bytes costs (Triton sum
                                      kernel over several grid sizes, and torch's sum; CUDA only)
  gpu_busy(step, n=4)                 GPU busy time per call of ``step`` (torch profiler)
  gpu_kernels(step, n=4)              its kernels: name -> (us, launches) per call
Records
  environment()                       {device, torch, triton, transformers, cuda, commit}
  device_tag(env)                     the device name as a file-name part
  write_json(path, result)            writes the result (indent 1), creating the folder
  table(title, rows, cols)            prints rows as a table; cols: [(key, format), ...]
  rand(*shape, dev, dtype=bf16)       a random tensor
Model (Llama-3-8B dimensions, random weights)
  LLAMA3_8B, llama8b_config(smoke=False, max_positions=1 << 22, layers=32)
  build_model(dev, smoke=False, max_positions=1 << 22, layers=32)
                                      a bf16 ``LlamaForCausalLM`` in eval mode, no grads
                                      (``smoke``: the same heads, hidden 256, vocab 512: CPU checks)
  shared_twin(model)                  another model object over the same weights (patch one, not
                                      the other)
  cache_argument(model), forward(model, ids, cache)
                                      the forward's cache keyword (``cache`` from transformers 5.24,
                                      ``past_key_values`` before) and one cached forward
                                      (``use_cache=True, logits_to_keep=1``)
Variants
  A variant is a name and a context manager ``variant(model, name)`` that makes ``model`` that
  variant inside the block and yields ``make_cache()`` (an empty cache for it). A method's script
  writes its own ``variant`` that hands the baseline names to ``baseline_variant`` and its own
  names to ``kvpress_variant``.
  BASELINES, baseline_variant(model, name)
                                      ``unpatched`` (the model's sdpa, torch's backend choice,
                                      ``DynamicCache``) and ``unpatched-flash`` (SDPA limited to
                                      flash / memory-efficient)
  kvpress_variant(model, method, config=None, **options)
                                      ``kvpress.patch`` for the block; yields ``kvpress.make_cache``
Runners (``names``: variant names, ``variant``: as above)
  run_context(model, L, chunk, new_tokens, dev, make_cache)
                                      chunked prefill of L random tokens, then greedy decode:
                                      (time to first token = prefill s, TPOT s, peak prefill B,
                                      peak decode B, KV cache B, GPU s per token)
  e2e_rows(model, dev, lengths, names, variant, chunk, new_tokens, warmup_tokens=4096)
                                      ``run_context`` per variant and length (rows)
  tpot_rows(model, dev, lengths, names, variant, steps, chunk, batch=1)
                                      TPOT measured interleaved over twins of ``model`` (rows)
  fill_cache(model, cache, tokens, chunk, dev, batch=1), check_fill(model, make_cache, chunk, dev)
                                      a cache filled with random K/V by its own updates, checked
                                      byte for byte against a real chunked prefill
  fits(model, make_cache, L, chunk, dev), longest_fitting(probe, lo, hi, step)
  max_context_rows(model, dev, names, variant, chunk, brackets, step, search=longest_fitting)
                                      the longest context each variant runs (rows)
  smoke()                             runs the runners on a tiny model on CPU in seconds
                                      (``python benchmarks/common.py``)
"""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import transformers
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

import kvpress
import kvpress.api

K = 1024
D = 128  # head dim of the 8B shape


# ----------------------------------------------------------------------------------------------
# timing


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


def graph_time(fn, replays=30, flush="read", warmup_s=None):
    """GPU time of ``fn`` in seconds with no CPU launch overhead and a cold L2: ``flush(); fn()`` is
    captured in a CUDA graph, replayed for ``warmup_s`` seconds (the GPU busy, as in a decode loop, before
    anything is timed: the first replays after an idle spell ran up to 9% slower for issue-bound kernels, Palu
    round 49) and timed per replay with events (median), minus the flush alone. ``warmup_s`` default: the
    environment's ``GRAPH_WARMUP_S``, else 0.05 (0: no warm-up, as before 2026-12-03).

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
        warm = float(os.environ.get("GRAPH_WARMUP_S", 0.05)) if warmup_s is None else warmup_s
        deadline = time.perf_counter() + warm
        while time.perf_counter() < deadline:
            for _ in range(10):
                graph.replay()
            torch.cuda.synchronize()
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


class _SkippedLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def skipped_launches(module, name):
    """Within the block, launches of the Triton kernel ``module.<name>`` do nothing (to time the rest of
    a multi-launch step)."""
    kernel = getattr(module, name)
    setattr(module, name, _SkippedLaunch())
    try:
        yield
    finally:
        setattr(module, name, kernel)


def copy_bandwidth(dev):
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = (1 << 30) if dev == "cuda" else (1 << 20)
    a, b = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
    a.random_()
    return 2 * n / bench(lambda: b.copy_(a))


@triton.jit
def _read_kernel(X, Out, per_program, BLOCK: tl.constexpr):
    """Sum ``per_program`` elements of ``X`` per program: nothing but reading memory."""
    start = tl.program_id(0).to(tl.int64) * per_program
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(0, per_program, BLOCK):
        acc += tl.load(X + start + offset + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(Out + tl.program_id(0), tl.sum(acc))


def read_floor_rows(dev, bw, sizes_mb=(134.4, 268.7, 536.9, 2147.5), programs=(132, 264, 528, 1056, 2112)):
    """What reading ``sizes_mb`` MB costs with nothing else to do: the fastest of a plain Triton read
    kernel over several grid sizes, and torch's sum, timed like a decode kernel (``graph_time``:
    CUDA graph, L2 flushed by reading). ``bound_us``: the bytes over the copy bandwidth ``bw``."""
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


def gpu_kernels(step, n=4) -> dict[str, tuple[float, float]]:
    """The kernels and copies of one call of ``step`` (torch profiler, ``n`` calls): name -> (us per call, launches
    per call), the longest first. Empty without CUDA or when the profiler fails."""
    if not torch.cuda.is_available():
        return {}
    try:
        from torch.autograd import DeviceType

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                step()
            torch.cuda.synchronize()
        totals = collections.defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                totals[e.name][0] += e.time_range.elapsed_us() / n
                totals[e.name][1] += 1 / n
        return {name: (us, count) for name, (us, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])}
    except Exception as error:  # the profiler is a nice-to-have here
        print(f"gpu_kernels failed: {error!r}")
        return {}


def gpu_busy(step, n=4):
    """GPU time per call of ``step`` (sum of its kernels' and copies' durations, torch profiler):
    what a decode step costs the GPU, apart from the Python overhead of eager transformers.
    NaN without CUDA."""
    kernels = gpu_kernels(step, n)
    return sum(us for us, _ in kernels.values()) * 1e-6 if kernels else float("nan")


def _is_cuda(dev) -> bool:
    return torch.device(dev).type == "cuda"


def _sync(dev) -> None:
    if _is_cuda(dev):
        torch.cuda.synchronize()


def _reset_peak(dev) -> None:
    if _is_cuda(dev):
        torch.cuda.reset_peak_memory_stats()


def _peak(dev) -> int:
    """Peak allocated device bytes since the last reset (0 off CUDA)."""
    return torch.cuda.max_memory_allocated() if _is_cuda(dev) else 0


def _empty_cache(dev) -> None:
    if _is_cuda(dev):
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# records


def environment():
    """Device name and the versions that decide the numbers; ``commit``: ``git describe`` of this
    checkout (``-dirty`` when it has uncommitted changes)."""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda, "commit": commit}


def device_tag(env):
    """The device name as a file-name part (``NVIDIA_H100_80GB_HBM3``)."""
    return env["device"].replace(" ", "_").replace("/", "_")


def write_json(path, result):
    """Write ``result`` as JSON (indent 1) to ``path``, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}", flush=True)
    return path


def table(title, rows, cols):
    """Print ``rows`` (dicts) under ``title``; ``cols``: [(key, format), ...], ``-`` where a row lacks a key (or has None)."""
    print(f"\n{title}")
    print(" | ".join(c for c, _ in cols))
    for r in rows:
        print(" | ".join(fmt.format(r[c]) if r.get(c) is not None else "-" for c, fmt in cols))


def rand(*shape, dev, dtype=torch.bfloat16):
    return torch.randn(*shape, device=dev, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# the 8B-shaped model

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5)
SMOKE_SIZE = dict(vocab_size=512, hidden_size=256, intermediate_size=512)


def llama8b_config(smoke=False, max_positions=1 << 22, layers=32):
    """Llama-3-8B dimensions (``smoke``: the same heads, tiny everything else, for a CPU check);
    ``max_positions``: the config's ``max_position_embeddings``; ``layers``: decoder layers."""
    from transformers import LlamaConfig

    size = {**LLAMA3_8B, **(SMOKE_SIZE if smoke else {}), "num_hidden_layers": layers}
    return LlamaConfig(**size, max_position_embeddings=max_positions, tie_word_embeddings=False)


def build_model(dev, smoke=False, max_positions=1 << 22, layers=32):
    """A ``LlamaForCausalLM`` of ``llama8b_config(smoke, max_positions, layers)`` with random bf16
    weights on ``dev`` (15.0 GiB at the full size), in eval mode with no gradients."""
    from transformers import LlamaForCausalLM

    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(llama8b_config(smoke, max_positions, layers))
    finally:
        torch.set_default_dtype(torch.float32)
    model.config.use_cache = True
    return model.eval().requires_grad_(False)


def shared_twin(model):
    """Another model object over the same weights (no copy), with its own config and modules: one
    can be patched while the other is not."""
    with torch.device("meta"):
        twin = type(model)(copy.deepcopy(model.config))
    twin.load_state_dict(model.state_dict(), assign=True)
    twin.model.rotary_emb = model.model.rotary_emb  # its buffers are not in the state dict
    return twin.eval()


def cache_argument(model) -> str:
    """The keyword under which ``model``'s forward takes its cache: ``cache`` from transformers
    5.24 (``past_key_values`` still works there, with a deprecation warning, until 5.40),
    ``past_key_values`` before."""
    return kvpress.api.cache_argument(list(inspect.signature(model.forward).parameters))


def forward(model, ids, cache, arg=None):
    """One cached forward of ``ids`` (``use_cache=True, logits_to_keep=1``); ``arg``: the cache
    keyword (``cache_argument(model)``; pass it in timed loops to skip the signature lookup)."""
    return model(input_ids=ids, **{arg or cache_argument(model): cache}, use_cache=True, logits_to_keep=1)


# ----------------------------------------------------------------------------------------------
# variants

# baseline name -> the SDPA backends it is limited to (None: torch's own choice)
BASELINES = {"unpatched": None,
             "unpatched-flash": (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)}


def _sdpa_limit(name):
    backends = BASELINES[name]
    return sdpa_kernel(list(backends)) if backends else contextlib.nullcontext()


@contextlib.contextmanager
def baseline_variant(model, name):
    """``unpatched``: the model's own sdpa attention with torch's backend choice (cuDNN on an H100
    with torch 2.11, whose decode call costs ~1.8 ms of CPU), ``DynamicCache``;
    ``unpatched-flash``: the same with SDPA limited to flash (memory-efficient where flash does not
    apply: masked prefill chunks). Yields a cache factory."""
    from transformers import DynamicCache

    if name not in BASELINES:
        raise ValueError(f"unknown baseline variant {name!r}; baselines: {', '.join(BASELINES)}")
    with _sdpa_limit(name):
        yield lambda: DynamicCache(config=model.config)


@contextlib.contextmanager
def kvpress_variant(model, method, config=None, **options):
    """``model`` patched with ``kvpress.patch(model, method, config, **options)`` for the block;
    yields ``lambda: kvpress.make_cache(model)``."""
    kvpress.patch(model, method, config=config, **options)
    try:
        yield lambda: kvpress.make_cache(model)
    finally:
        kvpress.unpatch(model)


# ----------------------------------------------------------------------------------------------
# end to end: time to first token, time per output token, peak memory


@torch.inference_mode()
def run_context(model, L, chunk, new_tokens, dev, make_cache):
    """Prefill L random tokens in chunks of ``chunk``, then ``new_tokens`` greedy decode steps.
    Returns prefill seconds (the time to first token), median time per output token (s, over the
    steps after the first two), peak allocated bytes of the prefill and of the decode, the cache's
    bytes (``kvpress.kv_cache_bytes``) and the GPU busy seconds of one decode step."""
    arg = cache_argument(model)
    _empty_cache(dev)
    _reset_peak(dev)
    ids = torch.randint(0, model.config.vocab_size, (1, L), device=dev)
    cache = make_cache()
    t0 = time.perf_counter()
    for s in range(0, L, chunk):
        out = model(input_ids=ids[:, s:s + chunk], **{arg: cache}, use_cache=True, logits_to_keep=1)
    _sync(dev)
    t_prefill = time.perf_counter() - t0
    peak_prefill = _peak(dev)
    _reset_peak(dev)
    tok = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(new_tokens):
        _sync(dev)
        t = time.perf_counter()
        out = model(input_ids=tok, **{arg: cache}, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        _sync(dev)
        times.append(time.perf_counter() - t)
    tpot = sorted(times[2:])[len(times[2:]) // 2]
    peak_decode = _peak(dev)
    gpu_per_token = gpu_busy(lambda: model(input_ids=tok, **{arg: cache}, use_cache=True, logits_to_keep=1))
    cache_bytes = kvpress.kv_cache_bytes(cache)
    del cache, out, ids
    return t_prefill, tpot, peak_prefill, peak_decode, cache_bytes, gpu_per_token


def e2e_rows(model, dev, lengths, names, variant, chunk, new_tokens, warmup_tokens=4 * K):
    """Prefill time (time to first token), TPOT, GPU time per token, peaks and KV bytes per variant
    and length (``run_context``); each variant first runs ``warmup_tokens`` once (compile, allocate)."""
    rows = []
    for name in names:
        with variant(model, name) as make_cache:
            run_context(model, warmup_tokens, min(chunk, warmup_tokens // 2), 3, dev, make_cache)
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


@torch.inference_mode()
def tpot_rows(model, dev, lengths, names, variant, steps, chunk, batch=1):
    """Time per output token of the variants ``names``, measured interleaved: each variant runs on
    its own twin of ``model`` (``shared_twin``), its cache filled to L tokens (``fill_cache``), then
    rounds of one decode step per variant, so that the host's varying speed affects all alike.
    Median of ``steps`` rounds (after 3 warm-up rounds); ``host_ms``: the time until the forward
    returns, before the GPU has finished (launch time).

    The baselines' SDPA backend limit is a global setting, so it is entered around each of their
    steps; every other variant's context is entered once, on its own twin, for the whole run."""
    twins = {name: shared_twin(model) for name in names}
    args = {name: cache_argument(twins[name]) for name in names}
    rows = []
    with contextlib.ExitStack() as stack:
        factories = {name: stack.enter_context(variant(twins[name], name)) for name in names if name not in BASELINES}
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
                    with _sdpa_limit(name) if name in BASELINES else contextlib.nullcontext():
                        _sync(dev)
                        t = time.perf_counter()
                        twins[name](input_ids=tok, **{args[name]: caches[name]}, use_cache=True, logits_to_keep=1)
                        t_host = time.perf_counter() - t
                        _sync(dev)
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
            _empty_cache(dev)
    return rows


# ----------------------------------------------------------------------------------------------
# longest context that fits


@torch.inference_mode()
def fill_cache(model, cache, tokens, chunk, dev, batch=1):
    """Append ``tokens`` tokens of random K/V (``batch`` rows) to every layer of ``cache``, ``chunk``
    at a time: the tensors a chunked prefill leaves in the cache (same updates, same growth), without
    its compute. Works for ``DynamicCache`` and kvpress caches whose layers store K/V in ``update``
    (a layer whose update returns an object with ``write_new()``, as Duo's, leaves the writing to
    the attention: it is called here). ``check_fill`` verifies the bytes for a given cache."""

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
            if press and hasattr(held, "write_new"):  # room reserved; the attention would write the tokens
                held.write_new()
        if press:
            kvpress.cache.end_forward(cache)


def check_fill(model, make_cache, chunk, dev, L=None):
    """``fill_cache`` leaves a cache of exactly the bytes a real chunked prefill of as many tokens
    leaves (checked at ``L`` tokens, default 3.5 chunks); raises if not. Returns ``L``."""
    L = L or 7 * chunk // 2
    real, filled = make_cache(), make_cache()
    arg = cache_argument(model)
    with torch.inference_mode():
        ids = torch.randint(0, model.config.vocab_size, (1, L), device=dev)
        for start in range(0, L, chunk):
            model(input_ids=ids[:, start:start + chunk], **{arg: real}, use_cache=True, logits_to_keep=1)
    fill_cache(model, filled, L, chunk, dev)
    if kvpress.kv_cache_bytes(real) != kvpress.kv_cache_bytes(filled) or real.get_seq_length() != filled.get_seq_length():
        raise AssertionError(f"fill_cache: {kvpress.kv_cache_bytes(filled)} bytes, a real prefill {kvpress.kv_cache_bytes(real)}"
                             f" ({filled.get_seq_length()} vs {real.get_seq_length()} tokens); this cache's layers "
                             "need their own filling in fill_cache")
    return L


def fits(model, make_cache, L, chunk, dev, decode_steps=4):
    """Whether a context of ``L`` tokens runs on the GPU: the cache is filled to ``L - chunk`` tokens
    (``fill_cache``), then the last prefill chunk and ``decode_steps`` decode steps run for real.
    Returns (fits, peak allocated bytes, KV cache bytes)."""
    arg = cache_argument(model)

    def attempt():
        cache = make_cache()
        fill_cache(model, cache, L - chunk, chunk, dev)
        with torch.inference_mode():
            ids = torch.randint(0, model.config.vocab_size, (1, chunk), device=dev)
            out = model(input_ids=ids, **{arg: cache}, use_cache=True, logits_to_keep=1)
            for _ in range(decode_steps):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), **{arg: cache}, use_cache=True,
                            logits_to_keep=1)
        return kvpress.kv_cache_bytes(cache)

    _empty_cache(dev)
    _reset_peak(dev)
    try:
        ok, cache_bytes = True, attempt()
    except torch.OutOfMemoryError:
        ok, cache_bytes = False, None
    peak = _peak(dev)
    _empty_cache(dev)
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


def max_context_rows(model, dev, names, variant, chunk, brackets, step, search=longest_fitting):
    """Longest context for which the last prefill chunk and decode run, per variant (``search`` over
    ``brackets[name]`` = (lo, hi) tokens, resolution ``step``); ``vs_unpatched``: relative to the
    first variant."""
    rows = []
    for name in names:
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
# CPU check


def smoke(out_dir=None):
    """Every runner on a tiny 2-layer model of the 8B heads, on CPU (no CUDA graphs), in seconds:
    baselines, plus the ``dense`` kvpress method when it is registered. Writes one JSON to
    ``out_dir`` (a temporary folder by default) and returns the result."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a check, not a measurement: one thread does not fight a busy host's cores
    dev = "cpu"
    model = build_model(dev, smoke=True, layers=2)
    names = list(BASELINES) + (["dense"] if "dense" in kvpress.METHODS else [])

    def variant(m, name):
        return baseline_variant(m, name) if name in BASELINES else kvpress_variant(m, name)

    env = environment()
    x = torch.randn(1 << 16)
    res = {"env": env, "bench_s": bench(lambda: x.sum()), "graph_time_s": graph_time(lambda: x.sum()),
           "copy_bandwidth_Bps": copy_bandwidth(dev), "variants": names}
    res["e2e"] = e2e_rows(model, dev, [300], names, variant, chunk=128, new_tokens=4, warmup_tokens=64)
    res["tpot"] = tpot_rows(model, dev, [256], names, variant, steps=2, chunk=128, batch=2)
    res["maxctx"] = max_context_rows(model, dev, names, variant, 128, {name: (256, 512) for name in names}, 256,
                                     search=lambda probe, lo, hi, step: lo if probe(lo) else 0)
    for rows in (res["e2e"], res["tpot"], res["maxctx"]):
        assert {row["variant"] for row in rows} == set(names), rows
    kv = {row["variant"]: row["kv_GiB"] for row in res["tpot"]}
    assert kv["unpatched"] == kv["unpatched-flash"] > 0, kv
    write_json(Path(out_dir or tempfile.mkdtemp(prefix="kvpress_smoke_")) / f"smoke_{device_tag(env)}.json", res)
    table("Smoke: end to end (CPU, tiny model)", res["e2e"],
          [("variant", "{}"), ("tokens", "{}"), ("prefill_s", "{:.3f}"), ("tpot_ms", "{:.2f}"), ("kv_GiB", "{:.6f}")])
    return res


if __name__ == "__main__":
    smoke()
