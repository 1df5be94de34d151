#!/usr/bin/env bash
# The next GPU session's open questions (issues 9 and 11) in two device calls of at most 600 s each (the second right
# after the first, while the machine is still warm: about 13 minutes of device time with the start), each part under
# its own timeout so that a slow part leaves the others their time.
#
#   here, first:  python bench/gpu_report.py --prepare     (.whl/ + .gpu-data/: git-ignored, ~52 MiB; carry both)
#   there:        bash bench/gpu_session.sh 1               (~9 minutes: step_profile, then the Dubai quality run)
#                 bash bench/gpu_session.sh 2               (~3 minutes: the Kampala quality run)
#   each writes $OUT/*.json and *.log and prints the tables.
#
# 1. step_profile: whether the 3-channel input convolution (cuDNN pads it) is the slow sm80 kernel: the step with
#    the images zero-padded to 8 and 16 channels, and a profile whose per-instruction lines name each convolution's
#    shapes. Then gpu_report --quality on Dubai: 3,000 steps of 3 of its 4 default
#    recipes (not Lovasz), with the test IoU along each run and the IoU on the training crops.
# 2. gpu_report --quality on Kampala (OSM labels with instances): residual / residual + borders / today, 500 steps;
#    XLA's autotuning results of part 1 are in the user's compilation cache, so its compiles are short.
# Each recipe's row is printed as it finishes ("quality: {...}" in the log), so a timeout loses only the recipe it
# stopped.
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

# the default recipes less the least promising (Lovasz: -3.0 points on the CPU), so that part 1 ends in ~9 minutes
# with the start and leaves part 2 the rest of a 15-minute lease; Kampala's default recipe first
dubai_recipes="residual + overlapping crops,residual + overlapping crops + depth 5"
dubai_recipes+=",residual + overlapping crops + weight decay 0.05"
kampala_recipes="residual,residual + borders,today"

case "$part" in
1)
    timeout 180 "$python" bench/step_profile.py "${profile[@]}" --variants default,stem=8,stem=16 --top 25 \
        --out "$out/profile.json" > "$out/profile.log" 2>&1
    echo "step_profile: exit $?"
    timeout 360 "$python" bench/gpu_report.py --quality --datasets dubai "${quality[@]}" --recipes "$dubai_recipes" \
        --out "$out/quality-dubai.json" > "$out/quality-dubai.log" 2>&1
    echo "gpu_report --quality --datasets dubai: exit $?"
    logs=("$out/profile.log" "$out/quality-dubai.log")
    ;;
2)
    timeout 300 "$python" bench/gpu_report.py --quality --datasets kampala "${quality[@]}" --recipes "$kampala_recipes" \
        --out "$out/quality-kampala.json" > "$out/quality-kampala.log" 2>&1
    echo "gpu_report --quality --datasets kampala: exit $?"
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
