"""The layout algebra against brute force: a tensor of sample ids, reshaped as torch reshapes it."""

from __future__ import annotations

import random

import torch

from groupclip.dataflow.layout import after_reshape, sample_ids, to_rows


def _ids(shape: list[int], dim: int, inner: int, batch: int) -> torch.Tensor:
    view = [-1 if i == dim else 1 for i in range(len(shape))]
    return sample_ids(shape[dim], batch, inner).view(view).expand(shape)


def test_reshapes_map_layouts_exactly_or_give_up() -> None:
    rng = random.Random(0)
    exact = lost = 0
    for _ in range(2000):
        batch = rng.choice([1, 2, 3, 4])
        shape = [rng.choice([1, 2, 3, 4, 6]) for _ in range(rng.randint(1, 4))]
        dim, inner, outer = rng.randrange(len(shape)), rng.choice([1, 2, 3]), rng.choice([1, 2])
        shape[dim] = outer * batch * inner
        ids = _ids(shape, dim, inner, batch)
        numel, out = ids.numel(), []
        while numel > 1 and len(out) < 4:
            d = rng.choice([k for k in range(1, numel + 1) if numel % k == 0])
            out.append(d)
            numel //= d
        out.append(numel)
        rng.shuffle(out)
        found = after_reshape(shape, out, dim, inner, batch)
        if found is None:
            lost += 1
            continue
        assert torch.equal(ids.reshape(out), _ids(out, found[0], found[1], batch)), (shape, dim, inner, out, found)
        exact += 1
    assert exact > 1000 and lost > 10  # both outcomes occur


def test_folded_tokens_and_heads() -> None:
    assert after_reshape((4, 5, 8), (20, 8), 0, 1, 4) == (0, 5)  # OPT: [B, T, d] -> [B*T, d]
    assert after_reshape((20, 8), (4, 5, 8), 0, 5, 4) == (0, 1)  # and back
    assert after_reshape((3, 2, 6, 8), (6, 6, 8), 0, 1, 3) == (0, 2)  # heads folded into the batch
    assert after_reshape((3, 5), (5, 3), 0, 1, 3) is None  # a reshape that spreads samples over two dims


def test_to_rows_puts_each_sample_first() -> None:
    ids = _ids([2, 12, 3], 1, 2, 3)  # dim 1 = outer 2 x B 3 x inner 2
    rows = to_rows(ids, 1, 2, 3)
    assert rows.shape == (3, 4, 2, 3)
    assert torch.equal(rows, torch.arange(3).view(3, 1, 1, 1).expand_as(rows))
