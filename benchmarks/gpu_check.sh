#!/usr/bin/env bash
# One prepared check of the CUDA backend on a machine with an NVIDIA GPU (< 5 min on
# one H200): build with CUDA, the topology tests on the CUDA backend, compute-sanitizer
# (memcheck, initcheck) on a small case (barcodes, matchings, a batch on streams), and
# the benchmark table (benchmarks/gpu_bench.py: barcodes and Betti matchings, CUDA vs
# CPU engine vs reference, identical results checked), and the cost of the topology loss
# terms in a TopoMortar training step of the paper's protocol (benchmarks/topomortar.py).
# Usage: bash benchmarks/gpu_check.sh          (from anywhere; PYTHON=... to choose)
#        bash benchmarks/gpu_check.sh --dry    (no GPU: the same steps on backend
#                                               "cpu-parallel", no build, no sanitizer)
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$(command -v python3 || command -v python)}  # the GPU image's python3 holds torch
[ -x .venv/bin/python ] && py=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1  # what a step printed survives its timeout
logs=${OUT:-/tmp}           # on the device machine $OUT comes back: build and sanitizer logs with it
dry=0
[ "${1:-}" = "--dry" ] && dry=1
backend=cuda
[ $dry -eq 1 ] && backend=cpu-parallel
status=0
step() { echo; echo "=== $* ($(date +%T))"; }
t_start=$(date +%s)

if [ $dry -eq 0 ]; then
    step "device"
    if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
        # nothing to check without a GPU: stop before the CUDA build reinstalls the package
        echo "gpu_check.sh: no NVIDIA GPU here (nvidia-smi failed); run it on a GPU machine, or --dry for the CPU path"
        exit 1
    fi
    nvcc --version | tail -1

    step "build (pip install --no-build-isolation -e ., CUDA on)"
    t0=$(date +%s)
    if ! "$py" -m pip install --no-build-isolation --no-deps -e . -Ccmake.define.MEDSEG_CUDA=ON > "$logs/medseg_gpu_build.log" 2>&1; then
        echo "pip build failed; log tail (a missing module here: scikit-build-core and nanobind must be in the environment):"
        tail -20 "$logs/medseg_gpu_build.log"
        exit 1
    fi
    grep "medseg:" "$logs/medseg_gpu_build.log" | sed 's/^ *//'
    echo "built in $(( $(date +%s) - t0 )) s"
    "$py" - <<'PY' || exit 1
from medseg.topology import _inputs
m = _inputs.cuda_engine()
assert m is not None, "_engine_cuda was not built"
print("CUDA runtime", m.runtime_version(), "devices", m.device_count())
assert _inputs.cuda_available(), "no usable CUDA device"
PY
fi

step "Python packages the device image lacks"
# The image has torch, numpy, scipy, scikit-image, pytest and hypothesis but not pydantic
# (medseg.losses, medseg.config) or MONAI (the TopoMortar step's DynUNet): carry their
# wheels, made here by benchmarks/gpu_wheels.sh, as .gpu_wheels/.
if "$py" -c "import pydantic, monai, yaml" 2>/dev/null; then
    echo "pydantic, monai and yaml import"
elif ls .gpu_wheels/*.whl > /dev/null 2>&1; then
    deps=${TMPDIR:-/tmp}/medseg_gpu_deps
    rm -rf "$deps"
    if "$py" -m pip install --quiet --no-index --no-deps --target "$deps" .gpu_wheels/*.whl; then
        export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}"
        "$py" -c "import pydantic, monai; print('installed from .gpu_wheels: pydantic', pydantic.VERSION, 'monai', monai.__version__)" || status=1
    else
        echo "could not install .gpu_wheels/*.whl"
        status=1
    fi
else
    echo "pydantic or monai missing and no .gpu_wheels/ here (bash benchmarks/gpu_wheels.sh makes it; carry it)"
    status=1
fi

step "topology tests on the $backend backend (MEDSEG_TOPOLOGY_BACKEND=$backend)"
# The loss tests run without the variable: their target-cache test is about the CPU
# engine's cache; their CUDA-tensor test runs on "auto", "cpu" and "cuda" by itself. When
# this whole check passes, turn on CUDA_FOR_AUTO in medseg/topology/_backends.py ("auto"
# then picks "cuda" for CUDA tensors).
if "$py" -c "import pytest, hypothesis" 2>/dev/null; then
    # The loss (medseg.losses) needs pydantic, which the GPU image lacks (carry its wheels:
    # pydantic, pydantic-core, annotated-types, typing-inspection). Without it its tests are
    # left out, loudly, instead of failing first and stopping -x before every CUDA matching test.
    no_loss=()
    if ! "$py" -c "import pydantic, yaml" 2>/dev/null; then
        echo "NOT RUN: the loss's tests (pydantic or pyyaml missing); this check does not pass without them"
        no_loss=(--deselect tests/topology/test_parallel_matching.py::test_loss_identical_on_cpu_parallel)
        status=1
    fi
    MEDSEG_TOPOLOGY_BACKEND=$backend timeout 120 "$py" -m pytest -q -x -p no:cacheprovider ${no_loss[@]+"${no_loss[@]}"} \
        tests/topology/test_parallel_backend.py tests/topology/test_parallel_matching.py \
        tests/topology/test_reference_cases.py tests/topology/test_api.py \
        || status=1
    # topolosses (the reference) has no wheel for the image's Python: its cross-checks skip
    # here (the CPU suite runs them); the loss's CUDA-tensor test is what this run adds
    [ ${#no_loss[@]} -eq 0 ] && { MEDSEG_ALLOW_MISSING_REFERENCE=1 timeout 60 "$py" -m pytest -q -x -p no:cacheprovider \
        tests/topology/test_betti_matching_loss.py || status=1; }
else
    echo "pytest/hypothesis missing: checking the reference cases directly"
    MEDSEG_BACKEND=$backend timeout 120 "$py" - <<'PY' || status=1
import json, os, pathlib, numpy as np
from medseg.topology import _engine, _inputs
cuda = _inputs.cuda_engine() if os.environ["MEDSEG_BACKEND"] == "cuda" else None
data = pathlib.Path("tests/data/reference")
keys = [f"{s}_{side}_{end}" for s in ("matched", "unmatched") for side in "ab" for end in ("birth", "death")]
for case in json.loads((data / "expected.json").read_text())["cases"]:
    a, b = np.load(data / case["a"]), np.load(data / case["b"])
    for sup in (False, True):
        for con in "VT":
            for x in (a, b):
                s = _engine.barcode(x, sup, con)
                c = cuda.barcode(x, sup, con) if cuda else _engine.barcode_parallel(x, sup, con, 2)
                for f in ("birth", "death"):
                    assert all(np.array_equal(p, q) for p, q in zip(s[f], c[f])), (case["name"], sup, con)
                assert np.array_equal(s["essential_birth"], c["essential_birth"])
            args = (sup, con, True, True, 1, False)
            s = _engine.matching(a, b, *args)
            c = cuda.matching(a, b, *args) if cuda else _engine.matching_parallel(a, b, *args)
            for k in keys:
                assert all(np.array_equal(p, q) for p, q in zip(s[k], c[k])), (case["name"], sup, con, k)
print("all reference cases identical (barcodes and matchings)")
PY
fi

if [ $dry -eq 0 ]; then
    step "compute-sanitizer (memcheck, initcheck) on a small case"
    cat > /tmp/medseg_small_case.py <<'PY'
import numpy as np
from medseg.topology import _engine, _inputs
cuda = _inputs.cuda_engine()
rng = np.random.default_rng(0)
for x in (rng.integers(0, 3, (12, 13, 14)).astype(np.float32), rng.random((40, 41))):
    y = (x > 0.5).astype(x.dtype)
    for con in "VT":
        cuda.barcode(x, True, con)
        for inter in (False, True):
            r = cuda.matching(x, y, True, con, True, True, 2, inter)
            s = _engine.matching(x, y, True, con, True, True, 1, inter)
            assert all(np.array_equal(p, q) for k in s if k.startswith(("matched", "unmatched"))
                       for p, q in zip(s[k], r[k]))
xs = [rng.random((10, 11, 9)).astype(np.float32) for _ in range(3)]
cuda.matching_batch(xs, [(x > 0.5).astype(np.float32) for x in xs], False, "V", True, True, 3, False)
print("small case done")
PY
    if command -v compute-sanitizer >/dev/null 2>&1; then
        # racecheck sees shared memory only, which the engine's own kernels never use;
        # initcheck sees reads of never-written device memory (cudaMallocAsync buffers are
        # not zeroed, HostExec's std::vector arrays are: cpu-parallel cannot show those)
        for tool in memcheck initcheck; do
            timeout 75 compute-sanitizer --tool $tool --error-exitcode 7 "$py" /tmp/medseg_small_case.py \
                > "$logs/medseg_sanitizer_$tool.log" 2>&1
            rc=$?
            tail -3 "$logs/medseg_sanitizer_$tool.log"
            echo "$tool rc=$rc"
            [ $rc -eq 0 ] || status=1
        done
    else
        echo "compute-sanitizer not found"
    fi
fi

step "benchmark"
if [ $dry -eq 0 ]; then
    timeout 150 "$py" benchmarks/gpu_bench.py --repeat 2 || status=1
else
    timeout 150 "$py" benchmarks/gpu_bench.py --backend cpu-parallel --sizes 24 32 --batch 2 --repeat 1 || status=1
fi

step "TopoMortar training step: DynUNet of the paper's protocol, batch 10 of 512², each loss term's cost"
# Issue I's goal: adding betti_matching to dice_ce makes this step at most 1.5x slower
# (the "in step" x network <= 0.5 in the table: dice_ce + the term minus dice_ce alone, which
# shares its softmax), with the CUDA backend or the CPU engine (one row each:
# betti_matching[cuda], betti_matching[cpu]); the rows "(all 3 heads)" are the term on
# every deep-supervision head, as benchmarks/topomortar_study.yaml trains it (heads: all),
# the others the final head alone (heads: final). Needs the prepared training images: run with
# carry=[".gpu_wheels", "data/Dataset201_TopoMortar/imagesTr", "data/Dataset201_TopoMortar/labelsTr",
#        "data/Dataset201_TopoMortar/dataset.json", "data/Dataset201_TopoMortar/splits_final.json"] (33 MB).
topomortar=${TOPOMORTAR:-data/Dataset201_TopoMortar}
if ! "$py" -c "import monai, pydantic" 2>/dev/null; then
    echo "NOT RUN: monai or pydantic missing (see the packages step above)"
    status=1
elif [ $dry -eq 1 ]; then
    rm -rf /tmp/medseg_topomortar_tiny
    "$py" data_scripts/prepare_topomortar.py --src tests/data/topomortar --out /tmp/medseg_topomortar_tiny > /dev/null &&
        timeout 150 "$py" benchmarks/topomortar.py --quick --data /tmp/medseg_topomortar_tiny \
            --model-config benchmarks/topomortar_study.yaml --losses betti_matching \
            --betti-backends cpu,cpu-parallel || status=1
elif [ -f "$topomortar/dataset.json" ] && [ -d "$topomortar/imagesTr" ]; then
    timeout 240 "$py" benchmarks/topomortar.py --device cuda --data "$topomortar" \
        --model-config benchmarks/topomortar_study.yaml --images 10 --crop-batch 10 --crop-size 512 \
        --full-batch 10 --losses betti_matching,cldice,skeleton_recall --betti-backends cuda,cpu --repeats 3 \
        --json "${OUT:-/tmp}/topomortar_gpu.json" || status=1
else
    echo "skipped: no prepared TopoMortar training images at $topomortar (see the carry list above)"
fi

step "done (status $status, $(( $(date +%s) - t_start )) s)"
exit $status
