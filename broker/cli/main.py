"""The `cibroker` command: one verb per process or action.

Errors are one line on stderr, no traceback (CIBROKER_DEBUG=1 shows it).
Exit codes: 0 ok, 1 a check failed or a thing was not found, 2 bad configuration
or usage, 3 the store (Redis) is unavailable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr

from broker.adapters import embedded_redis as embedded
from broker.cli import oncall as cli_oncall
from broker.core.errors import ConfigError
from broker.logging import configure, get_logger
from config.settings import Settings, load_settings, parse_routing, resolve_credentials

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="cibroker: Git webhooks in, Tekton PipelineRuns out.")
config_app = typer.Typer(no_args_is_help=True, help="Check routing files.")
deliveries_app = typer.Typer(no_args_is_help=True, help="Look at stored deliveries.")
app.add_typer(config_app, name="config")
app.add_typer(deliveries_app, name="deliveries")

ConfigOption = cli_oncall.ConfigOption


def fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"cibroker: {message}", err=True)
    return typer.Exit(code)


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(os.environ, config_path=config)
    except ConfigError as exc:
        for problem in exc.problems:
            typer.echo(f"cibroker: {problem}", err=True)
        raise typer.Exit(2) from None


def _with_store(settings: Settings) -> tuple[Settings, str]:
    """Settings with a Redis URL: CIBROKER_REDIS_URL, or the embedded store started now."""
    if settings.env.redis_url is not None:
        return settings, "redis at CIBROKER_REDIS_URL"
    try:
        store = embedded.start(settings.env.state_dir)
    except RuntimeError as exc:
        raise fail(str(exc), 3) from None
    env = settings.env.model_copy(update={"redis_url": SecretStr(store.url)})
    return dataclasses.replace(settings, env=env), store.description


def start(config: Path | None, process: str, *, signed: bool, always: dict[str, str] | None = None,
          **extra: Any) -> Settings:
    """One start-up for every process: settings (exit 2 when wrong), the signing key where runs are signed or
    verified, logging, the store (CIBROKER_REDIS_URL or the embedded one), and the start-up log lines."""
    settings = _settings(config)
    if signed:  # workers, the watcher and `dev` refuse to start without the broker's signing key
        try:
            settings.require_signing_key()
        except ConfigError as exc:
            for problem in exc.problems:
                typer.echo(f"cibroker: {problem}", err=True)
            raise typer.Exit(2) from None
    configure(fmt=settings.env.log_format, level=settings.env.log_level, always=always)
    settings, store = _with_store(settings)
    log = get_logger("cibroker")
    log.info(f"{process}_starting", store=store, config=settings.source, queue=settings.env.queue, **extra)
    for warning in settings.warnings:
        log.warning("config_warning", problem=warning)
    if settings.embedded_defaults:
        log.warning("embedded_defaults", detail=(
            "no routing file given: hosts gitlab and github take any repo; webhook secrets in "
            f"{settings.env.state_dir / 'webhook-secret'} (gitlab) and {settings.env.state_dir / 'github-webhook-secret'} "
            "(github), or GITLAB_WEBHOOK_SECRET / GITHUB_WEBHOOK_SECRET"))
    return settings


def cluster_or_exit(settings: Settings) -> Any:
    """The Kubernetes cluster, or exit 2 saying why there is none (the worker and the watcher need one)."""
    from broker import bootstrap

    try:
        return bootstrap.kube_cluster(settings)
    except Exception as exc:  # the kubernetes client raises its own ConfigException types
        raise fail(f"no Kubernetes configuration (KUBECONFIG or in-cluster): {exc}", 2) from None


def web_app(settings: Settings, *, cluster: Any = None, find_cluster: bool = True, dry_run: bool = False) -> Any:
    """The web app wired by the composition root: its store, and the on-call service (a cluster when there is one)."""
    from broker import bootstrap
    from broker.edge.web import create_app

    return create_app(settings, store=lambda: bootstrap.edge_store(settings),
                      operations=lambda: bootstrap.edge_operations(settings, cluster=cluster, find_cluster=find_cluster),
                      dry_run=dry_run)


def app_from_environment() -> Any:
    """uvicorn factory for multi-worker serving: each worker builds its app from CIBROKER_* (set by `cibroker serve`)."""
    from broker.edge import serving

    settings = load_settings(os.environ)
    configure(fmt=settings.env.log_format, level=settings.env.log_level)
    serving.configure(header_timeout=settings.env.header_timeout_seconds)
    return web_app(settings)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _uvicorn_options(settings: Settings, *, host: str, port: int) -> dict[str, Any]:
    """Bounded before a request is read: header deadline and size (broker.edge.serving), idle keep-alive,
    a cap on open connections; webhook bodies are capped in the app (size, time, how many at once)."""
    from broker.edge import serving

    serving.configure(header_timeout=settings.env.header_timeout_seconds)
    return {"host": host, "port": port, "access_log": False, "log_level": "warning", "server_header": False,
            "timeout_graceful_shutdown": 10, **serving.uvicorn_options(keep_alive=settings.env.keep_alive_seconds)}


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Run the webhook edge (POST /hooks/<host id>)."""
    import uvicorn

    settings = start(config, "web", signed=False, listen=f"http://{host}:{port}", workers=workers)
    if settings.embedded_defaults and not settings.env.api_token_names() and not _loopback(host):
        get_logger("cibroker").warning("api_closed", detail=(
            f"listening on {host} with no CIBROKER_API_TOKENS: the API and dashboard actions answer only requests "
            "that reach a loopback address with a loopback Host; set CIBROKER_API_TOKENS to use them from elsewhere"))
    options = _uvicorn_options(settings, host=host, port=port)
    if workers == 1:
        uvicorn.run(web_app(settings), **options)
        return
    assert settings.env.redis_url is not None
    os.environ["CIBROKER_REDIS_URL"] = settings.env.redis_url.get_secret_value()
    if not settings.embedded_defaults:
        os.environ["CIBROKER_CONFIG"] = str(Path(settings.source).resolve())
    uvicorn.run("broker.cli.main:app_from_environment", factory=True, workers=workers, **options)


def _celery_worker(celery: Any, settings: Settings, *, argv: list[str]) -> None:
    celery.worker_main(["worker", "-Q", settings.env.queue, "--without-gossip", "--without-mingle", "--without-heartbeat",
                        *argv])


@app.command()
def worker(
    config: ConfigOption = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
) -> None:
    """Run a Celery worker that takes accepted deliveries off the queue."""
    from broker import bootstrap
    from workers.celery_app import create_celery

    settings = start(config, "worker", signed=True, concurrency=concurrency)
    cluster_or_exit(settings)  # fail at start, not on every task, when there is no cluster to talk to
    orchestrator = bootstrap.orchestrator(settings)
    celery = create_celery(settings, orchestrator=lambda _: orchestrator)
    _celery_worker(celery, settings, argv=["--loglevel=INFO", f"--concurrency={concurrency}"])


@app.command()
def watcher(config: ConfigOption = None) -> None:
    """Follow managed PipelineRuns (one watch per namespace) and queue their status reports."""
    from broker import bootstrap
    from workers.celery_app import create_celery, submitter
    from workers.watcher import build_watcher

    settings = start(config, "watcher", signed=True)
    w = build_watcher(settings, cluster_or_exit(settings), store=bootstrap.store_for(settings),
                      submit=submitter(create_celery(settings)))
    get_logger("cibroker").info("watching", namespaces=w.namespaces, resync_seconds=settings.env.resync_seconds)
    try:
        w.run()
    except KeyboardInterrupt:
        w.stop.set()


@app.command()
def dev(
    config: ConfigOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
) -> None:
    """serve + worker + watcher in one process for a laptop; a DRY RUN when no cluster is reachable."""
    import threading

    import uvicorn

    from broker import bootstrap
    from workers.celery_app import create_celery, submitter
    from workers.watcher import build_watcher

    cluster, why = bootstrap.cluster_or_none(_settings(config))
    dry_run = cluster is None
    settings = start(config, "dev", signed=True, always={"mode": "dry-run"} if dry_run else None,
                     listen=f"http://{host}:{port}", cluster="none: DRY RUN" if dry_run else "kubernetes")
    if dry_run:
        get_logger("cibroker").warning("dry_run", detail=(
            f"{why}. Deliveries are authenticated, routed and rendered; PipelineRuns and deploys are recorded in each "
            "delivery's decision log, not created; no commit status is posted."))
    server = uvicorn.Server(uvicorn.Config(web_app(settings, cluster=cluster, find_cluster=False, dry_run=dry_run),
                                           **_uvicorn_options(settings, host=host, port=port)))
    threading.Thread(target=server.run, name="web", daemon=True).start()
    celery = create_celery(settings, orchestrator=bootstrap.dry_run_orchestrator if dry_run else bootstrap.orchestrator)
    if not dry_run:  # the watcher with its stranded-delivery sweep, as in production
        watcher_ = build_watcher(settings, cluster, store=bootstrap.store_for(settings), submit=submitter(celery))
        threading.Thread(target=watcher_.run, name="watcher", daemon=True).start()
    _celery_worker(celery, settings, argv=["--loglevel=WARNING", "--pool=solo", "--concurrency=1"])
    server.should_exit = True


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="Routing file to check.")],
    require_secrets: Annotated[bool, typer.Option(help="Also fail when a referenced secret is not set here.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Validate a routing file: every problem with its file, key path and what is wrong."""
    errors: list[str] = []
    warnings: list[str] = []
    summary = ""
    try:
        routing = parse_routing(file.read_text(encoding="utf-8"), source=str(file))
    except OSError as exc:
        errors.append(f"{file}: cannot read: {exc.strerror}")
    except UnicodeDecodeError:
        errors.append(f"{file}: not a UTF-8 text file")
    except ConfigError as exc:
        errors.extend(exc.problems)
    else:
        _, secret_errors, warnings = resolve_credentials(routing, environ=os.environ, base=file.parent)
        warnings = [f"{file}: {w}" for w in warnings + secret_errors]
        if require_secrets:
            errors.extend(warnings)
            warnings = []
        summary = f"{len(routing.hosts)} host(s), {len(routing.routes)} route(s)"
    if as_json:
        typer.echo(json.dumps({"file": str(file), "ok": not errors, "errors": errors, "warnings": warnings, "summary": summary}))
    else:
        for line in errors:
            typer.echo(f"error: {line}", err=True)
        for line in warnings:
            typer.echo(f"warning: {line}", err=True)
        if not errors:
            typer.echo(f"{file}: OK ({summary})")
    if errors:
        raise typer.Exit(1)


cli_oncall.register(app, settings_for=_settings, with_store=_with_store, deliveries_app=deliveries_app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
