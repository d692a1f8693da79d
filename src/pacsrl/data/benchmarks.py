"""Preparers for the paper's datasets: DeepScaleR (training), MATH-500, AMC23, AIME 2024/2025, GSM8K.

Each preparer maps one source's real column names onto the record schema of
:mod:`pacsrl.data.records`, adds the paper's instruction to the question and stores the gold answer as
a string. A source loads from its Hugging Face Hub id (online) or from a local parquet / jsonl / json
file with the same columns (offline).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from pacsrl.data.records import make_prompt, report_unparseable_gold, validate_records

logger = logging.getLogger(__name__)

DATA_SUFFIXES: dict[str, str] = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
"""Local file suffix -> ``datasets`` builder that reads it."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def normalize_answer(value: Any) -> str:
    """Store a gold answer as a string: ints as digits, integral floats without ``.0``, text stripped.

    AIME sources hold ints and some AMC sources floats (``27.0``); the verifier wants ``"27"``.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"gold answer {value!r} is not a number or a string")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.strip()
    raise ValueError(f"gold answer {value!r} has type {type(value).__name__}; expected a string or a number")


_DIGIT_GROUP_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def gsm8k_final_answer(solution: Any) -> str:
    """Extract GSM8K's gold: the text after ``####``, thousands separators removed.

    ``"...\\n#### 1,234"`` -> ``"1234"``; ``"#### -5"`` -> ``"-5"``.
    """
    if not isinstance(solution, str) or "####" not in solution:
        raise ValueError(f"GSM8K answer has no '#### <final answer>' line: {solution!r}")
    final = solution.rsplit("####", 1)[1].strip()
    return _DIGIT_GROUP_COMMA.sub("", final)


@dataclass(frozen=True)
class Preparer:
    """How to turn one source's rows into records.

    Column tuples list the names known across the source's hub copies, in order of preference: the
    first one present in a file is used.
    """

    name: str
    hub_id: str
    split: str
    question_columns: tuple[str, ...]
    description: str
    hub_config: str | None = None
    answer_columns: tuple[str, ...] = ("answer", "Answer")
    id_columns: tuple[str, ...] = ("unique_id", "id", "ID", "problem_idx")
    extra_columns: tuple[str, ...] = ()
    """Optional source columns copied unchanged into the records (e.g. MATH-500's ``level``)."""
    extract_answer: Callable[[Any], str] = field(default=normalize_answer)

    def columns_for(self, found: list[str], origin: str) -> tuple[str, str, str | None]:
        """Pick the (question, answer, id) columns among ``found``; raise naming both lists if absent."""
        question = next((c for c in self.question_columns if c in found), None)
        answer = next((c for c in self.answer_columns if c in found), None)
        if question is None or answer is None:
            raise ValueError(
                f"{origin} does not look like {self.name} ({self.description}): found columns {found}; "
                f"expected a question column (one of {list(self.question_columns)}) and an answer column "
                f"(one of {list(self.answer_columns)})"
            )
        return question, answer, next((c for c in self.id_columns if c in found), None)


PREPARERS: dict[str, Preparer] = {
    p.name: p
    for p in [
        Preparer(
            name="deepscaler",
            hub_id="agentica-org/DeepScaleR-Preview-Dataset",
            split="train",
            question_columns=("problem", "question"),
            description="training set of the paper, ~40k problems: problem, answer, solution",
        ),
        Preparer(
            name="math500",
            hub_id="HuggingFaceH4/MATH-500",
            split="test",
            question_columns=("problem",),
            extra_columns=("subject", "level"),
            description="500 MATH test problems: problem, solution, answer, subject, level, unique_id",
        ),
        Preparer(
            name="amc23",
            hub_id="math-ai/amc23",
            split="test",
            question_columns=("question", "problem"),
            description="40 AMC 2023 problems: question (or problem), answer",
        ),
        Preparer(
            name="aime24",
            hub_id="HuggingFaceH4/aime_2024",
            split="train",
            question_columns=("problem", "Problem", "question"),
            description="30 AIME 2024 problems: problem, answer (or Maxwell-Jia/AIME_2024's Problem, Answer)",
        ),
        Preparer(
            name="aime25",
            hub_id="yentinglin/aime_2025",
            split="train",
            question_columns=("problem", "question", "Problem"),
            description="30 AIME 2025 problems: problem (or question), answer",
        ),
        Preparer(
            name="gsm8k",
            hub_id="openai/gsm8k",
            hub_config="main",
            split="test",
            question_columns=("question",),
            extract_answer=gsm8k_final_answer,
            description="grade-school math: question, answer (reasoning then '#### <number>')",
        ),
    ]
}
"""Preparer name -> how to prepare it. The names are the ones ``pacsrl prepare`` and recipes accept."""


def get_preparer(name: str) -> Preparer:
    """Return the preparer called ``name`` or raise a ``ValueError`` listing the known ones."""
    try:
        return PREPARERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(PREPARERS)}") from None


def load_data_file(path: str | Path) -> datasets.Dataset:
    """Load one local parquet / jsonl / json file (a JSON array or JSON lines) as a ``Dataset``."""
    path = Path(path)
    builder = DATA_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"cannot read {str(path)!r}: expected a file ending in one of {sorted(DATA_SUFFIXES)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    empty = ValueError(f"data file {str(path)!r} has no rows")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except StopIteration:  # datasets' JSON reader found no first row to infer the columns from
        raise empty from None
    except ValueError as err:  # and its builder wrote no rows: 'Instruction "train" corresponds to no data!'
        raise empty if "corresponds to no data" in str(err) else err from None


def _is_local(path: str) -> bool:
    return Path(path).exists() or Path(path).suffix.lower() in DATA_SUFFIXES or not _HUB_ID.fullmatch(path)


def load_source(preparer: Preparer, path: str | None = None, split: str | None = None) -> datasets.Dataset:
    """Load a preparer's raw rows: from its hub id when ``path`` is None, else from ``path``.

    ``path`` is a local parquet / jsonl / json file, or another hub id ``owner/name`` with the same columns
    (used when no local file by that name exists and it has no data-file suffix).
    """
    if path is not None and _is_local(path):
        if split is not None:
            raise ValueError(
                f"split={split!r} only applies to hub datasets; the local file {path!r} is a single split"
            )
        logger.info("%s: loading local file %s", preparer.name, path)
        return load_data_file(path)
    hub_id = path or preparer.hub_id
    config = preparer.hub_config if hub_id == preparer.hub_id else None
    split = split or preparer.split
    logger.info("%s: loading %s (config %s, split %s) from the hub", preparer.name, hub_id, config, split)
    raw = datasets.load_dataset(hub_id, config, split=split)
    if len(raw) == 0:
        raise ValueError(f"{hub_id!r} split {split!r} has no rows: pick another split")
    return raw


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r}: expected a positive integer or None")


def to_records(raw: datasets.Dataset, preparer: Preparer, *, origin: str) -> datasets.Dataset:
    """Map a source's raw rows onto the record schema (prompt, answer, source, id, problem, extras)."""
    found = list(raw.column_names)
    question_col, answer_col, id_col = preparer.columns_for(found, origin)
    extras = [c for c in preparer.extra_columns if c in found]

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        question = row[question_col]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{origin} row {index}: empty or non-text question {question!r}")
        try:
            answer = preparer.extract_answer(row[answer_col])
        except ValueError as err:
            raise ValueError(f"{origin} row {index}: {err}") from None
        row_id = row[id_col] if id_col is not None else None
        record = {
            "prompt": make_prompt(question),
            "answer": answer,
            "source": preparer.name,
            "id": str(row_id) if row_id is not None else f"{preparer.name}/{index}",
            "problem": question.strip(),
        }
        record.update({c: row[c] for c in extras})
        return record

    # explicit features: map would otherwise keep a source's int type for the "answer" and "id" it rewrites
    features = datasets.Features(
        {
            "prompt": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "answer": datasets.Value("string"),
            "source": datasets.Value("string"),
            "id": datasets.Value("string"),
            "problem": datasets.Value("string"),
            **{c: raw.features[c] for c in extras},
        }
    )
    return raw.map(
        convert, with_indices=True, remove_columns=found, features=features, desc=f"preparing {preparer.name}"
    )


def prepare_dataset(
    name: str,
    path: str | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
    check: bool = True,
) -> datasets.Dataset:
    """Prepare one of :data:`PREPARERS` as records.

    Args:
        name: preparer name, e.g. ``"math500"``.
        path: None to load the preparer's hub id; else a local parquet / jsonl / json file with the
            source's columns (or another hub id holding the same columns).
        split: hub split (default: the preparer's, e.g. ``test`` for MATH-500); not allowed with a file.
        limit: keep only the first ``limit`` rows.
        check: report gold answers math-verify cannot parse (a logged warning listing the rows).
    """
    preparer = get_preparer(name)
    _check_limit(limit)
    raw = load_source(preparer, path, split)
    if limit is not None and limit < len(raw):
        raw = raw.select(range(limit))
    origin = repr(path) if path is not None else f"{preparer.hub_id!r}"
    ds = to_records(raw, preparer, origin=origin)
    if check:
        report_unparseable_gold(ds, name)
    return ds


def resolve_dataset(spec: str, *, limit: int | None = None, check: bool = True) -> datasets.Dataset:
    """Turn a dataset spec from a recipe or the command line into validated records.

    ``spec`` is one of:

    * a preparer name (``"math500"``): the benchmark from the hub;
    * ``"NAME=FILE"`` (``"math500=data/math500.jsonl"``): that preparer applied to a local source file;
    * the path of an already-prepared parquet / jsonl / json file (e.g. from ``pacsrl prepare``).

    ``limit`` keeps the first rows; ``check`` reports unparseable gold answers (logged warning).
    """
    _check_limit(limit)
    if spec in PREPARERS:
        return prepare_dataset(spec, limit=limit, check=check)
    name, sep, path = spec.partition("=")
    if sep and name in PREPARERS:
        return prepare_dataset(name, path, limit=limit, check=check)
    if sep and not Path(spec).exists():
        raise ValueError(
            f"dataset spec {spec!r}: unknown dataset {name!r}; expected one of {sorted(PREPARERS)}"
        )
    if Path(spec).suffix.lower() not in DATA_SUFFIXES and not Path(spec).exists():
        raise ValueError(
            f"dataset spec {spec!r} is neither a dataset name ({sorted(PREPARERS)}), NAME=FILE, "
            f"nor a prepared file ending in one of {sorted(DATA_SUFFIXES)}"
        )
    ds = load_data_file(spec)
    validate_records(ds, origin=repr(spec))
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    if check:
        report_unparseable_gold(ds, spec)
    return ds
