#!/usr/bin/env bash
# One prepared check of the CUDA backend on a machine with an NVIDIA GPU (< 5 min on
# one H200): build with CUDA, the topology tests on the CUDA backend, compute-sanitizer
# (memcheck, racecheck) on a small case, and the benchmark table (benchmarks/gpu_bench.py).
# Usage: bash benchmarks/gpu_check.sh   (from the repository root; PYTHON=... to choose)
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
[ -x .venv/bin/python ] && py=${PYTHON:-.venv/bin/python}
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
nvcc --version | tail -1

step "build (pip install --no-build-isolation -e ., CUDA on)"
t0=$(date +%s)
if ! "$py" -m pip install --no-build-isolation --no-deps -e . -Ccmake.define.MEDSEG_CUDA=ON > /tmp/medseg_gpu_build.log 2>&1; then
    echo "pip build failed (needs scikit-build-core and nanobind in the environment); log tail:"
    tail -20 /tmp/medseg_gpu_build.log
    exit 1
fi
grep "medseg:" /tmp/medseg_gpu_build.log | sed 's/^ *//'
echo "built in $(( $(date +%s) - t0 )) s"
"$py" - <<'PY' || exit 1
from medseg.topology import _inputs
m = _inputs.cuda_engine()
assert m is not None, "_engine_cuda was not built"
print("CUDA runtime", m.runtime_version(), "devices", m.device_count())
assert _inputs.cuda_available(), "no usable CUDA device"
PY

step "topology tests on the CUDA backend (MEDSEG_TOPOLOGY_BACKEND=cuda)"
if "$py" -c "import pytest, hypothesis" 2>/dev/null; then
    MEDSEG_TOPOLOGY_BACKEND=cuda timeout 150 "$py" -m pytest -q -x -p no:cacheprovider \
        tests/topology/test_parallel_backend.py tests/topology/test_reference_cases.py tests/topology/test_api.py \
        || status=1
else
    echo "pytest/hypothesis missing: checking the reference cases directly"
    timeout 150 "$py" - <<'PY' || status=1
import json, pathlib, numpy as np
from medseg.topology import _engine, _inputs
cuda = _inputs.cuda_engine()
data = pathlib.Path("tests/data/reference")
for case in json.loads((data / "expected.json").read_text())["cases"]:
    for k in ("a", "b"):
        x = np.load(data / case[k])
        for sup in (False, True):
            for con in "VT":
                s, c = _engine.barcode(x, sup, con), cuda.barcode(x, sup, con)
                for f in ("birth", "death"):
                    assert all(np.array_equal(p, q) for p, q in zip(s[f], c[f])), (case["name"], k, sup, con)
                assert np.array_equal(s["essential_birth"], c["essential_birth"])
print("all reference cases identical on CUDA")
PY
fi

step "compute-sanitizer (memcheck, racecheck) on a small case"
cat > /tmp/medseg_small_case.py <<'PY'
import numpy as np
from medseg.topology import _inputs
cuda = _inputs.cuda_engine()
rng = np.random.default_rng(0)
for x in (rng.integers(0, 3, (12, 13, 14)).astype(np.float32), rng.random((40, 41))):
    for con in "VT":
        cuda.barcode(x, True, con)
        cuda.matching_dim0_parallel(x, (x > 0.5).astype(x.dtype), True, con)
print("small case done")
PY
if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck; do
        timeout 120 compute-sanitizer --tool $tool --error-exitcode 7 "$py" /tmp/medseg_small_case.py \
            > /tmp/medseg_sanitizer_$tool.log 2>&1
        rc=$?
        tail -3 /tmp/medseg_sanitizer_$tool.log
        echo "$tool rc=$rc"
        [ $rc -eq 0 ] || status=1
    done
else
    echo "compute-sanitizer not found"
fi

step "benchmark"
timeout 150 "$py" benchmarks/gpu_bench.py --repeat 2 || status=1

step "done (status $status)"
exit $status
