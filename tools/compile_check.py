"""Compile every Triton kernel setting the CPU tests launch for the H200 (sm_90a), without a GPU.

The interpreter runs a kernel as Python, so it accepts what the GPU compiler refuses (a global that is
not a ``tl.constexpr``, a type the MLIR lowering rejects) and says nothing of registers or shared
memory. This script runs tests under the interpreter with every launch recorded (kernel, argument
types, constexprs, warps, stages), then compiles each distinct launch with Triton for sm_90a (its
bundled ptxas) and prints registers, spills and shared memory, or the compiler's error.

    python tools/compile_check.py                         # tests/ (about as long as the CPU suite)
    python tools/compile_check.py tests/test_less_kernels.py -k prefill

The CPU tests run small shapes, mostly in fp32: the register counts are those of these settings,
not necessarily of the bf16 ones a model runs (``tools/palu_sass.py`` reads the Palu decode's). A
failure can be a setting only the interpreter is given on purpose: ``kernels.palu.supported`` sends
head dims below 32 and key ranks without a power-of-two factor of 16 to the torch path on the GPU,
and tests/test_palu*.py use such tiny shapes (6 such Palu launches fail here, with "K >= 8" or
"K >= 16"). Exit status 1 when a launch does not compile.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POINTER = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "float64": "*fp64", "int64": "*i64",
           "int32": "*i32", "int16": "*i16", "int8": "*i8", "uint8": "*u8", "bool": "*i1"}


def record(pytest_args: list[str], out: str) -> int:
    """Run pytest under the interpreter, appending one JSON line per distinct launch to ``out``."""
    import torch
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    seen = set()
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(params, args), **kwargs)
        types, constexprs = {}, {}
        for name, param in params.items():
            value = bound.get(name, param.default)
            if "constexpr" in str(param.annotation):
                constexprs[name] = {"tl": value.name} if isinstance(value, tl.dtype) else value
            elif isinstance(value, torch.Tensor):
                types[name] = POINTER[str(value.dtype).removeprefix("torch.")]
            elif isinstance(value, bool):
                types[name] = "i1"
            elif isinstance(value, int):
                types[name] = "i32" if -(1 << 31) <= value < (1 << 31) else "i64"
            elif isinstance(value, float):
                types[name] = "fp32"
            else:
                types[name] = None  # unrecorded (None, an object): the launch is listed as not checked
        entry = {"module": self.fn.__module__, "name": self.fn.__name__, "types": types, "constexprs": constexprs,
                 "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
        key = json.dumps(entry, sort_keys=True, default=repr)
        if key not in seen:
            seen.add(key)
            with open(out, "a") as f:
                f.write(key + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    import pytest

    return pytest.main(["-q", "-p", "no:cacheprovider", *pytest_args])


def usage(kernel) -> str:
    """Registers, spills and shared memory of a compiled kernel (cuobjdump -res-usage)."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        text = subprocess.run([tools / "cuobjdump", "-res-usage", cubin.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return (f"{regs.group(1) if regs else '?'} registers, {local.group(1) if local else '?'} B local (spills), "
            f"{kernel.metadata.shared} B shared")


def compile_entry(entry: dict):
    """Compile one recorded launch for sm_90a; returns the compiled kernel."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(entry["module"]), entry["name"])
    names = list(inspect.signature(fn.fn).parameters)
    constexprs = {n: tl.dtype(v["tl"]) if isinstance(v, dict) else v for n, v in entry["constexprs"].items()}
    signature = {n: "constexpr" if n in constexprs else entry["types"][n] for n in names}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                              if str(signature[n]).startswith("*")})
    return triton.compile(source, target=GPUTarget("cuda", 90, 128),
                          options={"num_warps": entry["num_warps"], "num_stages": entry["num_stages"]})


def main() -> int:
    if sys.argv[1:2] == ["--record"]:
        return record(sys.argv[3:], sys.argv[2])
    pytest_args = sys.argv[1:] or ["tests/"]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "launches.jsonl"
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "tests")}
        tests = subprocess.run([sys.executable, __file__, "--record", str(log), *pytest_args], cwd=ROOT, env=env)
        entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    print(f"tests: exit {tests.returncode}; {len(entries)} distinct launches")
    failed = 0
    for entry in sorted(entries, key=lambda e: (e["module"], e["name"])):
        what = (f"{entry['module'].rsplit('.', 1)[-1]}.{entry['name']} warps={entry['num_warps']} "
                f"stages={entry['num_stages']} " + " ".join(f"{k}={v}" for k, v in entry["constexprs"].items()))
        if None in entry["types"].values():
            print(f"not checked  {what} (an argument of a type not recorded)")
            continue
        try:
            print(f"ok  {usage(compile_entry(entry))}  {what}")
        except Exception as error:  # noqa: BLE001 (every compiler error is a finding)
            failed += 1
            print(f"FAILED  {what}\n    {type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}")
    print(f"{len(entries) - failed} compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
