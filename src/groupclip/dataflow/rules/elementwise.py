"""Elementwise ops (broadcasting), conversions, in-place writes, and ops whose result is a constant."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import Call, LayoutLost, broadcast_layout, funcs_named, register_layout_rule


def _aten_pointwise_names() -> set[str]:
    """Names of aten ops tagged pointwise (the ``max``/``min`` reductions share a name and are excluded)."""
    names = set()
    for name in dir(torch.ops.aten):
        try:
            packet = getattr(torch.ops.aten, name)
            overloads = packet.overloads()
        except Exception:  # not an op packet
            continue
        if any(torch.Tag.pointwise in getattr(packet, o).tags for o in overloads):
            names.add(name)
    return names - {"max", "min"}


EXTRA_POINTWISE = [
    # conversions and copies that keep every element where it was
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "int", "long", "bool", "short", "byte",
    "char", "cpu", "cuda", "contiguous", "requires_grad_", "detach", "detach_", "clone", "pin_memory",
    "nan_to_num", "multiply", "divide", "subtract", "true_divide", "floor_divide", "square", "negative",
    "absolute", "arctan2", "masked_fill", "where", "clamp", "clip", "dropout", "alpha_dropout",
    "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "relu", "gelu", "silu", "tanh", "sigmoid",
    "hardtanh", "relu6", "elu", "selu", "celu", "leaky_relu", "softplus", "softshrink", "hardshrink",
    "tanhshrink", "softsign", "logsigmoid", "mish", "hardswish", "hardsigmoid", "threshold", "prelu", "rrelu",
    "__and__", "__or__", "__xor__", "__invert__", "__lshift__", "__rshift__", "__mod__", "__pow__", "__rpow__",
    "__rsub__", "__rtruediv__", "__rdiv__", "__rmul__", "__radd__", "__eq__", "__ne__", "__lt__", "__le__",
    "__gt__", "__ge__", "__neg__", "__abs__", "__rand__", "__ror__", "__rxor__", "__floordiv__", "__rfloordiv__",
    "__rmod__", "__truediv__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "isclose",
    "logical_not", "real", "imag", "conj", "resolve_conj", "resolve_neg", "masked_fill_", "fill_diagonal_",
    "clamp_", "clamp_min_", "clamp_max_",
]  # fmt: skip

POINTWISE_NAMES = sorted(
    _aten_pointwise_names() | set(EXTRA_POINTWISE) | {n + "_" for n in _aten_pointwise_names() if not n.startswith("_")}
)
POINTWISE = [*funcs_named(POINTWISE_NAMES), Tensor.data.__get__, Tensor.real.__get__, Tensor.imag.__get__]


@register_layout_rule(*POINTWISE)
def pointwise(call: Call):
    out = call.out
    if isinstance(out, list | tuple):  # frexp: (mantissa, exponent)
        return call.elementwise(out[0])
    if not isinstance(out, Tensor):
        return None
    return call.elementwise(out)


@register_layout_rule(*funcs_named(["copy_"]))
def copy_(call: Call):
    """``target.copy_(src)``: the target now holds ``src`` (broadcast), whatever it held before."""
    src = call.arg(1, "src")
    tag = call.tag(src)
    if tag is None:
        return call.tag(call.args[0])  # constants written into a per-sample tensor: layout kept
    return broadcast_layout(call, [(src, tag)], call.args[0].shape)


@register_layout_rule(*funcs_named(["zero_", "fill_", "normal_", "uniform_", "random_", "bernoulli_"]))
def overwritten(call: Call):
    """Overwritten with constants (``fill_`` with a per-sample 0-dim value would need samples: B > 1 cannot)."""
    value = call.arg(1, "value")
    if call.tag(value) is not None:
        raise LayoutLost(f"{call.name} fills a tensor with a per-sample value")
    return None


# Results that do not depend on any input value: shapes, dtypes and random draws of the input's shape.
CONSTANT_NAMES = [
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
    "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "new_empty_strided",
]  # fmt: skip


@register_layout_rule(*funcs_named(CONSTANT_NAMES))
def constant(call: Call):
    return None


# A sum over samples (a loss) stays one under these ops when every other operand is a constant or another sum.
LINEAR_NAMES = {
    "add", "sub", "subtract", "rsub", "neg", "negative", "__radd__", "__rsub__", "sum", "mean", "clone",
    "detach", "to", "float", "double", "half", "bfloat16", "contiguous", "view", "reshape", "squeeze",
    "unsqueeze", "flatten", "__getitem__", "view_as", "reshape_as", "expand", "expand_as", "add_", "sub_",
    "requires_grad_", "__neg__", "cpu", "cuda", "type_as",
}  # fmt: skip
SCALING_NAMES = {"mul", "multiply", "div", "divide", "true_divide", "__rmul__", "__truediv__", "mul_", "div_"}
LINEAR = set(funcs_named(sorted(LINEAR_NAMES)))
SCALING = set(funcs_named(sorted(SCALING_NAMES)))
DETACHING = set(funcs_named(["detach", "detach_"])) | {Tensor.data.__get__}

F_INPLACE = {F.relu_, F.elu_, F.leaky_relu_, F.hardtanh_, F.threshold_, F.rrelu_, F.celu_, F.selu_}
