"""FSDP2's recipe for a model too large to build whole, on CPU with gloo and 2 processes: build on
the meta device, ``fully_shard``, ``to_empty``, then ``reset_parameters`` of every module. The
layers whose initialisation scales by a statistic of the whole weight (spline, hierarchical, TT,
spline-TT) or writes a computed value (the decoupled activations' GELU fit) read and write the
sharded DTensor parameters whole: the same scale as a layer built in one process."""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:
    pytest.skip("needs torch.distributed with FSDP2's public fully_shard (torch >= 2.6)", allow_module_level=True)

import torch.distributed as dist
import torch.multiprocessing as mp

import tspline_kernels as tk

FAMILIES = {
    "spline": lambda: tk.SplineLinear(24, 16, grid=(5, 6)),
    "bicubic": lambda: tk.SplineLinear(24, 16, basis="bicubic", n_control_points=10),
    "gaussian": lambda: tk.SplineLinear(24, 16, basis="gaussian", n_control_points=7),
    "eisenstein": lambda: tk.SplineLinear(24, 16, basis="eisenstein", n_control_points=7),
    "hierarchical": lambda: tk.HierarchicalSplineLinear(24, 16, coarse_grid=(4, 4), fine_grid=(6, 6)),
    "tt": lambda: tk.TTLinear((4, 6), (4, 4), 2),
    "spline_tt": lambda: tk.SplineTTLinear((4, 6), (4, 4), 2, (4, 4)),
    "decoupled": lambda: tk.DecoupledSplineMLP(24, 16, rank=4, n_basis=6),
}


def _worker(rank: int, path: Path) -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=(path / "rendezvous").as_uri(), rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    results = {}
    try:
        for name, make in FAMILIES.items():
            torch.manual_seed(0)
            try:
                with torch.device("meta"):
                    layer = make()
                fully_shard(layer)
                layer.to_empty(device="cpu")
                for m in layer.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
                results[name] = {n: p.full_tensor().detach() for n, p in layer.named_parameters()}
            except Exception as e:  # noqa: BLE001 - reported by the test
                results[name] = f"{type(e).__name__}: {e}"
        if rank == 0:
            torch.save(results, path / "results.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def initialised(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("fsdp_init")
    mp.start_processes(_worker, args=(path,), nprocs=2, start_method="spawn")
    return torch.load(path / "results.pt")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fsdp2_meta_init_reset_parameters(initialised, family):
    params = initialised[family]
    assert not isinstance(params, str), params
    layer = FAMILIES[family]()
    layer.load_state_dict(params, strict=False)
    assert all(torch.isfinite(p).all() for p in params.values())
    if family == "decoupled":  # deterministic: every activation the spline nearest GELU
        torch.testing.assert_close(params["coef"], FAMILIES[family]().coef)
        return
    # nn.Linear's mean(W^2) = 1 / (3 in) exactly; a hierarchical layer's levels half of it each
    if family == "hierarchical":
        from tspline_kernels.reference import spline as ref
        from tspline_kernels.spline.module import _separable_mean_sq
        shares = [_separable_mean_sq(c, 16, 24, ref.BSPLINE) * 3 * 24 for c in (layer.control_coarse, layer.control_fine)]
        assert shares == pytest.approx([0.5, 0.5], rel=1e-6)
        return
    share = (layer.materialize().double().square().mean() * 3 * layer.in_features).item()
    assert share == pytest.approx(1.0, rel=1e-5)
