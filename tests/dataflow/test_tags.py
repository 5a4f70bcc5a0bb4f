"""Tags by data flow: what the batch tracker concludes for typical ops, without any engine hooks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from groupclip.dataflow.mode import BatchTracker
from groupclip.dataflow.tags import Kind, batched, read_tag, write_tag


class _Host:
    number, batch = 7, 4

    def trainable(self, param):
        return False

    def consumed(self, tensor, sources):
        pass

    def checkpointed(self):
        return False


def _run(fn, *inputs):
    tracker = BatchTracker()
    tracker.trace = _Host()
    for t in inputs:
        write_tag(t, batched(7, 0))
    with tracker:
        out = fn(*inputs)
    return read_tag(out, 7)


def test_a_size_equal_to_the_batch_is_not_a_batch() -> None:
    x = torch.randn(4, 4, 8)  # B = T = 4
    bias = torch.randn(4, 4)  # [T, T], a constant
    assert _run(lambda x: x + bias[None, :, :1], x) == batched(7, 0)
    assert _run(lambda x: x.transpose(0, 1), x) == batched(7, 1)  # the samples moved to dim 1
    assert read_tag(bias, 7) is None


def test_folded_rows_and_heads_are_followed() -> None:
    x = torch.randn(4, 5, 8)
    assert _run(lambda x: x.reshape(20, 8), x) == batched(7, 0, 5)
    assert _run(lambda x: F.linear(x.reshape(20, 8), torch.randn(3, 8)).view(4, 5, 3), x) == batched(7, 0)
    assert _run(lambda x: x.view(4, 5, 2, 4).transpose(1, 2).reshape(8, 5, 4), x) == batched(7, 0, 2)


def test_mixing_and_summing_samples_are_told_apart() -> None:
    x = torch.randn(4, 5)
    assert _run(lambda x: x.sum(), x).kind == Kind.REDUCED  # a loss
    assert _run(lambda x: F.cross_entropy(x, torch.arange(4)), x).kind == Kind.REDUCED
    assert _run(lambda x: x - x.mean(0), x).kind == Kind.MIXED  # batch statistics
    assert _run(lambda x: torch.softmax(x, 0), x).kind == Kind.MIXED
    assert _run(lambda x: x.T @ x, x).kind == Kind.MIXED
    assert _run(lambda x: x.sum(1), x) == batched(7, 0)


def test_unknown_ops_lose_the_layout_loudly() -> None:
    x = torch.randn(4, 5)
    tag = _run(lambda x: torch.fft.fft(x).real, x)
    assert tag.kind == Kind.UNKNOWN and "fft" in tag.why


def test_indexing_by_sample_ids_keeps_the_layout() -> None:
    x = torch.randn(4, 6, 3)
    lengths = torch.tensor([5, 2, 0, 3])
    assert _run(lambda x: x[torch.arange(4), lengths], x) == batched(7, 0)  # HF's last-token pooling
    assert _run(lambda x: x[torch.tensor([1, 0, 2, 3])], x).kind == Kind.UNKNOWN  # samples reordered
