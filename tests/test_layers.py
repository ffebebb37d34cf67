"""The package's import arrows follow DESIGN.md's layout table ("may import"), plus the few arrows below
that the table does not list, each with its reason. A new arrow against the table fails here."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tunery"

BELOW_TRAIN = {"config", "data", "models", "kernels", "adapters", "quant", "methods"}
# DESIGN.md's table. serve/, studio/ and cli.py "import the public API only": checked below as "no
# private names" instead, so they get every unit here.
TABLE: dict[str, set[str]] = {
    "config": set(),
    "data": {"config"},
    "models": {"config", "kernels"},
    "kernels": set(),
    "adapters": {"kernels"},
    "quant": {"kernels"},
    "methods": {"models", "kernels"},
    "train": BELOW_TRAIN,
    "generate": {"models"},
    "export": {"models", "adapters"},
}
# Arrows the table leaves out, and why they are right.
EXTRA: dict[str, set[str]] = {
    # the DPO/KTO reference policy is the same model with its LoRA layers off (methods/reference.py)
    "methods": {"adapters"},
    # GRPO's rollouts (DESIGN.md names GRPO among generate's users); a full fine-tune writes its model
    # folder, and `merge_adapter: true` merges at the end of a run, through export's writers
    "train": {"generate", "export"},
    # GGUF / Ollama metadata: the chat's stop tokens and Llama-3 rope frequencies; `tunery merge` and
    # `export` load a run through the one loader chat and serve use (inference.py)
    "export": {"generate", "kernels", "inference"},
    # the top-level modules: inference.py loads a run, checkpoint or model for chat, eval, export and
    # serve; evaluate.py is `tunery eval`
    "inference": {"config", "models", "adapters", "quant", "generate"},
    "evaluate": {"config", "data", "kernels", "adapters", "methods", "generate", "inference"},
}
LEAVES = {"atomic", "__version__"}  # import nothing of tunery; anything may import them
PUBLIC_ONLY = {"serve", "studio", "cli"}


def _imports() -> dict[str, dict[str, set[tuple[str, str]]]]:
    """unit -> imported unit -> {(file, name)}, for every `from tunery...` and relative import, the ones
    inside functions included. `from .. import __version__` counts as the leaf "__version__"."""
    out: dict[str, dict[str, set[tuple[str, str]]]] = defaultdict(lambda: defaultdict(set))
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC)
        unit = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        pkg = list(rel.parts[:-1])
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "tunery" for a in node.names), f"{rel}: a plain import of tunery"
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                parts = pkg[: len(pkg) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "tunery":
                parts = node.module.split(".")[1:]
            else:
                continue
            for a in node.names:
                if parts:
                    target = parts[0]
                elif (SRC / a.name).is_dir() or (SRC / f"{a.name}.py").is_file() or a.name == "__version__":
                    target = a.name  # `from .. import models`, `from . import __version__`
                else:
                    target = "__init__"
                if target != unit:
                    out[unit][target].add((str(rel), a.name))
    return out


def test_imports_follow_the_design_table():
    wrong = []
    for unit, targets in _imports().items():
        if unit in PUBLIC_ONLY or unit in ("__init__", "__main__"):
            continue
        allowed = set() if unit in LEAVES else TABLE.get(unit, set()) | EXTRA.get(unit, set()) | LEAVES
        for target, where in sorted(targets.items()):
            if target not in allowed:
                wrong.append(f"{unit} -> {target} ({', '.join(sorted({w for w, _ in where}))})")
    assert not wrong, "imports against DESIGN.md's table:\n" + "\n".join(wrong)


def test_serve_studio_and_cli_use_no_private_names():
    private = [f"{w}: {n} from {t}" for unit in PUBLIC_ONLY for t, ws in _imports().get(unit, {}).items()
               for w, n in ws if n.startswith("_") and n != "__version__"]
    assert not private, private


def test_the_check_sees_arrows():
    """The parser finds known arrows (so an empty result above means something)."""
    graph = _imports()
    assert ("models/decoder.py", "rms_norm") in graph["models"]["kernels"]  # a top-level relative import
    assert any(n == "describe_target" for _, n in graph["serve"]["inference"])  # one inside a function
    assert ("cli.py", "__version__") in graph["cli"]["__version__"]  # `from . import __version__`
    assert "config" not in graph  # config imports nothing of tunery
    stale = {u: ts - set(graph[u]) for u, ts in EXTRA.items() if ts - set(graph[u])}
    assert not stale, f"EXTRA lists arrows the code no longer has: {stale}"
