"""Files one article into the story graph inside the caller's transaction (issue 6).

Part of the pipeline layer: it applies `worker.dedup`'s pure rules through `worker.store`
and knows nothing of Celery. Each call decides one article (or one new version of it) and
records the decision with its method, score and evidence, plus every change it made to
stories (created, merged, split, representative changed) and to versions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import psycopg

from worker import dedup, store
from worker.types import Article, Page

# Candidates verified per lookup: the LSH query returns them most-shared-bands first, and a
# real copy shares many bands, so the tail is only ever chance collisions.
MAX_CANDIDATES = 20


@dataclass(frozen=True)
class Filed:
    """Where one article ended up: the article holding its text, how it matched, its story."""

    article_id: int
    method: str  # url | alias | exact | near | update | unique
    score: float
    matched_article_id: int | None
    story_id: int | None
    version: int
    new_version: bool = False


@dataclass(frozen=True)
class Match:
    """A stored article that a text copies, updates or repeats, with the evidence."""

    article_id: int
    story_id: int
    method: str  # exact | near | update
    score: float
    evidence: dict[str, object] = field(default_factory=dict)


def _key(namespace: str, value: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{namespace}:{value}".encode(), digest_size=8).digest(),
                          "little", signed=True)


def lock_for(conn: psycopg.Connection, *, urls: list[str], signature: dedup.Signature,
             also: Sequence[str] = ()) -> None:
    """Serialize against any concurrent filing of the same URL, text or near-copy (and of
    the texts whose fingerprints are in `also`)."""
    fingerprints = (signature.fingerprint, *also)
    keys = ([_key("url", u) for u in urls] + [_key("fp", fp) for fp in fingerprints]
            + list(signature.band_keys))
    store.lock_dedup_keys(conn, keys)


def file_known_url(conn: psycopg.Connection, article_id: int, owner_id: int,
                   urls: dict[str, str]) -> Filed | None:
    """Before any fetch: this row's URL is an alias of a stored article, so it is a duplicate."""
    if not store.mark_duplicate(conn, article_id, owner_id):
        return None
    store.move_entries(conn, article_id, owner_id)
    store.add_aliases(conn, owner_id, urls.items())
    owner = store.get_dedup_row(conn, owner_id)
    version = owner.version if owner else 0
    store.record_decision(conn, article_id, version=version, method="alias", score=1.0,
                          matched_article_id=owner_id, story_id=owner.story_id if owner else None,
                          evidence={"urls": urls}, rules_version=dedup.RULES_VERSION)
    return Filed(owner_id, "alias", 1.0, owner_id, owner.story_id if owner else None, version)


def file_article(conn: psycopg.Connection, article_id: int, *, page: Page, article: Article,
                 signature: dedup.Signature, urls: dict[str, str]) -> Filed | None:
    """Store a pending article's text and file it: same URL (new version?), exact, near,
    update or unique. None, with nothing written, if the article is no longer pending."""
    canonical, source = dedup.choose_canonical_url(page.final_url, article.canonical_url)
    lock_for(conn, urls=[canonical], signature=signature)
    aliases = {canonical: "canonical", **urls, dedup.canonicalize_url(page.final_url): "final",
               page.final_url: "final"}
    if source == "declared" and article.canonical_url:
        # Only a same-site claim: another outlet's URL must stay free for that outlet's article.
        aliases.setdefault(article.canonical_url, "declared")
    owner_id = store.find_article_by_url(conn, canonical)
    text_hash = dedup.content_hash(article.text)
    if owner_id is not None and owner_id != article_id:
        # The same document reached through another URL: one article, and maybe a new version.
        if not store.store_article(conn, article_id, page, article, text_hash=text_hash):
            return None
        store.mark_duplicate(conn, article_id, owner_id)
        store.move_entries(conn, article_id, owner_id)
        store.add_aliases(conn, owner_id, aliases.items())
        filed = add_version(conn, owner_id, page=page, article=article, signature=signature,
                            text_hash=text_hash, fetched_by=article_id)
        store.record_decision(conn, article_id, version=filed.version, method="url", score=1.0,
                              matched_article_id=owner_id, story_id=filed.story_id,
                              evidence={"canonical_url": canonical, "canonical_source": source,
                                        "new_version": filed.new_version},
                              rules_version=dedup.RULES_VERSION)
        return Filed(owner_id, "url", 1.0, owner_id, filed.story_id, filed.version,
                     filed.new_version)

    # Matching reads only what was filed before, so it comes first. The text's own rows are
    # then two statements: the article row with its identity, and the rest in one, which
    # also locks the story a copy is about to join.
    matches = find_matches(conn, article_id, article.text, article.title, signature)
    best = matches[0] if matches else None
    joined = {m.story_id for m in matches}
    joining = next(iter(joined)) if len(joined) == 1 else None
    identity = store.Identity(canonical, article.site_name or dedup.site_of(canonical),
                              signature.fingerprint, signature.shingle_count)
    if not store.store_article(conn, article_id, page, article, text_hash=text_hash,
                               identity=identity):
        return None
    store.file_first_version(
        conn, article_id, aliases=aliases.items(), title=article.title, body=article.text,
        content_hash=text_hash, fingerprint=signature.fingerprint,
        final_url=page.final_url, shingle_count=signature.shingle_count,
        band_keys=signature.band_keys, method=signature.method,
        # A word-for-word copy is not indexed: the text is, under its first copy, whose bands
        # are the same keys. The band lookup then finds each text once, and a wire story run
        # by a hundred outlets adds one set of band rows, not a hundred (add_version hands
        # them on if that first copy's text changes).
        indexed=best is None or best.method != "exact",
        joining_story_id=joining)
    story_id = place_in_story(conn, article_id, None, matches, locked_story=joining)
    if best is not None and best.method == "update":
        store.link_update(conn, article_id, best.article_id)
        store.record_story_change(conn, "article_updated", story_id=story_id,
                                  article_id=article_id, other_article_id=best.article_id,
                                  detail=best.evidence)
    method = best.method if best else "unique"
    score = best.score if best else 0.0
    store.record_decision(conn, article_id, version=1, method=method, score=score,
                          matched_article_id=best.article_id if best else None,
                          story_id=story_id,
                          evidence={"canonical_url": canonical, "canonical_source": source,
                                    **(best.evidence if best else {}),
                                    "matches": [m.article_id for m in matches]},
                          rules_version=dedup.RULES_VERSION)
    return Filed(article_id, method, score, best.article_id if best else None, story_id, 1)


def refile_article(conn: psycopg.Connection, article_id: int, *, page: Page, article: Article,
                   signature: dedup.Signature) -> Filed | None:
    """A stored article fetched again: a new version when its text changed; None if gone."""
    row = store.get_dedup_row(conn, article_id)
    if row is None or row.state != "stored":
        return None
    lock_for(conn, urls=[row.canonical_url or row.url], signature=signature,
             also=[row.fingerprint] if row.fingerprint else [])
    store.add_aliases(conn, article_id, [(page.final_url, "final")])
    filed = add_version(conn, article_id, page=page, article=article, signature=signature,
                        text_hash=dedup.content_hash(article.text), fetched_by=article_id)
    if filed.new_version:
        store.record_decision(conn, article_id, version=filed.version, method="url", score=1.0,
                              matched_article_id=article_id, story_id=filed.story_id,
                              evidence={"refetch": True}, rules_version=dedup.RULES_VERSION)
    return filed


def add_version(conn: psycopg.Connection, owner_id: int, *, page: Page, article: Article,
                signature: dedup.Signature, text_hash: str, fetched_by: int) -> Filed:
    """Record the text (whose dedup.content_hash is `text_hash`) as the owner's next version
    if it changed; re-place it in the stories."""
    owner = store.get_dedup_row(conn, owner_id)
    assert owner is not None and owner.body is not None
    if text_hash == owner.content_hash:
        return Filed(owner_id, "url", 1.0, owner_id, owner.story_id, owner.version)
    diff = dedup.diff_versions(owner.body, article.text)
    version = owner.version + 1
    store.insert_version(conn, owner_id, version, title=article.title, body=article.text,
                         content_hash=text_hash, fingerprint=signature.fingerprint,
                         final_url=page.final_url, fetched_by=fetched_by,
                         diff_summary=diff.summary(), diff=asdict(diff), material=diff.material)
    store.update_article_text(conn, owner_id, version=version, title=article.title,
                              body=article.text, content_hash=text_hash,
                              fingerprint=signature.fingerprint,
                              shingle_count=signature.shingle_count, final_url=page.final_url)
    store.delete_bands(conn, owner_id)
    if owner.fingerprint and owner.fingerprint != signature.fingerprint:
        # Copies of the old text were filed without band rows (file_article): the oldest
        # of them now carries the old text's bands. The old fingerprint's lock keeps a copy
        # being filed meanwhile from going unseen. refile_article takes it with its other
        # keys; on file_article's same-URL path it comes late, so a copy of the old text
        # filed at that very moment can deadlock with it, and Postgres aborts one of the
        # two (an OperationalError, retried like any other).
        store.lock_dedup_keys(conn, [_key("fp", owner.fingerprint)])
        store.index_first_copy(conn, owner.fingerprint, exclude_id=owner_id)
    store.upsert_signature(conn, owner_id, version=version, shingle_count=signature.shingle_count,
                           band_keys=signature.band_keys, method=signature.method)
    store.insert_bands(conn, owner_id, signature.band_keys)
    store.record_story_change(conn, "article_version", story_id=owner.story_id,
                              article_id=owner_id,
                              detail={"version": version, "material": diff.material,
                                      "summary": diff.summary(), "fetched_by": fetched_by})
    story_id = owner.story_id
    if diff.material:
        # The text moved: it may no longer belong with its story mates, or now belong with others.
        story_id = place_in_story(conn, owner_id, owner.story_id,
                                  find_matches(conn, owner_id, article.text, article.title,
                                               signature))
    else:
        if story_id is not None:
            _refresh(conn, story_id)
    return Filed(owner_id, "url", 1.0, owner_id, story_id, version, new_version=True)


def find_matches(conn: psycopg.Connection, article_id: int, text: str, title: str | None,
                 signature: dedup.Signature) -> list[Match]:
    """Stored articles this text copies exactly, nearly, or updates; best first."""
    exact = store.find_exact_copies(conn, signature.fingerprint, exclude_id=article_id,
                                    limit=MAX_CANDIDATES)
    if exact:
        # The same text was filed before: it was compared then with every candidate this one
        # would meet (and each later text compared itself with it), so its story is this
        # one's. Comparing again would re-read and re-shingle up to MAX_CANDIDATES bodies for
        # every copy of a wire story (ops/bench pipeline --articles 10000).
        return [Match(cand_id, story_id, "exact", 1.0, {"fingerprint": signature.fingerprint})
                for cand_id, story_id in exact]
    banded = store.find_band_candidates(conn, signature.band_keys, exclude_id=article_id,
                                        limit=MAX_CANDIDATES)
    shared = dict(banded)
    if not shared:
        return []
    shingles = dedup.shingle_words(dedup.body_words(text, title))
    matches: list[Match] = []
    # Equal fingerprints mean equal words (body_words), so one comparison serves every copy.
    by_fingerprint: dict[str, dedup.Similarity] = {}
    for cand in store.get_candidate_texts(conn, list(shared)):
        key = cand.fingerprint or f"id:{cand.id}"
        if cand.body is not None:
            by_fingerprint[key] = dedup.compare_texts(shingles, cand.body, cand.title)
        if cand.story_id is None:
            continue  # stored before stories existed: it has none to join
        sim = by_fingerprint[key]
        method = dedup.classify_match(sim)
        if method is not None:
            matches.append(Match(cand.id, cand.story_id, method, round(sim.containment, 4),
                                 {"jaccard": round(sim.jaccard, 4),
                                  "containment": round(sim.containment, 4),
                                  "shingles": sim.new_size, "matched_shingles": sim.old_size,
                                  "shared_bands": shared.get(cand.id, 0)}))
    # Exact first, then the strongest containment; Jaccard breaks ties between copies.
    matches.sort(key=lambda m: (m.method != "exact", -m.score,
                                -float(m.evidence.get("jaccard", 1.0)), m.article_id))  # type: ignore[arg-type]
    return matches


def place_in_story(conn: psycopg.Connection, article_id: int, current_story: int | None,
                   matches: list[Match], *, locked_story: int | None = None) -> int:
    """Put an article in the story of its matches (merging stories it bridges) or its own.

    `locked_story`: a story whose row this transaction already holds (store.lock_story)."""
    touched: set[int] = set()
    if (current_story is not None
            and not any(m.story_id == current_story for m in matches)
            and store.count_story_members(conn, current_story) > 1):
        # Its new text no longer matches its story mates: take it out (a split).
        touched.add(current_story)
        left = current_story
        current_story = None
        if not matches:
            new_story = store.create_story(conn, article_id)
            store.record_story_change(conn, "story_split", story_id=left,
                                      article_id=article_id, other_story_id=new_story)
            _refresh(conn, left)
            return new_story
        target = min(m.story_id for m in matches)
        store.record_story_change(conn, "story_split", story_id=left,
                                  article_id=article_id, other_story_id=target)
    if not matches:
        if current_story is not None:
            _refresh(conn, current_story)
            return current_story
        story_id = store.create_story(conn, article_id)
        store.record_story_change(conn, "story_created", story_id=story_id, article_id=article_id)
        return story_id
    # The oldest story survives a merge, so ids that consumers hold stay valid longest.
    joined = sorted({m.story_id for m in matches} | ({current_story} if current_story else set()))
    survivor = joined[0]
    if current_story is None and len(joined) == 1:
        # One new member and nothing else moved: count it in, without re-reading the story.
        if locked_story != survivor:
            store.lock_story(conn, survivor)
        refreshed = store.join_story(conn, survivor, article_id,
                                     matched_article_id=matches[0].article_id,
                                     detail={"method": matches[0].method,
                                             "score": matches[0].score})
        _note_representative(conn, refreshed)
        return survivor
    if current_story != survivor:
        store.set_article_story(conn, article_id, survivor)
        store.record_story_change(conn, "member_added", story_id=survivor, article_id=article_id,
                                  other_article_id=matches[0].article_id,
                                  detail={"method": matches[0].method, "score": matches[0].score})
    for other in joined[1:]:
        moved = store.merge_story(conn, other, survivor)
        store.record_story_change(conn, "story_merged", story_id=survivor, article_id=article_id,
                                  other_story_id=other, detail={"members_moved": moved})
    touched.add(survivor)
    for story_id in sorted(touched):
        _refresh(conn, story_id)
    return survivor


def _refresh(conn: psycopg.Connection, story_id: int) -> None:
    _note_representative(conn, store.refresh_story(conn, story_id))


def _note_representative(conn: psycopg.Connection, refreshed: store.StoryRefresh | None) -> None:
    if refreshed and refreshed.old_representative_id != refreshed.representative_id:
        store.record_story_change(conn, "representative_changed", story_id=refreshed.story_id,
                                  article_id=refreshed.representative_id,
                                  other_article_id=refreshed.old_representative_id)
