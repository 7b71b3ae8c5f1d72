"""The README's usage example runs as written (docs that match the code)."""

import re
from pathlib import Path


def test_readme_usage_example_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    usage = readme.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, flags=re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Replacement(name='0'" in out and "truncated SVD: relative error" in out
