"""Betti matching on the data-parallel backend (issue F) is the sequential engine's, bit for bit.

"cpu-parallel" runs the CUDA backend's matching (csrc/matching_parallel.hpp: spanning
forests, elder rule over forest edges, apparent pairs screened in parallel, the rest
reduced on the host) on CPU threads, so these tests check the GPU algorithm's logic
on machines without a GPU: every dimension, counts, coordinates and the order of the
matched/unmatched lists. The CUDA tests run where a device is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import medseg.topology as topo
from medseg.topology import _engine, _inputs

DATA = Path(__file__).resolve().parents[1] / "data" / "reference"
CASES = json.loads((DATA / "expected.json").read_text())["cases"]
CUDA = _inputs.cuda_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device (or the CUDA backend was not built)")
KEYS = [f"{s}_{side}_{end}" for s in ("matched", "unmatched") for side in "ab" for end in ("birth", "death")]


def assert_same_matching(seq: dict, par: dict) -> None:
    ndim = len(seq["num_unmatched_a"])
    for k in KEYS:
        assert len(par[k]) == ndim, k
        for d in range(ndim):
            assert seq[k][d].shape == par[k][d].shape, f"{k}[{d}]: {seq[k][d].shape} vs {par[k][d].shape}"
            np.testing.assert_array_equal(seq[k][d], par[k][d], err_msg=f"{k}[{d}]")
    np.testing.assert_array_equal(seq["num_unmatched_a"], par["num_unmatched_a"])
    np.testing.assert_array_equal(seq["num_unmatched_b"], par["num_unmatched_b"])


def check(a, b, superlevel, construction, threads=2, include=(True, True), intersection=False, module=None):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    args = (superlevel, construction, include[0], include[1], threads, intersection)
    seq = _engine.matching(a, b, *args)
    par = (module or _engine).matching_parallel(a, b, *args) if module is None else module.matching(a, b, *args)
    assert_same_matching(seq, par)
    return seq


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_reference_cases(case):
    a, b = np.load(DATA / case["a"]), np.load(DATA / case["b"])
    for superlevel in (False, True):
        for construction in "VT":
            check(a, b, superlevel, construction)
    check(a.astype(np.float32), b.astype(np.float32), False, "V", threads=1)
    check(b, a, True, "V", threads=3)


def test_reference_counts_through_the_api():
    """The reference's matched/unmatched counts, through betti_matching(backend="cpu-parallel")."""
    for case in CASES:
        if "num_matched" not in case:
            continue
        a, b = np.load(DATA / case["a"]), np.load(DATA / case["b"])
        m = topo.betti_matching(a, b, filtration="sublevel", backend="cpu-parallel")
        assert m.num_matched.tolist() == case["num_matched"], case["name"]


def test_dimension_one_is_exercised():
    """The 3D cases have matched and unmatched dimension-1 pairs, so the reductions count."""
    case = next(c for c in CASES if c["name"] == "random24")
    a, b = np.load(DATA / case["a"]), np.load(DATA / case["b"])
    seq = check(a, b, False, "V")
    assert len(seq["matched_a_birth"][1]) > 0 and len(seq["unmatched_a_birth"][1]) > 0


@st.composite
def image_pairs(draw):
    ndim = draw(st.sampled_from([2, 3]))
    hi = 10 if ndim == 2 else 7
    lo = draw(st.sampled_from([1, 2]))  # 1: slabs one voxel thick
    shape = tuple(draw(st.integers(lo, hi)) for _ in range(ndim))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["levels", "binary", "normal", "zeros"]))
    if kind == "levels":
        a = rng.integers(0, draw(st.integers(1, 4)), size=shape).astype(np.float64)
    elif kind == "binary":
        a = (rng.random(shape) > draw(st.floats(0.2, 0.8))).astype(np.float64)
    elif kind == "zeros":  # signed zeros tie with each other
        a = np.where(rng.random(shape) > 0.5, 0.0, -0.0) + np.where(rng.random(shape) > 0.7, 1.0, 0.0)
    else:
        a = rng.standard_normal(shape)
    partner = draw(st.sampled_from(["binary", "noisy", "independent", "same"]))
    if partner == "binary":
        b = (rng.random(shape) > 0.5).astype(np.float64)
    elif partner == "noisy":
        b = a + np.round(rng.standard_normal(shape), 1)
    elif partner == "independent":
        b = rng.integers(0, 3, size=shape).astype(np.float64)
    else:
        b = a.copy()
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return a.astype(dtype), b.astype(dtype)


SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(ab=image_pairs(), superlevel=st.booleans(), construction=st.sampled_from("VT"),
       threads=st.integers(1, 3), include=st.tuples(st.booleans(), st.booleans()))
def test_property(ab, superlevel, construction, threads, include):
    check(*ab, superlevel, construction, threads, include)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ab=image_pairs(), superlevel=st.booleans(), construction=st.sampled_from("VT"), threads=st.integers(1, 2))
def test_property_intersection(ab, superlevel, construction, threads):
    check(*ab, superlevel, construction, threads, intersection=True)


def test_larger_pairs():
    rng = np.random.default_rng(11)
    a = rng.random((30, 31, 29)).astype(np.float32)
    check(a, (rng.random(a.shape) > 0.5).astype(np.float32), True, "V", threads=3)
    check(rng.integers(0, 3, (20, 22, 21)).astype(np.float64), rng.random((20, 22, 21)), False, "T")
    x = rng.random((120, 130))
    check(x, np.round(x + 0.1 * rng.standard_normal(x.shape), 2), True, "T")


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_intersection_reference_cases(case):
    a, b = np.load(DATA / case["a"]), np.load(DATA / case["b"])
    for superlevel in (False, True):
        for construction in "VT":
            check(a, b, superlevel, construction, intersection=True)


# --------------------------------------------------------------- through the Python API


def assert_same_api(x, y):
    assert type(x) is type(y)
    for f in x.__dataclass_fields__:
        u, v = getattr(x, f), getattr(y, f)
        if isinstance(u, tuple):
            assert len(u) == len(v)
            for p, q in zip(u, v):
                np.testing.assert_array_equal(p, q, err_msg=f)
        elif isinstance(u, np.ndarray):
            np.testing.assert_array_equal(u, v, err_msg=f)
        else:
            assert u == v, f


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("comparison", ["union", "intersection"])
def test_api_identical(relative, comparison):
    rng = np.random.default_rng(2)
    p = rng.random((9, 10, 8)).astype(np.float32)
    t = (rng.random(p.shape) > 0.6).astype(np.float32)
    kw = dict(relative=relative, comparison=comparison, filtration="superlevel", construction="V")
    assert_same_api(
        topo.betti_matching(p, t, backend="cpu", **kw), topo.betti_matching(p, t, backend="cpu-parallel", **kw)
    )
    ps, ts = [p, p[::-1].copy(), t], [t, t, p]
    seq = topo.betti_matching_batch(ps, ts, backend="cpu", threads=2, **kw)
    par = topo.betti_matching_batch(ps, ts, backend="cpu-parallel", threads=2, **kw)
    for x, y in zip(seq, par):
        assert_same_api(x, y)
    np.testing.assert_array_equal(
        topo.betti_matching_error(p > 0.5, t, backend="cpu", relative=relative, comparison=comparison),
        topo.betti_matching_error(p > 0.5, t, backend="cpu-parallel", relative=relative, comparison=comparison),
    )
    batch_p, batch_t = np.stack([p > 0.5, t > 0])[:, None], np.stack([t, p])[:, None]
    np.testing.assert_array_equal(
        topo.betti_matching_error_batch(batch_p, batch_t, backend="cpu", relative=relative),
        topo.betti_matching_error_batch(batch_p, batch_t, backend="cpu-parallel", relative=relative),
    )


def test_environment_variable_routes_the_matching(monkeypatch):
    rng = np.random.default_rng(4)
    p, t = rng.random((6, 7, 5)), rng.random((6, 7, 5))
    want = topo.betti_matching(p, t, backend="cpu")
    monkeypatch.setenv("MEDSEG_TOPOLOGY_BACKEND", "cpu-parallel")
    assert_same_api(want, topo.betti_matching(p, t))


def test_loss_identical_on_cpu_parallel():
    from medseg.losses.betti_matching import BettiMatchingLoss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 7, 8, 6, generator=g)
    y = torch.randint(0, 2, (2, 2, 7, 8, 6), generator=g).float()
    for filtration in ("superlevel", "both"):
        losses = []
        grads = []
        for backend in ("cpu", "cpu-parallel"):
            xi = x.clone().requires_grad_(True)
            v = BettiMatchingLoss(sigmoid=True, filtration=filtration, reduction="none", backend=backend)(xi, y)
            v.sum().backward()
            losses.append(v.detach())
            grads.append(xi.grad)
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


# ------------------------------------------------------------------------ on a GPU


@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_cuda_reference_cases(case):
    a, b = np.load(DATA / case["a"]), np.load(DATA / case["b"])
    for superlevel in (False, True):
        for construction in "VT":
            for intersection in (False, True):
                check(a, b, superlevel, construction, intersection=intersection, module=_inputs.cuda_engine())


@needs_cuda
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ab=image_pairs(), superlevel=st.booleans(), construction=st.sampled_from("VT"), intersection=st.booleans())
def test_cuda_property(ab, superlevel, construction, intersection):
    check(*ab, superlevel, construction, intersection=intersection, module=_inputs.cuda_engine())


@needs_cuda
def test_cuda_batch_on_streams():
    rng = np.random.default_rng(8)
    ps = [rng.random((14, 15, 13)).astype(np.float32) for _ in range(6)]
    ts = [(rng.random((14, 15, 13)) > 0.5).astype(np.float32) for _ in range(6)]
    cuda = _inputs.cuda_engine()
    got = cuda.matching_batch(ps, ts, True, "V", True, True, 3, False)
    for p, t, r in zip(ps, ts, got):
        assert_same_matching(_engine.matching(p, t, True, "V", True, True, 1, False), r)


@needs_cuda
def test_cuda_tensors_stay_on_device():
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    rng = np.random.default_rng(9)
    p = rng.random((12, 13, 11)).astype(np.float32)
    t = (rng.random(p.shape) > 0.5).astype(np.float32)
    for relative in (False, True):
        on_device = topo.betti_matching(
            torch.from_numpy(p).cuda(), torch.from_numpy(t).cuda(), relative=relative, backend="cuda"
        )
        assert_same_api(topo.betti_matching(p, t, backend="cpu", relative=relative), on_device)
    batch_p = torch.from_numpy(np.stack([p, t])[:, None]).cuda()
    batch_t = torch.from_numpy(np.stack([t, p])[:, None]).cuda()
    got = topo.betti_matching_batch(batch_p, batch_t, backend="cuda")
    want = topo.betti_matching_batch(np.stack([p, t])[:, None], np.stack([t, p])[:, None], backend="cpu")
    for gi, wi in zip(got, want):
        for x, y in zip(gi, wi):
            assert_same_api(x, y)
    np.testing.assert_array_equal(
        topo.betti_matching_error(batch_p[0, 0] > 0.5, batch_t[0, 0], backend="cuda"),
        topo.betti_matching_error(p > 0.5, t, backend="cpu"),
    )
