"""PACS for upstream verl 0.9.x (``pip install pacsrl[verl]``), loaded through verl's plugin mechanism.

``import verl`` imports every entry point of the group ``verl.plugins``; pacsrl's is ``pacsrl.verl.plugin``,
which registers into verl:

- the policy loss ``pacs`` (``actor_rollout_ref.actor.policy_loss.loss_mode=pacs``, configured by
  ``PACSPolicyLossConfig``): ``pacsrl.objective.pacs_loss``, the code of the TRL trainer;
- the advantage estimator ``pacs_label`` (``algorithm.adv_estimator=pacs_label``): the 0/1 label and a
  group tag on every response token, which the loss decodes and checks;
- the trainer ``pacs_sync`` (``trainer.v1.trainer_mode=pacs_sync``): verl's sync trainer keeping groups
  whole across ranks and micro-batches, refusing settings that would break PACS.

See the README's verl section and ``recipes/verl/``. This package imports verl; the rest of pacsrl never does.
"""

from pacsrl.verl.checks import TRAINER_NAME, check_config, config_problems
from pacsrl.verl.loss import (
    ESTIMATOR_NAME,
    LOSS_NAME,
    PACSPolicyLossConfig,
    decode_labels,
    encode_labels,
    pacs_label_advantage,
    pacs_policy_loss,
)

__all__ = [
    "ESTIMATOR_NAME",
    "LOSS_NAME",
    "TRAINER_NAME",
    "PACSPolicyLossConfig",
    "check_config",
    "config_problems",
    "decode_labels",
    "encode_labels",
    "pacs_label_advantage",
    "pacs_policy_loss",
]
