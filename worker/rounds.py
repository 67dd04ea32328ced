"""Facts plus the calendar of rounds → typed links: about, refers_to, announces.

Pure: the registry of rounds is passed in, nothing is read or written here. The linker
resolves, in this order of trust:
1. explicit references (track and number or name, e.g. "the fourth round of Astana talks");
2. references by date (a stated range that overlaps a round of the right track);
3. relative references ("the previous round", "next week's talks"), against the
   publication date and against the round the story is about;
4. for a talks story with no usable reference, the round of its main track that was on
   around the publication date.
It also proposes changes to the registry: a round it does not know yet (announced), new
dates for an announced round, or a postponement.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path

from worker.classify import Classification, Evidence, RoundMention

LINKER_VERSION = "rounds-2026.11.1"
CUES_PATH = Path(__file__).resolve().parent.parent / "seeds" / "knowledge" / "rounds.toml"
# The calendar of rounds the service ships (read by load_seed_rounds).
SEED_ROUNDS = Path(__file__).resolve().parent.parent / "seeds" / "rounds.csv"

RELATION_OF = {"current": "about", "earlier": "refers_to", "upcoming": "announces"}
LINKED_LABELS = frozenset({"talks", "related"})
# How far from a round's dates a story may be and still be "about" it: previews run a week
# or so ahead, and reactions and analysis trail for a few days.
ABOUT_BEFORE = timedelta(days=10)
ABOUT_AFTER = timedelta(days=4)
# A round mentioned by number but missing from the registry is only learned when it is
# announced for a date within this horizon; older numbers are history we lack, not news.
LEARN_HORIZON = timedelta(days=180)


@dataclass(frozen=True)
class Round:
    """One negotiation round as the registry knows it."""

    id: str
    track: str
    number: int | None
    name: str
    start: date | None
    end: date | None
    venue: str | None
    status: str


@dataclass(frozen=True)
class RoundLink:
    """A typed link from a story to a round, with its evidence and how it was found."""

    round_id: str
    relation: str  # about | refers_to | announces
    confidence: float
    evidence: Evidence
    method: str  # number | name | dates | relative | publication_date


@dataclass(frozen=True)
class RoundProposal:
    """A change the story suggests to the registry."""

    kind: str  # create | move | confirm | postpone | cancel
    track: str
    number: int | None
    start: date | None
    end: date | None
    venue: str | None
    evidence: Evidence
    round_id: str | None = None  # the round to change (move, postpone, cancel)


@dataclass(frozen=True)
class Linking:
    """The links and registry proposals for one story."""

    links: tuple[RoundLink, ...]
    proposals: tuple[RoundProposal, ...]


def link_rounds(result: Classification, *, document: str, published: date | None,
                registry: Sequence[Round]) -> Linking:
    """Link a classified story to rounds of the registry and propose registry changes."""
    if result.label not in LINKED_LABELS:
        return Linking((), ())
    links: list[RoundLink] = []
    proposals: list[RoundProposal] = []
    cues = _status_cues()
    # Explicit and dated mentions first, so relative ones can lean on the round found.
    ordered = sorted(result.rounds, key=lambda m: (m.number is None and m.date_range is None,
                                                   m.evidence.start))
    for mention in ordered:
        status = _status_near(document, mention.evidence, cues)
        found = _resolve(mention, published, registry, links)
        if found is None and mention.number is not None:
            # The wording put the number on the wrong track (a story about the UN round that
            # also names the ISSG, say): try the article's other tracks with that number.
            for track in result.tracks:
                if track != mention.track:
                    found = _resolve(replace(mention, track=track), published, registry, links)
                    if found:
                        break
        if found is None:
            proposal = _propose_new(mention, published, status)
            if proposal:
                proposals.append(proposal)
            continue
        rnd, method, confidence = found
        relation = _relation(mention, rnd, published)
        links.append(RoundLink(rnd.id, relation, confidence, mention.evidence, method))
        if status in {"postpone", "cancel"} and rnd.status in {"announced", "postponed"}:
            proposals.append(RoundProposal(status, rnd.track, rnd.number, None, None, None,
                                           mention.evidence, rnd.id))
        elif (rnd.status in {"announced", "postponed"} and mention.date_range
              and mention.date_range != (rnd.start, rnd.end) and relation != "refers_to"):
            proposals.append(RoundProposal("move", rnd.track, rnd.number, *mention.date_range,
                                           mention.venue, mention.evidence, rnd.id))
        elif (rnd.status == "announced" and relation == "about" and published and rnd.start
              and rnd.start <= published
              and (mention.date_range is None or mention.date_range[0] <= published)):
            # Coverage dated on or after the opening reports the round as under way.
            proposals.append(RoundProposal("confirm", rnd.track, rnd.number, None, None, None,
                                           mention.evidence, rnd.id))
    links.extend(_links_from_dates(result, published, registry, links))
    if not any(link.relation == "about" for link in links):
        fallback = _round_at_publication(result, published, registry)
        if fallback is not None:
            evidence = (result.track_hits[0].evidence if result.track_hits
                        else Evidence(0, 0, ""))
            links.append(RoundLink(fallback.id, "about", 0.5, evidence, "publication_date"))
    return Linking(_merge(links), tuple(proposals))


def _resolve(mention: RoundMention, published: date | None, registry: Sequence[Round],
             earlier_links: Sequence[RoundLink]) -> tuple[Round, str, float] | None:
    pool = [r for r in registry if r.status != "cancelled"
            and (mention.track is None or r.track == mention.track)]
    if mention.number is not None:
        numbered = [r for r in pool if r.number == mention.number]
        if mention.date_range:
            dated = [r for r in numbered if _overlaps(r, mention.date_range)]
            numbered = dated or numbered
        best = _nearest(numbered, published, mention.relation)
        return (best, "number", 0.95) if best else None
    if mention.date_range:
        dated = [r for r in pool if _overlaps(r, mention.date_range)]
        if mention.track is None:
            # A bare date range is weak evidence: accept it only when it picks one round.
            return (dated[0], "dates", 0.7) if len(dated) == 1 else None
        best = _nearest(dated, published, mention.relation)
        # Stated dates that match no round of the track are not a loose reference to some
        # other round: they may be a round the registry lacks.
        return (best, "dates", 0.85) if best else None
    if mention.track is None or published is None:
        return None
    return _resolve_relative(mention, published, pool, earlier_links)


def _resolve_relative(mention: RoundMention, published: date, pool: Sequence[Round],
                      earlier_links: Sequence[RoundLink]) -> tuple[Round, str, float] | None:
    dated = sorted((r for r in pool if r.start), key=lambda r: r.start or date.min)
    about_ids = {link.round_id for link in earlier_links if link.relation == "about"}
    anchor = next((r.start for r in dated if r.id in about_ids and r.start), published)
    if mention.relation == "earlier":
        # "The previous round": the last one that ended before the round this story is
        # about (or before publication when we do not know that round).
        before = [r for r in dated if (r.end or r.start or date.max) < anchor]
        return (before[-1], "relative", 0.75) if before else None
    if mention.relation == "upcoming":
        after = [r for r in dated if (r.start or date.min) > published
                 and r.id not in about_ids and (r.start or date.max) - published <= timedelta(days=120)]
        return (after[0], "relative", 0.75) if after else None
    around = [r for r in dated if _within_about_window(r, published)]
    return (around[0], "relative", 0.7) if around else None


def _nearest(rounds: Sequence[Round], published: date | None, relation: str) -> Round | None:
    if not rounds:
        return None
    if published is None:
        return rounds[0] if len(rounds) == 1 else None

    def distance(r: Round) -> tuple[int, int]:
        start = r.start or published
        end = r.end or start
        # Prefer rounds on the side of the publication date that the wording implies.
        wrong_side = ((relation == "earlier" and start > published)
                      or (relation == "upcoming" and end < published))
        gap = 0 if start <= published <= end else min(abs((start - published).days),
                                                      abs((end - published).days))
        return (int(wrong_side), gap)

    return min(rounds, key=distance)


def _relation(mention: RoundMention, rnd: Round, published: date | None) -> str:
    relation = RELATION_OF.get(mention.relation, "about")
    if published is None or rnd.start is None or rnd.status != "held":
        # Only a round known to have taken place has dates firm enough to overrule wording.
        return relation
    end = rnd.end or rnd.start
    # The calendar overrides the wording when they disagree: a round that ended weeks ago is
    # looked back to, and one that starts weeks from now is announced.
    if relation == "about" and end + ABOUT_AFTER < published:
        return "refers_to"
    if relation == "about" and rnd.start - ABOUT_BEFORE > published:
        return "announces"
    return relation


def _links_from_dates(result: Classification, published: date | None,
                      registry: Sequence[Round], found: Sequence[RoundLink]) -> list[RoundLink]:
    """Links from stated dates alone ("last month's talks", "the round in May")."""
    if published is None:
        return []
    linked = {link.round_id for link in found}
    extra: list[RoundLink] = []
    for stated in result.dates:
        span = (stated.start, stated.end)
        # Only dates that pick out exactly one round of the story's own tracks count: a month
        # that holds two rounds, or a date on which nothing of ours met, says nothing.
        matches = [r for r in registry if r.track in result.tracks and r.status != "cancelled"
                   and _overlaps(r, span)]
        if len(matches) != 1 or matches[0].id in linked:
            continue
        rnd = matches[0]
        end = rnd.end or rnd.start or stated.end
        relation = ("refers_to" if end < published - ABOUT_AFTER
                    else "announces" if (rnd.start or stated.start) > published + ABOUT_BEFORE
                    else "about")
        extra.append(RoundLink(rnd.id, relation, 0.6, stated.evidence, "dates"))
        linked.add(rnd.id)
    return extra


def _round_at_publication(result: Classification, published: date | None,
                          registry: Sequence[Round]) -> Round | None:
    if published is None or not result.tracks:
        return None
    # A talks story is about the round of its tracks that was on (or close) when it was
    # published; a story only related to the talks must fall within the round's own days.
    before, after = ((ABOUT_BEFORE, ABOUT_AFTER) if result.label == "talks"
                     else (timedelta(days=1), timedelta(days=1)))
    candidates = [r for r in registry if r.track in result.tracks and r.start
                  and r.status != "cancelled"
                  and r.start - before <= published <= (r.end or r.start) + after]
    return _nearest(candidates, published, "current")


def _within_about_window(rnd: Round, published: date) -> bool:
    """True when a story published then could be reporting on the round itself."""
    if rnd.start is None:
        return False
    end = rnd.end or rnd.start
    return rnd.start - ABOUT_BEFORE <= published <= end + ABOUT_AFTER


def _overlaps(rnd: Round, span: tuple[date, date]) -> bool:
    if rnd.start is None:
        return False
    end = rnd.end or rnd.start
    # One day of slack: reports in other time zones shift a date by one.
    return rnd.start - timedelta(days=1) <= span[1] and span[0] <= end + timedelta(days=1)


def _propose_new(mention: RoundMention, published: date | None,
                 status: str | None) -> RoundProposal | None:
    if (mention.track is None or mention.number is None or mention.date_range is None
            or published is None or status in {"postpone", "cancel"}):
        return None
    start, end = mention.date_range
    if not (published - timedelta(days=1) <= start <= published + LEARN_HORIZON):
        return None
    return RoundProposal("create", mention.track, mention.number, start, end, mention.venue,
                         mention.evidence)


def _merge(links: Sequence[RoundLink]) -> tuple[RoundLink, ...]:
    best: dict[tuple[str, str], RoundLink] = {}
    for link in links:
        key = (link.round_id, link.relation)
        if key not in best or link.confidence > best[key].confidence:
            best[key] = link
    about = {rid for rid, rel in best if rel == "about"}
    # A round the story is about is not also one it merely looks back to or announces.
    kept = [link for (rid, rel), link in best.items() if rel == "about" or rid not in about]
    return tuple(sorted(kept, key=lambda link: (link.relation != "about", link.evidence.start)))


@lru_cache(maxsize=4)
def _status_cues(path: Path = CUES_PATH) -> dict[str, re.Pattern[str]]:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    patterns: dict[str, re.Pattern[str]] = {}
    for status, by_language in data["status"].items():
        words = [w for phrases in by_language.values() for w in phrases]
        alternation = "|".join(re.escape(w.rstrip("*")) + (r"\w*" if w.endswith("*") else r"\b")
                               for w in sorted(words, key=len, reverse=True))
        key = {"postponed": "postpone", "cancelled": "cancel"}[status]
        patterns[key] = re.compile(rf"(?<!\w)(?:{alternation})", re.IGNORECASE)
    return patterns


def _status_near(document: str, evidence: Evidence,
                 cues: dict[str, re.Pattern[str]]) -> str | None:
    start = max(document.rfind(".", 0, evidence.start), document.rfind("\n", 0, evidence.start)) + 1
    ends = [i for i in (document.find(".", evidence.end), document.find("\n", evidence.end)) if i >= 0]
    sentence = document[start:min(ends) if ends else len(document)]
    for status, pattern in cues.items():
        if pattern.search(sentence):
            return status
    return None


def new_round_id(track: str, number: int | None, start: date | None) -> str:
    """The id a learned round gets: track and number, else track and start date."""
    if number is not None:
        return f"{track}_{number}"
    return f"{track}_{start:%Y_%m_%d}" if start else f"{track}_unnumbered"


__all__ = ["LINKER_VERSION", "Linking", "Round", "RoundLink", "RoundProposal", "link_rounds",
           "new_round_id"]


def load_seed_rounds(path: Path) -> list[Round]:
    """Read the shipped calendar of rounds (seeds/rounds.csv)."""
    import csv

    with path.open(encoding="utf-8", newline="") as handle:
        return [
            Round(
                id=row["round_id"],
                track=row["track"],
                number=int(row["number"]) if row["number"].strip() else None,
                name=row["name"],
                start=date.fromisoformat(row["start_date"]) if row["start_date"] else None,
                end=date.fromisoformat(row["end_date"]) if row["end_date"] else None,
                venue=row["venue"] or None,
                status=row["status"] or "held",
            )
            for row in csv.DictReader(handle)
        ]
