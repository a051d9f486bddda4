"""hlora: LoRA fine-tuning without forgetting (HLoRA, arXiv 2501.13669), baselines and evaluation.

Public names are imported lazily so that `import hlora` (and the CLI's --help) stays fast.
"""
__version__ = "0.1.0"

_EXPORTS = {
    "SIRecorder": "si", "HLoRACallback": "callback", "Importance": "importance",
    "HLoRAPenalty": "methods.hlora_penalty", "EWCPenalty": "methods.fisher", "fisher_diagonal": "methods.fisher",
    "PenaltyTrainer": "train", "PenaltyMixin": "train", "run_stage": "train",
    "loglikelihood": "evaluate", "perplexity": "evaluate",
    "get_task": "data", "load_model": "model", "attach_lora": "model",
    "build_method": "methods", "method_config": "config", "evaluate_checkpoint": "eval_recipe",
    "tune": "budget.tune", "TuneConfig": "budget.tune", "Budget": "budget.measure", "search_alpha": "budget.alpha",
    "DualController": "budget.dual",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS or name == "evaluate":
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS.get(name, name)}", __name__), name)
    raise AttributeError(f"module 'hlora' has no attribute {name!r}")


# `evaluate` is both a submodule and the public function (docs/design.md section 6.1). It is imported on first use
# like the rest (`import hlora`, `import hlora.config` import no torch); when the submodule is imported, the import
# system binds it on the package, and the package keeps the function in its place.
import types as _types  # noqa: E402


class _Package(_types.ModuleType):
    def __setattr__(self, name, value):
        if name == "evaluate" and isinstance(value, _types.ModuleType):
            value = value.evaluate
        super().__setattr__(name, value)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _Package
__all__.append("evaluate")
