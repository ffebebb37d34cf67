"""The `tunery` command: one thin function per verb; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and "RANK" not in os.environ:
        from .train.launch import launch_local

        return launch_local(args.config, args.overrides, args.nproc)
    from .train.loop import train

    run_dir = train(args.config, args.overrides)
    print(f"run directory: {run_dir}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    problems = _file_problems(cfg, Path(args.config).resolve().parent)
    if problems:
        print(f"invalid config in {args.config}:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    print("valid")
    return 0


def _file_problems(cfg, base: Path) -> list[str]:
    """Local paths that do not exist (hub ids are checked when loading)."""
    problems = []
    for key, entries in (("datasets", cfg.datasets), ("test_datasets", cfg.test_datasets or [])):
        for i, d in enumerate(entries):
            p = Path(d.path) if Path(d.path).is_absolute() else base / d.path
            looks_local = d.path.startswith((".", "/", "~")) or Path(d.path).suffix or p.exists()
            if looks_local and not any(ch in d.path for ch in "*?[") and not p.exists():
                problems.append(f"{key}.{i}.path: file not found: {d.path}")
    bm = cfg.base_model
    if bm not in ("default", "", None) and (bm.startswith((".", "/", "~")) or bm.endswith(".gguf")):
        if not Path(os.path.expanduser(bm)).exists():
            problems.append(f"base_model: no such file or folder: {bm}")
    if not cfg.datasets:
        problems.append("datasets: at least one dataset is needed to train")
    return problems


def cmd_schema(args: argparse.Namespace) -> int:
    from .config import Config

    print(json.dumps(Config.model_json_schema(), indent=2))
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data import preprocess
    from .models import load_tokenizer, resolve_model_path

    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.tokenizer_config or resolve_model_path(cfg.base_model))
    preprocess(cfg, debug=args.debug, dump=args.dump, cfg_dir=Path(args.config).resolve().parent, tokenizer=tokenizer)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .inference import chat_main

    return chat_main(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train.plan import format_report, parse_bytes, plan

    cfg = load_config(args.config, args.overrides)
    report = plan(cfg, parse_bytes(args.gpu_mem) if args.gpu_mem else None)
    print(format_report(report))
    return 0 if report.fits else 1


def cmd_merge(args: argparse.Namespace) -> int:
    from .export.merge import merge_run

    out = merge_run(args.run, args.out)
    print(f"merged model: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    out = export_run(args.run, fmt=args.format, quant=args.quant, out=args.out)
    print(f"exported: {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve_main

    return serve_main(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import eval_main

    return eval_main(args)


def cmd_studio(args: argparse.Namespace) -> int:
    from .studio import studio_main

    return studio_main(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="tunery", description="Fast, lean, reproducible LLM fine-tuning.")
    p.add_argument("--version", action="version", version=f"tunery {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    def with_config(name: str, help: str, fn) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("config", metavar="CONFIG", help="YAML config file")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. lora_r=8 datasets.0.path=x.jsonl")
        sp.set_defaults(fn=fn)
        return sp

    t = with_config("train", "fine-tune a model as the config says", cmd_train)
    t.add_argument("--nproc", type=int, default=None, help="processes (GPUs) on this machine, started through torchrun")
    with_config("validate", "check a config: prints `valid` or every problem (exit 2)", cmd_validate)
    sp = sub.add_parser("schema", help="print the config's JSON schema", description="print the config's JSON schema")
    sp.set_defaults(fn=cmd_schema)
    pp = with_config("preprocess", "tokenize and cache the data, print statistics", cmd_preprocess)
    pp.add_argument("--debug", type=int, default=0, metavar="N", help="show N examples with trained tokens marked")
    pp.add_argument("--dump", default=None, metavar="FILE", help="write the final rows as jsonl")
    pl = with_config("plan", "predict peak GPU memory and whether the run fits", cmd_plan)
    pl.add_argument("--gpu-mem", default=None, help="GPU memory to plan for, e.g. 24GiB (default: this GPU's)")

    c = sub.add_parser("chat", help="chat with a run directory or a model", description="chat with a run directory or a model")
    c.add_argument("target", metavar="TARGET", help="run directory, checkpoint, model folder, .gguf or `default`")
    c.add_argument("--prompt", default=None, help="answer this once and exit")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--top-k", type=int, default=0)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=None)
    c.set_defaults(fn=cmd_chat)

    m = sub.add_parser("merge", help="fold the adapter into the base and write an HF folder", description="fold the adapter into the base and write an HF folder")
    m.add_argument("run", metavar="RUN")
    m.add_argument("--out", required=True, metavar="DIR")
    m.set_defaults(fn=cmd_merge)

    e = sub.add_parser("export", help="export to GGUF or Ollama", description="export to GGUF or Ollama")
    e.add_argument("run", metavar="RUN")
    e.add_argument("--format", choices=["gguf", "ollama", "safetensors"], default="gguf")
    e.add_argument("--quant", default="f16", help="f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m or f32")
    e.add_argument("--out", default=None)
    e.set_defaults(fn=cmd_export)

    s = sub.add_parser("serve", help="OpenAI-compatible API for a run or model", description="OpenAI-compatible API for a run or model")
    s.add_argument("target", metavar="TARGET")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="required when binding to anything but loopback")
    s.add_argument("--max-batch", type=int, default=16)
    s.set_defaults(fn=cmd_serve)

    ev = sub.add_parser("eval", help="eval loss, perplexity and exact-match accuracy", description="eval loss, perplexity and exact-match accuracy")
    ev.add_argument("target", metavar="RUN|CONFIG")
    ev.add_argument("--max-examples", type=int, default=None)
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.set_defaults(fn=cmd_eval)

    st = sub.add_parser("studio", help="the local web app", description="the local web app")
    st.add_argument("--host", default="127.0.0.1")
    st.add_argument("--port", type=int, default=7860)
    st.add_argument("--runs-dir", default="./runs")
    st.add_argument("--auth-token", default=None, help="required when binding to anything but loopback")
    st.add_argument("--data-root", action="append", default=None, help="extra folder the Studio may read data from")
    st.add_argument("--model-root", action="append", default=None, help="extra folder the Studio may read models from")
    st.add_argument("--max-upload-mb", type=int, default=None, help="largest dataset upload")
    st.set_defaults(fn=cmd_studio)
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    parser = build_parser()
    # key=value overrides may also come after options (`train CONFIG --nproc 2 lora_r=8`)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError, RuntimeError, ImportError, KeyError) as e:
        if os.environ.get("TUNERY_DEBUG"):
            raise
        return _fail(f"{e}" if str(e) else type(e).__name__, 1)


if __name__ == "__main__":
    sys.exit(main())
