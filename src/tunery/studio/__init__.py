"""Tunery Studio: a local web app to prepare, run, watch, chat with and export fine-tunes.

`tunery studio [--host 127.0.0.1] [--port 7860] [--runs-dir DIR] [--auth-token T]`
"""

from __future__ import annotations

import sys

from .settings import StudioSettings, is_loopback


def create_app(settings: StudioSettings):
    from .app import create_app as _create

    return _create(settings)


def studio_main(args) -> int:
    settings = StudioSettings.from_args(args)
    if not is_loopback(settings.host) and not settings.auth_token:
        print(f"error: binding to {settings.host} makes the Studio reachable from other machines; "
              "give --auth-token TOKEN (every request must then carry it), or bind to 127.0.0.1", file=sys.stderr)
        return 2
    try:
        import uvicorn

        app = create_app(settings)
    except ImportError as e:
        print(f"error: the Studio needs FastAPI and uvicorn ({e}); install them with `pip install 'tunery[serve]'`",
              file=sys.stderr)
        return 1
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{shown}:{settings.port}/"
    print(f"Tunery Studio on {url}  (runs in {settings.runs_dir})", file=sys.stderr)
    if settings.auth_token:
        print(f"sign in once with {url}?token=<your token>", file=sys.stderr)
    # Open event streams would hold a shutdown forever; training children run on regardless.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=2)
    return 0


__all__ = ["StudioSettings", "create_app", "studio_main"]
