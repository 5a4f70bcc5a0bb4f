"""Data-parallel DP training with groupclip on torch.distributed: each rank clips its own samples.

    torchrun --nproc-per-node 2 examples/data_parallel.py            # gloo on CPU; NCCL when CUDA is available

Every rank builds the same model, optimizer and settings; make_private(distributed=True) checks that the ranks
agree, broadcasts rank 0's parameters, and at each optimizer.step() all-reduces the clipped sums with the noise
added once. The Poisson loader gives each rank its share of ONE global Poisson sample, so the epsilon (the same on
every rank) is that of ordinary Poisson-subsampled DP-SGD over the whole data set.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from groupclip import make_private


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    # a toy problem: 4,096 points, 3 classes separable by a random linear map
    x = torch.randn(4096, 20)
    y = (x @ torch.randn(20, 3)).argmax(1)
    data = TensorDataset(x, y)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 3)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    private = make_private(
        model,
        optimizer,
        grouping="layer-wise",
        max_grad_norm=1.0,
        loss_reduction="sum",
        target_epsilon=3.0,
        target_delta=1e-5,
        epochs=3,
        batch_size=256,  # the GLOBAL expected batch size; data_size is the whole data set
        data_size=len(data),
        seed=0,  # the same on every rank (the Poisson mask is shared)
        distributed=True,
    )
    try:
        for epoch in range(3):
            for xb, yb in private.poisson_loader(data):  # this rank's share of the global Poisson batch
                xb, yb = xb.to(device), yb.to(device)
                nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()
                optimizer.step()  # all-reduce of clipped sums + noise once + divide by the expected batch
                optimizer.zero_grad()
            if rank == 0:
                accuracy = (model(x.to(device)).argmax(1) == y.to(device)).float().mean()
                metrics = private.metrics()
                print(
                    f"epoch {epoch + 1}: accuracy {accuracy:.3f}, global batch {metrics['samples']}, "
                    f"epsilon {metrics['epsilon']:.2f}"
                )
    finally:
        private.detach()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
