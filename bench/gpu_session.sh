#!/usr/bin/env bash
# The next GPU session's open questions (issues 9 and 11) in one device call of at most 600 s (~9 minutes on an
# H200), each part under its own timeout so that a slow part leaves the others their time.
#
#   here, first:  python bench/gpu_report.py --prepare     (.whl/ + .gpu-data/: git-ignored, ~52 MiB; carry both)
#   there:        bash bench/gpu_session.sh                 (writes $OUT/*.json and *.log, prints the tables)
#
# 1. step_profile: whether the 3-channel input convolution (cuDNN pads it) is the slow sm80 kernel: the step with
#    the images zero-padded to 8 and 16 channels, and a profile whose per-instruction lines name each convolution's
#    shapes.
# 2. gpu_report --quality: Dubai (3,000 steps; its 3 default recipes, with the test IoU along each run) and Kampala
#    (OSM labels with instances: today / residual / residual + borders, 500 steps). Each recipe's row is printed as
#    it finishes ("quality: {...}" in quality.log), so a timeout loses only the recipe it stopped.
#
# QUICK=1 bash bench/gpu_session.sh runs the same at toy sizes (a CPU, a few minutes): proves the script here.
set -u
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

timeout 150 "$python" bench/step_profile.py "${profile[@]}" --variants default,stem=8,stem=16 --top 25 \
    --out "$out/profile.json" > "$out/profile.log" 2>&1
echo "step_profile: exit $?"
timeout 400 "$python" bench/gpu_report.py --quality --datasets dubai,kampala "${quality[@]}" \
    --out "$out/quality.json" > "$out/quality.log" 2>&1
echo "gpu_report --quality: exit $?"

for log in "$out/profile.log" "$out/quality.log"; do
    echo "== $log"
    grep -v -e cuda_timer -e "^quality: " -e " INFO " -e "^W[0-9]" "$log" | tail -n 80
done
