"""Markdown summary of the ``mutmut run`` in the current folder (read from ``mutants/``).

Run by bench/mutation.sh in a group's copy of the tree. Counts per module, then every surviving mutant
with its diff and, when the reasons file lists it (``mutant name<TAB>reason[<TAB>the line it changes]``), why
it is fine: harmless, or killed by a test added since. Survivors without a reason are flagged (each needs a
test that kills it), and so are reasons whose recorded line is not their mutant's (renumbered since).

    python bench/mutation_summary.py --group G [--seconds S] [--before DIR] [--reasons FILE] [--commit C] [--note N]
    python bench/mutation_summary.py --recheck [--reasons FILE]

``--recheck`` prints instead the names of the mutants a re-run should test again although their function is
unchanged (mutmut keeps every verdict until the function's source changes): the survivors without a reason or
whose reason says a later test kills them, the timeouts (a busy machine can stretch a survivor past the
limit), and the mutants no test ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from collections import Counter
from pathlib import Path

from mutmut.configuration import config
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

COLUMNS = ("killed", "survived", "timeout", "no tests", "not checked")


def _reasons(path: Path) -> dict[str, tuple[str, str | None]]:
    """{mutant name: (reason, the line the mutant wrote when the reason was given, or None)}."""
    if not path.exists():
        return {}
    reasons = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, rest = line.partition("\t")
            reason, _, changed = rest.partition("\t")
            reasons[name.strip()] = (reason.strip(), changed.strip() or None)
    return reasons


def changed_line(diff: str) -> str:
    """The first line a mutant's diff adds that it does not also remove, stripped (a statement over several
    lines is shown whole): what a reason line records to stay on its mutant."""
    lines = diff.splitlines()
    removed = {line[1:].strip() for line in lines if line[:1] == "-" and line[:3] != "---"}
    added = [line[1:].strip() for line in lines if line[:1] == "+" and line[:3] != "+++"]
    return next((line for line in added if line not in removed), added[0] if added else "")


def _metas(folder: Path = Path("mutants")) -> dict[str, dict]:
    """{source file: mutmut's .meta record for it} under ``folder`` (mutants/, or a copy of its .meta files)."""
    metas = {}
    for path in walk_mutatable_files():
        meta = folder / f"{path}.meta"
        if meta.exists():
            metas[str(path)] = json.loads(meta.read_text())
    return metas


def _statuses(metas: dict[str, dict]) -> dict[str, dict[str, str]]:
    """{source file: {mutant name: status}}."""
    return {
        path: {name: status_by_exit_code[code] for name, code in meta["exit_code_by_key"].items()}
        for path, meta in metas.items()
    }


def _tested(metas: dict[str, dict], before: Path) -> tuple[int, int]:
    """(mutants tested in this run, mutants in all): a mutant counts as tested when mutmut recorded a new
    duration for it since ``before`` (a copy of mutants/'s .meta files taken before the run)."""
    then = {path: meta["durations_by_key"] for path, meta in _metas(before).items()}
    tested = total = 0
    for path, now in metas.items():
        total += len(now["exit_code_by_key"])
        tested += sum(
            1
            for name, code in now["exit_code_by_key"].items()
            if code is not None and now["durations_by_key"].get(name) != then.get(path, {}).get(name)
        )
    return tested, total


def to_recheck(statuses: dict[str, dict[str, str]], reasons: dict[str, tuple[str, str | None]]) -> list[str]:
    """The survivors that have no reason or are said to be killed by a later test, the timeouts, and the
    mutants no test ran (a test added since may run them)."""
    return [
        name
        for by_name in statuses.values()
        for name, status in by_name.items()
        if status in ("timeout", "no tests")
        or (status == "survived" and "killed by" in reasons.get(name, ("killed by", None))[0])
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recheck", action="store_true", help="print the mutants to test again, one per line"
    )
    parser.add_argument("--group", help="the group's name, for the header")
    parser.add_argument("--seconds", type=int, help="wall time of the run, for the header")
    parser.add_argument("--reasons", type=Path, default=Path("bench/mutation_survivors.tsv"))
    parser.add_argument("--commit", default="unknown", help="the commit the group's copy was taken from")
    parser.add_argument("--before", type=Path, help="mutants/'s .meta files as they were before the run")
    parser.add_argument("--note", help="a remark for the header, e.g. why the run is partial")
    args = parser.parse_args()
    metas = _metas()
    statuses = _statuses(metas)
    if args.recheck:
        for name in to_recheck(statuses, _reasons(args.reasons)):
            print(name)
        return
    if args.group is None:
        parser.error("--group is required (or --recheck)")

    print(f"# Mutation testing: {args.group}\n")
    print(f"- command: `bash bench/mutation.sh {args.group}`")
    print(f"- source: {args.commit}")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"- machine: {os.cpu_count()} cores, {platform.machine()}, Python {sys.version.split()[0]}")
    if args.seconds is not None:
        print(f"- wall time: {args.seconds} s ({args.seconds / 60:.1f} min)")
    if args.before is not None:
        tested, total = _tested(metas, args.before)
        print(
            f"- tested in this run: {tested} of {total} mutants; the others' verdicts are kept from earlier runs"
            " (their functions are unchanged)"
        )
    selection = shlex.join(config().pytest_add_cli_args_test_selection + config().pytest_add_cli_args)
    print(f"- tests: `pytest {selection}`, those that run the changed function")
    if args.note:
        print(f"- note: {args.note}")
    print()
    print("| module | mutants | " + " | ".join(COLUMNS) + " | other |")
    print("|---|---:|" + "---:|" * (len(COLUMNS) + 1))
    total: Counter[str] = Counter()
    for path, by_name in statuses.items():
        if not by_name:
            continue
        counts = Counter(by_name.values())
        total.update(counts)
        other = sum(v for k, v in counts.items() if k not in COLUMNS)
        cells = [str(counts[c]) for c in COLUMNS]
        print(f"| {path.removeprefix('src/')} | {len(by_name)} | " + " | ".join(cells) + f" | {other} |")
    other = sum(v for k, v in total.items() if k not in COLUMNS)
    cells = [str(total[c]) for c in COLUMNS]
    print(f"| total | {sum(total.values())} | " + " | ".join(cells) + f" | {other} |")

    reasons = _reasons(args.reasons)
    survivors = [
        (path, name) for path, by_name in statuses.items() for name, s in by_name.items() if s == "survived"
    ]
    sections, unexplained = [], 0
    for path, name in survivors:
        diff = get_diff_for_mutant(name, path=path).strip()
        reason, recorded = reasons.get(name, (None, None))
        if reason is None:
            reason = "**no reason given: add a test that kills it, or explain it**"
            unexplained += 1
        elif recorded is not None and recorded != changed_line(diff):
            # mutmut numbers a function's mutants in order: a change to the function renumbers them
            reason = (
                f"**this reason was given for another change (`{recorded}`): the function changed and its"
                f" mutants were renumbered; give this one its own**"
            )
            unexplained += 1
        sections.append(f"### `{name}`\n\n{reason}\n\n```diff\n{diff}\n```\n")
    print(f"\n## Survivors: {len(survivors)}, {unexplained} without a reason\n")
    print("A survivor is a change no test noticed. Each one needs a test that kills it, or a line in")
    print(
        "`bench/mutation_survivors.tsv`: harmless (an equivalent mutant), or killed by a test added since.\n"
    )
    for section in sections:
        print(section)
    # the rest, by function: timeouts and the like one by one, "no tests" and "not checked" as counts
    by_function: dict[tuple[str, str], list[str]] = {}
    for by_name in statuses.values():
        for name, status in by_name.items():
            if status not in ("killed", "survived"):
                by_function.setdefault((status, name.split("__mutmut_")[0]), []).append(name)
    if by_function:
        print("## Neither killed nor survived\n")
        print("| status | function | mutants |")
        print("|---|---|---|")
        for (status, function), names in sorted(by_function.items()):
            listed = (
                ", ".join(n.rsplit("_", 1)[1] for n in names)
                if status not in ("no tests", "not checked")
                else ""
            )
            print(f"| {status} | `{function}` | {len(names)}{f' ({listed})' if listed else ''} |")


if __name__ == "__main__":
    main()
