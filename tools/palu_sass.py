"""Palu's decode kernel compiled for the H200 (sm_90a) on a machine without a GPU, and read: registers,
shared memory, which loads of the token loop are pipelined (async copies), and the loop's
instructions per warp per block (wgmma, barriers, shuffles), from the ptxas / cuobjdump that come
with Triton. A way to compare kernel variants between device sessions; it measures no time.

    python tools/palu_sass.py [--block-n 64] [--warps 4] [--stages 3] [--prefetch]
                              [--bits 0|2|3|4] [--fp16] [--rank 64] [--sass FILE]
                              [--rope-in-dtype] [--maxnreg N] [--packed] [--gp 16|8] [--rope-by-slot]
                              [--fixed-max] [--whole-blocks] [--heads 1|2|4] [--qpk 4|1] [--rows-in-step] [--fold]

The shapes are Llama-3-8B's at half rank, groups of one KV head (query heads 4 per KV head, head dim
128, key and value rank 64), bf16; pointers 16-byte aligned as torch allocates them.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvpress.kernels import palu  # noqa: E402

POINTERS = {"Q": "*bf16", "KL": "*bf16", "KS": "*bf16", "VL": "*bf16", "VS": "*bf16", "KUP": "*bf16", "KB": "*bf16",
            "KNW": "*bf16", "POS": "*i32", "KR": "*i32", "QR": "*i32", "COS": "*bf16", "SIN": "*bf16", "PO": "*fp32",
            "PML": "*fp32", "LEN": "*i32"}
FLOATS = {"qk_scale", "eps"}


def compile_kernel(a):
    words = 64 * a.bits // 32 if a.bits else 1
    constants = dict(GS=1, QPK=a.qpk, GP=a.gp, D=128, HALF=64, RK=a.rank, RC=min(a.rank & -a.rank, 64), K_BITS=a.bits,
                     K_QG=32 if a.bits else 0, K_NQ=a.rank // 32 if a.bits else 1, K_WORDS=words, K_FAST=a.bits in (2, 3, 4),
                     RV=64, BLOCK_RV=64, V_BITS=a.bits, V_QG=32 if a.bits else 1, V_NQ=2 if a.bits else 1,
                     V_WORDS=words, V_FAST=a.bits in (2, 3, 4), HAS_KB=False, HAS_NORM=False, BLOCK_N=a.block_n,
                     HAS_LEN=True, ROPE_IN_DTYPE=a.rope_in_dtype, PREFETCH=a.prefetch, PACKED=a.packed,
                     ROPE_BY_SLOT=a.rope_by_slot, FIXED_MAX=a.fixed_max, WHOLE_BLOCKS=a.whole_blocks,
                     HP=a.heads, PREFETCH_ROWS=not a.rows_in_step, FOLD_QUERY=a.fold)
    pointers = {**POINTERS, **(dict(KL="*i32", VL="*i32") if a.bits else {})}  # packed codes
    if a.fp16:
        pointers = {n: "*fp16" if t == "*bf16" else t for n, t in pointers.items()}
    fn = palu._palu_decode_kernel
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in constants else pointers.get(n, "fp32" if n in FLOATS else "i32") for n in names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(names.index(n),): v for n, v in constants.items() if n in names},
                       attrs={(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n].startswith("*")})
    options = {"num_warps": a.warps, "num_stages": a.stages}
    if a.maxnreg:
        options["maxnreg"] = a.maxnreg
    return triton.compile(source, target=GPUTarget("cuda", 90, 128), options=options)


def loop_instructions(sass: str) -> list[str]:
    """The instructions of the kernel's innermost token loop (the longest backward branch's body)."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", sass)]
    loops = []
    for address, text in code:
        target = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            loops.append([t for a, t in code if int(target.group(1), 16) <= a <= address])
    return max(loops, key=len, default=[])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--prefetch", action="store_true")
    p.add_argument("--packed", action="store_true", help="paired fp32 -> bf16 conversions (PACKED)")
    p.add_argument("--gp", type=int, default=16, help="query heads per KV head, padded (GP)")
    p.add_argument("--bits", type=int, default=0, choices=[0, 2, 3, 4])
    p.add_argument("--fp16", action="store_true", help="an fp16 model (default bf16)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--sass", help="write the SASS here")
    p.add_argument("--maxnreg", type=int, help="registers per thread at most (spills beyond)")
    p.add_argument("--rope-in-dtype", action="store_true", help="the rotation in bf16 (ROPE_IN_DTYPE)")
    p.add_argument("--rope-by-slot", action="store_true", help="cos/sin rows per slot (ROPE_BY_SLOT)")
    p.add_argument("--fixed-max", action="store_true", help="one softmax reference per program (FIXED_MAX)")
    p.add_argument("--whole-blocks", action="store_true", help="loads without masks (WHOLE_BLOCKS)")
    p.add_argument("--heads", type=int, default=1, help="KV heads per program (HP)")
    p.add_argument("--qpk", type=int, default=4, help="query heads per KV head (4: the 8B shape; 1: MHA)")
    p.add_argument("--fold", action="store_true", help="with --qpk 1: the query folded into the up rows (FOLD_QUERY)")
    p.add_argument("--rows-in-step", action="store_true", help="with --prefetch: rope rows and ranks loaded in the step")
    a = p.parse_args()
    kernel = compile_kernel(a)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / "palu_decode.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
    sass = subprocess.run([tools / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    if a.sass:
        Path(a.sass).write_text(sass)
    ttgir = kernel.asm["ttgir"]
    loop_ir = ttgir[ttgir.find("scf.for"):]
    print("registers per thread:", re.search(r"REG:(\d+)", usage).group(1), "| stack (spills) bytes:",
          re.search(r"STACK:(\d+)", usage).group(1), "| shared memory:", kernel.metadata.shared, "bytes")
    print("loads in the loop: async copies", loop_ir.count("async_copy_global_to_local"),
          "| plain loads", loop_ir.count("= tt.load"))
    body = loop_instructions(sass)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
    print(f"token loop: {len(body)} instructions per warp per {a.block_n}-token block;",
          ", ".join(f"{op} {ops[op]}" for op in ("HGMMA", "HMMA", "BAR", "SHFL", "LDS", "STS", "LDGSTS", "LDL", "STL", "MUFU", "FFMA", "FMUL", "HFMA2", "HMUL2", "F2F", "F2FP", "PRMT") if ops[op]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
