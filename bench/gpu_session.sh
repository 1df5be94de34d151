#!/usr/bin/env bash
# The next GPU session's open questions (issues 9 and 11) in two device calls (the second right after the first, while
# the machine is still warm: about 13 minutes of a 15-minute lease with the start), each part under its own timeout
# so that a slow part leaves the others their time.
#
#   here, first:  python bench/gpu_report.py --prepare     (.whl/ + .gpu-data/: git-ignored, ~52 MiB; carry both)
#   there:        bash bench/gpu_session.sh 1               (~8-9 minutes: step_profile, then the Dubai quality run)
#                 bash bench/gpu_session.sh 2               (~3 minutes: the Kampala quality run)
#   each writes $OUT/*.json and *.log and prints the tables.
#
# 1. step_profile: the default step (up-convolutions as matrix products, trainer.model.UpConv2x2) against the
#    transposed convolution it replaced (whose weight gradient was 14.9 % of the H200's step) and against the 1 x 1
#    convolutions as matrix products too (matmul1x1), and a profile of the default. Then gpu_report --quality on
#    Dubai, 3,000 steps: the moving average of the parameters (EMA 0.999: each row holds the same run's own
#    parameters too), then the two default recipes the last session's time did not reach (Lovasz 0.2, weight decay
#    0.05: level with the rerun up to step 2,400 there, so last), with the test IoU along each run and the IoU on the
#    training crops.
# 2. gpu_report --quality on Kampala (OSM labels with instances): residual, residual + borders, residual + EMA, and
#    last the plain U-Net ("today": the best object F1 without TTA in the third session, 0.457), 500 steps, seeds 1
#    and 2 (seed 0 ran on 2026-11-28: the border output gave object F1 0.540 against 0.434 with TTA; is it real?).
# The quality runs train 3 at a time (gpu_report --parallel 3: each run in a process of its own, with a third of the
# GPU's memory and of the decode workers): one run at batch 32 left the H200 idle while it compiled, evaluated and
# matched buildings on the host (120-150 s a recipe, of which 60 s trained), so three at once should take well under
# three times one. The rows' seconds and the parts' wall times say whether it did.
# timeout sends SIGTERM (gpu_report then stops its runs, their workers and its PostgreSQL), and SIGKILL 20 s later if
# that hangs. Each run's row is printed as it finishes ("quality: {...}" in the log); with runs 3 at a time a timeout
# stops all three in flight, so the limits leave room. Dubai, estimated: ~20 s of loading, ~55 s compiling (the three
# at once), ~170 s training (3 x 96,000 images at the 1,600-1,900 images/s the GPU gives batch-32 steps, time-sliced
# between the processes), ~40 s of evaluations: ~290 s of its 360.
#
# QUICK=1 bash bench/gpu_session.sh 1 (and 2) runs the same at toy sizes (a CPU, a few minutes): proves it here.
set -u
part=${1:-1}
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
if [ -n "${QUICK:-}" ]; then
    profile=(--base-filters 4 --batch-size 2 --steps 2 --profile 1)
    quality=(--quick)
else
    profile=(--base-filters 32 --batch-size 128 --steps 10 --profile 5)
    quality=(--train-steps 3000)
fi

dubai_recipes="residual + overlapping crops + EMA 0.999,residual + overlapping crops + Lovasz 0.2,residual + overlapping crops + weight decay 0.05"
kampala_recipes="residual,residual + borders,residual + EMA 0.999,today"

# gpu_report --quality with its runs 3 at a time (--parallel 3); where that fails before any row, within 90 s (a
# failure of the parallel set-up itself, never tried on a GPU before), the same again one run at a time with the time
# left. Arguments: the log, the time limit in seconds, gpu_report's arguments.
quality() {
    local log=$1 limit=$2 started=$SECONDS rc
    shift 2
    timeout -k 20 "$limit" "$python" bench/gpu_report.py --quality "$@" --parallel 3 > "$log" 2>&1
    rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && [ $rc -ne 143 ] && ! grep -q "^quality: " "$log" \
            && [ $((SECONDS - started)) -lt 90 ]; then
        echo "gpu_report --parallel 3: exit $rc before any row; again, one run at a time (its log: $log.parallel)"
        mv "$log" "$log.parallel"
        timeout -k 20 $((limit - (SECONDS - started))) "$python" bench/gpu_report.py --quality "$@" > "$log" 2>&1
        rc=$?
    fi
    return $rc
}

case "$part" in
1)
    timeout -k 20 170 "$python" bench/step_profile.py "${profile[@]}" --variants default,convtranspose,matmul1x1 --top 25 \
        --out "$out/profile.json" > "$out/profile.log" 2>&1
    echo "step_profile: exit $? at $SECONDS s"
    quality "$out/quality-dubai.log" 360 --datasets dubai "${quality[@]}" --recipes "$dubai_recipes" \
        --out "$out/quality-dubai.json"
    echo "gpu_report --quality --datasets dubai: exit $? at $SECONDS s"
    logs=("$out/profile.log" "$out/quality-dubai.log")
    ;;
2)
    quality "$out/quality-kampala.log" 200 --datasets kampala "${quality[@]}" --recipes "$kampala_recipes" \
        --seeds 1,2 --out "$out/quality-kampala.json"
    echo "gpu_report --quality --datasets kampala: exit $? at $SECONDS s"
    logs=("$out/quality-kampala.log")
    ;;
*)
    echo "usage: bash bench/gpu_session.sh 1|2" >&2
    exit 2
    ;;
esac

for log in "${logs[@]}"; do
    echo "== $log"
    grep -v -e cuda_timer -e "^quality: " -e " INFO " -e "^W[0-9]" "$log" | tail -n 80
done
