#!/usr/bin/env bash
# The CUDA checks in one command, for a GPU machine where nothing can be installed from the internet.
# Run from anywhere:  bash tools/gpu_check.sh
#   1. installs the wheels carried in .whl/ (packages that machine lacks: fastprogress 1.0.5) into $GPU_CHECK_SITE
#      (default /tmp/site) and puts them, and this repository, on PYTHONPATH (no pip install of nbloop itself);
#   2. runs tests/test_cuda.py (bit-exact resume in fp32/bf16/fp16, no host syncs, GPU <-> CPU checkpoints);
#   3. runs benchmarks/gpu.py (examples/s in fp32 and bf16, Learner overhead against a hand-written loop).
# Output goes to the terminal and, when $OUT is set, to $OUT/gpu_check.txt, $OUT/test_cuda.txt,
# $OUT/test_cuda.xml and $OUT/gpu_bench.txt. Exit status: 0 when the tests and the benchmark both ran and passed.
# With a project .venv use `make gpu-check` instead. PYTHON=... picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
LOG=${OUT:-$(mktemp -d)}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 CUBLAS_WORKSPACE_CONFIG=:4096:8

{
  if compgen -G '.whl/*.whl' >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || { echo "gpu_check: installing the wheels in .whl/ failed"; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" - <<'EOF' || { echo "gpu_check: nbloop does not import here (see above)"; exit 2; }
import platform, torch, fastprogress, nbloop.all
cuda = torch.cuda.is_available()
print(f'python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, '
      f'fastprogress {fastprogress.__version__}, nbloop from {nbloop.all.__file__}')
print('GPU:', torch.cuda.get_device_name(0) if cuda else 'none: the CUDA tests will be skipped and the benchmark runs on the CPU')
EOF
} 2>&1 | tee "$LOG/gpu_check.txt"
status=${PIPESTATUS[0]}
[ "$status" = 0 ] || exit "$status"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"

limit() { if command -v timeout >/dev/null; then timeout "$@"; else shift; "$@"; fi; }   # seconds, command...

echo "== tests/test_cuda.py"
limit 200 "$PY" -m pytest -q -p no:cacheprovider -rA --junitxml="$LOG/test_cuda.xml" -m cuda tests/test_cuda.py tests/test_attacks_metrics.py 2>&1 \
  | tee "$LOG/test_cuda.txt"
tests=${PIPESTATUS[0]}

echo "== benchmarks/gpu.py"
limit 150 "$PY" benchmarks/gpu.py 2>&1 | tee "$LOG/gpu_bench.txt"
bench=${PIPESTATUS[0]}

echo "gpu_check: tests exit status $tests, benchmark exit status $bench (logs in $LOG)"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
