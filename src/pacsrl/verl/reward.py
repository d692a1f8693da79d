"""verl reward function with pacsrl's math verifier (``custom_reward_function.path=<this file>``).

verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info)`` per completion; this
returns the 0/1 outcome of ``pacsrl.rewards.math.verify_answer`` (math-verify on the last ``\\boxed{}``),
the verifier of ``pacsrl train``, which is what the ``pacs_label`` estimator needs.
"""

from __future__ import annotations

from pacsrl.rewards.math import verify_answer


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 when the completion's final answer equals ``ground_truth``, else 0.0."""
    return 1.0 if verify_answer(solution_str, str(ground_truth)) else 0.0
