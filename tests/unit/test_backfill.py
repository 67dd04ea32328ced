"""The pure parts of `talkwire backfill`: what a line asks for, and lines read in bounds."""

from __future__ import annotations

import io

from worker.intake import backfill_item, read_lines


def test_a_bare_url_is_an_ingest_url_message_for_its_canonical_form() -> None:
    payload, kind = backfill_item("  https://Example.org/astana?utm_source=rss#top \r\n",
                                  "archive-desk") or (None, None)
    assert kind == "ingest_url"
    assert payload == {"version": 1, "producer": "archive-desk",
                       "url": "https://example.org/astana"}


def test_a_json_line_is_a_message_that_names_its_own_type() -> None:
    line = '{"type": "ingest_document", "version": 1}'
    assert backfill_item(line + "\n", "backfill") == (line, None)


def test_blank_lines_and_comments_ask_for_nothing() -> None:
    assert backfill_item("   \r\n", "backfill") is None
    assert backfill_item("# Astana 4, May 2017\n", "backfill") is None


def test_lines_longer_than_the_limit_are_cut_and_measured_whole() -> None:
    stream = io.BytesIO(b"short\n" + b"x" * 5000 + b"\n" + b"y" * 300 + b"\nlast")
    lines = list(read_lines(stream, 100))
    assert [(len(raw), size) for raw, size in lines] == [(6, 6), (101, 5001), (101, 301), (4, 4)]
    assert lines[0][0] == b"short\n" and lines[3][0] == b"last"
