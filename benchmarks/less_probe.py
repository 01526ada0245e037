"""One LESS decode step, kernels against the torch reference from the same cache, over shapes and
parts of the step: where (if anywhere) the kernels part from the reference on this device.

    python benchmarks/less_probe.py            # CUDA (or the interpreter: TRITON_INTERPRET=1 KVPRESS_KERNELS=triton)
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from kvpress.kernels import less as K
from kvpress.kernels import less_reference as R


def one_step(dev, b=3, hq=32, hkv=8, d=128, n=512, r=8, prompt=300, heavy=0, state_heads="kv", splits=1,
             pending=None, zero_state=False, dtype=torch.float32):
    """Errors of one step's output, state and z (max abs) after a ``prompt``-token reference prefill."""
    torch.manual_seed(1)
    policy = R.Policy(sink=4, heavy=0, recent=252) if not heavy else R.Policy(sink=0, heavy=200, recent=56)
    hs = hkv if state_heads == "kv" else hq
    w = R.FeatureWeights.random(hq, hs, d, n, r).to(dtype).to(dev)
    L = prompt + 2
    q = torch.randn(b, hq, L, d, device=dev).to(dtype)
    k = torch.randn(b, hkv, L, d, device=dev).to(dtype)
    v = torch.randn(b, hkv, L, d, device=dev).to(dtype)
    rank = torch.arange(L, device=dev)[None].repeat(b, 1).int()
    ref = R.LessCache.empty(b, hkv, policy.slots, d, hs, r, dtype, dev)
    R.prefill_step(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], rank[:, :prompt], ref, w, policy, d ** -0.5)
    i = prompt  # one reference step first: the cache is full, so it leaves an evicted token pending
    R.decode_step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], rank[:, i], ref, w, policy, d ** -0.5)
    pending_before = ref.pending.float().mean().item()
    if pending is not None:
        ref.pending.fill_(pending)
    if zero_state:
        ref.hs.zero_()
        ref.z.zero_()
    tri = copy.deepcopy(ref)
    i = prompt + 1
    args = (q[:, :, i:], k[:, :, i:], v[:, :, i:], rank[:, i])
    a = R.decode_step(*args, ref, w, policy, d ** -0.5)
    o = K.decode_step(*args, tri, w, policy, d ** -0.5, splits=splits)
    if dev == "cuda":
        torch.cuda.synchronize()
    err = lambda x, y: (x.float() - y.float()).abs().max().item()  # noqa: E731
    return {"out": err(a, o), "hs": err(ref.hs, tri.hs), "z": err(ref.z, tri.z), "out_scale": a.float().abs().max().item(),
            "spare_same": bool(torch.equal(ref.spare, tri.spare)),
            "pending": pending_before}


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    small = dev == "cpu"
    base = dict(b=2, hq=4, hkv=2, d=16, n=32, r=8, prompt=300) if small else {}
    cases = {
        "base (lambda, kv, 1 split, fp32)": {},
        "no fold (pending 0)": dict(pending=0),
        "fold only (state zeroed)": dict(zero_state=True),
        "r=16": dict(r=16), "r=4": dict(r=4), "d=64": dict(d=64), "hq=8 (G=1)": dict(hq=8), "b=1": dict(b=1),
        "n=64": dict(n=64), "state per query head": dict(state_heads="query"), "h2o": dict(heavy=1),
        "2 splits": dict(splits=2), "4 splits": dict(splits=4),
        "bf16": dict(dtype=torch.bfloat16),
    }
    rows = {}
    for name, kw in cases.items():
        try:
            rows[name] = one_step(dev, **{**base, **kw})
        except Exception as error:  # a probe: record and go on
            rows[name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
        print(f"{name:40s} " + "  ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[name].items()),
              flush=True)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
