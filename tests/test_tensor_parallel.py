"""megatron-core tensor parallelism: TP = 2 against TP = 1 in real gloo processes (tests/tp_worker.py).

Two launches: 2 processes (TP = 2 parity, exports/imports, refused sizes, then TP = 1 x DP = 2) and 4 processes
(TP = 2 x DP = 2); the TP = 1 single-process reference runs here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flava_ds.model import FlavaConfig, FlavaForPreTraining
from flava_ds.model.config import validate_for_tensor_parallel
from flava_ds.model.hf_io import read_config, read_state_dict
from flava_ds.parallel.layers import column_parallel_linear, padded_vocab_size, vocab_parallel_linear
from flava_ds.parallel.sharding import merge, shard
from tests import tp_worker
from tests.launch import ROOT, run_worker

WORKER = ROOT / "tests" / "tp_worker.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp")
    source = tp_worker.build_model(seed=99)
    with torch.no_grad():  # weights far from init, so a misplaced slice shows
        for p in source.parameters():
            p.normal_(0, 0.1)
    source.save_hf_pretrained(out / "hf_in")
    run_worker(WORKER, 2, "parity", "--out", str(out), "--hf-in", str(out / "hf_in"), timeout=240)
    run_worker(WORKER, 4, "dp", "--tp", "2", "--out", str(out), timeout=240)
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    return tp_worker.parity_run()


def _assert_same_hf_dir(a: Path, b: Path) -> None:
    assert read_config(a) == read_config(b)
    sa, sb = read_state_dict(a), read_state_dict(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _assert_close_but_key_bias(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    """Weights after Adam steps; the key bias has an exactly-zero gradient that Adam turns into rounding noise."""
    if name.endswith("attn.qkv.bias"):
        got, expected = (torch.cat([t.chunk(3)[i] for i in (0, 2)]) for t in (got, expected))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=name)


# ---- single process ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("stride", "full_size", "padded"), [(3, 12, 12), (1, 10, 16), (1, 3, 8)])
def test_shard_merge_round_trip(stride, full_size, padded):
    full = torch.arange(full_size * 5, dtype=torch.float32).view(full_size, 5)
    parts = [shard(full, 0, stride, 2, rank, padded) for rank in range(2)]
    assert all(p.shape == (padded // 2, 5) for p in parts)
    assert torch.equal(merge(parts, 0, stride, full_size), full)


def test_fused_qkv_shard_holds_this_ranks_heads():
    """[q; k; v] rows (2 heads each of 2 dims): rank r gets [q_r; k_r; v_r]."""
    q, k, v = (torch.arange(4) + offset for offset in (0, 100, 200))
    full = torch.cat([q, k, v]).view(12, 1)
    for rank in range(2):
        expected = torch.cat([t[2 * rank : 2 * rank + 2] for t in (q, k, v)]).view(6, 1)
        assert torch.equal(shard(full, 0, 3, 2, rank, 12), expected)


def test_row_parallel_shard_splits_the_input_dimension():
    full = torch.arange(24.0).view(3, 8)
    assert torch.equal(shard(full, 1, 1, 2, 1, 8), full[:, 4:])


def test_vocab_padding_matches_megatron():
    assert padded_vocab_size(30522, 1) == 30592 and padded_vocab_size(30522, 2) == 30720
    assert padded_vocab_size(30522, 8) == 30720 and padded_vocab_size(512, 2) == 512


def test_no_parallel_state_builds_plain_layers():
    assert type(column_parallel_linear(4, 6)) is torch.nn.Linear
    assert type(vocab_parallel_linear(4, 7)) is torch.nn.Linear
    model = FlavaForPreTraining(FlavaConfig.preset("tiny"))
    assert model.full_state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize(
    ("overrides", "size", "message"),
    [
        ({"text": {"num_heads": 1}}, 2, r"text.num_heads=1 is not divisible by tensor_parallel_size=2"),
        ({"multimodal": {"mlp_size": 65}}, 2, r"multimodal.mlp_size=65 is not divisible by tensor_parallel_size=2"),
        ({"image": {"hidden_size": 36, "num_heads": 4}}, 8, r"image.hidden_size=36 is not divisible"),
    ],
)
def test_sizes_not_divisible_by_tp_are_refused(overrides, size, message):
    with pytest.raises(ValueError, match=message):
        validate_for_tensor_parallel(FlavaConfig.preset("tiny", **overrides), size)


# ---- real processes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", tp_worker.KINDS)
def test_tp2_losses_match_tp1_over_optimizer_steps(runs, reference, kind):
    tp2 = json.loads((runs / "parity.json").read_text())["losses"][kind]
    tp1 = reference["losses"][kind]
    assert len(tp2) == len(tp1) == tp_worker.STEPS + 1
    for step, (a, b) in enumerate(zip(tp1, tp2)):
        assert a.keys() == b.keys()
        for term in a:
            assert abs(a[term] - b[term]) < 1e-5, (step, term, a[term], b[term])
    assert tp1[-1]["loss"] < tp1[0]["loss"]  # it trains


def test_tp2_with_activation_checkpointing_matches_tp1(runs, reference):
    """Recomputation repeats the TP all-reduces in backward; the losses stay those of TP = 1 without it."""
    got = json.loads((runs / "parity.json").read_text())["checkpointed"]
    for a, b in zip(reference["losses"]["image_text"], got, strict=False):
        for term in a:
            assert abs(a[term] - b[term]) < 1e-5, (term, a[term], b[term])
    assert len(got) == 3


@pytest.mark.parametrize("kind", tp_worker.KINDS)
def test_tp2_weights_after_steps_match_tp1(runs, reference, kind):
    tp2 = torch.load(runs / "parity.pt")["final"][kind]
    for name, expected in reference["final"][kind].items():
        _assert_close_but_key_bias(name, tp2[name], expected)


def test_tp2_text_logits_cover_the_real_vocabulary(runs):
    got = torch.load(runs / "parity.pt")["mlm_logits"]
    expected = tp_worker.text_logits()
    assert got.shape == expected.shape and got.shape[-1] == tp_worker.tiny_config().text.vocab_size
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)


def test_tp2_model_exports_the_tp1_transformers_dir(runs, tmp_path):
    tp_worker.build_model().save_hf_pretrained(tmp_path / "tp1")
    _assert_same_hf_dir(runs / "hf_seeded", tmp_path / "tp1")


def test_transformers_dir_round_trips_through_tp2(runs):
    _assert_same_hf_dir(runs / "hf_back", runs / "hf_in")  # hf -> TP = 2 -> hf
    _assert_same_hf_dir(runs / "hf_native_back", runs / "hf_in")  # ... -> our format -> TP = 2 -> hf
    native = FlavaForPreTraining.from_pretrained(runs / "native")  # the TP = 2 export loads at TP = 1
    source = FlavaForPreTraining.from_hf_pretrained(runs / "hf_in")
    for name, value in source.state_dict().items():
        assert torch.equal(native.state_dict()[name], value), name


def test_tp_sizes_that_do_not_fit_are_refused_in_processes(runs):
    refused = json.loads((runs / "parity.json").read_text())["refused"]
    assert refused["world"] == "tensor_parallel_size=3 must be a positive divisor of the world size 2"
    assert refused["heads"] == "text.num_heads=1 is not divisible by tensor_parallel_size=2"
    assert refused["mlp"] == "multimodal.mlp_size=33 is not divisible by tensor_parallel_size=2"


def test_large_preset_builds_under_tp2(runs):
    result = json.loads((runs / "parity.json").read_text())
    with torch.device("meta"):
        full = FlavaForPreTraining(FlavaConfig.preset("large"))
    assert result["large_shapes"] == {k: list(v.shape) for k, v in full.state_dict().items()}
    total = sum(p.numel() for p in full.parameters())
    assert 0.5 * total < result["large_local"] < 0.7 * total  # encoder projections and text decoders split


@pytest.mark.parametrize("engine", ["plain", "deepspeed"])
def test_tp2_dp2_matches_tp1_dp2_on_one_global_batch(runs, engine):
    tp1 = json.loads((runs / "dp_tp1.json").read_text())
    tp2 = json.loads((runs / "dp_tp2.json").read_text())
    assert tp1["tp_size"] == 1 and [r["dp"] for r in tp1["ranks"]] == [0, 1]
    assert tp2["tp_size"] == 2 and [(r["tp"], r["dp"]) for r in tp2["ranks"]] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    for row in tp2["ranks"]:
        expected = tp1["ranks"][row["dp"]][engine]
        for a, b in zip(expected, row[engine]):
            assert a.keys() == b.keys() and "global_contrastive" in a
            for term in a:
                assert abs(a[term] - b[term]) < 1e-5, (row["tp"], row["dp"], term, a[term], b[term])
    first = [r[engine][0]["global_contrastive"] for r in tp1["ranks"]]
    assert first[0] != first[1]  # each DP rank scores its own rows against the gathered global batch


def test_deepspeed_fp32_export_under_tp2_matches_tp1(runs):
    """ZeRO-1's fp32 master weights of each TP rank, gathered into full tensors, equal those of TP = 1."""
    tp1, tp2 = torch.load(runs / "dp_tp1_final.pt"), torch.load(runs / "dp_tp2_final.pt")
    assert tp1.keys() == tp2.keys()
    for name, expected in tp1.items():
        assert tp2[name].dtype == torch.float32
        _assert_close_but_key_bias(name, tp2[name], expected)


def test_deepspeed_zero_partitions_over_the_data_parallel_group(runs):
    """With the mpu, 4 processes at TP = 2 are 2 data-parallel replicas: ZeRO splits optimizer state 2 ways."""
    tp2 = json.loads((runs / "dp_tp2.json").read_text())
    assert all(r["deepspeed_layout"] == [2, 2, 2] for r in tp2["ranks"])  # dp world, mp world, ZeRO partitions
    tp1 = json.loads((runs / "dp_tp1.json").read_text())
    assert all(r["deepspeed_layout"] == [2, 1, 2] for r in tp1["ranks"])
