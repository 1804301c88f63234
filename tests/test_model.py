"""Model behaviour: parameter count, start-of-training loss values, input validation, attention choices."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from flava_ds.model import FlavaConfig, FlavaForPreTraining
from flava_ds.model.transformer import Encoder, gather_positions, positions_first
from tests.model_inputs import make_batches


def test_full_parameter_count_equals_transformers_minus_codebook():
    with torch.device("meta"):
        ours = FlavaForPreTraining(FlavaConfig.preset("full"))
        theirs = transformers.FlavaForPreTraining(transformers.FlavaConfig())
    count = lambda m: sum(p.numel() for p in m.parameters())
    codebook = count(theirs.image_codebook)
    assert count(ours) == count(theirs) - codebook
    assert abs(codebook - 53.8e6) < 0.1e6
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert 300e6 < trainable < 310e6  # docs/DESIGN.md §3: about 304M trained; the unused poolers are frozen
    assert trainable == count(ours) - 3 * (768 * 768 + 768)


def test_start_of_training_losses_match_spec():
    """Start-of-training sanity: MLM/MMM-text ~ ln(vocab), MIM/MMM-image ~ ln 8192, contrastive ~ ln(batch), ITM < 0.8.

    N(0, 0.02) decoders over a unit-variance LayerNorm output give logits of std ~0.55, which adds
    about var/2 = 0.15 nats to ln(classes); the bands allow for that.
    """
    torch.manual_seed(0)
    shallow = {"num_layers": 2}
    cfg = FlavaConfig.preset("full", image=shallow, text=shallow, multimodal=shallow)
    model = FlavaForPreTraining(cfg)
    batch_size = 8
    batches = make_batches(cfg, batch=batch_size, seq_len=16)
    with torch.no_grad():
        image_text = model(**batches["image_text"]).losses
        mim = model(**batches["image"]).losses["mim"]
        mlm = model(**batches["text"]).losses["mlm"]
    ln_vocab, ln_codebook = math.log(30522), math.log(8192)
    for value, ln_classes in (
        (mlm, ln_vocab),
        (image_text["mmm_text"], ln_vocab),
        (mim, ln_codebook),
        (image_text["mmm_image"], ln_codebook),
    ):
        assert 0 <= value - ln_classes < 0.3
    assert abs(image_text["global_contrastive"] - math.log(batch_size)) < 0.1
    assert image_text["itm"] < 0.8


@pytest.mark.parametrize("kind", ["image_text", "image", "text"])
def test_sdpa_equals_eager(kind):
    torch.manual_seed(1)
    eager = FlavaForPreTraining(FlavaConfig.preset("tiny", attn_impl="eager"))
    sdpa = FlavaForPreTraining(FlavaConfig.preset("tiny", attn_impl="sdpa"))
    sdpa.load_state_dict(eager.state_dict())
    batch = make_batches(eager.config, seed=4)[kind]
    a, b = eager(**batch), sdpa(**batch)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for (name, pa), pb in zip(eager.named_parameters(), sdpa.parameters()):
        if pa.grad is not None:  # zero-initialised CLS/position rows give huge (1e4) gradients: compare relative
            scale = max(1.0, pa.grad.abs().max().item())
            torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_only_needed_parts_run():
    """Image-only batches never touch text or fusion; a contrastive-only model never runs fusion."""
    torch.manual_seed(2)
    model = FlavaForPreTraining(FlavaConfig.preset("tiny"))
    calls: dict[str, int] = {}
    for name in ("image_encoder", "text_encoder", "multimodal_encoder"):
        getattr(model, name).register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
    batches = make_batches(model.config)
    model(**batches["image"])
    assert calls == {"image_encoder": 1}
    calls.clear()
    model(**batches["text"])
    assert calls == {"text_encoder": 1}
    calls.clear()
    model(**batches["image_text"])
    assert calls == {"image_encoder": 2, "text_encoder": 2, "multimodal_encoder": 1}
    calls.clear()
    contrastive_only = FlavaForPreTraining(
        FlavaConfig.preset("tiny", itm_weight=0.0, mmm_image_weight=0.0, mmm_text_weight=0.0)
    )
    for name in ("image_encoder", "text_encoder", "multimodal_encoder"):
        getattr(contrastive_only, name).register_forward_hook(
            lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1)
        )
    out = contrastive_only(**batches["image_text"])
    assert calls == {"image_encoder": 1, "text_encoder": 1} and set(out.losses) == {"global_contrastive"}


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_last_block_on_selected_positions_equals_full(attn_impl):
    """query_index: the last block's outputs (and every gradient) at those positions equal the full pass's.
    Padded positions are not computed in the full pass (zeros there); a loss never reads them."""
    torch.manual_seed(6)
    cfg = FlavaConfig.preset("tiny", attn_impl=attn_impl).text
    encoder = Encoder(cfg, attn_impl, activation_checkpointing=False)
    x = torch.randn(3, 9, cfg.hidden_size, requires_grad=True)
    padding = torch.ones(3, 9, dtype=torch.bool)
    padding[1, 6:] = False
    wanted = torch.rand(3, 9) < 0.4
    wanted[2] = False  # a row with nothing wanted: only filler positions
    index = positions_first(wanted)
    assert index.shape == (3, max(int(wanted.sum(1).max()), 1))
    for row in range(3):
        n = int(wanted[row].sum())
        assert index[row, :n].tolist() == wanted[row].nonzero().flatten().tolist()
    real = padding.gather(1, index)[..., None]  # filler positions may be padding
    full = gather_positions(encoder(x, padding), index) * real
    selected = encoder(x, padding, index) * real
    torch.testing.assert_close(selected, full, atol=1e-6, rtol=1e-5)
    weight = torch.randn_like(full)
    grads_full = torch.autograd.grad((full * weight).sum(), [x, *encoder.parameters()])
    grads_sel = torch.autograd.grad((selected * weight).sum(), [x, *encoder.parameters()])
    for a, b in zip(grads_full, grads_sel):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_blocks_compute_only_what_losses_read():
    """Padding is never computed; the last blocks of the contrastive views end on CLS, fusion's on CLS + matched
    rows' masked positions (+ filler up to the longest row), MIM/MLM's on masked positions."""
    torch.manual_seed(2)
    model = FlavaForPreTraining(FlavaConfig.preset("tiny", multimodal={"num_layers": 2}))
    rows: dict[str, list[int]] = {}  # per encoder and block (first, last): output rows of each call
    for name in ("image_encoder", "text_encoder", "multimodal_encoder"):
        for which, block in (("first", 0), ("last", -1)):
            getattr(model, name).encoder.layers[block].register_forward_hook(
                lambda _m, _i, out, key=f"{name}.{which}": rows.setdefault(key, []).append(out[..., 0].numel())
            )
    batch = make_batches(model.config)["image_text"]
    model(**batch)
    B, L = batch["input_ids"].shape
    P, real_text = model.config.image.num_patches, int(batch["attention_mask"].sum())
    assert real_text < B * L
    assert rows["image_encoder.first"] == [B * (1 + P)] * 2 and rows["image_encoder.last"] == [B, B * (1 + P)]
    assert rows["text_encoder.first"] == [real_text] * 2 and rows["text_encoder.last"] == [B, real_text]
    assert rows["multimodal_encoder.first"] == [B * (2 + P) + real_text]
    matched = batch["itm_labels"].bool()
    wanted = 1 + (batch["bool_masked_pos"] & matched[:, None]).sum(1)
    wanted += ((batch["mlm_labels"] != -100) & matched[:, None]).sum(1)
    assert rows["multimodal_encoder.last"] == [B * int(wanted.max())] and wanted.max() < 2 + P + L
    rows.clear()
    image, text = make_batches(model.config)["image"], make_batches(model.config)["text"]
    model(**image)
    model(**text)
    assert rows["image_encoder.last"] == [B * int(image["bool_masked_pos"].sum(1).max())]
    assert rows["text_encoder.first"] == [int(text["attention_mask"].sum())]
    assert rows["text_encoder.last"] == [B * int((text["mlm_labels"] != -100).sum(1).max())]


def test_padding_changes_no_real_output():
    """A caption's states and gradients are the same alone (unpadded) and padded in a batch of longer ones."""
    torch.manual_seed(4)
    cfg = FlavaConfig.preset("tiny")
    encoder = Encoder(cfg.text, cfg.attn_impl, activation_checkpointing=False)
    lengths = [9, 4, 6]
    x = torch.randn(3, 9, cfg.text.hidden_size, requires_grad=True)
    padding = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    batched = encoder(x, padding)
    assert batched[~padding].abs().max() == 0  # padded positions: zeros, never computed
    weight = torch.randn_like(batched)
    grads = torch.autograd.grad((batched * weight * padding[..., None]).sum(), [x, *encoder.parameters()])
    alone_grads = [torch.zeros_like(g) for g in grads]
    for row, n in enumerate(lengths):
        xs = x[row : row + 1, :n].detach().requires_grad_()
        alone = encoder(xs)
        torch.testing.assert_close(batched[row : row + 1, :n], alone, atol=1e-5, rtol=1e-5)
        row_grads = torch.autograd.grad((alone * weight[row : row + 1, :n]).sum(), [xs, *encoder.parameters()])
        alone_grads[0][row : row + 1, :n] = row_grads[0]
        for total, g in zip(alone_grads[1:], row_grads[1:]):
            total += g
    assert grads[0][~padding].abs().max() == 0
    for a, b in zip(grads, alone_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_poolers_are_frozen_and_unused():
    model = FlavaForPreTraining(FlavaConfig.preset("tiny"))
    out = model(**make_batches(model.config)["image_text"])
    out.loss.backward()
    for enc in (model.image_encoder, model.text_encoder, model.multimodal_encoder):
        assert not enc.pooler.weight.requires_grad and enc.pooler.weight.grad is None


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(3)
    plain = FlavaForPreTraining(FlavaConfig.preset("tiny"))
    ckpt = FlavaForPreTraining(FlavaConfig.preset("tiny", activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    batch = make_batches(plain.config, seed=5)["image_text"]
    plain(**batch).loss.backward()
    ckpt(**batch).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def _bad(batch: dict, **changes) -> dict:
    return {**batch, **changes}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: _bad(b, pixel_values=torch.zeros(4, 3, 32, 32)), r"pixel_values: expected shape \(4, 3, 64, 64\)"),
        (lambda b: _bad(b, bool_masked_pos=torch.zeros(4, 15, dtype=torch.bool)), r"bool_masked_pos: .*\(4, 16\)"),
        (lambda b: _bad(b, mim_labels=torch.zeros(4, 4, 4, dtype=torch.long)), r"mim_labels: expected shape \(4, 16\)"),
        (lambda b: _bad(b, attention_mask=torch.ones(4, 8)), r"attention_mask: expected shape \(4, 9\)"),
        (lambda b: _bad(b, mlm_labels=torch.ones(3, 9)), r"mlm_labels: expected shape \(4, 9\)"),
        (lambda b: _bad(b, itm_labels=torch.ones(4, 1)), r"itm_labels: expected shape \(4,\)"),
        (lambda b: {k: v for k, v in b.items() if k != "input_ids"}, r"contrastive loss needs the unmasked input_ids"),
        (lambda b: {k: v for k, v in b.items() if k != "bool_masked_pos"}, r"mim_labels given without bool_masked_pos"),
        (lambda b: {}, r"pass pixel_values"),
        (lambda b: _bad(b, input_ids=torch.ones(4, 81, dtype=torch.long)), r"max_position_embeddings=80"),
    ],
)
def test_bad_inputs_name_the_argument_and_shape(change, message):
    model = FlavaForPreTraining(FlavaConfig.preset("tiny"))
    with pytest.raises(ValueError, match=message):
        model(**change(make_batches(model.config)["image_text"]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image": {"hidden_size": 30, "num_heads": 4}}, r"image.hidden_size=30 is not divisible by image.num_heads=4"),
        ({"image": {"image_size": 70}}, r"image_size=70 is not divisible"),
        ({"attn_impl": "flash"}, r"attn_impl='flash'"),
        ({"text": {"vocab": 5}}, r"text: unknown key\(s\) \['vocab'\]"),
        ({"dropout": 0.1}, r"unknown key\(s\) \['dropout'\]"),
    ],
)
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        FlavaConfig.preset("tiny", **overrides)
