"""The run store: SQLite beside the runs (RUNS_DIR/studio.db).

The run folders stay the source of truth; the database remembers which runs exist (including those
started from the CLI, found by scanning), a cached summary of each, and the child processes
(jobs: train, resume, merge, export) the Studio started, so a restarted server still knows them.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from . import procs
from .rundir import find_run_dirs, is_run_dir, signature, summarize

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  path TEXT UNIQUE NOT NULL,
  name TEXT NOT NULL,
  source TEXT NOT NULL DEFAULT 'cli',
  created REAL NOT NULL,
  sig TEXT,
  summary TEXT,
  missing INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  run_id INTEGER NOT NULL,
  kind TEXT NOT NULL,
  label TEXT,
  cmd TEXT,
  pid INTEGER,
  pid_start TEXT,
  state TEXT NOT NULL,
  returncode INTEGER,
  stop_requested INTEGER NOT NULL DEFAULT 0,
  started REAL NOT NULL,
  finished REAL,
  log TEXT,
  output TEXT
);
CREATE INDEX IF NOT EXISTS jobs_run ON jobs(run_id);
"""

TERMINAL = {"completed", "stopped", "failed", "interrupted"}
# A CLI run whose status.json says running but has not changed for this long is shown as interrupted.
STALE_S = 15 * 60


def slugify(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip(".-_")
    return s[:80] or "run"


class RunStore:
    def __init__(self, runs_dir: Path, db_path: Path | None = None):
        self.runs_dir = runs_dir
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.db = sqlite3.connect(str(db_path or runs_dir / "studio.db"), check_same_thread=False, timeout=30)
        self.db.row_factory = sqlite3.Row
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            self.db.commit()
        self.children: dict[int, subprocess.Popen] = {}  # job id -> Popen, for jobs this process started
        self.last_scan = 0.0

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # ------------------------------------------------------------------ runs
    def _q(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.lock:
            cur = self.db.execute(sql, args)
            rows = cur.fetchall()
            self.db.commit()
            return rows

    def scan(self) -> None:
        """Pick up run folders (Studio or CLI), refresh changed summaries, hide vanished ones."""
        found = {p.relative_to(self.runs_dir).as_posix(): p for p in find_run_dirs(self.runs_dir)}
        known = {r["path"]: r for r in self._q("SELECT id, path, sig, missing FROM runs")}
        for rel, p in found.items():
            sig = signature(p)
            row = known.get(rel)
            if row is None:
                summ = summarize(p)
                created = summ.get("started") or p.stat().st_mtime
                self._q("INSERT OR IGNORE INTO runs(path, name, source, created, sig, summary) VALUES (?,?,?,?,?,?)",
                        (rel, p.name, "cli", created, sig, json.dumps(summ)))
            elif row["sig"] != sig or row["missing"]:
                self._q("UPDATE runs SET sig=?, summary=?, missing=0 WHERE id=?", (sig, json.dumps(summarize(p)), row["id"]))
        for rel, row in known.items():
            if rel not in found and not row["missing"] and not (self.runs_dir / rel).is_dir():
                self._q("UPDATE runs SET missing=1 WHERE id=?", (row["id"],))
        self.last_scan = time.time()

    def create_run(self, name: str, source: str = "studio") -> tuple[int, Path]:
        """A new, uniquely named run folder under runs_dir."""
        base = slugify(name)
        for i in range(1000):
            rel = base if i == 0 else f"{base}-{i + 1}"
            p = self.runs_dir / rel
            if p.exists() or self._q("SELECT 1 FROM runs WHERE path=?", (rel,)):
                continue
            p.mkdir(parents=True)
            with self.lock:
                cur = self.db.execute("INSERT INTO runs(path, name, source, created) VALUES (?,?,?,?)",
                                      (rel, p.name, source, time.time()))
                self.db.commit()
                return int(cur.lastrowid), p
        raise RuntimeError(f"could not find a free run name for {name!r}")

    def refresh(self, run_id: int) -> None:
        r = self._q("SELECT path FROM runs WHERE id=?", (run_id,))
        if r:
            p = self.runs_dir / r[0]["path"]
            if p.is_dir():
                self._q("UPDATE runs SET sig=?, summary=? WHERE id=?", (signature(p), json.dumps(summarize(p)), run_id))

    def run_path(self, run_id: int) -> Path | None:
        r = self._q("SELECT path FROM runs WHERE id=? AND missing=0", (run_id,))
        return self.runs_dir / r[0]["path"] if r else None

    def get_run(self, run_id: int) -> dict[str, Any] | None:
        self.poll_jobs()
        r = self._q("SELECT * FROM runs WHERE id=? AND missing=0", (run_id,))
        if not r:
            return None
        p = self.runs_dir / r[0]["path"]
        if p.is_dir() and signature(p) != r[0]["sig"]:
            self.refresh(run_id)
            r = self._q("SELECT * FROM runs WHERE id=?", (run_id,))
        return self._view(r[0])

    def list_runs(self) -> list[dict[str, Any]]:
        if time.time() - self.last_scan > 2.0:
            self.scan()
        self.poll_jobs()
        rows = self._q("SELECT * FROM runs WHERE missing=0")
        out = [self._view(r) for r in rows]
        out.sort(key=lambda v: v.get("started") or v["created"], reverse=True)
        return out

    def _view(self, row: sqlite3.Row) -> dict[str, Any]:
        summ = json.loads(row["summary"]) if row["summary"] else {}
        jobs = self.jobs(row["id"])
        train = next((j for j in jobs if j["kind"] == "train"), None)
        state = effective_state(summ, train)
        started = summ.get("started") or (train["started"] if train else None) or row["created"]
        duration = summ.get("elapsed_s")  # training time, as the trainer logged it
        if state == "starting" and train and duration is None:
            duration = time.time() - train["started"]
        elif state in ("running", "stopping") and duration is not None and summ.get("status_mtime"):
            duration += max(0.0, time.time() - summ["status_mtime"])  # time into the current step
        elif state in ("running", "stopping") and duration is None:
            duration = time.time() - started
        return {
            "id": row["id"], "name": row["name"], "path": row["path"], "source": row["source"],
            "created": row["created"], "state": state, "step": summ.get("step"),
            "total_steps": summ.get("total_steps"), "method": summ.get("method", ""), "model": summ.get("model", ""),
            "dataset": summ.get("dataset", ""), "started": started, "duration_s": duration,
            "last_loss": summ.get("last_loss"), "last_eval_loss": summ.get("last_eval_loss"),
            "final": summ.get("final"), "checkpoints": summ.get("checkpoints", 0),
            "train_job": train, "busy": any(j["state"] == "running" for j in jobs),
        }

    # ------------------------------------------------------------------ jobs
    def add_job(self, run_id: int, kind: str, label: str, cmd: list[str], popen: subprocess.Popen,
                log: Path, output: Path | None = None) -> int:
        with self.lock:
            cur = self.db.execute(
                "INSERT INTO jobs(run_id, kind, label, cmd, pid, pid_start, state, started, log, output) "
                "VALUES (?,?,?,?,?,?,?,?,?,?)",
                (run_id, kind, label, json.dumps(cmd), popen.pid, procs.proc_start_time(popen.pid), "running",
                 time.time(), str(log), str(output) if output else None))
            self.db.commit()
            jid = int(cur.lastrowid)
        self.children[jid] = popen
        return jid

    def jobs(self, run_id: int, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM jobs WHERE run_id=?" + (" AND kind=?" if kind else "") + " ORDER BY id DESC"
        return [dict(r) for r in self._q(sql, (run_id, kind) if kind else (run_id,))]

    def job(self, job_id: int) -> dict[str, Any] | None:
        r = self._q("SELECT * FROM jobs WHERE id=?", (job_id,))
        return dict(r[0]) if r else None

    def mark_stop(self, job_id: int) -> None:
        self._q("UPDATE jobs SET stop_requested=stop_requested+1 WHERE id=?", (job_id,))

    def poll_jobs(self) -> None:
        """Notice jobs that ended (ours through Popen, older ones through their pid and start time)."""
        for r in self._q("SELECT id, pid, pid_start, output FROM jobs WHERE state='running'"):
            jid = r["id"]
            popen = self.children.get(jid)
            if popen is not None:
                rc = popen.poll()
                if rc is None:
                    continue
                self.children.pop(jid, None)
            else:
                if procs.alive(r["pid"], r["pid_start"]):
                    continue
                rc = None  # not our child (the Studio restarted): the exit code is unknown
            if rc is None:
                ok = bool(r["output"]) and Path(r["output"]).exists()
                state = "done" if ok else "ended"
            else:
                state = "done" if rc == 0 else "failed"
            self._q("UPDATE jobs SET state=?, returncode=?, finished=? WHERE id=?", (state, rc, time.time(), jid))


def effective_state(summ: dict[str, Any], train: dict[str, Any] | None) -> str:
    """The state to show: status.json as the trainer wrote it, corrected by what the process did."""
    fs = summ.get("file_state")
    mtime = summ.get("status_mtime")
    if train and train["state"] == "running":
        if train["stop_requested"]:
            return "stopping"
        if fs == "running" and mtime and mtime >= train["started"] - 1:
            return "running"
        return "starting"
    if train and train["state"] != "running":
        fresh = mtime is not None and mtime >= train["started"] - 1
        if not fresh:
            # The last launch never wrote a status: stopped, or failed, while loading the model or the data.
            return "stopped" if train["stop_requested"] else "failed"
        if fs == "running" and train.get("finished") and mtime <= train["finished"] + 5:
            return "failed"  # killed without writing its final status
    if fs == "running":
        return "running" if mtime and time.time() - mtime < STALE_S else "interrupted"
    if fs in TERMINAL:
        return fs
    return "created" if fs is None else str(fs)


def run_exists(p: Path) -> bool:
    return p.is_dir() and is_run_dir(p)
