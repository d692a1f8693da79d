"""Start-up refusals of the verl settings that would split a PACS group or silently change its objective.

``check_config`` reads verl's composed Hydra config (an OmegaConf ``DictConfig`` or a plain dict) and
raises one ``ValueError`` listing every problem, each as ``key=value: why; fix``. The ``pacs_sync``
trainer calls it before anything is built.
"""

from __future__ import annotations

from typing import Any

from pacsrl.verl.loss import ESTIMATOR_NAME, LOSS_NAME

TRAINER_NAME = "pacs_sync"


def _get(config: Any, dotted: str, default: Any = None) -> Any:
    node = config
    for part in dotted.split("."):
        if node is None:
            return default
        if not hasattr(node, "get"):
            return default
        node = node.get(part, None)
    return default if node is None else node


def config_problems(config: Any) -> list[str]:
    """Every setting of ``config`` that PACS cannot honour, as ``key=value: why; fix`` lines."""
    problems: list[str] = []

    def need(key: str, ok: bool, why_fix: str) -> None:
        if not ok:
            problems.append(f"{key}={_get(config, key)!r}: {why_fix}")

    actor = "actor_rollout_ref.actor"
    n = int(_get(config, "actor_rollout_ref.rollout.n", 1))
    need(
        "actor_rollout_ref.rollout.n",
        n >= 2,
        "PACS centres each reward within its group; set n >= 2 (paper: 8)",
    )
    need(
        f"{actor}.policy_loss.loss_mode",
        _get(config, f"{actor}.policy_loss.loss_mode") == LOSS_NAME,
        f"the pacs_sync trainer trains PACS; set {actor}.policy_loss.loss_mode={LOSS_NAME}",
    )
    need(
        "algorithm.adv_estimator",
        _get(config, "algorithm.adv_estimator") == ESTIMATOR_NAME,
        f"the PACS loss reads the labels written by that estimator; set algorithm.adv_estimator={ESTIMATOR_NAME}",
    )
    need(
        f"{actor}.shuffle",
        not _get(config, f"{actor}.shuffle", False),
        "shuffling mini-batches splits groups; set it to false",
    )
    need(
        f"{actor}.use_kl_loss",
        not _get(config, f"{actor}.use_kl_loss", False),
        "a KL loss changes the PACS objective (the paper uses none); set it to false",
    )
    need(
        "algorithm.use_kl_in_reward",
        not _get(config, "algorithm.use_kl_in_reward", False),
        "a KL penalty in the reward makes labels non-binary; set it to false",
    )
    need(
        f"{actor}.entropy_coeff",
        float(_get(config, f"{actor}.entropy_coeff", 0.0)) == 0.0,
        "an entropy bonus changes the PACS objective (the paper uses none); set it to 0",
    )
    need(
        "algorithm.filter_groups.enable",
        not _get(config, "algorithm.filter_groups.enable", False),
        "group filtering drops groups PACS learns from (all-equal groups carry weight off-policy); set it to false",
    )
    need(
        "algorithm.rollout_correction.rollout_is",
        _get(config, "algorithm.rollout_correction.rollout_is") is None,
        "PACS does not use importance weights; set it to null",
    )
    need(
        "algorithm.rollout_correction.bypass_mode",
        not _get(config, "algorithm.rollout_correction.bypass_mode"),
        "pi_old must be the actor's recomputed log-probs, not the rollout engine's; set it to false",
    )
    need(
        f"{actor}.megatron.dynamic_context_parallel",
        not _get(config, f"{actor}.megatron.dynamic_context_parallel", False),
        "Megatron's dynamic context-parallel scheduler regroups sequences across micro-batches; set it to false",
    )
    need(
        "trainer.use_v1",
        bool(_get(config, "trainer.use_v1", True)),
        f"the group-aware trainer is a v1 trainer; set trainer.use_v1=true and trainer.v1.trainer_mode={TRAINER_NAME}",
    )
    need(
        "trainer.v1.sampler.sync_refill_failed_groups",
        bool(_get(config, "trainer.v1.sampler.sync_refill_failed_groups", False)),
        "otherwise a group with a failed rollout session is trained with fewer than n completions; set it to true",
    )

    train_bs = int(_get(config, "data.train_batch_size", 0))
    mini_bs = int(_get(config, f"{actor}.ppo_mini_batch_size", 0))
    need(
        f"{actor}.ppo_mini_batch_size",
        mini_bs > 0 and train_bs % mini_bs == 0,
        f"data.train_batch_size={train_bs} must be a multiple of it, else verl pads mini-batches with filler rows",
    )
    if _get(config, f"{actor}.use_dynamic_bsz", False):
        seq = int(_get(config, "data.max_prompt_length", 0)) + int(
            _get(config, "data.max_response_length", 0)
        )
        need(
            f"{actor}.ppo_max_token_len_per_gpu",
            int(_get(config, f"{actor}.ppo_max_token_len_per_gpu", 0)) >= n * seq,
            f"a micro-batch must fit a whole group of n={n} sequences of up to {seq} tokens; use >= {n * seq}",
        )
    else:
        micro = _get(config, f"{actor}.ppo_micro_batch_size_per_gpu")
        need(
            f"{actor}.ppo_micro_batch_size_per_gpu",
            micro is not None and int(micro) % n == 0,
            f"a fixed micro-batch must hold whole groups: use a multiple of rollout.n={n}, "
            f"or {actor}.use_dynamic_bsz=true (pacs_sync then keeps groups whole)",
        )
    return problems


def check_config(config: Any) -> None:
    """Raise ``ValueError`` naming every setting PACS refuses, with its fix."""
    problems = config_problems(config)
    if problems:
        raise ValueError("PACS (pacsrl.verl) cannot run with:\n  " + "\n  ".join(problems))
