"""A GGUF file read as a checkpoint, tensor by tensor: the same interface as a Hugging Face
directory (:class:`~bitalloc.streaming.checkpoint.Checkpoint`), so that a GGUF model streams
through profiling, allocation and export like a sharded one.

Names are the model's (``model.layers.3.mlp.down_proj.weight``), mapped from llama.cpp's
(``blk.3.ffn_down.weight``) through the ``gguf`` package's tensor map, as transformers maps them
when it loads the file. A tensor is read with ``pread`` into a buffer of its own (the file is
not kept mapped, so the pages read do not stay in the resident set) and dequantized exactly as
transformers dequantizes it (``gguf.quants.dequantize``, then the q/k rows of a Llama file
turned back from llama.cpp's rotary layout): a streamed model equals the one
:func:`~bitalloc.models.load_model` loads from the same file. Quantized and F16 tensors come
back in float32 (their stored dtype is reported as float32; ``nbytes`` is their size on disk).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from bitalloc.errors import BitallocError
from bitalloc.streaming.checkpoint import Checkpoint, TensorInfo


class GGUFCheckpoint(Checkpoint):
    """A GGUF model file as a checkpoint (see the module docstring)."""

    def __init__(self, path: str | Path):
        from transformers import AutoConfig

        from bitalloc.export.gguf import SUPPORTED_ARCHITECTURES, gguf_field, read_gguf

        self.path = Path(path)
        self.reader = read_gguf(self.path)
        self.arch = str(gguf_field(self.reader, "general.architecture"))
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise BitallocError(
                f"cannot stream {self.path}: GGUF architecture {self.arch!r} is not supported; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        self._permuted = SUPPORTED_ARCHITECTURES[self.arch]
        self._by_name = {t.name: t for t in self.reader.tensors}
        # Parsed once: transformers reads the whole metadata (vocabulary included) for it.
        self._config = config = self._from_metadata(AutoConfig, "has no usable model config")
        self.config_dict: dict[str, Any] = config.to_dict()
        self._heads = (config.num_attention_heads, config.num_key_value_heads)
        self.tensors = self._tensor_infos(config)

    def hf_config(self) -> Any:
        """The transformers config transformers reads from the file's metadata."""
        return self._config

    def tokenizer(self, alternative: str = "") -> Any:
        """The tokenizer the file carries."""
        from transformers import AutoTokenizer

        return self._from_metadata(AutoTokenizer, f"has no usable tokenizer {alternative}")

    def _from_metadata(self, loader: Any, missing: str) -> Any:
        try:
            return loader.from_pretrained(self.path.parent, gguf_file=self.path.name)
        except Exception as exc:  # noqa: BLE001 - the GGUF parser raises many types
            raise BitallocError(f"{self.path} {missing} ({type(exc).__name__}: {exc})") from None

    def _tensor_infos(self, config: Any) -> dict[str, TensorInfo]:
        from bitalloc.export.gguf import gguf_param_names
        from bitalloc.streaming.skeleton import meta_skeleton

        skeleton = meta_skeleton(config)
        to_param = gguf_param_names(skeleton, self.arch, config.num_hidden_layers)
        self._source: dict[str, Any] = {}
        infos = {}
        for tensor in self.reader.tensors:
            param = to_param.get(tensor.name)
            if param is None:  # computed by the model (rope factors): nothing to read
                continue
            kind = tensor.tensor_type
            dtype = torch.bfloat16 if kind == gguf.GGMLQuantizationType.BF16 else torch.float32
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            infos[param] = TensorInfo(param, tensor.name, dtype, shape, int(tensor.n_bytes))
            self._source[param] = tensor
        return infos

    def raw_bytes(self, gguf_name: str) -> np.ndarray:
        """The stored bytes of the file's tensor ``gguf_name`` (llama.cpp's name), as they are."""
        tensor = self._by_name[gguf_name]
        with open(self.path, "rb") as handle:
            raw = os.pread(handle.fileno(), int(tensor.n_bytes), int(tensor.data_offset))
        return np.frombuffer(raw, dtype=np.uint8)

    def read(
        self, names: Sequence[str], dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """The tensors ``names``, dequantized (see the module docstring)."""
        out = {}
        with open(self.path, "rb") as handle:
            for name in names:
                info = self.info(name)
                tensor = self._source[name]
                raw = os.pread(handle.fileno(), info.nbytes, int(tensor.data_offset))
                value = self._dequantized(tensor, np.frombuffer(raw, dtype=np.uint8), info)
                out[name] = value if dtype in (None, value.dtype) else value.to(dtype)
        return out

    def _dequantized(self, tensor: Any, raw: np.ndarray, info: TensorInfo) -> torch.Tensor:
        kind = tensor.tensor_type
        if kind == gguf.GGMLQuantizationType.BF16:
            value = torch.from_numpy(raw.copy()).view(torch.bfloat16).reshape(info.shape)
            return self._unpermuted(tensor.name, value)
        rows = info.numel // info.shape[-1]
        values = gguf.quants.dequantize(raw.reshape(rows, -1), kind)
        value = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(info.shape)
        return self._unpermuted(tensor.name, value)

    def _unpermuted(self, gguf_name: str, value: torch.Tensor) -> torch.Tensor:
        """q/k rows of a Llama file turned back from llama.cpp's rotary layout."""
        kind = gguf_name.split(".")[-2]
        if not self._permuted or kind not in ("attn_q", "attn_k"):
            return value
        heads = self._heads[0] if kind == "attn_q" else self._heads[1]
        out, width = value.shape
        return value.reshape(heads, out // heads // 2, 2, width).transpose(1, 2).reshape(out, width)
