"""What `data.document_boundaries: reset` costs in training throughput, per family.

One training step (forward with the chunked loss, backward) of the same model on the same packed rows, with
seq_idx (reset: every document alone) and without (flow), on the backends the device picks. The rows are
cut from a stream of documents whose lengths are drawn log-normally around a median of `--median-doc`
tokens (web text such as the Pile has many short documents and a long tail), joined by EOS as `prepare`
packs them. Reported: tokens/s of each mode from its fastest step (the modes alternate step by step), and
reset's ratio. Writes
benchmarks/results/document_resets.json.

    python benchmarks/document_resets.py                        # CPU: d_model 256, 4 layers, L 2048, batch 2
    python benchmarks/document_resets.py --families mamba --steps 3 --seq-len 512   # a quick look
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EOS = 0
FAMILIES = {  # name -> ModelConfig keyword arguments beyond the shared shape
    "mamba": dict(family="mamba"),
    "mamba2": dict(family="mamba2", mamba2=dict(headdim=64)),
    "gss": dict(family="gss"),
    "transformer": dict(family="transformer", attention=dict(heads=4)),
    "hybrid M*M-": dict(family="hybrid", layer_pattern="M*M-", attention=dict(heads=4)),
}


def packed_rows(batch: int, seq_len: int, median_doc: int, seed: int) -> torch.Tensor:
    """(batch, seq_len + 1) token rows cut from a stream of documents, each followed by EOS."""
    g = torch.Generator().manual_seed(seed)
    need = batch * (seq_len + 1)
    stream = []
    while len(stream) < need:
        n = max(1, int(torch.empty(1).log_normal_(mean=float(torch.tensor(median_doc).log()), std=1.0,
                                                   generator=g).item()))
        stream += torch.randint(1, 8192, (n,), generator=g).tolist() + [EOS]
    return torch.tensor(stream[:need]).view(batch, seq_len + 1)


def step_times(model, rows: torch.Tensor, steps: int) -> tuple[float, float]:
    """Fastest seconds of forward + backward without and with resets, over `steps` timed steps of each after
    one warm-up, the two modes alternating so that a noisy neighbour slows both alike."""
    from ssmforge.kernels.documents import document_index

    inputs, targets = rows[:, :-1], rows[:, 1:]
    modes = (None, document_index(inputs, EOS))
    times = ([], [])
    for i in range(steps + 1):
        for mode, seq_idx in enumerate(modes):
            start = time.perf_counter()
            model(inputs, targets=targets, seq_idx=seq_idx).backward()
            model.zero_grad(set_to_none=True)
            if i:
                times[mode].append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--median-doc", type=int, default=300, help="median document length in tokens")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "document_resets.json")
    args = parser.parse_args(argv)

    from ssmforge.kernels.documents import document_index
    from ssmforge.models import LanguageModel, ModelConfig

    rows = packed_rows(args.batch, args.seq_len, args.median_doc, seed=0)
    docs_per_row = (document_index(rows[:, :-1], EOS)[:, -1] + 1).float().mean().item()
    results = []
    print(f"L {args.seq_len}, batch {args.batch}, {docs_per_row:.1f} documents per row (median "
          f"{args.median_doc} tokens), {torch.get_num_threads()} threads\n")
    print("| family | flow tokens/s | reset tokens/s | reset / flow |")
    print("| --- | ---: | ---: | ---: |")
    for name in args.families:
        torch.manual_seed(0)
        config = ModelConfig.from_dict(dict(d_model=args.d_model, n_layer=(len(FAMILIES[name].get("layer_pattern", ""))
                                                                           or args.n_layer),
                                            vocab_size=8192, **FAMILIES[name]))
        model = LanguageModel(config)
        tokens = rows[:, :-1].numel()
        flow_s, reset_s = step_times(model, rows, args.steps)
        flow, reset = tokens / flow_s, tokens / reset_s
        results.append(dict(family=name, flow_tokens_per_s=round(flow, 1), reset_tokens_per_s=round(reset, 1),
                            ratio=round(reset / flow, 3)))
        print(f"| {name} | {flow:,.0f} | {reset:,.0f} | {reset / flow:.2f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(seq_len=args.seq_len, batch=args.batch, d_model=args.d_model,
                                        n_layer=args.n_layer, median_doc=args.median_doc,
                                        docs_per_row=round(docs_per_row, 2), threads=torch.get_num_threads(),
                                        device="cpu", results=results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
