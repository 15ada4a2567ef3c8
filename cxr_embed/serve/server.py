"""Run the app under uvicorn (one process, or ``workers`` processes sharing the port)."""

from __future__ import annotations

import logging
import os

from cxr_embed.errors import DependencyError
from cxr_embed.serve.config import CONFIG_ENV, ServeConfig


def _uvicorn():
    try:
        import uvicorn
    except ImportError:
        raise DependencyError(
            "`cxr-embed serve` needs the serve extra: pip install 'cxr-embed[serve]'"
        ) from None
    return uvicorn


def run(config: ServeConfig, log_level: str = "info") -> None:
    """Serve until interrupted. The access log stays off: the audit table records every call without
    the query strings and client details an access log would keep."""
    config.check()
    uvicorn = _uvicorn()
    logging.getLogger("cxr_embed.serve").setLevel(log_level.upper())
    common = {
        "host": config.host,
        "port": config.port,
        "log_level": log_level,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }
    if config.workers == 1:
        from cxr_embed.serve.app import create_app

        uvicorn.run(create_app(config), **common)
        return
    os.environ[CONFIG_ENV] = config.to_json()  # each worker process builds its own app from this
    uvicorn.run("cxr_embed.serve.app:app_from_env", factory=True, workers=config.workers, **common)
