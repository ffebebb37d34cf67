"""Build hh_rlhf_harmless_kto_sample.jsonl: unpaired KTO rows from the HH-RLHF harmless pairs.

Every pair of hh_rlhf_harmless_sample.jsonl gives two rows with the same prompt (the conversation up to the last
assistant turn, as a message list): the `chosen` reply labelled true (desirable) and the `rejected` reply labelled
false (undesirable). Pairs whose two transcripts share no prompt are skipped.

Row format (Tunery's `type: kto`, trl's unpaired preference): {"prompt": [messages], "completion": str, "label": bool}

    python examples/data/make_kto.py
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
TURN = re.compile(r"\n\n(Human|Assistant):")
ASSISTANT = "\n\nAssistant:"


def split_pair(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(shared prompt transcript, chosen reply, rejected reply); the prompt ends at the last shared assistant turn."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(ASSISTANT, 0, n)
    while cut != -1 and cut + len(ASSISTANT) > n:
        cut = chosen.rfind(ASSISTANT, 0, cut)
    if cut == -1:
        return None
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:].strip(), rejected[end:].strip()


def messages(transcript: str) -> list[dict[str, str]]:
    parts = TURN.split(transcript)
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2]) if said.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default=str(HERE / "hh_rlhf_harmless_sample.jsonl"))
    ap.add_argument("--out", default=str(HERE / "hh_rlhf_harmless_kto_sample.jsonl"))
    args = ap.parse_args()
    out = []
    for line in Path(args.source).read_text().splitlines():
        row = json.loads(line)
        split = split_pair(row["chosen"], row["rejected"])
        if split is None:
            continue
        prompt, good, bad = split
        msgs = messages(prompt)
        if not msgs or msgs[-1]["role"] != "user" or not good or not bad:
            continue
        out.append({"prompt": msgs, "completion": good, "label": True})
        out.append({"prompt": msgs, "completion": bad, "label": False})
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    print(f"wrote {len(out)} rows to {args.out}")


if __name__ == "__main__":
    main()
