#!/usr/bin/env python
"""Convert FLAVA checkpoints between flava_ds exports and `transformers` directories.

  python tools/convert_checkpoint.py to-hf   --input EXPORT_OR_HF_DIR --output HF_DIR [--codebook SPEC] [--metrics FILE]
  python tools/convert_checkpoint.py from-hf --input HF_DIR --output EXPORT_DIR
  python tools/convert_checkpoint.py codebook --input {random:SEED[:tiny] | CODEBOOK_DIR} --output CODEBOOK_DIR
  python tools/convert_checkpoint.py from-deepspeed --input SAVE_DIR [--tag global_stepN] --output EXPORT_DIR

`from-deepspeed` consolidates a training checkpoint (any ZeRO stage) into one fp32 model.safetensors, with
the checkpoint's tokenizer, image settings and training record; follow it with `to-hf` for a transformers
directory.

`to-hf` output loads with `transformers.FlavaForPreTraining.from_pretrained` (or FlavaModel); with --codebook the
dVAE weights are included (init_codebook=true), otherwise the codebook is left out (init_codebook=false). From an
export that records its tokenizer and image settings it also holds the tokenizer and preprocessor_config.json that
`FlavaProcessor.from_pretrained` loads, and a README.md model card (with --metrics, the run's metrics file, the
card lists the last evaluation).
"""

from __future__ import annotations

import argparse
import logging
import sys

from flava_ds.model import FlavaForPreTraining, load_codebook

log = logging.getLogger("convert_checkpoint")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["to-hf", "from-hf", "codebook", "from-deepspeed"])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--codebook", help="with to-hf: a codebook to include (random:SEED or a directory)")
    parser.add_argument("--tag", help="with from-deepspeed: the checkpoint tag (default: the 'latest' file)")
    parser.add_argument("--metrics", help="with to-hf: the run's metrics file, for the model card's evaluation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.direction == "from-deepspeed":
        from flava_ds.train.checkpoint import UntrustedCheckpointError, export

        try:
            export(args.input, args.output, args.tag)
        except UntrustedCheckpointError as err:
            sys.exit(f"convert_checkpoint: refused: {err}")
    elif args.direction == "codebook":
        load_codebook(args.input).save_hf_pretrained(args.output)
    elif args.direction == "to-hf":
        from flava_ds.train.hf_export import complete_hf_directory

        model = FlavaForPreTraining.from_pretrained(args.input)
        model.save_hf_pretrained(args.output, codebook=load_codebook(args.codebook) if args.codebook else None)
        complete_hf_directory(args.input, args.output, model.config, args.metrics)
    else:
        FlavaForPreTraining.from_hf_pretrained(args.input).save_pretrained(args.output)
    log.info("wrote %s (%s from %s)", args.output, args.direction, args.input)


if __name__ == "__main__":
    main()
