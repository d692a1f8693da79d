"""Tiny offline models and character-level tokenizers, built from a config and never downloaded.

The one builder of random tiny models in the repository: the tests, the benchmarks (``bench/``) and
``docs/make_pass_at_k_example.py`` all use it (the demo's trained model is ``pacsrl.demo.tiny``'s). Every
character is one token; two chat formats are offered:

- ``"chatml"`` (the default): ``<|im_start|>role:content<|im_end|>``, EOS ``<|im_end|>``, as Qwen's chat
  checkpoints end a turn;
- ``"brackets"``: ``[role]content``, EOS ``</s>``, a plain base-model style.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

ChatFormat = Literal["chatml", "brackets"]

CHARS = list("0123456789+-*=? abcdefghijklmnopqrstuvwxyz.,:")
PRINTABLE = [ch for ch in string.printable if ch not in "\t\n\r\x0b\x0c"]  # 95 characters
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]  # "chatml"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}:{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}"
)
BRACKETS_SPECIAL = ["<pad>", "</s>", "<unk>"]
BRACKETS_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def build_tokenizer(chars: Sequence[str] = CHARS, chat: ChatFormat = "chatml") -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character of ``chars`` (others map to ``<unk>``), special tokens first:
    ``<pad>`` has id 0, the EOS id 3 ("chatml") or 1 ("brackets")."""
    specials = SPECIAL if chat == "chatml" else BRACKETS_SPECIAL
    vocab = {tok: i for i, tok in enumerate(specials + list(chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if chat == "chatml":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>", bos_token=None
        )
        fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
        fast.chat_template = CHAT_TEMPLATE
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
        )
        fast.chat_template = BRACKETS_TEMPLATE
    return fast


def build_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden: int = 32, layers: int = 2, **config: Any
) -> Qwen2ForCausalLM:
    """A random Qwen2 sized for ``tokenizer`` (initialised after ``torch.manual_seed(seed)``); ``config``
    overrides any ``Qwen2Config`` field (e.g. ``num_attention_heads=2``, ``tie_word_embeddings=False``)."""
    import torch

    torch.manual_seed(seed)
    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
        "tie_word_embeddings": True,
    }
    return Qwen2ForCausalLM(Qwen2Config(**{**settings, **config}))


def save_tiny(
    path: Path, seed: int = 0, *, chars: Sequence[str] = CHARS, chat: ChatFormat = "chatml", **model: Any
) -> Path:
    """Build a tokenizer and a model (``build_model``'s arguments in ``model``) and save both to ``path``."""
    tokenizer = build_tokenizer(chars, chat)
    build_model(tokenizer, seed=seed, **model).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
