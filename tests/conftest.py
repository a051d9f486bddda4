import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HLORA_PROGRESS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores


@pytest.fixture
def embedded_data(monkeypatch):
    """Point data lookups at the subset shipped inside the package (no ../shared needed)."""
    from hlora.assets import EMBEDDED_DATA

    monkeypatch.setenv("HLORA_DATA", str(EMBEDDED_DATA))
    return EMBEDDED_DATA
