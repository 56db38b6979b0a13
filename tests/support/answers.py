"""What plain peft/transformers answer: greedy answers and log-likelihoods, the references rayft eval is checked against."""

from __future__ import annotations

import torch


MAX_TOKENS = 6


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _peft_answer(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
    return _decode(tokenizer, out[0, ids.shape[1]:].tolist())


def _direct_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context) with plain transformers: context and continuation tokenized apart."""
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    cont = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logprobs[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))
