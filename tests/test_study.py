"""The learning study (``bench/study.py``): its paired statistics against hand-worked values and brute-force
enumerations, its append-only runs file, and the whole study at smoke size."""

from __future__ import annotations

import itertools
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import significance
import study

# --------------------------------------------------------------------------------------------------
# Sign test


def _sign_p_brute_force(differences):
    """Enumerate every +/- pattern of the non-zero differences (each 1/2^n under the null) and count those whose
    number of pluses is at least as far from n/2 as the observed one."""
    nonzero = [d for d in differences if d != 0]
    n = len(nonzero)
    observed = abs(sum(d > 0 for d in nonzero) - n / 2)
    patterns = list(itertools.product((0, 1), repeat=n))
    return sum(abs(sum(p) - n / 2) >= observed for p in patterns) / len(patterns)


@pytest.mark.parametrize(
    ("differences", "expected"),
    [
        ([1] * 8, 2 / 256),  # 8 of 8 positive: P(X=8) + P(X=0) = 2/256 = 0.0078125
        ([1] * 7 + [-1], 18 / 256),  # 7 of 8: 2 (1 + 8) / 256 = 0.0703125
        ([1] * 6 + [-1] * 2, 74 / 256),  # 6 of 8: 2 (1 + 8 + 28) / 256 = 0.2890625
        ([1] * 4 + [-1] * 4, 1.0),  # balanced: every pattern is as extreme
        ([1, 1, 1, 0, 0], 2 / 8),  # zeros dropped: 3 of 3 positive, 2/8
        ([0, 0], 1.0),  # nothing left
    ],
)
def test_sign_test_hand_values(differences, expected):
    assert significance.sign_test_p(differences) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 12])
def test_sign_test_matches_brute_force(n):
    for positives in range(n + 1):
        differences = [0.5] * positives + [-0.25] * (n - positives)
        assert significance.sign_test_p(differences) == pytest.approx(
            _sign_p_brute_force(differences), abs=1e-12
        )


# --------------------------------------------------------------------------------------------------
# Wilcoxon signed-rank test


def test_wilcoxon_hand_values():
    # all 8 positive: only W+ = 36 and W+ = 0 are as extreme -> 2/256
    assert significance.wilcoxon_p([0.1 * i for i in range(1, 9)]) == pytest.approx(2 / 256)
    # ranks 1..7 positive, 8 negative: W+ = 28, W- = 8. Subsets of {1..8} with sum <= 8 (sum 0: {}; 1; 2; 3: {3},
    # {1,2}; 4: {4},{1,3}; 5: 3 sets; 6: 4; 7: 5; 8: 6) number 1+1+1+2+2+3+4+5+6 = 25, so P(W- <= 8) = 25/256
    # (0.0977, the printed table's one-sided value for n=8, T=8) and the two-sided p is 50/256
    assert significance.wilcoxon_p([1, 2, 3, 4, 5, 6, 7, -8]) == pytest.approx(50 / 256)
    # n=10, T=8: the same 25 subsets (9 and 10 exceed 8): 50/1024 = 0.0488, just under the table's 0.05 cut-off
    assert significance.wilcoxon_p([1, 2, 3, 4, 5, 6, 7, -8, 9, 10]) == pytest.approx(50 / 1024)
    # ties: |d| = 1, 1, 2, 2 get mid-ranks 1.5, 1.5, 3.5, 3.5; W+ = 1.5 + 3.5 + 3.5 = 8.5 of 10, centre 5.
    # As extreme (W+ >= 8.5 or <= 1.5): {all} 10, two sets of 8.5, {} 0, two sets of 1.5 -> 6/16
    assert significance.wilcoxon_p([1, -1, 2, 2]) == pytest.approx(6 / 16)
    # |d| = 1, 2, 3, 3: ranks 1, 2 and mid-rank 3.5 twice; W+ = 3.5 + 3.5 = 7, centre 5. As extreme (W+ <= 3 or
    # >= 7): {}, {1}, {2}, {1,2} and {3.5,3.5}, {1,3.5,3.5}, {2,3.5,3.5}, all -> 8/16 (the lowest rank, 3, for
    # both tied ones would give 12/16; ranks 3 and 4 in input order 10/16)
    assert significance.wilcoxon_p([-1, -2, 3, 3]) == pytest.approx(8 / 16)
    assert significance.wilcoxon_p([0, 0, 0]) == 1.0
    assert significance.wilcoxon_p([0, 3, 0]) == pytest.approx(1.0)  # one non-zero: W+ = 1 or 0, both extreme
    assert math.isnan(significance.wilcoxon_p(list(range(1, significance.WILCOXON_EXACT_MAX + 2))))


# --------------------------------------------------------------------------------------------------
# Paired difference, steps to reach


def test_paired_difference_hand_worked():
    # differences a - b = 0.01, 0.03, 0.02, 0.04 (seed 9 only in a: left out). Mean 0.025; deviations -0.015, 0.005,
    # -0.005, 0.015, sum of squares 0.0005, sd sqrt(0.0005 / 3) = 0.0129099; t(0.975, 3) = 3.182446;
    # half-width 3.182446 * 0.0129099 / 2 = 0.0205427, interval [0.00446, 0.04554] excludes 0
    a = {0: 0.21, 1: 0.33, 2: 0.22, 3: 0.44, 9: 0.5}
    b = {0: 0.20, 1: 0.30, 2: 0.20, 3: 0.40}
    d = significance.paired_difference(a, b)
    assert d.seeds == (0, 1, 2, 3)
    assert d.mean == pytest.approx(0.025, abs=1e-12)
    assert d.half_width == pytest.approx(3.182446305284263 * math.sqrt(0.0005 / 3) / 2, abs=1e-9)
    assert d.low == pytest.approx(0.0044573, abs=1e-6)
    assert d.significant and d.wins == 4
    assert d.sign_p == pytest.approx(2 / 16) and d.wilcoxon_p == pytest.approx(2 / 16)
    # swapped: the same interval mirrored, still significant (below zero)
    e = significance.paired_difference(b, a)
    assert e.mean == pytest.approx(-0.025) and e.significant and e.wins == 0
    # differences 0.01, -0.01, 0.02: mean 0.00667, sd 0.01528, half 4.3027 * 0.01528 / sqrt(3) = 0.0379 -> not
    noisy = significance.paired_difference({0: 0.11, 1: 0.09, 2: 0.12}, {0: 0.1, 1: 0.1, 2: 0.1})
    assert noisy.half_width == pytest.approx(
        4.302652729911275 * math.sqrt(0.0007 / 3) / math.sqrt(3), abs=1e-9
    )
    assert not noisy.significant
    with pytest.raises(ValueError, match="share no seed"):
        significance.paired_difference({0: 1.0}, {1: 1.0})


def test_steps_to_reach_and_median():
    curve = [(0, 0.2), (25, 0.28), (50, 0.31), (75, 0.30)]
    assert significance.steps_to_reach(curve, 0.3) == 50  # first step at or above, not the last
    assert significance.steps_to_reach(curve, 0.2) == 0
    assert significance.steps_to_reach(curve, 0.32) is None
    assert significance.median_steps([50, 25, None]) == 50  # sorted 25, 50, never
    assert significance.median_steps([50, 100]) == 75
    assert significance.median_steps([50, None, None]) is None
    assert significance.median_steps([50, None]) is None  # the median falls between 50 and never


def _curve_run(method, seed, values):
    return {
        "method": method,
        "seed": seed,
        "curve": [{"step": 25 * i, "pass@1": v} for i, v in enumerate(values)],
    }


def test_quarter_means_hand_worked():
    import study_report

    # 150 steps, points every 25: quarters (0, 37.5], (37.5, 75], (75, 112.5], (112.5, 150]; step 0 in none
    curve = [(0, 99.0), (25, 10.0), (50, 20.0), (75, 30.0), (100, 40.0), (125, 50.0), (150, 70.0)]
    assert study_report.quarter_means(curve, 150) == [10.0, 25.0, 40.0, 60.0]
    assert study_report.quarter_means(curve[:4], 150) == [10.0, 25.0, None, None]


def test_plateau_table_hand_worked():
    import study_report

    runs = [
        # 200 steps, points every 25: two per quarter; step 0 differs per seed and must not count
        _curve_run("GRPO", 0, [0.90, 0.10, 0.20, 0.30, 0.30, 0.40, 0.40, 0.42, 0.42]),  # 15, 30, 40, 42
        _curve_run("GRPO", 1, [0.10, 0.10, 0.10, 0.20, 0.30, 0.40, 0.30, 0.36, 0.40]),  # 10, 25, 35, 38
        _curve_run("GRPO", 2, [0.50, 0.20, 0.20, 0.30, 0.30, 0.30, 0.40, 0.40, 0.40]),  # 20, 30, 35, 40
        _curve_run("PPO", 0, [0.10, 0.20, 0.20, 0.30, 0.30, 0.20, 0.20, 0.30, 0.30]),  # one seed: no interval
        _curve_run("RLOO", 0, [0.10, 0.20, 0.20, 0.30]),  # no point in the last two quarters: no row
        {"method": "base", "seed": 0},
    ]
    lines = study_report.plateau_table(runs, ["GRPO", "PPO", "RLOO"], 200).splitlines()
    assert lines[0] == (
        "| method | seeds | steps 0-50 | steps 50-100 | steps 100-150 | steps 150-200 |"
        " change 50-100 -> 100-150 | 95% t-interval | seeds rising |"
        " change 100-150 -> 150-200 | 95% t-interval | seeds rising |"
    )
    # GRPO quarter means over seeds: 15.0, 28.33, 36.67, 40.0. Second -> third quarter: +10, +10, +5: mean 8.333,
    # sample sd 2.8868, half 4.302653 * 2.8868 / sqrt(3) = 7.171: [+1.16, +15.50]. Third -> last: +2, +3, +5:
    # mean 3.333, sd 1.5275, half 3.795: [-0.46, +7.13]
    assert (
        lines[2]
        == "| GRPO | 3 | 15.0 | 28.3 | 36.7 | 40.0 | +8.33 | [+1.16, +15.50] | 3/3 | +3.33 | [-0.46, +7.13] | 3/3 |"
    )
    # PPO: 20, 30, 20, 30: -10 then +10
    assert lines[3] == "| PPO | 1 | 20.0 | 30.0 | 20.0 | 30.0 | -10.00 | - | 0/1 | +10.00 | - | 1/1 |"
    assert len(lines) == 4
    assert study_report.plateau_table([runs[-2]], ["RLOO"], 200).startswith(
        "(no run has a curve point in every"
    )
    assert study_report.plateau_table([_curve_run("RLOO", 0, [0.1])], ["RLOO"], 200) == "(no curve yet)\n"
    # quarters of 150 steps end at 37.5 and 112.5, not at a rounded step
    assert (
        "| steps 0-37.5 | steps 37.5-75 | steps 75-112.5 | steps 112.5-150 |"
        in study_report.plateau_table(runs[:1], ["GRPO"], 150)
    )


def _log_run(method, seed, entropies):
    log = [{"step": i + 1, "entropy": e, "reward": 0.5} for i, e in enumerate(entropies)]
    return {"method": method, "seed": seed, "log": [*log, {"step": len(log) + 1, "reward": 0.5}]}


def test_entropy_table_hand_worked():
    import study_report

    runs = [
        _log_run("GRPO", 0, [0.5, 0.2, 0.3]),  # last two: 0.25
        _log_run("GRPO", 1, [0.9, 0.1, 0.3]),  # 0.2
        _log_run("PACS", 0, [0.1, 0.4, 0.4]),  # 0.4
        _log_run("PACS", 1, [0.1, 0.3, 0.2]),  # 0.25
        _log_run("PACS", 2, [0.3]),  # one step logged: 0.3; no GRPO seed 2 to pair with
        {"method": "PPO", "seed": 0, "log": [{"step": 1, "reward": 0.0}]},  # no entropy logged: no row
    ]
    lines = study_report.entropy_table(runs, ["PACS", "GRPO", "PPO"], ["GRPO", "PPO"], window=2).splitlines()
    assert len(lines) == 4
    # PACS: 0.4, 0.25, 0.3: mean 0.31667, sd sqrt(0.011667 / 2) = 0.076376, half 4.302653 * 0.076376 / sqrt(3)
    # = 0.18973. Minus GRPO on seeds 0, 1: 0.15, 0.05: mean 0.1, sd 0.070711, half 12.7062 * 0.070711 / sqrt(2)
    # = 0.63531; 2 wins of 2, sign p 2 / 4
    assert lines[2] == "| PACS | 3 | 0.3167 ± 0.1897 | +0.1000 [-0.5353, +0.7353] | 2/2 | 0.500 | - | - | - |"
    # GRPO: 0.25, 0.2: mean 0.225, sd 0.035355, half 12.7062 * 0.035355 / sqrt(2) = 0.31766
    assert lines[3] == "| GRPO | 2 | 0.2250 ± 0.3177 | - | - | - | - | - | - |"


def test_weights_section_is_pacs_minus_pacs_without_weights_seed_by_seed():
    # catches: the difference taken the other way round, unpaired seeds, or the section shown without both methods
    import study_report

    def run(method, seed, p1):
        return {"method": method, "seed": seed, "eval": {"pass@1": p1}}

    runs = [
        run("PACS", 0, 0.50),
        run("PACS", 1, 0.40),
        run("PACS", 2, 0.90),  # no partner: left out
        run("PACS w/o weights", 0, 0.45),
        run("PACS w/o weights", 1, 0.41),
        run("GRPO", 0, 0.0),
        run("GRPO", 1, 0.0),
    ]
    text = "\n".join(study_report.weights_section(runs, ["PACS", "PACS w/o weights", "GRPO"], [1]))
    assert "PACS against PACS w/o weights (PACS - PACS w/o weights" in text
    # +5 and -1 points: mean 2, sd sqrt(18) = 4.2426, half 12.7062 * 4.2426 / sqrt(2) = 38.119; 1 win of 2
    assert "| PACS | 1 | 2 | +2.00 | [-36.12, +40.12] | 1/2 | 1.000 |" in text
    assert "| GRPO |" not in text and "| PACS w/o weights |" not in text
    assert study_report.weights_section(runs, ["PACS", "GRPO"], [1]) == []


def test_heldout_entropy_is_the_last_curve_point_that_measured_it():
    # catches: the training rollouts' entropy (or the first curve point's) reported as the held-out one
    import study_report

    def run(method, seed, entropies):
        curve = [
            {"step": 25 * i, "pass@1": 0.2, **({} if e is None else {"entropy": e})}
            for i, e in enumerate(entropies)
        ]
        return {"method": method, "seed": seed, "curve": curve, "log": [{"step": 1, "entropy": 9.0}]}

    runs = [
        run("GRPO", 0, [0.5, 0.2, 0.1]),
        run("GRPO", 1, [0.5, 0.3, None]),  # the last point without entropy: the one before it counts
        run("PACS", 0, [0.5, 0.4, 0.3]),
        run("PACS", 1, [0.5, 0.4, 0.4]),
    ]
    assert study_report.final_entropy(runs[1], 10, "heldout") == 0.3
    assert study_report.final_entropy(runs[1], 10) == 9.0
    with pytest.raises(ValueError, match="source='held-out'"):
        study_report.final_entropy(runs[1], 10, "held-out")
    lines = study_report.entropy_table(runs, ["PACS", "GRPO"], ["GRPO"], source="heldout").splitlines()
    # PACS: 0.3, 0.4: mean 0.35, sd 0.070711, half 12.7062 * 0.070711 / sqrt(2) = 0.63531; minus GRPO (0.1, 0.3):
    # +0.2, +0.1: mean 0.15, sd 0.070711, the same half
    assert lines[2] == "| PACS | 2 | 0.3500 ± 0.6353 | +0.1500 [-0.4853, +0.7853] | 2/2 | 0.500 |"


def test_times_table_names_each_runs_machine_or_a_dash_where_it_was_not_recorded():
    import study_report

    machine = {"cpu": "AMD EPYC", "kernels": "AVX512", "torch": "2.13.0+cpu"}
    runs = [
        {"method": "GRPO", "seed": 1, "wall_seconds": 10.4, "cpu_seconds": 9.6, "machine": machine},
        {"method": "GRPO", "seed": 0, "wall_seconds": 12.0, "cpu_seconds": 11.0},  # an older record
    ]
    lines = study_report.times_table(runs, ["GRPO"]).splitlines()
    assert lines[2:] == [
        "| GRPO | 0 | 12 | 11 | - |",
        "| GRPO | 1 | 10 | 10 | AMD EPYC, AVX512, torch 2.13.0+cpu |",
    ]


# --------------------------------------------------------------------------------------------------
# The runs file


def test_runs_file_tolerates_a_truncated_line_and_appends_after_it(tmp_path):
    path = tmp_path / "runs.jsonl"
    study.append_run(path, {"method": "GRPO", "spec": "grpo", "seed": 0})
    with path.open("a") as f:
        f.write('{"method": "PACS", "spec": "pacs", "se')  # a write cut short by a kill
    assert [r["seed"] for r in study.read_runs(path)] == [0]
    study.append_run(path, {"method": "PACS", "spec": "pacs", "seed": 1})
    assert [(r["spec"], r["seed"]) for r in study.read_runs(path)] == [("grpo", 0), ("pacs", 1)]


def test_settings_guard_refuses_changed_settings_and_records_new_ones(tmp_path):
    study.check_settings(tmp_path, {"steps": 150, "learning_rate": 3e-4})
    with pytest.raises(SystemExit, match="other settings \\(steps\\)"):
        study.check_settings(tmp_path, {"steps": 100, "learning_rate": 3e-4})
    # a field added to DemoConfig since (for a new method) is recorded, not refused
    study.check_settings(tmp_path, {"steps": 150, "learning_rate": 3e-4, "ppo_value_lr": 1e-3})
    assert json.loads((tmp_path / "settings.json").read_text()) == {
        "steps": 150,
        "learning_rate": 3e-4,
        "ppo_value_lr": 1e-3,
    }
    with pytest.raises(SystemExit, match="ppo_value_lr"):
        study.check_settings(tmp_path, {"steps": 150, "learning_rate": 3e-4, "ppo_value_lr": 1e-2})


def test_settings_hold_what_every_run_shares_only(tmp_path):
    # the study sets each run's algorithm, class weights and seed: settings.json holding the demo's defaults of
    # these (algorithms ['pacs', 'grpo']) would misstate what the folder's runs did
    _, config = study.parse_args(["--smoke", "--output", str(tmp_path)])
    settings = study.study_settings(config)
    assert not {"algorithms", "pacs_weight_mode", "seed", "threads"} & set(settings)
    assert settings["pacs_beta"] == config.pacs_beta and settings["steps"] == config.steps
    # a folder written while settings.json still held them resumes: they are neither compared nor refused
    (tmp_path / "settings.json").write_text(json.dumps({**settings, "algorithms": ["pacs", "grpo"]}))
    study.check_settings(tmp_path, settings)


@pytest.mark.parametrize(
    ("folder", "argv"),
    [("study", []), ("study-150", ["--steps", "150", "--no-curve-entropy"])],
)
def test_committed_study_folders_resume_with_their_command(folder, argv):
    # catches: a change to the study's settings (or a new DemoConfig field with another value) that would make
    # the committed results folder refuse its own command instead of resuming it
    path = BENCH / "results" / folder
    _, config = study.parse_args(["--jobs", "2", *argv, "--output", str(path)])
    old = json.loads((path / "settings.json").read_text())
    settings = study.study_settings(config)
    assert {k: settings[k] for k in old if k in settings} == {k: old[k] for k in old if k in settings}


def test_pending_jobs_skip_finished_runs_seed_by_seed():
    args, _ = study.parse_args(["--smoke", "--methods", "pacs,grpo", "--seeds", "0,1", "--base-seeds", "0"])
    runs = [{"spec": "base", "seed": 0}, {"spec": "grpo", "seed": 0}]
    assert [(j.spec, j.seed) for j in study.pending_jobs(args, runs)] == [
        ("pacs", 0),
        ("pacs", 1),
        ("grpo", 1),
    ]


def test_command_line_mistakes_are_one_line(capsys):
    for argv, words in (
        (["--seed", "3"], "--seed"),
        (["--methods", "pacs,pacs"], "each method once"),
        (["--methods", "ppoo"], "ppoo"),
        (["--seeds", "0"], "two or more seeds"),
        (["--jobs", "0"], "--jobs 0"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            study.parse_args(argv)
        assert exit_info.value.code == 2
        assert words in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The whole study at smoke size


@pytest.mark.slow
def test_smoke_study_runs_in_parallel_and_resumes(tmp_path, caplog):
    command = [
        sys.executable,
        str(BENCH / "study.py"),
        "--smoke",
        "--methods",
        "pacs,grpo",
        "--seeds",
        "0,1",
        "--base-seeds",
        "0,1",
        "--output",
        str(tmp_path),
    ]
    first = subprocess.run(
        [*command, "--jobs", "2"], check=False, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stderr[-3000:]
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["seed"]) for r in runs) == [
        ("GRPO", 0),
        ("GRPO", 1),
        ("PACS", 0),
        ("PACS", 1),
        ("base", 0),
        ("base", 1),
    ]
    assert "[6/6]" in first.stderr and "ETA done" in first.stderr
    from pacsrl.demo import demo_checkpoint_path

    vocab_size = json.loads((demo_checkpoint_path() / "config.json").read_text())["vocab_size"]
    import torch

    for r in runs:
        assert set(r["eval"]) == {"pass@1", "pass@2", "pass@4"}
        assert r["machine"]["kernels"] == torch.backends.cpu.get_cpu_capability() and r["machine"]["cpu"]
        if r["method"] != "base":
            assert [p["step"] for p in r["curve"]] == [0, 1, 2, 3, 4]  # a point in each quarter
            assert all(set(p) == {"step", "pass@1", "pass@2", "pass@4", "entropy"} for p in r["curve"])
            assert all(0 < p["entropy"] < math.log(vocab_size) for p in r["curve"])  # nats, below uniform's
            assert any("entropy" in h for h in r["log"])
    results = (tmp_path / "results.md").read_text()
    assert "Complete" in results and "Paired differences against GRPO" in results
    assert (
        "| PACS | 2 | "
        in results.split("Policy entropy at the end, on the fixed curve problems")[1].split("##")[0]
    )
    assert "| PACS | 2 | " in results.split("Still improving at the end?")[1].split("##")[0]
    # the settings are filled in (not a literal "{config.eval_size}")
    assert "Final evaluation: 4 held-out problems x 4 samples" in results
    for plot in ("curves.png", "pass_at_k.png", "entropy.png", "paired.png"):
        assert (tmp_path / plot).stat().st_size > 0

    # a rerun (in this process: nothing is trained) has nothing to do, also after a cut-short line; one more seed
    # would add only its runs
    with (tmp_path / "runs.jsonl").open("a") as f:
        f.write('{"method": "PACS", "se')
    with caplog.at_level(logging.INFO, logger="bench.study"):
        assert study.main(command[2:] + ["--jobs", "1"]) == 0
    assert "0 of 6 runs to do" in caplog.text and "not a whole record" in caplog.text
    args, _ = study.parse_args([*command[2:], "--seeds", "0,1,2"])
    pending = study.pending_jobs(args, study.read_runs(tmp_path / "runs.jsonl"))
    assert [(j.spec, j.seed) for j in pending] == [("pacs", 2), ("grpo", 2)]
