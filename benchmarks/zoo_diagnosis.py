"""Why a family's zoo row (benchmarks/zoo.py) differs from the paper's or from the other families': zoo.py's row of
that family, trained with one change to its mixer, in this process only (the model code is not changed):

  per-channel   GSS with one set of DSS eigenvalues per channel (the DSS family's layout) instead of one shared
                set (why GSS stays at chance on induction heads)
  s4-ungated    S4 with GELU and a linear map as its output, not the S4 block's GLU: the SSM's output is no
                longer gated by itself (state-spaces/s4's block without postact='glu'), the "No gate"
                architecture of the Mamba paper's Table 1 (why our S4 copies far better than its 18.3%)

Other candidates need no patch: the width of GSS's SSM branch is `zoo.py --override gss.ssm_dim=...`, and the
short convolution that the paper's GSS lacks is the model option `--override gss.d_conv=4`. A patch covers the
forward pass, which is all zoo.py trains and scores with; the parameter match counts what it changes.

    python benchmarks/zoo_diagnosis.py per-channel --steps 6000 --sweep-steps 6000 --lrs 1e-3 --out per-channel.json
    python benchmarks/zoo_diagnosis.py s4-ungated --copy-region 256 --copy-tokens 16 --steps 8000 \\
        --sweep-steps 8000 --lrs 3e-3 --out s4-ungated.json

Every flag after the variant is zoo.py's; the run is `--families FAMILY --tasks TASK` of the variant.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssmforge.models import gss, s4  # noqa: E402
from ssmforge.models.layers import Projection, keep_fp32  # noqa: E402


def per_channel_eigenvalues(mixer: gss.GSSMixer, config) -> None:
    """The shared eigenvalues (N,) become one copy per channel (H, N): the same kernel at initialisation."""
    H = mixer.ssm_dim
    mixer.Lambda_re_log = keep_fp32(nn.Parameter(mixer.Lambda_re_log.detach()[None].repeat(H, 1)))
    mixer.Lambda_im = keep_fp32(nn.Parameter(mixer.Lambda_im.detach()[None].repeat(H, 1)))


class UngatedOutput(nn.Module):
    """GELU of the SSM's output, then a linear map d -> d: the S4 block's output without its GLU."""

    def __init__(self, d: int, config):
        super().__init__()
        self.proj = Projection(d, d, config, residual=True)

    def forward(self, y):
        return self.proj(F.gelu(y))

    def flops_per_token(self) -> int:
        return 2 * self.proj.in_features * self.proj.out_features


def ungated_output(mixer: s4.S4Mixer, config) -> None:
    """The GLU output (W1 a * sigmoid(W2 a), a = GELU(y)) becomes W a."""
    mixer.output = UngatedOutput(mixer.d_model, config)


@dataclass(frozen=True)
class Variant:
    family: str  # zoo.py's family name
    task: str  # the zoo task it explains
    mixer: type
    change: Callable


VARIANTS = {"per-channel": Variant("gss", "induction", gss.GSSMixer, per_channel_eigenvalues),
            "s4-ungated": Variant("s4", "copying", s4.S4Mixer, ungated_output)}


def patch(variant: str) -> None:
    """Every mixer of the variant's class built from now on in this process gets its change."""
    spec = VARIANTS[variant]
    build = spec.mixer.__init__

    def init(self, config, layer_idx):
        build(self, config, layer_idx)
        spec.change(self, config)

    spec.mixer.__init__ = init


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in VARIANTS:
        print(f"zoo_diagnosis.py: the first argument must be one of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    variant, spec = argv[0], VARIANTS[argv[0]]
    flags = ["--families", spec.family, "--tasks", spec.task, *argv[1:]]
    patch(variant)
    import benchmarks.zoo as zoo

    data = zoo.main(flags)
    # the report says what ran; the patch counts as part of the model, so --merge refuses to put these rows
    # beside an unpatched family's
    data["command"] = shlex.join(["python", "benchmarks/zoo_diagnosis.py", variant, *zoo.without(argv[1:], "--out")])
    data["overrides"][spec.family] = dict(data["overrides"][spec.family], patched=variant)
    data["variant"] = " ".join(spec.change.__doc__.split())
    zoo.write_json(Path(zoo.parse_args(flags).out), data)
    return 1 if data.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
