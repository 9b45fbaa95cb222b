#!/usr/bin/env bash
# SDPGO's own choices in the memorisation regime (issue 22, parts 3 and 5): each variant is a label_noise.py study of
# SDPGO on the validation split, 3 seeds; one table per variant under benchmarks/results/ablations/memorize_<name>.*.
# A name ending in _asym runs under class-flip noise η = 0.4 (with CE beside its default), the others on clean
# labels (with DLB beside the default). Usage: bash benchmarks/ablate_memorize.sh [NAME ...]
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A VARIANTS=(
    [default]=""
    [fixed05]="--sdpgo-alpha-mode fixed --sdpgo-alpha 0.5"
    [fixed1]="--sdpgo-alpha-mode fixed --sdpgo-alpha 1"
    [topkall]="--sdpgo-topk -1"
    [additive]="--sdpgo-weighting additive"
    [tau1]="--sdpgo-temperature 1"
    [tau4]="--sdpgo-temperature 4"
    [tensors]="--sdpgo-replay tensors"
    [warmup10]="--sdpgo-alpha-warmup 204"  # 10 % of the 2,040 steps
    [layers12]="--sdpgo-layers layer1 layer2"  # the two stages before the default last two
)
ORDER=(default fixed05 fixed1 topkall additive tau1 tau4 tensors warmup10 layers12 default_asym topkall_asym fixed05_asym)
for name in "${@:-${ORDER[@]}}"; do
    variant=${name%_asym}
    if [[ $name == *_asym ]]; then condition=asym0.4; beside=CE; else condition=clean; beside=DLB; fi
    methods=SDPGO; [[ $variant == default ]] && methods="SDPGO $beside"
    python benchmarks/label_noise.py --preset memorize --methods $methods --conditions $condition --eval-split validation \
        --jobs 2 --threads 1 --extra "${VARIANTS[$variant]}" \
        --out-md "benchmarks/results/ablations/memorize_$name.md" --out-csv "benchmarks/results/ablations/memorize_$name.csv" \
        --out-png "benchmarks/results/ablations/memorize_$name.png"
done
