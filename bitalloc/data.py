"""Calibration and evaluation text, and turning it into fixed-length token windows.

Default text: CPython's own ``pydoc_data.topics`` (the help texts of the language reference,
shipped with every Python install, so nothing is downloaded). Its topics are sorted by name and
every third one (positions 2, 5, 8, ... in that order) forms the evaluation split; the others
form the calibration split. Some topics repeat whole paragraphs of others (for example the
special-method descriptions), so paragraphs (blocks separated by a blank line) are first
de-duplicated in that order: a paragraph is kept only where it first appears. No paragraph is in
both splits.

Windows: a split is tokenized as one stream (topics joined by a blank line, no special tokens)
and cut into non-overlapping windows of ``seq_len`` tokens. Each window starts with the special
tokens the model's tokenizer puts at the start of a text (:func:`text_prefix`: BOS for Gemma- and
Llama-style tokenizers, nothing for SmolLM2), and ``seq_len`` counts them: a window holds
``seq_len - len(prefix)`` tokens of text. When fewer tokens are asked for than the split holds,
the windows are spread evenly over the stream (fixed positions, no randomness), so a short
evaluation still samples every part of the split. A trailing partial window is dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bitalloc.errors import BitallocError

EVAL_EVERY = 3  # every 3rd topic (sorted by name) is held out for evaluation


@dataclass(frozen=True)
class TextSplits:
    """Disjoint calibration and evaluation text plus a description of where they came from."""

    calibration: str
    evaluation: str
    source: str

    def fingerprint(self, split: str) -> str:
        """A short stable hash of one split's text ('calibration' or 'evaluation')."""
        text = getattr(self, split)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def default_text() -> TextSplits:
    """The embedded default: ``pydoc_data.topics`` split by topic (see module docstring)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    seen: set[str] = set()
    deduped = []
    for name in names:
        kept = []
        for paragraph in topics[name].split("\n\n"):
            key = paragraph.strip()
            if key and key not in seen:
                seen.add(key)
                kept.append(paragraph)
        deduped.append("\n\n".join(kept))
    calibration = [t for i, t in enumerate(deduped) if i % EVAL_EVERY != EVAL_EVERY - 1 and t]
    evaluation = [t for i, t in enumerate(deduped) if i % EVAL_EVERY == EVAL_EVERY - 1 and t]
    return TextSplits(
        calibration="\n\n".join(calibration),
        evaluation="\n\n".join(evaluation),
        source=f"pydoc_data.topics ({len(names)} topics; one in {EVAL_EVERY} held out)",
    )


def load_text(
    calibration: str | Path | Sequence[str | Path] | None = None,
    evaluation: str | Path | Sequence[str | Path] | None = None,
) -> TextSplits:
    """Text splits from files, falling back to the default for a split not given.

    Each argument is a path or a list of paths to UTF-8 text files. Passing the same file for both
    splits is refused: calibration and evaluation must be disjoint.
    """
    if calibration is None and evaluation is None:
        return default_text()
    default = default_text()
    cal_paths = _paths(calibration)
    eval_paths = _paths(evaluation)
    shared = {p.resolve() for p in cal_paths} & {p.resolve() for p in eval_paths}
    if shared:
        raise BitallocError(
            f"{sorted(str(p) for p in shared)} is given as both calibration and evaluation text; "
            "pass disjoint files so that quality is measured on text the profile never saw"
        )
    cal = _read(cal_paths) if cal_paths else default.calibration
    ev = _read(eval_paths) if eval_paths else default.evaluation
    source = ", ".join(
        [
            f"calibration: {[str(p) for p in cal_paths] or 'default'}",
            f"evaluation: {[str(p) for p in eval_paths] or 'default'}",
        ]
    )
    return TextSplits(calibration=cal, evaluation=ev, source=source)


def _paths(arg: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if arg is None:
        return []
    items = [arg] if isinstance(arg, (str, Path)) else list(arg)
    return [Path(p) for p in items]


def _read(paths: list[Path]) -> str:
    texts = []
    for path in paths:
        if not path.is_file():
            raise BitallocError(f"text file {path} does not exist; pass a readable UTF-8 file")
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise BitallocError(f"text file {path} is not UTF-8 text ({exc.reason})") from None
    return "\n\n".join(texts)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D stream, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


#: The text :func:`text_prefix` tokenizes to find a tokenizer's start tokens: plain words that
#: every vocabulary covers.
PREFIX_SAMPLE = "The quick brown fox jumps over the lazy dog."


def text_prefix(tokenizer, sample: str = PREFIX_SAMPLE) -> tuple[int, ...]:
    """The special token ids ``tokenizer(text)`` puts before a text: typically one BOS id
    (Gemma, Llama-2/3), or none (SmolLM2, GPT-2); empty when the tokenizer adds nothing.

    Found from what the tokenizer does, not from flags such as ``add_bos_token``, which not every
    tokenizer has and which its post-processor may override: ``sample`` is tokenized with and
    without special tokens, and the prefix is what comes before the plain tokens. Special tokens
    after the text (an EOS some tokenizers append) are not part of it.

    Raises :class:`BitallocError` when the plain tokens are not found inside the full ones.
    """
    plain = _input_ids(tokenizer(sample, add_special_tokens=False))
    full = _input_ids(tokenizer(sample))
    if not plain:
        raise BitallocError(
            f"the tokenizer turns the sample text {sample!r} into no tokens, so its start tokens "
            "cannot be found; pass the model's own tokenizer"
        )
    # The first place where the plain tokens appear whole; what precedes it is the prefix. What
    # follows it (an EOS suffix) is ignored: a window is cut from the middle of the stream, so it
    # starts where the model's texts start but does not end where a text ends, and an EOS there
    # would be scored as if the text stopped.
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start])
    raise BitallocError(
        f"the tokenizer's tokens of {sample!r} with special tokens ({full}) do not contain its "
        f"tokens without them ({plain}), so the start tokens it adds cannot be told apart; pass "
        "a tokenizer that only adds special tokens around the text"
    )


def _input_ids(encoding) -> list[int]:
    return [int(i) for i in encoding["input_ids"]]


def windows(
    ids: torch.Tensor,
    seq_len: int,
    max_tokens: int | None = None,
    *,
    prefix: Sequence[int] = (),
) -> torch.Tensor:
    """Non-overlapping (n, seq_len) windows of ``ids``, evenly spread when capped by
    ``max_tokens``.

    Each window is ``prefix`` (the tokenizer's start tokens, see :func:`text_prefix`) followed by
    ``seq_len - len(prefix)`` tokens of ``ids``: the window length counts the prefix, and so does
    ``max_tokens``. The stream is cut into consecutive chunks of that many tokens.

    Raises :class:`BitallocError` when ``seq_len`` leaves no room for text after ``prefix`` or
    when the stream is shorter than one window.
    """
    if seq_len <= 0:
        raise BitallocError(f"sequence length must be positive, got {seq_len}")
    start = list(prefix)
    body = seq_len - len(start)
    if body <= 0:
        raise BitallocError(
            f"sequence length {seq_len} leaves no room for text after the tokenizer's "
            f"{len(start)} start token(s) {start}; pass a --seq-len longer than {len(start)}"
        )
    available = ids.numel() // body
    if available == 0:
        inside = f" ({body} text tokens after {len(start)} start token(s))" if start else ""
        raise BitallocError(
            f"the text has {ids.numel()} tokens, fewer than one sequence of {seq_len}{inside}; "
            "pass more text or a shorter --seq-len"
        )
    wanted = available if max_tokens is None else max(1, min(available, max_tokens // seq_len))
    # Evenly spaced window indices over all available ones, fixed and deterministic.
    picks = sorted({(i * available) // wanted for i in range(wanted)})
    chunks = torch.stack([ids[p * body : (p + 1) * body] for p in picks])
    if not start:
        return chunks
    head = torch.tensor(start, dtype=ids.dtype, device=ids.device).expand(len(picks), -1)
    return torch.cat([head, chunks], dim=1)


def tensor_fingerprint(t: torch.Tensor) -> str:
    """A short stable hash of a tensor's values (used to key cached profiles)."""
    data = t.detach().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
