"""Sharded DP training: FSDP2 (fully_shard) + groupclip's group-wise clipping, each rank clipping its own samples.

    torchrun --nproc-per-node 2 examples/fsdp2_sharded.py            # gloo on CPU; NCCL when CUDA is available

Every rank builds the same model (same seed), shards it with fully_shard (each rank keeps its dim-0 rows of every
parameter), builds the optimizer on the sharded parameters and calls make_private_sharded with the same settings
(checked). In each backward pass the per-sample norms come from the full activations and output gradients each rank
has for its own samples; the clipped sums are reduce-scattered into the sharded gradients; at optimizer.step()
each rank adds noise to the rows it owns, so every coordinate gets it once. The Poisson loader gives each rank its
share of ONE global Poisson sample, so the epsilon (the same on every rank) is that of Poisson-subsampled DP-SGD.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import TensorDataset

from groupclip.distributed.sharded import make_private_sharded


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,))
    torch.manual_seed(0)  # the same data and initial model on every rank
    # a toy problem: 4,096 points, 3 classes separable by a random linear map
    x = torch.randn(4096, 20)
    y = (x @ torch.randn(20, 3)).argmax(1)
    data = TensorDataset(x, y)
    model = nn.Sequential(
        nn.Linear(20, 64), nn.Tanh(), nn.LayerNorm(64), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3)
    ).to(device)
    fully_shard(model[0], mesh=mesh)  # units: the first two Linear layers; the root keeps the rest
    fully_shard(model[3], mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # on the sharded parameters
    private = make_private_sharded(
        model,
        optimizer,
        grouping="layer-wise",  # norms over each FULL layer, not over a rank's shard
        max_grad_norm=1.0,
        loss_reduction="sum",  # a rank's Poisson share can be empty: a summed loss stays finite
        target_epsilon=3.0,
        target_delta=1e-5,
        epochs=3,
        batch_size=256,  # the GLOBAL expected batch size; data_size is the whole data set
        data_size=len(data),
        seed=0,  # the same on every rank (the Poisson mask is shared; noise streams are derived per rank)
    )
    if rank == 0:
        print(private.engine.describe().splitlines()[0], f"| sigma {private.noise_multiplier:.3f}")
    try:
        for epoch in range(3):
            for xb, yb in private.poisson_loader(data):  # this rank's share; every rank runs every step
                xb, yb = xb.to(device), yb.to(device)
                private.backward(nn.functional.cross_entropy(model(xb), yb, reduction="sum"))
                optimizer.step()  # noise on this rank's rows only, then divide by the expected batch
                optimizer.zero_grad()
            with torch.no_grad():  # every rank runs the forward (FSDP2 all-gathers the units)
                accuracy = (model(x.to(device)).argmax(1) == y.to(device)).float().mean()
            metrics = private.metrics()
            if rank == 0:
                print(
                    f"epoch {epoch + 1}: loss {metrics['loss']:.4f}, accuracy {accuracy:.3f}, "
                    f"global batch {metrics['samples']}, epsilon {metrics['epsilon']:.2f}"
                )
    finally:
        private.detach()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
