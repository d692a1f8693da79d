"""Datasets for training and evaluation, all in one record schema (see :mod:`pacsrl.data.records`).

* :func:`prepare_dataset` turns one of the paper's sources (:data:`PREPARERS`) into records, from the
  Hugging Face Hub or a local file; :func:`resolve_dataset` does the same for a spec string from a
  recipe or the command line, and also loads already-prepared files.
* :func:`validate_records` and :func:`check_gold` check a dataset before it is used.
* Reasoning-gym tasks live in :mod:`pacsrl.data.gym`; ``pacsrl prepare`` is :mod:`pacsrl.data.cli`.
"""

from pacsrl.data.benchmarks import PREPARERS, Preparer, load_data_file, prepare_dataset, resolve_dataset
from pacsrl.data.records import INSTRUCTION, SCHEMA_COLUMNS, check_gold, make_prompt, validate_records

__all__ = [
    "INSTRUCTION",
    "PREPARERS",
    "SCHEMA_COLUMNS",
    "Preparer",
    "check_gold",
    "load_data_file",
    "make_prompt",
    "prepare_dataset",
    "resolve_dataset",
    "validate_records",
]
