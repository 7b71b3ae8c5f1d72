"""Triton spline kernels against the reference: forward, dx, d(control), d(sigma), d(bias).

On CPU the kernels run under the Triton interpreter, on CUDA compiled; shapes are deliberately
not block multiples. Tolerances: ``tspline_kernels.testing.TOLERANCES`` for the input dtype.
"""

import pytest
import torch

import tspline_kernels as tk
from tspline_kernels.testing import assert_backends_agree, assert_close, cuda_step_peak_bytes
from tspline_kernels.reference.common import compute_dtype

LAYERS = {
    "bspline": dict(basis="bspline", grid=(6, 9)),
    "bspline-windowed": dict(basis="bspline", grid=(40, 70)),
    "bicubic": dict(basis="bicubic", n_control_points=10),
    "eisenstein": dict(basis="eisenstein", n_control_points=16),
    "gaussian": dict(basis="gaussian", n_control_points=12),
    "eisenstein-local": dict(basis="eisenstein", n_control_points=40, support="local"),
    "gaussian-local": dict(basis="gaussian", n_control_points=40, support="local"),
}

# (leading shape of x, in_features, out_features)
SHAPES = {
    "odd-5x37x45": ((5,), 37, 45),
    "one-row": ((1,), 37, 45),
    "3d-2x3": ((2, 3), 37, 45),
    "empty-batch": ((0,), 37, 45),
    "tiny-1x1": ((4,), 1, 1),
}


def make_layer(name, n_in, n_out, dtype, device):
    layer = tk.SplineLinear(n_in, n_out, **LAYERS[name]).to(device=device, dtype=dtype)
    if name.startswith("gaussian"):
        with torch.no_grad():
            layer.log_bandwidth.fill_(-0.6)  # away from the init value, so d(sigma) is exercised
    return layer


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("name", list(LAYERS), ids=list(LAYERS))
def test_fp32_shapes(name, shape, kernel_device):
    lead, n_in, n_out = SHAPES[shape]
    layer = make_layer(name, n_in, n_out, torch.float32, kernel_device)
    x = torch.randn(*lead, n_in, device=kernel_device)
    g = torch.randn(*lead, n_out, device=kernel_device)
    assert_backends_agree(layer, x, g, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(LAYERS), ids=list(LAYERS))
def test_half_dtypes(name, dtype, kernel_device):
    layer = make_layer(name, 50, 33, dtype, kernel_device)
    x = torch.randn(7, 50, device=kernel_device, dtype=dtype)
    g = torch.randn(7, 33, device=kernel_device, dtype=dtype)
    assert_backends_agree(layer, x, g, dtype)


def test_gaussian_width_floor(kernel_device):
    """exp(log_bandwidth) = e^-8 is below SIGMA_MIN = 1e-3: both backends use the floor as sigma,
    and the log_bandwidth gradient is exactly 0 (the clamp's), computed by the op itself."""
    layer = make_layer("gaussian", 37, 45, torch.float32, kernel_device)
    with torch.no_grad():
        layer.log_bandwidth.fill_(-8.0)
    x, g = torch.randn(5, 37, device=kernel_device), torch.randn(5, 45, device=kernel_device)
    assert_backends_agree(layer, x, g, torch.float32)
    with tk.backend("triton"):
        (d_log_bandwidth,) = torch.autograd.grad(layer(x), [layer.log_bandwidth], g)
    assert d_log_bandwidth.item() == 0.0


def _grid_with_large_interior(layer, axis: int, big: float) -> None:
    """Scale the separable control grid's interior along ``axis`` (0: rows, 1: columns) by ``big``
    and its two edge lines by 0.1: with two features on that axis only the edges reach the
    output, so the interior's huge intermediates must not leak into it."""
    grid = layer._grid_control().detach().clone()
    scale = torch.full((grid.shape[axis],), big)
    scale[[0, -1]] = 0.1
    grid *= scale[:, None] if axis == 0 else scale[None, :]
    with torch.no_grad():
        layer.control.copy_(grid.reshape(layer.control.shape))


@pytest.mark.parametrize("name", ["bspline", "bicubic"])
@pytest.mark.parametrize("axis", ["forward", "dx"])
def test_large_fp16_intermediates_stay_finite(name, axis, kernel_device):
    """x @ Bi @ C.T (or dy @ Bo @ C for dx) exceeds fp16's range in the grid rows no output
    reads, while y, dx and d(control) are finite: the kernels keep those intermediates in fp32
    like the reference (they were rounded to fp16: inf, then inf * 0 = NaN over whole rows)."""
    kw = dict(LAYERS[name], **({"n_control_points": 36} if name == "bicubic" else {}))
    n_in, n_out = (37, 2) if axis == "forward" else (2, 37)
    layer = tk.SplineLinear(n_in, n_out, **kw)
    _grid_with_large_interior(layer, 0 if axis == "forward" else 1, 300.0)
    layer = layer.to(device=kernel_device, dtype=torch.float16)
    x = torch.randn(3, n_in, device=kernel_device) * (2000 if axis == "forward" else 1)
    g = torch.randn(3, n_out, device=kernel_device) * (0.01 if axis == "forward" else 2000)
    assert_backends_agree(layer, x.half(), g.half(), torch.float16)


@pytest.mark.parametrize("name", ["gaussian", "eisenstein-local"])
def test_large_fp16_inputs_field(name, kernel_device):
    """Field bases: weight tiles are convex combinations of the fp16 control values and every
    product accumulates in fp32, so large inputs give the reference's finite y, dx, d(control)."""
    layer = make_layer(name, 37, 45, torch.float16, kernel_device)
    x = torch.randn(3, 37, device=kernel_device, dtype=torch.float16) * 2000
    g = torch.randn(3, 45, device=kernel_device, dtype=torch.float16) * 0.01
    assert_backends_agree(layer, x, g, torch.float16)


DEGENERATE = {
    "bicubic-1": dict(basis="bicubic", n_control_points=1),
    "bicubic-2": dict(basis="bicubic", n_control_points=2),
    "eisenstein-1-local": dict(basis="eisenstein", n_control_points=1, support="local"),
    "gaussian-2-local": dict(basis="gaussian", n_control_points=2, support="local"),
    "bspline-grid-above-features": dict(basis="bspline", grid=(9, 70)),
}


@pytest.mark.parametrize("n_in, n_out", [(1, 1), (3, 2)], ids=["1x1", "3x2"])
@pytest.mark.parametrize("name", list(DEGENERATE))
def test_degenerate_control_counts(name, n_in, n_out, kernel_device):
    """One or two control points (a 1 x 1 or 2 x 2 bicubic grid, a single lattice point) and grids
    with more control points than features, on 1-D and 3-D inputs."""
    layer = tk.SplineLinear(n_in, n_out, **DEGENERATE[name]).to(kernel_device)
    for lead in [(), (2, 3)]:
        x = torch.randn(*lead, n_in, device=kernel_device)
        assert_backends_agree(layer, x, torch.randn(*lead, n_out, device=kernel_device), torch.float32)


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["0xin", "2x0xin"])
@pytest.mark.parametrize("name", [*LAYERS, "hierarchical"])
def test_empty_batch_gives_zero_gradients(name, lead, kernel_device):
    """An optimiser step on an empty batch must not move the layer: every parameter gradient
    (log_bandwidth included) is an exact zero in the parameter's dtype, on both backends."""
    if name == "hierarchical":
        layer = tk.HierarchicalSplineLinear(37, 45, coarse_grid=(4, 5), fine_grid=(12, 20)).to(kernel_device)
    else:
        layer = make_layer(name, 37, 45, torch.float32, kernel_device)
    for which in ("triton", "reference"):
        layer.zero_grad(set_to_none=True)
        with tk.backend(which):
            x = torch.randn(*lead, 37, device=kernel_device, requires_grad=True)
            y = layer(x)
            y.backward(torch.randn_like(y))
        assert y.shape == (*lead, 45) and x.grad.shape == x.shape
        for pname, p in layer.named_parameters():
            assert p.grad is not None and p.grad.dtype == p.dtype, f"{which} d{pname}"
            assert torch.equal(p.grad, torch.zeros_like(p)), f"{which} d{pname} is not zero"


@pytest.mark.parametrize("name", ["bspline", "gaussian", "eisenstein-local"])
def test_double_backward(name, kernel_device):
    """A gradient penalty: grad of |dL/dx|^2 w.r.t. x and every parameter, first order on the
    kernels, agrees with the reference (field bases had no second-order formula)."""
    layer = make_layer(name, 13, 9, torch.float32, kernel_device)
    x = torch.randn(4, 13, device=kernel_device)
    results = {}
    for which in ("triton", "reference"):
        with tk.backend(which):
            xi = x.clone().requires_grad_()
            gx, = torch.autograd.grad(layer(xi).pow(2).sum(), xi, create_graph=True)
            results[which] = torch.autograd.grad(gx.pow(2).sum(), [xi, *layer.parameters()])
    names = ["dx"] + [f"d{n}" for n, _ in layer.named_parameters()]
    for name, got, want in zip(names, results["triton"], results["reference"]):
        assert_close(got, want, torch.float32, name=name)


@pytest.mark.parametrize("name", ["bspline", "eisenstein"])
def test_non_contiguous_input(name, kernel_device):
    layer = make_layer(name, 37, 45, torch.float32, kernel_device)
    x = torch.randn(6, 2 * 37, device=kernel_device)[:, ::2]  # column stride 2
    xt = torch.randn(37, 6, device=kernel_device).T  # transposed
    for inp in (x, xt):
        assert not inp.is_contiguous()
        assert_backends_agree(layer, inp, torch.randn(6, 45, device=kernel_device), torch.float32)


def test_no_bias_and_frozen_input(kernel_device):
    layer = tk.SplineLinear(37, 45, grid=(5, 7), bias=False).to(kernel_device)
    x = torch.randn(4, 37, device=kernel_device)  # x does not require grad: only d(control)
    assert_backends_agree(layer, x, torch.randn(4, 45, device=kernel_device), torch.float32, x_grad=False)


def test_hierarchical_triton_matches_reference(kernel_device):
    layer = tk.HierarchicalSplineLinear(37, 45, coarse_grid=(4, 5), fine_grid=(12, 20)).to(kernel_device)
    assert_backends_agree(layer, torch.randn(3, 37, device=kernel_device), torch.randn(3, 45, device=kernel_device), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["bspline", "eisenstein", "gaussian-local"])
def test_no_dense_weight_buffer_on_cuda(name):
    """Forward and backward never allocate an (out x in) buffer: peak memory stays far below W."""
    n, m = 4096, 64
    layer = make_layer(name, n, n, torch.bfloat16, "cuda")
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    peak = cuda_step_peak_bytes(layer, x, g)
    dense_weight = n * n * 2
    assert peak < dense_weight / 8, f"peak {peak / 2**20:.1f} MiB vs dense weight {dense_weight / 2**20:.1f} MiB"


@pytest.mark.cuda
def test_field_sliced_workspace_on_cuda():
    """Above FIELD_ON_THE_FLY_MAX_ROWS rows the field forward and dx run in slices: the step's peak
    (outputs, dx, the 8 MiB workspace) stays below a quarter of W at 8192^2 bf16 (128 MiB)."""
    from tspline_kernels.spline import kernels

    n, m = 8192, 2 * kernels.FIELD_ON_THE_FLY_MAX_ROWS
    layer = make_layer("gaussian", n, n, torch.bfloat16, "cuda")
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    peak = cuda_step_peak_bytes(layer, x, torch.randn(m, n, device="cuda", dtype=torch.bfloat16))
    assert peak < n * n * 2 / 4, f"peak {peak / 2**20:.1f} MiB vs dense weight {n * n * 2 / 2**20:.1f} MiB"


# ------------------------------------------------------------------ separable forward, two passes
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (rows, in, out, grid (G_out, G_in), kind, chunk): the input pass's chunk sets the split over K
SEPARABLE = {
    "one-chunk-odd": (5, 37, 45, (9, 6), "bspline", None),
    "split-3-chunks": (37, 300, 131, (40, 70), "bspline", 128),  # partial last chunk, 3 row blocks
    "long-chunk-large-m-path": (3, 1100, 70, (12, 64), "bspline", 512),
    "bicubic-split": (4, 290, 200, (10, 16), "bicubic", 128),
    "one-row-one-out": (1, 1, 1, (4, 4), "bspline", None),
    "grid-above-features": (6, 9, 5, (70, 40), "bspline", 128),
}


@pytest.mark.parametrize("extra", ["bias", "none", "bias+coarse"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(SEPARABLE), ids=list(SEPARABLE))
def test_separable_passes_match_reference(case, dtype, extra, kernel_device):
    """The input pass (split over K into windowed partials) and the output pass (gather, windowed
    middle and output dots, N_SPLIT tiles per program, optional bias, and with a coarse level
    before it that level's output as the residual) against the float reference, every dtype, on
    odd shapes, one and several chunks (the large-M path's 512-column chunks among them)."""
    from tspline_kernels.reference import spline as ref
    from tspline_kernels.spline import kernels

    m, n_in, n_out, (g_out, g_in), basis, chunk = SEPARABLE[case]
    kind = ref.BSPLINE if basis == "bspline" else ref.BICUBIC
    x = torch.randn(m, n_in, device=kernel_device).to(dtype)
    controls = [torch.randn(g_out, g_in, device=kernel_device).to(dtype)]
    if "coarse" in extra:
        controls.insert(0, torch.randn(4, 5, device=kernel_device).to(dtype))
    b = torch.randn(n_out, device=kernel_device).to(dtype) if "bias" in extra else None
    got = kernels.separable_levels(x, controls, b, n_out, kind, chunk=chunk)
    assert got.dtype == dtype and got.shape == (m, n_out)
    assert_close(got, ref.separable_levels(x, controls, b, n_out, kind), dtype)
    # with u, the output passes also store each level's x @ Bi side by side, and y is unchanged
    u = torch.full((m, sum(c.shape[1] for c in controls)), float("nan"), device=kernel_device,
                   dtype=compute_dtype(x))
    torch.testing.assert_close(kernels.separable_levels(x, controls, b, n_out, kind, chunk=chunk, u=u), got,
                               rtol=0, atol=0)
    want = torch.cat([ref.input_projection(x, c.shape[1], kind) for c in controls], -1)
    assert_close(u, want, dtype, name="u")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_separable_passes_empty_batch_and_3d(dtype, kernel_device):
    """An empty batch launches nothing and keeps the shape; a 3-D input with several chunks."""
    from tspline_kernels.reference import spline as ref
    from tspline_kernels.spline import kernels

    control = torch.randn(9, 12, device=kernel_device).to(dtype)
    for lead in [(0,), (2, 0), (2, 3)]:
        x = torch.randn(*lead, 260, device=kernel_device).to(dtype)
        got = kernels.separable_levels(x, [control], None, 70, ref.BSPLINE, chunk=128)
        assert got.shape == (*lead, 70)
        assert_close(got, ref.separable_linear(x, control, None, 70, ref.BSPLINE), dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_separable_levels_match_reference(dtype, kernel_device):
    """Two levels in one call (a hierarchical layer: coarse grid, then fine, 4 launches), 3-D and
    empty inputs, against the reference's levels; no control grid is refused."""
    from tspline_kernels.reference import spline as ref
    from tspline_kernels.spline import kernels

    controls = [torch.randn(5, 4, device=kernel_device).to(dtype), torch.randn(12, 9, device=kernel_device).to(dtype)]
    b = torch.randn(70, device=kernel_device).to(dtype)
    for lead in [(2, 3), (0,)]:
        x = torch.randn(*lead, 260, device=kernel_device).to(dtype)
        got = kernels.separable_levels(x, controls, b, 70, ref.BSPLINE, chunk=128)
        assert got.shape == (*lead, 70) and got.dtype == dtype
        assert_close(got, ref.separable_levels(x, controls, b, 70, ref.BSPLINE), dtype)
    with pytest.raises(ValueError, match="at least one control grid"):
        kernels.separable_levels(x, [], b, 70, ref.BSPLINE)


@pytest.mark.parametrize("chunk", [0, 64, 96, 384])
def test_separable_chunk_validation(chunk, kernel_device):
    from tspline_kernels.spline import kernels

    with pytest.raises(ValueError, match="chunk"):
        kernels.separable_levels(torch.randn(2, 37, device=kernel_device), [torch.randn(6, 6, device=kernel_device)],
                                 None, 5, 0, chunk=chunk)


@pytest.mark.parametrize("basis", ["bspline", "bicubic"])
@pytest.mark.parametrize("n, g, chunk", [(4096, 64, 512), (4096, 64, 256), (4096, 64, 64), (300, 70, 128), (37, 9, 128), (1, 4, 64)])
def test_basis_windows_hold_the_whole_basis(basis, n, g, chunk):
    """Scattered back, the windowed table is the reference basis exactly (float64); its fp16/bf16
    parts (rounded basis + residual) sum to it within 2^-16 relative, where one part alone is off
    by up to 2^-9; at the goal shape (4096 features, grid 64) every window is 16 columns: the
    passes' dots are 16 wide, not 64."""
    from tspline_kernels.reference import spline as ref
    from tspline_kernels.spline import kernels

    kind = ref.BSPLINE if basis == "bspline" else ref.BICUBIC
    cpu = torch.device("cpu")
    win = kernels.basis_windows(n, g, kind, chunk, torch.float64, cpu)
    s = win.start.numel()
    assert win.table.shape == (1, s, chunk, win.width) and s == -(-n // chunk) == win.chunks and not win.split
    dense = torch.zeros(s, chunk, g + win.width, dtype=torch.float64)
    dense.scatter_(2, (win.start.long()[:, None] + torch.arange(win.width))[:, None, :].expand_as(win.table[0]), win.table[0])
    torch.testing.assert_close(dense.reshape(s * chunk, -1)[:n, :g], ref.basis_matrix(n, g, kind, torch.float64), rtol=0, atol=0)
    assert dense[..., g:].abs().sum() == 0 and dense.reshape(s * chunk, -1)[n:].abs().sum() == 0
    for dtype in (torch.float16, torch.bfloat16):
        half = kernels.basis_windows(n, g, kind, chunk, dtype, cpu)
        parts = half.table.double()
        assert parts.shape == (2, *win.table.shape[1:]) and half.split
        torch.testing.assert_close(parts.sum(0), win.table[0], rtol=2**-16, atol=1e-7)
    if (n, g) == (4096, 64):
        assert win.width == 16


@pytest.mark.parametrize("grids", [(16, 64), (5, 70, 9)], ids=["coarse-fine", "three-padded"])
def test_level_windows_put_each_grid_side_by_side(grids):
    """Several grids' windows share one table: level k's columns from ``offsets[k]`` are its own
    ``basis_windows`` table (both parts for bf16), the columns past them zero, the width a power
    of two; one grid is its own table."""
    from tspline_kernels.reference import spline as ref
    from tspline_kernels.spline import kernels

    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        win = kernels.level_windows(300, grids, ref.BSPLINE, 128, dtype, cpu)
        assert win.width & (win.width - 1) == 0 and win.width >= sum(w.width for w in win.levels)
        assert win.table.shape == (2 if dtype == torch.bfloat16 else 1, 3, 128, win.width) and win.chunks == 3
        for g, level, offset in zip(grids, win.levels, win.offsets):
            assert level is kernels.basis_windows(300, g, ref.BSPLINE, 128, dtype, cpu)
            torch.testing.assert_close(win.table[..., offset:offset + level.width], level.table, rtol=0, atol=0)
        end = win.offsets[-1] + win.levels[-1].width
        assert not win.table[..., end:].any()
        one = kernels.level_windows(300, grids[:1], ref.BSPLINE, 128, dtype, cpu)
        assert one.table is one.levels[0].table and one.offsets == (0,)


def test_three_levels_share_the_input_passes(kernel_device):
    """The launchers take any number of grids: three (two padded windows) in one input pass per
    operand, forward and backward against the reference, with and without x's projections u."""
    from tspline_kernels.reference import spline as ref
    from tspline_kernels.spline import kernels

    x, dy = torch.randn(7, 300, device=kernel_device), torch.randn(7, 90, device=kernel_device)
    controls = [torch.randn(g_out, g_in, device=kernel_device) for g_out, g_in in ((5, 6), (9, 70), (12, 9))]
    u = torch.cat([ref.input_projection(x, c.shape[1], ref.BSPLINE) for c in controls], -1)
    kept = torch.empty_like(u)
    y = kernels.separable_levels(x, controls, None, 90, ref.BSPLINE, chunk=128, u=kept)
    assert_close(y, ref.separable_levels(x, controls, None, 90, ref.BSPLINE), torch.float32, name="y")
    assert_close(kept, u, torch.float32, name="u")
    want = ref.separable_backward(dy, x, controls, ref.BSPLINE, True, [True] * 3, torch.float32)
    for given in (None, u):
        dx, d_controls, d_bias = kernels.separable_backward(dy, x, controls, ref.BSPLINE, True, [True] * 3,
                                                            torch.float32, chunk=128, u=given)
        for name, got, expected in [("dx", dx, want[0]), *zip(("dC0", "dC1", "dC2"), d_controls, want[1]),
                                    ("d_bias", d_bias, want[2])]:
            assert_close(got, expected, torch.float32, name=name)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", ["one-chunk-odd", "split-3-chunks", "long-chunk-large-m-path", "bicubic-split"])
def test_separable_grad_control_from_input_passes(case, dtype, kernel_device):
    """dC = (dy @ Bo).T @ (x @ Bi) from the input pass run on dy and on x (each split into
    chunks) and the gather-and-multiply kernel, accumulated in fp32 and returned in the dtype asked
    for: the inputs' (as a layer asks, its parameters sharing it) and fp32."""
    from tspline_kernels.reference import spline as ref
    from tspline_kernels.spline import kernels

    m, n_in, n_out, (g_out, g_in), basis, chunk = SEPARABLE[case]
    kind = ref.BSPLINE if basis == "bspline" else ref.BICUBIC
    x = torch.randn(m, n_in, device=kernel_device).to(dtype)
    dy = torch.randn(m, n_out, device=kernel_device).to(dtype)
    for out in {dtype, torch.float32}:
        control = torch.empty(g_out, g_in, device=kernel_device, dtype=out)  # dC comes in its dtype
        got = kernels.separable_backward(dy, x, [control], kind, False, [True], None, chunk=chunk)[1][0]
        assert got.dtype == out and got.shape == (g_out, g_in)
        assert_close(got, ref.separable_grad_control(dy, ref.input_projection(x, g_in, kind), g_out, kind, out), dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("levels", [1, 2], ids=["one-level", "two-levels"])
@pytest.mark.parametrize("case", ["one-chunk-odd", "split-3-chunks", "bicubic-split"])
def test_separable_backward_shares_dy_input_pass(case, levels, dtype, kernel_device):
    """``separable_backward``: dx (levels chained as residuals), each level's dC and d_bias (the first
    input pass on dy sums it, over several row blocks in "split-3-chunks") against the reference,
    in their dtypes, for every subset of wanted results; one input pass on dy over every level's
    basis serves dx and dC, and one on x every dC (2 launches per level after those two); given
    x's projections u (the forward's), dC reads them: the same results, no input pass on x."""
    from tspline_kernels.bench.host_overhead import stubbed_launches
    from tspline_kernels.reference import spline as ref
    from tspline_kernels.spline import kernels

    m, n_in, n_out, (g_out, g_in), basis, chunk = SEPARABLE[case]
    kind = ref.BSPLINE if basis == "bspline" else ref.BICUBIC
    x = torch.randn(m, n_in, device=kernel_device).to(dtype)
    dy = torch.randn(m, n_out, device=kernel_device).to(dtype)
    controls = [torch.randn(g_out, g_in, device=kernel_device).to(dtype),
                torch.randn(g_out + 3, g_in + 2, device=kernel_device).to(dtype)][:levels]
    u = torch.cat([ref.input_projection(x, c.shape[1], kind) for c in controls], -1)
    for need_dx, need_c, bias_dtype in [(True, True, torch.float32), (False, True, None), (True, False, dtype)]:
        needs = [need_c, not need_c][:levels]
        want = ref.separable_backward(dy, x, controls, kind, need_dx, needs, bias_dtype)
        for given in (None, u):
            got = kernels.separable_backward(dy, x, controls, kind, need_dx, needs, bias_dtype, chunk=chunk, u=given)
            pairs = [("dx", got[0], want[0]), *((f"dC{k}", a, b) for k, (a, b) in enumerate(zip(got[1], want[1]))),
                     ("d_bias", got[2], want[2])]
            for name, g, w in pairs:
                assert (g is None) == (w is None), name
                if w is not None:
                    assert g.dtype == w.dtype and g.shape == w.shape, name
                    assert_close(g, w, dtype, name=name)
    for given, input_passes in ((None, 2), (u, 1)):
        with stubbed_launches() as launches:
            kernels.separable_backward(dy, x, controls, kind, True, [True] * levels, None, chunk=chunk, u=given)
        kernel_names = [launch.kernel for launch in launches]
        assert kernel_names.count("_separable_in_kernel") == input_passes
        assert len([k for k in kernel_names if k.startswith("_separable")]) == input_passes + 2 * levels


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_separable_16bit_inputs_meet_an_unrounded_basis(dtype, kernel_device):
    """fp16/bf16 inputs are exact in their dtype and the input pass multiplies them by the two-part
    basis table (rounded basis + residual), so dC (fp32, nothing rounded to the input dtype) is
    within 1e-4 of float64; a basis rounded to the input dtype is off by ~3e-4 (fp16) and ~3e-3
    (bf16), and cost a bf16 fuzz case (x ~ 1e3, cancelling outputs) 2.4e-2 in y."""
    from tspline_kernels.reference import spline as ref
    from tspline_kernels.spline import kernels

    x = (torch.randn(6, 300, device=kernel_device) * 1000).to(dtype)
    dy = torch.randn(6, 131, device=kernel_device).to(dtype)
    control = torch.empty(40, 70, device=kernel_device)
    got = kernels.separable_backward(dy, x, [control], ref.BSPLINE, False, [True], None, chunk=128)[1][0].double().cpu()
    bo, bi = ref.basis_matrix(131, 40, ref.BSPLINE, torch.float64), ref.basis_matrix(300, 70, ref.BSPLINE, torch.float64)
    exact = (dy.double().cpu() @ bo).T @ (x.double().cpu() @ bi)
    assert (got - exact).norm() / exact.norm() < 1e-4


# ------------------------------------------------------------------ field bases, generated in slices
FIELD_LAYERS = ["gaussian", "eisenstein", "gaussian-local", "eisenstein-local"]


@pytest.fixture
def sliced(monkeypatch):
    """Every field matmul with rows takes the sliced path, with a workspace of 1000 bytes: 6 rows of
    a 37-wide fp32 W (13 for fp16/bf16), so the 45 output columns (and dx's 37) span several slices
    and a partial last one."""
    from tspline_kernels.spline import kernels

    monkeypatch.setattr(kernels, "FIELD_ON_THE_FLY_MAX_ROWS", 0)
    monkeypatch.setattr(kernels, "FIELD_SLICE_BYTES", 1000)
    return kernels


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("name", FIELD_LAYERS)
def test_field_sliced_matches_reference(name, dtype, sliced, kernel_device):
    """The sliced path (workspace kernel + one GEMM per slice) against the reference: y with bias,
    dx (the transposed product, also sliced), d(control), d(log_bandwidth), d(bias), every dtype,
    global and local support."""
    layer = make_layer(name, 37, 45, dtype, kernel_device)
    x = torch.randn(5, 37, device=kernel_device, dtype=dtype)
    assert_backends_agree(layer, x, torch.randn(5, 45, device=kernel_device, dtype=dtype), dtype)


@pytest.mark.parametrize("lead", [(2, 3), (0,), "strided"], ids=["3d-2x3", "empty-batch", "column-stride-2"])
@pytest.mark.parametrize("name", ["gaussian", "eisenstein-local"])
def test_field_sliced_no_bias_3d_empty_and_strided(name, lead, sliced, kernel_device):
    """Without a bias, on a 3-D input, an empty batch (no launch, zero gradients) and an input with
    no unit stride (made contiguous once, not copied per slice)."""
    layer = tk.SplineLinear(37, 45, bias=False, **LAYERS[name]).to(kernel_device)
    if lead == "strided":
        lead, x = (6,), torch.randn(6, 2 * 37, device=kernel_device)[:, ::2]
    else:
        x = torch.randn(*lead, 37, device=kernel_device)
    assert_backends_agree(layer, x, torch.randn(*lead, 45, device=kernel_device), torch.float32)


def test_field_sliced_equals_on_the_fly(sliced, kernel_device):
    """Both paths multiply by the same rounded weights: bf16 outputs agree to a few bf16 ulps (the
    two only sum the products in different orders), for a @ W.T + bias and for a @ W."""
    from tspline_kernels.reference import spline as ref

    layer = make_layer("gaussian", 37, 45, torch.bfloat16, kernel_device).requires_grad_(False)
    field = sliced.Field(layer.control, layer.lattice, layer.log_bandwidth, 45, 37, ref.GAUSSIAN, 0.0)
    for transpose, width in ((False, 37), (True, 45)):
        a = torch.randn(9, width, device=kernel_device, dtype=torch.bfloat16)
        bias = None if transpose else layer.bias
        got = sliced.field_linear(a, field, bias, transpose)
        sliced.FIELD_ON_THE_FLY_MAX_ROWS = 1 << 30
        want = sliced.field_linear(a, field, bias, transpose)
        sliced.FIELD_ON_THE_FLY_MAX_ROWS = 0
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=2**-6 * want.float().abs().max().item())


@pytest.mark.parametrize("need_params", [True, False], ids=["params", "frozen-field"])
@pytest.mark.parametrize("transpose", [False, True], ids=["a@W.T", "a@W"])
def test_field_backward_bias_gradient(transpose, need_params, kernel_device):
    """``field_linear_backward``'s d_bias is dy's row sum in the bias dtype whichever side of the
    product dy is on: summed by the reduction kernel from the dy tiles it loads (rows over several
    row blocks, output columns over several tiles), or by torch when the field is frozen; the op's
    other results agree with the reference too, and an absent bias gives an empty d_bias."""
    from tspline_kernels.reference import spline as ref
    from tspline_kernels.spline import ops

    layer = make_layer("gaussian", 37, 45, torch.float32, kernel_device)
    dy = torch.randn(70, 37 if transpose else 45, device=kernel_device)
    a = torch.randn(70, 45 if transpose else 37, device=kernel_device)
    for bias_dtype in (torch.bfloat16, None):
        args = (dy, a, layer.control.detach(), layer.lattice, layer.log_bandwidth.detach(), 45, 37, ref.GAUSSIAN,
                0.0, transpose, True, need_params, bias_dtype)
        out = {}
        for which in ("triton", "reference"):
            with tk.backend(which):
                out[which] = ops.field_linear_backward(*args)
        for name, got, want in zip(("da", "d_params", "d_bias"), out["triton"], out["reference"]):
            assert got.dtype == want.dtype, name
            assert_close(got, want, name=name)  # in the result's dtype's tolerance
        d_bias = out["triton"][2]
        if bias_dtype is None:
            assert d_bias.numel() == 0
        else:
            assert d_bias.dtype == bias_dtype
            assert_close(d_bias, dy.sum(0).to(bias_dtype), torch.bfloat16, name="d_bias vs dy.sum(0)")


@pytest.mark.parametrize("basis, support", [("gaussian", "global"), ("eisenstein", "local")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_field_weight_is_the_reference_weight(basis, support, dtype, kernel_device):
    """``field_weight`` (the benchmarks' materialise baseline) writes W whole, as the reference
    defines it, rounded once to ``dtype``."""
    from tspline_kernels.reference import spline as ref_spline
    from tspline_kernels.spline import kernels

    layer = tk.SplineLinear(37, 45, basis=basis, support=support, n_control_points=40).to(kernel_device)
    gaussian = basis == "gaussian"
    field = kernels.Field(layer.control.detach(), layer.lattice, layer.log_bandwidth.detach() if gaussian else None,
                          45, 37, ref_spline.GAUSSIAN if gaussian else ref_spline.IDW, layer.rho)
    w = kernels.field_weight(field, dtype)
    assert w.dtype == dtype and w.shape == (45, 37)
    assert_close(w, layer.materialize().detach().to(dtype), dtype)


@pytest.mark.parametrize("n, k, elt", [(4096, 4096, 2), (4096, 4096, 4), (45, 37, 4), (3, 5, 2), (10, 1 << 22, 4)])
def test_field_slice_rows_bounded(n, k, elt):
    """The workspace holds at most FIELD_SLICE_BYTES (one row where a row alone is larger), never more
    rows than the output has, a multiple of 128 rows when it holds more than 128: 1024 rows of a
    4096-wide bf16 W (8 MiB), 512 in fp32."""
    from tspline_kernels.spline import kernels

    rows = kernels.field_slice_rows(n, k, elt)
    assert 1 <= rows <= n and (rows * k * elt <= kernels.FIELD_SLICE_BYTES or rows == 1)
    assert rows <= 128 or rows % 128 == 0
    if (n, k) == (4096, 4096):
        assert rows == {2: 1024, 4: 512}[elt]


def test_field_sliced_workspace_is_bounded(sliced, monkeypatch, kernel_device):
    """Forward and dx allocate nothing but their outputs and a workspace within the budget, far below
    W's size: every torch.empty other than an output is <= FIELD_SLICE_BYTES."""
    from tspline_kernels.reference import spline as ref

    layer = make_layer("eisenstein", 37, 45, torch.float32, kernel_device).requires_grad_(False)
    field = sliced.Field(layer.control, layer.lattice, None, 45, 37, ref.IDW, 0.0)
    sizes, empty = [], torch.empty

    def spy(*shape, **kw):
        t = empty(*shape, **kw)
        sizes.append((tuple(t.shape), t.numel() * t.element_size()))
        return t

    monkeypatch.setattr(torch, "empty", spy)
    y = sliced.field_linear(torch.randn(7, 37, device=kernel_device), field, layer.bias, False)
    dx = sliced.field_linear(torch.randn(7, 45, device=kernel_device), field, None, True)
    workspaces = [b for s, b in sizes if s not in (tuple(y.shape), tuple(dx.shape))]
    assert workspaces and max(workspaces) <= sliced.FIELD_SLICE_BYTES < 45 * 37 * 4
