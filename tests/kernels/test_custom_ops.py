"""The fast kernels as torch custom ops: each forward and backward operator passes torch.library.opcheck
(schema, autograd registration, fake implementation against the real one, AOT dispatch with dynamic shapes),
and its fake outputs have the real outputs' shapes, dtypes and strides."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU tensors

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ssmforge.kernels.selective_scan import triton_available

from .test_selective_scan import make_inputs as scan_inputs
from .test_ssd import make_inputs as ssd_inputs

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _scan(op_name, dtype=torch.float32, **shape):
    def case():
        inputs = scan_inputs(L=21, dtype=dtype, **shape)
        # no seq_idx, softplus, states saved every 8 steps; out, last
        return _op(op_name), (*inputs.values(), None, True, 8), 2
    return case


def _conv(op_name, dtype=torch.float32, with_bias=True, channels_last=False):
    def case():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 70, 12, generator=g).to(dtype).transpose(1, 2) if channels_last else \
            torch.randn(2, 12, 70, generator=g).to(dtype)  # channels-last: how Mamba hands it over
        weight, bias = torch.randn(12, 4, generator=g).to(dtype), torch.randn(12, generator=g).to(dtype)
        return _op(op_name), tuple(t.requires_grad_() if t is not None else None
                                   for t in (x, weight, bias if with_bias else None)) + (True,), 1
    return case


def _ssd(dtype=torch.float32, with_initial=True):
    def case():
        from ssmforge.kernels.triton.ssd import _to_chunks

        inputs = ssd_inputs(L=37, nheads=2, headdim=8, dtype=dtype, with_initial=with_initial)
        dt_chunks = _to_chunks(torch.nn.functional.softplus(inputs["dt"].detach()), 16).requires_grad_()
        return _op("ssd_triton"), (inputs["x"], dt_chunks, inputs["A"], inputs["B"], inputs["C"],
                                   inputs["initial_state"]), 2
    return case


def _op(name):
    if "triton" in name:  # importing the module defines its operators
        import ssmforge.kernels.triton.selective_scan  # noqa: F401
        import ssmforge.kernels.triton.ssd  # noqa: F401
    return getattr(torch.ops.ssmforge, name).default


CASES = [
    pytest.param(_scan("selective_scan_cpu_channels_last", bc="var"), id="scan-cpu-var"),
    pytest.param(_scan("selective_scan_cpu_channels_last", bc="fixed", with_z=False, with_D=False, with_bias=False),
                 id="scan-cpu-fixed-bare"),
    pytest.param(_scan("selective_scan_cpu_channels_last", bc="grouped", dtype=torch.bfloat16), id="scan-cpu-grouped-bf16"),
    pytest.param(_scan("selective_scan_triton", bc="grouped"), id="scan-triton-grouped", marks=needs_triton),
    pytest.param(_scan("selective_scan_triton", bc="fixed", dtype=torch.bfloat16, with_z=False),
                 id="scan-triton-fixed-bf16", marks=needs_triton),
    pytest.param(_conv("causal_conv1d_cpu"), id="conv-cpu"),
    pytest.param(_conv("causal_conv1d_cpu", channels_last=True), id="conv-cpu-channels-last"),
    pytest.param(_conv("causal_conv1d_cpu", dtype=torch.bfloat16, with_bias=False), id="conv-cpu-bf16"),
    pytest.param(_conv("causal_conv1d_triton"), id="conv-triton", marks=needs_triton),
    pytest.param(_conv("causal_conv1d_triton", dtype=torch.bfloat16, with_bias=False, channels_last=True),
                 id="conv-triton-bf16", marks=needs_triton),
    pytest.param(_ssd(), id="ssd-triton", marks=needs_triton),
    pytest.param(_ssd(dtype=torch.bfloat16, with_initial=False), id="ssd-triton-bf16", marks=needs_triton),
]


def _detached(arg):
    if isinstance(arg, (list, tuple)):
        return type(arg)(_detached(a) for a in arg)
    return arg.detach() if isinstance(arg, torch.Tensor) else arg


def _backward_case(op, args, n_outputs):
    """The backward operator and real arguments for it: gradients of the outputs, the inputs, the residuals."""
    backward = _op(f"{op._opname}_backward")
    n_inputs = sum(isinstance(a, torch.Tensor) or a is None for a in args)
    inputs, options = _detached(list(args[:n_inputs])), args[n_inputs:]
    results = op(*inputs, *options)
    results = results if isinstance(results, tuple) else (results,)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.shape, generator=g).to(t.dtype) for t in results[:n_outputs]]
    return backward, (grads, inputs, list(results[n_outputs:]), *options)


@pytest.mark.parametrize("case", CASES)
def test_forward_opcheck(case):
    op, args, _ = case()
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", CASES)
def test_backward_opcheck(case):
    torch.library.opcheck(*_backward_case(*case()))


def _fake(mode, arg):
    if isinstance(arg, (list, tuple)):
        return type(arg)(_fake(mode, a) for a in arg)
    return mode.from_tensor(arg) if isinstance(arg, torch.Tensor) else arg


def _metadata(results):
    results = results if isinstance(results, (tuple, list)) else [results]
    return [(tuple(t.shape), t.dtype, t.stride(), t.device) for t in results]


@pytest.mark.parametrize("case", CASES)
def test_fake_outputs_match_real_ones(case):
    op, args, n_outputs = case()
    for operator, arguments in ((op, _detached(args)), _backward_case(op, args, n_outputs)):
        real = operator(*arguments)
        with FakeTensorMode() as mode:
            fake = operator(*_fake(mode, arguments))
        assert _metadata(fake) == _metadata(real), operator
