"""MLM masking statistics (15%, 80/10/10, whole words, specials) and BEiT block masks."""

from __future__ import annotations

import numpy as np
import pytest

from flava_ds.data.masking import IGNORE_INDEX, BlockMaskGenerator, mask_tokens, random_non_special

VOCAB = 1000
PAD, CLS, SEP, MASK = 0, 2, 3, 4
SPECIALS = frozenset({0, 1, 2, 3, 4, 500})  # 500: a special in the middle of the vocabulary


def random_sequence(rng: np.random.Generator, length: int = 120, pad: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] words [SEP] [PAD]...: ids avoid specials, words are 1-4 pieces long; a special sits inside."""
    body = random_non_special(rng, length, VOCAB, SPECIALS)
    body[length // 2] = 500
    starts = np.zeros(length, dtype=bool)
    pos = 0
    while pos < length:
        starts[pos] = True
        pos += int(rng.integers(1, 5))
    starts[length // 2 : length // 2 + 2] = True  # the special is a word of its own
    ids = np.concatenate([[CLS], body, [SEP], np.full(pad, PAD)])
    word_starts = np.concatenate([[True], starts, [True], np.ones(pad, dtype=bool)])
    return ids, word_starts


def run_many(whole_word: bool, n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        ids, starts = random_sequence(rng)
        masked, labels = mask_tokens(
            ids, starts, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, rng=rng, whole_word=whole_word
        )
        yield ids, starts, masked, labels


@pytest.mark.parametrize("whole_word", [True, False])
def test_fifteen_percent_of_maskable_tokens(whole_word):
    selected = maskable = 0
    for ids, _, _, labels in run_many(whole_word):
        maskable += int((~np.isin(ids, list(SPECIALS))).sum())
        selected += int((labels != IGNORE_INDEX).sum())
    assert abs(selected / maskable - 0.15) < 0.012


def test_80_10_10_split_and_labels():
    n_mask = n_random = n_keep = 0
    for ids, _, masked, labels in run_many(whole_word=True):
        sel = labels != IGNORE_INDEX
        np.testing.assert_array_equal(labels[sel], ids[sel])
        np.testing.assert_array_equal(masked[~sel], ids[~sel])
        n_mask += int((masked[sel] == MASK).sum())
        changed = sel & (masked != MASK) & (masked != ids)
        n_random += int(changed.sum())
        n_keep += int((sel & (masked == ids)).sum())
        assert not np.isin(masked[changed], list(SPECIALS)).any(), "random replacements are never special tokens"
    total = n_mask + n_random + n_keep
    assert abs(n_mask / total - 0.8) < 0.025
    assert abs(n_random / total - 0.1) < 0.02
    assert abs(n_keep / total - 0.1) < 0.02


def word_selection(starts: np.ndarray, selected: np.ndarray) -> list[set[bool]]:
    """For each word: the set of selection flags of its tokens."""
    word_of = np.cumsum(starts)
    return [set(selected[word_of == w].tolist()) for w in np.unique(word_of)]


def test_whole_words_masked_together():
    for _, starts, _, labels in run_many(whole_word=True, n=100):
        assert all(len(flags) == 1 for flags in word_selection(starts, labels != IGNORE_INDEX))
    partial = [
        len(flags) == 2
        for _, starts, _, labels in run_many(whole_word=False, n=100)
        for flags in word_selection(starts, labels != IGNORE_INDEX)
    ]
    assert any(partial), "token-level masking should split some words (else this test proves nothing)"


def test_a_special_token_breaks_words():
    """Pieces on both sides of a special are different words, whatever the word-start flags say."""
    ids, starts = [CLS, 10, SEP, 11, SEP], [True, True, False, False, True]
    together = set()
    for seed in range(300):
        rng = np.random.default_rng(seed)
        _, labels = mask_tokens(ids, starts, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, rng=rng)
        together.add(tuple(labels[[1, 3]] != IGNORE_INDEX))
    assert (True, False) in together and (False, True) in together


def test_specials_and_padding_never_masked():
    for ids, _, masked, labels in run_many(whole_word=True):
        special = np.isin(ids, list(SPECIALS))
        assert (labels[special] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(masked[special], ids[special])


def test_at_least_one_token_masked():
    for seed in range(200):
        rng = np.random.default_rng(seed)
        _, labels = mask_tokens(
            [CLS, 77, SEP, PAD], None, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, rng=rng
        )
        assert (labels != IGNORE_INDEX).sum() == 1
    _, labels = mask_tokens([CLS, SEP, PAD], [True] * 3, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, rng=rng)
    assert (labels == IGNORE_INDEX).all()


def test_deterministic_in_rng():
    ids, starts = random_sequence(np.random.default_rng(1))
    a, b = (
        mask_tokens(ids, starts, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, rng=np.random.default_rng(5))
        for _ in range(2)
    )
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_random_non_special_is_uniform_over_the_rest():
    draws = random_non_special(np.random.default_rng(0), 70_000, 10, {0, 3, 9, 42})
    counts = np.bincount(draws, minlength=10)
    assert counts[[0, 3, 9]].sum() == 0
    assert np.allclose(counts[[1, 2, 4, 5, 6, 7, 8]] / draws.size, 1 / 7, atol=0.01)


def has_masked_neighbour(mask: np.ndarray) -> bool:
    padded = np.pad(mask, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return bool((neighbours[mask]).all())


@pytest.mark.parametrize(
    ("grid", "target", "minimum"),
    [((14, 14), 75, 16), ((4, 4), 6, 2), ((7, 9), 20, 4)],
)
def test_block_masks(grid, target, minimum):
    gen = BlockMaskGenerator(grid, num_masking_patches=target, min_num_patches=minimum)
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(300):
        mask = gen(rng)
        assert mask.shape == grid and mask.dtype == bool
        assert minimum <= mask.sum() <= target
        assert has_masked_neighbour(mask), "masked patches come in blocks"
        counts.append(int(mask.sum()))
    assert np.mean(counts) > 0.8 * target
    assert len(set(counts)) > 1 or target == minimum


def test_default_block_mask_count_matches_beit():
    """BEiT's own generator averages ~74.5 masked patches of 75 on 14x14 (min block 16)."""
    gen, rng = BlockMaskGenerator(), np.random.default_rng(1)
    assert 73.5 < np.mean([gen(rng).sum() for _ in range(1000)]) <= 75


def test_block_mask_neighbour_check_can_fail():
    scattered = np.zeros((14, 14), dtype=bool)
    scattered[::3, ::3] = True
    assert not has_masked_neighbour(scattered)


def test_block_mask_deterministic_and_validated():
    gen = BlockMaskGenerator()
    np.testing.assert_array_equal(gen(np.random.default_rng(3)), gen(np.random.default_rng(3)))
    with pytest.raises(ValueError, match="grid area"):
        BlockMaskGenerator((4, 4), num_masking_patches=20, min_num_patches=2)
    with pytest.raises(ValueError, match="min_num_patches"):
        BlockMaskGenerator((14, 14), num_masking_patches=10, min_num_patches=16)
    with pytest.raises(ValueError, match="aspect"):
        BlockMaskGenerator(min_aspect=0)
    with pytest.raises(RuntimeError, match="no block of 4 patches fits"):
        BlockMaskGenerator((1, 8), 4, 4, min_aspect=1.0)(np.random.default_rng(0))
