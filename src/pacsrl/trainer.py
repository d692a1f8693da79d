"""``PACSTrainer``: TRL's ``GRPOTrainer`` trained with the PACS objective of ``pacsrl.objective``.

Reading order: rollouts get 0/1 labels and group ids (``_generate_and_score_completions``), whole groups are
shuffled into micro-batches (``_prepare_inputs``), and the loss is computed on each (``_compute_loss``). The fixed
reference of ``pacs_reference="fixed"`` lives in ``pacsrl.reference``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from trl import GRPOTrainer
from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

from pacsrl.config import PACSConfig
from pacsrl.objective import (
    class_weights,
    group_centre,
    group_outcomes,
    implicit_reward,
    on_policy_advantage,
    pacs_loss,
    pacs_on_policy_loss,
)
from pacsrl.reference import FixedReference, ResetCallback

if TYPE_CHECKING:
    from trl.trainer.grpo_trainer import EnvironmentFactory, RewardFunc, RolloutFunc

logger = logging.getLogger(__name__)

# keys of a GRPO batch that hold per-sample images; the fast path does not subset rows when present
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "num_images",
    "num_tiles",
    "image_position_ids",
)


def labels_from_rewards(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, threshold: float
) -> torch.Tensor:
    """0/1 labels from the rewards of K reward functions, shape (N,).

    ``label = 1`` iff ``sum_k w_k r_k / sum_k w_k >= threshold`` over the functions that scored the completion
    (TRL lets a function return None, i.e. NaN here, for a completion it does not apply to). A completion that
    no function scored gets label 0. Rewards must lie in [0, 1].

    Args:
        rewards_per_func: (N, K) rewards, NaN where a function returned None.
        weights: (K,) non-negative weights.
    """
    finite = rewards_per_func[~torch.isnan(rewards_per_func)]
    if finite.numel() and (finite.min() < 0 or finite.max() > 1):
        bad = finite[(finite < 0) | (finite > 1)][:5].tolist()
        raise ValueError(
            f"PACS needs rewards in [0, 1] to turn them into correct/wrong labels, got {bad}. Rescale the reward "
            "function, or make it a verifier that returns 1.0 for correct and 0.0 for wrong."
        )
    scored = ~torch.isnan(rewards_per_func)  # (N, K)
    w = weights.to(rewards_per_func.device, rewards_per_func.dtype)  # (K,)
    w = w.expand_as(rewards_per_func) * scored  # (N, K)
    total = torch.nan_to_num(rewards_per_func, nan=0.0).mul(w).sum(dim=1)  # (N,)
    norm = w.sum(dim=1)  # (N,)
    mean = torch.where(norm > 0, total / norm.clamp(min=1e-12), torch.zeros_like(total))  # (N,)
    return (mean >= threshold - 1e-6).to(rewards_per_func.dtype)


class PACSTrainer(GRPOTrainer):
    """PACS (arXiv 2509.02522) on TRL's ``GRPOTrainer``: same constructor, datasets, reward functions and launchers.

    The verifier's reward becomes a 0/1 label; the loss is the weighted BCE of ``pacsrl.objective.pacs_loss`` on the
    group-centred implicit reward ``beta * sum_t log(pi_theta / pi_ref)``. Generation (transformers or vLLM),
    reward computation, accelerate / DeepSpeed / FSDP, PEFT, logging and checkpoints are TRL's.

    Overrides, and why:

    - ``__init__``: GRPOTrainer's own signature (``reward_funcs`` may be None when an ``environment_factory``
      provides the reward); checks that ``args`` is a ``PACSConfig``; for ``pacs_reference="fixed"`` builds the
      frozen reference (``pacsrl.reference.FixedReference``: a copy of the model, or with PEFT of the adapter)
      and registers the callback that resets it.
    - ``_calculate_rewards``: keeps the rewards of every reward function (gathered across processes), from which
      the 0/1 labels are made; TRL itself only keeps its GRPO advantages.
    - ``_generate_and_score_completions``: adds ``pacs_labels`` and ``pacs_group_ids`` to the batch, checks that
      every group of G rows on this process holds one prompt, and logs the group outcome metrics.
    - ``_prepare_inputs``: GRPO shuffles single rows of the generation batch before cutting it into
      micro-batches; PACS shuffles whole groups instead, so a group is never split across micro-batches
      (the loss of a completion depends on every member of its group). Otherwise the same buffering.
    - ``_get_per_token_logps_and_entropies``: the forwards without gradient (pi_old, recomputed by TRL, and the
      fixed pi_ref) run with every module in eval mode, so no dropout noise (LoRA's included) enters the
      implicit reward, which sums the log-ratio over every token of a completion.
    - ``_compute_loss``: the PACS loss, with the on-policy fast path (see below) and the ``pacs/*`` metrics. In
      evaluation with ``num_generations_eval=1`` there is no group to centre against: no PACS loss (0 is
      returned, as GRPO's loss is 0 there) and no ``pacs/*`` metrics but ``pacs/label_mean``.
    - ``_save_checkpoint`` / ``_load_optimizer_and_scheduler``: save and restore the fixed reference and its
      reset counter, so a resumed run continues the same schedule.

    Whole groups across processes come from TRL's own sampler: it yields the G copies of a prompt contiguously and
    each process receives ``per_device_train_batch_size * steps_per_generation`` consecutive rows, a multiple of
    G (``PACSConfig`` enforces ``per_device_train_batch_size % num_generations == 0``). Both properties are
    asserted at run time on every batch.

    On-policy fast path: while ``pi_theta == pi_ref`` (the first optimizer step after a rollout with
    ``pacs_reference="old"``, or after a reset with ``"fixed"``), every psi is 0 and the gradient is exactly
    ``-(beta/N) sum_k A_k grad S_k`` (``pacsrl.objective.on_policy_advantage``). Groups whose advantage is 0
    (all labels equal) then carry no gradient and are left out of the forward/backward (``pacs/skipped_groups``).
    A process whose groups are all skipped still runs a zero-weighted forward/backward on one group, so that
    gradient synchronisation (DDP, ZeRO, FSDP) sees the same collective calls on every process. The fast path is
    off for MoE models whose router load-balancing loss is trained (TRL's ``aux_loss_enabled``: the config has
    ``output_router_logits`` and ``router_aux_loss_coef != 0``): that loss depends on every forwarded token, so
    skipping groups would change its gradient.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "pacs"]
    _name = "PACS"

    def __init__(
        self,
        model,
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        args: PACSConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func: RolloutFunc | None = None,
        environment_factory: EnvironmentFactory | dict[str, EnvironmentFactory] | None = None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = PACSConfig(f"{str(model_name).split('/')[-1]}-PACS")
        if not isinstance(args, PACSConfig):
            raise TypeError(
                f"PACSTrainer needs a pacsrl.PACSConfig, got {type(args).__name__}; PACSConfig accepts every "
                "GRPOConfig field plus the pacs_* fields"
            )
        super().__init__(
            model,
            reward_funcs,
            args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        self._pacs_rewards_per_func: torch.Tensor | None = None  # (N_all, K) of the last rollout
        self._pacs_generation = 0  # rollouts so far, part of the group ids
        self._pacs_old_step = -1  # optimizer step at which the buffered rollout was generated (pi_old)
        self._pacs_aux_loss: torch.Tensor | None = None
        self.fixed_reference: FixedReference | None = None  # pi_ref of pacs_reference="fixed"
        if args.pacs_reference == "fixed":
            self.fixed_reference = FixedReference(self)
            self.add_callback(ResetCallback(self.fixed_reference))
        if args.pacs_on_policy_fast_path and self.aux_loss_enabled:
            logger.info(
                "PACS on-policy fast path off: the model's MoE router loss is trained, and it depends on "
                "every token, so no group can be skipped"
            )

    # ------------------------------------------------------------------------------------------------
    # rollouts: labels and group ids
    # ------------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._pacs_rewards_per_func = rewards_per_func  # (N_all, K), gathered across processes
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        n_local = len(inputs)
        if n_local % G != 0:
            raise RuntimeError(f"this process received {n_local} rows, not a multiple of the group size {G}")
        for start in range(0, n_local, G):  # the sampler's G copies of a prompt must be contiguous here
            first = inputs[start]["prompt"]
            if any(inputs[i]["prompt"] != first for i in range(start + 1, start + G)):
                raise RuntimeError(
                    f"rows {start}..{start + G - 1} of this process are not {G} copies of one prompt: the batch does "
                    "not hold whole groups (check per_device_train_batch_size and the sampler)"
                )
        output = super()._generate_and_score_completions(inputs)

        device = self.accelerator.device
        weights = self.reward_weights.to(device)
        all_labels = labels_from_rewards(
            self._pacs_rewards_per_func.float(), weights, self.args.pacs_label_threshold
        )
        rank = self.accelerator.process_index
        output["pacs_labels"] = all_labels[rank * n_local : (rank + 1) * n_local]  # (N_local,)
        # a unique id per group: rank, generation counter and position make it unique across processes and batches
        self._pacs_generation += 1
        local_group = torch.arange(n_local, device=device) // G  # (N_local,)
        base = (self._pacs_generation * self.accelerator.num_processes + rank) * (n_local // G)
        output["pacs_group_ids"] = base + local_group  # (N_local,)

        if G >= 2:  # (evaluation may sample one completion per prompt: no groups then)
            for key, value in group_outcomes(all_labels, G).items():
                self._metrics[mode][f"pacs/groups/{key}"].append(value)
        self._metrics[mode]["pacs/label_mean"].append(all_labels.mean().item())
        if mode == "train":
            self._pacs_old_step = self.state.global_step
        return output

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:  # evaluation: one batch, no buffering, no shuffling (TRL's behaviour)
            return super()._prepare_inputs(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = split_pixel_values_by_grid(batch)
            batch = _shuffle_groups(batch, self.num_generations)  # GRPO shuffles rows; PACS shuffles groups
            batches = split_tensor_dict(batch, self.args.steps_per_generation)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in batches]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    # ------------------------------------------------------------------------------------------------
    # the loss
    # ------------------------------------------------------------------------------------------------
    def _is_on_policy(self) -> bool:
        """pi_theta == pi_ref for the current micro-batch: no optimizer step since pi_ref was set."""
        if self.args.pacs_reward_form != "sum":
            return False  # the reference-free form has psi != 0 even on-policy
        if self.args.pacs_reference == "old":
            return self.state.global_step == self._pacs_old_step
        return self.state.global_step == self.fixed_reference.step

    def _forward(
        self, model, inputs: dict[str, Any], rows: torch.Tensor | None = None, compute_entropy: bool = True
    ):
        """Per-token log-probs (N, T) and entropies of the completions, for all rows or only ``rows``."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        extra = {
            k: inputs.get(k)
            for k in (
                "pixel_values",
                "image_grid_thw",
                "num_images",
                "pixel_attention_mask",
                "spatial_shapes",
                "num_tiles",
                "image_sizes",
                "token_type_ids",
                "mm_token_type_ids",
                "image_position_ids",
            )
        }
        if rows is not None:
            input_ids, attention_mask = input_ids[rows], attention_mask[rows]
            for k in ("token_type_ids", "mm_token_type_ids"):
                if extra[k] is not None:
                    extra[k] = extra[k][rows]
        aux = compute_entropy and self.aux_loss_enabled  # the policy's MoE router loss, as in GRPOTrainer
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=compute_entropy,
            compute_aux_loss=aux,
            **extra,
        )
        if compute_entropy:  # the policy's forward (the reference's must not overwrite it)
            self._pacs_aux_loss = aux_loss
        return logps, entropies

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        # without gradient, this is pi_old (TRL's recomputation) or pi_ref: every module in eval mode, so that no
        # dropout noise is summed into the implicit reward (with gradient: the policy's forward, as configured)
        off = contextlib.nullcontext() if torch.is_grad_enabled() else _eval_mode(model)
        with off:
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    def _compute_loss(self, model, inputs):
        args = self.args
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        labels = inputs["pacs_labels"]  # (N,)
        mask = inputs["completion_mask"]  # (N, T)
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        N = labels.shape[0]
        if G < 2:
            # evaluation with num_generations_eval=1: no other completion to centre against, so no PACS loss; TRL
            # has logged the rewards, and GRPO's own loss is 0 there too
            _, entropies = self._forward(model, inputs)
            self._log_entropy(mode, "entropy", entropies, mask)
            return torch.zeros((), device=labels.device)
        _check_whole_groups(inputs["pacs_group_ids"], G)
        loss_kwargs = {
            "beta": args.pacs_beta,
            "baseline": args.pacs_baseline,
            "weight_mode": args.pacs_weight_mode,
        }

        on_policy = mode == "train" and self._is_on_policy()
        skipped = 0
        # for the on-policy value and the metrics
        weight_sum = class_weights(labels, G, args.pacs_weight_mode).sum()
        # (a trained MoE router loss depends on every forwarded token: no group may be skipped then)
        if on_policy and args.pacs_on_policy_fast_path and not self.aux_loss_enabled:
            adv = on_policy_advantage(
                labels, G, baseline=args.pacs_baseline, weight_mode=args.pacs_weight_mode
            )
            keep_group = adv.view(-1, G).ne(0).any(dim=1)  # (B,)
            if any(inputs.get(k) is not None for k in _MULTIMODAL_KEYS):
                keep_group = torch.ones_like(keep_group)  # image tensors are not row-aligned: no subsetting
            skipped = int((~keep_group).sum())
            placeholder = not bool(keep_group.any())
            # still forward/backward one group with weight 0: every process must join the sync
            if placeholder:
                keep_group[0] = True
            rows = keep_group.repeat_interleave(G).nonzero(as_tuple=True)[0]  # (N',)
            logps, entropies = self._forward(model, inputs, rows)  # (N', T)
            loss = pacs_on_policy_loss(logps, mask[rows], labels[rows], G, num_rows=N, **loss_kwargs)
            # the loss value on-policy is (1/N) sum_i w_i log 2 over all rows, skipped ones included
            loss_value = weight_sum * math.log(2.0) / N
            if placeholder:  # zero gradient, true value
                loss = loss * 0.0 + loss_value
            else:
                loss = loss - loss.detach() + loss_value
            psi = torch.zeros_like(labels)
            rewards = torch.zeros_like(labels)
            ent_mask = mask[rows]
        else:
            logps, entropies = self._forward(model, inputs)  # (N, T)
            ref = self._reference_logps(inputs, logps, on_policy)
            loss = pacs_loss(logps, ref, mask, labels, G, reward_form=args.pacs_reward_form, **loss_kwargs)
            loss_value = loss.detach()
            with torch.no_grad():
                rewards = implicit_reward(
                    logps, ref, mask, beta=args.pacs_beta, reward_form=args.pacs_reward_form
                )
                psi = group_centre(rewards, G, args.pacs_baseline)
            ent_mask = mask
        if self.aux_loss_enabled and self._pacs_aux_loss is not None:  # MoE load balancing, as in GRPOTrainer
            loss = loss + self.router_aux_loss_coef * self._pacs_aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather(self._pacs_aux_loss.detach()).mean().item()
            )
        if mode == "train":
            loss = loss / self.current_gradient_accumulation_steps  # TRL turns off HF's own loss scaling
        self._log_pacs_metrics(
            mode, loss_value, labels, rewards, psi, weight_sum, entropies, ent_mask, skipped, N, on_policy
        )
        return loss

    def _reference_logps(
        self, inputs: dict[str, Any], logps: torch.Tensor, on_policy: bool
    ) -> torch.Tensor | None:
        """(N, T) log-probs of pi_ref for this micro-batch (None for the reference-free form)."""
        args = self.args
        if args.pacs_reward_form == "mean_logp":
            return None
        if args.pacs_reference == "old":
            old = inputs.get("old_per_token_logps")
            if old is not None:
                return old
            if on_policy or not self.model.training:
                # pi_old == pi_theta: TRL skips recomputing it then (and in evaluation the rollout policy is
                # the current one, so every psi is 0 and only the loss value is reported)
                return logps.detach()
            raise RuntimeError(
                "off-policy PACS micro-batch without pi_old log-probs: TRL did not recompute them for this "
                "configuration (please report this with your steps_per_generation, num_iterations and "
                "gradient_accumulation_steps)"
            )
        return self.fixed_reference.logps(inputs, self._forward)  # once per micro-batch and reference version

    def _log_pacs_metrics(
        self, mode, loss_value, labels, rewards, psi, weight_sum, entropies, ent_mask, skipped, N, on_policy
    ):
        device = labels.device
        acc = self.accelerator
        self._metrics[mode]["pacs/loss"].append(acc.gather(loss_value.detach().reshape(1)).mean().item())
        # sums reduced across processes, then moments
        local = torch.stack(
            [
                torch.tensor(float(N), device=device),
                rewards.sum(),
                (rewards**2).sum(),
                psi.sum(),
                (psi**2).sum(),
                weight_sum,
                torch.tensor(float(skipped), device=device),
            ]
        ).float()
        n, r1, r2, p1, p2, wsum, skip = acc.reduce(local, reduction="sum").tolist()
        self._metrics[mode]["pacs/implicit_reward/mean"].append(r1 / n)
        self._metrics[mode]["pacs/implicit_reward/std"].append(math.sqrt(max(r2 / n - (r1 / n) ** 2, 0.0)))
        self._metrics[mode]["pacs/psi/mean"].append(p1 / n)
        self._metrics[mode]["pacs/psi/std"].append(math.sqrt(max(p2 / n - (p1 / n) ** 2, 0.0)))
        self._metrics[mode]["pacs/class_weight/mean"].append(wsum / n)
        if mode == "train":
            self._metrics[mode]["pacs/skipped_groups"].append(skip)
            self._metrics[mode]["pacs/on_policy"].append(float(on_policy))
        informative = not on_policy and (mode == "train" or self.args.pacs_reference == "fixed")
        if informative:
            # the implicit critic sigma(psi) is informative only when pi_theta != pi_ref (else psi = 0, sigma = 1/2);
            # in evaluation that is the case with the fixed reference only
            prob = torch.sigmoid(psi.float())
            correct = ((prob > 0.5).float() == labels.float()).float().sum()
            brier = ((prob - labels.float()) ** 2).sum()
            c, b, m = acc.reduce(
                torch.stack([correct, brier, torch.tensor(float(N), device=device)]), reduction="sum"
            ).tolist()
            self._metrics[mode]["pacs/critic_accuracy"].append(c / m)
            self._metrics[mode]["pacs/critic_brier"].append(b / m)
        # when the fast path skipped groups, only the forwarded (mixed-label) groups have an entropy: that is
        # logged under its own name so TRL's `entropy` always covers every completion it reports on
        self._log_entropy(
            mode, "pacs/entropy_forwarded_groups" if skip > 0 else "entropy", entropies, ent_mask
        )

    def _log_entropy(self, mode: str, key: str, entropies: torch.Tensor | None, mask: torch.Tensor) -> None:
        if entropies is not None:
            ent = torch.stack([(entropies * mask).sum(), mask.sum()]).float()
            e_sum, e_cnt = self.accelerator.reduce(ent, reduction="sum").tolist()
            self._metrics[mode][key].append(e_sum / max(e_cnt, 1.0))

    # ------------------------------------------------------------------------------------------------
    # checkpoints: the fixed reference and its reset counter
    # ------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.fixed_reference is not None:  # a collective under ZeRO-3 / FSDP: every process takes part
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            self.fixed_reference.save(folder)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.fixed_reference is not None and checkpoint is not None:
            self.fixed_reference.load(checkpoint)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode (dropout off), each one's mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(False)
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check_whole_groups(group_ids: torch.Tensor, G: int) -> None:
    """Raise unless the rows are whole groups: G contiguous rows per group id, each id once."""
    if group_ids.numel() % G != 0:
        raise RuntimeError(f"micro-batch of {group_ids.numel()} rows is not made of whole groups of {G}")
    ids = group_ids.view(-1, G)  # (B, G)
    if not bool((ids == ids[:, :1]).all()) or ids[:, 0].unique().numel() != ids.shape[0]:
        raise RuntimeError(
            f"a group of {G} completions was split across micro-batches or processes (group ids "
            f"{group_ids.tolist()[: 4 * G]}...): PACS needs whole groups"
        )


def _shuffle_groups(batch: dict[str, Any], G: int) -> dict[str, Any]:
    """Shuffle the rows of a generation batch in whole groups of G (GRPO's shuffle permutes single rows)."""
    n = len(batch["pacs_labels"])
    order = torch.randperm(n // G)
    perm = (order[:, None] * G + torch.arange(G)[None, :]).reshape(-1)  # (N,)

    def permute(v):
        if v is None or (isinstance(v, torch.Tensor) and v.ndim == 0):
            return v
        if isinstance(v, torch.Tensor):
            return v[perm.to(v.device)]
        if isinstance(v, (list, tuple)) and len(v) == n:
            return [v[i] for i in perm.tolist()]
        return v

    return {key: permute(value) for key, value in batch.items()}
