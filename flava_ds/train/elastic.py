"""Resume on another cluster shape: a checkpoint written at data-parallel size W resumes at W' with the same
global batch (micro x ranks x accumulation), continuing with exactly the global batches and updates the
uninterrupted run would have had.

What moves and how:
- the data position: every stream's sampler cuts a step's global batch from the same stream positions at any
  shape (`flava_ds.data.sampler.ResumableDistributedSampler`), so only the global batch must match;
- the losses: normalised over the global batch (`flava_ds.train.trainer`), so they do not depend on the cut;
- weights and optimizer state: ZeRO-0 keeps them whole in the model states file, which any W loads. ZeRO-1/2/3
  partition them over the W ranks; the checkpoint is then converted once into DeepSpeed's universal checkpoint
  (`ds_to_universal`: one fp32 tensor per parameter with its Adam moments, in `global_stepN_universal/`), which
  DeepSpeed re-partitions over the W' ranks on load (`checkpoint.load_universal`).

Each checkpoint records its shape in `topology.json`; a resume whose shape cannot hold the checkpoint's global
batch, or that changes the tensor-parallel size, is refused with one line before anything is built.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

TOPOLOGY = "topology.json"
UNIVERSAL_SUFFIX = "_universal"


@dataclass(frozen=True)
class Topology:
    """The cluster shape a checkpoint was written with (or a run has)."""

    data_parallel_size: int
    tensor_parallel_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    zero_stage: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.data_parallel_size * self.gradient_accumulation_steps

    def describe(self) -> str:
        return (
            f"{self.data_parallel_size} data-parallel rank(s) x micro {self.micro_batch_size} x accumulation "
            f"{self.gradient_accumulation_steps} = global batch {self.global_batch_size}"
        )


def write_topology(checkpoint: Path, topology: Topology) -> None:
    (checkpoint / TOPOLOGY).write_text(json.dumps(asdict(topology), indent=2))


def read_topology(checkpoint: Path) -> Topology | None:
    """The shape recorded in a checkpoint directory; None for checkpoints written before it was recorded."""
    path = checkpoint / TOPOLOGY
    return Topology(**json.loads(path.read_text())) if path.is_file() else None


def needs_universal(checkpoint: Path, run: Topology) -> bool:
    """Whether resuming `checkpoint` at shape `run` needs the universal checkpoint. Raises ValueError with one
    line for a shape that cannot continue the checkpoint's run."""
    saved = read_topology(checkpoint)
    if saved is None:
        return False  # an older checkpoint: DeepSpeed and the data position check what they can
    if saved.global_batch_size != run.global_batch_size:
        raise ValueError(
            f"{checkpoint} was trained with {saved.describe()}, this run has {run.describe()}: the same global "
            f"batch is needed to continue it; set train_batch_size {saved.global_batch_size} (or micro x "
            "accumulation to match) in the DeepSpeed config"
        )
    if saved.tensor_parallel_size != run.tensor_parallel_size:
        raise ValueError(
            f"{checkpoint} was trained at tensor-parallel size {saved.tensor_parallel_size}, this run has "
            f"{run.tensor_parallel_size}: resume at TP={saved.tensor_parallel_size}, or export it "
            "(tools/convert_checkpoint.py from-deepspeed) and start from the weights with model.init"
        )
    if saved.zero_stage != run.zero_stage:
        raise ValueError(
            f"{checkpoint} was written at ZeRO stage {saved.zero_stage}, this run uses stage {run.zero_stage}: "
            "resume at the same stage (set zero_optimization.stage in the DeepSpeed config)"
        )
    return saved.zero_stage > 0 and saved.data_parallel_size != run.data_parallel_size


def universal_tag(tag: str) -> str:
    return tag + UNIVERSAL_SUFFIX


def make_universal(load_dir: str | Path, tag: str) -> str:
    """Convert `load_dir/tag` into `load_dir/tag_universal` once (global rank 0; the others wait) and return the
    universal tag. Written under a temporary name and renamed, so a killed conversion is redone, never half-read."""
    load_dir = Path(load_dir)
    target = load_dir / universal_tag(tag)
    if dist.get_rank() == 0 and not target.is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        scratch = load_dir / f".{target.name}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        workers = max(1, min(4, os.cpu_count() or 1))
        ds_to_universal(
            argparse.Namespace(
                input_folder=str(load_dir / tag),
                output_folder=str(scratch),
                num_extract_workers=workers,
                num_merge_workers=max(1, workers // 2),
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=False,
            )
        )
        (load_dir / "latest_universal").unlink(missing_ok=True)  # it names the scratch folder; we pass tags
        for sidecar in (load_dir / tag).glob("*.json"):  # the model config and topology, read without unpickling
            shutil.copy2(sidecar, scratch / sidecar.name)
        os.replace(scratch, target)
    dist.barrier()
    return target.name


@contextmanager
def universal_load_repairs(engine) -> Iterator[None]:
    """Around `engine.load_checkpoint` of a ZeRO-3 universal checkpoint: DeepSpeed 0.19.8's loader
    (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`) copies the first parameter group's hyperparameters
    into every group (weight decay on the no-decay group: biases, norms) and gives every group's optimizer state
    the same `step` tensor, which fused AdamW then advances once per group per update (the second group's bias
    correction runs a step ahead). Each group keeps its own weight decay and its own step counter. Elsewhere a
    no-op; tests/test_split_invariance.py catches either (no-decay weights 1e-5 off after one update)."""
    repair = engine.load_universal_checkpoint() and engine.zero_optimization_stage() == 3
    optimizer = engine.optimizer.optimizer if repair else None
    decays = [group["weight_decay"] for group in optimizer.param_groups] if repair else []
    yield
    if repair:
        for group, decay in zip(optimizer.param_groups, decays):
            group["weight_decay"] = decay
        for state in optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()
