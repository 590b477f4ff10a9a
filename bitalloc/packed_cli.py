"""``bitalloc apply`` (write a packed model) and ``bitalloc generate`` (run one)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bitalloc.cliconfig import add_config_arguments
from bitalloc.errors import BitallocError

MIB = 1024 * 1024


def add_apply_parser(sub: Any) -> None:
    """Register ``apply`` on ``sub`` (an argparse subparsers object)."""
    a = sub.add_parser(
        "apply",
        help="apply an allocation for real: pack the weights and save a loadable low-bit model",
    )
    a.add_argument("--allocation", required=True, metavar="FILE", help="allocation JSON")
    add_config_arguments(
        a,
        ("model",),
        {
            "model": {
                "help": "the model the allocation was made for: Hugging Face directory or .gguf "
                "file (default: the embedded SmolLM2-135M-Instruct)"
            }
        },
    )
    a.add_argument("--out", required=True, metavar="DIR", help="directory of the packed model")
    a.add_argument(
        "--stream",
        action="store_true",
        help="read and pack the model one layer at a time (for a model larger than memory; "
        "the directory written is the same)",
    )
    add_config_arguments(a, ("progress",))
    a.set_defaults(handler=apply_command)


def add_generate_parser(sub: Any) -> None:
    """Register ``generate`` on ``sub``."""
    g = sub.add_parser("generate", help="generate text with a packed model (from `apply`)")
    g.add_argument("--model", required=True, metavar="DIR", help="packed model directory")
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (32)")
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template"
    )
    g.add_argument(
        "--sample",
        action="store_true",
        help="sample (temperature --temperature, seed --seed) instead of greedy decoding",
    )
    g.add_argument("--temperature", type=float, default=0.7, help="with --sample (0.7)")
    g.add_argument("--seed", type=int, default=0, help="with --sample (0)")
    g.add_argument(
        "--cpu-path",
        choices=("auto", "unpack-matmul", "int4pack"),
        default="auto",
        help="CPU kernel of the packed units: auto (measure and take the fastest correct), "
        "or force one where it applies",
    )
    g.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when available (Triton kernels), else cpu",
    )
    add_config_arguments(g, ("progress",))
    g.set_defaults(handler=generate_command)


def apply_command(args: argparse.Namespace) -> None:
    """Pack the model per the allocation and save it."""
    from bitalloc.allocation import Allocation
    from bitalloc.models import load_model
    from bitalloc.packed import model_bytes, save_packed

    # --out was checked by `bitalloc.cliprint.check_outputs` before this handler ran.
    alloc = Allocation.load(args.allocation)
    if getattr(args, "stream", False):
        _apply_streamed(alloc, args)
        return
    loaded = load_model(args.model)
    alloc.check_model(loaded.model)
    calibration = None
    if alloc.uses_grams:
        # +gptq codes depend on the calibration inputs: gathered again from the recorded text.
        calibration = _recorded_calibration(alloc, loaded.tokenizer)
    start = time.perf_counter()
    packed = alloc.apply(
        loaded.model,
        inplace=True,
        packed=True,
        cpu_path="unpack-matmul",
        progress=not args.quiet,
        calibration=calibration,
    )
    seconds = time.perf_counter() - start
    out = save_packed(packed, args.out, tokenizer=loaded.tokenizer, allocation=alloc)
    sizes = model_bytes(packed)
    predicted = alloc.data.total_bits / 8
    print(f"packed {len(alloc.data.units)} units in {seconds:.1f} s: {alloc.summary()}")
    print(
        f"unit bytes {sizes['units']:,} ({sizes['units'] / MIB:.2f} MiB), predicted "
        f"{predicted:,.0f} (ratio {sizes['units'] / predicted:.4f}); rest of the model "
        f"{sizes['other'] / MIB:.2f} MiB; files {_dir_bytes(out) / MIB:.2f} MiB"
    )
    print(f"wrote {out}")


def _apply_streamed(alloc: Any, args: argparse.Namespace) -> None:
    """``apply --stream``: pack layer by layer (:mod:`bitalloc.streaming.export_packed`)."""
    from bitalloc.packed import read_manifest
    from bitalloc.streaming.export_packed import export_packed_streamed

    calibration = None
    if alloc.uses_grams:
        from bitalloc.streaming.sources import open_checkpoint

        calibration = _recorded_calibration(alloc, open_checkpoint(args.model).tokenizer())
    start = time.perf_counter()
    out = export_packed_streamed(
        alloc, args.model, args.out, calibration=calibration, progress=not args.quiet
    )
    manifest = read_manifest(out)
    predicted = alloc.data.total_bits / 8
    print(
        f"packed {len(alloc.data.units)} units layer by layer in "
        f"{time.perf_counter() - start:.1f} s: {alloc.summary()}"
    )
    print(
        f"unit bytes {manifest.unit_bytes:,} ({manifest.unit_bytes / MIB:.2f} MiB), predicted "
        f"{predicted:,.0f} (ratio {manifest.unit_bytes / predicted:.4f}); files "
        f"{_dir_bytes(out) / MIB:.2f} MiB"
    )
    print(f"wrote {out}")


def _recorded_calibration(allocation: Any, tokenizer: Any) -> Any:
    """The calibration windows the allocation was made with (its recorded ``data`` options:
    the calibration files, else the embedded text, and the window length), as token ids."""
    from bitalloc.config import DataConfig
    from bitalloc.data import load_text, text_prefix, tokenize, windows

    options = (allocation.data.config or {}).get("data") or {}
    files = options.get("calibration")
    seq_len = int(options.get("seq_len") or DataConfig().seq_len)
    text = load_text(list(files) if files else None, None)
    ids = tokenize(tokenizer, text.calibration)
    return windows(ids, seq_len, prefix=text_prefix(tokenizer))


def replaceable_packed_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a packed model (which ``apply`` may replace)."""
    from bitalloc.packed import MANIFEST

    return (Path(directory) / MANIFEST).is_file()


def generate_command(args: argparse.Namespace) -> None:
    """Load a packed model, generate, and report speed and the kernels that ran."""
    import torch

    from bitalloc.packed import cpu_path_report, last_paths, load_packed

    if args.max_new_tokens < 1:
        raise BitallocError("--max-new-tokens must be at least 1")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BitallocError("--device cuda: no CUDA device is available; use --device cpu")
    # On a GPU the Triton kernels run every unit; measuring CPU paths would be wasted time.
    loaded = load_packed(
        args.model,
        cpu_path=args.cpu_path if device == "cpu" else "unpack-matmul",
        progress=not args.quiet,
    )
    if device == "cpu":
        # Which CPU kernel each unit runs, and why int4pack is off when its probe failed.
        print(cpu_path_report(loaded.model), file=sys.stderr)
    if loaded.tokenizer is None:
        raise BitallocError(f"{args.model} holds no tokenizer; write it with `bitalloc apply`")
    # fp16 activations on a GPU: the kernels' fast path (fp32 would run without tensor cores).
    model = loaded.model.to(device) if device == "cpu" else loaded.model.to(device, torch.float16)
    tok = loaded.tokenizer
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise BitallocError("the tokenizer has no chat template; leave out --chat")
        text = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = args.prompt
    ids = tok(text, return_tensors="pt", add_special_tokens=not args.chat)["input_ids"].to(device)
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
    if args.sample:
        torch.manual_seed(args.seed)
        options["temperature"] = args.temperature
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **options)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1] :]
    print(tok.decode(new, skip_special_tokens=True))
    paths = ", ".join(f"{p} {n}" for p, n in last_paths(model).items())
    print(
        f"{len(new)} tokens in {seconds:.2f} s ({len(new) / seconds:.2f} tokens/s) on {device}; "
        f"units per kernel path: {paths}",
        file=sys.stderr,
    )


def _dir_bytes(directory: Any) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
