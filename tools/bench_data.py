"""Data pipeline throughput: offline preprocessing, and ONE loader worker vs. online image pipelines.

    python tools/bench_data.py [--images 24] [--samples 256] [--online-dvae-samples 12] [--only ingest]

Generates photo-sized JPEG originals (500 x 375) and captions in a temporary directory, then measures:

* preprocessing: per-worker decode/resize/encode rate, the batched dVAE rate (full DALL-E size
  codebook, random weights, image + flip) and the end-to-end converter with one worker;
* loading, all in one process with one torch thread (what one DataLoader worker has):
  ours = ``ImageTextDataset`` + collator over the shards; (a) = decode the original, RandomResizedCrop
  to 224 + flip, 112 px codebook view through the dVAE online, same caption/mask/ITM work;
  (b) = (a) without the dVAE. Prints samples/s (best of interleaved rounds) and the ratios ours/(a), ours/(b);
* ingest (alone with ``--only ingest``): the same images as loose files + pairs.jsonl, as one webdataset tar
  (``key.jpg`` + ``key.txt``) and as a Parquet of raw ``jpg`` bytes + ``caption``, each converted by
  ``preprocess.pairs`` with one worker and the tiny random dVAE (so reading and decoding, not the dVAE, set the
  rate), in interleaved rounds; prints images/s (best of rounds) and the ratios tar/loose, parquet/loose.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from flava_ds.data.image_dataset import ImageAugment, normalize
from flava_ds.data.image_text import ImageTextDataset
from flava_ds.data.masking import BlockMaskGenerator
from flava_ds.data.sampler import SampleKey, sample_rng
from flava_ds.data.text_dataset import TextCollator
from flava_ds.data.tokenizer import Tokenizer
from flava_ds.model.codebook import load_codebook
from preprocess import pairs
from preprocess.image_decoding import ImageSettings, load_square_image
from preprocess.image_shards import CodebookEncoder
from tools.bench_setup import train_tokenizer
from tools.make_demo_data import write_jsonl

REPO = Path(__file__).resolve().parents[1]
INGEST_CODEBOOK = "random:0:tiny"  # the dVAE would otherwise be the whole cost on a CPU (section 5)
WORDS = (
    "a man woman child dog cat sits stands runs on in near the red blue green old new small large "
    "street beach field table car bike boat house tree sky water park city window"
).split()


def make_originals(directory: Path, count: int, seed: int = 0) -> Path:
    """Photo-like 500 x 375 JPEGs (smooth structure + grain, ~photo file sizes) and a pairs.jsonl."""
    rng = np.random.default_rng(seed)
    (directory / "img").mkdir(parents=True)
    records = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(coarse, np.float32) + rng.normal(0, 6, (375, 500, 3))
        name = f"img/{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(directory / name, quality=90)
        records.append({"image": name, "caption": " ".join(rng.choice(WORDS, int(rng.integers(6, 16))))})
    path = directory / "pairs.jsonl"
    write_jsonl(path, records)
    return path


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.inf


class OnlineBaseline:
    """The usual online pipeline on original files; `codebook` set = tokens computed per sample (a)."""

    def __init__(self, records: list[dict], root: Path, tokenizer: Tokenizer, codebook, crop: int, seed: int):
        self.records, self.root, self.tokenizer, self.codebook = records, root, tokenizer, codebook
        self.crop, self.seed = crop, seed
        grid = crop // 16
        self.masker = BlockMaskGenerator((grid, grid), 75, 16)
        self.collate_text = TextCollator(tokenizer, seed)

    def random_resized_crop(self, image: Image.Image, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """torchvision RandomResizedCrop's box: area fraction in [0.08, 1], aspect log-uniform in [3/4, 4/3]."""
        w, h = image.size
        for _ in range(10):
            area = w * h * rng.uniform(0.08, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                return x, y, x + cw, y + ch
        side = min(w, h)
        return (w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2

    def __getitem__(self, key: SampleKey) -> dict:
        rng = sample_rng(self.seed, key, 1)
        record = self.records[key.index]
        image = Image.open(self.root / record["image"]).convert("RGB")
        box = self.random_resized_crop(image, rng)
        flip = rng.random() < 0.5
        view = image.resize((self.crop, self.crop), Image.BICUBIC, box=box)
        if flip:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        sample = {
            "pixel_values": normalize(np.asarray(view)),
            "bool_masked_pos": torch.from_numpy(self.masker(rng).reshape(-1)),
        }
        if self.codebook is not None:
            half = image.resize((self.crop // 2, self.crop // 2), Image.LANCZOS, box=box)
            if flip:
                half = half.transpose(Image.FLIP_LEFT_RIGHT)
            x = torch.from_numpy(np.array(half)).permute(2, 0, 1)[None].float() / 255
            sample["mim_labels"] = self.codebook.get_codebook_indices(x).flatten()
        caption_index, matched = key.index, 1
        if rng.random() < 0.1:
            other = int(rng.integers(0, len(self.records) - 1))
            caption_index, matched = other + (other >= key.index), 0
        ids = self.tokenizer.encode(self.records[caption_index]["caption"], 77)
        return {**sample, "input_ids": np.asarray(ids, np.int64), "itm_labels": torch.tensor(matched), "key": key}

    def collate(self, samples: list[dict]) -> dict:
        images = {
            k: torch.stack([s[k] for s in samples]) for k in samples[0] if isinstance(samples[0][k], torch.Tensor)
        }
        return {**images, **self.collate_text(samples)}


def time_loader(get, collate, size: int, samples: int, batch: int) -> float:
    """Samples/s of building `samples` samples in batches, cycling through the dataset over epochs."""
    keys = [SampleKey(i % size, i // size) for i in range(samples)]
    collate([get(keys[0])])  # warm-up (lazy imports, memory maps)
    start = time.perf_counter()
    for b in range(0, samples, batch):
        collate([get(k) for k in keys[b : b + batch]])
    return rate(samples, time.perf_counter() - start)


def time_converter(inputs: list[str], output: Path, tokenizer: Path, codebook: str, args: argparse.Namespace) -> float:
    """Seconds of one real `preprocess.pairs` run with one decode worker from `inputs` into the fresh `output`."""
    start = time.perf_counter()
    rc = pairs.main(
        [
            *inputs,
            "--output",
            str(output),
            "--tokenizer",
            str(tokenizer),
            "--codebook",
            codebook,
            "--image-size",
            str(args.image_size),
            "--workers",
            "1",
            "--batch-size",
            str(args.dvae_batch),
            "--device",
            args.device,
            "--no-progress",
        ]
    )
    seconds = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"preprocessing {inputs} failed with exit code {rc}")
    return seconds


def measure_preprocessing(
    work: Path, pairs_file: Path, records: list[dict], tokenizer: Path, args: argparse.Namespace
) -> dict[str, float]:
    """Decode per worker, batched dVAE and the converter end to end, all with the full-size codebook."""
    results = {}
    settings = ImageSettings(image_size=args.image_size)
    start = time.perf_counter()
    views = [load_square_image(work / r["image"], settings)[1] for r in records]
    results["prep_decode_per_worker"] = rate(len(records), time.perf_counter() - start)
    encoder = CodebookEncoder(args.codebook, args.device, args.dvae_batch)
    batch = views[: args.dvae_batch * max(1, min(2, len(views) // args.dvae_batch))]
    encoder.encode(views[:1])  # warm-up
    start = time.perf_counter()
    encoder.encode(batch)
    results["prep_dvae_batched"] = rate(len(batch), time.perf_counter() - start)
    loose = ["--input", str(pairs_file), "--image-root", str(work)]
    seconds = time_converter(loose, work / "shards", tokenizer, args.codebook, args)
    results["prep_end_to_end_1_worker"] = rate(len(records), seconds)
    return results


def measure_loading(
    work: Path, records: list[dict], tokenizer: Tokenizer, args: argparse.Namespace
) -> dict[str, float]:
    """Ours over the shards in `work/shards` vs. the online baselines (a) and (b), one torch thread."""
    results: dict[str, float] = {}
    torch.set_num_threads(1)  # what a DataLoader worker gets
    ours = ImageTextDataset(work / "shards", tokenizer, ImageAugment(args.crop))
    online = OnlineBaseline(records, work, tokenizer, None, args.crop, seed=0)
    # interleaved rounds, best of each: other load on the machine hits both pipelines alike
    for _ in range(args.rounds):
        for name, get, collate, size in (
            ("load_ours", ours.__getitem__, ours.collator(), len(ours)),
            ("load_b_online_no_dvae", online.__getitem__, online.collate, len(records)),
        ):
            results[name] = max(results.get(name, 0.0), time_loader(get, collate, size, args.samples, 32))
    online.codebook = load_codebook(args.codebook)
    results["load_a_online_dvae"] = time_loader(
        online.__getitem__, online.collate, len(records), args.online_dvae_samples, args.online_dvae_samples
    )
    results["ratio_vs_a"] = results["load_ours"] / results["load_a_online_dvae"]
    results["ratio_vs_b"] = results["load_ours"] / results["load_b_online_no_dvae"]
    return results


def write_ingest_inputs(work: Path, pairs_file: Path, records: list[dict]) -> dict[str, list[str]]:
    """The loose originals again as an img2dataset-style tar and a raw-bytes Parquet; converter inputs per form."""
    import webdataset as wds  # what img2dataset writes with; only this measurement needs it

    images = [(work / r["image"]).read_bytes() for r in records]
    captions = [r["caption"] for r in records]
    tar = work / "ingest" / "00000.tar"
    tar.parent.mkdir()
    with wds.TarWriter(str(tar)) as sink:
        for i, (image, caption) in enumerate(zip(images, captions)):
            sink.write({"__key__": f"{i:09d}", "jpg": image, "txt": caption})
    parquet = work / "ingest" / "pairs.parquet"
    pq.write_table(pa.table({"jpg": pa.array(images, pa.binary()), "caption": captions}), parquet)
    return {
        "loose": ["--input", str(pairs_file), "--image-root", str(work)],
        "tar": ["--input", str(tar)],
        "parquet": ["--input", str(parquet), "--image-field", "jpg"],
    }


def measure_ingest(
    work: Path, pairs_file: Path, records: list[dict], tokenizer: Path, args: argparse.Namespace
) -> dict[str, float]:
    """Converter images/s from each input form; each round runs every form once, starting one later each round.

    One torch thread for the dVAE: with two on a loaded 2-core CPU even the tiny one ran 4-5x slower."""
    torch.set_num_threads(1)
    inputs = write_ingest_inputs(work, pairs_file, records)
    forms = list(inputs)
    best: dict[str, float] = {}
    for r in range(args.rounds):
        for form in forms[r % len(forms) :] + forms[: r % len(forms)]:
            seconds = time_converter(inputs[form], work / "ingest" / f"{form}_{r}", tokenizer, INGEST_CODEBOOK, args)
            best[form] = max(best.get(form, 0.0), rate(len(records), seconds))
    results = {f"ingest_{form}_1_worker": value for form, value in best.items()}
    results["ratio_tar_vs_loose"] = best["tar"] / best["loose"]
    results["ratio_parquet_vs_loose"] = best["parquet"] / best["loose"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24, help="originals to generate and preprocess")
    parser.add_argument("--samples", type=int, default=256, help="samples per loader measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved loader and ingest rounds (best is kept)")
    parser.add_argument("--online-dvae-samples", type=int, default=12, help="samples for baseline (a)")
    parser.add_argument("--codebook", default="random:0", help="full-size DALL-E codebook by default")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--dvae-batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=("ingest",), help="run only this measurement (quick)")
    args = parser.parse_args(argv)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs_file = make_originals(work, args.images)
        records = [json.loads(line) for line in pairs_file.read_text().splitlines()]
        tokenizer = train_tokenizer(pairs_file, work / "tokenizer.json")
        if args.only is None:
            results.update(measure_preprocessing(work, pairs_file, records, tokenizer, args))
            results.update(measure_loading(work, records, Tokenizer.from_file(tokenizer), args))
        results.update(measure_ingest(work, pairs_file, records, tokenizer, args))
    header = f"# bench_data: {platform.processor() or platform.machine()}, torch {torch.__version__}"
    if args.only is None:
        header += f", {torch.get_num_threads()} loader thread, dVAE {args.codebook} on {args.device}"
    print(header)
    print(
        f"# ingest: {args.images} images, preprocess.pairs --workers 1, the tiny dVAE {INGEST_CODEBOOK} on one "
        f"torch thread (not the full-size one, which would be the whole cost), best of {args.rounds} interleaved rounds"
    )
    for name, value in results.items():
        unit = "x" if name.startswith("ratio") else "samples/s" if name.startswith("load") else "images/s"
        print(f"{name:28s} {value:10.2f} {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
