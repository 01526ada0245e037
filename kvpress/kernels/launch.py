"""Triton launches with less host work than ``kernel[grid](...)``.

A decode step launches the decode kernels once per layer and token. ``kernel[grid](...)`` first
binds and specializes every argument in Python: ~50 us for the decode kernel's 48 arguments on the
H100 host, against ~14 us for the compiled kernel's own launcher (benchmarks/host_overhead.py),
and more than the whole GPU kernel at short contexts. :class:`Launcher` keeps each compiled kernel
under a key given by the caller and calls the compiled launcher directly.

The key must determine everything Triton specializes on. So every integer argument must be marked
``do_not_specialize`` (Triton then keys it by its 32/64-bit width only: the caller's integers must
fit 32 bits, as sizes and strides in units of 8 elements of one GPU's tensors do; a kernel first
seen with a larger one is not kept), and the key must hold the tensors' dtypes and whether the
pointers that Triton specializes on alignment are 16-byte aligned. The first call of a key goes
through ``kernel[grid](...)`` (which compiles), as does every call under the interpreter and on
Triton versions other than those in ``TESTED_TRITON`` (the compiled launcher is Triton-internal).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.runtime import driver

_I32 = range(-(1 << 31), 1 << 31)
TESTED_TRITON = ("3.6.", "3.9.")
_C_LAUNCH_36 = triton.__version__.startswith("3.6.")  # 3.6's C launcher argument order (3.9 reorders and adds to it)
# Compile options every kvpress launch passes. FMA contraction, on which the kernels were tuned: Triton's
# default until 3.9 (which warns that it is unset) and off from 3.10 unless asked for.
OPTIONS = {"enable_fp_fusion": True}


@functools.lru_cache
def _nvidia_major(device: torch.device) -> int:
    """The compute capability's major version of an NVIDIA GPU; 0 for anything else (CPU, ROCm)."""
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" and torch.version.hip is None else 0


def has_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (``launch_pdl``, ``gdc_wait``): NVIDIA Hopper (sm_90) and later."""
    return _nvidia_major(device) >= 9


def has_packed_cvt(device: torch.device) -> bool:
    """PTX ``cvt.rn.bf16x2.f32`` / ``cvt.rn.f16x2.f32`` (two conversions per instruction): NVIDIA sm_80 and later."""
    return _nvidia_major(device) >= 8


class Launcher:
    """``launcher(key, grid, args, constexprs, **options)`` runs ``kernel[grid](*args, **constexprs, **options)``.

    ``args`` are the kernel's non-constexpr parameters in order, ``constexprs`` its constexpr
    parameters in their order in the signature; ``key`` (hashable) is described in the module docstring.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: dict = {}
        direct = triton.__version__.startswith(TESTED_TRITON)
        self.params = getattr(kernel, "params", None) if direct else None  # None: plain launches (and the interpreter)

    def __call__(self, key, grid, args, constexprs: dict, **options):
        options = {**OPTIONS, **options}
        if self.params is None:
            self.kernel[grid](*args, **constexprs, **options)
            return
        device = driver.active.get_current_device()
        launch = self.compiled.get((device, key))
        if launch is None:
            compiled = self.kernel[grid](*args, **constexprs, **options)
            if self._reusable(args) and hasattr(compiled, "packed_metadata"):
                self.compiled[(device, key)] = _direct(compiled)
            return
        grid = tuple(grid) + (1, 1)
        launch(grid[0], grid[1], grid[2], driver.active.get_current_stream(device), *args, *constexprs.values())

    def _reusable(self, args) -> bool:
        """Whether the kernel compiled for ``args`` serves every call with the same key."""
        params = [p for p in self.params if not p.is_constexpr]
        for param, a in zip(params, args):
            if isinstance(a, int) and not isinstance(a, bool):
                if not param.do_not_specialize:
                    raise TypeError(f"{self.kernel.__name__}: integer argument {param.name} must be in do_not_specialize")
                if a not in _I32:
                    return False
        return True


def _direct(compiled):
    """``launch(grid_x, grid_y, grid_z, stream, *args)`` for a compiled kernel: on Triton 3.6 its C launcher
    itself when the kernel needs no scratch memory, else the launcher object's call (the same arguments on 3.6
    and 3.9)."""
    launcher = compiled.run
    meta = (compiled.packed_metadata, None, None, None)  # no launch metadata, no enter/exit hooks
    no_scratch = getattr(launcher, "global_scratch_size", 1) == 0 and getattr(launcher, "profile_scratch_size", 1) == 0
    if _C_LAUNCH_36 and no_scratch:
        c_launch, flags = launcher.launch, (launcher.launch_cooperative_grid, launcher.launch_pdl, None, None)

        def launch(gx, gy, gz, stream, *args):
            c_launch(gx, gy, gz, stream, compiled.function, *flags, *meta, *args)
    else:
        def launch(gx, gy, gz, stream, *args):
            launcher(gx, gy, gz, stream, compiled.function, *meta, *args)
    return launch
