"""The README's drop-in example runs as written (in a temp dir)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_dropin_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    block = re.search(r"<!-- example:dropin.*?-->\s*```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md:dropin", "exec"), scope)
    assert (tmp_path / "out" / "importance.safetensors").exists()
    pen = scope["penalty"].penalty().item()
    assert pen > 0  # the adapter moved away from the stage-ν solution and the penalty sees it
