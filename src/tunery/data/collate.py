"""Padding-free batches: a micro-batch is one flat row of documents told apart by position_ids."""

from __future__ import annotations

from typing import Any

import torch


def _positions(row: dict[str, Any], key: str = "input_ids") -> list[int]:
    return row.get("position_ids") or list(range(len(row[key])))


def _cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    starts = (position_ids == 0).nonzero().squeeze(-1)
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_tensor([position_ids.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def flat_batch(input_ids: list[int], labels: list[int], position_ids: list[int], **extra: Any) -> dict[str, Any]:
    ids = torch.tensor(input_ids, dtype=torch.long)[None]
    pos = torch.tensor(position_ids, dtype=torch.long)[None]
    cu, max_len = _cu_seqlens(pos[0])
    out = {"input_ids": ids, "labels": torch.tensor(labels, dtype=torch.long)[None], "position_ids": pos,
           "cu_seqlens": cu, "max_seqlen": max_len}
    out.update(extra)
    return out


def collate_sft(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate rows (packed or not) into one [1, N] row; no pad tokens anywhere."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for r in rows:
        ids += r["input_ids"]
        labels += r["labels"]
        pos += _positions(r)
    return flat_batch(ids, labels, pos, num_rows=len(rows))


def collate_preference(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """All chosen sequences, then all rejected ones, in one flat row (one forward pass).

    `seq_index` [N] says which sequence each token belongs to: 0..P-1 chosen, P..2P-1 rejected.
    """
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    seq: list[int] = []
    p = len(rows)
    for side in ("chosen", "rejected"):
        for i, r in enumerate(rows):
            n = len(r[f"{side}_input_ids"])
            ids += r[f"{side}_input_ids"]
            labels += r[f"{side}_labels"]
            pos += list(range(n))
            seq += [i if side == "chosen" else p + i] * n
    extra: dict[str, Any] = {"seq_index": torch.tensor(seq, dtype=torch.long), "num_pairs": p}
    for key in ("margin", "ref_chosen_logps", "ref_rejected_logps"):
        if all(key in r for r in rows):
            extra[key] = torch.tensor([float(r[key]) for r in rows])
    return flat_batch(ids, labels, pos, **extra)


def collate_kto(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Completions, then mismatched (prompt i, completion i+1) pairs for the KL reference point.

    Rows prepared for a precomputed reference carry their mismatched pair (`kl_input_ids`, fixed
    when the reference log-probs were computed) and `ref_logps` / `ref_kl_logps`: those are used.
    """
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    seq: list[int] = []
    n = len(rows)
    for i, r in enumerate(rows):
        ids += r["input_ids"]
        labels += r["labels"]
        pos += list(range(len(r["input_ids"])))
        seq += [i] * len(r["input_ids"])
    fixed = all("kl_input_ids" in r for r in rows)
    for i, r in enumerate(rows):
        if fixed:
            kl_ids, kl_labels = r["kl_input_ids"], r["kl_labels"]
        else:
            other = rows[(i + 1) % n]
            p_len = r.get("prompt_len", 0)
            o_len = other.get("prompt_len", 0)
            kl_ids = r["input_ids"][:p_len] + other["input_ids"][o_len:]
            kl_labels = [-100] * p_len + other["labels"][o_len:]
        ids += kl_ids
        labels += kl_labels
        pos += list(range(len(kl_ids)))
        seq += [n + i] * len(kl_ids)
    extra: dict[str, Any] = {"seq_index": torch.tensor(seq, dtype=torch.long), "num_rows": n,
                             "kto_label": torch.tensor([bool(r["kto_label"]) for r in rows])}
    for key in ("ref_logps", "ref_kl_logps"):
        if all(key in r for r in rows):
            extra[key] = torch.tensor([float(r[key]) for r in rows])
    return flat_batch(ids, labels, pos, **extra)


COLLATE = {"sft": collate_sft, "prm": collate_sft, "preference": collate_preference, "kto": collate_kto}


def micro_batches(num_rows: int, micro_batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Row indices of each micro-batch for one epoch; a pure function of (seed, epoch) for exact resume."""
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(num_rows, generator=g).tolist()
    else:
        order = list(range(num_rows))
    return [order[i : i + micro_batch_size] for i in range(0, num_rows, micro_batch_size)]
