"""The ``ct`` family: compressed-tensors schemes (``ct:int4-g128``, ``ct:nvfp4``, ...), the
checkpoint format vLLM and transformers load, quantized and stored by the compressed-tensors
package's own code.

A format is one weight-only scheme, named ``ct:`` plus the scheme:

- ``ct:int{4,8}-g{32,64,128}``: symmetric integer codes, a scale per group of ``g`` weights
  along a row (``ct:int4-g128`` is compressed-tensors' W4A16 preset, ``ct:int8-g128`` W8A16);
  ``-asym`` adds a zero point per group (``ct:int4-g128-asym`` is W4A16_ASYM).
- ``ct:nvfp4``: FP4 (E2M1) values, an FP8 (E4M3) scale per 16 weights, one FP32 global scale
  per tensor (NVFP4A16).
- ``ct:mxfp4``: FP4 (E2M1) values, a power-of-two (E8M0) scale per 32 weights (MXFP4A16).
- ``ct:fp8-channel``: FP8 (E4M3) weights, a scale per output channel (FP8_DYNAMIC's weights,
  without its activation quantization).

Quantization is the package's: each group's minimum and maximum (the min-max observer, its
schemes' default) through its ``calculate_qparams`` (and ``generate_gparam``, over the whole
tensor, for nvfp4's global scale), its ``fake_quantize``, its compressors. The symmetric int
scale is ``max|w| / ((2**b - 1) / 2)``, so the largest magnitude sits half a step outside the
codes and is clamped. ``importance`` is checked and ignored: the min-max observer weights no
column (importance-weighted clipping would change the scales written, not the layout; later).

Scales the package leaves in a float type of the writer's choosing (int and fp8) are
**bfloat16**, as vLLM checkpoints carry them: rounded before the codes are chosen, and written
so by the exporter. :meth:`CTFormat.fake_quantize` is, bit for bit, what the package's
decompressors give back from the stored tensors: bfloat16 values (the int and fp8 schemes
decompress in their scales' dtype, the FP4 ones to bfloat16), in the input's dtype; transformers,
loading the checkpoint in its config's dtype (bfloat16), computes with exactly these weights.

Costs are exact: :meth:`CTFormat.layout` lists every tensor the compressed checkpoint stores for
a weight (name, dtype, shape), and :meth:`CTFormat.storage_bits` is their bytes times 8. For a
weight of shape (out, in):

==================== =================== ================================== ===================
scheme (format)      tensor              dtype, shape                       bits per weight
==================== =================== ================================== ===================
int{b}-g{g}          weight_packed       int32, (out, in * b / 32)          b
(pack-quantized)     weight_scale        bfloat16, (out, in / g)            16 / g
                     weight_shape        int64, (2,)                        (128 per tensor)
``-asym`` also:      weight_zero_point   int32, (ceil(out * b / 32), in/g)  b / g
nvfp4                weight_packed       uint8, (out, in / 2)               4
(nvfp4-pack-quant.)  weight_scale        float8_e4m3fn, (out, in / 16)      0.5
                     weight_global_scale float32, (1,)                      (32 per tensor)
mxfp4                weight_packed       uint8, (out, in / 2)               4
(mxfp4-pack-quant.)  weight_scale        uint8, (out, in / 32)              0.25
fp8-channel          weight              float8_e4m3fn, (out, in)           8
(naive-quantized)    weight_scale        bfloat16, (out, 1)                 16 / in
==================== =================== ================================== ===================

so ``ct:int4-g128`` is 4.125 bits per weight (plus 128 bits per tensor), ``ct:nvfp4`` 4.5,
``ct:mxfp4`` 4.25. An input width must be a whole number of groups (the package refuses a
partial group): 32, 64 or 128 for the int schemes, 16 for nvfp4, 32 for mxfp4; fp8-channel takes
any width.

compressed-tensors is imported inside the methods that need it (it imports transformers and
accelerate: seconds), so importing bitalloc stays fast. Formats import nothing from bitalloc
but :mod:`bitalloc.errors` and :mod:`bitalloc.formats`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.base import Format, check_importance
from bitalloc.formats.encoding import Encoded, Section
from bitalloc.formats.integer import _check_shape
from bitalloc.formats.registry import FormatFamily

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

#: Dtype of the scales the package leaves to the writer (int and fp8 schemes), and of every
#: unquantized tensor the exporter writes.
SCALE_DTYPE = torch.bfloat16
#: The dtype the package decompresses every scheme to, given scales in :data:`SCALE_DTYPE`.
DECOMPRESSED_DTYPE = torch.bfloat16
INT_BITS = (4, 8)
INT_GROUP_SIZES = (32, 64, 128)
FLOAT_SCHEMES = ("nvfp4", "mxfp4", "fp8-channel")
#: Every scheme of the family, as it follows ``ct:`` in a name.
SUPPORTED_SCHEMES = (
    *(
        f"int{bits}-g{group}{suffix}"
        for bits in INT_BITS
        for suffix in ("", "-asym")
        for group in INT_GROUP_SIZES
    ),
    *FLOAT_SCHEMES,
)
#: The shape :attr:`CTFormat.nominal_bits` describes (fp8-channel's cost per weight depends on
#: the input width; 4096 is a typical hidden size).
NOMINAL_IN_FEATURES = 4096
_PREFIX = "ct:"
_INT_NAME = re.compile(r"^int(\d+)-g(\d+)(-asym)?$")


@dataclass(frozen=True)
class _Spec:
    """What a scheme's name says: the kind of values, their width, the group, the symmetry,
    and the compressed-tensors format that stores it."""

    kind: str  # "int", "nvfp4", "mxfp4" or "fp8"
    bits: int
    group: int | None  # weights per scale along a row; None: one scale per row
    symmetric: bool
    compression: str


def _spec(scheme: str) -> _Spec:
    match = _INT_NAME.match(scheme)
    if match:
        bits, group, asym = int(match[1]), int(match[2]), bool(match[3])
        return _Spec("int", bits, group, not asym, "pack-quantized")
    return {
        "nvfp4": _Spec("nvfp4", 4, 16, True, "nvfp4-pack-quantized"),
        "mxfp4": _Spec("mxfp4", 4, 32, True, "mxfp4-pack-quantized"),
        "fp8-channel": _Spec("fp8", 8, None, True, "naive-quantized"),
    }[scheme]


_SPECS = {scheme: _spec(scheme) for scheme in SUPPORTED_SCHEMES}


@dataclass(frozen=True)
class CTFormat(Format):
    """One compressed-tensors scheme as a palette entry: ``CTFormat("int4-g128")`` is
    ``ct:int4-g128``.

    :meth:`quantization_args` / :meth:`quantization_scheme` give the package's description of
    the scheme (weights only) and :attr:`compression_format` the format its compressor is
    registered under; :meth:`compress` / :meth:`decompress` convert between a weight and the
    tensors a compressed checkpoint stores for it (:meth:`layout`); :meth:`fake_quantize` is the
    weight those tensors decompress to.
    """

    scheme: str

    def __post_init__(self) -> None:
        canonical = str(self.scheme).strip().lower()
        if canonical not in _SPECS:
            raise BitallocError(
                f"unsupported compressed-tensors scheme {self.scheme!r}; the ct family supports "
                f"{', '.join(SUPPORTED_SCHEMES)}"
            )
        # Equality and hashing go by the field, so "INT4-G128" must become the "int4-g128" it
        # names.
        object.__setattr__(self, "scheme", canonical)

    # --- what the name says ----------------------------------------------------------------
    @property
    def name(self) -> str:
        """``ct:`` and the scheme, e.g. ``ct:int4-g128``."""
        return _PREFIX + self.scheme

    @property
    def family(self) -> str:
        """Always ``ct``."""
        return "ct"

    @property
    def kind(self) -> str:
        """``int``, ``nvfp4``, ``mxfp4`` or ``fp8``."""
        return _SPECS[self.scheme].kind

    @property
    def bits(self) -> int:
        """Bits of one stored value (4 or 8)."""
        return _SPECS[self.scheme].bits

    @property
    def group(self) -> int | None:
        """Weights per scale along a row (16 for nvfp4, 32 for mxfp4); None for fp8-channel,
        which has one scale per row."""
        return _SPECS[self.scheme].group

    @property
    def symmetric(self) -> bool:
        """False for the ``-asym`` int schemes, which store a zero point per group."""
        return _SPECS[self.scheme].symmetric

    @property
    def compression_format(self) -> str:
        """The compressed-tensors format that stores the scheme (``pack-quantized``,
        ``nvfp4-pack-quantized``, ``mxfp4-pack-quantized`` or ``naive-quantized``)."""
        return _SPECS[self.scheme].compression

    @property
    def is_float(self) -> bool:
        """False: every scheme quantizes."""
        return False

    @property
    def nominal_bits(self) -> float:
        """Bits per weight, per-tensor constants left out: codes, scales and zero points
        (fp8-channel for an input width of :data:`NOMINAL_IN_FEATURES`)."""
        spec = _SPECS[self.scheme]
        if spec.kind == "int":
            scale = 16 / spec.group
            zeros = 0.0 if spec.symmetric else spec.bits / spec.group
            return spec.bits + scale + zeros
        if spec.kind == "fp8":
            return spec.bits + 16 / NOMINAL_IN_FEATURES
        return spec.bits + 8 / spec.group  # one 8-bit scale (E4M3 or E8M0) per group

    @property
    def ladder(self) -> tuple[str, float] | None:
        """int4 and int8 at one group size and symmetry are one ladder (``ct:int-g128``,
        ``ct:int-g128-asym``): the same grid with 16 times the steps, so the error falls as
        bits rise. The FP4 and FP8 schemes are on none: their grids and scales differ."""
        spec = _SPECS[self.scheme]
        if spec.kind != "int":
            return None
        suffix = "" if spec.symmetric else "-asym"
        return (f"ct:int-g{spec.group}{suffix}", float(spec.bits))

    # --- the package's description ---------------------------------------------------------
    def quantization_args(self) -> QuantizationArgs:
        """compressed-tensors' ``QuantizationArgs`` for the weights (its preset's, where the
        scheme is one: W4A16, W4A16_ASYM, W8A16, NVFP4A16, MXFP4A16)."""
        _require_package()
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationStrategy,
            QuantizationType,
            preset_name_to_scheme,
        )

        spec = _SPECS[self.scheme]
        if spec.kind in ("nvfp4", "mxfp4"):
            preset = "NVFP4A16" if spec.kind == "nvfp4" else "MXFP4A16"
            return preset_name_to_scheme(preset, ["Linear"]).weights
        if spec.kind == "fp8":
            return QuantizationArgs(
                num_bits=8,
                type=QuantizationType.FLOAT,
                strategy=QuantizationStrategy.CHANNEL,
                symmetric=True,
                dynamic=False,
            )
        return QuantizationArgs(
            num_bits=spec.bits,
            type=QuantizationType.INT,
            strategy=QuantizationStrategy.GROUP,
            group_size=spec.group,
            symmetric=spec.symmetric,
            dynamic=False,
        )

    def quantization_scheme(self, targets: Sequence[str] = ("Linear",)) -> QuantizationScheme:
        """compressed-tensors' ``QuantizationScheme`` for ``targets``: these weights, no
        activation quantization, and :attr:`compression_format`."""
        _require_package()
        from compressed_tensors.quantization import QuantizationScheme

        return QuantizationScheme(
            targets=list(targets),
            weights=self.quantization_args(),
            input_activations=None,
            format=self.compression_format,
        )

    # --- shape and cost --------------------------------------------------------------------
    def check_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(out, in)`` when ``in`` is a whole number of groups; otherwise an error naming the
        ct formats that fit."""
        out_features, in_features = _check_shape(shape)
        group = self.group
        if group is not None and in_features % group:
            fitting = [
                f.name
                for f in CTFamily().members()
                if f.group is None or in_features % f.group == 0
            ]
            raise BitallocError(
                f"{self.name} stores rows in groups of {group} weights; an input width of "
                f"{in_features} is not a multiple of {group}: use one of {', '.join(fitting)} "
                "for this tensor, or keep it in fp16"
            )
        return out_features, in_features

    def layout(self, shape: Sequence[int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Every tensor a compressed checkpoint stores for a weight of ``shape``, by its name
        under the module (``weight_packed``, ``weight_scale``, ...): ``(dtype, shape)``."""
        out_features, in_features = self.check_shape(shape)
        spec = _SPECS[self.scheme]
        if spec.kind == "int":
            groups = in_features // spec.group
            # pack_to_int32 packs 32 / bits codes per int32 along a row, and zero points along
            # the output dimension (each group's column of zero points is one packed run).
            tensors = {
                "weight_packed": (torch.int32, (out_features, in_features * spec.bits // 32)),
                "weight_scale": (SCALE_DTYPE, (out_features, groups)),
                "weight_shape": (torch.int64, (2,)),
            }
            if not spec.symmetric:
                packed_rows = math.ceil(out_features * spec.bits / 32)
                tensors["weight_zero_point"] = (torch.int32, (packed_rows, groups))
            return tensors
        if spec.kind == "fp8":
            return {
                "weight": (torch.float8_e4m3fn, (out_features, in_features)),
                "weight_scale": (SCALE_DTYPE, (out_features, 1)),
            }
        # FP4: two values per byte.
        scale = torch.float8_e4m3fn if spec.kind == "nvfp4" else torch.uint8
        tensors = {
            "weight_packed": (torch.uint8, (out_features, in_features // 2)),
            "weight_scale": (scale, (out_features, in_features // spec.group)),
        }
        if spec.kind == "nvfp4":
            tensors["weight_global_scale"] = (torch.float32, (1,))
        return tensors

    def storage_bits(self, shape: Sequence[int]) -> int:
        """Exact stored bits: the bytes of every tensor of :meth:`layout`, times 8."""
        return 8 * sum(
            math.prod(dims) * _itemsize(dtype) for dtype, dims in self.layout(shape).values()
        )

    # --- quantization ----------------------------------------------------------------------
    def global_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """nvfp4's FP32 global scale of ``weight`` (shape (1,)): compressed-tensors'
        ``generate_gparam`` over the tensor's minimum and maximum. Fused layers share one (the
        least of theirs, as the exporter writes them); other schemes have none."""
        if self.kind != "nvfp4":
            raise BitallocError(f"{self.name} has no global scale; only ct:nvfp4 stores one")
        _require_package()
        from compressed_tensors.quantization.utils import generate_gparam

        self.check_shape(tuple(weight.shape))
        w = weight.detach().to(torch.float32)
        return generate_gparam(w.amin(), w.amax())

    def qparams(
        self, weight: torch.Tensor, global_scale: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The quantization parameters of ``weight`` by local name, as the min-max observer sets
        them: ``weight_scale`` (bfloat16 for the int and fp8 schemes, float32 holding the
        stored FP8 / power-of-two values for nvfp4 and mxfp4), ``weight_zero_point`` (int8,
        ``-asym`` only) and ``weight_global_scale`` (nvfp4 only; ``global_scale`` overrides
        the tensor's own, for fused layers)."""
        _require_package()
        from compressed_tensors.quantization.utils import calculate_qparams

        out_features, in_features = self.check_shape(tuple(weight.shape))
        if global_scale is not None and self.kind != "nvfp4":
            raise BitallocError(f"{self.name} has no global scale; only ct:nvfp4 takes one")
        w = weight.detach().to(torch.float32)
        args = self.quantization_args()
        if args.scale_dtype is None:
            # The package would leave these scales in the weight's dtype; round them to the
            # stored dtype first, so that the codes are chosen for the scales written.
            args = args.model_copy(update={"scale_dtype": SCALE_DTYPE})
        if self.group is None:
            low = w.amin(dim=1, keepdim=True)
            high = w.amax(dim=1, keepdim=True)
        else:
            groups = w.reshape(out_features, in_features // self.group, self.group)
            low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        params: dict[str, torch.Tensor] = {}
        if self.kind == "nvfp4":
            given = self.global_scale(w) if global_scale is None else global_scale
            if not (isinstance(given, torch.Tensor) and given.numel() == 1) or not (
                bool(torch.isfinite(given).all()) and bool((given > 0).all())
            ):
                raise BitallocError(f"a global scale is one finite number > 0, got {given!r}")
            params["weight_global_scale"] = given.detach().to(w.device, torch.float32).reshape(1)
        scale, zero_point = calculate_qparams(
            low, high, args, global_scale=params.get("weight_global_scale")
        )
        params["weight_scale"] = scale.to(SCALE_DTYPE) if self.kind in ("int", "fp8") else scale
        if not self.symmetric:
            params["weight_zero_point"] = zero_point
        return params

    def compress(
        self, weight: torch.Tensor, global_scale: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The tensors a compressed checkpoint stores for ``weight`` (names and dtypes of
        :meth:`layout`), made by compressed-tensors' own compressor for the scheme."""
        _require_package()
        from compressed_tensors.compressors import BaseCompressor

        self.check_shape(tuple(weight.shape))
        w = weight.detach().to(torch.float32)
        state = {"weight": w, **self.qparams(w, global_scale)}
        compressor = BaseCompressor.get_value_from_registry(self.compression_format)
        compressed = compressor.compress(state, self.quantization_scheme())
        return {name: t.contiguous() for name, t in compressed.items()}

    def decompress(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weight compressed ``tensors`` store (by local name, as :meth:`compress` gives
        them), decompressed by compressed-tensors, in float32."""
        _require_package()
        from compressed_tensors.compressors import BaseCompressor

        compressor = BaseCompressor.get_value_from_registry(self.compression_format)
        tensors = dict(tensors)
        zero_point = tensors.get("weight_zero_point")
        if zero_point is not None and zero_point.shape[0] == 1:
            # compressed-tensors 0.20.1 unpacks zero points through a transpose whose
            # .contiguous() keeps a one-row tensor's strides, which .view then refuses (a
            # weight of at most 32 / bits rows). The same values with unit strides pass.
            restrided = torch.empty_strided(
                zero_point.shape, (1, 1), dtype=zero_point.dtype, device=zero_point.device
            )
            tensors["weight_zero_point"] = restrided.copy_(zero_point)
        state = compressor.decompress(tensors, self.quantization_scheme())
        return state["weight"].to(torch.float32)

    def fake_quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The weight the compressed tensors decompress to (see the module docstring), in
        ``weight``'s shape, dtype and device: compressed-tensors' ``fake_quantize`` with the
        min-max scales, in :data:`DECOMPRESSED_DTYPE`. ``importance`` is checked and ignored
        (see the module docstring)."""
        _require_package()
        from compressed_tensors.quantization.lifecycle.forward import (
            fake_quantize as ct_fake_quantize,
        )

        _, in_features = self.check_shape(tuple(weight.shape))
        check_importance(importance, in_features)
        w = weight.detach().to(torch.float32)
        params = self.qparams(w)
        out = ct_fake_quantize(
            w,
            params["weight_scale"],
            params.get("weight_zero_point"),
            self.quantization_args(),
            global_scale=params.get("weight_global_scale"),
        )
        # The int and fp8 products are bfloat16 already (the scale's dtype); nvfp4's, in
        # float32, are rounded as its decompressor rounds them.
        out = out.to(DECOMPRESSED_DTYPE)
        return out.to(device=weight.device, dtype=weight.dtype)

    # --- packed form -----------------------------------------------------------------------
    def encode(self, weight: torch.Tensor) -> Encoded:
        """The compressed tensors as sections, one per tensor of :meth:`layout`, in its order,
        each the tensor's bytes."""
        shape = self.check_shape(tuple(weight.shape))
        tensors = self.compress(weight)
        sections = []
        for name in self.layout(shape):
            data = tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            sections.append(Section(name, data, 8 * len(data)))
        return Encoded(self.name, shape, tuple(sections))

    def decode(self, encoded: Encoded) -> torch.Tensor:
        """The float32 weight that :meth:`encode` stored."""
        if encoded.format_name != self.name:
            raise BitallocError(
                f"an encoding of {encoded.format_name} cannot be decoded as {self.name}"
            )
        tensors = {}
        for name, (dtype, dims) in self.layout(encoded.shape).items():
            raw = torch.frombuffer(bytearray(encoded.section(name).data), dtype=torch.uint8)
            tensors[name] = raw.view(dtype).reshape(dims)
        return self.decompress(tensors)

    def __str__(self) -> str:
        return self.name


def _require_package() -> None:
    """Import compressed-tensors, or say how to install it (bitalloc runs without it until a
    ``ct:`` format quantizes)."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise BitallocError(
            "ct: formats quantize with the compressed-tensors package, which is not installed: "
            "pip install 'compressed-tensors>=0.20,<0.21'"
        ) from None


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class CTFamily(FormatFamily):
    """``ct:<scheme>``: a compressed-tensors scheme, quantized and stored by the package.

    Opt-in: its members are in no default palette; name them (``--formats ct:int4-g128,...``).
    """

    name = "ct"
    description = (
        f"'ct:<scheme>' with a compressed-tensors scheme from {', '.join(SUPPORTED_SCHEMES)}"
    )
    example = "ct:int4-g128"

    def parse(self, text: str) -> CTFormat | None:
        """``ct:int4-g128`` (any case) to ``CTFormat("int4-g128")``; an unsupported scheme
        raises."""
        if not text.lower().startswith(_PREFIX):
            return None
        given = text[len(_PREFIX) :].strip().lower()
        if given not in _SPECS:
            raise BitallocError(
                f"unknown compressed-tensors scheme {given!r} in format {text!r}; use "
                f"ct:<scheme> with a scheme from {', '.join(SUPPORTED_SCHEMES)}"
                f"{_hint(given)}"
            )
        return CTFormat(given)

    def members(self) -> tuple[CTFormat, ...]:
        """Every supported scheme."""
        return tuple(CTFormat(s) for s in SUPPORTED_SCHEMES)

    def default_members(self) -> tuple[CTFormat, ...]:
        """None: the default palette stays the int family's."""
        return ()


def _hint(scheme: str) -> str:
    """What is wrong with an int scheme's name, when it is one with a bad width or group."""
    match = _INT_NAME.match(scheme)
    if not match:
        return ""
    bits, group = int(match[1]), int(match[2])
    if bits not in INT_BITS:
        return f" (int widths: {', '.join(map(str, INT_BITS))})"
    if group not in INT_GROUP_SIZES:
        return f" (int groups: {', '.join(map(str, INT_GROUP_SIZES))})"
    return ""
