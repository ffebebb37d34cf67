"""The Studio's HTTP API and the static front end (FastAPI).

Long work (train, resume, merge, export) runs in child processes started by `procs.spawn`; the
server only reads what they write. Chat runs in a worker thread of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask

from . import configs, integrations, procs, sysinfo
from .integrations import Unavailable
from .rundir import JsonlTail, checkpoints, eta_seconds, final_weights, log_tail, read_config
from .security import BadPath, Guard, PathNotAllowed, confine
from .settings import StudioSettings
from .store import RunStore, slugify

STATIC = Path(__file__).resolve().parent / "static"
UPLOAD_EXTS = {".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt"}
EXPORT_KINDS = ("merge", "gguf", "ollama")


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(settings: StudioSettings) -> FastAPI:
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore(settings.runs_dir, settings.db_path)
    store.scan()
    chat = integrations.ChatEngine()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def monitor():
            last_scan = time.time()
            while True:
                await asyncio.sleep(1.0)
                try:
                    await asyncio.to_thread(store.poll_jobs)
                    if time.time() - last_scan >= settings.scan_interval_s:
                        await asyncio.to_thread(store.scan)
                        last_scan = time.time()
                except Exception:  # a bad run folder must not stop the monitor
                    pass

        task = asyncio.create_task(monitor())
        # Import the optional parts (torch, the data pipeline) now, not on the first page load.
        threading.Thread(target=integrations.features, daemon=True, name="studio-warmup").start()
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="Tunery Studio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.store = store
    app.state.chat = chat
    app.add_middleware(Guard, settings=settings)

    @app.exception_handler(PathNotAllowed)
    async def _forbidden(request: Request, exc: PathNotAllowed):
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(BadPath)
    async def _badpath(request: Request, exc: BadPath):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    # ------------------------------------------------------------------ helpers
    def run_or_404(run_id: int) -> tuple[dict[str, Any], Path]:
        view = store.get_run(run_id)
        path = store.run_path(run_id)
        if view is None or path is None:
            raise HTTPException(404, f"no run with id {run_id}")
        return view, path

    async def body_json(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise HTTPException(400, "the request body must be JSON") from None
        if not isinstance(data, dict):
            raise HTTPException(400, "the request body must be a JSON object")
        return data

    def compose(body: dict[str, Any]) -> dict[str, Any]:
        """The page's form config with its advanced YAML merged over it."""
        config = body.get("config") or {}
        if not isinstance(config, dict):
            raise HTTPException(400, "config must be an object")
        try:
            extra = configs.parse_yaml_overrides(body.get("advanced") or "")
        except Exception as e:
            raise HTTPException(400, f"advanced YAML: {e}") from None
        merged = dict(config)
        for k, v in extra.items():
            if isinstance(v, dict) and isinstance(merged.get(k), dict):
                merged[k] = {**merged[k], **v}
            else:
                merged[k] = v
        return merged

    def checked_or_error(body: dict[str, Any]) -> configs.Checked:
        try:
            return configs.check(compose(body), settings)
        except HTTPException as e:
            return configs.Checked({}, problems=[str(e.detail)])

    def refuse_unsafe_run(run: Path, what: str) -> None:
        """A run folder's own config (maybe written by the CLI) must not make the Studio run code either."""
        forbidden: list[str] = []
        configs.refuse_code(read_config(run), forbidden)
        if forbidden:
            raise HTTPException(403, "; ".join(forbidden) + f" ({what} this run from the CLI)")

    def start_job(run_id: int, run: Path, kind: str, label: str, args: list[str], log: Path,
                  output: Path | None = None) -> int:
        cmd = [*settings.tunery_cmd, *args]
        # Defence in depth: a child started from the web UI never imports user reward code.
        popen = procs.spawn(cmd, log, cwd=run, env={"TUNERY_ALLOW_USER_REWARDS": "0"})
        return store.add_job(run_id, kind, label, cmd, popen, log, output)

    # ------------------------------------------------------------------ pages
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    # ------------------------------------------------------------------ info
    @app.get("/api/info")
    async def info():
        from .. import __version__

        snap = await asyncio.to_thread(sysinfo.snapshot)
        return {"version": __version__, "runs_dir": str(settings.runs_dir),
                "model_roots": [str(p) for p in settings.model_roots], "data_roots": [str(p) for p in settings.data_roots],
                "uploads_dir": str(settings.uploads_dir), "max_upload_bytes": settings.max_upload_bytes,
                "features": await asyncio.to_thread(integrations.features), "quants": integrations.export_quants(),
                "gpus": snap["gpus"], "auth": bool(settings.auth_token)}

    @app.get("/api/schema")
    async def schema():
        from ..config import Config

        return Config.model_json_schema()

    # ------------------------------------------------------------------ runs
    @app.get("/api/runs")
    async def list_runs():
        return {"runs": await asyncio.to_thread(store.list_runs)}

    @app.get("/api/runs/{run_id}")
    async def get_run(run_id: int):
        view, path = await asyncio.to_thread(run_or_404, run_id)
        return {**view, "dir": str(path), "checkpoints": checkpoints(path), "final": final_weights(path),
                "jobs": store.jobs(run_id), "config_yaml": _read_text(path / "config.yaml"),
                "exports": _exports(path)}

    @app.get("/api/runs/{run_id}/config.yaml")
    async def run_config(run_id: int):
        _, path = run_or_404(run_id)
        text = _read_text(path / "config.yaml")
        if text is None:
            raise HTTPException(404, "this run has no config.yaml")
        return PlainTextResponse(text, media_type="application/x-yaml",
                                 headers={"Content-Disposition": f'attachment; filename="{path.name}.yaml"'})

    @app.get("/api/runs/{run_id}/metrics")
    async def run_metrics(run_id: int):
        _, path = run_or_404(run_id)
        _, rows = JsonlTail(path / "metrics.jsonl").read()
        return {"rows": rows}

    @app.get("/api/runs/{run_id}/log")
    async def run_log(run_id: int, lines: int = 200):
        _, path = run_or_404(run_id)
        return {"lines": log_tail(path / "train.log", max_lines=max(1, min(lines, 2000)))}

    @app.get("/api/runs/{run_id}/events")
    async def run_events(run_id: int, request: Request):
        run_or_404(run_id)
        return StreamingResponse(_run_stream(run_id, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _run_stream(run_id: int, request: Request):
        path = store.run_path(run_id)
        tail = JsonlTail(path / "metrics.jsonl")
        recent: list[dict[str, Any]] = []
        sent: dict[str, Any] = {}
        last_sys = 0.0
        yield "retry: 2000\n\n"
        while True:
            if await request.is_disconnected():
                return
            reset, rows = await asyncio.to_thread(tail.read)
            if reset:
                recent.clear()
                yield sse("reset", {})
            if rows:
                recent.extend(r for r in rows if "loss" in r)
                del recent[:-40]
                for i in range(0, len(rows), 5000):
                    yield sse("metrics", {"rows": rows[i:i + 5000]})
            view = await asyncio.to_thread(store.get_run, run_id)
            if view is None:
                yield sse("end", {"reason": "the run folder is gone"})
                return
            status = _status_payload(view, recent, path)
            if status != sent.get("status"):
                sent["status"] = status
                yield sse("status", status)
            log = path / "train.log"
            sig = _stat_sig(log)
            if sig != sent.get("log"):
                sent["log"] = sig
                yield sse("log", {"lines": await asyncio.to_thread(log_tail, log)})
            jobs = [_job_payload(j, path) for j in store.jobs(run_id) if j["kind"] != "train"]
            if jobs != sent.get("jobs"):
                sent["jobs"] = jobs
                yield sse("jobs", {"jobs": jobs, "exports": _exports(path)})
            now = time.time()
            if now - last_sys >= 2.0:
                last_sys = now
                yield sse("system", await asyncio.to_thread(sysinfo.snapshot))
            if not view["busy"] and view["state"] not in ("starting", "running", "stopping"):
                yield sse("end", {"state": view["state"]})
                return
            await asyncio.sleep(1.0)

    def _status_payload(view: dict[str, Any], recent: list[dict[str, Any]], path: Path) -> dict[str, Any]:
        step, total = view.get("step"), view.get("total_steps")
        live = view["state"] in ("running", "starting", "stopping")
        return {"state": view["state"], "step": step, "total_steps": total,
                "progress": (step / total) if step is not None and total else None,
                "eta_s": eta_seconds(recent, step, total) if view["state"] == "running" else None,
                "duration_s": round(view["duration_s"], 1) if view.get("duration_s") else None,
                "last_loss": view.get("last_loss"),
                "can_stop": live and view["train_job"] is not None,
                "stop_requested": bool(view["train_job"] and view["train_job"]["stop_requested"] and live),
                "can_resume": not live and not view["busy"] and view["state"] in ("stopped", "failed", "interrupted")
                and bool(checkpoints(path)),
                "final": final_weights(path), "checkpoints": checkpoints(path)}

    # ------------------------------------------------------------------ new run
    @app.post("/api/config/check")
    async def config_check(request: Request):
        body = await body_json(request)
        c = await asyncio.to_thread(checked_or_error, body)
        return {"ok": c.ok, "problems": c.problems, "forbidden": c.forbidden, "yaml": c.yaml() if c.config else "",
                "config": c.config}

    async def with_config(body: dict[str, Any], fn, *args) -> dict[str, Any]:
        """Run a helper of another part (preview, planner) on the page's config; "not available" when absent."""
        c = await asyncio.to_thread(checked_or_error, body)
        if c.forbidden:
            raise HTTPException(403, "; ".join(c.forbidden))
        if c.cfg is None:
            return {"available": True, "ok": False, "problems": c.problems}
        try:
            result = await asyncio.to_thread(fn, c.cfg, *args)
        except Unavailable as e:
            return {"available": False, "reason": str(e)}
        except Exception as e:  # data errors name the file, row and field
            return {"available": True, "ok": False, "problems": [f"{type(e).__name__}: {e}"]}
        return {"available": True, "ok": True, **result}

    @app.post("/api/config/preview")
    async def config_preview(request: Request):
        body = await body_json(request)
        try:
            n = max(1, min(int(body.get("n") or 3), 10))
        except (TypeError, ValueError):
            raise HTTPException(400, "n must be a number of examples") from None
        return await with_config(body, lambda cfg: {"examples": integrations.preview(cfg, n)})

    @app.post("/api/config/plan")
    async def config_plan(request: Request):
        body = await body_json(request)
        gpu_mem = str(body.get("gpu_mem") or "").strip() or None
        return await with_config(body, integrations.plan, gpu_mem)

    @app.post("/api/uploads")
    async def upload(request: Request, filename: str):
        name = Path(filename).name
        ext = "".join(Path(name).suffixes[-1:]).lower()
        if ext not in UPLOAD_EXTS:
            raise HTTPException(400, f"upload a data file ({', '.join(sorted(UPLOAD_EXTS))}), not {name!r}")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_upload_bytes:
            raise HTTPException(413, f"the file is larger than the upload limit ({_mib(settings.max_upload_bytes)})")
        stem = slugify(Path(name).stem)
        dest = settings.uploads_dir / f"{stem}{ext}"
        i = 1
        while dest.exists():
            i += 1
            dest = settings.uploads_dir / f"{stem}-{i}{ext}"
        tmp = dest.with_name(f".{dest.name}.part")
        size = 0
        try:
            with open(tmp, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > settings.max_upload_bytes:
                        raise HTTPException(413, f"the file is larger than the upload limit ({_mib(settings.max_upload_bytes)})")
                    f.write(chunk)
            if size == 0:
                raise HTTPException(400, "the uploaded file is empty")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return {"path": str(dest), "name": dest.name, "size": size}

    @app.get("/api/files")
    async def files(kind: str = "data"):
        """Candidate datasets (kind=data) or models (kind=model) inside the allowed roots."""
        if kind not in ("data", "model"):
            raise HTTPException(400, "kind is data or model")
        # Models: the extra roots, and merged exports of earlier runs.
        roots = [settings.uploads_dir, *settings.data_roots] if kind == "data" else [*settings.model_roots, settings.runs_dir]
        return {"files": await asyncio.to_thread(_candidates, roots, kind)}

    @app.post("/api/runs")
    async def launch(request: Request):
        body = await body_json(request)
        name = str(body.get("name") or "").strip() or time.strftime("run-%Y%m%d-%H%M%S")
        c = await asyncio.to_thread(checked_or_error, body)
        if c.forbidden:
            raise HTTPException(403, "; ".join(c.forbidden))
        if c.problems:
            return JSONResponse({"detail": "the config has problems", "problems": c.problems}, status_code=400)
        run_id, run = store.create_run(name)
        c.config["output_dir"] = str(run)
        (run / "config.yaml").write_text(c.yaml())
        start_job(run_id, run, "train", "train", ["train", str(run / "config.yaml")], run / "train.log")
        store.refresh(run_id)
        return {"id": run_id, "name": run.name, "dir": str(run)}

    @app.post("/api/runs/{run_id}/stop")
    async def stop(run_id: int):
        view, _ = run_or_404(run_id)
        job = view["train_job"]
        if not job or job["state"] != "running":
            if view["state"] == "running":
                raise HTTPException(409, "this run was started outside the Studio; stop it where it runs (Ctrl-C)")
            raise HTTPException(409, f"the run is not running (it is {view['state']})")
        if not procs.alive(job["pid"], job["pid_start"]):
            raise HTTPException(409, "the training process has already ended")
        # First Stop: the trainer finishes its step, writes a checkpoint and exits. A second one stops at once.
        procs.signal_group(job["pid"], signal.SIGTERM)
        store.mark_stop(job["id"])
        return {"ok": True, "force": bool(job["stop_requested"])}

    @app.post("/api/runs/{run_id}/resume")
    async def resume(run_id: int):
        view, run = run_or_404(run_id)
        if view["busy"] or view["state"] in ("starting", "running", "stopping"):
            raise HTTPException(409, f"the run is {view['state']}; stop it first")
        if not checkpoints(run):
            raise HTTPException(409, "this run has no checkpoint to resume from")
        refuse_unsafe_run(run, "resume")
        args = ["train", str(run / "config.yaml"), "resume_from_checkpoint=auto", f"output_dir={run}"]
        with open(run / "train.log", "ab") as f:
            f.write(f"\n--- resumed from the Studio at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
        start_job(run_id, run, "train", "resume", args, run / "train.log")
        return {"ok": True}

    # ------------------------------------------------------------------ export
    @app.post("/api/runs/{run_id}/export")
    async def export(run_id: int, request: Request):
        body = await body_json(request)
        view, run = run_or_404(run_id)
        kind = str(body.get("kind") or "")
        if kind not in EXPORT_KINDS:
            raise HTTPException(400, f"kind must be one of {', '.join(EXPORT_KINDS)}")
        quant = str(body.get("quant") or "f16")
        if kind != "merge" and quant not in integrations.export_quants():
            raise HTTPException(400, f"quant must be one of {', '.join(integrations.export_quants())}")
        refuse_unsafe_run(run, "export")
        source = _export_source(run, str(body.get("source") or ""))
        if view["state"] in ("starting", "running", "stopping") and source == run:
            raise HTTPException(409, "the run is still training; export a checkpoint or wait for it to finish")
        if any(j["state"] == "running" and j["kind"] == kind for j in store.jobs(run_id)):
            raise HTTPException(409, f"a {kind} export of this run is already running")
        tag = "" if source == run else f"-{source.name}"
        exports = run / "exports"
        exports.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if kind == "merge":
            out = exports / f"merged{tag}"
            args = ["merge", str(source), "--out", str(out)]
        elif kind == "gguf":
            out = exports / f"{slugify(run.name)}{tag}-{quant}.gguf"
            args = ["export", str(source), "--format", "gguf", "--quant", quant, "--out", str(out)]
        else:
            out = exports / f"ollama{tag}-{quant}"
            args = ["export", str(source), "--format", "ollama", "--quant", quant, "--out", str(out)]
        label = kind if kind == "merge" else f"{kind} {quant}"
        jid = start_job(run_id, run, kind, label, args, exports / f"{kind}-{stamp}.log", out)
        return {"job": jid, "output": out.relative_to(run).as_posix()}

    @app.get("/api/runs/{run_id}/download")
    async def download(run_id: int, path: str):
        _, run = run_or_404(run_id)
        target = confine(path, [run], base=run)
        if not target.exists():
            raise HTTPException(404, f"{path} does not exist in this run")
        if target.is_file():
            return FileResponse(target, filename=target.name)
        tmpdir = Path(tempfile.mkdtemp(prefix="tunery-zip-"))
        zpath = tmpdir / f"{target.name}.zip"
        await asyncio.to_thread(_zip_folder, target, zpath)
        return FileResponse(zpath, filename=zpath.name, media_type="application/zip",
                            background=BackgroundTask(shutil.rmtree, tmpdir, True))

    # ------------------------------------------------------------------ chat
    @app.get("/api/chat/targets")
    async def chat_targets():
        runs = await asyncio.to_thread(store.list_runs)
        out = []
        for r in runs:
            p = settings.runs_dir / r["path"]
            options = []
            final = final_weights(p)
            if final:
                options.append({"target": "final", "label": f"final ({final}/)"})
            for ck in reversed(checkpoints(p)):
                options.append({"target": ck["path"], "label": f"checkpoint step {ck['step']}"})
            if options:
                out.append({"id": r["id"], "name": r["name"], "state": r["state"], "options": options})
        return {"runs": out, "available": integrations.available("tunery.inference", "load_for_inference")}

    @app.post("/api/chat")
    async def chat_stream(request: Request):
        body = await body_json(request)
        try:
            run_id = int(body.get("run_id"))
        except (TypeError, ValueError):
            raise HTTPException(400, "run_id is required") from None
        _, run = run_or_404(run_id)
        refuse_unsafe_run(run, "chat with")
        target = str(body.get("target") or "final")
        target_path = run if target == "final" else confine(target, [run / "checkpoints"], base=run)
        if not target_path.is_dir():
            raise HTTPException(404, f"{target} does not exist in this run")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPException(400, "messages must be a non-empty list")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise HTTPException(400, "each message needs role system, user or assistant and content")
            clean.append({"role": m["role"], "content": str(m.get("content") or "")})
        gen = _gen_settings(body.get("settings") or {})
        return StreamingResponse(_chat_events(target_path, clean, gen, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _chat_events(target: Path, messages, gen, request: Request):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(kind: str, data: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, data))

        def work():
            try:
                with chat.lock:
                    t0 = time.time()
                    if not chat.is_loaded(target):
                        put("status", {"text": "loading the model…"})
                        chat.load(target)
                    put("status", {"text": "generating…"})
                    t1 = time.time()
                    n = chat.reply(target, messages, gen, lambda piece: put("token", {"text": piece}), stop)
                dt = time.time() - t1
                put("done", {"tokens": n, "seconds": round(time.time() - t0, 2),
                             "per_s": round(n / dt, 1) if dt > 0 else None})
            except Unavailable as e:
                put("error", {"text": f"chat is not available: {e}"})
            except Exception as e:
                put("error", {"text": f"{type(e).__name__}: {e}"})

        thread = threading.Thread(target=work, daemon=True, name="studio-chat")
        thread.start()
        try:
            while True:
                try:
                    kind, data = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    yield ": keep-alive\n\n"
                    continue
                yield sse(kind, data)
                if kind in ("done", "error"):
                    return
        finally:
            stop.set()

    @app.post("/api/chat/unload")
    async def chat_unload():
        with chat.lock:
            chat.unload()
        return {"ok": True}

    return app


# ---------------------------------------------------------------------- small helpers
def _read_text(p: Path) -> str | None:
    try:
        return p.read_text()
    except OSError:
        return None


def _stat_sig(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _gen_settings(s: dict[str, Any]) -> dict[str, Any]:
    def num(key, default, lo, hi, cast=float):
        try:
            v = cast(s.get(key, default))
        except (TypeError, ValueError):
            raise HTTPException(400, f"settings.{key} must be a number") from None
        return min(max(v, lo), hi)

    out = {"max_new_tokens": num("max_new_tokens", 256, 1, 4096, int), "temperature": num("temperature", 0.7, 0.0, 5.0),
           "top_p": num("top_p", 1.0, 0.01, 1.0), "top_k": num("top_k", 0, 0, 100000, int),
           "repetition_penalty": num("repetition_penalty", 1.0, 0.5, 3.0)}
    if s.get("seed") not in (None, ""):
        out["seed"] = num("seed", 0, 0, 2**31 - 1, int)
    return out


def _export_source(run: Path, source: str) -> Path:
    if not source or source == "final":
        return run
    if not re.fullmatch(r"checkpoints/step-\d+", source):
        raise HTTPException(400, "source is final or checkpoints/step-N")
    p = confine(source, [run / "checkpoints"], base=run)
    if not p.is_dir():
        raise HTTPException(404, f"{source} does not exist in this run")
    return p


def _job_payload(j: dict[str, Any], run: Path) -> dict[str, Any]:
    lines = log_tail(Path(j["log"]), max_lines=12) if j.get("log") else []
    pct = None
    for line in reversed(lines):
        m = re.search(r"(\d{1,3})%\|", line) or re.search(r"\b(\d{1,3}(?:\.\d+)?)%", line)
        if m:
            pct = min(100.0, float(m.group(1)))
            break
    out = j.get("output")
    rel = None
    if out:
        try:
            rel = Path(out).relative_to(run).as_posix()
        except ValueError:
            rel = None
    ready = j["state"] == "done" and bool(out) and Path(out).exists()
    return {"id": j["id"], "kind": j["kind"], "label": j["label"], "state": j["state"], "started": j["started"],
            "finished": j["finished"], "returncode": j["returncode"], "percent": 100.0 if ready else pct,
            "log": lines[-6:], "output": rel if ready else None}


def _exports(run: Path) -> list[dict[str, Any]]:
    d = run / "exports"
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or p.suffix == ".log":
            continue
        size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        out.append({"name": p.name, "path": f"exports/{p.name}", "folder": p.is_dir(), "size": size})
    return out


def _zip_folder(folder: Path, zpath: Path) -> None:
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file() and not f.is_symlink():
                z.write(f, f"{folder.name}/{f.relative_to(folder).as_posix()}")


def _candidates(roots: list[Path], kind: str, limit: int = 200) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            depth = len(Path(dirpath).relative_to(root).parts)
            skip = {"uploads", "checkpoints"} if kind == "model" else set()
            dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".") and d not in skip] if depth < 3 else []
            here = Path(dirpath)
            if kind == "model" and "config.json" in filenames:
                out.append({"path": str(here), "name": here.relative_to(root).as_posix(), "kind": "folder"})
            for fn in sorted(filenames):
                p = here / fn
                if fn.startswith("."):
                    continue
                if kind == "data" and p.suffix.lower() in UPLOAD_EXTS:
                    out.append({"path": str(p), "name": p.relative_to(root).as_posix(), "size": p.stat().st_size})
                elif kind == "model" and p.suffix.lower() == ".gguf":
                    out.append({"path": str(p), "name": p.relative_to(root).as_posix(), "kind": "gguf"})
                if len(out) >= limit:
                    return out
    return out
