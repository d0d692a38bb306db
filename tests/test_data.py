"""The bundled corpus and per-worker shards."""

import pytest
import torch

from disttrain.data import ByteCorpus, DataConfig, load_corpus


def test_bundled_corpus_is_real_text_over_a_megabyte():
    text = load_corpus("kjv")
    assert len(text) > 1_000_000
    assert b"In the beginning God created the heavens and the earth." in text


def test_missing_corpus_names_the_path_and_the_fix():
    with pytest.raises(FileNotFoundError, match=r"corpus '/nope.txt' not found: pass --data.corpus kjv"):
        load_corpus("/nope.txt")


def test_a_text_file_can_replace_the_bundled_corpus(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"abcdefgh" * 2000)
    corpus = ByteCorpus(DataConfig(corpus=str(path), block_size=16), seed=0)
    x, y = corpus.train_batch(0, 0, 1)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_a_corpus_too_short_for_the_block_size_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_bytes(b"too short")
    with pytest.raises(ValueError, match="too few for block_size"):
        ByteCorpus(DataConfig(corpus=str(path)), seed=0)


def test_batches_are_a_function_of_seed_rank_and_step():
    corpus = ByteCorpus(DataConfig(), seed=3)
    assert torch.equal(corpus.train_batch(5, 1, 4)[0], corpus.train_batch(5, 1, 4)[0])
    assert not torch.equal(corpus.train_batch(5, 1, 4)[0], corpus.train_batch(5, 2, 4)[0])
    assert not torch.equal(corpus.train_batch(5, 1, 4)[0], corpus.train_batch(6, 1, 4)[0])


def test_contiguous_shards_are_disjoint_and_cover_the_training_text():
    corpus = ByteCorpus(DataConfig(sharding="contiguous"), seed=0)
    ranges = [corpus.shard_range(rank, 4) for rank in range(4)]
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert len(corpus.train) - ranges[-1][1] < 4


def test_validation_text_is_held_out_from_training():
    corpus = ByteCorpus(DataConfig(val_fraction=0.05), seed=0)
    assert len(corpus.val) == pytest.approx(0.05 * (len(corpus.train) + len(corpus.val)), rel=0.01)
    assert len(corpus.val_batches()) == DataConfig().val_batches
