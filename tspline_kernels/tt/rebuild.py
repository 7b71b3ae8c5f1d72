"""The "rebuild" kernels: W tiles rebuilt on chip from the head product L and the last core
(``_rebuild_kernel``: y = x @ W.T and dx; ``_rebuild_grad_kernel``: dL and dT; at many rows
``_rebuild_slice_kernel`` writes slices of W for cuBLAS), and their tile shapes
(``rebuild_tiles``). Launched by ``kernels.py``."""

from __future__ import annotations

from dataclasses import dataclass

from .._triton import INTERPRET, configs, dot_dim, grouped_pid, next_pow2, tl, triton


@triton.jit
def _tile_index(pid, P: tl.constexpr, DP: tl.constexpr, D_LAST, H):
    """Columns of a tile covering head indices [pid*P, pid*P + P) x all (padded) last indices:
    tile position t = p * DP + e -> matrix index h * D_LAST + e, and its validity."""
    t = tl.arange(0, P * DP)
    h = pid * P + t // DP
    e = t % DP
    return h * D_LAST + e, (h < H) & (e < D_LAST)


@triton.jit
def _load_head(l_ptr, oh0, ih0, O_H, I_H, R, PO: tl.constexpr, PI: tl.constexpr, RP: tl.constexpr):
    """L[oh0 + po, ih0 + pi, r] as a ``(PO * PI, RP)`` tile, rows s = po * PI + pi."""
    s = tl.arange(0, PO * PI)
    oh = oh0 + s // PI
    ih = ih0 + s % PI
    rr = tl.arange(0, RP)
    return tl.load(l_ptr + ((oh * I_H + ih) * R)[:, None] + rr[None, :],
                   mask=((oh < O_H) & (ih < I_H))[:, None] & (rr < R)[None, :], other=0.0)


@triton.jit
def _load_last(t_ptr, O_D, I_D, R, ODP: tl.constexpr, IDP: tl.constexpr, RP: tl.constexpr):
    """The last core G_d[r, od, id, 0] as a ``(RP, ODP * IDP)`` tile, columns q = od * IDP + id."""
    rr = tl.arange(0, RP)
    q = tl.arange(0, ODP * IDP)
    od = q // IDP
    idd = q % IDP
    return tl.load(t_ptr + rr[:, None] * (O_D * I_D) + (od * I_D + idd)[None, :],
                   mask=(rr < R)[:, None] & ((od < O_D) & (idd < I_D))[None, :], other=0.0)


def _rebuild_prune(cfgs, named_args, **kwargs):
    """Drop row blocks much taller than M (they only add masked work)."""
    m = named_args["M"]
    kept = [c for c in cfgs if c.kwargs["BM"] <= max(16, next_pow2(m))]
    return kept or cfgs[:1]


@triton.autotune(
    configs=configs([{"BM": bm} for bm in (16, 32, 64, 128, 256)], interpret={"BM": 16}, warps=(4, 8),
                    quick=[{"BM": 16, "num_warps": 4, "num_stages": 3}, {"BM": 128, "num_warps": 8, "num_stages": 3}]),
    key=["M_BUCKET", "O_H", "I_H", "O_D", "I_D", "R"],
    prune_configs_by={"early_config_prune": _rebuild_prune},
)
@triton.jit
def _rebuild_kernel(
    x_ptr, l_ptr, t_ptr, bias_ptr, y_ptr,
    M, O_H, I_H, O_D: tl.constexpr, I_D: tl.constexpr, R, M_BUCKET,  # O_D, I_D constexpr: x's K tiles vectorise
    stride_xm, stride_xk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    PO: tl.constexpr, PI: tl.constexpr, ODP: tl.constexpr, IDP: tl.constexpr, RP: tl.constexpr,
    BM: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    """y = x @ W.T + bias, x ``(M, I_H I_D)``, W = sum_r L[o_h, i_h, r] T[r, o_d, i_d], y ``(M, O_H O_D)``.

    Program (m block, n block) owns BM rows and the BN = PO * ODP output columns of head indices
    [n*PO, n*PO + PO); each K step rebuilds the (BK = PI * IDP, BN) tile of W.T as
    L_sub (PO PI x RP) @ T (RP x ODP IDP), permuted (po, pi, od, id) -> (pi, id) x (po, od), and
    feeds it to ``tl.dot``. Programs are grouped along M for L2 reuse of x.
    FLOPs 2 M O I (main) + 2 RP O I cdiv(M, BM) (rebuild), both tensor-core dots.
    Bytes elt * (M I + M O + |L| cdiv(M, BM)) when the re-reads of x across column blocks hit L2
    (at worst elt * M I cdiv(O, BN) for x).
    """
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_pid(pid, tl.cdiv(M, BM), tl.cdiv(O_H, PO), GROUP_M)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # row offsets past 2^31 elements
    m_mask = rm < M
    cols, col_ok = _tile_index(pid_n, PO, ODP, O_D, O_H)
    t = _load_last(t_ptr, O_D, I_D, R, ODP, IDP, RP)
    acc = tl.zeros((BM, PO * ODP), dtype=tl.float32)
    for k in range(0, tl.cdiv(I_H, PI)):
        w = tl.dot(_load_head(l_ptr, pid_n * PO, k * PI, O_H, I_H, R, PO, PI, RP), t, input_precision=PRECISION)
        w = tl.reshape(tl.permute(tl.reshape(w, (PO, PI, ODP, IDP)), (1, 3, 0, 2)), (PI * IDP, PO * ODP))
        ks, k_ok = _tile_index(k, PI, IDP, I_D, I_H)
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + ks[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(xt, w.to(xt.dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & col_ok[None, :])


@triton.jit
def _rebuild_slice_kernel(
    l_ptr, t_ptr, w_ptr,
    OH0, NH, I_H, O_D: tl.constexpr, I_D: tl.constexpr, R, stride_w,
    PRECISION: tl.constexpr,
    PO: tl.constexpr, PI: tl.constexpr, ODP: tl.constexpr, IDP: tl.constexpr, RP: tl.constexpr,
):
    """One slice of W for the sliced path: w[j, k] = W[OH0 O_D + j, k] for j < NH O_D, k < I_H I_D,
    W = sum_r L[o_h, i_h, r] T[r, o_d, i_d] (rows o_h O_D + o_d, columns i_h I_D + i_d).

    Program (n, k) writes the (PO ODP, PI IDP) tile of head indices OH0 + [n*PO, +PO) x [k*PI, +PI):
    L_sub (PO PI x RP) @ T (RP x ODP IDP) on tensor cores, permuted (po, pi, od, id) -> (po, od) x
    (pi, id) and rounded to w's dtype: the values ``_rebuild_kernel`` feeds to its main ``tl.dot``.
    w ``(>= NH O_D, I_H I_D)``, row stride ``stride_w``, unit column stride.
    FLOPs 2 RP NH O_D I_H I_D (padded rank). Bytes: the slice written (L2-resident for the GEMM
    that follows) + the head rows read once.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    t = _load_last(t_ptr, O_D, I_D, R, ODP, IDP, RP)
    w = tl.dot(_load_head(l_ptr, OH0 + pid_n * PO, pid_k * PI, OH0 + NH, I_H, R, PO, PI, RP), t,
               input_precision=PRECISION)
    w = tl.reshape(tl.permute(tl.reshape(w, (PO, PI, ODP, IDP)), (0, 2, 1, 3)), (PO * ODP, PI * IDP))
    rows, row_ok = _tile_index(pid_n, PO, ODP, O_D, NH)
    cols, col_ok = _tile_index(pid_k, PI, IDP, I_D, I_H)
    tl.store(w_ptr + rows[:, None] * stride_w + cols[None, :], w.to(w_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(
    configs=configs([{"BM": bm} for bm in (32, 64, 128)], interpret={"BM": 16},
                    quick=[{"BM": 64, "num_warps": 4, "num_stages": 3}]),
    key=["M_BUCKET", "O_H", "I_H", "O_D", "I_D", "R"],
)
@triton.jit
def _rebuild_grad_kernel(
    dy_ptr, x_ptr, l_ptr, t_ptr, dl_ptr, dt_ptr,
    M, O_H, I_H, O_D: tl.constexpr, I_D: tl.constexpr, R, M_BUCKET,  # O_D, I_D constexpr: x's K tiles vectorise
    stride_dm, stride_dn, stride_xm, stride_xk,
    PRECISION: tl.constexpr,
    PO: tl.constexpr, PI: tl.constexpr, ODP: tl.constexpr, IDP: tl.constexpr, RP: tl.constexpr,
    BM: tl.constexpr,
):
    """Gradients of sum(G * W), G = dy.T @ x, for W = sum_r L[o_h, i_h, r] T[r, o_d, i_d].

    Program (n, s) owns output head indices [n*PO, +PO) and every ``num_programs(1)``-th block of
    PI input head indices from s. For each W tile it accumulates that tile of G over M on chip
    (never stored), permutes it to G' ``(PO PI, ODP IDP)``, writes dL[tile] = G' @ T.T (each L entry
    belongs to exactly one tile) and adds L_sub.T @ G' to its dT partial (fp32, registers); the
    host sums the ``cdiv(O_H, PO) * num_programs(1)`` partials.
    FLOPs 2 M O I + 4 RP O I. Bytes elt * M (I cdiv(O, BN) + O cdiv(I, BK)) + 4 (|L| + partials RP ODP IDP).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols, col_ok = _tile_index(pid_n, PO, ODP, O_D, O_H)
    t = _load_last(t_ptr, O_D, I_D, R, ODP, IDP, RP).to(tl.float32)
    s = tl.arange(0, PO * PI)
    rr = tl.arange(0, RP)
    oh = pid_n * PO + s // PI
    dt = tl.zeros((RP, ODP * IDP), dtype=tl.float32)
    for k in range(pid_s, tl.cdiv(I_H, PI), tl.num_programs(1)):
        ks, k_ok = _tile_index(k, PI, IDP, I_D, I_H)
        g = tl.zeros((PO * ODP, PI * IDP), dtype=tl.float32)
        for m0 in range(0, M, BM):
            rm = (m0 + tl.arange(0, BM)).to(tl.int64)  # row offsets past 2^31 elements
            m_mask = rm < M
            dyt = tl.load(dy_ptr + cols[:, None] * stride_dn + rm[None, :] * stride_dm,
                          mask=col_ok[:, None] & m_mask[None, :], other=0.0)
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + ks[None, :] * stride_xk,
                         mask=m_mask[:, None] & k_ok[None, :], other=0.0)
            g = tl.dot(dyt, xt, g, input_precision=PRECISION)
        g = tl.reshape(tl.permute(tl.reshape(g, (PO, ODP, PI, IDP)), (0, 2, 1, 3)), (PO * PI, ODP * IDP))
        ih = k * PI + s % PI
        tl.store(dl_ptr + ((oh * I_H + ih) * R)[:, None] + rr[None, :], tl.dot(g, tl.trans(t), input_precision="ieee"),
                 mask=((oh < O_H) & (ih < I_H))[:, None] & (rr < R)[None, :])
        head = _load_head(l_ptr, pid_n * PO, k * PI, O_H, I_H, R, PO, PI, RP).to(tl.float32)
        dt = tl.dot(tl.trans(head), g, dt, input_precision="ieee")
    part = pid_n * tl.num_programs(1) + pid_s
    q = tl.arange(0, ODP * IDP)
    tl.store(dt_ptr + (part * RP + rr[:, None]) * (ODP * IDP) + q[None, :], dt)


@dataclass(frozen=True)
class RebuildTiles:
    """Padded last-core sizes (ODP, IDP), padded rank RP, and head indices per tile (PO, PI)."""

    odp: int
    idp: int
    rp: int
    po: int
    pi: int


def rebuild_tiles(o_d: int, i_d: int, r: int) -> RebuildTiles:
    """Tile shape of the rebuild kernels: every ``tl.dot`` dimension a power of two >= 16, output
    and K tiles of about ``target`` columns (32 under the interpreter, 64 on a GPU)."""
    odp, idp = next_pow2(o_d), next_pow2(i_d)
    while odp * idp < 16:
        if idp <= odp:
            idp *= 2
        else:
            odp *= 2
    target = 32 if INTERPRET else 64
    po, pi = max(1, target // odp), max(1, target // idp)
    while po * pi < 16 or po * odp < 16 or pi * idp < 16:
        if po * odp <= pi * idp:
            po *= 2
        else:
            pi *= 2
    return RebuildTiles(odp, idp, dot_dim(r), po, pi)

