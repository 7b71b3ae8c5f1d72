"""The unfused "contract" kernels, used where the chain kernels do not fit: one batched-GEMM step
per core (``_step_kernel``, also the dy sweep of the backward) and the per-core gradient reduction
(``_grad_step_kernel``). Launched by ``kernels.py``."""

from __future__ import annotations

from .._triton import INTERPRET, configs, tl, triton
from .tiles import core_tile


@triton.autotune(
    configs=configs(
        [{"BP": bp, "BJ": bj, "BN": bn} for bp in (32, 64, 128) for bj in (16, 32, 64) for bn in (64, 128)],
        interpret={"BP": 16, "BJ": 16, "BN": 32},
        quick=[{"BP": 64, "BJ": 32, "BN": 128, "num_warps": 4, "num_stages": 3}],
    ),
    key=["P", "J", "C", "N_BUCKET", "SPLINE"],
)
@triton.jit
def _step_kernel(
    in_ptr, core_ptr, bias_ptr, out_ptr,
    N, C, P, J, R1, IK, N_OUT, N_BUCKET,
    stride_ib, stride_ie, s_a, s_o, s_i, s_b,
    scale_o, top_o, scale_i, top_i,
    SPLINE: tl.constexpr, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BP: tl.constexpr, BJ: tl.constexpr, BN: tl.constexpr,
):
    """out[b, p, c] = sum_j A[p, j] in[b, j, c] (+ bias), for columns n = b * C + c < N.

    ``in`` element (b, j, c) sits at ``b * stride_ib + (j * C + c) * stride_ie``; ``out`` is
    contiguous ``(N / C, P, C)``. A[(o, b), (a, i)] = G[a, o, i, b] (P = O_k r_k, J = r_{k-1} I_k), or
    its transpose A[(a, i), (o, b)] with ``TRANSPOSED`` (the dy sweep of the backward).
    FLOPs 2 P J N (tensor cores; + 32 P J cdiv(N, BN) tap FMAs with ``SPLINE``).
    Bytes elt * (J N cdiv(P, BP) + P N + P J cdiv(N, BN)).
    """
    pid_n = tl.program_id(0)  # the columns (M x O_<k x I_>k, up to ~1000 x M) on axis 0: 2^31 - 1 programs, not 65535
    pid_p = tl.program_id(1)
    rp = pid_p * BP + tl.arange(0, BP)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < N
    bb = (rn // C).to(tl.int64)
    cc = rn % C
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    for j0 in range(0, J, BJ):
        rj = j0 + tl.arange(0, BJ)
        if TRANSPOSED:
            a = tl.trans(core_tile(core_ptr, rj // R1, rj % R1, rp // IK, rp % IK, rj < J, rp < P,
                                    s_a, s_o, s_i, s_b, scale_o, top_o, scale_i, top_i, SPLINE))
        else:
            a = core_tile(core_ptr, rp // R1, rp % R1, rj // IK, rj % IK, rp < P, rj < J,
                           s_a, s_o, s_i, s_b, scale_o, top_o, scale_i, top_i, SPLINE)
        v = tl.load(in_ptr + bb[None, :] * stride_ib + (rj[:, None] * C + cc[None, :]) * stride_ie,
                    mask=(rj < J)[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a.to(v.dtype), v, acc, input_precision=PRECISION)
    off = (bb[None, :] * P + rp[:, None]) * C + cc[None, :]
    mask = (rp < P)[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + off % N_OUT, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=mask)


GRAD_SPLITS = 2 if INTERPRET else 8  # the most column splits any _grad_step_kernel config uses


@triton.autotune(
    configs=configs(
        [{"BP": bp, "BJ": bj, "BN": bn, "N_SPLIT": GRAD_SPLITS} for bp in (32, 64) for bj in (32, 64) for bn in (64, 128)],
        interpret={"BP": 16, "BJ": 16, "BN": 32, "N_SPLIT": 2},
        quick=[{"BP": 64, "BJ": 64, "BN": 128, "N_SPLIT": GRAD_SPLITS, "num_warps": 4, "num_stages": 3}],
    ),
    key=["P", "J", "C", "N_BUCKET"],
)
@triton.jit
def _grad_step_kernel(
    v_ptr, u_ptr, part_ptr,
    N, C, P, J, N_BUCKET,
    stride_vb, stride_ve, stride_ub, stride_ue,
    PRECISION: tl.constexpr, STATE: tl.constexpr, BP: tl.constexpr, BJ: tl.constexpr, BN: tl.constexpr,
    N_SPLIT: tl.constexpr,
):
    """part[s, p, j] = sum over columns n = b * C + c of split s of V[b, p, c] U[b, j, c] (fp32).

    V ``(N / C, P, C)`` is the gradient of a step's output, U ``(N / C, J, C)`` its input (strided as
    in ``_step_kernel``); the host sums the ``N_SPLIT`` partials (deterministic, no atomics).
    FLOPs 2 P J N. Bytes elt * N (P cdiv(J, BJ) + J cdiv(P, BP)) + 4 N_SPLIT P J.
    """
    pid_p = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    rp = pid_p * BP + tl.arange(0, BP)
    rj = pid_j * BJ + tl.arange(0, BJ)
    acc = tl.zeros((BP, BJ), dtype=tl.float32)
    for n0 in range(pid_s * BN, N, BN * N_SPLIT):
        rn = n0 + tl.arange(0, BN)
        n_mask = rn < N
        bb = (rn // C).to(tl.int64)
        cc = rn % C
        v = tl.load(v_ptr + bb[None, :] * stride_vb + (rp[:, None] * C + cc[None, :]) * stride_ve,
                    mask=(rp < P)[:, None] & n_mask[None, :], other=0.0)
        u = tl.load(u_ptr + bb[:, None] * stride_ub + (rj[None, :] * C + cc[:, None]) * stride_ue,
                    mask=n_mask[:, None] & (rj < J)[None, :], other=0.0)
        acc = tl.dot(v.to(STATE), u.to(STATE), acc, input_precision=PRECISION)  # x, dy or a state
    tl.store(part_ptr + (pid_s * P + rp[:, None]) * J + rj[None, :], acc,
             mask=(rp < P)[:, None] & (rj < J)[None, :])

