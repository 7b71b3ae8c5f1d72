"""Training the compressed layers on PyTorch's own distributed engine: CPU, gloo, 2 processes.

One model mixing every family is trained for a few Adam steps under DDP and under FSDP2
(``fully_shard`` per compressed layer and at the root), each rank on its half of every batch, and
compared with single-process training on the whole batch; the FSDP2 run is then saved with
``torch.distributed.checkpoint`` (model and optimiser through ``get_state_dict``) and loaded into
2 ranks (a model built on the meta device) and into 1 process. The processes are started once
for the whole file (``_worker`` runs every scenario, rank 0 saves what the tests check). The model
is float64, so "the same parameters" is checked at ``assert_close``'s float64 tolerances (relative
RMS 1e-10, every element within 1e-10 max|e| + 1e-8 |e|): only the order of the gradient sums
differs. FSDP2's bf16 mixed precision is checked against a bf16 copy of the model.
"""

from __future__ import annotations

import re
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:
    pytest.skip("needs torch.distributed with FSDP2's public fully_shard (torch >= 2.6)", allow_module_level=True)

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import tspline_kernels as tk
from tspline_kernels._layers import CompressedLinear
from tspline_kernels.testing import assert_close

pytestmark = pytest.mark.filterwarnings(  # DCP's note when loading into a process without a process group
    "ignore:torch.distributed is disabled, unavailable or uninitialized:UserWarning")

WORLD = 2
BATCH, FEATURES, STEPS, LR = 8, 12, 3, 1e-2
SHARDS = [slice(r * BATCH // WORLD, (r + 1) * BATCH // WORLD) for r in range(WORLD)]
# NdLinearGated's gating of the first mode only: the other modes' gate and projection get no gradient
GATED = {"kronecker": {"gated": True, "gated_modes": "first"}}
# settings that change a layer's function but no parameter shape: (_model overrides, setting named)
MISMATCHED = [
    pytest.param({"kronecker": {"transform_outer": False}}, "transform_outer", id="kronecker-transform_outer"),
    pytest.param({"gaussian": {"support_radius": 1.5}}, "support_radius", id="gaussian-support_radius"),
]


def _model(seed: int = 0, **changed) -> nn.Sequential:
    """Every family, 12 features wide, float64. ``changed`` overrides one layer's constructor
    arguments by family (``kronecker=...``, ``gaussian=...``)."""
    torch.manual_seed(seed)
    kronecker = changed.get("kronecker", {})
    gaussian = {"basis": "gaussian", "n_control_points": 9, "support": "local", **changed.get("gaussian", {})}
    return nn.Sequential(
        tk.LowRankLinear(FEATURES, FEATURES, 3), nn.Tanh(),
        tk.TTLinear((3, 4), (4, 3), 2),
        tk.SplineTTLinear((4, 3), (3, 4), 2, (4, 4)), nn.Tanh(),
        tk.KroneckerLinear((3, 4), (4, 3), **kronecker),
        tk.SplineLinear(FEATURES, FEATURES, grid=(4, 4)), nn.Tanh(),
        tk.SplineLinear(FEATURES, FEATURES, **gaussian),
        tk.HierarchicalSplineLinear(FEATURES, FEATURES, coarse_grid=(4, 4), fine_grid=(6, 6)),
        tk.DecoupledSplineMLP(FEATURES, FEATURES, rank=4, n_basis=6),
    ).double()


def _fsdp_model(seed: int = 0, mp_policy: MixedPrecisionPolicy | None = None, **changed) -> nn.Sequential:
    """``_model`` with ``fully_shard`` applied to every compressed layer, then to the root; with
    ``mp_policy`` the model is float32 and computes in the policy's ``param_dtype``."""
    model = _model(seed, **changed)
    if mp_policy is not None:
        model.float()
    options = {} if mp_policy is None else {"mp_policy": mp_policy}
    for layer in model:
        if isinstance(layer, CompressedLinear):
            fully_shard(layer, **options)
    return fully_shard(model, **options)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS training batches and one more (the step taken after a checkpoint), (x, target) each
    ``(BATCH, FEATURES)``; the same in every process."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, FEATURES, generator=g, dtype=torch.float64),
             torch.randn(BATCH, FEATURES, generator=g, dtype=torch.float64)) for _ in range(STEPS + 1)]


def _probe() -> torch.Tensor:
    return torch.randn(5, FEATURES, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches, shards: list[slice]) -> None:
    """One Adam step per batch on the mean over ``shards`` of each shard's MSE, every shard run
    through the model on its own (what DDP computes across ranks, one shard per rank)."""
    for x, y in batches:
        opt.zero_grad()
        (sum(F.mse_loss(model(x[s]), y[s]) for s in shards) / len(shards)).backward()
        opt.step()


def _adam(model: nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=LR)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full parameter values by name (FSDP2's DTensor shards gathered: a collective)."""
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _checkpoint_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    model_state, optim_state = get_state_dict(model, opt)
    return {"model": model_state, "optim": optim_state}


def _load(model: nn.Module, opt: torch.optim.Optimizer, checkpoint: Path) -> None:
    """The DCP recipe: the state dicts of this (re)built model, filled from ``checkpoint``, set back.
    ``dcp.load`` fills tensors in place and only ``load_state_dict`` checks the layers' settings
    (``_extra_state``), so those are loaded and checked first: a refused checkpoint leaves the
    model untouched."""
    state = _checkpoint_state(model, opt)
    settings = {k: v for k, v in state["model"].items() if k.endswith("_extra_state")}
    dcp.load({"model": settings}, checkpoint_id=checkpoint)
    set_model_state_dict(model, settings, options=StateDictOptions(strict=False))
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _loss_and_grads(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The output on the probe (fed in the parameters' dtype, returned in float32) and every
    parameter's full gradient of its mean square."""
    y = model(_probe().to(next(model.parameters()).dtype)).float()
    y.square().mean().backward()
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in model.named_parameters()}
    return y.detach(), grads


def _worker(rank: int, path: Path) -> None:
    torch.set_num_threads(1)
    # torch 2.13 warns when an FSDP2 module returns a view (TTLinear, SplineTTLinear and
    # DecoupledSplineMLP do: an in-place op on it would skip the pre-backward hook); nothing here
    # modifies an output in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    dist.init_process_group("gloo", init_method=(path / "rendezvous").as_uri(), rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        batches, shard, results = _batches(), [SHARDS[rank]], {}
        for name, changed in (("ddp", {}), ("ddp-gated", GATED)):
            # DDP's default raises on the gated model's parameters that get no gradient
            ddp = DistributedDataParallel(_model(**changed), find_unused_parameters=bool(changed))
            _train(ddp, _adam(ddp), batches[:STEPS], shard)
            results[name] = _params(ddp.module)

        model = _fsdp_model()
        opt = _adam(model)
        _train(model, opt, batches[:STEPS], shard)
        results["fsdp"] = _params(model)
        with torch.no_grad():
            results["fsdp output"] = model(_probe())
        dcp.save(_checkpoint_state(model, opt), checkpoint_id=path / "checkpoint")
        _train(model, opt, batches[STEPS:], shard)
        results["next step"] = _params(model)

        with torch.device("meta"):  # FSDP2's recipe for models too large to build whole
            loaded = _fsdp_model()
        loaded.to_empty(device="cpu")
        loaded_opt = _adam(loaded)
        _load(loaded, loaded_opt, path / "checkpoint")
        with torch.no_grad():
            results["loaded output"] = loaded(_probe())
        _train(loaded, loaded_opt, batches[STEPS:], shard)
        results["loaded next step"] = _params(loaded)

        bf16 = _fsdp_model(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        results["bf16"] = _loss_and_grads(bf16)

        other = _fsdp_model(**MISMATCHED[0].values[0])  # loading it must raise
        try:
            _load(other, _adam(other), path / "checkpoint")
        except ValueError as e:
            results["mismatch error"] = str(e)
        if rank == 0:
            torch.save(results, path / "results.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> tuple[dict, Path]:
    """What rank 0 recorded (``_worker``) and the folder holding the checkpoint."""
    path = tmp_path_factory.mktemp("distributed")
    mp.start_processes(_worker, args=(path,), nprocs=WORLD, start_method="spawn")
    return torch.load(path / "results.pt"), path


def _single_process(model: nn.Module, batches, shards=(slice(None),)) -> dict[str, torch.Tensor]:
    _train(model, _adam(model), batches, list(shards))
    return _params(model)


@pytest.fixture(scope="module")
def single_process() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Parameters after single-process training on the whole batches, and the output on the probe."""
    model = _model()
    params = _single_process(model, _batches()[:STEPS])
    with torch.no_grad():
        return params, model(_probe())


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert_close(actual[name], value, name=name)


def test_ddp_matches_single_process(distributed, single_process):
    results, _ = distributed
    start, (expected, _) = _params(_model()), single_process
    _assert_same(results["ddp"], expected)
    # every parameter trained (Adam moves each by about LR per step unless its gradient vanishes)
    assert all((expected[n] - p).abs().max() > LR / 10 for n, p in start.items())


def test_gated_kronecker_under_ddp_sees_the_local_batch(distributed):
    """A gated KroneckerLinear's gates read the batch mean: under DDP each rank's local batch, so
    DDP equals single-process training on the shards run separately, not on the whole batch. The
    gate and projection of an ungated mode get no gradient (``find_unused_parameters=True``) and
    keep their initial values."""
    results, _ = distributed
    batches, start = _batches()[:STEPS], _params(_model(**GATED))
    _assert_same(results["ddp-gated"], _single_process(_model(**GATED), batches, SHARDS))
    whole = _single_process(_model(**GATED), batches)
    assert max((results["ddp-gated"][n] - p).abs().max() for n, p in whole.items()) > 1e-6
    unused = [n for n in start if n.startswith(("5.gates.1.", "5.projections.1."))]
    assert unused and all(torch.equal(results["ddp-gated"][n], start[n]) for n in unused)


def test_fsdp2_matches_ddp_and_single_process(distributed, single_process):
    results, _ = distributed
    _assert_same(results["fsdp"], results["ddp"])
    _assert_same(results["fsdp"], single_process[0])
    assert_close(results["fsdp output"], single_process[1])


def test_fsdp2_mixed_precision(distributed):
    """bf16 compute with float32 parameters and gradient reduction (``MixedPrecisionPolicy``): the
    output within bf16 tolerances of the float32 model's, the gradients those of a bf16 copy of
    the model in one process (after 8 layers, bf16 rounding alone moves them beyond one op's
    bf16 tolerance from the float32 ones)."""
    results, _ = distributed
    y, grads = results["bf16"]
    assert_close(y, _loss_and_grads(_model().float())[0], dtype=torch.bfloat16)
    expected = _loss_and_grads(_model().bfloat16())[1]
    assert grads.keys() == expected.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32
        assert_close(g, expected[name].float(), name=name)


def test_checkpoint_loads_into_two_ranks(distributed):
    """Into a model built on the meta device, sharded, then given (uninitialised) CPU memory."""
    results, _ = distributed
    assert torch.equal(results["loaded output"], results["fsdp output"])
    # the optimiser state came back too: the next step is the one the saved run took
    _assert_same(results["loaded next step"], results["next step"])


def test_checkpoint_loads_into_one_process(distributed):
    results, path = distributed
    model = _model(seed=1)
    opt = _adam(model)
    _load(model, opt, path / "checkpoint")
    with torch.no_grad():
        assert torch.equal(model(_probe()), results["fsdp output"])
    assert all(s["step"].item() == STEPS for s in opt.state.values())
    _train(model, opt, _batches()[STEPS:], [slice(None)])
    _assert_same(_params(model), results["next step"])


def test_checkpoint_to_compressed_file(distributed, tmp_path):
    """Shipping a model trained at scale: the DCP checkpoint loaded into one process, written by
    ``tk.save_compressed`` and loaded into the dense architecture by ``tk.load_compressed``."""
    results, path = distributed
    model = _model(seed=1)
    _load(model, _adam(model), path / "checkpoint")
    tk.save_compressed(model, tmp_path / "model.safetensors")
    dense = nn.Sequential(*(nn.Linear(FEATURES, FEATURES, dtype=torch.float64) if isinstance(m, CompressedLinear) else m
                            for m in _model(seed=2)))
    tk.load_compressed(dense, tmp_path / "model.safetensors")
    assert [type(m) for m in dense] == [type(m) for m in model]
    with torch.no_grad():
        assert torch.equal(dense(_probe()), results["fsdp output"])


def _refusal(setting: str) -> str:
    return f"{setting}=.* in the state dict but"


@pytest.mark.parametrize("changed, setting", MISMATCHED)
def test_checkpoint_refuses_a_differently_configured_layer(distributed, changed, setting):
    """``_extra_state`` travels through DCP: the saved settings reach ``set_extra_state``, which
    refuses a layer built with other ones (same parameter shapes, another function), before any
    parameter is overwritten."""
    _, path = distributed
    model = _model(**changed)
    before = _params(model)
    with pytest.raises(ValueError, match=_refusal(setting)):
        _load(model, _adam(model), path / "checkpoint")
    assert all(torch.equal(p, before[n]) for n, p in _params(model).items())


def test_checkpoint_refuses_a_differently_configured_layer_in_two_ranks(distributed):
    results, _ = distributed
    error = results.get("mismatch error", "no ValueError raised")
    assert re.search(_refusal(MISMATCHED[0].values[1]), error), error
