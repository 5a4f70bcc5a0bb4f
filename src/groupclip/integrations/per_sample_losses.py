"""Per-sample losses from the outputs of Hugging Face models: one loss per sample, each its own mean over its
labelled tokens (language models, token classification) or its classification / regression loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .trainer_errors import TrainerSetupError

LossType = Literal["auto", "causal-lm", "sequence-classification", "token-classification", "masked-lm"]
LOSS_TYPES = get_args(LossType)


def per_sample_losses(
    logits: Tensor,
    labels: Tensor,
    loss_type: str,
    *,
    problem_type: str | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    """One loss per sample, ``[B]``, from a batch's logits and labels.

    - ``"causal-lm"``: logits ``[B, T, V]``, labels ``[B, T]``; the logits at position t predict the label at
      t + 1. Sample i's loss is the mean cross-entropy over ITS positions whose (shifted) label is not
      ``ignore_index`` (padding is labelled ``-100`` by Hugging Face's collators). A sample with no such position
      has loss 0 (and so a zero gradient).
    - ``"token-classification"`` and ``"masked-lm"``: the same without the shift.
    - ``"sequence-classification"``: logits ``[B, C]``. ``problem_type`` as in Hugging Face configs (inferred when
      None: one output is ``"regression"``, integer labels ``"single_label_classification"``, else
      ``"multi_label_classification"``): the cross-entropy, the squared error (mean over outputs), or the binary
      cross-entropy with logits (mean over labels) of each sample.

    Half-precision logits are upcast to float32 (as Hugging Face's losses do); float64 stays float64.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if loss_type == "causal-lm":
        return _token_means(logits[:, :-1], labels[:, 1:], label_smoothing, ignore_index)
    if loss_type in ("token-classification", "masked-lm"):
        return _token_means(logits, labels, label_smoothing, ignore_index)
    if loss_type != "sequence-classification":
        raise TrainerSetupError(f"loss_type={loss_type!r}: expected one of {[t for t in LOSS_TYPES if t != 'auto']}.")
    problem = problem_type or _infer_problem_type(logits, labels)
    if problem == "regression":
        target = labels.to(logits.dtype)
        if logits.shape[-1] == 1 and target.dim() == 1:
            return (logits.squeeze(-1) - target) ** 2
        return ((logits - target) ** 2).reshape(logits.shape[0], -1).mean(1)
    if problem == "multi_label_classification":
        losses = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        return losses.reshape(logits.shape[0], -1).mean(1)
    return F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)


def _token_means(logits: Tensor, labels: Tensor, label_smoothing: float, ignore_index: int) -> Tensor:
    size, length = labels.shape[:2]
    if length == 0:
        return logits.sum((1, 2)) * 0  # keeps the graph (and the batch dimension)
    tokens = F.cross_entropy(
        logits.reshape(size * length, -1),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(size, length)
    counts = (labels != ignore_index).sum(1).clamp(min=1)
    return tokens.sum(1) / counts.to(tokens.dtype)


def _infer_problem_type(logits: Tensor, labels: Tensor) -> str:
    if logits.shape[-1] == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        return "single_label_classification"
    return "multi_label_classification"


def infer_loss_type(model: nn.Module) -> str:
    """The per-sample loss a model needs, from its class (a PEFT model's base model class).

    Raises:
        TrainerSetupError: the class is not a known causal LM, sequence / token classifier or masked LM.
    """
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    name = type(base).__name__
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:  # pragma: no cover - transformers moved the mappings
        auto = None

    def known(mapping: str) -> set[str]:
        names: set[str] = set()
        for value in getattr(auto, mapping, {}).values():
            names.update(value if isinstance(value, tuple | list) else (value,))
        return names

    if name.endswith(("ForCausalLM", "LMHeadModel")) or name in known("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        return "causal-lm"
    if name.endswith("ForSequenceClassification") or name in known("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"):
        return "sequence-classification"
    if name.endswith("ForTokenClassification") or name in known("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"):
        return "token-classification"
    if name.endswith("ForMaskedLM"):
        return "masked-lm"
    raise TrainerSetupError(
        f"Cannot tell which per-sample loss a {name} needs. Set PrivacyArguments(loss_type=...) to one of "
        f"{[t for t in LOSS_TYPES if t != 'auto']} if the model returns logits of that kind, or subclass "
        "PrivateTrainer and override per_sample_loss(model, inputs) to return one loss per sample."
    )


def logits_of(outputs: Any) -> Tensor:
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, tuple | list) and outputs:
        logits = outputs[0]
    if not isinstance(logits, Tensor):
        raise TrainerSetupError(
            f"The model returned {type(outputs).__name__} without logits; override PrivateTrainer.per_sample_loss "
            "to compute per-sample losses from it."
        )
    return logits
