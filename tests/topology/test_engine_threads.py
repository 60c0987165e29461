"""The engine's threads as a parallel region of PyTorch's OpenMP runtime (``run_team``
in medseg/topology/csrc/host_passes.hpp): used where it is safe, the same results as
threads of the engine's own, and never in a child process where libgomp would hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.losses.betti_matching import BettiMatchingLoss
from medseg.topology import _inputs
from medseg.topology.matching import _prepare_targets

OWN_THREADS = "MEDSEG_ENGINE_OWN_THREADS"


@pytest.fixture
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    (torch.randn(300, 300) @ torch.randn(300, 300)).sum()  # torch's team exists
    yield
    torch.set_num_threads(before)


def batch(n=4, size=40, seed=0):
    rng = np.random.default_rng(seed)
    preds = [ndimage.gaussian_filter(rng.random((size, size)), 1.0).astype(np.float32) for _ in range(n)]
    targets = [(ndimage.gaussian_filter(rng.random((size, size)), 2.0) > 0.5).astype(np.float32) for _ in range(n)]
    return preds, targets


def batch3(n, shape, seed):
    """n smooth 3D predictions and 0/1 targets of ``shape``."""
    rng = np.random.default_rng(seed)
    preds = [ndimage.gaussian_filter(rng.random(shape), 1.0).astype(np.float32) for _ in range(n)]
    targets = [(ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.5).astype(np.float32) for _ in range(n)]
    return preds, targets


def test_the_team_is_used_only_where_allowed(two_torch_threads, monkeypatch):
    engine = _inputs.engine()
    assert engine.openmp_team(2)  # torch's libgomp is loaded, 2 threads, not a child process
    assert not engine.openmp_team(3)  # more than torch's threads: they would linger in its pool
    monkeypatch.setenv(OWN_THREADS, "1")
    assert not engine.openmp_team()
    monkeypatch.delenv(OWN_THREADS)
    torch.set_num_threads(1)  # as PyTorch sets it in a DataLoader worker
    assert not engine.openmp_team()


def test_team_and_own_threads_give_the_same_matchings(two_torch_threads, monkeypatch):
    engine = _inputs.engine()
    preds, targets = batch()
    prepared = _prepare_targets(targets, True, "V", 2)
    results = []
    for own in (False, True):
        if own:
            monkeypatch.setenv(OWN_THREADS, "1")
        assert engine.openmp_team() is not own
        results.append(
            [
                engine.matching_batch_indices(preds, targets, True, "V", 2, None, False, True),
                engine.matching_batch_indices(preds, targets, False, "T", 2, None, False, True),
                engine.matching_batch_indices(preds, targets, True, "V", 2, prepared, False, False),
                # one pair: its task graph runs on the two threads
                engine.matching_batch_indices(preds[:1], targets[:1], True, "V", 2, None, False, True),
            ]
        )
    for team, own in zip(*results):
        for a, b in zip(team, own):
            if a is None:
                assert b is None
            else:
                np.testing.assert_array_equal(a, b)


def test_pairs_fewer_than_threads_share_them_out():
    engine = _inputs.engine()
    assert engine.pair_threads(1, 4) == [4]
    assert engine.pair_threads(2, 8) == [4, 4]
    assert engine.pair_threads(3, 8) == [3, 3, 2]
    assert engine.pair_threads(10, 16) == [2] * 6 + [1] * 4
    assert engine.pair_threads(8, 2) == [1] * 8  # at least as many pairs as threads: one each
    for pairs in range(1, 12):
        for threads in range(1, 12):
            shares = engine.pair_threads(pairs, threads)
            assert min(shares) >= 1 and sum(shares) == max(pairs, threads)
            assert max(shares) - min(shares) <= 1


@pytest.mark.parametrize("own", [False, True])
def test_shared_out_threads_give_the_same_matchings(two_torch_threads, monkeypatch, own):
    """Two or three pairs on more threads give what one thread gives, in 2D and 3D: the
    union comparison's pairs in one task graph, the intersection's each on its share of
    the threads (threads of its own inside the batch's team)."""
    if own:
        monkeypatch.setenv(OWN_THREADS, "1")
    engine = _inputs.engine()
    for preds, targets in (batch(n=3, size=36, seed=4), batch3(3, (14, 15, 16), seed=5)):
        for n in (2, 3):
            for superlevel, construction, intersection in ((True, "V", False), (False, "T", True)):
                args = (preds[:n], targets[:n], superlevel, construction)
                one = engine.matching_batch_indices(*args, 1, None, intersection, True)
                for threads in (2, 4, 7):
                    shared = engine.matching_batch_indices(*args, threads, None, intersection, True)
                    for a, b in zip(one, shared):
                        if a is None:
                            assert b is None
                        else:
                            np.testing.assert_array_equal(a, b)


def test_team_and_own_threads_give_the_same_loss_and_gradient(two_torch_threads, monkeypatch):
    rng = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 2, 48, 48, generator=rng)
    label = (torch.rand(4, 1, 48, 48, generator=rng) > 0.6).long()
    loss = BettiMatchingLoss(threads=2, target_cache_bytes=0)
    out = []
    for own in (False, True):
        if own:
            monkeypatch.setenv(OWN_THREADS, "1")
        x = logits.clone().requires_grad_()
        value = loss(x, label)
        value.backward()
        out.append((value.detach(), x.grad))
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])


def test_engine_in_a_python_thread_while_torch_computes(two_torch_threads):
    """A second Python thread gets a team of its own (libgomp's pools are per calling
    thread) while the main thread runs torch's ops on its pool: both finish, same results."""
    engine = _inputs.engine()
    preds, targets = batch(n=6, size=64, seed=4)
    expected = engine.matching_batch_indices(preds, targets, True, "V", 2, None, False, True)
    results, errors = [], []

    def match():
        try:
            for _ in range(5):
                results.append(engine.matching_batch_indices(preds, targets, True, "V", 2, None, False, True))
        except Exception as err:  # reported below, in the main thread
            errors.append(err)

    worker = threading.Thread(target=match)
    worker.start()
    a = torch.randn(256, 256)
    while worker.is_alive():
        a = torch.tanh(a @ a.T / 256)
    worker.join()
    assert not errors and len(results) == 5
    for got in results:
        for x, y in zip(got, expected):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("intersection", [True, False])
def test_an_error_inside_a_team_task_reaches_python(two_torch_threads, intersection):
    """Intersection: each pair is one team task, whose check of the prepared target
    throws inside the team; union: the batch's task graph checks every pair first."""
    engine = _inputs.engine()
    preds, targets = batch(n=3)
    prepared = _prepare_targets(targets, True, "V", 1)
    prepared[1] = _prepare_targets([np.zeros((12, 12), np.float32)], True, "V", 1)[0]  # the wrong shape
    assert engine.openmp_team()
    with pytest.raises(ValueError, match="prepared target does not fit"):
        engine.matching_batch_indices(preds, targets, True, "V", 2, prepared, intersection, False)


def test_one_task_graph_over_a_batch_gives_each_pairs_own_result(two_torch_threads):
    """Five pairs on two threads in one graph (at most two pairs under way), with and
    without prepared targets, in 2D and 3D: each pair's matching as when computed alone."""
    engine = _inputs.engine()
    for preds, targets in (batch(n=5, size=30, seed=9), batch3(5, (10, 12, 11), seed=8)):
        for superlevel, construction in ((True, "V"), (False, "T")):
            prepared = _prepare_targets(targets, superlevel, construction, 2)
            for prep in (None, prepared):
                together = engine.matching_batch(preds, targets, superlevel, construction, True, True, 2, prep, False)
                for i, got in enumerate(together):
                    alone = engine.matching(preds[i], targets[i], superlevel, construction, True, True, 1, False)
                    assert got.keys() == alone.keys()
                    for key in alone:
                        for x, y in zip(got[key], alone[key]) if isinstance(alone[key], list) else [(got[key], alone[key])]:
                            np.testing.assert_array_equal(x, y)


# Each child computes a batch with 2 threads after the parent used torch's OpenMP team;
# libgomp hangs a child that starts a team of the parent's (PyTorch issue 17199), so a
# child that does not finish within the timeout fails the test.
_PARENT = """
import os, sys, multiprocessing
import numpy as np, torch
torch.set_num_threads(2)
(torch.randn(400, 400) @ torch.randn(400, 400)).sum()
rng = np.random.default_rng(0)
preds = [rng.random((48, 48)).astype(np.float32) for _ in range(4)]
targets = [(rng.random((48, 48)) > 0.5).astype(np.float32) for _ in range(4)]

def compute():
    from medseg.topology import _inputs
    engine = _inputs.engine()
    engine.matching_batch_indices(preds, targets, True, "V", 2, None, False, True)
    return engine.openmp_team()
"""

_CHILDREN = {
    # the parent used the engine's team, then os.fork: the engine's own atfork handler
    "os.fork after the engine ran": """
compute()
pid = os.fork()
if pid == 0:
    team = compute()
    os._exit(0 if not team else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
""",
    # the engine is first loaded in the child of a fork-context multiprocessing.Process
    "multiprocessing fork, engine loaded in the child": """
def child():
    sys.exit(0 if not compute() else 3)
p = multiprocessing.get_context("fork").Process(target=child)
p.start(); p.join()
sys.exit(p.exitcode)
""",
    # a DataLoader worker (fork) whose dataset calls the engine
    "DataLoader worker": """
class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 2
    def __getitem__(self, i):
        return torch.tensor(float(compute()))
compute()
loader = torch.utils.data.DataLoader(Data(), num_workers=1, multiprocessing_context="fork")
teams = [float(x) for x in loader]
sys.exit(0 if teams == [0.0, 0.0] else 3)
""",
}


@pytest.mark.parametrize("case", list(_CHILDREN))
def test_children_of_a_process_that_used_the_team_finish(case):
    script = textwrap.dedent(_PARENT) + textwrap.dedent(_CHILDREN[case])
    # a session of its own: a hung grandchild is killed with its parent
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{case}: the child hung (the engine started a team of the parent's OpenMP runtime)")
    assert proc.returncode == 0, f"{case}: exit {proc.returncode} (3: the child used the parent's team)\n{stderr}"
