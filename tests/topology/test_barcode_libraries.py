"""Barcodes agree with gudhi (V and T, both filtrations) and with cripser (V) as
multisets of (birth, death) per dimension, on random, quantised and smooth inputs."""

from __future__ import annotations

import cripser  # a test dependency (pyproject's [test] extra)
import gudhi  # a dependency of medseg
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

import medseg.topology as topo


def multiset(pairs):
    return sorted(map(tuple, np.round(np.asarray(pairs, dtype=float).reshape(-1, 2), 10).tolist()))


def inputs():
    rng = np.random.default_rng(3)
    out = []
    for shape in [(17, 13), (9, 8, 7), (2, 11, 5), (30, 1)]:
        out.append(("random", rng.random(shape)))
        out.append(("quantised", np.floor(rng.random(shape) * 4) / 4))
        out.append(("smooth", gaussian_filter(rng.standard_normal(shape), 1.5)))
    # more than 4096 distinct values: the engine then generates the sorted edges from
    # the vertex order (sorted_edges_V), in 2D from the vertex ranks alone, with ties
    # scattered (levels), in large blocks (plateaus) and none (random)
    for shape in [(70, 65), (17, 17, 17)]:
        out.append(("random", rng.random(shape)))
    levels = np.floor(rng.random((110, 90)) * 20000) / 20000
    out.append(("levels", levels))
    plateaus = levels.copy()
    plateaus[10:40, 5:60] = 0.5
    plateaus[:, :3] = 0.25
    plateaus[60:, 50:] = plateaus[60:, 50:] > 0.5
    out.append(("plateaus", plateaus))
    assert all(len(np.unique(image)) > 4096 for kind, image in out[-4:] if image.ndim == 2)
    return out


CASES = inputs()


@pytest.mark.parametrize("construction", ["V", "T"])
@pytest.mark.parametrize("filtration", ["sublevel", "superlevel"])
@pytest.mark.parametrize("kind,image", CASES, ids=[f"{k}-{im.shape}" for k, im in CASES])
def test_equals_gudhi(kind, image, filtration, construction):
    x = image if filtration == "sublevel" else -image
    if construction == "V":
        cc = gudhi.CubicalComplex(vertices=x)
    else:
        cc = gudhi.CubicalComplex(top_dimensional_cells=x)
    cc.persistence(homology_coeff_field=2)
    bc = topo.barcode(image, filtration=filtration, construction=construction)
    sign = 1.0 if filtration == "sublevel" else -1.0
    for d in range(image.ndim):
        g = np.asarray(cc.persistence_intervals_in_dimension(d)).reshape(-1, 2)
        finite = g[np.isfinite(g[:, 1])]
        finite = finite[finite[:, 0] != finite[:, 1]]
        assert multiset(finite) == multiset(sign * bc.diagram(d))
        essential = g[~np.isfinite(g[:, 1])]
        assert len(essential) == len(bc.essential_births[d])
        np.testing.assert_allclose(sorted(essential[:, 0]), sorted(sign * bc.essential_births[d]))


@pytest.mark.parametrize("kind,image", CASES, ids=[f"{k}-{im.shape}" for k, im in CASES])
def test_equals_cripser(kind, image):
    if min(image.shape) == 1:
        pytest.skip("cripser does not treat 1-voxel-thick arrays as 2D/3D complexes")
    pd = cripser.computePH(image.astype(np.float64), maxdim=image.ndim - 1)
    bc = topo.barcode(image, filtration="sublevel", construction="V")
    for d in range(image.ndim):
        rows = pd[pd[:, 0] == d][:, 1:3]
        rows = rows[(rows[:, 1] < 1e300) & (rows[:, 0] != rows[:, 1])]
        assert multiset(rows) == multiset(bc.diagram(d))
