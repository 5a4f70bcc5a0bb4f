"""The float64 reference: per-sample gradients from torch.func, clipped by definition (docs/MATH.md, Clip functions)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

from groupclip.clipping import ClipFunction
from groupclip.grouping import ResolvedGrouping, trainable_parameters

PerSampleLoss = Callable[[nn.Module, tuple], Tensor]  # (model, batch) -> [B] per-sample losses

# nn.Module's hook registries: an engine that detached cleanly leaves every one of them as it found it.
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _slice(batch: tuple, i: int) -> tuple:
    return tuple(t[i : i + 1] if isinstance(t, Tensor) else t for t in batch)


def _to64(batch: tuple) -> tuple:
    return tuple(t.double() if isinstance(t, Tensor) and t.is_floating_point() else t for t in batch)


def per_sample_gradients(
    model: nn.Module, loss: PerSampleLoss, batch: tuple, method: str = "func"
) -> dict[str, Tensor]:
    """``name -> [B, *shape]`` per-sample gradients of the per-sample losses, float64, one sample at a time.

    ``method="func"``: torch.func.grad; ``"loop"``: plain autograd on each single sample (for models whose own
    autograd.Functions do not support torch.func, e.g. BLOOM's GeLU).
    """
    model64 = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in trainable_parameters(model64).items()}
    batch64 = _to64(batch)
    size = next(t for t in batch if isinstance(t, Tensor)).shape[0]
    if method == "loop":
        named = trainable_parameters(model64)
        rows = []
        for i in range(size):
            total = loss(model64, _slice(batch64, i))[0]
            found = torch.autograd.grad(total, list(named.values()), allow_unused=True)
            pairs = zip(named.items(), found, strict=True)
            rows.append({n: g if g is not None else torch.zeros_like(p) for (n, p), g in pairs})
        return {n: torch.stack([r[n] for r in rows]) for n in named}

    def sample_loss(p: dict[str, Tensor], sample: tuple) -> Tensor:
        return loss(_Bound(model64, p), sample)[0]

    grads = [grad(sample_loss)(params, _slice(batch64, i)) for i in range(size)]
    return {n: torch.stack([g[n] for g in grads]) for n in params}


class _Bound(nn.Module):
    """Calls ``model`` with parameters ``p`` (torch.func.functional_call), looking like the model to a loss."""

    def __init__(self, model: nn.Module, p: dict[str, Tensor]) -> None:
        super().__init__()
        self.__dict__["_model"], self.__dict__["_p"] = model, p

    def forward(self, *args, **kwargs):
        return functional_call(self._model, self._p, args, kwargs)


def reference_clip(
    per_sample: Mapping[str, Tensor],
    grouping: ResolvedGrouping,
    thresholds: Mapping[str, float],
    clip: ClipFunction,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(clipped sums name -> tensor, per-sample norms group -> [B])`` by the definition."""
    out, norms = {}, {}
    for group, names in grouping.groups.items():
        sq = sum(per_sample[n].flatten(1).pow(2).sum(1) for n in names)
        norm = sq.sqrt()
        factors = clip(norm, thresholds[group])
        norms[group] = norm
        for n in names:
            out[n] = torch.tensordot(factors, per_sample[n], dims=([0], [0]))
    return out, norms


def max_relative_error(got: Mapping[str, Tensor], want: Mapping[str, Tensor]) -> float:
    """max over tensors of ||got - want|| / max(||want||, tiny)."""
    worst = 0.0
    for n, w in want.items():
        g = got[n].double()
        worst = max(worst, float((g - w).norm() / w.norm().clamp_min(1e-30)))
    return worst


def check_engine(
    model, loss: PerSampleLoss, batch: tuple, *, reduction: str = "mean", method: str = "func", **engine_kwargs
):
    """Run the engine on ``model`` and return ``(engine, clipped grads, reference grads, norms, ref norms)``."""
    from groupclip import ClippingEngine

    model.zero_grad(set_to_none=True)
    engine = ClippingEngine(model, loss_reduction=reduction, **engine_kwargs)
    with engine:
        losses = loss(model, batch)
        total = losses.mean() if reduction == "mean" else losses.sum()
        total.backward()
    params = trainable_parameters(model)
    got = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
    per_sample = per_sample_gradients(model, loss, batch, method)
    want, want_norms = reference_clip(per_sample, engine.grouping, engine.thresholds, engine.clip_fn)
    return engine, got, want, engine.last_report.per_sample_norms, want_norms
