"""The data-parallel backend (issue F) gives exactly the sequential engine's pairs.

"cpu-parallel" runs the CUDA backend's algorithm (csrc/spanning.hpp: spanning forests
by Boruvka, elder rule over the forest edges) on CPU threads, so these tests check the
GPU algorithm's logic on machines without a GPU. The CUDA tests run where a device is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import medseg.topology as topo
from medseg.topology import _backends, _engine, _inputs

DATA = Path(__file__).resolve().parents[1] / "data" / "reference"
CASES = json.loads((DATA / "expected.json").read_text())["cases"]
CUDA = _inputs.cuda_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device (or the CUDA backend was not built)")


def assert_same_raw(seq: dict, par: dict) -> None:
    assert len(seq["birth"]) == len(par["birth"])
    for k in ("birth", "death"):
        for d, (a, b) in enumerate(zip(seq[k], par[k])):
            assert a.shape == b.shape, f"dimension {d}: {a.shape[0]} vs {b.shape[0]} pairs"
            np.testing.assert_array_equal(a, b, err_msg=f"{k} coordinates of dimension {d}")
    np.testing.assert_array_equal(seq["essential_birth"], par["essential_birth"])


def check_parallel(x: np.ndarray, superlevel: bool, construction: str, threads: int = 2) -> None:
    x = np.ascontiguousarray(x)
    seq = _engine.barcode(x, superlevel, construction)
    par = _engine.barcode_parallel(x, superlevel, construction, threads)
    assert_same_raw(seq, par)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("construction", ["V", "T"])
def test_reference_cases(case, construction):
    for name in ("a", "b"):
        x = np.load(DATA / case[name])
        for superlevel in (False, True):
            check_parallel(x, superlevel, construction)
    check_parallel(np.load(DATA / case["a"]).astype(np.float32), False, construction, threads=1)


def test_reference_counts_through_the_api():
    case = next(c for c in CASES if c["name"] == "random16")
    for name in ("a", "b"):
        bc = topo.barcode(np.load(DATA / case[name]), filtration="sublevel", backend="cpu-parallel")
        assert bc.num_pairs.tolist() == case[f"num_pairs_{name}"]


def images(draw_ties: bool):
    @st.composite
    def strategy(draw):
        ndim = draw(st.sampled_from([2, 3]))
        hi = 9 if ndim == 2 else 6
        shape = tuple(draw(st.integers(1, hi)) for _ in range(ndim))
        seed = draw(st.integers(0, 2**31 - 1))
        rng = np.random.default_rng(seed)
        if draw_ties:
            levels = draw(st.integers(1, 4))
            x = rng.integers(0, levels, size=shape).astype(np.float64)
        else:
            x = rng.standard_normal(shape)
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        return x.astype(dtype)

    return strategy()


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(x=images(draw_ties=True), superlevel=st.booleans(), construction=st.sampled_from("VT"),
       threads=st.integers(1, 3))
def test_property_tied_values(x, superlevel, construction, threads):
    check_parallel(x, superlevel, construction, threads)


@SETTINGS
@given(x=images(draw_ties=False), superlevel=st.booleans(), construction=st.sampled_from("VT"))
def test_property_random_values(x, superlevel, construction):
    check_parallel(x, superlevel, construction)


def test_larger_images_many_threads():
    rng = np.random.default_rng(7)
    check_parallel(rng.random((160, 150)), True, "V", threads=4)
    check_parallel(rng.integers(0, 3, size=(40, 41, 42)).astype(np.float32), False, "T", threads=3)
    check_parallel(np.where(rng.random((33, 34, 35)) > 0.5, 1.0, -0.0), True, "V", threads=2)


def test_signed_zero_and_extremes_tie():
    x = np.array([[0.0, -0.0, 1.0], [-0.0, np.finfo(np.float64).max, -np.finfo(np.float64).max]])
    for construction in "VT":
        for superlevel in (False, True):
            check_parallel(x, superlevel, construction, threads=1)


def test_backend_validation():
    x = np.zeros((4, 4))
    with pytest.raises(ValueError, match=r"^backend must be one of .*, got 'gpu'$"):
        topo.barcode(x, backend="gpu")
    if not CUDA:
        with pytest.raises(topo.TopologyBackendError):
            topo.barcode(x, backend="cuda")
    assert _backends.resolve_backend("cpu", x).name == "cpu"
    parallel = _backends.resolve_backend("cpu-parallel", x)
    assert parallel.name == "cpu-parallel"
    assert _backends.resolve_backend(parallel, x) is parallel  # a resolved backend is used as is
    assert topo.barcode(x, backend=parallel).num_pairs.tolist() == topo.barcode(x, backend="cpu").num_pairs.tolist()


def test_environment_variable_replaces_auto(monkeypatch):
    monkeypatch.setenv("MEDSEG_TOPOLOGY_BACKEND", "cpu-parallel")
    assert _backends.resolve_backend("auto", np.zeros((3, 3))).name == "cpu-parallel"
    assert _backends.resolve_backend("cpu", np.zeros((3, 3))).name == "cpu"
    monkeypatch.setenv("MEDSEG_TOPOLOGY_BACKEND", "nope")
    with pytest.raises(ValueError):
        _backends.resolve_backend("auto")


def test_auto_keeps_cuda_inputs_on_the_cpu_engine_until_the_device_path_is_checked(monkeypatch):
    """No GPU has run the CUDA backend yet: "auto" sends CUDA inputs to the CPU engine
    unless CUDA_FOR_AUTO is switched on; "cuda" and MEDSEG_TOPOLOGY_BACKEND=cuda opt in."""
    monkeypatch.delenv("MEDSEG_TOPOLOGY_BACKEND", raising=False)
    monkeypatch.setattr(_inputs, "cuda_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(_inputs, "is_cuda_array", lambda x: True)
    x = np.zeros((3, 3))
    assert _backends.CUDA_FOR_AUTO is False
    assert _backends.resolve_backend("auto", x).name == "cpu"
    assert _backends.resolve_backend("cuda", x).name == "cuda"
    monkeypatch.setenv("MEDSEG_TOPOLOGY_BACKEND", "cuda")
    assert _backends.resolve_backend("auto", x).name == "cuda"
    monkeypatch.delenv("MEDSEG_TOPOLOGY_BACKEND")
    monkeypatch.setattr(_backends, "CUDA_FOR_AUTO", True)
    assert _backends.resolve_backend("auto", x).name == "cuda"


def test_importing_topology_does_not_load_cuda():
    code = (
        "import sys, medseg.topology as t, numpy as np; t.barcode(np.zeros((3, 3)));"
        "assert 'medseg.topology._engine_cuda' not in sys.modules"
    )
    env = {k: v for k, v in os.environ.items() if k != "MEDSEG_TOPOLOGY_BACKEND"}  # "auto" as a user has it
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the CUDA backend is not built here")
@pytest.mark.skipif(
    os.environ.get("MEDSEG_CUDA", "ON").upper() in ("OFF", "0", "FALSE", "NO"),
    reason="the CUDA backend was switched off (MEDSEG_CUDA=OFF)",
)
def test_cuda_module_was_built():
    mod = _inputs.cuda_engine()
    assert mod is not None, "nvcc is on PATH but medseg.topology._engine_cuda was not built (see the CMake log)"
    assert mod.built_with_cuda
    assert mod.device_count() >= 0


# ------------------------------------------------------------------------ on a GPU


@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("construction", ["V", "T"])
def test_cuda_reference_cases(case, construction):
    cuda = _inputs.cuda_engine()
    for name in ("a", "b"):
        x = np.load(DATA / case[name])
        for superlevel in (False, True):
            assert_same_raw(_engine.barcode(x, superlevel, construction), cuda.barcode(x, superlevel, construction))


@needs_cuda
@settings(max_examples=60, deadline=None)
@given(x=images(draw_ties=True), superlevel=st.booleans(), construction=st.sampled_from("VT"))
def test_cuda_property(x, superlevel, construction):
    x = np.ascontiguousarray(x)
    cuda = _inputs.cuda_engine()
    assert_same_raw(_engine.barcode(x, superlevel, construction), cuda.barcode(x, superlevel, construction))


@needs_cuda
def test_cuda_tensor_stays_on_device():
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    rng = np.random.default_rng(3)
    x = rng.random((24, 25, 26)).astype(np.float32)
    t = torch.from_numpy(x).cuda()
    on_device = topo.barcode(t, backend="cuda")  # "auto" is the CPU engine until CUDA_FOR_AUTO
    on_host = topo.barcode(x, backend="cpu")
    for d in range(3):
        np.testing.assert_array_equal(on_device.birth_coordinates[d], on_host.birth_coordinates[d])
        np.testing.assert_array_equal(on_device.death_coordinates[d], on_host.death_coordinates[d])
        np.testing.assert_array_equal(on_device.births[d], on_host.births[d])
