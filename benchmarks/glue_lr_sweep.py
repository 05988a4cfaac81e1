"""Which GLUE fine-tuning learning rates learn anything on a tiny pretrained backbone: a sweep of `glue.lr`
through `ssmforge finetune-glue` at every other GLUE default (batch 32, 3 epochs, warmup 6%, wd 0.01).

There is no network here, hence no real GLUE data: the task is synthetic, SST-2 in its TSV layout, a
sentence of filler words holding one sentiment word from a small lexicon (label 1: positive), 60% of the
examples negative so that the majority-class baseline (60% accuracy) is visible. The backbone is the
quickstart's model (configs/quickstart.yaml: Mamba, d_model 128, 4 layers, byte tokens) pretrained as the
quickstart does (300 steps on the embedded synthetic corpus), unless --config names another config or
--backbone a run folder or an export. A learning rate *learns* when its
best epoch's dev predictions are not all one class and its accuracy beats the majority baseline by 5
points. What this measures is a small model on an easy synthetic task, not a recommendation for a
130M+ model on real GLUE.

    python benchmarks/glue_lr_sweep.py
    python benchmarks/glue_lr_sweep.py --config configs/tiny.yaml          # the 30k-parameter model
    python benchmarks/glue_lr_sweep.py --backbone runs/quickstart/export --lrs 3e-5 1e-3
Writes benchmarks/results/glue_lr_sweep.json and prints the table.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILLER = "the a of this that movie film story plot actor scene it was is very quite rather and so".split()
POSITIVE = "great wonderful superb moving delightful brilliant charming excellent".split()
NEGATIVE = "awful boring dreadful tedious clumsy terrible dull painful".split()


def write_task(root: Path, n_train: int, n_dev: int, seed: int = 0, negative_share: float = 0.6) -> None:
    """SST-2/train.tsv and dev.tsv (header sentence, label) of the synthetic sentiment task."""
    rng = random.Random(seed)

    def rows(n):
        for _ in range(n):
            label = 0 if rng.random() < negative_share else 1
            words = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
            yield f"{' '.join(words)}\t{label}\n"

    (root / "SST-2").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        (root / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(rows(n)))


def ssmforge(*args) -> list[str]:
    return [sys.executable, "-m", "ssmforge", *map(str, args)]


def make_backbone(work: Path, config: Path, steps: int | None) -> Path:
    """`config` pretrained (for `steps` steps, else its own train.max_steps) and exported; reused when the
    export is already there."""
    run_dir = work / (f"backbone-{config.stem}" + ("" if steps is None else f"-{steps}"))
    export = run_dir / "export"
    if not (export / "config.json").is_file():
        budget = [] if steps is None else [f"train.max_steps={steps}", f"train.save_every={steps}",
                                            f"train.eval_every={steps}"]
        subprocess.run(ssmforge("run", config, f"run_dir={run_dir}", *budget, "stages.run=[prepare,pretrain,export]"),
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return export


def shown(path: Path) -> str:
    """A path as the results file records it: relative to the repository where it lies inside."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", help="run folder or export to fine-tune (default: --config, pretrained here)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml",
                        help="the backbone's training config (default: the quickstart's)")
    parser.add_argument("--pretrain-steps", type=int, help="default: the config's train.max_steps")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--n-train", type=int, default=2048)
    parser.add_argument("--n-dev", type=int, default=200)
    parser.add_argument("--work", default=str(ROOT / "runs" / "glue_lr_sweep"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "glue_lr_sweep.json"))
    parser.add_argument("overrides", nargs="*", help="further finetune-glue overrides, e.g. glue.epochs=1")
    args = parser.parse_args()

    work = Path(args.work)
    data = work / "glue"
    write_task(data, args.n_train, args.n_dev)
    backbone = Path(args.backbone) if args.backbone else make_backbone(work, args.config, args.pretrain_steps)
    rows = []
    for lr in args.lrs:
        out = work / f"lr{lr:g}"
        start = time.perf_counter()
        proc = subprocess.run(ssmforge("finetune-glue", backbone, "--task", "sst2", "--data-dir", data, "--out", out,
                                       f"glue.lr={lr}", *args.overrides), cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"finetune-glue at lr {lr:g} failed:\n{proc.stderr[-2000:]}")
        result = json.loads((out / "results.json").read_text())["tasks"]["sst2"]
        record = (result["constant_prediction"] or {}).get("dev")
        labels = [int(line.rsplit("\t", 1)[1]) for line in (data / "SST-2" / "dev.tsv").read_text().splitlines()[1:]]
        majority = max(labels.count(0), labels.count(1)) / len(labels)
        accuracy = result["dev"]["accuracy"]
        rows.append({"lr": lr, "accuracy": accuracy, "majority_accuracy": majority,
                     "degenerate": result["degenerate"], "predicted_class": record and record["predicted_class"],
                     "learns": not result["degenerate"] and accuracy >= majority + 0.05,
                     "best_epoch": result["best_epoch"],
                     "epochs": [{"epoch": e["epoch"], "train_loss": e["train_loss"], "accuracy": e["accuracy"],
                                 "degenerate": e["degenerate"]} for e in result["epochs"]],
                     "seconds": time.perf_counter() - start})
        print(f"lr {lr:g}: accuracy {accuracy:.3f} (majority {majority:.3f})"
              + (f", DEGENERATE: all '{record['predicted_class']}'" if record else ""), flush=True)

    command = "python benchmarks/glue_lr_sweep.py " + " ".join(sys.argv[1:])
    table = ["| glue.lr | dev accuracy | majority baseline | all one class | learns | accuracy per epoch |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['lr']:g} | {100 * r['accuracy']:.1f} | {100 * r['majority_accuracy']:.1f} | "
                     f"{'yes (' + repr(r['predicted_class']) + ')' if r['degenerate'] else 'no'} | "
                     f"{'yes' if r['learns'] else 'no'} | "
                     + ", ".join(f"{100 * e['accuracy']:.1f}" for e in r["epochs"]) + " |")
    print("\n".join(table))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": command.strip(), "backbone": shown(backbone),
        "config": None if args.backbone else shown(args.config),
        "pretrain_steps": None if args.backbone else args.pretrain_steps,
        "task": {"layout": "SST-2", "n_train": args.n_train, "n_dev": args.n_dev, "negative_share": 0.6,
                 "synthetic": "filler words + one sentiment word from an 8+8 word lexicon"},
        "overrides": args.overrides, "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "rows": rows, "table": "\n".join(table)}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
