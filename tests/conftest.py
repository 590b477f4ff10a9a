"""Shared fixtures: a tiny random Llama (fast tests) and the real default model (slow tests)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import settings

# Without CUDA, run Triton kernels in its CPU interpreter. Triton chooses between compiling and
# interpreting when a kernel is defined (at import of the module holding it), so the variable
# must be set here, before any test module can import triton or bitalloc's kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test` runs one worker per core), each worker gets its share of the
# cores: torch's default of one thread per core in every worker oversubscribes them, and its
# OpenMP threads then spin against each other. The variable reaches subprocesses (CLI runs, Ray
# workers) too.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

# The fuzz tests draw new examples on every local run (and replay earlier failures from
# .hypothesis/); under CI they draw a fixed sequence, so that a landing is reproducible and a
# failure seen there can be rerun exactly (`CI=true pytest tests/fuzz`).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
) * 40


#: The palette and calibration tokens of the default-model tests that profile with Fisher: one
#: profile, computed once per session and shared through ``shared_cache`` (its cache key holds
#: both, so a test that drifted from them would silently profile again).
DEFAULT_MODEL_FORMATS = "int2-g64,int3-g128,int4-g128"
DEFAULT_MODEL_TOKENS = 512


class ByteTokenizer:
    """Bytes as token ids: enough of the tokenizer interface that bitalloc uses."""

    vocab_size = 256

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}


def make_tiny_llama(
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 96,
    *,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 256,
    max_positions: int = 256,
    **config_fields,
):
    """A random LlamaForCausalLM small enough for unit tests (input dims not multiples of 128);
    ``config_fields`` override or add LlamaConfig fields (e.g. ``attention_bias=True``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": True,
    }
    config = LlamaConfig(**{**fields, **config_fields})
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def random_windows(n: int = 4, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, seq_len) random byte-token windows: calibration for the tiny model."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n * seq_len,), generator=g).reshape(n, seq_len)


@pytest.fixture
def tiny_model():
    return make_tiny_llama()


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()


@pytest.fixture
def text_files(tmp_path):
    cal = tmp_path / "cal.txt"
    ev = tmp_path / "eval.txt"
    cal.write_text(TEXT)
    ev.write_text(TEXT[::-1])
    return cal, ev


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Profiles written under a temporary cache root."""
    root = tmp_path / "cache"
    monkeypatch.setenv("BITALLOC_CACHE_DIR", str(root))
    return root


@pytest.fixture(scope="session")
def _session_cache_root(tmp_path_factory):
    # Under pytest-xdist every worker has its own base temp inside one run directory; the
    # cache sits beside them so that a profile one worker computed is a hit in the other
    # (cache files are written atomically, so two workers writing one entry is safe).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "session-cache"
        root.mkdir(exist_ok=True)
        return root
    return tmp_path_factory.mktemp("session-cache")


def pytest_collection_modifyitems(config, items):
    """Slow tests first (in their collected order, then the rest in theirs): with one worker
    per core the minutes-long default-model tests then run beside many short ones, rather
    than last on one worker while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def shared_cache(_session_cache_root, monkeypatch):
    """Like ``isolated_cache``, but one cache root for the whole session: a profile that an
    earlier test computed (same method, options, model, palette, units and calibration tokens)
    is a cache hit here. For default-model tests that do not assert on profiling or on the
    cache, where recomputing costs tens of seconds; a hit returns the same numbers."""
    monkeypatch.setenv("BITALLOC_CACHE_DIR", str(_session_cache_root))
    return _session_cache_root


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M (loaded once per session; tests must not modify it)."""
    from bitalloc.models import load_model

    return load_model()


@pytest.fixture
def reuse_default_model(default_model, monkeypatch):
    """Every load of the embedded default model in this test (``--model`` omitted, or
    ``model=None``) returns a deep copy of the session's ``default_model``.

    Loading it for real costs 15-100 s per call on 2 cores (a GGUF dequantization under an empty
    ``isolated_cache``, else a safetensors reload) and CLI tests call ``main`` several times; a
    copy costs a few seconds. Only the GGUF step is replaced, so path checks and the model's
    name in the output stay the library's own; tests/test_models.py loads it for real.
    """
    import bitalloc.models as models

    real_load_gguf = models._load_gguf
    default_path = models.default_gguf_path()

    def load_gguf(path):
        if path != default_path:
            return real_load_gguf(path)
        return models.LoadedModel(
            copy.deepcopy(default_model.model), copy.deepcopy(default_model.tokenizer), str(path)
        )

    monkeypatch.setattr(models, "_load_gguf", load_gguf)
