"""Producers: the synthetic corpus, fetch (download -> decode -> resize -> image shards), images,
text (tokenizers), sources, and preprocess (into the cache). See README.md beside this file."""
