"""Random Llama checkpoints of any size, written shard by shard (one decoder layer per shard),
so that making a 3B-parameter test model never holds more than one layer in memory.

The weights are bf16 draws from N(0, 0.02) (norms 1), as transformers initialises a Llama;
the config is a plain ``LlamaConfig``, and the directory loads with transformers like any
checkpoint. Used by the streaming tests and ``benchmarks/scale.py``; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bitalloc.errors import BitallocError
from bitalloc.fileio import write_atomic
from bitalloc.streaming.checkpoint import INDEX


def llama_config(
    hidden: int, layers: int, intermediate: int, *, heads: int, kv_heads: int, vocab: int
) -> dict:
    """A Llama config dict (untied head) with the given sizes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def parameter_count(config: dict) -> int:
    """Parameters of a Llama with this config (untied head)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return config["num_hidden_layers"] * layer + 2 * v * h + h


def write_random_llama(
    path: str | Path, config: dict, seed: int = 0, *, tokenizer: Any = None
) -> Path:
    """Write a random bf16 Llama checkpoint with ``config`` to the directory ``path``: one
    shard for the embedding and head, one per decoder layer, and the index; with
    ``tokenizer`` (whose vocabulary must fit the config's), its files too, so that the
    checkpoint tokenizes calibration text and converts to GGUF like a real one."""
    if tokenizer is not None and len(tokenizer) > config["vocab_size"]:
        raise BitallocError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the config's vocabulary of "
            f"{config['vocab_size']}; give the config a vocabulary of at least that"
        )
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    count = config["num_hidden_layers"]
    shard(
        "model-outer.safetensors",
        {
            "model.embed_tokens.weight": normal(v, h),
            "lm_head.weight": normal(v, h),
            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        },
    )
    for layer in range(count):
        p = f"model.layers.{layer}."
        shapes = {
            "self_attn.q_proj.weight": (h, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, h),
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
        }
        tensors = {p + name: normal(*shape) for name, shape in shapes.items()}
        tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        shard(f"model-layer-{layer:04d}.safetensors", tensors)
    total = sum((path / s).stat().st_size for s in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_atomic(path / INDEX, lambda fh: fh.write(json.dumps(index, indent=1).encode()))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    # Last: a directory with a config is complete.
    write_atomic(path / "config.json", lambda fh: fh.write(json.dumps(config).encode()))
    return path
