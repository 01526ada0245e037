"""LESS decode, one layer: a whole decode step (features + fold, attention over the kept tokens with
the state, heavy-hitter update and eviction) vs dense SDPA decode; end to end on the 8B shape; and
cache memory over generation.

    python benchmarks/bench_less.py layer [--lengths 32768 131072 524288] [--batch 1] [--budgets 512 1024 ...] [--smoke]
    python benchmarks/bench_less.py e2e [--lengths 32768 131072] [--new-tokens 32] [--smoke]
    python benchmarks/bench_less.py memory [--tokens 10240] [--smoke]

``layer``: Llama-3-8B attention shape (32 query heads, 8 KV heads, D 128, bf16), batch 1 (``--batch``). Dense is
SDPA over L cached tokens; LESS keeps a fixed budget per KV head whatever L is (H2O 1024 heavy +
1024 recent, Lambda 4 + 2044, and H2O 2048 + 2048), feature maps of the paper's size (R 8, hidden
512), state per KV head and per query head; plus the same step with the state off (attention,
heavy-hitter update and eviction only). ``graph_us``: the step captured in a CUDA graph and
replayed, cold L2 (``common.graph_time``): the GPU time of the step, what it costs in a decode
with ``decode="graph"``, and what the speed-up targets refer to. ``eager_us``: the step called
from Python (``common.bench``), launch overhead included. Before timing, one step is checked
against the torch reference (same maps in bf16). A step is ``kernel.launches()`` kernel launches
(2; 3 before 2026-11-30, whose single-program-per-head merge/evict loop made a step 58-130 us
whatever the context on the H200).

``e2e``: the 8B-shaped Llama (32 layers, random bf16 weights: speed and memory only, untrained
random LESS maps of the paper's size, H2O 1024 + 1024) prefilled with L random tokens in chunks of
8192 (LESS shrinks to its budget after every chunk), then ``--new-tokens`` greedy steps: time to
first token, time per output token (median), GPU busy time per token and peak memory, for the
unpatched model (SDPA, DynamicCache) and LESS with eager and graph decode (``common.e2e_rows``).

``memory``: an 8B-shaped Llama (4 layers, random weights; or ``--model DIR``, a local model, with
H2O 32 + 32 after a 256-token prompt) patched with LESS (random maps, graph decode: static steps,
uncaptured on CPU) generates ``--tokens`` tokens after a 4K prompt; the KV cache bytes are recorded
every 1024 steps (they must not move). Writes ``benchmarks/results/less_<part>_<device>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
import common as c  # noqa: E402

import kvpress  # noqa: E402
from kvpress.adapters import describe  # noqa: E402
from kvpress.kernels import less as kernel  # noqa: E402
from kvpress.kernels import less_reference as ref  # noqa: E402
from kvpress.methods import METHODS  # noqa: E402
from kvpress.methods.less import FeatureMaps, Less, LessConfig  # noqa: E402

METHODS.setdefault("less", Less)  # until kvpress.methods registers it

RESULTS = Path(__file__).parent / "results"
# settings timed beside the module's (kvpress/kernels/less.py: BLOCK_H 128, 3 stages, 16 splits at most (the 8B shape's
# 2049 slots: 11 splits of three 64-slot blocks), 4 warps per program in launch 1 and 8 in launch 2); the
# session of 2026-12-01 timed more (docs/less.md)
SETTINGS = {
    "launch 2 not a programmatic dependent launch": dict(USE_PDL=False),
    "launch 1 in 2 stages": dict(STEP_STAGES=2),
    "launch 1 with 256 hidden units per feature program": dict(BLOCK_H=256),
    "in 17 splits of two 64-slot blocks": dict(MAX_SPLITS=32),
    "in 33 splits of one 64-slot block": dict(MAX_SPLITS=64),
    "launch 1 in 8 warps per program": dict(STEP_WARPS=8),
    "launch 2 in 4 warps per program": dict(FINISH_WARPS=4),
    "attention blocks of 128 slots (9 splits of two), 2 stages": dict(BLOCK_N=128, STEP_STAGES=2),
    "attention blocks of 128 slots (9 splits of two), 1 stage": dict(BLOCK_N=128, STEP_STAGES=1),
    "attention blocks of 128 slots, 17 splits of one, 1 stage": dict(BLOCK_N=128, MAX_SPLITS=32, STEP_STAGES=1),
    "attention blocks of 128 slots, 17 splits of one, 1 stage, 256 hidden units per feature program":
        dict(BLOCK_N=128, MAX_SPLITS=32, STEP_STAGES=1, BLOCK_H=256),
    "attention blocks of 128 slots (9 splits of two), 8 warps, 1 stage": dict(BLOCK_N=128, STEP_WARPS=8, STEP_STAGES=1),
}
POLICIES = {"h2o 1024+1024": ref.Policy(0, 1024, 1024), "lambda 4+2044": ref.Policy(4, 0, 2044),
            "h2o 2048+2048": ref.Policy(0, 2048, 2048)}


def filled_cache(policy, hq, hkv, d, hs, rank, length, dev, dtype, batch=1):
    """A full LESS cache as after ``length`` tokens: every slot real, distinct ranks, a state, a pending victim."""
    slots = policy.slots
    cache = ref.LessCache.empty(batch, hkv, slots, d, hs, rank, dtype, dev)
    cache.k.copy_(c.rand(*cache.k.shape, dev=dev, dtype=dtype))
    cache.v.copy_(c.rand(*cache.v.shape, dev=dev, dtype=dtype))
    ranks = torch.cat([torch.arange(policy.sink), torch.arange(length - slots + policy.sink, length)]).to(dev)
    cache.rank.copy_(ranks.int()[None, None].expand(batch, hkv, slots))
    cache.score.copy_(torch.rand(cache.score.shape, device=dev))
    cache.hs.copy_(torch.randn(cache.hs.shape, device=dev))
    cache.z.copy_(torch.rand(cache.z.shape, device=dev))
    cache.spare.fill_(policy.sink + 1)
    cache.pending.fill_(1)
    return cache


def seeded_maps(d, hq, hs, rank, hidden, dev):
    """Random feature maps of the given size (seed 0) with small key scalings: what every step here runs with."""
    torch.manual_seed(0)
    w = FeatureMaps(d, hq, hs, rank, hidden).weights().to(dev)
    w.k_scale.fill_(0.05)
    w.k_mix_scale.fill_(0.05)
    return w


@triton.jit
def _empty_kernel(X):
    tl.store(X + tl.program_id(0), tl.load(X + tl.program_id(0)) + 1.0)


def empty_launches(programs):
    """GPU time of two back-to-back launches of a kernel that loads and stores one float per program,
    with ``programs`` (a pair) programs each."""
    x = torch.zeros(max(programs), device="cuda" if torch.cuda.is_available() else "cpu")

    def two():
        _empty_kernel[(programs[0],)](x)
        _empty_kernel[(programs[1],)](x)
    return c.graph_time(two)


class _Grids:
    """Records the grid of each kernel launched through it."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(grid[0])
        return self.kernel[grid]


def kernel_programs(step):
    """Programs of the step's two launches, ``(launch 1, launch 2)``."""
    log = []
    saved = kernel._step_kernel, kernel._finish_kernel
    kernel._step_kernel, kernel._finish_kernel = _Grids(saved[0], log), _Grids(saved[1], log)
    try:
        step()
    finally:
        kernel._step_kernel, kernel._finish_kernel = saved
    return tuple(log)


def kernel_settings(settings: dict):
    """A context that sets ``kernels.less``'s module settings (``{name: value}``, none for the module's
    own) and restores them afterwards; a name the module lacks raises ``AttributeError``."""
    return mock.patch.multiple(kernel, **settings) if settings else contextlib.nullcontext()


def launch_one(step):
    """GPU time of ``step`` with its second launch skipped: where the step's time goes. Launch 1 adds
    into the feature accumulators that launch 2 zeroes, so they are zeroed here afterwards (else the
    next whole step reads the sums of every replay)."""
    try:
        with c.skipped_launches(kernel, "_finish_kernel"):
            return c.graph_time(step)
    finally:
        for ws in kernel._WORKSPACES.values():
            ws["phi"].zero_()
            ws["psi"].zero_()


def budget_policies(budgets):
    """H2O (half heavy hitters, half recent) and Lambda (4 sink tokens, the rest recent) at each budget
    (tokens per KV head)."""
    policies = {}
    for b in budgets:
        policies[f"h2o {b // 2}+{b - b // 2}"] = ref.Policy(0, b // 2, b - b // 2)
        policies[f"lambda 4+{b - 4}"] = ref.Policy(4, 0, b - 4)
    return policies


def layer_rows(dev, lengths, smoke, batch=1, budgets=None):
    """The step per policy and state layout, beside dense SDPA decode. With ``budgets`` (tokens per KV
    head): H2O and Lambda at each, state per KV head only, and no parts or settings rows."""
    hq, hkv, d, rank, hidden = (32, 8, 128, 8, 512) if not smoke else (4, 2, 16, 8, 32)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    policies = POLICIES if not smoke else {"h2o 8+8": ref.Policy(0, 8, 8)}
    if budgets:
        policies = budget_policies(budgets)
    rows = []
    for L in lengths:
        q = c.rand(batch, hq, 1, d, dev=dev, dtype=dtype)
        k = c.rand(batch, hkv, L, d, dev=dev, dtype=dtype)
        v = c.rand(batch, hkv, L, d, dev=dev, dtype=dtype)
        dense = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        t_dense = c.graph_time(dense)
        rows.append({"L": L, "variant": "dense SDPA", "graph_us": t_dense * 1e6, "eager_us": c.bench(dense) * 1e6,
                     "speedup": 1.0, "kv_bytes": 2 * k.numel() * k.element_size()})
        del k, v
        for name, policy in policies.items():
            for state_heads in ("kv",) if budgets else ("kv", "query", "off"):
                if state_heads == "off" and name != next(iter(policies)):
                    continue
                hs = hq if state_heads == "query" else hkv
                state = state_heads != "off"
                w = seeded_maps(d, hq, hs, rank, hidden, dev)
                cache = filled_cache(policy, hq, hkv, d, hs, rank, L, dev, dtype, batch)
                k_new = c.rand(batch, hkv, 1, d, dev=dev, dtype=dtype)
                v_new = c.rand(batch, hkv, 1, d, dev=dev, dtype=dtype)
                q_rank = torch.full((batch,), L, dtype=torch.int32, device=dev)
                check = copy.deepcopy(cache)
                wk = w.to(dtype)  # the runtime's kernels get the maps in the model's dtype; so does the check
                expected = ref.decode_step(q, k_new, v_new, q_rank, check, wk, policy, d ** -0.5, state=state)

                pristine = copy.deepcopy(cache)  # the timed steps below change `cache` in place

                def error_of_one_step():  # against the reference, from the cache as it was
                    got = kernel.decode_step(q, k_new, v_new, q_rank, copy.deepcopy(pristine), wk, policy, d ** -0.5,
                                             state=state)
                    return (got.float() - expected.float()).abs().max().item()

                error = error_of_one_step()
                step = lambda: kernel.decode_step(q, k_new, v_new, q_rank, cache, wk, policy, d ** -0.5, state=state)  # noqa: E731
                t = min(c.graph_time(step), c.graph_time(step))  # the first after dense 512K can run slow
                state_bytes = (cache.hs.numel() + cache.z.numel()) * 4
                label = f"LESS {name}, state per {state_heads} head" if state else f"{name} alone (state off)"
                parts = L == lengths[0] and batch == 1 and not budgets  # where the time goes: batch 1 only
                if state_heads == "off" and parts:
                    rows.append({"L": L, "variant": f"{name}: launch 1 alone, state off (attention only)",
                                 "graph_us": launch_one(step) * 1e6})
                if state_heads == "kv" and parts and name == next(iter(policies)):
                    rows.append({"L": L, "variant": f"dense SDPA decode over {policy.slots} tokens (as many as the slots)",
                                 "graph_us": c.graph_time(lambda: F.scaled_dot_product_attention(
                                     q, cache.k, cache.v, enable_gqa=True)) * 1e6})
                    rows.append({"L": L, "variant": "two empty launches of as many programs (the floor of a two-launch step)",
                                 "graph_us": empty_launches(kernel_programs(step)) * 1e6})
                    rows.append({"L": L, "variant": f"LESS {name}: launch 1 alone (attention + features)",
                                 "graph_us": launch_one(step) * 1e6})
                    # settings other than the module's
                    for what, settings in SETTINGS.items():
                        row = {"L": L, "variant": f"LESS {name}, {what}"}
                        try:
                            with kernel_settings(settings):
                                row["max_error_vs_reference"] = error_of_one_step()
                                row["graph_us"] = c.graph_time(step) * 1e6
                        except Exception as error:  # noqa: BLE001 (a setting this device or Triton refuses)
                            row["error"] = repr(error)[:300]
                        rows.append(row)
                rows.append({"L": L, "variant": label, "graph_us": t * 1e6,
                             "eager_us": c.bench(step) * 1e6, "speedup": t_dense / t, "max_error_vs_reference": error,
                             "launches": kernel.launches(),
                             "kv_bytes": sum(x.numel() * x.element_size() for x in cache.tensors()),
                             "state_bytes": state_bytes})
    c.table(f"LESS decode step, one layer (Llama-3-8B attention shape, batch {batch})", rows,
            [("L", "{}"), ("variant", "{}"), ("graph_us", "{:.1f}"), ("eager_us", "{:.1f}"), ("speedup", "{:.1f}x"),
             ("kv_bytes", "{}")])
    return rows


E2E_POLICY = dict(policy="h2o", sink=0, heavy=1024, recent=1024)


def e2e_rows(dev, lengths, new_tokens, smoke):
    model = c.build_model(dev, smoke=smoke)
    shape = describe(model).shape
    config = LessConfig.random(shape, **E2E_POLICY, hidden=512 if not smoke else 32)
    names = ["unpatched", "LESS h2o 1024+1024, eager", "LESS h2o 1024+1024, graph"]

    def variant(m, name):
        if name in c.BASELINES:
            return c.baseline_variant(m, name)
        return c.kvpress_variant(m, "less", config=config, decode="graph" if name.endswith("graph") else "eager")

    chunk = 8192 if not smoke else 64
    rows = c.e2e_rows(model, dev, lengths, names, variant, chunk, new_tokens, warmup_tokens=min(4 * c.K, 2 * chunk))
    c.table("LESS end to end (8B shape, random weights and maps, batch 1)", rows,
            [("variant", "{}"), ("tokens", "{}"), ("prefill_s", "{:.2f}"), ("tpot_ms", "{:.2f}"),
             ("gpu_ms_per_token", "{:.2f}"), ("peak_GiB", "{:.2f}"), ("kv_GiB", "{:.3f}")])
    return rows


@torch.no_grad()
def memory_rows(dev, tokens, smoke, model_path=None):
    if model_path:  # a local model (e.g. models/needle-llama on CPU): H2O 32 + 32, small maps
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path).to(dev).eval().requires_grad_(False)
        budget, prompt, title = dict(heavy=32, recent=32, hidden=32), 256, f"{Path(model_path).name}, H2O 32+32"
    else:
        model = c.build_model(dev, smoke=smoke, layers=4)
        budget, prompt, title = dict(heavy=512, recent=512), 4096 if not smoke else 64, "4 layers, 8B-shaped, H2O 512+512"
    shape = describe(model).shape
    config = LessConfig.random(shape, policy="h2o", sink=0, **budget)
    config.layers = [w.to(dev) for w in config.layers]
    kvpress.patch(model, "less", config=config, decode="graph")
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=dev)
    cache = kvpress.make_cache(model)
    out = c.forward(model, ids, cache)
    rows = []
    token = out.logits[:, -1:].argmax(-1)
    for step in range(tokens):
        out = c.forward(model, token, cache)
        token = out.logits[:, -1:].argmax(-1)
        if step % 1024 == 0 or step == tokens - 1:
            rows.append({"generated": step + 1, "seen": prompt + step + 1, "kv_cache_bytes": kvpress.kv_cache_bytes(cache)})
    kvpress.unpatch(model)
    c.table(f"LESS cache bytes over generation ({title}, graph decode)", rows,
            [("generated", "{}"), ("seen", "{}"), ("kv_cache_bytes", "{}")])
    assert len({r["kv_cache_bytes"] for r in rows}) == 1, "the LESS cache grew"
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["layer", "e2e", "memory"])
    parser.add_argument("--lengths", type=int, nargs="*", default=None,
                        help="(default: 32768 131072 524288 for layer, 32768 131072 for e2e)")
    parser.add_argument("--tokens", type=int, default=None, help="memory: tokens to generate (default 10240; 40 with --smoke)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="layer: batch rows (the settings and parts rows at batch 1 only)")
    parser.add_argument("--budgets", type=int, nargs="*", default=None,
                        help="layer: H2O and Lambda at these budgets (tokens per KV head), state per KV head, instead of "
                             "the default policies")
    parser.add_argument("--model", help="memory: a local model folder instead of the 8B-shaped one (e.g. models/needle-llama)")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the JSON (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (Triton interpreter): checks the script")
    args = parser.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.part == "layer":
        rows = layer_rows(dev, [256] if args.smoke else args.lengths or [32768, 131072, 524288], args.smoke, args.batch,
                          args.budgets)
    elif args.part == "e2e":
        rows = e2e_rows(dev, [256] if args.smoke else args.lengths or [32768, 131072], 4 if args.smoke else args.new_tokens,
                        args.smoke)
    else:
        rows = memory_rows(dev, args.tokens or (40 if args.smoke else 10240), args.smoke, args.model)
    env = c.environment()
    if not args.smoke or (args.part == "memory" and args.tokens):  # a CPU memory run over many tokens is a result too
        tag = f"{Path(args.model).name}_" if args.part == "memory" and args.model else ""
        tag += f"batch{args.batch}_" if args.part == "layer" and args.batch != 1 else ""
        tag += "budgets_" if args.part == "layer" and args.budgets else ""
        c.write_json(Path(args.out) / f"less_{args.part}_{tag}{c.device_tag(env)}.json", {"environment": env, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
