"""Numerical parity with `transformers.FlavaForPreTraining` on identical weights and inputs."""

from __future__ import annotations

import pytest
import torch
import transformers

from flava_ds.model import CodebookConfig, FlavaCodebook, FlavaConfig, FlavaForPreTraining
from tests.model_inputs import make_batches


def _encoder(hidden: int, layers: int, heads: int, **extra) -> dict:
    return {"hidden_size": hidden, "num_layers": layers, "num_heads": heads, "mlp_size": 2 * hidden + 8, **extra}


CONFIGS = {
    "h24-3heads-img48": {
        "image": _encoder(24, 2, 3, image_size=48, patch_size=16, codebook_vocab_size=37),
        "text": _encoder(24, 2, 3, vocab_size=97, max_position_embeddings=40),
        "multimodal": _encoder(24, 1, 3),
        "projection_dim": 20,
    },
    "h40-5heads-patch8": {
        "image": _encoder(40, 1, 5, image_size=40, patch_size=8, codebook_vocab_size=128),
        "text": _encoder(40, 2, 5, vocab_size=301, max_position_embeddings=33),
        "multimodal": _encoder(40, 2, 5),
        "projection_dim": 40,
    },
    "h64-4heads-img32-3mm": {
        "image": _encoder(64, 1, 4, image_size=32, patch_size=16, codebook_vocab_size=50),
        "text": _encoder(64, 1, 4, vocab_size=1000, max_position_embeddings=16),
        "multimodal": _encoder(64, 3, 4),
        "projection_dim": 16,
    },
}
LOGIT_NAMES = {
    "mim": "mim_logits",
    "mlm": "mlm_logits",
    "itm": "itm_logits",
    "mmm_image": "mmm_image_logits",
    "mmm_text": "mmm_text_logits",
    "contrastive_per_image": "contrastive_logits_per_image",
    "contrastive_per_text": "contrastive_logits_per_text",
}
EXPECTED_TERMS = {
    "image_text": {"itm", "global_contrastive", "mmm_image", "mmm_text"},
    "image": {"mim"},
    "text": {"mlm"},
}


def _pair(overrides: dict, attn_impl: str, tmp_path, seed: int):
    torch.manual_seed(seed)
    ours = FlavaForPreTraining(FlavaConfig.from_dict({**overrides, "attn_impl": attn_impl}))
    with torch.no_grad():  # weights far from init so every path matters numerically
        for p in ours.parameters():
            p.normal_(0, 0.15)
        ours.logit_scale.fill_(2.0)
    ours.save_hf_pretrained(tmp_path)
    theirs, info = transformers.FlavaForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return ours, theirs


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_losses_and_logits_match_transformers(name, attn_impl, tmp_path):
    ours, theirs = _pair(CONFIGS[name], attn_impl, tmp_path, seed=len(name))
    batches = make_batches(ours.config, batch=5, seq_len=11, seed=len(name))
    for mode in (True, False):
        ours.train(mode)
        theirs.train(mode)
        for kind, batch in batches.items():
            got = ours(**batch)
            want = theirs(**{k: v.clone() for k, v in batch.items()})  # transformers edits mim_labels in place
            assert set(got.losses) == EXPECTED_TERMS[kind]
            for term, value in got.losses.items():
                torch.testing.assert_close(value, getattr(want.loss_info, term), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
            for ours_name, value in got.logits.items():
                torch.testing.assert_close(value, getattr(want, LOGIT_NAMES[ours_name]), atol=1e-5, rtol=1e-5)
            assert len(got.logits) >= len(EXPECTED_TERMS[kind])


def test_gradients_match_transformers(tmp_path):
    ours, theirs = _pair(CONFIGS["h24-3heads-img48"], "sdpa", tmp_path, seed=3)
    batch = make_batches(ours.config, batch=4, seq_len=7, seed=3)["image_text"]
    ours(**batch).loss.backward()
    theirs(**{k: v.clone() for k, v in batch.items()}).loss.backward()
    from flava_ds.model.interop import hf_names

    hf_params = theirs.state_dict(keep_vars=True)  # includes tied aliases such as mim_head.decoder.bias
    checked = 0
    for name, param in ours.named_parameters():
        targets = hf_names(name)
        want = [hf_params[t].grad for t in targets]
        if any(g is None for g in want):  # parameters transformers does not touch (e.g. mim head here)
            assert param.grad is None or param.grad.abs().max() == 0, name
            continue
        want = torch.cat(want) if len(want) > 1 else want[0].reshape(param.shape)  # logit_scale: () vs (1,)
        torch.testing.assert_close(param.grad, want, atol=1e-5, rtol=1e-4)
        checked += 1
    assert checked > 50


def test_ignores_nothing_when_no_negatives_and_all_negatives(tmp_path):
    """ITM edge cases: all matched, and none matched (transformers then keeps every row)."""
    ours, theirs = _pair(CONFIGS["h24-3heads-img48"], "sdpa", tmp_path, seed=5)
    ours.eval()
    theirs.eval()
    batch = make_batches(ours.config, batch=3, seq_len=6, seed=5)["image_text"]
    for labels in (torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)):
        batch["itm_labels"] = labels
        got, want = ours(**batch), theirs(**{k: v.clone() for k, v in batch.items()})
        torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [CodebookConfig.preset("tiny"), CodebookConfig(hidden_size=16, vocab_size=300)])
def test_codebook_ids_match_transformers(config, tmp_path):
    hf_config = transformers.FlavaImageCodebookConfig(
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        num_blocks_per_group=config.num_blocks_per_group,
    )
    torch.manual_seed(0)
    theirs = transformers.FlavaImageCodebook(hf_config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, p[0].numel() ** -0.5) if p.dim() > 1 else p.zero_()
    theirs.save_pretrained(tmp_path)
    ours = FlavaCodebook.from_hf_pretrained(tmp_path)
    pixels = torch.nn.functional.interpolate(torch.rand(3, 3, 6, 6), size=48, mode="bilinear")  # image-like
    got = ours.get_codebook_indices(pixels)
    want = theirs.get_codebook_indices(pixels * 0.8 + 0.1)
    assert got.shape == (3, 6, 6)
    assert torch.equal(got, want)
    assert got.unique().numel() > 3  # a meaningful comparison, not all one token
