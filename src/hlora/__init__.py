"""hlora: LoRA fine-tuning without forgetting (HLoRA, arXiv 2501.13669), baselines and evaluation.

Public names are imported lazily so that `import hlora` (and the CLI's --help) stays fast.
"""
__version__ = "0.1.0"

_EXPORTS = {
    "SIRecorder": "si", "HLoRACallback": "callback", "Importance": "importance",
    "HLoRAPenalty": "methods.hlora", "EWCPenalty": "methods.ewc", "fisher_diagonal": "methods.ewc",
    "PenaltyTrainer": "train", "PenaltyMixin": "train", "run_stage": "train",
    "loglikelihood": "evaluate", "perplexity": "evaluate",
    "get_task": "data", "load_model": "model", "attach_lora": "model",
    "build_method": "methods", "method_config": "config", "evaluate_checkpoint": "eval_recipe",
    "tune": "budget.tune", "TuneConfig": "budget.tune", "Budget": "budget.measure", "search_alpha": "budget.alpha",
    "DualController": "budget.dual",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'hlora' has no attribute {name!r}")


# `evaluate` is both a submodule and the public function (docs/design.md section 6.1): bind the function eagerly,
# otherwise importing the submodule would shadow it with the module.
from .evaluate import evaluate  # noqa: E402

__all__.append("evaluate")
