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

from broker import cli_oncall, embedded
from broker.errors import ConfigError
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


def _signed(settings: Settings) -> Settings:
    """Workers, the watcher and `dev` refuse to start without the broker's signing key (they sign and verify runs)."""
    try:
        settings.require_signing_key()
    except ConfigError as exc:
        for problem in exc.problems:
            typer.echo(f"cibroker: {problem}", err=True)
        raise typer.Exit(2) from None
    return settings


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


def _startup_log(settings: Settings, store: str, process: str, **extra: Any) -> None:
    log = get_logger("cibroker")
    log.info(f"{process}_starting", store=store, config=settings.source, **extra)
    for warning in settings.warnings:
        log.warning("config_warning", problem=warning)
    if settings.embedded_defaults:
        log.warning("embedded_defaults", detail=(
            "no routing file given: hosts gitlab and github take any repo; webhook secrets in "
            f"{settings.env.state_dir / 'webhook-secret'} (gitlab) and {settings.env.state_dir / 'github-webhook-secret'} "
            "(github), or GITLAB_WEBHOOK_SECRET / GITHUB_WEBHOOK_SECRET"))


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Run the webhook edge (POST /hooks/<host id>)."""
    import uvicorn

    from broker import serving

    settings = _settings(config)
    configure(fmt=settings.env.log_format, level=settings.env.log_level)
    settings, store = _with_store(settings)
    _startup_log(settings, store, "web", listen=f"http://{host}:{port}", workers=workers)
    if settings.embedded_defaults and not settings.env.api_token_names() and not _loopback(host):
        get_logger("cibroker").warning("api_closed", detail=(
            f"listening on {host} with no CIBROKER_API_TOKENS: the API and dashboard actions answer only requests "
            "that reach a loopback address with a loopback Host; set CIBROKER_API_TOKENS to use them from elsewhere"))
    # Bounded before a request is read: header deadline and size (broker.serving), idle keep-alive,
    # a cap on open connections; webhook bodies are capped in the app (size, time, how many at once).
    serving.configure(header_timeout=settings.env.header_timeout_seconds)
    common: dict[str, Any] = {"host": host, "port": port, "access_log": False, "log_level": "warning",
                              "server_header": False, "timeout_graceful_shutdown": 10,
                              **serving.uvicorn_options(keep_alive=settings.env.keep_alive_seconds)}
    if workers == 1:
        from broker.web import create_app

        uvicorn.run(create_app(settings), **common)
    else:
        assert settings.env.redis_url is not None
        os.environ["CIBROKER_REDIS_URL"] = settings.env.redis_url.get_secret_value()
        if not settings.embedded_defaults:
            os.environ["CIBROKER_CONFIG"] = str(Path(settings.source).resolve())
        uvicorn.run("broker.web:app_from_environment", factory=True, workers=workers, **common)


@app.command()
def worker(
    config: ConfigOption = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
) -> None:
    """Run a Celery worker that takes accepted deliveries off the queue."""
    from workers.app import create_celery, default_orchestrator

    settings = _signed(_settings(config))
    configure(fmt=settings.env.log_format, level=settings.env.log_level)
    settings, store = _with_store(settings)
    _startup_log(settings, store, "worker", queue=settings.env.queue, concurrency=concurrency)
    try:  # fail at start, not on every task, when there is no cluster to talk to
        orchestrator = default_orchestrator(settings)
    except Exception as exc:  # the kubernetes client raises its own ConfigException types
        raise fail(f"no Kubernetes configuration (KUBECONFIG or in-cluster): {exc}", 2) from None
    celery = create_celery(settings, orchestrator=lambda _: orchestrator)
    celery.worker_main(["worker", "--loglevel=INFO", "-Q", settings.env.queue, f"--concurrency={concurrency}",
                        "--without-gossip", "--without-mingle", "--without-heartbeat"])


@app.command()
def watcher(config: ConfigOption = None) -> None:
    """Follow managed PipelineRuns (one watch per namespace) and queue their status reports."""
    from workers.app import create_celery, submitter
    from workers.kube import KubeCluster

    settings = _signed(_settings(config))
    configure(fmt=settings.env.log_format, level=settings.env.log_level)
    settings, store = _with_store(settings)
    routing = settings.routing
    namespaces = sorted({r.namespace or routing.defaults.namespace for r in routing.routes})
    _startup_log(settings, store, "watcher", namespaces=namespaces, resync_seconds=settings.env.resync_seconds)
    try:
        cluster = KubeCluster.from_environment(tekton_version=settings.env.tekton_api_version)
    except Exception as exc:  # the kubernetes client raises its own ConfigException types
        raise fail(f"no Kubernetes configuration (KUBECONFIG or in-cluster): {exc}", 2) from None
    from workers.app import build_watcher

    w = build_watcher(settings, cluster, submit=submitter(create_celery(settings)))
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

    from broker.web import create_app
    from workers.app import create_celery, default_orchestrator
    from workers.wiring import cluster_or_none, default_operations

    settings = _signed(_settings(config))
    settings, store = _with_store(settings)
    cluster, why = cluster_or_none(settings)
    dry_run = cluster is None
    configure(fmt=settings.env.log_format, level=settings.env.log_level, always={"mode": "dry-run"} if dry_run else None)
    _startup_log(settings, store, "dev", listen=f"http://{host}:{port}", cluster="none: DRY RUN" if dry_run else "kubernetes")
    log = get_logger("cibroker")
    if dry_run:
        log.warning("dry_run", detail=f"{why}. Deliveries are authenticated, routed and rendered; PipelineRuns and deploys "
                                      "are recorded in each delivery's decision log, not created; no commit status is posted.")
    server = uvicorn.Server(uvicorn.Config(create_app(settings, operations=default_operations(settings, cluster=cluster,
                                                                                              find_cluster=False),
                                                      dry_run=dry_run),
                                           host=host, port=port, access_log=False, log_level="warning", server_header=False))
    threading.Thread(target=server.run, name="web", daemon=True).start()

    def orchestrator(s: Settings) -> Any:
        if not dry_run:
            return default_orchestrator(s)
        from workers.orchestration import Orchestrator
        from workers.wiring import resolver_or_none, store_for

        return Orchestrator(settings=s, store=store_for(s), cluster=None, git_hosts={}, resolver=resolver_or_none(s),  # type: ignore[arg-type]
                            dry_run=True)

    celery = create_celery(settings, orchestrator=orchestrator)
    if not dry_run:
        from workers.app import build_watcher, submitter

        watcher_ = build_watcher(settings, cluster, submit=submitter(celery), sweep=False)
        threading.Thread(target=watcher_.run, name="watcher", daemon=True).start()
    celery.worker_main(["worker", "--loglevel=WARNING", "-Q", settings.env.queue, "--pool=solo", "--concurrency=1",
                        "--without-gossip", "--without-mingle", "--without-heartbeat"])
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
