"""Triton code behind :func:`bitplan.kernels.attention.decode_attention` (imported lazily, never at package import).

Two kernels, flash-decoding style:

``_decode_split_kernel``: one program per (batch * kv head, split of the sequence). The split's tokens are read
first from the packed storage (codes decoded in registers: each side's own ``BITS``/axis/group are constexprs,
so a layer's K and V compile independently), then from the 16-bit residual; the query heads that share the kv
head (GQA) form the rows of one ``tl.dot``; online softmax in fp32 (base 2, the softmax scale folded into q).
With one split it writes the normalised output, else the unnormalised accumulator and its (max, sum).

``_decode_reduce_kernel``: one program per (batch * query head) merges the splits.

Packed layout read as stored by :func:`bitplan.quantizers.kv.quantize_kv` (no re-layout): codes ``uint8
[B, H, T, D*bits/8]``, 8 codes little-endian in ``bits`` bytes, so code ``d`` starts at bit ``(d % 8) * bits`` of
the word at byte ``(d // 8) * bits``; for 3, 5, 6 or 7 bits a code may straddle two bytes and a second
(masked) byte is read. Scales/offsets fp16 ``[B, H, T/G, D]`` (per channel) or ``[B, H, T, D/G]`` (per token).
"""

from __future__ import annotations

import triton
import triton.language as tl

from bitplan.kernels._triton_ops import ADD as _ADD  # tl.reduce combine functions; why: see _triton_ops
from bitplan.kernels._triton_ops import MAX as _MAX


@triton.jit
def _load_side(
    C,
    SC,
    OF,
    c_st,
    s_st,
    t0,
    t,
    t_mask,
    d,
    d_mask,
    BITS: tl.constexpr,
    CHANNEL: tl.constexpr,
    G: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Tokens ``t = t0 + arange`` x channels ``d`` of one stored side (C, SC, OF at (batch, head)), fp32."""
    m2 = t_mask[:, None] & d_mask[None, :]
    if BITS == 16:
        x = tl.load(C + t[:, None] * c_st + d[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        row = C + t[:, None] * c_st
        if BITS == 8:
            q = tl.load(row + d[None, :], mask=m2, other=0).to(tl.int32)
        else:
            bit = (d % 8) * BITS
            byte = (d // 8) * BITS + bit // 8
            shift = bit % 8
            q = tl.load(row + byte[None, :], mask=m2, other=0).to(tl.int32)
            if 8 % BITS != 0:  # a code may straddle two bytes
                two = m2 & ((shift + BITS) > 8)[None, :]
                hi = tl.load(row + byte[None, :] + 1, mask=two, other=0).to(tl.int32)
                q = q | (hi << 8)
            q = (q >> shift[None, :]) & ((1 << BITS) - 1)
        if CHANNEL and G % BLOCK_T == 0:  # blocks start at multiples of BLOCK_T: one group, one scale row
            sidx = (t0 // G) * s_st + d[None, :]
        elif CHANNEL:
            sidx = (t // G)[:, None] * s_st + d[None, :]
        else:
            sidx = t[:, None] * s_st + (d // G)[None, :]
        sc = tl.load(SC + sidx, mask=m2, other=0.0).to(tl.float32)
        of = tl.load(OF + sidx, mask=m2, other=0.0).to(tl.float32)
        x = q.to(tl.float32) * sc + of
    return x


@triton.jit
def _softmax_step(q, k, t_mask, m_i, l_i, acc, DOT: tl.constexpr):
    """Online softmax over one block of keys: the block's probabilities (in DOT) and the rescaled state."""
    s = tl.dot(q, tl.trans(k.to(DOT)), input_precision="ieee")  # [BLOCK_H, BLOCK_T], log2 units
    s = tl.where(t_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))  # finite: every block holds at least one valid token
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.reduce(p, 1, _ADD)
    return p.to(DOT), m_new, l_i, acc * alpha[:, None]


@triton.jit
def _decode_split_kernel(
    Q,
    Out,
    PartAcc,
    PartM,
    PartL,
    KC,
    KS,
    KO,
    VC,
    VS,
    VO,
    KR,
    VR,
    q_sb,
    q_sh,
    o_sb,
    o_sh,
    kc_sb,
    kc_sh,
    kc_st,
    ks_sb,
    ks_sh,
    ks_st,
    vc_sb,
    vc_sh,
    vc_st,
    vs_sb,
    vs_sh,
    vs_st,
    kr_sb,
    kr_sh,
    kr_st,
    vr_sb,
    vr_sh,
    vr_st,
    S,
    R,
    chunk,
    n_splits,
    HKV,
    GQA,
    D,
    qk_scale,
    K_BITS: tl.constexpr,
    K_CHANNEL: tl.constexpr,
    K_GROUP: tl.constexpr,
    V_BITS: tl.constexpr,
    V_CHANNEL: tl.constexpr,
    V_GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)  # batch offsets of a long cache can pass 2**31 elements
    hk = pid % HKV
    start = split * chunk
    end = tl.minimum(start + chunk, S + R)

    h = tl.arange(0, BLOCK_H)
    h_mask = h < GQA
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    hq = hk * GQA + h
    qm = h_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b * q_sb + hq[:, None] * q_sh + d[None, :], mask=qm, other=0.0).to(tl.float32)
    q = (q * qk_scale).to(DOT)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_H], 0.0, tl.float32)
    acc = tl.full([BLOCK_H, BLOCK_D], 0.0, tl.float32)

    kc = KC + b * kc_sb + hk * kc_sh
    ks = KS + b * ks_sb + hk * ks_sh
    ko = KO + b * ks_sb + hk * ks_sh
    vc = VC + b * vc_sb + hk * vc_sh
    vs = VS + b * vs_sb + hk * vs_sh
    vo = VO + b * vs_sb + hk * vs_sh
    offs = tl.arange(0, BLOCK_T)

    # 1) packed storage: tokens [start, min(end, S))
    s_end = tl.minimum(end, S)
    for t0 in range(start, s_end, BLOCK_T):
        t = t0 + offs
        tm = t < s_end
        k = _load_side(kc, ks, ko, kc_st, ks_st, t0, t, tm, d, d_mask, K_BITS, K_CHANNEL, K_GROUP, BLOCK_T)
        p, m_i, l_i, acc = _softmax_step(q, k, tm, m_i, l_i, acc, DOT)
        v = _load_side(vc, vs, vo, vc_st, vs_st, t0, t, tm, d, d_mask, V_BITS, V_CHANNEL, V_GROUP, BLOCK_T)
        acc = tl.dot(p, v.to(DOT), acc, input_precision="ieee")

    # 2) 16-bit residual: tokens [max(start, S), end), residual index t - S
    kr = KR + b * kr_sb + hk * kr_sh
    vr = VR + b * vr_sb + hk * vr_sh
    for t0 in range(tl.maximum(start, S), end, BLOCK_T):
        t = t0 + offs
        tm = t < end
        r = t - S
        m2 = tm[:, None] & d_mask[None, :]
        k = tl.load(kr + r[:, None] * kr_st + d[None, :], mask=m2, other=0.0)
        p, m_i, l_i, acc = _softmax_step(q, k, tm, m_i, l_i, acc, DOT)
        v = tl.load(vr + r[:, None] * vr_st + d[None, :], mask=m2, other=0.0)
        acc = tl.dot(p, v.to(DOT), acc, input_precision="ieee")

    if ONE_SPLIT:
        o = acc / l_i[:, None]
        optr = Out + b * o_sb + hq[:, None] * o_sh + d[None, :]
        tl.store(optr, o.to(Out.dtype.element_ty), mask=qm)
    else:
        row = (b * HKV * GQA + hq) * n_splits + split  # [BLOCK_H] rows of the [B*Hq, n_splits] partials
        tl.store(PartM + row, m_i, mask=h_mask)
        tl.store(PartL + row, l_i, mask=h_mask)
        tl.store(PartAcc + row[:, None] * D + d[None, :], acc, mask=qm)


@triton.jit
def _decode_reduce_kernel(
    Out,
    PartAcc,
    PartM,
    PartL,
    o_sb,
    o_sh,
    HQ,
    n_splits,
    D,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # b * HQ + hq
    b = pid // HQ
    hq = pid % HQ
    s = tl.arange(0, BLOCK_S)
    s_mask = s < n_splits
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    m = tl.load(PartM + pid * n_splits + s, mask=s_mask, other=float("-inf"))
    l_s = tl.load(PartL + pid * n_splits + s, mask=s_mask, other=0.0)
    a = tl.load(
        PartAcc + (pid * n_splits + s)[:, None] * D + d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m_max = tl.reduce(m, 0, _MAX)
    w = tl.where(s_mask, tl.exp2(m - m_max), 0.0)
    o = tl.reduce(w[:, None] * a, 0, _ADD) / tl.reduce(w * l_s, 0, _ADD)
    tl.store(Out + b * o_sb + hq * o_sh + d, o.to(Out.dtype.element_ty), mask=d_mask)
