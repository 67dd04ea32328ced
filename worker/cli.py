"""The `talkwire` command: run the service, manage feeds, ingest one URL, migrate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import psycopg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from worker import store
from worker.config import Settings, load_settings
from worker.errors import ConfigError
from worker.logs import configure_logging

console = Console(stderr=False)
err_console = Console(stderr=True)


@dataclass
class Runtime:
    """Resolved settings plus whatever this process started (embedded servers, demo site)."""

    settings: Settings
    keep: list[Any] = field(default_factory=list)


def resolve(settings: Settings, *, with_demo: bool = False) -> Runtime:
    """Start the embedded servers when no URLs are set, and the demo site when asked."""
    keep: list[Any] = []
    updates: dict[str, object] = {}
    if settings.embedded:
        from worker.embedded import start_embedded

        err_console.print(f"[dim]embedded Postgres and Redis under {settings.data_dir}[/dim]")
        services = start_embedded(settings.data_dir)
        keep.append(services)
        updates.update(database_url=services.database_url, redis_url=services.redis_url)
    if with_demo and settings.demo_enabled:
        from worker.demo import DEMO_ROOT, serve_site

        try:
            site = serve_site(DEMO_ROOT, port=settings.demo_port)
        except OSError as exc:
            raise click.ClickException(
                f"demo site cannot listen on 127.0.0.1:{settings.demo_port} ({exc}); "
                "set TALKWIRE_DEMO_PORT to a free port or TALKWIRE_DEMO=false"
            ) from exc
        keep.append(site)
        nets = tuple(dict.fromkeys((*settings.fetch_allow_networks, "127.0.0.1/32")))
        updates["fetch_allow_networks"] = nets
        err_console.print(f"[yellow]demo site at {site.base_url}; fetch allow-list admits "
                          f"127.0.0.1/32 for it[/yellow]")
    resolved = settings.model_copy(update=updates) if updates else settings
    if with_demo and settings.demo_enabled:
        from worker.demo import demo_feed_paths

        with psycopg.connect(resolved.database_url or "") as conn:
            store.apply_migrations(conn)
            for path in demo_feed_paths():
                store.add_feed(conn, keep[-1].url(path), source="demo",
                               interval_seconds=resolved.poll_interval_default)
    return Runtime(settings=resolved, keep=keep)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _connect(settings: Settings) -> psycopg.Connection:
    return psycopg.connect(settings.database_url or "")


@click.group()
@click.option("--log-level", default="WARNING", show_default=True,
              help="Level of the JSON log lines on stderr.")
def main(log_level: str) -> None:
    """talkwire: follow the Syrian peace talks through the news."""
    configure_logging(log_level.upper())


@main.command()
def migrate() -> None:
    """Apply pending database migrations (safe to run from several places at once)."""
    rt = resolve(_settings())
    with _connect(rt.settings) as conn:
        applied = store.apply_migrations(conn)
    console.print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))


@main.command()
@click.option("--queues", default="poll,process", show_default=True)
@click.option("--pool", default="prefork", show_default=True,
              type=click.Choice(["prefork", "threads", "solo"]))
@click.option("--concurrency", type=int, default=None, help="Default: TALKWIRE_WORKER_CONCURRENCY.")
@click.option("--name", default=None, help="Celery node name (default: talkwire-<queues>@host).")
@click.option("--loglevel", default="INFO", show_default=True,
              help="Celery's own log level; WARNING drops its two lines per task at high rates.")
def worker(queues: str, pool: str, concurrency: int | None, name: str | None,
           loglevel: str) -> None:
    """Run a Celery worker on the given queues."""
    from worker.celery_app import create_app

    rt = resolve(_settings())
    app = create_app(rt.settings)
    argv = ["worker", "-Q", queues, "--pool", pool, "--loglevel", loglevel,
            "-c", str(concurrency or rt.settings.worker_concurrency),
            "-n", name or f"talkwire-{queues.replace(',', '-')}-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle"]
    app.worker_main(argv)


@main.command()
def beat() -> None:
    """Run Celery beat: claims due feeds and sweeps stale work on a schedule."""
    from worker.celery_app import create_app

    rt = resolve(_settings())
    app = create_app(rt.settings)
    rt.settings.data_dir.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "--loglevel", "INFO"])


@main.command()
@click.option("--workers", "want_workers", is_flag=True,
              help="Also require at least one worker to answer a ping.")
@click.option("--timeout", default=5.0, show_default=True)
def ping(want_workers: bool, timeout: float) -> None:
    """Check that Postgres and Redis answer (and workers, with --workers); exit 1 if not."""
    from worker.celery_app import create_app

    rt = resolve(_settings())
    problems = []
    try:
        with psycopg.connect(rt.settings.database_url or "", connect_timeout=int(timeout)) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        problems.append(f"postgres: {exc}")
    app = create_app(rt.settings)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any broker failure is a failed check
        problems.append(f"redis: {exc}")
    if want_workers and not problems:
        replies = app.control.ping(timeout=timeout) or []
        if not replies:
            problems.append("workers: none answered")
        else:
            console.print(f"workers: {len(replies)} answered")
    if problems:
        raise click.ClickException("; ".join(problems))
    console.print("ok")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def flower(args: tuple[str, ...]) -> None:
    """Run Flower, Celery's monitoring UI, against talkwire's broker (extra args pass through)."""
    from worker.celery_app import create_app

    rt = resolve(_settings())
    create_app(rt.settings).start(["flower", *args])


def _spawn(settings: Settings, args: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.child_env()}
    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{args[0]}-{args[2] if len(args) > 2 else 'main'}.log", "ab")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "worker.cli", "--log-level", "INFO", *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def _counts_table(settings: Settings, since: datetime) -> tuple[Table, dict[str, Any]]:
    with _connect(settings) as conn:
        summary = store.summarize_since(conn, since)
    table = Table(title="talkwire run summary", show_header=True)
    table.add_column("measure")
    table.add_column("count", justify="right")
    for label, key in [("feeds polled", "feeds_polled"), ("feeds failed", "feeds_failed"),
                       ("entries seen", "entries_seen"), ("new entries", "entries_new"),
                       ("articles stored", "articles_stored"),
                       ("articles pending", "articles_pending"),
                       ("articles stored (all time)", "articles_total")]:
        table.add_row(label, str(summary[key]))
    for kind, reason, n in summary["failures"]:  # type: ignore[union-attr]
        table.add_row(f"failed {kind}: {reason}", str(n))
    return table, summary


@main.command()
@click.option("--once", is_flag=True, help="Poll every feed once, wait until drained, print a summary, exit.")
@click.option("--timeout", default=600.0, show_default=True, help="With --once: give up waiting after this many seconds.")
def run(once: bool, timeout: float) -> None:
    """Run the service in the foreground: workers, beat, and (embedded) the demo."""
    from worker import tasks
    from worker.celery_app import create_app
    from worker.pipeline import open_context

    rt = resolve(_settings(), with_demo=True)
    s = rt.settings
    with _connect(s) as conn:
        store.apply_migrations(conn)
    create_app(s)
    started = datetime.now(timezone.utc)
    children = [
        _spawn(s, ["worker", "--queues", "poll", "--pool", "threads", "--concurrency", "8"]),
        _spawn(s, ["worker", "--queues", "process", "--pool", "prefork"]),
    ]
    if not once:
        children.append(_spawn(s, ["beat"]))
    ctx = open_context(s)
    try:
        if once:
            with ctx.pool.connection() as conn:
                store.make_feeds_due(conn)
            tasks.claim_and_enqueue_due_feeds(ctx)
            _wait_drained(ctx, children, timeout)
            table, _ = _counts_table(s, started)
            console.print(table)
        else:
            # Beat's first tick comes one interval after it starts; claim what is due now.
            tasks.claim_and_enqueue_due_feeds(ctx)
            _show_progress(ctx, children, started)
    except KeyboardInterrupt:
        err_console.print("stopping…")
    finally:
        ctx.close()
        _stop(children)


def _wait_drained(ctx: Any, children: list[subprocess.Popen[bytes]], timeout: float) -> None:
    from worker import tasks

    deadline = time.monotonic() + timeout
    last_sweep = time.monotonic()
    with err_console.status("polling feeds and processing articles…") as status:
        while time.monotonic() < deadline:
            for child in children:
                if child.poll() is not None:
                    raise click.ClickException(f"a worker exited early (code {child.returncode}); "
                                               f"see {ctx.settings.data_dir / 'logs'}")
            with ctx.pool.connection() as conn:
                polls, pending = store.count_outstanding(conn)
            status.update(f"polls in flight: {polls}, articles pending: {pending}")
            if polls == 0 and pending == 0:
                return
            if time.monotonic() - last_sweep > ctx.settings.lease_seconds:
                tasks.claim_and_enqueue_due_feeds(ctx)
                tasks.resend_stale_articles(ctx)
                last_sweep = time.monotonic()
            time.sleep(0.5)
    err_console.print(f"[red]gave up waiting after {timeout:.0f}s; work is still pending[/red]")


def _show_progress(ctx: Any, children: list[subprocess.Popen[bytes]], started: datetime) -> None:
    with Live(console=console, refresh_per_second=1) as live:
        while all(child.poll() is None for child in children):
            table, _ = _counts_table(ctx.settings, started)
            table.title = f"talkwire running since {started:%H:%M:%S} (Ctrl-C stops)"
            live.update(table)
            time.sleep(2)
    raise click.ClickException(f"a child process exited; see {ctx.settings.data_dir / 'logs'}")


@main.group()
def feeds() -> None:
    """Manage the feeds talkwire polls."""


@feeds.command("add")
@click.argument("url")
@click.option("--title", default=None)
@click.option("--discover/--no-discover", default=True, show_default=True,
              help="Fetch URL first: a feed is added as it resolves; an HTML page is searched "
                   "for <link rel=alternate> feeds, then /feed, /rss and other common paths.")
@click.option("--all", "add_all", is_flag=True, help="Add every feed discovered, not the first.")
def feeds_add(url: str, title: str | None, discover: bool, add_all: bool) -> None:
    """Add a feed by its URL or by a site's URL (polled at the next beat)."""
    from worker.discover import discover_feeds
    from worker.errors import TalkwireError
    from worker.fetch import make_client

    rt = resolve(_settings())
    s = rt.settings
    found: list[tuple[str, str | None, str | None]] = [(url, title, None)]
    if discover:
        limits = s.fetch_limits()
        with make_client(limits) as client:
            try:
                feeds = discover_feeds(url, limits, client=client)
            except TalkwireError as exc:
                raise click.ClickException(
                    f"cannot fetch {url}: {exc}; use --no-discover to add it unchecked") from None
        if not feeds:
            raise click.ClickException(f"no feed found at {url} (not a feed, no <link "
                                       "rel=alternate> feed, no feed at the common paths)")
        for feed in feeds:
            err_console.print(f"found {feed.format or 'feed'} ({feed.how}): {feed.url}")
        found = [(f.url, title or f.title, f.site_url) for f in (feeds if add_all else feeds[:1])]
    with _connect(s) as conn:
        store.apply_migrations(conn)
        for feed_url, feed_title, site_url in found:
            row = store.add_feed(conn, feed_url, title=feed_title, source="cli",
                                 interval_seconds=s.poll_interval_default, site_url=site_url)
            console.print(f"feed {row.id}: {row.url}")


@feeds.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def feeds_import(path: Path) -> None:
    """Add every feed of an OPML file (outlines inside XML comments stay disabled)."""
    from worker.errors import Permanent
    from worker.opml import read_opml

    try:
        entries = read_opml(path.read_bytes())
    except Permanent as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    rt = resolve(_settings())
    added = 0
    with _connect(rt.settings) as conn:
        store.apply_migrations(conn)
        known = {f.url for f in store.list_feeds(conn)}
        for item in entries:
            store.add_feed(conn, item.url, title=item.title, source="opml",
                           interval_seconds=rt.settings.poll_interval_default,
                           site_url=item.site_url, category=item.category)
            added += item.url not in known
    console.print(f"imported {len(entries)} feed(s) from {path}: {added} new, "
                  f"{len(entries) - added} already known")


@feeds.command("export")
def feeds_export() -> None:
    """Print every feed as OPML 2.0."""
    from worker.opml import OpmlFeed, write_opml

    rt = resolve(_settings())
    with _connect(rt.settings) as conn:
        rows = store.list_feeds(conn)
    document = write_opml((OpmlFeed(f.url, f.title, f.site_url, f.category) for f in rows),
                          title="talkwire feeds")
    click.echo(document.decode("utf-8"), nl=False)


def _ago(when: datetime | None) -> str:
    if when is None:
        return "never"
    seconds = int((datetime.now(timezone.utc) - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


@feeds.command("list")
def feeds_list() -> None:
    """List feeds: status, interval and why, last success, errors, items per day."""
    rt = resolve(_settings())
    with _connect(rt.settings) as conn:
        rows = store.summarize_feeds(conn)
    table = Table(title=f"{len(rows)} feed(s)")
    for col in ("id", "status", "url", "interval", "next poll", "last success", "errors",
                "items/day"):
        table.add_column(col, overflow="fold")
    for f in rows:
        errors = f"{f.consecutive_failures} {f.last_reason}" if f.consecutive_failures else "0"
        table.add_row(str(f.id), f.status, f.url, f"{f.interval_seconds}s {f.interval_reason}",
                      f"{f.next_poll_at:%Y-%m-%d %H:%M:%S}", _ago(f.last_success_at), errors,
                      f"{f.items_per_day:.1f}")
    console.print(table)


@feeds.command("show")
@click.argument("feed_id", type=int)
@click.option("--limit", default=20, show_default=True, help="How many recent polls to show.")
def feeds_show(feed_id: int, limit: int) -> None:
    """Show one feed's state and its recent poll log."""
    rt = resolve(_settings())
    with _connect(rt.settings) as conn:
        feed = store.get_feed(conn, feed_id)
        polls = store.recent_polls(conn, feed_id, limit=limit) if feed else []
    if feed is None:
        raise click.ClickException(f"no feed {feed_id}")
    info = Table(title=f"feed {feed.id}: {feed.title or feed.url}", show_header=False)
    info.add_column("field")
    info.add_column("value", overflow="fold")
    for name in ("url", "host", "status", "last_status", "last_reason", "last_error",
                 "consecutive_failures", "interval_seconds", "interval_reason", "ttl_seconds",
                 "next_poll_at", "last_success_at", "last_full_fetch_at", "etag",
                 "last_modified"):
        value = getattr(feed, name)
        info.add_row(name, "" if value is None else str(value))
    console.print(info)
    log = Table(title=f"last {len(polls)} poll(s)")
    for col in ("when", "outcome", "http", "cond", "parsed", "entries", "new", "ms",
                "next in", "why"):
        log.add_column(col, overflow="fold")
    for p in polls:
        log.add_row(f"{p.polled_at:%Y-%m-%d %H:%M:%S}",
                    p.outcome + (f" {p.reason}" if p.reason else ""), str(p.http_status or ""),
                    "y" if p.conditional else "", "y" if p.parsed else "", str(p.entries),
                    str(p.new_entries), str(p.duration_ms if p.duration_ms is not None else ""),
                    f"{p.next_poll_in}s" if p.next_poll_in is not None else "",
                    p.interval_reason or "")
    console.print(log)


@feeds.command("poll")
@click.argument("feed_id", type=int)
def feeds_poll(feed_id: int) -> None:
    """Poll one feed now (whatever its status or schedule) and enqueue its new articles."""
    from worker import tasks
    from worker.celery_app import create_app
    from worker.pipeline import open_context, poll_feed

    rt = resolve(_settings())
    with _connect(rt.settings) as conn:
        store.apply_migrations(conn)
    create_app(rt.settings)
    ctx = open_context(rt.settings)
    try:
        # An operator waits at the terminal: sleep through the host's queue, up to its limit.
        outcome = poll_feed(ctx, feed_id, take_over=True, max_sleep=rt.settings.host_max_wait)
        if outcome.slot is not None and outcome.retry_in is not None:
            # Still queued behind the host: a worker resumes it when its place comes.
            tasks.enqueue_poll(feed_id, outcome.slot, countdown=outcome.retry_in,
                               reservation=outcome.reservation)
        tasks.enqueue_articles(outcome.new_article_ids)
    finally:
        ctx.close()
    line = f"feed {feed_id}: {outcome.outcome}"
    if outcome.outcome == "polled":
        line += f", {outcome.entries} entries, {len(outcome.new_article_ids)} new article(s)"
    if outcome.reason:
        line += f" ({outcome.reason})"
    if outcome.retry_in is not None:
        line += f"; host busy, next try in {outcome.retry_in:.0f}s"
    console.print(line)
    if outcome.outcome in ("failed", "stale", "deferred"):
        sys.exit(1)


@main.command()
@click.argument("url")
def ingest(url: str) -> None:
    """Fetch, extract and store one article now, and print what was stored."""
    from worker.pipeline import open_context, process_article

    rt = resolve(_settings())
    with _connect(rt.settings) as conn:
        store.apply_migrations(conn)
    ctx = open_context(rt.settings)
    try:
        with ctx.pool.connection() as conn:
            article_id, created = store.add_article_url(conn, url, origin="cli")
        outcome = process_article(ctx, article_id, final_attempt=True)
        with ctx.pool.connection() as conn:
            row = store.get_article(conn, article_id)
    finally:
        ctx.close()
    assert row is not None
    table = Table(title=f"article {row.id}: {outcome.outcome}"
                  + ("" if created else " (already known)"))
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for name in ("url", "state", "fail_reason", "title", "author", "site_name", "language",
                 "published_at", "canonical_url"):
        value = getattr(row, name)
        table.add_row(name, "" if value is None else str(value))
    table.add_row("text", (row.body or "")[:600] + ("…" if row.body and len(row.body) > 600 else ""))
    console.print(table)
    if row.state == "failed":
        sys.exit(1)


if __name__ == "__main__":
    main()
