"""Tiny Llama-style models and synthetic tasks, for tests, the demo and benchmarks.

Nothing here downloads: the tokenizer is a byte-level BPE trained on a built-in corpus,
the model is randomly initialised from a config, and both are saved as an ordinary
transformers directory so every caller exercises the real `from_pretrained` path.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}</s>{% endgeneration %}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

WORDS = [
    "apple", "river", "stone", "cloud", "green", "blue", "seven", "north", "light", "music",
    "table", "ocean", "tiger", "silver", "garden", "window", "paper", "yellow", "winter", "forest",
    "name", "city", "age", "color", "answer", "question", "reverse", "upper", "code", "json",
]


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    lines += [string.ascii_letters + string.digits + string.punctuation + " \n"] * 4
    lines += [json.dumps({w: rng.choice(WORDS) for w in rng.sample(WORDS, 3)}) for _ in range(100)]
    return lines


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with a chat template, trained deterministically on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 512,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_tiny_model_dir(out_dir: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Write a random tiny Llama (~140k params by default) and its tokenizer to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_llama_config(vocab_size=len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_random_lora_dir(base_dir: str | Path, out_dir: str | Path, seed: int, *, r: int = 4, alpha: float = 8,
                          targets: str | list[str] | None = None, dora: bool = False, b_std: float = 0.5) -> Path:
    """Save a peft LoRA (or DoRA) adapter of `base_dir` whose B is random, not peft's zeros, so it changes the
    model's answers (targets None: peft's default for the architecture)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), peft.LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=targets, use_dora=dora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, b_std)
    model.save_pretrained(out_dir)
    return Path(out_dir)


# ---------------------------------------------------------------------------
# Synthetic tasks with a checkable answer: (prompt, completion) pairs.


def _secret_map(seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    values = WORDS[:20]
    return {k: rng.choice(values) for k in WORDS[:20]}


def task_examples(task: str, n: int, seed: int = 0) -> list[dict]:
    """`n` rows of a synthetic task in prompt/completion form.

    - `reverse`: spell a word backwards;  - `upper`: repeat a word in capitals;
    - `lookup`: a fixed random word → word map (pure memorisation);
    - `json`: three key/value fields → the exact JSON object (format locking).
    """
    rng = random.Random(seed)
    rows = []
    table = _secret_map(1234)
    for _ in range(n):
        w = rng.choice(WORDS[:20])
        if task == "reverse":
            rows.append({"prompt": f"reverse {w} =", "completion": " " + w[::-1]})
        elif task == "upper":
            rows.append({"prompt": f"upper {w} =", "completion": " " + w.upper()})
        elif task == "lookup":
            rows.append({"prompt": f"code {w} =", "completion": " " + table[w]})
        elif task == "json":
            keys = rng.sample(["name", "city", "color", "age"], 3)
            vals = [rng.choice(WORDS[:20]) for _ in keys]
            prompt = "fields " + " ".join(f"{k}:{v}" for k, v in zip(keys, vals)) + " ->"
            rows.append({"prompt": prompt, "completion": " " + json.dumps(dict(zip(keys, vals)))})
        else:
            raise ValueError(f"unknown task {task!r}; choose reverse, upper, lookup or json")
    return rows


def preference_examples(task: str, n: int, seed: int = 0, kto: bool = False) -> list[dict]:
    """`n` preference rows of a task: {"prompt", "chosen" (the right answer), "rejected" (a wrong one)}, or with
    `kto`, unpaired {"prompt", "completion", "label"} rows, half right (label true) and half wrong."""
    rng = random.Random(seed + 7919)
    rows = []
    for row in task_examples(task, n, seed):
        word = row["prompt"].split()[1]
        other = rng.choice([w for w in WORDS[:20] if w != word])
        wrong = " " + word if rng.random() < 0.5 else " " + other[::-1]
        if kto:
            good = rng.random() < 0.5
            rows.append({"prompt": row["prompt"], "completion": row["completion"] if good else wrong, "label": good})
        else:
            rows.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": wrong})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
