"""Triton kernels of the fused conv: forward, data gradient and weight gradient.

Accumulation is in ``ACC``: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 inputs (gradcheck).

All three are implicit GEMMs over tensors addressed through their strides, so NCHW and NHWC
(channels_last) inputs run the same code with no layout copy; NHWC is the fast case because its
channel stride is 1 and the reduction tiles load contiguously.

Offsets: the pixel index over the batch (N*P*Q or N*H*W, which may pass 2^31) and the batch index are
int64, so tensors may exceed 2^31 elements; the offset inside one image (C * H * W) and the row and
column within it are int32, and the launcher checks that they fit. Likewise for the weight: the filter
index k is int64, the offset inside one filter (C/groups * R * S) int32 and checked by the launcher.

``G`` (groups) is read by no kernel: it is there for the autotune key, since the grid, and with it the
best tile, grows with it.

``UPCAST`` exists only for the interpreter: Triton 3.8.0's interpreter returns garbage from a bf16
``tl.dot``, so under ``TRITON_INTERPRET=1`` bf16 tiles are widened to fp32 (exact) before the
dot. The compiled kernels never set it; their bf16 dot is checked by the compile report instead.
"""

import triton
import triton.language as tl


@triton.jit
def _forward_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    res_ptr,
    y_ptr,
    N,
    H,
    W,
    P,
    Q,
    M,
    CG,
    KG,
    G,
    sxn,
    sxc,
    sxh,
    sxw,
    swk,
    swc,
    swr,
    sws,
    srn,
    src,
    srh,
    srw,
    syn,
    syc,
    syh,
    syw,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    R: tl.constexpr,
    S: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # y[m, k] = act(sum_{r,s,c} x[n, c, p*st-pad+r*dil, q*st-pad+s*dil] * w[k, c, r, s] * scale + ...)
    # with m = (n, p, q) the output pixel and k the output channel of group g.
    # The pixel index is int64: N*P*Q (and so pid_m * BLOCK_M) may pass 2^31.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < KG

    q = (offs_m % Q).to(tl.int32)
    t = offs_m // Q
    p = (t % P).to(tl.int32)
    n = t // P
    h0 = p * stride_h - pad_h
    w0 = q * stride_w - pad_w
    x_row = x_ptr + n * sxn + (g * CG).to(tl.int64) * sxc
    k_glob = g * KG + offs_n
    w_col = w_ptr + k_glob.to(tl.int64) * swk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    num_cb = tl.cdiv(CG, BLOCK_K)
    # One flat loop over (r, s, channel block) so the pipeliner can overlap its loads.
    for it in tl.range(0, R * S * num_cb):
        rs = it // num_cb
        c = (it - rs * num_cb) * BLOCK_K + offs_k
        r = rs // S
        s = rs - r * S
        h = h0 + r * dil_h
        w = w0 + s * dil_w
        valid_m = mask_m & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        mask_c = c < CG
        a = tl.load(
            x_row[:, None] + (h * sxh + w * sxw)[:, None] + c[None, :] * sxc,
            mask=valid_m[:, None] & mask_c[None, :],
            other=0.0,
        )
        b = tl.load(
            w_col[None, :] + (c * swc)[:, None] + (r * swr + s * sws),
            mask=mask_c[:, None] & mask_n[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)

    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + k_glob, mask=mask_n, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + k_glob, mask=mask_n, other=0.0).to(ACC)[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        res = tl.load(
            res_ptr + (n * srn + p * srh + q * srw)[:, None] + (k_glob.to(tl.int64) * src)[None, :],
            mask=mask_out,
            other=0.0,
        )
        acc = acc + res.to(ACC)
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    y_ptrs = y_ptr + (n * syn + p * syh + q * syw)[:, None] + (k_glob.to(tl.int64) * syc)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _dgrad_kernel(
    go_ptr,
    out_ptr,
    w_ptr,
    scale_ptr,
    gx_ptr,
    H,
    W,
    P,
    Q,
    M,
    CG,
    KG,
    G,
    sgn,
    sgc,
    sgh,
    sgw,
    son,
    soc,
    soh,
    sow,
    swk,
    swc,
    swr,
    sws,
    sxn,
    sxc,
    sxh,
    sxw,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    R: tl.constexpr,
    S: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # gx[n, c, h, w] = sum_{k,r,s} gz[n, k, p, q] * w[k, c, r, s], over p*st = h + pad - r*dil
    # (and q likewise), where gz = grad_out * (out > 0) * scale is formed on load, never stored.
    # The mask is written as not (out <= 0), like torch's threshold_backward: a NaN output passes.
    # The pixel index is int64: N*H*W (and so pid_m * BLOCK_M) may pass 2^31.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < CG

    wi = (offs_m % W).to(tl.int32)
    t = offs_m // W
    hi = (t % H).to(tl.int32)
    n = t // H
    go_row = go_ptr + n * sgn + (g * KG).to(tl.int64) * sgc
    out_row = out_ptr + n * son + (g * KG).to(tl.int64) * soc
    w_col = w_ptr + (g * KG).to(tl.int64) * swk + offs_n * swc

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    num_kb = tl.cdiv(KG, BLOCK_K)
    for it in tl.range(0, R * S * num_kb):
        rs = it // num_kb
        k = (it - rs * num_kb) * BLOCK_K + offs_k
        r = rs // S
        s = rs - r * S
        ph = hi + pad_h - r * dil_h
        qw = wi + pad_w - s * dil_w
        valid_m = mask_m & (ph >= 0) & (qw >= 0) & (ph % stride_h == 0) & (qw % stride_w == 0)
        p = tl.where(valid_m, ph // stride_h, 0)
        q = tl.where(valid_m, qw // stride_w, 0)
        valid_m = valid_m & (p < P) & (q < Q)
        mask_k = k < KG
        mask_a = valid_m[:, None] & mask_k[None, :]
        pix = (p * sgh + q * sgw)[:, None]
        a = tl.load(go_row[:, None] + pix + (k * sgc)[None, :], mask=mask_a, other=0.0)
        if RELU:
            o = tl.load(
                out_row[:, None] + (p * soh + q * sow)[:, None] + (k * soc)[None, :],
                mask=mask_a,
                other=0.0,
            )
            a = tl.where(o.to(ACC) <= 0.0, 0.0, a)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + g * KG + k, mask=mask_k, other=0.0).to(ACC)
            # Scale the grad tile, not the weight: grad_out * scale rounded to the input dtype is what the
            # unfused backward feeds its conv, whereas a rounded weight * scale can overflow (fp16) where
            # neither factor does. (A tap that does not land is a loaded 0 here: times an infinite scale it is
            # NaN, in a sum the unfused conv never forms; masking it spilled on sm_80.)
            a = (a.to(ACC) * sc[None, :]).to(a.dtype)
        b = tl.load(
            w_col[None, :] + (k.to(tl.int64) * swk)[:, None] + (r * swr + s * sws),
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)

    gx_ptrs = gx_ptr + (n * sxn + hi * sxh + wi * sxw)[:, None] + ((g * CG + offs_n).to(tl.int64) * sxc)[None, :]
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _wgrad_kernel(
    go_ptr,
    out_ptr,
    x_ptr,
    scale_ptr,
    gw_ptr,
    gb_ptr,
    gres_ptr,
    H,
    W,
    P,
    Q,
    M,
    CG,
    KG,
    CRS,
    G,
    sgn,
    sgc,
    sgh,
    sgw,
    son,
    soc,
    soh,
    sow,
    sxn,
    sxc,
    sxh,
    sxw,
    sgwn,
    sgwk,
    sgwj,
    sgbn,
    srn,
    src,
    srh,
    srw,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    num_splits,
    R: tl.constexpr,
    S: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    COMPUTE_W: tl.constexpr,
    COMPUTE_B: tl.constexpr,
    STORE_GRES: tl.constexpr,
    INT64_PIXELS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # gw[k, (c,r,s)] = sum_m scale[k] * gm[m, k] * x[n, c, p*st-pad+r*dil, q*st-pad+s*dil],
    # gb[k] = sum_m gm[m, k] and gres = gm, with gm = grad_out * (out > 0) formed on load.
    # The programs of column block 0 also produce gb and gres, so grad_out is read once for them.
    # Program (i, j, g * num_splits + sp) reduces slice sp of the m blocks into partial sp; the
    # partials are summed in a fixed order afterwards: deterministic, with no atomics.
    # INT64_PIXELS: the pixel index m is int64 only when N*P*Q nears 2^31; in the loop, int64 index math
    # made a shipped config spill on sm_80, so the launcher asks for it only where it is needed.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    g = pid_z // num_splits
    sp = pid_z - g * num_splits

    offs_ko = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_K)
    mask_ko = offs_ko < KG
    mask_j = offs_j < CRS
    c = offs_j // (R * S)
    rs = offs_j - c * (R * S)
    r = rs // S
    s = rs - r * S
    k_glob = (g * KG + offs_ko).to(tl.int64)
    go_col = go_ptr + k_glob * sgc
    out_col = out_ptr + k_glob * soc
    x_col = x_ptr + (g * CG + c).to(tl.int64) * sxc
    side = pid_n == 0

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    bsum = tl.zeros((BLOCK_M,), dtype=ACC)
    if HAS_SCALE and COMPUTE_W:
        sc = tl.load(scale_ptr + k_glob, mask=mask_ko, other=0.0).to(ACC)
    num_mb = (M - 1) // BLOCK_K + 1  # not tl.cdiv: M + BLOCK_K - 1 wraps int32 when M nears 2^31 (M >= 1 here)
    blocks_per_split = tl.cdiv(num_mb, num_splits)
    mb_start = sp * blocks_per_split
    mb_end = tl.minimum(mb_start + blocks_per_split, num_mb)
    for mb in tl.range(mb_start, mb_end):
        if INT64_PIXELS:
            offs_m = tl.cast(mb, tl.int64) * BLOCK_K + offs_r
        else:
            offs_m = mb * BLOCK_K + offs_r
        mask_m = offs_m < M
        q = (offs_m % Q).to(tl.int32)
        t = offs_m // Q
        p = (t % P).to(tl.int32)
        n = (t // P).to(tl.int64)
        mask_a = mask_ko[:, None] & mask_m[None, :]
        a = tl.load(go_col[:, None] + (n * sgn + p * sgh + q * sgw)[None, :], mask=mask_a, other=0.0)
        if RELU:
            o = tl.load(out_col[:, None] + (n * son + p * soh + q * sow)[None, :], mask=mask_a, other=0.0)
            a = tl.where(o.to(ACC) <= 0.0, 0.0, a)
        if COMPUTE_B:
            bsum += tl.sum(a.to(ACC), axis=1)
        if STORE_GRES:
            tl.store(
                gres_ptr + (k_glob * src)[:, None] + (n * srn + p * srh + q * srw)[None, :],
                a,
                mask=mask_a & side,
            )
        if COMPUTE_W:
            if HAS_SCALE:
                # Scaled before the sum, as the unfused backward scales grad_out (and as dgrad does): an infinite
                # scale then gives NaN where terms of both signs meet, not +-inf.
                a = tl.where(mask_a, a.to(ACC) * sc[:, None], 0.0).to(a.dtype)
            h = (p * stride_h - pad_h)[:, None] + (r * dil_h)[None, :]
            w = (q * stride_w - pad_w)[:, None] + (s * dil_w)[None, :]
            valid = mask_m[:, None] & mask_j[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            b = tl.load(x_col[None, :] + (n * sxn)[:, None] + h * sxh + w * sxw, mask=valid, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)

    if COMPUTE_W:
        gw_ptrs = gw_ptr + sp * sgwn + (k_glob * sgwk)[:, None] + (offs_j * sgwj)[None, :]
        tl.store(gw_ptrs, acc.to(gw_ptr.dtype.element_ty), mask=mask_ko[:, None] & mask_j[None, :])
    if COMPUTE_B:
        tl.store(gb_ptr + sp * sgbn + k_glob, bsum.to(gb_ptr.dtype.element_ty), mask=mask_ko & side)
