"""Every Hugging Face architecture of the zoo, built from a tiny config and called as users call it, is exact.

17 architectures -- encoders (BERT, RoBERTa MLM with its tied decoder bias, DistilBERT, ELECTRA, ALBERT,
DeBERTa-v2 with relative embeddings), decoders (GPT-2, GPT-Neo, Llama, Mistral, Qwen2, Gemma, Phi, BLOOM with
ALiBi, OPT with its batch folded into [B*T, d] rows) and encoder-decoders (BART, T5 with its relative attention
bias) -- at B != T and at B == T (where a size test cannot tell samples from positions), all-layer and layer-wise,
against the float64 per-sample reference. Tolerance 1e-6: several architectures compute parts of their forward in
float32 on purpose (T5's and Llama's RMS norms, GPT-Neo's attention), which limits the reference to ~1e-7.
"""

from __future__ import annotations

import pytest
import torch
from hf_zoo import LOSSES, make_batch, zoo

from reference import check_engine

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")

CASES = zoo()
# BLOOM's own autograd.Function (its GeLU) does not support torch.func: its reference loops over samples.
REFERENCE = {"bloom": "loop"}


def _errors(got, want, norms, ref_norms) -> tuple[float, float]:
    total = sum(float(w.pow(2).sum()) for w in want.values()) ** 0.5
    tensor = max(float((got[n] - w).norm()) / max(float(w.norm()), 1e-3 * total) for n, w in want.items())
    largest = max(float(r.abs().max()) for r in ref_norms.values())
    norm = max(
        float((norms[g] - r).abs().max()) / max(float(r.abs().max()), 1e-3 * largest) for g, r in ref_norms.items()
    )
    return tensor, norm


@pytest.mark.parametrize("grouping", ["all-layer", "layer-wise"])
@pytest.mark.parametrize(("batch", "steps"), [(3, 5), (4, 4)], ids=["B3-T5", "B4-T4"])
@pytest.mark.parametrize("name", list(CASES))
def test_architecture_is_exact(name: str, batch: int, steps: int, grouping: str) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().double().train()
    data = make_batch(case.kind, batch, steps)
    engine, got, want, norms, ref_norms = check_engine(
        model, LOSSES[case.kind], data, grouping=grouping, max_grad_norm=0.05, method=REFERENCE.get(name, "func")
    )
    tensor, norm = _errors(got, want, norms, ref_norms)
    assert tensor <= 1e-6 and norm <= 1e-6, (name, tensor, norm)
    assert bool((torch.stack(list(engine.last_report.clip_factors.values())) < 1).any())  # clipping is active


def test_the_zoo_covers_sixteen_architectures_of_every_kind() -> None:
    kinds = {case.kind for case in CASES.values()}
    assert len(CASES) >= 16 and kinds == {"lm", "cls", "mlm", "s2s"}
