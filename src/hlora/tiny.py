"""Tiny random models and a tiny tokenizer built in code (tests, configs/tiny.yaml): no network, ~1 s."""
from __future__ import annotations

import functools

import torch

_CORPUS = (
    "The cell is the basic unit of life. Water boils at one hundred degrees. "
    "Question: What gas do plants absorb? Answer: carbon dioxide. "
    "Photosynthesis converts light energy into chemical energy. The mitochondria make energy. "
    "To open a jar, twist the lid. Heat makes metal expand. Choices: A. B. C. D. "
    "Mercury Venus Earth Mars Jupiter Saturn protons neutrons electrons gravity friction. "
    "1 2 3 4 5 6 7 8 9 0 , . ; : ? ! ' \" ( ) - = @ \n"
)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, show_progress=False, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE (GPT-2 style, like SmolLM2's) trained on a few sentences: any text encodes."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    tok.model_max_length = 1 << 30  # the model's own limit (256 positions) is enforced by the evaluator
    return tok


def tiny_model(arch: str = "tiny-llama", seed: int = 0, vocab_size: int | None = None):
    """A random causal LM of the given architecture, hidden 32, 2 blocks, 256 positions."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    vocab = vocab_size or len(tiny_tokenizer())
    torch.manual_seed(seed)
    if arch == "tiny-llama":
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(cfg).eval()
    if arch == "tiny-gpt-neox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
        )
        return GPTNeoXForCausalLM(cfg).eval()
    if arch == "tiny-gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg).eval()
    raise ValueError(f"unknown tiny architecture {arch!r}; known: tiny-llama, tiny-gpt-neox, tiny-gpt2")


# Default LoRA targets per tiny architecture (their attention projections have different names).
TINY_TARGETS = {
    "tiny-llama": ["q_proj", "v_proj"],
    "tiny-gpt-neox": ["query_key_value"],
    "tiny-gpt2": ["c_attn"],
}
