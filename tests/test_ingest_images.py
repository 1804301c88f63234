"""preprocess.images reads the image-classification data users hold: datasets' save_to_disk and Parquet (an
Image struct of bytes or a path, a ClassLabel), raw-bytes Parquet with class-name labels, readable class names
(--class-names, duplicates disambiguated), and input mistakes reported before the codebook loads."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flava_ds.data.arrow_dataset import ArrowShards
from preprocess import images
from tests.data_fixtures import CODEBOOK

REPO = Path(__file__).resolve().parents[1]
COLOURS = ((220, 30, 30), (30, 200, 40), (40, 60, 230))  # the colour of an image is its label's
LABELS = [2, 0, 1, 1, 2, 0, 0, 2, 1, 0]  # interleaved: a record paired with another's label shows
NAMES = ["zebra", "ant", "cat"]  # ClassLabel order, not sorted: classes.json must keep it


def coloured(label: int, i: int) -> Image.Image:
    """A 40x48 image of the label's colour, a little noise so no two are alike."""
    rng = np.random.default_rng(i)
    pixels = np.array(COLOURS[label], np.float32) + rng.normal(0, 6, (48, 40, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def colour_label(jpeg: bytes) -> int:
    """The label whose colour a stored JPEG shows."""
    mean = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float32).mean((0, 1))
    return int(np.argmin([np.abs(mean - np.array(c)).sum() for c in COLOURS]))


def convert(inputs: list[Path], output: Path, *extra: str, codebook: str = CODEBOOK) -> int:
    args = ["--input", *map(str, inputs), "--output", str(output), "--codebook", codebook, "--image-size", "32"]
    return images.main([*args, "--shard-size", "4", "--workers", "0", "--no-progress", *extra])


def stored(output: Path) -> list[dict]:
    shards = ArrowShards(output)
    return [shards.row(i, ["id", "image", "label"]) for i in range(len(shards))]


def manifest(output: Path) -> dict:
    return json.loads((output / "manifest.json").read_text())


def classes(output: Path) -> dict[str, int]:
    return json.loads((output / "classes.json").read_text())


CLASS_FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> Path:
    """root/img/<i>.png, image i of colour LABELS[i]."""
    root = tmp_path_factory.mktemp("image_files")
    (root / "img").mkdir()
    for i, label in enumerate(LABELS):
        coloured(label, i).save(root / "img" / f"{i}.png")
    return root


def refused(capsys, pattern: str, run) -> None:
    """`run` stops with exit code 2 and one error line matching `pattern` (a usage error, nothing converted)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run()
    assert stopped.value.code == 2
    assert re.search(pattern, capsys.readouterr().err), pattern


def test_save_to_disk_with_a_class_label_keeps_each_image_with_its_label(tmp_path: Path):
    """PIL images and a ClassLabel (incl. the -1 of an unlabelled row), read through a pool of 2 workers."""
    pictures = [coloured(label, i) for i, label in enumerate(LABELS)] + [coloured(0, 99)]
    data = {"image": pictures, "label": [*LABELS, -1]}
    datasets.Dataset.from_dict(data, features=CLASS_FEATURES).save_to_disk(str(tmp_path / "train"))
    out = tmp_path / "out"
    assert convert([tmp_path / "train"], out, "--workers", "2", "--max-skip-fraction", "0.1") == 0
    rows = stored(out)
    assert [r["id"] for r in rows] == [f"train:{i}" for i in range(len(LABELS))]
    assert [r["label"] for r in rows] == LABELS
    assert [colour_label(r["image"]) for r in rows] == LABELS
    assert classes(out) == {"zebra": 0, "ant": 1, "cat": 2}
    record = manifest(out)
    assert record["inputs_seen"] == len(LABELS) + 1 and record["samples_written"] == len(LABELS)
    assert record["skipped"] == {"bad_record": 1}
    assert "train:10" in record["skip_examples"]["bad_record"][0]


def test_parquet_of_image_paths_checks_the_image_root_first_then_converts(
    image_files: Path, tmp_path: Path, monkeypatch, capsys
):
    """datasets.to_parquet of file paths stores {bytes: None, path}: a wrong --image-root is an error before the
    codebook loads (a missing codebook would fail otherwise); the rerun with the right root converts, with the
    Parquet footer's row count as the progress bar's total."""
    monkeypatch.chdir(image_files)  # datasets resolves the paths it is given; the Parquet keeps them relative
    data = {"image": [f"img/{i}.png" for i in range(len(LABELS))], "label": LABELS}
    table = image_files / "paths.parquet"
    datasets.Dataset.from_dict(data, features=CLASS_FEATURES).to_parquet(str(table))
    assert pq.read_table(table).column("image").to_pylist()[0] == {"bytes": None, "path": "img/0.png"}
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    missing_codebook = str(tmp_path / "no-codebook")
    refused(
        capsys,
        r"none of the first 10 image paths exists under the image root .*elsewhere",
        lambda: convert([table], out, "--image-root", str(elsewhere), codebook=missing_codebook),
    )
    assert not (out / "manifest.json").exists()

    rows_seen = []
    run = images.run_image_conversion
    monkeypatch.setattr(images, "run_image_conversion", lambda *a: rows_seen.append(a[3]) or run(*a))
    assert convert([table], out) == 0  # default root: the Parquet's folder
    assert rows_seen == [[4, 4, 2]]
    rows = stored(out)
    assert [r["id"] for r in rows] == [f"paths.parquet:{i}" for i in range(len(LABELS))]
    assert [r["label"] for r in rows] == [colour_label(r["image"]) for r in rows] == LABELS
    assert classes(out) == {"zebra": 0, "ant": 1, "cat": 2}


@pytest.fixture(scope="module")
def raw_bytes_parquet(tmp_path_factory) -> Path:
    """pyarrow Parquet: `picture` raw PNG bytes (one null, one not an image), `species` a class name."""
    root = tmp_path_factory.mktemp("raw_bytes")
    pictures = [encoded(coloured(label, i)) for i, label in enumerate(LABELS)]
    species = [NAMES[label] for label in LABELS]
    table = pa.table(
        {
            "key": [f"k{i}" for i in range(len(LABELS) + 2)],
            "picture": [*pictures, None, b"not an image"],
            "species": [*species, "ant", "cat"],
        }
    )
    pq.write_table(table, root / "pics.parquet")
    return root / "pics.parquet"


def test_raw_bytes_parquet_with_class_name_labels(raw_bytes_parquet: Path, tmp_path: Path):
    out = tmp_path / "out"
    fields = ["--image-field", "picture", "--label-field", "species", "--max-skip-fraction", "0.2"]
    assert convert([raw_bytes_parquet], out, *fields) == 0
    assert classes(out) == {"ant": 0, "cat": 1, "zebra": 2}  # names in sorted order, as list files
    sorted_index = {"ant": 0, "cat": 1, "zebra": 2}
    expected = [sorted_index[NAMES[label]] for label in LABELS]
    rows = stored(out)
    assert [r["label"] for r in rows] == expected
    assert [sorted_index[NAMES[colour_label(r["image"])]] for r in rows] == expected
    record = manifest(out)
    assert record["skipped"] == {"bad_record": 1, "corrupt_image": 1}
    assert record["inputs_seen"] == len(LABELS) + 2


def test_a_wrong_field_is_one_line_naming_the_columns_before_the_codebook_then_the_rerun_works(
    raw_bytes_parquet: Path, tmp_path: Path
):
    """The command line with a label field that does not exist and a codebook that does not either: the error
    printed is the field's alone; the corrected rerun into the same --output converts."""
    out = tmp_path / "out"
    args = ["--input", str(raw_bytes_parquet), "--output", str(out), "--image-field", "picture"]
    args += ["--codebook", str(tmp_path / "no-codebook"), "--image-size", "32", "--workers", "2", "--no-progress"]
    wrong = subprocess.run(
        [sys.executable, "-m", "preprocess.images", *args, "--label-field", "labels"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode == 2
    assert wrong.stderr.splitlines() == [
        "python -m preprocess.images: error: "
        f"{raw_bytes_parquet}: no column 'labels'; its columns are ['key', 'picture', 'species'] (set --label-field)"
    ]
    assert not (out / "manifest.json").exists()
    fixed = [a if a != str(tmp_path / "no-codebook") else CODEBOOK for a in args]
    assert images.main([*fixed, "--label-field", "species", "--max-skip-fraction", "0.2"]) == 0
    assert manifest(out)["samples_written"] == len(LABELS)


WNIDS = ["n01440764", "n02012849", "n03126707"]  # tench, crane (the bird), crane (the machine)


@pytest.fixture(scope="module")
def wnid_folders(tmp_path_factory) -> Path:
    """ImageNet-style root/<wnid>/<image>, class k in colour k."""
    root = tmp_path_factory.mktemp("wnid") / "train"
    for label, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(parents=True)
        for i in range(2):
            coloured(label, 10 * label + i).save(root / wnid / f"{wnid}_{i}.JPEG")
    return root


def test_class_names_make_classes_json_readable_and_disambiguate_duplicates(wnid_folders: Path, tmp_path: Path):
    names = tmp_path / "LOC_synset_mapping.txt"  # ImageNet's own file: 'wnid name' lines
    names.write_text("n01440764 tench, Tinca tinca\nn02012849 crane\nn03126707 crane\n")
    out = tmp_path / "out"
    assert convert([wnid_folders], out, "--class-names", str(names)) == 0
    assert classes(out) == {"tench, Tinca tinca": 0, "crane (n02012849)": 1, "crane (n03126707)": 2}
    rows = stored(out)
    assert [r["label"] for r in rows] == [colour_label(r["image"]) for r in rows] == [0, 0, 1, 1, 2, 2]

    as_json = tmp_path / "names.json"  # the same names as a JSON object, tab-separated lines alike
    as_json.write_text(json.dumps({"n01440764": "tench", "n02012849": "crane", "n03126707": "crane"}))
    as_tsv = tmp_path / "names.tsv"
    as_tsv.write_text("n01440764\ttench\nn02012849\tcrane\nn03126707\tcrane\n")
    for source in (as_json, as_tsv):
        assert convert([wnid_folders], tmp_path / f"out_{source.suffix[1:]}", "--class-names", str(source)) == 0
        assert classes(tmp_path / f"out_{source.suffix[1:]}") == {
            "tench": 0,
            "crane (n02012849)": 1,
            "crane (n03126707)": 2,
        }


def test_a_class_the_names_file_lacks_is_an_error_naming_file_and_id(wnid_folders: Path, tmp_path: Path, capsys):
    names = tmp_path / "names.tsv"
    names.write_text("n01440764\ttench\nn02012849\tcrane\n")
    missing_codebook = str(tmp_path / "no-codebook")
    refused(
        capsys,
        rf"--class-names {names}: no name for class 'n03126707'",
        lambda: convert([wnid_folders], tmp_path / "out", "--class-names", str(names), codebook=missing_codebook),
    )


def test_integer_list_labels_are_named_by_a_list(image_files: Path, tmp_path: Path, capsys):
    """A `path label` list with integer labels: a JSON list names the classes by label; a label it does not
    reach is an error naming it."""
    (image_files / "val.txt").write_text("".join(f"img/{i}.png {label}\n" for i, label in enumerate(LABELS)))
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["crane", "tench", "crane"]))
    out = tmp_path / "out"
    assert convert([image_files / "val.txt"], out, "--class-names", str(names)) == 0
    assert classes(out) == {"crane (0)": 0, "tench": 1, "crane (2)": 2}
    assert [r["label"] for r in stored(out)] == LABELS
    names.write_text(json.dumps(["crane", "tench"]))
    refused(
        capsys,
        rf"--class-names {names}: no name for class '2'",
        lambda: convert([image_files / "val.txt"], tmp_path / "out_short", "--class-names", str(names)),
    )
