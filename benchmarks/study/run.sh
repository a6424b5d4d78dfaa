#!/usr/bin/env bash
# Every run of the study (issue 14), then its records into benchmarks/results:
#   OODBENCH_DATA=../shared/data bash benchmarks/study/run.sh [RUNS_ROOT]
# Finished runs are skipped and unfinished ones resume from their checkpoints, so the command is
# repeated until everything is done (about 15 CPU-hours on 2 cores: the 18 compact32 runs are
# ~20 minutes of training each on an idle machine, the 42 MNIST-family runs a few minutes).
# Where a benchmark stands: oodbench run benchmarks/study/NAME.yaml --runs-root RUNS_ROOT --dry-run
set -euo pipefail
cd "$(dirname "$0")/../.."
R=${1:-runs-study}
S=benchmarks/study
for b in mnist-study mnist-study-entropy fashionmnist-study fashionmnist-study-entropy; do
  oodbench run $S/$b.yaml --runs-root "$R"
done
# imports the four pretrained ResNets its `checkpoints:` list, then calibrates and scores them
oodbench run $S/cifar10-jpeg-pretrained.yaml --runs-root "$R"
for b in cifar10-jpeg-compact cifar10-jpeg-compact-nomosaic cifar10-jpeg-compact-logsoftmax \
         cifar10-jpeg-compact-logsoftmax-entropy; do
  oodbench run $S/$b.yaml --runs-root "$R"
done
oodbench publish "$R" benchmarks/results
