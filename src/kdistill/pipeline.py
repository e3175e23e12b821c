"""The main job: teacher → baseline → distilled student → compression report.

A run directory holds::

    config.yaml             the resolved config (feature pairs spelled out)
    teacher/                training of the teacher, when it had no weights (metrics, checkpoint)
    baseline/               the student trained alone with the same budget
    distill/                the distilled student: checkpoint.pt, student.safetensors,
                            student_best.safetensors, adapters.safetensors, metrics.jsonl, tensorboard/
                            (under train.strategy fsdp also checkpoint-<token>.dcp/, the sharded
                            state that checkpoint.pt names)
    report.json, report.md, plots/
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill import distributed, faults, fsdp
from kdistill.cache import CachedDistillation, TeacherCache, check_space, fingerprint
from kdistill.checkpoint import atomic_write, save_weights
from kdistill.config import CORPUS, Config, PairConfig, differences, dump_config, from_dict, read_yaml, to_dict
from kdistill.core import losses
from kdistill.core.calls import call_model, default_logits
from kdistill.core.distiller import Distiller, FeaturePair
from kdistill.core.errors import CheckpointError, ConfigError, KDistillError
from kdistill.core.losses import cross_entropy
from kdistill.data import Inputs, ShiftViews, Splits, load_data, primary, splits_digest
from kdistill.layers import propose_pairs
from kdistill.models import build_model, check_model_name, load_weights
from kdistill.report import measure, write_report
from kdistill.rundir import RunLock, check_out_path, check_run_dir, move_results_aside
from kdistill.trainer import Trainer, TrainResult, amp_dtype, evaluate, pick_device

Log = Callable[[str], None]


class Supervised(nn.Module):
    """The plain cross-entropy task, in the trainer's loss-dict shape (teacher and baseline)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Inputs, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = default_logits(call_model(self.model, inputs))
        ce = cross_entropy(logits, labels) if labels is not None else logits.new_zeros((), dtype=torch.float32)
        return {"loss": ce, "ce": ce, "logits": logits}


class Mixup(nn.Module):
    """Train any loss-dict task on mixup views (Zhang et al. 2018).

    Each training batch is mixed with a shuffled copy of itself, ``λ·x_i + (1 − λ)·x_j`` with
    ``λ ~ Beta(strength, strength)`` per sample. The task sees the mixed inputs without labels
    (so a distiller computes its response and feature terms on them: the teacher labels the
    mixed view itself, as in "function matching", Beyer et al. 2022), and the cross-entropy is
    the same mix of the two labels' cross-entropies. Evaluation is unaffected.
    """

    def __init__(self, task: nn.Module, strength: float) -> None:
        super().__init__()
        self.task = task
        self.strength = strength
        self.batch_facts = getattr(task, "batch_facts", ())

    def forward(self, inputs: Tensor, labels: Tensor | None = None, **facts: Any) -> dict[str, Tensor]:
        if not self.training or labels is None:
            return self.task(inputs, labels, **facts)
        # Drawn from the global RNG, whose state the trainer checkpoints: resuming stays exact.
        beta = torch.distributions.Beta(torch.tensor(self.strength), torch.tensor(self.strength))
        weight = beta.sample((inputs.shape[0],)).to(inputs.device)
        partner = torch.randperm(inputs.shape[0]).to(inputs.device)
        view = weight.view((-1,) + (1,) * (inputs.dim() - 1))
        out = dict(self.task(view * inputs + (1 - view) * inputs[partner], None, **facts))
        log_p = torch.log_softmax(out["logits"].float(), -1)
        own, other = log_p.gather(1, labels[:, None])[:, 0], log_p.gather(1, labels[partner][:, None])[:, 0]
        ce = -(weight * own + (1 - weight) * other).mean()
        out["loss"] = out["loss"] + ce
        out["ce"] = ce
        return out


def with_mixup(task: nn.Module, strength: float) -> nn.Module:
    return Mixup(task, strength) if strength > 0 else task


def cache_root(config: Config) -> Path:
    """``cache_dir``, else ``$KDISTILL_CACHE``, else ``$XDG_CACHE_HOME/kdistill`` (``~/.cache/kdistill``)."""
    if config.cache_dir:
        return Path(config.cache_dir)
    root = os.environ.get("KDISTILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kdistill"
    )
    return Path(root)


def cached_teacher_path(config: Config, splits: Splits | None = None) -> Path:
    """Where a teacher that kdistill trained for this config and data is kept for later runs
    (``splits``: the config's data, loaded again when not given)."""
    return cache_root(config) / "teachers" / f"{teacher_cache_key(config, splits)}.safetensors"


def build_pair(config: Config, splits: Splits) -> tuple[nn.Module, nn.Module]:
    """Teacher and student modules (student initialised with ``train.seed``), before any weights.

    A ``shrink`` student is cut from the untrained teacher here (the architecture);
    :func:`shrunk_student_weights` gives it the trained teacher's weights later."""
    shape = splits.input_shape
    torch.manual_seed(config.teacher.seed)
    teacher = build_model(config.teacher.model, config.teacher.args, input_shape=shape, num_classes=splits.num_classes)
    torch.manual_seed(config.train.seed)
    if config.student.model == "shrink":
        student = shrink(teacher, **config.student.args).student
    else:
        student = build_model(
            config.student.model, config.student.args, input_shape=shape, num_classes=splits.num_classes
        )
    if config.student.weights:
        load_weights(student, config.student.weights, "student")
    sample = sample_inputs(splits)
    for role, model in (("teacher", teacher), ("student", student)):
        check_classes(model, sample, splits.num_classes, role)
    return teacher, student


def sample_inputs(splits: Splits) -> Inputs:
    """Two training samples: what models are probed with (shapes, layers, adapters)."""
    return splits.train.take(torch.arange(2))[0]


def shrink(teacher: nn.Module, *, plan_only: bool = False, **args: Any) -> Any:
    """:func:`kdistill.integrations.hf.shrink` with the config's ``args`` (``every`` or ``layers``, ``path``);
    ``plan_only``: just :func:`kdistill.integrations.hf.shrink_plan`, copying nothing."""
    from kdistill.integrations import hf

    unknown = sorted(set(args) - {"every", "layers", "path"})
    if unknown:
        raise ConfigError(f"student.args: shrink takes every, layers or path, not {unknown[0]!r}")
    return hf.shrink_plan(teacher, **args) if plan_only else hf.shrink(teacher, **args)


def shrunk_student_weights(config: Config, teacher: nn.Module, student: nn.Module) -> None:
    """A ``shrink`` student without its own ``weights`` starts from the trained teacher's blocks."""
    if config.student.model == "shrink" and not config.student.weights:
        student.load_state_dict(shrink(teacher, **config.student.args).student.state_dict())


def check_classes(model: nn.Module, sample: Inputs, num_classes: int, role: str) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = default_logits(call_model(model, sample))
    except (RuntimeError, IndexError) as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(
            f"the {role} cannot run on inputs of shape {tuple(primary(sample).shape[1:])}: {first}"
        ) from None
    finally:
        model.train(was_training)
    if logits.shape[-1] < num_classes:
        raise ConfigError(
            f"the data's labels go up to {num_classes - 1} but the {role} predicts only {logits.shape[-1]} classes"
        )


def resolve_pairs(config: Config, teacher: nn.Module, student: nn.Module, sample: Inputs, log: Log) -> Config:
    """Replace ``feature_pairs: auto`` by the pairs that :func:`propose_pairs` chooses."""
    if config.distill.feature_pairs != "auto":
        return config
    pairs = proposed_pairs(teacher, student, config.student.model, config.student.args, sample)
    log("feature_pairs: auto → " + (", ".join(p.name for p in pairs) or "none found (response only)"))
    resolved = [PairConfig(p.student, p.teacher) for p in pairs]
    return dataclasses.replace(config, distill=dataclasses.replace(config.distill, feature_pairs=resolved))


def proposed_pairs(
    teacher: nn.Module, student: nn.Module, student_model: str, student_args: dict[str, Any], sample: Inputs
) -> list[FeaturePair]:
    """``feature_pairs: auto``: for a ``shrink`` student each kept block ↔ the teacher block it was
    copied from, else :func:`kdistill.layers.propose_pairs`."""
    if student_model == "shrink":
        from kdistill.integrations.hf import copied_block_pairs

        return [FeaturePair(**pair) for pair in copied_block_pairs(*shrink(teacher, plan_only=True, **student_args))]
    return propose_pairs(teacher, student, sample)


def teacher_cache_key(config: Config, splits: Splits | None = None) -> str:
    """Identifies a trained teacher: its model and seed, the data settings *and contents* (files
    edited at the same path give another teacher), and the training settings. It covers the
    teacher's architecture by name and arguments, not the code behind them: after editing a
    model's code, delete the cache (``~/.cache/kdistill/teachers``). Under several processes every
    rank calls it, and rank 0's data digest is the key's."""
    if splits is None:
        splits = load_data(config.data)
    identity = {"teacher": to_dict(config.teacher), "data": to_dict(config.data), "train": to_dict(config.train)}
    # How the data is read, not what it is; and the language-model keys (a corpus run never
    # trains its teacher), left out so that adding them kept every earlier teacher's key.
    for how in ("eval_batch_size", "workers", "block_size", "train_tokens", "eval_tokens"):
        identity["data"].pop(how, None)
    # Computed by rank 0 for all: copies of a folder on several nodes are the same data with other file times.
    identity["data_digest"] = distributed.main_decides(distributed.world(), splits_digest, splits)
    for own in ("seed", "epochs", "mixup", "max_steps"):  # the teacher has its own (teacher.seed, .epochs, …)
        identity["train"].pop(own)
    identity["train"].pop("strategy")  # how the ranks share the work, not what is trained
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def prepare_teacher(config: Config, teacher: nn.Module, splits: Splits, out: Path, resume: bool, log: Log) -> nn.Module:
    """Load the teacher's weights, or train it on the run's data (and cache it for later runs)."""
    if config.teacher.weights:  # loaded (and checked) by prepare()
        return teacher
    cached = cached_teacher_path(config, splits)

    def reuse() -> bool:
        if not cached.exists():
            return False
        try:
            load_weights(teacher, cached, "teacher")
            log(f"teacher: reusing the one trained before ({cached})")
            return True
        except CheckpointError as error:  # damaged: kdistill's own cache, so train it again
            log(f"teacher: {error}; training it again")
            return False

    # Rank 0 decides (each node may have a cache directory of its own); train_all then gives every
    # rank rank 0's teacher.
    place = distributed.world()
    if distributed.main_decides(place, reuse):
        return teacher
    # The teacher's own budget: teacher.epochs (train.max_steps is the students' budget).
    budget = dataclasses.replace(config.train, epochs=config.teacher.epochs, seed=config.teacher.seed, max_steps=None)
    log(f"teacher: no weights given; training it for {budget.epochs} epochs (cached in {cached.parent})")
    model = shard_copy(config, trained_copy(config, teacher), root=False)
    task = with_mixup(Supervised(model), config.teacher.mixup)
    trained = run_phase(
        "teacher", task, task.parameters(), model, splits, budget, config, out, resume, log, plain=teacher
    )
    if distributed.world().is_main and (trained is not None or not cached.exists()):
        save_weights(teacher.state_dict(), cached)
    return teacher


def make_augment(config: Config, splits: Splits) -> ShiftViews | None:
    if config.data.augment == "shift":
        return ShiftViews(len(splits.train), views=config.data.augment_views, input_shape=splits.input_shape)
    return None


def prepare_cache(
    config: Config, teacher: nn.Module, distiller: Distiller, splits: Splits, out: Path, log: Log
) -> TeacherCache | None:
    """The teacher-output cache for the distillation phase, or None to run the teacher live."""
    setting = config.distill.teacher_cache
    why_not = why_no_cache(config)
    if why_not:
        if setting not in ("auto", "off"):
            raise ConfigError(f"distill.teacher_cache: cannot cache the teacher here: {why_not}")
        if setting == "auto":
            log(f"teacher cache: off ({why_not})")
        return None
    augment = make_augment(config, splits)
    layers = distiller.teacher_layers
    d = config.distill
    topk = (d.cache_topk, d.temperature) if d.cache_storage == "topk" else (None, None)
    # Rank 0's, like the cache it decides on (each node's copy of a folder has its own file times).
    expected = distributed.main_decides(
        distributed.world(), fingerprint, teacher, splits.train, augment, layers, d.cache_storage, *topk
    )
    if setting == "auto":
        key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
        directory = cache_root(config) / "teacher-outputs" / key
    else:
        directory = Path(setting)
    build_cache(directory, expected, teacher, splits, augment, layers, d, config.train.device, log, setting == "auto")
    return TeacherCache.open(directory, expected)  # every rank reads the whole of it


def why_no_cache(config: Config) -> str | None:
    """Why the distillation phase runs its teacher live (None: it reads a teacher-output cache)."""
    if config.distill.teacher_cache == "off":
        return "distill.teacher_cache is off"
    if config.train.strategy == "fsdp":
        return "train.strategy fsdp runs the sharded teacher live"
    if config.train.mixup > 0:
        return "train.mixup shows the teacher new mixed views every step"
    if config.data.augment != "none" and config.data.augment_views is None:
        return "data.augment gives a fresh view every epoch; set data.augment_views to cache a fixed number"
    return None


def check_cache_space(config: Config, teacher: nn.Module, splits: Splits) -> None:
    """Refuse a teacher-output cache that would not fit the free disk, before anything trains."""
    if why_no_cache(config):
        return
    d = config.distill
    setting = d.teacher_cache
    if setting == "auto":
        root = cache_root(config) / "teacher-outputs"
        if any(root.glob("*/meta.json")):  # one may be this run's: the build checks the space before writing
            return
        directory = root / "new"
    else:
        directory = Path(setting)
        if (directory / "meta.json").exists():  # reused, or refused as stale: nothing new to write
            return
    views = config.data.augment_views if config.data.augment != "none" else 1
    layers = list(dict.fromkeys(p.teacher for p in d.feature_pairs))
    check_space(
        directory, teacher, splits.train, layers=layers, views=views, storage=d.cache_storage, topk=d.cache_topk
    )


def build_cache(
    directory: Path,
    expected: dict[str, Any],
    teacher: nn.Module,
    splits: Splits,
    augment: ShiftViews | None,
    layers: list[str],
    d: Any,
    device: str,
    log: Log,
    rebuild_damaged: bool = False,
) -> None:
    """Build the cache in ``directory`` unless a valid one is there. A stale or damaged cache in a
    directory the config names is refused; one of kdistill's own (``teacher_cache: auto``) is rebuilt.
    Under several processes rank 0 decides (every rank follows it), and all ranks build it together."""

    def reusable() -> bool:
        if not (directory / "meta.json").exists():
            return False
        try:
            TeacherCache.open(directory, expected)
            log(f"teacher cache: reusing {directory}")
            return True
        except KDistillError as error:
            if not rebuild_damaged:
                raise
            log(f"teacher cache: {error}; rebuilding it")
            return False

    place = distributed.world()
    if distributed.main_decides(place, reusable):
        return
    started = time.perf_counter()
    topk = (d.cache_topk, d.temperature) if d.cache_storage == "topk" else (None, None)
    cache = TeacherCache.build(
        directory,
        teacher,
        splits.train,
        layers=layers,
        augment=augment,
        storage=d.cache_storage,
        topk=topk[0],
        temperature=topk[1],
        device=pick_device(device),
        expected=expected,
        place=place,
    )
    log(
        f"teacher cache: built {directory} ({cache.views} view(s), {cache.bytes_per_sample:,.0f} bytes per sample, "
        f"{time.perf_counter() - started:.1f} s{f', by {place.size} ranks' if place.distributed else ''})"
    )


def trained_copy(config: Config, model: nn.Module) -> nn.Module:
    """What a phase runs in place of ``model``: under ``train.strategy: fsdp`` across several
    processes a copy, sharded by :func:`shard_copy` and the trainer, so that ``model`` stays a plain
    module for the phases after it and for the report; otherwise ``model`` itself."""
    return copy.deepcopy(model) if fsdp.active(config.train.strategy) else model


def shard_copy(config: Config, model: nn.Module, *, root: bool) -> nn.Module:
    """Shard a :func:`trained_copy` (:func:`kdistill.fsdp.shard`): the blocks of a model the trainer
    trains (it shards the task's root), blocks and ``root`` of the frozen teacher."""
    if fsdp.active(config.train.strategy):
        device = pick_device(config.train.device)
        fsdp.shard(model, device, amp_dtype(config.train.amp, device), root=root)
    return model


def run_phase(
    name: str,
    model: nn.Module,
    parameters: Any,
    eval_model: nn.Module,
    splits: Splits,
    budget: Any,
    config: Config,
    out: Path,
    resume: bool,
    log: Log,
    also_save: dict[str, nn.Module] | None = None,
    plain: nn.Module | None = None,
) -> TrainResult | None:
    """Train one phase in ``out/name``; a finished phase (``done.json``) is loaded, not repeated.
    ``also_save``: more modules whose weights the phase writes, as ``<key>.safetensors`` (before
    ``done.json``). ``plain``: when ``eval_model`` is a :func:`trained_copy`, the model that gets the
    phase's final weights (from its weights file)."""
    directory = out / name
    weights_name = "teacher" if name == "teacher" else "student"
    weights = directory / f"{weights_name}.safetensors"
    done = directory / "done.json"
    plain = eval_model if plain is None else plain
    if resume and done.exists():
        load_weights(plain, weights, name)
        log(f"{name}: already finished, loaded its weights")
        return None
    eval_sets = {"validation": splits.validation, "test": splits.test} if splits.validation else {"test": splits.test}
    augment = make_augment(config, splits)
    trainer = Trainer(
        model,
        parameters,
        splits.train,
        budget,
        batch_size=config.data.batch_size,
        workers=config.data.workers,
        eval_batch_size=config.data.eval_batch_size,
        eval_model=eval_model,
        eval_sets=eval_sets,
        augment=augment,
        run_dir=directory,
        log=log,
        description=name,
        weights_name=weights_name,
    )
    result = trainer.fit(resume=resume and (directory / "checkpoint.pt").exists())
    if result.interrupted:
        raise KeyboardInterrupt
    extra = {key: fsdp.full_state_dict(module) for key, module in (also_save or {}).items()}  # every rank
    if distributed.world().is_main:
        for key, state in extra.items():
            save_weights(state, directory / f"{key}.safetensors")
        faults.reached("finish")
        text = json.dumps(dataclasses.asdict(result), indent=2) + "\n"
        atomic_write(done, lambda path: Path(path).write_text(text))
    if plain is eval_model:
        model.to("cpu")
    else:  # the sharded copy is dropped; the plain model takes its weights (written at the last epoch)
        distributed.barrier(distributed.world())
        load_weights(plain, weights, name)
    return result


def run(config: Config, out: Path, *, resume: bool = False, force: bool = False, log: Log = print) -> dict[str, Any]:
    """The whole job; returns the report. See the module docstring for what it writes.

    Everything that can be checked is checked before anything is written or trained: the config,
    the data, both models, the layers and pair shapes, the losses. Rank 0 then holds the run
    directory's lock for the whole run; with ``force``, earlier results are moved aside and
    deleted only once the new run has written its config (they come back if it fails before).
    A language-model run (``data.dataset: corpus``) is :func:`kdistill.lm_run.run`."""
    if config.data.dataset == CORPUS:
        from kdistill import lm_run

        return lm_run.run(config, out, resume=resume, force=force, log=log)
    place = distributed.world()
    check_out_path(out)
    lock = distributed.on_main(place, RunLock, out)  # one process per run directory
    try:
        distributed.on_main(place, check_run_dir, out, resume, force)
        if resume:
            config = saved_config(config, out)
        prepared = prepare(config, log)
        replaced = distributed.on_main(place, move_results_aside, out) if force and not resume else None
        try:
            if not resume and place.is_main:
                atomic_write(out / "config.yaml", lambda path: Path(path).write_text(dump_config(prepared.config)))
        except BaseException:
            if replaced is not None:
                replaced.restore()
            raise
        if replaced is not None:
            replaced.discard()  # the new run is underway
        return train_all(prepared, out, resume, log)
    finally:
        if lock is not None:
            lock.release()


@dataclasses.dataclass
class Prepared:
    """A run's checked ingredients: the resolved config, the data, and the two models."""

    config: Config
    splits: Splits
    teacher: nn.Module
    student: nn.Module
    sample: Inputs


def saved_config(config: Config, out: Path) -> Config:
    """The config of the run in ``out``, after checking that ``config`` asks for the same run."""
    path = out / "config.yaml"
    if not path.exists():
        raise ConfigError(f"--resume: {out} holds no run to resume (no config.yaml); start it without --resume")
    saved = from_dict(read_yaml(path))
    changed = differences(dataclasses.replace(saved, out=config.out), resolve_like(saved, config))
    if changed:
        raise ConfigError(
            f"--resume: {', '.join(changed)} differ{'s' if len(changed) == 1 else ''} from the run in {path}; "
            "resume with the same config (or start a new run)"
        )
    return saved


def prepare(config: Config, log: Log) -> Prepared:
    """Load the data and build both models, then check every name, layer, shape and setting
    (:func:`check_distillation`) — before anything is written or trained."""
    for model_config in (config.teacher, config.student):  # fail before the (slower) data loading
        check_model_name(model_config.model)
    check_cache_settings(config)
    splits = load_data(config.data)
    log(
        f"data: {splits.name}: {len(splits.train)} train, {len(splits.validation or [])} validation, "
        f"{len(splits.test)} test samples of shape {splits.input_shape}, {splits.num_classes} classes"
    )
    pick_device(config.train.device)
    teacher, student = build_pair(config, splits)
    if config.teacher.weights:
        load_weights(teacher, config.teacher.weights, "teacher")
    sample = sample_inputs(splits)
    config = resolve_pairs(config, teacher, student, sample, log)
    check_distillation(config, teacher, student, sample)
    check_cache_space(config, teacher, splits)
    if config.data.augment == "shift":
        note = ShiftViews.note(sample)
        if note:
            log(note)
    return Prepared(config, splits, teacher, student, sample)


def check_cache_settings(config: Config) -> None:
    """Loss names and the settings that cannot go together: checked before the data is loaded."""
    d = config.distill
    losses.resolve(d.response_loss, losses.RESPONSE_LOSSES, "response")
    for pair in d.feature_pairs if isinstance(d.feature_pairs, list) else []:
        losses.resolve(pair.loss, losses.FEATURE_LOSSES, "feature")
    if d.teacher_cache != "off" and d.cache_storage == "topk" and d.response_loss != "kl":
        raise ConfigError(
            f"distill.cache_storage: topk keeps only the teacher's top-{d.cache_topk} logits, which supports the kl "
            f"response loss only, not {d.response_loss!r}; use cache_storage: float16 (or teacher_cache: off)"
        )


def make_distiller(config: Config, teacher: nn.Module, student: nn.Module, sample: Inputs) -> Distiller:
    """The run's :class:`Distiller`; its adapters are initialised from ``train.seed``, whatever the
    global RNG went through before (a teacher trained in this run or found cached)."""
    d = config.distill
    torch.manual_seed(config.train.seed)
    return Distiller(
        teacher,
        student,
        [FeaturePair(p.student, p.teacher, p.weight, p.loss) for p in d.feature_pairs],
        alpha=d.alpha,
        beta=d.beta,
        temperature=d.temperature,
        temperature_squared=d.temperature_squared,
        response_loss=d.response_loss,
        sample_input=sample,
        teacher_dtype={"float32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[d.teacher_precision],
        # These runs are not language models: "auto" is off; a number (which the config already refuses
        # here) would make the Distiller refuse it, naming causal language models.
        chunk_tokens=d.chunk_tokens if isinstance(d.chunk_tokens, int) else None,
    )


def check_distillation(config: Config, teacher: nn.Module, student: nn.Module, sample: Inputs) -> None:
    """Build the distiller once on a sample: unknown losses, layers missing from either model and
    pairs no adapter can map fail here, before any training. Leaves the models and RNG as they were."""
    state = torch.get_rng_state()
    trainable = [p.requires_grad for p in teacher.parameters()]
    was_training = teacher.training, student.training
    try:
        with make_distiller(config, teacher, student, sample) as distiller, torch.no_grad():
            distiller.eval()  # batch-norm statistics untouched
            distiller(sample)  # one forward of both models through every hook, adapter and loss
    except (RuntimeError, IndexError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"distillation cannot run on a sample batch: {first}") from None
    finally:
        torch.set_rng_state(state)
        for parameter, flag in zip(teacher.parameters(), trainable):  # the distiller froze the teacher
            parameter.requires_grad_(flag)
        teacher.train(was_training[0])
        student.train(was_training[1])


def train_all(prepared: Prepared, out: Path, resume: bool, log: Log) -> dict[str, Any]:
    """Teacher (when it has no weights), baseline, distilled student, report."""
    place = distributed.world()
    config, splits, teacher, student = prepared.config, prepared.splits, prepared.teacher, prepared.student
    teacher = prepare_teacher(config, teacher, splits, out, resume, log)
    teacher.requires_grad_(False)
    distributed.from_main(teacher, place)  # one teacher for all ranks: the one rank 0 saved
    shrunk_student_weights(config, teacher, student)
    log(f"teacher: {100 * evaluate(teacher, splits.test, config.data.eval_batch_size)['accuracy']:.2f} % test accuracy")

    models: dict[str, nn.Module] = {"teacher": teacher}
    initial = copy.deepcopy(student.state_dict())  # baseline and distilled student start from the same weights
    if config.baseline:
        baseline = copy.deepcopy(student)
        trained = shard_copy(config, trained_copy(config, baseline), root=False)
        task = with_mixup(Supervised(trained), config.train.mixup)  # the same budget as the distilled student
        run_phase(
            "baseline", task, task.parameters(), trained, splits, config.train, config, out, resume, log, plain=baseline
        )
        models["baseline"] = baseline

    student.load_state_dict(initial)
    trained = trained_copy(config, student)
    live_teacher = shard_copy(config, trained_copy(config, teacher), root=True)
    with make_distiller(config, live_teacher, trained, prepared.sample) as distiller:
        shard_copy(config, trained, root=False)  # after the distiller's sample pass (see kdistill.fsdp.shard)
        cache = prepare_cache(config, teacher, distiller, splits, out, log)
        task = CachedDistillation(distiller, cache) if cache is not None else distiller
        run_phase(
            "distill",
            with_mixup(task, config.train.mixup),
            distiller.trainable_parameters(),
            trained,
            splits,
            config.train,
            config,
            out,
            resume,
            log,
            # Written before the phase's done.json: a finished phase always has its trained adapters.
            also_save={"adapters": distiller.adapters} if len(distiller.adapters) else None,
            plain=student,
        )
    models["student"] = student

    faults.reached("report")
    if not place.is_main:  # rank 0 measures and writes the report
        return {}
    if resume and (out / "report.json").exists() and (out / "distill" / "done.json").exists():
        log("report: the run had finished; its report is unchanged")  # --resume of a finished run writes nothing
        return json.loads((out / "report.json").read_text())
    log("report: measuring accuracy, size and single-thread latency …")
    report = measure(models, splits.test, batch_size=config.data.eval_batch_size)
    histories = {name: out / name / "metrics.jsonl" for name in ("baseline", "distill")}
    write_report(out, report, histories, title=f"kdistill report: {splits.name}")
    return report


def resolve_like(saved: Config, given: Config) -> Config:
    """``given`` with ``auto`` pairs replaced by the pairs ``saved`` resolved them to."""
    if given.distill.feature_pairs == "auto":
        return dataclasses.replace(
            given, distill=dataclasses.replace(given.distill, feature_pairs=saved.distill.feature_pairs)
        )
    return given


def teacher_weights_path(config: Config, run_dir: Path, splits: Splits | None = None) -> Path:
    """Where a finished run's teacher weights are: the config's file, the run's own training, or the cache."""
    if config.teacher.weights:
        return Path(config.teacher.weights)
    trained = run_dir / "teacher" / "teacher.safetensors"
    return trained if trained.exists() else cached_teacher_path(config, splits)
