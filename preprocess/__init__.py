"""Offline converters: raw corpora -> sharded, memory-mappable training data (docs/DESIGN.md §2).

The converters are ``pairs``, ``images`` and ``text``. ``preprocess.common`` holds the machinery every converter
shares (flags, the output lock, the worker pool, the contract of resumable shards, manifests and skips; the run
itself is ``sharded_run``); ``readers`` reads the input formats.
"""
