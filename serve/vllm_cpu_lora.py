"""A vLLM plugin that fixes base-model rows in vLLM's CPU LoRA kernels (registered in pyproject.toml under
`vllm.general_plugins`, so vLLM loads it in each of its processes: the engine core and its workers).

vLLM's CPU LoRA ops (`vllm.lora.ops.torch_ops`, 0.29) gather each row's adapter weights as `stacked[index]`, and
a row without an adapter has index -1. In a batch that also holds adapter rows, a base-model row therefore gets
the adapter in the *last* slot applied (Python's -1); its GPU kernels skip -1. Measured on CPU: base answers came
back wrong, status 200, whenever base and adapter requests were batched together (and bare Ray Serve LLM, which
runs the same kernels, still does). These wrappers give rows with index < 0 no LoRA contribution and leave the
other rows' arithmetic exactly as vLLM computes it.

Nothing here runs on GPUs: the Triton kernels are used there and these ops are never called.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

#: Where vLLM's CPU LoRA ops live (its sgmv_* call its bgmv_* through this module), and the modules that
#: imported them by name (the package and the CPU punica wrapper): each gets the wrapped ones.
_OPS_MODULE = "vllm.lora.ops.torch_ops.lora_ops"
_CALLERS = ("vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")
_PATCHED = "__rayft_masks_base_rows__"


def masked_shrink(op: Callable[..., None]) -> Callable[..., None]:
    """`bgmv_shrink(inputs, A, out, indices, scaling)` sets out[:, :rank] = scaling · inputs @ A[index]; a row of
    index -1 gets 0 there."""
    def bgmv_shrink(inputs: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, indices: torch.Tensor,
                    scaling: float = 1.0) -> None:
        indices = _per_row(indices, out)
        rows = indices >= 0
        if _unmasked(rows, out):
            return op(inputs, weights, out, indices, scaling)
        out[rows.logical_not(), : weights.shape[-2]] = 0
        _on_rows(op, rows, inputs, weights, out, indices, scaling)

    setattr(bgmv_shrink, _PATCHED, op)
    return bgmv_shrink


def masked_expand(op: Callable[..., None]) -> Callable[..., None]:
    """`bgmv_expand(inputs, B, out, indices, add_inputs=True)` adds (or sets) inputs @ B[index] into out's first
    columns; a row of index -1 keeps what it had (or gets 0)."""
    def bgmv_expand(inputs: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, indices: torch.Tensor,
                    add_inputs: bool = True) -> None:
        indices = _per_row(indices, out)
        rows = indices >= 0
        if _unmasked(rows, out):
            return op(inputs, weights, out, indices, add_inputs)
        if not add_inputs:
            out[rows.logical_not(), : min(weights.shape[-2], out.shape[1])] = 0
        _on_rows(op, rows, inputs, weights, out, indices, add_inputs)

    setattr(bgmv_expand, _PATCHED, op)
    return bgmv_expand


def masked_expand_slice(op: Callable[..., None]) -> Callable[..., None]:
    """`bgmv_expand_slice(inputs, B, out, indices, offset, size, add_inputs=True)`: the same into out's columns
    offset:offset+size."""
    def bgmv_expand_slice(inputs: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, indices: torch.Tensor,
                          slice_offset: int, slice_size: int, add_inputs: bool = True) -> None:
        indices = _per_row(indices, out)
        rows = indices >= 0
        if _unmasked(rows, out):
            return op(inputs, weights, out, indices, slice_offset, slice_size, add_inputs)
        if not add_inputs:
            out[rows.logical_not(), slice_offset: slice_offset + slice_size] = 0
        _on_rows(op, rows, inputs, weights, out, indices, slice_offset, slice_size, add_inputs)

    setattr(bgmv_expand_slice, _PATCHED, op)
    return bgmv_expand_slice


def _per_row(indices: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One index per row of `out`. A single index for several rows is one request's: the logits of its prompt
    tokens (prompt log-probabilities) get the sampler's per-request index, which vLLM's op broadcasts; spelled
    out per row, a base request's -1 is masked like any other."""
    return indices.expand(out.shape[0]) if indices.shape[0] == 1 and out.shape[0] != 1 else indices


def _unmasked(rows: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether vLLM's op can run as it is: every row has an adapter, or the indices are not one per row of `out`
    (several requests' prompt log-probabilities; vLLM's op fails on those itself)."""
    return rows.shape[0] != out.shape[0] or bool(rows.all())


def _on_rows(op: Callable[..., None], rows: torch.Tensor, inputs: torch.Tensor, weights: torch.Tensor,
             out: torch.Tensor, indices: torch.Tensor, *args: Any) -> None:
    """vLLM's own op on the adapter rows alone (boolean indexing copies: the result is written back)."""
    if bool(rows.any()):
        part = out[rows]
        op(inputs[rows], weights, part, indices[rows], *args)
        out[rows] = part


def register() -> None:
    """vLLM's plugin entry point: wrap the CPU LoRA ops once per process (idempotent)."""
    import importlib
    import sys

    ops = importlib.import_module(_OPS_MODULE)
    wrapped = {}
    for name, wrap in (("bgmv_shrink", masked_shrink), ("bgmv_expand", masked_expand),
                       ("bgmv_expand_slice", masked_expand_slice)):
        current = getattr(ops, name)
        wrapped[name] = current if hasattr(current, _PATCHED) else wrap(current)
        setattr(ops, name, wrapped[name])
    # the modules that hold the ops by their own names (imported here, so they bind the wrapped ones)
    for module_name in _CALLERS:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        for name, fn in wrapped.items():
            if hasattr(module, name):
                setattr(module, name, fn)


def is_registered() -> bool:
    """Whether this Python environment has the plugin registered with vLLM (rayft installed as a package)."""
    from importlib.metadata import entry_points

    return any(ep.value == f"{__name__}:register" for ep in entry_points(group="vllm.general_plugins"))
