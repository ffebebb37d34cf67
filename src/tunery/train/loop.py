"""The training loop, written out in full: build, then step / accumulate / clip / optimize / schedule /
eval / log / checkpoint. Methods differ only in how a batch becomes a loss (methods/)."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml

from ..config import Config, load_config
from ..kernels import with_host_copy
from . import dcp as dist_ckpt
from . import distributed as dist_util
from .checkpoint import list_checkpoints, prune_checkpoints, resolve_resume, save_checkpoint
from .manifest import build_manifest, write_json_atomic
from .metrics import MetricsLogger
from .optim import build_optimizer, trainable_parameters
from .schedule import build_scheduler, warmup_steps_for

_STEP_DELAY = float(os.environ.get("TUNERY_DEBUG_STEP_DELAY", "0") or 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device_dtype(cfg: Config, local_rank: int = 0) -> tuple[torch.device, torch.dtype, torch.dtype | None]:
    """(device, weight dtype of the frozen base, autocast dtype or None)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        bf16_ok = torch.cuda.is_bf16_supported()
        if cfg.fp16:
            compute = torch.float16
        elif cfg.bf16 is True or (cfg.bf16 == "auto" and bf16_ok):
            compute = torch.bfloat16
        else:
            compute = torch.float32
        if cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        base = compute if cfg.adapter else torch.float32
        return device, base, (compute if compute != torch.float32 else None)
    if cfg.bf16 is True:
        return torch.device("cpu"), (torch.bfloat16 if cfg.adapter else torch.float32), torch.bfloat16
    return torch.device("cpu"), torch.float32, None


class StopRequested(Exception):
    pass


class LossWatchdog(RuntimeError):
    """loss_watchdog_threshold: the training loss stayed too high; the run ends as failed."""


class Patience:
    """early_stopping_patience: how many evals in a row have not lowered the best eval_loss. Kept in each
    checkpoint, so a resumed run stops where the uninterrupted one would."""

    def __init__(self, limit: int | None, best: float | None = None, stale: int = 0):
        self.limit, self.best, self.stale = limit, best, stale

    def update(self, eval_loss: float) -> bool:
        """Record one eval; True once `limit` evals in a row brought no improvement."""
        if self.best is None or eval_loss < self.best:
            self.best, self.stale = eval_loss, 0
        else:
            self.stale += 1
        return self.limit is not None and self.stale >= self.limit

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "stale": self.stale}


def every(steps: int | None, per_epoch: int | None, steps_per_epoch: int) -> int | None:
    """An eval or save interval in steps: `steps` as given, else `per_epoch` times per epoch."""
    if steps or not per_epoch:
        return steps
    return max(1, steps_per_epoch // per_epoch)


class Trainer:
    """Holds the pieces of one run. `run()` trains and returns the run directory."""

    def __init__(self, cfg: Config, cfg_dir: Path | None = None):
        self.cfg = cfg
        self.cfg_dir = cfg_dir
        self.rank, self.local_rank, self.world = dist_util.init(cfg.ddp_timeout)
        self.main = self.rank == 0
        self.run_dir = Path(cfg.output_dir)
        self.stop_flag = False
        self.eval_every, self.save_every = cfg.eval_steps, cfg.save_steps  # run() resolves the per-epoch forms
        self.patience = Patience(cfg.early_stopping_patience)
        self.high_loss_steps = 0  # loss_watchdog: steps in a row over the threshold
        self._old_handlers: dict[int, Any] = {}  # the process's SIGTERM/SIGINT handlers while a run holds them
        # torch's process-wide switches a run may turn on (`deterministic`, `tf32`); _close_run puts them back
        self._torch_switches = (torch.are_deterministic_algorithms_enabled(),
                                torch.is_deterministic_algorithms_warn_only_enabled(),
                                torch.backends.cuda.matmul.allow_tf32)

    # ---------------------------------------------------------------- build
    def build_model(self) -> None:
        from ..models import load_model

        cfg = self.cfg
        self.device, base_dtype, self.autocast = pick_device_dtype(cfg, self.local_rank)
        if (cfg.load_in_4bit or cfg.load_in_8bit) and not _quant_available():
            raise RuntimeError("load_in_4bit / adapter: qlora needs the quant module and a CUDA GPU in this version")
        stream_4bit = cfg.load_in_4bit and self.device.type == "cuda" and cfg.own_decoder
        if stream_4bit:
            lm = _load_quantized(cfg, self.device, base_dtype)
        else:
            lm = load_model(cfg.base_model, base_dtype, "cpu", own_decoder=cfg.own_decoder,
                            tokenizer_path=cfg.tokenizer_config, trust_remote_code=cfg.trust_remote_code)
        self.loaded = lm
        self.tokenizer = lm.tokenizer
        if cfg.special_tokens:
            for k, v in cfg.special_tokens.items():
                setattr(self.tokenizer, k, v)
        model = lm.model
        if cfg.adapter:
            from ..adapters import inject_lora, load_adapter, target_names

            if cfg.lora_model_dir:
                load_adapter(model, cfg.lora_model_dir)
            else:
                inject_lora(model, target_names(cfg.lora_target_modules, cfg.lora_target_linear), cfg.lora_r,
                            cfg.lora_alpha, cfg.lora_dropout, cfg.peft_use_rslora, cfg.lora_modules_to_save,
                            use_dora=cfg.peft_use_dora)
            for _, p in trainable_parameters(model):
                p.data = p.data.float()  # adapter weights train in fp32; autocast handles the matmuls
            if cfg.load_in_4bit:
                from ..quant import quantize_model

                quantize_model(model, compute_dtype=base_dtype, double_quant=cfg.bnb_4bit_use_double_quant)
                if cfg.peft_use_dora and not cfg.lora_model_dir:  # the norm DoRA divides by is the 4-bit weight's
                    from ..adapters import reset_dora_magnitudes

                    reset_dora_magnitudes(model)
                if self.device.type == "cuda":
                    from ..quant import offload_embedding

                    offload_embedding(model)  # frozen, untied input embedding stays in CPU memory
        model.to(self.device)
        _configure_kernels(model, cfg)
        if cfg.gradient_checkpointing:
            _apply_checkpointing(model, cfg.gradient_checkpointing, offload=cfg.offload_strategy,
                                 keep_on_gpu=cfg.offload_keep_on_gpu, save_mlp=cfg.offload_save_mlp,
                                 save_mlp_kept=cfg.offload_save_mlp_kept, stream_weights=cfg.offload_weights,
                                 weights_mode=cfg.offload_weights_mode)
        self.model = model
        self.train_model = _parallelize(model, cfg, self.world, self.device)

    def build_data(self) -> None:
        from ..data import prepare_data
        from ..data.collate import COLLATE

        with dist_util.local_main_first():  # rank 0 tokenizes and caches; the others then read the cache
            self.data = prepare_data(self.cfg, self.tokenizer, cfg_dir=self.cfg_dir)
        if not self.data.train:
            raise ValueError("the training data is empty after preprocessing (all rows dropped or skipped?)")
        from ..methods import build_method

        self.method = build_method(self.cfg)
        if getattr(self.method, "data_kind", self.data.kind) != self.data.kind:
            raise ValueError(f"method {self.method.name!r} trains on {self.method.data_kind} rows but the datasets "
                             f"are of kind {self.data.kind!r}: check each dataset's `type`")
        self.collate = COLLATE[self.data.kind]

    # ---------------------------------------------------------------- data order
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        from ..data.collate import micro_batches

        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: micro_batches(len(self.data.train), self.cfg.micro_batch_size,
                                                      self.cfg.seed, epoch)}
        return self._epoch_cache[epoch]

    def step_batches(self, step: int) -> tuple[list[dict[str, Any]], int, int]:
        """This rank's micro-batches for optimizer step `step`, the step's global normaliser, and its epoch.

        The global stream of micro-batches is a pure function of (seed, step): rank r takes every
        world-th micro-batch of the step, so the result does not depend on how the batch is split.
        """
        a, w = self.cfg.accumulation_steps, self.world
        m = self.micro_per_epoch
        mine, normalizer, epoch = [], 0, 0
        for j in range(a * w):
            g = step * a * w + j
            epoch, i = divmod(g, m)
            rows = [self.data.train[k] for k in self._epoch_batches(epoch)[i]]
            batch = self.collate(rows)
            normalizer += self.method.count(batch)
            if j % w == self.rank:
                mine.append(batch)
        return mine, normalizer, epoch

    # ---------------------------------------------------------------- helpers
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        # pinned first: from pageable memory even a non_blocking copy can make the CPU wait for the
        # GPU, so the next step's launches could not queue while this step's backward still runs
        pin = self.device.type == "cuda"
        out = {k: ((v.pin_memory() if pin else v).to(self.device, non_blocking=True) if isinstance(v, torch.Tensor)
                   else v) for k, v in batch.items()}
        # the host values stay known (kernels.with_host_copy): the CPU-held embedding reads the ids and
        # the loss counts ignored labels there, with no device-to-host sync per step
        for k, v in batch.items():
            if isinstance(v, torch.Tensor) and out[k] is not v:
                with_host_copy(out[k], v)
        return out

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def evaluate(self) -> dict[str, float] | None:
        if not self.data.eval:
            return None
        from ..data.collate import micro_batches

        self.train_model.eval()
        size = self.cfg.eval_batch_size or self.cfg.micro_batch_size
        batches = [self.collate([self.data.eval[k] for k in idx])
                   for idx in micro_batches(len(self.data.eval), size, 0, 0, shuffle=False)]
        total = sum(self.method.count(b) for b in batches)
        loss_sum = 0.0
        sums: dict[str, float] = {}
        with torch.no_grad(), self._autocast():
            for b in batches:
                loss, metrics = self.method.loss(self.train_model, self._to_device(b), total)
                loss_sum += float(loss)
                weight = self.method.count(b) / max(total, 1)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * weight
        self.train_model.train()
        out = {"eval_loss": loss_sum}
        if self.method.name == "sft":
            out["eval_ppl"] = math.exp(min(loss_sum, 50.0))
        out.update({f"eval_{k}": v for k, v in sums.items()})
        return out

    def write_final(self) -> Path:
        """adapter/ (PEFT format) or model/ (safetensors + config + tokenizer), written atomically."""
        from ..export.weights import save_model_folder

        cfg = self.cfg
        if cfg.adapter:
            from ..adapters import save_adapter

            out = save_adapter(self.model, self.run_dir / "adapter", str(self.loaded.path), cfg.lora_modules_to_save)
            self.tokenizer.save_pretrained(str(out))
        else:
            out = save_model_folder(self.model, self.loaded.path, self.tokenizer, self.run_dir / "model")
        _save_extra_heads(self.model, out)
        return out

    def _write_weights_into(self, folder: Path) -> None:
        if self.cfg.adapter:
            from ..adapters import save_adapter

            save_adapter(self.model, folder / "adapter", str(self.loaded.path), self.cfg.lora_modules_to_save)
            _save_extra_heads(self.model, folder / "adapter")

    # ---------------------------------------------------------------- run
    def run(self) -> Path:
        cfg = self.cfg
        seed_everything(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.build_model()
        self.build_data()
        if hasattr(self.method, "setup"):
            self.method.setup(self.model, cfg, self.data)
        self._epoch_cache: dict[int, list[list[int]]] = {}
        self.micro_per_epoch = len(self._epoch_batches(0))
        per_step = cfg.accumulation_steps * self.world
        steps_per_epoch = max(1, math.ceil(self.micro_per_epoch / per_step))
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
        self.eval_every = every(cfg.eval_steps, cfg.evals_per_epoch, steps_per_epoch)
        self.save_every = every(cfg.save_steps, cfg.saves_per_epoch, steps_per_epoch)
        warmup = warmup_steps_for(total_steps, cfg.warmup_steps, cfg.warmup_ratio)
        dist_util.reshard(self.model)  # FSDP: setup's eval forwards leave the root gathered; optimize the shards
        optimizer = build_optimizer(self.model, cfg)
        scheduler = build_scheduler(optimizer, cfg.lr_scheduler, total_steps, warmup, cfg.cosine_min_lr_ratio)

        ckpt, start_step, tokens_seen, elapsed_before = self.resume(optimizer, scheduler)
        self.write_run_header(total_steps, start_step)
        logger = MetricsLogger(self.run_dir, cfg, enabled=self.main, resume_step=start_step if ckpt else None)
        bar = _progress(total_steps, start_step, self.main and cfg.progress_bar)
        self._install_signal_handlers()
        freeze_long_lived()
        model = self.train_model
        model.train()
        params = [p for _, p in trainable_parameters(self.model)]
        graphed = self._graphed_steps(optimizer, params) if cfg.cuda_graph else None
        step = start_step
        t_run = time.perf_counter()
        status = "completed"
        pending: _StepNumbers | None = None  # the last step's numbers, not yet read back and logged

        def settle() -> int:
            """Write the pending step's row; the tokens seen so far."""
            nonlocal pending, tokens_seen
            if pending is not None:
                done, pending = pending, None
                tokens_seen = done.write(logger, bar, tokens_seen)
                self._watch_loss(done.loss, done.row["step"])
            return tokens_seen

        try:
            while step < total_steps:
                t0 = time.perf_counter()
                batches, normalizer, epoch = self.step_batches(step)
                loss_total: torch.Tensor | float = 0.0  # kept on the device: no host sync per micro-batch
                sums: dict[str, torch.Tensor | float] = {}
                n_tokens = 0
                if graphed is not None:  # the whole step, clipping and optimizer included (train/cuda_graph.py)
                    loss_total, grad_norm = graphed.step(batches, normalizer)
                    n_tokens = sum(int(b["input_ids"].numel()) for b in batches)
                else:
                    for i, host_b in enumerate(batches):
                        weight = self.method.count(host_b) / max(normalizer, 1)  # on the CPU batch: no sync
                        b = self._to_device(host_b)
                        with dist_util.sync_gradients(model, i == len(batches) - 1):
                            with self._autocast():
                                loss, metrics = self.method.loss(model, b, normalizer)
                            loss.backward()
                        loss_total = loss_total + loss.detach()
                        n_tokens += int(b["input_ids"].numel())
                        for k, v in metrics.items():
                            v = v.detach() if isinstance(v, torch.Tensor) else float(v)
                            sums[k] = sums.get(k, 0.0) + v * weight
                    grad_norm = dist_util.clip_grad_norm(params, cfg.max_grad_norm, as_tensor=True)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                lr = _host_lr(scheduler)
                scheduler.step()
                step += 1
                row = {"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": lr,
                       "trained_tokens": normalizer if self.method.name == "sft" else None,
                       "elapsed_s": round(elapsed_before + time.perf_counter() - t_run, 3)}
                if self.device.type == "cuda":  # what `tunery plan` predicts (max_memory_allocated, this rank)
                    row["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
                # the step's numbers reach the host without waiting for the GPU; the row is written once
                # the next step has been queued (the CPU runs ahead), or now when this step ends the run,
                # evaluates or checkpoints
                done = _StepNumbers({"loss": loss_total, "tokens": float(n_tokens), **sums}, grad_norm, self.device)
                settle()  # the previous step's row (its GPU work is done by now)
                # timed after that wait: once the CPU runs ahead (a replayed CUDA graph queues a step at
                # once), a step's own host time says nothing, and each iteration lasts one step of GPU work
                dt = time.perf_counter() - t0
                pending = done.with_row(row, dt, step % cfg.logging_steps == 0 or step == total_steps)
                if self._after_step(step, total_steps, logger, optimizer, scheduler, settle,
                                    lambda: elapsed_before + time.perf_counter() - t_run):
                    break  # early stopping: the run ends as completed
                if _STEP_DELAY:
                    time.sleep(_STEP_DELAY)  # test hook: gives a crash test time to kill mid-run
            settle()
            if graphed is not None and self.main:
                g = graphed.graph
                print(f"cuda_graph: {g.replays} steps replayed, {g.eager_steps} eager, {g.captures} captured"
                      + (f" (last eager: {g.why_eager})" if g.why_eager else ""), file=sys.stderr)
            self._finish(logger, step)
        except StopRequested:
            status = "stopped"
            self._stopped_message(step)
        except BaseException:
            status = "failed"
            raise
        finally:
            if status != "failed":
                settle()
            self._close_run(bar, logger, status, step, total_steps)
        return self.run_dir

    def _close_run(self, bar, logger: MetricsLogger, status: str, step: int, total_steps: int) -> None:
        """What every run does on its way out, however it ended (the SFT family's and GRPO's loops). The
        process gets back what the run changed in it: a notebook's next run starts as the first did."""
        bar.close()
        logger.close()
        self._status(status, step, total_steps)
        dist_util.shutdown()
        gc.unfreeze()  # a notebook's next run: this run's objects can be collected again
        self._restore_signal_handlers()
        deterministic, warn_only, tf32 = self._torch_switches
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cuda.matmul.allow_tf32 = tf32

    def _graphed_steps(self, optimizer, params):
        """cuda_graph: the steps through train/cuda_graph.py, or None (with a note) where it cannot run."""
        if self.device.type != "cuda" or self.world > 1:
            print("cuda_graph: needs one CUDA GPU; the steps run eagerly", file=sys.stderr)
            return None
        from .cuda_graph import GraphedSteps

        cfg = self.cfg
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return GraphedSteps(self.train_model, self.method, optimizer, params, to_device=self._to_device,
                            autocast=self._autocast, tokens=cfg.micro_batch_size * cfg.sequence_len,
                            max_seqlen=cfg.sequence_len, max_grad_norm=cfg.max_grad_norm,
                            pad_id=pad if isinstance(pad, int) else 0)

    # ---- after each optimizer step, and the end of a run (shared with the GRPO recipe) -----------------
    def _after_step(self, step: int, total_steps: int, logger: Any, optimizer: Any, scheduler: Any,
                    settle: Callable[[], int], elapsed: Callable[[], float]) -> bool:
        """Eval every eval_every steps, a checkpoint every save_every steps or when a stop was asked for
        (on any rank: all ranks stop at the same step), the status file; raises StopRequested to end the
        run. True when early stopping ends it (the caller finishes as usual).
        `settle()` writes the step's pending row and gives the tokens seen (read before an eval row or
        a checkpoint); `elapsed()`: training seconds so far, read when a checkpoint is written."""
        early = False
        if self.eval_every and step % self.eval_every == 0 and step < total_steps:
            settle()
            ev = self.evaluate()
            if ev:
                logger.log({"step": step, **ev})
                early = self.patience.update(ev["eval_loss"])
            if self.patience.limit:  # every rank evaluates at this step: one decision for all
                early = dist_util.any_rank(early)
        self.stop_flag = dist_util.any_rank(self.stop_flag)
        if (self.save_every and step % self.save_every == 0 and step < total_steps and not early) or self.stop_flag:
            self.checkpoint(step, optimizer, scheduler, settle(), elapsed())
        self._status("running", step, total_steps)
        if self.stop_flag:
            raise StopRequested
        if early and self.main:
            print(f"\nearly stopping at step {step}: eval_loss has not gone below {self.patience.best:.4f} in "
                  f"{self.patience.stale} evals (early_stopping_patience {self.patience.limit})", file=sys.stderr)
        return early

    def _watch_loss(self, loss: float, step: int) -> None:
        """loss_watchdog_threshold: raise LossWatchdog after loss_watchdog_patience steps in a row over it."""
        limit = self.cfg.loss_watchdog_threshold
        if limit is None:
            return
        self.high_loss_steps = self.high_loss_steps + 1 if not loss <= limit else 0  # NaN counts as high
        if self.high_loss_steps >= self.cfg.loss_watchdog_patience:
            raise LossWatchdog(f"loss_watchdog: the training loss was over {limit:g} for {self.high_loss_steps} steps "
                               f"in a row ({loss:.4f} at step {step}): the run has diverged. Lower learning_rate, "
                               "check the data, or raise loss_watchdog_threshold")

    def _finish(self, logger: Any, step: int) -> None:
        """Final eval, then the adapter / model written once (consolidated from the shards under FSDP)."""
        ev = self.evaluate()
        if ev:
            logger.log({"step": step, **ev})
        fn = getattr(getattr(self.model, "model", None), "checkpoint_fn", None)
        if hasattr(fn, "stop_streaming"):  # offload_weights: every weight back on the GPU for good
            fn.stop_streaming()
        with dist_ckpt.consolidated(self.model, trainable_only=bool(self.cfg.adapter)) as writer:
            if writer:
                self.write_final()
        if self.cfg.save_merged and self.cfg.adapter and self.main:  # a full fine-tune's model/ is the merged model
            from ..export.merge import merge_run

            print(f"merged model: {merge_run(self.run_dir)}", file=sys.stderr)

    def _stopped_message(self, step: int) -> None:
        if self.main:
            print(f"\nstopped at step {step}; resume with resume_from_checkpoint=auto", file=sys.stderr)

    def _status(self, state: str, step: int, total: int) -> None:
        """status.json (running / completed / stopped / failed) for the Studio and scripts."""
        if self.main:
            write_json_atomic(self.run_dir / "status.json", {"state": state, "step": step, "total_steps": total})

    def resume(self, optimizer, scheduler) -> tuple[Path | None, int, int, float]:
        """Load `resume_from_checkpoint` if set: (checkpoint, step, tokens seen, seconds trained before)."""
        ckpt = resolve_resume(self.cfg.resume_from_checkpoint, self.run_dir)
        if ckpt is None:
            return None, 0, 0, 0.0
        state = dist_ckpt.load(ckpt, self.model, optimizer, scheduler)  # either layout, any world size
        self.patience = Patience(self.cfg.early_stopping_patience, **state.get("early_stopping", {}))
        self.high_loss_steps = state.get("high_loss_steps", 0)
        if self.main:
            print(f"resumed from {ckpt} at step {state['step']}", file=sys.stderr)
        return ckpt, state["step"], state.get("tokens_seen", 0), state.get("elapsed_s", 0.0)

    def write_run_header(self, total_steps: int, start_step: int, extra: dict[str, Any] | None = None) -> None:
        """config.yaml (resolved), manifest.json and status.json, written by rank 0 before step one."""
        if not self.main:
            return
        resolved = self.cfg.to_yaml_dict()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        manifest = build_manifest(resolved, self.data.files, self.data.fingerprint, str(self.loaded.path), self.world)
        manifest["data"]["stats"] = self.data.stats
        manifest["total_steps"] = total_steps
        manifest.update(extra or {})
        write_json_atomic(self.run_dir / "manifest.json", manifest)
        write_json_atomic(self.run_dir / "status.json", {"state": "running", "step": start_step,
                                                          "total_steps": total_steps})

    def checkpoint(self, step, optimizer, scheduler, tokens_seen, elapsed) -> None:
        state = {"step": step, "tokens_seen": tokens_seen, "elapsed_s": elapsed, "world_size": self.world,
                 "seed": self.cfg.seed, "early_stopping": self.patience.state(), "high_loss_steps": self.high_loss_steps}
        path = self.run_dir / "checkpoints" / f"step-{step}"
        if dist_ckpt.is_sharded(self.model):  # FSDP: every rank writes its shards
            dist_ckpt.save(path, self.model, optimizer, scheduler, state,
                           write_weights=self._write_weights_into if self.cfg.adapter else None,
                           sharded=dist_ckpt.sharded_state_dicts(self.cfg))
        elif self.main:
            save_checkpoint(path, self.model, optimizer, scheduler, state, write_weights=self._write_weights_into)
        if self.main:
            prune_checkpoints(self.run_dir, self.cfg.save_total_limit)
        dist_util.barrier()

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT finish the current step, write a checkpoint and exit (Studio's Stop button)."""

        def handler(signum, frame):
            if self.stop_flag:  # second signal: stop now
                raise KeyboardInterrupt
            self.stop_flag = True

        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, handler)
        except ValueError:
            pass  # not the main thread (notebooks): Ctrl-C behaves as usual

    def _restore_signal_handlers(self) -> None:
        """The process's own handlers back once the run ends. Why: a notebook's Ctrl-C must interrupt again,
        and a process forked later (a tokenizing pool) must die of the SIGTERM that ends it."""
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old_handlers = {}


class _StepNumbers:
    """One step's loss, token count, method metrics (summed over ranks) and grad norm, copied to
    pinned host memory behind the step's GPU work. Reading them waits for that step only, so the
    trainer can queue the next step first: a host sync per step (or per micro-batch, as
    `float(loss)` did) keeps the CPU from running ahead, and a GPU-bound backward then cannot hide
    a CPU-bound forward (benchmarks/RESULTS.md, issue 5)."""

    def __init__(self, summed: dict[str, torch.Tensor | float], grad_norm: torch.Tensor, device: torch.device):
        self.keys = [*summed, "grad_norm"]
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in summed.values()])
        dist_util.all_reduce_sum(t)
        t = torch.cat([t, grad_norm.to(device).reshape(1).double()])
        if device.type == "cuda":
            self.host = torch.empty(t.numel(), dtype=torch.float64, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = t, None

    def with_row(self, row: dict[str, Any], dt: float, log: bool) -> _StepNumbers:
        self.row, self.dt, self.log = row, dt, log
        return self

    def write(self, logger: Any, bar: Any, tokens_seen: int) -> int:
        """Read the numbers back, log the row (if it is a logging step), advance the bar; returns the
        tokens seen after this step."""
        if self.event is not None:
            self.event.synchronize()
        vals = dict(zip(self.keys, self.host.tolist()))
        self.loss = vals["loss"]
        n_tokens = int(vals.pop("tokens"))
        tokens_seen += n_tokens
        row = dict(self.row)
        metrics = {k: v for k, v in vals.items() if k not in ("loss", "grad_norm")}
        row.update(loss=vals["loss"], grad_norm=vals["grad_norm"], tokens=tokens_seen,
                   tokens_per_s=n_tokens / self.dt if self.dt > 0 else 0.0, **metrics)
        order = ["step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "tokens", "trained_tokens", "elapsed_s",
                 *metrics, "gpu_peak_gib"]
        row = {k: row[k] for k in order if row.get(k) is not None}
        if self.log:
            logger.log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        return tokens_seen


def _host_lr(scheduler) -> float:
    """The learning rate of the step just taken, read on the host: under cuda_graph the optimizer holds it
    as a device tensor, and reading that back would wait for the GPU."""
    lr = scheduler.get_last_lr()[0]
    if not isinstance(lr, torch.Tensor):
        return lr
    lambdas = getattr(scheduler, "lr_lambdas", None)
    return float(scheduler.base_lrs[0] * lambdas[0](scheduler.last_epoch)) if lambdas else float(lr)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def _load_quantized(cfg: Config, device: torch.device, dtype: torch.dtype):
    """QLoRA on a GPU: build on the meta device and quantize tensor by tensor while loading, so the
    16-bit model never sits in GPU memory (models/ may not import quant/, so this lives here)."""
    from transformers import AutoConfig

    from ..models.decoder import CausalLM
    from ..models.loading import LoadedModel, _reset_buffers, load_tokenizer, weight_files
    from ..models.registry import decoder_config, supports
    from ..models.source import resolve_model_path
    from ..quant import load_quantized

    path = resolve_model_path(cfg.base_model)
    hf_config = AutoConfig.from_pretrained(str(path))
    tokenizer = load_tokenizer(cfg.tokenizer_config or path)
    if not supports(hf_config):
        from ..models import load_model

        return load_model(cfg.base_model, dtype, "cpu", own_decoder=False, tokenizer_path=cfg.tokenizer_config,
                          trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = CausalLM(decoder_config(hf_config))
    load_quantized(model, weight_files(path), device, dtype, double_quant=cfg.bnb_4bit_use_double_quant)
    _reset_buffers(model)
    model.tie_weights()
    return LoadedModel(model.to(device), tokenizer, path, hf_config, True)


def _quant_available() -> bool:
    try:
        from ..quant import quantize_model  # noqa: F401
    except Exception:
        return False
    return True


def _configure_kernels(model: nn.Module, cfg: Config) -> None:
    """Fused kernels on a CUDA GPU unless `kernels: false`; the attention backend `attn_implementation`
    names; per-block torch.compile when asked."""
    try:
        from ..models.fused import compile_blocks, set_attention, set_fused
    except ImportError:
        return
    set_fused(model, cfg.kernels)  # fused paths run on CUDA tensors; elsewhere the references run either way
    set_attention(model, cfg.attn_implementation)
    if cfg.torch_compile:
        compile_blocks(model)


def _apply_checkpointing(model: nn.Module, mode: bool | str, offload: str = "inputs", keep_on_gpu: int = 0,
                         save_mlp: int | str = "auto", save_mlp_kept: int = 0, stream_weights: int = 0,
                         weights_mode: str = "stream") -> None:
    try:
        from .activations import apply_checkpointing
    except ImportError:
        apply_checkpointing = None
    if apply_checkpointing is not None:
        apply_checkpointing(model, mode, offload=offload, keep_on_gpu=keep_on_gpu, save_mlp=save_mlp,
                            save_mlp_kept=save_mlp_kept, stream_weights=stream_weights, weights_mode=weights_mode)
        return
    from torch.utils.checkpoint import checkpoint

    body = getattr(model, "model", None)
    if body is not None and hasattr(body, "checkpoint_fn"):
        body.checkpoint_fn = lambda layer, *a: checkpoint(layer, *a, use_reentrant=False)
    elif hasattr(model, "hf"):
        model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _parallelize(model: nn.Module, cfg: Config, world: int, device: torch.device) -> nn.Module:
    if world == 1:
        return model
    from .parallel import parallelize

    return parallelize(model, cfg, device)


def _save_extra_heads(model: nn.Module, folder: Path) -> None:
    """Heads that are not part of the LM (reward model `score`) are saved beside the weights."""
    heads = {n: p for n, p in model.state_dict().items() if n.startswith("score.")}
    if heads:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in heads.items()}, str(Path(folder) / "score_head.safetensors"))


def freeze_long_lived() -> None:
    """Move every object alive now (modules, tokenized data, tokenizer, config) out of the garbage
    collector's view. Why: its full passes rescan all tracked objects, and with a model and a dataset
    loaded one pass stalls the training loop for 0.2-0.3 s (measured on an 8B QLoRA step: 208 ms in
    one run; the transformers + peft loop, 300-330 ms per run: benchmarks/memory.py's gc_pause_ms).
    Objects made later (each step's graph) are still collected as usual; the run's end unfreezes.
    """
    gc.collect()
    gc.freeze()


def train(config: str | Path | dict[str, Any] | Config, overrides: list[str] | None = None) -> Path:
    """Train from a YAML path, a dict or a Config; returns the run directory."""
    cfg_dir = Path(config).resolve().parent if isinstance(config, (str, Path)) else None
    cfg = load_config(config, overrides)
    if cfg.rl == "grpo":  # online RL has its own recipe (rollouts, rewards), built from this Trainer's pieces
        from .grpo_loop import GRPOTrainer

        return GRPOTrainer(cfg, cfg_dir).run()
    return Trainer(cfg, cfg_dir).run()


__all__ = ["Trainer", "list_checkpoints", "train"]
