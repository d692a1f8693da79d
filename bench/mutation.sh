#!/usr/bin/env bash
# Mutation testing of the modules where a silent bug costs most (README, "Mutation testing").
#
#   bash bench/mutation.sh                 # every group: objective rewards eval data
#   bash bench/mutation.sh eval data       # some groups
#   MUTANTS='pacsrl.eval.metrics.*' bash bench/mutation.sh eval   # only the mutants whose names match
#
# For each group, mutmut (in the `dev` extra) makes every small change it knows to the group's modules and
# runs, for each change, the group's fast tests that execute the changed function. A change no test
# notices "survives". Each group runs in a copy of the working tree under .mutation/GROUP, and writes
# bench/results/mutation/GROUP.md: counts, and every survivor's diff with the reason it is fine (harmless,
# or killed by a test added since) where bench/mutation_survivors.tsv gives one. MAX_CHILDREN (default:
# the number of cores) mutants are tested at once.
#
# Runs are incremental. A group's folder is kept, and its verdicts and test timings are also copied to
# bench/results/mutation/cache/GROUP (committed), which a fresh clone starts from: mutmut re-tests only the
# functions whose source changed since, and this script then tests again the survivors that have no reason
# or are said to be killed by a later test, the timeouts, and the mutants no test ran. An interrupted run goes
# on where it stopped.
# FRESH=1 forgets every verdict and tests every mutant (after weakening or removing a test, say); the
# committed verdicts are replaced only when it completes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$root/bench/results/mutation
mkdir -p "$out"

# group -> modules to mutate (fnmatch patterns), the tests that check them ("not slow" ones only), and a
# pytest -k filter: the eval group leaves out the tests that sample from a tiny model (sampling.py is not
# mutated; test_eval_runs.py drives run.py model-free with a seeded stand-in sampler); rewards and data
# leave out the pathological-input tests, whose wall-clock bounds fail on a machine busy with mutants.
declare -A MODULES=(
    [objective]='"src/pacsrl/objective.py"'
    [rewards]='"src/pacsrl/rewards/*"'
    [eval]='"src/pacsrl/eval/metrics.py", "src/pacsrl/eval/rollouts.py", "src/pacsrl/eval/run.py"'
    [data]='"src/pacsrl/data/*"'
)
declare -A TESTS=(
    [objective]='"tests/test_objective.py"'
    [rewards]='"tests/test_rewards.py", "tests/test_verifier_workers.py", "tests/test_gym.py", "tests/test_worker_protocol.py"'
    [eval]='"tests/test_eval.py", "tests/test_eval_runs.py"'
    [data]='"tests/test_data.py", "tests/test_gym.py"'
)
model_tests="sample_completions or evaluate_model or end_to_end or resume_after_crash or resume_refuses_other"
model_tests+=" or resume_refuses_another or compare_plot_has or compare_only_reads or cli_eval_recompute"
declare -A FILTER=(
    [objective]=''
    [rewards]='not pathological'
    [data]='not pathological'
    [eval]="not ($model_tests)"
)
groups=("$@")
[ "${#groups[@]}" -gt 0 ] || groups=(objective rewards eval data)
for group in "${groups[@]}"; do
    case $group in
        objective | rewards | eval | data) ;;
        *) echo "unknown group '$group': use objective, rewards, eval or data" >&2; exit 2 ;;
    esac
done
case ${FRESH:-} in
    '' | 0) fresh= ;;
    1) fresh=1 ;;
    *) echo "FRESH must be 1 (or unset), not '$FRESH'" >&2; exit 2 ;;
esac
if [ -n "$fresh" ] && [ -n "${MUTANTS:-}" ]; then
    echo "FRESH=1 with MUTANTS would leave every other mutant unchecked in the committed verdicts:" \
        "run FRESH=1 without MUTANTS, or MUTANTS without FRESH=1" >&2
    exit 2
fi

cores=$(python -c "import os; print(len(os.sched_getaffinity(0)))")  # nproc would report OMP_NUM_THREADS
# one torch thread per mutant: MAX_CHILDREN of them share the cores, and a child forked from a process whose
# OpenMP pool has started hangs at its first parallel op (every mutant then "times out")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# seconds for one test of one mutant (pytest-timeout, in the dev extra). It is one of mutmut's pytest
# arguments, and mutmut forgets every verdict when those change: another value means testing every mutant.
TEST_TIMEOUT=${TEST_TIMEOUT:-30}
# The verdicts and test timings of the group being run (in its folder's mutants/), to the committed cache, so
# that a fresh clone's run is incremental too; also when the run fails or is interrupted, except in a FRESH
# run (its folder keeps what it tested: the next run without FRESH goes on from there). The copy is made
# beside the cache and then moved in, and mutmut's sets are sorted, so that an unchanged cache stays
# byte-for-byte the same.
save_cache() {
    [ -n "${work:-}" ] && [ -f "$work/mutants/mutmut-stats.json" ] || return 0
    local tmp=$cache.tmp
    rm -rf "$tmp" && mkdir -p "$tmp"
    python - "$work/mutants/mutmut-stats.json" "$tmp/mutmut-stats.json" <<'PY'
import json, sys
stats = json.load(open(sys.argv[1]))
for key in ("tests_by_mangled_function_name", "function_dependencies"):
    stats[key] = {name: sorted(values) for name, values in stats.get(key, {}).items()}
json.dump(stats, open(sys.argv[2], "w"), indent=4, sort_keys=True)
PY
    (cd "$work/mutants" && find src -name '*.meta' -exec cp --parents -t "$tmp" {} +)
    rm -rf "$cache" && mv "$tmp" "$cache"
}
interrupted() {
    [ -n "$fresh" ] || save_cache
    exit "$1"
}
trap 'interrupted 130' INT
trap 'interrupted 143' TERM
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
for group in "${groups[@]}"; do
    work=$root/.mutation/$group
    cache=$out/cache/$group
    if [ -n "$fresh" ] || [ ! -f "$work/pyproject.toml" ]; then
        rm -rf "$work" && mkdir -p "$work"
        # a fresh clone starts from the committed verdicts (mutmut's results and test timings, no mutants):
        # mutmut makes the mutants again and re-tests only the functions whose source differs from the
        # cached hashes
        if [ -z "$fresh" ] && [ -f "$cache/mutmut-stats.json" ]; then
            mkdir -p "$work/mutants" && cp -r "$cache/." "$work/mutants/"
        fi
    else
        # everything but mutants/ (mutmut's results) is replaced below, so a deleted module is gone too
        find "$work" -mindepth 1 -maxdepth 1 ! -name mutants -exec rm -rf {} +
    fi
    # the working tree as it is (tracked files still there, and new ones), so uncommitted tests count too
    git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ ! -e "$f" ] || printf '%s\0' "$f"; done |
        xargs -0 cp --parents -t "$work"
    commit="commit $(git rev-parse --short HEAD)"
    [ -z "$(git status --porcelain -- src tests)" ] || commit+=" with uncommitted changes to src/ or tests/"
    filter=""
    [ -z "${FILTER[$group]}" ] || filter=", \"-k\", \"${FILTER[$group]}\""
    cat >> "$work/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["src"]
only_mutate = [${MODULES[$group]}]
pytest_add_cli_args_test_selection = [${TESTS[$group]}]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-m", "not slow and not gpu", "--timeout=$TEST_TIMEOUT"$filter]
# a mutant that hangs (a broken deadline in the verifier's pool) fails the test it hangs in after TEST_TIMEOUT
# seconds (pytest-timeout; the slowest unmutated test takes about 12 s on a busy machine), and the run stops
# there (-x): caught. mutmut's own limit, a CPU time of (t + 5 s) x 3 x 2 where t is the mutant's tests'
# unmutated time, is the backstop (a hang at exit); its default, 15 times, let one mutant hold a core for 20
# minutes. A machine busier than
# when the tests were timed can stretch a survivor past either: re-check the timeouts of a run made beside
# other work (a changed multiplier re-runs only them)
timeout_multiplier = 3.0
timeout_constant = 5.0
# the words of error, log and progress-bar messages are not behaviour: lines that start one are not mutated
do_not_mutate_patterns = ['raise \w+\(', 'logger\.\w+\(', 'tqdm\(']
# mutmut warns when a file its hashes cannot follow (not Python) changed since the verdicts were made; the
# docs, the benchmarks and their results (this cache among them) cannot change a test's outcome
cache_invalidation_exclude = ["*.md", "docs/*", "bench/*", ".ci/*", ".gitignore"]
EOF
    cd "$work"
    # The verifier's worker subprocesses must import the mutated copy too (they inherit PYTHONPATH). The
    # folder must exist before Python starts: a sys.path entry missing at start-up is cached as missing,
    # and the tests would silently import the unmutated package.
    mkdir -p mutants/src
    # the verdicts as they are before this run, to count the mutants it tests
    rm -rf before && mkdir before
    (cd mutants && find src -name '*.meta' -exec cp --parents -t ../before {} +)
    start=$(date +%s)
    status=0
    set -f  # MUTANTS holds several patterns, passed to mutmut unexpanded
    # shellcheck disable=SC2086
    PYTHONPATH=$work/mutants/src mutmut run --max-children "${MAX_CHILDREN:-$cores}" ${MUTANTS:-} \
        > mutmut.log 2>&1 || status=$?
    # mutmut keeps a verdict until its function changes; a test added since can kill a survivor or run a
    # mutant no test ran, and a timeout on a busy machine can be a survivor: test those again
    # (mutation_summary.py --recheck)
    if [ "$status" -eq 0 ] && [ -z "${MUTANTS:-}" ]; then
        mapfile -t recheck < <(python "$root/bench/mutation_summary.py" --recheck \
            --reasons "$root/bench/mutation_survivors.tsv")
        if [ "${#recheck[@]}" -gt 0 ]; then
            echo "$group: testing again ${#recheck[@]} survivors, timeouts and mutants no test ran" >> mutmut.log
            PYTHONPATH=$work/mutants/src mutmut run --max-children "${MAX_CHILDREN:-$cores}" \
                "${recheck[@]}" >> mutmut.log 2>&1 || status=$?
        fi
    fi
    set +f
    seconds=$(( $(date +%s) - start ))
    [ -n "$fresh" ] && [ "$status" -ne 0 ] || save_cache
    if [ "$status" -ne 0 ] && grep -q "Filtered for specific mutants, but nothing matches" mutmut.log; then
        echo "$group: no mutant matches MUTANTS='$MUTANTS'; nothing tested" >&2
        cd "$root"
        continue
    fi
    if [ "$status" -ne 0 ]; then
        python -c "import sys; lines = open('mutmut.log', errors='replace').read().replace('\r', '\n').split('\n')
print('\n'.join([l for l in lines if l.strip() and not '\u2800' <= l[0] <= '\u28ff'][-30:]))" >&2  # no spinner
        echo "$group: mutmut run failed (exit $status) after ${seconds} s; log: $work/mutmut.log" >&2
        exit "$status"
    fi
    python "$root/bench/mutation_summary.py" --group "$group" --seconds "$seconds" --before before \
        --reasons "$root/bench/mutation_survivors.tsv" --commit "$commit" \
        ${MUTANTS:+--note "only the mutants matching: $MUTANTS (the others are not checked)"} > summary.md
    mv summary.md "$out/$group.md"
    # files mutmut cannot follow (test data, the package's metadata) changed: the verdicts were kept
    if grep -aq "non-Python file(s) changed since the last full run" mutmut.log; then
        echo "$group: $(grep -a -m1 -o '[0-9]* non-Python file(s) changed since the last full run: .*' mutmut.log);" \
            "verdicts kept: if these change what a test checks, run again with FRESH=1" >&2
    fi
    echo "$group: ${seconds} s; $(grep -m1 '^| total' "$out/$group.md")"
    cd "$root"
done
