"""A workload: a model, one batch of the shape to plan for, and the loss of a training step.

The planner (:func:`groupclip.planning.plan_grouping`) and the cost model (:func:`groupclip.planning.trace_model`)
take a :class:`Workload`. ``groupclip plan --model package.module:function`` builds one with an importable factory
called as ``function(batch_size, seq_len)`` (:func:`load_factory`). The benchmark harness of the source repository
(``benchmarks/harness/presets.py``) builds its named presets as workloads too.

Example::

    from groupclip.planning import Workload
    work = Workload(model, {"input_ids": ids}, labels, "classify")
    loss = work.loss()          # mean over samples of the per-sample loss
    loss.backward()
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Task = Literal["classify", "lm"]


@dataclass
class Workload:
    """A model, one batch and the loss of a training step.

    Attributes:
        model: the model, in train mode.
        inputs: keyword arguments of ``model(**inputs)``; the output is a tensor of logits or has ``.logits``.
        targets: ``[B]`` class labels (``task="classify"``) or ``[B, T]`` token ids (``task="lm"``: next-token
            prediction, the logits at position t predict ``targets[:, t + 1]``).
        task: which loss.
        description: what the model and batch are, for reports.
    """

    model: nn.Module
    inputs: dict[str, Tensor]
    targets: Tensor
    task: Task
    description: str = ""

    @property
    def batch_size(self) -> int:
        return self.targets.shape[0]

    def logits(self, model: nn.Module | None = None) -> Tensor:
        out = (model or self.model)(**self.inputs)
        return out if isinstance(out, Tensor) else out.logits

    def per_sample_loss(self, logits: Tensor) -> Tensor:
        """``[B]`` losses: cross-entropy (LM: the mean over a sample's predicted tokens)."""
        if self.task == "classify":
            return F.cross_entropy(logits, self.targets, reduction="none")
        shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
        token_loss = F.cross_entropy(shifted, self.targets[:, 1:].reshape(-1), reduction="none")
        return token_loss.view(self.batch_size, -1).mean(1)

    def loss(self, model: nn.Module | None = None) -> Tensor:
        """Mean over the batch of the per-sample losses (``loss_reduction="mean"``)."""
        return self.per_sample_loss(self.logits(model)).mean()

    def with_explicit_positions(self) -> Workload:
        """The same batch with a Hugging Face model's default ``position_ids`` (and ``token_type_ids``) passed
        explicitly as ``[B, T]`` tensors: the same logits, one row per sample.

        Hugging Face broadcasts default position ids ``[1, T]`` over the batch; a per-sample-gradient library that
        assumes dim 0 is the batch (Opacus) cannot clip the position embedding then, and passing them explicitly
        is the usual workaround. RoBERTa derives its position ids from the tokens per sample, so it is unchanged;
        so is any workload without ``input_ids`` or a Hugging Face config.
        """
        config = getattr(self.model, "config", None)
        ids = self.inputs.get("input_ids")
        if config is None or ids is None or getattr(config, "model_type", "") == "roberta":
            return self
        batch, steps = ids.shape
        inputs = dict(self.inputs)
        inputs.setdefault("position_ids", torch.arange(steps, device=ids.device).expand(batch, steps).contiguous())
        if getattr(config, "type_vocab_size", 0):
            inputs.setdefault("token_type_ids", torch.zeros_like(ids))
        desc = f"{self.description}; explicit [B, T] position ids"
        return Workload(self.model, inputs, self.targets, self.task, desc)

    def to(self, device: str | torch.device) -> Workload:
        self.model.to(device)
        self.inputs = {k: v.to(device) for k, v in self.inputs.items()}
        self.targets = self.targets.to(device)
        return self


def load_factory(name: str, batch_size: int | None = None, seq_len: int | None = None, seed: int = 0) -> Workload:
    """The workload of the factory ``"package.module:function"``, called as ``function(batch_size or 8, seq_len)``
    after seeding torch with ``seed``.

    Raises:
        ValueError: ``name`` is not ``module:function``, cannot be imported, or returns something else.
    """
    if ":" not in name:
        raise ValueError(f"Expected a model factory 'package.module:function'; got {name!r}.")
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"Cannot import the model factory {name!r}: {exc}") from exc
    torch.manual_seed(seed)
    work = factory(batch_size or 8, seq_len)
    if not isinstance(work, Workload):
        raise ValueError(
            f"The model factory {name!r} returned {type(work).__name__}; it must return a "
            "groupclip.planning.Workload(model, inputs, targets, task)."
        )
    return work
