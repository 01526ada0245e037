"""Host (CPU) time of one layer's attention at decode, by component: what an eager decode step
pays per layer on top of the GPU work. Shapes of Llama-3-8B (32 q / 8 KV heads, D 128, bf16), a
short cache (the GPU side is tiny, so each loop runs at the host's launch rate).

    python benchmarks/host_overhead.py [--tokens 4096] [--calls 400]

Prints microseconds per call (median of 5 loops) and writes ``--out`` JSON when given.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import bench_duo as b  # noqa: E402
import common as c  # noqa: E402
from kvpress import kernels  # noqa: E402
from kvpress.cache import GroupedLayer, LedgerSpec, TokenLedger, Window  # noqa: E402


def host_us(fn, calls):
    """Median over 5 loops of the wall time per call, the GPU synchronised around each loop."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return sorted(times)[2]


def recorded_launches(module, names, call):
    """``{name: (key, grid, args, constexprs, options)}``: what ``call()`` passes to the ``Launcher``s
    ``module.<name>`` (kvpress.kernels.launch), recorded instead of launched."""
    launchers, seen = {name: getattr(module, name) for name in names}, {}
    for name in names:
        setattr(module, name, lambda key, grid, a, constexprs, name=name, **options:
                seen.update({name: (key, grid, a, constexprs, options)}))
    try:
        call()
    finally:
        for name, launcher in launchers.items():
            setattr(module, name, launcher)
    return seen


def launch_rows(attention, calls):
    """The decode kernels' launches alone: the split kernel through ``kernel[grid](...)`` and through
    the direct launcher (``kvpress.kernels.launch``); the merge kernel plainly and with PDL."""
    from kvpress.kernels import decode as decode_mod

    split, merge = decode_mod._launch_decode, decode_mod._launch_merge
    seen = recorded_launches(decode_mod, ("_launch_decode", "_launch_merge"), attention)
    key, grid, a, c, o = seen["_launch_decode"]
    rows = {
        f"  split kernel[grid](...) ({len(a)} args)": host_us(lambda: split.kernel[grid](*a, **c, **o), calls),
        "  split, direct launcher": host_us(lambda: split(key, grid, a, c, **o), calls),
    }
    key, grid, a, c, o = seen["_launch_merge"]
    for pdl in (False, True):
        cp, op = {**c, "PDL": pdl}, {**o, "launch_pdl": pdl}
        rows[f"  merge, direct launcher, PDL {pdl}"] = host_us(lambda: merge((key, pdl), grid, a, cp, **op), calls)
    return rows


def palu_launch_rows(T, calls):
    """Palu's decode kernel launch alone (8B shape, half rank, bf16 latents), through ``kernel[grid](...)`` and
    through the direct launcher, and the whole ``palu_decode`` call (its merge launch and workspace included)."""
    import bench_palu
    from kvpress.kernels import palu

    case = bench_palu.latent_case(T, 32, 8, 1, 0.5, None, "cuda")
    launcher = palu._launch_palu_decode
    key, grid, a, c, o = recorded_launches(palu, ("_launch_palu_decode",), lambda: palu.palu_decode(**case))[
        "_launch_palu_decode"]
    return {
        f"  palu decode kernel[grid](...) ({len(a)} args)": host_us(lambda: launcher.kernel[grid](*a, **c, **o), calls),
        "  palu decode, direct launcher": host_us(lambda: launcher(key, grid, a, c, **o), calls),
        "palu_decode (decode + merge launches)": host_us(lambda: palu.palu_decode(**case), calls),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--out")
    a = p.parse_args()
    dev, T, hq, hkv = "cuda", a.tokens, 32, 8
    from transformers import DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = {}
    q = c.rand(1, 1, hq, c.D, dev=dev).transpose(1, 2)  # as the model makes it: [B, H, 1, D] view
    k_new = c.rand(1, 1, hkv, c.D, dev=dev).transpose(1, 2)
    v_new = c.rand(1, 1, hkv, c.D, dev=dev).transpose(1, 2)

    # unpatched: DynamicLayer.update (cat) + transformers' sdpa attention (flash)
    class Module(torch.nn.Module):
        is_causal = True
        num_key_value_groups = hq // hkv

    module = Module()
    cache = DynamicCache()
    cache.update(c.rand(1, hkv, T, c.D, dev=dev), c.rand(1, hkv, T, c.D, dev=dev), 0)
    length = cache.layers[0].keys.shape[2]

    def unpatched():
        k, v = cache.update(k_new, v_new, 0)
        out = sdpa_attention_forward(module, q, k, v, None, scaling=c.D ** -0.5)
        cache.layers[0].keys = cache.layers[0].keys[:, :, :length]  # keep the length fixed
        cache.layers[0].values = cache.layers[0].values[:, :, :length]
        return out

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        rows["unpatched layer (cat + sdpa flash)"] = host_us(unpatched, a.calls)
        kk, vv = cache.layers[0].keys, cache.layers[0].values
        rows["  F.sdpa flash alone"] = host_us(
            lambda: F.scaled_dot_product_attention(q, kk, vv, scale=0.1, enable_gqa=True), a.calls)
    rows["  torch.cat alone"] = host_us(lambda: torch.cat([kk, k_new], dim=2), a.calls)

    # Duo: the grouped cache layer's update + grouped_attention (decode kernel)
    retrieval = torch.zeros(hkv, dtype=torch.bool)
    retrieval[: hkv // 2] = True
    window = Window(b.SINK, b.RECENT)
    ledger = TokenLedger(LedgerSpec(all_ranks=True, windows=(window,)))
    heads = torch.arange(hkv)
    layer = GroupedLayer(ledger, True, [(heads[retrieval], None), (heads[~retrieval], window)])
    buffers = [buf for pair in layer.buffers for buf in pair]
    ledger.begin(None, 1, T, dev)
    layer.update(c.rand(1, hkv, T, c.D, dev=dev), c.rand(1, hkv, T, c.D, dev=dev))[0].write_new()
    ledger.end()
    layer.after_forward()

    def undo_step():  # the lengths stay fixed
        ledger.step = None
        ledger.rank.truncate(ledger.rank.length - 1)
        ledger.window_rank[window].truncate(ledger.window_rank[window].length - 1)
        for buf in buffers:
            buf.truncate(buf.length - 1)

    def duo_step():
        ledger.begin(None, 1, 1, dev)
        view, _ = layer.update(k_new, v_new)
        out = kernels.grouped_attention(q, view.groups, view.query_rank, c.D ** -0.5, new_kv=view.take_new())
        undo_step()
        return out

    rows["duo layer (update + attention) + ledger begin"] = host_us(duo_step, a.calls)
    ledger.begin(None, 1, 1, dev)
    rows["  duo update alone"] = host_us(lambda: (layer.update(k_new, v_new), [
        buf.truncate(buf.length - 1) for buf in buffers]), a.calls)
    view, _ = layer.update(k_new, v_new)
    rows["  grouped_attention alone (+ new token)"] = host_us(
        lambda: kernels.grouped_attention(q, view.groups, view.query_rank, c.D ** -0.5, new_kv=(k_new, v_new)), a.calls)
    buf = buffers[0]
    rows["  index_select into a slot"] = host_us(
        lambda: torch.index_select(k_new, 1, view.groups[0].heads, out=buf.storage.narrow(2, buf.length - 1, 1)),
        a.calls)
    rows["  empty_like (a trivial op)"] = host_us(lambda: torch.empty_like(q), a.calls)
    rows.update(launch_rows(
        lambda: kernels.grouped_attention(q, view.groups, view.query_rank, c.D ** -0.5, new_kv=(k_new, v_new)), a.calls))
    rows.update(palu_launch_rows(T, a.calls))
    rows["ledger begin alone"] = host_us(lambda: (ledger.begin(None, 1, 1, dev), ledger.rank.truncate(ledger.rank.length - 1),
                                                  [r.truncate(r.length - 1) for r in ledger.window_rank.values()],
                                                  setattr(ledger, "step", None)), a.calls)
    for name, us in rows.items():
        print(f"{name:<50} {us:8.1f} us", flush=True)
    if a.out:
        json.dump({"env": c.environment(), "tokens": T, "host_us": rows}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
