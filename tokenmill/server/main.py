"""``tokenmill serve``: start the engine core, then the HTTP front end on uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

from tokenmill.config import EngineConfig
from tokenmill.logger import get_logger

logger = get_logger(__name__)

GRACEFUL_SHUTDOWN_S = 3.0
"""How long uvicorn waits for open connections after SIGTERM/SIGINT. In-flight requests are aborted
at the signal, so their responses end at once and this wait is normally short."""


def default_model_name(model: str) -> str:
    """The name clients see (in /v1/models and every response): the folder or file name, not its path."""
    return Path(model.rstrip("/")).name or model


def serve(config: EngineConfig, args) -> None:
    import torch
    import uvicorn

    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.server.app import create_app
    from tokenmill.server.settings import ServerSettings

    # The front end does no tensor work: one thread, so that it never competes with the engine's.
    torch.set_num_threads(1)
    engine_threads = args.threads or os.cpu_count()
    replicas = getattr(args, "data_parallel_size", 1) or 1
    make_client = None
    if replicas > 1:  # N engine cores behind a prefix-aware router, each with its share of the threads
        from tokenmill.server.router import ReplicaRouter

        engine_threads = max(1, engine_threads // replicas)
        policy = getattr(args, "router_policy", "prefix")
        make_client = lambda cfg, eos: ReplicaRouter(cfg, eos, replicas, engine_threads, policy)  # noqa: E731
    engine = AsyncLLM(config, engine_process=not args.no_engine_process, num_threads=engine_threads,
                      make_client=make_client)
    settings = ServerSettings(model_name=args.served_model_name or default_model_name(args.model),
                              api_key=args.api_key or None, max_queued_requests=args.max_queued_requests,
                              request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes)
    app = create_app(engine, settings)
    logger.info("serving %s on http://%s:%d (engine %s, %d threads)", settings.model_name, args.host, args.port,
                "in a thread" if args.no_engine_process else "in its own process", engine_threads)
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    _make_server(uvicorn_config, engine).run()


def _make_server(config, engine):
    """uvicorn's server, which on SIGTERM or SIGINT also aborts every in-flight request at once, so
    that streams end with an error event instead of running on while uvicorn waits for them."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            engine.request_shutdown("the server is shutting down")

    return Server(config)
