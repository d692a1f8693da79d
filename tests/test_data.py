"""Dataset preparation: every preparer on small local files shaped like its real hub source.

No test touches the network: sources are written to ``tmp_path`` with the real column names, and the
hub path is exercised through a stand-in for ``datasets.load_dataset``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

import pacsrl.cli
from pacsrl.data import (
    INSTRUCTION,
    PREPARERS,
    benchmarks,
    check_gold,
    prepare_dataset,
    resolve_dataset,
    validate_records,
)
from pacsrl.data.benchmarks import gsm8k_final_answer, load_data_file, normalize_answer
from pacsrl.data.records import report_unparseable_gold

# Rows shaped like each real source (column names and value types as on the hub), with the question,
# the gold answer the record must hold, and the id the record must hold.
SOURCES: dict[str, list[dict]] = {
    # agentica-org/DeepScaleR-Preview-Dataset: problem, answer, solution (no id column)
    "deepscaler": [
        {
            "problem": "Compute $\\dbinom{8}{4}$.",
            "answer": "70",
            "solution": "$\\dbinom{8}{4} = \\frac{8!}{4!4!} = 70$.",
        },
        {
            "problem": "Let $f(x) = x^2 - 1$. Find the sum of the roots of $f$.",
            "answer": "0",
            "solution": "The roots are $\\pm 1$, so the sum is $0$.",
        },
        {
            "problem": "Simplify $\\sqrt{50}$.",
            "answer": "5\\sqrt{2}",
            "solution": "$\\sqrt{50} = \\sqrt{25 \\cdot 2} = 5\\sqrt{2}$.",
        },
    ],
    # HuggingFaceH4/MATH-500 (split test): problem, solution, answer, subject, level, unique_id
    "math500": [
        {
            "problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
            "solution": "We have $r = 3$ and $\\theta = \\frac{\\pi}{2}$.",
            "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
            "subject": "Precalculus",
            "level": 2,
            "unique_id": "test/precalculus/807.json",
        },
        {
            "problem": "What is the value of $513^2 - 487^2$?",
            "solution": "$(513+487)(513-487) = 1000 \\cdot 26 = 26000$.",
            "answer": "26000",
            "subject": "Algebra",
            "level": 1,
            "unique_id": "test/algebra/2027.json",
        },
    ],
    # math-ai/amc23 (split test): id, question, answer, url
    "amc23": [
        {
            "id": 0,
            "question": "Cities $A$ and $B$ are $45$ miles apart. Alicia bikes towards $B$ at 18 miles per hour. "
            "Leaving at the same time, Beth bikes toward $A$ at 12 miles per hour. How many miles from City "
            "$A$ will they be when they meet?",
            "answer": "27",
            "url": "https://artofproblemsolving.com/wiki/index.php/2023_AMC_12A_Problems/Problem_1",
        },
        {
            "id": 1,
            "question": "Positive real numbers $x$ and $y$ satisfy $y^3=x^2$ and $(y-x)^2=4y^2$. What is $x+y$?",
            "answer": "36",
            "url": "https://artofproblemsolving.com/wiki/index.php/2023_AMC_12A_Problems/Problem_2",
        },
    ],
    # HuggingFaceH4/aime_2024 (split train): id, problem, solution, answer (str), url, year
    "aime24": [
        {
            "id": 60,
            "problem": "Every morning Aya goes for a $9$-kilometer-long walk and stops at a coffee shop afterwards. "
            "Find the number of minutes the walk takes her, including the $t$ minutes spent in the coffee shop.",
            "solution": "... so the walk takes $204$ minutes.",
            "answer": "204",
            "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_1",
            "year": "2024",
        },
        {
            "id": 61,
            "problem": "There exist real numbers $x$ and $y$, both greater than 1, such that "
            "$\\log_x\\left(y^x\\right)=\\log_y\\left(x^{4y}\\right)=10$. Find $xy$.",
            "solution": "... hence $xy = 25$.",
            "answer": "025",
            "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_2",
            "year": "2024",
        },
    ],
    # yentinglin/aime_2025 (split train): id, problem, answer, solution, url, year
    "aime25": [
        {
            "id": "I-1",
            "problem": "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b$.",
            "answer": "70",
            "solution": "$b + 7 \\mid 56$, so $b \\in \\{21, 49\\}$ and the sum is $70$.",
            "url": "https://artofproblemsolving.com/wiki/index.php/2025_AIME_I_Problems/Problem_1",
            "year": 2025,
        },
    ],
    # openai/gsm8k (config main): question, answer = reasoning, then "#### <number>"
    "gsm8k": [
        {
            "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
            "May. How many clips did Natalia sell altogether in April and May?",
            "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
            "altogether in April and May.\n#### 72",
        },
        {
            "question": "A company earns $617 per day for 2 years of 365 days. How much does it earn?",
            "answer": "It earns 617 * 730 = <<617*730=450410>>450,410 dollars.\n#### 450,410",
        },
        {
            "question": "The temperature was 3 degrees and fell by 8 degrees. What is the temperature now?",
            "answer": "3 - 8 = <<3-8=-5>>-5\n#### -5",
        },
    ],
}

# gold answers each record must carry, in row order (worked out by hand from SOURCES)
EXPECTED_ANSWERS = {
    "deepscaler": ["70", "0", "5\\sqrt{2}"],
    "math500": ["\\left( 3, \\frac{\\pi}{2} \\right)", "26000"],
    "amc23": ["27", "36"],
    "aime24": ["204", "025"],
    "aime25": ["70"],
    "gsm8k": ["72", "450410", "-5"],
}
QUESTION_COLUMN = {"deepscaler": "problem", "math500": "problem", "amc23": "question", "aime24": "problem",
                   "aime25": "problem", "gsm8k": "question"}  # fmt: skip
EXPECTED_IDS = {
    "deepscaler": ["deepscaler/0", "deepscaler/1", "deepscaler/2"],
    "math500": ["test/precalculus/807.json", "test/algebra/2027.json"],
    "amc23": ["0", "1"],
    "aime24": ["60", "61"],
    "aime25": ["I-1"],
    "gsm8k": ["gsm8k/0", "gsm8k/1", "gsm8k/2"],
}


def write_rows(rows: list[dict], path: Path) -> Path:
    """Write ``rows`` as a parquet, JSON-lines or JSON-array file, depending on the suffix."""
    if path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


def user_prompt(question: str) -> list[dict[str, str]]:
    return [
        {
            "role": "user",
            "content": question + " Please reason step by step, and put your final answer within \\boxed{}.",
        }
    ]


def test_instruction_is_the_papers():
    assert INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."
    assert set(PREPARERS) == {"deepscaler", "math500", "amc23", "aime24", "aime25", "gsm8k"}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_preparer_maps_source_columns(name, tmp_path):
    rows = SOURCES[name]
    ds = prepare_dataset(name, str(write_rows(rows, tmp_path / f"{name}.jsonl")))
    validate_records(ds)
    assert len(ds) == len(rows)
    assert ds["prompt"] == [user_prompt(r[QUESTION_COLUMN[name]]) for r in rows]
    assert ds["problem"] == [r[QUESTION_COLUMN[name]] for r in rows]
    assert ds["answer"] == EXPECTED_ANSWERS[name]
    assert ds["source"] == [name] * len(rows)
    assert ds["id"] == EXPECTED_IDS[name]
    assert ds.features["answer"].dtype == "string"


def test_math500_keeps_subject_and_level(tmp_path):
    ds = prepare_dataset("math500", str(write_rows(SOURCES["math500"], tmp_path / "m.parquet")))
    assert ds["subject"] == ["Precalculus", "Algebra"]
    assert ds["level"] == [2, 1]


@pytest.mark.parametrize(
    "name, rows, question, answers",
    [
        # Maxwell-Jia/AIME_2024: capitalised columns, int answers
        ("aime24", [{"ID": "2024-I-1", "Problem": "Find $t$.", "Solution": "...", "Answer": 204}], "Find $t$.", ["204"]),
        # opencompass/AIME2025: question, answer (no id)
        ("aime25", [{"question": "Find $b$.", "answer": "70"}], "Find $b$.", ["70"]),
        # AI-MO/aimo-validation-amc style: problem, float answer (27.0 must become "27", 0.5 stays "0.5")
        ("amc23", [{"id": 3, "problem": "How far?", "answer": 27.0, "url": "u"},
                   {"id": 4, "problem": "How much?", "answer": 0.5, "url": "u"}], "How far?", ["27", "0.5"]),
    ],
)  # fmt: skip
def test_preparer_accepts_known_alternative_columns(name, rows, question, answers, tmp_path):
    ds = prepare_dataset(name, str(write_rows(rows, tmp_path / "alt.parquet")))
    assert ds["prompt"][0] == user_prompt(question)
    assert ds["answer"] == answers


@pytest.mark.parametrize(
    "solution, gold",
    [
        ("18 - 16 = 2\n#### 2", "2"),  # plain
        ("... = 1,234\n#### 1,234", "1234"),  # thousands separator removed
        ("#### 1,000,000", "1000000"),  # several separators
        ("3 - 8 = -5\n#### -5", "-5"),  # negative
        ("#### -1,250", "-1250"),  # negative with separator
        ("#### 3.75", "3.75"),  # decimal untouched
        ("#### 12 ", "12"),  # surrounding space stripped
        ("48 + 24 = 72\n####72", "72"),  # no space after the marker
        ("#### 2\nCorrection: it is 3.\n#### 3", "3"),  # two markers: the last one holds the answer
    ],
)
def test_gsm8k_final_answer(solution, gold):
    assert gsm8k_final_answer(solution) == gold


def test_gsm8k_without_final_answer_names_the_row(tmp_path):
    rows = SOURCES["gsm8k"][:1] + [{"question": "How many?", "answer": "There are 3 of them."}]
    with pytest.raises(ValueError, match=r"row 1: .*no '#### <final answer>' line: 'There are 3 of them.'"):
        prepare_dataset("gsm8k", str(write_rows(rows, tmp_path / "g.jsonl")))


@pytest.mark.parametrize(
    "value, text",
    [(204, "204"), (27.0, "27"), (0.5, "0.5"), (" \\frac{1}{2} ", "\\frac{1}{2}")],
)
def test_normalize_answer(value, text):
    assert normalize_answer(value) == text


@pytest.mark.parametrize("value", [None, True, [1, 2]])
def test_normalize_answer_rejects_non_answers(value):
    with pytest.raises(ValueError, match=repr(value).replace("[", r"\[")):
        normalize_answer(value)


def test_wrong_file_lists_columns_found_and_expected(tmp_path):
    path = write_rows([{"text": "hello", "label": 1}], tmp_path / "wrong.jsonl")
    with pytest.raises(ValueError) as err:
        prepare_dataset("math500", str(path))
    message = str(err.value)
    assert "wrong.jsonl" in message
    assert "found columns ['text', 'label']" in message
    assert "['problem']" in message and "['answer', 'Answer']" in message


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".json"])
def test_all_file_formats_load(suffix, tmp_path):
    ds = prepare_dataset("aime24", str(write_rows(SOURCES["aime24"], tmp_path / f"aime{suffix}")))
    assert ds["answer"] == ["204", "025"]


def test_bad_paths_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        prepare_dataset("gsm8k", str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"data.csv.*\.jsonl"):
        prepare_dataset("gsm8k", str(tmp_path / "data.csv"))
    with pytest.raises(ValueError, match="unknown dataset 'math5000'"):
        prepare_dataset("math5000")
    with pytest.raises(ValueError, match="split='test' only applies to hub datasets"):
        prepare_dataset("gsm8k", str(write_rows(SOURCES["gsm8k"], tmp_path / "g.jsonl")), split="test")


def test_limit(tmp_path):
    path = str(write_rows(SOURCES["gsm8k"], tmp_path / "g.parquet"))
    assert prepare_dataset("gsm8k", path, limit=2)["answer"] == ["72", "450410"]
    assert len(prepare_dataset("gsm8k", path, limit=10)) == 3  # a limit above the size keeps everything
    with pytest.raises(ValueError, match="limit=0"):
        prepare_dataset("gsm8k", path, limit=0)


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace ``datasets.load_dataset`` for hub ids: record the call, serve SOURCES; local builders pass through."""
    calls = []
    real = datasets.load_dataset

    def load_dataset(path, name=None, *, split=None, **kwargs):
        if path in ("json", "parquet"):
            return real(path, name, split=split, **kwargs)
        calls.append((path, name, split))
        source = next(n for n, p in PREPARERS.items() if p.hub_id == path)
        return datasets.Dataset.from_list(SOURCES[source])

    monkeypatch.setattr(benchmarks.datasets, "load_dataset", load_dataset)
    return calls


def test_hub_ids_configs_and_splits(fake_hub):
    assert prepare_dataset("gsm8k")["answer"] == EXPECTED_ANSWERS["gsm8k"]
    prepare_dataset("gsm8k", split="train")
    prepare_dataset("math500")
    assert fake_hub == [
        ("openai/gsm8k", "main", "test"),
        ("openai/gsm8k", "main", "train"),
        ("HuggingFaceH4/MATH-500", None, "test"),
    ]


def test_resolve_dataset_spec_forms(fake_hub, tmp_path):
    # 1. a preparer name: the hub source
    assert resolve_dataset("amc23")["answer"] == ["27", "36"]
    assert fake_hub == [("math-ai/amc23", None, "test")]
    # 2. NAME=FILE: that preparer on a local source file
    source = write_rows(SOURCES["aime25"], tmp_path / "aime25_raw.jsonl")
    assert resolve_dataset(f"aime25={source}")["id"] == ["I-1"]
    # 3. an already-prepared file, parquet or jsonl, validated and limited
    prepared = prepare_dataset("gsm8k", str(write_rows(SOURCES["gsm8k"], tmp_path / "g.jsonl")))
    prepared.to_parquet(str(tmp_path / "prepared.parquet"))
    prepared.to_json(str(tmp_path / "prepared.jsonl"), lines=True)
    for path in (tmp_path / "prepared.parquet", tmp_path / "prepared.jsonl"):
        ds = resolve_dataset(str(path), limit=2)
        assert ds["answer"] == ["72", "450410"]
        assert ds["prompt"][0] == user_prompt(SOURCES["gsm8k"][0]["question"])
    assert len(fake_hub) == 1  # nothing but the first spec went to the hub


def test_resolve_dataset_limits_and_checks_every_form(fake_hub, tmp_path, caplog):
    assert resolve_dataset("gsm8k", limit=2)["answer"] == ["72", "450410"]  # a name: the hub source, limited
    folder = tmp_path / "a=b"  # an "=" in the file's path belongs to the path
    folder.mkdir()
    rows = SOURCES["deepscaler"][:2] + [{"problem": "Broken.", "answer": "\\frac{", "solution": ""}]
    source = write_rows(rows, folder / "d.jsonl")
    assert resolve_dataset(f"deepscaler={source}", limit=1)["answer"] == ["70"]
    with caplog.at_level(logging.WARNING, logger="pacsrl.data"):
        assert len(resolve_dataset(f"deepscaler={source}")) == 3
    assert "row 2: '\\\\frac{'" in caplog.text  # the gold check is on by default
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pacsrl.data"):
        prepared = resolve_dataset(f"deepscaler={source}", check=False)
    assert caplog.text == ""
    prepared.to_parquet(str(folder / "prepared.parquet"))
    assert resolve_dataset(str(folder / "prepared.parquet"))["answer"] == ["70", "0", "\\frac{"]
    with pytest.raises(ValueError, match="limit=0"):
        resolve_dataset(str(tmp_path / "prepared.parquet"), limit=0)


def test_resolve_dataset_rejects_bad_specs(tmp_path):
    raw = write_rows(SOURCES["math500"], tmp_path / "raw_math500.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt', 'source'\].*found \['problem'"):
        resolve_dataset(str(raw))  # a raw source file is not a prepared dataset
    with pytest.raises(ValueError, match="unknown dataset 'math'"):
        resolve_dataset(f"math={raw}")
    with pytest.raises(ValueError, match="'mathh' is neither a dataset name"):
        resolve_dataset("mathh")


def test_validate_records_checks_types():
    good = {"prompt": [user_prompt("q")], "answer": ["1"], "source": ["x"]}
    validate_records(datasets.Dataset.from_dict(good))
    with pytest.raises(ValueError, match="'answer' must hold strings"):
        validate_records(datasets.Dataset.from_dict({**good, "answer": [1]}))
    with pytest.raises(ValueError, match="'prompt' must be a conversation"):
        validate_records(datasets.Dataset.from_dict({**good, "prompt": ["q"]}))


def test_unparseable_gold_is_reported(tmp_path, caplog):
    rows = [
        {"problem": "Fine.", "answer": "\\frac{1}{2}", "solution": ""},
        {"problem": "Broken latex.", "answer": "\\frac{", "solution": ""},
        {"problem": "Fine too.", "answer": "204", "solution": ""},
        {"problem": "No gold.", "answer": "", "solution": ""},
    ]
    with caplog.at_level(logging.WARNING, logger="pacsrl.data"):
        ds = prepare_dataset("deepscaler", str(write_rows(rows, tmp_path / "d.jsonl")))
    assert check_gold(ds) == [(1, "\\frac{"), (3, "")]
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage().startswith("deepscaler: 2 of 4 gold answers")
    assert "row 1: '\\\\frac{'" in warning.getMessage() and "row 3: ''" in warning.getMessage()


def test_gold_check_skips_reasoning_gym_rows(caplog):
    # gym rows are judged by their task's scorer, so "apple" is a fine gold there; row numbers stay global
    rows = {"prompt": [user_prompt("q")] * 3, "answer": ["apple", "\\frac{", "3"],
            "source": ["gym:word_sorting", "math500", "math500"]}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pacsrl.data"):
        assert report_unparseable_gold(datasets.Dataset.from_dict(rows), "mixed") == [(1, "\\frac{")]
    assert "1 of 2 gold answers" in caplog.text


def test_cli_prepare_in_process(tmp_path, capsys):
    source = write_rows(SOURCES["math500"], tmp_path / "math500.jsonl")
    out = tmp_path / "out" / "math500.parquet"
    assert (
        pacsrl.cli.main(["prepare", "math500", "--path", str(source), "--limit", "1", "--output", str(out)])
        == 0
    )
    summary = capsys.readouterr().out
    assert f"wrote 1 rows to {out}" in summary
    assert "sources: math500 (1)" in summary and "unparseable gold answers: 0" in summary
    ds = resolve_dataset(str(out))
    assert ds["answer"] == [EXPECTED_ANSWERS["math500"][0]]


def test_cli_reports_unparseable_gold_and_strict(tmp_path, capsys):
    rows = SOURCES["aime25"] + [{"id": "I-2", "problem": "Broken.", "answer": "\\frac{", "solution": "", "url": "",
                                 "year": 2025}]  # fmt: skip
    source = write_rows(rows, tmp_path / "a.parquet")
    args = ["prepare", "aime25", "--path", str(source), "--output", str(tmp_path / "a.jsonl")]
    assert pacsrl.cli.main(args) == 0
    assert "unparseable gold answers: 1 (row 1: '\\\\frac{')" in capsys.readouterr().out
    assert pacsrl.cli.main(args + ["--strict"]) == 1


def test_cli_strict_passes_clean_gold_and_says_why_it_fails(tmp_path, capsys):
    source = write_rows(SOURCES["aime24"], tmp_path / "a.jsonl")
    args = ["prepare", "aime24", "--path", str(source), "--strict", "--output", str(tmp_path / "a.parquet")]
    assert pacsrl.cli.main(args) == 0
    assert "error" not in capsys.readouterr().err  # (stderr holds progress bars)
    broken = write_rows([{"id": 1, "problem": "Broken.", "answer": "\\frac{"}], tmp_path / "b.jsonl")
    assert (
        pacsrl.cli.main(
            ["prepare", "aime24", "--path", str(broken), "--strict", "-o", str(tmp_path / "b.parquet")]
        )
        == 1
    )
    out, err = capsys.readouterr()
    assert "--strict" in err and "--strict" not in out


def test_cli_offline_hint_only_for_hub_connection_errors(fake_hub, tmp_path, capsys):
    assert pacsrl.cli.main(["prepare", "gsm8k", "--limit", "0", "--output", str(tmp_path / "g.parquet")]) == 1
    assert capsys.readouterr().err == "pacsrl prepare: error: limit=0: expected a positive integer or None\n"


def test_cli_warns_once_about_unparseable_gold(tmp_path, caplog):
    source = write_rows([{"problem": "Broken.", "answer": "\\frac{", "solution": ""}], tmp_path / "d.jsonl")
    args = ["prepare", "deepscaler", "--path", str(source), "--output", str(tmp_path / "o.parquet")]
    with caplog.at_level(logging.WARNING, logger="pacsrl.data"):
        assert pacsrl.cli.main(args) == 0
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]  # one warning, not one per check
    assert "row 0: '\\\\frac{'" in warning.getMessage()
    assert warning.getMessage().startswith("deepscaler: 1 of 1 gold answers")  # labelled with the dataset


def test_an_empty_source_is_an_error_not_an_empty_dataset(fake_hub, monkeypatch, tmp_path, capsys):
    # empty files of every format: no traceback from datasets' reader, no empty prepared file
    datasets.Dataset.from_dict({"problem": [], "answer": [], "solution": []}).to_parquet(
        tmp_path / "e.parquet"
    )
    (tmp_path / "e.jsonl").write_text("")
    (tmp_path / "e.json").write_text("[]")
    out = tmp_path / "o.jsonl"
    for name in ("e.parquet", "e.jsonl", "e.json"):
        with pytest.raises(ValueError, match="has no rows"):
            load_data_file(tmp_path / name)
        assert pacsrl.cli.main(["prepare", "math500", "--path", str(tmp_path / name), "-o", str(out)]) == 1
        err = capsys.readouterr().err  # after datasets' progress bars
        assert (
            err.splitlines()[-1] == f"pacsrl prepare: error: data file {str(tmp_path / name)!r} has no rows"
        )
        assert not out.exists()
    # any other error of datasets' reader keeps its own words
    (tmp_path / "bad.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n{"problem": [}\n')
    with pytest.raises(ValueError, match="position") as err:
        load_data_file(tmp_path / "bad.jsonl")
    assert "no rows" not in str(err.value)
    # a hub split with no rows
    monkeypatch.setitem(SOURCES, "gsm8k", [])
    assert pacsrl.cli.main(["prepare", "gsm8k", "--split", "train", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.endswith(
        "pacsrl prepare: error: 'openai/gsm8k' split 'train' has no rows: pick another split\n"
    )
    assert not out.exists()


def test_cli_passes_the_split_to_the_hub(fake_hub, tmp_path, capsys):
    args = ["prepare", "gsm8k", "--split", "train", "--output", str(tmp_path / "g.parquet")]
    assert pacsrl.cli.main(args) == 0
    assert fake_hub == [("openai/gsm8k", "main", "train")]


def test_cli_writes_readable_json_lines_into_new_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"question": "Zoë has 3 apples and eats 1. How many are left?", "answer": "3 - 1 = 2\n#### 2"},
            {"question": "Café au lait costs 4 euros. What do 2 cost?", "answer": "2 * 4 = 8\n#### 8"}]  # fmt: skip
    source = write_rows(rows, tmp_path / "g.parquet")
    out = tmp_path / "new" / "deeper" / "g.jsonl"
    assert pacsrl.cli.main(["prepare", "gsm8k", "--path", str(source), "--output", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    # one JSON object per line, non-ASCII letters kept as they are (not \\u escapes)
    records = [json.loads(line) for line in text.splitlines()]
    assert [(r["problem"], r["answer"], r["source"]) for r in records] == [
        (rows[0]["question"], "2", "gsm8k"),
        (rows[1]["question"], "8", "gsm8k"),
    ]
    assert "Zoë" in text and "Café" in text
    # the summary names the columns written, in order
    lines = capsys.readouterr().out.splitlines()
    assert f"wrote 2 rows to {out}" in lines
    assert "  columns: " + ", ".join(records[0]) in lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.parquet", "new"]  # nothing written elsewhere


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["math5000", "--output", "o.parquet"], 2, "unknown dataset 'math5000'"),
        (["gsm8k", "--output", "o.csv"], 2, "--output 'o.csv'"),
        (["gsm8k", "--size", "10", "--output", "o.parquet"], 2, "--size applies to gym:TASK"),
        (["gym:basic_arithmetic", "--output", "o.parquet"], 2, "needs --size N"),
        (["gsm8k", "--path", "nowhere.jsonl", "--output", "o.parquet"], 1, "'nowhere.jsonl' does not exist"),
        (["gsm8k"], 2, "required: --output"),
        (["gym:chain_sum", "--size", "0", "--output", "o.parquet"], 2, "must be positive, got 0 and None"),
        (["gym:chain_sum", "--size", "2", "--eval-size", "0", "--output", "o.parquet"], 2, "got 2 and 0"),
        (["gym:chain_sum", "--size", "2", "--eval-output", "e.parquet", "--output", "o.parquet"], 2,
         "--eval-output needs --eval-size"),
        (["gym:chain_sum", "--size", "2", "--config", "[1]", "--output", "o.parquet"], 2,
         "--config must be a JSON object"),
    ],
)  # fmt: skip
def test_cli_errors(args, status, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert pacsrl.cli.main(["prepare", *args]) == status
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def test_cli_hub_unreachable_offline(tmp_path, capsys):
    # HF_HUB_OFFLINE=1 (conftest): the hub load fails fast, and the error says how to work offline
    assert pacsrl.cli.main(["prepare", "aime24", "--output", str(tmp_path / "o.parquet")]) == 1
    err = capsys.readouterr().err
    assert "HuggingFaceH4/aime_2024" in err and "--path FILE" in err


def test_cli_wrong_file_lists_columns(tmp_path, capsys):
    path = write_rows([{"prompt": "x", "completion": "y"}], tmp_path / "w.jsonl")
    assert (
        pacsrl.cli.main(["prepare", "gsm8k", "--path", str(path), "--output", str(tmp_path / "o.parquet")])
        == 1
    )
    assert "found columns ['prompt', 'completion']" in capsys.readouterr().err


def _gym_missing() -> str | None:
    if importlib.util.find_spec("pacsrl.data.gym") is None:
        return "pacsrl.data.gym is not written yet"
    from pacsrl.data import gym

    if not all(hasattr(gym, f) for f in ("make_gym_dataset", "make_gym_splits")):
        return "pacsrl.data.gym lacks make_gym_dataset / make_gym_splits"
    return None


@pytest.mark.skipif(_gym_missing() is not None, reason=str(_gym_missing()))
def test_cli_prepare_gym(tmp_path, capsys):
    out = tmp_path / "arith.parquet"
    args = [
        "prepare",
        "gym:basic_arithmetic",
        "--size",
        "6",
        "--seed",
        "1",
        "--eval-size",
        "3",
        "--output",
        str(out),
    ]
    assert pacsrl.cli.main(args) == 0
    train, held_out = resolve_dataset(str(out)), resolve_dataset(str(tmp_path / "arith_eval.parquet"))
    assert (len(train), len(held_out)) == (6, 3)  # both validated as records by resolve_dataset
    summary = capsys.readouterr().out
    assert "wrote 6 rows" in summary and "wrote 3 rows" in summary
    assert "scored by the reasoning-gym task's own checker" in summary


def _gym_questions(task: str, seed: int, n: int, **config) -> list[str]:
    """The first ``n`` questions of a task's generator, straight from reasoning-gym (no pacsrl code)."""
    import reasoning_gym

    generator = reasoning_gym.create_dataset(task, size=n, seed=seed, **config)
    questions = [generator[i]["question"] for i in range(n)]
    assert len({q.casefold() for q in questions}) == n  # no repeats, so pacsrl's deduplication keeps them all
    return questions


@pytest.mark.skipif(_gym_missing() is not None, reason=str(_gym_missing()))
def test_cli_prepare_gym_seed_size_config_and_eval_output(tmp_path, capsys):
    small = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    # no --seed: seed 0, as train's gym_seed; --size 1 is allowed; no --eval-size: one file
    one = tmp_path / "one.parquet"
    assert pacsrl.cli.main(["prepare", "gym:chain_sum", "--size", "1", "--output", str(one)]) == 0
    assert resolve_dataset(str(one))["question"] == _gym_questions("chain_sum", 0, 1)
    # --seed and --config reach the generator, and the options travel with each row
    three = tmp_path / "three.parquet"
    args = ["--seed", "5", "--config", json.dumps(small), "--output", str(three)]
    assert pacsrl.cli.main(["prepare", "gym:chain_sum", "--size", "3", *args]) == 0
    ds = resolve_dataset(str(three))
    assert ds["question"] == _gym_questions("chain_sum", 5, 3, **small)
    assert [json.loads(c) for c in ds["gym_config"]] == [small] * 3
    # with --eval-size 1 and --eval-output: held-out = the stream's first problem, train the next two,
    # written where asked (and not to the default OUTPUT_eval file)
    train, held = tmp_path / "train.parquet", tmp_path / "held" / "out.jsonl"
    args = ["--size", "2", "--eval-size", "1", "--eval-output", str(held), *args[:4], "--output", str(train)]
    assert pacsrl.cli.main(["prepare", "gym:chain_sum", *args]) == 0
    stream = _gym_questions("chain_sum", 5, 3, **small)
    assert resolve_dataset(str(held))["question"] == stream[:1]
    assert resolve_dataset(str(train))["question"] == stream[1:]
    assert not (tmp_path / "train_eval.parquet").exists()
    summary = capsys.readouterr().out
    assert f"wrote 2 rows to {train}" in summary and f"wrote 1 rows to {held}" in summary


@pytest.mark.slow
def test_cli_subprocess_smoke(tmp_path):
    source = write_rows(SOURCES["gsm8k"], tmp_path / "gsm8k.jsonl")
    out = tmp_path / "gsm8k.parquet"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pacsrl", "prepare", "gsm8k", "--path", str(source), "--output", str(out)]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 3 rows" in done.stdout and "sources: gsm8k (3)" in done.stdout
    assert datasets.Dataset.from_parquet(str(out))["answer"] == ["72", "450410", "-5"]


def test_gym_config_may_not_set_size_or_seed_and_size_reaches_the_generator():
    from pacsrl.data.gym import _create

    for key in ("size", "seed"):
        with pytest.raises(ValueError, match="sets 'size' or 'seed'"):
            _create("chain_sum", 2, 0, {key: 3})
    assert len(_create("chain_sum", 3, 0, {})) == 3  # reasoning-gym's own default size is 500


def test_gym_record_metadata_and_config_are_sorted_json():
    from pacsrl.data.gym import _record

    plain = _record("chain_sum", {"question": "1 + 2 =", "answer": 3}, {"max_terms": 3, "min_terms": 2})
    assert plain["metadata"] == "{}"  # no metadata: an empty object, not null
    assert plain["gym_config"] == '{"max_terms": 3, "min_terms": 2}'
    assert plain["answer"] == "3"
    with_meta = _record("chain_sum", {"question": "q", "answer": "3", "metadata": {"z": 1, "a": [2]}},
                        {"min_terms": 2, "max_terms": 3})  # fmt: skip
    assert with_meta["metadata"] == '{"a": [2], "z": 1}'
    assert with_meta["gym_config"] == '{"max_terms": 3, "min_terms": 2}'


def test_gold_report_without_source_column_and_its_list_cut_at_ten(caplog):
    # no source column: every row is checked; 11 bad rows: ten quoted, ", "-separated, then "(and 1 more)"
    golds = ["1"] + [f"\\frac{{{i}" for i in range(11)]
    with caplog.at_level(logging.WARNING, logger="pacsrl.data"):
        bad = report_unparseable_gold(datasets.Dataset.from_dict({"answer": golds}), "eleven")
    assert bad == [(i + 1, f"\\frac{{{i}") for i in range(11)]
    listed = ", ".join(f"row {i + 1}: {golds[i + 1]!r}" for i in range(10))
    assert caplog.records[-1].getMessage() == (
        "eleven: 11 of 12 gold answers cannot be parsed by math-verify and can never be rewarded: "
        f"{listed} (and 1 more)"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pacsrl.data"):
        report_unparseable_gold(datasets.Dataset.from_dict({"answer": golds[:11]}), "ten")
    assert caplog.records[-1].getMessage().endswith(f"{listed}")  # exactly ten: nothing appended


def test_validate_records_accepts_large_string_columns():
    good = {"prompt": [user_prompt("q")], "answer": ["1"], "source": ["x"]}
    for column in ("answer", "source"):
        ds = datasets.Dataset.from_dict(good).cast_column(column, datasets.Value("large_string"))
        assert ds.features[column].dtype == "large_string"
        validate_records(ds)


def test_cli_summary_lists_five_bad_golds_then_counts_the_rest(tmp_path, capsys):
    from pacsrl.data.cli import _summarize, build_parser

    assert build_parser().format_usage().startswith("usage: pacsrl prepare ")
    ds = datasets.Dataset.from_dict({"answer": ["x"] * 7})  # no source column
    bad = [(i, f"g{i}") for i in range(7)]
    _summarize(ds, tmp_path / "o.jsonl", bad[:6])
    _summarize(ds, tmp_path / "o.jsonl", bad[:5])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "  sources: -"
    five = "row 0: 'g0', row 1: 'g1', row 2: 'g2', row 3: 'g3', row 4: 'g4'"
    assert lines[3] == f"  unparseable gold answers: 6 ({five}, ... 1 more)"
    assert lines[7] == f"  unparseable gold answers: 5 ({five})"


def test_is_local_and_hub_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls = []
    one_row = datasets.Dataset.from_list([{"question": "1+1?", "answer": "2"}])
    monkeypatch.setattr(
        benchmarks.datasets, "load_dataset", lambda *a, **k: calls.append((*a, k["split"])) or one_row
    )
    assert benchmarks._is_local("owner/data.parquet")  # a data suffix makes it a (missing) file, not a hub id
    assert benchmarks._is_local("owner/DATA.JSONL")
    assert benchmarks._is_local("no-slash")  # not shaped like owner/name
    assert not benchmarks._is_local("owner/name")
    # another hub id gets no hub config (gsm8k's is "main"); the preparer's own id gets it
    benchmarks.load_source(PREPARERS["gsm8k"], "someone/gsm8k-copy")
    benchmarks.load_source(PREPARERS["gsm8k"], "openai/gsm8k")
    assert calls == [("someone/gsm8k-copy", None, "test"), ("openai/gsm8k", "main", "test")]


def test_limit_must_be_an_integer():
    with pytest.raises(ValueError, match="limit=2.5: expected a positive integer"):
        benchmarks._check_limit(2.5)


def test_wrong_hub_columns_name_the_hub_id(monkeypatch):
    monkeypatch.setattr(
        benchmarks.datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"x": [1]})
    )
    with pytest.raises(ValueError, match="^'openai/gsm8k' does not look like gsm8k"):
        prepare_dataset("gsm8k")


def test_resolve_dataset_checks_gold_by_name_labels_and_origins(monkeypatch, tmp_path, caplog):
    broken = datasets.Dataset.from_list([{"problem": "Broken.", "answer": "\\frac{", "solution": ""}])
    monkeypatch.setattr(benchmarks.datasets, "load_dataset", lambda *a, **k: broken)
    with caplog.at_level(logging.WARNING, logger="pacsrl.data"):
        resolve_dataset("deepscaler", check=False)
        assert not caplog.records
        resolve_dataset("deepscaler")  # checked by default
        assert caplog.records[-1].getMessage().startswith("deepscaler: 1 of 1 gold answers")
        monkeypatch.undo()  # local files load for real
        prepared = tmp_path / "p.jsonl"
        write_rows([{"prompt": user_prompt("q"), "answer": "\\frac{", "source": "x"}], prepared)
        resolve_dataset(str(prepared))
        assert caplog.records[-1].getMessage().startswith(f"{prepared}: 1 of 1 gold answers")
    # a missing file with a data suffix (any case) is reported as missing, not as a bad spec
    for name in ("missing.jsonl", "MISSING.JSONL"):
        with pytest.raises(FileNotFoundError, match=name):
            resolve_dataset(str(tmp_path / name))
    wrong = write_rows([{"text": "hello"}], tmp_path / "wrong.jsonl")
    with pytest.raises(ValueError, match=f"^'{wrong}' is not a prepared pacsrl dataset"):
        resolve_dataset(str(wrong))


def test_a_source_needs_a_question_and_an_answer_column_and_text_questions(tmp_path):
    no_answer = write_rows([{"problem": "What is 1+1?"}], tmp_path / "q.jsonl")
    with pytest.raises(ValueError, match="does not look like math500"):
        prepare_dataset("math500", str(no_answer))
    numeric = write_rows([{"problem": 5, "answer": "5"}], tmp_path / "n.jsonl")
    with pytest.raises(ValueError, match="row 0: empty or non-text question 5"):
        prepare_dataset("math500", str(numeric))


def test_gym_dataset_doubles_its_draws_up_to_sixteen_times_the_size(monkeypatch):
    from pacsrl.data import gym

    budgets = []

    def three_questions(task, size, seed, config):  # a generator with only 3 distinct problems
        budgets.append(size)
        return [{"question": f"q{i % 3}", "answer": "1"} for i in range(size)]

    monkeypatch.setattr(gym, "_create", three_questions)
    with pytest.raises(
        ValueError, match="produced only 3 distinct problems .* in 64 draws, fewer than the 4"
    ):
        gym.make_gym_dataset("fake", 4, 0)
    assert budgets == [4, 8, 16, 32, 64]
