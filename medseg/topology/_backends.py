"""The engine's backends, as objects the Python layer passes down.

:func:`resolve_backend` turns a user's ``backend`` ("auto", "cpu", "cpu-parallel",
"cuda") and the inputs into one of three backends, once per call; the functions of
:mod:`~medseg.topology.persistence` and :mod:`~medseg.topology.matching` accept the
result in place of the string and call its methods instead of branching on a name.
All three give the same pairs, bit for bit, order included (``csrc/CUDA.md``).

The methods take validated arrays (:mod:`~medseg.topology._inputs`) and return the
engine's raw results; ``threads`` is the CPU threads to use (None: all available
cores), which the CUDA backend ignores.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np

from medseg.topology import _inputs

__all__ = ["Backend", "CpuBackend", "CpuParallelBackend", "CudaBackend", "resolve_backend"]


class Backend:
    """An engine backend: where barcodes and matchings are computed."""

    #: The ``backend`` string that names it.
    name: ClassVar[str]
    #: Whether :meth:`matching_batch` uses targets prepared by
    #: :func:`medseg.topology.matching._prepare_targets` (the loss's cache).
    takes_prepared_targets: ClassVar[bool] = False

    def on_device(self, *arrays: Any) -> bool:
        """Whether ``arrays`` stay on their CUDA device (a CUDA input on the CUDA backend)."""
        return False

    def barcode(self, image, superlevel: bool, construction: str, threads: int | None) -> dict:
        """The raw barcode of one image."""
        raise NotImplementedError

    def barcode_batch(self, images: list, superlevel: bool, construction: str, threads: int | None) -> list[dict]:
        """Raw barcodes of many images, one after the other."""
        return [self.barcode(im, superlevel, construction, threads) for im in images]

    def matching(self, p, t, superlevel, construction, include_a, include_b, threads, intersection) -> dict:
        """The raw Betti matching of one pair."""
        raise NotImplementedError

    def matching_batch(
        self, ps, ts, superlevel, construction, include_a, include_b, threads, intersection, prepared=None
    ) -> list[dict]:
        """Raw Betti matchings of many pairs; ``prepared`` targets only where :attr:`takes_prepared_targets`."""
        raise NotImplementedError

    def matching_batch_indices(
        self, ps, ts, superlevel, construction, threads, intersection, prepared=None, report_target=True
    ) -> tuple:
        """:meth:`matching_batch` (every unmatched pair) in the form the loss reads it.

        Returns ``(index_a, sizes_a, index_b, sizes_b)``: int64 flat indices into the
        batch (``instance * voxels`` + the voxel's ravelled index), key by key (matched
        birth, matched death, unmatched birth, unmatched death), then instance by
        instance, then dimension by dimension, and each key's ``(4, instances, ndim)``
        numbers of pairs. ``index_b`` is None without ``report_target`` (the numbers
        stay). All images share one shape. This generic form joins
        :meth:`matching_batch`'s arrays in numpy; the CPU engine writes them itself.
        """
        raws = self.matching_batch(ps, ts, superlevel, construction, True, True, threads, intersection, prepared)
        index_a, sizes_a, index_b, sizes_b = flat_batch_indices(raws, tuple(ps[0].shape))
        return index_a, sizes_a, index_b if report_target else None, sizes_b

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


KEYS_A = ("matched_a_birth", "matched_a_death", "unmatched_a_birth", "unmatched_a_death")
KEYS_B = ("matched_b_birth", "matched_b_death", "unmatched_b_birth", "unmatched_b_death")


def flat_batch_indices(raws: list[dict], shape: tuple[int, ...]) -> tuple:
    """``(index_a, sizes_a, index_b, sizes_b)`` of :meth:`Backend.matching_batch_indices`
    from raw matchings (one dict of (pairs, ndim) voxel coordinates per instance)."""
    n, ndim, voxels = len(raws), len(shape), int(np.prod(shape))
    out = []
    for keys in (KEYS_A, KEYS_B):
        arrays = [a for k in keys for raw in raws for a in raw[k]]
        sizes = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays)).reshape(len(keys), n, ndim)
        # the instance's offset, then each axis's coordinate times its stride
        index = np.repeat(np.tile(np.arange(n, dtype=np.int64) * voxels, len(keys)), sizes.sum(2).ravel())
        if len(index):
            coords = np.concatenate(arrays, axis=0)
            for axis in range(ndim):
                index += coords[:, axis] * int(np.prod(shape[axis + 1 :]))
        out += [index, sizes]
    return tuple(out)


class CpuBackend(Backend):
    """The sequential engine; batches are spread over threads, one item per thread."""

    name = "cpu"
    takes_prepared_targets = True

    def barcode(self, image, superlevel, construction, threads):
        return _inputs.engine().barcode(image, superlevel, construction)

    def barcode_batch(self, images, superlevel, construction, threads):
        return _inputs.engine().barcode_batch(images, superlevel, construction, _inputs.default_threads(threads))

    def matching(self, p, t, superlevel, construction, include_a, include_b, threads, intersection):
        return _inputs.engine().matching(
            p, t, superlevel, construction, include_a, include_b, _inputs.default_threads(threads), intersection
        )

    def matching_batch(
        self, ps, ts, superlevel, construction, include_a, include_b, threads, intersection, prepared=None
    ):
        return list(
            _inputs.engine().matching_batch(
                ps, ts, superlevel, construction, include_a, include_b, _inputs.default_threads(threads),
                prepared, intersection,
            )
        )

    def matching_batch_indices(
        self, ps, ts, superlevel, construction, threads, intersection, prepared=None, report_target=True
    ):
        index_a, sizes_a, index_b, sizes_b = _inputs.engine().matching_batch_indices(
            ps, ts, superlevel, construction, _inputs.default_threads(threads), prepared, intersection, report_target
        )
        return index_a, sizes_a, index_b if report_target else None, sizes_b


class CpuParallelBackend(Backend):
    """The CUDA backend's data-parallel algorithm on CPU threads (to test it without a GPU)."""

    name = "cpu-parallel"

    def barcode(self, image, superlevel, construction, threads):
        return _inputs.engine().barcode_parallel(image, superlevel, construction, _inputs.default_threads(threads))

    def matching(self, p, t, superlevel, construction, include_a, include_b, threads, intersection):
        return _inputs.engine().matching_parallel(
            p, t, superlevel, construction, include_a, include_b, _inputs.default_threads(threads), intersection
        )

    def matching_batch(
        self, ps, ts, superlevel, construction, include_a, include_b, threads, intersection, prepared=None
    ):
        return list(
            _inputs.engine().matching_batch_parallel(
                ps, ts, superlevel, construction, include_a, include_b, _inputs.default_threads(threads), intersection
            )
        )


class CudaBackend(Backend):
    """The data-parallel algorithm on the GPU; CUDA inputs stay there, pairs of a batch run on streams."""

    name = "cuda"

    def on_device(self, *arrays):
        return any(_inputs.is_cuda_array(a) for a in arrays)

    def barcode(self, image, superlevel, construction, threads):
        return _inputs.cuda_engine().barcode(image, superlevel, construction)

    def matching(self, p, t, superlevel, construction, include_a, include_b, threads, intersection):
        return _inputs.cuda_engine().matching(
            p, t, superlevel, construction, include_a, include_b, _inputs.default_threads(threads), intersection
        )

    def matching_batch(
        self, ps, ts, superlevel, construction, include_a, include_b, threads, intersection, prepared=None
    ):
        streams = max(1, min(4, len(ps)))
        return list(
            _inputs.cuda_engine().matching_batch(
                ps, ts, superlevel, construction, include_a, include_b, streams, intersection
            )
        )


_BACKENDS = {b.name: b for b in (CpuBackend(), CpuParallelBackend(), CudaBackend())}

#: Whether "auto" picks the CUDA backend for CUDA inputs. Off until the device code has
#: run on a GPU: no GPU has been lent to this project yet, so the CUDA backend has only
#: been compiled (its algorithm is tested on CPU threads as "cpu-parallel", not its
#: kernels). Until ``bash benchmarks/gpu_check.sh`` passes on a device, CUDA inputs go to
#: the CPU engine (copied to the host; the loss's gradient is formed on the device);
#: ``backend="cuda"`` or ``MEDSEG_TOPOLOGY_BACKEND=cuda`` opt in.
CUDA_FOR_AUTO = False


def check_settings() -> None:
    """The engine's environment settings (``MEDSEG_TOPOLOGY_BACKEND``, ``MEDSEG_TOPOLOGY_CACHE_MB``),
    checked when a command starts: a bad value then fails before any work instead of
    failing every case of an evaluation or a training's first step.

    Raises
    ------
    TopologyInputError, TopologyBackendError
        As :func:`resolve_backend` and the engine would later.
    """
    resolve_backend("auto")
    _inputs._check_cache_setting()


def resolve_backend(backend: str | Backend, *arrays: Any) -> Backend:
    """The backend named by ``backend`` for these inputs; a :class:`Backend` is returned as is.

    "auto" is ``MEDSEG_TOPOLOGY_BACKEND`` when set, else "cpu" (and "cuda" for a CUDA
    input when the CUDA backend is built, has a device and :data:`CUDA_FOR_AUTO` is on).

    Raises
    ------
    TopologyInputError
        For a name (or ``MEDSEG_TOPOLOGY_BACKEND``) that is not one of ``_inputs.BACKENDS``.
    TopologyBackendError
        For "cuda" where the CUDA backend is not built or finds no device.
    """
    if isinstance(backend, Backend):
        return backend
    if backend not in _inputs.BACKENDS:
        raise _inputs.TopologyInputError(f"backend must be one of {_inputs.BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("MEDSEG_TOPOLOGY_BACKEND", "").strip()
        if env and env != "auto":
            if env not in _inputs.BACKENDS:
                raise _inputs.TopologyInputError(
                    f"MEDSEG_TOPOLOGY_BACKEND must be one of {_inputs.BACKENDS}, got {env!r}"
                )
            backend = env
        else:
            cuda = CUDA_FOR_AUTO and any(_inputs.is_cuda_array(a) for a in arrays) and _inputs.cuda_available()
            return _BACKENDS["cuda" if cuda else "cpu"]
    if backend == "cuda" and not _inputs.cuda_available():
        built = _inputs.cuda_engine() is not None
        why = "found no CUDA device" if built else "was not built (no CUDA compiler at install time)"
        raise _inputs.TopologyBackendError(f"backend='cuda' requested but medseg's CUDA backend {why}")
    return _BACKENDS[backend]
