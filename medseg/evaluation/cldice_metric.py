"""The clDice metric on hard masks (Shit et al., CVPR 2021)."""

from __future__ import annotations

import numpy as np

from medseg.topology import TopologyInputError
from medseg.topology.betti_numbers import _as_mask
from medseg.topology.skeleton import skeletonize


def cldice_metric(pred_mask: np.ndarray, ref_mask: np.ndarray, connectivity: int | None = None) -> float:
    """Centreline Dice of a predicted and a reference mask, 2D or 3D.

    Parameters
    ----------
    pred_mask, ref_mask : ndarray, same shape, 2D or 3D
        Masks: values > 0 are foreground (as :func:`medseg.topology.betti_numbers` and
        :func:`medseg.topology.betti_matching_error` read them); NaN is refused.
    connectivity : int, optional
        Foreground connectivity of the skeletons: 8 or 4 (2D), 26 or 6 (3D); default full.

    Returns
    -------
    float in [0, 1]
        ``2·Tprec·Tsens / (Tprec + Tsens)`` with ``Tprec = |S(P) ∩ R| / |S(P)|`` (the share
        of the predicted skeleton inside the reference) and ``Tsens = |S(R) ∩ P| / |S(R)|``
        (the share of the reference skeleton covered by the prediction).

    Notes
    -----
    Skeletons are :func:`medseg.topology.skeletonize`, a topology-preserving thinning:
    every component of a mask keeps a skeleton. scikit-image's 3D skeletonize deletes
    bars of even width entirely, which scored a prediction 5 voxels thick of a reference
    bar 4 voxels thick as 0.0.
    Conventions where a ratio is undefined:

    - both skeletons empty (both masks empty): 1.0, nothing to find and nothing found;
    - exactly one skeleton empty: 0.0 (a structure missed entirely, or hallucinated);
    - ``Tprec + Tsens == 0``: 0.0.

    References
    ----------
    S. Shit, J. C. Paetzold et al., "clDice - a Novel Topology-Preserving Loss Function for
    Tubular Structure Segmentation", CVPR 2021.

    Examples
    --------
    >>> ref = np.zeros((9, 9), bool); ref[4, 1:8] = True
    >>> cldice_metric(ref, ref)
    1.0
    >>> pred = ref.copy(); pred[4, 4] = False          # the line broken in the middle
    >>> round(cldice_metric(pred, ref), 3)
    0.923
    """
    pred, ref = _as_mask(pred_mask), _as_mask(ref_mask)
    if pred.shape != ref.shape:
        raise TopologyInputError(f"cldice_metric: shapes differ: prediction {pred.shape}, reference {ref.shape}")
    skel_pred = skeletonize(pred, connectivity)
    skel_ref = skeletonize(ref, connectivity)
    n_pred, n_ref = int(skel_pred.sum()), int(skel_ref.sum())
    if n_pred == 0 and n_ref == 0:
        return 1.0
    if n_pred == 0 or n_ref == 0:
        return 0.0
    tprec = float(np.logical_and(skel_pred, ref).sum()) / n_pred
    tsens = float(np.logical_and(skel_ref, pred).sum()) / n_ref
    if tprec + tsens == 0.0:
        return 0.0
    return 2.0 * tprec * tsens / (tprec + tsens)
