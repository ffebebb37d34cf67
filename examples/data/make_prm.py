"""Build gsm8k_prm_sample.jsonl: process-reward rows (one label per solution step) from GSM8K solutions.

Each GSM8K answer is split into steps (one per line, calculator annotations `<<48/2=24>>` removed, the final
`#### 72` line written as "The answer is 72."). For every problem, a step k is drawn and two rows are written:

- the solution up to step k, every step labelled true;
- the same prefix with step k's result number changed (e.g. "48/2 = 24" -> "48/2 = 26"), that step labelled false.

Steps after a wrong one are left out (they would build on the error), as in Math-Shepherd-style data. So the label
of the last step is true in half of the rows and false in the other half, and only the step's content tells them apart.

Row format (Tunery's `type: prm`, trl's stepwise-supervised): {"prompt", "completions": [step, ...], "labels": [bool, ...]}

    python examples/data/make_prm.py            # reads examples/data/gsm8k_sample.jsonl, writes gsm8k_prm_sample.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CALC = re.compile(r"<<[^>]*>>")
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def solution_steps(answer: str) -> list[str]:
    steps = []
    for line in answer.split("\n"):
        line = CALC.sub("", line).strip()
        if not line:
            continue
        if line.startswith("####"):
            steps.append(f"The answer is {line.removeprefix('####').strip()}.")
        else:
            steps.append(line)
    return steps


def perturb(step: str, rng: random.Random) -> str | None:
    """The step with its last number (the result, in GSM8K's style) changed; None if it has no number."""
    found = list(NUMBER.finditer(step))
    if not found:
        return None
    m = found[-1]
    text = m.group()
    if "." in text:
        value = float(text)
        new = f"{value + rng.choice([-1, 1]) * rng.choice([0.5, 1, 1.5, 2, 10]):.{len(text.split('.')[1])}f}"
        if float(new) < 0 or new == text:
            new = f"{value + 1:.{len(text.split('.')[1])}f}"
    else:
        value = int(text)
        delta = rng.choice([d for d in range(-max(3, value // 4), max(3, value // 4) + 1) if d != 0])
        new = str(abs(value + delta)) if value + delta != value else str(value + 1)
        if new == text:
            new = str(value + 1)
    return step[: m.start()] + new + step[m.end():]


def build(rows: list[dict], n_problems: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for row in rows:
        if len(out) >= 2 * n_problems:
            break
        steps = solution_steps(row["answer"])
        candidates = [k for k, s in enumerate(steps) if NUMBER.search(s)]
        if len(steps) < 2 or not candidates:
            continue
        k = rng.choice(candidates)
        wrong = perturb(steps[k], rng)
        if wrong is None or wrong == steps[k]:
            continue
        prefix = steps[:k]
        prompt = row["question"].strip() + "\n"  # the steps start on their own line
        out.append({"prompt": prompt, "completions": prefix + [steps[k]], "labels": [True] * (k + 1)})
        out.append({"prompt": prompt, "completions": prefix + [wrong], "labels": [True] * k + [False]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default=str(HERE / "gsm8k_sample.jsonl"), help="GSM8K jsonl (question, answer)")
    ap.add_argument("--out", default=str(HERE / "gsm8k_prm_sample.jsonl"))
    ap.add_argument("--problems", type=int, default=200, help="problems to use (two rows each)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.source).read_text().splitlines() if line.strip()]
    out = build(rows, args.problems, args.seed)
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    print(f"wrote {len(out)} rows to {args.out}")


if __name__ == "__main__":
    main()
