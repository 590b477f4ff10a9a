"""Fixtures the streaming tests share."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A 3-layer tiny Llama saved in bf16 over several shards (untied head)."""
    path = tmp_path_factory.mktemp("sharded")
    model = make_tiny_llama(layers=3, tie_word_embeddings=False)
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="60KB")
    assert len(list(path.glob("*.safetensors"))) > 2
    return path
