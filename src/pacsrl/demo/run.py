"""The offline demo: evaluate a checkpoint, train it with PACS and with GRPO on the same prompts and sample budget,
evaluate again, and write a report folder (``pacsrl demo``).

The demo is assembled from one file per concern:

- ``config.py``: ``DemoConfig`` (the settings) and ``Method`` (one contender);
- ``evaluation.py``: the checkpoint, the task's splits and reward, evaluation and the held-out pass@1 curve;
- ``training.py``: ``train_and_evaluate``, which trains and evaluates one method (the learning benchmark,
  ``bench/learning.py``, calls it too);
- ``report.py``: ``report.md`` and the plots;
- this file: ``run_demo``, which evaluates the base model, runs each algorithm and keeps ``metrics.json``.

``metrics.json`` holds the settings, the base evaluation, and per method its final evaluation, held-out pass@1
curve and training log; it is rewritten (atomically) after every evaluation, so an interrupted run keeps what it
finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from pacsrl.demo.config import DemoConfig, Method
from pacsrl.demo.evaluation import curve_pass1, evaluate, load_data, load_policy
from pacsrl.demo.report import METRICS_FILE, write_report
from pacsrl.demo.training import MethodResult, train_and_evaluate
from pacsrl.eval.report import write_json

logger = logging.getLogger(__name__)


def default_output_dir() -> Path:
    return Path("runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def run_demo(config: DemoConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the starting checkpoint, train and evaluate each algorithm of ``config``, write the report folder.

    Returns the content of ``metrics.json`` (with ``output_dir`` added). ``metrics.json`` is rewritten after
    every evaluation, so an interrupted demo keeps every result it reached.
    """
    if config.threads is None:  # fixed once, so that every phase and metrics.json use the same count
        config = dataclasses.replace(config, threads=config.resolved_threads())
        logger.info(
            "torch threads: %d (%d cores, 1-minute load %.1f; set --threads to choose)",
            config.threads,
            os.cpu_count() or 1,
            os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
        )
    torch.set_num_threads(config.threads)
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    from pacsrl.demo import demo_checkpoint_path

    model_path = Path(config.model) if config.model is not None else demo_checkpoint_path()
    report: dict[str, Any] = {
        "settings": {
            **dataclasses.asdict(config),
            "model": str(model_path),
            "task_config": config.resolved_task_config(),
            "torch": torch.__version__,
        },
        "base": None,
        "methods": {},
        "wall_seconds": None,
        "finished": False,
    }

    def save() -> None:
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_json(output_dir / METRICS_FILE, _nan_to_none(report))

    logger.info(
        "demo: %s on %s %s; writing %s",
        ", ".join(config.algorithms),
        config.task,
        json.dumps(config.resolved_task_config()),
        output_dir,
    )
    data = load_data(config)
    model, tokenizer = load_policy(config.model)
    t0 = time.perf_counter()
    base = evaluate(
        model, tokenizer, data.eval, config, n=config.eval_samples, name="base", reward_fn=data.reward_fn
    )
    base_curve_pass1 = curve_pass1(model, tokenizer, data.curve, config, data.reward_fn, name="base")
    report["base"] = {
        "eval": base.metrics,
        "curve_pass@1": base_curve_pass1,
        "eval_seconds": round(time.perf_counter() - t0, 2),
    }
    logger.info(
        "base: held-out pass@1 %.3f, pass@%d %.3f (%d problems x %d samples, T=%g)",
        base.metrics["all"]["pass@1"],
        config.eval_samples,
        base.metrics["all"][f"pass@{config.eval_samples}"],
        len(data.eval),
        config.eval_samples,
        config.eval_temperature,
    )
    del model
    save()

    for algorithm in config.algorithms:
        method = Method.of(algorithm)

        def on_update(result: MethodResult, key: str = algorithm) -> None:
            report["methods"][key] = result.summary()
            save()

        try:
            train_and_evaluate(
                method,
                config,
                data,
                output_dir / algorithm,
                start_point=report["base"]["curve_pass@1"],
                on_update=on_update,
            )
        finally:  # also on Ctrl-C: the report shows every finished method and the partial curves
            save()
            write_report(report, output_dir)

    report["finished"] = True
    save()
    write_report(report, output_dir)
    report["output_dir"] = str(output_dir)
    return report


__all__ = ["default_output_dir", "run_demo"]
