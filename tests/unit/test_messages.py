"""Producer messages against their JSON Schemas: each way to be wrong has one precise reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from jsonschema import Draft202012Validator

from worker.contracts import (
    KINDS,
    REASONS,
    SCHEMAS_DIR,
    IngestDocument,
    IngestUrl,
    InvalidMessage,
    decode_message,
    load_validators,
    sniff_producer,
)
from worker.producer import build_document_message, build_url_message

URL_MESSAGE = {
    "type": "ingest_url",
    "version": 1,
    "producer": "newsroom-desk",
    "url": "https://Example.org/world/astana-talks?utm_source=rss&id=7#comments",
    "hints": {"published_at": "2017-05-03T09:30:00+03:00", "language": "fr-CH",
              "source_name": "Meridian Wire"},
}
DOC_MESSAGE = {
    "version": 1,
    "producer": "crawler-eu-1",
    "idempotency_key": "geneva4-ar-0001",
    "url": "https://mashreq.example/geneva4",
    "document": {"content": "<html><body><p>…</p></body></html>"},
}


def with_changes(base: dict[str, object], **changes: object) -> dict[str, object]:
    """A copy of a message with fields replaced (a value of ... removes the field)."""
    doc = json.loads(json.dumps(base))
    for key, value in changes.items():
        if value is ...:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def test_every_schema_file_is_valid_and_names_its_own_type_and_version() -> None:
    validators = load_validators()
    assert set(validators) == {(kind, 1) for kind in KINDS}
    for path in SCHEMAS_DIR.glob("*.schema.json"):
        schema = json.loads(path.read_text(encoding="utf-8"))
        Draft202012Validator.check_schema(schema)
        kind, version = path.name.split(".")[0], int(path.name.split(".")[1].lstrip("v"))
        assert schema["properties"]["type"]["const"] == kind
        assert schema["properties"]["version"]["const"] == version
        assert schema["$id"].endswith("/" + path.name)


def test_a_valid_url_message_is_typed_with_defaults_filled() -> None:
    message = decode_message(URL_MESSAGE, kind="ingest_url")
    assert isinstance(message, IngestUrl)
    assert message.producer == "newsroom-desk"
    # The key defaults to the canonical URL: host lower-cased, tracker and fragment gone.
    assert message.canonical_url == "https://example.org/world/astana-talks?id=7"
    assert message.idempotency_key == message.canonical_url
    assert message.hints.published_at == datetime(2017, 5, 3, 6, 30, tzinfo=UTC)
    assert message.hints.language == "fr"
    assert message.hints.source_name == "Meridian Wire"


def test_the_same_message_as_text_bytes_or_dict_decodes_alike() -> None:
    text = json.dumps(URL_MESSAGE)
    as_dict = decode_message(URL_MESSAGE, kind=None)
    assert decode_message(text, kind=None) == as_dict
    assert decode_message(text.encode(), kind="ingest_url") == as_dict


def test_a_document_message_defaults_to_html() -> None:
    message = decode_message(DOC_MESSAGE, kind="ingest_document")
    assert isinstance(message, IngestDocument)
    assert (message.content_type, message.idempotency_key) == ("text/html", "geneva4-ar-0001")
    assert message.hints.published_at is None


def test_a_date_without_an_offset_is_utc() -> None:
    doc = with_changes(URL_MESSAGE, hints={"published_at": "2018-01-30"})
    assert decode_message(doc, kind="ingest_url").hints.published_at == datetime(
        2018, 1, 30, tzinfo=UTC)


BIG = "x" * (2 * 1024 * 1024)

REJECTIONS = [
    ("not JSON", b'{"version": 1, "producer": "desk", "url": ', None, "not_json", "line 1"),
    ("not UTF-8", b"\xff\xfe{}", None, "not_json", ""),
    ("a JSON array", b"[1, 2]", "ingest_url", "not_an_object", "array"),
    ("missing url", with_changes(URL_MESSAGE, url=...), "ingest_url", "missing_field",
     "$: 'url' is a required property"),
    ("missing version", with_changes(URL_MESSAGE, version=...), "ingest_url", "missing_field",
     "'version'"),
    ("missing document content", with_changes(DOC_MESSAGE, document={"title": "t"}),
     "ingest_document", "missing_field", "$.document: 'content' is a required property"),
    ("no type on the stream", with_changes(URL_MESSAGE, type=...), None, "missing_field",
     "'type'"),
    ("url is a number", with_changes(URL_MESSAGE, url=42), "ingest_url", "wrong_type",
     "$.url: 42 is not of type 'string'"),
    ("version is text", with_changes(URL_MESSAGE, version="1"), "ingest_url", "wrong_type",
     "$.version"),
    ("hints is a list", with_changes(URL_MESSAGE, hints=["en"]), "ingest_url", "wrong_type",
     "$.hints"),
    ("unknown version", with_changes(URL_MESSAGE, version=7), "ingest_url", "unknown_version",
     "ingest_url version 7; this talkwire knows v1"),
    ("unknown type", with_changes(URL_MESSAGE, type="ingest_video"), None, "unknown_type",
     "ingest_video"),
    ("type differs from task", URL_MESSAGE, "ingest_document", "type_mismatch",
     "talkwire.ingest_document"),
    ("extra field", with_changes(URL_MESSAGE, priority="high"), "ingest_url", "unknown_field",
     "priority"),
    ("ftp url", with_changes(URL_MESSAGE, url="ftp://example.org/a"), "ingest_url",
     "invalid_value", "$.url"),
    ("bad producer id", with_changes(URL_MESSAGE, producer="has space"), "ingest_url",
     "invalid_value", "$.producer"),
    ("month 13", with_changes(URL_MESSAGE, hints={"published_at": "2017-13-01"}), "ingest_url",
     "invalid_value", "$.hints.published_at"),
    ("bad content type", with_changes(DOC_MESSAGE, document={"content": "x",
                                                             "content_type": "application/pdf"}),
     "ingest_document", "invalid_value", "$.document.content_type"),
    ("NUL in a hint", with_changes(URL_MESSAGE, hints={"source_name": "Wire\u0000"}),
     "ingest_url", "invalid_value", "$.hints.source_name"),
    ("NUL in the url", with_changes(URL_MESSAGE, url="https://wire.example/a\u0000b"),
     "ingest_url", "invalid_value", "$.url"),
    ("two megabytes of document", with_changes(DOC_MESSAGE, document={"content": BIG}),
     "ingest_document", "too_large", "bytes; the limit is 2097152"),
]


@pytest.mark.parametrize(("payload", "kind", "reason", "detail"),
                         [case[1:] for case in REJECTIONS], ids=[case[0] for case in REJECTIONS])
def test_each_broken_message_gets_its_precise_reason(payload: object, kind: str | None,
                                                     reason: str, detail: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode_message(payload, kind=kind)
    assert caught.value.reason == reason
    assert detail in caught.value.detail
    assert reason in REASONS


def test_a_rejection_names_the_producer_when_it_can() -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode_message(with_changes(URL_MESSAGE, url=42), kind="ingest_url")
    assert caught.value.producer == "newsroom-desk"
    assert caught.value.kind == "ingest_url"
    # Too large to parse: the producer is still read from the head of the bytes.
    big = json.dumps(with_changes(DOC_MESSAGE, document={"content": BIG})).encode()
    assert sniff_producer(big) == "crawler-eu-1"
    with pytest.raises(InvalidMessage) as caught:
        decode_message(big, kind=None)
    assert (caught.value.reason, caught.value.producer) == ("too_large", "crawler-eu-1")


def test_the_python_helper_builds_messages_the_schema_accepts() -> None:
    url_message = build_url_message("https://example.org/a", producer="desk",
                                    published_at=datetime(2019, 10, 30, tzinfo=UTC),
                                    language="en")
    assert decode_message(url_message, kind=None).hints.language == "en"
    doc = build_document_message("https://example.org/b", "Text " * 40, producer="desk",
                                 content_type="text/plain", title="A title",
                                 idempotency_key="b-1")
    decoded = decode_message(doc, kind="ingest_document")
    assert isinstance(decoded, IngestDocument)
    assert (decoded.title, decoded.idempotency_key) == ("A title", "b-1")
