"""torchrun worker (1 rank): DeepSpeed ZeRO-0 fp32 engines trained on mixed batch kinds, with DeepSpeed's gradient
all-reduce and without it (`skip_single_rank_allreduce` + `fill_unreduced_gradients`, as `build_engine` and
`backward_and_step` run a single rank). Saves both final state dicts to OUT/result.pt. Usage: single_rank_worker.py OUT
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import deepspeed
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flava_ds.model import FlavaConfig, FlavaForPreTraining
from flava_ds.train.config import OptimizerSection
from flava_ds.train.engine import backward_and_step, build_engine
from tests.model_inputs import make_batches

KINDS = ["image_text", "text", "image", "text", "image_text", "image"]


def build(model: FlavaForPreTraining, accum: int, direct: bool):
    """The trainer's engine; `direct=False` puts DeepSpeed's own gradient all-reduce back (the reference)."""
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**6,
    }
    engine = build_engine(model, config, OptimizerSection(lr=1e-3))
    skipped = not engine.enable_backward_allreduce
    if not direct:
        engine.enable_backward_allreduce = True
    return engine, skipped


def train(engine, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    for batch in batches:  # the trainer's micro-step
        backward_and_step(engine, engine(**batch).loss)
    return {k: v.clone() for k, v in engine.module.state_dict().items()}


def main() -> None:
    out_dir = Path(sys.argv[1])
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = FlavaForPreTraining(FlavaConfig.preset("tiny"))
    batches = [make_batches(model.config, seed=i)[kind] for i, kind in enumerate(KINDS)]
    result: dict[int, dict] = {}
    for accum in (1, 2):
        reduced, _ = build(copy.deepcopy(model), accum, direct=False)
        direct, skipped = build(copy.deepcopy(model), accum, direct=True)
        result[accum] = {"skipped": skipped, "reduced": train(reduced, batches), "direct": train(direct, batches)}
    torch.save(result, out_dir / "result.pt")


if __name__ == "__main__":
    main()
