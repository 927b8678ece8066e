"""The README's Python example runs as written (so the first thing a user copies works)."""

import pathlib
import re


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "converted" / "model.safetensors").exists()
