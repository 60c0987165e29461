#!/usr/bin/env bash
# The Python packages medseg's GPU check needs that the device machine's image lacks
# (/work/.library/device/KINDS.md lists what it holds: torch, numpy, scipy, scikit-image,
# pyyaml, tqdm, pytest, hypothesis, nanobind, scikit-build-core, but no pydantic or
# MONAI), downloaded here as wheels for that machine's Python (3.12, manylinux x86_64)
# into .gpu_wheels/ (git-ignored, about 5 MB). Carry the folder with the check:
#   bash benchmarks/gpu_wheels.sh
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_wheels", <the TopoMortar folders>])
# gpu_check.sh installs them with --target into a folder it puts on PYTHONPATH. Their
# versions are this environment's (.venv), where the test suite passes with them.
# Left out on purpose (not imported by the check's steps, checked by hiding them here):
# SimpleITK (52 MB), nibabel, gudhi, blosc2, isal; topolosses has no 3.12 wheel (the
# benchmark's reference column stays empty there; the CPU suite cross-checks it).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=.gpu_wheels
python_version=${GPU_PYTHON_VERSION:-3.12}
specs=()
for dist in pydantic pydantic-core annotated-types typing-inspection typing-extensions monai; do
    version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")
    specs+=("$dist==$version")
done
rm -rf "$out"
mkdir -p "$out"
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any --dest "$out" "${specs[@]}"
ls "$out"
du -sh "$out"
