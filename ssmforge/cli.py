"""The `ssmforge` command: one entry point, one subcommand per stage.

User mistakes (SsmforgeError) print as one line and exit with code 2; argparse usage errors do too.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shlex
import sys
from pathlib import Path

from ssmforge import __version__
from ssmforge.errors import LostRankError, SsmforgeError, TrainingError
from ssmforge.pretrain.launch import configure_logging

log = logging.getLogger("ssmforge")


def _load_model_and_tokenizer(args):
    import torch

    from ssmforge.data_pipeline.tokenizer import load_tokenizer, tokenizer_from_flag
    from ssmforge.models import LanguageModel

    from ssmforge.pretrain.config import load_config
    from ssmforge.pretrain.export import check_tokenizer, load_model_and_tokenizer

    config = None
    if getattr(args, "random_init", None):
        config = load_config(args.random_init)
        config.model.check_device("cpu")
        torch.manual_seed(config.seed)
        model = LanguageModel(config.model)
        log.info("random weights from %s (%.2fM parameters): expect noise, not text", args.random_init,
                 model.num_parameters() / 1e6)
        tokenizer = load_tokenizer(config.tokenizer.kind, config.tokenizer.path)
    else:
        model, tokenizer, config = load_model_and_tokenizer(args.checkpoint)
    if args.tokenizer:
        tokenizer = tokenizer_from_flag(args.tokenizer)
    check_tokenizer(args.checkpoint, model, tokenizer)
    return model.eval(), tokenizer, config


def cmd_generate(args) -> int:
    from ssmforge.pretrain.export import check_checkpoint

    if (args.checkpoint is None) == (args.random_init is None):
        raise SsmforgeError("generate needs exactly one of CHECKPOINT or --random-init CONFIG")
    if args.max_new_tokens < 0:
        raise SsmforgeError(f"--max-new-tokens={args.max_new_tokens} is invalid: must be >= 0")
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint)  # before torch loads
    import torch

    from ssmforge.models import generate
    from ssmforge.models.generation import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p)
    model, tokenizer, _ = _load_model_and_tokenizer(args)
    prompt = tokenizer.encode(args.prompt)
    if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 and args.bos:
        prompt = [tokenizer.bos_id] + prompt
    if not prompt:
        raise SsmforgeError("--prompt is empty after tokenization; give at least one character")
    generator = torch.Generator().manual_seed(args.seed)
    ids = generate(model, torch.tensor([prompt]), args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_id=tokenizer.eos_id,
                   vocab_size=tokenizer.vocab_size, generator=generator)
    print(tokenizer.decode(ids[0].tolist()))
    return 0


def cmd_convert(args) -> int:
    import json

    from ssmforge.pretrain.export import RUN_FILE, check_checkpoint

    if args.from_hf:
        source, out = args.from_hf, args.out
        if out is None:
            raise SsmforgeError("convert --from-hf DIR needs --out OUT")
    else:
        source, out = args.source, args.to_hf
        if source is None or out is None:
            raise SsmforgeError("convert needs SOURCE --to-hf OUT, or --from-hf DIR --out OUT")
    check_checkpoint(source)  # before torch loads
    from ssmforge.data_pipeline.tokenizer import TOKENIZER_FILES
    from ssmforge.models import load_pretrained, save_pretrained
    from ssmforge.models.hf import BYTE_TOKENIZER_KEY, CONFIG_FILE, HF_FAMILIES

    source = Path(source)
    model = load_pretrained(source)
    if model.config.family not in HF_FAMILIES:
        raise SsmforgeError(f"{source}: model.family={model.config.family!r} has no Hugging Face equivalent "
                            f"(only {', '.join(HF_FAMILIES)}); the folder already is ssmforge's own format")
    extra = {name: source / name for name in (*TOKENIZER_FILES, RUN_FILE) if (source / name).is_file()}
    # the tokenizer's special ids and a byte tokenizer (which has no file) travel in config.json
    hf = json.loads((source / CONFIG_FILE).read_text())
    token_ids = {key: hf[key] for key in ("pad_token_id", "bos_token_id", "eos_token_id") if key in hf}
    save_pretrained(model, out, token_ids=token_ids, extra_files=extra,
                    byte_tokenizer=bool(hf.get(BYTE_TOKENIZER_KEY)))
    cfg = model.config
    print(f"wrote {out}: {cfg.family}, {cfg.n_layer} layers, d_model {cfg.d_model}, vocab {cfg.padded_vocab_size}, "
          f"{model.num_parameters() / 1e6:.2f}M parameters" + (f", with {', '.join(extra)}" if extra else ""))
    return 0


def _default_out(checkpoint: str, out: str | None, name: str) -> Path:
    return Path(out) if out else Path(checkpoint) / "eval" / name


def _dataset_name(dataset: list[str]) -> str:
    import re

    name = dataset[0] if len(dataset) == 1 else "files"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name.split("*")[0].rstrip(".") or "files")


def _first_set(*values):
    """The first value that is not None (a flag given as 0 is kept, so that it is refused, not replaced)."""
    return next((v for v in values if v is not None), None)


def cmd_eval_ppl(args) -> int:
    import json

    import math

    from ssmforge.evaluation.perplexity import SYNTHETIC_HELDOUT, WIKITEXT, dataset_files
    from ssmforge.pretrain.export import check_checkpoint, run_settings

    # every input is checked before torch loads and before anything is written
    check_checkpoint(args.checkpoint)
    config = run_settings(args.checkpoint)  # a run folder's or an export's settings; None: a Hugging Face folder
    eval_cfg = config.eval if config is not None else None
    dataset = args.dataset or [eval_cfg.dataset if eval_cfg else "wikitext-103"]
    max_length = _first_set(args.max_length, eval_cfg and (eval_cfg.max_length or config.data.seq_len), 2048)
    stride = _first_set(args.stride, eval_cfg.stride if eval_cfg else None)
    batch_size = _first_set(args.batch_size, eval_cfg.batch_size if eval_cfg else None, 8)
    # longer windows are fed in chunks of the training length, the recurrent state carried: memory stays flat
    chunk_length = _first_set(args.chunk_length, config.data.seq_len if config is not None else None, 2048)
    for flag, value in (("--max-length", max_length), ("--stride", stride or 1), ("--batch-size", batch_size),
                        ("--chunk-length", chunk_length)):
        if value < 1:
            raise SsmforgeError(f"{flag}={value} is invalid: must be >= 1")
    if stride is not None and stride > max_length:
        raise SsmforgeError(f"--stride={stride} is invalid: must be <= the window --max-length ({max_length})")
    for name in dataset:
        dataset_files(name, "--dataset" if args.dataset else "eval.dataset")
    heldout = SYNTHETIC_HELDOUT in dataset
    if heldout:
        if dataset != [SYNTHETIC_HELDOUT] or config is None:
            raise SsmforgeError(f"--dataset {SYNTHETIC_HELDOUT} stands alone and needs a run folder or an export "
                                f"carrying its run's settings (the synthetic source to continue)")
        from ssmforge.data_pipeline.sources import heldout_synthetic_documents

        pairs = heldout_synthetic_documents(config.data.sources, config.seed)

    from ssmforge.evaluation.perplexity import evaluate_perplexity, load_documents, training_document_prefix
    from ssmforge.pretrain.launch import init_distributed, shutdown, world_from_env

    document_prefix = args.document_prefix or training_document_prefix(config)
    model, tokenizer, _ = _load_model_and_tokenizer(args)
    hub = len(dataset) == 1 and dataset[0] in WIKITEXT
    documents = [text for text, _ in pairs] if heldout else [doc for name in dataset for doc in load_documents(name)]
    world = world_from_env()
    device = None
    if world.distributed:
        world, device = init_distributed()
        model.to(device)
    try:
        result = evaluate_perplexity(
            model, tokenizer, documents, " ".join(dataset), max_length, stride, batch_size,
            detokenize=hub or args.wikitext_detokenize, rank=world.rank, world_size=world.world_size,
            progress=world.is_main and sys.stderr.isatty(), score_end=heldout, document_prefix=document_prefix,
            chunk_length=chunk_length)
    finally:
        shutdown()
    if world.is_main:
        out = _default_out(args.checkpoint, args.out, "")
        out.mkdir(parents=True, exist_ok=True)
        stem = f"ppl-{_dataset_name(dataset)}-L{max_length}-S{result.stride}"
        record = {"checkpoint": str(args.checkpoint), **result.to_dict()}
        table = result.table()
        if heldout:  # the best possible loss on exactly these documents, their end included
            floor = sum(nats for _, nats in pairs) / result.tokens
            loss = result.nll / result.tokens
            record.update(entropy_floor_nats_per_token=floor, nats_above_floor=loss - floor)
            table += (f"\nloss {loss:.4f} nats/token (perplexity {result.token_perplexity:.3f}) vs entropy floor "
                      f"{floor:.4f} (perplexity {math.exp(floor):.3f}): {loss - floor:.4f} nats above the best "
                      f"possible\n")
        (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
        (out / f"{stem}.md").write_text(table)
        print(table)
        print(f"results in {out / stem}.json and .md")
    return 0


def cmd_eval_harness(args) -> int:
    from ssmforge.evaluation import zero_shot
    from ssmforge.pretrain.export import check_checkpoint

    # every input is checked before torch loads and before anything is written
    zero_shot.check_harness()
    names = zero_shot.parse_tasks(args.tasks)
    includes = [zero_shot.check_folder(path, "--include-path") for path in args.include_path or []]
    if args.save_data:
        manager = zero_shot.task_manager(names, includes)
        for line in zero_shot.save_task_data(manager, names, Path(args.save_data)):
            print(line)
        return 0
    if args.checkpoint is None:
        raise SsmforgeError("eval-harness needs CHECKPOINT (or --save-data DIR)")
    check_checkpoint(args.checkpoint)
    data_dir = zero_shot.check_folder(args.data_dir, "--data-dir")
    files = zero_shot.data_files(data_dir, names) if data_dir else None
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
                               ("--num-fewshot", args.num_fewshot, 0), ("--max-length", args.max_length, 1),
                               ("--chunk-length", args.chunk_length, 1)):
        if value is not None and value < least:
            raise SsmforgeError(f"{flag}={value} is invalid: must be >= {least}")
    manager = zero_shot.task_manager(names, includes)
    out = _default_out(args.checkpoint, args.out, "harness")
    if files:  # the tasks read the local files: task files in OUT/tasks override them, on top of the include paths
        from lm_eval.tasks import TaskManager

        local = zero_shot.local_task_files(manager, files, out / "tasks")
        manager = TaskManager(include_path=[str(p) for p in includes] + [str(local)], include_defaults=False)
    zero_shot.load_tasks(manager, names)  # the data loads (or the error is one line) before the model does
    from ssmforge.evaluation.harness import SsmforgeLM

    lm = SsmforgeLM(args.checkpoint, device=args.device, batch_size=args.batch_size, max_length=args.max_length,
                    chunk_length=args.chunk_length, document_prefix=args.document_prefix, tokenizer=args.tokenizer,
                    precision=args.precision)
    results = zero_shot.evaluate(lm, manager, names, args.num_fewshot, args.limit)
    record = zero_shot.results_table(results, lm.num_parameters, str(args.checkpoint))
    path, table = zero_shot.write_results(record, out, args.num_fewshot)
    print(table, end="")
    print(f"results in {path} and .md")
    return 0


def cmd_finetune_glue(args) -> int:
    import json

    from ssmforge.evaluation.glue_tasks import TASKS, check_data_dir, get_task
    from ssmforge.pretrain.config import GLUE_TASKS
    from ssmforge.pretrain.export import check_checkpoint, run_settings

    # every input is checked before torch loads and before anything is written; an unknown task first
    if args.task not in (None, "all"):
        get_task(args.task)
    check_checkpoint(args.checkpoint)
    overrides = list(args.overrides) + ([f"glue.data_dir={json.dumps(args.data_dir)}"] if args.data_dir else [])
    # --config, else the run folder's config.yaml or the export's ssmforge_run.yaml, else the defaults
    config = run_settings(args.checkpoint, overrides, args.config, defaults=True)
    names = list(GLUE_TASKS) if args.task == "all" else [args.task] if args.task else list(config.glue.tasks)
    tasks = {name: get_task(name) for name in names}
    if config.glue.data_dir:
        check_data_dir(tasks.values(), config.glue.data_dir, "--data-dir" if args.data_dir else "glue.data_dir")

    import copy

    from ssmforge.evaluation.glue import GlueRunner, results_table, write_results
    from ssmforge.evaluation.perplexity import training_document_prefix
    from ssmforge.pretrain.launch import init_distributed, shutdown

    # the checkpoint's own training data says which token started its documents (not --config's)
    document_prefix = args.document_prefix or training_document_prefix(run_settings(args.checkpoint))
    backbone, tokenizer, _ = _load_model_and_tokenizer(args)
    world, device = init_distributed()
    try:
        runner = GlueRunner(lambda: copy.deepcopy(backbone), tokenizer, config, world.world_size, world.rank, device,
                            progress=world.is_main and sys.stderr.isatty(), document_prefix=document_prefix)
        results = [runner.run_task(task) for task in tasks.values()]
    finally:
        shutdown()
    if world.is_main:
        out = _default_out(args.checkpoint, args.out, "glue")
        # the submission folder is checked as the GLUE server reads it (against the test files when local)
        summary = write_results(results, TASKS, out, str(args.checkpoint), config.glue.data_dir)
        print(results_table(summary), end="")
        print(f"results in {out}/results.json, submission files in {out}/submission/")
    return 0


def _prepare_part(args, env=None) -> tuple[int, int]:
    """(part, parts) of `prepare --parts N [--part I]`; I defaults to the SLURM array task's index."""
    import os

    env = os.environ if env is None else env
    if args.parts < 1:
        raise SsmforgeError(f"--parts={args.parts} is invalid: must be >= 1")
    if args.part is not None:
        return args.part, args.parts
    if "SLURM_ARRAY_TASK_ID" not in env:
        raise SsmforgeError(f"--parts {args.parts} needs --part I, or to run as a SLURM array task "
                            f"(sbatch --array=0-{args.parts - 1})")
    count = env.get("SLURM_ARRAY_TASK_COUNT")
    if count is not None and int(count) != args.parts:
        raise SsmforgeError(f"--parts {args.parts} but the SLURM array has {count} tasks; every part needs a task "
                            f"(sbatch --array=0-{args.parts - 1})")
    return int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0)), args.parts


def cmd_prepare(args) -> int:
    from ssmforge.pretrain.config import load_config

    config = load_config(args.config, args.overrides)  # before the heavy imports: config errors come back at once
    if args.part is not None and args.parts is None:
        raise SsmforgeError("--part needs --parts N (the number of parts)")
    part, parts = _prepare_part(args) if args.parts is not None else (None, None)
    from ssmforge.data_pipeline.preflight import preflight

    # every input and output checked before any work: a refused prepare writes nothing
    preflight(config, "prepare", "tokenizer" if args.train_tokenizer else "merge" if args.merge else
              "part" if parts is not None else None)
    from ssmforge.data_pipeline import pack
    from ssmforge.data_pipeline.parts import merge_parts, prepare_part

    if args.train_tokenizer:
        path = pack.prepare_tokenizer(config)
        print(f"tokenizer: {path}" if path else f"tokenizer.kind={config.tokenizer.kind}"
              f"{' with a tokenizer.path' if config.tokenizer.path else ''}: nothing to train")
        return 0
    if args.merge:
        manifest = merge_parts(config)
    elif parts is not None:
        result = prepare_part(config, part, parts)
        if result.record:
            written = ", ".join(f"{split['samples']} {name} samples" for name, split in result.record["splits"].items())
            print(f"part {part} of {parts}: {written} written; {result.done} of {parts} parts done")
        if result.manifest is None:
            command = shlex.join(["ssmforge", "prepare", args.config, *args.overrides, "--merge"])
            print(f"the last part to finish merges them (or run `{command}` once all are done)")
            return 0
        manifest = result.manifest
    else:
        manifest = pack.prepare(config)
    for name, split in manifest.splits.items():
        floor = split.entropy_floor_nats_per_token
        print(f"{name}: {split.samples} samples of {manifest.seq_len + 1} tokens, {split.documents} documents"
              + (f", entropy floor {floor:.4f} nats/token" if floor is not None else ""))
    print(f"shards and manifest in {config.data.shard_dir}")
    return 0


def cmd_pretrain(args) -> int:
    from ssmforge.pretrain.config import load_config

    config = load_config(args.config, args.overrides)  # before torch and DeepSpeed load
    from ssmforge.data_pipeline.preflight import preflight

    # every input and output checked (a bad source path, shards missing and the data too large to prepare inside
    # this job, ...): every rank stops now, before torch and DeepSpeed load, and nothing is written
    preflight(config, "pretrain", prepare_command="ssmforge prepare " + shlex.join([args.config, *args.overrides]))
    from ssmforge.pretrain.trainer import train

    try:
        return train(config)
    except TrainingError as e:
        print(f"ssmforge: training stopped: {e}", file=sys.stderr)
        if isinstance(e, LostRankError):
            from ssmforge.pretrain.launch import exit_without_teardown

            exit_without_teardown(3)
        return 3


def cmd_run(args) -> int:
    from ssmforge import stages
    from ssmforge.pretrain.config import load_config_for_jobs

    if int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_STEP_NUM_TASKS") or 1) > 1:
        raise SsmforgeError("ssmforge run starts its stages itself, not under a launcher: use --nproc-per-node N "
                            "for several GPUs of this machine, or ssmforge submit on a SLURM cluster")
    if args.nproc_per_node < 1:
        raise SsmforgeError(f"--nproc-per-node={args.nproc_per_node} is invalid: must be a positive integer")
    config = load_config_for_jobs(args.config, args.overrides)
    only = [name.strip().replace("-", "_") for name in args.only.split(",")] if args.only else None
    plan = stages.plan(config, stages.frozen_config_path(config.run_dir), args.nproc_per_node, only)
    first = plan[0].name if plan else None
    if first in ("prepare", "pretrain"):  # the data's inputs and outputs, before a stage starts
        from ssmforge.data_pipeline.preflight import preflight

        preflight(config, first)
    stages.freeze(config)  # after every refusal: a refused command writes nothing
    return stages.run_stages(config, plan)


def cmd_plan(args) -> int:
    from ssmforge.pretrain.config import load_config

    config = load_config(args.config, [*args.overrides, *([] if any(o.startswith("run_dir=") for o in args.overrides)
                                                          else ["run_dir=unplanned"])])
    if args.gpus < 1:
        raise SsmforgeError(f"--gpus={args.gpus} is invalid: must be a positive integer")
    if not 0 < args.mfu <= 1:
        raise SsmforgeError(f"--mfu={args.mfu} is invalid: a fraction in (0, 1]")
    return print_plan(config, args.gpus, args.gpu, args.gpu_memory_gb, args.mfu, search=True)


def print_plan(config, gpus: int, gpu: str | None, memory_gb: float | None, mfu: float, search: bool,
               file=None) -> int:
    """Plan the config on `gpus` GPUs and print it (to stdout, or `file`); 0 when it fits, 3 when it does not."""
    import torch

    from ssmforge.pretrain.plan import describe, gpu_target, make_plan

    config.train.check_layout(gpus, 1)
    dtype = torch.float32 if config.train.precision == "fp32" else torch.bfloat16
    plan = make_plan(config, gpu_target(gpus, gpu, memory_gb, dtype), mfu, search=search)
    print("\n".join(describe(plan, config)), file=file)
    return 3 if plan.fits is False else 0


def cmd_config_show(args) -> int:
    from ssmforge.pretrain.config import describe, format_settings, load_config

    overrides = list(args.overrides)
    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        overrides.insert(0, args.config)  # `config show key=value`: overrides of the defaults
        args.config = None
    if args.config is None and not any(o.startswith("run_dir=") for o in overrides):
        overrides.insert(0, "run_dir=<run_dir>")  # the defaults have no run folder; paths show relative to it
    print(format_settings(describe(load_config(args.config, overrides))), end="")
    return 0


def cmd_export(args) -> int:
    from ssmforge.pretrain.export import export_run

    out = export_run(args.run_dir, args.out, tag=args.tag)
    print(f"wrote {out}")
    return 0


def cmd_submit(args) -> int:
    from ssmforge.pretrain.config import load_config
    from ssmforge.slurm.submit import SubmitOptions, format_status, run_status, submit

    if args.status:
        print(format_status([run_status(run) for run in args.status]))
        return 0
    if args.config is None:
        raise SsmforgeError("submit needs CONFIG (or --status RUN_DIR)")
    config = load_config(args.config, args.overrides)
    options = SubmitOptions.from_config(
        config.slurm, nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition, account=args.account,
        qos=args.qos, signal_seconds_before_end=args.signal_seconds, max_requeues=args.max_requeues,
        job_name=args.job_name)
    # a layout the job's ranks cannot hold is refused now, not after a wait in the queue
    options.validate()
    config.train.check_layout(options.nodes * options.ntasks_per_node, options.nodes)
    if {"prepare", "pretrain"} & set(config.stages.run):  # a bad path is refused now, not after a wait in the queue
        from ssmforge.data_pipeline.preflight import preflight

        preflight(config, "prepare" if "prepare" in config.stages.run else "pretrain")
    if "pretrain" in config.stages.run and options.gpus_per_node > 0:
        check_plan(config, options, args)
    shape = options.resolve()
    if options.nodes > 1:
        from ssmforge.slurm.resources import node_local_storage

        local = node_local_storage(config.run_dir)
        if local:
            print(f"ssmforge: warning: run_dir={config.run_dir} is on {local}, storage of this machine alone: the "
                  f"{options.nodes} nodes of the job will not share its checkpoints and shards; put run_dir on a "
                  f"shared filesystem", file=sys.stderr)
    jobs = submit(args.config, args.overrides, options, dry_run=args.dry_run, prepare_parts=args.prepare_parts)
    print(f"ssmforge: job shape: {shape}", file=sys.stderr)
    if args.dry_run:
        for i, (stage, script) in enumerate(jobs):
            if len(jobs) > 1:  # the scripts one after the other, each under a header saying when it runs
                after = f", after job {i} succeeded" if i else ""
                print(f"# ---- job {i + 1} of {len(jobs)}: {stage}{after} ----")
            print(script, end="")
        return 0
    for i, (stage, job_id) in enumerate(jobs):
        after = f" (starts after job {jobs[i - 1][1]} succeeded)" if i else ""
        print(f"submitted {stage} job {job_id}{after}")
    print(f"follow the run with: ssmforge submit --status {Path(config.run_dir).resolve()}")
    return 0


def check_plan(config, options, args) -> None:
    """submit's pre-flight: plan the run on its GPUs and refuse, in one line, a config that cannot fit."""
    if args.no_plan_check:
        return
    gpu, memory_gb = args.gpu or config.slurm.gpu, args.gpu_memory_gb or config.slurm.gpu_memory_gb
    if gpu is None and memory_gb is None:
        print("ssmforge: warning: no memory plan (set slurm.gpu or pass --gpu NAME to have ssmforge plan check "
              "that the run fits its GPUs)", file=sys.stderr)
        return
    ranks = options.nodes * options.ntasks_per_node
    # on stderr: a dry run's stdout is the job script alone
    if print_plan(config, ranks, gpu, memory_gb, DEFAULT_MFU, search=False, file=sys.stderr) == 3:
        raise SsmforgeError(f"the run does not fit on {ranks} x {gpu or f'{memory_gb} GiB GPUs'} (plan above; "
                            f"`ssmforge plan` names the largest micro-batch that fits); --no-plan-check submits "
                            f"anyway")


DEFAULT_MFU = 0.4


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (with the command's name) and exit code 2, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"ssmforge: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        # argparse drops a value of exactly '--' (`--seed=--`) and leaves a list where a number belongs
        for arg in args if args is not None else sys.argv[1:]:
            if arg.startswith("-") and arg.endswith("=--"):
                self.error(f"argument {arg.split('=')[0]}: expected a value, got '--'")
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ssmforge",
        description="Pretrain, convert, evaluate and sample state space language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"ssmforge {__version__}")
    # the deepspeed launcher passes --local_rank; ranks are read from the environment (pretrain.launch)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)

    gen = sub.add_parser("generate", help="sample text from a model folder or a freshly initialised model")
    gen.add_argument("checkpoint", nargs="?", help="model folder (ssmforge export or Hugging Face Mamba)")
    gen.add_argument("--random-init", metavar="CONFIG", help="instead of a checkpoint: random weights from a run config")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--tokenizer", help="'byte' or a tokenizer.model / tokenizer.json path")
    gen.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS id to the prompt")
    gen.set_defaults(handler=cmd_generate)

    prep = sub.add_parser("prepare", help="tokenize and pack the config's sources into MDS shards")
    prep.add_argument("config", help="run config (YAML)")
    prep.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    stage = prep.add_mutually_exclusive_group()
    stage.add_argument("--parts", type=int, metavar="N",
                       help="split the work over N jobs (a SLURM array): each writes its own shards, the last to "
                            "finish merges them into one dataset")
    stage.add_argument("--train-tokenizer", action="store_true",
                       help="only train the SentencePiece tokenizer (run once before the parts of --parts)")
    stage.add_argument("--merge", action="store_true",
                       help="merge the finished parts of --parts into one dataset (the last part does it itself)")
    prep.add_argument("--part", type=int, metavar="I",
                      help="this job's part of --parts, 0..N-1 (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN)")
    prep.set_defaults(handler=cmd_prepare)

    run = sub.add_parser("run", help="run the config's stages in order (stages.run: prepare, pretrain, export, "
                                      "eval_ppl, eval_harness, finetune_glue); again to continue where it stopped")
    run.add_argument("config", help="run config (YAML)")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    run.add_argument("--only", metavar="STAGES", help="a comma-separated subset of stages.run, e.g. eval_ppl")
    run.add_argument("--nproc-per-node", type=int, default=1,
                     help="pretrain on this many processes (GPUs) of this machine, through torchrun (default 1)")
    run.set_defaults(handler=cmd_run)

    pre = sub.add_parser("pretrain", help="train a model on prepared shards (resumes from the latest checkpoint)")
    pre.add_argument("config", help="run config (YAML)")
    pre.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    pre.set_defaults(handler=cmd_pretrain)

    pln = sub.add_parser("plan", help="memory per rank and time of a config on N GPUs, traced on fake tensors; "
                                      "exit code 3 when it does not fit")
    pln.add_argument("config", help="run config (YAML)")
    pln.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    pln.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) of the run")
    pln.add_argument("--gpu", help="GPU model, e.g. H100, 'A100 80GB', L40S (memory and peak FLOP/s from tables)")
    pln.add_argument("--gpu-memory-gb", type=float, help="memory of one GPU in GiB (overrides the table)")
    pln.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                     help=f"model FLOPs utilisation assumed for the time estimate (default {DEFAULT_MFU})")
    pln.set_defaults(handler=cmd_plan)

    cfg = sub.add_parser("config", help="inspect run configs")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True, parser_class=OneLineParser)
    show = cfg_sub.add_parser("show", help="print every key of a config (or the defaults): value, type, default "
                                           "and meaning")
    show.add_argument("config", nargs="?", help="run config (YAML); omitted: the defaults")
    show.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    show.set_defaults(handler=cmd_config_show)

    exp = sub.add_parser("export", help="consolidate a run's checkpoint into one model folder (HF format for Mamba)")
    exp.add_argument("run_dir", help="the run folder (holds checkpoints/)")
    exp.add_argument("out", help="output model folder (config.json, model.safetensors, the tokenizer and the run's "
                                 "settings in ssmforge_run.yaml); a new, empty or model folder")
    exp.add_argument("--tag", help="checkpoint to export (default: latest)")
    exp.set_defaults(handler=cmd_export)

    conv = sub.add_parser("convert", help="convert model folders to and from Hugging Face's Mamba format")
    conv.add_argument("source", nargs="?", help="model folder to export (with --to-hf)")
    conv.add_argument("--to-hf", metavar="OUT", help="write a folder that transformers' MambaForCausalLM loads")
    conv.add_argument("--from-hf", metavar="DIR", help="import a transformers MambaForCausalLM folder")
    conv.add_argument("--out", metavar="OUT", help="output folder for --from-hf")
    conv.set_defaults(handler=cmd_convert)

    ppl = sub.add_parser("eval-ppl", help="document-level perplexity (WikiText or local text) of a checkpoint")
    ppl.add_argument("checkpoint", help="run folder, exported model folder or Hugging Face Mamba folder")
    ppl.add_argument("--dataset", nargs="+", metavar="NAME_OR_FILES",
                     help="wikitext-103, wikitext-2, synthetic-heldout (200 documents of the run's synthetic corpus that "
                          "training never saw, with their entropy floor), or local .txt/.jsonl/.parquet files and globs "
                          "(default: eval.dataset of the run, else wikitext-103)")
    ppl.add_argument("--max-length", type=int,
                     help="window in tokens (default: eval.max_length, else the run's training data.seq_len, which "
                          "an export carries in ssmforge_run.yaml, else 2048)")
    ppl.add_argument("--stride", type=int, help="score this many tokens per window (default: the window: no overlap)")
    ppl.add_argument("--batch-size", type=int, help="windows per forward (default: eval.batch_size or 8)")
    ppl.add_argument("--chunk-length", type=int,
                     help="a window longer than this is fed in chunks of it with the recurrent state carried, in "
                          "memory constant in --max-length for SSMs (default: the run's data.seq_len, else 2048)")
    ppl.add_argument("--document-prefix", choices=["eos", "bos"],
                     help="the token each document is read after (default: the one training put before every "
                          "document, from the run's manifest: eos for packed data)")
    ppl.add_argument("--wikitext-detokenize", action="store_true",
                     help="apply the WikiText detokenisation to local files too (always on for wikitext-*)")
    ppl.add_argument("--tokenizer", help="'byte' or a tokenizer.model / tokenizer.json path (default: the checkpoint's)")
    ppl.add_argument("--out", help="results folder (default: CHECKPOINT/eval)")
    ppl.set_defaults(handler=cmd_eval_ppl)

    hx = sub.add_parser("eval-harness", help="lm-evaluation-harness tasks on a checkpoint (default: the Mamba paper's "
                                             "zero-shot suite), with the paper's table")
    hx.add_argument("checkpoint", nargs="?", help="run folder, exported model folder or Hugging Face Mamba folder")
    hx.add_argument("--tasks", help="comma-separated harness tasks (default: lambada_openai,hellaswag,piqa,arc_easy,"
                                    "arc_challenge,winogrande)")
    hx.add_argument("--num-fewshot", type=int, default=0, help="examples before each question (default 0)")
    hx.add_argument("--batch-size", type=int, default=16, help="requests per forward (default 16)")
    hx.add_argument("--limit", type=int, help="documents per task, for a quick look (default: all)")
    hx.add_argument("--device", help="cuda, cuda:N or cpu (default: a GPU if there is one)")
    hx.add_argument("--max-length", type=int,
                    help="context of the harness's windows and truncation (default: the run's data.seq_len, else 2048)")
    hx.add_argument("--chunk-length", type=int,
                    help="longer windows are fed in chunks of this through the recurrent state (default: the run's "
                         "data.seq_len, else 2048)")
    hx.add_argument("--document-prefix", choices=["eos", "bos"],
                    help="the token documents and empty contexts follow (default: the one training put before every "
                         "document, from the run's manifest)")
    hx.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast on the GPU")
    hx.add_argument("--tokenizer", help="'byte' or a tokenizer.model / tokenizer.json path (default: the checkpoint's)")
    hx.add_argument("--data-dir", help="read each task's data from DIR/<task>/<split>.jsonl (written by --save-data) "
                                       "instead of the Hugging Face hub")
    hx.add_argument("--save-data", metavar="DIR", help="write the tasks' data to DIR for --data-dir, and stop "
                                                       "(needs the hub; no CHECKPOINT)")
    hx.add_argument("--include-path", action="append", metavar="DIR",
                    help="folder of extra task YAMLs (lm-evaluation-harness's --include_path); may repeat")
    hx.add_argument("--out", help="results folder (default: CHECKPOINT/eval/harness)")
    hx.set_defaults(handler=cmd_eval_harness)

    ft = sub.add_parser("finetune-glue", help="fine-tune and evaluate a checkpoint on GLUE tasks")
    ft.add_argument("checkpoint", help="run folder, exported model folder or Hugging Face Mamba folder")
    ft.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. glue.lr=5e-5 glue.epochs=3")
    ft.add_argument("--task", help="cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli or all (default: glue.tasks)")
    ft.add_argument("--data-dir", help="GLUE TSV folder (default: glue.data_dir, else the hub)")
    ft.add_argument("--config", help="run config supplying the glue/train/deepspeed settings (default: the run "
                                     "folder's config.yaml or the export's ssmforge_run.yaml, else the defaults)")
    ft.add_argument("--tokenizer", help="'byte' or a tokenizer.model / tokenizer.json path (default: the checkpoint's)")
    ft.add_argument("--document-prefix", choices=["eos", "bos"],
                    help="the token each input starts with (default: the one training put before every document, "
                         "from the run's manifest: eos for packed data)")
    ft.add_argument("--out", help="results folder (default: CHECKPOINT/eval/glue)")
    ft.set_defaults(handler=cmd_finetune_glue)

    sbm = sub.add_parser("submit", help="submit a pretraining job to SLURM (requeues and resumes itself)")
    sbm.add_argument("config", nargs="?", help="run config (YAML)")
    sbm.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    sbm.add_argument("--nodes", type=int, help="default: slurm.nodes")
    sbm.add_argument("--prepare-parts", type=int, default=1,
                     help="when the shards must be prepared first: as an array of this many jobs (default 1)")
    sbm.add_argument("--gpus-per-node", type=int,
                     help="one task per GPU; 0 for a CPU job (default: slurm.gpus_per_node)")
    sbm.add_argument("--tasks-per-node", type=int, help="tasks per node of a CPU job (--gpus-per-node 0)")
    sbm.add_argument("--cpus-per-task", type=int, help="default: slurm.cpus_per_task")
    sbm.add_argument("--time", help="time limit, HH:MM:SS or D-HH:MM:SS (default: slurm.time)")
    sbm.add_argument("--partition")
    sbm.add_argument("--account")
    sbm.add_argument("--qos")
    sbm.add_argument("--job-name", help="default: ssmforge-<run folder name>")
    sbm.add_argument("--signal-seconds", type=int,
                     help="USR1 this many seconds before the time limit (default: slurm.signal_seconds_before_end)")
    sbm.add_argument("--max-requeues", type=int, help="default: slurm.max_requeues")
    sbm.add_argument("--gpu", help="GPU model, for the memory plan checked before submitting (default: slurm.gpu)")
    sbm.add_argument("--gpu-memory-gb", type=float, help="GPU memory in GiB (default: slurm.gpu_memory_gb)")
    sbm.add_argument("--no-plan-check", action="store_true", help="submit even when the plan says it cannot fit")
    sbm.add_argument("--dry-run", action="store_true", help="print the job script instead of submitting it")
    sbm.add_argument("--status", nargs="+", metavar="RUN_DIR",
                     help="show job id, state, restarts, last step and checkpoint of run folders")
    sbm.set_defaults(handler=cmd_submit)
    return parser


def keep_torch_extensions_per_environment() -> None:
    """torch builds DeepSpeed's CPU ops into ~/.cache/torch_extensions/<python>_<torch>/, one folder for every
    environment with the same versions, so two environments on one machine (two DeepSpeed copies) rebuild
    each other's ops at every start (about a minute each). Each environment (sys.prefix) gets its own
    folder, unless TORCH_EXTENSIONS_DIR says where."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    os.environ["TORCH_EXTENSIONS_DIR"] = str(cache / "torch_extensions" / f"env-{key}")


def main(argv: list[str] | None = None) -> int:
    keep_torch_extensions_per_environment()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come after the options too
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configure_logging(args.verbose)
    try:
        return args.handler(args)
    except SsmforgeError as e:
        print(f"ssmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssmforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
