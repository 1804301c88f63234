"""Offline converters: raw corpora -> sharded, memory-mappable training data (see SPEC section 4).

``preprocess.common`` holds the machinery every converter shares (resumable shards, manifests, skips).
"""
