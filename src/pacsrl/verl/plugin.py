"""verl plugin entry point (``[project.entry-points."verl.plugins"] pacsrl``): registers PACS into verl.

verl imports this module inside ``import verl``, in the driver and in every Ray worker, and logs a plugin
that fails to import at DEBUG only. So each registration is attempted on its own and a failure is logged
as a WARNING naming what is missing, rather than raised or lost.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

REGISTERED: dict[str, bool] = {"loss": False, "estimator": False, "trainer": False}


def _register_loss_and_estimator() -> None:
    from verl.trainer.ppo import core_algos

    from pacsrl.verl.loss import ESTIMATOR_NAME, LOSS_NAME, pacs_label_advantage, pacs_policy_loss

    core_algos.register_policy_loss(LOSS_NAME)(pacs_policy_loss)
    REGISTERED["loss"] = True
    if core_algos.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR_NAME) is not pacs_label_advantage:
        core_algos.register_adv_est(ESTIMATOR_NAME)(pacs_label_advantage)
    REGISTERED["estimator"] = True


def _register_trainer() -> None:
    from verl.trainer.ppo.v1 import register_trainer
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    from pacsrl.verl.checks import TRAINER_NAME
    from pacsrl.verl.trainer import PACSTrainerSync

    if TRAINER_REGISTRY.get(TRAINER_NAME) is not PACSTrainerSync:
        register_trainer(TRAINER_NAME)(PACSTrainerSync)
    REGISTERED["trainer"] = True


def register() -> dict[str, bool]:
    """Register the loss, the estimator and the trainer; log a WARNING for each that fails."""
    for what, fn in (
        ("loss pacs and estimator pacs_label", _register_loss_and_estimator),
        ("trainer", _register_trainer),
    ):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - verl would swallow it at DEBUG; say it loudly instead
            logger.warning(
                "pacsrl could not register the PACS %s into verl: %s: %s", what, type(exc).__name__, exc
            )
    return dict(REGISTERED)


register()
