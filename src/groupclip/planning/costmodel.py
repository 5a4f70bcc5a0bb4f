"""Analytic cost model: per layer and per clipping style, predicted FLOPs and bytes the engine keeps.

One forward pass on an example batch (no backward, no optimizer step) records, for every call of a module that
owns trainable parameters, the form its per-sample gradients take -- asked of the norms registry: the
:class:`~groupclip.norms.LayerCost` its rule declares (factored, indexed or instantiated), and instantiated for a
module without a rule, as the engine's generic fallback does -- and the shapes that form has: ``T`` (positions),
``p`` (input features per block), ``d`` (output features per block), the number of blocks, and which input
storage it reads. From them (docs/MATH.md, sections Cost of a step and Memory held for clipping):

* time, parameter layers only (attention score products and elementwise work are not counted):
  non-private ``6 B T p d``; groupclip ghost ``+ 2 B T^2 (p + d)`` (the input Gram once per shared input);
  groupclip instantiation ``+ 4 B p d`` (the per-sample gradient replaces the weight gradient);
  Opacus hooks ``+ 2 B T p d + 4 B p d``; Opacus ghost (two backward passes) ``+ 4 B T p d + 2 B T^2 (p + d)``;
* bytes kept by the engine: the backward pass replayed in reverse execution order over the engine's memory
  ledger rules (a use's kept tensors are held from its backward until its group is clipped; storages shared by
  uses are counted once), for any grouping -- so all-layer keeps everything to the end and layer-wise about one
  layer at a time;
* peak memory: parameters, gradients, optimizer state, the activations autograd saves (counted in the same
  forward with saved-tensor hooks), the largest output gradient, plus the bytes kept.

Example::

    from groupclip.planning import Workload, trace_model
    work = Workload(model, {"input_ids": ids}, labels, "classify")   # one batch of the shape to cost
    model_cost = trace_model(work)
    print(model_cost.predict("layer-wise").kept_bytes)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..grouping import GroupingSpec, ResolvedGrouping, resolve_grouping, trainable_parameters
from ..norms import GENERIC_COST, LayerCost, find_rule
from ..norms.contributions import ghost_is_smaller
from ..norms.registry import CostForm
from .workload import Workload

NormMode = Literal["auto", "ghost", "instantiate"]


@dataclass
class LayerUse:
    """One call of a module owning trainable parameters, at the traced batch size (per-sample sizes stored)."""

    index: int
    path: str
    module_type: str
    form: CostForm  # from the layer's LayerCost (the norms registry)
    params: dict[str, str]  # canonical parameter name -> local name ("weight", "bias", ...)
    numel: dict[str, int]  # canonical parameter name -> elements
    dims: dict[str, int] = field(default_factory=dict)  # canonical parameter name -> tensor dims
    steps: int = 1  # T
    cols: int = 0  # p: input features per block
    rows: int = 0  # d: output features per block
    blocks: int = 1
    operand: str = "input"  # the input-side factor: the input's storage ("input") or a tensor made from it
    stacked: bool = False  # instantiated weight and bias side by side in one tensor
    shares_gram: bool = False  # the rule's right factor is the input: one input Gram per shared input
    input_key: int | None = None  # storage the rule factors on (shared-input detection)
    input_bytes_per_sample: float = 0.0  # bytes of the input-side factor per sample
    grad_bytes_per_sample: float = 0.0  # output gradient bytes per sample
    elem: int = 4

    def canonical(self, local: str) -> str | None:
        """The canonical name of this use's parameter ``local`` (e.g. "weight"), if it has one."""
        return next((name for name, own in self.params.items() if own == local), None)

    def ghost(self, mode: NormMode) -> bool:
        if self.form == "instantiated":
            return False
        if mode != "auto":
            return mode == "ghost"
        return ghost_is_smaller(self.form == "factored", self.steps, self.rows, self.cols)

    def weight_flops_per_sample(self) -> float:
        """``2 T p d`` (one GEMM of this layer per sample); embeddings count their gather/scatter."""
        if self.form == "indexed":
            return 2.0 * self.steps * self.cols
        if self.form == "instantiated":
            return 2.0 * self.steps * sum(self.numel.values())
        return 2.0 * self.steps * self.rows * self.cols * self.blocks

    def kept(self, mode: NormMode, batch: int, joint_bias: bool = True) -> dict[str, list[tuple[str, int]]]:
        """Canonical parameter -> [(storage key, bytes)] the engine keeps for it, mirroring ``norms/``.

        ``joint_bias``: the layer's weight and bias are in one group, so a ghost-norm weight's bias is clipped
        from the weight's output gradient (nothing more kept); otherwise the bias is a per-sample vector.
        Rules whose cost is ``stacked`` (norm layers) keep weight and bias side by side in one ``[B, 2, d]`` tensor.
        """
        out: dict[str, list[tuple[str, int]]] = {}
        fresh = f"use{self.index}"
        locals_ = set(self.params.values())
        for name, local in self.params.items():
            per_sample = self.numel[name] * max(self.elem, 4)  # instantiated in float32 at least
            if self.form in ("factored", "indexed") and local == "weight":
                if self.ghost(mode):
                    shared = self.operand == "input" and self.input_key is not None
                    right = (
                        f"in{self.input_key}" if shared else f"{fresh}.operand",
                        int(self.input_bytes_per_sample * batch),
                    )
                    out[name] = [(f"{fresh}.grad", int(self.grad_bytes_per_sample * batch)), right]
                else:
                    out[name] = [(f"{fresh}.{local}", per_sample * batch)]
            elif self.form == "factored" and local == "bias" and joint_bias and self.ghost(mode):
                out[name] = [(f"{fresh}.grad", int(self.grad_bytes_per_sample * batch))]
            elif self.form == "instantiated" and self.stacked and locals_ == {"weight", "bias"}:
                both = sum(self.numel.values()) * max(self.elem, 4)
                out[name] = [(f"{fresh}.affine", both * batch)]
            else:
                out[name] = [(f"{fresh}.{local}", per_sample * batch)]
        return out


@dataclass
class StylePrediction:
    """Predicted cost of one style at one batch size."""

    style: str
    batch_size: int
    flops: float
    time_ratio: float  # flops / non-private flops (parameter layers only)
    kept_bytes: int  # peak bytes kept by the engine (Opacus: per-sample gradients)
    peak_bytes: int  # predicted peak tensor memory: non-private peak + kept bytes other than layer inputs
    groups: int | None = None


@dataclass
class ModelCost:
    """The traced layer uses of one model and the quantities every prediction needs."""

    model: nn.Module
    uses: list[LayerUse]
    trace_batch: int
    param_bytes: int
    trainable_bytes: int
    n_trainable: int
    saved_bytes_per_sample: float
    execution_order: list[str]
    optimizer_state_per_param: int = 0  # extra tensors per trainable parameter (SGD 0, Adam 2)
    _shared_inputs: set[int] = field(default_factory=set)

    # ---------------------------------------------------------------- groupings
    def grouping(self, spec: GroupingSpec) -> ResolvedGrouping:
        return resolve_grouping(self.model, spec, self.execution_order)

    # ---------------------------------------------------------------- flops
    def layer_flops(self, use: LayerUse, style: str, batch: int, mode: NormMode = "auto") -> float:
        """Predicted FLOPs of one layer use for one training step of ``style``."""
        gemm = use.weight_flops_per_sample() * batch
        base = 3 * gemm if use.form == "factored" else gemm
        if style == "non-private":
            return base
        if style.startswith("opacus"):
            per_sample = 2 * sum(use.numel.values()) * batch
            if style == "opacus-ghost":
                return base + 2 * gemm + self._ghost_flops(use, batch, count_input=True)
            return base + gemm + 2 * per_sample
        if use.ghost(mode) and use.form == "factored":
            count_input = (
                not use.shares_gram or use.input_key not in self._shared_inputs or use.index == self._first_reader(use)
            )
            return base + self._ghost_flops(use, batch, count_input)
        return base + 4 * sum(use.numel.values()) * batch

    def _ghost_flops(self, use: LayerUse, batch: int, count_input: bool) -> float:
        if use.form != "factored" or use.steps == 1:
            return 2.0 * batch * (use.rows + use.cols) * use.blocks
        t2 = 2.0 * batch * use.steps * use.steps * use.blocks
        return t2 * use.rows + (t2 * use.cols if count_input else 0.0)

    def _first_reader(self, use: LayerUse) -> int:
        return min(u.index for u in self.uses if u.shares_gram and u.input_key == use.input_key)

    def flops(self, style: str, batch: int, mode: NormMode = "auto") -> float:
        return sum(self.layer_flops(u, style, batch, mode) for u in self.uses)

    # ---------------------------------------------------------------- memory
    def kept_bytes(
        self, grouping: GroupingSpec | ResolvedGrouping, batch: int, mode: NormMode = "auto", extra_only: bool = False
    ) -> int:
        """Peak bytes the engine keeps: the backward pass replayed in reverse execution order.

        With ``extra_only``, layer inputs (which autograd saves in non-private training too) are not counted:
        what remains is what the engine adds on top of the non-private peak.
        """
        resolved = grouping if isinstance(grouping, ResolvedGrouping) else self.grouping(grouping)
        group_of = resolved.group_of()
        pending_param: dict[str, int] = {}
        for use in self.uses:
            for name in use.params:
                pending_param[name] = pending_param.get(name, 0) + 1
        pending_group = {g: sum(1 for n in names if n in pending_param) for g, names in resolved.groups.items()}
        kept_of_group: dict[str, list[tuple[str, int]]] = {}
        refs: dict[str, list[int]] = {}
        dims = {name: d for use in self.uses for name, d in use.dims.items()}
        vector_group = {g: all(dims.get(n, 2) <= 1 for n in names) for g, names in resolved.groups.items()}
        held = peak = 0

        def release(group: str) -> int:
            freed = 0
            for key, _ in kept_of_group.pop(group, []):
                refs[key][0] -= 1
                if refs[key][0] == 0:
                    freed += refs.pop(key)[1]
            return freed

        for use in reversed(self.uses):
            weight, bias = use.canonical("weight"), use.canonical("bias")
            joint = weight is not None and bias is not None and group_of[weight] == group_of[bias]
            for name, items in use.kept(mode, batch, joint).items():
                group = group_of[name]
                for key, nbytes in items:
                    if extra_only and key.startswith("in"):
                        continue
                    ref = refs.setdefault(key, [0, nbytes])
                    if ref[0] == 0:
                        held += nbytes
                    ref[0] += 1
                    kept_of_group.setdefault(group, []).append((key, nbytes))
                peak = max(peak, held)
            for name in use.params:
                pending_param[name] -= 1
                if pending_param[name] == 0:
                    group = group_of[name]
                    pending_group[group] -= 1
                    # as the engine's first pass: groups of vectors only (biases, norm scales) wait for the end of
                    # the pass (later passes clip them early past a share of the peak: an upper bound for those)
                    if pending_group[group] == 0 and not vector_group[group]:
                        held -= release(group)
        return peak

    def base_peak_bytes(self, batch: int) -> int:
        """Non-private peak: parameters, gradients, optimizer state, saved activations, largest output gradient."""
        largest_grad = max((u.grad_bytes_per_sample for u in self.uses), default=0.0) * batch
        optimizer = self.optimizer_state_per_param * self.trainable_bytes
        return int(
            self.param_bytes + self.trainable_bytes + optimizer + self.saved_bytes_per_sample * batch + largest_grad
        )

    def predict(
        self, style: str, batch: int | None = None, mode: NormMode = "auto", grouping: GroupingSpec | None = None
    ) -> StylePrediction:
        """Predicted FLOPs ratio, kept bytes and peak bytes of ``style`` (a grouping name, ``"groups-M"``,
        ``"non-private"``, an Opacus style, or ``"planned"`` with an explicit ``grouping``) at ``batch``
        (default: the traced batch)."""
        batch = batch or self.trace_batch
        base_flops = self.flops("non-private", batch)
        flops = self.flops(style, batch, mode)
        groups = None
        if style == "non-private":
            kept = extra = 0
        elif style == "opacus-ghost":  # layer inputs and output gradients kept for the second backward pass
            flat = self.grouping("all-layer")
            kept = self.kept_bytes(flat, batch, "ghost")
            extra = self.kept_bytes(flat, batch, "ghost", extra_only=True)
        elif style.startswith("opacus"):
            kept = extra = 4 * self.n_trainable * batch  # grad_sample of every parameter, float32
        else:
            resolved = self.grouping(grouping if grouping is not None else style_grouping(style))
            groups = len(resolved.groups)
            kept = self.kept_bytes(resolved, batch, mode)
            extra = self.kept_bytes(resolved, batch, mode, extra_only=True)
        return StylePrediction(
            style=style,
            batch_size=batch,
            flops=flops,
            time_ratio=flops / base_flops if base_flops else math.nan,
            kept_bytes=kept,
            peak_bytes=self.base_peak_bytes(batch) + extra,
            groups=groups,
        )

    def layer_table(self, batch: int | None = None) -> list[dict]:
        """Per layer use: shapes, predicted FLOPs (non-private, ghost, instantiate) and kept bytes per mode."""
        batch = batch or self.trace_batch
        rows = []
        for u in self.uses:
            rows.append(
                {
                    "path": u.path,
                    "type": u.module_type,
                    "T": u.steps,
                    "p": u.cols,
                    "d": u.rows,
                    "blocks": u.blocks,
                    "auto_mode": "ghost" if u.ghost("auto") else "instantiate",
                    "flops_non_private": self.layer_flops(u, "non-private", batch),
                    "flops_ghost": self.layer_flops(u, "layer-wise", batch, "ghost"),
                    "flops_instantiate": self.layer_flops(u, "layer-wise", batch, "instantiate"),
                    "kept_ghost": sum(b for items in u.kept("ghost", batch).values() for _, b in items),
                    "kept_instantiate": sum(b for items in u.kept("instantiate", batch).values() for _, b in items),
                }
            )
        return rows


def runtime_overhead_bytes(work: Workload) -> int:
    """CPU: this process' resident memory beyond the model's parameters once one sample has been through a
    forward and a backward pass (libraries, kernels and thread pools paged in), gradients dropped again.

    Not training: the model's gradients are set back to None and no optimizer touches its parameters (a
    throwaway optimizer steps a dummy tensor, to page in what any optimizer step loads).
    """
    import psutil

    one = Workload(
        work.model,
        {k: (v[:1] if v.dim() and v.shape[0] == work.batch_size else v) for k, v in work.inputs.items()},
        work.targets[:1],
        work.task,
    )
    one.loss().backward()
    for p in work.model.parameters():
        p.grad = None
    dummy = torch.zeros(1, requires_grad=True)  # page in the optimizer machinery (torch.optim's imports)
    dummy.grad = torch.zeros(1)
    torch.optim.SGD([dummy], lr=0.0).step()
    params = sum(p.numel() * p.element_size() for p in work.model.parameters())
    return psutil.Process().memory_info().rss - params


def style_grouping(style: str) -> GroupingSpec:
    """The ClippingEngine grouping of a benchmark style name: ``"groups-4"`` -> 4, else the name itself."""
    if style.startswith("groups-"):
        return int(style.split("-", 1)[1])
    return style


def _storage(t: Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _first_tensor(args: tuple, kwargs: Mapping) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


def layer_cost(module: nn.Module) -> LayerCost:
    """The form of ``module``'s per-sample gradients, as the norms registry has it: its rule's declared
    :class:`~groupclip.norms.LayerCost`; instantiated (the generic fallback's) when it has no rule or the rule
    declares none."""
    rule = find_rule(module)
    if rule is None or rule.cost is None:
        return GENERIC_COST
    return rule.cost


def trace_model(work: Workload, trace_batch: int | None = None, optimizer_state_per_param: int = 0) -> ModelCost:
    """Trace one forward pass (gradients enabled, no backward) of ``work`` at ``trace_batch`` samples.

    Args:
        work: the workload; its first ``trace_batch`` samples are used (default: all of them).
        trace_batch: samples to trace with; per-sample sizes are scaled linearly to any batch size.
        optimizer_state_per_param: optimizer tensors per trainable parameter (0 for SGD, 2 for Adam).
    """
    from ..norms.linear import register_transformers_layers

    register_transformers_layers()
    model = work.model
    batch = trace_batch or work.batch_size
    # cloned: a slice would keep the whole batch's storage, and storages are what the engine counts
    inputs = {
        k: (v[:batch].clone() if v.dim() and v.shape[0] == work.batch_size else v) for k, v in work.inputs.items()
    }
    params = trainable_parameters(model)
    canonical = {id(p): n for n, p in params.items()}
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    uses: list[LayerUse] = []
    order: list[str] = []
    saved: dict[int, int] = {}

    def make_hook(path: str, module: nn.Module):
        own = {
            canonical[id(p)]: local for local, p in module._parameters.items() if p is not None and id(p) in canonical
        }
        rule = find_rule(module)
        cost = layer_cost(module)
        shares_gram = rule is not None and rule.right_is_input

        def hook(mod, args, kwargs, output):
            out = (
                output
                if isinstance(output, Tensor)
                else _first_tensor(tuple(output) if isinstance(output, tuple) else (), {})
            )
            x = _first_tensor(args, kwargs)
            use = LayerUse(
                index=len(uses),
                path=path,
                module_type=type(mod).__name__,
                form=cost.form,
                operand=cost.operand,
                stacked=cost.stacked,
                shares_gram=shares_gram,
                params=dict(own),
                numel={n: params[n].numel() for n in own},
                dims={n: params[n].dim() for n in own},
            )
            for n in own:
                if n not in order:
                    order.append(n)
            if out is not None:
                use.elem = out.element_size()
                use.grad_bytes_per_sample = out.numel() * out.element_size() / batch
            if cost.form != "instantiated" and cost.shape is not None and x is not None and out is not None:
                shape = cost.shape(mod, x, out, batch)
                use.steps, use.cols, use.rows, use.blocks = shape.steps, shape.cols, shape.rows, shape.blocks
                if cost.operand == "input":
                    use.input_key, nbytes = _storage(x)
                    use.input_bytes_per_sample = nbytes / batch
                    if cost.form == "indexed":  # indices broadcast over the batch are expanded per sample
                        use.input_bytes_per_sample = max(use.input_bytes_per_sample, use.steps * 8)
                else:  # a tensor made from the input, e.g. unfolded patches
                    use.input_bytes_per_sample = use.steps * use.cols * use.blocks * use.elem
            uses.append(use)

        return hook

    def pack(t: Tensor):
        ptr, nbytes = _storage(t)
        if ptr not in param_storages and nbytes:
            saved[ptr] = nbytes
        return t

    handles = []
    try:
        for path, module in model.named_modules():
            if any(p is not None and p.requires_grad for p in module._parameters.values()):
                handles.append(module.register_forward_hook(make_hook(path, module), with_kwargs=True))
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**inputs)
            del out
    finally:
        for h in handles:
            h.remove()
    readers: dict[int, int] = {}
    for u in uses:
        if u.shares_gram and u.input_key is not None:
            readers[u.input_key] = readers.get(u.input_key, 0) + 1
    order += [n for n in params if n not in order]
    trainable_bytes = sum(p.numel() * p.element_size() for p in params.values())
    return ModelCost(
        model=model,
        uses=uses,
        trace_batch=batch,
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        trainable_bytes=trainable_bytes,
        n_trainable=sum(p.numel() for p in params.values()),
        saved_bytes_per_sample=sum(saved.values()) / batch,
        execution_order=order,
        optimizer_state_per_param=optimizer_state_per_param,
        _shared_inputs={k for k, n in readers.items() if n > 1},
    )
