#!/usr/bin/env bash
# Every GPU check and benchmark in one go, for a short lease of a GPU machine (about 9 minutes of
# work; each step has its own time limit, so one that hangs does not eat the others). From the
# repository root, with gradbench installed and MNIST's IDX files reachable:
#   OUT=/some/dir GRADBENCH_MNIST_SOURCE=/path/to/mnist bash benchmarks/perf/gpu_session.sh
# Logs land in $OUT/<step>.log, the bench's table in $OUT/perf.json; each step's exit code and last
# lines are printed as it ends. The steps, most wanted first:
#   cpu_vs_cuda      the same runs on CPU and GPU, a group against its members, tf32/bf16/fp16/fp64
#   grid_overlap     the quick grid with the recorder (--overlap on, the CUDA default), fresh store
#   grid_inline      the same with --overlap off: what the recorder gains on a GPU
#   runs_per_hour    the standard-grid slice with ensembles, and the whole grid projected
#   bench_quick      gradbench bench --quick: the CPU table's rows on this GPU
set -u
OUT=${OUT:-gpu-session}
mkdir -p "$OUT"
DATA=${DATA:-data}

step() {  # step NAME SECONDS COMMAND...: run it under a limit, its output into $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local code=$?
    echo "== $name: exit $code in $((SECONDS - start)) s (limit $limit)"
    tail -n 4 "$OUT/$name.log"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" > "$OUT/torch.txt" 2>&1
gradbench prepare --data-dir "$DATA" > "$OUT/prepare.log" 2>&1 || { echo "prepare failed"; cat "$OUT/prepare.log"; exit 1; }

step cpu_vs_cuda 120 python benchmarks/perf/cpu_vs_cuda.py --data-dir "$DATA"
for mode in on off; do
    name=grid_$([ $mode = on ] && echo overlap || echo inline)
    step "$name" 120 env MLFLOW_TRACKING_URI="sqlite:///$(cd "$OUT" && pwd)/$name.db" \
        gradbench grid benchmarks/quick.yaml --data-dir "$DATA" --overlap $mode --no-progress
done
step runs_per_hour 120 python benchmarks/perf/runs_per_hour.py --data-dir "$DATA" --mode ensembles
step bench_quick 240 gradbench bench --quick --data-dir "$DATA"
cp reports/perf.json "$OUT/perf.json" 2>/dev/null || true
