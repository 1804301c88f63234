"""Offline converters: raw corpora -> sharded, memory-mappable training data (docs/DESIGN.md §2).

``preprocess.common`` holds the machinery every converter shares (resumable shards, manifests, skips).
"""
