"""The job resolved as the worker loop resolves it, the model skeleton on the meta device, and the fake-tensor
trace of what autograd saves for backward."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

from trainers.methods import method_module, traits
from trainers.plan.models import PlanError, PlanRequest
from trainers.precision import decide_precision


# ----------------------------------------------------------------------------------- resolved settings


@dataclass(frozen=True)
class _Setup:
    """The request resolved the way the training loop resolves a job."""

    precision: str  # fp32 | bf16 | fp16
    base_dtype: Any  # torch dtype of the (non-quantized) base weights
    autocast_dtype: Any  # torch dtype or None
    strategy: str
    quantized: bool
    compute_dtype: Any  # 4-bit dequant dtype (qlora)
    trace_model_dtype: Any  # dtype the traced model is cast to (ZeRO-3 runs the model in 16-bit, no autocast)
    trace_autocast: Any


def _resolve(req: PlanRequest) -> _Setup:
    import torch

    full = not traits(req.method.name).is_adapter
    strategy = req.resolved_strategy()
    name = req.precision
    if name == "auto":
        # The loop asks the device; for a plan the device is hypothetical: bf16-capable GPUs (Ampere+) are assumed.
        name = "bf16" if req.hardware.device == "cuda" else "fp32"
    precision = decide_precision(name, torch.device(req.hardware.device), full_finetune=full)
    base = precision.base_dtype if req.model_dtype == "auto" else getattr(torch, req.model_dtype)
    quantized = traits(req.method.name).quantized_base
    compute = None
    if quantized:
        cd = getattr(req.method, "compute_dtype", "auto")
        compute = (precision.autocast_dtype or torch.float32) if cd == "auto" else getattr(torch, cd)
    trace_dtype, trace_autocast = None, precision.autocast_dtype
    if strategy == "deepspeed_zero3":
        # DeepSpeed keeps 16-bit parameters and runs the model in them: no autocast, no weight casts.
        trace_dtype = precision.autocast_dtype or torch.float32
        trace_autocast = None
    return _Setup(precision.name, base, precision.autocast_dtype, strategy, quantized, compute, trace_dtype, trace_autocast)


# ------------------------------------------------------------------------------------ model skeleton


@dataclass
class _Skeleton:
    model: Any
    layers: list
    quantized_modules: set[str]
    output_head: Any
    vocab_size: int


def _build_skeleton(config, req: PlanRequest, setup: _Setup) -> _Skeleton:
    """The model as the loop builds it, on the meta device: base dtype, 4-bit layers marked, method applied."""
    import torch
    from transformers import AutoModelForCausalLM

    method = method_module(req.method.name)
    peft_cfg = method.peft_config(req.method, req.total_steps)
    config = _copy_config(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=setup.base_dtype)
    except ValueError as exc:
        raise PlanError(f"model type {config.model_type!r}: no causal-LM class in transformers ({str(exc).splitlines()[0]})") from None
    quantized: set[str] = set()
    if setup.quantized:
        quantized = _quantized_module_names(model, req)
        for name, module in model.named_modules():
            if name in quantized:
                module.__class__ = _four_bit_standin()
                module.compute_dtype = setup.compute_dtype
                module.weight.data = module.weight.data.to(setup.compute_dtype)
        # As peft.prepare_model_for_kbit_training: freeze the base, upcast 16-bit non-4-bit params to fp32.
        for name, param in model.named_parameters():
            param.requires_grad = False
            owner = name.rsplit(".", 1)[0]
            if owner not in quantized and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.to(torch.float32)
    output_head = model.get_output_embeddings()
    vocab = output_head.weight.shape[0] if output_head is not None else int(getattr(config, "vocab_size", 0))
    if peft_cfg is not None:
        import peft

        with torch.device("meta"):
            model = peft.get_peft_model(model, peft_cfg)
    layers = _decoder_layers(model, config)
    return _Skeleton(model, layers, quantized, output_head, vocab)


def _copy_config(config):
    config = config.__class__.from_dict(config.to_dict())
    config.use_cache = False  # the loop trains without a KV cache
    return config


def _quantized_module_names(model, req: PlanRequest) -> set[str]:
    """Names of the nn.Linear modules transformers' bitsandbytes integration turns into Linear4bit."""
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    qcfg = method_module("qlora").quantization_config(req.method, torch.float32)
    skips = HfQuantizer.get_modules_to_not_convert(model, qcfg.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None))
    return {
        name for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and should_convert_module(name, skips)
    }


def _decoder_layers(model, config) -> list:
    import torch

    want = getattr(config, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    for candidate in lists:
        if want is not None and len(candidate) == want:
            return list(candidate)
    return list(max(lists, key=len)) if lists else []


@functools.lru_cache(maxsize=1)
def _four_bit_standin():
    import torch

    class FourBitLinearStandIn(torch.nn.Linear):
        """Traces like bitsandbytes' Linear4bit: input cast to the compute dtype, output cast back; the
        matmul saves nothing but the (frozen) weight, exactly like `bnb.matmul_4bit`."""

        def forward(self, x):
            dtype = x.dtype
            out = torch.nn.functional.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype), self.bias)
            return out.to(dtype)

    return FourBitLinearStandIn


@functools.lru_cache(maxsize=1)
def _fused_dropout_standin():
    """nn.Dropout as CUDA runs it: the fused kernel saves a 1-byte mask (the CPU kernel saves a float one)."""
    import torch

    class FusedDropout(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(torch.empty(x.shape, dtype=torch.bool, device=x.device))
            return x.clone()

        @staticmethod
        def backward(ctx, grad):  # never run: the trace only needs what forward saves
            return grad

    class FusedDropoutStandIn(torch.nn.Dropout):
        def forward(self, x):
            return FusedDropout.apply(x) if self.training and self.p > 0 else x

    return FusedDropoutStandIn


# ----------------------------------------------------------------------------------- activation trace


@dataclass
class _Trace:
    outside: int  # saved bytes not attributed to a decoder layer
    layers: list[int]  # saved bytes per decoder layer
    layer_input: int  # bytes of one layer's input hidden states


@dataclass
class ActivationModel:
    """Saved-activation bytes as an affine function of the micro-batch: a + b * batch (exact for a fixed seq_len)."""

    at1: _Trace
    at2: _Trace

    def _lin(self, a: int, b: int, batch: int) -> int:
        return max(0, a + (b - a) * (batch - 1))

    def parts(self, batch: int) -> tuple[int, int, int, int]:
        """(outside-layer saved, all layers saved, largest layer saved, all layer inputs) for `batch` examples."""
        outside = self._lin(self.at1.outside, self.at2.outside, batch)
        per_layer = [self._lin(a, b, batch) for a, b in zip(self.at1.layers, self.at2.layers)]
        inputs = self._lin(self.at1.layer_input, self.at2.layer_input, batch) * len(per_layer)
        return outside, sum(per_layer), max(per_layer, default=0), inputs

    def saved(self, batch: int, checkpointing: bool) -> int:
        """Bytes saved for backward; with checkpointing: layer inputs + outside tensors + one recomputed layer."""
        outside, layers, largest, inputs = self.parts(batch)
        return outside + (inputs + largest if checkpointing else layers)


def _to_fake(model, mode) -> None:
    """Swap every meta tensor of the model for a fake CPU tensor (keeping ties and requires_grad)."""
    import torch

    swapped: dict[int, Any] = {}

    def fake_like(t):
        if id(t) not in swapped:
            with mode:
                new = torch.empty(t.shape, dtype=t.dtype)
            swapped[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
        return swapped[id(t)]

    def convert(value):
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            return fake_like(value)
        if isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            return {k: convert(v) for k, v in value.items()}
        return value

    for module in model.modules():
        for key, value in list(module._parameters.items()):
            if value is not None:
                module._parameters[key] = fake_like(value)
        for key, value in list(module._buffers.items()):
            if value is not None:
                module._buffers[key] = fake_like(value)
        for key, value in list(vars(module).items()):
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            new = convert(value)
            if new is not value:
                setattr(module, key, new)


def _trace(skel: _Skeleton, setup: _Setup, seq_len: int, batch: int, mode, method_name: str) -> _Trace:
    """Bytes autograd saves in one training forward pass of `batch` x `seq_len` tokens, by decoder layer."""
    import torch

    model = skel.model
    excluded = {p.untyped_storage()._cdata for p in model.parameters()}
    excluded |= {b.untyped_storage()._cdata for b in model.buffers()}
    seen: set[int] = set()
    where = {"layer": None}
    outside, per_layer, layer_input = 0, [0] * len(skel.layers), [0]

    def pack(t):
        nonlocal outside
        storage = t.untyped_storage()
        key = storage._cdata
        if key in excluded or key in seen:
            return t
        seen.add(key)
        if where["layer"] is None:
            outside += storage.nbytes()
        else:
            per_layer[where["layer"]] += storage.nbytes()
        return t

    handles = []
    for i, layer in enumerate(skel.layers):
        def enter(module, args, kwargs, i=i):
            where["layer"] = i
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                layer_input[0] = max(layer_input[0], hidden.numel() * hidden.element_size())

        def leave(module, args, kwargs, output):
            where["layer"] = None

        handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(layer.register_forward_hook(leave, with_kwargs=True))
    model.train()
    try:
        with mode:
            ids = torch.zeros(batch, seq_len, dtype=torch.long)
            kwargs: dict[str, Any] = {"input_ids": ids, "labels": ids}
            if not traits(method_name).prompt_learning:
                # A padded batch (the loop right-pads): transformers builds this 4-D mask and sdpa keeps it.
                kwargs["attention_mask"] = torch.ones(batch, 1, seq_len, seq_len, dtype=torch.bool)
            autocast = (
                torch.autocast("cpu", dtype=setup.trace_autocast) if setup.trace_autocast is not None else contextlib.nullcontext()
            )
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
                out = model(**kwargs)
            del out
    finally:
        for handle in handles:
            handle.remove()
    return _Trace(outside, per_layer, layer_input[0])


def _activation_model(skel: _Skeleton, setup: _Setup, seq_len: int, method_name: str, device: str) -> ActivationModel:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    if setup.trace_model_dtype is not None:
        for param in skel.model.parameters():
            if param.dtype.is_floating_point and param.dtype != setup.trace_model_dtype and param.numel() > 0:
                param.data = param.data.to(setup.trace_model_dtype)
    if device == "cuda":
        for module in skel.model.modules():
            if type(module) is torch.nn.Dropout:
                module.__class__ = _fused_dropout_standin()
    _to_fake(skel.model, mode)
    try:
        return ActivationModel(
            _trace(skel, setup, seq_len, 1, mode, method_name),
            _trace(skel, setup, seq_len, 2, mode, method_name),
        )
    except (RuntimeError, NotImplementedError) as exc:  # data-dependent control flow, an op without a fake kernel
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(
            f"cannot trace the forward pass of this {type(skel.model).__name__} on shapes alone ({first[:160]}); "
            "its activations cannot be planned"
        ) from None
