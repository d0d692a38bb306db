"""The offline corpus and per-worker shards."""

from disttrain.data.corpus import BUNDLED_CORPUS, ByteCorpus, DataConfig, load_corpus

__all__ = ["BUNDLED_CORPUS", "ByteCorpus", "DataConfig", "load_corpus"]
