"""`ssmforge ...` with a non-finite loss injected: python inject_nonfinite.py STEP MICRO RANK ssmforge-args...

Training loss number MICRO (1-based) of optimizer step STEP becomes NaN on rank RANK only, keeping its
graph, so its backward fills the gradients with NaN as a real divergence would."""
import os
import sys

from ssmforge.pretrain import trainer


def main() -> int:
    step, micro, rank = (int(a) for a in sys.argv[1:4])
    if int(os.environ.get("RANK", "0")) == rank:
        real, calls = trainer.lm_loss, []

        def poisoned(engine, tokens, device, dtype, reduction="mean", **kwargs):
            loss = real(engine, tokens, device, dtype, reduction, **kwargs)
            if engine.training:
                calls.append(None)
                if len(calls) == (step - 1) * trainer_accumulation() + micro:
                    return loss * float("nan")
            return loss

        trainer.lm_loss = poisoned
    from ssmforge.cli import main as cli

    return cli(sys.argv[4:])


def trainer_accumulation() -> int:
    return int(os.environ["INJECT_ACCUMULATION"])


if __name__ == "__main__":
    sys.exit(main())
