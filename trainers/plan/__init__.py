"""Pre-flight memory and strategy planner: how much memory a fine-tuning job needs, per device and in total.

Every figure describes what the worker loop (`trainers.loop`, `trainers.strategy`) really allocates, and each comes from the library that owns it:

- parameters: the model is built from its config on the meta device (never weights) and wrapped with the
  method's own `peft_config`; trainable and total counts are peft's `get_nb_trainable_parameters()`;
- base weights: the dtype `trainers.precision.decide_precision` loads the base in (full fine-tuning keeps fp32
  master weights under autocast; adapters sit on a 16-bit base on GPUs). QLoRA: the linear layers
  transformers hands to bitsandbytes are 4-bit (two weights a byte) plus bitsandbytes' block constants
  (an fp32 absmax per 64 weights, or with double quant an 8-bit absmax per 64 weights and an fp32 one per
  256 blocks); everything else is fp32, because `peft.prepare_model_for_kbit_training` upcasts it;
- gradients and optimizer: torch AdamW keeps two tensors like each trainable parameter; bitsandbytes'
  8-bit AdamW keeps two uint8 tensors plus an fp32 absmax per 256 values (tensors under 4096 values stay fp32);
- activations: what autograd really saves. The wrapped model runs one forward pass under `FakeTensorMode`
  (shapes and dtypes only, no memory), with the loop's autocast and a padded batch's attention mask, and a
  saved-tensor hook sums every distinct storage autograd keeps for backward, by decoder layer. Gradient
  checkpointing keeps each layer's input and recomputes one layer at a time in backward;
- transients: the loss's logits gradients at the start of backward, the optimizer step's temporaries,
  the dequantized weight of one 4-bit layer;
- ZeRO-3: DeepSpeed's accounting (16-bit parameter shard, fp32 gradient shard, fp32 master + Adam moments:
  18 B per parameter over the GPUs, plus the largest layer gathered), host memory for CPU offload with
  DeepSpeed's 1.5x pinned-buffer factor;
- overhead: a stated runtime constant per device (CUDA context and library workspaces, or the torch/Ray
  worker process on CPU) plus an allocator margin on the dynamic part (10% on CUDA; 100% on CPU, where
  glibc keeps freed blocks in its heap).

The package, by seam: `models` (request and result models, sizes), `configs` (reading a model's config, never
its weights), `trace` (the meta-device skeleton and the fake-tensor activation trace), `memory` (counting and
composing the plan: `plan()`), `recommend` (`rayft plan --task`, the cheapest change that fits) and `preflight`
(plans of job specs, and the check `trainers.run.run_training` and every tune trial run before training).
"""

from trainers.plan.configs import load_model_config
from trainers.plan.memory import four_bit_bytes, optimizer_state_bytes, plan, zero3_model_states
from trainers.plan.models import (
    DEFAULT_TOTAL_STEPS,
    GiB,
    MiB,
    TASK_HELP,
    DoesNotFit,
    Hardware,
    MemoryBreakdown,
    Plan,
    PlanError,
    PlanRequest,
    Recommendation,
    TaskType,
    _validation_lines,
    format_bytes,
    parse_size,
)
from trainers.plan.preflight import (
    detect_hardware,
    plan_for_model,
    plan_for_spec,
    preflight_check,
    request_for_spec,
    run_hardware,
    spec_model_location,
)
from trainers.plan.recommend import cheapest_fit, recommend

__all__ = [
    "DEFAULT_TOTAL_STEPS", "GiB", "MiB", "TASK_HELP", "DoesNotFit", "Hardware", "MemoryBreakdown", "Plan", "PlanError",
    "PlanRequest", "Recommendation", "TaskType", "_validation_lines", "cheapest_fit", "detect_hardware", "format_bytes",
    "four_bit_bytes", "load_model_config", "optimizer_state_bytes", "parse_size", "plan", "plan_for_model",
    "plan_for_spec", "preflight_check", "recommend", "request_for_spec", "run_hardware", "spec_model_location",
    "zero3_model_states",
]
