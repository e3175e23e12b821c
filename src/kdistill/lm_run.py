"""The language-model job (``data.dataset: corpus``): pretrained causal-LM teacher → shrunk student
with a pruned vocabulary → baseline and distilled training → perplexity report (spec §6).

:func:`kdistill.pipeline.run` hands a corpus config to :func:`run`. A run directory holds::

    config.yaml             the resolved config
    baseline/               the student trained on cross-entropy alone (when ``baseline``)
    distill/                the distilled student: checkpoint.pt, student.safetensors, metrics.jsonl,
                            student.json (what rebuilds the student: teacher, shrink args, kept ids)
    report.json, report.md

The teacher is never trained: it is the pretrained model the config names. The text is tokenized
once into a memory-mapped token file (:class:`kdistill.corpus.TokenCorpus`, in the cache directory),
and the teacher's outputs on the training blocks are computed once into a teacher cache (top-k per
token by default, coarsened to the student's vocabulary), shared by later runs with the same teacher,
data and settings. Baseline and distilled student start from the same weights (the teacher's kept
blocks) and see the same blocks in the same order. With ``distill.on_policy`` λ > 0 a fraction λ of
the distilled student's batches are on-policy (:class:`kdistill.onpolicy.OnPolicyDistillation`: its
own samples, scored by the live teacher); the baseline's never are.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill import faults
from kdistill.cache import CachedDistillation, TeacherCache, fingerprint
from kdistill.checkpoint import atomic_write
from kdistill.config import CORPUS, Config, dump_config, from_dict, read_prompt_file, read_yaml, to_dict
from kdistill.core.calls import is_causal_lm
from kdistill.core.distiller import Distiller
from kdistill.core.errors import CheckpointError, ConfigError, KDistillError
from kdistill.corpus import CorpusBlocks, TokenCorpus
from kdistill.distributed import world
from kdistill.models import load_weights
from kdistill.report import parameter_count, size_mb
from kdistill.rundir import RunLock, check_out_path, check_run_dir, move_results_aside
from kdistill.trainer import Trainer, pick_device

Log = Callable[[str], None]

PROMPTS = ("The movie was", "This film is a", "In the end, the story")  # the report's fixed prompts
CONTINUATION_TOKENS = 24  # greedy tokens per prompt in the report
TIMING_ROUNDS = 3  # throughput and latency: median of this many interleaved rounds
TIMING_BATCHES = 2  # evaluation batches timed per throughput round
LATENCY_TOKENS = 32  # greedy tokens per latency round
SAMPLED_PROMPTS = 3  # held-out prompts whose sampled continuations the report shows side by side
ON_POLICY_PROMPTS = 16  # held-out prompts of the report's on-policy measure: its cost stays a few batches
STUDENT_FILE = "student.json"
MAX_NEW_TOKENS = 100_000  # kdistill generate: a typo's bound, far beyond any context window
BYTES = {"float16": 2, "float32": 4}


# -- the teacher and the student ---------------------------------------------------------------


def teacher_source(config: Config) -> tuple[str, str | None]:
    """``(path, gguf_file)`` of the config's teacher for :func:`kdistill.integrations.hf.load_causal_lm`."""
    from kdistill.integrations.hf import SMOLLM2

    if config.teacher.model == SMOLLM2:
        return SMOLLM2, None
    args = config.teacher.args or {}
    return str(args["path"]), args.get("gguf_file")


def load_teacher(config: Config) -> tuple[nn.Module, Any]:
    """The pretrained teacher (frozen, eval mode) and its tokenizer; ``teacher.weights`` is loaded over it.

    Raises:
        ConfigError: the directory holds no causal LM (e.g. a classifier) or no tokenizer.
    """
    from kdistill.integrations.hf import load_causal_lm, load_causal_lm_tokenizer

    path, gguf_file = teacher_source(config)
    try:
        teacher = load_causal_lm(path, gguf_file=gguf_file)
        tokenizer = load_causal_lm_tokenizer(path, gguf_file=gguf_file)
    except KDistillError:
        raise
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as error:  # transformers' refusals
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"teacher: {path} is not a causal language model with its tokenizer: {first}") from None
    if not is_causal_lm(teacher):
        raise ConfigError(f"teacher: {path} holds a {type(teacher).__name__}, not a causal language model")
    if config.teacher.weights:
        load_weights(teacher, config.teacher.weights, "teacher")
    teacher.requires_grad_(False)
    return teacher.eval(), tokenizer


def build_student(teacher: nn.Module, student_args: Mapping[str, Any], kept: list[int] | None) -> nn.Module:
    """The student before training: the teacher's kept blocks (:func:`kdistill.integrations.hf.shrink`), its
    vocabulary cut to ``kept`` (:class:`~kdistill.core.vocabulary.PrunedVocabulary`) unless None."""
    from kdistill.core.vocabulary import PrunedVocabulary
    from kdistill.pipeline import shrink

    student = shrink(teacher, **student_args).student
    return PrunedVocabulary(student, kept) if kept is not None else student


# -- data -----------------------------------------------------------------------------------------


def first_blocks(split: CorpusBlocks, tokens: int | None) -> CorpusBlocks:
    """The first ``tokens`` tokens of a split in whole blocks (at least one when the split has any),
    a view of its memory map; the whole split when ``tokens`` is None."""
    if tokens is None:
        return split
    return CorpusBlocks(split.blocks[: max(1, tokens // split.block_size)], split.name)


def corpus_directory(config: Config, tokenizer_id: str) -> Path:
    """Where the run's token corpus is built (and reused by later runs with the same text and settings)."""
    from kdistill.pipeline import cache_root

    d = config.data
    source = d.path if not Path(d.path).exists() else str(Path(d.path).resolve())
    identity = [source, tokenizer_id, d.block_size, d.validation_fraction, d.test_fraction]
    return cache_root(config) / "corpora" / hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def kept_digest(kept: list[int] | None) -> str:
    """Names a pruned vocabulary (the teacher cache's ``coarsen_id`` joins it with τ)."""
    return hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:20]


@dataclass
class Prepared:
    """A language-model run's checked ingredients."""

    config: Config
    teacher: nn.Module
    tokenizer: Any
    corpus: TokenCorpus
    train: CorpusBlocks
    validation: CorpusBlocks
    test: CorpusBlocks
    kept: list[int] | None  # the student's token ids; None: the full vocabulary
    student: nn.Module  # initial weights, shared by baseline and distilled student
    prompts: list[Tensor] | None = None  # distill.prompt_file's prompts, tokenized; None: block prefixes


def prepare(config: Config, log: Log) -> Prepared:
    """Load the teacher and tokenizer, tokenize the corpus, build the student and try one batch
    through the loss — before anything is written to the run directory."""
    from kdistill.pipeline import check_cache_settings

    check_cache_settings(config)  # loss names; top-k storage with a loss it cannot serve
    pick_device(config.train.device)
    teacher, tokenizer = load_teacher(config)
    from kdistill.corpus import tokenizer_digest

    d = config.data
    corpus = TokenCorpus.build(
        d.path,
        tokenizer,
        corpus_directory(config, tokenizer_digest(tokenizer)),
        block_size=d.block_size,
        validation_fraction=d.validation_fraction,
        test_fraction=d.test_fraction,
    )
    if len(corpus.split("train")) == 0 or len(corpus.split("test")) == 0:
        raise ConfigError(
            f"data.path: {d.path} gives {corpus.tokens('train')} train and {corpus.tokens('test')} test tokens, "
            f"too few for one block of data.block_size {d.block_size} in each; use more text or a smaller block_size"
        )
    # The whole train split gives the kept ids; training reads its first train_tokens (the budget).
    train = first_blocks(corpus.split("train"), d.train_tokens)
    validation = first_blocks(corpus.split("validation"), d.eval_tokens)
    test = first_blocks(corpus.split("test"), d.eval_tokens)
    # V is the model's: a tokenizer may name fewer ids than the embedding has rows.
    vocab_size = teacher.get_output_embeddings().out_features
    kept = corpus.vocabulary("train") if config.student.vocabulary == "corpus" else None
    if kept is not None and len(kept) >= vocab_size:
        kept = None  # every id occurs: nothing to prune
    student = build_student(teacher, config.student.args or {}, kept)
    if config.student.weights:
        load_weights(student, config.student.weights, "student")
    log(
        f"data: {d.path}: {corpus.tokens('train'):,} train tokens ({len(train) * d.block_size:,} trained on), "
        f"{len(validation) * d.block_size:,} validation and {len(test) * d.block_size:,} test tokens scored; "
        f"student: {parameter_count(student):,} parameters, "
        + (f"{len(kept):,} of {vocab_size:,} token ids kept" if kept else "the full vocabulary")
    )
    check_batch(config, teacher, student, train)
    prompts = prompt_file_ids(config, tokenizer)
    return Prepared(config, teacher, tokenizer, corpus, train, validation, test, kept, student, prompts)


def prompt_file_ids(config: Config, tokenizer: Any) -> list[Tensor] | None:
    """``distill.prompt_file``'s prompts as 1-D id tensors (the run's tokenizer, no special tokens),
    each checked to hold 1 to ``distill.prompt_tokens`` ids; None without a prompt file.

    Raises:
        ConfigError: the file is missing or empty, or a prompt is longer than ``distill.prompt_tokens``.
    """
    from kdistill.onpolicy import checked_prompts

    d = config.distill
    if d.prompt_file is None:
        return None
    texts = read_prompt_file(d.prompt_file)
    ids = [torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long) for text in texts]
    return checked_prompts(ids, d.prompt_tokens)


def make_distiller(config: Config, teacher: nn.Module, student: nn.Module, alpha: float | None = None) -> Distiller:
    """The phase's :class:`Distiller`: the distilled student's, or the ``baseline``'s (``alpha`` 0).

    ``distill.chunk_tokens`` applies to both, on-policy runs included (their on-policy batches call the
    distiller with ``ce_weight=0``, which the chunked loss supports).
    """
    d = config.distill
    return Distiller(
        teacher,
        student,
        alpha=d.alpha if alpha is None else alpha,
        beta=d.beta,
        temperature=d.temperature,
        temperature_squared=d.temperature_squared,
        response_loss=d.response_loss,
        teacher_dtype={"float32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[d.teacher_precision],
        causal_lm=True,
        chunk_tokens=d.chunk_tokens,
    )


def check_batch(config: Config, teacher: nn.Module, student: nn.Module, train: CorpusBlocks) -> None:
    """One training batch through the live distiller (no gradient): a loss or model that cannot run
    fails here, before anything is written. Leaves the models and the RNG as they were."""
    state = torch.get_rng_state()
    was_training = student.training
    inputs, labels = train.take(torch.arange(min(2, len(train))))
    try:
        with make_distiller(config, teacher, student) as distiller, torch.no_grad():
            distiller.eval()
            distiller(inputs, labels)
    except (RuntimeError, IndexError, TypeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"distillation cannot run on a sample batch: {first}") from None
    finally:
        torch.set_rng_state(state)
        teacher.requires_grad_(False)
        teacher.eval()
        student.train(was_training)


# -- the run ----------------------------------------------------------------------------------------


def run(config: Config, out: Path, *, resume: bool = False, force: bool = False, log: Log = print) -> dict[str, Any]:
    """The whole language-model job; returns the report (see the module docstring for what it writes).

    The run directory's life cycle is :func:`kdistill.pipeline.run`'s: one process per directory
    (its lock), earlier results refused unless ``resume`` or ``force``, everything checked before
    the config is written, results replaced by ``force`` deleted only once the new run has started.
    A finished run resumed returns its stored report and writes nothing."""
    from kdistill.pipeline import saved_config

    if config.data.dataset != CORPUS:
        raise ConfigError(f"lm_run: data.dataset must be corpus, got {config.data.dataset!r}")
    if world().distributed:  # every rank says so and stops: none waits for another
        raise ConfigError(
            f"language-model runs (data.dataset: corpus) train in one process, not {world().size}: run "
            "`kdistill train` without torchrun (or distil in your own script with the library's Trainer)"
        )
    out = Path(out)
    check_out_path(out)
    config = absolute_prompt_file(config)
    lock = RunLock(out)
    try:
        check_run_dir(out, resume, force)
        if resume:
            config = saved_config(config, out)
            if (out / "report.json").exists() and (out / "distill" / "done.json").exists():
                log("report: the run had finished; its report is unchanged")
                return json.loads((out / "report.json").read_text())
            check_prompt_file_unchanged(config, out)
        prepared = prepare(config, log)
        replaced = move_results_aside(out) if force and not resume else None
        try:
            if not resume:
                atomic_write(out / "config.yaml", lambda path: Path(path).write_text(dump_config(prepared.config)))
                write_student_file(out, prepared)
        except BaseException:
            if replaced is not None:
                replaced.restore()
            raise
        if replaced is not None:
            replaced.discard()  # the new run is underway
        return train_all(prepared, out, resume, log)
    finally:
        lock.release()


def absolute_prompt_file(config: Config) -> Config:
    """``config`` with ``distill.prompt_file`` made absolute (against the working directory), so that
    config.yaml names the file a --resume from another directory reads."""
    path = config.distill.prompt_file
    if path is None or Path(path).is_absolute():
        return config
    distill = dataclasses.replace(config.distill, prompt_file=str(Path(path).absolute()))
    return dataclasses.replace(config, distill=distill)


def prompt_file_digest(path: str | Path) -> str:
    """The SHA-256 (hex) of the prompt file's bytes.

    Raises:
        ConfigError: the file cannot be read.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"distill.prompt_file: cannot read {str(path)!r}: {error.strerror or 'OSError'}") from None
    return hashlib.sha256(data).hexdigest()


def check_prompt_file_unchanged(config: Config, out: Path) -> None:
    """Refuse to resume training when the prompt file's bytes differ from those the run started with
    (the digest in ``distill/student.json``); runs that recorded none are not checked.

    Raises:
        ConfigError: the file changed, or cannot be read.
    """
    path = config.distill.prompt_file
    student_file = out / "distill" / STUDENT_FILE
    if path is None or not student_file.is_file():
        return
    try:
        recorded = json.loads(student_file.read_text()).get("prompt_file_sha256")
    except (OSError, ValueError, AttributeError):
        return  # a damaged student file is reported where it is needed (load_run_model)
    if recorded is not None and prompt_file_digest(path) != recorded:
        raise ConfigError(
            f"--resume: the prompt file changed since the run started: on-policy batches would sample other "
            f"prompts ({path}); restore it or start a new run"
        )


def write_student_file(out: Path, prepared: Prepared) -> None:
    """``distill/student.json``: what :func:`load_run_model` needs to rebuild the student, and the
    prompt file's SHA-256 (``prompt_file_sha256``, null without one) that --resume checks."""
    config = prepared.config
    path = config.distill.prompt_file
    facts = {
        "teacher": to_dict(config.teacher),
        "shrink": dict(config.student.args or {}),
        "vocabulary": config.student.vocabulary,
        "kept": prepared.kept,
        "kept_digest": kept_digest(prepared.kept),
        "prompt_file_sha256": prompt_file_digest(path) if path is not None else None,
    }
    (out / "distill").mkdir(parents=True, exist_ok=True)
    text = json.dumps(facts) + "\n"
    atomic_write(out / "distill" / STUDENT_FILE, lambda path: Path(path).write_text(text))


def teacher_cache(prepared: Prepared, log: Log) -> TeacherCache | None:
    """The teacher's outputs on the training blocks, coarsened to the student's vocabulary, computed
    once and reused (``distill.teacher_cache``: ``auto``, a directory, or ``off`` for a live teacher)."""
    from kdistill.pipeline import cache_root

    config, d = prepared.config, prepared.config.distill
    if d.teacher_cache == "off":
        log("teacher cache: off (distill.teacher_cache); the teacher runs at every step")
        return None
    student, kept = prepared.student, prepared.kept
    coarsen = (lambda logits: student.coarsen(logits, d.temperature)) if kept is not None else None
    coarsen_id = f"{kept_digest(kept)}-t{d.temperature}" if kept is not None else None
    width = len(kept) + 1 if kept is not None else prepared.teacher.get_output_embeddings().out_features
    topk = (d.cache_topk, d.temperature) if d.cache_storage == "topk" else (None, None)
    if d.cache_storage != "topk":
        log(
            f"teacher cache: {d.cache_storage} storage keeps all {width:,} entries of every token's distribution "
            f"({width * BYTES[d.cache_storage]:,} bytes per token); cache_storage: topk keeps {d.cache_topk}"
        )
    expected = fingerprint(prepared.teacher, prepared.train, None, [], d.cache_storage, *topk, coarsen_id)
    if d.teacher_cache == "auto":
        key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
        directory = cache_root(config) / "teacher-outputs" / key
    else:
        directory = Path(d.teacher_cache)
    if (directory / "meta.json").exists():
        try:
            cache = TeacherCache.open(directory, expected)
            log(f"teacher cache: reusing {directory}")
            return cache
        except KDistillError as error:
            if d.teacher_cache != "auto":  # a directory the config names: refused, never overwritten
                raise
            log(f"teacher cache: {error}; rebuilding it")
    started = time.perf_counter()
    cache = TeacherCache.build(
        directory,
        prepared.teacher,
        prepared.train,
        storage=d.cache_storage,
        topk=topk[0],
        temperature=topk[1],
        batch_size=config.data.eval_batch_size,
        device=pick_device(config.train.device),
        expected=expected,
        coarsen=coarsen,
        coarsen_id=coarsen_id,
    )
    log(
        f"teacher cache: built {directory} ({cache.bytes_per_token:,.0f} bytes per token, "
        f"{time.perf_counter() - started:.1f} s)"
    )
    return cache


def train_phase(
    name: str,
    task: nn.Module,
    parameters: Any,
    student: nn.Module,
    prepared: Prepared,
    out: Path,
    resume: bool,
    log: Log,
) -> None:
    """Train one phase in ``out/name``; a finished one (``done.json``) is loaded, not repeated."""
    config = prepared.config
    directory = out / name
    done = directory / "done.json"
    if resume and done.exists():
        load_weights(student, directory / "student.safetensors", name)
        log(f"{name}: already finished, loaded its weights")
        return
    trainer = Trainer(
        task,
        parameters,
        prepared.train,
        config.train,
        batch_size=config.data.batch_size,
        workers=config.data.workers,
        eval_batch_size=config.data.eval_batch_size,
        eval_model=student,
        select_on=None,  # no per-epoch evaluation: perplexity is measured once, for the report
        run_dir=directory,
        log=log,
        description=name,
        weights_name="student",
    )
    result = trainer.fit(resume=resume and (directory / "checkpoint.pt").exists())
    if result.interrupted:
        raise KeyboardInterrupt
    faults.reached("finish")
    text = json.dumps(dataclasses.asdict(result), indent=2) + "\n"
    atomic_write(done, lambda path: Path(path).write_text(text))
    student.to("cpu")


def train_all(prepared: Prepared, out: Path, resume: bool, log: Log) -> dict[str, Any]:
    """Baseline (cross-entropy alone, when ``baseline``), distilled student, report."""
    config, teacher, student = prepared.config, prepared.teacher, prepared.student
    models: dict[str, nn.Module] = {"teacher": teacher}
    initial = copy.deepcopy(student.state_dict())  # baseline and distilled student start alike
    cache = teacher_cache(prepared, log)

    def task(distiller: Distiller) -> nn.Module:
        return CachedDistillation(distiller, cache) if cache is not None else distiller

    if config.baseline:
        baseline = copy.deepcopy(student)
        # α = 0: the loss is the student's cross-entropy alone, computed exactly as the distilled
        # student's; the (weightless) response term reads the cache rather than running the teacher.
        with make_distiller(config, teacher, baseline, alpha=0.0) as distiller:
            parameters = distiller.trainable_parameters()
            train_phase("baseline", task(distiller), parameters, baseline, prepared, out, resume, log)
        models["baseline"] = baseline
    student.load_state_dict(initial)
    with make_distiller(config, teacher, student) as distiller:
        parameters = distiller.trainable_parameters()
        distill_task = on_policy(task(distiller), distiller, prepared, log)  # the baseline: never on-policy
        train_phase("distill", distill_task, parameters, student, prepared, out, resume, log)
    models["student"] = student
    faults.reached("report")
    log("report: measuring perplexity, agreement, size, single-thread speed and greedy latency …")
    report = measure(models, prepared, cache)
    write_report(out, report)
    return report


def on_policy(task: nn.Module, distiller: Distiller, prepared: Prepared, log: Log) -> nn.Module:
    """The distilled student's task: ``task`` itself, or, with ``distill.on_policy`` λ > 0, an
    :class:`~kdistill.onpolicy.OnPolicyDistillation` that sends a fraction λ of the batches on-policy
    (the student's own samples, scored by the live teacher) and the rest to ``task`` (the cached or
    live distiller). Only when λ > 0: the wrapper is bit-identical at λ = 0, but leaving it out keeps
    earlier runs' task, and checkpoints, exactly as they were."""
    from kdistill.onpolicy import OnPolicyDistillation

    config = prepared.config
    d = config.distill
    if d.on_policy == 0:
        return task
    return OnPolicyDistillation(
        distiller,
        fraction=d.on_policy,
        prompt_tokens=d.prompt_tokens,
        max_new_tokens=d.max_new_tokens,
        sampling_temperature=d.sampling_temperature,
        top_p=d.top_p,
        seed=config.train.seed,
        off_policy=task if task is not distiller else None,
        eos_token_id=prepared.corpus.eos_id,
        log=log,
        prompts=prepared.prompts,
    )


# -- the report -------------------------------------------------------------------------------------


def timed(
    models: Mapping[str, nn.Module], tokenizer: Any, data: CorpusBlocks, batch_size: int, rounds: int = TIMING_ROUNDS
) -> dict[str, Any]:
    """Throughput (tokens/s at ``batch_size`` blocks) and batch-1 greedy latency (ms/token), each the
    median of ``rounds`` rounds, one thread, the models interleaved round by round so that machine
    noise hits them alike."""
    from kdistill.lm_eval import greedy_generate, tokens_per_second

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    speed: dict[str, list[float]] = {name: [] for name in models}
    latency: dict[str, list[float]] = {name: [] for name in models}
    try:
        for _ in range(rounds):
            for name, model in models.items():
                speed[name].append(tokens_per_second(model, data, batch_size=batch_size, batches=TIMING_BATCHES))
                latency[name].append(greedy_generate(model, tokenizer, PROMPTS[0], LATENCY_TOKENS)[1])
    finally:
        torch.set_num_threads(threads)
    return {
        name: {"tokens_per_s": statistics.median(speed[name]), "latency_ms_per_token": statistics.median(latency[name])}
        for name in models
    }


def log_gap_closed(teacher: float, baseline: float, student: float) -> float | None:
    """Share of the teacher–baseline log-perplexity gap that distillation closed:
    ``(log b − log s) / (log b − log t)``; None when the baseline is already as good as the teacher."""
    gap = math.log(baseline) - math.log(teacher)
    return (math.log(baseline) - math.log(student)) / gap if gap > 0 else None


def on_policy_setting(config: Config, test: CorpusBlocks) -> dict[str, Any]:
    """How the report's on-policy measure samples (``report.json``'s ``on_policy_eval``).

    The prompts are the first ``distill.prompt_tokens`` tokens of the first :data:`ON_POLICY_PROMPTS`
    test blocks (at most ``data.block_size − 1`` tokens: ``prompt_tokens`` is checked against the block
    only with ``on_policy`` > 0, and the measure runs always); each model samples up to
    ``distill.max_new_tokens`` tokens at ``distill.sampling_temperature`` and ``distill.top_p``, as
    on-policy training samples, from generators seeded by ``train.seed``.
    """
    d = config.distill
    return {
        "prompts": min(ON_POLICY_PROMPTS, len(test)),
        "prompt_tokens": min(d.prompt_tokens, config.data.block_size - 1),
        "max_new_tokens": d.max_new_tokens,
        "temperature": d.sampling_temperature,
        "top_p": d.top_p,
        "seed": config.train.seed,
    }


def teacher_nll_of_own_samples(
    models: Mapping[str, nn.Module],
    teacher: nn.Module,
    test: CorpusBlocks,
    config: Config,
    eos_token_id: int | None,
) -> dict[str, float | None]:
    """Per model, :func:`kdistill.onpolicy.teacher_nll_of_samples`: the teacher's mean per-token NLL
    (nats) of the model's own sampled continuations of held-out prompts (see :func:`on_policy_setting`).

    What on-policy distillation lowers, measured for every run (not only ``on_policy`` > 0): a few
    batches of sampling, bounded by :data:`ON_POLICY_PROMPTS`. The teacher's own value (its entropy
    rate at temperature 1) is the reference, not a floor: a student that samples only the teacher's
    likeliest tokens scores below it. None when a prompt would be empty (a 1-token block).
    """
    from kdistill.onpolicy import teacher_nll_of_samples

    setting = on_policy_setting(config, test)
    if setting["prompt_tokens"] < 1:
        return {name: None for name in models}
    prompts = CorpusBlocks(test.blocks[: setting["prompts"]], test.name)
    values: dict[str, float | None] = {}
    for name, model in models.items():
        value = teacher_nll_of_samples(
            model,
            teacher,
            prompts,
            prompt_tokens=setting["prompt_tokens"],
            max_new_tokens=setting["max_new_tokens"],
            seed=setting["seed"],
            temperature=setting["temperature"],
            top_p=setting["top_p"],
            batch_size=config.data.eval_batch_size,
            eos_token_id=eos_token_id,
        )
        values[name] = value if math.isfinite(value) else None  # nan (nothing generated) is not JSON
    return values


def sampled_continuations(
    models: Mapping[str, nn.Module], tokenizer: Any, test: CorpusBlocks, config: Config, eos_token_id: int | None
) -> list[dict[str, Any]]:
    """Each model's sampled continuation of :data:`SAMPLED_PROMPTS` held-out prompts, for the report.

    The prompts are those of :func:`on_policy_setting` (the first ``prompt_tokens`` tokens of the first
    test blocks); every model samples with the run's settings (``max_new_tokens``, sampling temperature,
    top-p, EOS) from a generator seeded by ``train.seed`` and the prompts' indices, the same seed for
    every model, so the models differ only in what they write. Returns ``[{"prompt": text,
    "continuations": {model: text}}]``, decoded without special tokens; ``[]`` when a prompt would be
    empty (a 1-token block).
    """
    from kdistill.lm_eval import device_of
    from kdistill.onpolicy import batch_seed, sample_continuations

    setting = on_policy_setting(config, test)
    length, count = setting["prompt_tokens"], min(SAMPLED_PROMPTS, len(test))
    if length < 1 or count == 0:
        return []
    indices = torch.arange(count)
    prompts = test.take(indices)[0]["input_ids"][:, :length]  # (count, P)
    texts: dict[str, list[str]] = {}
    for name, model in models.items():
        device = device_of(model)
        generator = torch.Generator(device=device).manual_seed(batch_seed(setting["seed"], 0, indices, "report"))
        ids, mask = sample_continuations(
            model,
            prompts.to(device),
            max_new_tokens=setting["max_new_tokens"],
            temperature=setting["temperature"],
            top_p=setting["top_p"],
            generator=generator,
            eos_token_id=eos_token_id,
        )
        ids, mask = ids[:, length:].cpu(), mask[:, length:].cpu()
        texts[name] = [
            tokenizer.decode(row[keep.bool()].tolist(), skip_special_tokens=True) for row, keep in zip(ids, mask)
        ]
    return [
        {
            "prompt": tokenizer.decode(prompts[row].tolist(), skip_special_tokens=True),
            "continuations": {name: texts[name][row] for name in models},
        }
        for row in range(count)
    ]


def measure(models: Mapping[str, nn.Module], prepared: Prepared, cache: TeacherCache | None) -> dict[str, Any]:
    """``report.json``'s content (spec §6): per model test and validation perplexity, agreement with
    the teacher (not for the teacher), params, size, speed, and the teacher's NLL of the model's own
    samples (:func:`teacher_nll_of_own_samples`); ratios; corpus and cache facts; greedy
    continuations of :data:`PROMPTS`."""
    from kdistill.lm_eval import agreement, greedy_generate, perplexity

    config, teacher = prepared.config, models["teacher"]
    batch = config.data.eval_batch_size
    speed = timed(models, prepared.tokenizer, prepared.test, batch)
    sampled_nll = teacher_nll_of_own_samples(models, teacher, prepared.test, config, prepared.corpus.eos_id)
    report: dict[str, Any] = {"kind": "language-model"}
    for name, model in models.items():
        row = {
            "perplexity": perplexity(model, prepared.test, batch_size=batch),
            "validation_perplexity": (
                perplexity(model, prepared.validation, batch_size=batch) if len(prepared.validation) else None
            ),
            "params": parameter_count(model),
            "size_mb": size_mb(model),
            **speed[name],
            "teacher_nll_of_samples": sampled_nll[name],
        }
        if name != "teacher":
            row["agreement"] = agreement(model, teacher, prepared.test, batch_size=batch)
        report[name] = row
    t, s = report["teacher"], report["student"]
    report["ratios"] = {
        "params": t["params"] / s["params"],
        "size": t["size_mb"] / s["size_mb"],
        "speed": s["tokens_per_s"] / t["tokens_per_s"],
        "latency": t["latency_ms_per_token"] / s["latency_ms_per_token"],
    }
    if "baseline" in report:
        report["ratios"]["gap_closed"] = log_gap_closed(
            t["perplexity"], report["baseline"]["perplexity"], s["perplexity"]
        )
    report["on_policy_eval"] = on_policy_setting(config, prepared.test)
    kept = prepared.kept
    vocab_size = teacher.get_output_embeddings().out_features
    test_ids = prepared.test.take(torch.arange(len(prepared.test)))[1]
    report["corpus"] = {
        "path": config.data.path,
        "block_size": config.data.block_size,
        "train_split_tokens": prepared.corpus.tokens("train"),
        "train_tokens": len(prepared.train) * config.data.block_size,
        "validation_tokens_scored": len(prepared.validation) * config.data.block_size,
        "test_tokens_scored": len(prepared.test) * config.data.block_size,
        "vocabulary": vocab_size,
        "kept_ids": len(kept) if kept is not None else vocab_size,
        "test_tokens_outside_kept": (
            float(1 - torch.isin(test_ids, torch.tensor(kept)).float().mean()) if kept is not None else 0.0
        ),
    }
    if cache is not None:
        report["cache"] = {
            "storage": config.distill.cache_storage,
            "bytes_per_token": cache.bytes_per_token,
            "truncation_kl_mean": cache.truncation_kl_mean,
            "truncation_kl_max": cache.truncation_kl_max,
            "rest_mass_mean": cache.rest_mass_mean,
            "rest_mass_max": cache.rest_mass_max,
        }
    report["continuations"] = {
        prompt: {
            name: greedy_generate(model, prepared.tokenizer, prompt, CONTINUATION_TOKENS)[0]
            for name, model in models.items()
        }
        for prompt in PROMPTS
    }
    report["sampled_continuations"] = sampled_continuations(
        models, prepared.tokenizer, prepared.test, config, prepared.corpus.eos_id
    )
    return report


def _number(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(report: Mapping[str, Any], title: str = "kdistill language-model report") -> str:
    """``report.md``: the §6 table, the ratios, and the greedy continuations side by side."""
    names = [name for name in ("teacher", "baseline", "student") if name in report]
    lines = [
        f"# {title}",
        "",
        "| model | test perplexity | validation perplexity | top-1 agreement with teacher | params | size (MB) "
        "| tokens/s (1 thread) | greedy ms/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        row = report[name]
        agree = "—" if "agreement" not in row else f"{100 * row['agreement']:.1f} %"
        lines.append(
            f"| {name} | {row['perplexity']:.2f} | {_number(row['validation_perplexity'], '.2f')} | {agree} "
            f"| {row['params']:,} | {row['size_mb']:.4g} | {row['tokens_per_s']:,.0f} "
            f"| {row['latency_ms_per_token']:.1f} |"
        )
    ratios = report["ratios"]
    closed = ratios.get("gap_closed")
    lines += [
        "",
        f"Teacher/student: {ratios['params']:.2f}× the parameters, {ratios['size']:.2f}× the size; the student is "
        f"{ratios['speed']:.2f}× the teacher's throughput and {ratios['latency']:.2f}× faster per generated token.",
    ]
    if "gap_closed" in ratios:
        lines.append(
            "Distillation closed "
            + ("— (the baseline is as good as the teacher)" if closed is None else f"{100 * closed:.0f} %")
            + " of the teacher–baseline log-perplexity gap."
        )
    if "on_policy_eval" in report:  # reports written before the measure existed have none
        setting = report["on_policy_eval"]
        values = ", ".join(f"{name} {_number(report[name]['teacher_nll_of_samples'], '.3f')}" for name in names)
        lines.append(
            f"Teacher's NLL of each model's own samples ({setting['prompts']} test prompts of "
            f"{setting['prompt_tokens']} tokens, up to {setting['max_new_tokens']} sampled at temperature "
            f"{setting['temperature']:g}, top-p {setting['top_p']:g}; lower: closer to what the teacher would write; "
            f"the teacher's is its NLL of its own samples): {values} nats/token."
        )
    corpus = report["corpus"]
    lines += [
        "",
        f"Corpus: {corpus['train_tokens']:,} training tokens (of {corpus['train_split_tokens']:,} in the train split); "
        f"{corpus['kept_ids']:,} of {corpus['vocabulary']:,} ids kept; "
        f"{100 * corpus['test_tokens_outside_kept']:.2f} % of test tokens fall outside them.",
    ]
    if "cache" in report and report["cache"]["truncation_kl_mean"] is not None:
        cache = report["cache"]
        lines.append(
            f"Teacher cache: {cache['bytes_per_token']:,.0f} bytes/token; the teacher's mass outside the top k "
            f"(what bounds the loss's truncation error) mean {_number(cache.get('rest_mass_mean'), '.3f')}, max "
            f"{_number(cache.get('rest_mass_max'), '.3f')}; KL from the teacher to its uniform-rest "
            f"reconstruction mean {cache['truncation_kl_mean']:.2e}, max {cache['truncation_kl_max']:.2e} nats."
        )
    lines += [
        "",
        "Greedy continuations:",
        "",
        "| prompt | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for prompt, outputs in report["continuations"].items():
        cells = [text.replace("|", "\\|").replace("\n", " ") for text in (outputs[name] for name in names)]
        lines.append(f"| {prompt} | " + " | ".join(cells) + " |")
    if report.get("sampled_continuations"):  # reports written before the field existed have none
        setting = report.get("on_policy_eval", {})
        lines += [
            "",
            f"Sampled continuations of test prompts (up to {setting.get('max_new_tokens', '?')} tokens at "
            f"temperature {setting.get('temperature', 1.0):g}, top-p {setting.get('top_p', 1.0):g}, "
            "the same seed for every model):",
            "",
            "| prompt | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for entry in report["sampled_continuations"]:
            cells = [_cell(entry["prompt"])] + [_cell(entry["continuations"][name]) for name in names]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """``text`` as one Markdown table cell: pipes escaped, line breaks as spaces."""
    return text.replace("|", "\\|").replace("\n", " ")


def write_report(out: Path, report: dict[str, Any]) -> None:
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(out / "report.json", lambda path: Path(path).write_text(text))
    table = markdown(report)
    atomic_write(out / "report.md", lambda path: Path(path).write_text(table))


# -- generation from a finished run ------------------------------------------------------------------


MODELS = ("student", "baseline", "teacher")


def load_run_model(run_dir: str | Path, which: str = "student") -> tuple[nn.Module, Any]:
    """The ``student``, ``baseline`` or ``teacher`` of a language-model run, and the tokenizer.

    Raises:
        KDistillError: not a run directory, not a language-model run, or that model's phase unfinished.
    """
    run_dir = Path(run_dir)
    if which not in MODELS:
        raise ConfigError(f"--model must be one of {', '.join(MODELS)}, got {which!r}")
    if not (run_dir / "config.yaml").is_file():
        raise KDistillError(f"{run_dir} is not a kdistill run directory (no config.yaml)")
    config = from_dict(read_yaml(run_dir / "config.yaml"))
    if config.data.dataset != CORPUS:
        raise KDistillError(f"{run_dir} is not a language-model run (data.dataset is {config.data.dataset!r})")
    teacher, tokenizer = load_teacher(config)
    if which == "teacher":
        return teacher, tokenizer
    phase = "distill" if which == "student" else "baseline"
    if not (run_dir / phase / "done.json").exists():
        raise KDistillError(
            f"{run_dir}: the {which} is not trained yet ({phase}/done.json is missing); finish the run with "
            f"`kdistill train ... --out {run_dir} --resume`"
        )
    try:
        facts = json.loads((run_dir / "distill" / STUDENT_FILE).read_text())
        kept = facts["kept"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{run_dir / 'distill' / STUDENT_FILE} is missing or damaged ({error})") from None
    if kept_digest(kept) != facts.get("kept_digest"):
        raise CheckpointError(
            f"{run_dir / 'distill' / STUDENT_FILE} is damaged (its kept ids do not match their digest)"
        )
    student = build_student(teacher, facts["shrink"], kept)
    load_weights(student, run_dir / phase / "student.safetensors", which)
    return student.eval(), tokenizer


def generate(run_dir: str | Path, prompt: str, *, max_new_tokens: int = 40, model: str = "student") -> str:
    """The greedy continuation of ``prompt`` by a run's ``model`` (batch 1, KV cache)."""
    from kdistill.lm_eval import greedy_generate

    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ConfigError(f"--max-new-tokens must be from 1 to {MAX_NEW_TOKENS:,}, got {max_new_tokens}")
    if not prompt.strip():
        raise ConfigError("--prompt must not be empty")
    loaded, tokenizer = load_run_model(run_dir, model)
    return greedy_generate(loaded, tokenizer, prompt, max_new_tokens)[0]


__all__ = ["generate", "load_run_model", "markdown", "measure", "prepare", "run"]
