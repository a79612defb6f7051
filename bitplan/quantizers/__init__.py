"""Weight quantizers, activation fake-quantization and the packed modules that hold their output.

A :class:`WeightQuantizer` (registered by name: ``rtn``, ``rtn-mse``, ``hqq``, ``gptq``, ``awq``, ``smoothquant``)
turns a float ``[out, in]`` weight into a :class:`QuantizedWeight` in a given
:class:`~bitplan.formats.WeightFormat`: bit-packed codes plus fp16 scales (and offsets), whose byte size
is exactly ``fmt.storage_bits(out, in) // 8``. :class:`QuantLinear` / :class:`QuantEmbedding` hold one
as buffers and compute with it; :func:`fake_quantize_act` simulates per-token dynamic activation
quantization.

    qw = get_weight_quantizer("hqq").quantize(linear.weight, parse_weight("w4g64a"))
    layer = QuantLinear.from_float(linear, "w4g64a", "a8t", method="hqq")
"""

from bitplan.quantizers import _awq, _gptq, _hqq, _rtn  # noqa: F401  (importing registers the methods)
from bitplan.quantizers._act import fake_quantize_act
from bitplan.quantizers._base import (
    WEIGHT_QUANTIZERS,
    QuantizedWeight,
    WeightQuantizer,
    get_weight_quantizer,
    register_weight_quantizer,
)
from bitplan.quantizers._modules import QuantEmbedding, QuantLinear
from bitplan.quantizers.packing import pack_bits, unpack_bits

__all__ = [
    "WEIGHT_QUANTIZERS",
    "QuantEmbedding",
    "QuantLinear",
    "QuantizedWeight",
    "WeightQuantizer",
    "fake_quantize_act",
    "get_weight_quantizer",
    "pack_bits",
    "register_weight_quantizer",
    "unpack_bits",
]
