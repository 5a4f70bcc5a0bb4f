"""Ops that compute across dims: reductions, scans, products, and the nn.functional layers and losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import normalize_dim, normalize_dims
from ..tags import Tag
from . import Call, LayoutLost, broadcast_layout, funcs_named, register_layout_rule


# ------------------------------------------------------------------ reductions and scans
def _reduce(call: Call, dims, linear: bool) -> Tag:
    t, tag = call.first()
    out = call.out[0] if isinstance(call.out, list | tuple) else call.out
    if dims is None or (isinstance(dims, list | tuple) and len(dims) == 0):
        dims = tuple(range(t.dim()))
    dims = normalize_dims(dims, t.dim())
    if tag.dim in dims:
        return call.reduced() if linear else call.mixed(f"{call.name} over the batch dim")
    if out.dim() == t.dim():  # keepdim
        return tag
    return call.at(tag.dim - sum(1 for d in dims if d < tag.dim), tag.inner)


LINEAR_REDUCTIONS = ["sum", "mean", "nansum", "nanmean", "trace"]
OTHER_REDUCTIONS = [
    "prod", "amax", "amin", "argmax", "argmin", "logsumexp", "all", "any", "count_nonzero", "median", "nanmedian",
    "mode", "std", "var", "std_mean", "var_mean", "aminmax", "kthvalue", "quantile", "nanquantile",
]  # fmt: skip


@register_layout_rule(*funcs_named(LINEAR_REDUCTIONS))
def linear_reduction(call: Call):
    return _reduce(call, call.arg(1, "dim"), linear=True)


@register_layout_rule(*funcs_named(OTHER_REDUCTIONS))
def reduction(call: Call):
    dim_pos = 2 if call.name.endswith(("kthvalue", "quantile", "nanquantile")) else 1
    return _reduce(call, call.arg(dim_pos, "dim"), linear=False)


@register_layout_rule(*funcs_named(["max", "min"]))
def max_min(call: Call):
    other = call.arg(1, "other")
    if isinstance(other, Tensor):  # elementwise maximum
        return call.elementwise()
    return _reduce(call, other if isinstance(other, int) else call.arg(1, "dim"), linear=False)


@register_layout_rule(*funcs_named(["norm"]), torch.linalg.vector_norm, torch.linalg.norm, torch.linalg.matrix_norm)
def norm(call: Call):
    dim = call.arg(2, "dim")
    if call.func is torch.linalg.matrix_norm and dim is None:
        dim = (-2, -1)
    return _reduce(call, dim, linear=False)


SCANS = ["cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "cumsum_", "cumprod_", "sort", "argsort", "msort"]


@register_layout_rule(*funcs_named(SCANS))
def scan(call: Call):
    t, tag = call.first()
    dim = call.arg(1, "dim", -1)
    if normalize_dim(int(dim), t.dim()) == tag.dim:
        return call.mixed(f"{call.name} along the batch dim")
    return tag


@register_layout_rule(*funcs_named(["topk"]))
def topk(call: Call):
    t, tag = call.first()
    if normalize_dim(int(call.arg(2, "dim", -1)), t.dim()) == tag.dim:
        return call.mixed("topk along the batch dim")
    return tag


@register_layout_rule(
    *funcs_named(["softmax", "log_softmax", "softmin", "_softmax", "_log_softmax", "normalize", "glu"])
)
def along_dim(call: Call):
    t, tag = call.first()
    if call.name.endswith("normalize"):
        dim = call.arg(2, "dim", 1)
    else:
        dim = call.arg(1, "dim", -1)
    if dim is None:
        raise LayoutLost(f"{call.name} without dim")
    if normalize_dim(int(dim), t.dim()) == tag.dim:
        return call.mixed(f"{call.name} along the batch dim")
    return tag


# ------------------------------------------------------------------ products
def _matmul_dims(a: Tensor, b: Tensor, out: Tensor, tag_a: Tag | None, tag_b: Tag | None, call: Call) -> Tag:
    """``a @ b`` with torch.matmul's broadcasting; the batch must not lie along the contracted dim."""
    trailing = (a.dim() > 1) + (b.dim() > 1)
    lead = out.dim() - trailing
    found = []
    for x, tag, is_left in ((a, tag_a, True), (b, tag_b, False)):
        if tag is None:
            continue
        n = x.dim()
        contracted = n - 1 if is_left else max(n - 2, 0)
        if tag.dim == contracted:
            return call.mixed(f"{call.name} contracts the batch dim")
        if is_left and tag.dim == n - 2:
            od = lead
        elif not is_left and tag.dim == n - 1:
            od = out.dim() - 1
        else:  # a leading (broadcast) dim
            od = tag.dim + lead - (n - 2)
            if out.shape[od] != x.shape[tag.dim]:
                raise LayoutLost("matmul broadcasts the batch dim")
        found.append((od, tag.inner))
    if len(set(found)) != 1:
        return call.mixed(f"{call.name} pairs samples of its two operands")
    return call.at(*found[0])


@register_layout_rule(*funcs_named(["matmul", "mm", "bmm", "mv", "__matmul__", "__rmatmul__"]))
def matmul(call: Call):
    a, b = call.args[0], call.args[1]
    if call.name.endswith("__rmatmul__"):
        a, b = b, a
    return _matmul_dims(a, b, call.out, call.tag(a), call.tag(b), call)


@register_layout_rule(*funcs_named(["addmm", "baddbmm", "addmv", "addbmm", "addr"]))
def add_product(call: Call):
    op = call.name.rsplit(".", 1)[-1].rstrip("_")
    names = {
        "addmm": ("mat1", "mat2"), "baddbmm": ("batch1", "batch2"), "addbmm": ("batch1", "batch2"),
        "addmv": ("mat", "vec"), "addr": ("vec1", "vec2"),
    }[op]  # fmt: skip
    bias, a, b = call.arg(0, "input"), call.arg(1, names[0]), call.arg(2, names[1])
    if op == "addbmm" and any(call.tag(x) is not None and call.tag(x).dim == 0 for x in (a, b)):
        return call.reduced()
    if op == "addr":
        raise LayoutLost("addr (outer product)")
    product = _matmul_dims(a, b, call.out, call.tag(a), call.tag(b), call) if call.tag(a) or call.tag(b) else None
    inputs = []
    if call.tag(bias) is not None:
        inputs.append((bias, call.tag(bias)))
    if product is not None:
        if product.kind != product.kind.BATCHED:
            return product
        inputs.append((call.out, product))
    return broadcast_layout(call, inputs, call.out.shape)


@register_layout_rule(*funcs_named(["dot", "vdot", "inner", "outer", "ger", "kron", "tensordot", "cross", "cdist"]))
def contracting(call: Call):
    if len(call.batched()) > 1:
        return call.mixed(f"{call.name} pairs samples")
    raise LayoutLost(f"{call.name} of per-sample data")


@register_layout_rule(*funcs_named(["linear"]))
def linear(call: Call):
    x, weight = call.args[0], call.arg(1, "weight")
    tag = call.tag(x)
    if call.tag(weight) is not None:
        raise LayoutLost("linear with a per-sample weight")
    if tag is None:  # only the bias is per-sample
        return broadcast_layout(call, [(call.arg(2, "bias"), call.tag(call.arg(2, "bias")))], call.out.shape)
    if tag.dim == x.dim() - 1:
        return call.mixed("linear contracts the batch dim")
    return tag


@register_layout_rule(torch.einsum)
def einsum(call: Call):
    equation = call.args[0]
    operands = call.args[1:]
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands = operands[0]
    equation = equation.replace(" ", "")
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    if "." in equation or len(terms) != len(operands):
        raise LayoutLost("einsum with an ellipsis")
    if not _:
        letters = [c for c in inputs if c.isalpha()]
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    found = []
    for term, x in zip(terms, operands, strict=True):
        tag = call.tag(x)
        if tag is None:
            continue
        letter = term[tag.dim]
        if letter not in output:
            return call.reduced() if len(operands) == 1 else call.mixed("einsum sums over the batch dim")
        found.append((output.index(letter), tag.inner))
    if len(set(found)) != 1:
        return call.mixed("einsum pairs samples")
    return call.at(*found[0])


# ------------------------------------------------------------------ nn.functional layers
def _batch_first(call: Call) -> Tag:
    """Layers over ``[N, C, *spatial]``: the samples must be in N."""
    _t, tag = call.first()
    if tag.dim != 0:
        raise LayoutLost(f"{call.name} with samples along dim {tag.dim} (it mixes that dim)")
    return tag


CONV_LIKE = [
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "group_norm",
    "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
]  # fmt: skip


@register_layout_rule(*funcs_named(CONV_LIKE))
def conv_like(call: Call):
    if any(call.tag(x) is not None for x in (call.arg(1, "weight"), call.arg(2, "bias"))):
        raise LayoutLost(f"{call.name} with a per-sample weight")
    return _batch_first(call)


@register_layout_rule(F.unfold, F.fold)
def im2col(call: Call):
    return _batch_first(call)


def _last_dims(call: Call, count: int) -> Tag:
    t, tag = call.first()
    if tag.dim >= t.dim() - count:
        raise LayoutLost(f"{call.name} works across the batch dim")
    return tag


POOLS = {
    "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3, "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3,
    "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "adaptive_max_pool1d": 1,
    "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3, "lp_pool1d": 1, "lp_pool2d": 2, "lp_pool3d": 3,
    "max_pool1d_with_indices": 1, "max_pool2d_with_indices": 2, "max_pool3d_with_indices": 3,
    "adaptive_max_pool1d_with_indices": 1, "adaptive_max_pool2d_with_indices": 2,
}  # fmt: skip
for _name, _count in POOLS.items():
    register_layout_rule(*funcs_named([_name], tensor=False))(lambda call, count=_count: _last_dims(call, count))


@register_layout_rule(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
def interpolate(call: Call):
    t, _ = call.first()
    return _last_dims(call, t.dim() - 2)


@register_layout_rule(F.pad, torch._C._nn.pad)
def pad(call: Call):
    return _last_dims(call, len(call.arg(1, "pad")) // 2)


@register_layout_rule(*funcs_named(["layer_norm", "rms_norm"]))
def layer_norm(call: Call):
    shape = call.arg(1, "normalized_shape")
    count = 1 if isinstance(shape, int) else len(shape)
    t, tag = call.first()
    if tag.dim >= t.dim() - count:
        return call.mixed(f"{call.name} normalizes over the batch dim")
    return tag


@register_layout_rule(*funcs_named(["instance_norm"]))
def instance_norm(call: Call):
    _t, tag = call.first()
    if tag.dim >= 2:
        return call.mixed("instance_norm normalizes over the batch dim")
    return tag


@register_layout_rule(*funcs_named(["batch_norm"]))
def batch_norm(call: Call):
    _t, tag = call.first()
    training = call.arg(5, "training", False)
    stats = call.arg(1, "running_mean") is not None and call.arg(2, "running_var") is not None
    if (training or not stats) and tag.dim != 1:
        return call.mixed("batch_norm with batch statistics")
    return tag


@register_layout_rule(*funcs_named(["embedding"]))
def embedding(call: Call):
    ids, weight = call.args[0], call.arg(1, "weight")
    if call.tag(weight) is not None:
        raise LayoutLost("embedding with a per-sample table")
    return call.tag(ids)


@register_layout_rule(*funcs_named(["one_hot"]))
def one_hot(call: Call):
    return call.same()


@register_layout_rule(*funcs_named(["scaled_dot_product_attention"]))
def sdpa(call: Call):
    q, k, v = call.args[0], call.arg(1, "key"), call.arg(2, "value")
    mask = call.arg(3, "attn_mask")
    found = []
    for x in (q, k, v):
        tag = call.tag(x)
        if tag is None:
            continue
        if tag.dim >= x.dim() - 2:
            return call.mixed("attention over the batch dim")
        found.append((tag.dim + call.out.dim() - x.dim(), tag.inner))
    if call.tag(mask) is not None:
        scores = (*call.out.shape[:-1], k.shape[-2])
        mtag = broadcast_layout(call, [(mask, call.tag(mask))], scores)
        found.append((mtag.dim, mtag.inner))
    if len(set(found)) != 1:
        return call.mixed("attention pairs samples")
    return call.at(*found[0])


@register_layout_rule(F.multi_head_attention_forward)
def multi_head_attention(call: Call):
    """Sequence-first ``[L, N, E]`` query/key/value (nn.MultiheadAttention transposes batch-first inputs)."""
    q = call.args[0]
    tag = call.tag(q)
    expected = 1 if q.dim() == 3 else None
    for x in (q, call.arg(1, "key"), call.arg(2, "value")):
        t = call.tag(x)
        if t is not None and (t.dim != expected or (tag is not None and t.inner != tag.inner)):
            raise LayoutLost("multi_head_attention_forward with samples off the batch dim")
        tag = tag or t
    _attn, weights = call.out
    return [call.at(1, tag.inner), call.at(0, tag.inner) if weights is not None else None]


RNNS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


@register_layout_rule(*funcs_named(RNNS, tensor=False, functional=False))
def rnn(call: Call):
    """``_VF.lstm(input, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first)``."""
    x = call.args[0]
    if isinstance(call.args[1], Tensor) and call.args[1].dtype in (torch.long, torch.int32):
        raise LayoutLost("packed sequences")
    batch_first = bool(call.args[-1])
    want = 0 if batch_first else 1
    inner = None
    for value in (x, *(call.args[1] if isinstance(call.args[1], list | tuple) else [call.args[1]])):
        tag = call.tag(value)
        if tag is None:
            continue
        expected = want if value is x else 1
        if tag.dim != expected or (inner is not None and tag.inner != inner):
            raise LayoutLost(f"{call.name} with samples off its batch dim")
        inner = tag.inner
    outs = call.out
    return [call.at(want, inner)] + [call.at(1, inner) for _ in outs[1:]]


# ------------------------------------------------------------------ losses
POINTWISE_LOSSES = [
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits",
    "kl_div", "soft_margin_loss", "poisson_nll_loss", "gaussian_nll_loss", "hinge_embedding_loss",
]  # fmt: skip
CLASS_LOSSES = [
    "cross_entropy",
    "nll_loss",
    "multi_margin_loss",
    "multilabel_margin_loss",
    "multilabel_soft_margin_loss",
]


def _loss_reduction(call: Call, position: int) -> str:
    value = call.kwargs.get("reduction", call.args[position] if len(call.args) > position else "mean")
    return value if isinstance(value, str) else "mean"


@register_layout_rule(*funcs_named(POINTWISE_LOSSES, tensor=False))
def pointwise_loss(call: Call):
    position = {"kl_div": 4, "binary_cross_entropy": 4, "binary_cross_entropy_with_logits": 4}.get(
        call.name.rsplit(".", 1)[-1], 4
    )
    if _loss_reduction(call, position) != "none":
        return call.reduced()
    return call.elementwise()


@register_layout_rule(*funcs_named(CLASS_LOSSES, tensor=False))
def class_loss(call: Call):
    if _loss_reduction(call, 6 if call.name.endswith("cross_entropy") else 5) != "none":
        return call.reduced()
    logits = call.args[0]
    tag = call.tag(logits)
    found = []
    if tag is not None:
        if logits.dim() == 1 or tag.dim == 1:
            return call.mixed(f"{call.name} over the batch dim")
        found.append((tag.dim - (tag.dim > 1), tag.inner))
    target_tag = call.tag(call.arg(1, "target"))
    if target_tag is not None:
        target = call.arg(1, "target")
        if target.dim() == logits.dim():  # class probabilities [N, C, ...]
            if target_tag.dim == 1:
                return call.mixed(f"{call.name} over the batch dim")
            found.append((target_tag.dim - (target_tag.dim > 1), target_tag.inner))
        else:
            found.append((target_tag.dim, target_tag.inner))
    if len(set(found)) != 1:
        return call.mixed(f"{call.name} pairs samples")
    return call.at(*found[0])
