"""Small random-init causal LMs, one per supported architecture family, for tests and benchmarks.

Importable from non-fixture code (``from tests._models import make_random_lm``);
``tests/conftest.py`` exposes the same factory as the ``make_random_lm`` fixture. Shapes are chosen so
every linear's ``in_features`` is a multiple of 64 (group-quantization friendly), with 2 layers, a
256-token vocabulary and GQA (4 query heads, 2 kv heads) where the architecture supports it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

__all__ = ["ARCHS", "make_random_config", "make_random_lm"]

ARCHS: tuple[str, ...] = ("llama", "qwen2", "mistral", "gpt_neox", "gpt2")

_LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_DEFAULTS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama": (LlamaConfig, dict(_LLAMA_LIKE)),
    "qwen2": (Qwen2Config, dict(_LLAMA_LIKE)),
    "mistral": (MistralConfig, dict(_LLAMA_LIKE, sliding_window=None)),
    "gpt_neox": (
        GPTNeoXConfig,
        {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 256,
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "gpt2": (
        GPT2Config,
        {
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "vocab_size": 256,
            "n_positions": 256,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
}


def make_random_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """The small config of ``arch`` (one of :data:`ARCHS`) with ``overrides`` applied."""
    if arch not in _DEFAULTS:
        raise ValueError(f"unknown test architecture {arch!r}; have {', '.join(ARCHS)}")
    cls, kwargs = _DEFAULTS[arch]
    return cls(**{**kwargs, **overrides})


def make_random_lm(arch: str, *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A seeded random-init causal LM of ``arch`` in eval mode (fp32, CPU). The global RNG is untouched."""
    config = make_random_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_random_lm_with_tokenizer(path: Any, arch: str = "llama", *, vocab: int = 320, seed: int = 0, **overrides: Any) -> Any:
    """A random ``arch`` LM saved with a byte-level BPE tokenizer trained here (no download, no ../shared):
    a directory every ``bitplan`` command takes as ``--model``. Returns the path."""
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    words = "the of and to in a is was for on as with by at from his that it an were are which this be".split()
    rng = __import__("random").Random(seed)
    text = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(50)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    make_random_lm(arch, seed=seed, vocab_size=vocab, bos_token_id=1, eos_token_id=2, **overrides).save_pretrained(path)
    fast.save_pretrained(path)
    return path
