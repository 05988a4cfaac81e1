"""GLUE fine-tuning: a classification (or STS-B regression) head on the pretrained backbone, pooled on
the last real token of each sequence (the only position that has read the whole input of a causal
model), each input framed `START a EOS (b EOS)` with START the token that preceded every document in
pretraining (EOS for packed data), trained through the same DeepSpeed engine as pretraining, evaluated on dev every epoch; the
best epoch's dev metrics and test predictions are kept and written as the benchmark's submission files
(with AX, the diagnostic set, from the MNLI model). A fine-tune whose dev predictions are all one class (or
a near-constant STS-B score) learned nothing: its record, table row and log say so (`degenerate`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmforge.errors import DataError

from .glue_metrics import (constant_prediction, degenerate_note, glue_score, majority_accuracy, split_metrics,
                           task_score)
from .glue_tasks import AX, DIAGNOSTIC_SPLIT, Example, Task, load_split, submission_files, validate_submission

log = logging.getLogger(__name__)


class SequenceClassifier(nn.Module):
    """backbone features (batch, L, d_model) -> the last real token's -> head -> (batch, num_labels)."""

    def __init__(self, backbone: nn.Module, num_labels: int, seed: int):
        super().__init__()
        backbone.lm_head = nn.Identity()  # not used; a head without gradients would trouble ZeRO
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.d_model, num_labels)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.normal_(0.0, backbone.config.initializer_range, generator=generator)
            self.head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.features(input_ids)  # right padding: pads come after the pooled token
        pooled = hidden[torch.arange(len(lengths), device=hidden.device), lengths - 1]
        return self.head(pooled.to(self.head.weight.dtype)).float()


def special_ids(tokenizer, document_prefix: str = "eos") -> tuple[int, int]:
    """(start id, separator id): the start is the token every document followed in pretraining
    (`document_prefix`, the manifest's: EOS for packed data, see perplexity.training_document_prefix), the
    separator EOS; each falls back to the other special id where the tokenizer lacks it."""
    from .perplexity import prefix_token_id

    bos = tokenizer.bos_id if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else None
    eos = tokenizer.eos_id if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else None
    if bos is None and eos is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS id to frame GLUE sentences with")
    return prefix_token_id(tokenizer, document_prefix), (eos if eos is not None else bos)


def encode_example(tokenizer, example: Example, max_length: int, document_prefix: str = "eos") -> list[int]:
    """[start] a [sep] (b [sep]), cut to max_length by trimming the longer sentence first."""
    start, sep = special_ids(tokenizer, document_prefix)
    a = tokenizer.encode(example.text_a)
    b = tokenizer.encode(example.text_b) if example.text_b is not None else None
    budget = max_length - (3 if b is not None else 2)
    if budget < 2:
        raise DataError(f"glue.max_length={max_length} leaves no room for the sentences")
    while len(a) + (len(b) if b is not None else 0) > budget:
        if b is not None and len(b) > len(a):
            b.pop()
        else:
            a.pop()
    return [start] + a + [sep] + (b + [sep] if b is not None else [])


def collate(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
    return ids, lengths


def rank_indices(n: int, rank: int, world_size: int, order: list[int] | None = None) -> list[int]:
    """This rank's share of n items; wrapped around so that every rank gets the same count (ranks must
    take the same number of steps), as torch's DistributedSampler does."""
    order = order if order is not None else list(range(n))
    per_rank = math.ceil(n / world_size)
    padded = order + order[:per_rank * world_size - n]
    return padded[rank::world_size]


@dataclass
class TaskResult:
    task: str
    best_epoch: int
    dev: dict[str, float]  # the best epoch's metrics
    score: float
    epochs: list[dict] = field(default_factory=list)
    test_predictions: dict[str, list[tuple[str, object]]] = field(default_factory=dict)
    # the best epoch's dev splits whose predictions were constant: split -> glue_metrics.constant_prediction()
    constant: dict[str, dict] = field(default_factory=dict)
    # classification: dev split -> the majority-class baseline's accuracy (what predicting one class scores)
    majority: dict[str, float] = field(default_factory=dict)

    @property
    def degenerate(self) -> bool:
        """The best epoch predicted one class (or a near-constant score) on a dev split: nothing learned."""
        return bool(self.constant)


class GlueRunner:
    """Fine-tunes one fresh copy of the backbone per task. `make_backbone()` returns the pretrained LM."""

    def __init__(self, make_backbone, tokenizer, run_config, world_size: int, rank: int, device: torch.device,
                 progress: bool = False, document_prefix: str = "eos"):
        self.make_backbone, self.tokenizer, self.config = make_backbone, tokenizer, run_config
        self.document_prefix = document_prefix  # the token each input starts with: see special_ids
        self.glue = run_config.glue
        self.world_size, self.rank, self.device, self.progress = world_size, rank, device, progress
        pad = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else special_ids(tokenizer)[1]
        self.pad_id = pad

    def _engine(self, model: nn.Module, total_steps: int):
        from ssmforge.pretrain.engine import build_engine

        glue = self.glue
        if glue.batch_size % self.world_size:
            raise DataError(f"glue.batch_size={glue.batch_size} must be a multiple of the number of ranks "
                            f"({self.world_size})")
        train = dataclasses.replace(
            self.config.train, lr=glue.lr, micro_batch_size=glue.batch_size // self.world_size, grad_accum_steps=1,
            global_batch_size=None, weight_decay=glue.weight_decay,
            warmup_steps=max(1, round(glue.warmup_ratio * total_steps)),
            max_steps=total_steps, min_lr_ratio=0.0, activation_checkpointing=False,
            context_parallel=1)  # fine-tuning rows are short: every rank holds whole ones
        return build_engine(model, dataclasses.replace(self.config, train=train), self.world_size)

    def _encode(self, examples: list[Example]) -> list[list[int]]:
        return [encode_example(self.tokenizer, e, self.glue.max_length, self.document_prefix) for e in examples]

    def _predict(self, engine, sequences: list[list[int]], task: Task) -> list:
        """Predictions for every encoded example (each rank scores its share; results are gathered)."""
        from ssmforge.pretrain.engine import autocast, resolve_precision

        dtype = resolve_precision(self.config.train.precision, self.device)
        mine = rank_indices(len(sequences), self.rank, self.world_size)
        batch = self.glue.batch_size // self.world_size
        out = []
        engine.eval()
        with torch.no_grad():
            for b in range(0, len(mine), batch):
                idx = mine[b:b + batch]
                ids, lengths = collate([sequences[i] for i in idx], self.pad_id)
                with autocast(self.device, dtype):
                    logits = engine(ids.to(self.device), lengths.to(self.device))
                values = logits[:, 0] if task.is_regression else logits.argmax(-1)
                out.extend(zip(idx, values.cpu().tolist()))
        engine.train()
        if self.world_size > 1:
            gathered = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, out)
            out = [pair for part in gathered for pair in part]
        by_index = dict(out)
        return [by_index[i] for i in range(len(sequences))]

    def _evaluate(self, engine, task: Task, dev: dict[str, list[Example]],
                  dev_sequences: dict[str, list[list[int]]]) -> tuple[dict[str, float], dict[str, dict]]:
        """(dev metrics, {split: constant_prediction record} of the splits whose predictions were constant)."""
        metrics, constant = {}, {}
        for split, examples in dev.items():
            predictions = self._predict(engine, dev_sequences[split], task)
            labels = [e.label for e in examples]
            m = split_metrics(task.name, predictions, labels)
            if task.name == "mnli":
                m = {f"accuracy_{split.split('_')[1]}": m["accuracy"]}
            metrics.update(m)
            record = constant_prediction(task.name, predictions, labels, task.labels)
            if record is not None:
                constant[split] = record
        return metrics, constant

    def run_task(self, task: Task) -> TaskResult:
        from ssmforge.pretrain.engine import autocast, resolve_precision

        glue = self.glue
        train = load_split(task, "train", glue.data_dir)
        dev = {split: load_split(task, split, glue.data_dir) for split in task.dev_splits}
        test = {}
        for split in task.test_splits:
            try:
                test[split] = load_split(task, split, glue.data_dir)
            except DataError as e:
                log.warning("%s: no submission file for this split", e)
        if task.name == "mnli":  # the diagnostic set AX is labelled by the MNLI model
            try:
                test[DIAGNOSTIC_SPLIT] = load_split(AX, DIAGNOSTIC_SPLIT, glue.data_dir)
            except DataError as e:
                log.warning("%s: no AX.tsv (the diagnostic set) in the submission", e)
        # encoded once: the dev splits are scored every epoch, the test splits at every better epoch
        encoded = self._encode(train)
        dev_sequences = {split: self._encode(examples) for split, examples in dev.items()}
        test_sequences = {split: self._encode(examples) for split, examples in test.items()}
        torch.manual_seed(glue.seed)
        model = SequenceClassifier(self.make_backbone(), task.num_labels, glue.seed).to(self.device)
        steps_per_epoch = math.ceil(len(train) / glue.batch_size)
        engine, _, _ = self._engine(model, steps_per_epoch * glue.epochs)
        dtype = resolve_precision(self.config.train.precision, self.device)
        result = TaskResult(task.name, -1, {}, -math.inf, majority={} if task.is_regression else {
            split: majority_accuracy([e.label for e in examples]) for split, examples in dev.items()})
        for epoch in range(glue.epochs):
            order = list(range(len(train)))
            random.Random(glue.seed * 1000 + epoch).shuffle(order)
            mine = rank_indices(len(train), self.rank, self.world_size, order)
            micro = glue.batch_size // self.world_size
            losses = []
            steps = range(0, len(mine), micro)
            if self.progress:
                from tqdm import tqdm

                steps = tqdm(steps, desc=f"{task.name} epoch {epoch + 1}/{glue.epochs}", unit="step")
            for b in steps:
                idx = mine[b:b + micro]
                ids, lengths = collate([encoded[i] for i in idx], self.pad_id)
                labels = torch.tensor([train[i].label for i in idx], device=self.device)
                with autocast(self.device, dtype):
                    logits = engine(ids.to(self.device), lengths.to(self.device))
                loss = F.mse_loss(logits[:, 0], labels.float()) if task.is_regression else \
                    F.cross_entropy(logits, labels.long())
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            metrics, constant = self._evaluate(engine, task, dev, dev_sequences)
            score = task_score(task.name, metrics)
            result.epochs.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), **metrics,
                                  "score": score, "degenerate": bool(constant)})
            line = (f"{task.name} epoch {epoch + 1}: train loss {result.epochs[-1]['train_loss']:.4f}, dev "
                    + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if constant:
                log.warning("%s; DEGENERATE: %s", line, "; ".join(
                    f"{split} {degenerate_note(task.name, r)}" for split, r in constant.items()))
            else:
                log.info("%s", line)
            # keep the best epoch (the first, whatever its score): its dev metrics and its test predictions
            if result.best_epoch < 0 or score > result.score:
                result.best_epoch, result.dev, result.score, result.constant = epoch + 1, metrics, score, constant
                result.test_predictions = {
                    split: list(zip((e.index for e in examples), self._predict(engine, test_sequences[split], task)))
                    for split, examples in test.items()}
        engine.destroy()
        if result.degenerate:
            log.warning("%s: the best epoch (%d) learned nothing, its dev score %.2f is not a result: %s. Try another "
                        "glue.lr (see the README's GLUE section for ranges that learn) or more glue.epochs",
                        task.name, result.best_epoch, result.score,
                        "; ".join(f"{split} {degenerate_note(task.name, r)}" for split, r in result.constant.items()))
        return result


def format_prediction(task: Task, value) -> str:
    if task.is_regression:
        return f"{min(5.0, max(0.0, value)):.3f}"
    return task.labels[int(value)]


def write_results(results: list[TaskResult], tasks: dict[str, Task], out_dir: str | Path, source: str,
                  data_dir: str | Path | None = None) -> dict:
    """results.json, results.md and submission/<Task>.tsv (AX.tsv with MNLI) under out_dir; returns the
    summary. The submission folder is then checked as the GLUE server reads it (validate_submission, against
    the test files of `data_dir` where given): a problem raises DataError naming the file."""
    out_dir = Path(out_dir)
    (out_dir / "submission").mkdir(parents=True, exist_ok=True)
    scores = {r.task: r.score for r in results}
    summary = {"checkpoint": source, "score": glue_score(scores),
               "tasks": {r.task: {"score": r.score, "best_epoch": r.best_epoch, "dev": r.dev,
                                  "degenerate": r.degenerate, "majority_baseline": r.majority or None,
                                  "constant_prediction": {split: {**record, "note": degenerate_note(r.task, record)}
                                                          for split, record in r.constant.items()} or None,
                                  "epochs": r.epochs}
                         for r in results}}
    for r in results:
        task = tasks[r.task]
        (out_dir / f"{r.task}.json").write_text(json.dumps(summary["tasks"][r.task], indent=2) + "\n")
        for stem, file_task, split in submission_files(task):
            if split in r.test_predictions:
                rows = "".join(f"{index}\t{format_prediction(file_task, value)}\n"
                               for index, value in r.test_predictions[split])
                (out_dir / "submission" / f"{stem}.tsv").write_text("index\tprediction\n" + rows)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "results.md").write_text(results_table(summary))
    validate_submission(out_dir / "submission", data_dir)
    return summary


def results_table(summary: dict) -> str:
    lines = [f"GLUE dev results of {summary['checkpoint']}", "", "| task | metrics | score | best epoch | note |",
             "|---|---|---|---|---|"]
    for task, r in summary["tasks"].items():
        metrics = ", ".join(f"{k} {100 * v:.2f}" for k, v in r["dev"].items())
        constant = r.get("constant_prediction") or {}
        note = "; ".join((f"{split}: " if len(constant) > 1 else "") + record["note"]
                         for split, record in constant.items())
        if note:
            note = "**DEGENERATE**: " + note
        else:  # predictions vary, yet accuracy may not beat predicting the majority class
            note = "; ".join(f"{_accuracy_key(split)} at or below the majority baseline {100 * baseline:.2f}"
                             for split, baseline in (r.get("majority_baseline") or {}).items()
                             if r["dev"].get(_accuracy_key(split), 1.0) <= baseline)
        lines.append(f"| {task} | {metrics} | {r['score']:.2f} | {r['best_epoch']} | {note} |")
    score = summary["score"]
    lines.append(f"| **GLUE score** | | {score:.2f} | | |" if score is not None else
                 "| GLUE score | needs all nine tasks | | | |")
    degenerate = [task for task, r in summary["tasks"].items() if r.get("degenerate")]
    if degenerate:
        lines += ["", f"Degenerate fine-tunes (constant dev predictions, their scores are baselines, not learned): "
                      f"{', '.join(degenerate)}."]
    return "\n".join(lines) + "\n"


def _accuracy_key(split: str) -> str:
    """The dev metric holding a split's accuracy: accuracy, or MNLI's accuracy_matched / accuracy_mismatched."""
    return f"accuracy_{split.split('_')[1]}" if split.startswith("dev_") else "accuracy"
