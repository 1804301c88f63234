"""Shard reader and batch building: crops vs token slices, masks, ITM, MLM, padding, determinism, bad shards."""

from __future__ import annotations

import io
import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flava_ds.data.arrow_dataset import ArrowShards, ShardError
from flava_ds.data.image_dataset import (
    CLIP_MEAN,
    CLIP_STD,
    ImageAugment,
    ImageDataset,
    block_masker,
    collate_image,
    crop_with_tokens,
)
from flava_ds.data.image_text import ImageTextDataset
from flava_ds.data.sampler import SampleKey
from flava_ds.data.tokenizer import Tokenizer
from flava_ds.model.codebook import load_codebook
from preprocess import pairs
from tests.data_fixtures import CODEBOOK, make_pairs, pairs_args

S, CROP = 80, 48  # stored size and crop: 3 x 3 crop positions, 3 x 3 label grids
IMAGE_KEYS = {"pixel_values", "bool_masked_pos", "mim_labels"}
TEXT_KEYS = {"input_ids", "input_ids_masked", "attention_mask", "mlm_labels", "itm_labels"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    make_pairs(root, 24, seed=11)
    assert pairs.main(pairs_args(root, root / "out")) == 0
    return root / "out"


@pytest.fixture(scope="module")
def tokenizer(shards: Path) -> Tokenizer:
    return Tokenizer.from_file(shards.parent / "tokenizer.json")


def dataset(shards: Path, tokenizer: Tokenizer, **kw) -> ImageTextDataset:
    return ImageTextDataset(shards, tokenizer, ImageAugment(CROP), **kw)


def find_crop(stored: np.ndarray, crop: np.ndarray) -> tuple[int, int, bool]:
    """Brute force: the (top, left, flipped) whose crop of the stored image equals `crop` exactly."""
    found = [
        (top, left, flip)
        for top in range(0, S - CROP + 1, 16)
        for left in range(0, S - CROP + 1, 16)
        for flip in (False, True)
        if np.array_equal(
            stored[top : top + CROP, left : left + CROP][:, ::-1]
            if flip
            else stored[top : top + CROP, left : left + CROP],
            crop,
        )
    ]
    assert len(found) == 1, found
    return found[0]


def component_sizes(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected groups of True cells."""
    seen = np.zeros_like(mask)
    sizes = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        sizes.append(size)
    return sizes


def denormalize(pixel_values: torch.Tensor) -> np.ndarray:
    x = pixel_values.numpy().transpose(1, 2, 0) * CLIP_STD + CLIP_MEAN
    return np.rint(x * 255).astype(np.uint8)


def test_crop_labels_slice_the_stored_grid_with_mirrored_offsets_when_flipped():
    """Synthetic grids with distinct values check the offset and flip arithmetic in isolation."""
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "PNG")  # lossless, so crops can be located exactly
    grid = S // 16
    tokens = np.arange(grid * grid, dtype=np.uint16)
    flipped_grid = tokens.reshape(grid, grid)[:, ::-1] + 1000  # what the dVAE of the mirror image is about
    seen = set()
    for seed in range(40):
        crop, labels = crop_with_tokens(
            buffer.getvalue(), tokens, flipped_grid.reshape(-1), CROP, np.random.default_rng(seed)
        )
        top, left, flipped = find_crop(stored, crop)
        seen.add((top, left, flipped))
        cells, gy, gx = CROP // 16, top // 16, left // 16
        unflipped = tokens.reshape(grid, grid)[gy : gy + cells, gx : gx + cells]
        # a flipped crop shows the same patches mirrored: its labels are the mirrored slice, from the flipped grid
        expected = unflipped[:, ::-1] + 1000 if flipped else unflipped
        np.testing.assert_array_equal(labels.reshape(cells, cells), expected)
    assert len(seen) >= 12  # offsets and flips all get drawn


def test_mim_labels_match_the_recomputed_codebook_grid(shards: Path, tokenizer: Tokenizer):
    ds = dataset(shards, tokenizer)
    codebook = load_codebook(CODEBOOK)
    flips = set()
    for index in range(len(ds)):
        sample = ds[SampleKey(index, 0)]
        stored_jpeg = ds.shards.row(index, ["image"])["image"]
        stored = np.asarray(Image.open(io.BytesIO(stored_jpeg)).convert("RGB"))
        top, left, flipped = find_crop(stored, denormalize(sample["pixel_values"]))
        flips.add(flipped)
        view = stored[:, ::-1] if flipped else stored
        half = torch.from_numpy(np.asarray(Image.fromarray(np.ascontiguousarray(view)).reduce(2)))
        grid = codebook.get_codebook_indices(half.permute(2, 0, 1)[None].float() / 255)[0]
        x0 = S - left - CROP if flipped else left  # the crop's columns inside the (flipped) image
        expected = grid[top // 16 : (top + CROP) // 16, x0 // 16 : (x0 + CROP) // 16].reshape(-1)
        torch.testing.assert_close(sample["mim_labels"], expected.long())
    assert flips == {False, True}


def test_block_masks_on_the_14x14_grid():
    masker = block_masker(14)
    assert (masker.num_masking_patches, masker.min_num_patches) == (75, 16)
    counts = []
    for seed in range(200):
        mask = masker(np.random.default_rng(seed))
        counts.append(int(mask.sum()))
        sizes = component_sizes(mask)
        assert sizes and min(sizes) >= 16, sizes  # masked patches come in blocks of at least 16
    assert min(counts) >= 16 and max(counts) <= 75
    assert np.mean(counts) > 55  # close to the 75 target on average


def test_dataset_masks_scale_with_the_grid(shards: Path, tokenizer: Tokenizer):
    ds = dataset(shards, tokenizer)  # 3 x 3 patches: 75/196 of 9 = 3 masked
    counts = {int(ds[SampleKey(i, 0)]["bool_masked_pos"].sum()) for i in range(len(ds))}
    assert counts <= {1, 2, 3} and 3 in counts


def test_batch_dicts_are_exactly_the_model_inputs(shards: Path, tokenizer: Tokenizer):
    ds = dataset(shards, tokenizer)
    samples = [ds[SampleKey(i, 0)] for i in range(6)]
    batch = ds.collator()(samples)
    assert set(batch) == IMAGE_KEYS | TEXT_KEYS
    P = (CROP // 16) ** 2
    assert batch["pixel_values"].shape == (6, 3, CROP, CROP) and batch["pixel_values"].dtype == torch.float32
    assert batch["bool_masked_pos"].shape == (6, P) and batch["bool_masked_pos"].dtype == torch.bool
    assert batch["mim_labels"].shape == (6, P) and batch["mim_labels"].dtype == torch.long
    assert batch["itm_labels"].shape == (6,) and batch["itm_labels"].dtype == torch.long
    lengths = [len(s["input_ids"]) for s in samples]
    assert len(set(lengths)) > 1, "fixture captions should differ in length"
    for key in TEXT_KEYS - {"itm_labels"}:
        assert batch[key].shape == (6, max(lengths)) and batch[key].dtype == torch.long  # longest, not 77
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][i, n:] == tokenizer.pad_id).all()
        assert (batch["mlm_labels"][i, n:] == -100).all()
    image_only = collate_image([ImageDataset(shards, ImageAugment(CROP))[i] for i in range(3)])
    assert set(image_only) == IMAGE_KEYS


def test_mlm_labels_mark_exactly_the_masked_tokens(shards: Path, tokenizer: Tokenizer):
    ds = dataset(shards, tokenizer, itm_negative_prob=0.0)
    changed_total = 0
    for i in range(len(ds)):
        s = ds.collator()([ds[SampleKey(i, 0)]])
        ids, masked, labels = s["input_ids"][0], s["input_ids_masked"][0], s["mlm_labels"][0]
        selected = labels != -100
        assert selected.any()
        assert (labels[selected] == ids[selected]).all()
        assert (masked[~selected] == ids[~selected]).all()  # unselected tokens untouched
        assert not selected[0] and not selected[-1]  # never [CLS] / [SEP]
        changed_total += int((masked[selected] == tokenizer.mask_id).sum())
    assert changed_total > 0


def test_itm_negatives_take_another_samples_caption(shards: Path, tokenizer: Tokenizer):
    captions = [tuple(ArrowShards(shards).row(i, ["input_ids"])["input_ids"][0].tolist()) for i in range(24)]
    always = dataset(shards, tokenizer, itm_negative_prob=1.0)
    never = dataset(shards, tokenizer, itm_negative_prob=0.0)
    for i in range(24):
        neg, pos = always[SampleKey(i, 0)], never[SampleKey(i, 0)]
        assert neg["itm_labels"].item() == 0 and pos["itm_labels"].item() == 1
        assert tuple(pos["input_ids"].tolist()) == captions[i]
        assert tuple(neg["input_ids"].tolist()) in captions[:i] + captions[i + 1 :]
    default = dataset(shards, tokenizer)  # p = 0.1
    labels = [default[SampleKey(i, e)]["itm_labels"].item() for e in range(12) for i in range(24)]
    assert 10 <= labels.count(0) <= 52  # 288 draws, 28.8 expected


def test_samples_are_a_pure_function_of_seed_epoch_and_index(shards: Path, tokenizer: Tokenizer):
    a, b = dataset(shards, tokenizer, seed=3), dataset(shards, tokenizer, seed=3)
    for i in (0, 5, 23):
        x, y = a.collator()([a[SampleKey(i, 2)]]), b.collator()([b[SampleKey(i, 2)]])
        assert all(torch.equal(x[k], y[k]) for k in x)
    differ = [
        not torch.equal(a[SampleKey(i, 0)]["pixel_values"], a[SampleKey(i, 1)]["pixel_values"])
        or not torch.equal(a[SampleKey(i, 0)]["bool_masked_pos"], a[SampleKey(i, 1)]["bool_masked_pos"])
        for i in range(24)
    ]
    assert sum(differ) > 12  # epochs re-draw crops and masks
    # loader workers (forked, fresh memory maps) produce the same batches as the main process
    keys = [SampleKey(i, 1) for i in range(8)]
    loader = torch.utils.data.DataLoader(
        [keys[:4], keys[4:]],
        batch_size=None,
        num_workers=2,
        collate_fn=lambda ks: a.collator()([a[k] for k in ks]),
    )
    for got, ks in zip(loader, [keys[:4], keys[4:]]):
        want = a.collator()([a[k] for k in ks])
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_reader_rejects_truncated_missing_or_unfinished_shards(shards: Path, tmp_path: Path, tokenizer: Tokenizer):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    victim = broken / "shard-000001.arrow"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ShardError, match=r"shard-000001\.arrow"):
        ArrowShards(broken)
    victim.unlink()
    with pytest.raises(ShardError, match=r"shard-000001\.arrow.*missing"):
        ArrowShards(broken)
    shutil.copy(shards / "shard-000001.arrow", victim)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ShardError, match="did not finish"):
        ArrowShards(broken)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert len(ArrowShards(broken, verify_checksums=True)) == 24
    other = tmp_path / "other_tokenizer"
    other.mkdir()
    (other / "tokenizer.json").write_text((shards.parent / "tokenizer.json").read_text() + "\n")
    with pytest.raises(ValueError, match="tokenizer"):
        ImageTextDataset(shards, Tokenizer.from_file(other / "tokenizer.json"), ImageAugment(CROP))


def test_inspect_shards_tool(shards: Path, tmp_path: Path, capsys):
    tool = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "inspect_shards.py"))
    png = tmp_path / "sheet.png"
    assert (
        tool["main"]([str(shards), "-n", "3", "--tokenizer", str(shards.parent / "tokenizer.json"), "--png", str(png)])
        == 0
    )
    out = capsys.readouterr().out
    assert "inputs=24 written=24" in out and out.count("id=pairs.jsonl:") == 3
    assert Image.open(png).size[0] > 0


def test_batches_are_accepted_by_the_tiny_model(shards: Path, tokenizer: Tokenizer):
    from flava_ds.model import FlavaConfig, FlavaForPreTraining

    torch.manual_seed(0)
    model = FlavaForPreTraining(FlavaConfig.preset("tiny"))  # 64 px images, 64 codebook tokens
    ds = ImageTextDataset(shards, tokenizer, ImageAugment(64), itm_negative_prob=0.5)
    image_text = model(**ds.collator()([ds[SampleKey(i, 0)] for i in range(6)]))
    assert {"mim", "mlm"}.isdisjoint(image_text.losses) and torch.isfinite(image_text.loss)
    assert {"itm", "global_contrastive", "mmm_image", "mmm_text"} <= set(image_text.losses)
    image_only = ImageDataset(shards, ImageAugment(64))
    out = model(**image_only.collator()([image_only[i] for i in range(4)]))
    assert set(out.losses) == {"mim"} and torch.isfinite(out.loss)


def test_flava_full_geometry(tmp_path: Path):
    """S = 256 stored, 224 crops: 14 x 14 patches, masks of 16-75 patches, labels from the 16 x 16 grid."""
    make_pairs(tmp_path, 4, seed=2)
    assert pairs.main(pairs_args(tmp_path, tmp_path / "out", "--image-size", "256")) == 0
    ds = ImageTextDataset(tmp_path / "out", Tokenizer.from_file(tmp_path / "tokenizer.json"))  # crop 224
    batch = ds.collator()([ds[SampleKey(i, e)] for e in range(3) for i in range(4)])
    assert batch["pixel_values"].shape == (12, 3, 224, 224)
    assert batch["mim_labels"].shape == batch["bool_masked_pos"].shape == (12, 196)
    counts = batch["bool_masked_pos"].sum(1)
    assert (counts >= 16).all() and (counts <= 75).all()
    grids = [ds.shards.row(i, ["codebook_tokens", "codebook_tokens_flipped"]) for i in range(4)]
    for n, labels in enumerate(batch["mim_labels"].numpy()):
        stored = grids[n % 4]
        windows = [
            grid.reshape(16, 16)[y : y + 14, x : x + 14].reshape(-1)
            for grid in (stored["codebook_tokens"], stored["codebook_tokens_flipped"])
            for y in (0, 1, 2)
            for x in (0, 1, 2)
        ]
        assert any(np.array_equal(labels, w) for w in windows)
