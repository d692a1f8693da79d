"""Training / evaluation data for verl in pacsrl's records: ``python -m pacsrl.verl.data --out DIR``.

verl's RL dataset reads parquet rows ``{data_source, prompt, ability, reward_model: {style, ground_truth},
extra_info}``. This writes pacsrl's prepared datasets (same prompts, gold answers and sources as
``pacsrl train``) in that layout, so both trainers see identical data and the same verifier
(``pacsrl.verl.reward``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import datasets

logger = logging.getLogger(__name__)

DEFAULT_DATASETS = ("deepscaler", "math500", "aime24", "aime25", "amc23")


def to_verl_rows(records: datasets.Dataset) -> datasets.Dataset:
    """Map pacsrl records (``prompt``, ``answer``, ``source``, ``id``) onto verl's RL dataset columns."""

    def convert(row):
        return {
            "data_source": row["source"],
            "prompt": row["prompt"],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": row["answer"]},
            "extra_info": {"id": row["id"]},
        }

    return records.map(convert, remove_columns=records.column_names, desc="verl layout")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pacsrl.verl.data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for <name>.parquet files")
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), help="pacsrl dataset specs")
    args = parser.parse_args(argv)
    from pacsrl.data.benchmarks import resolve_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in args.datasets:
        path = out / f"{Path(spec.partition('=')[0]).stem}.parquet"
        to_verl_rows(resolve_dataset(spec)).to_parquet(str(path))
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
