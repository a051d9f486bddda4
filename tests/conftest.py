import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HLORA_PROGRESS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores


def _freeze_imported_objects() -> None:
    """Import the heavy stack once and move its ~0.5 M objects out of the garbage collector's reach.

    transformers' Trainer ends every train() with accelerate's gc.collect(), and the experiment collects after
    every cell: with torch, transformers, PEFT and matplotlib loaded a full collection scans ~0.5 M module-level
    objects (~0.4 s on a 2-core machine), which made collection a third of the grid tests' time. gc.freeze()
    keeps what exists now out of later collections; what the tests create is still collected.
    """
    import gc

    import importlib

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import peft  # noqa: F401
    import scipy.stats  # noqa: F401
    import transformers  # noqa: F401
    from transformers import GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM, Trainer  # noqa: F401

    for name in ("hlora.cli", "hlora.experiment", "hlora.report", "hlora.si", "hlora.train"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a broken module fails its own tests, not the whole session here
            pass
    gc.collect()
    gc.freeze()


_freeze_imported_objects()


@pytest.fixture
def skip_figure_drawing(monkeypatch):
    """For tests that check a report's tables, not its figures: every matplotlib figure is saved as a stub PNG
    without being drawn (drawing is most of a report's time; the figure tests draw them for real)."""
    import io

    from matplotlib.figure import Figure

    buf = io.BytesIO()
    Figure(figsize=(1, 1)).savefig(buf, format="png", dpi=10)
    stub = buf.getvalue()

    def savefig(self, fname, *args, **kwargs):
        if hasattr(fname, "write"):
            fname.write(stub)
        else:
            Path(fname).write_bytes(stub)

    monkeypatch.setattr(Figure, "savefig", savefig)


@pytest.fixture
def embedded_data(monkeypatch):
    """Point data lookups at the subset shipped inside the package (no ../shared needed)."""
    from hlora.assets import EMBEDDED_DATA

    monkeypatch.setenv("HLORA_DATA", str(EMBEDDED_DATA))
    return EMBEDDED_DATA


@pytest.fixture(scope="session")
def bench_script():
    """`bench_script("pick_lr")`: benchmarks/pick_lr.py as a module, loaded once (the scripts are not a package)."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # a dataclass in the script looks its module up while it is defined
            spec.loader.exec_module(module)
        return sys.modules[name]

    return load
