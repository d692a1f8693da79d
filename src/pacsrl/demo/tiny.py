"""A tiny Qwen2-shaped causal LM and a tokenizer built locally for a task's text.

Nothing here touches the Hub: the tokenizer is a BPE trained on a few thousand rendered
prompts and solutions (so the prompt's fixed words become single tokens while every printable ASCII
character stays encodable, digits one per token), served as a ``Qwen2Tokenizer`` with a
Qwen-style chat template; the model is a randomly initialised ``Qwen2ForCausalLM``.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

PAD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, UNK_TOKEN, IM_START, IM_END]
# Whole tokens for the answer tags; ordinary (not special) so that decoding keeps them.
TAG_TOKENS = ["<answer>", "</answer>"]

# Qwen's ChatML, minus the default system turn: TRL renders prompts with
# ``apply_chat_template(messages, add_generation_prompt=True)`` and the model answers until <|im_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# A letter run with its leading space is a BPE word; every other character (digit, space, operator)
# is its own piece.
_PIECES = Regex(r" ?[A-Za-z]+|[^A-Za-z]")


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 160) -> Qwen2Tokenizer:
    """A small BPE tokenizer trained on ``corpus`` (e.g. chat-rendered prompts and solutions).

    Its base alphabet is printable ASCII, so ``decode(encode(text)) == text`` for any printable ASCII
    text (other characters are dropped); merges only join letters (with a leading space), so numbers
    are read digit by digit.

    It is returned as a ``Qwen2Tokenizer`` over a byte-level copy of the trained vocabulary: for a
    ``qwen2`` checkpoint, transformers 5's ``AutoTokenizer`` always rebuilds a ``Qwen2Tokenizer`` (Qwen's
    pre-tokenizer, byte-level), whatever ``tokenizer_config.json`` says. Since our merges never join a
    letter to a non-letter, Qwen's coarser pre-tokenization splits our text into exactly the same
    tokens, so the tokenizer saved and the tokenizer reloaded agree.
    """
    trained = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    trained.pre_tokenizer = pre_tokenizers.Split(_PIECES, behavior="isolated")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=list(string.printable),
        min_frequency=2,
        show_progress=False,
    )
    trained.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    byte_char = bytes_to_unicode()

    def to_bytes(token: str) -> str:
        return token if token in SPECIAL_TOKENS else "".join(byte_char[b] for b in token.encode("utf-8"))

    vocab = {to_bytes(token): idx for token, idx in model["vocab"].items()}
    merges = [(to_bytes(a), to_bytes(b)) for a, b in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=UNK_TOKEN,
        bos_token=PAD_TOKEN,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=256,
    )
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TAG_TOKENS])
    return tokenizer


def build_model(
    tokenizer: Qwen2Tokenizer,
    *,
    hidden_size: int = 128,
    num_layers: int = 3,
    num_heads: int = 4,
    intermediate_size: int = 384,
    max_positions: int = 256,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM sized for ``tokenizer`` (about 0.5M parameters by default)."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )
    return model
