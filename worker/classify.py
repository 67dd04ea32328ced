"""Decide whether an article is about the Syrian peace talks, and pull out the facts it states.

`classify_article` is pure: text, title, language and publication date go in, a
`Classification` comes out. Everything the rules know (track names, envoys, venues, ordinal
words, cue words, month names) is data in `seeds/knowledge/`, read once by `load_knowledge`
and compiled once per knowledge version into prefix-trie regexes (module-level cache).

Spans. Every fact carries `Evidence(start, end, text)`. Offsets index the *document*
`compose_document(title, text)`, which is `title + "\\n\\n" + text` when the title is not
empty and `text` alone otherwise; `document[start:end] == evidence.text` always holds. A
fact with `start < len(title)` was found in the title.

How the label is reached (precision first: the realistic base rate of talks stories is near
zero, and a wrong "talks" costs more than a missed one):
1. Anchoring. Sentences are split cheaply. A talks word ("talks", "переговоры", "مفاوضات")
   counts for the Syrian talks when its sentence is anchored in Syria - a Syria word, a
   Syria-specific track name ("Astana process") or participant (de Mistura) - and no other
   conflict (Ukraine, Iran's nuclear file, the Taliban, Yemen, Libya, Kazakh news, post-2024
   Syria) outweighs that anchor in the same sentence. In a story centred on Syria, talks
   words in sentences that name no place count at half weight.
2. Main topic. Anchored talks words or a track name in the headline (the title, or the first
   sentence of an untitled item); or in the lead (next two sentences) when talks language
   also runs through the body; or a dispatch datelined at a talks venue whose lead reports
   diplomacy.
3. Specific. Generic "talks" next to "Syria" is not enough: a track, a known participant, a
   round, or words such as "peace talks" must tie the story to the peace talks.
4. Score. Headline, lead, body, tracks, participants and rounds add up to a score that must
   reach a threshold (lower for short items). A ceasefire headline without talks in the
   headline or lead makes a ceasefire story, not a talks story.
Below that: `related` when Syria diplomacy (a truce or the talks) is up front in a story
centred on Syria, `syria_other` for other Syria-centred stories, `other` for the rest.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from worker.errors import ConfigError

# Bump on any change to the rules or their meaning. Editing the knowledge files changes
# Knowledge.fingerprint instead, which every Classification records as knowledge_version.
RULES_VERSION = "classify-2026.11.1"

TITLE_SEPARATOR = "\n\n"
LABELS = ("talks", "related", "syria_other", "other")
RELATIONS = ("current", "earlier", "upcoming")
UNKNOWN_TRACK = "unknown"

DEFAULT_KNOWLEDGE_PATH = Path(__file__).resolve().parent.parent / "seeds" / "knowledge"


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """A span of the document (see compose_document) and the text it covers."""

    start: int
    end: int
    text: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"start": self.start, "end": self.end, "text": self.text}


@dataclass(frozen=True)
class TrackHit:
    """One piece of evidence that the article concerns a track."""

    track: str
    evidence: Evidence


@dataclass(frozen=True)
class DateRange:
    """A date or range stated in the text, resolved against the publication date."""

    start: date
    end: date
    evidence: Evidence


@dataclass(frozen=True)
class RoundMention:
    """A reference to a round: its track, number when stated or inferred, and relation.

    relation is `current` (the round the story is about), `earlier` or `upcoming`.
    """

    track: str | None
    number: int | None
    name: str | None
    relation: str
    date_range: tuple[date, date] | None
    evidence: Evidence
    venue: str | None = None


@dataclass(frozen=True)
class VenueHit:
    """A talks venue named in the text."""

    name: str
    evidence: Evidence


@dataclass(frozen=True)
class ActorHit:
    """A known participant named in the text, with the role it plays there."""

    name: str
    role: str
    side: str | None
    evidence: Evidence


@dataclass(frozen=True)
class Classification:
    """The label, its score and the facts found, each with its evidence.

    score is in [0, 1): the strength of the talks evidence, 0.5 at the `talks` threshold.
    """

    label: str
    score: float
    tracks: tuple[str, ...]
    track_hits: tuple[TrackHit, ...]
    rounds: tuple[RoundMention, ...]
    dates: tuple[DateRange, ...]
    venues: tuple[VenueHit, ...]
    actors: tuple[ActorHit, ...]
    rules_version: str
    # The anchored talks vocabulary that made the decision (headline and lead first).
    evidence: tuple[Evidence, ...] = ()
    # Knowledge.fingerprint of the data used: with rules_version, what made this decision.
    knowledge_version: str = ""
    # Named feature values behind the score, for inspection and re-tuning.
    signals: tuple[tuple[str, float], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for storage: dates as ISO strings, evidence as dicts."""

        def day(d: date | None) -> str | None:
            return d.isoformat() if d else None

        return {
            "label": self.label,
            "score": round(self.score, 4),
            "tracks": list(self.tracks),
            "track_hits": [
                {"track": h.track, "evidence": h.evidence.to_dict()} for h in self.track_hits
            ],
            "rounds": [
                {
                    "track": r.track,
                    "number": r.number,
                    "name": r.name,
                    "relation": r.relation,
                    "date_range": [day(r.date_range[0]), day(r.date_range[1])]
                    if r.date_range
                    else None,
                    "venue": r.venue,
                    "evidence": r.evidence.to_dict(),
                }
                for r in self.rounds
            ],
            "dates": [
                {"start": day(d.start), "end": day(d.end), "evidence": d.evidence.to_dict()}
                for d in self.dates
            ],
            "venues": [{"name": v.name, "evidence": v.evidence.to_dict()} for v in self.venues],
            "actors": [
                {"name": a.name, "role": a.role, "side": a.side, "evidence": a.evidence.to_dict()}
                for a in self.actors
            ],
            "rules_version": self.rules_version,
            "knowledge_version": self.knowledge_version,
            "evidence": [e.to_dict() for e in self.evidence],
            "signals": dict(self.signals),
        }


def compose_document(title: str | None, text: str) -> str:
    """The string every evidence span indexes: stripped title, a blank line, then the text."""
    title = (title or "").strip()
    return f"{title}{TITLE_SEPARATOR}{text}" if title else text


# ---------------------------------------------------------------------------------------------
# Knowledge (data from seeds/knowledge)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phrases:
    """Phrases matched case-insensitively, and acronyms matched exactly."""

    aliases: tuple[str, ...] = ()
    acronyms: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrackInfo:
    """A negotiation track and the names it goes by."""

    id: str
    label: str
    round_name: str | None
    weight: float
    specific: Phrases
    generic: Phrases
    numbered: tuple[str, ...]


@dataclass(frozen=True)
class VenueInfo:
    """A city that hosts rounds, the tracks that meet there, and look-alike phrases."""

    name: str
    tracks: tuple[str, ...]
    aliases: Phrases
    noise: Phrases


@dataclass(frozen=True)
class ActorInfo:
    """A participant: default role, roles the context may give it, and its weight."""

    name: str
    role: str
    side: str | None
    weight: float
    syria: bool
    aliases: Phrases
    context_roles: tuple[str, ...] = ()
    track_roles: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TermGroup:
    """A scored word group (see vocabulary.toml)."""

    id: str
    kind: str
    weight: float
    topic: str | None
    phrases: Phrases


@dataclass(frozen=True)
class RelativeDate:
    """A relative date phrase: unit (day, week, month) and offset from publication."""

    phrase: str
    unit: str
    offset: int


@dataclass(frozen=True)
class LanguageInfo:
    """Per-language words for rounds, cues and dates."""

    code: str
    ordinal_position: str
    ordinal_suffix_re: str
    numeric_ordinal_re: str
    number_prefix_re: str
    day_suffix_re: str
    round_nouns: tuple[str, ...]
    round_nouns_plural: tuple[str, ...]
    talks_nouns: tuple[str, ...]
    ordinals: tuple[tuple[int, tuple[str, ...]], ...]
    cardinals: tuple[tuple[int, tuple[str, ...]], ...]
    cues_before: tuple[tuple[str, tuple[str, ...]], ...]
    cues_after: tuple[tuple[str, tuple[str, ...]], ...]
    months: tuple[tuple[int, tuple[str, ...]], ...]
    month_prefixes: tuple[str, ...]
    period_prefixes: tuple[str, ...]
    since_words: tuple[str, ...]
    month_suffixes: tuple[str, ...]
    range_connectors: tuple[str, ...]
    relative: tuple[RelativeDate, ...]


@dataclass(frozen=True)
class Knowledge:
    """Everything the rules know, as data. `fingerprint` identifies its content."""

    tracks: tuple[TrackInfo, ...]
    venues: tuple[VenueInfo, ...]
    actors: tuple[ActorInfo, ...]
    groups: tuple[TermGroup, ...]
    role_cues: tuple[tuple[str, tuple[str, ...]], ...]
    languages: tuple[LanguageInfo, ...]
    fingerprint: str

    def track(self, track_id: str) -> TrackInfo | None:
        """The track with this id, if any."""
        for t in self.tracks:
            if t.id == track_id:
                return t
        return None


_KNOWLEDGE_FILES = ("tracks.toml", "venues.toml", "actors.toml", "vocabulary.toml")
_RELATION_CUES = ("earlier", "upcoming", "current", "latest")


def load_knowledge(path: Path | None = None) -> Knowledge:
    """Read the knowledge TOML files under `path` (default: the repo's seeds/knowledge)."""
    root = Path(path) if path is not None else DEFAULT_KNOWLEDGE_PATH
    data: dict[str, Any] = {}
    try:
        for name in _KNOWLEDGE_FILES:
            with (root / name).open("rb") as fh:
                data[name.removesuffix(".toml")] = tomllib.load(fh)
        languages = []
        for lang_file in sorted((root / "lang").glob("*.toml")):
            with lang_file.open("rb") as fh:
                languages.append(tomllib.load(fh))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"knowledge at {root} cannot be read: {exc}") from exc
    data["languages"] = languages
    return build_knowledge(data)


def build_knowledge(data: Mapping[str, Any]) -> Knowledge:
    """Turn parsed knowledge data (the TOML files as dicts) into a checked Knowledge."""
    fingerprint = hashlib.sha256(
        json.dumps(data, sort_keys=True, ensure_ascii=False, default=str).encode()
    ).hexdigest()[:16]
    try:
        tracks = tuple(_parse_track(t) for t in data["tracks"]["track"])
        track_ids = {t.id for t in tracks}
        venues = tuple(_parse_venue(v, track_ids) for v in data["venues"]["venue"])
        actors_file = data["actors"]
        actors = tuple(_parse_actor(a, track_ids) for a in actors_file["actor"])
        role_cues = tuple(
            (role, _phrase_list(words)) for role, words in actors_file.get("role_cues", {}).items()
        )
        groups = tuple(
            _parse_group(gid, g) for gid, g in data["vocabulary"].get("group", {}).items()
        )
        languages = tuple(_parse_language(lang) for lang in data["languages"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"knowledge data is invalid: {exc!r}") from exc
    if not languages:
        raise ConfigError("knowledge has no languages (seeds/knowledge/lang/*.toml)")
    return Knowledge(tracks, venues, actors, groups, role_cues, languages, fingerprint)


def _phrase_list(value: Any) -> tuple[str, ...]:
    """A flat list, or a table of language -> list, as one tuple of phrases."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Mapping):
        out: list[str] = []
        for lang, items in value.items():
            if lang != "acronyms":
                out.extend(_phrase_list(items))
        return tuple(out)
    return tuple(str(v) for v in value)


def _phrases(value: Any, acronyms: Any = None) -> Phrases:
    extra = value.get("acronyms") if isinstance(value, Mapping) else None
    return Phrases(_phrase_list(value), _phrase_list(acronyms) + _phrase_list(extra))


def _parse_track(t: Mapping[str, Any]) -> TrackInfo:
    return TrackInfo(
        id=str(t["id"]),
        label=str(t.get("label", t["id"])),
        round_name=t.get("round_name"),
        weight=float(t.get("weight", 1.0)),
        specific=_phrases(t.get("specific", ())),
        generic=_phrases(t.get("generic", ())),
        numbered=_phrase_list(t.get("numbered", ())),
    )


def _parse_venue(v: Mapping[str, Any], track_ids: set[str]) -> VenueInfo:
    tracks = _phrase_list(v.get("tracks", ()))
    unknown = set(tracks) - track_ids
    if unknown:
        raise ValueError(f"venue {v['name']} names unknown tracks {sorted(unknown)}")
    return VenueInfo(
        name=str(v["name"]),
        tracks=tracks,
        aliases=_phrases(v["aliases"]),
        noise=_phrases(v.get("noise", ())),
    )


def _parse_actor(a: Mapping[str, Any], track_ids: set[str]) -> ActorInfo:
    track_roles = tuple((str(k), str(r)) for k, r in a.get("track_roles", {}).items())
    unknown = {k for k, _ in track_roles} - track_ids
    if unknown:
        raise ValueError(f"actor {a['name']} names unknown tracks {sorted(unknown)}")
    return ActorInfo(
        name=str(a["name"]),
        role=str(a["role"]),
        side=a.get("side"),
        weight=float(a.get("weight", 0.0)),
        syria=bool(a.get("syria", False)),
        aliases=_phrases(a.get("aliases", ()), a.get("acronyms")),
        context_roles=_phrase_list(a.get("context_roles", ())),
        track_roles=track_roles,
    )


def _parse_group(gid: str, g: Mapping[str, Any]) -> TermGroup:
    kind = str(g["kind"])
    if kind not in ("syria", "talks", "diplomacy", "truce", "negative"):
        raise ValueError(f"group {gid} has unknown kind {kind}")
    words = {k: v for k, v in g.items() if k not in ("kind", "weight", "topic", "acronyms")}
    return TermGroup(
        id=gid,
        kind=kind,
        weight=float(g.get("weight", 1.0)),
        topic=g.get("topic"),
        phrases=Phrases(_phrase_list(words), _phrase_list(g.get("acronyms"))),
    )


def _numbered_table(table: Mapping[str, Any]) -> tuple[tuple[int, tuple[str, ...]], ...]:
    return tuple((int(k), _phrase_list(v)) for k, v in table.items())


def _parse_language(lang: Mapping[str, Any]) -> LanguageInfo:
    dates = lang.get("dates", {})

    def cues(table: Mapping[str, Any]) -> tuple[tuple[str, tuple[str, ...]], ...]:
        for rel in table:
            if rel not in _RELATION_CUES:
                raise ValueError(f"language {lang['code']}: unknown cue relation {rel}")
        return tuple((rel, _phrase_list(words)) for rel, words in table.items())

    return LanguageInfo(
        code=str(lang["code"]),
        ordinal_position=str(lang.get("ordinal_position", "before")),
        ordinal_suffix_re=str(lang.get("ordinal_suffix_re", "")),
        numeric_ordinal_re=str(lang.get("numeric_ordinal_re", "")),
        number_prefix_re=str(lang.get("number_prefix_re", "")),
        day_suffix_re=str(lang.get("dates", {}).get("day_suffix_re", "")),
        round_nouns=_phrase_list(lang.get("round_nouns", ())),
        round_nouns_plural=_phrase_list(lang.get("round_nouns_plural", ())),
        talks_nouns=_phrase_list(lang.get("talks_nouns", ())),
        ordinals=_numbered_table(lang.get("ordinals", {})),
        cardinals=_numbered_table(lang.get("cardinals", {})),
        cues_before=cues(lang.get("cues_before", {})),
        cues_after=cues(lang.get("cues_after", {})),
        months=_numbered_table(lang.get("months", {})),
        month_prefixes=_phrase_list(dates.get("month_prefixes", ())),
        period_prefixes=_phrase_list(dates.get("period_prefixes", ())),
        since_words=_phrase_list(lang.get("since_words", ())),
        month_suffixes=_phrase_list(dates.get("month_suffixes", ())),
        range_connectors=_phrase_list(dates.get("range_connectors", ())),
        relative=tuple(
            RelativeDate(str(r["phrase"]), str(r["unit"]), int(r["offset"]))
            for r in dates.get("relative", ())
        ),
    )


# ---------------------------------------------------------------------------------------------
# Text folding and phrase matching
# ---------------------------------------------------------------------------------------------

# Same-length folding, so offsets into the folded text are offsets into the document: quote
# and dash variants, Arabic hamza/maqsura forms, Russian ё, Turkish dotted/dotless i (İ is also
# the only character whose lower() is longer than one character).
_FOLD = str.maketrans(
    {
        "\u2019": "'",
        "\u2018": "'",
        "\u02bc": "'",
        "\u2032": "'",
        "`": "'",
        "\u00b4": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u00ab": '"',
        "\u00bb": '"',
        "\u2010": "-",
        "\u2011": "-",
        "\u2012": "-",
        "\u2013": "-",
        "\u2014": "-",
        "\u2212": "-",
        "\u00a0": " ",
        "\u202f": " ",
        "\u2009": " ",
        "أ": "ا",
        "إ": "ا",
        "آ": "ا",
        "ٱ": "ا",
        "ى": "ي",
        "ё": "е",
        "Ё": "Е",
        "İ": "I",
        "ı": "i",
    }
)


# str.translate with a dict walks every character in Python-level code; a regex finds the
# few characters that need folding ten times faster.
_FOLD_CHARS = re.compile("[" + "".join(re.escape(chr(c)) for c in _FOLD) + "]")


def _fold_char(m: re.Match[str]) -> str:
    return str(_FOLD[ord(m.group())])


def _fold(text: str) -> str:
    return _FOLD_CHARS.sub(_fold_char, text)


def _lower(text: str) -> str:
    """Folded and lower-cased, same length as the input."""
    return _fold(text).lower()


def _key(text: str) -> str:
    """Lookup key of a matched phrase: lower case, one space for any run of spaces/hyphens."""
    return re.sub(r"[\s\-]+", " ", _lower(text)).strip()


_SEP = "<SEP>"
_STAR = "<STAR>"
_SEP_RE = r"[\s\-]+"


def _tokens(phrase: str) -> list[str]:
    """Regex atoms of a phrase: escaped characters, separators, and word continuations."""
    words = [w for w in re.split(r"[\s\-]+", _lower(phrase).strip()) if w]
    out: list[str] = []
    for i, word in enumerate(words):
        if i:
            out.append(_SEP)
        star = word.endswith("*")
        out.extend(re.escape(ch) for ch in word.rstrip("*"))
        if star:
            out.append(_STAR)
    return out


def _atom(token: str) -> str:
    if token == _SEP:
        return _SEP_RE
    if token == _STAR:
        return r"\w*"
    return token


class _Trie:
    """Prefix tree of token lists, emitted as one regex whose alternatives share prefixes.

    Python's re tries alternatives one by one; sharing prefixes turns hundreds of phrases
    into a few dozen first-character branches. Patterns are built from lower-cased data and
    run on lower-cased text, because IGNORECASE makes the same search ten times slower.
    """

    def __init__(self) -> None:
        self.children: dict[str, _Trie] = {}
        self.terminal = False

    def add(self, tokens: Sequence[str]) -> None:
        node = self
        for tok in tokens:
            node = node.children.setdefault(tok, _Trie())
        node.terminal = True

    def regex(self) -> str:
        # A phrase that is a prefix of another makes the continuation an optional, greedy
        # group: the longest phrase at a position wins, and if its right boundary fails the
        # engine backtracks to the shorter one.
        alts = [_atom(tok) + child.regex() for tok, child in self.children.items()]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        if self.terminal:
            return "(?:" + body + ")?"
        return body


class _Category:
    """One named phrase set: a trie regex matched at candidate word starts, and payloads."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.trie = _Trie()
        self.exact: dict[str, list[Any]] = {}
        self.stems: list[tuple[re.Pattern[str], Any]] = []
        self.cache: dict[str, tuple[Any, ...]] = {}
        self.regex: re.Pattern[str] | None = None

    def add(self, tokens: list[str], phrase: str, payload: Any, tail: bool = False) -> None:
        if tail or _STAR in tokens:
            prefix = r"\w*" if tail else ""
            self.stems.append((re.compile(prefix + "".join(_atom(t) for t in tokens)), payload))
        else:
            self.exact.setdefault(_key(phrase), []).append(payload)
        if not tail:
            self.trie.add(tokens)

    def compile(self) -> None:
        if self.trie.children:
            self.regex = re.compile(self.trie.regex() + r"(?!\w)")

    def payloads(self, matched: str) -> tuple[Any, ...]:
        found = self.cache.get(matched)
        if found is None:
            out = list(self.exact.get(_key(matched), ()))
            low = _lower(matched)
            out.extend(p for rx, p in self.stems if rx.fullmatch(low))
            found = tuple(dict.fromkeys(out))  # keep order, drop repeats
            if len(self.cache) < 50_000:
                self.cache[matched] = found
        return found


@dataclass(frozen=True)
class _Hit:
    start: int
    end: int
    payloads: tuple[Any, ...]


# Arabic clitics glued to a word: conjunction, preposition, article ("والمفاوضات", "بجنيف").
_AR_CLITICS_RE = "(?:[وف]?(?:لل|[بلك]?(?:ال)?))"
_SCRIPT_PRESENT: dict[str, re.Pattern[str]] = {
    "cyrillic": re.compile("[\u0400-\u04ff]"),
    "arabic": re.compile("[\u0600-\u06ff]"),
}


def _script(token: str) -> str:
    """The script a phrase's first character belongs to (escaped tokens start with \\)."""
    ch = token.lstrip("\\")[:1]
    for script, rx in _SCRIPT_PRESENT.items():
        if ch and rx.match(ch):
            return script
    return "latin"


class _Scanner:
    """Finds the phrases of every category in one pass.

    Python's re tries a pattern at every position unless the pattern starts with a small
    character set. So one master pattern, starting with a separator (\\W) and followed by a
    trie of every phrase's first word, finds candidate word starts cheaply; each category's
    own trie is then matched only there. Per article this is one scan instead of a dozen.
    """

    def __init__(self, categories: Mapping[str, Iterable[tuple[Phrases, Any]]]) -> None:
        self.categories: dict[str, _Category] = {}
        first_by_script = {"latin": _Trie(), "cyrillic": _Trie(), "arabic": _Trie()}
        tails = _Trie()
        self._first_exact: dict[str, set[str]] = {}
        self._first_stems: list[tuple[re.Pattern[str], str]] = []
        self._tail_cats: list[str] = []
        self._acronyms: dict[str, list[tuple[str, Any]]] = {}
        for name, entries in categories.items():
            cat = _Category(name)
            self.categories[name] = cat
            for phrases, payload in entries:
                for phrase in phrases.aliases:
                    phrase = phrase.strip()
                    if not phrase:
                        continue
                    if phrase.startswith("*"):  # compound tail: "*runde"
                        toks = _tokens(phrase[1:])
                        cat.add(toks, phrase, payload, tail=True)
                        tails.add(toks)
                        if name not in self._tail_cats:
                            self._tail_cats.append(name)
                        continue
                    toks = _tokens(phrase)
                    cat.add(toks, phrase, payload)
                    head = toks[: toks.index(_SEP)] if _SEP in toks else toks
                    first_by_script[_script(head[0])].add(head)
                    if _STAR in head:
                        rx = re.compile("".join(_atom(t) for t in head))
                        self._first_stems.append((rx, name))
                    else:
                        self._first_exact.setdefault("".join(head).replace("\\", ""), set()).add(
                            name
                        )
                for acr in phrases.acronyms:
                    self._acronyms.setdefault(_fold(acr), []).append((name, payload))
            cat.compile()
        # One master per script, run only on text that holds that script: the Arabic one
        # also allows clitics, which would cost as much as the trie itself on Latin text.
        self._masters: list[tuple[re.Pattern[str] | None, re.Pattern[str]]] = []
        for script, trie in first_by_script.items():
            if not trie.children:
                continue
            clitics = f"({_AR_CLITICS_RE}?)" if script == "arabic" else "()"
            master = re.compile(rf"\W{clitics}({trie.regex()})(?!\w)")
            self._masters.append((_SCRIPT_PRESENT.get(script), master))
        self._tails = re.compile(tails.regex() + r"(?!\w)") if tails.children else None
        acronyms = sorted(self._acronyms, key=len, reverse=True)
        self._acr = (
            re.compile(r"\W(" + "|".join(re.escape(a) for a in acronyms) + r")(?!\w)")
            if acronyms
            else None
        )
        self._word_cats: dict[str, tuple[str, ...]] = {}

    def _categories_of(self, word: str) -> tuple[str, ...]:
        found = self._word_cats.get(word)
        if found is None:
            names = set(self._first_exact.get(word, ()))
            names.update(n for rx, n in self._first_stems if rx.fullmatch(word))
            found = tuple(sorted(names))
            if len(self._word_cats) < 100_000:
                self._word_cats[word] = found
        return found

    def scan(self, low: str, folded: str) -> dict[str, list[_Hit]]:
        """Hits per category; `low` is _lower(document) and `folded` is _fold(document)."""
        hits: dict[str, list[_Hit]] = {name: [] for name in self.categories}
        seen: set[tuple[str, int]] = set()

        def verify(pos: int, word_end: int) -> None:
            for name in self._categories_of(low[pos:word_end]):
                if (name, pos) in seen:
                    continue
                seen.add((name, pos))
                cat = self.categories[name]
                m = cat.regex.match(low, pos) if cat.regex else None
                if m:
                    payloads = cat.payloads(m.group())
                    if payloads:
                        hits[name].append(_Hit(pos, m.end(), payloads))

        padded = " " + low  # so a phrase at offset 0 also follows a separator
        for present, master in self._masters:
            if present is not None and not present.search(low):
                continue
            for m in master.finditer(padded):
                # Offsets in `padded` are one more than in `low`.
                word_start = m.start()
                phrase_start = m.start(2) - 1
                verify(phrase_start, m.end() - 1)
                if phrase_start != word_start:  # the clitic letters may belong to the phrase
                    verify(word_start, m.end() - 1)
        if self._tails is not None:
            for m in self._tails.finditer(low):
                start = m.start()
                while start > 0 and low[start - 1].isalnum():
                    start -= 1
                for name in self._tail_cats:
                    payloads = self.categories[name].payloads(low[start : m.end()])
                    if payloads:
                        hits[name].append(_Hit(start, m.end(), payloads))
        if self._acr is not None:
            for m in self._acr.finditer(" " + folded):
                for name, payload in self._acronyms[m.group(1)]:
                    hits[name].append(_Hit(m.start(1) - 1, m.end() - 1, (payload,)))
        for name, found in hits.items():
            if len(found) > 1:
                found.sort(key=lambda h: (h.start, -h.end))
                hits[name] = _drop_overlaps(found)
        return hits


class _Spans:
    """Non-overlapping spans kept sorted, so overlap and containment tests cost a bisect."""

    def __init__(self, spans: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in sorted(spans):
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._ends.insert(i, end)

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._starts, start)
        if i > 0 and self._ends[i - 1] > start:
            return True
        return i < len(self._starts) and self._starts[i] < end

    def covers(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end


def _drop_overlaps(hits: list[_Hit]) -> list[_Hit]:
    """Keep the leftmost-longest of overlapping hits (hits sorted by start, longest first)."""
    out: list[_Hit] = []
    end = -1
    for h in hits:
        if h.start >= end:
            out.append(h)
            end = h.end
    return out


def _alternation(words: Iterable[str], phrases: bool = True) -> str:
    """A plain alternation (for small per-language lists), longest first.

    With `phrases`, each word follows the phrase conventions (separators, trailing "*");
    otherwise it is matched literally.
    """
    pieces = []
    for w in sorted({w for w in words if w.strip()}, key=len, reverse=True):
        pieces.append("".join(_atom(t) for t in _tokens(w)) if phrases else re.escape(_lower(w)))
    return "(?:" + "|".join(pieces) + ")" if pieces else "(?!)"


# ---------------------------------------------------------------------------------------------
# Compiled knowledge (cached per fingerprint)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LangRules:
    code: str
    pre: re.Pattern[str]  # cue/ordinal before the noun, matched at word starts before it
    post: re.Pattern[str]  # ordinal/number/cue after the noun, matched at its end
    since: re.Pattern[str]  # "since" shortly after the noun, matched at its end
    ordinal_numbers: Mapping[str, int]


_ROMAN = {
    "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6, "VII": 7, "VIII": 8, "IX": 9, "X": 10,
    "XI": 11, "XII": 12, "XIII": 13, "XIV": 14, "XV": 15, "XVI": 16, "XVII": 17, "XVIII": 18,
    "XIX": 19, "XX": 20,
}  # fmt: skip
_ROMAN_BY_NUMBER = {n: r for r, n in _ROMAN.items()} | {1: "I"}


class _Compiled:
    """Every matcher and pattern the rules need, built once per knowledge fingerprint."""

    def __init__(self, k: Knowledge) -> None:
        self.knowledge = k
        track_entries: list[tuple[Phrases, Any]] = []
        for t in k.tracks:
            track_entries.append((t.specific, ("specific", t.id)))
            track_entries.append((t.generic, ("generic", t.id)))
        self.scanner = _Scanner(
            {
                "syria": [(g.phrases, g) for g in k.groups if g.kind == "syria"],
                # Separate from syria so "Syrien-Gespräche" is both a Syria word and talks.
                "vocab": [(g.phrases, g) for g in k.groups if g.kind != "syria"],
                "tracks": track_entries,
                "numbered": [(Phrases(t.numbered), t.id) for t in k.tracks if t.numbered],
                "venues": [(v.aliases, ("venue", v.name)) for v in k.venues]
                + [(v.noise, ("noise", v.name)) for v in k.venues],
                "actors": [(a.aliases, a) for a in k.actors],
                "role_cues": [(Phrases(words), role) for role, words in k.role_cues],
                "round_nouns": [
                    (Phrases(lang.round_nouns), (lang.code, False)) for lang in k.languages
                ]
                + [(Phrases(lang.round_nouns_plural), (lang.code, True)) for lang in k.languages],
                "talks_nouns": [(Phrases(lang.talks_nouns), lang.code) for lang in k.languages],
                "relative": [
                    (Phrases((r.phrase,)), r) for lang in k.languages for r in lang.relative
                ],
                "months": [
                    (Phrases(names), number)
                    for lang in k.languages
                    for number, names in lang.months
                ],
            }
        )
        self.venue_info = {v.name: v for v in k.venues}
        self.venue_by_key = {_key(a): v for v in k.venues for a in v.aliases.aliases}
        self.lang = {lang.code: _build_lang_rules(lang) for lang in k.languages}
        self._build_dates(k.languages)

    def _build_dates(self, languages: Sequence[LanguageInfo]) -> None:
        month_of: dict[str, int] = {}
        for lang in languages:
            for number, names in lang.months:
                for name in names:
                    month_of[_key(name)] = number
        self.month_of = month_of
        months = _alternation(month_of, phrases=False).replace(r"\ ", _SEP_RE)
        conn_words = sorted(
            {_lower(c) for lang in languages for c in lang.range_connectors if c.strip() != "-"},
            key=len,
            reverse=True,
        )
        words = "|".join(re.escape(w) for w in conn_words if len(w) > 1)
        glued = "".join(re.escape(w) for w in conn_words if len(w) == 1)  # Arabic و joins a word
        conn = r"\s*(?:[-/]|(?<!\w)(?:" + (words or "(?!)") + r")(?!\w)"
        conn += (r"|[" + glued + "]") if glued else ""
        conn += r")\s*"
        day_suffix = "|".join(
            f"(?:{lang.day_suffix_re})" for lang in languages if lang.day_suffix_re
        )
        day = rf"(\d{{1,2}})(?:{day_suffix or '(?!)'})?"
        year = r"(?:,?\s*((?:19|20)\d\d))?"
        self.date_day_first_cross = re.compile(
            rf"{day}\s*({months})\.?{conn}{day}\s*({months})\.?{year}(?!\w)"
        )
        self.date_day_first = re.compile(rf"{day}(?:{conn}{day})?\s*({months})\.?{year}(?!\w)")
        self.date_month_first = re.compile(rf"({months})\.?\s+{day}(?:{conn}{day})?{year}(?![\w])")
        self.date_month_year = re.compile(rf"({months})\.?,?\s+((?:19|20)\d\d)(?!\d)")
        points = _alternation(p for lang in languages for p in lang.month_prefixes)
        periods = _alternation(p for lang in languages for p in lang.period_prefixes)
        suffixes = [s for lang in languages for s in lang.month_suffixes]
        apostrophe = [re.escape(_lower(s)) for s in suffixes if s.startswith("'")]
        spaced = [re.escape(_lower(s)) for s in suffixes if not s.startswith("'")]
        suffix_re = (
            "|".join(
                ([r"\s+(?:" + "|".join(spaced) + ")"] if spaced else [])
                + (["(?:" + "|".join(apostrophe) + ")"] if apostrophe else [])
            )
            or "(?!)"
        )
        # Groups: 1 a period prefix (since/until), 2 the month after a prefix, 3 the month
        # before a suffix ("Mart ayında").
        self.period_before = re.compile(rf"(?<!\w){periods}\s+$")
        self.date_bare_month = re.compile(
            rf"(?<!\w)(?:(?:({periods})|{points})\s+({months})(?!\w)|({months})(?:{suffix_re})(?!\w))"
        )
        self.numbered_after = re.compile(
            r"(?:\s*-\s*|\s+)(\d{1,2})(?!\d)(?!\s*[-/.]\s*\d)(?!\s*(?:" + months + r")(?!\w))"
        )
        self.roman_after = re.compile(
            r"(?:\s*-\s*|\s+)(" + "|".join(sorted(_ROMAN, key=len, reverse=True)) + r")(?![\w-])"
        )


def _build_lang_rules(lang: LanguageInfo) -> _LangRules:
    ordinal_numbers: dict[str, int] = {}
    for number, words in lang.ordinals:
        for w in words:
            ordinal_numbers[_key(w)] = number
    for number, words in lang.cardinals:
        for w in words:
            ordinal_numbers[_key(w)] = number
    ords = _alternation(w for _, words in lang.ordinals for w in words)
    cards = _alternation(w for _, words in lang.cardinals for w in words)
    suffix = lang.ordinal_suffix_re
    num_suffix = lang.numeric_ordinal_re or "(?!)"

    def cue_groups(table: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
        parts = [f"(?P<c_{rel}>{_alternation(words)})" for rel, words in table if words]
        return "(?:" + "|".join(parts) + ")" if parts else "(?!)"

    before = cue_groups(lang.cues_before)
    after = cue_groups(lang.cues_after)
    word = r"[^\W\d][\w'-]*"
    # Everything is optional so that one search finds the leftmost (longest) reading; the
    # caller ignores a match that holds neither a cue nor an ordinal.
    pre = (
        rf"(?:(?<!\w){before}\s+)?"
        rf"(?:(?<!\w)(?P<ord>{ords}){suffix}\s+|(?<!\w)(?P<num>\d{{1,2}}){num_suffix}\s+)?"
        rf"(?:(?<!\w){word}\s+)?$"
    )
    post_parts = []
    if lang.ordinal_position in ("after", "both"):
        post_parts.append(
            rf"\s+(?:(?P<ord>{ords}){suffix}(?!\w)|(?P<card>{cards})(?!\w)"
            rf"|(?:{lang.number_prefix_re or '(?!)'})?(?P<num>\d{{1,2}})(?![\d]|[.,:]\d))"
            rf"(?:\s+{after}(?!\w))?"
        )
    post_parts.append(rf"\s+{after}(?!\w)".replace("(?P<c_", "(?P<d_"))
    post = "|".join(f"(?:{p})" for p in post_parts)
    since = rf"(?:\s+{word}){{0,3}}?\s+{_alternation(lang.since_words)}(?!\w)"
    return _LangRules(
        lang.code, re.compile(pre), re.compile(post), re.compile(since), ordinal_numbers
    )


# Compiled patterns per knowledge fingerprint: built on first use (~0.1 s), then shared by
# every call in the process. A handful of versions at most (tests build variants).
_COMPILED: dict[str, _Compiled] = {}
_COMPILED_MAX = 8


def _compiled(knowledge: Knowledge) -> _Compiled:
    found = _COMPILED.get(knowledge.fingerprint)
    if found is None:
        found = _Compiled(knowledge)
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[knowledge.fingerprint] = found
    return found


# ---------------------------------------------------------------------------------------------
# Document structure: sentences, headline, lead, dateline
# ---------------------------------------------------------------------------------------------

# Starts with one character class so the engine can skip quickly to candidates.
_SENTENCE_END = re.compile(r"[.!?؟。\n][.!?؟。]*[\"')\]]*\s*")
# "U.S." / "U.N." / initials and common abbreviations do not end a sentence.
_ABBREVIATION = re.compile(
    r"(?:\b[A-Za-z]\.(?:[A-Za-z]\.)*|\b(?:Mr|Mrs|Ms|Dr|St|Gen|Lt|Col|Sgt|Capt|Gov|Sen|Rep|Jan|"
    r"Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec|No|vs|etc|approx|Prof|Jr|Sr)\."
    # German and Turkish ordinals ("am 15. März", "4. Runde") are far commoner than
    # sentences that end in a one- or two-digit number.
    r"|(?<![\d.,])\b\d{1,2}\.)$"
)
_DATELINE = re.compile(
    r"\s*([A-Z][A-Z'.\- ]{2,40}(?:/[A-Z][A-Z'.\- ]{2,40})*)(?=\s*[-,(:]|\s+[A-Z])"
)


@dataclass
class _Doc:
    """The document and its cheap structure, shared by every extraction step."""

    text: str
    low: str
    folded: str
    title_end: int  # end of the title span, 0 when there is no title
    body_start: int
    starts: list[int]  # sentence start offsets
    head: set[int]  # sentence indexes of the headline
    lead: set[int]  # sentence indexes of the lead
    published: date | None

    def sentence(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos) - 1

    def sentence_span(self, idx: int) -> tuple[int, int]:
        end = self.starts[idx + 1] if idx + 1 < len(self.starts) else len(self.text)
        return self.starts[idx], end

    def evidence(self, start: int, end: int) -> Evidence:
        return Evidence(start, end, self.text[start:end])


def _sentence_starts(text: str, offset: int, end: int) -> list[int]:
    starts = [offset]
    for m in _SENTENCE_END.finditer(text, offset, end):
        nxt = m.end()
        if nxt >= end:
            break
        mark = m.group()
        if mark[0] != "\n" and not mark[-1].isspace():
            continue  # "3.5", "U.S"
        if mark[0] == ".":
            if _ABBREVIATION.search(text, max(offset, m.start() - 12), m.start() + 1):
                continue
            if text[nxt].islower():
                continue
        starts.append(nxt)
    return starts


# Only the first characters are read: a talks story states its subject early, and the cap
# bounds the cost of a pathological page. Spans still index the full document.
MAX_ANALYSED_CHARS = 60_000


def _build_doc(title: str | None, text: str, published: date | None) -> _Doc:
    doc = compose_document(title, text)[:MAX_ANALYSED_CHARS]
    title_end = len((title or "").strip())
    body_start = title_end + len(TITLE_SEPARATOR) if title_end else 0
    starts = (_sentence_starts(doc, 0, title_end) if title_end else []) + _sentence_starts(
        doc, body_start, len(doc)
    )
    starts = sorted(set(starts))
    title_sentences = {i for i, s in enumerate(starts) if s < title_end}
    body_sentences = [i for i, s in enumerate(starts) if s >= body_start]
    if title_sentences:
        head = title_sentences
        lead = set(body_sentences[:2])
    else:
        head = set(body_sentences[:1])
        lead = set(body_sentences[1:2])
    folded = _fold(doc)
    return _Doc(doc, folded.lower(), folded, title_end, body_start, starts, head, lead, published)


# ---------------------------------------------------------------------------------------------
# Dates
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DateHit:
    start: int
    end: int
    first: date
    last: date
    offset: int | None  # for relative dates: units from publication (relation comes from it)
    # "since January", "until March": a period's bound, reported but never a round's date
    period: bool = False


def _closest_year(month: int, day: int, published: date | None) -> int | None:
    """The year that puts month/day nearest to publication (articles rarely look >6 months)."""
    if published is None:
        return None
    best: tuple[int, int] | None = None
    for year in (published.year - 1, published.year, published.year + 1):
        gap = abs((date(year, month, min(day, 28)) - published).days)
        if best is None or gap < best[0]:
            best = (gap, year)
    return best[1] if best else None


def _month_range(year: int, month: int) -> tuple[date, date]:
    first = date(year, month, 1)
    nxt = date(year + (month == 12), month % 12 + 1, 1)
    return first, nxt - timedelta(days=1)


def _make_date(year: int, month: int, day: int) -> date | None:
    try:
        return date(year, month, day)
    except ValueError:
        return None


def _find_dates(c: _Compiled, d: _Doc, hits: Mapping[str, list[_Hit]]) -> list[_DateHit]:
    """Explicit dates around each month name, and relative phrases, resolved to ranges."""
    low, pub = d.low, d.published
    found: list[_DateHit] = []
    taken = _Spans()

    def free(s: int, e: int) -> bool:
        return (s == 0 or not low[s - 1].isalnum()) and not taken.overlaps(s, e)

    def month(name: str) -> int:
        return c.month_of[_key(name.rstrip("."))]

    def add(s: int, e: int, first: date | None, last: date | None, period: bool = False) -> bool:
        # Ranges longer than two months are not meeting dates ("March 2011" is kept: a month).
        if low[e - 1] == "." and (e == len(low) or low[e].isspace()):
            e -= 1  # "scheduled for May 3 and 4." - the period ends the sentence, not the day
        if first and last and first <= last and (last - first).days <= 62:
            found.append(_DateHit(s, e, first, last, None, period))
            taken.add(s, e)
            return True
        return False

    def year_of(y: str | None, m: int, dd: int) -> int | None:
        return int(y) if y else _closest_year(m, dd, pub)

    # Only the few windows around month names are parsed, which keeps dates cheap.
    for mh in hits.get("months", ()):
        ms, me = mh.start, mh.end
        if taken.overlaps(ms, ms + 1):
            continue
        window = (max(0, ms - 24), min(len(low), me + 40))
        m = next(
            (x for x in c.date_day_first_cross.finditer(low, *window) if x.start(2) == ms), None
        )
        if m and free(m.start(), m.end()):
            d1, m1, d2, m2, y = m.groups()
            mo1, mo2 = month(m1), month(m2)
            year2 = year_of(y, mo2, int(d2))
            if year2 is not None:
                year1 = year2 - 1 if mo1 > mo2 else year2
                first = _make_date(year1, mo1, int(d1))
                if add(m.start(), m.end(), first, _make_date(year2, mo2, int(d2))):
                    continue
        m = next((x for x in c.date_day_first.finditer(low, *window) if x.start(3) == ms), None)
        if m and free(m.start(), m.end()):
            d1, d2, mname, y = m.groups()
            mo = month(mname)
            year = year_of(y, mo, int(d1))
            if year is not None and add(
                m.start(),
                m.end(),
                _make_date(year, mo, int(d1)),
                _make_date(year, mo, int(d2 or d1)),
            ):
                continue
        m = c.date_month_first.match(low, ms, window[1])
        if m and free(m.start(), m.end()):
            mname, d1, d2, y = m.groups()
            mo = month(mname)
            year = year_of(y, mo, int(d1))
            if year is not None and add(
                m.start(),
                m.end(),
                _make_date(year, mo, int(d1)),
                _make_date(year, mo, int(d2 or d1)),
            ):
                continue
        m = c.date_month_year.match(low, ms, window[1])
        if m and free(m.start(), m.end()):
            first, last = _month_range(int(m.group(2)), month(m.group(1)))
            if add(m.start(), m.end(), first, last):
                continue
        if pub is None:
            continue
        m = c.date_bare_month.search(low, max(0, ms - 30), window[1])
        if m and (m.start(2) == ms or m.start(3) == ms) and free(m.start(), m.end()):
            mo = month(m.group(2) or m.group(3))
            year = _closest_year(mo, 15, pub)
            if year is not None:
                first, last = _month_range(year, mo)
                add(m.start(), m.end(), first, last, period=bool(m.group(1)))
    if pub is not None:
        for h in hits.get("relative", ()):
            if not free(h.start, h.end):
                continue
            rel: RelativeDate = h.payloads[0]
            first, last = _resolve_relative(rel, pub)
            period = bool(c.period_before.search(low, max(0, h.start - 16), h.start))
            found.append(_DateHit(h.start, h.end, first, last, rel.offset, period))
            taken.add(h.start, h.end)
    found.sort(key=lambda h: h.start)
    return found


def _resolve_relative(rel: RelativeDate, pub: date) -> tuple[date, date]:
    if rel.unit == "day":
        day = pub + timedelta(days=rel.offset)
        return day, day
    if rel.unit == "week":
        monday = pub - timedelta(days=pub.weekday()) + timedelta(weeks=rel.offset)
        return monday, monday + timedelta(days=6)
    month_index = pub.year * 12 + (pub.month - 1) + rel.offset
    return _month_range(month_index // 12, month_index % 12 + 1)


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------

# Thresholds and weights of the talks score (see the module docstring for the logic).
_TALKS_THRESHOLD = 6.0  # for a full article; short items need less (see _talks_threshold)
_SHORT_THRESHOLD = 4.0  # for a headline-and-lede item
_LEAD_DENSITY = 3.0  # anchored talks weight per 1,000 characters a lead-only story needs
_CONTEXT_FACTOR = 0.5  # talks words in an unanchored sentence of a Syria-centred story
_VENUE_TALKS_WINDOW = 90  # characters between a venue and a talks word for venue evidence
_DATELINE_TRACK = 1.0  # track evidence of a dispatch filed from a talks venue
_ROUND_DATE_BEFORE = 40
_ROUND_DATE_AFTER = 110
_NEAR = 110  # characters within which a track/venue name gives a round its track


def _talks_threshold(length: int) -> float:
    """Short items hold fewer words of evidence, so they need a lower score."""
    share = min(1.0, length / 1500)
    return _SHORT_THRESHOLD + (_TALKS_THRESHOLD - _SHORT_THRESHOLD) * share


@dataclass
class _Evidence:
    """Scores gathered over one document (all weights come from the knowledge data)."""

    syria_sent: dict[int, float] = field(default_factory=dict)
    neg_sent: dict[int, float] = field(default_factory=dict)
    neg_topics: dict[str, float] = field(default_factory=dict)
    syria_total: float = 0.0
    syria_head: float = 0.0
    neg_total: float = 0.0
    neg_head: float = 0.0
    syria_centred: bool = False
    head_talks: float = 0.0
    lead_talks: float = 0.0
    body_talks: float = 0.0
    head_truce: float = 0.0
    lead_truce: float = 0.0
    truce_total: float = 0.0
    lead_diplomacy: float = 0.0
    head_track: float = 0.0
    lead_track: float = 0.0
    track_score: dict[str, float] = field(default_factory=dict)
    track_evidence: dict[str, list[Evidence]] = field(default_factory=dict)
    track_pos: list[tuple[int, int, str]] = field(default_factory=list)
    numbered: list[tuple[int, int, str, int]] = field(default_factory=list)
    actor_weight: dict[str, float] = field(default_factory=dict)
    decisive: list[_Hit] = field(default_factory=list)
    strong_talks: float = 0.0  # anchored talks words of weight >= 1.5 ("peace talks")
    venue_hits: list[_Hit] = field(default_factory=list)  # venues outside look-alike phrases

    def anchored(self, sentence: int) -> bool:
        """The sentence is about Syria, and no other conflict outweighs that."""
        syr = self.syria_sent.get(sentence, 0.0)
        return syr > 0 and syr >= self.neg_sent.get(sentence, 0.0)

    def contextual(self, sentence: int) -> bool:
        """The sentence names no place, but the story is about Syria and names no conflict."""
        return self.syria_centred and self.neg_sent.get(sentence, 0.0) == 0

    def counts(self, sentence: int) -> bool:
        return self.anchored(sentence) or self.contextual(sentence)


def classify_article(
    *,
    text: str,
    title: str | None,
    language: str | None,
    published: date | None,
    knowledge: Knowledge,
) -> Classification:
    """Label an article (talks/related/syria_other/other) and extract its evidenced facts.

    Spans index compose_document(title, text). `language` is a hint only: every language's
    patterns run on every article, so a missing or wrong language loses nothing.
    """
    del language  # documented hint; all patterns run regardless
    c = _compiled(knowledge)
    d = _build_doc(title, text or "", published)
    hits = c.scanner.scan(d.low, d.folded)
    ev = _gather(c, d, hits)

    dates = _find_dates(c, d, hits)
    drafts = _draft_rounds(c, d, hits, ev, dates)
    # A numbered or dated round shows the story is about one meeting; a bare cue less so.
    round_weight = min(
        2.0,
        sum(
            1.0 if dr.number is not None or dr.date_hit is not None else 0.5
            for dr in drafts
            if ev.counts(d.sentence(dr.noun_start))
        ),
    )

    # A round named in the headline ("... arrive in Astana for fourth round") states the topic.
    head_rounds = sum(
        1.0
        for dr in drafts
        if (dr.number is not None or dr.cue) and d.sentence(dr.noun_start) in d.head
    )
    headline = ev.head_talks + ev.head_track + min(head_rounds, 1.0)
    lead = ev.lead_talks + ev.lead_track
    dateline = _dateline_venue(c, d)
    if dateline is not None and ev.syria_centred:
        # A dispatch filed from a talks venue whose lead reports diplomacy is about the meeting.
        venue, start, end = dateline
        lead += min(ev.lead_diplomacy, 1.0)
        ev.track_score[venue.tracks[0]] = ev.track_score.get(venue.tracks[0], 0.0) + _DATELINE_TRACK
        ev.track_evidence.setdefault(venue.tracks[0], []).append(d.evidence(start, end))
    track_total = sum(min(v, 6.0) for v in ev.track_score.values())
    actor_total = sum(ev.actor_weight.values())
    score = (
        2.0 * min(headline, 3.0)
        + 1.5 * min(lead, 3.0)
        + 0.4 * min(ev.body_talks, 10.0)
        + 0.5 * min(track_total, 6.0)
        + 0.5 * min(actor_total, 6.0)
        + 1.0 * round_weight
    )
    threshold = _talks_threshold(len(d.text))
    density = 1000.0 * (ev.body_talks + track_total) / max(len(d.text), 300)
    # The talks are the main topic when the headline says so, or when the lead does and
    # talks language runs through the story (a clause in the lead is not enough).
    main_topic = headline >= 1.0 or (lead >= 1.0 and density >= _LEAD_DENSITY)
    # Generic "talks" with Syria is not enough ("Syria and Israel hold talks"): something
    # must tie the story to the peace talks - a track, a participant, a round, or words
    # such as "peace talks" or "political process".
    specific = track_total + actor_total + round_weight + ev.strong_talks
    # A ceasefire headline makes a ceasefire story, unless a talks name opens the story.
    truce_led = ev.head_truce > 0 and headline < 1.0 and ev.lead_track < 1.5
    if ev.syria_total <= 0:
        label = "other"
    elif main_topic and not truce_led and specific >= 1.0 and score >= threshold:
        label = "talks"
    elif ev.syria_centred and (ev.head_truce + ev.lead_truce > 0 or headline + lead >= 1.0):
        # Syria diplomacy up front (a truce, or talks that are not the main topic); a war
        # story that mentions the talks further down stays syria_other.
        label = "related"
    elif ev.syria_centred:
        label = "syria_other"
    else:
        label = "other"

    ranked = sorted(ev.track_score.items(), key=lambda kv: -kv[1])
    tracks = tuple(t for t, v in ranked if v >= 1.0) if label in ("talks", "related") else ()
    if label == "talks" and not tracks:
        # A talks story with only weak track evidence (one venue named by the talks) is
        # still better placed on that track than on none.
        tracks = (ranked[0][0],) if ranked and ranked[0][1] > 0 else (UNKNOWN_TRACK,)
    main_track = tracks[0] if tracks and tracks[0] != UNKNOWN_TRACK else None
    rounds = _resolve_rounds(c, d, drafts, ev, main_track) if label in ("talks", "related") else ()
    signals = (
        ("headline", round(headline, 2)),
        ("lead", round(lead, 2)),
        ("body_talks", round(ev.body_talks, 2)),
        ("density", round(density, 2)),
        ("tracks", round(track_total, 2)),
        ("actors", round(actor_total, 2)),
        ("rounds", round(round_weight, 2)),
        ("specific", round(specific, 2)),
        ("truce", round(ev.truce_total, 2)),
        ("syria", round(ev.syria_total, 2)),
        ("negative", round(ev.neg_total, 2)),
        ("raw_score", round(score, 2)),
        ("threshold", round(threshold, 2)),
        *((f"negative:{t}", v) for t, v in sorted(ev.neg_topics.items())),
    )
    return Classification(
        label=label,
        # 0.5 at the talks threshold of this item's length, approaching 1 above it.
        score=score / (score + threshold) if score > 0 else 0.0,
        tracks=tracks,
        track_hits=tuple(TrackHit(t, e) for t in tracks for e in ev.track_evidence.get(t, ())),
        rounds=rounds,
        dates=tuple(DateRange(h.first, h.last, d.evidence(h.start, h.end)) for h in dates),
        venues=_venues(d, ev.venue_hits),
        actors=_actors(d, hits["actors"], hits["role_cues"], main_track),
        rules_version=RULES_VERSION,
        evidence=tuple(d.evidence(h.start, h.end) for h in ev.decisive),
        knowledge_version=knowledge.fingerprint,
        signals=signals,
    )


def _gather(c: _Compiled, d: _Doc, hits: dict[str, list[_Hit]]) -> _Evidence:
    """Anchors, vocabulary, track, venue and actor evidence of one document."""
    k = c.knowledge
    ev = _Evidence()
    sentence = d.sentence
    # Words inside a name are not vocabulary: "High Negotiations Committee" is an actor.
    names = _Spans((h.start, h.end) for h in hits["actors"])
    vocab = [h for h in hits["vocab"] if not names.covers(h.start, h.end)]
    negatives = _Spans((h.start, h.end) for h in vocab if h.payloads[0].kind == "negative")
    # Venue names inside look-alike phrases ("Geneva Conventions", "Air Astana") are dropped.
    ev.venue_hits = [
        h
        for h in hits["venues"]
        if h.payloads[0][0] == "venue" and not negatives.covers(h.start, h.end)
    ]

    def anchor(pos: int) -> None:
        s = sentence(pos)
        ev.syria_sent[s] = ev.syria_sent.get(s, 0.0) + 1.0
        ev.syria_total += 1.0
        if s in d.head:
            ev.syria_head += 1.0

    for h in hits["syria"]:
        anchor(h.start)
    for h in hits["actors"]:
        if any(a.syria for a in h.payloads):
            anchor(h.start)
    for h in hits["tracks"]:
        if any(p[0] == "specific" for p in h.payloads):
            anchor(h.start)
    for h in vocab:
        g: TermGroup = h.payloads[0]
        if g.kind == "negative":
            s = sentence(h.start)
            ev.neg_sent[s] = ev.neg_sent.get(s, 0.0) + g.weight
            ev.neg_total += g.weight
            topic = g.topic or g.id
            ev.neg_topics[topic] = ev.neg_topics.get(topic, 0.0) + g.weight
            if s in d.head:
                ev.neg_head += g.weight
    # A story is centred on Syria when its headline is, or Syria words dominate its body.
    ev.syria_centred = (ev.syria_head > 0 and ev.syria_head >= ev.neg_head) or (
        ev.syria_total >= 3 and ev.syria_total > 2 * ev.neg_total
    )

    talks_positions: list[int] = []
    for h in vocab:
        g = h.payloads[0]
        if g.kind == "negative":
            continue
        s = sentence(h.start)
        anchored = ev.anchored(s)
        if g.kind == "talks":
            if anchored:
                talks_positions.append(h.start)
                ev.body_talks += g.weight
                if g.weight >= 1.5:
                    ev.strong_talks += g.weight
                if s in d.head:
                    ev.head_talks += g.weight
                    ev.decisive.append(h)
                elif s in d.lead:
                    ev.lead_talks += g.weight
                    ev.decisive.append(h)
            elif ev.contextual(s):
                talks_positions.append(h.start)
                ev.body_talks += g.weight * _CONTEXT_FACTOR
        elif g.kind == "truce" and (anchored or ev.contextual(s)):
            ev.truce_total += g.weight
            if s in d.head:
                ev.head_truce += g.weight
            elif s in d.lead:
                ev.lead_truce += g.weight
        elif g.kind == "diplomacy" and s in d.lead and (anchored or ev.contextual(s)):
            ev.lead_diplomacy += g.weight

    def add_track(track_id: str, weight: float, start: int, end: int) -> None:
        ev.track_score[track_id] = ev.track_score.get(track_id, 0.0) + weight
        ev.track_evidence.setdefault(track_id, []).append(d.evidence(start, end))
        s = sentence(start)
        if s in d.head:
            ev.head_track += weight
        elif s in d.lead:
            ev.lead_track += weight

    for h in hits["tracks"]:
        s = sentence(h.start)
        for kind, track_id in h.payloads:
            info = k.track(track_id)
            if kind == "specific" or ev.counts(s):
                add_track(track_id, info.weight if info else 1.0, h.start, h.end)
                ev.track_pos.append((h.start, h.end, track_id))
                break

    for h in hits["numbered"]:
        m = c.numbered_after.match(d.low, h.end)
        number = int(m.group(1)) if m else None
        if m is None:
            m = c.roman_after.match(d.folded, h.end)
            number = _ROMAN[m.group(1)] if m else None
        if m is None or not number or not ev.counts(sentence(h.start)):
            continue
        track_id = h.payloads[0]
        info = k.track(track_id)
        add_track(track_id, info.weight if info else 1.0, h.start, m.end())
        ev.numbered.append((h.start, m.end(), track_id, number))
        ev.track_pos.append((h.start, m.end(), track_id))

    talks_positions.sort()
    for h in ev.venue_hits:
        venue = c.venue_info[h.payloads[0][1]]
        s = sentence(h.start)
        if not venue.tracks or ev.neg_sent.get(s, 0.0) > 0 or not ev.counts(s):
            continue
        i = bisect.bisect_left(talks_positions, h.start - _VENUE_TALKS_WINDOW)
        while i < len(talks_positions) and talks_positions[i] <= h.end + _VENUE_TALKS_WINDOW:
            if sentence(talks_positions[i]) == s:
                # "Talks in Astana" in a headline states the topic; in the body, a detail.
                add_track(venue.tracks[0], 1.0 if s in d.head else 0.5, h.start, h.end)
                break
            i += 1

    for h in hits["actors"]:
        actor: ActorInfo = h.payloads[0]
        if actor.syria or ev.counts(sentence(h.start)):
            ev.actor_weight[actor.name] = actor.weight
    return ev


def _dateline_venue(c: _Compiled, d: _Doc) -> tuple[VenueInfo, int, int] | None:
    """The talks venue a wire dispatch was filed from ("MUNICH (Reuters) -", "GENEVA/BEIRUT")."""
    m = _DATELINE.match(d.folded, d.body_start)
    if not m:
        return None
    first = m.group(1).split("/")[0].rstrip()
    venue = c.venue_by_key.get(_key(first))
    if venue is None or not venue.tracks:
        return None
    return venue, m.start(1), m.start(1) + len(first)


def _venues(d: _Doc, hits: Sequence[_Hit]) -> tuple[VenueHit, ...]:
    seen: dict[str, VenueHit] = {}
    for h in hits:
        name = h.payloads[0][1]
        if name not in seen:
            seen[name] = VenueHit(name, d.evidence(h.start, h.end))
    return tuple(seen.values())


def _actors(
    d: _Doc, hits: Sequence[_Hit], cue_hits: Sequence[_Hit], main_track: str | None
) -> tuple[ActorHit, ...]:
    cues_by_sentence: dict[int, set[str]] = {}
    for h in cue_hits:
        cues_by_sentence.setdefault(d.sentence(h.start), set()).update(h.payloads)
    out: dict[tuple[str, str], ActorHit] = {}
    for h in hits:
        actor: ActorInfo = h.payloads[0]
        role = dict(actor.track_roles).get(main_track or "", actor.role)
        cues = cues_by_sentence.get(d.sentence(h.start), set())
        for candidate in actor.context_roles:
            if candidate in cues:
                role = candidate
                break
        key = (actor.name, role)
        if key not in out:
            out[key] = ActorHit(actor.name, role, actor.side, d.evidence(h.start, h.end))
    return tuple(out.values())


# ---------------------------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------------------------


@dataclass
class _RoundDraft:
    start: int
    end: int
    noun_start: int
    noun_end: int
    track: str | None
    number: int | None
    cue: str | None
    plural: bool
    date_hit: _DateHit | None = None


def _draft_rounds(
    c: _Compiled,
    d: _Doc,
    hits: Mapping[str, list[_Hit]],
    ev: _Evidence,
    dates: Sequence[_DateHit],
) -> list[_RoundDraft]:
    """Round references: numbered names, round nouns with ordinals or cues, dated talks."""
    low = d.low
    talks_sentences = (
        {d.sentence(h.start) for h in hits["vocab"] if h.payloads[0].kind == "talks"}
        | {d.sentence(s) for s, _, _ in ev.track_pos}
        | {d.sentence(h.start) for h in ev.venue_hits}
    )
    drafts = [
        _RoundDraft(start, end, start, end, track_id, number, None, False)
        for start, end, track_id, number in ev.numbered
    ]
    taken = _Spans((dr.start, dr.end) for dr in drafts)
    for h in hits["round_nouns"]:  # in text order
        if taken.overlaps(h.start, h.end):
            continue
        s_idx = d.sentence(h.start)
        # "second round of voting" is no talks round: the sentence must speak of talks, and
        # of Syria's (not "a second round of Ukraine talks" quoted in a Syria story).
        if s_idx not in talks_sentences or not ev.counts(s_idx):
            continue
        s_start, s_end = d.sentence_span(s_idx)
        best: _RoundDraft | None = None
        for lang_code, plural in h.payloads:
            rules = c.lang.get(lang_code)
            draft = _read_round(rules, low, h, s_start, s_end, plural) if rules else None
            if draft and (best is None or _draft_rank(draft) > _draft_rank(best)):
                best = draft
        if best is None:
            # A bare noun ("a round of talks") is a round reference only with a date.
            plural = any(p for _, p in h.payloads)
            best = _RoundDraft(h.start, h.end, h.start, h.end, None, None, None, plural)
        drafts.append(best)
        taken.add(best.start, best.end)

    drafts.sort(key=lambda x: x.start)  # dates go to the earliest reference that can take them
    by_sentence: dict[int, list[_DateHit]] = {}
    for date_hit in dates:
        by_sentence.setdefault(d.sentence(date_hit.start), []).append(date_hit)
    used_dates: set[int] = set()
    for dr in drafts:
        dr.date_hit = _nearest_date(d, by_sentence, dr.noun_start, dr.noun_end, used_dates)
        if dr.date_hit is not None:
            used_dates.add(dr.date_hit.start)
    drafts = [dr for dr in drafts if dr.number is not None or dr.cue or dr.date_hit]
    near = _Spans((dr.start, dr.end) for dr in drafts)

    # Talks nouns with a date right beside them: "next week's talks", "talks on 14-15 March",
    # "the meeting runs May 3-4" (in a sentence about Syria or of a story about it).
    for h in hits["talks_nouns"]:
        if near.overlaps(h.start - 40, h.end + 40):
            continue
        if not ev.counts(d.sentence(h.start)):
            continue
        hit = _nearest_date(d, by_sentence, h.start, h.end, used_dates, before=30, after=45)
        if hit is None:
            continue
        used_dates.add(hit.start)
        drafts.append(_RoundDraft(h.start, h.end, h.start, h.end, None, None, None, False, hit))
        near.add(h.start, h.end)
    drafts.sort(key=lambda x: x.start)
    return drafts


def _resolve_rounds(
    c: _Compiled,
    d: _Doc,
    drafts: Sequence[_RoundDraft],
    ev: _Evidence,
    main_track: str | None,
) -> tuple[RoundMention, ...]:
    """Give each drafted reference its track, relation, inferred number and venue."""
    venues = sorted(ev.venue_hits, key=lambda h: h.start)
    venue_starts = [h.start for h in venues]
    tracks = sorted(ev.track_pos)
    track_starts = [t[0] for t in tracks]
    resolved: list[tuple[_RoundDraft, str | None, str]] = []
    for dr in drafts:
        track = dr.track or _near_track(
            c, d, dr, tracks, track_starts, venues, venue_starts, main_track
        )
        resolved.append((dr, track, _relation(dr, d.published)))
    resolved = _merge_dated_references(d, resolved)
    current_numbers: dict[str | None, set[int]] = {}
    for dr, track, relation in resolved:
        if relation == "current" and dr.number is not None:
            current_numbers.setdefault(track, set()).add(dr.number)
    mentions: list[RoundMention] = []
    for dr, track, relation in resolved:
        number = dr.number
        if number is None and dr.cue and not dr.plural and relation in ("earlier", "upcoming"):
            # "the previous round" of a story about round N is round N-1 of the same track.
            known = current_numbers.get(track, set())
            if len(known) == 1:
                number = next(iter(known)) + (1 if relation == "upcoming" else -1)
                number = number if number > 0 else None
        mentions.append(
            RoundMention(
                track=track,
                number=number,
                name=_round_name(c.knowledge, track, number),
                relation=relation,
                date_range=(dr.date_hit.first, dr.date_hit.last) if dr.date_hit else None,
                evidence=d.evidence(dr.start, dr.end),
                venue=_near_venue(d, dr, venues, venue_starts),
            )
        )
    return _share_round_facts(mentions)


def _merge_dated_references(
    d: _Doc, resolved: list[tuple[_RoundDraft, str | None, str]]
) -> list[tuple[_RoundDraft, str | None, str]]:
    """Give "the fourth round" the date of "the meeting runs May 3-4" a sentence or two on.

    A dated reference without number or cue that follows an undated numbered round of the
    same track and relation is the same meeting: its date moves to the round, and it goes.
    """
    out: list[tuple[_RoundDraft, str | None, str]] = []
    for dr, track, relation in resolved:
        plain = dr.number is None and dr.cue is None and dr.date_hit is not None
        if plain:
            sent = d.sentence(dr.noun_start)
            target = None
            for o, o_track, o_rel in reversed(out):  # out is in text order: stop 2 back
                if sent - d.sentence(o.noun_start) > 2:
                    break
                if (
                    o.number is not None
                    and o.date_hit is None
                    and (o_track, o_rel)
                    == (
                        track,
                        relation,
                    )
                ):
                    target = o
                    break
            if target is not None:
                target.date_hit = dr.date_hit
                continue
        out.append((dr, track, relation))
    return out


def _share_round_facts(mentions: list[RoundMention]) -> tuple[RoundMention, ...]:
    """Mentions of the same numbered round (title and body) share a date and venue."""
    groups: dict[tuple[str | None, int, str], list[RoundMention]] = {}
    for m in mentions:
        if m.number is not None:
            groups.setdefault((m.track, m.number, m.relation), []).append(m)
    out: list[RoundMention] = []
    for m in mentions:
        group = groups.get((m.track, m.number or 0, m.relation), [])
        ranges = {g.date_range for g in group if g.date_range}
        venues = {g.venue for g in group if g.venue}
        if m.number is not None and m.date_range is None and len(ranges) == 1:
            m = replace(m, date_range=next(iter(ranges)))
        if m.number is not None and m.venue is None and len(venues) == 1:
            m = replace(m, venue=next(iter(venues)))
        out.append(m)
    return tuple(out)


def _draft_rank(dr: _RoundDraft) -> tuple[int, int]:
    return (dr.number is not None, dr.cue is not None)


def _read_round(
    rules: _LangRules, low: str, h: _Hit, s_start: int, s_end: int, plural: bool
) -> _RoundDraft | None:
    """Ordinal, number and cue words around a round noun, in one language's word order."""
    w_start = max(s_start, h.start - 70)
    number: int | None = None
    cue: str | None = None
    start, end = h.start, h.end
    m = None
    for word_start in _word_starts_before(low, w_start, h.start, 4):
        m = rules.pre.match(low, word_start, h.start)
        if m:
            break
    if m:
        groups = m.groupdict()
        if groups.get("ord"):
            number = rules.ordinal_numbers.get(_key(groups["ord"]))
        elif groups.get("num"):
            number = int(groups["num"])
        cue = next(
            (rel for rel in _RELATION_CUES if groups.get(f"c_{rel}")),
            None,
        )
        if number is not None or cue:
            start = m.start()
    m = rules.post.match(low, h.end, min(s_end, h.end + 70))
    if m:
        groups = m.groupdict()
        if number is None and groups.get("ord"):
            number = rules.ordinal_numbers.get(_key(groups["ord"]))
        if number is None and groups.get("card"):
            number = rules.ordinal_numbers.get(_key(groups["card"]))
        if number is None and groups.get("num"):
            number = int(groups["num"])
        post_cue = next(
            (rel for rel in _RELATION_CUES if groups.get(f"c_{rel}") or groups.get(f"d_{rel}")),
            None,
        )
        cue = cue or post_cue
        if number is not None or post_cue:
            end = m.end()
    if number == 1 and rules.since.match(low, h.end, min(s_end, h.end + 40)):
        # "the first session since last month" means first in a while, not round one.
        number = None
    if number is None and cue is None:
        return None
    return _RoundDraft(start, end, h.start, h.end, None, number, cue, plural)


def _word_starts_before(low: str, lower_bound: int, pos: int, count: int) -> list[int]:
    """Start offsets of up to `count` words before `pos`, leftmost first."""
    starts: list[int] = []
    while len(starts) < count:
        j = max(low.rfind(" ", lower_bound, pos - 1), low.rfind("\n", lower_bound, pos - 1))
        if j < 0:
            if pos - 1 > lower_bound and lower_bound == 0:
                starts.append(0)
            break
        starts.append(j + 1)
        pos = j
    starts.reverse()
    return starts


def _nearest_date(
    d: _Doc,
    by_sentence: Mapping[int, list[_DateHit]],
    start: int,
    end: int,
    used: set[int],
    before: int = _ROUND_DATE_BEFORE,
    after: int = _ROUND_DATE_AFTER,
) -> _DateHit | None:
    """The closest unused, non-period date in the same sentence, within reach of a noun."""
    best: tuple[int, _DateHit] | None = None
    for hit in by_sentence.get(d.sentence(start), ()):
        if hit.period or hit.start in used:
            continue
        if hit.end <= start:
            gap = start - hit.end
            if gap > before:
                continue
        elif hit.start >= end:
            gap = hit.start - end
            if gap > after:
                continue
        else:
            gap = 0
        if best is None or gap < best[0]:
            best = (gap, hit)
    return best[1] if best else None


def _relation(dr: _RoundDraft, published: date | None) -> str:
    if dr.cue in ("earlier", "upcoming", "current"):
        return dr.cue
    hit = dr.date_hit
    if hit is not None:
        if hit.offset is not None:
            return "earlier" if hit.offset < 0 else "upcoming" if hit.offset > 0 else "current"
        if published is not None:
            if hit.last < published - timedelta(days=7):
                return "earlier"
            if hit.first > published + timedelta(days=7):
                return "upcoming"
    return "current"


def _window(starts: Sequence[int], noun_start: int, noun_end: int) -> range:
    """Indexes of sorted items that may lie within _NEAR characters of a noun."""
    # Names are short; 100 more characters to the left covers a long one ending nearby.
    lo = bisect.bisect_left(starts, noun_start - _NEAR - 100)
    hi = bisect.bisect_right(starts, noun_end + _NEAR)
    return range(lo, hi)


def _near_track(
    c: _Compiled,
    d: _Doc,
    dr: _RoundDraft,
    tracks: Sequence[tuple[int, int, str]],
    track_starts: Sequence[int],
    venues: Sequence[_Hit],
    venue_starts: Sequence[int],
    main_track: str | None,
) -> str | None:
    """The track named nearest to a round noun in its sentence, else the main track."""
    sent = d.sentence(dr.noun_start)
    best: tuple[int, str] | None = None
    for i in _window(track_starts, dr.noun_start, dr.noun_end):
        s, e, track_id = tracks[i]
        gap = max(s - dr.noun_end, dr.noun_start - e, 0)
        if gap <= _NEAR and d.sentence(s) == sent and (best is None or gap < best[0]):
            best = (gap, track_id)
    if best:
        return best[1]
    for i in _window(venue_starts, dr.noun_start, dr.noun_end):
        h = venues[i]
        venue = c.venue_info[h.payloads[0][1]]
        gap = max(h.start - dr.noun_end, dr.noun_start - h.end, 0)
        if (
            venue.tracks
            and gap <= _NEAR
            and d.sentence(h.start) == sent
            and (best is None or gap < best[0])
        ):
            best = (gap, main_track if main_track in venue.tracks else venue.tracks[0])
    return best[1] if best else main_track


def _near_venue(
    d: _Doc, dr: _RoundDraft, venues: Sequence[_Hit], venue_starts: Sequence[int]
) -> str | None:
    """The venue named nearest to a round noun in its sentence."""
    sent = d.sentence(dr.noun_start)
    best: tuple[int, str] | None = None
    for i in _window(venue_starts, dr.noun_start, dr.noun_end):
        h = venues[i]
        gap = max(h.start - dr.noun_end, dr.noun_start - h.end, 0)
        if gap <= _NEAR and d.sentence(h.start) == sent and (best is None or gap < best[0]):
            best = (gap, h.payloads[0][1])
    return best[1] if best else None


def _round_name(k: Knowledge, track: str | None, number: int | None) -> str | None:
    if track is None or number is None:
        return None
    info = k.track(track)
    if info is None or not info.round_name:
        return None
    return info.round_name.format(n=number, roman=_ROMAN_BY_NUMBER.get(number, str(number)))
