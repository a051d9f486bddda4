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


FRONTS = README.parent / "results" / "fronts-smollm2"


def _table_blocks(text: str) -> list[str]:
    """Each run of consecutive Markdown table lines, as one string."""
    blocks, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    return blocks


def test_readme_fronts_tables_regenerate_from_the_committed_results(tmp_path):
    """The acceptance of the fronts issue: results.json holds every committed record, `hlora report` on it
    rewrites the committed tables.md byte for byte, and every table of the README's fronts section is in it."""
    import json

    from hlora.report import write_report

    results = json.loads((FRONTS / "results.json").read_text())
    records = sorted(p.stem for p in (FRONTS / "records").glob("*.json"))
    assert sorted(r["cell"] for r in results) == records, "run `hlora run configs/fronts-smollm2.yaml --collect`"
    write_report(FRONTS / "results.json", tmp_path)
    tables = (tmp_path / "tables.md").read_text(encoding="utf-8")
    assert tables == (FRONTS / "report" / "tables.md").read_text(encoding="utf-8")
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Does HLoRA forget less"):text.index("### `hlora demo`")]
    blocks = _table_blocks(section)
    assert blocks, "the README's fronts section has no table"
    for block in blocks:
        assert block in tables, f"README table not in the regenerated tables.md:\n{block[:300]}"
