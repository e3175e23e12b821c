"""The ``kdistill`` command line: ``demo``, ``train``, ``inspect``, ``eval``, ``report``, ``export``,
``generate`` (a language-model run's greedy continuation of a prompt).

Each subcommand is a few lines over the library. A problem the user can fix is one
line on stderr and exit status 2; Ctrl-C during training checkpoints and exits 130.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdistill.core.errors import KDistillError

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise KDistillError(f"{self.prog}: {message} (see {self.prog} --help)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_ERROR
        return int(args.handler(args) or 0)
    except KDistillError as error:
        if _rank() == 0:
            print(f"kdistill: error: {error}", file=sys.stderr)
        elif not getattr(error, "from_main", False):  # rank 0's errors are said once, by rank 0
            print(f"kdistill: error (rank {_rank()}): {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if getattr(args, "command", None) not in ("train", "demo"):
            print("kdistill: interrupted", file=sys.stderr)
        elif _run_started(args, argv):
            resume = "kdistill " + " ".join(shlex.quote(a) for a in _resume_argv(argv))
            print(f"kdistill: interrupted, the last checkpoint is kept; resume with: {resume}", file=sys.stderr)
        else:
            print("kdistill: interrupted before the run started; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as error:
        print(f"kdistill: error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # a bug in kdistill: still one line, the traceback on request
        if os.environ.get("KDISTILL_DEBUG"):
            raise
        print(
            f"kdistill: internal error: {type(error).__name__}: {error} (set KDISTILL_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR


def _rank() -> int:
    from kdistill.distributed import world

    return world().rank


def _run_started(args: argparse.Namespace, argv: list[str]) -> bool:
    """Has this command's run written its config (so that ``--resume`` can continue it)?"""
    out = getattr(args, "resolved_out", None)
    config = out / "config.yaml" if out is not None else None
    if config is None or not config.exists():
        return False
    return "--resume" in argv or config.stat().st_mtime >= args.started_at  # not an earlier run's


def _resume_argv(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--force"] + ([] if "--resume" in argv else ["--resume"])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdistill", description="Knowledge distillation for PyTorch models.")
    from kdistill import __version__

    parser.add_argument("--version", action="version", version=f"kdistill {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def run_options(sub: argparse.ArgumentParser, default_out: str | None) -> None:
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set train.epochs=5 (repeatable)",
        )
        sub.add_argument("--out", default=default_out, help="run directory (default: the config's `out`)")
        sub.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        sub.add_argument("--force", action="store_true", help="replace the results already in --out")
        sub.add_argument("--quiet", action="store_true", help="print only the final table")

    demo = commands.add_parser("demo", help="distil a CNN on built-in MNIST digits and report (a few minutes, offline)")
    run_options(demo, "runs/demo")
    demo.set_defaults(handler=cmd_demo)

    train = commands.add_parser("train", help="a full run from a YAML config")
    train.add_argument("config", help="YAML file (see configs/)")
    run_options(train, None)
    train.set_defaults(handler=cmd_train)

    inspect = commands.add_parser("inspect", help="list a model's layers and propose feature pairs")
    inspect.add_argument("model", nargs="?", help="built-in name or package.module:function (or use --config)")
    inspect.add_argument("--args", default="{}", help="model arguments as YAML, e.g. '{channels: [16, 32]}'")
    inspect.add_argument("--input-shape", default=None, help="one input's shape, e.g. 1,28,28 (default: the data's)")
    inspect.add_argument("--classes", type=int, default=10, help="classes for built-in models (default 10)")
    inspect.add_argument("--student", default=None, help="a student model: also propose feature pairs")
    inspect.add_argument("--student-args", default="{}", help="the student's arguments as YAML")
    inspect.add_argument("--config", default=None, help="inspect the teacher and student of a run config")
    inspect.add_argument("--depth", type=int, default=None, help="show layers down to this nesting depth")
    inspect.add_argument(
        "--seq-len", type=int, default=16, help="token sequence length for text models (hf, shrink; default 16)"
    )
    inspect.add_argument("--list", action="store_true", help="list the built-in models and datasets")
    inspect.set_defaults(handler=cmd_inspect)

    evaluate = commands.add_parser("eval", help="evaluate a run's student (or other weights) on its test split")
    evaluate.add_argument("run", help="run directory")
    evaluate.add_argument("--weights", default=None, help="weights file (default: RUN/distill/student.safetensors)")
    evaluate.add_argument("--split", choices=["test", "validation", "train"], default="test")
    evaluate.set_defaults(handler=cmd_eval)

    report = commands.add_parser("report", help="measure teacher, baseline and student of a run again")
    report.add_argument("run", help="run directory")
    report.set_defaults(handler=cmd_report)

    export = commands.add_parser("export", help="write the plain student (no hooks, no adapters)")
    export.add_argument("run", help="run directory")
    export.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors")
    export.add_argument("--out", default=None, help="output file (default: RUN/export/student.<format>)")
    export.add_argument("--weights", default=None, help="weights file (default: RUN/distill/student.safetensors)")
    export.set_defaults(handler=cmd_export)

    generate = commands.add_parser("generate", help="continue a prompt with a language-model run's student")
    generate.add_argument("run", help="run directory of a language-model run (data.dataset: corpus)")
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate at most (default 40)")
    generate.add_argument("--model", choices=["student", "baseline", "teacher"], default="student")
    generate.set_defaults(handler=cmd_generate)
    return parser


# -- commands ----------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from kdistill.config import load_config

    config = load_config(_demo_config_path(), args.set)
    return _run(config, args, title="kdistill demo")


def _demo_config_path() -> Path:
    return Path(__file__).resolve().parent / "demo.yaml"


def cmd_train(args: argparse.Namespace) -> int:
    from kdistill.config import load_config

    return _run(load_config(args.config, args.set), args, title=f"kdistill train {args.config}")


def _run(config: Any, args: argparse.Namespace, title: str) -> int:
    import dataclasses
    import time

    from kdistill.distributed import process_group_from_environment
    from kdistill.pipeline import run
    from kdistill.report import markdown

    out = Path(args.out or config.out)
    args.resolved_out, args.started_at = out, time.time()
    config = dataclasses.replace(config, out=str(out))
    started = time.perf_counter()
    # Under torchrun: join the process group (gloo on CPU, NCCL on CUDA) for the run, leave it after.
    with process_group_from_environment() as place:
        quiet = args.quiet or not place.is_main
        log = (lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
        report = run(config, out, resume=args.resume, force=args.force, log=log)
    if not place.is_main:
        return 0
    seconds = time.perf_counter() - started
    if report.get("kind") == "language-model":
        from kdistill.lm_run import markdown as lm_markdown

        print(lm_markdown(report, title).split("\n", 2)[2].strip())
        print(f"\nwrote {out / 'report.md'} and {out / 'report.json'} in {seconds:.0f} s")
        return 0
    print(markdown(report, title).split("\n", 2)[2].strip())
    print(f"\nwrote {out / 'report.md'}, {out / 'report.json'} and {out / 'plots'}/ in {seconds:.0f} s")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from kdistill.lm_run import generate

    print(generate(args.run, args.prompt, max_new_tokens=args.max_new_tokens, model=args.model))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch
    import yaml

    from kdistill.data import BUILTIN_DATASETS
    from kdistill.layers import format_layers, trace_layers
    from kdistill.models import BUILTIN_MODELS, build_model

    if args.list:
        print("built-in models:")
        for name, builder in BUILTIN_MODELS.items():
            print(f"  {name:<15} {(builder.__doc__ or '').strip().splitlines()[0]}")
        print(f"  {SMOLLM2:<15} SmolLM2-135M-Instruct, the built-in causal-LM teacher (data.dataset: corpus)")
        print("built-in datasets:")
        for name, text in BUILTIN_DATASETS.items():
            print(f"  {name:<15} {text}")
        print(f"  {'corpus':<15} language modelling on the text at data.path (or the built-in rotten-tomatoes)")
        return 0
    if args.seq_len < 1:
        raise KDistillError(f"inspect: --seq-len must be ≥ 1, got {args.seq_len}")
    if args.classes < 1:
        raise KDistillError(f"inspect: --classes must be ≥ 1, got {args.classes}")
    if args.config:
        from kdistill.config import CORPUS, load_config
        from kdistill.data import load_data
        from kdistill.pipeline import build_pair, sample_inputs

        config = load_config(args.config)
        if config.data.dataset == CORPUS:  # a language-model run: the teacher and its shrunk student
            from kdistill.lm_run import build_student, load_teacher

            teacher, _ = load_teacher(config)
            models = {"teacher": teacher, "student": build_student(teacher, config.student.args or {}, None)}
            specs = {"teacher": (config.teacher.model, config.teacher.args), "student": ("shrink", config.student.args)}
            shape, sample = _token_sample(args.seq_len)
        else:
            models, specs, shape, sample = _inspect_config(config, load_data, build_pair, sample_inputs)
    else:
        if not args.model:
            raise KDistillError("inspect: name a model (e.g. `kdistill inspect cnn --input-shape 1,28,28`) or --config")
        if args.model == "shrink":
            raise KDistillError("inspect: shrink makes a student: `kdistill inspect hf --args … --student shrink`")
        specs = {("model" if not args.student else "teacher"): (args.model, _yaml_mapping(args.args, "--args"))}
        if args.student:
            specs["student"] = (args.student, _yaml_mapping(args.student_args, "--student-args"))
        if args.model in ("hf", SMOLLM2):  # token ids: a batch of two sentences of --seq-len tokens
            shape, sample = _token_sample(args.seq_len)
        else:
            shape = _shape(args.input_shape or "1,28,28")
            sample = torch.zeros(2, *shape)
        models = {}
        for role, (name, model_args) in specs.items():
            if name == "shrink":
                from kdistill.pipeline import shrink

                models[role] = shrink(models["teacher"], **model_args).student
            elif name == SMOLLM2:  # the built-in causal-LM teacher (not a BUILTIN_MODELS factory)
                from kdistill.integrations.hf import load_causal_lm

                if model_args:
                    raise KDistillError(f"inspect: {SMOLLM2} takes no --args, got {model_args}")
                models[role] = load_causal_lm(SMOLLM2)
            else:
                models[role] = build_model(name, model_args, input_shape=shape, num_classes=args.classes)
    for role, model in models.items():
        name, model_args = specs[role]
        total = sum(p.numel() for p in model.parameters())
        unit = "tokens" if isinstance(sample, dict) else ""
        print(
            f"{role}: {name} {yaml.safe_dump(model_args, default_flow_style=True).strip()}  "
            f"({total:,} parameters, input {'×'.join(map(str, shape))}{' ' + unit if unit else ''})"
        )
        try:
            layers = trace_layers(model, sample)
        except KDistillError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as error:  # torch's shape errors, failed allocations
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise KDistillError(
                f"inspect: the {role} {name} cannot run on inputs of shape {'×'.join(map(str, shape))}: {first}"
            ) from None
        print(format_layers(layers, args.depth))
        print()
    if "student" in models:
        from kdistill.pipeline import proposed_pairs

        pairs = proposed_pairs(models["teacher"], models["student"], *specs["student"], sample)
        if specs["student"][0] == "shrink":
            print("proposed feature pairs (each kept block ↔ the teacher block it was copied from):")
        else:
            print("proposed feature pairs (student ↔ teacher, nearest relative depth an adapter can map):")
        if not pairs:
            print("  none: no feature maps that an adapter can map; use response distillation only")
        for pair in pairs:
            print(f"  - {{student: {pair.student}, teacher: {pair.teacher}}}")
    return 0


SMOLLM2 = "smollm2-135m"  # kdistill.integrations.hf.SMOLLM2 (hf imports transformers lazily, but keep the CLI light)


def _token_sample(seq_len: int) -> tuple[tuple[int, ...], dict[str, Any]]:
    """``(shape, sample)`` for text models: two sequences of ``seq_len`` token ids."""
    import torch

    ids = torch.full((2, seq_len), 5, dtype=torch.long)
    return (seq_len,), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _inspect_config(config: Any, load_data: Any, build_pair: Any, sample_inputs: Any) -> tuple[Any, Any, Any, Any]:
    """Models, ``(name, args)`` specs, input shape and sample of a classification run's config."""
    splits = load_data(config.data)
    models = dict(zip(("teacher", "student"), build_pair(config, splits)))
    specs = {role: (spec.model, spec.args) for role, spec in (("teacher", config.teacher), ("student", config.student))}
    return models, specs, splits.input_shape, sample_inputs(splits)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise KDistillError(f"--input-shape {text!r}: expected integers like 1,28,28") from None
    if not shape or any(s < 1 for s in shape):
        raise KDistillError(f"--input-shape {text!r}: expected positive integers like 1,28,28")
    import math

    from kdistill.data import available_memory, format_bytes

    # inspect runs the model on two such inputs; its layers' outputs take several times as much again.
    needed, available = 2 * 4 * math.prod(shape), available_memory()
    if 8 * needed > available:
        raise KDistillError(
            f"--input-shape {text!r}: the two probe inputs alone take {format_bytes(needed)} and the layers' "
            f"outputs several times that, with {format_bytes(available)} of memory available; use a smaller shape"
        )
    return shape


def _yaml_mapping(text: str, flag: str) -> dict[str, Any]:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise KDistillError(f"{flag} {text!r}: not valid YAML") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise KDistillError(f"{flag} {text!r}: expected a mapping like '{{channels: [16, 32]}}'")
    return value


def _load_run(run_dir: str) -> tuple[Any, Any, Any, Any]:
    """Config, data splits, teacher and student modules of a finished run (weights not loaded)."""
    from kdistill.config import from_dict, read_yaml
    from kdistill.data import load_data
    from kdistill.pipeline import build_pair

    path = Path(run_dir)
    if not (path / "config.yaml").exists():
        raise KDistillError(f"{run_dir} is not a kdistill run directory (no config.yaml)")
    config = from_dict(read_yaml(path / "config.yaml"))
    if config.data.dataset == "corpus":
        raise KDistillError(
            f"{run_dir} is a language-model run: its report.json holds its measurements; "
            "use `kdistill generate` to try its student"
        )
    splits = load_data(config.data)
    teacher, student = build_pair(config, splits)
    return config, splits, teacher, student


def _student_weights(run_dir: str, weights: str | None, command: str) -> Path:
    """``--weights``, else the run's distilled student — which only a finished run has."""
    if weights:
        return Path(weights)
    _require_finished(run_dir, command, "or pass --weights FILE to use a file of your choice")
    return Path(run_dir) / "distill" / "student.safetensors"


def _require_finished(run_dir: str, command: str, alternative: str = "") -> None:
    from kdistill.rundir import unfinished

    missing = unfinished(Path(run_dir))
    if missing:
        raise KDistillError(
            f"{command}: the run in {run_dir} is unfinished ({missing}); finish it with `kdistill train ... "
            f"--out {run_dir} --resume`{', ' + alternative if alternative else ''}"
        )


def cmd_eval(args: argparse.Namespace) -> int:
    from kdistill.models import load_weights
    from kdistill.trainer import evaluate

    config, splits, _, student = _load_run(args.run)
    load_weights(student, _student_weights(args.run, args.weights, "eval"), "student")
    data = {"test": splits.test, "validation": splits.validation, "train": splits.train}[args.split]
    if data is None:
        raise KDistillError(f"the run has no {args.split} split (data.validation_fraction is 0)")
    metrics = evaluate(student, data, config.data.eval_batch_size)
    print(f"{args.split} accuracy {100 * metrics['accuracy']:.2f} %  loss {metrics['loss']:.4f}  ({len(data)} samples)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from kdistill.models import load_weights
    from kdistill.pipeline import teacher_weights_path
    from kdistill.report import markdown, measure, write_report
    from kdistill.rundir import RunLock

    _require_finished(args.run, "report")
    config, splits, teacher, student = _load_run(args.run)
    run_dir = Path(args.run)
    with RunLock(run_dir, "report"):  # it writes into the run: not while a training process works there
        _require_finished(args.run, "report")  # again, now that no training process can be in there
        load_weights(teacher, teacher_weights_path(config, run_dir, splits), "teacher")
        models = {"teacher": teacher}
        if (run_dir / "baseline" / "student.safetensors").exists():
            import copy

            baseline = copy.deepcopy(student)
            load_weights(baseline, run_dir / "baseline" / "student.safetensors", "baseline")
            models["baseline"] = baseline
        load_weights(student, run_dir / "distill" / "student.safetensors", "student")
        models["student"] = student
        report = measure(models, splits.test, batch_size=config.data.eval_batch_size)
        histories = {name: run_dir / name / "metrics.jsonl" for name in ("baseline", "distill")}
        write_report(run_dir, report, histories, title=f"kdistill report: {splits.name}")
    print(markdown(report).split("\n", 2)[2].strip())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kdistill.export import export_onnx, export_safetensors
    from kdistill.models import load_weights

    _, splits, _, student = _load_run(args.run)
    load_weights(student, _student_weights(args.run, args.weights, "export"), "student")
    out = Path(args.out) if args.out else Path(args.run) / "export" / f"student.{args.format}"
    if args.format == "onnx":
        if splits.test.is_text:
            raise KDistillError("export: ONNX export takes tensor inputs; export text models as safetensors")
        from kdistill.data import first_inputs

        export_onnx(student, first_inputs(splits.test, 1), out)
    else:
        export_safetensors(student, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.3f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
