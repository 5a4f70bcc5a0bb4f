#!/usr/bin/env bash
# Every study sweep, in priority order, then the study page. Resumable: run it again to continue where it stopped
# (finished runs are skipped). About 20 hours of 2-core CPU in all, half of it rotten_tomatoes_finetune (a fashion
# run is ~20 min on one thread); each sweep line can also be run on its own.
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
$G sweep benchmarks/studies/fashion_grouping.toml --jobs 2
# Issue #17: the DP linear probe, the ScatterNet search and its final runs, the ImageNet-feature search and its final
# runs (with the baseline without DP), adaptive thresholds that keep the total
# (one run per command in fashion_adaptive_total/README.md), the Shakespeare size study, then DP full fine-tuning /
# LoRA (hours on a CPU).
$G sweep benchmarks/studies/rotten_tomatoes_probe.toml --jobs 1
$G sweep benchmarks/studies/fashion_scatternet_search.toml --jobs 1
$G sweep benchmarks/studies/fashion_scatternet_ema.toml --jobs 1
$G sweep benchmarks/studies/fashion_scatternet_views.toml --jobs 1
$G sweep benchmarks/studies/fashion_scatternet_schedule.toml --jobs 1
$G sweep benchmarks/studies/fashion_scatternet_pld.toml --jobs 1
$G sweep benchmarks/studies/fashion_scatternet.toml --jobs 1
$G sweep benchmarks/studies/fashion_scatternet_b4096.toml --jobs 1
$G sweep benchmarks/studies/fashion_scatternet_b8192.toml --jobs 1
$G sweep benchmarks/studies/fashion_scatternet_threshold.toml --jobs 1
$G sweep benchmarks/studies/fashion_scattercnn_search.toml --only lr=8.0 --jobs 1
$G sweep benchmarks/studies/fashion_scatter_efficientnet_search.toml --jobs 2 --only features=scatter-eff-p2 --only lr=8.0
$G sweep benchmarks/studies/fashion_scatter_efficientnet_search.toml --jobs 2 --only features=scatter-eff-p4
$G sweep benchmarks/studies/fashion_scatter_efficientnet_search.toml --jobs 2 --only features=eff-p4 --only lr=4.0,8.0,16.0
$G sweep benchmarks/studies/fashion_efficientnet.toml --jobs 2
$G sweep benchmarks/studies/fashion_efficientnet_nonprivate.toml --jobs 2
for g in layer-wise 2 4 param-wise; do for s in 0 1 2; do
  name=$(case "$g" in layer-wise | param-wise) echo "$g" ;; *) echo "blocks$g" ;; esac)
  out=benchmarks/results/studies/fashion_adaptive_total/$name-adaptive-seed$s
  [ -f "$out/final.json" ] || $G train --recipe fashion-mnist-cnn --grouping "$g" --adaptive --seed "$s" --threads 1 --out "$out"
done; done
$G sweep benchmarks/studies/shakespeare_sizes.toml --jobs 2
$G sweep benchmarks/studies/rotten_tomatoes_lora.toml --jobs 1
$G sweep benchmarks/studies/rotten_tomatoes_finetune.toml --jobs 2
# With a CUDA GPU, also run the GPU sweeps the study page reads (the committed ones: one H100, 14 runs at a time,
# ~2 min a run): the full Fashion-MNIST grid and the size study (widths 0.5, 2, 4). Without one they are skipped.
# (fashion_grouping.toml pins run.device = cpu: it is the CPU cross-check; the other specs use auto, so on such a
# machine they run on the GPU too.)
if .venv/bin/python -c 'import torch; exit(0 if torch.cuda.is_available() else 1)'; then
  $G sweep benchmarks/studies/fashion_grouping_gpu.toml --jobs 14
  $G sweep benchmarks/studies/fashion_size_gpu.toml --jobs 14
fi
.venv/bin/python benchmarks/study_report.py
