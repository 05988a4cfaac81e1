"""The lm-evaluation-harness plugin (`--model ssmforge`, evaluation/harness.py) and `ssmforge eval-harness`, on
tiny local tasks of every output type (loglikelihood, multiple choice, rolling loglikelihood, generate_until)
written by the tests: on a Mamba export the plugin gives what the harness's own `hf` model (transformers'
MambaForCausalLM) gives on the same folder, request by request; on a hybrid of every mixer it gives a direct
computation with our model; the command writes the paper's table and reads tasks' data from a local folder;
`ssmforge run` runs it as a stage. Nothing touches the network."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from ssmforge.evaluation import zero_shot  # noqa: E402

from .conftest import ROOT, ssmforge  # noqa: E402
from .test_perplexity import rolling_windows  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TEXT = ("The quick brown fox jumps over the lazy dog, then naps under the old oak tree. "
        "Another paragraph follows, with numbers 1 2 3 and more words to score.\n")
ROWS = {
    "tiny_ll": [{"text": "The quick brown fox jumps over the lazy dog"}, {"text": "then naps under the old oak"},
                {"text": "Another"}, {"text": "with numbers 1 2 3 and more words"}],
    "tiny_mc": [{"query": "The quick brown", "choices": [" fox", " dog", " oak tree"], "label": 0},
                {"query": "Another paragraph", "choices": [" follows", " naps", " jumps over"], "label": 0},
                {"query": "numbers 1 2", "choices": [" 3", " words"], "label": 1}],
    "tiny_rolling": [{"text": TEXT}, {"text": "Short one."}, {"text": TEXT[40:] + TEXT}],
    "tiny_gen": [{"question": "The quick brown fox", "answer": " jumps"}, {"question": "old oak", "answer": " tree"},
                 {"question": "numbers 1 2 3 and more", "answer": " words"}],
}
TASKS = {
    "tiny_ll": {"output_type": "loglikelihood", "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
    "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")]},
    "tiny_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                     "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in (
                         ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                         ("bits_per_byte", "bits_per_byte"))]},
    "tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                 "generation_kwargs": {"until": ["\n", "."], "do_sample": False, "max_gen_toks": 6},
                 "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
}
MAX_LENGTH = 24  # rolling documents span several windows


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """One task YAML per output type, each reading its local jsonl file (dataset_path: json)."""
    import yaml

    folder = tmp_path_factory.mktemp("tasks")
    for name, fields in TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in ROWS[name]))
        config = {"task": name, "dataset_path": "json", "dataset_name": None,
                  "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test", **fields}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def transformers_export(folder, family: str):
    """A tiny random Mamba or Mamba-2 written as `ssmforge export` writes it (config.json + model.safetensors in
    transformers' format, a GPT-NeoX-style tokenizer.json: <|endoftext|> is BOS and EOS), its vocabulary unpadded
    so that both sides rank the same tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ssmforge.models import LanguageModel, Mamba2Config, MambaConfig, ModelConfig, save_pretrained

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([TEXT * 3], trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(family=family, d_model=32, n_layer=2, vocab_size=tok.get_vocab_size(),
                                      pad_vocab_size_multiple=1, mamba=MambaConfig(d_state=8),
                                      mamba2=Mamba2Config(d_state=8, headdim=8, chunk_size=16)))
    out = folder / "export"
    save_pretrained(model, out, token_ids={"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0},
                    extra_files={"tokenizer.json": folder / "tokenizer.json"})
    return out


@pytest.fixture(scope="module")
def mamba_export(tmp_path_factory):
    return transformers_export(tmp_path_factory.mktemp("mamba"), "mamba")


@pytest.fixture(scope="module")
def hybrid_export(tmp_path_factory):
    """A tiny hybrid of every mixer (Mamba, Mamba-2, GSS, attention, MLP): no transformers class reads it."""
    from ssmforge.models import (AttentionConfig, GSSConfig, LanguageModel, Mamba2Config, MambaConfig, ModelConfig,
                                 save_pretrained)

    torch.manual_seed(1)
    config = ModelConfig(family="hybrid", layer_pattern="M2G*-", n_layer=5, d_model=32, vocab_size=260,
                         mamba=MambaConfig(d_state=8), mamba2=Mamba2Config(d_state=8, headdim=8, chunk_size=16),
                         gss=GSSConfig(d_state=8), attention=AttentionConfig(heads=4))
    out = tmp_path_factory.mktemp("hybrid") / "export"
    save_pretrained(LanguageModel(config), out, token_ids={"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
                    byte_tokenizer=True)
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


def evaluate(lm, task_dir, tasks=tuple(TASKS)) -> dict:
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=list(tasks), log_samples=True,
                           task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))


def responses(results) -> dict:
    """(task, doc_id, request index) -> (request arguments, the model's answer) of every request."""
    out = {}
    for task, samples in results["samples"].items():
        for sample in samples:
            for i, (args, resp) in enumerate(zip(sample["arguments"], sample["resps"])):
                out[task, sample["doc_id"], i] = (tuple(args.values()) if isinstance(args, dict) else tuple(args),
                                                  resp[0])
    return out


def compare(ours: dict, theirs: dict) -> float:
    """Every answer equal (log-likelihoods to 1e-4, greedy flags and generated text exactly); the largest
    log-likelihood difference."""
    assert ours.keys() == theirs.keys() and len(ours) == 4 + 8 + 3 + 3
    worst = 0.0
    for key, (args, answer) in ours.items():
        their_args, their_answer = theirs[key]
        assert args[0] == their_args[0], key
        if key[0] == "tiny_gen":
            assert answer == their_answer, (key, answer, their_answer)
            continue
        value, their_value = (answer[0], their_answer[0]) if isinstance(answer, (tuple, list)) else (answer,
                                                                                                     their_answer)
        worst = max(worst, abs(float(value) - float(their_value)))
        assert float(value) == pytest.approx(float(their_value), abs=1e-4), key
        if isinstance(answer, (tuple, list)):
            assert bool(answer[1]) == bool(their_answer[1]), key
    return worst


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_the_plugin_equals_the_harness_hf_model_on_an_export(family, mamba_export, task_dir, tmp_path):
    """transformers' MambaForCausalLM / Mamba2ForCausalLM read the export under `--model hf`."""
    from lm_eval.models.huggingface import HFLM

    from ssmforge.evaluation.harness import SsmforgeLM

    export = mamba_export if family == "mamba" else transformers_export(tmp_path, family)
    ours = SsmforgeLM(pretrained=str(export), device="cpu", batch_size=3, max_length=MAX_LENGTH,
                      chunk_length=10)  # batches of 3 rows, windows fed to the state in chunks of 10
    theirs = HFLM(pretrained=str(export), device="cpu", batch_size=1, max_length=MAX_LENGTH, dtype="float32")
    assert ours.model.config.family == family
    assert ours.prefix_token_id == theirs.prefix_token_id == 0
    ours_results, their_results = evaluate(ours, task_dir), evaluate(theirs, task_dir)
    worst = compare(responses(ours_results), responses(their_results))
    print(f"{family}: largest log-likelihood difference, ssmforge vs hf: {worst:.2e}")
    answers = responses(ours_results)
    documents = [args[0] for (task, _, _), (args, _) in answers.items() if task == "tiny_rolling"]
    assert len(ours.tok_encode(documents[0])) > 2 * MAX_LENGTH  # the long documents span several windows
    assert any(text for (task, _, _), (_, text) in answers.items() if task == "tiny_gen")  # something generated
    for task, metrics in ours_results["results"].items():
        for key, value in metrics.items():
            if isinstance(value, float):
                assert value == pytest.approx(their_results["results"][task][key], rel=1e-4, abs=1e-6), (task, key)


def test_the_plugin_on_a_hybrid_equals_a_direct_computation(hybrid_export, task_dir):
    """Every request recomputed with plain forwards of our model over the whole sequence (no batching, no
    padding, no state): log-likelihoods, greedy flags, rolling windows and greedy generations."""
    from ssmforge.data_pipeline.tokenizer import ByteTokenizer
    from ssmforge.evaluation.harness import SsmforgeLM
    from ssmforge.models import load_pretrained

    lm = SsmforgeLM(pretrained=str(hybrid_export), device="cpu", batch_size=4, max_length=16, chunk_length=8)
    model, tok = load_pretrained(hybrid_export).eval(), ByteTokenizer()
    assert lm.model.config.layer_kinds == ["mamba", "mamba2", "gss", "attention", "mlp"]
    assert lm.prefix_token_id == tok.eos_id  # documents follow EOS, as packed training data has them
    checked = set()
    with torch.no_grad():
        for (task, _, _), (args, answer) in responses(evaluate(lm, task_dir)).items():
            if task == "tiny_rolling":  # the harness's own rolling windows, each one forward
                expected = 0.0
                for context, continuation in rolling_windows(tok.encode(args[0]), tok.eos_id, 16):
                    logp = F.log_softmax(model(torch.tensor([(context + continuation)[:-1]]))[0], -1)
                    expected += logp[-len(continuation):][torch.arange(len(continuation)),
                                                          torch.tensor(continuation)].sum().item()
                assert answer == pytest.approx(expected, abs=1e-4)
            elif task == "tiny_gen":
                assert answer == greedy_text(model, tok, args[0], args[1])
            else:
                context, continuation = args
                seq = (([tok.eos_id] if not context else []) + tok.encode(context + continuation))[-17:]
                n = min(len(tok.encode(continuation)), 16)
                logp = F.log_softmax(model(torch.tensor([seq[:-1]]))[0, -n:], -1)
                targets = torch.tensor(seq[-n:])
                assert answer[0] == pytest.approx(logp[torch.arange(n), targets].sum().item(), abs=1e-4)
                assert answer[1] == bool((logp.argmax(-1) == targets).all())
            checked.add(task)
    assert checked == set(TASKS)


def greedy_text(model, tok, context: str, gen_kwargs: dict, max_length: int = 16) -> str:
    """Greedy decoding by full forwards over the growing sequence, cut at EOS or the first stop string."""
    ids, new = tok.encode(context)[-(max_length - gen_kwargs["max_gen_toks"]):], []
    for _ in range(gen_kwargs["max_gen_toks"]):
        token = int(model(torch.tensor([ids + new]))[0, -1, :tok.vocab_size].argmax())
        if token == tok.eos_id:
            break
        new.append(token)
        if any(stop in tok.decode(new) for stop in gen_kwargs["until"]):
            break
    text = tok.decode(new)
    for stop in gen_kwargs["until"]:
        text = text.split(stop)[0]
    return text


def test_a_batch_of_generations_equals_each_row_decoded_alone(hybrid_export):
    """Four contexts of one length go through one batch, and their rows end at different steps (one with
    nothing generated, one early, two at max_gen_toks). Each text equals greedy decoding of its row alone by
    full forwards."""
    from lm_eval.api.instance import Instance

    from ssmforge.data_pipeline.tokenizer import ByteTokenizer
    from ssmforge.evaluation.harness import SsmforgeLM
    from ssmforge.models import load_pretrained

    lm = SsmforgeLM(pretrained=str(hybrid_export), device="cpu", batch_size=4, max_length=32)
    model, tok = load_pretrained(hybrid_export).eval(), ByteTokenizer()
    contexts = ["alpha beta", "gamma delt", "the quick ", "0123456789"]  # 10 bytes each: one batch
    gen_kwargs = {"until": ["z"], "do_sample": False, "max_gen_toks": 12}
    requests = [Instance("generate_until", {}, (context, gen_kwargs), i) for i, context in enumerate(contexts)]
    batches, generate = [], lm._generate
    lm._generate = lambda rows, *args: batches.append(len(rows)) or generate(rows, *args)
    texts = lm.generate_until(requests, disable_tqdm=True)
    assert batches == [4]
    with torch.no_grad():
        alone = [greedy_text(model, tok, context, gen_kwargs, max_length=32) for context in contexts]
    assert texts == alone
    # (the random model's bytes decode to replacement characters: lengths in characters, not tokens)
    assert texts[1] == "" and 0 < len(texts[0]) < min(len(texts[2]), len(texts[3])), texts


def test_lm_eval_s_command_line_with_the_plugin_gives_the_in_process_results(mamba_export, task_dir, tmp_path):
    """`python -m ssmforge.evaluation.harness`, lm_eval's own command line for releases that read no entry
    points, evaluates the export like SsmforgeLM in this process."""
    from ssmforge.evaluation.harness import SsmforgeLM

    args = ["--model", "ssmforge", "--model_args", f"pretrained={mamba_export},max_length={MAX_LENGTH}",
            "--tasks", "tiny_ll,tiny_mc", "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "2",
            "--output_path", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-m", "ssmforge.evaluation.harness", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **OFFLINE})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = (tmp_path / "out").rglob("results_*.json")
    from_command = json.loads(written.read_text())["results"]
    in_process = evaluate(SsmforgeLM(pretrained=str(mamba_export), device="cpu", max_length=MAX_LENGTH), task_dir,
                          ("tiny_ll", "tiny_mc"))["results"]
    assert set(from_command) == {"tiny_ll", "tiny_mc"}
    for task, metrics in in_process.items():
        numbers = {k: v for k, v in metrics.items() if isinstance(v, float)}
        assert numbers and all(from_command[task][k] == pytest.approx(v, abs=1e-6) for k, v in numbers.items()), task


def test_the_entry_point_names_the_plugin():
    """pyproject's entry point (group lm_eval.models), which lm-eval releases that read it load by themselves;
    0.4.13 reads none, so importing the module (eval-harness does) registers the name."""
    from importlib.metadata import entry_points

    from lm_eval.api.registry import get_model

    from ssmforge.evaluation.harness import SsmforgeLM

    (entry,) = [e for e in entry_points(group="lm_eval.models") if e.name == "ssmforge"]
    assert entry.load() is SsmforgeLM and get_model("ssmforge") is SsmforgeLM


def test_the_paper_table_matches_a_checkpoint_of_the_paper_s_sizes():
    results = {"results": {
        "lambada_openai": {"alias": "lambada_openai", "perplexity,none": 8.5, "perplexity_stderr,none": 0.2,
                           "acc,none": 0.55, "acc_stderr,none": 0.01},
        "hellaswag": {"acc,none": 0.4, "acc_norm,none": 0.46}, "piqa": {"acc,none": 0.69, "acc_norm,none": 0.7},
        "arc_easy": {"acc,none": 0.55}, "arc_challenge": {"acc,none": 0.25, "acc_norm,none": 0.28},
        "winogrande": {"acc,none": 0.55, "sample_len": 1267}}}
    record = zero_shot.results_table(results, 371_516_416, "ckpt")
    assert record["paper_model"] == "Mamba-370M"
    rows = {(r["task"], r["metric"]): r for r in record["rows"]}
    assert len(rows) == 10  # sample_len is no metric
    assert (rows["lambada_openai", "perplexity"]["value"], rows["lambada_openai", "perplexity"]["paper"]) == (8.5, 8.14)
    assert rows["lambada_openai", "acc"]["value"] == pytest.approx(55.0)
    assert rows["lambada_openai", "acc"]["stderr"] == pytest.approx(1.0)
    assert rows["hellaswag", "acc_norm"]["paper"] == 46.5 and rows["hellaswag", "acc"]["paper"] is None
    assert rows["arc_challenge", "acc_norm"]["paper"] == 28.0 and rows["winogrande", "acc"]["paper"] == 55.3
    assert record["average_accuracy"] == pytest.approx((55 + 46 + 69 + 55 + 28 + 55) / 6)
    table = zero_shot.markdown(record, 0)
    assert "| task | metric | value | stderr | Mamba-370M |" in table
    assert "| hellaswag | acc_norm | 46.00 |  | 46.50 |" in table
    assert [zero_shot.paper_model(n) for n in (129e6, 118e6, 200e6, 793e6, 1.37e9, 2.77e9, 3.2e9)] == [
        "Mamba-130M", "Mamba-130M", None, "Mamba-790M", "Mamba-1.4B", "Mamba-2.8B", None]
    assert zero_shot.results_table(results, 200e6, "c")["paper_model"] is None


def run_command(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(ssmforge(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **OFFLINE})


def in_percent(metric: str) -> float:
    return 100.0 if metric.startswith("acc") or metric == "exact_match" else 1.0


def test_the_command_reads_tasks_data_from_a_local_folder(mamba_export, task_dir, tmp_path):
    """--save-data writes each task's splits where the hub is reachable (here: the tasks' own local files); on
    the offline cluster --data-dir reads them instead of the task's dataset_path, and the results are the
    plugin's on the original tasks."""
    from ssmforge.evaluation.harness import SsmforgeLM

    names, data, out = ",".join(TASKS), tmp_path / "data", tmp_path / "out"
    saved = run_command("eval-harness", "--save-data", data, "--tasks", names, "--include-path", task_dir)
    assert saved.returncode == 0, saved.stderr[-3000:]
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jsonl")) == [
        f"{name}/test.jsonl" for name in sorted(TASKS)]
    moved = tmp_path / "moved-tasks"  # the task files' own data is gone: only --data-dir can serve it
    moved.mkdir()
    for name in TASKS:
        (moved / f"{name}.yaml").write_text((task_dir / f"{name}.yaml").read_text().replace(str(task_dir), "/gone"))
    proc = run_command("eval-harness", mamba_export, "--tasks", names, "--include-path", moved, "--data-dir", data,
                       "--max-length", MAX_LENGTH, "--batch-size", 2, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dataset_path: json" in (out / "tasks" / "tiny_ll.yaml").read_text()  # what the harness was given
    record = json.loads((out / "zero-shot.json").read_text())
    assert "| tiny_mc | acc_norm |" in (out / "zero-shot.md").read_text() and "| tiny_mc | acc |" in proc.stdout
    assert record["paper_model"] is None and record["parameters"] > 0 and len(record["rows"]) == 2 + 2 + 3 + 1
    expected = evaluate(SsmforgeLM(pretrained=str(mamba_export), device="cpu", max_length=MAX_LENGTH), task_dir)
    for row in record["rows"]:
        value = expected["results"][row["task"]][f"{row['metric']},{row['filter']}"]
        assert row["value"] == pytest.approx(value * in_percent(row["metric"]), rel=1e-5), row


def test_the_paper_suite_runs_offline_from_a_data_dir(mamba_export, tmp_path):
    """The six tasks of the Mamba paper's suite, the harness's own task files, reading a few made-up rows of
    each from --data-dir (the layout --save-data writes): the documented offline recipe end to end."""
    rows = {
        "lambada_openai": {"test": [{"text": "The quick brown fox jumps over the lazy dog"}]},
        "hellaswag": {split: [{"ind": 0, "activity_label": "Naps", "ctx_a": "The fox naps under the old oak.",
                               "ctx_b": "then it", "ctx": "The fox naps under the old oak. then it",
                               "endings": ["jumps.", "naps.", "scores [title]."], "source_id": "x", "split": "val",
                               "split_type": "indomain", "label": "1"}] for split in ("train", "validation")},
        "piqa": {split: [{"goal": "jump over a dog", "sol1": "jump", "sol2": "nap", "label": 0}]
                 for split in ("train", "validation")},
        "winogrande": {split: [{"sentence": "The fox jumps over the dog because _ is quick.", "option1": "fox",
                                "option2": "dog", "answer": "1"}] for split in ("train", "validation")},
        **{task: {split: [{"id": "q", "question": "Who naps?", "answerKey": "B",
                           "choices": {"text": ["the oak", "the fox"], "label": ["A", "B"]}}]
                  for split in ("train", "validation", "test")} for task in ("arc_easy", "arc_challenge")},
    }
    for task, splits in rows.items():
        for split, docs in splits.items():
            (tmp_path / "data" / task).mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / task / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    proc = run_command("eval-harness", mamba_export, "--data-dir", tmp_path / "data", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "zero-shot.json").read_text())
    assert [(r["task"], r["metric"]) for r in record["rows"]] == [
        ("lambada_openai", "perplexity"), ("lambada_openai", "acc"), ("hellaswag", "acc"), ("hellaswag", "acc_norm"),
        ("piqa", "acc"), ("piqa", "acc_norm"), ("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("arc_challenge", "acc"),
        ("arc_challenge", "acc_norm"), ("winogrande", "acc")]
    assert record["n_samples"]["hellaswag"]["effective"] == 1 and record["average_accuracy"] is not None
    assert "| average of the six accuracies |" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (("--limit", "0"), "--limit=0 is invalid: must be >= 1"),
    (("--batch-size", "0"), "--batch-size=0 is invalid: must be >= 1"),
    (("--data-dir", "{missing}"), "--data-dir {missing}: no such folder"),
    (("--data-dir", "{empty}", "--tasks", "hellaswag"), "--data-dir {empty}: no hellaswag/<split>.jsonl; write them "
     "with `ssmforge eval-harness --save-data {empty} --tasks hellaswag` where the Hugging Face hub is reachable"),
])
def test_command_errors_are_one_line(mamba_export, tmp_path, args, message):
    """Refused before the task index is built and the model loads."""
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    paths["empty"].mkdir()
    proc = run_command("eval-harness", mamba_export, *(a.format(**paths) for a in args), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"ssmforge: error: {message.format(**paths)}"]


def test_run_runs_the_eval_harness_stage_and_skips_it_when_done(mamba_export, task_dir, tmp_path):
    """`ssmforge run` with stages.run=[eval_harness] on an export: the stage runs eval-harness with the run's
    harness section, is recorded, and is skipped when run again with the same settings."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "ssmforge", "run", str(ROOT / "configs" / "tiny.yaml"), f"run_dir={run_dir}",
               "stages.run=[eval_harness]", f"stages.export_dir={mamba_export}", "harness.tasks=[tiny_ll,tiny_mc]",
               f"harness.include_path={task_dir}", "harness.limit=2", "harness.batch_size=2"]
    env = {**os.environ, **OFFLINE}
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stage = [line for line in first.stdout.splitlines() if line.startswith("stage 1/1 eval_harness: ")]
    assert "eval-harness" in stage[0] and "--tasks tiny_ll,tiny_mc" in stage[0] and "--limit 2" in stage[0]
    assert stage[-1].startswith("stage 1/1 eval_harness: done in")
    record = json.loads((run_dir / "eval" / "harness" / "zero-shot.json").read_text())
    assert record["n_samples"]["tiny_ll"]["effective"] == 2
    assert {row["task"] for row in record["rows"]} == {"tiny_ll", "tiny_mc"}
    assert "eval_harness" in json.loads((run_dir / "stages" / "state.json").read_text())
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "stage 1/1 eval_harness: skipped, done for this checkpoint" in again.stdout
