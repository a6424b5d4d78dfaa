#!/usr/bin/env bash
# Every table of docs/results.md, regenerated from the published records in benchmarks/results
# (run from the repository root; no data, weights or forward pass needed). Folders not yet
# published are skipped.
set -euo pipefail
R=benchmarks/results
OB=${OODBENCH:-oodbench}
have() { for d in "$@"; do [ -d "$R/$d" ] || return 1; done; }
report() { echo; $OB report "$@" -f markdown --no-write; }
KEY=(-d msp -d maxlogit -d energy -d odin -d mahalanobis -d mahalanobis-ensemble -d misp
     -d mps -d mds -d mmles -d knn -d vim -d react -d gen -d rmds)
THESIS=(-d msp -d misp -d intermediate-misp -d intermediate-misp-max -d intermediate-misp-mean
        -d intermediate-msp-max -d intermediate-msp-mean -d intermediate-msp-min)
for b in mnist-study fashionmnist-study cifar10-jpeg-compact; do
  have $b || continue
  echo; echo "## $b: SoftMax vs DisMax (the DisMax paper's layout)"
  report $R/$b --style paper --pair softmax:msp --pair softmax:energy --pair dismax:mps \
    --pair dismax:mmles
  echo; echo "## $b: key detectors, every loss"
  report $R/$b --metric auroc --metric fpr_at_tpr95 "${KEY[@]}"
done
if have cifar10-jpeg-compact cifar10-jpeg-compact-nomosaic; then
  echo; echo "## cifar10-jpeg-compact: DisMax with and without the mosaic"
  report $R/cifar10-jpeg-compact $R/cifar10-jpeg-compact-nomosaic --loss dismax --group-by data \
    --metric auroc -d mps -d es -d mds -d mmls -d mmles -d mmleps -d odin -d mahalanobis-ensemble
  echo; echo "### The same, as with → without the mosaic (Δ in points)"
  report --compare $R/cifar10-jpeg-compact $R/cifar10-jpeg-compact-nomosaic --loss dismax \
    --metric auroc -d mps -d es -d mds -d mmls -d mmles -d mmleps -d odin -d mahalanobis-ensemble
fi
for b in mnist-study fashionmnist-study cifar10-jpeg-compact; do
  extra=()
  case $b in cifar10-jpeg-compact) extra=("$R/$b-logsoftmax" "$R/$b-logsoftmax-entropy");;
             *) extra=("$R/$b-entropy");; esac
  have $b || continue
  found=()  # the log-softmax folders published so far (the table grows as they arrive)
  for e in "${extra[@]}"; do [ -d "$e" ] && found+=("$e"); done
  [ ${#found[@]} -gt 0 ] || continue
  echo; echo "## $b: the MiSP thesis (ReLU softmax vs log-softmax λ = 0 and λ = 1e-2)"
  report $R/$b "${found[@]}" --loss softmax --loss logsoftmax-resnet --metric auroc "${THESIS[@]}" \
    --group-by data
done
if have cifar10-jpeg-pretrained; then
  echo; echo "## cifar10-jpeg-pretrained: every gradient-free post-hoc detector"
  report $R/cifar10-jpeg-pretrained --metric auroc --metric fpr_at_tpr95
fi
