"""Ops that move elements around without computing: reshapes, permutations, expansion, slicing, joining, indexing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..layout import after_reshape, normalize_dim, normalize_dims, sample_ids
from ..tags import Tag
from . import Call, LayoutLost, funcs_named, register_layout_rule

RESHAPES = [
    "view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze", "ravel",
    "squeeze_", "unsqueeze_", "atleast_1d", "atleast_2d", "atleast_3d",
]  # fmt: skip


@register_layout_rule(*funcs_named(RESHAPES))
def reshape(call: Call):
    t, tag = call.first()
    out = call.out
    if out.shape == t.shape:
        return tag
    found = after_reshape(tuple(t.shape), tuple(out.shape), tag.dim, tag.inner, call.batch)
    if found is None:
        raise LayoutLost(f"{call.name} {tuple(t.shape)} -> {tuple(out.shape)} spreads the samples over several dims")
    return call.at(*found)


def _permuted(call: Call, perm: Sequence[int]) -> Tag:
    _, tag = call.first()
    return call.at(list(perm).index(tag.dim), tag.inner)


@register_layout_rule(*funcs_named(["permute"]))
def permute(call: Call):
    t = call.args[0]
    dims = (
        call.args[1:]
        if len(call.args) > 2 or not isinstance(call.arg(1, "dims"), list | tuple)
        else call.arg(1, "dims")
    )
    if len(dims) == 1 and isinstance(dims[0], list | tuple):
        dims = dims[0]
    return _permuted(call, [normalize_dim(int(d), t.dim()) for d in dims])


@register_layout_rule(*funcs_named(["transpose", "swapaxes", "swapdims", "transpose_", "swapaxes_", "swapdims_"]))
def transpose(call: Call):
    t = call.args[0]
    a = normalize_dim(int(call.arg(1, "dim0")), t.dim())
    b = normalize_dim(int(call.arg(2, "dim1")), t.dim())
    perm = list(range(t.dim()))
    perm[a], perm[b] = perm[b], perm[a]
    return _permuted(call, perm)


@register_layout_rule(*funcs_named(["t", "t_"]), Tensor.T.__get__, Tensor.mT.__get__, Tensor.mH.__get__)
def reverse(call: Call):
    t = call.args[0]
    n = t.dim()
    if call.func in (Tensor.mT.__get__, Tensor.mH.__get__):
        perm = [*range(n - 2), n - 1, n - 2]
    elif n < 2:
        perm = list(range(n))
    else:
        perm = list(reversed(range(n)))
    return _permuted(call, perm)


@register_layout_rule(*funcs_named(["adjoint"]))
def adjoint(call: Call):
    n = call.args[0].dim()
    return _permuted(call, [*range(n - 2), n - 1, n - 2])


@register_layout_rule(*funcs_named(["movedim", "moveaxis"]))
def movedim(call: Call):
    t = call.args[0]
    src, dst = call.arg(1, "source"), call.arg(2, "destination")
    src = normalize_dims(src, t.dim())
    dst = normalize_dims(dst, t.dim())
    order = [d for d in range(t.dim()) if d not in src]
    perm = [None] * t.dim()
    for s, d in zip(src, dst, strict=True):
        perm[d] = s
    rest = iter(order)
    perm = [p if p is not None else next(rest) for p in perm]
    return _permuted(call, perm)


@register_layout_rule(*funcs_named(["expand", "expand_as", "broadcast_to"]))
def expand(call: Call):
    t, tag = call.first()
    od = tag.dim + call.out.dim() - t.dim()
    if call.out.shape[od] != t.shape[tag.dim]:
        raise LayoutLost(f"{call.name} expands the batch dim")
    return call.at(od, tag.inner)


@register_layout_rule(*funcs_named(["repeat", "tile"]))
def repeat(call: Call):
    """Tiling a batch dim of size ``outer * B * inner`` keeps ``(k // inner) % B``: copies of a sample stay its."""
    t, tag = call.first()
    return call.at(tag.dim + call.out.dim() - t.dim(), tag.inner)


@register_layout_rule(*funcs_named(["repeat_interleave"]))
def repeat_interleave(call: Call):
    t, tag = call.first()
    dim = call.arg(2, "dim")
    if dim is None:
        raise LayoutLost("repeat_interleave without dim flattens the samples")
    if normalize_dim(int(dim), t.dim()) != tag.dim:
        return tag
    repeats = call.arg(1, "repeats")
    if isinstance(repeats, int):
        return call.at(tag.dim, tag.inner * repeats)
    raise LayoutLost("repeat_interleave of the batch dim by a tensor")


def _rows_layout(call: Call, tag: Tag, start: int, length: int) -> Tag:
    """A contiguous range of a batch dim: the same layout if it starts and ends on whole sample blocks."""
    block = call.batch * tag.inner
    if start % block == 0 and length % block == 0 and length > 0:
        return tag
    raise LayoutLost(f"{call.name} keeps only some samples")


@register_layout_rule(*funcs_named(["narrow"]))
def narrow(call: Call):
    t, tag = call.first()
    dim = normalize_dim(int(call.arg(1, "dim")), t.dim())
    if dim != tag.dim:
        return tag
    return _rows_layout(call, tag, int(call.arg(2, "start")), int(call.arg(3, "length")))


@register_layout_rule(*funcs_named(["select"]))
def select(call: Call):
    t, tag = call.first()
    dim = normalize_dim(int(call.arg(1, "dim")), t.dim())
    if dim == tag.dim:
        raise LayoutLost("select picks one row of the batch dim")
    return call.at(tag.dim - (dim < tag.dim), tag.inner)


@register_layout_rule(*funcs_named(["split", "chunk", "tensor_split", "split_with_sizes", "hsplit", "vsplit"]))
def split(call: Call):
    t, tag = call.first()
    dim = call.arg(2, "dim", 0)
    if call.name.endswith("hsplit"):
        dim = 1 if t.dim() > 1 else 0
    elif call.name.endswith("vsplit"):
        dim = 0
    dim = normalize_dim(int(dim), t.dim())
    if dim != tag.dim:
        return [tag for _ in call.out]
    tags, start = [], 0
    for piece in call.out:
        tags.append(_rows_layout(call, tag, start, piece.shape[dim]))
        start += piece.shape[dim]
    return tags


@register_layout_rule(*funcs_named(["unbind"]))
def unbind(call: Call):
    t, tag = call.first()
    dim = normalize_dim(int(call.arg(1, "dim", 0)), t.dim())
    if dim == tag.dim:
        raise LayoutLost("unbind splits the batch dim into single rows")
    return [call.at(tag.dim - (dim < tag.dim), tag.inner) for _ in call.out]


@register_layout_rule(*funcs_named(["unfold"], functional=False))
def unfold_dim(call: Call):
    t, tag = call.first()
    if normalize_dim(int(call.arg(1, "dimension")), t.dim()) == tag.dim:
        raise LayoutLost("unfold slides a window over the batch dim")
    return tag


@register_layout_rule(*funcs_named(["flip", "roll", "rot90", "fliplr", "flipud"]))
def flip(call: Call):
    t, tag = call.first()
    name = call.name
    if name.endswith("rot90"):
        dims = normalize_dims(call.arg(2, "dims", (0, 1)), t.dim())
        if tag.dim in dims:
            raise LayoutLost("rot90 rotates the batch dim")
        return tag
    if name.endswith("fliplr"):
        dims = (1,)
    elif name.endswith("flipud"):
        dims = (0,)
    else:
        dims = call.arg(2 if name.endswith("roll") else 1, "dims")
        dims = normalize_dims(dims, t.dim()) if dims is not None else tuple(range(t.dim()))
    if tag.dim in dims:
        raise LayoutLost(f"{name} reorders the batch dim")
    return tag


@register_layout_rule(*funcs_named(["cat", "concat", "concatenate"]))
def cat(call: Call):
    skip_empty = call.out.dim() > 1  # legacy: empty 1-D tensors are skipped by cat
    tensors = [t for t in call.arg(0, "tensors") if not (skip_empty and t.dim() == 1 and t.shape[0] == 0)]
    dim = normalize_dim(int(call.arg(1, "dim", 0)), call.out.dim())
    tags = [call.tag(t) for t in tensors]
    found = {(tag.dim, tag.inner) for tag in tags if tag is not None}
    if len(found) != 1:
        return call.mixed(f"{call.name} joins tensors whose samples lie along different dims")
    batch_dim, inner = found.pop()
    if batch_dim == dim:  # joined along the batch dim: every piece must be whole blocks of samples
        start = 0
        for t, tag in zip(tensors, tags, strict=True):
            if tag is None:
                raise LayoutLost("cat joins constants to samples along the batch dim")
            _rows_layout(call, tag, start, t.shape[dim])
            start += t.shape[dim]
    return call.at(batch_dim, inner)


@register_layout_rule(*funcs_named(["stack"]))
def stack(call: Call):
    tensors = call.arg(0, "tensors")
    dim = normalize_dim(int(call.arg(1, "dim", 0)), call.out.dim())
    found = None
    for t in tensors:
        tag = call.tag(t)
        if tag is None:
            continue
        spot = (tag.dim + (tag.dim >= dim), tag.inner)
        if found is None:
            found = spot
        elif found != spot:
            return call.mixed("stack joins tensors whose samples lie along different dims")
    return call.at(*found)


# ------------------------------------------------------------------ indexing
def _probe(call: Call, t: Tensor, tag: Tag, index_op) -> Tag:
    """Apply ``index_op`` to a tensor of sample ids shaped like ``t``; read the result's layout off its values."""
    shape = [1] * t.dim()
    shape[tag.dim] = t.shape[tag.dim]
    ids = sample_ids(t.shape[tag.dim], call.batch, tag.inner, device=t.device).view(shape).expand(t.shape)
    probe = index_op(ids)
    return _layout_of_ids(call, probe)


def _layout_of_ids(call: Call, probe: Tensor) -> Tag:
    for dim in range(probe.dim()):
        size = probe.shape[dim]
        if size < call.batch:
            continue
        line = probe.movedim(dim, -1).reshape(-1, size)[0]
        inner = int((line == line[0]).cumprod(0).sum())
        if size % (call.batch * inner):
            continue
        want = sample_ids(size, call.batch, inner, device=probe.device)
        shape = [1] * probe.dim()
        shape[dim] = size
        if bool((probe == want.view(shape)).all()):
            return call.at(dim, inner)
    raise LayoutLost(f"{call.name} reorders or drops samples")


def _basic_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, int | slice) for i in items) and not isinstance(index, list)


def _basic_map(ndim: int, index) -> list[int | None]:
    """For basic indexing: the output dim each input dim goes to (None: removed by an int)."""
    items = index if isinstance(index, tuple) else (index,)
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    mapping: list[int | None] = []
    out = 0
    for item in items:
        if item is None:
            out += 1
        elif item is Ellipsis:
            for _ in range(ndim - used):
                mapping.append(out)
                out += 1
        elif isinstance(item, int):
            mapping.append(None)
        else:
            mapping.append(out)
            out += 1
    while len(mapping) < ndim:
        mapping.append(out)
        out += 1
    return mapping


def _slice_keeps_all(item, size: int) -> tuple[int, int] | None:
    start, stop, step = item.indices(size)
    return (start, max(0, stop - start)) if step == 1 else None


@register_layout_rule(Tensor.__getitem__)
def getitem(call: Call):
    t, index = call.args[0], call.args[1]
    tag = call.tag(t)
    if tag is None:  # a constant indexed by per-sample indices
        return _indexed_by_samples(call, t, index)
    if _basic_index(index):
        mapping = _basic_map(t.dim(), index)
        od = mapping[tag.dim]
        if od is None:
            raise LayoutLost("indexing picks one row of the batch dim")
        items = index if isinstance(index, tuple) else (index,)
        pos = _position_of_input_dim(items, t.dim(), tag.dim)
        if pos is not None and isinstance(items[pos], slice):
            kept = _slice_keeps_all(items[pos], t.shape[tag.dim])
            if kept is None:
                raise LayoutLost("a strided slice of the batch dim")
            return call.at(od, _rows_layout(call, tag, *kept).inner)
        return call.at(od, tag.inner)
    if any(call.tag(i) is not None for i in _index_tensors(index)):
        raise LayoutLost("indexing a per-sample tensor with per-sample indices")
    return _probe(call, t, tag, lambda ids: ids[index])


def _index_tensors(index):
    items = index if isinstance(index, tuple) else (index,)
    return [i for i in items if isinstance(i, Tensor)]


def _position_of_input_dim(items, ndim: int, dim: int) -> int | None:
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    d = 0
    for pos, item in enumerate(items):
        if item is None:
            continue
        if item is Ellipsis:
            span = ndim - used
            if d <= dim < d + span:
                return None
            d += span
            continue
        if d == dim:
            return pos
        d += 1
    return None


def _indexed_by_samples(call: Call, table: Tensor, index) -> Tag:
    """``table[..., ids, ...]`` with one per-sample index tensor and otherwise basic indexing: ids' layout."""
    items = index if isinstance(index, tuple) else (index,)
    tensors = [(pos, i) for pos, i in enumerate(items) if isinstance(i, Tensor)]
    if len(tensors) != 1 or any(isinstance(i, list) for i in items) or Ellipsis in items:
        raise LayoutLost("indexing with several index tensors, one of them per-sample")
    pos, ids = tensors[0]
    if ids.dtype == torch.bool:
        raise LayoutLost("boolean-mask indexing with a per-sample mask")
    tag = call.tag(ids)
    before = sum(1 for i in items[:pos] if i is None or isinstance(i, slice))
    return call.at(before + tag.dim, tag.inner)


@register_layout_rule(Tensor.__setitem__)
def setitem(call: Call):
    """``t[index] = value``: the target keeps its layout; a constant target takes the value's, if it fits."""
    target, index, value = call.args[0], call.args[1], call.args[2]
    ttag, vtag = call.tag(target), call.tag(value)
    if vtag is None:
        if any(call.tag(i) is not None for i in _index_tensors(index)):
            raise LayoutLost("writing at per-sample positions")
        return ttag
    if not _basic_index(index):
        raise LayoutLost("writing per-sample values through advanced indexing")
    region = target[index]
    od = vtag.dim + region.dim() - value.dim()
    if od < 0 or region.shape[od] != value.shape[vtag.dim]:
        raise LayoutLost("writing per-sample values broadcast over the batch dim")
    mapping = _basic_map(target.dim(), index)
    tdim = mapping.index(od) if od in mapping else None
    if tdim is None or target.shape[tdim] != region.shape[od]:
        raise LayoutLost("writing per-sample values into part of a batch dim")
    tag = call.at(tdim, vtag.inner)
    if ttag is not None and ttag != tag:
        return call.mixed("writing samples into a tensor laid out differently")
    return tag


@register_layout_rule(*funcs_named(["index_select"]))
def index_select(call: Call):
    t, dim, index = call.args[0], call.arg(1, "dim"), call.arg(2, "index")
    dim = normalize_dim(int(dim), t.dim())
    tag, itag = call.tag(t), call.tag(index)
    if tag is None:  # constant rows picked by per-sample indices
        return call.at(dim, itag.inner)
    if itag is not None:
        raise LayoutLost("index_select of samples by per-sample indices")
    if dim != tag.dim:
        return tag
    return _probe(call, t, tag, lambda ids: ids.index_select(dim, index))


@register_layout_rule(*funcs_named(["gather", "take_along_dim"]))
def gather(call: Call):
    t = call.args[0]
    take = call.name.endswith("take_along_dim")
    index = call.arg(1, "indices") if take else call.arg(2, "index")
    dim = call.arg(2, "dim") if take else call.arg(1, "dim")
    if dim is None:
        raise LayoutLost("take_along_dim without dim flattens the samples")
    dim = normalize_dim(int(dim), t.dim())
    tag, itag = call.tag(t), call.tag(index)
    out = call.out
    found = []
    if tag is not None:
        if tag.dim == dim or index.shape[tag.dim] != t.shape[tag.dim]:
            return _probe(call, t, tag, lambda ids: call.func(ids, *call.args[1:], **call.kwargs))
        found.append((tag.dim + out.dim() - t.dim(), tag.inner))
    if itag is not None:
        found.append((itag.dim + out.dim() - index.dim(), itag.inner))
    if len(set(found)) != 1:
        return call.mixed("gather combines samples of the input and of the indices differently")
    return call.at(*found[0])


@register_layout_rule(
    *funcs_named(["index_copy", "index_copy_", "index_add", "index_add_", "index_fill", "index_fill_"])
)
def index_write(call: Call):
    """Writes along ``dim`` at given positions (e.g. a static KV cache): fine unless ``dim`` is the batch dim."""
    t, dim = call.args[0], normalize_dim(int(call.arg(1, "dim")), call.args[0].dim())
    if call.tag(call.arg(2, "index")) is not None:
        raise LayoutLost(f"{call.name} at per-sample positions")
    src = call.arg(3, "source") if not call.name.endswith("fill") and not call.name.endswith("fill_") else None
    found = []
    for x in (t, src):
        tag = call.tag(x)
        if tag is None:
            continue
        if tag.dim == dim:
            raise LayoutLost(f"{call.name} along the batch dim")
        found.append((tag.dim, tag.inner))
    if len(set(found)) != 1:
        return call.mixed(f"{call.name} combines tensors laid out differently")
    return call.at(*found[0])


@register_layout_rule(
    *funcs_named(["scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_"])
)
def scatter(call: Call):
    t, dim = call.args[0], normalize_dim(int(call.arg(1, "dim")), call.args[0].dim())
    found = []
    for x in (t, call.arg(2, "index"), call.arg(3, "src")):
        tag = call.tag(x)
        if tag is None:
            continue
        if tag.dim == dim or x.shape[tag.dim] != t.shape[tag.dim]:
            raise LayoutLost(f"{call.name} across the batch dim")
        found.append((tag.dim, tag.inner))
    if len(set(found)) != 1:
        return call.mixed(f"{call.name} combines tensors laid out differently")
    return call.at(*found[0])


@register_layout_rule(
    *funcs_named(["masked_select", "nonzero", "argwhere", "unique", "unique_consecutive", "bincount"])
)
def data_dependent_shape(call: Call):
    raise LayoutLost(f"{call.name} of per-sample data has a data-dependent shape")


@register_layout_rule(*funcs_named(["diagonal", "diag", "diag_embed", "tril", "triu", "tril_", "triu_"]))
def matrix_structure(call: Call):
    t, tag = call.first()
    name = call.name
    if name.endswith(("tril", "triu", "tril_", "triu_")):
        if tag.dim >= t.dim() - 2:
            raise LayoutLost(f"{name} masks across the batch dim")
        return tag
    if name.endswith("diag_embed"):
        if tag.dim == t.dim() - 1:
            raise LayoutLost("diag_embed of the batch dim")
        return tag
    if t.dim() <= 2:
        raise LayoutLost(f"{name} of a matrix holding samples")
    d1, d2 = normalize_dim(int(call.arg(2, "dim1", 0)), t.dim()), normalize_dim(int(call.arg(3, "dim2", 1)), t.dim())
    if tag.dim in (d1, d2):
        raise LayoutLost(f"{name} across the batch dim")
    return call.at(tag.dim - (d1 < tag.dim) - (d2 < tag.dim), tag.inner)
