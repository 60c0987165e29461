#!/usr/bin/env bash
# Create .venv, install PyTorch deliberately, then medseg (building its C++ engine) with test extras.
#
# PyTorch is installed *before* medseg so that pip never picks a build for us:
#   - a machine with an NVIDIA driver (nvidia-smi works) gets PyPI's default Linux wheel,
#     which is the CUDA build;
#   - a machine without one gets the CPU build. On this project's CI machines
#     `torch==2.13.0` is a CPU wheel on local disk; elsewhere set
#     MEDSEG_TORCH_INDEX=https://download.pytorch.org/whl/cpu to fetch the CPU wheel
#     instead of the multi-GB CUDA one.
# Overrides: MEDSEG_TORCH_SPEC (default torch==2.13.0), MEDSEG_TORCH_INDEX, MEDSEG_VENV (default .venv),
# MEDSEG_EXTRAS (default test).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${MEDSEG_VENV:-.venv}
torch_spec=${MEDSEG_TORCH_SPEC:-torch==2.13.0}
extras=${MEDSEG_EXTRAS:-test}

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment $venv"
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip

if "$py" -c "import torch" 2>/dev/null; then
    echo "[setup] torch $("$py" -c 'import torch; print(torch.__version__)') already installed; keeping it"
else
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        echo "[setup] NVIDIA GPU found: installing $torch_spec (CUDA build)"
        "$py" -m pip install --quiet "$torch_spec"
    elif [ -n "${MEDSEG_TORCH_INDEX:-}" ]; then
        echo "[setup] installing $torch_spec from $MEDSEG_TORCH_INDEX"
        "$py" -m pip install --quiet "$torch_spec" --index-url "$MEDSEG_TORCH_INDEX"
    else
        echo "[setup] no GPU: installing $torch_spec (CPU build where the local wheel exists)"
        "$py" -m pip install --quiet "$torch_spec"
    fi
fi

echo "[setup] installing medseg[$extras] (builds the C++ persistent-homology engine)"
# The build requirements live in the venv and the build runs without pip's isolation:
# an isolated build gets a new temporary nanobind path each time, so CMake reconfigured
# and every rerun of this script (and of demo.sh) recompiled the whole engine (1 min).
"$py" -m pip install --quiet "scikit-build-core>=0.10" "nanobind>=2.0"
if ! "$py" - <<'PYEOF'
import re, shutil, subprocess, sys
def version(tool):
    if shutil.which(tool) is None:
        return None
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"(\d+)\.(\d+)", out)
    return tuple(map(int, found.groups())) if found else None
cmake = version("cmake")
sys.exit(0 if cmake is not None and cmake >= (3, 18) and version("ninja") is not None else 1)
PYEOF
then
    "$py" -m pip install --quiet "cmake>=3.18" ninja  # no usable CMake/Ninja on PATH
fi
# A build folder in the checkout makes a rerun incremental (4 s instead of 1 min);
# pyproject.toml names none, so that `pip install .` also works from a read-only checkout.
"$py" -m pip install --quiet --no-build-isolation -Cbuild-dir="build/{wheel_tag}" -e ".[$extras]"
if [ "$extras" = "test" ] || [[ "$extras" == *test* ]]; then
    # Reference Betti matching implementation, used by the tests only (its own
    # dependencies are not needed: the tests load its compiled module directly).
    "$py" -m pip install --quiet --no-deps "topolosses==0.2.0"
fi
"$py" -c "import medseg, medseg.topology; print('[setup] medseg', medseg.__version__, 'ready in', '$venv')"
