#!/usr/bin/env bash
# Every check rateq's GPU figures rest on, in one run, each step under its own time limit so that one failure or
# hang leaves the others' figures: the GPU-marked tests, one layer's candidate scoring at Qwen3-8B's shapes (the
# fused key kernel against the torch path), calibration speed of Qwen3-8B (random weights, bf16, 16 x 2048 tokens,
# the default candidates) against one plain forward + backward, then one sequence under torch's profiler (the GPU's
# busy share), and decode speed on the same GPU (the shipped profile's mix of families, a uniform grid and learned
# codebooks, against DynamicCache and QuantizedCache); the limits add up to 530 s, inside one device call of 600 s
# (the 70B step, 600 s more, needs a call of its own).
#
#   bash bench/gpu_checks.sh [OUT_DIR]            # from the repository root, on a machine with a CUDA GPU
#   RATEQ_GPU_70B=1 bash bench/gpu_checks.sh      # also a Llama-3.1-70B shape spread with --device-map auto
#
# rateq is used from this checkout (PYTHONPATH), not installed. Where the machine's transformers is older than
# pyproject.toml allows, put a wheel of an allowed one first on PYTHONPATH (pip install --no-deps --target DIR).
# Each step's output goes to OUT_DIR/<step>.txt (default gpu-checks/); a summary line per step ends the run.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-checks}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary=()

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, output to the terminal and OUT_DIR/NAME.txt
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name: $*"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    rc=${PIPESTATUS[0]}
    summary+=("$name: exit $rc in $(( $(date +%s) - start )) s$([ "$rc" = 124 ] && echo " (over its ${limit} s limit)")")
}

step environment 30 python3 - <<'EOF'
import subprocess, torch, transformers
print("torch", torch.__version__, "| transformers", transformers.__version__, "| cuda", torch.version.cuda)
assert torch.cuda.is_available(), "no CUDA device"
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip())
EOF
step tests 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/calibrate/test_scale.py tests/runtime/test_cuda.py
step scoring-qwen3-8b 40 python3 bench/candidate_scoring.py --device cuda
step calibration-qwen3-8b 220 python3 bench/calibration_speed.py --device cuda --model qwen3-8b --random-weights \
    --profile
step decode-qwen3-8b 140 python3 bench/decode_speed.py --device cuda --model qwen3-8b --random-weights \
    --contexts 4096,16384,32768 --steps 16 --backends quanto,hqq
if [ "${RATEQ_GPU_70B:-0}" = 1 ]; then
    step calibration-70b-device-map 600 python3 bench/calibration_speed.py --device-map auto --model llama-3.1-70b \
        --random-weights --n 4 --max-memory "0=120GiB,cpu=100GiB"
fi

echo "== summary"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
