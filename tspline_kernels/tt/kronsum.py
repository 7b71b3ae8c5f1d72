"""The "Kronecker-sum" kernel for TT matrices whose cores split into two halves with small
merged modes (8^4 rank 8: two 64 x 64 halves). Merging each half's cores (exact, host-side,
core-sized) gives A ``(1, O_a, I_a, R)`` and B ``(R, O_b, I_b, 1)`` with R = r_c, the rank at the
cut, and

    W = sum_a A_a (x) B_a,   y[r] = sum_a A_a X[r] B_a.T,   X[r] = x[r].reshape(I_a, I_b),

2 M R (I_a I_b O_b + O_b I_a O_a) FLOPs, e.g. 69 GFLOP at M = 8192 for 8^4 r8 where the chain
kernel executes 172 and a dense GEMM 275. Unlike the Kronecker layer's kernel (one row per
``tl.dot``), a program stacks BM rows in the MMA M dimension: X ``(BM I_a, I_b)`` @ B_a.T gives
V ``[(r, i), q]``, a register permute makes it ``[(r, q), i]``, and @ A_a.T accumulates
y ``[(r, q), p]`` in fp32 over the R terms. It runs the forward (contract) and dx (x @ W
with W.T's halves, W's read transposed). ``_kronsum_grad_kernel`` gives the merged halves'
gradients with rows in the MMA M dimension too,

    dA_a = sum_r dY[r] V_a[r],  V_a[r] = X[r] B_a.T;   dB_a = sum_r U_a[r] X[r],  U_a[r] = dY[r].T A_a,

(half the FLOPs of a dense dW); the cores' gradients follow on the host (``reference.tt.merge_cores_grad``).
Launched by ``kernels.py``.
"""

from __future__ import annotations

from .._rescale import narrow
from .._triton import configs, tl, triton

ACC_LIMIT = 8192  # elements of the largest fp32 register tile (V or the accumulator) a config holds


def _prune(cfgs, named_args, **kwargs):
    """Keep row blocks whose register tiles fit ``ACC_LIMIT`` (never nothing)."""
    tile = max(kwargs["N1P"], kwargs["M1P"]) * kwargs["M2P"]
    kept = [c for c in cfgs if c.kwargs["BM"] * tile <= ACC_LIMIT]
    return kept or [min(cfgs, key=lambda c: c.kwargs["BM"])]


@triton.autotune(
    configs=configs([{"BM": bm} for bm in (1, 2, 4)], interpret={"BM": 2},
                    quick=[{"BM": 2, "num_warps": 4, "num_stages": 2}, {"BM": 2, "num_warps": 8, "num_stages": 2}],
                    stages=(2,)),
    key=["M_BUCKET", "R", "M1", "N1", "M2", "N2"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(do_not_specialize=["M"])
def _kronsum_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, y_ptr,
    M, R, M1, N1, M2, N2, M_BUCKET,
    stride_xm, stride_xk, stride_ym, stride_yn,
    sa_o, sa_i, sa_r, sb_r, sb_o, sb_i,
    HAS_BIAS: tl.constexpr, M1P: tl.constexpr, N1P: tl.constexpr, M2P: tl.constexpr, N2P: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr,
):
    """y[r] = sum_a A_a X[r] B_a.T + bias for rows r in ``[pid*BM, (pid+1)*BM)``; x ``(M, N1*N2)``,
    A_a[p, i] at ``a_ptr + p*sa_o + i*sa_i + a*sa_r`` ``(M1, N1)``, B_a[q, k] at
    ``b_ptr + a*sb_r + q*sb_o + k*sb_i`` ``(M2, N2)``, y ``(M, M1*M2)``.

    FLOPs (tensor cores): 2*M*R*(N1P*N2P*M2P + M2P*N1P*M1P).
    Bytes: elt*M*(N1*N2 + M1*M2) + elt*R*(M1*N1 + M2*N2)*cdiv(M, BM) from L2.
    """
    pid = tl.program_id(0)
    out_ty = y_ptr.dtype.element_ty
    # X rows (r, i), columns k: BM rows of x stacked in the MMA M dimension
    xr = tl.arange(0, BM * N1P)
    r, i = pid * BM + xr // N1P, xr % N1P
    k = tl.arange(0, N2P)
    x = tl.load(x_ptr + r.to(tl.int64)[:, None] * stride_xm + (i[:, None] * N2 + k[None, :]) * stride_xk,
                mask=((r < M) & (i < N1))[:, None] & (k < N2)[None, :], other=0.0)
    q = tl.arange(0, M2P)
    p = tl.arange(0, M1P)
    i1 = tl.arange(0, N1P)
    acc = tl.zeros((BM * M2P, M1P), dtype=tl.float32)  # y rows (r, q), columns p
    for a in range(R):
        bt = tl.load(b_ptr + a * sb_r + k[:, None] * sb_i + q[None, :] * sb_o,
                     mask=(k < N2)[:, None] & (q < M2)[None, :], other=0.0)
        v = tl.dot(x, bt, input_precision=PRECISION)  # [(r, i), q]
        v = tl.reshape(tl.permute(tl.reshape(v, (BM, N1P, M2P)), (0, 2, 1)), (BM * M2P, N1P))  # [(r, q), i]
        vh, inv = narrow(v, out_ty, 1)
        at = tl.load(a_ptr + a * sa_r + i1[:, None] * sa_i + p[None, :] * sa_o,
                     mask=(i1 < N1)[:, None] & (p < M1)[None, :], other=0.0)
        acc += tl.dot(vh, at, input_precision=PRECISION) * inv
    yr = tl.arange(0, BM * M2P)
    r, q = pid * BM + yr // M2P, yr % M2P
    col = p[None, :] * M2 + q[:, None]  # y[r, p*M2 + q]
    mask = ((r < M) & (q < M2))[:, None] & (p < M1)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + r.to(tl.int64)[:, None] * stride_ym + col * stride_yn, acc.to(out_ty), mask=mask)


@triton.autotune(
    configs=configs([{"BM": bm} for bm in (1, 2, 4)], interpret={"BM": 2},
                    quick=[{"BM": 1, "num_warps": 8, "num_stages": 2}, {"BM": 2, "num_warps": 8, "num_stages": 2}],
                    stages=(2,)),
    key=["M_BUCKET", "R", "M1", "N1", "M2", "N2"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(do_not_specialize=["M"])
def _kronsum_grad_kernel(
    x_ptr, dy_ptr, a_ptr, b_ptr, part_ptr,
    M, R, M1, N1, M2, N2, M_BUCKET, SPLITS,
    stride_xm, stride_xk, stride_dm, stride_dn,
    sa_o, sa_i, sa_r, sb_r, sb_o, sb_i,
    M1P: tl.constexpr, N1P: tl.constexpr, M2P: tl.constexpr, N2P: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr,
):
    """Program (s, a) (a the fastest grid axis: the R programs on the same rows share them in L2)
    sums over the row blocks s, s + SPLITS, ... of BM rows
        dA_a[p, i] = sum_r sum_q dY[r][p, q] V[r][i, q],  V[r] = X[r] B_a.T  (dY[r] = dy[r].reshape(M1, M2))
        dB_a[q, k] = sum_r sum_i U[r][q, i] X[r][i, k],   U[r] = dY[r].T A_a
    in fp32 and writes them to ``part[s, a] = (dA_a (M1, N1) row-major, dB_a (M2, N2))``, every
    entry (zeros where it has no rows); the host sums the SPLITS slots. x ``(M, N1*N2)``, dy
    ``(M, M1*M2)``, A and B strided as in ``_kronsum_kernel``.

    FLOPs (tensor cores): 4*M*R*(N1P*N2P*M2P + M2P*N1P*M1P), twice the forward's.
    Bytes: elt*M*(N1*N2 + M1*M2) (the R programs of a row block share it in L2)
    + 4*SPLITS*R*(M1*N1 + M2*N2) partials + elt*R*(M1*N1 + M2*N2) per program.
    """
    pid = tl.program_id(0)
    a, s = pid % R, pid // R
    in_ty = x_ptr.dtype.element_ty
    p = tl.arange(0, M1P)
    i = tl.arange(0, N1P)
    q = tl.arange(0, M2P)
    k = tl.arange(0, N2P)
    bt = tl.load(b_ptr + a * sb_r + k[:, None] * sb_i + q[None, :] * sb_o,
                 mask=(k < N2)[:, None] & (q < M2)[None, :], other=0.0)  # B_a.T (k, q)
    am = tl.load(a_ptr + a * sa_r + p[:, None] * sa_o + i[None, :] * sa_i,
                 mask=(p < M1)[:, None] & (i < N1)[None, :], other=0.0)  # A_a (p, i)
    da = tl.zeros((M1P, N1P), dtype=tl.float32)
    db = tl.zeros((M2P, N2P), dtype=tl.float32)
    xr = tl.arange(0, BM * N1P)  # X rows (r, i)
    dc = tl.arange(0, BM * M2P)  # dY columns (r, q)
    for block in range(s, tl.cdiv(M, BM), SPLITS):
        r = block * BM + xr // N1P
        x = tl.load(x_ptr + r.to(tl.int64)[:, None] * stride_xm + ((xr % N1P)[:, None] * N2 + k[None, :]) * stride_xk,
                    mask=((r < M) & (xr % N1P < N1))[:, None] & (k < N2)[None, :], other=0.0)
        r = block * BM + dc // M2P
        dyt = tl.load(dy_ptr + r.to(tl.int64)[None, :] * stride_dm + (p[:, None] * M2 + (dc % M2P)[None, :]) * stride_dn,
                      mask=(p < M1)[:, None] & ((r < M) & (dc % M2P < M2))[None, :], other=0.0)  # [p, (r, q)]
        v = tl.dot(x, bt, input_precision=PRECISION)  # [(r, i), q]
        v = tl.reshape(tl.permute(tl.reshape(v, (BM, N1P, M2P)), (0, 2, 1)), (BM * M2P, N1P))  # [(r, q), i]
        da += tl.dot(dyt, v.to(in_ty), input_precision=PRECISION)
        u = tl.dot(tl.trans(dyt), am, input_precision=PRECISION)  # [(r, q), i]
        u = tl.reshape(tl.permute(tl.reshape(u, (BM, M2P, N1P)), (1, 0, 2)), (M2P, BM * N1P))  # [q, (r, i)]
        db += tl.dot(u.to(in_ty), x, input_precision=PRECISION)
    out = part_ptr + pid.to(tl.int64) * (M1 * N1 + M2 * N2)  # slot s, entry a
    tl.store(out + p[:, None] * N1 + i[None, :], da, mask=(p < M1)[:, None] & (i < N1)[None, :])
    tl.store(out + M1 * N1 + q[:, None] * N2 + k[None, :], db, mask=(q < M2)[:, None] & (k < N2)[None, :])
