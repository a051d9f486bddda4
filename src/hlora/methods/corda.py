"""CorDA-KPM: PEFT's context-oriented decomposition in knowledge-preserving mode (Yang et al. 2024).

Before training, PEFT's `preprocess_corda` collects the input covariance C of every targeted layer on
general text (the stage-ν pool) and decomposes W·C; `init_lora_weights="corda"` with `corda_method="kpm"`
initialises the adapter from the components that the general text uses *least* and subtracts them from W,
so the model is unchanged at step 0 and training moves the directions the general text relies on least.

That rewrites the base weights: the trained adapter belongs to the residual W − ΔW_init, not to the
pretrained model. `save` therefore converts it with PEFT's `path_initial_model_for_weight_conversion` into a
plain LoRA adapter of rank 2r for the *original* weights (ΔW_final − ΔW_init), so evaluation, WiSE-FT and
`PeftModel.from_pretrained` use the pretrained model like every other method (tested to 1e-5).
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from ..files import atomic_dir
from ..util import eval_mode, model_device
from .base import Method
from .spec import MethodConfig, Row

if TYPE_CHECKING:
    from torch import nn


@dataclass
class CorDAConfig(MethodConfig):
    name: str = "corda_kpm"
    covariance_examples: int = 64  # general-pool sequences the covariance is collected on (one per forward:
    # PEFT's collection hook reads one sequence per call)


ROWS = [Row("corda_kpm", "CorDA-KPM", "fresh", (("name", "corda_kpm"),))]


class CorDAKPM(Method):
    config_class = CorDAConfig

    def attach(self, base: nn.Module) -> nn.Module:
        import torch
        from peft import get_peft_model
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        from ..data.packing import batches
        from ..model import peft_lora_config

        run = self.ctx.run
        if run.init_adapter:
            raise ValueError("corda_kpm initialises its own adapter: it cannot continue init_adapter")
        if self.ctx.general_pool is None:
            raise ValueError("method 'corda_kpm' needs the general pool of stage ν for its covariance")
        pcfg = peft_lora_config(base, run.lora, init_lora_weights="corda",
                                corda_config=CordaConfig(corda_method="kpm"))
        pool, dev, c = self.ctx.general_pool(), model_device(base), self.cfg

        def run_model():
            with torch.no_grad(), eval_mode(base):
                for b in batches(pool, 1, limit=c.covariance_examples):
                    base(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev))

        preprocess_corda(base, pcfg, run_model=run_model)
        self.costs.extra_forward_tokens += min(len(pool), c.covariance_examples) * int(pool[0]["input_ids"].numel())
        model = get_peft_model(base, pcfg)
        # The initial adapter, kept to express the trained one relative to the pretrained weights at save time;
        # saved as a plain LoRA (init_lora_weights=True), as PEFT's conversion requires.
        self._init_dir = Path(tempfile.mkdtemp(prefix="corda_init-", dir=self.ctx.out)) / "corda_init"
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(str(self._init_dir))
        model.peft_config["default"].init_lora_weights = "corda"
        return model

    def save(self, model: nn.Module, out: Path, summary: dict) -> dict:
        try:
            with atomic_dir(out / "adapter") as tmp:
                model.save_pretrained(str(tmp), path_initial_model_for_weight_conversion=str(self._init_dir))
        finally:
            shutil.rmtree(self._init_dir.parent, ignore_errors=True)
        return {"adapter_note": "CorDA adapter converted to a rank-2r LoRA of the pretrained weights"}
