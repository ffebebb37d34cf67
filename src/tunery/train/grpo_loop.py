"""The GRPO recipe: rollout -> rewards -> advantages -> `num_iterations` policy updates, repeated.

One rollout takes `micro_batch_size x accumulation_steps` prompts per process (dataset rows are prompts) and
samples `grpo.num_generations` (G) completions of each with Tunery's batched KV-cache engine (generate/) on the
training model itself: no second copy, LoRA applied unmerged. Rewards and group-normalised advantages follow,
then `num_iterations` optimizer steps over the rollout, each made of micro-batches of `micro_batch_size`
prompts' completions (a flat padding-free row each). The old policy's log-probs are computed once per rollout,
and only when num_iterations > 1 (with one update the ratio is logp - logp.detach()). The reference
(beta > 0) is the model with its adapters off for LoRA, a frozen copy for full fine-tuning.

`max_steps` counts optimizer steps (rollouts x num_iterations). Rollout r samples with seed (seed, r, rank),
so a resumed run draws the same completions from the same weights.

Built from the Trainer's own pieces: model, optimizer, scheduler, checkpoints, metrics, manifest, status.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..methods.grpo import GRPO, StepTotals, completion_logps, group_advantages, rollout_batch
from ..methods.rewards import load_rewards, score
from . import distributed as dist_util
from .loop import StopRequested, Trainer, _progress, every, freeze_long_lived, seed_everything
from .metrics import MetricsLogger
from .optim import build_optimizer, trainable_parameters
from .schedule import build_scheduler, warmup_steps_for

# the engine keeps its KV cache (and CUDA graphs) between rollouts when that costs little memory; bigger
# caches are freed before the policy update so the backward pass has the memory
KEEP_CACHE_FRACTION = 0.05


@dataclass
class Rollout:
    """One rollout's sequences and what the policy update needs, plus its metrics."""

    prompts: list[list[int]]          # [N] prompt ids (each prompt repeated G times)
    completions: list[list[int]]      # [N] trained completion ids (the stop token included when it was sampled)
    advantages: torch.Tensor          # [N]
    mask_tokens: list[int]            # [N] trained tokens of each completion (0 when masked as truncated)
    metrics: dict[str, float]
    batches: list[dict[str, Any]]     # micro-batches ready for the policy loss
    totals: StepTotals


def _all_max(x: float, device: torch.device) -> float:
    if not torch.distributed.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    if not torch.distributed.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist_util.all_reduce_sum(t)
    return t.tolist()


def _std(total: float, sq: float, n: float) -> float:
    """Unbiased std from sum and sum of squares."""
    if n < 2:
        return 0.0
    return math.sqrt(max(0.0, (sq - total * total / n) / (n - 1)))


class GRPOTrainer(Trainer):
    """`rl: grpo`. `run()` trains and returns the run directory; `evaluate()` scores greedy answers to the eval
    prompts with the reward functions (`eval_before=True` also logs that at step 0)."""

    def __init__(self, cfg, cfg_dir=None, eval_before: bool = False):
        super().__init__(cfg, cfg_dir)
        self.eval_before = eval_before
        self.method = GRPO.from_config(cfg)
        self.g = cfg.grpo

    # ---------------------------------------------------------------- build
    def build_data(self) -> None:
        from ..data import prepare_data

        with dist_util.local_main_first():  # rank 0 tokenizes and caches; the others then read the cache
            self.data = prepare_data(self.cfg, self.tokenizer, cfg_dir=self.cfg_dir)
        self.check_data()

    def check_data(self) -> None:
        if self.data.kind != "prompts":
            raise ValueError(f"rl: grpo trains on prompts, but the datasets are of kind {self.data.kind!r}: set each "
                             "dataset's `type: prompts` (a prompt column, string or messages; other columns go to "
                             "the reward functions)")
        if not self.data.train:
            raise ValueError("the training data is empty after preprocessing (all rows dropped or skipped?)")

    def build_rewards(self) -> None:
        self.rewards = load_rewards(self.g, self.cfg_dir)

    def build_engine(self) -> None:
        from ..generate import Generator, stop_token_ids

        model_cfg = getattr(self.model, "cfg", None) or getattr(self.loaded, "hf_config", None)
        self.stop_ids = stop_token_ids(self.tokenizer, model_cfg)
        self.engine = Generator(self.model, self.tokenizer, stop_ids=self.stop_ids, autocast_dtype=self.autocast)

    def build_reference(self) -> None:
        self.reference = None
        if self.g.beta > 0:
            from ..methods.reference import build_reference

            self.reference = build_reference(self.model)

    # ---------------------------------------------------------------- prompts of a rollout
    @property
    def prompts_per_rollout(self) -> int:
        return self.cfg.micro_batch_size * self.cfg.accumulation_steps

    def rollout_rows(self, r: int) -> list[dict[str, Any]]:
        """This rank's prompt rows for rollout `r`: a pure function of (seed, r). The last rollout of an epoch is
        filled up from the start of that epoch's order, so every rollout has the same size."""
        from ..data.collate import micro_batches

        n = len(self.data.train)
        per = self.prompts_per_rollout * self.world
        per_epoch = max(1, math.ceil(n / per))
        epoch, i = divmod(r, per_epoch)
        order = [k for chunk in micro_batches(n, n, self.cfg.seed, epoch) for k in chunk]
        idx = [order[(i * per + j) % n] for j in range(per)]
        mine = idx[self.rank * self.prompts_per_rollout : (self.rank + 1) * self.prompts_per_rollout]
        return [self.data.train[k] for k in mine]

    def _prompt_ids(self, row: dict[str, Any]) -> list[int]:
        ids = list(row["prompt_ids"])
        return ids[-self.g.max_prompt_length :]  # keep the end: the question and the generation prompt

    def _prompt_text(self, row: dict[str, Any]) -> str:
        if isinstance(row.get("prompt"), str):
            return row["prompt"]
        return self.tokenizer.decode(row["prompt_ids"], skip_special_tokens=False)

    # ---------------------------------------------------------------- rollout
    def sampling_params(self, greedy: bool = False):
        from ..generate import SamplingParams

        g = self.g
        if greedy:
            return SamplingParams(max_new_tokens=g.max_completion_length, temperature=0.0)
        return SamplingParams(max_new_tokens=g.max_completion_length, temperature=g.temperature, top_p=g.top_p,
                              top_k=g.top_k or 0)

    def generate(self, prompts: list[list[int]], seed: int | None, greedy: bool = False):
        out = self.engine.generate(prompts, self.sampling_params(greedy), seed=seed)
        self._release_engine_memory()
        return out, self.engine.last_stats

    def _release_engine_memory(self) -> None:
        """Drop the engine's retained KV cache / CUDA graphs unless they are small next to the device."""
        if self.device.type != "cuda":
            return
        graphs = getattr(self.engine, "_graphs", None)
        if not graphs:
            return
        held = sum(t.numel() * t.element_size() for g in graphs.values() for t in (*g.cache.k, *g.cache.v))
        if held > KEEP_CACHE_FRACTION * torch.cuda.get_device_properties(self.device).total_memory:
            graphs.clear()
            torch.cuda.empty_cache()

    def rollout(self, r: int) -> Rollout:
        G = self.g.num_generations
        rows = self.rollout_rows(r)
        prompts = [self._prompt_ids(row) for row in rows for _ in range(G)]
        t0 = time.perf_counter()
        outs, stats = self.generate(prompts, seed=(self.cfg.seed * 1_000_003 + r) * 1009 + self.rank)
        gen_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        texts = self.tokenizer.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
        prompt_texts = [self._prompt_text(row) for row in rows for _ in range(G)]
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row.get("columns", {}) if k not in keys]
        columns: dict[str, list[Any]] = {k: [row.get("columns", {}).get(k) for row in rows for _ in range(G)]
                                         for k in keys}
        columns["completion_ids"] = [list(o.token_ids) for o in outs]
        per_func = score(self.rewards, prompt_texts, texts, columns)  # [N, F]
        weights = torch.tensor([rw.weight for rw in self.rewards], dtype=torch.float32)
        rewards = (per_func * weights).sum(1)
        batch_std = None
        if self.g.scale_rewards == "batch":
            n, s, sq = _all_sum([rewards.numel(), rewards.sum().item(), (rewards ** 2).sum().item()], self.device)
            batch_std = _std(s, sq, n)
        advantages, std = group_advantages(rewards, G, self.g.scale_rewards, batch_std)
        grouped = rewards.view(-1, G)
        same = (grouped.max(1).values == grouped.min(1).values).repeat_interleave(G)
        advantages = advantages.masked_fill(same, 0.0)  # exactly 0, not rounding noise: such groups teach nothing
        reward_s = time.perf_counter() - t1

        completions = [list(o.token_ids) + ([o.stop_token_id] if o.stop_token_id is not None else []) for o in outs]
        truncated = [o.finish_reason == "length" for o in outs]
        mask_tokens = [0 if (t and self.g.mask_truncated_completions) else len(c)
                       for c, t in zip(completions, truncated)]
        metrics = self._rollout_metrics(per_func, rewards, advantages, std, completions, truncated, stats, gen_s,
                                        reward_s)
        batches, totals = self._micro_batches(prompts, completions, advantages, mask_tokens)
        return Rollout(prompts, completions, advantages, mask_tokens, metrics, batches, totals)

    def _micro_batches(self, prompts, completions, advantages, mask_tokens) -> tuple[list[dict[str, Any]], StepTotals]:
        """Group the sequences into micro-batches of `micro_batch_size` prompts' completions.

        Without a KL term a sequence whose advantage is exactly 0 (its whole group scored the same) adds nothing
        to the loss or the gradient, so it is left out of the forward pass; the step's normalisers still count
        it, so the loss is the same (bnpo normalises per micro-batch, so it keeps every sequence).
        """
        n = len(prompts)
        keep = list(range(n))
        if self.g.beta == 0 and self.g.loss_type != "bnpo":
            keep = [i for i in keep if advantages[i].item() != 0.0]
        size = self.cfg.micro_batch_size * self.g.num_generations
        groups = [keep[s : s + size] for s in range(0, len(keep), size)]
        seqs_all, toks_all, mbs = _all_sum([float(n), float(sum(mask_tokens)), float(len(groups))], self.device)
        totals = StepTotals(sequences=int(seqs_all), tokens=int(toks_all), micro_batches=max(1, int(mbs)))
        # every rank runs as many forward/backward passes as the busiest one (gradient collectives must pair up);
        # the extra ones carry a fully masked sequence: loss 0, no gradient
        most = int(_all_max(float(len(groups)), self.device))
        dummies = most - len(groups)
        groups += [[0]] * dummies
        batches = []
        for k, idx in enumerate(groups):
            b = rollout_batch([(prompts[i], completions[i]) for i in idx])
            length = b["comp_len"]
            mask = torch.zeros(len(idx), length)
            if k < len(groups) - dummies:
                for j, i in enumerate(idx):
                    mask[j, : mask_tokens[i]] = 1.0
            b["mask"] = mask
            b["advantages"] = advantages[idx].clone()
            batches.append(b)
        return batches, totals

    @torch.no_grad()
    def add_old_and_ref_logps(self, batches: list[dict[str, Any]]) -> None:
        """Old-policy (num_iterations > 1) and reference (beta > 0) log-probs, once per rollout."""
        need_old = self.g.num_iterations > 1
        if not need_old and self.reference is None:
            return
        model = self.train_model
        for b in batches:
            d = self._to_device(b)
            with self._autocast():
                if need_old:
                    b["old_logps"] = completion_logps(model, d, self.g.temperature).float()
                if self.reference is not None:
                    with self.reference.use(self.model) as ref_model:
                        target = model if ref_model is self.model else ref_model
                        b["ref_logps"] = completion_logps(target, d, self.g.temperature).float()

    def _rollout_metrics(self, per_func, rewards, advantages, std, completions, truncated, stats, gen_s,
                         reward_s) -> dict[str, float]:
        dev = self.device
        n = float(rewards.numel())
        lens = [float(len(c)) for c in completions]
        vals = [n, rewards.sum().item(), (rewards ** 2).sum().item(), advantages.sum().item(),
                (advantages ** 2).sum().item(), sum(lens), float(sum(truncated)),
                float(sum(1 for s in std.view(-1, self.g.num_generations)[:, 0].tolist() if s < 1e-6)),
                float(stats.new_tokens), gen_s, reward_s]
        for f in range(per_func.shape[1]):
            col = per_func[:, f]
            vals += [col.sum().item(), (col ** 2).sum().item()]
        tot = _all_sum(vals, dev)
        n_all, r_s, r_sq, a_s, a_sq, len_s, trunc, zero_std, new_tok, gen_all, rew_all = tot[:11]
        groups = n_all / self.g.num_generations
        out = {
            "reward": r_s / n_all, "reward_std": _std(r_s, r_sq, n_all),
            "advantage_std": _std(a_s, a_sq, n_all),
            "completion_len_mean": len_s / n_all, "completion_len_max": _all_max(max(lens), dev),
            "truncated_fraction": trunc / n_all, "zero_std_group_fraction": zero_std / groups,
            # tokens of every rank over the slowest rank's time
            "gen_tokens_per_s": new_tok / max(_all_max(gen_s, dev), 1e-9),
            "time_generation_s": gen_s, "time_reward_s": rew_all / self.world,
        }
        for f, rw in enumerate(self.rewards):
            s, sq = tot[11 + 2 * f], tot[12 + 2 * f]
            out[f"reward_{rw.name}"] = s / n_all
            out[f"reward_{rw.name}_std"] = _std(s, sq, n_all)
        return out

    # ---------------------------------------------------------------- policy update
    def update(self, ro: Rollout, optimizer, scheduler, params) -> dict[str, float]:
        """One optimizer step over every micro-batch of the rollout."""
        model = self.train_model
        model.train()
        loss_total = 0.0
        sums: dict[str, float] = {}
        for k, b in enumerate(ro.batches):
            d = self._to_device(b)
            with dist_util.sync_gradients(model, k == len(ro.batches) - 1), self._autocast():
                loss, s = self.method.loss(model, d, ro.totals)
            loss.backward()
            loss_total += float(loss.detach())
            for key, v in s.items():
                sums[key] = sums.get(key, 0.0) + v
            del d, loss
        keys = ["tokens", "clipped", "clipped_low", "clipped_high", "kl"]
        red = _all_sum([loss_total] + [sums.get(key, 0.0) for key in keys], self.device)
        loss_total, tot = red[0], dict(zip(keys, red[1:]))
        grad_norm = dist_util.clip_grad_norm(params, self.cfg.max_grad_norm)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"loss": loss_total, "lr": lr, "grad_norm": grad_norm,
               "clip_fraction": tot["clipped"] / max(tot["tokens"], 1.0),
               "clip_fraction_low": tot["clipped_low"] / max(tot["tokens"], 1.0),
               "clip_fraction_high": tot["clipped_high"] / max(tot["tokens"], 1.0),
               "trained_tokens": int(tot["tokens"])}
        if self.g.beta > 0:
            row["kl"] = tot["kl"] / max(tot["tokens"], 1.0)
        return row

    # ---------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, float] | None:
        """Greedy answers to this rank's share of the eval prompts, scored by every reward function."""
        if not self.data.eval:
            return None
        t0 = time.perf_counter()
        rows = self.data.eval[self.rank :: self.world]
        size = self.cfg.eval_batch_size or self.prompts_per_rollout * self.g.num_generations
        sums = [0.0] * (len(self.rewards) + 2)
        for s in range(0, len(rows), size):
            part = rows[s : s + size]
            outs, _ = self.generate([self._prompt_ids(r) for r in part], seed=None, greedy=True)
            texts = self.tokenizer.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
            keys: list[str] = []
            for row in part:
                keys += [k for k in row.get("columns", {}) if k not in keys]
            columns = {k: [row.get("columns", {}).get(k) for row in part] for k in keys}
            columns["completion_ids"] = [list(o.token_ids) for o in outs]
            per_func = score(self.rewards, [self._prompt_text(r) for r in part], texts, columns)
            weights = torch.tensor([rw.weight for rw in self.rewards])
            sums[0] += len(part)
            sums[1] += float((per_func * weights).sum())
            for f in range(len(self.rewards)):
                sums[2 + f] += float(per_func[:, f].sum())
        tot = _all_sum(sums, self.device)
        n = max(tot[0], 1.0)
        out = {"eval_reward": tot[1] / n, "eval_rows": int(tot[0]), "eval_time_s": time.perf_counter() - t0}
        for f, rw in enumerate(self.rewards):
            out[f"eval_reward_{rw.name}"] = tot[2 + f] / n
        return out

    # ---------------------------------------------------------------- run
    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.build_model()
        self.build_data()
        self.build_rewards()
        self.build_engine()
        self.build_reference()  # before any resume: the reference is the starting policy

    def total_steps(self) -> int:
        if self.cfg.max_steps:
            return self.cfg.max_steps
        per = self.prompts_per_rollout * self.world
        rollouts = max(1, math.ceil(self.cfg.num_epochs * math.ceil(len(self.data.train) / per)))
        return rollouts * self.g.num_iterations

    def run(self) -> Path:
        cfg = self.cfg
        self.setup()
        total_steps = self.total_steps()
        per_epoch = math.ceil(len(self.data.train) / (self.prompts_per_rollout * self.world)) * self.g.num_iterations
        self.eval_every = every(cfg.eval_steps, cfg.evals_per_epoch, per_epoch)
        self.save_every = every(cfg.save_steps, cfg.saves_per_epoch, per_epoch)
        warmup = warmup_steps_for(total_steps, cfg.warmup_steps, cfg.warmup_ratio)
        optimizer = build_optimizer(self.model, cfg)
        scheduler = build_scheduler(optimizer, cfg.lr_scheduler, total_steps, warmup, cfg.cosine_min_lr_ratio)
        ckpt, start_step, tokens_seen, elapsed_before = self.resume(optimizer, scheduler)
        grpo = {"rewards": [{"name": r.name, "weight": r.weight} for r in self.rewards],
                "prompts_per_rollout": self.prompts_per_rollout * self.world,
                "completions_per_rollout": self.prompts_per_rollout * self.world * self.g.num_generations}
        self.write_run_header(total_steps, start_step, {"grpo": grpo})
        logger = MetricsLogger(self.run_dir, cfg, enabled=self.main, resume_step=start_step if ckpt else None)
        bar = _progress(total_steps, start_step, self.main and cfg.progress_bar)
        self._install_signal_handlers()
        freeze_long_lived()
        params = [p for _, p in trainable_parameters(self.model)]
        step = start_step
        t_run = time.perf_counter()
        status = "completed"
        ro: Rollout | None = None
        try:
            if self.eval_before and start_step == 0:
                ev = self.evaluate()
                if ev:
                    logger.log({"step": 0, **ev})
            while step < total_steps:
                t0 = time.perf_counter()
                r, it = divmod(step, self.g.num_iterations)
                if ro is None or it == 0:
                    ro = None  # the previous rollout's tensors go before the next one is sampled
                    ro = self.rollout(r)
                    t_prep = time.perf_counter()
                    self.add_old_and_ref_logps(ro.batches)
                    ro.metrics["time_logps_s"] = time.perf_counter() - t_prep
                t_train = time.perf_counter()
                row = self.update(ro, optimizer, scheduler, params)
                step += 1
                now = time.perf_counter()
                row["time_training_s"] = now - t_train + (ro.metrics.get("time_logps_s", 0.0) if it == 0 else 0.0)
                dt = now - t0
                tokens = int(_all_sum([float(sum(len(p) + len(c) for p, c in zip(ro.prompts, ro.completions)))],
                                      self.device)[0])
                tokens_seen += tokens
                out = {"step": step, "rollout": r, "iteration": it, **row, **ro.metrics,
                       "step_time_s": dt, "tokens": tokens_seen,
                       "elapsed_s": round(elapsed_before + now - t_run, 3)}
                if it == 0:
                    out["generation_fraction"] = ro.metrics["time_generation_s"] / dt if dt > 0 else 0.0
                if step % cfg.logging_steps == 0 or step == total_steps:
                    logger.log(out)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", reward=f"{ro.metrics['reward']:.3f}",
                                len=f"{ro.metrics['completion_len_mean']:.0f}")
                self._after_step(step, total_steps, logger, optimizer, scheduler, lambda n=tokens_seen: n,
                                 lambda: elapsed_before + time.perf_counter() - t_run)
            ro = None
            self._finish(logger, step)
        except StopRequested:
            status = "stopped"
            self._stopped_message(step)
        except BaseException:
            status = "failed"
            raise
        finally:
            self._close_run(bar, logger, status, step, total_steps)
        return self.run_dir


def train_grpo(cfg, cfg_dir=None):
    return GRPOTrainer(cfg, cfg_dir).run()
