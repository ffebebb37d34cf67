"""Studio API: run store, validation, path confinement, token, CSRF, child processes (with a fake trainer)."""

from __future__ import annotations

import argparse
import io
import json
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from tunery.studio import StudioSettings, create_app, studio_main  # noqa: E402

H = {"X-Tunery": "1"}
BASE = "http://127.0.0.1:7860"

# Stands in for `python -m tunery` so process handling is tested in a second, not a training minute.
FAKE_CLI = textwrap.dedent('''
    import json, os, signal, sys, time
    from pathlib import Path
    import yaml

    verb, target, *rest = sys.argv[1:]
    if verb == "train":
        cfg = yaml.safe_load(open(target))
        over = dict(r.split("=", 1) for r in rest)
        run = Path(over.get("output_dir") or cfg["output_dir"])
        total = int(cfg.get("max_steps") or 40)
        step = 0
        if over.get("resume_from_checkpoint") == "auto":
            step = max(int(p.name[5:]) for p in (run / "checkpoints").iterdir())
        time.sleep(float(os.environ.get("FAKE_LOAD_S", "0")))  # loading the model: SIGTERM kills
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        (run / "manifest.json").write_text(json.dumps({"created": "2026-01-01T00:00:00+00:00", "total_steps": total}))
        def status(state):
            (run / "status.json").write_text(json.dumps({"state": state, "step": step, "total_steps": total}))
        status("running")
        print("fake trainer started", flush=True)
        with open(run / "metrics.jsonl", "a") as f:
            while step < total:
                time.sleep(float(os.environ.get("FAKE_STEP_S", "0.05")))
                step += 1
                f.write(json.dumps({"step": step, "loss": 2.0 / step, "lr": 1e-4, "grad_norm": 1.0,
                                    "tokens_per_s": 100.0, "elapsed_s": step * 0.05}) + "\\n")
                f.flush()
                status("running")
                if stop:
                    (run / "checkpoints" / f"step-{step}" / "adapter").mkdir(parents=True)
                    status("stopped")
                    sys.exit(0)
        (run / "adapter").mkdir()
        status("completed")
    elif verb in ("export", "merge"):
        out = Path(rest[rest.index("--out") + 1])
        for p in (10, 50, 100):
            print(f"writing: {p}%|###|", flush=True)
        if verb == "merge" or "ollama" in rest:
            out.mkdir(parents=True)
            (out / "model.safetensors").write_bytes(b"weights")
            (out / "config.json").write_text("{}")
        else:
            out.write_bytes(b"GGUF fake")
    elif verb == "crash":
        sys.exit(3)
''')


@pytest.fixture
def fake_cli(tmp_path) -> list[str]:
    p = tmp_path / "fake_tunery.py"
    p.write_text(FAKE_CLI)
    return [sys.executable, str(p)]


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


def make_settings(runs_dir: Path, fake_cli: list[str] | None = None, **kw) -> StudioSettings:
    if fake_cli:
        kw["tunery_cmd"] = fake_cli
    return StudioSettings(runs_dir=runs_dir, **kw)


def client(settings: StudioSettings) -> TestClient:
    return TestClient(create_app(settings), base_url=BASE)


def cli_run(runs_dir: Path, name: str = "cli-run", state: str = "completed") -> Path:
    """A run folder as `tunery train` leaves it."""
    run = runs_dir / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"base_model": "default", "adapter": "lora", "output_dir": str(run),
                                                     "datasets": [{"path": "data/train.jsonl", "type": "alpaca"}]}))
    (run / "manifest.json").write_text(json.dumps({"created": "2026-01-02T03:04:05+00:00", "total_steps": 3}))
    (run / "status.json").write_text(json.dumps({"state": state, "step": 3, "total_steps": 3}))
    rows = [{"step": s, "loss": 3.0 - s, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 10.0, "elapsed_s": 2.0 * s}
            for s in (1, 2, 3)] + [{"step": 3, "eval_loss": 1.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "adapter").mkdir()
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    return run


def upload_data(c: TestClient, name: str = "train.jsonl") -> str:
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{2 * i}"} for i in range(8)]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    r = c.post(f"/api/uploads?filename={name}", content=body, headers=H)
    assert r.status_code == 200, r.text
    return r.json()["path"]


def sft_config(data_path: str, **extra) -> dict:
    return {"base_model": "default", "adapter": "lora", "max_steps": 5, "sequence_len": 256,
            "datasets": [{"path": data_path, "type": "alpaca", "field_instruction": "question",
                          "field_output": "answer"}], **extra}


def wait_for(fn, timeout=20.0, every=0.05):
    end = time.time() + timeout
    while time.time() < end:
        v = fn()
        if v:
            return v
        time.sleep(every)
    raise AssertionError("timed out waiting")


def run_view(c: TestClient, run_id: int) -> dict:
    r = c.get(f"/api/runs/{run_id}")
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------- runs list and store
def test_runs_list_shows_cli_runs_and_survives_restart(runs_dir):
    cli_run(runs_dir, "exp/a")
    with client(make_settings(runs_dir)) as c:
        page = c.get("/")
        assert page.status_code == 200 and "Tunery" in page.text
        runs = c.get("/api/runs").json()["runs"]
        assert [r["name"] for r in runs] == ["a"]
        r = runs[0]
        assert r["path"] == "exp/a" and r["source"] == "cli" and r["state"] == "completed"
        assert r["method"] == "sft · lora" and r["dataset"] == "train.jsonl" and "SmolLM2" in r["model"]
        assert r["last_loss"] == 0.0 and r["duration_s"] == 6.0 and r["started"] > 0
        first_id = r["id"]
        # A run that appears while the server runs is picked up by the scan.
        cli_run(runs_dir, "b", state="stopped")
        time.sleep(2.1)
        assert {x["name"]: x["state"] for x in c.get("/api/runs").json()["runs"]} == {"a": "completed", "b": "stopped"}
    assert (runs_dir / "studio.db").is_file()
    with client(make_settings(runs_dir)) as c:  # a restarted server
        runs = {x["name"]: x for x in c.get("/api/runs").json()["runs"]}
        assert set(runs) == {"a", "b"} and runs["a"]["id"] == first_id
        detail = run_view(c, first_id)
        assert detail["final"] == "adapter" and detail["checkpoints"] == [{"step": 2, "path": "checkpoints/step-2"}]
        assert "base_model: default" in detail["config_yaml"]
        rows = c.get(f"/api/runs/{first_id}/metrics").json()["rows"]
        assert len(rows) == 4 and rows[-1]["eval_loss"] == 1.5
        assert c.get("/api/runs/999").status_code == 404


def test_stale_running_cli_run_is_interrupted(runs_dir):
    import os

    run = cli_run(runs_dir, "old", state="running")
    os.utime(run / "status.json", (time.time() - 3600, time.time() - 3600))
    with client(make_settings(runs_dir)) as c:
        assert c.get("/api/runs").json()["runs"][0]["state"] == "interrupted"


def test_events_stream_of_a_finished_run(runs_dir):
    run_id = None
    cli_run(runs_dir, "done")
    with client(make_settings(runs_dir)) as c:
        run_id = c.get("/api/runs").json()["runs"][0]["id"]
        with c.stream("GET", f"/api/runs/{run_id}/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            text = "".join(r.iter_text())
    events = [blk.split("\n")[0][7:] for blk in text.split("\n\n") if blk.startswith("event: ")]
    assert events[0] == "metrics" and "status" in events and "system" in events and events[-1] == "end"
    status = next(json.loads(b.split("data: ", 1)[1]) for b in text.split("\n\n") if b.startswith("event: status"))
    assert status["state"] == "completed" and status["progress"] == 1.0 and not status["can_stop"]


# ---------------------------------------------------------------------------- validation
def test_validation_uses_the_cli_schema(runs_dir):
    with client(make_settings(runs_dir)) as c:
        data = upload_data(c)
        ok = c.post("/api/config/check", json={"config": sft_config(data)}, headers=H).json()
        assert ok["ok"], ok
        assert ok["config"]["datasets"][0]["path"] == str(runs_dir / "uploads" / "train.jsonl")
        assert "output_dir:" in ok["yaml"] and "max_steps: 5" in ok["yaml"]
        # Relative paths resolve inside the runs folder.
        rel = c.post("/api/config/check", json={"config": sft_config("uploads/train.jsonl")}, headers=H).json()
        assert rel["ok"], rel
        bad = c.post("/api/config/check", json={"config": sft_config(data, lora_rr=8, learning_rate=-1)}, headers=H).json()
        assert not bad["ok"]
        assert any("lora_rr" in p and "did you mean 'lora_r'" in p for p in bad["problems"])
        assert any(p.startswith("learning_rate") for p in bad["problems"])
        cross = c.post("/api/config/check", json={"config": sft_config(data, adapter="qlora")}, headers=H).json()
        assert any("qlora needs load_in_4bit" in p for p in cross["problems"])
        # The advanced YAML box is merged over the form.
        adv = c.post("/api/config/check", json={"config": sft_config(data), "advanced": "lora_r: 4\nbogus: 1"},
                     headers=H).json()
        assert adv["config"]["lora_r"] == 4 and any(p.startswith("bogus") for p in adv["problems"])
        assert c.post("/api/config/check", json={"config": sft_config(data), "advanced": "- a"}, headers=H).json()["problems"]
        missing = c.post("/api/config/check", json={"config": sft_config("uploads/nope.jsonl")}, headers=H).json()
        assert any("file not found" in p for p in missing["problems"])
        none = c.post("/api/config/check", json={"config": {"base_model": "default"}}, headers=H).json()
        assert any(p.startswith("datasets") for p in none["problems"])
        r = c.post("/api/runs", json={"name": "x", "config": sft_config(data, lora_rr=8)}, headers=H)
        assert r.status_code == 400 and r.json()["problems"]
        assert c.get("/api/schema").json()["properties"]["lora_r"]["description"]


# ---------------------------------------------------------------------------- security
def test_paths_outside_the_roots_are_refused(runs_dir, tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"question": "q", "answer": "a"}\n')
    cli_run(runs_dir, "r")
    with client(make_settings(runs_dir)) as c:
        for path in (str(outside), "../secret.jsonl", "uploads/../../secret.jsonl", "/etc/passwd"):
            d = c.post("/api/config/check", json={"config": sft_config(path)}, headers=H).json()
            assert d["forbidden"] and "outside the folders" in d["forbidden"][0], path
            r = c.post("/api/runs", json={"name": "x", "config": sft_config(path)}, headers=H)
            assert r.status_code == 403, path
        for key in ("base_model", "tokenizer_config", "lora_model_dir", "dataset_prepared_path"):
            d = c.post("/api/config/check", json={"config": sft_config("uploads/x.jsonl", **{key: str(outside)})},
                       headers=H).json()
            assert any(f.startswith(key) for f in d["forbidden"]), key
        # A symlink inside the runs folder that points out of it is outside too.
        (runs_dir / "uploads" / "link.jsonl").symlink_to(outside)
        assert c.post("/api/config/check", json={"config": sft_config("uploads/link.jsonl")}, headers=H).json()["forbidden"]
        run_id = c.get("/api/runs").json()["runs"][0]["id"]
        assert c.get(f"/api/runs/{run_id}/download?path=config.yaml").status_code == 200
        assert c.get(f"/api/runs/{run_id}/download?path=../studio.db").status_code == 403
        assert c.get(f"/api/runs/{run_id}/download?path=/etc/passwd").status_code == 403
        assert c.get(f"/api/runs/{run_id}/download?path=%00").status_code == 400
        assert c.get(f"/api/runs/{run_id}/download?path=exports/none.gguf").status_code == 404
        chat = {"run_id": run_id, "target": "../../r", "messages": [{"role": "user", "content": "hi"}]}
        assert c.post("/api/chat", json=chat, headers=H).status_code == 403
        exp = c.post(f"/api/runs/{run_id}/export", json={"kind": "gguf", "source": "../../x"}, headers=H)
        assert exp.status_code == 400
        assert c.post("/api/uploads?filename=../../evil.jsonl", content=b"{}\n", headers=H).json()["path"] == \
            str(runs_dir / "uploads" / "evil.jsonl")


def test_extra_roots_allow_more(runs_dir, tmp_path):
    data_root = tmp_path / "datasets"
    data_root.mkdir()
    (data_root / "d.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with client(make_settings(runs_dir, data_roots=[data_root])) as c:
        d = c.post("/api/config/check", json={"config": sft_config(str(data_root / "d.jsonl"))}, headers=H).json()
        assert d["ok"], d
        files = c.get("/api/files?kind=data").json()["files"]
        assert [f["name"] for f in files] == ["d.jsonl"]
        assert c.get("/api/files?kind=model").json() == {"files": []}


def test_code_named_over_the_network_is_refused(runs_dir):
    with client(make_settings(runs_dir)) as c:
        data = upload_data(c)
        cases = [
            sft_config(data, rl="grpo", grpo={"reward_funcs": ["os:system"]}),
            sft_config(data, rl="grpo", grpo={"reward_funcs": ["mypkg.rewards:score"]}),
            sft_config(data, trust_remote_code=True),
            {**sft_config(data), "datasets": [{"path": data, "type": "mypkg.formats:load"}]},
            sft_config(data, mlflow_tracking_uri="file:///tmp/elsewhere"),
        ]
        for cfg in cases:
            d = c.post("/api/config/check", json={"config": cfg}, headers=H).json()
            assert d["forbidden"] and not d["ok"], cfg
            assert c.post("/api/runs", json={"name": "x", "config": cfg}, headers=H).status_code == 403
        builtin = sft_config(data, rl="grpo", grpo={"reward_funcs": ["gsm8k_answer"]})
        d = c.post("/api/config/check", json={"config": builtin}, headers=H).json()
        assert not d["forbidden"], d


def test_token_is_required_when_set(runs_dir):
    with client(make_settings(runs_dir, auth_token="s3cret")) as c:
        assert c.get("/api/runs").status_code == 401
        assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/api/config/check", json={}, headers=H).status_code == 401
        page = c.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 401 and "Access token" in page.text
        assert c.get("/static/app.js").status_code == 401
        assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/api/runs", headers={"X-Tunery-Token": "s3cret"}).status_code == 200
        # ?token= signs in: a cookie, and the token leaves the address bar.
        r = c.get("/?token=s3cret&x=1", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/?x=1"
        assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
        assert c.get("/api/runs").status_code == 200  # the client kept the cookie
        assert c.get("/static/app.js").status_code == 200
    with client(make_settings(runs_dir, auth_token="s3cret")) as c:
        assert c.get("/?token=nope", follow_redirects=False).status_code == 401
        r = c.get("//evil.example/?token=s3cret", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"


def test_state_changes_need_the_csrf_header_and_a_local_host(runs_dir):
    with client(make_settings(runs_dir)) as c:
        assert c.post("/api/config/check", json={"config": {}}).status_code == 403
        assert c.post("/api/config/check", json={"config": {}}, headers=H).status_code == 200
        # DNS rebinding: a page on another name that resolves to 127.0.0.1 is refused.
        assert c.get("/api/runs", headers={"Host": "evil.example:7860"}).status_code == 400
        assert c.get("/api/runs", headers={"Host": "localhost:7860"}).status_code == 200


def test_other_hosts_need_a_token(runs_dir, capsys):
    args = argparse.Namespace(host="0.0.0.0", port=7860, runs_dir=str(runs_dir), auth_token=None)
    assert studio_main(args) == 2
    assert "--auth-token" in capsys.readouterr().err
    s = make_settings(runs_dir, host="0.0.0.0", auth_token="t")
    assert s.allowed_hosts is None  # the token guards it; any Host name is fine
    with client(s) as c:
        assert c.get("/api/runs", headers={"Host": "studio.lan"}).status_code == 401


def test_uploads_have_a_size_limit(runs_dir):
    with client(make_settings(runs_dir, max_upload_bytes=100)) as c:
        r = c.post("/api/uploads?filename=big.jsonl", content=b"x" * 101, headers=H)
        assert r.status_code == 413
        assert not list((runs_dir / "uploads").iterdir())
        assert c.post("/api/uploads?filename=run.py", content=b"print(1)", headers=H).status_code == 400
        assert c.post("/api/uploads?filename=e.jsonl", content=b"", headers=H).status_code == 400
        a = c.post("/api/uploads?filename=d.jsonl", content=b"{}\n", headers=H).json()
        b = c.post("/api/uploads?filename=d.jsonl", content=b"{}\n", headers=H).json()
        assert (a["name"], b["name"]) == ("d.jsonl", "d-2.jsonl")


# ---------------------------------------------------------------------------- child processes
def test_launch_stop_restart_resume_export(runs_dir, fake_cli, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    settings = make_settings(runs_dir, fake_cli)
    with client(settings) as c:
        data = upload_data(c)
        r = c.post("/api/runs", json={"name": "my run!", "config": sft_config(data, max_steps=400)}, headers=H)
        assert r.status_code == 200, r.text
        run_id, run = r.json()["id"], Path(r.json()["dir"])
        assert run.name == "my-run" and (run / "config.yaml").is_file()
        assert yaml.safe_load((run / "config.yaml").read_text())["output_dir"] == str(run)
        wait_for(lambda: run_view(c, run_id)["state"] == "running" and (run_view(c, run_id)["step"] or 0) >= 2)
        assert run_view(c, run_id)["source"] == "studio"
        assert c.post(f"/api/runs/{run_id}/resume", headers=H).status_code == 409  # still running
    # The server restarts mid-run; the trainer keeps going and the new server still controls it.
    with client(make_settings(runs_dir, fake_cli)) as c:
        v = run_view(c, run_id)
        assert v["state"] == "running" and v["train_job"]["state"] == "running"
        before = v["step"]
        wait_for(lambda: run_view(c, run_id)["step"] > before)
        r = c.post(f"/api/runs/{run_id}/stop", headers=H)
        assert r.status_code == 200 and r.json() == {"ok": True, "force": False}
        v = wait_for(lambda: (lambda v: v if v["state"] == "stopped" else None)(run_view(c, run_id)))
        assert v["checkpoints"] and "fake trainer started" in c.get(f"/api/runs/{run_id}/log").json()["lines"][0]
        assert c.post(f"/api/runs/{run_id}/stop", headers=H).status_code == 409
        monkeypatch.setenv("FAKE_STEP_S", "0.005")
        assert c.post(f"/api/runs/{run_id}/resume", headers=H).status_code == 200
        v = wait_for(lambda: (lambda v: v if v["state"] == "completed" else None)(run_view(c, run_id)), timeout=30)
        assert v["final"] == "adapter" and v["step"] == 400
        assert "resumed from the Studio" in "\n".join(c.get(f"/api/runs/{run_id}/log").json()["lines"])
        # Export: a job with progress, then a download link.
        r = c.post(f"/api/runs/{run_id}/export", json={"kind": "gguf", "quant": "q8_0"}, headers=H)
        assert r.status_code == 200, r.text
        out = r.json()["output"]
        assert out == "exports/my-run-q8_0.gguf"
        job = wait_for(lambda: next((j for j in run_view(c, run_id)["jobs"] if j["kind"] == "gguf" and j["state"] == "done"), None))
        assert job["returncode"] == 0
        got = c.get(f"/api/runs/{run_id}/download", params={"path": out})
        assert got.status_code == 200 and got.content == b"GGUF fake"
        r = c.post(f"/api/runs/{run_id}/export", json={"kind": "merge", "source": v["checkpoints"][0]["path"]},
                   headers=H)
        assert r.status_code == 200
        merged = r.json()["output"]
        wait_for(lambda: next((j for j in run_view(c, run_id)["jobs"] if j["kind"] == "merge" and j["state"] == "done"), None))
        z = zipfile.ZipFile(io.BytesIO(c.get(f"/api/runs/{run_id}/download", params={"path": merged}).content))
        assert sorted(z.namelist()) == [f"{Path(merged).name}/config.json", f"{Path(merged).name}/model.safetensors"]
        assert c.post(f"/api/runs/{run_id}/export", json={"kind": "gguf", "quant": "q2_k"}, headers=H).status_code == 400
        assert c.post(f"/api/runs/{run_id}/export", json={"kind": "zip"}, headers=H).status_code == 400
        assert [x["name"] for x in run_view(c, run_id)["exports"]] == [Path(merged).name, "my-run-q8_0.gguf"]


def test_stop_while_loading(runs_dir, fake_cli, monkeypatch):
    monkeypatch.setenv("FAKE_LOAD_S", "30")
    with client(make_settings(runs_dir, fake_cli)) as c:
        data = upload_data(c)
        run_id = c.post("/api/runs", json={"name": "s", "config": sft_config(data)}, headers=H).json()["id"]
        assert run_view(c, run_id)["state"] == "starting"
        assert c.post(f"/api/runs/{run_id}/stop", headers=H).status_code == 200
        assert run_view(c, run_id)["state"] in ("stopping", "stopped")
        wait_for(lambda: run_view(c, run_id)["state"] == "stopped", timeout=10)
        r = c.post(f"/api/runs/{run_id}/resume", headers=H)
        assert r.status_code == 409 and "no checkpoint" in r.json()["detail"]


def test_a_launch_that_crashes_shows_failed(runs_dir, fake_cli, tmp_path):
    crash = tmp_path / "crash.py"
    crash.write_text("import sys\nprint('error: the data is broken', file=sys.stderr)\nsys.exit(1)\n")
    with client(make_settings(runs_dir, [sys.executable, str(crash)])) as c:
        data = upload_data(c)
        run_id = c.post("/api/runs", json={"name": "c", "config": sft_config(data)}, headers=H).json()["id"]
        wait_for(lambda: run_view(c, run_id)["state"] == "failed")
        assert c.get(f"/api/runs/{run_id}/log").json()["lines"] == ["error: the data is broken"]
        assert c.get("/api/runs").status_code == 200  # the server is fine


def test_cli_runs_cannot_be_stopped_from_the_studio(runs_dir):
    cli_run(runs_dir, "live", state="running")
    with client(make_settings(runs_dir)) as c:
        run_id = c.get("/api/runs").json()["runs"][0]["id"]
        r = c.post(f"/api/runs/{run_id}/stop", headers=H)
        assert r.status_code == 409 and "outside the Studio" in r.json()["detail"]


def test_chat_targets_and_unavailable_states(runs_dir):
    cli_run(runs_dir, "r")
    with client(make_settings(runs_dir)) as c:
        t = c.get("/api/chat/targets").json()
        assert [o["target"] for o in t["runs"][0]["options"]] == ["final", "checkpoints/step-2"]
        feats = c.get("/api/info").json()["features"]
        assert set(feats) == {"preview", "plan", "chat", "merge", "export"}
        bad = c.post("/api/chat", json={"run_id": t["runs"][0]["id"], "messages": []}, headers=H)
        assert bad.status_code == 400


# ---------------------------------------------------------------------------- the real pipeline behind the page
def test_preview_renders_trained_and_masked_tokens(runs_dir, smol_path):
    with client(make_settings(runs_dir)) as c:
        data = upload_data(c)
        cache = str(runs_dir / "prepared")
        d = c.post("/api/config/preview", json={"config": sft_config(data, dataset_prepared_path=cache), "n": 2},
                   headers=H).json()
        if not d["available"]:
            pytest.skip(d["reason"])
        assert d["ok"], d
        assert len(d["examples"]) == 2
        for ex in d["examples"]:
            segs = ex["blocks"][0]["segments"]
            trained = "".join(s["text"] for s in segs if s["trained"])
            masked = "".join(s["text"] for s in segs if not s["trained"])
            assert "What is" in masked and "What is" not in trained  # the question is context only
            assert trained.strip() and ex["trained_tokens"] < ex["tokens"]
        wrong_field = [{"path": data, "type": "alpaca", "field_instruction": "nope"}]
        bad = c.post("/api/config/preview", json={"config": sft_config(data, datasets=wrong_field,
                                                                        dataset_prepared_path=cache)}, headers=H).json()
        assert bad["available"] and not bad["ok"] and bad["problems"]


def test_plan_answers_or_says_unavailable(runs_dir):
    with client(make_settings(runs_dir)) as c:
        data = upload_data(c)
        d = c.post("/api/config/plan", json={"config": sft_config(data), "gpu_mem": "24GiB"}, headers=H).json()
        if d["available"]:
            assert d["ok"] and isinstance(d["fits"], bool) and d["report"], d
        else:
            assert "tunery.train.plan" in d["reason"]


def test_gpu_stats_from_nvidia_smi(tmp_path, monkeypatch):
    from tunery.studio import sysinfo

    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'NVIDIA H200, 87, 40000, 143771'\necho 'NVIDIA H200, [N/A], 10, 143771'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    monkeypatch.setitem(sysinfo._cache, "value", None)
    snap = sysinfo.snapshot()
    assert [g["util"] for g in snap["gpus"]] == [87.0, None]
    assert snap["gpus"][0]["mem_used"] == 40000 * 2**20 and snap["gpus"][0]["name"] == "NVIDIA H200"
    assert snap["ram_total"] > 0 and snap["cpu_count"] >= 1
