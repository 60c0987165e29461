"""How much accelerator memory one training step of a network takes: a formula over a count.

The planner needs the peak memory of a forward + backward pass for many candidate patch
sizes; running each on a device is too slow (and the planning machine may have none).
medseg counts instead, exactly and for free, what dominates it, and adds the rest by a
formula:

``A``
    the elements of the tensors autograd saves for the backward pass (activations), per
    sample. Counted by running the network's forward once on PyTorch's ``meta`` device
    (shapes only: no memory, no arithmetic) under
    ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once and the
    parameters left out. Exact for any network and configuration (MONAI UNet, DynUNet
    with deep supervision, UNETR, SwinUNETR), which nnU-Net's hand-written feature-map
    count (``compute_conv_feature_map_size``) is only for its own U-Nets.
``P``
    the parameter count.

and the peak of a training step with batch ``B`` is estimated as::

    bytes = P * (4 + 4 + S)  +  B * A * c

- ``4 + 4 + S``: fp32 weights, their gradients and the optimizer state (S = 4 for SGD
  momentum, 8 for Adam/AdamW's two moments).
- ``c``, bytes per saved element over the whole step:

  * fp32: ``c = 4 * 1.5 = 6`` (:data:`BYTES_PER_ELEMENT_FP32`). During the backward pass
    the gradients of the activations exist next to the saved activations. Measured on
    the CPU as the growth of the peak resident memory (``VmHWM``, reset through
    ``/proc/self/clear_refs``) over one forward + backward, less the parameter
    gradients, with glibc's mmap threshold fixed at 64 KiB so that freed tensors leave
    the process: 0.81-1.33 times ``4 * A * B`` for DynUNet (3D 40^3 1.13, 64^3 1.16,
    64x64x16 1.03, 32^3 with deep supervision 1.33; 2D 256^2 0.81, 128^2 0.95),
    SwinUNETR 1.04, UNETR 0.08 (its 350 MB of gradients arrive as its activations
    are freed); MONAI's UNet with residual units 1.78, which this constant
    underestimates by about 15 %. Those were first steps of a fresh process, which
    include the kernels' one-time costs and vary between environments; a second, warm
    step of DynUNet takes 1.6-1.7 times less than this constant predicts, so for it the
    constant is an upper bound. ``tests/planning/test_memory.py`` checks DynUNet's
    estimate against a warm step (1 <= estimate / measured <= 2).
  * mixed precision on CUDA (``train.amp``), convolutional networks:
    ``c = 3.7`` (:data:`BYTES_PER_ELEMENT_AMP`): fp16 activations (2 bytes) plus what a
    GPU adds (activation gradients, cuDNN workspaces, the caching allocator's
    fragmentation, the CUDA context). **Calibrated, not measured** (medseg had no GPU):
    it is the value at which DynUNet's largest 3D patch at 8 GiB equals that of
    nnU-Net's planner, whose reference (560e6 feature-map elements of its
    PlainConvUNet, batch 2, at 8 GB) was tuned on GPUs. DynUNet is that network
    (two conv-norm-LeakyReLU per stage, 32 to 320 features) and saves 1.986 elements
    per element nnU-Net counts (at 96^3, 128^3 and 160x128x128 alike). The 2D rule (nnU-Net's own 2D
    reference) and anisotropic patches are then independent checks:
    ``benchmarks/plan_vs_nnunet.py``.
  * UNETR and SwinUNETR keep softmax and layer norm in fp32 under autocast; they are
    counted at the fp32 rate.

The budget is the ``--gpu-memory-gb`` GiB (the calibrated constant carries the overheads,
as nnU-Net's reference does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "BYTES_PER_ELEMENT_FP32",
    "BYTES_PER_ELEMENT_AMP",
    "MemoryEstimate",
    "saved_activation_elements",
    "estimate_training_memory",
    "usable_bytes",
]

BYTES_PER_ELEMENT_FP32 = 4 * 1.5
BYTES_PER_ELEMENT_AMP = 3.7
_OPTIMIZER_STATE_BYTES = {"sgd": 4, "adam": 8, "adamw": 8}
_CONVOLUTIONAL = ("unet", "dynunet")
GIB = float(1 << 30)


@dataclass(frozen=True)
class MemoryEstimate:
    """The terms of the estimate for one training step (bytes)."""

    parameters: int  # P
    activation_elements_per_sample: int  # A
    batch_size: int
    fixed_bytes: int  # P * (8 + S)
    bytes_per_sample: int  # A * c

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.batch_size * self.bytes_per_sample

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def max_batch(self, budget_bytes: float) -> int:
        """The largest batch whose estimate fits ``budget_bytes`` (0 when none does)."""
        room = budget_bytes - self.fixed_bytes
        return max(int(room // max(self.bytes_per_sample, 1)), 0)


MIN_GPU_MEMORY_GB = 0.5
"""Below this no network of the planner fits even its smallest patch: a unit mistake (MB for GiB)."""
MAX_GPU_MEMORY_GB = 65536.0
"""More than any device has (and finite: ``inf`` made the patch search overflow)."""


def usable_bytes(gpu_memory_gb: float) -> float:
    """The bytes a plan may fill on a device of ``gpu_memory_gb`` GiB."""
    return gpu_memory_gb * GIB


def saved_activation_elements(net: Any, input_shape: Sequence[int]) -> int:
    """Elements of the tensors autograd saves in one forward pass of ``net`` (``meta`` device).

    ``input_shape`` is ``(B, C, *spatial)``. Each storage counts once (views share it);
    the network's own parameters are not counted.
    """
    import torch

    parameters = {p.untyped_storage()._cdata for p in net.parameters()}
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage()._cdata
        if key not in parameters:
            sizes[key] = max(sizes.get(key, 0), tensor.numel() * tensor.element_size())
        return tensor

    net.train()
    x = torch.zeros(tuple(input_shape), device="meta", requires_grad=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(x)
    return sum(sizes.values()) // 4  # fp32 on meta: bytes -> elements


def estimate_training_memory(
    name: str,
    params: dict[str, Any],
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int],
    batch_size: int,
    amp: bool = True,
    optimizer: str = "sgd",
) -> MemoryEstimate:
    """Estimate the peak device memory of one training step (see the module docstring).

    Parameters
    ----------
    name, params
        ``model.name`` and ``model.params`` as in a run config.
    spatial_dims, in_channels, out_channels
        2 or 3; image channels; classes including background.
    patch_size : sequence of int
        The training patch.
    batch_size : int
        Patches per step on the device.
    amp : bool
        Mixed precision on CUDA (``train.amp``): the calibrated rate for convolutional
        networks; False: the fp32 rate measured on the CPU.
    optimizer : str
        ``sgd``, ``adam`` or ``adamw`` (its state per parameter).

    Raises
    ------
    ConfigError
        The network cannot be built for this patch (e.g. not divisible by its strides).
    """
    patch = [int(p) for p in patch_size]
    from medseg.models.factory import build_on_meta

    net = build_on_meta(name, dict(params), spatial_dims, in_channels, out_channels, patch)
    elements = saved_activation_elements(net, (1, in_channels, *patch))
    parameters = int(sum(p.numel() for p in net.parameters()))
    state = _OPTIMIZER_STATE_BYTES.get(optimizer, 8)
    rate = BYTES_PER_ELEMENT_AMP if amp and name in _CONVOLUTIONAL else BYTES_PER_ELEMENT_FP32
    return MemoryEstimate(
        parameters=parameters,
        activation_elements_per_sample=elements,
        batch_size=int(batch_size),
        fixed_bytes=parameters * (8 + state),
        bytes_per_sample=int(elements * rate),
    )
