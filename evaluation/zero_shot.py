"""`ssmforge eval-harness`: lm-evaluation-harness tasks on a checkpoint through the `ssmforge` model
(evaluation.harness), by default the Mamba paper's zero-shot suite, written as the paper's table (accuracy,
normalised accuracy where the paper reports it, LAMBADA perplexity) beside the paper's figures for a
checkpoint of one of its sizes.

Offline: `save_task_data` writes each task's dataset as `DIR/<task>/<split>.jsonl` where the hub is
reachable; `local_task_files` then writes, for each task, a YAML that includes the harness's own task file
and reads those files instead (`dataset_path: json`), passed to the harness as an include path.

Importing this module loads neither torch nor lm_eval: the CLI checks its inputs with it first.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

from ssmforge.errors import ConfigError, DataError
from ssmforge.pretrain.config import HARNESS_TASKS

log = logging.getLogger(__name__)

# The paper's figures (percent; LAMBADA perplexity as is) for the Mamba models Gu & Dao 2023 trained on the Pile
# (300B tokens, GPT-NeoX tokenizer), by nominal size. Source: their Table 3's rows as reprinted in Dao & Gu 2024
# (Mamba-2, arXiv 2405.21060), Table 10, which evaluates the same checkpoints on the same harness tasks (plus
# OpenBookQA, left out here). The tables head every column "acc" and do not say which of the harness's two
# accuracies they print; the HellaSwag and ARC-Challenge figures are set beside acc_norm (their magnitudes are
# those of normalised accuracy for models of these sizes), the other tasks' beside acc.
PAPER_SOURCE = "Gu & Dao 2023 (Mamba), Table 3; figures as reprinted in Dao & Gu 2024 (Mamba-2), Table 10"
PAPER_COLUMNS = (("lambada_openai", "perplexity"), ("lambada_openai", "acc"), ("hellaswag", "acc_norm"),
                 ("piqa", "acc"), ("arc_easy", "acc"), ("arc_challenge", "acc_norm"), ("winogrande", "acc"))
PAPER_FIGURES = {  # name: (nominal parameters, figures in PAPER_COLUMNS order)
    "Mamba-130M": (130e6, (16.07, 44.3, 35.2, 64.5, 48.0, 24.2, 51.9)),
    "Mamba-370M": (370e6, (8.14, 55.6, 46.5, 69.5, 55.1, 28.0, 55.3)),
    "Mamba-790M": (790e6, (6.02, 62.7, 55.1, 72.1, 61.2, 29.5, 56.1)),
    "Mamba-1.4B": (1.4e9, (5.04, 65.0, 59.1, 74.2, 65.5, 32.8, 61.5)),
    "Mamba-2.8B": (2.8e9, (4.23, 69.2, 66.1, 75.2, 69.7, 36.3, 63.5)),
}
SIZE_TOLERANCE = 0.10  # a checkpoint is "Mamba-370M" when its parameter count is within 10% of 370M
AVERAGE_OF = PAPER_COLUMNS[1:]  # the paper's average: the six accuracies


def paper_model(parameters: int) -> str | None:
    """The paper's model of this size (parameter count within SIZE_TOLERANCE of its nominal size), or None.
    The sizes are at least 1.77x apart, so at most one matches."""
    for name, (nominal, _) in PAPER_FIGURES.items():
        if abs(parameters - nominal) <= SIZE_TOLERANCE * nominal:
            return name
    return None


def paper_figures(name: str | None) -> dict[tuple[str, str], float]:
    return dict(zip(PAPER_COLUMNS, PAPER_FIGURES[name][1])) if name else {}


def parse_tasks(text: str | None) -> list[str]:
    names = [name.strip() for name in (text or ",".join(HARNESS_TASKS)).split(",") if name.strip()]
    if not names:
        raise ConfigError(f"--tasks {text!r} names no task")
    return names


def check_harness() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'ssmforge[eval]'")


def check_folder(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_dir():
        raise DataError(f"{flag} {path}: no such folder")
    return Path(path)


def data_files(data_dir: Path, names: list[str]) -> dict[str, dict[str, str]]:
    """task -> {split: file} of a --data-dir, every task checked to be there (before any model loads)."""
    found = {}
    for name in names:
        files = sorted((data_dir / name).glob("*.jsonl"))
        if not files:
            raise DataError(f"--data-dir {data_dir}: no {name}/<split>.jsonl; write them with `ssmforge eval-harness "
                            f"--save-data {data_dir} --tasks {name}` where the Hugging Face hub is reachable")
        found[name] = {f.stem: str(f.resolve()) for f in files}
    return found


# -- lm-evaluation-harness's side (imports lm_eval) ------------------------------------------------------
def task_manager(names: list[str], include_paths: list[Path]):
    """A TaskManager that knows `names`: the include paths alone when they define every one of them as a task
    (fast), else with the harness's own ~15,000 task files too (indexing them takes up to a minute)."""
    from lm_eval.tasks import TaskManager

    if include_paths:
        own = TaskManager(include_path=[str(p) for p in include_paths], include_defaults=False)
        if all(name in own.all_subtasks for name in names):
            return own
    log.info("indexing lm-evaluation-harness's tasks")
    manager = TaskManager(include_path=[str(p) for p in include_paths] or None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks: no task named {', '.join(unknown)} (`lm-eval ls tasks` lists them; "
                          f"--include-path adds your own)")
    return manager


def local_task_files(manager, files: dict[str, dict[str, str]], folder: Path) -> Path:
    """Write into `folder`, for each task, a YAML that includes the harness's task file and reads the task's
    local files instead of the hub; returns the folder (an include path that overrides those tasks)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for name, splits in files.items():
        entry = manager.task_index.get(name)
        if name not in manager.all_subtasks or entry is None or entry.yaml_path is None:
            raise ConfigError(f"--data-dir: {name} is not a task defined by a YAML file (a group or tag: name its "
                              f"tasks one by one)")
        config = {"include": str(Path(entry.yaml_path).resolve()), "task": name, "dataset_path": "json",
                  "dataset_name": None, "dataset_kwargs": {"data_files": splits}}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


OFFLINE_HINT = ("where the Hugging Face hub is out of reach, write the data elsewhere with --save-data DIR and "
                "read it with --data-dir DIR")


def load_tasks(manager, names: list[str], hint: str = OFFLINE_HINT) -> dict:
    """The harness's task dict for `names`, their datasets loaded; a dataset that cannot be loaded (the hub out
    of reach, say) is one line ending with `hint`."""
    from lm_eval.tasks import get_task_dict

    try:
        return get_task_dict(names, manager)
    except Exception as e:  # datasets and the hub raise many types; the message says which and why
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"cannot load the data of {', '.join(names)} ({type(e).__name__}: {detail}); {hint}") from None


def _leaf_tasks(tree) -> list:
    tasks = []
    for value in tree.values():
        tasks.extend(_leaf_tasks(value) if isinstance(value, dict) else [value])
    return tasks


def save_task_data(manager, names: list[str], out: Path) -> list[str]:
    """Load the tasks' datasets (from the hub, where it is reachable) and write every split as
    out/<task>/<split>.jsonl, what --data-dir reads; returns lines saying what was written."""
    written = []
    for task in _leaf_tasks(load_tasks(manager, names, "run --save-data where the Hugging Face hub is reachable")):
        name = task.config.task
        for split, rows in task.dataset.items():
            path = out / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows.to_json(str(path), lines=True)
            written.append(f"{path}: {len(rows)} rows")
    return written


def evaluate(lm, manager, names: list[str], num_fewshot: int, limit: int | None) -> dict:
    """The harness's results dict for `names` on the LM."""
    from lm_eval.evaluator import simple_evaluate

    return simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                           log_samples=False)


# -- the table --------------------------------------------------------------------------------------------
def _is_accuracy(metric: str) -> bool:
    return metric.startswith("acc") or metric == "exact_match"


def results_table(results: dict, parameters: int, checkpoint: str) -> dict:
    """The record eval-harness writes: every task's metrics (accuracies in percent, as the paper prints them),
    the paper's figure beside each metric it reports for a checkpoint of one of its sizes, and the average of
    the paper's six accuracies when all six were run."""
    model = paper_model(parameters)
    paper = paper_figures(model)
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")  # "acc,none": a metric after a filter
            if not comma or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            scale = 100.0 if _is_accuracy(metric) else 1.0
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append({"task": task, "metric": metric, "filter": filter_name, "value": value * scale,
                         "stderr": stderr * scale if isinstance(stderr, (int, float)) else None,
                         "paper": paper.get((task, metric))})
    values = {(r["task"], r["metric"]): r["value"] for r in rows}
    average = (sum(values[c] for c in AVERAGE_OF) / len(AVERAGE_OF)) if all(c in values for c in AVERAGE_OF) else None
    return {"checkpoint": checkpoint, "parameters": parameters, "paper_model": model,
            "paper_source": PAPER_SOURCE if model else None, "rows": rows, "average_accuracy": average,
            "harness_version": _harness_version(), "n_samples": results.get("n-samples"),
            "config": {k: v for k, v in results.get("config", {}).items() if k in ("limit", "bootstrap_iters")}}


def _harness_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def _number(value: float | None, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(record: dict, num_fewshot: int) -> str:
    model = record["paper_model"]
    head = (f"{num_fewshot}-shot evaluation of {record['checkpoint']} ({record['parameters']:,} parameters; "
            f"lm-evaluation-harness {record['harness_version']}, accuracies in percent)\n\n")
    if model:
        head += (f"Paper: {model}, trained on the Pile (300B tokens, GPT-NeoX tokenizer); {record['paper_source']}. "
                 f"The comparison means something only for the same data and budget.\n\n")
    paper = f" | {model}" if model else ""
    lines = [f"| task | metric | value | stderr{paper} |", "|---|---|---:|---:|" + ("---:|" if model else "")]
    for row in record["rows"]:
        cells = [row["task"], row["metric"], _number(row["value"]), _number(row["stderr"])]
        cells += [_number(row["paper"])] if model else []
        lines.append("| " + " | ".join(cells) + " |")
    if record["average_accuracy"] is not None:
        lines.append("| average of the six accuracies | | " + _number(record["average_accuracy"]) + " | |"
                     + (" |" if model else ""))
    return head + "\n".join(lines) + "\n"


def write_results(record: dict, out: Path, num_fewshot: int) -> tuple[Path, str]:
    """Write OUT/<k>-shot.json and .md; returns (the JSON path, the markdown)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "zero-shot" if num_fewshot == 0 else f"{num_fewshot}-shot"
    table = markdown(record, num_fewshot)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(table)
    return out / f"{stem}.json", table
