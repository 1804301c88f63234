"""Image-classification data (class folders, list files, Parquet / Arrow / datasets tables) -> Arrow image shards.

Rows hold the image columns of ``preprocess/image_shards.py`` and the ``label``. The inputs are read by
``preprocess/image_corpora.py``, ``classes.json`` is made by ``preprocess/class_names.py``.

Usage::

    python -m preprocess.images --input /data/imagenet/train --output shards/in1k \\
        --codebook /ckpt/flava-codebook --image-size 256 --workers 15 --device cuda \\
        --class-names LOC_synset_mapping.txt
    python -m preprocess.images --input val_list.txt --image-root /data/imagenet/val --output shards/val ...
    python -m preprocess.images --input 'imagenet-1k/data/train-*.parquet' --output shards/in1k ...
    python -m preprocess.images --input cifar10_saved/train --image-field img --output shards/cifar10 ...

Inputs (``--input``; several list files or tables, globs expanded):

* class folders: ``root/<class>/<image>``; labels index the sorted class folder names; ids are the paths.
* list files (any file that is not a table, optionally ``.gz``/``.bz2``/``.xz``/``.zst``): one
  ``relative/path label`` per line, the label an integer (used as given) or a class name (the names are
  indexed in sorted order); ids are the paths.
* tables: ``.parquet`` / ``.arrow`` files, directories of them (a hub cache), a ``datasets.save_to_disk``
  directory. ``--image-field`` (default ``image``) holds a Hugging Face ``Image`` struct ``{bytes, path}``,
  encoded image bytes or a path; ``--label-field`` (default ``label``) a ``ClassLabel`` (its names are the
  classes; an out-of-range label such as the -1 of unlabelled splits is a bad record), other integers (used
  as given) or class names (indexed in sorted order). Ids are ``<file>:<row>``.

Image paths (of list files and tables) are relative to ``--image-root`` (default: the folder of the first
input) and are read only inside it (see ``path_under_root``).

``classes.json`` (``{name: label}``, the names zero-shot evaluation prompts with) holds the class folder
names, label names or ClassLabel names, or their readable names from ``--class-names``: a JSON object
``{id: name}`` (``{"n01440764": "tench", ...}``), a JSON list of the names by label, or ``id<TAB>name`` lines
(ImageNet's space-separated ``LOC_synset_mapping.txt`` reads too). Integer labels used as given get a
``classes.json`` only from ``--class-names`` (a list by label, or ids ``0``, ``1``, ...). classes.json keys
are unique, so a readable name shared by several classes (ImageNet has two ``crane``s and two ``maillot``s)
is written ``name (id)`` for each of them, e.g. ``crane (n02012849)`` and ``crane (n03126707)``.

Mistakes in the input stop the run before the codebook loads or a worker starts: a table without the
fields (naming its columns), a class the ``--class-names`` file does not name, an image root under which
none of the first 50 image paths exists. No shard or manifest is written then: the corrected rerun starts afresh.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from flava_ds.shard_format import CLASSES_FILE, ID, IMAGE, LABEL, atomic_write_json
from preprocess.class_names import ClassNamesFile, class_index
from preprocess.common import add_common_args, converter_parser, output_lock
from preprocess.image_corpora import (
    IMAGE_FIELD_TYPES,
    LABEL_FIELD_TYPES,
    Corpus,
    ImageRecord,
    check_image_root,
    check_table_fields,
    folder_corpus,
    input_kind,
    list_corpus,
    table_corpus,
)
from preprocess.image_decoding import ImageSettings, SkipSample, load_square_image, path_under_root
from preprocess.image_shards import add_image_args, check_image_args, run_image_conversion
from preprocess.input_records import BAD_RECORD, BadRecord, InputError
from preprocess.readers import expand_inputs
from preprocess.shards import fixed_size_rows, fixed_size_shards
from preprocess.table_readers import TABLE_FORMATS

PROBE_RECORDS = 50  # path images looked up before the codebook loads, to catch a wrong image root

_worker: dict[str, Any] = {}


def _init_image_worker(settings: ImageSettings, image_root: str) -> None:
    """Per worker process: what ``prepare_image_record`` reads."""
    _worker.update(settings=settings, root=Path(image_root))


def prepare_image_record(record: tuple[int, ImageRecord | BadRecord]) -> dict | SkipSample:
    """(record index, (id, image, label) or BadRecord) -> prepared row or the reason to skip."""
    _, payload = record
    if isinstance(payload, BadRecord):
        return SkipSample(BAD_RECORD, f"{payload.where}: {payload.error}")
    sample_id, image, label = payload
    try:
        if isinstance(image, bytes):
            jpeg, view = load_square_image(image, _worker["settings"], sample_id)
        else:
            jpeg, view = load_square_image(path_under_root(_worker["root"], image), _worker["settings"])
    except SkipSample as skip:
        return skip
    return {ID: sample_id, IMAGE: jpeg, "view": view, LABEL: label}


def build_parser() -> argparse.ArgumentParser:
    parser, g = converter_parser(
        __doc__,
        "images",
        "input and labels",
        "a class-folder root; 'path label' list files; or .parquet / .arrow files, directories of them, a "
        "datasets.save_to_disk directory (globs are expanded)",
    )
    g.add_argument(
        "--image-root",
        help="folder the image paths of list files and tables are relative to (default: the folder of the first "
        "--input); paths resolving outside it are skipped (outside_image_root)",
    )
    g.add_argument("--image-field", default="image", help=f"table column holding {IMAGE_FIELD_TYPES}")
    g.add_argument("--label-field", default="label", help=f"table column holding {LABEL_FIELD_TYPES}")
    g.add_argument(
        "--class-names",
        type=Path,
        help="readable class names for classes.json: JSON {id: name} or [name by label], or 'id<TAB>name' lines",
    )
    add_image_args(parser)
    add_common_args(parser, default_shard_size=5000)
    return parser


def read_corpus(kind: str, paths: Sequence[str], args: argparse.Namespace) -> Corpus:
    """The input of `kind` (``input_kind``) as the flags ask for it."""
    if kind == "folders":
        return folder_corpus(Path(paths[0]))
    root = Path(args.image_root) if args.image_root else Path(paths[0]).parent
    if kind == "list":
        return list_corpus(paths, root)
    return table_corpus(paths, kind, args.image_field, args.label_field, root)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = check_image_args(parser, args)
    try:
        paths = expand_inputs(args.input)
        kind = input_kind(paths)
        if kind in TABLE_FORMATS:
            check_table_fields(paths, kind, args.image_field, args.label_field)
        names = ClassNamesFile.read(args.class_names) if args.class_names else None
        # before listing the input (a walk of a large tree, a scan of a label column) and the codebook
        with output_lock(args):
            corpus = read_corpus(kind, paths, args)
            records = iter(corpus.records)
            head = list(itertools.islice(records, PROBE_RECORDS))
            check_image_root(head, corpus.root)
            classes = class_index(corpus.labels, names)
            rc = run_image_conversion(
                args,
                "images",
                fixed_size_shards(itertools.chain(head, records), args.shard_size),
                fixed_size_rows(corpus.total, args.shard_size),
                prepare_image_record,
                _init_image_worker,
                (settings, str(corpus.root)),
                [(LABEL, pa.int64())],
                {},
            )
            # after the run, so a run refused for other settings leaves the earlier output's classes in place
            if classes is not None:
                atomic_write_json(Path(args.output) / CLASSES_FILE, classes)
            return rc
    except InputError as e:  # one line, exit code 2 (a usage error), like the other converters
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
