"""`tunery serve`: an OpenAI-compatible API (/v1/models, /v1/chat/completions) over a run or a model."""

from __future__ import annotations

import ipaddress
from argparse import Namespace
from typing import Any

from .app import create_app

LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, api_key: str | None) -> None:
    """Anything reachable from other machines must be protected by a key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"refusing to serve on {host} without an API key: anyone who can reach this machine could "
                         "use the model. Pass --api-key KEY (clients send `Authorization: Bearer KEY`), or bind to "
                         "127.0.0.1")


def serve_main(target: str | Namespace, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_batch: int = 16, batch_wait_ms: float = 5.0, model_name: str | None = None,
               device: str | None = None, dtype: str | None = None, log_level: str = "info") -> int:
    """`tunery serve TARGET [--host --port --api-key --max-batch]`: load TARGET (run dir, checkpoint, model
    folder, .gguf or `default`) and serve it with uvicorn until interrupted. `target` may be the CLI namespace."""
    if isinstance(target, Namespace):
        ns = target
        target, host, port = ns.target, getattr(ns, "host", host), getattr(ns, "port", port)
        api_key, max_batch = getattr(ns, "api_key", api_key), getattr(ns, "max_batch", max_batch)
        device, dtype = getattr(ns, "device", device), getattr(ns, "dtype", dtype)
    check_binding(host, api_key)
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError("tunery serve needs fastapi and uvicorn: pip install 'tunery[serve]'") from e
    from ..inference import describe_target, load_for_inference

    model, tokenizer, info = load_for_inference(target, device=device, dtype=dtype)
    name = model_name or _default_name(describe_target(target), str(target))
    app = create_app(model, tokenizer, name, api_key=api_key, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    print(f"serving {info['description']} as model {name!r} on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
    return 0


def _default_name(info: dict[str, Any], target: str) -> str:
    from pathlib import Path

    if info.get("run_dir") is not None:
        return Path(info["run_dir"]).name
    return Path(target).name or target


__all__ = ["check_binding", "create_app", "is_loopback", "serve_main"]
