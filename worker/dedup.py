"""Dedup: canonical URLs (and, as it grows, fingerprints and near-duplicate signatures)."""

from __future__ import annotations

from urllib.parse import urldefrag

from courlan import normalize_url


def canonicalize_url(url: str) -> str:
    """The canonical form of a URL: normalized by courlan, tracking parameters and fragment gone."""
    # courlan lower-cases scheme and host, drops default ports, sorts the query and removes
    # known trackers (utm_*, fbclid, ...); a fragment never names a different document.
    return normalize_url(urldefrag(url.strip())[0])
