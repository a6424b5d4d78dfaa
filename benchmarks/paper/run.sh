#!/usr/bin/env bash
# The IsoMax / DisMax papers' full protocol, one command on a GPU machine:
#   bash benchmarks/paper/run.sh [--jobs N]
# with OODBENCH_DATA set; it downloads CIFAR-10/100 and SVHN through torchvision (skipped when
# present); Tiny-ImageNet and LSUN (resize) must be placed there by hand (`oodbench data` says
# where).
# Each benchmark trains its losses × 3 seeds for 300 epochs, calibrates, scores and reports;
# an interrupted run resumes where it stopped when the command is repeated.
set -euo pipefail
cd "$(dirname "$0")"
oodbench data --download cifar10 --download cifar100 --download svhn
for bench in cifar10-resnet34 cifar10-densenet100 cifar10-wrn28-10 \
             cifar100-resnet34 cifar100-densenet100 cifar100-wrn28-10; do
  oodbench run "$bench.yaml" --runs-root runs "$@"
done
oodbench report runs --style paper --output runs
