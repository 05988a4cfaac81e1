"""Fast kernels as torch custom ops, so that FakeTensorMode and torch.compile see through them.

A kernel becomes two operators. `ssmforge::<name>` returns the kernel's outputs followed by its
residuals, the tensors made in forward that backward reads (the scan's checkpointed states, say);
`ssmforge::<name>_backward` maps the output gradients, the inputs and the residuals to the gradients of
the inputs that were given. Autograd saves the inputs and the residuals between the two, so a trace on
fake tensors allocates what a real training step keeps alive.

Each kernel is written once, as Python that allocates its buffers, launches the compiled kernel when
`launch` is true and finishes with torch ops. Called with launch=False the same code is the operator's
fake implementation, so fake outputs have the real ones' shapes, dtypes and strides by construction.
"""
import torch

NAMESPACE = "ssmforge"


def _given(grads, inputs) -> list[torch.Tensor]:
    """The gradients of the inputs that were given: an operator returns no None."""
    if any((g is None) != (t is None) for g, t in zip(grads, inputs, strict=True)):
        raise RuntimeError("a kernel's backward must return a gradient for exactly the inputs given")
    return [g for g in grads if g is not None]


def _joined(*schemas: str) -> str:
    return ", ".join(s for s in schemas if s)


def _as_returned(results: tuple):
    """A one-result schema returns the tensor itself, not a tuple of one."""
    return results[0] if len(results) == 1 else results


def _shape_only(t: torch.Tensor | None) -> torch.Tensor | None:
    """A stand-in with t's shape, dtype and device over one element of storage: what backward may read of an
    input whose values it does not need."""
    return None if t is None else torch.empty_strided(t.shape, (0,) * t.dim(), dtype=t.dtype, device=t.device)


def kernel_op(name: str, inputs: str, options: str, outputs: int, residuals: int, forward, backward,
              saves_outputs: bool = False, shape_only: tuple[int, ...] = ()):
    """Define ssmforge::<name> and ssmforge::<name>_backward, tie them with register_autograd and return
    the forward operator.

    inputs: schema of the tensor arguments ("Tensor x, Tensor? bias"); options: schema of the others
    ("bool silu, int chunk", or ""); the operator takes both, positionally, in this order.
    forward(*inputs, *options, launch) -> (`outputs` outputs..., `residuals` residuals...); the operator
    returns that tuple, or its one tensor alone.
    backward(grads, inputs, residuals, *options, launch) -> a gradient per input, None for those not given;
    grads holds None for outputs that received no gradient. saves_outputs: backward needs the outputs too (a
    scan's states are its output); they come first in its residuals. shape_only: the positions of inputs whose
    values backward does not read: autograd keeps a one-element stand-in of their shape, not the tensor.
    """
    n_inputs = inputs.count("Tensor")
    returns = ", ".join(["Tensor"] * (outputs + residuals))
    forward_op = torch.library.custom_op(
        f"{NAMESPACE}::{name}", lambda *args: _as_returned(forward(*args, launch=True)), mutates_args=(),
        schema=f"({_joined(inputs, options)}) -> ({returns})")
    forward_op.register_fake(lambda *args: _as_returned(forward(*args, launch=False)))

    def run_backward(grads, tensors, saved, *opts, launch):
        return _given(backward(grads, tensors, saved, *opts, launch=launch), tensors)

    backward_op = torch.library.custom_op(
        f"{NAMESPACE}::{name}_backward", lambda *args: run_backward(*args, launch=True), mutates_args=(),
        schema=f"({_joined('Tensor?[] grads, Tensor?[] inputs, Tensor[] residuals', options)}) -> Tensor[]")
    backward_op.register_fake(lambda *args: run_backward(*args, launch=False))

    def setup_context(ctx, inputs, output):
        output = output if isinstance(output, tuple) else (output,)
        ctx.mark_non_differentiable(*output[outputs:])
        ctx.set_materialize_grads(False)  # an unused output costs no zero-filled gradient
        kept = [_shape_only(t) if i in shape_only else t for i, t in enumerate(inputs[:n_inputs])]
        ctx.save_for_backward(*kept, *(output if saves_outputs else output[outputs:]))
        ctx.options = inputs[n_inputs:]

    def differentiate(ctx, *grads):
        saved = ctx.saved_tensors
        tensors = saved[:n_inputs]
        given = iter(backward_op(list(grads[:outputs]), list(tensors), list(saved[n_inputs:]), *ctx.options))
        return tuple(None if t is None else next(given) for t in tensors) + (None,) * len(ctx.options)

    forward_op.register_autograd(differentiate, setup_context=setup_context)
    return forward_op
