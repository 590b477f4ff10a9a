"""A causal LM that is never whole in memory: decoder layers are loaded from the checkpoint one
at a time, in float32, run over the calibration activations and released.

The model's structure is built on PyTorch's ``meta`` device from its config (no memory), which
gives every unit's name and shape (:func:`~bitalloc.models.discover_units` works on it as on a
loaded model). What runs:

- the **shell**: the embedding, the final norm, the output head and the rotary embedding, kept
  in the checkpoint's dtype (bf16 stays bf16: a 128k-token vocabulary is 0.8 GB per matrix at
  3B parameters, twice that in float32); rows are turned to float32 as they are used;
- **one decoder layer at a time** (:meth:`StreamedModel.layer`), its tensors read from the
  memory-mapped shards and turned to float32, released (back to ``meta``) on leaving.

Every computation is float32, as in the in-memory path, so a streamed measurement equals the
in-memory one up to float summation order. Supported: Llama-family layouts (``model.embed_tokens``,
``model.layers``, ``model.norm``, ``lm_head``, ``model.rotary_emb``: Llama, Mistral, Qwen2/3);
another layout is refused with an error that names what is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.models import Unit, discover_units
from bitalloc.sequential import first_block_inputs, run_block
from bitalloc.streaming.skeleton import meta_skeleton
from bitalloc.streaming.sources import open_checkpoint

if TYPE_CHECKING:
    from bitalloc.importance import Importance

#: Output-head rows turned to float32 at once when computing the loss (bounds its memory).
HEAD_ROWS = 8192

LayerInputs = list[tuple[tuple, dict[str, Any]]]


class StreamedModel:
    """A checkpoint (a Hugging Face directory of safetensors shards, or a GGUF file) as a model
    run layer by layer (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.checkpoint = open_checkpoint(path)
        self.config = self.checkpoint.hf_config()
        self.skeleton = meta_skeleton(self.config)
        self.units: list[Unit] = discover_units(self.skeleton)
        self.layers: nn.ModuleList = self.skeleton.model.layers
        self._shell_loaded = False

    # --- the shell ------------------------------------------------------------------------
    def _load_shell(self) -> None:
        if self._shell_loaded:
            return
        inner = self.skeleton.model
        embed_name = "model.embed_tokens.weight"
        embed = self.checkpoint.tensor(embed_name)
        inner.embed_tokens.weight = nn.Parameter(embed, requires_grad=False)
        inner.norm.to_empty(device="cpu")
        for name, value in self.checkpoint.state_dict("model.norm.", torch.float32).items():
            inner.norm.get_parameter(name).data.copy_(value)
        head = "lm_head.weight"
        if head in self.checkpoint:
            weight = self.checkpoint.tensor(head)
        elif getattr(self.config, "tie_word_embeddings", False):
            weight = embed
        else:
            raise BitallocError(
                f"the checkpoint in {self.checkpoint.path} has no {head} and its config does not "
                "tie it to the embedding; a shard is missing"
            )
        self.skeleton.lm_head.weight = nn.Parameter(weight, requires_grad=False)
        # The rotary embedding's frequencies are computed, not stored: build it on the CPU.
        inner.rotary_emb = type(inner.rotary_emb)(config=self.config)
        self._shell_loaded = True

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 input embeddings of token ids (batch, seq)."""
        self._load_shell()
        return F.embedding(ids, self.skeleton.model.embed_tokens.weight).to(torch.float32)

    def first_layer_inputs(self, windows: torch.Tensor) -> LayerInputs:
        """(args, kwargs) of the first decoder layer's call for each batch of windows (the
        attention mask, positions and rotary embedding every layer receives), computed by the
        model's own forward in float32 and stopped at the first layer."""
        self._load_shell()

        def forward(ids: torch.Tensor) -> object:
            return self.skeleton.model(inputs_embeds=self.embed(ids), use_cache=False)

        with torch.inference_mode():
            return first_block_inputs(self.layers[0], forward, windows)

    def loss(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss per window (batch,) from the last layer's output.

        The logits are never whole: the head is read :data:`HEAD_ROWS` rows at a time (turned
        to float32 a block at a time) and each block's log-sum-exp is folded into a running
        one, so the memory is tokens x :data:`HEAD_ROWS` floats whatever the vocabulary."""
        self._load_shell()
        normed = self.skeleton.model.norm(hidden)[:, :-1]
        flat = normed.reshape(-1, normed.shape[-1])
        targets = ids[:, 1:].reshape(-1)
        head = self.skeleton.lm_head.weight
        total = torch.full((flat.shape[0],), float("-inf"))
        picked = torch.zeros(flat.shape[0])
        for start in range(0, head.shape[0], HEAD_ROWS):
            logits = F.linear(flat, head[start : start + HEAD_ROWS].to(torch.float32))
            total = torch.logaddexp(total, torch.logsumexp(logits, dim=-1))
            inside = (targets >= start) & (targets < start + logits.shape[1])
            rows = torch.nonzero(inside).flatten()
            picked[rows] = logits[rows, targets[rows] - start]
        return (total - picked).reshape(ids.shape[0], -1).mean(dim=1)

    # --- layers ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` loaded in float32 for the ``with`` block, released after."""
        module = self.layers[index]
        prefix = f"model.layers.{index}."
        try:
            state = self.checkpoint.state_dict(prefix, torch.float32)
            # assign: the tensors read become the parameters (no second float32 copy).
            missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
            del state
            if missing:
                raise BitallocError(
                    f"the checkpoint in {self.checkpoint.path} has no {prefix}{missing[0]} "
                    f"({len(missing)} tensor(s) of layer {index} missing); a shard is incomplete"
                )
            if unexpected:
                raise BitallocError(
                    f"the checkpoint holds {prefix}{unexpected[0]}, which the config's layer "
                    "does not have; the config is not this checkpoint's"
                )
            yield module
        finally:
            module.to("meta")
            release_freed_memory()

    def layer_units(self, index: int) -> list[Unit]:
        """The units of decoder layer ``index``, in order."""
        return [u for u in self.units if u.layer == index]

    def layer_bytes(self, index: int) -> int:
        """Stored bytes of layer ``index``'s tensors."""
        prefix = f"model.layers.{index}."
        return sum(self.checkpoint.info(n).nbytes for n in self.checkpoint.names(prefix))


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). Without it, each layer's freed float32 tensors leave the heap fragmented and
    the resident set grows by about a third of a layer per layer."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


def run_layer(layer: nn.Module, inputs: Sequence[tuple[tuple, dict[str, Any]]]) -> LayerInputs:
    """The layer's output for each batch, as the next layer's (args, kwargs)."""
    return [run_block(layer, args, kwargs) for args, kwargs in inputs]


def layer_importance(
    model: StreamedModel,
    layer: nn.Module,
    units: Sequence[Unit],
    inputs: LayerInputs,
    *,
    grams: bool = False,
) -> Importance:
    """The importance of ``units`` (and with ``grams`` their Gram matrices) from ``layer``'s
    calls on ``inputs``; non-finite activations are an error naming the layer."""
    from bitalloc.importance import ImportanceAccumulator

    acc = ImportanceAccumulator(model.skeleton, units, grams=grams)
    for args, kwargs in inputs:
        if not acc.add_batch_through(lambda a=args, k=kwargs: layer(*a, **k)):
            where = units[0].layer if units else "?"
            raise BitallocError(
                f"layer {where} gave non-finite activations on the calibration windows; check "
                "the model's weights (NaN/inf)"
            )
    return acc.result()


def hidden_of(inputs: tuple[tuple, dict[str, Any]]) -> torch.Tensor:
    """The hidden states of one batch's (args, kwargs)."""
    args, kwargs = inputs
    return args[0] if args else kwargs["hidden_states"]


def calibration_windows(checkpoint: Any, text: str | None, seq_len: int) -> torch.Tensor:
    """Token windows (n, ``seq_len``) of ``text`` (the embedded default calibration text when
    None), tokenized with the checkpoint's own tokenizer."""
    from bitalloc.data import default_text, text_prefix, tokenize, windows

    tokenizer = checkpoint.tokenizer("or pass windows=")
    body = default_text().calibration if text is None else text
    ids = tokenize(tokenizer, body)
    return windows(ids, seq_len, prefix=text_prefix(tokenizer))
