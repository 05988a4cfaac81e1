"""lm-evaluation-harness plugin: `--model ssmforge` evaluates any ssmforge checkpoint (every family, GSS and
hybrids included, which have no transformers class) with the harness's tasks.

    lm_eval --model ssmforge --model_args pretrained=RUN_OR_EXPORT_DIR --tasks lambada_openai,hellaswag

Registration: `@register_model("ssmforge")` below, and the entry point `ssmforge` of group `lm_eval.models`
(pyproject.toml). lm-eval 0.4.13 reads no entry points: there the harness knows the model once this module
is imported, which `ssmforge eval-harness` and `python -m ssmforge.evaluation.harness ARGS` (lm_eval's own
command line, ARGS as for `lm_eval`) do. Releases that discover `lm_eval.models` entry points need neither.

The three request types, each batched (`batch_size` rows of similar length per forward):
  - loglikelihood: (context, continuation) -> (sum of log P(continuation tokens), whether each is the
    argmax), on the last max_length + 1 tokens as the harness's `hf` model cuts them;
  - loglikelihood_rolling: a document scored in windows of max_length tokens after the prefix token
    (perplexity.scoring_windows, the harness's rolling windows);
  - generate_until: our recurrent decoding (models.generation.generate): one parallel prefill, then one
    state step per token, stopping at EOS or a stop string; greedy unless the task samples.
A window longer than chunk_length is fed chunk by chunk through the model's state (perplexity.token_nll).

Conditioning: the prefix token (an empty context, the start of a rolling document) is the token training
put before every document, from the run's manifest (EOS for data packed by ssmforge), as eval-ppl reads it.
"""
from __future__ import annotations

import json
import logging
import sys
from contextlib import nullcontext

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ssmforge.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_LENGTH = 2048  # max_length and chunk_length of a folder that carries no run settings
PRECISIONS = ("fp32", "bf16")


def pick_device(device: str | None):
    """The torch device to run on: `device`, else the first GPU, else the CPU."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device} is not a torch device: use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: CUDA is not available on this machine; use device=cpu")
    return device


def _batch_size(batch_size, max_batch_size) -> int:
    """An integer batch size; the harness's 'auto' (which probes memory for HF models) is max_batch_size, or 32."""
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        size = int(max_batch_size or 32)
        log.info("batch_size=%s: %d rows per forward (set batch_size=N to choose)", batch_size, size)
        return size
    size = int(batch_size)
    if size < 1:
        raise ConfigError(f"batch_size={batch_size} is invalid: must be >= 1")
    return size


@register_model("ssmforge")
class SsmforgeLM(TemplateLM):
    """The harness's view of an ssmforge model. model_args (all but `pretrained` optional):

    pretrained       run folder (latest checkpoint), `ssmforge export` folder or Hugging Face Mamba folder
    device           cuda, cuda:N or cpu (default: a GPU if there is one)
    batch_size       rows per forward (the harness's --batch_size; 'auto' means max_batch_size, else 32)
    max_length       the context the harness's windows and truncation use (default: the run's data.seq_len,
                     else 2048)
    chunk_length     longer windows are fed in chunks of this through the state (default: the run's data.seq_len,
                     else 2048)
    max_gen_toks     generation budget when a task sets none (default 256)
    document_prefix  eos | bos: the token documents and empty contexts follow (default: the run's manifest)
    prefix_token_id  that token's id, overriding document_prefix
    tokenizer        'byte' or a tokenizer.json / tokenizer.model path (default: the checkpoint's)
    precision        fp32 (default) | bf16 (autocast on the GPU)
    """

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, max_length: int | None = None, chunk_length: int | None = None,
                 max_gen_toks: int = 256, document_prefix: str | None = None, prefix_token_id: int | None = None,
                 tokenizer: str | None = None, precision: str = "fp32", **unused):
        super().__init__()
        import torch

        from ssmforge.data_pipeline.tokenizer import tokenizer_from_flag
        from ssmforge.evaluation.perplexity import prefix_token_id as prefix_id, training_document_prefix
        from ssmforge.pretrain.export import check_checkpoint, check_tokenizer, load_model_and_tokenizer

        if unused:
            log.warning("model_args not used by the ssmforge model: %s", ", ".join(sorted(unused)))
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r} is invalid: one of {', '.join(PRECISIONS)}")
        check_checkpoint(pretrained)
        model, tok, config = load_model_and_tokenizer(pretrained)
        if tokenizer:
            tok = tokenizer_from_flag(str(tokenizer))
        check_tokenizer(pretrained, model, tok)
        self._device = pick_device(device)
        model.config.check_device(self._device.type)
        self.model = model.to(self._device).eval()
        self.tokenizer = tok
        self.pretrained = str(pretrained)
        trained_length = config.data.seq_len if config is not None else DEFAULT_LENGTH
        self._max_length = int(max_length or trained_length)
        self.chunk_length = int(chunk_length or trained_length)
        self._max_gen_toks = int(max_gen_toks)
        self.batch_size = _batch_size(batch_size, max_batch_size)
        for key, value in (("max_length", self._max_length), ("chunk_length", self.chunk_length),
                           ("max_gen_toks", self._max_gen_toks)):
            if value < 1:
                raise ConfigError(f"{key}={value} is invalid: must be >= 1")
        self.document_prefix = document_prefix or training_document_prefix(config)
        self._prefix = int(prefix_token_id) if prefix_token_id is not None else prefix_id(tok, self.document_prefix)
        self.autocast = (torch.autocast(self._device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else nullcontext())
        log.info("ssmforge model %s: %s, %.1fM parameters, on %s; max_length %d, chunks of %d, documents after "
                 "token %d", pretrained, model.config.family, self.num_parameters / 1e6, self._device,
                 self._max_length, self.chunk_length, self._prefix)

    # -- what the harness reads --------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    @property
    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # -- scoring -----------------------------------------------------------------------------------------
    def _score(self, items: list[tuple[list[int], int]], what: str, disable_tqdm: bool = False):
        """items: (tokens, n): read tokens[:-1], score the last n of tokens[1:]. -> [(sum of log-probs, whether
        every scored token is the argmax)], in order; rows of similar length share a batch."""
        import torch

        from ssmforge.data_pipeline.pack import Progress
        from ssmforge.evaluation.perplexity import IGNORE, token_nll

        order = sorted(range(len(items)), key=lambda i: len(items[i][0]), reverse=True)
        results: list[tuple[float, bool] | None] = [None] * len(items)
        progress = Progress(f"harness {what}") if not disable_tqdm else None
        with torch.no_grad(), self.autocast:
            for b in range(0, len(order), self.batch_size):
                rows = order[b:b + self.batch_size]
                width = len(items[rows[0]][0]) - 1
                inputs = torch.zeros(len(rows), width, dtype=torch.long)
                targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
                for r, i in enumerate(rows):
                    tokens, n = items[i]
                    inputs[r, :len(tokens) - 1] = torch.tensor(tokens[:-1])
                    targets[r, len(tokens) - 1 - n:len(tokens) - 1] = torch.tensor(tokens[-n:])
                nll, hits = token_nll(self.model, inputs, targets, self.chunk_length, greedy=True)
                scored = targets != IGNORE
                logprob = -nll.double().sum(1).cpu()
                greedy = (hits | ~scored.to(hits.device)).all(1).cpu()
                for r, i in enumerate(rows):
                    results[i] = (float(logprob[r]), bool(greedy[r]))
                if progress is not None:
                    progress(int(scored.sum()))
        if progress is not None:
            progress.close()
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids), from TemplateLM.loglikelihood."""
        items = []
        for _, context, continuation in requests:
            if not continuation:
                raise ConfigError("a loglikelihood request with an empty continuation has nothing to score")
            items.append(((context + continuation)[-(self.max_length + 1):], min(len(continuation), self.max_length)))
        results = self._score(items, "loglikelihood", disable_tqdm)
        for (request, _, _), answer in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood, every token scored once after the prefix token, in windows of
        max_length (the harness's rolling windows)."""
        from ssmforge.evaluation.perplexity import scoring_windows

        items, owner = [], []
        for doc, (string,) in enumerate(request.args for request in requests):
            seq = [self.prefix_token_id] + self.tok_encode(string)
            for w in scoring_windows(doc, len(seq) - 1, self.max_length, self.max_length):
                items.append((seq[w.start:w.end + 1], w.end - w.score_from))
                owner.append(doc)
        totals = [0.0] * len(requests)
        for doc, (logprob, _) in zip(owner, self._score(items, "rolling loglikelihood", disable_tqdm)):
            totals[doc] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) continuation of each context until EOS, a stop string or
        the task's max_gen_toks, through the recurrent state. Contexts of one length and one set of
        generation settings share a batch; a context is cut to its last max_length - max_gen_toks tokens."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        from ssmforge.data_pipeline.pack import Progress

        groups: dict[tuple[str, int], list[tuple[int, list[int], dict]]] = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            room = self.max_length - kwargs["max_gen_toks"]
            if room < 1:
                raise ConfigError(f"max_gen_toks={kwargs['max_gen_toks']} leaves no room for a context in "
                                  f"max_length={self.max_length}")
            ids = self.tok_encode(context)[-room:] or [self.prefix_token_id]
            key = (json.dumps(gen_kwargs, sort_keys=True, default=str), len(ids))
            groups.setdefault(key, []).append((i, ids, kwargs))
        results: list[str | None] = [None] * len(requests)
        progress = Progress("harness generate_until") if not disable_tqdm else None
        for group in groups.values():
            kwargs = dict(group[0][2])
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            for b in range(0, len(group), self.batch_size):
                batch = group[b:b + self.batch_size]
                texts = self._generate([ids for _, ids, _ in batch], until, dict(kwargs))
                for (i, _, _), text in zip(batch, texts):
                    results[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                if progress is not None:
                    progress(sum(len(ids) for _, ids, _ in batch))
        if progress is not None:
            progress.close()
        return results

    def _generate(self, contexts: list[list[int]], until: list[str], kwargs: dict) -> list[str]:
        """Texts generated after equally long contexts, each cut at its first EOS."""
        import torch

        from ssmforge.models import generate

        max_gen_toks = kwargs.pop("max_gen_toks")
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", None) or 0.0)
        temperature = temperature if sample else 0.0  # greedy unless the task samples
        top_k, top_p = int(kwargs.pop("top_k", None) or 0), float(kwargs.pop("top_p", None) or 1.0)
        seed = kwargs.pop("seed", None)
        if kwargs:
            log.warning("generation settings not used by the ssmforge model: %s", ", ".join(sorted(kwargs)))
        stops = [s for s in until if s]
        eos = self.eot_token_id

        def stopped(new: torch.Tensor) -> torch.Tensor:  # (batch, n) -> (batch,) rows whose text holds a stop
            return torch.tensor([any(s in self.tok_decode(_before(row, eos)) for s in stops)
                                 for row in new.tolist()], dtype=torch.bool)

        generator = torch.Generator(device=self._device).manual_seed(int(seed)) if seed is not None else None
        with torch.no_grad(), self.autocast:
            out = generate(self.model, torch.tensor(contexts, device=self._device), max_gen_toks,
                           temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos,
                           vocab_size=self.tokenizer.vocab_size, generator=generator,
                           stop=stopped if stops else None)
        return [self.tok_decode(_before(row, eos)) for row in out[:, len(contexts[0]):].tolist()]


def _before(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the ssmforge model registered (for lm-eval releases that read no entry
    points): `python -m ssmforge.evaluation.harness --model ssmforge --model_args pretrained=DIR --tasks ...`."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
