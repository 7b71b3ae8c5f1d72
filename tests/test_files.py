"""Compressed model files (tk.save_compressed / tk.load_compressed / tk.open_compressed, ``tspline
inspect``): round trips of a model mixing every family, sharding, fsspec, checksums, and refusals of
tampered, truncated and mismatched files that leave the model untouched."""

import json
import sys

import pytest
import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import tspline_kernels as tk
from tspline_kernels import cli, files
from tspline_kernels.files import IntegrityError

# every family, 24 -> 12 features, with the settings no parameter shape shows
FAMILIES = {
    "lowrank": lambda: tk.LowRankLinear(24, 12, 3),
    "tt": lambda: tk.TTLinear((2, 3, 4), (3, 2, 2), 3, bias=False),
    "spline_tt": lambda: tk.SplineTTLinear((4, 6), (6, 2), 2, (4, 4)),
    "kron_gated": lambda: tk.KroneckerLinear((4, 6), (3, 4), gated=True, gating_mode="hard", gated_modes=[1]),
    "kron_inner": lambda: tk.KroneckerLinear((4, 6), (3, 4), transform_outer=False),
    "bspline": lambda: tk.SplineLinear(24, 12, grid=(5, 6)),
    "bicubic": lambda: tk.SplineLinear(24, 12, basis="bicubic", n_control_points=9),
    "gaussian_local": lambda: tk.SplineLinear(24, 12, basis="gaussian", n_control_points=9, support="local",
                                              support_radius=0.9),
    "eisenstein_local": lambda: tk.SplineLinear(24, 12, basis="eisenstein", n_control_points=12, support="local"),
    "hierarchical": lambda: tk.HierarchicalSplineLinear(24, 12, coarse_grid=(4, 4), fine_grid=(6, 8)),
}


class Net(nn.Module):
    """The "original architecture": a LayerNorm, one Linear per family and an MLP block (which a
    DecoupledSplineMLP replaces whole)."""

    def __init__(self, device=None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(24, device=device)
        self.layers = nn.ModuleDict({k: nn.Linear(24, 12, device=device) for k in FAMILIES})
        self.block = nn.Sequential(nn.Linear(24, 8, device=device), nn.GELU(), nn.Linear(8, 12, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return torch.stack([m(x) for m in self.layers.values()] + [self.block(x)]).sum(0)


def compressed_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    for k, make in FAMILIES.items():
        net.layers[k] = make()
    net.block = tk.DecoupledSplineMLP(24, 12, 3, n_basis=6)
    with torch.no_grad():
        net.norm.weight.normal_()
        net.block.lo.uniform_(-3, -1)
    return net


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(compressed model, its file, an input and the model's output on it)."""
    net = compressed_net()
    path = tmp_path_factory.mktemp("files") / "model.safetensors"
    tk.save_compressed(net, path)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return net, path, x, net(x)


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def assert_same_model(model: nn.Module, types: dict, state: dict) -> None:
    """``model`` has the module types and the very tensors (objects and values) it had before."""
    assert module_types(model) == types
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(state)
    for k, (obj, value) in state.items():
        assert now[k] is obj and torch.equal(now[k], value), k


def snapshot(model: nn.Module) -> tuple[dict, dict]:
    return module_types(model), {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}


def header(path) -> tuple[dict, int]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), 8 + n


def rewrite(src, dst, edit) -> None:
    """Copy a single-file model with its "tspline" metadata document changed by ``edit(doc)``."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    doc = json.loads(meta["tspline"])
    edit(doc)
    save_file(load_file(str(src)), str(dst), {**meta, "tspline": json.dumps(doc)})


# ---- round trips ----------------------------------------------------------------------------------
def test_every_family_records_its_constructor_arguments(saved):
    net = saved[0]
    layers = {**dict(net.layers.items()), "block": net.block}
    for name, layer in layers.items():
        rebuilt = type(layer)(**layer.init_args)
        rebuilt.load_state_dict(layer.state_dict())
        x = torch.randn(3, 24)
        assert torch.equal(rebuilt(x), layer(x)), name
    assert net.layers["gaussian_local"].init_args["support_radius"] == 0.9
    assert net.layers["kron_gated"].init_args["gated_modes"] == (1,)


@pytest.mark.parametrize("device", [None, "meta"], ids=["dense", "meta"])
def test_round_trip_into_the_original_architecture(saved, device):
    net, path, x, y = saved
    model = tk.load_compressed(Net(device=device), path)
    assert module_types(model) == module_types(net)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    with torch.no_grad():
        assert torch.equal(model(x), y)


@pytest.mark.cuda
def test_tensors_go_to_the_device_of_what_they_replace(saved):
    net, path, _, _ = saved
    model = tk.load_compressed(Net().cuda(), path)
    assert all(t.device.type == "cuda" for t in [*model.parameters(), *model.buffers()])
    # the layers' settings (``_extra_state``) are metadata, kept on the CPU by design
    state = model.state_dict()
    assert all(torch.equal(t.cpu(), net.state_dict()[k]) for k, t in state.items())


def test_sharded_round_trip_follows_the_hugging_face_index_convention(saved, tmp_path):
    net, _, x, y = saved
    path = tmp_path / "model.safetensors"
    tk.save_compressed(net, path)  # the shards replace it
    written = tk.save_compressed(net, path, max_shard_size="1kB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(shards + ["model.safetensors.index.json"])
    assert len(written) == len(shards) + 1 and not path.exists()
    assert set(index["weight_map"]) == set(net.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in net.state_dict().values())
    for source in (path, tmp_path / "model.safetensors.index.json", tmp_path):
        with torch.no_grad():
            assert torch.equal(tk.load_compressed(Net(), source)(x), y)
    with pytest.raises(ValueError, match="one shard of a sharded model"):
        tk.open_compressed(tmp_path / shards[0])
    tk.save_compressed(net, path)  # a single file replaces the shards and their index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_fsspec_memory_round_trip(saved):
    net, _, x, y = saved
    url = "memory://tspline-test/model.safetensors"
    tk.save_compressed(net, url, max_shard_size=4096)
    with torch.no_grad():
        assert torch.equal(tk.load_compressed(Net(device="meta"), url)(x), y)
    with tk.open_compressed(url) as f:
        assert torch.equal(f.materialize("layers.tt"), net.layers["tt"].materialize())


def test_a_class_that_moved_module_is_found_by_name(saved, tmp_path):
    net, path, x, _ = saved
    moved = tmp_path / "model.safetensors"
    rewrite(path, moved, lambda doc: doc["layers"]["layers.lowrank"].update(
        {"class": "tspline_kernels.old_module.LowRankLinear"}))
    with tk.open_compressed(moved) as f:
        assert torch.equal(f.load_layer("layers.lowrank")(x), net.layers["lowrank"](x))


class PassThrough(tk.LowRankLinear):
    """A user's subclass whose ``__init__`` forwards ``*args``/``**kwargs``."""

    def __init__(self, scale: float, /, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


def test_a_subclass_forwarding_args_and_kwargs_round_trips(tmp_path):
    model = nn.Sequential(PassThrough(0.5, 24, 12, 3, bias=False, device="cpu"))
    assert model[0].init_args == {"scale": 0.5, "args": (24, 12, 3), "kwargs": {"bias": False}}
    tk.save_compressed(model, tmp_path / "m.safetensors")
    fresh = tk.load_compressed(nn.Sequential(nn.Linear(24, 12)), tmp_path / "m.safetensors")
    x = torch.randn(3, 24)
    assert type(fresh[0]) is PassThrough and torch.equal(fresh(x), model(x))


def test_tied_tensors_are_stored_once_and_tied_again(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(12, 8), "head": nn.Linear(8, 12, bias=False),
                           "proj": tk.LowRankLinear(8, 8, 2)})
    model["head"].weight = model["emb"].weight
    tk.save_compressed(model, tmp_path / "m.safetensors")
    assert "head.weight" not in header(tmp_path / "m.safetensors")[0]
    fresh = nn.ModuleDict({"emb": nn.Embedding(12, 8), "head": nn.Linear(8, 12, bias=False),
                           "proj": nn.Linear(8, 8)})
    tk.load_compressed(fresh, tmp_path / "m.safetensors")
    assert fresh["head"].weight is fresh["emb"].weight
    assert torch.equal(fresh["emb"].weight, model["emb"].weight)



def shared_model(device=None) -> nn.Sequential:
    """One Linear at two paths, 0 and 2."""
    linear = nn.Linear(32, 32, device=device)
    return nn.Sequential(linear, nn.ReLU(), linear)


@pytest.mark.parametrize("device", [None, "meta"], ids=["dense", "meta"])
def test_a_shared_layer_is_recorded_at_every_path_and_loaded_shared(tmp_path, device, capsys):
    torch.manual_seed(0)
    model = shared_model()
    tk.compress_(model, tk.LowRank(rank=4), progress=False)
    assert model[0] is model[2]
    path = tmp_path / "shared.safetensors"
    tk.save_compressed(model, path)
    x = torch.randn(3, 32)
    for include in (None, "^2$"):  # one path selected: the layer still goes to every path of the module
        fresh = tk.load_compressed(shared_model(device), path, include=include)
        assert isinstance(fresh[0], tk.LowRankLinear) and fresh[0] is fresh[2], include
        assert torch.equal(fresh(x), model(x))
    apart = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    tk.load_compressed(apart, path)  # a model holding two modules gets one copy of the layer in each
    assert apart[0] is not apart[2] and torch.equal(apart(x), model(x))
    with tk.open_compressed(path) as f:
        assert [(i.name, i.shares) for i in f.layers] == [("0", None), ("2", "0")]
    cli.main(["inspect", str(path)])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["2"][3:6] == ["=", "0", "-"]  # counted once, in the totals too
    assert rows["total"][3:6] == [str(model[0].num_parameters()), str(32 * 32 + 32), "3.67x"]
    assert "1 compressed layers (3.67x fewer" in out and "1 more paths hold a layer listed before" in out


def test_a_model_sharing_what_the_file_stores_apart_is_refused(tmp_path):
    torch.manual_seed(0)
    apart = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    tk.compress_(apart, tk.LowRank(rank=4), progress=False)
    tk.save_compressed(apart, tmp_path / "apart.safetensors")
    model = shared_model()
    state = snapshot(model)
    with pytest.raises(ValueError, match=r"holds one module at '0', '2' \(shared\), but the file records '0' and "
                                         r"a different layer at '2'"):
        tk.load_compressed(model, tmp_path / "apart.safetensors")
    assert_same_model(model, *state)


def mlp(device=None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, 128, device=device), nn.GELU(), nn.Linear(128, 32, device=device))


@pytest.mark.parametrize("device", [None, "meta"], ids=["dense", "meta"])
def test_a_decoupled_block_loads_back_into_its_original_architecture(tmp_path, device, capsys):
    torch.manual_seed(0)
    model = mlp()
    batches = [torch.randn(64, 32) for _ in range(3)]
    report = tk.compress_(model, tk.Decoupled(ratio=2, iters=2, tokens=128), batches, include="^0$",
                          progress=False)
    path = tmp_path / "block.safetensors"
    tk.save_compressed(model, path, report=report)
    x = torch.randn(5, 32)
    fresh = tk.load_compressed(mlp(device), path)
    assert isinstance(fresh[0], tk.DecoupledSplineMLP)
    assert isinstance(fresh[1], nn.Identity) and isinstance(fresh[2], nn.Identity)
    assert torch.equal(fresh(x), model(x))
    tk.save_compressed(fresh, tmp_path / "again.safetensors")  # the loaded model records the block again
    assert torch.equal(tk.load_compressed(mlp(device), tmp_path / "again.safetensors")(x), model(x))

    block = 32 * 128 + 128 + 128 * 32 + 32
    with tk.open_compressed(path) as f:
        (info,) = f.layers
        assert info.absorbs == {"activation": "1", "second": "2"}
        assert (info.params, info.dense_params) == (report.params_after, report.params_before)
        assert (info.params, info.dense_params) == (model[0].num_parameters(), block)
    cli.main(["inspect", str(path)])
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("0 "))
    assert row[3:6] == [str(info.params), str(block), f"{block / info.params:.2f}x"]

    other = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 16))
    state = snapshot(other)
    with pytest.raises(ValueError, match=r"layer '0': the model's block 0 \.\. 2 is 16x32, the file's "
                                         "DecoupledSplineMLP 32x32"):
        tk.load_compressed(other, path)
    assert_same_model(other, *state)
    with pytest.raises(ValueError, match=r"layer '0' has no block \(0, 1, 2\) in the model \(strict=False skips"):
        tk.load_compressed(nn.Sequential(nn.Linear(32, 128), nn.GELU()), path)


# ---- metadata and lazy reading --------------------------------------------------------------------
def test_open_reads_metadata_only(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(tk.LowRankLinear(512, 512, 2), nn.Linear(512, 512))
    path = tmp_path / "m.safetensors"
    report = type("Report", (), {"to_json": lambda self: json.dumps(
        {"layers": [{"name": "0", "weight_error": 0.25, "output_error": None}]})})()
    tk.save_compressed(model, path, report=report)

    import fsspec.implementations.local as local
    read = []
    real_read = local.LocalFileOpener.read

    def counted_read(self, *args):
        read.append(real_read(self, *args))
        return read[-1]

    monkeypatch.setattr(local.LocalFileOpener, "read", counted_read)
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("open_compressed read tensor data"))
    f = tk.open_compressed(path)
    (info,) = f.layers
    assert (info.name, info.class_name, info.shape, info.params, info.dense_params) == (
        "0", "LowRankLinear", (512, 512), 2 * 512 * 2 + 512, 512 * 512 + 512)
    assert info.ratio == pytest.approx(model[0].compression_ratio())
    assert info.errors == {"weight_error": 0.25} and f.report["layers"][0]["name"] == "0"
    assert "0.2500" in f.table()
    assert 0 < sum(map(len, read)) < path.stat().st_size / 50  # the 1 MB Linear weight was not read
    monkeypatch.undo()
    layer = f.load_layer("0")
    x = torch.randn(3, 512)
    assert torch.equal(layer(x), model[0](x))
    assert torch.equal(f.materialize("0"), model[0].materialize())
    with pytest.raises(KeyError, match="no compressed layer 'nope'"):
        f.load_layer("nope")


def test_include_loads_only_the_matching_layers(saved):
    net, path, x, _ = saved
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tk.load_compressed(model, path, include=r"layers\.(lowrank|kron_gated)$")
    assert isinstance(model.layers["lowrank"], tk.LowRankLinear)
    assert isinstance(model.layers["kron_gated"], tk.KroneckerLinear)
    assert type(model.layers["tt"]) is nn.Linear and type(model.block) is nn.Sequential
    for k, v in model.state_dict().items():
        if not k.startswith(("layers.lowrank.", "layers.kron_gated.")):
            assert torch.equal(v, before[k]), k
    for k in ("lowrank", "kron_gated"):
        assert torch.equal(model.layers[k](x), net.layers[k](x))
    with pytest.raises(ValueError, match="matches no layer or tensor"):
        tk.load_compressed(Net(), path, include="nothing-like-this")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        tk.load_compressed(Net(), path, include="(")


def test_strict_refuses_a_model_that_differs(saved):
    net, path, x, y = saved
    model = Net()
    del model.block
    state = snapshot(model)
    with pytest.raises(ValueError, match="layer 'block' has no module in the model"):
        tk.load_compressed(model, path)
    assert_same_model(model, *state)
    tk.load_compressed(model, path, strict=False)
    assert isinstance(model.layers["tt"], tk.TTLinear)
    model = Net()
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"in the model only \['extra.weight', 'extra.bias'\]"):
        tk.load_compressed(model, path)
    other = Net()
    other.layers["tt"] = nn.Linear(24, 13)
    with pytest.raises(ValueError, match="layer 'layers.tt': the model's Linear is 13x24"):
        tk.load_compressed(other, path)


# ---- refusals -------------------------------------------------------------------------------------
def flip_data_byte(path, name: str) -> None:
    h, start = header(path)
    raw = bytearray(path.read_bytes())
    raw[start + h[name]["data_offsets"][0] + 1] ^= 0x10
    path.write_bytes(bytes(raw))


def change_dtype(path, name: str) -> None:
    h, _ = header(path)
    old = json.dumps({name: h[name]}, separators=(",", ":"))[1:-1]
    raw = path.read_bytes()
    assert raw.count(old.encode()) == 1
    path.write_bytes(raw.replace(old.encode(), old.replace('"F32"', '"I32"').encode()))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def break_header(path) -> None:
    raw = bytearray(path.read_bytes())
    raw[8] = ord("[")  # the JSON header's opening brace
    path.write_bytes(bytes(raw))


def cut_inside_header(path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def unknown_version(path) -> None:
    rewrite(path, path, lambda doc: doc.update(format_version=2))


def unknown_class(path) -> None:
    rewrite(path, path, lambda doc: doc["layers"]["layers.tt"].update({"class": "tspline_kernels.nope.NopeLinear"}))


def plain_safetensors(path) -> None:
    save_file(load_file(str(path)), str(path))


def set_arg(layer: str, **args):
    return lambda path: rewrite(path, path, lambda doc: doc["layers"][layer]["init_args"].update(args))


BROKEN = {
    "flipped-core": (lambda p: flip_data_byte(p, "layers.tt.cores.1"), IntegrityError,
                     "tensor 'layers.tt.cores.1': its SHA-256 differs"),
    "flipped-norm": (lambda p: flip_data_byte(p, "norm.weight"), IntegrityError, "tensor 'norm.weight'"),
    "flipped-buffer": (lambda p: flip_data_byte(p, "block.lo"), IntegrityError, "tensor 'block.lo'"),
    "header-dtype": (lambda p: change_dtype(p, "layers.lowrank.U"), IntegrityError,
                     r"tensor 'layers.lowrank.U': stored as int32 \(12, 3\), recorded as float32"),
    "truncated": (truncate, ValueError, "truncated: its header describes"),
    "cut-in-header": (cut_inside_header, ValueError, "bad header"),
    "bad-header": (break_header, ValueError, "bad header"),
    "unknown-version": (unknown_version, ValueError, "format version 2; this tspline-kernels .* reads version 1"),
    "unknown-class": (unknown_class, ValueError,
                      "class 'tspline_kernels.nope.NopeLinear' is not a compressed layer this tspline-kernels"),
    "not-ours": (plain_safetensors, ValueError, "not a tspline compressed model file"),
    "rank": (set_arg("layers.lowrank", rank=4), ValueError,
             r"layer 'layers.lowrank': the recorded arguments .* do not match the stored tensors"
             r"(?s:.*)size mismatch for U"),
    "modes": (set_arg("layers.tt", in_modes=[4, 3, 2]), ValueError, "do not match the stored tensors"),
    "radius": (set_arg("layers.gaussian_local", support_radius=1.2), ValueError,
               "support_radius=0.9 in the state dict but 1.2 in this layer"),
    "gating": (set_arg("layers.kron_gated", gating_mode="soft"), ValueError,
               "gating_mode='hard' in the state dict but 'soft' in this layer"),
    "features": (set_arg("layers.lowrank", in_features=25), ValueError,
                 r"LowRankLinear\(\*\*.*\) is 12x25, recorded 12x24"),
    "bad-arg": (set_arg("layers.bspline", grid=[5]), ValueError, r"cannot build SplineLinear\(\*\*"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_file_is_refused_and_the_model_left_untouched(saved, tmp_path, case):
    _, path, _, _ = saved
    damage, error, match = BROKEN[case]
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(path.read_bytes())
    damage(broken)
    model = Net()
    state = snapshot(model)
    with pytest.raises(error, match=match):
        tk.load_compressed(model, broken)
    assert_same_model(model, *state)


def test_a_failure_while_swapping_puts_every_module_and_tensor_back(saved, monkeypatch):
    model = Net()
    state = snapshot(model)
    tie = files._tie

    def failing(module, aliases):
        if module is model:  # after the layers are swapped in and the other tensors assigned
            raise RuntimeError("interrupted")
        tie(module, aliases)

    monkeypatch.setattr(files, "_tie", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        tk.load_compressed(model, saved[1])
    assert_same_model(model, *state)


def test_sharded_files_are_checked_like_single_ones(saved, tmp_path):
    net, _, _, _ = saved
    path = tmp_path / "model.safetensors"
    tk.save_compressed(net, path, max_shard_size="1kB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = tmp_path / index["weight_map"]["layers.spline_tt.control.0"]
    model = Net()
    state = snapshot(model)
    flip_data_byte(shard, "layers.spline_tt.control.0")
    with pytest.raises(IntegrityError, match="tensor 'layers.spline_tt.control.0'"):
        tk.load_compressed(model, path)
    truncate(shard)
    with pytest.raises(ValueError, match="truncated"):
        tk.load_compressed(model, path)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        tk.load_compressed(model, path)
    index["weight_map"]["norm.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="bad index file: weight_map must name shard files"):
        tk.load_compressed(model, path)
    index_path.write_text("{")
    with pytest.raises(ValueError, match="bad index file"):
        tk.load_compressed(model, path)
    assert_same_model(model, *state)


def test_integrity_error_is_a_value_error_and_found_lazily(saved, tmp_path):
    assert tk.IntegrityError is IntegrityError and issubclass(IntegrityError, ValueError)
    path = tmp_path / "model.safetensors"
    path.write_bytes(saved[1].read_bytes())
    flip_data_byte(path, "layers.bspline.control")
    with tk.open_compressed(path) as f:  # metadata is intact: opening works, reading the tensor fails
        assert torch.equal(f.tensor("layers.lowrank.U"), saved[0].layers["lowrank"].U)
        with pytest.raises(IntegrityError, match="layers.bspline.control"):
            f.load_layer("layers.bspline")
        assert list(f.verify()) == ["layers.bspline.control"]


def test_save_refuses_what_it_cannot_record(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        tk.save_compressed("model", path)
    with pytest.raises(ValueError, match="the model itself is a LowRankLinear"):
        tk.save_compressed(tk.LowRankLinear(4, 4, 1), path)
    with pytest.raises(ValueError, match="tensor '0.bias' is on the meta device"):
        tk.save_compressed(nn.Sequential(tk.LowRankLinear(4, 4, 1, device="meta")), path)
    with pytest.raises(ValueError, match="max_shard_size must be bytes"):
        tk.save_compressed(nn.Sequential(nn.Linear(2, 2)), path, max_shard_size="lots")
    with pytest.raises(TypeError, match="max_shard_size must be an int"):
        tk.save_compressed(nn.Sequential(nn.Linear(2, 2)), path, max_shard_size=1.5)
    layer = tk.LowRankLinear(4, 4, 1)
    layer.init_args = {**layer.init_args, "rank": object()}
    with pytest.raises(TypeError, match=r"layer '0' \(LowRankLinear\): argument rank=.* cannot be recorded"):
        tk.save_compressed(nn.Sequential(layer), path)
    with pytest.raises(TypeError, match="report must be a mapping or have to_json"):
        tk.save_compressed(nn.Sequential(nn.Linear(2, 2)), path, report=[1])
    assert not path.exists()
    with pytest.raises(FileNotFoundError, match="no compressed model at"):
        tk.open_compressed(tmp_path / "missing.safetensors")


def test_a_missing_fsspec_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(ImportError, match=r"need fsspec: pip install 'tspline-kernels\[files\]'"):
        tk.open_compressed(tmp_path / "m.safetensors")


# ---- tspline inspect ------------------------------------------------------------------------------
def test_inspect_prints_the_layer_table(saved, tmp_path, capsys):
    net, path, _, _ = saved
    cli.main(["inspect", str(path)])
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    for name, layer in [*((f"layers.{k}", m) for k, m in net.layers.items()), ("block", net.block)]:
        row = lines[name]
        assert row[1] == type(layer).__name__ and row[2] == "12x24"
        assert int(row[3]) == layer.num_parameters() and float(row[5][:-1]) == pytest.approx(
            layer.compression_ratio(), abs=0.01)
        assert row[-2:] == ["not", "verified"]
    assert "checksums: not verified" in out and "11 compressed layers" in out

    cli.main(["inspect", str(path), "--verify"])
    out = capsys.readouterr().out
    verified = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.strip()}
    assert all(verified[name] == "ok" for name in [*(f"layers.{k}" for k in net.layers), "block", "total"])
    assert f"checksums: all {len(net.state_dict())} tensors match" in out

    broken = tmp_path / "model.safetensors"
    broken.write_bytes(path.read_bytes())
    flip_data_byte(broken, "layers.hierarchical.control_fine")
    with pytest.raises(SystemExit, match="1 tensors failed verification"):
        cli.main(["inspect", str(broken), "--verify"])
    out = capsys.readouterr().out
    assert "FAILED (1 of" in next(line for line in out.splitlines() if line.startswith("layers.hierarchical"))


def test_inspect_counts_buffers_apart_from_parameters(tmp_path, capsys):
    """Buffers (running statistics, integer ids) are listed with their elements but counted in no
    parameter total; a streamed state dict, which cannot tell them apart, says so."""
    model = nn.Sequential(tk.LowRankLinear(24, 12, 2), nn.BatchNorm1d(12), nn.Linear(12, 3))
    model.register_buffer("ids", torch.arange(7))
    path = tmp_path / "m.safetensors"
    tk.save_compressed(model, path)
    cli.main(["inspect", str(path)])
    rows = {line.split(":")[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("(")}
    params = 2 * 12 + 3 * 12 + 3  # BatchNorm's weight and bias, the Linear's
    assert rows["(other parameters"][5:7] == [str(params), str(params)]  # after "(other parameters: 4) - -"
    assert rows["(buffers"][5] == f"({12 + 12 + 1 + 7})"  # running mean, var, num_batches_tracked, ids
    total = next(line.split() for line in cli_lines(path, capsys) if line.startswith("total"))
    assert total[3] == str(model[0].num_parameters() + params)

    from tspline_kernels.files import StreamingWriter

    with StreamingWriter(tmp_path / "s.safetensors", max_shard_size="1MB") as writer:
        for name, t in model.state_dict().items():
            writer.add(name, t)
        # no close(): a clean exit of the block closes the writer (no file was written before)
    assert writer.closed and any(line.startswith("(other tensors (parameters and buffers): 11)")
                                 for line in cli_lines(tmp_path / "s.safetensors", capsys))
    with pytest.raises(RuntimeError, match="closed already"):
        writer.close()
    with pytest.raises(RuntimeError, match="nothing more can be added"):
        writer.add("late", torch.ones(1))


def cli_lines(path, capsys) -> list[str]:
    cli.main(["inspect", str(path)])
    return capsys.readouterr().out.splitlines()


def test_inspect_help_and_bad_paths(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["inspect", "--help"])
    assert exit_.value.code == 0 and "--verify" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["inspect", str(tmp_path / "missing.safetensors")])
    assert exit_.value.code == 2 and "no compressed model at" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a model at all")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["inspect", str(tmp_path / "junk.safetensors")])
    assert exit_.value.code == 2 and "bad header" in capsys.readouterr().err


def test_save_refuses_fsdp2_shards_clearly(tmp_path):
    """A model wrapped by FSDP2 holds DTensor shards: refused with the recipe, not a storage error."""
    dist = pytest.importorskip("torch.distributed")
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch without FSDP2's public fully_shard")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(tk.LowRankLinear(8, 6, 2))
        fsdp.fully_shard(model)
        with pytest.raises(ValueError, match="DTensor shard.*distributed checkpoint"):
            tk.save_compressed(model, str(tmp_path / "m.safetensors"))
        assert not (tmp_path / "m.safetensors").exists()
    finally:
        dist.destroy_process_group()


# ---- regressions (review) -------------------------------------------------------------------------
def test_loaded_tensors_do_not_share_the_files_pages(tmp_path):
    """A save to the same path after loading must not change the loaded model (safe_open's tensors
    are views of the mapped file), and loaded tensors are fresh, aligned allocations."""
    path = tmp_path / "m.safetensors"
    torch.manual_seed(0)
    a, b = (nn.Sequential(tk.LowRankLinear(64, 64, 8), nn.Linear(64, 8)) for _ in range(2))
    tk.save_compressed(a, path)
    restored = tk.load_compressed(nn.Sequential(nn.Linear(64, 64, device="meta"), nn.Linear(64, 8, device="meta")), path)
    with tk.open_compressed(path) as f:
        lazy = f.load_layer("0")
    x = torch.randn(1, 64)
    tk.save_compressed(b, path)
    assert torch.equal(restored(x), a(x)) and torch.equal(lazy(x), a[0](x))
    assert all(t.data_ptr() % 16 == 0 for t in restored.state_dict().values() if t.numel())


def test_a_layer_is_not_put_in_place_of_a_module_that_is_no_linear(tmp_path):
    path = tmp_path / "m.safetensors"
    tk.save_compressed(nn.Sequential(tk.LowRankLinear(16, 16, 4), nn.ReLU(), nn.Linear(16, 4)), path)
    other = nn.Sequential(nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
    state = snapshot(other)
    with pytest.raises(ValueError, match="layer '0': the model holds a LayerNorm there"):
        tk.load_compressed(other, path)
    assert_same_model(other, *state)


def test_a_tensor_tied_across_compressed_layers_is_tied_again(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(tk.LowRankLinear(8, 8, 2), nn.ReLU(), tk.LowRankLinear(8, 8, 2))
    model[2].V = model[0].V
    tk.save_compressed(model, tmp_path / "m.safetensors")
    fresh = tk.load_compressed(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), tmp_path / "m.safetensors")
    assert fresh[2].V is fresh[0].V and torch.equal(fresh[0].V, model[0].V)


def test_save_refuses_to_delete_a_checkpoint_it_did_not_write(tmp_path):
    for k in (1, 2):
        save_file({f"w{k}": torch.randn(4)}, str(tmp_path / f"model-0000{k}-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"w1": "model-00001-of-00002.safetensors", "w2": "model-00002-of-00002.safetensors"}}))
    before = sorted(p.name for p in tmp_path.iterdir())
    model = nn.Sequential(tk.LowRankLinear(8, 8, 2))
    with pytest.raises(FileExistsError, match="not written by tspline-kernels"):
        tk.save_compressed(model, tmp_path / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    tk.save_compressed(model, tmp_path / "mine.safetensors", max_shard_size=64)  # its own index: replaced as before
    tk.save_compressed(model, tmp_path / "mine.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["mine.safetensors"])
