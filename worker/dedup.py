"""Dedup: canonical URLs, text fingerprints, MinHash/LSH signatures, match and diff rules.

Pure functions only: the store keeps what they compute and `worker.lineage` applies their
decisions inside the article's transaction. Thresholds are tuned on the development pairs
(docs/dedup.md says how and why); change them together with RULES_VERSION so stored
decisions can be told apart and reprocessed.
"""

from __future__ import annotations

import base64
import difflib
import functools
import hashlib
import re
import struct
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, urldefrag, urlsplit

import rensa
from courlan import normalize_url

# Bump whenever a threshold, the tokenizer or the signature parameters change.
RULES_VERSION = "dedup-1"

# Word 5-shingles: on the development pairs they separate wire copies (containment >= 0.82)
# from same-day stories that share background paragraphs (<= 0.46) with the widest margin.
SHINGLE_WORDS = 5
# 96 permutations in 32 bands of 3 rows: a pair is a candidate with probability
# 1-(1-J^3)^32, i.e. 0.96 at Jaccard 0.45 (the hardest labelled pair, an update that grew by
# 60%) and 5e-6 at J=0.02 (unrelated stories), so a lookup stays a few index probes.
NUM_PERM = 96
BAND_ROWS = 3
BANDS = NUM_PERM // BAND_ROWS
MINHASH_SEED = 20170502
SIGNATURE_METHOD = (f"rensa-RMinHash-v{rensa.RMinHash.ALGORITHM_VERSION}"
                    f"/w{SHINGLE_WORDS}/p{NUM_PERM}/b{BANDS}x{BAND_ROWS}/s{MINHASH_SEED}")

# Verification: share of the smaller text's shingles found in the larger one. Labelled
# copies score 0.82-1.0, the closest unlabelled pair 0.46; 0.6 sits between with margin.
NEAR_THRESHOLD = 0.6
# A later text that contains an earlier one and is this much longer is an update of it.
UPDATE_GROWTH = 1.15
# Below this many shingles (about two sentences) a shared quote would look like a copy,
# so short texts only ever match exactly.
MIN_NEAR_SHINGLES = 15
# A new version is material unless it only fixes typos: at most this share of words changed
# and no paragraph added or removed.
MATERIAL_WORD_CHANGE = 0.02

_WORD_RE = re.compile(r"\w+")
# Combining marks that writers add or drop freely: Latin accents, Hebrew points, Arabic
# harakat and Quranic marks. Removing them makes "Genève" and "Geneve" one token.
_MARKS_RE = re.compile("[\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061a"
                       "\u064b-\u065f\u0670\u06d6-\u06ed]")
_GOOGLE_REDIRECT_HOSTS = frozenset({"news.google.com", "www.google.com", "google.com"})
_GOOGLE_ARTICLE_PATH = re.compile(r"^/(?:rss/|__i/rss/rd/)?(?:articles|read)/([A-Za-z0-9_-]+)")


# --- URLs -------------------------------------------------------------------------------


def unwrap_redirect_url(url: str) -> str:
    """The target of a Google redirect link when it can be read offline, else the URL as is."""
    current = url.strip()
    for _ in range(3):  # a redirect can wrap another; three levels is plenty
        target = _google_target(current)
        if target is None or target == current:
            return current
        current = target
    return current


def _google_target(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.hostname not in _GOOGLE_REDIRECT_HOSTS:
        return None
    if parts.path in ("/url", "/news/url"):
        # Pre-2019 Google News and Google Search redirects carry the target in a parameter.
        query = parse_qs(parts.query)
        for name in ("url", "q"):
            for value in query.get(name, []):
                if value.startswith(("http://", "https://")):
                    return value
        return None
    match = _GOOGLE_ARTICLE_PATH.match(parts.path)
    if match and parts.hostname == "news.google.com":
        return _decode_google_article_id(match.group(1))
    return None


def _decode_google_article_id(article_id: str) -> str | None:
    # news.google.com/rss/articles/<id>: the id is base64url of a protobuf message. Ids issued
    # before mid-2024 ("CBMi…") hold the target URL as a length-delimited string field; newer
    # ones ("CBMi…AU_yqL…") hold only an opaque token that Google's own endpoint resolves, so
    # they cannot be read offline and stay as they are (docs/dedup.md).
    try:
        raw = base64.urlsafe_b64decode(article_id + "=" * (-len(article_id) % 4))
    except (ValueError, TypeError):
        return None
    for value in _protobuf_strings(raw):
        if value.startswith((b"http://", b"https://")):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return None
    return None


def _protobuf_strings(raw: bytes) -> Iterable[bytes]:
    # Just enough of the protobuf wire format to walk one message's top-level fields.
    pos = 0
    while pos < len(raw):
        key, pos = _varint(raw, pos)
        wire_type = key & 7
        if wire_type == 0:
            _, pos = _varint(raw, pos)
        elif wire_type == 2:
            length, pos = _varint(raw, pos)
            yield raw[pos:pos + length]
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            return


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < len(raw):
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return value, len(raw) + 1  # truncated: the caller's loop ends


@functools.lru_cache(maxsize=1024)
def canonicalize_url(url: str) -> str:
    """The canonical form of a URL: redirect unwrapped, normalized by courlan, no fragment.

    Cached: filing one article asks for the same few URLs' forms five times or so."""
    # courlan lower-cases scheme and host, drops default ports, sorts the query and removes
    # known trackers (utm_*, fbclid, ...); a fragment never names a different document.
    target = urldefrag(unwrap_redirect_url(url))[0]
    try:
        return normalize_url(target)
    except ValueError:  # a malformed port or host: keep the URL rather than fail the article
        return target


def url_variants(discovered_url: str) -> dict[str, str]:
    """Every form of a discovered URL worth keeping as an alias, mapped to its kind."""
    variants = {discovered_url: "discovered"}
    variants.setdefault(unwrap_redirect_url(discovered_url), "unwrapped")
    variants.setdefault(canonicalize_url(discovered_url), "normalized")
    return variants


def choose_canonical_url(final_url: str, declared_url: str | None) -> tuple[str, str]:
    """The URL that names the article, and where it came from ('declared' or 'fetched')."""
    # A page's rel=canonical / og:url wins (RFC 6596) when it names a page on the same host
    # family: it folds AMP, mobile, print and tracking variants into one. A declared URL on
    # another site is a syndication claim: taking it would file this outlet's copy under the
    # other outlet and lose the fact that this outlet carried the story, so it is only kept
    # as evidence. A declared site root is the usual template bug (or a bare <base href>).
    fetched = canonicalize_url(final_url)
    if not declared_url:
        return fetched, "fetched"
    declared = canonicalize_url(declared_url)
    parts = urlsplit(declared)
    if (parts.scheme not in ("http", "https") or parts.path in ("", "/")
            or site_of(declared) != site_of(fetched)):
        return fetched, "fetched"
    return declared, "declared"


def site_of(url: str) -> str:
    """The host of a URL without a leading 'www.', 'm.' or 'amp.' (how outlets are told apart)."""
    host = (urlsplit(url).hostname or "").lower()
    for prefix in ("www.", "m.", "amp.", "mobile."):
        if host.startswith(prefix):
            return host[len(prefix):]
    return host


# --- text -------------------------------------------------------------------------------


def tokenize_words(text: str) -> list[str]:
    """The text's words, NFKC-normalized, case-folded and without combining marks."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _WORD_RE.findall(_MARKS_RE.sub("", unicodedata.normalize("NFD", folded)))


def body_words(text: str, title: str | None = None) -> list[str]:
    """The words of an article's text without its headline, which outlets rewrite freely."""
    # trafilatura keeps an <h1> that sits inside <article> as the first line of the text.
    head, _, rest = text.partition("\n")
    if title and rest and tokenize_words(head) == tokenize_words(title):
        return tokenize_words(rest)
    return tokenize_words(text)


def shingle_words(words: Sequence[str], size: int = SHINGLE_WORDS) -> set[str]:
    """The set of word n-grams of a word list (the whole text as one shingle when shorter)."""
    if len(words) <= size:
        return {" ".join(words)} if words else set()
    # zip over shifted views rather than a slice per position: 100 µs against 150-180 µs for
    # a 400-word story, and candidates' texts are shingled again when they are verified.
    return set(map(" ".join, zip(*(words[i:] for i in range(size)), strict=False)))


def content_hash(text: str) -> str:
    """The hash of an article's exact text, kept as content_hash on articles and versions."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Signature:
    """What dedup keeps about one text: exact fingerprint, shingle count and LSH band keys."""

    fingerprint: str
    shingle_count: int
    band_keys: tuple[int, ...]
    method: str = SIGNATURE_METHOD


def sign_text(text: str, title: str | None = None) -> Signature:
    """Fingerprint and MinHash band keys of an article text (its headline left out)."""
    words = body_words(text, title)
    fingerprint = hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=16).hexdigest()
    shingles = shingle_words(words)
    minhash = rensa.RMinHash(num_perm=NUM_PERM, seed=MINHASH_SEED)
    minhash.update(list(shingles))  # MinHash is a min over the set: order is irrelevant
    return Signature(fingerprint, len(shingles), band_keys(minhash.digest()))


def band_keys(digest: Sequence[int]) -> tuple[int, ...]:
    """One signed 64-bit key per LSH band; the band number is hashed in, so keys never clash."""
    keys = []
    for band in range(BANDS):
        rows = digest[band * BAND_ROWS:(band + 1) * BAND_ROWS]
        packed = struct.pack(f"<H{BAND_ROWS}I", band, *rows)
        keys.append(int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(),
                                   "little", signed=True))
    return tuple(keys)


# --- matching ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Similarity:
    """Exact overlap of two shingle sets."""

    jaccard: float
    containment: float  # share of the smaller set found in the larger one
    new_size: int
    old_size: int


def compare_texts(new_shingles: set[str], old_text: str, old_title: str | None = None) -> Similarity:
    """Exact Jaccard and containment between a new text's shingles and a stored text."""
    old = shingle_words(body_words(old_text, old_title))
    common = len(new_shingles & old)
    union = len(new_shingles) + len(old) - common
    smaller = min(len(new_shingles), len(old))
    return Similarity(jaccard=common / union if union else 0.0,
                      containment=common / smaller if smaller else 0.0,
                      new_size=len(new_shingles), old_size=len(old))


def classify_match(sim: Similarity) -> str | None:
    """'update', 'near' or None: how a new text relates to an earlier one, by the tuned rules."""
    if min(sim.new_size, sim.old_size) < MIN_NEAR_SHINGLES:
        return None
    if sim.containment < NEAR_THRESHOLD:
        return None
    # A new URL whose text holds the earlier one plus more is an update (a write-through).
    if sim.new_size >= UPDATE_GROWTH * sim.old_size:
        return "update"
    return "near"


# --- versions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionDiff:
    """How one version of an article differs from the one before."""

    paragraphs_added: int
    paragraphs_removed: int
    paragraphs_changed: int
    words_before: int
    words_after: int
    word_similarity: float
    material: bool

    def summary(self) -> str:
        """A one-line human summary, e.g. '+2 paragraphs, 1 changed (412 -> 530 words)'."""
        parts = []
        if self.paragraphs_added:
            parts.append(f"+{self.paragraphs_added} paragraph{'s' * (self.paragraphs_added > 1)}")
        if self.paragraphs_removed:
            parts.append(f"-{self.paragraphs_removed} paragraph{'s' * (self.paragraphs_removed > 1)}")
        if self.paragraphs_changed:
            parts.append(f"{self.paragraphs_changed} changed")
        head = ", ".join(parts) or "wording only"
        return f"{head} ({self.words_before} -> {self.words_after} words)"


def diff_versions(old_text: str, new_text: str) -> VersionDiff:
    """Paragraph and word changes between two versions of one article, and whether they matter."""
    old_paras = [p.strip() for p in old_text.splitlines() if p.strip()]
    new_paras = [p.strip() for p in new_text.splitlines() if p.strip()]
    added = removed = changed = 0
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old_paras, new_paras,
                                                       autojunk=False).get_opcodes():
        if op == "insert":
            added += j2 - j1
        elif op == "delete":
            removed += i2 - i1
        elif op == "replace":
            common = min(i2 - i1, j2 - j1)
            changed += common
            added += (j2 - j1) - common
            removed += (i2 - i1) - common
    old_words, new_words = tokenize_words(old_text), tokenize_words(new_text)
    similarity = difflib.SequenceMatcher(None, old_words, new_words, autojunk=False).ratio()
    material = bool(added or removed) or (1.0 - similarity) > MATERIAL_WORD_CHANGE
    return VersionDiff(added, removed, changed, len(old_words), len(new_words),
                       round(similarity, 4), material)
