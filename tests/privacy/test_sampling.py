"""Poisson sampling, empty batches, physical batches and the noise source (docs/MATH.md, Sampling).

Statistical checks use tolerances of 6 standard deviations of the statistic under a correct implementation (or a
p-value threshold of 1e-6), so a correct implementation fails them with negligible probability whatever the seed.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from scipy import stats
from torch.utils.data import Dataset, TensorDataset

from groupclip.noise import GaussianNoise
from groupclip.sampling import (
    EmptyBatchCollate,
    FixedSizeBatchesWarning,
    PoissonBatchSampler,
    expected_steps,
    physical_batches,
    poisson_loader,
    shuffled_loader,
)


# ---------------------------------------------------------------------- PoissonBatchSampler
def test_inclusion_rate_is_q_and_batch_sizes_vary():
    n, q, steps = 10_000, 0.05, 200
    batches = list(PoissonBatchSampler(n, q, steps=steps, seed=0))
    assert len(batches) == steps
    for batch in batches:
        assert batch == sorted(set(batch))  # distinct indices, in order
        assert all(0 <= i < n for i in batch)
    # The total count is Binomial(n * steps, q).
    total = sum(len(b) for b in batches)
    mean, sd = n * steps * q, math.sqrt(n * steps * q * (1 - q))
    assert abs(total - mean) <= 6 * sd, (total, mean, sd)
    # Every index is included with the same rate: per-index counts are independent Binomial(steps, q). The sum of
    # their squared standardised deviations has mean n and variance n (2 + (1 - 6 p (1 - p)) / (steps p (1 - p))).
    counts = torch.zeros(n)
    for batch in batches:
        counts[batch] += 1
    chi2 = float(((counts - steps * q) ** 2).sum() / (steps * q * (1 - q)))
    var = n * (2 + (1 - 6 * q * (1 - q)) / (steps * q * (1 - q)))
    assert abs(chi2 - n) <= 6 * math.sqrt(var), (chi2, n)
    # Batch sizes are Binomial(n, q): they vary, with variance n q (1 - q) (sample variance of 200 values:
    # relative sd sqrt(2 / 199) ~ 0.1, so 6 sd is +-60%).
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert len(set(sizes.tolist())) > 10
    assert 0.4 <= float(sizes.var()) / (n * q * (1 - q)) <= 1.6


def test_empty_batches_are_yielded_as_empty_lists():
    # P(empty) = 0.999^10 ~ 0.99 per step; no empty batch in 100 steps has probability ~1e-200.
    batches = list(PoissonBatchSampler(10, 0.001, steps=100, seed=1))
    assert len(batches) == 100
    assert any(b == [] for b in batches)
    assert all(isinstance(b, list) for b in batches)


@pytest.mark.parametrize(("q", "steps"), [(0.01, 100), (0.3, 3), (0.004, 250), (1.0, 1)])
def test_len_is_steps_and_defaults_to_one_epoch(q, steps):
    sampler = PoissonBatchSampler(20, q, seed=0)
    assert sampler.steps == steps == len(sampler)
    assert len(list(sampler)) == steps
    explicit = PoissonBatchSampler(20, q, steps=7, seed=0)
    assert len(explicit) == 7 == len(list(explicit))


def test_sample_rate_one_takes_everything():
    assert list(PoissonBatchSampler(5, 1.0, steps=3, seed=0)) == [[0, 1, 2, 3, 4]] * 3


def test_seeded_sampler_is_reproducible():
    a = list(PoissonBatchSampler(100, 0.1, steps=20, seed=7))
    b = list(PoissonBatchSampler(100, 0.1, steps=20, seed=7))
    c = list(PoissonBatchSampler(100, 0.1, steps=20, seed=8))
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"num_samples": 0, "sample_rate": 0.1}, "num_samples"), ({"num_samples": 10, "sample_rate": 0.0}, "sample_rate"),
     ({"num_samples": 10, "sample_rate": 1.5}, "sample_rate")],
)  # fmt: skip
def test_sampler_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PoissonBatchSampler(**kwargs)


def _checkpoint_round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("stop_after", [0, 4, 9])
def test_resume_mid_iteration_in_a_new_sampler(stop_after):
    reference = PoissonBatchSampler(50, 0.2, steps=10, seed=3)
    first_pass, second_pass = list(reference), list(reference)
    assert first_pass != second_pass  # the generator moves on between passes

    interrupted = PoissonBatchSampler(50, 0.2, steps=10, seed=3)
    iterator = iter(interrupted)
    seen = [next(iterator) for _ in range(stop_after)]
    state = _checkpoint_round_trip(interrupted.state_dict())
    assert seen == first_pass[:stop_after]

    resumed = PoissonBatchSampler(50, 0.2, steps=10, seed=12345)  # a different seed: the state must win
    resumed.load_state_dict(state)
    assert list(resumed) == first_pass[stop_after:]
    assert list(resumed) == second_pass  # and the following pass continues the same stream


def test_poisson_loader_resumes_through_its_batch_sampler():
    x = torch.arange(40.0).reshape(20, 2)
    dataset = TensorDataset(x, torch.arange(20))
    full = [y.tolist() for _, y in poisson_loader(dataset, 0.3, steps=8, seed=5)]

    loader = poisson_loader(dataset, 0.3, steps=8, seed=5)
    iterator = iter(loader)
    head = [next(iterator)[1].tolist() for _ in range(3)]
    state = _checkpoint_round_trip(loader.batch_sampler.state_dict())
    resumed = poisson_loader(dataset, 0.3, steps=8, seed=99)
    resumed.batch_sampler.load_state_dict(state)
    assert head + [y.tolist() for _, y in resumed] == full


# ---------------------------------------------------------------------- poisson_loader and empty batches
def test_poisson_loader_tensor_dataset_yields_the_sampled_rows_and_typed_empty_batches():
    n, q, steps, seed = 20, 0.02, 60, 11  # P(empty) = 0.98^20 ~ 0.67: both kinds occur (else prob. < 1e-10)
    x = torch.randn(n, 3, 4, dtype=torch.float64)
    y = torch.arange(n)
    loader = poisson_loader(TensorDataset(x, y), q, seed=seed, steps=steps)
    assert len(loader) == steps
    want = list(PoissonBatchSampler(n, q, steps=steps, seed=seed))
    batches = list(loader)
    assert len(batches) == steps
    empty = nonempty = 0
    for (bx, by), indices in zip(batches, want, strict=True):
        assert by.tolist() == indices
        assert bx.shape == (len(indices), 3, 4)
        assert bx.dtype == torch.float64 and by.dtype == torch.int64
        assert torch.equal(bx, x[indices])
        empty += len(indices) == 0
        nonempty += len(indices) > 0
    assert empty > 0 and nonempty > 0


class DictDataset(Dataset):
    def __init__(self, n: int, text: bool = False) -> None:
        self.n, self.text = n, text

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        item = {"x": torch.full((2, 5), float(i), dtype=torch.float16), "y": i}
        if self.text:
            item["text"] = f"private sentence of example {i}"
        return item


def test_poisson_loader_dict_dataset_empty_batches():
    loader = poisson_loader(DictDataset(10), 0.01, steps=40, seed=2)  # P(empty) ~ 0.9 per step
    batches = list(loader)
    empties = [b for b in batches if b["x"].shape[0] == 0]
    assert empties and len(empties) < len(batches)
    for batch in batches:
        assert set(batch) == {"x", "y"}
        assert batch["x"].shape[1:] == (2, 5) and batch["x"].dtype == torch.float16
        assert batch["y"].dtype == torch.int64 and batch["y"].shape == batch["x"].shape[:1]
        assert torch.equal(batch["x"][:, 0, 0].to(torch.int64), batch["y"])


def test_empty_batch_collate_with_custom_collate():
    def collate(items):
        return {"inputs": torch.stack([x for x, _ in items]), "labels": torch.stack([y for _, y in items])}

    dataset = TensorDataset(torch.randn(4, 7), torch.randint(0, 3, (4,), dtype=torch.int32))
    fn = EmptyBatchCollate(dataset, collate)
    empty = fn([])
    assert empty["inputs"].shape == (0, 7) and empty["inputs"].dtype == torch.float32
    assert empty["labels"].shape == (0,) and empty["labels"].dtype == torch.int32
    full = fn([dataset[1], dataset[3]])
    assert torch.equal(full["inputs"], dataset.tensors[0][[1, 3]])


def test_empty_batch_has_no_data_of_any_example():
    loader = poisson_loader(DictDataset(10, text=True), 0.01, steps=40, seed=2)
    empties = [b for b in loader if b["x"].shape[0] == 0]
    assert empties
    for batch in empties:
        assert len(batch["text"]) == 0, batch["text"]


# ---------------------------------------------------------------------- shuffled_loader
def test_shuffled_loader_warns_about_the_accounting():
    dataset = TensorDataset(torch.arange(10.0))
    with pytest.warns(FixedSizeBatchesWarning) as record:
        loader = shuffled_loader(dataset, batch_size=3)
    assert len(record) == 1
    message = str(record[0].message)
    assert "Poisson" in message and "epsilon" in message and "not" in message
    assert record[0].filename == __file__  # points at the caller
    batches = [b for (b,) in loader]
    assert [len(b) for b in batches] == [3, 3, 3]  # fixed size, last partial batch dropped
    assert len(set(torch.cat(batches).tolist())) == 9


# ---------------------------------------------------------------------- physical_batches
@pytest.mark.parametrize(
    ("size", "chunk", "want"), [(10, 3, [3, 3, 3, 1]), (9, 3, [3, 3, 3]), (4, 8, [4]), (1, 1, [1])]
)
def test_physical_batches_tuple(size, chunk, want):
    x, y = torch.randn(size, 2, 3), torch.arange(size)
    chunks = list(physical_batches((x, y), chunk))
    assert [c[1].shape[0] for c in chunks] == want
    assert all(isinstance(c, tuple) and c[0].shape[0] == c[1].shape[0] for c in chunks)
    assert torch.equal(torch.cat([c[0] for c in chunks]), x)
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)


def test_physical_batches_dict():
    batch = {"input_ids": torch.randint(0, 100, (7, 5)), "mask": torch.ones(7, 5, dtype=torch.bool)}
    chunks = list(physical_batches(batch, 2))
    assert [c["input_ids"].shape[0] for c in chunks] == [2, 2, 2, 1]
    for key, value in batch.items():
        assert torch.equal(torch.cat([c[key] for c in chunks]), value)


def test_physical_batches_of_an_empty_batch_yield_nothing():
    assert list(physical_batches((torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), 4)) == []
    assert list(physical_batches({"x": torch.zeros(0, 2)}, 1)) == []


def test_physical_batches_reject_bad_input():
    with pytest.raises(ValueError, match="leading"):
        list(physical_batches((torch.zeros(4, 2), torch.zeros(3)), 2))
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        list(physical_batches((torch.zeros(4, 2),), 0))


@pytest.mark.parametrize(("q", "epochs", "want"), [(0.01, 3, 300), (0.1, 0.3, 3), (0.03, 1, 34), (1.0, 2, 2)])
def test_expected_steps(q, epochs, want):
    assert expected_steps(q, epochs) == want


# ---------------------------------------------------------------------- GaussianNoise
def test_noise_seeded_reproducible_and_state_round_trip():
    a, b = GaussianNoise(seed=4), GaussianNoise(seed=4)
    kw = {"dtype": torch.float32, "device": "cpu"}
    first = a.sample((3, 4), 1.5, **kw)
    assert torch.equal(first, b.sample((3, 4), 1.5, **kw))
    assert not torch.equal(first, GaussianNoise(seed=5).sample((3, 4), 1.5, **kw))

    state = _checkpoint_round_trip(a.state_dict())
    want = [a.sample((100,), 2.0, **kw) for _ in range(3)]
    restored = GaussianNoise(seed=999)
    restored.load_state_dict(state)
    assert all(torch.equal(w, restored.sample((100,), 2.0, **kw)) for w in want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_noise_std_and_mean(dtype):
    n, std = 400_000, 2.5
    values = GaussianNoise(seed=0).sample((n,), std, dtype=dtype, device="cpu")
    assert values.dtype == dtype and values.shape == (n,)
    values = values.double()
    # sd of the sample mean: std / sqrt(n); relative sd of the sample std: 1 / sqrt(2n) (plus bf16 rounding, 2^-9).
    assert abs(float(values.mean())) <= 6 * std / math.sqrt(n)
    assert abs(float(values.std()) / std - 1) <= 6 / math.sqrt(2 * n) + (2**-8 if dtype == torch.bfloat16 else 0)


def test_noise_std_zero_is_zeros():
    out = GaussianNoise(seed=0).sample((2, 3), 0.0, dtype=torch.float16, device="cpu")
    assert out.dtype == torch.float16 and torch.equal(out, torch.zeros(2, 3, dtype=torch.float16))


def test_secure_noise_is_standard_normal_and_not_reproducible():
    n = 200_001  # odd: Box-Muller makes pairs
    a = GaussianNoise(seed=0, secure=True).sample((n,), 1.0, dtype=torch.float64, device="cpu")
    b = GaussianNoise(seed=0, secure=True).sample((n,), 1.0, dtype=torch.float64, device="cpu")
    assert a.shape == (n,) and torch.isfinite(a).all()
    assert not torch.equal(a, b)  # the seed is ignored: fresh OS randomness
    assert abs(float(a.mean())) <= 6 / math.sqrt(n)
    assert abs(float(a.std()) - 1) <= 6 / math.sqrt(2 * n)
    assert stats.kstest(a.numpy(), "norm").pvalue > 1e-6
    # The two halves (cos and sin of the same Box-Muller pairs) are uncorrelated; so are the two instances.
    half = n // 2
    for u, v in [(a[:half], a[half : 2 * half]), (a, b)]:
        corr = float(torch.corrcoef(torch.stack([u, v]))[0, 1])
        assert abs(corr) <= 6 / math.sqrt(len(u))
    c = GaussianNoise(secure=True).sample((3, 5), 2.0, dtype=torch.float32, device="cpu")
    assert c.shape == (3, 5) and c.dtype == torch.float32


def test_secure_noise_state_dict():
    noise = GaussianNoise(secure=True)
    state = noise.state_dict()
    assert state == {"secure": True, "base": None, "generators": {}}  # nothing to restore: not reproducible
    plain = GaussianNoise(seed=1)
    plain.load_state_dict(state)
    assert plain.secure
    x = plain.sample((4,), 1.0, dtype=torch.float32, device="cpu")
    y = GaussianNoise(seed=1).sample((4,), 1.0, dtype=torch.float32, device="cpu")
    assert not torch.equal(x, y)  # no longer drawing from the seeded generator
