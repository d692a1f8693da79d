"""``rollouts.jsonl``: one JSON line per evaluated problem, written so that a crash never loses or
duplicates a finished problem.

A line is ``{"id", "source", "prompt", "answer", "completions": [n texts], "scores": [n floats],
"num_correct", "columns": {other dataset columns}}``. Each line is written whole, then flushed and
fsynced; a crash can only leave a truncated *last* line. ``read_rollouts`` only reads: it skips such a
line with a warning and never changes the file, so reading (``--compare``, ``--recompute``) is safe on
any folder, even one that another process is still writing. ``repair_rollouts`` cuts the line off; only a
run that is about to append to the file calls it (the problem is then simply sampled again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROLLOUTS_FILE = "rollouts.jsonl"
REQUIRED_KEYS = ("id", "source", "prompt", "answer", "completions", "scores")

__all__ = [
    "ROLLOUTS_FILE",
    "append_rollout",
    "problem_ids",
    "read_rollouts",
    "repair_rollouts",
    "write_rollouts",
]


def problem_ids(sources: Sequence[str], prompts: Sequence[Any]) -> list[str]:
    """Stable ids: a hash of (source, prompt). The k-th repeat of an identical problem gets ``#k`` appended,
    so a dataset with duplicate rows still evaluates every row exactly once."""
    ids, seen = [], {}
    for source, prompt in zip(sources, prompts, strict=True):
        key = json.dumps([source, prompt], sort_keys=True, ensure_ascii=False)
        base = hashlib.sha256(key.encode()).hexdigest()[:16]
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return ids


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_rollouts(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Replace ``path`` atomically by ``records`` (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def append_rollout(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one problem's line whole, then flush and fsync so it survives a crash."""
    try:
        line = json.dumps(record, ensure_ascii=False) + "\n"
    except TypeError as err:
        raise TypeError(
            f"problem {record.get('id')!r} of {record.get('source')!r} has a value JSON cannot store "
            f"({err}); dataset columns must hold strings, numbers, lists or dicts"
        ) from err
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or any(key not in record for key in REQUIRED_KEYS):
        return None
    return record


def _read(path: Path) -> tuple[list[dict[str, Any]], bytes]:
    """The records of ``path`` and what follows its last newline: ``b""`` in a clean file, else the
    trace of a crash mid-write (a truncated line, or a complete one whose newline was not written)."""
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last item is what follows the last newline
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            if line and lineno < len(lines):
                raise ValueError(f"{path}:{lineno}: blank line inside the rollouts file")
            continue
        record = _parse(line)
        if record is None:
            if lineno == len(lines):  # no newline after it: a write cut short by a crash
                logger.warning(
                    "%s: ignoring a truncated last line (%d bytes) left by an interrupted (or still "
                    "running) evaluation; resuming that run samples its problem again",
                    path,
                    len(line),
                )
                continue
            raise ValueError(
                f"{path}:{lineno}: not a complete rollout record (need keys {list(REQUIRED_KEYS)}); only "
                "the last line can be cut short by a crash, so this file was edited or corrupted: fix or "
                "delete that line"
            )
        if record["id"] in seen:
            raise ValueError(
                f"{path}:{lineno}: problem id {record['id']!r} already on line {seen[record['id']]}; "
                "were two runs writing to the same folder? Delete one of the lines"
            )
        seen[record["id"]] = lineno
        if lineno == len(lines):  # complete JSON but no newline: the crash came before the "\n"
            logger.warning("%s: the last line lacks its newline (an interrupted write); keeping it", path)
        records.append(record)
    return records, lines[-1]


def read_rollouts(path: str | Path) -> list[dict[str, Any]]:
    """Read ``rollouts.jsonl``; a missing file reads as no records. Never writes.

    A last line that is cut short (the trace of a crash mid-write, or of a run still writing) is
    skipped with a warning. Any other unreadable line, or two lines with the same id, cannot come from
    a crash and raises ``ValueError`` naming the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    return _read(path)[0]


def repair_rollouts(path: str | Path) -> list[dict[str, Any]]:
    """Read ``rollouts.jsonl`` like ``read_rollouts``, then make it safe to append to: a truncated last
    line is cut off, and a complete last line that lacks its newline gets one; every finished line is
    kept byte for byte. Only the run that owns the folder, about to append, should call this.
    """
    path = Path(path)
    if not path.exists():
        return []
    records, tail = _read(path)
    if tail:
        kept = _parse(tail) is not None  # _read kept it as the last record
        with open(path, "r+b") as f:
            if kept:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                f.truncate(path.stat().st_size - len(tail))
            f.flush()
            os.fsync(f.fileno())
    return records
