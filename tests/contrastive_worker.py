"""torchrun worker: the global contrastive loss over W ranks (gloo). Saves the loss and the rank-averaged
gradients (what data-parallel training applies) to OUT/rank{r}.pt. Usage: contrastive_worker.py OUT local|global
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flava_ds.model import FlavaForPreTraining
from tests.contrastive_reference import GLOBAL_BATCH, contrastive_model, global_batch


def main() -> None:
    out_dir, variant = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model: FlavaForPreTraining = contrastive_model(global_backprop=variant == "global")
    local = GLOBAL_BATCH // world
    batch = {k: v[rank * local : (rank + 1) * local] for k, v in global_batch(model.config).items()}
    loss = model(**batch).loss
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            grads[name] = p.grad / world
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.save({"loss": total / world, "grads": grads}, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
