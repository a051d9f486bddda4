"""hlora: LoRA fine-tuning without forgetting (HLoRA, arXiv 2501.13669), baselines and evaluation."""
__version__ = "0.1.0"
