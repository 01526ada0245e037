"""Where the time of one prefill goes (torch profiler): wall time, GPU busy time (the union of the
kernels' intervals), the largest kernels, the host syncs and the largest GPU idle gaps with the
kernels on either side. The 8B-shaped model of ``bench_minference.py`` (``--layers`` layers, the
"local" attention, the candidate patterns), one chunk of ``--tokens`` tokens.

    python benchmarks/profile_prefill.py --tokens 131072 --layers 8 --variants unpatched,minference
    python benchmarks/profile_prefill.py --vs-sweep       # minference's prefill per VS-kernel warps / stages
    python benchmarks/profile_prefill.py --smoke          # tiny model on CPU: checks the script
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_minference as bm  # noqa: E402
import common as c  # noqa: E402

SYNCS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
         "cudaMemcpyAsync", "aten::nonzero", "aten::tolist")


def variant(model, name, layers):
    return bm.model_variant(model, name, layers, patterns="candidates")


@torch.inference_mode()
def prefill(model, ids, make_cache, dev):
    cache = make_cache()
    c._sync(dev)
    t = time.perf_counter()
    c.forward(model, ids, cache)
    c._sync(dev)
    return time.perf_counter() - t


def busy_and_gaps(kernels, top=12):
    """Union of ``(start, end, name)`` intervals (us) and the ``top`` largest idle gaps between them."""
    kernels = sorted(kernels)
    busy, gaps = 0.0, []
    cur_start, cur_end, last_name = None, None, None
    for start, end, name in kernels:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
                gaps.append((start - cur_end, last_name, name))
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
        if end >= cur_end:
            last_name = name
    if cur_end is not None:
        busy += cur_end - cur_start
    gaps.sort(key=lambda g: -g[0])
    return busy, sum(g[0] for g in gaps), [{"us": g, "before": a[:90], "after": b[:90]} for g, a, b in gaps[:top]]


def profile_one(model, name, layers, L, dev):
    ids = torch.randint(0, model.config.vocab_size, (1, L), device=dev)
    with variant(model, name, layers) as make_cache:
        prefill(model, ids, make_cache, dev)  # warm-up: compile, allocate
        wall = min(prefill(model, ids, make_cache, dev) for _ in range(2))
        activities = [torch.profiler.ProfilerActivity.CPU]
        if dev == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            profiled_wall = prefill(model, ids, make_cache, dev)
    from torch.autograd import DeviceType

    kernels, by_name, syncs = [], {}, {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels.append((e.time_range.start, e.time_range.end, e.name))
            n, t = by_name.get(e.name, (0, 0.0))
            by_name[e.name] = (n + 1, t + e.time_range.elapsed_us())
        elif e.name in SYNCS:
            n, t = syncs.get(e.name, (0, 0.0))
            syncs[e.name] = (n + 1, t + e.time_range.elapsed_us())
    busy, idle, gaps = busy_and_gaps(kernels)
    row = {"variant": name, "tokens": L, "layers": layers, "wall_s": wall, "profiled_wall_s": profiled_wall,
           "gpu_busy_s": busy * 1e-6, "gpu_idle_between_kernels_s": idle * 1e-6,
           "top_kernels": [{"name": k[:110], "calls": n, "ms": t / 1e3}
                           for k, (n, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:20]],
           "syncs": {k: {"calls": n, "ms": t / 1e3} for k, (n, t) in syncs.items()},
           "largest_gaps": gaps}
    print(f"{name} {L // c.K}K x{layers} layers: wall {wall:.3f} s (profiled {profiled_wall:.3f}), GPU busy "
          f"{row['gpu_busy_s']:.3f} s, idle between kernels {row['gpu_idle_between_kernels_s']:.3f} s", flush=True)
    for k in row["top_kernels"][:12]:
        print(f"  {k['ms']:9.2f} ms {k['calls']:5d}x  {k['name']}")
    print("  syncs:", ", ".join(f"{k} {v['calls']}x {v['ms']:.1f} ms" for k, v in row["syncs"].items()))
    for g in gaps[:8]:
        print(f"  gap {g['us']:9.0f} us  after {g['before'][:50]}  before {g['after'][:50]}")
    return row


def vs_sweep(model, layers, L, dev, settings=((4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (8, 4))):
    """Wall time of the minference prefill per (num_warps, num_stages) of the VS kernel."""
    from kvpress.kernels import minference as M

    ids = torch.randint(0, model.config.vocab_size, (1, L), device=dev)
    default = M.NUM_WARPS, M.NUM_STAGES
    rows = []
    with variant(model, "minference", layers) as make_cache:
        for warps, stages in settings:
            M.NUM_WARPS, M.NUM_STAGES = warps, stages
            try:
                prefill(model, ids, make_cache, dev)
                wall = min(prefill(model, ids, make_cache, dev) for _ in range(2))
            except Exception as error:  # noqa: BLE001 (a setting the GPU refuses: shared memory)
                rows.append({"num_warps": warps, "num_stages": stages, "error": str(error)[:200]})
                continue
            finally:
                M.NUM_WARPS, M.NUM_STAGES = default
            rows.append({"num_warps": warps, "num_stages": stages, "wall_s": wall})
            print(f"VS kernel {warps} warps, {stages} stages: minference prefill {wall:.3f} s", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--variants", default="unpatched,minference")
    p.add_argument("--out", default=None)
    p.add_argument("--vs-sweep", action="store_true", help="time the VS kernel's warps / stages instead")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    dev = "cpu" if args.smoke else "cuda"
    L = 2048 if args.smoke else args.tokens
    env = c.environment()
    model = bm.build_model(dev, args.layers, "local", args.smoke)
    if args.vs_sweep:
        rows = vs_sweep(model, args.layers, L, dev)
    else:
        rows = [profile_one(model, name, args.layers, L, dev) for name in args.variants.split(",")]
    out = args.out or Path(__file__).resolve().parent / "results" / f"profile_prefill_{c.device_tag(env)}.json"
    if not args.smoke or args.out:
        c.write_json(out, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
