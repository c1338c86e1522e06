#!/usr/bin/env bash
# Mutation testing of the engine's core with mutmut (pip install -e ".[mutation]"), each
# target against only its own fast tests. Not in CI: slow. Results go to bench/RESULTS.md by hand.
#
#   nice -n 19 env OMP_NUM_THREADS=1 bench/mutation.sh [target ...]
#   targets: block_manager scheduler sampler detokenizer stop_handling (default: all five, in that order)
#
# Each target runs in a scratch copy of the working tree (mutmut writes a mutants/ directory
# and needs its own setup.cfg section), kept under $MUTATION_DIR (default /tmp/bento-llm-mutation)
# so `cd $MUTATION_DIR/<target> && mutmut show <mutant>` prints a survivor's diff afterwards.
# MUTATION_TIME_LIMIT=<seconds> stops a target early; mutants not run yet count as not checked.
# MUTATION_MUTANTS="<glob> ..." runs only the mutants whose names match (mutmut's fnmatch on names
# such as engine.sampler.xǁSamplerǁ_beam_candidates__mutmut_3), e.g. '*_beam_candidates__*';
# the others count as not checked. MUTATION_TESTS="<test ids>" replaces the target's test selection
# (a subset that kills a mutant kills it; survivors then need the full selection to count).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
MUTMUT="$(dirname "$PYTHON")/mutmut"
OUT="${MUTATION_DIR:-/tmp/bento-llm-mutation}"
LIMIT="${MUTATION_TIME_LIMIT:-0}"
read -ra MUTANTS <<< "${MUTATION_MUTANTS:-}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TRITON_INTERPRET=1 TOKENIZERS_PARALLELISM=false

# target -> "module to mutate|its fast tests"
declare -A TARGETS=(
  [block_manager]="engine/block_manager.py|tests/test_block_manager.py tests/test_prefix_caching.py::test_freed_cached_blocks_stay_findable_until_reused tests/test_prefix_caching.py::test_a_partly_refilled_pool_takes_unused_blocks_then_evicts_least_recently_freed_first tests/test_prefix_caching.py::test_a_block_key_names_its_whole_prefix"
  # Swapping and forking (n > 1, beams) are reached only by the swapping and parallel-sampling tests.
  [scheduler]="engine/scheduler.py|tests/test_scheduler.py tests/test_swapping.py tests/test_parallel_sampling.py"
  # Beam candidates are scored by the beam tests (the tiny-model ones: the default model's is
  # slow), per-row failures by the integrity test that fails one row's sampler work.
  [sampler]="engine/sampler.py|tests/test_sampling.py tests/test_beam_search.py::test_beam_search_equals_transformers_on_a_tiny_model tests/test_beam_search.py::test_beam_search_equals_transformers_when_beams_end_early tests/test_beam_search.py::test_n_best_beams_are_returned_best_first tests/test_engine_integrity.py::test_a_failure_in_the_sampler_for_one_row_fails_that_request_alone"
  [detokenizer]="engine/detokenizer.py|tests/test_detokenizer.py"
  # Stop checks and the outputs built from finished sequences (find_stop_string itself is the
  # detokenizer target's).
  [stop_handling]="engine/output_processor.py|tests/test_stop_handling.py"
)

[ -x "$MUTMUT" ] || { echo "mutmut not found next to $PYTHON: pip install -e \".[mutation]\"" >&2; exit 2; }
for target in "${@:-block_manager scheduler sampler detokenizer stop_handling}"; do
  for name in $target; do
    [ -n "${TARGETS[$name]:-}" ] || { echo "unknown target $name (one of ${!TARGETS[*]})" >&2; exit 2; }
    module="${TARGETS[$name]%%|*}"
    tests="${MUTATION_TESTS:-${TARGETS[$name]#*|}}"
    work="$OUT/$name"
    rm -rf "$work" && mkdir -p "$work"
    # The working tree's tracked and new (not ignored) files: what the tests see in the repo.
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work")
    {
      echo "[mutmut]"
      echo "source_paths = engine/"
      echo "only_mutate = $module"
      echo "also_copy ="
      for path in kernels/ bento_llm/ conftest.py service.py; do echo "    $path"; done
      echo "pytest_add_cli_args = -p no:cacheprovider -q"
      echo "pytest_add_cli_args_test_selection ="
      for t in $tests; do echo "    $t"; done
    } > "$work/setup.cfg"
    # pyproject's [tool.mutmut] would win over setup.cfg; the copy has none, keep it that way.
    ! grep -q '^\[tool.mutmut\]' "$work/pyproject.toml"
    echo "== $name: mutating $module against $tests"
    start=$(date +%s)
    if [ "$LIMIT" -gt 0 ]; then
      (cd "$work" && timeout "$LIMIT" "$MUTMUT" run --max-children 1 "${MUTANTS[@]}") || echo "(stopped after ${LIMIT}s)"
    else
      (cd "$work" && "$MUTMUT" run --max-children 1 "${MUTANTS[@]}")
    fi
    (cd "$work" && "$MUTMUT" results --all true) > "$work/results.txt"
    echo "== $name: $(( $(date +%s) - start )) s"
    for status in killed survived timeout suspicious "no tests" "not checked" skipped; do
      printf '   %-12s %s\n' "$status" "$(grep -c ": $status\$" "$work/results.txt" || true)"
    done
    grep -E ': (survived|no tests|timeout|suspicious)$' "$work/results.txt" || true
  done
done
