"""Per-sample rule for ``nn.Embedding``: ``||G_i||^2 = sum_{t,t'} 1[x_it = x_it'] <g_it, g_it'>``."""

from __future__ import annotations

from collections.abc import Collection

from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from .contributions import Indexed
from .registry import FactorShape, LayerCost, register_layer


def _check_embedding(module: nn.Module, path: str) -> None:
    if module.max_norm is not None:
        raise UnsupportedModuleError(
            f"{path} ({type(module).__name__}) has max_norm={module.max_norm}: it renormalises the weight in "
            "place during forward, so per-sample gradients are not defined. Construct it with max_norm=None."
        )
    if module.scale_grad_by_freq:
        raise UnsupportedModuleError(
            f"{path} ({type(module).__name__}) has scale_grad_by_freq=True: it scales each gradient by token "
            "counts over the whole batch, which mixes samples. Construct it with scale_grad_by_freq=False."
        )
    if module.sparse:
        raise UnsupportedModuleError(
            f"{path} ({type(module).__name__}) has sparse=True; groupclip writes dense clipped gradients. "
            "Construct it with sparse=False."
        )


def embedding_shape(module: nn.Embedding, activation: Tensor, output: Tensor, batch: int) -> FactorShape:
    """``T`` = indices per sample into ``d`` = ``num_embeddings`` rows of ``p`` = ``embedding_dim``."""
    cols = module.embedding_dim
    return FactorShape(steps=max(1, output.numel() // (batch * cols)), cols=cols, rows=module.num_embeddings)


EMBEDDING_COST = LayerCost("indexed", shape=embedding_shape, operand="input")  # the index tensor


@register_layer(nn.Embedding, check=_check_embedding, trailing=lambda m: 0, cost=EMBEDDING_COST)
def embedding(module: nn.Embedding, activation: Tensor, grad_output: Tensor, wanted: Collection[str]):
    if "weight" not in wanted:
        return {}
    batch = activation.shape[0]
    index = activation.reshape(batch, -1)
    right = grad_output.reshape(batch, -1, module.embedding_dim)
    if module.padding_idx is not None:
        right = right.masked_fill((index == module.padding_idx).unsqueeze(-1), 0)
    return {"weight": Indexed(index, right, module.weight.shape)}
