"""Decode kernel timing probe: GQA decode at several lengths (CUDA graph, L2 flushed by reading).
Run it on variants of kvpress/kernels/decode.py to place time inside the kernel by differences."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_duo as b  # noqa: E402
import common as c  # noqa: E402
from kvpress import kernels  # noqa: E402

bw = c.copy_bandwidth("cuda")
label = sys.argv[1] if len(sys.argv) > 1 else "base"
out = []
for T in (32 * c.K, 128 * c.K, 512 * c.K):
    for frac in (0.25, 0.5):
        args, kept = b.decode_case(T, 32, 8, frac, "cuda")
        t = c.graph_time(lambda: kernels.split_cache_attention(*args))
        out.append(f"{T // c.K}K/{frac:.0%}: {t * 1e6:.1f} ({t / (kept / bw):.2f})")
        del args
print(f"{label:>10}: " + "  ".join(out), flush=True)
