"""A tiny Qwen2-shaped causal LM and a tokenizer built locally for a task's text.

Nothing here touches the Hub: the tokenizer is a byte-free BPE trained on a few thousand rendered
prompts and solutions (so the prompt's fixed words become single tokens while every printable ASCII
character stays encodable, digits one per token), wrapped in ``PreTrainedTokenizerFast`` with a
Qwen-style chat template; the model is a randomly initialised ``Qwen2ForCausalLM``.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

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


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 160) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained on ``corpus`` (e.g. chat-rendered prompts and solutions).

    Its base alphabet is all printable ASCII, so ``decode(encode(text)) == text`` for any ASCII text;
    merges only join letters, so numbers are read digit by digit.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(_PIECES, behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=list(string.printable),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_tokens(TAG_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=PAD_TOKEN,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=256,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
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
