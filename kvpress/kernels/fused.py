"""Fused Triton kernels for the model's own small ops at decode (issue #15), each beside the
plain-torch reference that is its CPU path and test oracle.

A CUDA-graph decode step of an 8B Llama launches ~1440 kernels, ~960 of them RMSNorm, rotary and
elementwise ops of a few microseconds each (benchmarks/results/graph_profile_duo25-graph_*.json):
at batch 1 that tail costs as much as reading the KV cache. Each kernel here does one of those
chains in one launch, with transformers' roundings (Llama/Mistral/Qwen2/Qwen3 modeling code):

* :func:`rms_norm`: ``LlamaRMSNorm`` (variance in fp32, normalise, cast to the input dtype, times
  the weight), optionally after the residual add of the decoder layer (``residual + x`` in the
  input dtype, returned too);
* :func:`silu_mul`: ``act_fn(gate) * up`` of ``LlamaMLP`` (SiLU rounded to the dtype, then the product);
* :func:`rotary`: ``apply_rotary_pos_emb`` of q and k in one launch (``q * cos`` and
  ``rotate_half(q) * sin`` each rounded, then their sum).

The references are transformers' own expressions, so on CPU they give its results exactly; the
kernels compute in fp32 with the same intermediate roundings (equal up to the order of the variance
sum and the exp's last bit). Rows are the leading dimensions flattened: one program per row (norm)
or per (row, head) (rotary), blocks of the last dimension otherwise.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from .launch import OPTIONS

log = logging.getLogger("kvpress")

NORM_WARPS = 8
SILU_BLOCK = 1024


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _on_device(t: torch.Tensor):
    from . import _on_device as on_device  # launches on t's GPU (a model may span several)

    return on_device(t)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, last]`` (a view when the leading dimensions flatten to one stride)."""
    return x.reshape(-1, x.shape[-1])


def _needs_grad(*tensors) -> bool:
    """Whether autograd would record the op (the kernels have no backward: the reference runs)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# -- RMSNorm (+ residual add) -----------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(X, R, W, Y, H, x_row, r_row, y_row, h_row, N, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``program_id``: ``h = x (+ r)`` in X's dtype (written to H with a residual), then
    ``W * (h * rsqrt(mean(h^2) + eps)).to(dtype)``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * x_row + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(R + row * r_row + cols, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + row * h_row + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / N
    normed = (h * tl.rsqrt(var + eps)).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(Y + row * y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """transformers' ``LlamaRMSNorm(x)``, or ``(LlamaRMSNorm(residual + x), residual + x)``."""
    if residual is not None:
        x = residual + x
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    y = weight * h.to(dtype)
    return y if residual is None else (y, x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of the last dimension of ``x`` (with ``residual``: of ``residual + x``, also returned),
    in one launch on Triton; see :func:`rms_norm_reference`."""
    from . import use_triton

    plain = residual is None or (residual.shape == x.shape and residual.dtype == x.dtype)
    if (not use_triton(x) or _needs_grad(x, weight, residual) or x.shape[-1] > 65536 or weight.shape != x.shape[-1:]
            or weight.device != x.device or not plain):
        return rms_norm_reference(x, weight, eps, residual)
    n = x.shape[-1]
    xs = _rows(x) if x.stride(-1) == 1 else _rows(x.contiguous())
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is not None:
        rs = _rows(residual) if residual.stride(-1) == 1 else _rows(residual.contiguous())
        h = torch.empty_like(x, memory_format=torch.contiguous_format)
        hs = h.view(-1, n)
    else:
        rs = hs = xs
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    if xs.shape[0]:
        with _on_device(x):
            _rms_norm_kernel[(xs.shape[0],)](xs, rs, w, y, hs, xs.stride(0), rs.stride(0), n, hs.stride(0), n, float(eps),
                                             HAS_RES=residual is not None, BLOCK=_pow2(n), num_warps=NORM_WARPS,
                                             **OPTIONS)
    return y if residual is None else (y, h)


# -- SiLU(gate) * up --------------------------------------------------------------------------------


@triton.jit
def _silu_mul_kernel(G, U, Y, g_row, u_row, y_row, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * g_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_row + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * y_row + cols, (act * u).to(Y.dtype.element_ty), mask=mask)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """transformers' ``act_fn(gate_proj(x)) * up_proj(x)`` with ``act_fn`` SiLU."""
    return torch.nn.functional.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in one launch on Triton (inputs of one shape and dtype, rows of
    contiguous values: e.g. the two halves of one fused gate/up projection)."""
    from . import use_triton

    if (not use_triton(gate) or _needs_grad(gate, up) or gate.shape != up.shape or gate.dtype != up.dtype
            or gate.stride(-1) != 1 or up.stride(-1) != 1):
        return silu_mul_reference(gate, up)
    n = gate.shape[-1]
    gs, us = gate.reshape(-1, n), up.reshape(-1, n)  # views when the rows flatten (a split's halves do)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gs.shape[0]:
        with _on_device(gate):
            _silu_mul_kernel[(gs.shape[0], triton.cdiv(n, SILU_BLOCK))](gs, us, y, gs.stride(0), us.stride(0), n, n,
                                                                        BLOCK=SILU_BLOCK, num_warps=4, **OPTIONS)
    return y


# -- rotary position embedding of q and k -----------------------------------------------------------


@triton.jit
def _rotary_kernel(Q, K, QO, KO, COS, SIN, q_row, q_head, k_row, k_head, qo_row, qo_head, ko_row, ko_head,
                   c_b, c_t, T, Hq, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``(row, head)``: heads ``[0, Hq)`` of Q into QO, then those of K into KO (each by its
    row and head strides; outputs may be the inputs); ``row = b * T + t`` picks cos/sin by their strides."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK)
    mask = d < HALF
    c = COS + (row // T) * c_b + (row % T) * c_t
    s = SIN + (row // T) * c_b + (row % T) * c_t
    if head < Hq:
        src = Q + row * q_row + head * q_head
        dst = QO + row * qo_row + head * qo_head
    else:
        src = K + row * k_row + (head - Hq) * k_head
        dst = KO + row * ko_row + (head - Hq) * ko_head
    x1 = tl.load(src + d, mask=mask, other=0.0)
    x2 = tl.load(src + HALF + d, mask=mask, other=0.0)
    dtype = x1.dtype
    c1 = tl.load(c + d, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c + HALF + d, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s + d, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s + HALF + d, mask=mask, other=0.0).to(tl.float32)
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    # q * cos + rotate_half(q) * sin, each product rounded to the dtype as torch does
    o1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
    o2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    tl.store(dst + d, o1.to(dtype), mask=mask)
    tl.store(dst + HALF + d, o2.to(dtype), mask=mask)


def rotary_reference(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                     inplace: bool = False):
    """transformers' ``apply_rotary_pos_emb`` of ``q``/``k [B, T, H, D]`` (heads second to last
    here; ``k`` None: ``q`` only) with ``cos``/``sin [B or 1, T, D]``; returns them in the same layout
    (``inplace``: written into ``q`` and ``k``, which are returned)."""
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)

    def rotated(x):
        half = x.shape[-1] // 2
        return (x * c) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s)

    qo, ko = rotated(q), None if k is None else rotated(k)
    if inplace:
        q.copy_(qo)
        if k is not None:
            k.copy_(ko)
        return q, k
    return qo, ko


def _row_stride(x: torch.Tensor) -> int | None:
    """The stride of row ``b * T + t`` of ``x [B, T, H, D]``, None if the rows do not share one."""
    B, T = x.shape[:2]
    if T == 1:
        return x.stride(0)
    if B == 1 or x.stride(0) == T * x.stride(1):
        return x.stride(1)
    return None


def rotary(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, inplace: bool = False):
    """Rotary embedding of ``q [B, T, Hq, D]`` and ``k [B, T, Hk, D]`` (e.g. views of the projections'
    outputs; ``k`` None: ``q`` only) with ``cos``/``sin [B or 1, T, D]``: one launch on Triton, into new
    contiguous tensors ``[B, T, H, D]`` (or, ``inplace``, into ``q`` and ``k``); see :func:`rotary_reference`."""
    from . import use_triton

    if k is None:
        qo, _ = rotary(q, q.narrow(2, 0, 0), cos, sin, inplace)
        return qo, None
    B, T, Hq, D = q.shape
    ok = (use_triton(q) and D % 2 == 0 and k.shape[:2] == (B, T) and k.shape[3] == D
          and q.dtype == k.dtype == cos.dtype == sin.dtype and cos.shape == sin.shape and cos.shape[1:] == (T, D)
          and cos.shape[0] in (1, B) and cos.stride() == sin.stride()
          and cos.stride(-1) == 1 and q.stride(-1) == 1 and k.stride(-1) == 1 and q.device == cos.device
          and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)))
    rows = (_row_stride(q), _row_stride(k)) if ok else (None, None)
    if None in rows:
        return rotary_reference(q, k, cos, sin, inplace)
    qo, ko = (q, k) if inplace else (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                                     torch.empty(k.shape, dtype=k.dtype, device=k.device))
    c_b = cos.stride(0) if cos.shape[0] > 1 else 0
    if B * T:
        with _on_device(q):
            _rotary_kernel[(B * T, Hq + k.shape[2])](
                q, k, qo, ko, cos, sin, rows[0], q.stride(2), rows[1], k.stride(2), _row_stride(qo), qo.stride(2),
                _row_stride(ko), ko.stride(2), c_b, cos.stride(1), T, Hq, HALF=D // 2, BLOCK=_pow2(D // 2), num_warps=1,
                **OPTIONS)
    return qo, ko


# -- GEMV: the projections of a decode step (a few rows) -------------------------------------------

GEMV_MAX_ROWS = 16  # rows (tokens of a decode step) one launch serves; more run F.linear
GEMV_BLOCK_N = 16  # output features per program
GEMV_BLOCK_K = 256  # input features per step
GEMV_WARPS = 4
GEMV_STAGES = 4
GEMV_DOT_ONE_ROW = True  # one row through tl.dot (padded to 16) rather than multiply-and-sum
# Per weight shape (out, in) (None: every other shape): (BLOCK_N, BLOCK_K, warps, stages, dot for one
# row) instead of the settings above, or "cublas" (F.linear and the small fused kernels).
GEMV_TILES: dict = {}


@triton.jit
def _gemv_kernel(X, W, BIAS, R, NW, Y, M, N, K, x_row, w_row, r_row, y_row, up_offset, eps,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SILU_MUL: tl.constexpr, NORM: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Features ``[pid * BLOCK_N, +BLOCK_N)`` of ``y = x W^T (+ bias) (+ r)`` for the ``M`` rows of X
    (``SILU_MUL``: the input row is ``silu(x[:K]) * x[up_offset:][:K]``; ``NORM``: it is
    ``NW * rmsnorm(x)``; each rounded as torch rounds), each weight byte read once; fp32
    accumulation, roundings as F.linear then the residual add. ``BLOCK_M == 1``: one row,
    multiply-and-sum on the CUDA cores; else ``tl.dot`` over rows padded to ``BLOCK_M`` (16)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    n_ok = n < N
    w_ptr = W + n[:, None].to(tl.int64) * w_row
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if NORM:  # each row's rsqrt(mean(x^2) + eps), over the whole row (a short pass, from L2)
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(X + m[:, None] * x_row + k[None, :], mask=(m < M)[:, None] & (k < K)[None, :], other=0.0)
            xv = xv.to(tl.float32)
            squares += tl.sum(xv * xv, axis=1)
        rstd = tl.rsqrt(squares / K + eps)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_ptr + k[None, :], mask=n_ok[:, None], other=0.0)
            xm = (m < M)[:, None]
        else:
            w = tl.load(w_ptr + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
            xm = (m < M)[:, None] & (k < K)[None, :]
        x = tl.load(X + m[:, None] * x_row + k[None, :], mask=xm, other=0.0)
        if SILU_MUL:
            g = x.to(tl.float32)
            u = tl.load(X + up_offset + m[:, None] * x_row + k[None, :], mask=xm, other=0.0)
            act = (g / (1.0 + tl.exp(-g))).to(u.dtype).to(tl.float32)
            x = (act * u.to(tl.float32)).to(u.dtype)
        if NORM:
            normed = (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32)
            nw = tl.load(NW + k, mask=k < K, other=0.0).to(tl.float32)
            x = (normed * nw[None, :]).to(x.dtype)
        if BLOCK_M == 1:
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = (m < M)[:, None] & n_ok[None, :]
    y = acc.to(Y.dtype.element_ty)
    if HAS_RES:
        r = tl.load(R + m[:, None] * r_row + n[None, :], mask=mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + m[:, None] * y_row + n[None, :], y, mask=mask)


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None, silu_mul: bool = False, norm=None) -> torch.Tensor:
    """``residual + F.linear(x, weight, bias)`` as transformers computes it (the add after the
    projection's rounding); ``silu_mul``: ``x`` holds ``[gate | up]`` and the input is ``silu(gate) * up``;
    ``norm = (weight, eps)``: the input is ``LlamaRMSNorm(x)``."""
    return _linear_steps(x, weight, bias, residual, silu_mul, norm, silu_mul_reference, rms_norm_reference)


def _linear_steps(x, weight, bias, residual, with_silu_mul, norm, silu_mul_op, rms_norm_op):
    """The steps of :func:`linear_reference`, with the given SiLU*up and RMSNorm ops."""
    if with_silu_mul:
        x = silu_mul_op(*x.chunk(2, dim=-1))
    if norm is not None:
        x = rms_norm_op(x, norm[0], norm[1])
    y = torch.nn.functional.linear(x, weight, bias)
    return y if residual is None else residual + y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, silu_mul: bool = False, norm=None) -> torch.Tensor:
    """:func:`linear_reference` in one launch on Triton when ``x`` has at most ``GEMV_MAX_ROWS`` rows
    (a decode step; 16-bit on CUDA), else the reference."""
    from . import use_triton

    if norm is not None and (silu_mul or norm[0].dtype != x.dtype or norm[0].shape != x.shape[-1:]
                             or norm[0].stride(-1) != 1):
        return _unfused(x, weight, bias, residual, silu_mul, norm)

    N, K = weight.shape
    tile = GEMV_TILES.get((N, K), GEMV_TILES.get(None))
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    ok = (use_triton(x) and 0 < rows <= GEMV_MAX_ROWS and x.shape[-1] == (2 * K if silu_mul else K) and weight.dim() == 2
          and x.dtype == weight.dtype and (not x.is_cuda or x.dtype in (torch.bfloat16, torch.float16))
          and weight.stride(1) == 1 and x.stride(-1) == 1
          and not _needs_grad(x, weight, bias, residual, None if norm is None else norm[0])
          and (bias is None or (bias.is_contiguous() and bias.dtype == x.dtype))
          and (residual is None or (residual.shape[:-1] == x.shape[:-1] and residual.shape[-1] == weight.shape[0]
                                    and residual.dtype == x.dtype and residual.stride(-1) == 1)))
    if not ok or tile == "cublas":
        return _unfused(x, weight, bias, residual, silu_mul, norm)
    block_n, block_k, warps, stages, dot_one_row = tile or (GEMV_BLOCK_N, GEMV_BLOCK_K, GEMV_WARPS, GEMV_STAGES,
                                                            GEMV_DOT_ONE_ROW)
    xs = x.reshape(rows, x.shape[-1])
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    rs = residual.reshape(rows, N) if residual is not None else y
    block_m = 1 if rows == 1 and not dot_one_row else 16
    config = (block_n, block_k, warps, stages, block_m)
    if config in _GEMV_FAILED:
        return _unfused(x, weight, bias, residual, silu_mul, norm)
    try:
        with _on_device(x):
            _gemv_kernel[(triton.cdiv(N, block_n),)](
                xs, weight, bias if bias is not None else weight, rs, norm[0] if norm is not None else weight, y, rows,
                N, K, xs.stride(0), weight.stride(0), rs.stride(0), N, K, float(norm[1]) if norm is not None else 0.0,
                HAS_BIAS=bias is not None, HAS_RES=residual is not None, SILU_MUL=silu_mul, NORM=norm is not None,
                EVEN_K=K % block_k == 0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=warps, num_stages=stages, **OPTIONS)
    except _BUILD_ERRORS as error:  # a Triton that cannot build this tile: F.linear from now on
        _GEMV_FAILED.add(config)
        log.warning("kvpress: the fused GEMV does not compile here (%s); decode projections use F.linear", error)
        return _unfused(x, weight, bias, residual, silu_mul, norm)
    return y


def _unfused(x, weight, bias, residual, with_silu_mul, norm):
    """:func:`linear_reference` through cuBLAS and the fused small kernels (their references on CPU)."""
    return _linear_steps(x, weight, bias, residual, with_silu_mul, norm, silu_mul, rms_norm)


_GEMV_FAILED: set = set()
try:
    from triton.runtime.errors import OutOfResources
    _BUILD_ERRORS = (triton.CompilationError, OutOfResources)
except ImportError:
    _BUILD_ERRORS = (triton.CompilationError,)
