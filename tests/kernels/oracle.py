"""Comparing a fast kernel with its oracle: outputs and every gradient of a loss that weighs each output
element differently (so a swapped or misplaced gradient cannot cancel out), within a tolerance relative
to the oracle's magnitude."""
import torch


def values_and_grads(outputs: dict, inputs: dict) -> dict:
    """outputs: name -> tensor or None (skipped); inputs: name -> leaf tensor requiring grad, or None.
    Returns the outputs and `d<name>` for every input: gradients of sum(output * weights), with cos
    weights on the first output and sin weights on the others."""
    present = {name: t for name, t in outputs.items() if t is not None}
    loss = 0.0
    for i, t in enumerate(present.values()):
        wave = torch.cos if i == 0 else torch.sin
        loss = loss + (t.float() * wave(torch.arange(t.numel(), dtype=torch.float32)).view_as(t)).sum()
    names = [k for k, v in inputs.items() if v is not None]
    grads = torch.autograd.grad(loss, [inputs[k] for k in names])
    return {**present, **{f"d{k}": g for k, g in zip(names, grads)}}


def conv_grads(fn, x, weight, bias, activation) -> dict:
    """The output of a causal conv fn(x, weight, bias, activation=...) and the gradients of its inputs."""
    return values_and_grads({"out": fn(x, weight, bias, activation=activation)}, dict(x=x, weight=weight, bias=bias))


def assert_matches(got: dict, want: dict, tol: float, same_dtype: bool = False):
    """Every tensor finite and within tol of the oracle, relative to the oracle's largest magnitude."""
    assert got.keys() == want.keys()
    for name in want:
        g, w = got[name], want[name]
        assert g.shape == w.shape, name
        assert not same_dtype or g.dtype == w.dtype, name
        g, w = g.float(), w.float()
        assert torch.isfinite(g).all(), name
        scale = w.abs().max().item() + 1e-6
        err = (g - w).abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} x {scale:.3g}"
