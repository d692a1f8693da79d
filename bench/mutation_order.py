"""pytest plugin used by bench/mutation.sh: run a mutant's tests fastest first.

mutmut runs, for each mutant, the tests that execute the mutated function, in file order, and stops at the first
failure (``-x``). A mutant is usually caught by many of them, so starting with the quickest (by the durations
mutmut recorded on the unmutated code, ``mutmut-stats.json`` in the folder the tests run from) catches it sooner;
a survivor still runs every test. Tests without a recorded duration go last, in their usual order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

STATS = Path("mutmut-stats.json")


def pytest_collection_modifyitems(items: list) -> None:
    try:
        durations = json.loads(STATS.read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):  # the stats run itself, before mutmut has written them
        return
    items.sort(key=lambda item: durations.get(item.nodeid, math.inf))  # stable: ties keep file order
