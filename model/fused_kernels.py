"""The Triton kernels behind model/fused.py (GEMMs with fused epilogues) and model/triton_attention.py
(varlen attention with 64-row tiles); those modules' docstrings say what they compute and why.

Imported only by those two, on first use: `triton.jit` reads TRITON_INTERPRET when this module loads,
and Triton resolves the helpers a kernel calls among this module's globals.
Must not know: torch modules, checkpoints, packing, batching.
"""

import triton
import triton.language as tl

# `do_not_specialize` below: the kernels' one argument that changes with every batch (its rows, M or T). By
# default Triton compiles a kernel again for each new combination of its integer arguments' divisibility by
# 16 (and value 1): with every warm-up and CUDA graph bucket a multiple of 16, the traffic mix's other batch
# sizes compiled once more inside the first timed run (0.4-1 s each). tests/model/test_fused.py and
# test_triton_attention.py check the specializations Triton's CUDA backend computes for them.


@triton.jit
def _tile(pid, M, tiles_n, GROUP_M: tl.constexpr, BM: tl.constexpr):
    """Grouped launch order: GROUP_M row tiles share their column tiles' weights in L2."""
    tiles_m = tl.cdiv(M, BM)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def _two_dots(
    x_ptr, w_ptr, stride_x, M, rm, rows_a, rows_b,
    K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """acc_a = x[rm] @ W[rows_a]^T and acc_b = x[rm] @ W[rows_b]^T, fp32, as one (BM, 2·BN) product over W's
    rows interleaved a0, b0, a1, b1, … (one wider tensor-core instruction per step instead of two that read
    the same x tile), split in two after the K loop."""
    rk = tl.arange(0, BK)
    rows = tl.reshape(tl.join(rows_a, rows_b), (2 * BN,))  # (2·BN,): a0, b0, a1, b1, …
    x_ptrs = x_ptr + (rm % M)[:, None] * stride_x + rk[None, :]  # out-of-range rows read row r % M
    w_ptrs = w_ptr + rows[None, :] * K + rk[:, None]  # (BK, 2·BN): W is (N, K) row-major
    acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
    for _ in range(0, K // BK):
        acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc)
        x_ptrs += BK
        w_ptrs += BK
    return tl.split(tl.reshape(acc, (BM, BN, 2)))


@triton.jit(do_not_specialize=["M"])
def qkv_rope_kernel(
    x_ptr, w_ptr, bias_ptr, cos_ptr, sin_ptr, out_ptr, M, stride_x, stride_cs,
    K: tl.constexpr, HEADS: tl.constexpr, HALF: tl.constexpr, HAS_BIAS: tl.constexpr,
    M_BIG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # column tile n covers heads [n·G, (n+1)·G) of q, k or v (G = BN / HALF heads): acc_lo holds their
    # first halves, acc_hi their second halves; RoPE pairs column i of one with column i of the other
    G: tl.constexpr = BN // HALF
    D: tl.constexpr = 2 * HALF
    pid_m, pid_n = _tile(tl.program_id(0), M, 3 * HEADS // G, GROUP_M, BM)
    rm = pid_m * BM + tl.arange(0, BM)
    j = tl.arange(0, BN)
    col = (pid_n * G + j // HALF) * D + j % HALF  # column of Wqkv's output (and of out's row) for lo
    acc_lo, acc_hi = _two_dots(x_ptr, w_ptr, stride_x, M, rm, col, col + HALF, K, BM, BN, BK)
    if HAS_BIAS:
        acc_lo += tl.load(bias_ptr + col).to(tl.float32)[None, :]
        acc_hi += tl.load(bias_ptr + col + HALF).to(tl.float32)[None, :]
    which = (pid_n * G) // HEADS  # 0 q, 1 k, 2 v: a tile never straddles two (HEADS % G == 0)
    if which < 2:
        cs = (rm % M)[:, None] * stride_cs + (j % HALF)[None, :]
        cos = tl.load(cos_ptr + cs)
        sin = tl.load(sin_ptr + cs)
        lo = acc_lo * cos - acc_hi * sin
        acc_hi = acc_hi * cos + acc_lo * sin
        acc_lo = lo
    d_model = HEADS * D
    out = out_ptr + which * M * d_model + rm[:, None] * d_model + (col - which * d_model)[None, :]
    keep = (rm < M)[:, None]
    tl.store(out, acc_lo.to(out_ptr.dtype.element_ty), mask=keep)
    tl.store(out + HALF, acc_hi.to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit(do_not_specialize=["M"])
def geglu_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, M, stride_x,
    K: tl.constexpr, INTER: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    M_BIG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # column tile n: intermediate columns [n·BN, (n+1)·BN), i.e. Wi's input rows there and gate rows + INTER
    pid_m, pid_n = _tile(tl.program_id(0), M, INTER // BN, GROUP_M, BM)
    rm = pid_m * BM + tl.arange(0, BM)
    col = pid_n * BN + tl.arange(0, BN)
    a, g = _two_dots(x_ptr, w_ptr, stride_x, M, rm, col, col + INTER, K, BM, BN, BK)
    if HAS_BIAS:
        a += tl.load(bias_ptr + col).to(tl.float32)[None, :]
        g += tl.load(bias_ptr + col + INTER).to(tl.float32)[None, :]
    if ACT == 0:  # exact GELU, as F.gelu
        a = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
    elif ACT == 1:  # tanh GELU: tanh(u) = 2·sigmoid(2u) − 1
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        a = a * tl.sigmoid(2.0 * u)
    elif ACT == 2:
        a = tl.maximum(a, 0.0)
    else:
        a = a * tl.sigmoid(a)
    out = out_ptr + rm[:, None] * INTER + col[None, :]
    tl.store(out, (a * g).to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None])


@triton.jit
def _attend_blocks(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, key_lo, key_hi, lo, hi, stride_t, qk_scale,
    MASKED: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """Online softmax over the stream's keys [lo, hi) (k_ptrs, v_ptrs point at key `lo`). MASKED: row i sees
    only keys [key_lo[i], key_hi[i]) (its sequence, cut to its window); else every key of the range is every
    row's (no masks, no guards)."""
    for off in range(0, hi - lo, BN):
        if MASKED:
            cols = lo + off + tl.arange(0, BN)
            inside = cols < hi
            kt = tl.load(k_ptrs + off * stride_t, mask=inside[None, :], other=0.0)  # (D, BN)
        else:
            kt = tl.load(k_ptrs + off * stride_t)
        s = tl.dot(q, kt)  # (BM, BN) raw scores; the scale is folded into exp2's argument (one FMA)
        if MASKED:
            # key_lo <= col < key_hi, counted from this block's first key (the column index is a constant)
            j = tl.arange(0, BN)[None, :]
            seen = (j >= (key_lo - (lo + off))[:, None]) & (j < (key_hi - (lo + off))[:, None])
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if MASKED:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key seen yet stays empty
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs + off * stride_t, mask=inside[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs + off * stride_t)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["T"])
def varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, seq_ptr, T, stride_t, sm_scale,
    D: tl.constexpr, WINDOW: tl.constexpr, SEQ_BIG: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    # program (m, h): rows [m·BM, (m+1)·BM) of the packed stream, head h. The grid tiles the stream, not
    # each sequence, so no program is empty (a per-sequence grid launches max_seqlen / BM blocks for every
    # sequence). A block may hold the end of one sequence and the start of the next: each row sees only its
    # own sequence's keys, within |i - j| <= WINDOW when WINDOW >= 0 (local).
    pid_m, h = tl.program_id(0), tl.program_id(1)
    m0 = pid_m * BM
    rows = m0 + tl.arange(0, BM)
    live = rows < T
    seq = tl.load(seq_ptr + tl.minimum(rows, T - 1))  # (BM,) rows past the stream take the last sequence
    key_lo = tl.load(cu_ptr + seq)  # (BM,) row i sees keys [key_lo[i], key_hi[i]): its sequence ...
    key_hi = tl.load(cu_ptr + seq + 1)
    one_seq = tl.min(key_lo, 0) == tl.max(key_lo, 0)
    if WINDOW >= 0:  # ... cut to its window
        key_lo = tl.maximum(key_lo, rows - WINDOW)
        key_hi = tl.minimum(key_hi, rows + WINDOW + 1)
    lo = tl.min(key_lo, 0)  # the keys any row of the block sees: [lo, hi)
    hi = tl.max(key_hi, 0)
    dims = tl.arange(0, D)
    head = h * D
    q = tl.load(
        q_ptr + head + rows.to(tl.int64)[:, None] * stride_t + dims[None, :], mask=live[:, None], other=0.0
    )
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x · log2 e)
    k_ptrs = (
        k_ptr + head + (lo.to(tl.int64) + tl.arange(0, BN))[None, :] * stride_t + dims[:, None]
    )  # (D, BN)
    v_ptrs = (
        v_ptr + head + (lo.to(tl.int64) + tl.arange(0, BN))[:, None] * stride_t + dims[None, :]
    )  # (BN, D)
    full = 0  # keys [lo, lo + full) every row sees: a global block inside one sequence, its whole key blocks
    if WINDOW < 0:
        full = tl.where(one_seq, (hi - lo) // BN * BN, 0)
        acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, key_lo, key_hi, lo, lo + full,
                                       stride_t, qk_scale, False, BN)  # fmt: skip
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_ptrs + full * stride_t, v_ptrs + full * stride_t,
                                   key_lo, key_hi, lo + full, hi, stride_t, qk_scale, True, BN)  # fmt: skip
    out = (acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + head + rows.to(tl.int64)[:, None] * stride_t + dims[None, :], out, mask=live[:, None])
