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
- training: a float32 CPU call that needs gradients runs its forward and both backward GEMMs
  through oneDNN too (`OneDNNLinear`: no packing, the weights change every step); a call under
  autocast, on another device or dtype, or inside `torch.compile` takes `F.linear`, so the
  returned module trains, autocasts, compiles and moves like the original. The Trainer uses it
  on the CPU (`TrainConfig.fast_cpu`).

Two fusions and one option:
- an exact-GELU or tanh-GELU MLP (`layers.mlp.Mlp`) computes its activation inside `fc1`'s GEMM
  (a oneDNN post-op: one pass over the hidden activations less).
- `matmul_dtype=torch.bfloat16` on a float32 model runs every linear as oneDNN's bf16 GEMM (AMX or
  avx512_bf16 where the CPU has them) on weights packed in bf16 once, and nothing else: as under
  `torch.autocast("cpu", torch.bfloat16)`, a linear's output is bfloat16 while the residual stream,
  norms and their weights stay float32, which is what keeps the error near autocast's (a bf16
  model, `module.to(torch.bfloat16)`, is faster and ~4x less accurate: numbers in
  `benchmarks/results/cpu_fast_path.md`).

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

from .layers.mlp import Mlp

PACK_ROWS_HINT = 1024  # rows oneDNN is told to expect when packing (fixed: the pack never depends on a batch)
_FAST_DTYPES = (torch.float32, torch.bfloat16)
# The hook tables a swapped linear shares with the original, as `copy.copy` makes the other
# modules of the fast tree share theirs.
_SHARED_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def fast_cpu_available() -> bool:
    """Whether this torch build has oneDNN (mkldnn) for the CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight.T + bias` by oneDNN on a plain (unpacked) weight `(out, in)`."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """`F.linear` for float32 CPU training with its three GEMMs in oneDNN: the forward
    `x W^T + b`, the input gradient `g W` and the weight gradient `g^T x` (on AMD CPUs MKL's
    sgemm runs its AVX2 code, oneDNN AVX-512: 1.5-2.5x per GEMM, `benchmarks/cpu_gemm_routes.py --training`).
    Float32 throughout (differences to `F.linear`: the order of the sums). Not twice
    differentiable.

    Shapes: x `(..., in)`, weight `(out, in)`, bias `(out,)` or None -> `(..., out)`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _gemm(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])  # (rows, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _gemm(grad, weight.t(), None)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[1]:
            grad_w = _gemm(grad_2d.t(), x.reshape(-1, x.shape[-1]).t(), None)  # (out, rows) @ (rows, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


class PackedLinear(nn.Module):
    """An `nn.Linear` (same `weight` / `bias` parameters) whose CPU inference calls run oneDNN's
    GEMM on a weight packed once, and packed again when the weight is replaced or changed by a
    tracked in-place op (`copy_`, `load_state_dict`, a non-fused optimizer step). Edits that
    torch does not track (through `.data`, a fused optimizer step) are not seen: call
    `fast_cpu` again on the edited model (the packs are inference state, never saved).

    Args:
        linear: The layer to wrap; its parameters are shared, not copied.
        matmul_dtype: `torch.bfloat16` runs a float32 call as a bf16 GEMM and returns bfloat16
            (autocast's rule); `None` computes in the weight's dtype.
        gelu: `"none"` (exact) or `"tanh"`: a GELU applied to the output (fused into the GEMM on
            the fast path), or `None`.
    """

    def __init__(self, linear: nn.Linear, matmul_dtype: torch.dtype | None = None, gelu: str | None = None) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.matmul_dtype = matmul_dtype
        self.gelu = gelu
        self._pack: tuple | None = None  # (key, packed weight, bias): an opaque mkldnn tensor, never saved
        for name in _SHARED_HOOKS:  # a hook registered on `linear`, before or after, runs here too
            object.__setattr__(self, name, getattr(linear, name))

    def _packed(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.weight, self.bias
        key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape), dtype,
               None if b is None else (b.data_ptr(), b._version))
        if self._pack is None or self._pack[0] != key:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype), PACK_ROWS_HINT)
            self._pack = (key, packed, None if b is None else b.detach().to(dtype))
        return self._pack[1], self._pack[2]

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.matmul_dtype and x.dtype != self.weight.dtype:  # a bf16 output of a previous linear
            x = x.to(self.weight.dtype)
        return self._activate(F.linear(x, self.weight, self.bias))

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.gelu is None else F.gelu(y, approximate=self.gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(..., in_features) -> (..., out_features)`, as `nn.Linear` (then GELU when fused)."""
        w = self.weight
        dtype = self.matmul_dtype if self.matmul_dtype is not None and w.dtype == torch.float32 else w.dtype
        if (
            x.device.type != "cpu"
            or w.device.type != "cpu"
            or x.dtype not in (w.dtype, dtype)
            or w.dtype not in _FAST_DTYPES
            or (self.bias is not None and self.bias.dtype != w.dtype)
            or torch.compiler.is_compiling()
            or torch.is_autocast_enabled("cpu")
        ):
            return self._plain(x)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            if dtype != torch.float32 or x.dtype != torch.float32:
                return self._plain(x)
            return self._activate(OneDNNLinear.apply(x, w, self.bias))
        packed, bias = self._packed(dtype)
        if self.gelu is None:
            return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "gelu", [], self.gelu)

    def extra_repr(self) -> str:
        extra = "" if self.matmul_dtype is None else f", matmul_dtype={self.matmul_dtype}"
        extra += "" if self.gelu is None else f", gelu={self.gelu!r}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{extra}"


def fast_cpu(module: nn.Module, enabled: bool = True, matmul_dtype: torch.dtype | None = None) -> nn.Module:
    """`module` with every `nn.Linear` running oneDNN's prepacked GEMM on the CPU.

    The returned module is a copy of the module tree sharing every parameter, buffer and hook
    table with `module` (no weights are copied; `module` itself is left as it was; a forward
    hook registered on a module of `module`, even later, runs in the copy too), with the same
    `state_dict` keys and values. Each packed weight costs one more copy of that weight
    while the module lives. It is meant for inference on fixed weights (extraction, pictures):
    after editing weights through `.data` or a fused optimizer, build it again (`PackedLinear`).

    Args:
        module: Any model (an encoder, a text tower, a `ContrastiveModel`).
        enabled: `False` returns `module` itself (the plain path), so callers can pass a flag.
        matmul_dtype: `torch.bfloat16`: a float32 model's linears run as bf16 GEMMs returning
            bfloat16, everything else stays float32 (autocast's precision, see the module
            docstring); `None` (default): each linear computes in its weight's dtype.

    Returns:
        The fast module, or `module` when disabled or when torch lacks oneDNN.
    """
    if matmul_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"matmul_dtype must be None, torch.float32 or torch.bfloat16, not {matmul_dtype}")
    if not enabled or not fast_cpu_available():
        return module
    return _swap(module, {}, None if matmul_dtype == torch.float32 else matmul_dtype)


def _swap(module: nn.Module, memo: dict[int, nn.Module], matmul_dtype: torch.dtype | None) -> nn.Module:
    if id(module) in memo:  # a module used twice stays one module
        return memo[id(module)]
    if type(module) is nn.Linear:  # subclasses (e.g. quantised linears) keep their own forward
        new: nn.Module = PackedLinear(module, matmul_dtype)
    else:
        new = copy.copy(module)
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        new._modules = {name: None if child is None else _swap(child, memo, matmul_dtype)
                        for name, child in module._modules.items()}
        if type(module) is Mlp and type(module.fc1) is nn.Linear and type(module.act) is nn.GELU:
            new._modules["fc1"] = PackedLinear(module.fc1, matmul_dtype, gelu=module.act.approximate)
            new._modules["act"] = nn.Identity()  # fused into fc1 (no parameters: state_dict unchanged)
    memo[id(module)] = new
    return new
