"""DP training of an MLP split into 2 pipeline stages, with per-device clipping (one group per stage).

    torchrun --nproc-per-node 2 examples/pipeline_per_device.py                  # gloo on CPU
    torchrun --nproc-per-node 2 examples/pipeline_per_device.py --grouping all-layer --schedule 1f1b

Rank 0 runs stage 0 (the first layers, fed the inputs), rank 1 stage 1 (the last layers and the loss). Every stage
draws the same Poisson batches (shared seed), pads them to whole chunks of a fixed size (torch's pipeline buffers
have fixed shapes; padded rows have target -100 and so zero gradient), and runs one schedule step per chunk; then
``optimizer.step()`` adds noise of std ``sigma * S`` (S the global sensitivity) to its own parameters.
"""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe
from torch.utils.data import TensorDataset

from groupclip.distributed.pipeline import fixed_size_chunks, make_private_pipeline

STAGES = (("0", "1", "2", "3"), ("4", "5"))  # children of the full model on each stage (names kept)


def full_model() -> nn.Sequential:
    torch.manual_seed(0)  # the same initial weights on every rank
    layers = [nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Linear(64, 4)]
    return nn.Sequential(OrderedDict((str(i), m) for i, m in enumerate(layers)))


def dataset(size: int = 4096) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(size, 20, generator=gen)
    teacher = torch.randn(20, 4, generator=gen)
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grouping", default="per-device", choices=["per-device", "all-layer", "layer-wise"])
    parser.add_argument("--schedule", default="gpipe", choices=["gpipe", "1f1b"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--chunk", type=int, default=128, help="physical rows per schedule step")
    parser.add_argument("--microbatches", type=int, default=4)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        raise SystemExit("Run with torchrun --nproc-per-node 2.")
    full = full_model()
    stage = nn.Sequential(OrderedDict((k, full._modules[k]) for k in STAGES[rank]))
    data = dataset()
    optimizer = torch.optim.SGD(stage.parameters(), lr=0.5, momentum=0.9)
    private = make_private_pipeline(
        stage,
        optimizer,
        stage_index=rank,
        num_stages=world,
        grouping=args.grouping,
        max_grad_norm=1.0,
        target_epsilon=3.0,
        target_delta=1e-5,
        steps=args.steps,
        batch_size=128,
        data_size=len(data),
        seed=0,
    )
    try:
        schedule_class = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[args.schedule]

        def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(output, target, ignore_index=-100, reduction="sum")

        schedule = private.schedule(schedule_class, n_microbatches=args.microbatches, loss_fn=loss_fn)
        if rank == 0:
            print(
                f"grouping {args.grouping}, {args.schedule}: sigma = {private.noise_multiplier:.3f}, "
                f"global sensitivity S = {private.sensitivity:.3f}, thresholds per stage {private.stage_thresholds}"
            )
        loader = iter(private.poisson_loader(data))
        for step in range(1, args.steps + 1):
            x, y = next(loader)
            loss_sum = torch.zeros(1)
            chunks = zip(fixed_size_chunks(x, args.chunk), fixed_size_chunks(y, args.chunk, fill=-100), strict=True)
            for xs, ys in chunks:
                if rank == 0:
                    schedule.step(xs)
                else:
                    losses: list[torch.Tensor] = []
                    schedule.step(target=ys, losses=losses)
                    loss_sum += sum(float(v.detach()) for v in losses)
            optimizer.step()
            optimizer.zero_grad()
            dist.broadcast(loss_sum, src=world - 1)  # the loss lives on the last stage; rank 0 prints
            if rank == 0 and (step % 5 == 0 or step == 1):
                print(
                    f"step {step:3d}  batch {len(y):4d}  loss {float(loss_sum) / max(len(y), 1):.4f}  "
                    f"epsilon {private.epsilon():.3f}"
                )
    finally:
        private.detach()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
