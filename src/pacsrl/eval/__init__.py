"""Evaluation: pass@k of one or more models on the math benchmarks (or any verifiable dataset).

* ``pass_at_k``, ``mean_at_n``, ``compute_metrics``: the estimators (``pacsrl.eval.metrics``);
* ``sample_completions``, ``evaluate_model``: an in-memory model, e.g. during training;
* ``run_eval`` (``pacsrl eval``): a resumable run into a folder; ``recompute`` and ``compare_runs``
  rebuild metrics, tables and plots from finished folders without a model.
"""

from pacsrl.eval.config import EvalConfig
from pacsrl.eval.metrics import (
    compute_metrics,
    default_ks,
    flatten_metrics,
    mean_at_n,
    num_correct,
    pass_at_k,
)
from pacsrl.eval.report import markdown_table, plot_pass_at_k
from pacsrl.eval.run import (
    EvalResult,
    compare_runs,
    dataset_problems,
    evaluate_model,
    load_run,
    recompute,
    resolve_reward,
    run_eval,
    save_results,
    score_completions,
)
from pacsrl.eval.sampling import HFSampler, Sampler, VLLMSampler, load_sampler, sample_completions

__all__ = [
    "EvalConfig",
    "EvalResult",
    "HFSampler",
    "Sampler",
    "VLLMSampler",
    "compare_runs",
    "compute_metrics",
    "dataset_problems",
    "default_ks",
    "evaluate_model",
    "flatten_metrics",
    "load_run",
    "load_sampler",
    "markdown_table",
    "mean_at_n",
    "num_correct",
    "pass_at_k",
    "plot_pass_at_k",
    "recompute",
    "resolve_reward",
    "run_eval",
    "sample_completions",
    "save_results",
    "score_completions",
]
