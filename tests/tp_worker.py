"""Tensor-parallel worker for tests/test_tensor_parallel.py: real processes on gloo, results written to --out.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/tp_worker.py parity --out DIR --hf-in HF
    python -m torch.distributed.run --standalone --nproc_per_node 4 tests/tp_worker.py dp --tp 2 --out DIR

`parity` (2 processes): TP = 2 losses over optimizer steps for each batch kind, exports and imports, refused
configurations; then TP = 1 x DP = 2 on the same processes. `dp`: TP = T x DP = world / T on one global batch.
Data-parallel runs train with torch AdamW (`PlainEngine`) and with a DeepSpeed ZeRO-1 engine given the mpu.
The functions below also run single-process (no torch.distributed) to give the TP = 1 reference.

Training goes through an engine with DeepSpeed's call convention (`engine(**batch)`, `engine.backward(loss)`,
`engine.step()`), so a DeepSpeed engine can replace `PlainEngine`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flava_ds.model import FlavaConfig, FlavaForPreTraining
from flava_ds.parallel import state
from flava_ds.parallel.layers import gather_vocab_logits
from flava_ds.parallel.sharding import full_state_template
from tests.model_inputs import make_batches

SEED = 11
STEPS = 5
KINDS = ("image_text", "image", "text")


def tiny_config(**overrides) -> FlavaConfig:
    """`tiny` with a text vocabulary that TP = 2 must pad (500 -> 512): rank 1 holds 12 padded classes."""
    return FlavaConfig.preset("tiny", text={"vocab_size": 500}, **overrides)


def build_model(seed: int = SEED, **overrides) -> FlavaForPreTraining:
    state.set_seed(seed)
    return FlavaForPreTraining(tiny_config(**overrides))


class PlainEngine:
    """torch AdamW on every rank, gradients averaged over the data-parallel group (DeepSpeed's role later)."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3):
        self.module = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        dp = state.data_parallel_size()
        if dp > 1:
            for p in self.module.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=state.data_parallel_group())
                    p.grad /= dp

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def train(engine: PlainEngine, batch: dict, steps: int = STEPS) -> list[dict[str, float]]:
    """Losses (total and each term) before each of `steps` optimizer steps, plus after the last."""
    history = []
    for step in range(steps + 1):
        out = engine(**batch)
        history.append({"loss": out.loss.item(), **{k: v.item() for k, v in out.losses.items()}})
        if step < steps:
            engine.backward(out.loss)
            engine.step()
    return history


def parity_run(make_engine: Callable[[torch.nn.Module], PlainEngine] = PlainEngine) -> dict:
    """Per batch kind: fresh seeded model, STEPS optimizer steps; final weights as full (TP = 1) tensors."""
    batches = make_batches(tiny_config(), batch=4, seq_len=9, seed=3)
    losses, final = {}, {}
    for kind in KINDS:
        engine = make_engine(build_model())
        losses[kind] = train(engine, batches[kind])
        final[kind] = engine.module.full_state_dict()
    return {"losses": losses, "final": final}


def text_logits() -> torch.Tensor:
    """Full-vocabulary MLM logits of the seeded model (gathered over TP ranks, padding dropped)."""
    model = build_model()
    out = model(**make_batches(tiny_config(), batch=4, seq_len=9, seed=3)["text"])
    return gather_vocab_logits(out.logits["mlm"], model.config.text.vocab_size)


def deepspeed_engine(model: torch.nn.Module, micro_batch: int):
    """DeepSpeed ZeRO-1 (fp32) over the data-parallel group, told about tensor parallelism through the mpu."""
    import deepspeed

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=state.DeepSpeedMPU())
    return engine


def dp_run(global_batch: int = 4, steps: int = 3) -> dict:
    """This data-parallel rank's slice of one global image-text batch, trained `steps` steps with torch AdamW and
    with DeepSpeed ZeRO-1; the DeepSpeed engine reports how it sees the parallel layout."""
    dp, rank = state.data_parallel_size(), state.data_parallel_rank()
    full = make_batches(tiny_config(), batch=global_batch, seq_len=9, seed=5)["image_text"]
    local = global_batch // dp
    batch = {k: v[rank * local : (rank + 1) * local] for k, v in full.items()}
    plain = train(PlainEngine(build_model()), batch, steps)
    ds = deepspeed_engine(build_model(), local)
    ds_losses = train(ds, batch, steps)
    from deepspeed.utils import safe_get_full_fp32_param

    master = {n: safe_get_full_fp32_param(p) for n, p in ds.module.named_parameters() if p.requires_grad}
    return {
        "plain": plain,
        "deepspeed": ds_losses,
        "deepspeed_layout": [ds.dp_world_size, ds.mp_world_size, *ds.optimizer.partition_count],
        "deepspeed_final": ds.module.full_state_dict(master),
    }


def _error(fn: Callable[[], object]) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return ""


def _write_json(path: Path, value: object) -> None:
    if dist.get_rank() == 0:
        path.write_text(json.dumps(value, indent=1))


def parity(out: Path, hf_in: Path) -> None:
    refused = {"world": _error(lambda: state.initialize_parallel(3))}
    state.initialize_parallel(2)
    results = parity_run()
    image_text = make_batches(tiny_config(), batch=4, seq_len=9, seed=3)["image_text"]
    recomputed = train(PlainEngine(build_model(activation_checkpointing=True)), image_text, steps=2)
    hf_model = FlavaForPreTraining.from_hf_pretrained(hf_in)  # split on load
    hf_model.save_hf_pretrained(out / "hf_back")  # gathered on save
    hf_model.save_pretrained(out / "native")
    dist.barrier()  # rank 0 wrote it; every rank reads it
    FlavaForPreTraining.from_pretrained(out / "native").save_hf_pretrained(out / "hf_native_back")
    build_model().save_hf_pretrained(out / "hf_seeded")
    logits = text_logits()
    refused["heads"] = _error(lambda: FlavaForPreTraining(FlavaConfig.preset("tiny", text={"num_heads": 1})))
    refused["mlp"] = _error(lambda: FlavaForPreTraining(FlavaConfig.preset("tiny", multimodal={"mlp_size": 33})))
    with torch.device("meta"):
        large = FlavaForPreTraining(FlavaConfig.preset("large"))
    large_shapes = {k: list(v.shape) for k, v in full_state_template(large).items()}
    local_params = sum(p.numel() for p in large.parameters())
    if dist.get_rank() == 0:
        torch.save({"final": results["final"], "mlm_logits": logits}, out / "parity.pt")
    _write_json(
        out / "parity.json",
        {
            "losses": results["losses"],
            "checkpointed": recomputed,
            "refused": refused,
            "large_shapes": large_shapes,
            "large_local": local_params,
        },
    )
    state.destroy_parallel()
    state.initialize_parallel(1)  # the same two processes as TP = 1 x DP = 2
    _write_dp(out, dp_run())


def _write_dp(out: Path, results: dict) -> None:
    """Every rank's losses in global rank order, with its TP and DP rank; rank 0's fp32 export of the final weights."""
    final = results.pop("deepspeed_final")
    rows = [None] * dist.get_world_size()
    record = {"tp": state.tensor_parallel_rank(), "dp": state.data_parallel_rank(), **results}
    dist.all_gather_object(rows, record)
    tp = state.tensor_parallel_size()
    _write_json(out / f"dp_tp{tp}.json", {"tp_size": tp, "ranks": rows})
    if dist.get_rank() == 0:
        torch.save(final, out / f"dp_tp{tp}_final.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=("parity", "dp"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hf-in", type=Path)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    try:
        if args.task == "parity":
            parity(args.out, args.hf_in)
        else:
            state.initialize_parallel(args.tp)
            _write_dp(args.out, dp_run())
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
