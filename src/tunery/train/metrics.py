"""metrics.jsonl (one JSON object per optimizer step or eval) plus optional TensorBoard / W&B / MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import write_text


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: Any, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.backends: list[Any] = []
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._setup_trackers(run_dir, cfg)

    def _truncate_after(self, step: int) -> None:
        """A resumed run drops rows logged after its checkpoint (the killed run got further)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a half-written last line from a crash
        write_text(self.path, "".join(k + "\n" for k in keep))

    def _setup_trackers(self, run_dir: Path, cfg: Any) -> None:
        if getattr(cfg, "use_tensorboard", False):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.backends.append(("tb", SummaryWriter(str(Path(run_dir) / "tensorboard"))))
            except Exception:
                pass
        if getattr(cfg, "wandb_project", None):
            try:
                import wandb

                run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_name,
                                 mode=cfg.wandb_mode, config=cfg.model_dump(mode="json"), dir=str(run_dir))
                self.backends.append(("wandb", run))
            except Exception:
                pass
        if getattr(cfg, "mlflow_tracking_uri", None) or getattr(cfg, "mlflow_experiment_name", None):
            try:
                import mlflow

                if cfg.mlflow_tracking_uri:
                    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
                if cfg.mlflow_experiment_name:
                    mlflow.set_experiment(cfg.mlflow_experiment_name)
                mlflow.start_run()
                self.backends.append(("mlflow", mlflow))
            except Exception:
                pass

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        step = int(row.get("step", 0))
        nums = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        for kind, b in self.backends:
            try:
                if kind == "tb":
                    for k, v in nums.items():
                        b.add_scalar(k, v, step)
                elif kind == "wandb":
                    b.log(nums, step=step)
                elif kind == "mlflow":
                    b.log_metrics({k.replace("/", "_"): v for k, v in nums.items()}, step=step)
            except Exception:
                pass

    def close(self) -> None:
        for kind, b in self.backends:
            try:
                if kind == "tb":
                    b.close()
                elif kind == "wandb":
                    b.finish()
                elif kind == "mlflow":
                    b.end_run()
            except Exception:
                pass
