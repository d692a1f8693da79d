"""PPO's critic: a value model with a scalar head per token, its optimizer, and its checkpoint files.

The critic is transformers' ``AutoModelForTokenClassification`` with ``num_labels=1`` built from a causal LM
checkpoint (the policy's by default), as verl's critic: the backbone's weights are the checkpoint's, the head is new.
Its value for completion token ``t`` is read at the position before ``t`` (the state in which the policy chose
``t``), the same alignment as the policy's log-probabilities.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig, AutoModelForTokenClassification

logger = logging.getLogger(__name__)

CRITIC_DIR = "critic"
CRITIC_OPTIMIZER_FILE = "critic_optimizer.pt"
CRITIC_SCHEDULER_FILE = "critic_scheduler.pt"


def build_critic(
    source: str,
    dtype: torch.dtype,
    vocab_size: int,
    gradient_checkpointing: bool,
    gradient_checkpointing_kwargs: dict | None,
) -> torch.nn.Module:
    """The value model from ``source`` (a hub id or a folder), in ``dtype``, dropout-free.

    The head's dropout is off (transformers defaults it to 0.1): the values of a rollout and of the update
    must come from the same function, or the value clipping and the explained variance measure noise.
    """
    try:
        config = AutoConfig.from_pretrained(source, num_labels=1, classifier_dropout=0.0)
    except OSError as err:
        raise ValueError(
            f"cannot load the critic's checkpoint {source!r} ({err.__class__.__name__}); set critic_model_name_or_path "
            "to a hub id or a local folder of a causal LM that uses the policy's tokenizer"
        ) from None
    critic = AutoModelForTokenClassification.from_pretrained(source, config=config, dtype=dtype)
    embeddings = critic.get_input_embeddings().num_embeddings
    if embeddings < vocab_size:
        raise ValueError(
            f"the critic {source!r} has {embeddings} token embeddings but the policy's tokenizer has {vocab_size} "
            "tokens: the critic must read the policy's token ids; use a checkpoint of the policy's family"
        )
    critic.config.use_cache = False
    if gradient_checkpointing:
        kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})
        critic.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        if kwargs.get("use_reentrant", True):
            critic.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    logger.info("critic: %s with a value head (%s)", source, dtype)
    return critic


def critic_values(
    critic: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_completion_tokens: int,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Values (N, T) of the completion tokens, in fp32, computed ``batch_size`` rows at a time.

    Args:
        input_ids, attention_mask: (N, P + T) prompt then completion.
        num_completion_tokens: T.
    """
    T = num_completion_tokens
    batch_size = batch_size or input_ids.shape[0]
    chunks = []
    for start in range(0, input_ids.shape[0], batch_size):
        out = critic(
            input_ids=input_ids[start : start + batch_size],
            attention_mask=attention_mask[start : start + batch_size],
            use_cache=False,
        )
        chunks.append(out.logits[:, -T - 1 : -1, 0].float())  # (n, T) value of the state before each token
    return torch.cat(chunks, dim=0)


def save_critic(critic: torch.nn.Module, optimizer, scheduler, folder: str, is_main: bool) -> None:
    """Critic weights (``folder/critic``), optimizer and scheduler state; the main process writes."""
    if not is_main:
        return
    critic.save_pretrained(os.path.join(folder, CRITIC_DIR))
    torch.save(optimizer.state_dict(), os.path.join(folder, CRITIC_OPTIMIZER_FILE))
    torch.save(scheduler.state_dict(), os.path.join(folder, CRITIC_SCHEDULER_FILE))


def load_critic(critic: torch.nn.Module, optimizer, scheduler, folder: str) -> None:
    """Restore what ``save_critic`` wrote (every process reads the same files)."""
    path = os.path.join(folder, CRITIC_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{folder} holds no PPO critic ({CRITIC_DIR}/ is missing): resume PPO from a checkpoint written by "
            "PPOTrainer, or start without resume_from_checkpoint"
        )
    from safetensors.torch import load_file

    state = {}
    for name in sorted(os.listdir(path)):  # one file, or the shards of a large critic
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(path, name)))
    critic.load_state_dict(state, strict=True)
    device = next(critic.parameters()).device
    optimizer.load_state_dict(
        torch.load(os.path.join(folder, CRITIC_OPTIMIZER_FILE), map_location=device, weights_only=True)
    )
    scheduler.load_state_dict(torch.load(os.path.join(folder, CRITIC_SCHEDULER_FILE), weights_only=True))
    logger.info("restored the PPO critic and its optimizer from %s", folder)
