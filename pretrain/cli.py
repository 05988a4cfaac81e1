"""The `ssmforge` command: one entry point, one subcommand per stage.

User mistakes (SsmforgeError) print as one line and exit with code 2; argparse usage errors do too.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.errors import CheckpointError, DataError, SsmforgeError

log = logging.getLogger("ssmforge")


def _load_model_and_tokenizer(args):
    import torch

    from data_pipeline.tokenizer import find_tokenizer, load_tokenizer
    from models import LanguageModel, load_pretrained

    from .config import load_config

    if args.random_init:
        config = load_config(args.random_init)
        torch.manual_seed(config.seed)
        model = LanguageModel(config.model)
        log.info("random weights from %s (%.2fM parameters): expect noise, not text", args.random_init,
                 model.num_parameters() / 1e6)
        tokenizer = load_tokenizer(config.tokenizer.kind, config.tokenizer.path)
    else:
        model = load_pretrained(args.checkpoint)
        tokenizer = find_tokenizer(args.checkpoint)
    if args.tokenizer:
        tokenizer = load_tokenizer("byte") if args.tokenizer == "byte" else _tokenizer_from_path(args.tokenizer)
    if tokenizer is None:
        raise DataError(f"{args.checkpoint}: no tokenizer.model or tokenizer.json in the model folder; "
                        f"pass --tokenizer PATH (or --tokenizer byte)")
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary holds "
                              f"{model.config.padded_vocab_size} (model.vocab_size)")
    return model.eval(), tokenizer


def _tokenizer_from_path(path: str):
    from data_pipeline.tokenizer import load_tokenizer

    kind = "hf" if path.endswith(".json") else "sentencepiece"
    return load_tokenizer(kind, path)


def cmd_generate(args) -> int:
    import torch

    from models import generate
    from models.generation import check_sampling

    if (args.checkpoint is None) == (args.random_init is None):
        raise SsmforgeError("generate needs exactly one of CHECKPOINT or --random-init CONFIG")
    if args.max_new_tokens < 0:
        raise SsmforgeError(f"--max-new-tokens={args.max_new_tokens} is invalid: must be >= 0")
    check_sampling(args.temperature, args.top_k, args.top_p)
    model, tokenizer = _load_model_and_tokenizer(args)
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
    from data_pipeline.tokenizer import TOKENIZER_FILES
    from models import load_pretrained, save_pretrained

    if args.from_hf:
        source, out = args.from_hf, args.out
        if out is None:
            raise SsmforgeError("convert --from-hf DIR needs --out OUT")
    else:
        source, out = args.source, args.to_hf
        if source is None or out is None:
            raise SsmforgeError("convert needs SOURCE --to-hf OUT, or --from-hf DIR --out OUT")
    source = Path(source)
    model = load_pretrained(source)
    extra = {name: source / name for name in TOKENIZER_FILES if (source / name).is_file()}
    save_pretrained(model, out, extra_files=extra)
    cfg = model.config
    print(f"wrote {out}: {cfg.family}, {cfg.n_layer} layers, d_model {cfg.d_model}, vocab {cfg.padded_vocab_size}, "
          f"{model.num_parameters() / 1e6:.2f}M parameters" + (f", tokenizer {', '.join(extra)}" if extra else ""))
    return 0


def cmd_prepare(args) -> int:
    from data_pipeline.pack import prepare

    from .config import load_config

    config = load_config(args.config, args.overrides)
    manifest = prepare(config)
    for name, split in manifest.splits.items():
        floor = split.entropy_floor_nats_per_token
        print(f"{name}: {split.samples} samples of {manifest.seq_len + 1} tokens, {split.documents} documents"
              + (f", entropy floor {floor:.4f} nats/token" if floor is not None else ""))
    print(f"shards and manifest in {config.data.shard_dir}")
    return 0


def cmd_pretrain(args) -> int:
    from .config import load_config
    from .trainer import TrainingError, train

    config = load_config(args.config, args.overrides)
    try:
        return train(config)
    except TrainingError as e:
        print(f"ssmforge: training stopped: {e}", file=sys.stderr)
        return 3


def cmd_export(args) -> int:
    from .export import export_run

    out = export_run(args.run_dir, args.out, tag=args.tag)
    print(f"wrote {out}")
    return 0


def cmd_submit(args) -> int:
    from .config import load_config
    from .submit import SubmitOptions, format_status, run_status, submit

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
    result = submit(args.config, args.overrides, options, dry_run=args.dry_run)
    if args.dry_run:
        print(result, end="")
    else:
        print(f"submitted job {result}; follow it with: ssmforge submit --status {Path(config.run_dir).resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssmforge",
        description="Pretrain, convert, evaluate and sample state space language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # the deepspeed launcher passes --local_rank; ranks are read from the environment (pretrain.launch)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    prep.set_defaults(handler=cmd_prepare)

    pre = sub.add_parser("pretrain", help="train a model on prepared shards (resumes from the latest checkpoint)")
    pre.add_argument("config", help="run config (YAML)")
    pre.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    pre.set_defaults(handler=cmd_pretrain)

    exp = sub.add_parser("export", help="consolidate a run's checkpoint into one model folder (HF format for Mamba)")
    exp.add_argument("run_dir", help="the run folder (holds checkpoints/)")
    exp.add_argument("out", help="output model folder")
    exp.add_argument("--tag", help="checkpoint to export (default: latest)")
    exp.set_defaults(handler=cmd_export)

    conv = sub.add_parser("convert", help="convert model folders to and from Hugging Face's Mamba format")
    conv.add_argument("source", nargs="?", help="model folder to export (with --to-hf)")
    conv.add_argument("--to-hf", metavar="OUT", help="write a folder that transformers' MambaForCausalLM loads")
    conv.add_argument("--from-hf", metavar="DIR", help="import a transformers MambaForCausalLM folder")
    conv.add_argument("--out", metavar="OUT", help="output folder for --from-hf")
    conv.set_defaults(handler=cmd_convert)

    sbm = sub.add_parser("submit", help="submit a pretraining job to SLURM (requeues and resumes itself)")
    sbm.add_argument("config", nargs="?", help="run config (YAML)")
    sbm.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    sbm.add_argument("--nodes", type=int, help="default: slurm.nodes")
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
    sbm.add_argument("--dry-run", action="store_true", help="print the job script instead of submitting it")
    sbm.add_argument("--status", nargs="+", metavar="RUN_DIR",
                     help="show job id, state, restarts, last step and checkpoint of run folders")
    sbm.set_defaults(handler=cmd_submit)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
