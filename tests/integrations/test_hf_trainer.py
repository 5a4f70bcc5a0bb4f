"""PrivateTrainer, the Hugging Face Trainer integration, run for real (tiny GPT-2 / BERT built from configs).

* a 3-step Trainer run equals the plain groupclip loop with the same seeds (float64 to 1e-6, float32 to 1e-4),
  with epsilon in every log line and no ``grad_norm`` (the Trainer's default max_grad_norm=1.0 neutralised);
* PEFT LoRA on GPT-2 (causal LM) and BERT (sequence classification, with the classifier as a module to save),
  padded batches split into physical batches: the update equals the per-sample float64 reference built from each
  sample's own unpadded forward pass;
* Poisson batches, one of them empty: no forward pass for it, the step is taken (noise moves the weights) and the
  accountant counts it;
* resuming from a Trainer checkpoint (mid-epoch and at an epoch boundary) gives the same epsilon and bit-identical
  next steps; a checkpoint without the privacy state is refused;
* settings that would break the guarantee or the update are refused with messages naming the fix.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from tiny_hf import (  # noqa: E402
    TokenData,
    bert_classifier,
    cls_collate,
    gpt2,
    lm_collate,
    seed_kwargs,
    trainable,
    training_args,
)

from groupclip import make_private, physical_batches  # noqa: E402
from groupclip.integrations.transformers import (  # noqa: E402
    PRIVACY_STATE_NAME,
    PrivacyArguments,
    PrivateTrainer,
    TrainerSetupError,
    infer_loss_type,
    per_sample_losses,
)
from reference import max_relative_error, per_sample_gradients, reference_clip  # noqa: E402

pytestmark = [
    pytest.mark.hf,
    pytest.mark.filterwarnings("ignore:noise_seed=:UserWarning"),  # seeded on purpose
    pytest.mark.filterwarnings("ignore:noise_multiplier=0:UserWarning"),  # noise 0 on purpose (exact checks)
]


class StepRecorder(transformers.TrainerCallback):
    """Trainable parameters and the accountant's ledger after every optimizer step."""

    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []
        self.ledgers: list[dict] = []
        self.trainer: PrivateTrainer | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params.append(trainable(model))
        self.ledgers.append(self.trainer.private.accountant.state_dict())


class SizeRecordingTrainer(PrivateTrainer):
    """Records the size of every Poisson batch handed to training_step."""

    batch_sizes: list[int]

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batch_sizes = [*getattr(self, "batch_sizes", []), inputs["input_ids"].shape[0]]
        return super().training_step(model, inputs, num_items_in_batch)


# ---------------------------------------------------------------------- the Trainer equals the plain loop
def plain_loop(model, data, *, steps, physical, seed, **privacy):
    """The README's groupclip loop, with the integration's per-sample loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(model, optimizer, steps=steps, **privacy, **seed_kwargs(seed))
    loader = private.poisson_loader(data, collate_fn=lm_collate, steps=round(len(data) / privacy["batch_size"]))
    while private.steps < steps:  # epochs of round(N / B) steps
        for batch in loader:
            for chunk in physical_batches(batch, physical):
                labels = chunk.pop("labels")
                losses = per_sample_losses(model(**chunk).logits, labels, "causal-lm")
                private.backward(losses.mean())
            optimizer.step()
            optimizer.zero_grad()
            if private.steps == steps:
                break
    return private


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_trainer_run_equals_the_plain_loop(tmp_path, dtype, tolerance):
    data = TokenData(12)
    privacy = dict(grouping="layer-wise", max_grad_norm=5.0, noise_multiplier=0.7, batch_size=6, data_size=len(data))
    reference = gpt2(dtype=dtype)
    model = copy.deepcopy(reference)
    loop = plain_loop(reference, data, steps=3, physical=3, seed=7, **privacy)

    trainer = PrivateTrainer(
        model=model,
        args=training_args(str(tmp_path), max_steps=3, per_device_train_batch_size=3),  # max_grad_norm: default
        train_dataset=data,
        data_collator=lm_collate,
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        privacy=PrivacyArguments(
            grouping="layer-wise",
            per_sample_max_grad_norm=5.0,  # the clipped sum's norm is well above the Trainer's max_grad_norm=1.0
            noise_multiplier=0.7,
            logical_batch_size=6,
            noise_seed=7,
        ),
    )
    trainer.train()

    assert trainer.private.steps == loop.steps == 3
    want = trainable(reference)
    assert max_relative_error(trainable(model), {n: w.double() for n, w in want.items()}) < tolerance
    assert any((trainable(model)[n] != gpt2(dtype=dtype).state_dict()[n]).any() for n in want)  # it trained
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 3 and all("epsilon" in entry and "grad_norm" not in entry for entry in steps)
    assert trainer.state.log_history[-1]["epsilon"] == pytest.approx(loop.epsilon(), rel=1e-12)


# ---------------------------------------------------------------------- PEFT LoRA against the float64 reference
def _lm_sample_loss(model, sample):
    """One sample's own loss, from its UNPADDED forward pass: the mean next-token cross-entropy."""
    ids, mask, _ = sample
    length = int(mask.sum())
    logits = model(input_ids=ids[:, :length]).logits
    return F.cross_entropy(logits[0, :-1], ids[0, 1:length]).reshape(1)


def _cls_sample_loss(model, sample):
    ids, mask, label = sample
    length = int(mask.sum())
    return F.cross_entropy(model(input_ids=ids[:, :length]).logits, label).reshape(1)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_peft_lora_step_equals_the_per_sample_reference(tmp_path, arch):
    peft = pytest.importorskip("peft")
    data = TokenData(5, seed=3)
    if arch == "gpt2":
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
        base, collate, sample_loss = gpt2(dtype=torch.float64), lm_collate, _lm_sample_loss
    else:
        config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
        base, collate, sample_loss = bert_classifier(dtype=torch.float64), cls_collate, _cls_sample_loss
    config.init_lora_weights = False  # B != 0, so every LoRA factor has a gradient
    torch.manual_seed(0)
    model = peft.get_peft_model(base, config).double()
    before = copy.deepcopy(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable < sum(p.numel() for p in model.parameters()) / 5

    trainer = PrivateTrainer(
        model=model,
        args=training_args(str(tmp_path), max_steps=1, per_device_train_batch_size=3),  # 5 = 3 + 2
        train_dataset=data,
        data_collator=collate,
        optimizers=(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0), None),
        privacy=PrivacyArguments(
            grouping="layer-wise", per_sample_max_grad_norm=0.05, noise_multiplier=0.0, logical_batch_size=5
        ),
    )
    trainer.train()  # q = 1: the one batch is the whole data set, in order

    engine = trainer.private.engine
    grouped = {name for names in engine.grouping.groups.values() for name in names}
    assert grouped == set(trainable(model))  # only the LoRA factors (and BERT's classifier copy) are grouped
    batch = collate([data[i] for i in range(len(data))])
    per_sample = per_sample_gradients(
        before, sample_loss, (batch["input_ids"], batch["attention_mask"], batch["labels"])
    )
    clipped, norms = reference_clip(per_sample, engine.grouping, engine.thresholds, engine.clip_fn)
    assert max(float(n.max() / engine.thresholds[g]) for g, n in norms.items()) > 1  # clipping is active
    update = {n: before_p - trainable(model)[n] for n, before_p in trainable(before).items()}
    assert max_relative_error(update, {n: c / len(data) for n, c in clipped.items()}) < 1e-6


# ---------------------------------------------------------------------- Poisson batches, an empty one included
def test_an_empty_poisson_batch_is_a_noisy_step_without_forward(tmp_path):
    data = TokenData(10)
    model = gpt2()
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    recorder = StepRecorder()
    trainer = SizeRecordingTrainer(
        model=model,
        args=training_args(str(tmp_path), max_steps=12, logging_steps=100, per_device_train_batch_size=4),
        train_dataset=data,
        data_collator=lm_collate,
        callbacks=[recorder],
        privacy=PrivacyArguments(noise_multiplier=1.0, logical_batch_size=1, noise_seed=0),  # q = 0.1
    )
    recorder.trainer = trainer
    start = trainable(model)
    trainer.train()

    sizes = trainer.batch_sizes
    assert 0 in sizes and max(sizes) > 0, sizes  # P(no empty batch in 12) < 1%: the seed fixes one that has
    assert len(forwards) == sum(-(-s // 4) for s in sizes)  # one forward per physical batch, none when empty
    assert trainer.state.global_step == trainer.private.steps == 12
    assert sum(entry.steps for entry in trainer.private.accountant.ledger) == 12
    previous = [start, *recorder.params[:-1]]
    for size, before, after in zip(sizes, previous, recorder.params, strict=True):
        assert any(not torch.equal(before[n], after[n]) for n in after), f"no update for a batch of {size}"


# ---------------------------------------------------------------------- checkpoints
def _resumable_trainer(out, model, recorder, **overrides):
    settings = dict(
        max_steps=6,
        save_strategy="steps",
        save_steps=1,
        logging_steps=100,
        per_device_train_batch_size=2,
        lr_scheduler_type="linear",
        learning_rate=0.05,
    )
    trainer = PrivateTrainer(
        model=model,
        args=training_args(out, **{**settings, **overrides}),
        train_dataset=TokenData(12),
        data_collator=lm_collate,
        callbacks=[recorder],
        # 12 / 4 = 3 steps per epoch; OS-seeded noise and sampler: the checkpoint alone must carry their states
        privacy=PrivacyArguments(noise_multiplier=1.0, logical_batch_size=4, grouping="layer-wise"),
    )
    recorder.trainer = trainer
    return trainer


def test_resume_from_a_checkpoint_gives_the_same_epsilon_and_identical_steps(tmp_path):
    out = str(tmp_path)
    first = StepRecorder()
    _resumable_trainer(out, gpt2(seed=0), first).train()  # AdamW and a linear schedule: the Trainer's own
    assert len(first.params) == 6
    for resumed_at in (2, 3):  # mid-epoch (2 of 3) and an epoch boundary (3)
        again = StepRecorder()
        trainer = _resumable_trainer(out, gpt2(seed=9), again)  # other weights: the checkpoint restores them
        trainer.train(resume_from_checkpoint=os.path.join(out, f"checkpoint-{resumed_at}"))
        assert len(again.params) == 6 - resumed_at
        for want, got in zip(first.params[resumed_at:], again.params, strict=True):
            assert all(torch.equal(want[n], got[n]) for n in want)
        assert again.ledgers == first.ledgers[resumed_at:]
        assert trainer.private.steps == 6
        assert trainer.private.epsilon() == first.trainer.private.epsilon()
        assert trainer.state.log_history[-1]["epsilon"] == first.trainer.state.log_history[-1]["epsilon"]


def test_resume_refuses_a_checkpoint_without_the_privacy_state(tmp_path):
    out = str(tmp_path)
    _resumable_trainer(out, gpt2(), StepRecorder(), max_steps=2).train()
    os.remove(os.path.join(out, "checkpoint-2", PRIVACY_STATE_NAME))
    trainer = _resumable_trainer(out, gpt2(), StepRecorder())
    with pytest.raises(TrainerSetupError, match="no groupclip privacy state"):
        trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))


# ---------------------------------------------------------------------- a model that is not a Hugging Face class
@dataclass
class Scores:
    logits: torch.Tensor


class MeanPooled(torch.nn.Module):
    """A head on the masked mean of an encoder's states; forward takes no labels and returns a dataclass."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = bert_classifier().bert
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, 3)

    def forward(self, input_ids, attention_mask):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return Scores(self.head((states * mask).sum(1) / mask.sum(1)))


def test_a_custom_model_trains_and_evaluates(tmp_path):
    model = MeanPooled()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head.") or name.endswith(".bias"))  # BitFit
    trainer = PrivateTrainer(
        model=model,
        args=training_args(str(tmp_path), max_steps=2, per_device_train_batch_size=2),
        train_dataset=TokenData(8),
        eval_dataset=TokenData(6, seed=2),
        data_collator=cls_collate,  # "labels" survive remove_unused_columns though forward() takes none
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
        privacy=PrivacyArguments(noise_multiplier=1.0, logical_batch_size=4, loss_type="sequence-classification"),
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert trainer.private.steps == 2 and "eval_accuracy" in metrics
    assert trainer.state.log_history[-1]["epsilon"] == trainer.private.epsilon()


# ---------------------------------------------------------------------- set-up errors and losses
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_grad_norm": 0.5}, r"per_sample_max_grad_norm=0\.5"),
        ({"gradient_accumulation_steps": 4}, r"logical_batch_size=12"),
    ],
)
def test_settings_that_break_dp_are_refused(tmp_path, overrides, message):
    with pytest.raises(TrainerSetupError, match=message):
        PrivateTrainer(
            model=gpt2(),
            args=training_args(str(tmp_path), **overrides),
            train_dataset=TokenData(4),
            data_collator=lm_collate,
            privacy=PrivacyArguments(noise_multiplier=1.0),
        )


def test_missing_privacy_arguments_and_unknown_models_are_refused(tmp_path):
    with pytest.raises(TrainerSetupError, match="privacy=PrivacyArguments"):
        PrivateTrainer(model=gpt2(), args=training_args(str(tmp_path)), train_dataset=TokenData(4))
    assert infer_loss_type(gpt2()) == "causal-lm"
    assert infer_loss_type(bert_classifier()) == "sequence-classification"
    with pytest.raises(TrainerSetupError, match="loss_type"):
        infer_loss_type(torch.nn.Linear(2, 2))


def test_per_sample_losses_ignore_padding_and_weigh_samples_equally():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 7, dtype=torch.float64), torch.randint(0, 7, (2, 5))
    labels = ids.clone()
    labels[1, 3:] = -100  # the second sample has 3 tokens, i.e. 2 next-token targets
    got = per_sample_losses(logits, labels, "causal-lm")
    assert torch.allclose(got[1], F.cross_entropy(logits[1, :2], ids[1, 1:3]))
    assert torch.allclose(got[0], F.cross_entropy(logits[0, :-1], ids[0, 1:]))
    scores = torch.randn(3, 1, dtype=torch.float64)
    targets = torch.randn(3, dtype=torch.float64)
    assert torch.allclose(per_sample_losses(scores, targets, "sequence-classification"), (scores[:, 0] - targets) ** 2)
