"""The exact generic fallback: per-sample gradients of any module's own parameters with ``torch.func``.

Used for every module that owns trainable parameters and has no registered rule (raw ``nn.Parameter`` such as
ViT's cls token, custom layers, ``nn.MultiheadAttention``, transposed convolutions, HF's ``LlamaRMSNorm``...).

The module's forward is recomputed once, batched, with the random state it had in the real forward (so dropout
masks are the same) and on copies of its buffers (so running statistics are not updated twice). The per-sample
gradients are then vector-Jacobian products with the output gradient restricted to one sample at a time --
wherever that sample's elements are in each output, as the batch tracker laid them out -- vectorised with ``vmap``
in chunks. This costs about B backward passes of that one module: exact, not fast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from ..dataflow.layout import sample_ids
from .contributions import Instantiated
from .registry import LayerCost

# How the planner costs a module without a rule: per-sample gradients of each parameter, instantiated.
GENERIC_COST = LayerCost("instantiated")

# Upper bound on the bytes of masked cotangents materialised at once by the per-sample vmap.
COTANGENT_BUDGET_BYTES = 256 * 2**20


@dataclass
class RandomState:
    """The CPU and CUDA generator states at the start of a module's forward."""

    cpu: Tensor
    cuda: dict[int, Tensor]

    @classmethod
    def capture(cls, tensors: Sequence[Tensor]) -> RandomState:
        devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices})

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=list(self.cuda), enabled=True):
            torch.set_rng_state(self.cpu)
            for device, state in self.cuda.items():
                torch.cuda.set_rng_state(state, device)
            yield


def generic_contributions(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    random_state: RandomState,
    output_positions: Sequence[int],
    output_grads: Sequence[Tensor],
    layouts: Sequence[tuple[int, int] | None],
    wanted: Collection[str],
    batch_size: int,
) -> dict[str, Instantiated]:
    """Per-sample gradients of ``module``'s own parameters named in ``wanted``.

    Args:
        module: the module; its hooks must be inert while this runs (the engine suspends them).
        args, kwargs: the inputs of the real forward call.
        random_state: generator states captured just before that call.
        output_positions: indices, in ``torch.utils._pytree.tree_leaves(output)``, of the tapped outputs.
        output_grads: per tapped output, the gradient of the loss with respect to it; ``[B, *shape]`` (one per
            sample, stacked) where its layout is None.
        layouts: per tapped output, ``(dim, inner)``: where its samples are (see :mod:`groupclip.dataflow.tags`);
            None for a batch-free output whose gradients come stacked by sample.
        wanted: names of the module's own trainable parameters.
        batch_size: B.
    """
    from torch.utils._pytree import tree_leaves

    params = {name: module.get_parameter(name).detach() for name in wanted}
    buffers = {name: buf.clone() for name, buf in module.named_buffers()}

    def forward(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
        # oneDNN's RNN backward has no vmap batching rule; the reference kernels compute the same function.
        with random_state.replay(), torch.backends.mkldnn.flags(enabled=False):
            # tie_weights=False: a parameter shared with a submodule that recorded its own use (RoBERTa's LM head
            # bias is also its decoder's) stays a constant there, so only this module's own uses are differentiated.
            out = functional_call(module, {**p, **buffers}, args, kwargs, tie_weights=False)
        leaves = tree_leaves(out)
        return tuple(leaves[i] for i in output_positions)

    with torch.no_grad():
        _, pullback = vjp(forward, params)

    grads = tuple(g.detach() for g in output_grads)
    device = grads[0].device
    masks = []
    for g, layout in zip(grads, layouts, strict=True):
        if layout is None:
            masks.append(None)
            continue
        dim, inner = layout
        shape = [1] * g.dim()
        shape[dim] = g.shape[dim]
        masks.append(sample_ids(g.shape[dim], batch_size, inner, device=device).view(shape))
    samples = torch.arange(batch_size, device=device)

    def one_sample(i: Tensor) -> dict[str, Tensor]:
        cotangents = []
        for g, mask in zip(grads, masks, strict=True):
            if mask is None:
                cotangents.append(g.index_select(0, i.view(1)).squeeze(0))
            else:
                cotangents.append(g * (mask == i).to(g.dtype))
        with torch.backends.mkldnn.flags(enabled=False):
            return pullback(tuple(cotangents))[0]

    per_sample_bytes = sum(g.numel() * g.element_size() for g, m in zip(grads, masks, strict=True) if m is not None)
    chunk = max(1, min(batch_size, COTANGENT_BUDGET_BYTES // max(per_sample_bytes, 1)))
    with torch.no_grad():
        per_sample = vmap(one_sample, chunk_size=chunk)(samples)
    return {name: Instantiated(per_sample[name]) for name in wanted}
