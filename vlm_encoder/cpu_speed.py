"""The fast CPU inference path: every `nn.Linear` runs oneDNN's GEMM on a prepacked weight.

torch's float32 `F.linear` on the CPU calls MKL's sgemm, which on AMD CPUs runs at its AVX2
rate; oneDNN (shipped inside torch) uses AVX-512 / AMX on both vendors, and a weight
reordered once into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what
inductor's `freezing` emits) saves the reorder on every call. A ViT spends ~95% of its
FLOPs in the block linears, so this is most of the encoder's time.
`benchmarks/cpu_gemm_routes.py` and `benchmarks/cpu_fast_path.py` measure the routes; the
results are in `benchmarks/results/cpu_fast_path.md`.

What it keeps:
- exactness: float32 in, float32 accumulate (differences to `F.linear` ~1e-6, the order of
  the sums only); bfloat16 weights take oneDNN's bf16 GEMM (float32 accumulation).
- batch invariance: the packed GEMM gives each row the same bits whatever the number of
  rows (tested in tests/test_cpu_speed.py, with `determinism.batch_invariance`'s probe).
- torch's global state: nothing is set (no backend flag, no thread count); the route is
  chosen per call by the swapped modules only.
- training: a call that needs gradients, a non-CPU tensor or a dtype other than float32 /
  bfloat16 takes `F.linear`, so the returned module trains and moves like the original.

Example:
    >>> fast = fast_cpu(encoder)          # same parameters, linears swapped
    >>> with torch.inference_mode():
    ...     out = fast(pixels, layers=(-2,))
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

PACK_ROWS_HINT = 1024  # rows oneDNN is told to expect when packing (fixed: the pack never depends on a batch)
_FAST_DTYPES = (torch.float32, torch.bfloat16)


def fast_cpu_available() -> bool:
    """Whether this torch build has oneDNN (mkldnn) for the CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """An `nn.Linear` (same `weight` / `bias` parameters) whose CPU inference calls run oneDNN's
    GEMM on a weight packed once, and packed again when the weight is replaced or changed by a
    tracked in-place op (`copy_`, `load_state_dict`, a non-fused optimizer step). Edits that
    torch does not track (through `.data`, a fused optimizer step) are not seen: call
    `fast_cpu` again on the edited model (the packs are inference state, never saved).

    Args:
        linear: The layer to wrap; its parameters are shared, not copied.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._pack: tuple | None = None  # (key, packed weight): an opaque mkldnn tensor, never saved

    def _packed(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
        if self._pack is None or self._pack[0] != key:
            self._pack = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS_HINT))
        return self._pack[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(..., in_features) -> (..., out_features)`, as `nn.Linear`."""
        w = self.weight
        if (
            x.device.type != "cpu"
            or w.device.type != "cpu"
            or x.dtype != w.dtype
            or w.dtype not in _FAST_DTYPES
            or (self.bias is not None and self.bias.dtype != w.dtype)
            or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        ):
            return F.linear(x, w, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed(), bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def fast_cpu(module: nn.Module, enabled: bool = True) -> nn.Module:
    """`module` with every `nn.Linear` running oneDNN's prepacked GEMM on the CPU.

    The returned module is a copy of the module tree sharing every parameter and buffer with
    `module` (no weights are copied; `module` itself is left as it was), with the same
    `state_dict` keys and values. Each packed weight costs one more copy of that weight
    while the module lives. It is meant for inference on fixed weights (extraction, pictures):
    after editing weights through `.data` or a fused optimizer, build it again (`PackedLinear`).

    Args:
        module: Any model (an encoder, a text tower, a `ContrastiveModel`).
        enabled: `False` returns `module` itself (the plain path), so callers can pass a flag.

    Returns:
        The fast module, or `module` when disabled or when torch lacks oneDNN.
    """
    if not enabled or not fast_cpu_available():
        return module
    return _swap(module, {})


def _swap(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:  # a module used twice stays one module
        return memo[id(module)]
    if type(module) is nn.Linear:  # subclasses (e.g. quantised linears) keep their own forward
        new: nn.Module = PackedLinear(module)
    else:
        new = copy.copy(module)
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        new._modules = {name: None if child is None else _swap(child, memo) for name, child in module._modules.items()}
    memo[id(module)] = new
    return new
