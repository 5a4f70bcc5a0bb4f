#!/usr/bin/env bash
# Every study sweep, in priority order, then the study page. Resumable: run it again to continue where it stopped
# (finished runs are skipped). About 10 hours of 2-core CPU in all (a fashion run is ~20 min on one thread); each
# sweep line can also be run on its own.
#   bash benchmarks/studies/run_all.sh        (or: make study)
set -euo pipefail
cd "$(dirname "$0")/../.."
G=${GROUPCLIP:-.venv/bin/groupclip}
$G sweep benchmarks/studies/fashion_grouping.toml --jobs 2 --only grouping=all-layer,layer-wise --only clipping=fixed
$G sweep benchmarks/studies/shakespeare.toml --jobs 2
$G sweep benchmarks/studies/rotten_tomatoes.toml --jobs 2 --only setting=all-layer,non-private,layer-wise,layer-wise-adaptive
$G sweep benchmarks/studies/rotten_tomatoes.toml --only setting=all-layer-8-epochs,non-private-bitfit
$G sweep benchmarks/studies/fashion_grouping.toml --jobs 2 --only seed=0 --only grouping=all-layer,layer-wise
$G sweep benchmarks/studies/fashion_grouping.toml --jobs 2 --only seed=0
$G sweep benchmarks/studies/rotten_tomatoes.toml --jobs 2
$G sweep benchmarks/studies/fashion_size.toml --jobs 2
$G sweep benchmarks/studies/fashion_grouping.toml --jobs 2
.venv/bin/python benchmarks/study_report.py
