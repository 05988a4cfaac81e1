"""Why GSS stays at chance on induction heads in the zoo comparison (benchmarks/zoo.py): zoo.py's GSS row, trained
with one change to the GSS mixer, in this process only (the model code is not changed):

  per-channel   one set of DSS eigenvalues per channel (the DSS family's layout) instead of one shared set

The other candidates need no patch: the width of the SSM branch is `zoo.py --override gss.ssm_dim=...`, and the
short convolution that the paper's GSS lacks is the model option `--override gss.d_conv=4`. The patch covers the
forward pass, which is all zoo.py trains and scores with.

    python benchmarks/gss_induction_diagnosis.py per-channel --steps 6000 --sweep-steps 6000 --lrs 1e-3 \\
        --out per-channel.json

Every flag after the variant is zoo.py's; the run is `--families gss --tasks induction`.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssmforge.models import gss  # noqa: E402
from ssmforge.models.layers import keep_fp32  # noqa: E402


def per_channel_eigenvalues(mixer: gss.GSSMixer) -> None:
    """The shared eigenvalues (N,) become one copy per channel (H, N): the same kernel at initialisation."""
    H = mixer.ssm_dim
    mixer.Lambda_re_log = keep_fp32(nn.Parameter(mixer.Lambda_re_log.detach()[None].repeat(H, 1)))
    mixer.Lambda_im = keep_fp32(nn.Parameter(mixer.Lambda_im.detach()[None].repeat(H, 1)))


VARIANTS = {"per-channel": per_channel_eigenvalues}


def patch(variant: str) -> None:
    """Every GSSMixer built from now on in this process gets `variant`."""
    change, build = VARIANTS[variant], gss.GSSMixer.__init__

    def init(self, config, layer_idx):
        build(self, config, layer_idx)
        change(self)

    gss.GSSMixer.__init__ = init


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in VARIANTS:
        print(f"gss_induction_diagnosis.py: the first argument must be one of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    variant, flags = argv[0], ["--families", "gss", "--tasks", "induction", *argv[1:]]
    patch(variant)
    import benchmarks.zoo as zoo

    data = zoo.main(flags)
    # the report says what ran; the patch counts as part of the model, so --merge refuses to put these rows
    # beside an unpatched GSS's
    data["command"] = shlex.join(["python", "benchmarks/gss_induction_diagnosis.py", variant,
                                  *zoo.without(argv[1:], "--out")])
    data["overrides"]["gss"] = dict(data["overrides"]["gss"], patched=variant)
    data["variant"] = " ".join(VARIANTS[variant].__doc__.split())
    zoo.write_json(Path(zoo.parse_args(flags).out), data)
    return 1 if data.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
