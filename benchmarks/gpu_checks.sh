#!/usr/bin/env bash
# Every GPU check and benchmark in one go, for a short lease on a CUDA machine (about 8 minutes on
# one H200): Gloo's and NCCL's CUDA collectives, the gpu-marked tests, the GPU training benchmark,
# the kernel benchmark and the compiled kernel tests, in that order (most telling first), each under
# its own time limit so that one hang cannot eat the rest. Everything lands in OUT_DIR:
# log.txt (every step's output and exit status) and r/ (the benchmarks' JSON, tables and plot).
#
#     bash benchmarks/gpu_checks.sh OUT_DIR [PEAK_TBPS]    # PEAK_TBPS: the card's HBM bandwidth (H200: 4.8)
#
# Run it from the repository root with disttrain importable (installed, or PYTHONPATH=. with the
# package-dir links that `pip install -e .` would make).
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR [PEAK_TBPS]}
peak=${2:-4.8}
mkdir -p "$out/r"
log="$out/log.txt"
printf '<!-- %s:start -->\n<!-- %s:end -->\n' gpu-table gpu-table kernels-table kernels-table >"$out/r/doc.md"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output and status into the log
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    echo "=== $name: $*" >>"$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - started)) s" >>"$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >>"$log" 2>&1
cli=(python3 -c "import sys; from disttrain.cli import main; sys.exit(main())")
step collectives 45 python3 benchmarks/cuda_collectives.py
step doctor 45 "${cli[@]}" doctor
step gpu-tests 150 python3 -m pytest -m gpu tests/test_gpu.py -q -x -p no:cacheprovider -o addopts=""
step main-job-on-gpu 90 "${cli[@]}" train --nproc 4 --device cuda --precision bf16 --steps 30 --eval-every 15
step gpu-bench 180 python3 benchmarks/gpu.py --out "$out/r/gpu.json" --doc "$out/r/doc.md" --plot "$out/r/gpu_round_time.png"
step kernels-bench 140 python3 benchmarks/kernels.py --peak-tbps "$peak" --ranks 32,128,512 --out "$out/r/kernels.json" --doc "$out/r/doc.md"
step kernel-tests 120 python3 -m pytest tests/test_kernels.py -q -p no:cacheprovider -o addopts="" -n 8 -k "not under_the_interpreter"
echo "=== done" >>"$log"
