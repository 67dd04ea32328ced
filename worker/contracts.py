"""Producer messages: raw payload in, a validated typed message out, or a precise rejection.

The contract is the JSON Schema files in `schemas/messages/` (`<type>.v<N>.schema.json`),
checked with `jsonschema`. Every way a message can be wrong maps to one stable reason code
(see `REASONS`), which lands in the `dead_letters` table. This module never touches the
database, Redis or Celery.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from worker.dedup import canonicalize_url
from worker.errors import Permanent

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas" / "messages"
KINDS = ("ingest_url", "ingest_document")
DEFAULT_MAX_BYTES = 2 * 1024 * 1024

# Stable reason codes of a rejected message (the `reason` column of dead_letters).
REASONS = {
    "not_json": "the payload is not JSON text",
    "not_an_object": "the payload is JSON but not an object",
    "too_large": "the payload exceeds TALKWIRE_MESSAGE_MAX_BYTES",
    "missing_field": "a required field is absent",
    "wrong_type": "a field has the wrong JSON type",
    "unknown_field": "a field the schema does not define",
    "invalid_value": "a field has the right type but a value the schema refuses",
    "unknown_type": "the message type is absent (stream) or not a talkwire message type",
    "type_mismatch": "the message's type differs from the task it was sent to",
    "unknown_version": "this talkwire does not know that schema version",
    "bad_arguments": "the Celery task got other than exactly one message argument",
    "idempotency_conflict": "the key was used before for a different message",
    "unsupported_content_type": "a Celery body in a serializer other than JSON",
    "internal_error": "talkwire failed on this message; replay it once fixed",
}
_SCHEMA_FILE = re.compile(r"^(?P<kind>[a-z_]+)\.v(?P<version>[1-9][0-9]*)\.schema\.json$")
# Best effort only, for naming the producer of a payload too large or broken to parse.
_PRODUCER_SNIFF = re.compile(rb'"producer"\s*:\s*"([A-Za-z0-9._:/@-]{1,64})"')


class InvalidMessage(Permanent):
    """A producer message that breaks the contract; it is dead-lettered, never retried."""

    def __init__(self, reason: str, detail: str, *, producer: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(reason, detail)
        self.producer = producer
        self.kind = kind


@dataclass(frozen=True)
class Hints:
    """What a producer says about an article, used only where the page says nothing."""

    published_at: datetime | None = None
    language: str | None = None
    source_name: str | None = None

    def as_json(self) -> dict[str, str]:
        """The hints as a JSON object (dates in ISO 8601), without the empty ones."""
        out: dict[str, str] = {}
        if self.published_at is not None:
            out["published_at"] = self.published_at.isoformat()
        if self.language is not None:
            out["language"] = self.language
        if self.source_name is not None:
            out["source_name"] = self.source_name
        return out


@dataclass(frozen=True)
class IngestUrl:
    """A validated ingest_url message."""

    version: int
    producer: str
    idempotency_key: str
    url: str
    canonical_url: str
    hints: Hints
    digest: str  # sha256 of the canonical JSON: the same key with another digest is key reuse

    @property
    def kind(self) -> str:
        """The message type."""
        return "ingest_url"


@dataclass(frozen=True)
class IngestDocument:
    """A validated ingest_document message: the article itself, to store without a fetch."""

    version: int
    producer: str
    idempotency_key: str
    url: str
    canonical_url: str
    hints: Hints
    digest: str
    content: str
    content_type: str
    title: str | None

    @property
    def kind(self) -> str:
        """The message type."""
        return "ingest_document"


Message = IngestUrl | IngestDocument


@lru_cache(maxsize=1)
def load_validators(directory: Path = SCHEMAS_DIR) -> dict[tuple[str, int], Draft202012Validator]:
    """Every message schema on disk, checked and compiled, by (type, version)."""
    validators: dict[tuple[str, int], Draft202012Validator] = {}
    for path in sorted(directory.glob("*.schema.json")):
        match = _SCHEMA_FILE.match(path.name)
        if not match:
            continue
        schema = json.loads(path.read_text(encoding="utf-8"))
        Draft202012Validator.check_schema(schema)
        validators[(match["kind"], int(match["version"]))] = Draft202012Validator(schema)
    return validators


def encode_payload(payload: object) -> bytes:
    """The bytes of a payload as received: bytes as they are, text as UTF-8, else its JSON."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        # surrogatepass: JSON may carry lone surrogates (\\ud800); keep them rather than fail.
        return payload.encode("utf-8", "surrogatepass")
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"),
                      default=str).encode("utf-8", "surrogatepass")


def sniff_producer(payload: object) -> str | None:
    """The producer a payload claims, without parsing it whole (for dead letters)."""
    if isinstance(payload, Mapping):
        value = payload.get("producer")
        return value[:64] if isinstance(value, str) else None
    match = _PRODUCER_SNIFF.search(encode_payload(payload)[:65536])
    return match.group(1).decode("ascii") if match else None


def decode_message(payload: object, *, kind: str | None, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Validate one producer message against its schema; raise InvalidMessage with a reason.

    `payload` is raw bytes or text (the Redis stream, a replay), or what a JSON decoder already
    made of it (a Celery argument). `kind` is the task's message type, or None when the
    message must name its own (the stream).
    """
    raw = encode_payload(payload)
    if len(raw) > max_bytes:
        raise InvalidMessage("too_large", f"{len(raw)} bytes; the limit is {max_bytes}",
                             producer=sniff_producer(payload), kind=kind)
    if isinstance(payload, (bytes, str)):
        try:
            doc: Any = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidMessage("not_json", str(exc)[:300], producer=sniff_producer(raw),
                                 kind=kind) from None
    else:
        doc = payload
    if not isinstance(doc, dict):
        raise InvalidMessage("not_an_object", f"got a JSON {_json_type(doc)}", kind=kind)
    producer = doc.get("producer") if isinstance(doc.get("producer"), str) else None
    producer = producer[:64] if producer else None
    kind = _message_kind(doc, kind, producer)
    validator = _validator_for(doc, kind, producer)
    error = best_match(validator.iter_errors(doc))
    if error is not None:
        raise InvalidMessage(_reason_for(error), _detail_for(error), producer=producer, kind=kind)
    return _build_message(doc, kind)


def _message_kind(doc: dict[str, Any], kind: str | None, producer: str | None) -> str:
    declared = doc.get("type")
    if kind is None:
        if "type" not in doc:
            raise InvalidMessage("missing_field", "$: 'type' is required on the stream",
                                 producer=producer)
        if not isinstance(declared, str):
            raise InvalidMessage("wrong_type", f"$.type: {declared!r} is not of type 'string'",
                                 producer=producer)
        if declared not in KINDS:
            raise InvalidMessage("unknown_type", f"$.type: {declared[:80]!r} is not one of "
                                 f"{list(KINDS)}", producer=producer)
        return declared
    if "type" in doc and declared != kind:
        raise InvalidMessage("type_mismatch", f"$.type: {str(declared)[:80]!r} sent to "
                             f"talkwire.{kind}", producer=producer, kind=kind)
    return kind


def _validator_for(doc: dict[str, Any], kind: str, producer: str | None) -> Draft202012Validator:
    validators = load_validators()
    if "version" not in doc:
        raise InvalidMessage("missing_field", "$: 'version' is a required property",
                             producer=producer, kind=kind)
    version = doc["version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidMessage("wrong_type", f"$.version: {version!r} is not of type 'integer'",
                             producer=producer, kind=kind)
    validator = validators.get((kind, version))
    if validator is None:
        known = sorted(v for k, v in validators if k == kind)
        raise InvalidMessage("unknown_version", f"{kind} version {version}; this talkwire "
                             f"knows {', '.join(f'v{v}' for v in known)}",
                             producer=producer, kind=kind)
    return validator


def _reason_for(error: ValidationError) -> str:
    if error.validator == "required":
        return "missing_field"
    if error.validator == "type":
        return "wrong_type"
    if error.validator in {"additionalProperties", "unevaluatedProperties"}:
        return "unknown_field"
    return "invalid_value"


def _detail_for(error: ValidationError) -> str:
    message = error.message
    if len(message) > 300:
        message = message[:300] + "…"
    return f"{error.json_path}: {message}"


def _build_message(doc: dict[str, Any], kind: str) -> Message:
    producer: str = doc["producer"]
    url: str = doc["url"].strip()
    try:
        canonical = canonicalize_url(url)
    except ValueError as exc:
        raise InvalidMessage("invalid_value", f"$.url: {exc}", producer=producer,
                             kind=kind) from None
    hints = _build_hints(doc.get("hints") or {}, producer, kind)
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False,
                                       separators=(",", ":")).encode("utf-8", "surrogatepass")
                            ).hexdigest()
    common = {
        "version": doc["version"],
        "producer": producer,
        # Issue 7: the key defaults to producer plus canonical URL (producer is the other half
        # of the unique key in the submissions table).
        "idempotency_key": doc.get("idempotency_key") or canonical,
        "url": url,
        "canonical_url": canonical,
        "hints": hints,
        "digest": digest,
    }
    if kind == "ingest_url":
        return IngestUrl(**common)
    document = doc["document"]
    return IngestDocument(**common, content=document["content"],
                          content_type=document.get("content_type", "text/html"),
                          title=(document.get("title") or "").strip() or None)


def _build_hints(hints: dict[str, Any], producer: str, kind: str) -> Hints:
    published = None
    if "published_at" in hints:
        try:
            published = datetime.fromisoformat(hints["published_at"].replace("z", "Z"))
        except ValueError as exc:
            raise InvalidMessage("invalid_value", f"$.hints.published_at: {exc}",
                                 producer=producer, kind=kind) from None
        if published.tzinfo is None:
            published = published.replace(tzinfo=UTC)
    language = hints["language"].split("-")[0].lower() if "language" in hints else None
    source = hints["source_name"].strip() or None if "source_name" in hints else None
    return Hints(published_at=published, language=language, source_name=source)


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null"
