"""Weight-only int8/int4 for the ONNX engine: ONNX Runtime's MatMulNBits quantizer.

Used by `llmserve build --variant w8|w4`. The scheme (bits, block size, symmetric or not, what
stays full precision) comes from the source's lineage when `llmserve compress` quantized it
(quantize-int8 / quantize-int4 put the weights on the very grid MatMulNBits stores, so the build
only changes their encoding), else from `DEFAULTS`. MatMul weights are [in, out] in ONNX and
blocks run along the input dimension, as in `methods.fake_quantize`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

VARIANT_BITS = {"w8": 8, "w4": 4}
# Same defaults as the compress methods quantize-int8 / quantize-int4.
DEFAULTS = {8: {"block_size": 32, "symmetric": True, "zero_point": "int", "keep": "lm_head"},
            4: {"block_size": 32, "symmetric": False, "zero_point": "int", "keep": "lm_head"}}


class QuantizeError(Exception):
    pass


def scheme(variant: str, lineage: dict | None) -> dict:
    """{"bits", "block_size", "symmetric", "zero_point", "keep"} for a build variant, from the lineage's
    quantize method of the same width if there is one."""
    bits = VARIANT_BITS[variant]
    params = dict(DEFAULTS[bits])
    for method in (lineage or {}).get("methods", []):
        if method["name"].startswith("quantize-int"):
            if method["name"] != f"quantize-int{bits}":
                raise QuantizeError(f"the source was compressed with {method['name']}; build it "
                                    f"with the matching variant, not {variant}")
            params.update({k: method["params"][k] for k in params if k in method["params"]})
    return {"bits": bits, **params}


def _excluded(model: onnx.ModelProto, keep: list[str], vocab_size: int) -> list[str]:
    """MatMul nodes to leave in full precision: those whose name or weight name contains a `keep`
    pattern; "lm_head" also matches the output projection by its [hidden, vocab] weight, since
    exported graphs do not always keep the module name."""
    weights = {init.name: init for init in model.graph.initializer}
    excluded = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        weight = weights.get(node.input[1])
        names = f"{node.name} {node.input[1]}"
        head = ("lm_head" in keep and weight is not None and len(weight.dims) == 2
                and weight.dims[1] == vocab_size)
        if head or any(k in names for k in keep):
            excluded.append(node.name)
    return excluded


def _min_max_float_zero_quantizer(config):
    """ORT's HQQ node quantizer with its optimization and zero-point rounding off: each block's
    min and max on the grid, a float zero point (what `methods.fake_quantize(zero_point="float")`
    computes)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantizer

    class MinMaxFloatZero(HQQWeightOnlyQuantizer):
        def quantize_internal(self, tensor, bits=4, channel_wise=True, group_size=64,
                              optimize=True, round_zero=True, axis=1):
            return super().quantize_internal(tensor, bits, channel_wise, group_size,
                                             optimize=False, round_zero=False, axis=axis)

    return MinMaxFloatZero(config)


def quantize(src: Path, out: Path, spec: dict, vocab_size: int) -> dict:
    """Writes `out`; returns what was done (for the manifest)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(src))
    keep = [k for k in spec["keep"].split("+") if k]
    excluded = _excluded(model, keep, vocab_size)
    float_zero = spec["zero_point"] == "float"
    if float_zero:
        config = HQQWeightOnlyQuantConfig(block_size=spec["block_size"], bits=spec["bits"],
                                          op_types_to_quantize=("MatMul",))
    else:
        config = DefaultWeightOnlyQuantConfig(
            block_size=spec["block_size"], is_symmetric=spec["symmetric"], bits=spec["bits"],
            quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, bits=spec["bits"], block_size=spec["block_size"],
                                     is_symmetric=spec["symmetric"], nodes_to_exclude=excluded,
                                     op_types_to_quantize=("MatMul",), algo_config=config)
    if float_zero:
        quantizer.node_quantizer = _min_max_float_zero_quantizer(config)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # one INFO line per MatMul otherwise
    try:
        quantizer.process()
    finally:
        logger.setLevel(level)
    quantized = quantizer.model.model
    count = sum(node.op_type == "MatMulNBits" for node in quantized.graph.node)
    if not count:
        raise QuantizeError("no MatMul with a constant weight was found to quantize")
    onnx.save_model(quantized, str(out), save_as_external_data=quantized.ByteSize() > (2 << 30))
    return {**spec, "matmulnbits_nodes": count, "kept_full_precision": len(excluded)}

