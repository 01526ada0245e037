"""Probe: the decode kernel's split-K merge as a second kernel (launched with programmatic dependent
launch, or plainly) against the in-kernel merge of ``kvpress.kernels.decode``. GQA decode at
32K/128K/512K, 25%/50% retrieval heads, CUDA graph, L2 flushed by reading; times in us and as a
ratio of the bytes-read bound.

    python benchmarks/merge_probe.py
"""
import sys

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, "benchmarks")
import bench_duo as b  # noqa: E402
from kvpress import kernels  # noqa: E402
from kvpress.kernels import decode as dm  # noqa: E402
from kvpress.kernels.prefill import NO_LIMIT, as_ranks  # noqa: E402


@triton.jit
def _split_kernel(Q, Out, QR, PO, PL,
                  FK, FV, FR, FH, SK, SV, SR, SH,
                  stride_qb, stride_qh, stride_qrb, stride_ob, stride_oh,
                  stride_fkb, stride_fkh, stride_fkn, stride_fvb, stride_fvh, stride_fvn, stride_frb,
                  stride_skb, stride_skh, stride_skn, stride_svb, stride_svh, stride_svn, stride_srb,
                  n_single, n_f, n_s, T, C, n_splits, split_len, qk_scale,
                  f_sink, f_recent, s_sink, s_recent, window,
                  G: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    g = tl.arange(0, GP)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (g < G)[:, None]
    if pid < n_single:
        bb = pid // n_s
        slot = pid % n_s
        head = tl.load(SH + slot)
        qr = tl.load(QR + bb * stride_qrb)
        q = tl.load(Q + bb * stride_qb + (head * G + g)[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
        acc, l_i, m_i = dm._attend_range(q, qr, SK + bb * stride_skb + slot * stride_skh,
                                         SV + bb * stride_svb + slot * stride_svh, SR + bb * stride_srb,
                                         0, C, stride_skn, stride_svn, qk_scale, s_sink, s_recent, window,
                                         GP, BLOCK_N, BLOCK_D, D)
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(Out + bb * stride_ob + (head * G + g)[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=q_mask)
    else:
        pid -= n_single
        bh = pid // n_splits
        split = pid % n_splits
        bb = bh // n_f
        slot = bh % n_f
        head = tl.load(FH + slot)
        qr = tl.load(QR + bb * stride_qrb)
        q = tl.load(Q + bb * stride_qb + (head * G + g)[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
        start = split * split_len
        acc, l_i, m_i = dm._attend_range(q, qr, FK + bb * stride_fkb + slot * stride_fkh,
                                         FV + bb * stride_fvb + slot * stride_fvh, FR + bb * stride_frb,
                                         start, tl.minimum(start + split_len, T), stride_fkn, stride_fvn,
                                         qk_scale, f_sink, f_recent, window, GP, BLOCK_N, BLOCK_D, D)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(PO + (pid * G + g)[:, None] * BLOCK_D + offs_d[None, :], out, mask=(g < G)[:, None])
        tl.store(PL + pid * G + g, lse, mask=g < G)


@triton.jit
def _merge_kernel(PO, PL, Out, FH, stride_ob, stride_oh, n_f, n_splits,
                  G: tl.constexpr, BLOCK_D: tl.constexpr, DB: tl.constexpr, SPLITS: tl.constexpr,
                  PDL: tl.constexpr):
    """Program (bh, g, d block): merges the n_splits partials of query head g of split-K head bh."""
    bh = tl.program_id(0)
    g = tl.program_id(1)
    db = tl.program_id(2)
    bb = bh // n_f
    slot = bh % n_f
    s = tl.arange(0, SPLITS)
    d = db * DB + tl.arange(0, DB)
    ok = s < n_splits
    row = (bh * n_splits + s) * G + g
    if PDL:
        gdc_wait()
    head = tl.load(FH + slot)
    lse = tl.load(PL + row, mask=ok, other=float("-inf"))
    o = tl.load(PO + row[:, None] * BLOCK_D + d[None, :], mask=ok[:, None], other=0.0)
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)
    total = tl.sum(w, 0)
    merged = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + bb * stride_ob + (head * G + g) * stride_oh + d, merged.to(Out.dtype.element_ty))


_WS = {}


def probe_decode(q, fk, fv, fr, sk, sv, sr, q_rank, rh, sh, scale, sink, recent, pdl, db=64, warps=4, merge_warps=4):
    B, Hq, _, D = q.shape
    group = Hq // (len(rh) + len(sh))
    out = torch.empty_like(q)
    n_f, n_s = fk.shape[1], sk.shape[1]
    fr, sr, q_rank = as_ranks(fr), as_ranks(sr), as_ranks(q_rank)
    qs, os_, fks, fvs, sks, svs = [t.stride() for t in (q, out, fk, fv, sk, sv)]
    T, C = fk.shape[2], sk.shape[2]
    most = dm.max_splits(B * n_f, B * n_s, q.device)
    n_splits, split_len = dm._split(T, most)
    key = (B * n_f, most, group)
    if key not in _WS:
        _WS[key] = (torch.empty(B * n_f * most, group, D, device=q.device),
                    torch.empty(B * n_f * most, group, device=q.device))
    po, pl = _WS[key]
    _split_kernel[(B * n_s + B * n_f * n_splits,)](
        q, out, q_rank, po, pl, fk, fv, fr, rh, sk, sv, sr, sh,
        *qs[:2], q_rank.stride(0), *os_[:2], *fks[:3], *fvs[:3], fr.stride(0), *sks[:3], *svs[:3], sr.stride(0),
        B * n_s, n_f, n_s, T, C, n_splits, split_len, scale * 1.4426950408889634,
        0, NO_LIMIT, sink, recent, NO_LIMIT,
        G=group, GP=max(16, group), BLOCK_N=dm.BLOCK_N, BLOCK_D=D, D=D, PDL=pdl,
        num_warps=warps, num_stages=dm.NUM_STAGES)
    _merge_kernel[(B * n_f, group, D // db)](
        po, pl, out, rh, os_[0], os_[1], n_f, n_splits,
        G=group, BLOCK_D=D, DB=db, SPLITS=triton.next_power_of_2(n_splits), PDL=pdl,
        num_warps=merge_warps, launch_pdl=pdl)
    return out


def main():
    bw = b.copy_bandwidth("cuda")
    for T in (32 * b.K, 128 * b.K, 512 * b.K):
        for frac in (0.25, 0.5):
            args, kept = b.decode_case(T, 32, 8, frac, "cuda")
            ref = kernels.split_cache_attention(*args)
            cells = []
            variants = {"in-kernel": lambda: kernels.split_cache_attention(*args)}
            for pdl in (False, True):
                for db in (32, 64, 128):
                    variants[f"{'pdl' if pdl else 'plain'}/db{db}"] = (
                        lambda pdl=pdl, db=db: probe_decode(*args, pdl=pdl, db=db))
            for name, fn in variants.items():
                err = (fn().float() - ref.float()).abs().max().item()
                t = b.graph_time(fn)
                cells.append(f"{name} {t * 1e6:.1f} ({t / (kept / bw):.3f}{'' if err < 2e-2 else f' ERR {err:.3g}'})")
            print(f"{T // b.K}K/{frac:.0%}: " + " | ".join(cells), flush=True)
            del args


if __name__ == "__main__":
    main()
