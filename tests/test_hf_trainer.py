"""kdistill inside a Hugging Face ``Trainer`` script (issue #19): ``DistillationTrainer`` gives kdistill's
own trainer's per-step losses, logs its terms, keeps the teacher out of the optimizer and checkpoints,
saves and resumes the adapters; LoRA students train only their LoRA weights and merge exactly.

Tiny random BERT and Llama models, CPU, nothing downloaded.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import SequentialSampler

transformers = pytest.importorskip("transformers")

from kdistill import Distiller, FeaturePair  # noqa: E402
from kdistill.callbacks import Callback  # noqa: E402
from kdistill.config import TrainConfig  # noqa: E402
from kdistill.core.errors import ConfigError  # noqa: E402
from kdistill.integrations import transformers as kd_hf  # noqa: E402
from kdistill.integrations.transformers import DistillationTrainer, lora_student, merge_lora  # noqa: E402
from kdistill.trainer import Trainer  # noqa: E402

VOCAB, TOKENS, CLASSES = 40, 8, 3


def bert(hidden: int, layers: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        num_labels=CLASSES,
        hidden_dropout_prob=0.0,  # no dropout: the two trainers draw random numbers differently
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config).double()


def llama(hidden: int, layers: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).double()


def examples(kind: str, count: int = 8, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Token examples with some right padding; classifier labels, or causal-LM labels (the ids, -100 on padding)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for index in range(count):
        ids = torch.randint(1, VOCAB, (TOKENS,), generator=generator)
        mask = torch.ones(TOKENS, dtype=torch.long)
        mask[TOKENS - index % 3 :] = 0  # 0, 1 or 2 padding tokens
        ids = ids.masked_fill(mask == 0, 0)
        labels = torch.tensor(index % CLASSES) if kind == "bert" else ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


MODELS = {
    # kind: (student, teacher, feature pair on the last blocks)
    "bert": (
        lambda: bert(16, 2, 0),
        lambda: bert(24, 3, 1),
        FeaturePair("bert.encoder.layer.1", "bert.encoder.layer.2"),
    ),
    "llama": (lambda: llama(16, 2, 0), lambda: llama(24, 3, 1), FeaturePair("model.layers.1", "model.layers.2")),
}
SETTINGS = {"alpha": 0.7, "beta": 2.0, "temperature": 2.0}


class InOrder(DistillationTrainer):
    """The same trainer, reading the dataset in order, so both trainers see identical batches."""

    def _get_train_sampler(self, train_dataset: Any = None) -> SequentialSampler:
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def arguments(output_dir: Path, **overrides: Any) -> Any:
    settings = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,  # no clipping, as kdistill's trainer by default
        "optim": "adamw_torch",
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "num_train_epochs": 1,
        "seed": 0,
        **overrides,
    }
    return transformers.TrainingArguments(**settings)


def hf_trainer(kind: str, tmp_path: Path, *, pairs: bool = True, cls: type = InOrder, **overrides: Any) -> Any:
    make_student, make_teacher, pair = MODELS[kind]
    return cls(
        model=make_student(),
        teacher=make_teacher(),
        feature_pairs=[pair] if pairs else [],
        args=arguments(tmp_path / "hf", **overrides),
        train_dataset=examples(kind),
        data_collator=transformers.default_data_collator,
        **SETTINGS,
    )


def logged_steps(trainer: Any) -> list[dict[str, float]]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


class StepLosses(Callback):
    """Each micro-batch's record from kdistill's trainer."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []

    def on_step_end(self, trainer: Trainer, state: dict[str, Any], record: dict[str, float]) -> None:
        self.records.append(dict(record))


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_same_per_step_loss_as_kdistills_own_trainer(tmp_path: Path, kind: str, accumulate: int) -> None:
    make_student, make_teacher, pair = MODELS[kind]
    data = examples(kind)
    batches = [transformers.default_data_collator(data[i : i + 2]) for i in range(0, len(data), 2)]
    distiller = Distiller(make_teacher(), make_student(), [pair], sample_input=batches[0], **SETTINGS)
    record = StepLosses()
    config = TrainConfig(
        epochs=1, lr=1e-2, weight_decay=0.0, schedule="constant", accumulate=accumulate, amp="off", device="cpu"
    )
    own = Trainer(distiller, distiller.trainable_parameters(), batches, config, select_on=None, callbacks=[record])

    hf = hf_trainer(kind, tmp_path, gradient_accumulation_steps=accumulate)
    # Same initial weights on both sides: the students and teachers are built from the same seeds;
    # the adapters are initialised from different RNG states, so copy them.
    hf.distiller.adapters.load_state_dict(distiller.adapters.state_dict())
    own.fit()
    hf.train()

    own_losses = torch.tensor([r["loss"] for r in record.records], dtype=torch.float64)
    own_per_update = own_losses.view(-1, accumulate).mean(dim=1)  # HF logs the group's mean per update
    hf_losses = torch.tensor([entry["loss"] for entry in logged_steps(hf)], dtype=torch.float64)
    assert len(hf_losses) == len(own_per_update) == 4 // accumulate
    # HF sums the logged loss in a float32 tensor: a few float32 roundings (2^-23 ≈ 1.2e-7 each).
    torch.testing.assert_close(hf_losses, own_per_update, rtol=2e-6, atol=0.0)
    # And the losses moved: the steps trained the student (not four evaluations of one model).
    assert not torch.allclose(own_losses[0], own_losses[-1])
    for name, value in hf.model.state_dict().items():  # float64 weights after identical updates
        torch.testing.assert_close(value, distiller.student.state_dict()[name], rtol=1e-9, atol=1e-12)
    for name, value in hf.distiller.adapters.state_dict().items():
        torch.testing.assert_close(value, distiller.adapters.state_dict()[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_logged_terms_add_up_to_the_logged_loss(tmp_path: Path, kind: str) -> None:
    trainer = hf_trainer(kind, tmp_path, logging_steps=2, gradient_accumulation_steps=1)
    trainer.train()
    steps = logged_steps(trainer)
    assert len(steps) == 2  # four updates, logged every two: each entry averages two steps
    pair = MODELS[kind][2].name
    for entry in steps:
        assert {"ce", "response", "feature", f"feature/{pair}"} <= set(entry)
        assert entry["feature"] == pytest.approx(entry[f"feature/{pair}"], rel=1e-12)  # one pair, weight 1
        expected = SETTINGS["beta"] * (SETTINGS["alpha"] * entry["response"] + entry["feature"]) + entry["ce"]
        # The logged loss went through HF's float32 accumulator; the terms are float64 means.
        assert entry["loss"] == pytest.approx(expected, rel=1e-6)
        assert entry["ce"] > 0 and entry["response"] > 0 and entry["feature"] > 0


def test_teacher_is_frozen_out_of_the_optimizer_and_the_checkpoint(tmp_path: Path) -> None:
    trainer = hf_trainer("bert", tmp_path, save_strategy="steps", save_steps=2)
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.train()
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in trainer.teacher.parameters()}
    assert {id(p) for p in trainer.adapter_parameters()} <= optimised  # the adapters do train
    assert {id(p) for p in trainer.model.parameters()} <= optimised
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    for name, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    checkpoint = tmp_path / "hf" / "checkpoint-4"
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert set(saved) <= set(trainer.model.state_dict())  # the student's keys, nothing else
    teacher_shapes = {tuple(v.shape) for k, v in trainer.teacher.state_dict().items() if "encoder" in k}
    assert not teacher_shapes & {tuple(v.shape) for v in saved.values()}  # no 24-wide teacher block
    adapters = load_file(str(checkpoint / "adapters.safetensors"))
    assert adapters.keys() == trainer.distiller.adapters.state_dict().keys()
    for name, value in trainer.distiller.adapters.state_dict().items():
        assert torch.equal(adapters[name], value), name
    assert not any("adapters" in key for key in saved)


def test_no_adapters_file_without_feature_pairs(tmp_path: Path) -> None:
    trainer = hf_trainer("bert", tmp_path, pairs=False, save_strategy="steps", save_steps=4)
    trainer.train()
    assert (tmp_path / "hf" / "checkpoint-4" / "model.safetensors").is_file()
    assert not (tmp_path / "hf" / "checkpoint-4" / "adapters.safetensors").exists()
    assert "response" in logged_steps(trainer)[0] and "feature/" not in json.dumps(logged_steps(trainer))
    # Evaluation reports the distillation loss and adds nothing to the next training log's terms.
    metrics = trainer.evaluate(eval_dataset=examples("bert", seed=3))
    assert metrics["eval_loss"] > 0 and trainer._term_count == 0


def test_bf16_flag_trains_with_finite_terms(tmp_path: Path) -> None:
    trainer = hf_trainer("llama", tmp_path, bf16=True)
    for model in (trainer.model, trainer.teacher, trainer.distiller.adapters):
        model.float()  # bf16 autocast works from float32 weights
    trainer.train()
    steps = logged_steps(trainer)
    assert len(steps) == 4
    for entry in steps:
        expected = SETTINGS["beta"] * (SETTINGS["alpha"] * entry["response"] + entry["feature"]) + entry["ce"]
        assert torch.isfinite(torch.tensor(entry["loss"])) and entry["loss"] == pytest.approx(expected, rel=1e-5)


def test_resume_from_checkpoint_repeats_the_uninterrupted_run(tmp_path: Path) -> None:
    whole = hf_trainer("llama", tmp_path / "whole", max_steps=4, save_strategy="steps", save_steps=2)
    whole.train()
    first = hf_trainer("llama", tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    # A fresh trainer (fresh student and adapters) resumes from the step-2 checkpoint.
    resumed = hf_trainer("llama", tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "resumed" / "hf" / "checkpoint-2"
    assert (checkpoint / "adapters.safetensors").is_file()
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # The resumed history holds the checkpoint's first two steps, then its own two.
    assert [e["loss"] for e in logged_steps(resumed)] == pytest.approx([e["loss"] for e in logged_steps(whole)])
    assert [e["step"] for e in logged_steps(resumed)] == [1, 2, 3, 4]
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-9, atol=1e-12)
    for name, value in whole.distiller.adapters.state_dict().items():
        torch.testing.assert_close(resumed.distiller.adapters.state_dict()[name], value, rtol=1e-9, atol=1e-12)


def test_resume_refuses_adapters_of_other_pairs(tmp_path: Path) -> None:
    trainer = hf_trainer("bert", tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    other = InOrder(
        model=bert(16, 2, 0),
        teacher=bert(24, 3, 1),
        feature_pairs=[FeaturePair("bert.encoder.layer.0", "bert.encoder.layer.2")],
        args=arguments(tmp_path / "other", max_steps=2),
        train_dataset=examples("bert"),
        data_collator=transformers.default_data_collator,
    )
    from kdistill.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="holds adapters for the pairs"):
        other.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-2"))


def test_gradient_checkpointing_gives_the_plain_runs_losses(tmp_path: Path) -> None:
    # The feature pair hooks a checkpointed block, whose forward runs again during backward.
    plain = hf_trainer("llama", tmp_path / "plain")
    plain.train()
    # transformers 5 renamed gradient_checkpointing (kept, deprecated) to activation_checkpointing.
    name = (
        "activation_checkpointing"
        if hasattr(transformers.TrainingArguments, "activation_checkpointing")
        else ("gradient_checkpointing")
    )
    checkpointed = hf_trainer("llama", tmp_path / "checkpointed", bf16=False, **{name: True})
    checkpointed.train()
    flag = getattr(checkpointed.model, "is_activation_checkpointing", None)
    assert flag if flag is not None else checkpointed.model.is_gradient_checkpointing
    assert [e["loss"] for e in logged_steps(checkpointed)] == pytest.approx([e["loss"] for e in logged_steps(plain)])


def test_labels_entry_is_taken_out_of_the_students_inputs(tmp_path: Path) -> None:
    trainer = hf_trainer("llama", tmp_path)
    seen: list[set[str]] = []
    trainer.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    trainer.teacher.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    trainer.train()
    assert seen and all("labels" not in keys for keys in seen)
    assert all(entry["ce"] > 0 for entry in logged_steps(trainer))  # the labels were used, for CE


def test_lora_student_trains_only_its_lora_weights_and_merges_exactly(tmp_path: Path) -> None:
    make_student, make_teacher, pair = MODELS["llama"]
    student = lora_student(make_student(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    before = {name: value.clone() for name, value in student.named_parameters()}
    trainer = InOrder(
        model=student,
        teacher=make_teacher(),
        feature_pairs=[pair],  # the unwrapped model's path: the trainer adds peft's prefix
        args=arguments(tmp_path / "hf"),
        train_dataset=examples("llama"),
        data_collator=transformers.default_data_collator,
        **SETTINGS,
    )
    trainer.train()
    changed = {name for name, value in student.named_parameters() if not torch.equal(value, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_A" in name for name in changed) and any("lora_B" in name for name in changed)
    assert trainer.distiller.pairs[0].student == "base_model.model.model.layers.1"
    assert trainer.distiller.causal_lm  # a LoRA-wrapped causal LM still gets the next-token shift

    batch = transformers.default_data_collator(examples("llama", seed=5))
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    student.eval()
    with torch.no_grad():
        unmerged = student(**inputs).logits
        merged_model = merge_lora(student)
        merged = merged_model(**inputs).logits
    assert type(merged_model).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in name for name, _ in merged_model.named_parameters())
    torch.testing.assert_close(merged, unmerged, rtol=0.0, atol=1e-10)  # float64 models


def test_missing_peft_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(ConfigError, match=r"kdistill\[peft\]"):
        lora_student(MODELS["llama"][0]())
    with pytest.raises(ConfigError, match=r"kdistill\[peft\]"):
        kd_hf._peft()


def test_merge_refuses_a_model_without_lora() -> None:
    with pytest.raises(ConfigError, match="not a peft"):
        merge_lora(nn.Linear(2, 2))


def test_teacher_is_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="teacher="):
        DistillationTrainer(model=bert(16, 2, 0), args=arguments(tmp_path))


def test_importing_the_integration_keeps_the_core_import_light() -> None:
    # The core's own check (tests/test_layering.py) in a fresh interpreter, with the integrations
    # package imported too: `kdistill.integrations` alone loads neither transformers nor peft.
    probe = (
        "import sys, json\n"
        "import kdistill.integrations\n"
        "from kdistill import Distiller, FeaturePair\n"
        "print(json.dumps(sorted(m for m in ('transformers', 'peft', 'kdistill.integrations.transformers') "
        "if m in sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


# -- the chunked loss (chunk_tokens) for causal-LM students --------------------------------------------


def llama_trainer(tmp_path: Path, *, settings: dict[str, Any] | None = None, **trainer_kwargs: Any) -> Any:
    """The Llama pair with its feature pair, a held-out eval set, ``settings`` for the
    ``TrainingArguments`` and ``trainer_kwargs`` (``chunk_tokens``, ...)."""
    make_student, make_teacher, pair = MODELS["llama"]
    return InOrder(
        model=make_student(),
        teacher=make_teacher(),
        feature_pairs=[pair],
        args=arguments(tmp_path / "hf", **(settings or {})),
        train_dataset=examples("llama"),
        eval_dataset=examples("llama", count=4, seed=2),
        data_collator=transformers.default_data_collator,
        **SETTINGS,
        **trainer_kwargs,
    )


def test_chunk_tokens_reaches_the_distiller(tmp_path: Path) -> None:
    assert llama_trainer(tmp_path / "four", chunk_tokens=4).distiller.chunk_size == 4
    # The default is "auto": off below the vocabulary size that pays (this one has 40 ids).
    default = llama_trainer(tmp_path / "auto")
    assert default.distiller.chunk_tokens == "auto" and default.distiller.chunk_size is None
    assert llama_trainer(tmp_path / "off", chunk_tokens=None).distiller.chunk_size is None


def test_chunked_loss_gives_the_unchunked_per_step_losses(tmp_path: Path) -> None:
    # Float64 models: the chunked and full losses differ by float64 rounding only, over 4 Adam updates.
    full = llama_trainer(tmp_path / "full", chunk_tokens=None)
    chunked = llama_trainer(tmp_path / "chunked", chunk_tokens=4)  # 4 of the batch's 2 x 7 scored positions
    chunked.distiller.adapters.load_state_dict(full.distiller.adapters.state_dict())
    full.train()
    chunked.train()
    steps = {name: logged_steps(trainer) for name, trainer in (("full", full), ("chunked", chunked))}
    assert len(steps["full"]) == len(steps["chunked"]) == 4
    for term in ("ce", "response", "feature"):  # the terms are logged as float64 means
        got = torch.tensor([entry[term] for entry in steps["chunked"]], dtype=torch.float64)
        expected = torch.tensor([entry[term] for entry in steps["full"]], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=0.0)
    # The logged loss went through HF's float32 accumulator on both sides.
    assert [e["loss"] for e in steps["chunked"]] == pytest.approx([e["loss"] for e in steps["full"]], rel=1e-6)
    for name, value in chunked.model.state_dict().items():
        torch.testing.assert_close(value, full.model.state_dict()[name], rtol=1e-9, atol=1e-12)


def test_evaluate_with_the_chunked_loss_gives_the_loss_alone(tmp_path: Path) -> None:
    full = llama_trainer(tmp_path / "full", chunk_tokens=None)
    chunked = llama_trainer(tmp_path / "chunked", chunk_tokens=4)
    chunked.distiller.adapters.load_state_dict(full.distiller.adapters.state_dict())
    got, expected = chunked.evaluate(), full.evaluate()
    assert math.isfinite(got["eval_loss"])
    # HF averages the batches' losses in float32.
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    # No logits under chunking: predict() returns the loss and no predictions (see prediction_step).
    prediction = chunked.predict(examples("llama", count=4, seed=2))
    assert prediction.predictions is None
    assert prediction.metrics["test_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)


def test_compute_metrics_needs_logits_so_it_turns_auto_chunking_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdistill.core.distiller

    monkeypatch.setattr(kdistill.core.distiller, "AUTO_CHUNK_VOCABULARY", VOCAB)  # "auto" chunks this vocabulary
    assert llama_trainer(tmp_path / "auto").distiller.chunk_size is not None

    def metrics(prediction: Any) -> dict[str, float]:
        logits = torch.as_tensor(prediction.predictions)
        return {"logit_rows": float(logits.shape[0] * logits.shape[1])}

    trainer = llama_trainer(tmp_path / "metrics", compute_metrics=metrics)
    assert trainer.distiller.chunk_size is None
    assert trainer.evaluate()["eval_logit_rows"] == 4 * TOKENS
    with pytest.raises(ConfigError, match="compute_metrics"):
        llama_trainer(tmp_path / "explicit", compute_metrics=metrics, chunk_tokens=4)


def test_chunked_loss_under_gradient_checkpointing_gives_the_plain_runs_losses(tmp_path: Path) -> None:
    # The chunked loss computes its gradients in the forward pass; the checkpointed blocks run again
    # during backward, the head (bypassed) does not.
    plain = llama_trainer(tmp_path / "plain", chunk_tokens=4)
    plain.train()
    name = (
        "activation_checkpointing"
        if hasattr(transformers.TrainingArguments, "activation_checkpointing")
        else ("gradient_checkpointing")
    )
    checkpointed = llama_trainer(tmp_path / "checkpointed", chunk_tokens=4, settings={name: True})
    checkpointed.train()
    flag = getattr(checkpointed.model, "is_activation_checkpointing", None)
    assert flag if flag is not None else checkpointed.model.is_gradient_checkpointing
    assert [e["loss"] for e in logged_steps(checkpointed)] == pytest.approx([e["loss"] for e in logged_steps(plain)])


def test_a_peft_wrapper_without_task_type_is_still_a_causal_lm() -> None:
    peft = pytest.importorskip("peft")
    plain = peft.get_peft_model(MODELS["llama"][0](), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert type(plain).__name__ == "PeftModel"  # the class name says nothing
    assert kd_hf.is_causal_lm(plain) and not kd_hf.is_causal_lm(MODELS["bert"][0]())


def test_feature_pairs_are_refused_where_adapters_would_not_train(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    for engine in ("is_deepspeed_enabled", "is_fsdp_enabled"):
        with pytest.raises(ConfigError, match="DeepSpeed or FSDP"):
            kd_hf._check_adapter_support(SimpleNamespace(**{engine: True}))
    kd_hf._check_adapter_support(SimpleNamespace())  # plain (DDP or one process): fine
    monkeypatch.delattr(transformers.TrainerCallback, "on_pre_optimizer_step")
    with pytest.raises(ConfigError, match="on_pre_optimizer_step"):
        kd_hf._check_adapter_support(SimpleNamespace())
