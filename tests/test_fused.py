"""The fused operator (jsa_fast/kernels/joint_slot_attention.py) and FusedJointSlotAttention against
jsa_fast/reference.py.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) at tiny shapes;
tests marked gpu repeat the comparison at the paper's shapes when CUDA is present.
"""

import importlib

import pytest
import torch
from torch import nn

import jsa_fast.fused
from jsa_fast import FusedJointSlotAttention, JointSlotAttention
from jsa_fast.kernels import joint_slot_attention
from jsa_fast.kernels.joint_slot_attention import PARAMETERS
from jsa_fast.reference import JSAOutput

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
# Parity with the reference: numeric (the Makefile's test-numeric-default reruns the cheaper ones).
pytestmark = pytest.mark.numeric


def make_pair(dim, num_slots, iters, mlp_hidden=24, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    reference = JointSlotAttention(dim=dim, num_slots=num_slots, iters=iters, mlp_hidden=mlp_hidden)
    fused = FusedJointSlotAttention(dim=dim, num_slots=num_slots, iters=iters, mlp_hidden=mlp_hidden, backend="triton")
    fused.load_state_dict(reference.state_dict())
    return reference.to(DEVICE), fused.to(DEVICE, dtype)


def make_inputs(batch, l_img, l_aud, dim, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x_img = torch.randn(batch, l_img, dim, generator=gen)
    x_aud = torch.randn(batch, l_aud, dim, generator=gen)
    mask_img = torch.rand(batch, l_img, generator=gen) < 0.3
    mask_aud = torch.rand(batch, l_aud, generator=gen) < 0.3
    return [t.to(DEVICE, dtype) if t.is_floating_point() else t.to(DEVICE) for t in (x_img, x_aud, mask_img, mask_aud)]


def outputs_and_grads(module, x_img, x_aud, mask_img, mask_aud, weights):
    """Outputs, then gradients of sum(w * out) in x_img, x_aud and every parameter (fp32)."""
    x_img, x_aud = x_img.detach().requires_grad_(), x_aud.detach().requires_grad_()
    out = module(x_img, x_aud, mask_img, mask_aud)
    loss = sum((o.float() * w).sum() for o, w in zip(out, weights) if w is not None)
    wrt = [x_img, x_aud, *module.parameters()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)  # ia_aud alone does not reach x_img
    return [o.float() for o in out], [torch.zeros_like(t) if g is None else g.float() for g, t in zip(grads, wrt)]


def assert_fused_matches_reference(reference, fused, inputs, out_atol, grad_rtol, weighted=JSAOutput._fields):
    """Every JSAOutput field within out_atol of the fp32 reference; every gradient of a
    random weighting of the `weighted` fields within grad_rtol of the largest entry of the
    reference gradient."""
    fp32_inputs = [t.float() if t.is_floating_point() else t for t in inputs]
    with torch.no_grad():
        weights = [
            torch.randn_like(o) if name in weighted else None
            for name, o in zip(JSAOutput._fields, reference(*fp32_inputs))
        ]
    ref_out, ref_grads = outputs_and_grads(reference, *fp32_inputs, weights)
    out, grads = outputs_and_grads(fused, *inputs, weights)
    for name, got, want in zip(JSAOutput._fields, out, ref_out):
        torch.testing.assert_close(got, want, atol=out_atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    names = ["x_img", "x_aud", *(n for n, _ in reference.named_parameters())]
    for name, got, want in zip(names, grads, ref_grads):
        # Relative to the gradient's scale: parameters see sums over B*L*N terms.
        scale = want.abs().max().clamp_min(1e-3)
        torch.testing.assert_close(
            got / scale, want / scale, atol=grad_rtol, rtol=0, msg=lambda m, name=name: f"grad {name}: {m}"
        )


# ----------------------------------------------------------------------------------
# The module against the reference
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch,l_img,l_aud,dim,num_slots,iters",
    [(2, 7, 5, 40, 2, 3), (1, 3, 1, 24, 1, 1), (3, 5, 4, 33, 3, 2)],
)
@pytest.mark.parametrize("training", [False, True])
def test_fused_matches_reference_fp32(batch, l_img, l_aud, dim, num_slots, iters, training):
    reference, fused = make_pair(dim, num_slots, iters)
    reference.train(training), fused.train(training)
    inputs = make_inputs(batch, l_img, l_aud, dim)
    assert_fused_matches_reference(reference, fused, inputs, out_atol=1e-4, grad_rtol=1e-4)


@pytest.mark.parametrize("weighted", [("slots_img", "ca_img", "ca_aud"), ("q_aud", "attn_img"), ("ia_aud",)])
def test_fused_gradients_of_some_outputs(weighted):
    # Training back-propagates slots and ca only; the operator then skips the rest.
    reference, fused = make_pair(24, 2, 2)
    assert_fused_matches_reference(
        reference, fused, make_inputs(2, 6, 4, 24), out_atol=1e-4, grad_rtol=1e-4, weighted=weighted
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_half_precision_close_to_fp32_reference(dtype):
    reference, fused = make_pair(32, 2, 2, dtype=dtype)
    inputs = make_inputs(2, 7, 5, 32, dtype=dtype)
    out = fused(*inputs)
    assert all(o.dtype == dtype for o in out)
    assert_fused_matches_reference(reference.eval(), fused.eval(), inputs, out_atol=0.1, grad_rtol=0.08)


def test_fused_fp32_module_takes_half_inputs():
    reference, fused = make_pair(16, 2, 2)
    x_img, x_aud, mask_img, mask_aud = make_inputs(2, 4, 3, 16, dtype=torch.bfloat16)
    got, want = fused(x_img, x_aud, mask_img, mask_aud), reference(x_img, x_aud, mask_img, mask_aud)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), atol=1e-2, rtol=1e-2)


def test_fused_under_autocast_matches_reference(monkeypatch):
    # The operator bypasses autocast, so the module passes the autocast dtype itself.
    reference, fused = make_pair(16, 2, 2)
    inputs = make_inputs(2, 4, 3, 16)
    seen = []
    op = jsa_fast.fused.joint_slot_attention
    monkeypatch.setattr(jsa_fast.fused, "joint_slot_attention", lambda *a: seen.append(a[-2]) or op(*a))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, want = fused(*inputs), reference(*inputs)
    assert seen == [torch.bfloat16]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=0.05, rtol=0.05)


class UnderAutocast(nn.Module):
    """A module's forward under bf16 autocast, as training runs it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return self.module(*inputs)


def test_fused_under_autocast_gradients_close_to_fp32_reference():
    # Forward and backward under autocast (fp32 parameters, bf16 products); bf16's
    # 8 significant bits bound the error as in the half-precision test.
    reference, fused = make_pair(16, 2, 2)
    inputs = make_inputs(2, 4, 3, 16)
    assert_fused_matches_reference(
        reference.train(), UnderAutocast(fused).train(), inputs, out_atol=0.1, grad_rtol=0.08
    )


def test_fused_training_draws_masks_and_eval_does_not():
    reference, fused = make_pair(16, 2, 1)
    x_img, x_aud, mask_img, _ = make_inputs(2, 6, 4, 16)
    fused.eval()
    for got, want in zip(fused(x_img, x_aud), reference.eval()(x_img, x_aud)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(fused(x_img, x_aud, mask_img), reference(x_img, x_aud, mask_img)):  # one modality masked
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    fused.train()
    fused.mask_prob = 0.5
    torch.manual_seed(4)
    first = fused(x_img, x_aud).slots_img
    torch.manual_seed(5)
    assert not torch.allclose(first, fused(x_img, x_aud).slots_img)


def test_kernels_with_the_gpu_tiles_under_the_interpreter(monkeypatch):
    # The interpreter normally runs each product as one tile and each row kernel as one
    # program over all rows and all of d; a GPU runs tiles, row blocks and d in strips.
    # Here the GPU's launch configurations run under the interpreter, tails included:
    # d = 100 (64-wide tiles and strips with a tail), 36 tokens, 2 x 9 slot rows (several
    # row programs, the last one partial), several token-gradient programs.
    module = importlib.import_module("jsa_fast.kernels.joint_slot_attention")
    monkeypatch.setattr(module, "interpreting", lambda: False)
    assert module.attention_config(7, 5, 100, 3, "backward", True)["BLOCK_D"] < 100
    assert module.row_complete_config(18, 100, 24, "gru", True)["BLOCK_M"] < 18
    reference, fused = make_pair(100, 3, 2)
    assert_fused_matches_reference(
        reference.train(), fused.train(), make_inputs(3, 7, 5, 100), out_atol=1e-4, grad_rtol=1e-4
    )


def test_backend_choice(monkeypatch):
    reference, fused = (m.eval() for m in make_pair(16, 2, 2))
    x_img, x_aud, mask_img, mask_aud = make_inputs(2, 4, 3, 16)
    with pytest.raises(ValueError, match="backend"):
        FusedJointSlotAttention(dim=16, backend="cuda")
    with pytest.raises(ValueError, match="x_aud"):
        fused(x_img, x_aud[..., :8])
    fused.backend = "torch"  # the reference path, bit for bit
    for got, want in zip(fused(x_img, x_aud, mask_img, mask_aud), reference(x_img, x_aud, mask_img, mask_aud)):
        assert torch.equal(got, want)
    if not CUDA:
        fused.backend = "auto"  # CPU tensors: the reference path
        assert torch.equal(fused(x_img, x_aud).slots_img, reference(x_img, x_aud).slots_img)
        fused.backend = "triton"
        monkeypatch.setattr(jsa_fast.fused, "INTERPRET", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            fused(x_img, x_aud)


# ----------------------------------------------------------------------------------
# Parameters side by side
# ----------------------------------------------------------------------------------


def test_parameters_side_by_side_survive_to_and_give_contiguous_grads():
    _, fused = make_pair(16, 2, 2)
    fused = fused.double()  # .to() gives new storage: the module pairs it again
    for name in PARAMETERS:
        image, audio = fused.image.get_parameter(name), fused.audio.get_parameter(name)
        assert image.dtype == torch.float64 and jsa_fast.fused._side_by_side(image, audio), name
    x_img, x_aud, mask_img, mask_aud = make_inputs(2, 4, 3, 16, dtype=torch.float64)
    out = fused(x_img, x_aud, mask_img, mask_aud)
    (out.slots_img.sum() + out.ca_img.sum()).backward()
    for name in PARAMETERS:
        image, audio = fused.image.get_parameter(name).grad, fused.audio.get_parameter(name).grad
        # The stack's gradient is handed to .grad as is: two contiguous views of one buffer.
        assert image.is_contiguous() and audio.is_contiguous(), name
        assert image.untyped_storage().data_ptr() == audio.untyped_storage().data_ptr(), name


def test_parameters_apart_still_match():
    # A parameter given storage of its own (here by assignment) is stacked by a copy.
    reference, fused = make_pair(16, 2, 2)
    with torch.no_grad():
        fused.audio.to_k.weight.data = fused.audio.to_k.weight.data.clone()
    assert not jsa_fast.fused._side_by_side(fused.image.to_k.weight, fused.audio.to_k.weight)
    assert_fused_matches_reference(reference, fused, make_inputs(2, 4, 3, 16), out_atol=1e-4, grad_rtol=1e-4)


# ----------------------------------------------------------------------------------
# The operator
# ----------------------------------------------------------------------------------


def operator_arguments(dtype=torch.float64, batch=2, l_img=3, l_aud=2, dim=4, num_slots=2, hidden=6, masks=True):
    """Random arguments of jsa_fast::joint_slot_attention at a tiny shape."""
    torch.manual_seed(7)
    reference = JointSlotAttention(dim=dim, num_slots=num_slots, iters=2, mlp_hidden=hidden)
    params = [
        torch.stack([reference.image.get_parameter(n), reference.audio.get_parameter(n)]).detach() for n in PARAMETERS
    ]
    params = [
        (p + 0.1 * torch.randn_like(p)).to(DEVICE, dtype).requires_grad_() for p in params
    ]  # LN affines off 1 and 0
    x_img = torch.randn(batch, l_img, dim, dtype=dtype, device=DEVICE, requires_grad=True)
    x_aud = torch.randn(batch, l_aud, dim, dtype=dtype, device=DEVICE, requires_grad=True)
    mask_img = (torch.arange(batch * l_img, device=DEVICE).view(batch, l_img) % 3 == 0) if masks else None
    mask_aud = (torch.arange(batch * l_aud, device=DEVICE).view(batch, l_aud) % 2 == 0) if masks else None
    slots_init = torch.randn(num_slots, dim, dtype=dtype, device=DEVICE, requires_grad=True)
    return x_img, x_aud, mask_img, mask_aud, slots_init, params


def test_operator_gradcheck_fp64():
    # One flat input and one random weighting of the ten outputs keep the interpreted
    # gradcheck to a few evaluations; every argument and output still takes part.
    x_img, x_aud, mask_img, mask_aud, slots_init, params = operator_arguments()
    tensors = [x_img, x_aud, slots_init, *params]
    flat = torch.cat([t.detach().flatten() for t in tensors]).requires_grad_()
    with torch.no_grad():
        weights = [torch.randn_like(o) for o in joint_slot_attention(
            x_img, x_aud, mask_img, mask_aud, slots_init, params, 2, 1e-3, (1e-5,) * 3, torch.float64, torch.float64)]  # fmt: skip

    def run(flat):
        x_img, x_aud, slots_init, *params = (
            part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)
        )
        out = joint_slot_attention(
            x_img, x_aud, mask_img, mask_aud, slots_init, params, 2, 1e-3, (1e-5,) * 3, torch.float64, torch.float64
        )
        return sum((o * w).sum() for o, w in zip(out, weights))

    assert torch.autograd.gradcheck(run, (flat,), fast_mode=True)


def test_operator_opcheck():
    # One iteration (the last, with the cross-modal maps): opcheck runs the operator many times.
    x_img, x_aud, mask_img, mask_aud, slots_init, params = operator_arguments(dtype=torch.float32)
    args = (
        x_img,
        x_aud,
        mask_img,
        mask_aud,
        slots_init,
        params,
        1,
        1e-8,
        [1e-5, 1e-5, 1e-5],
        torch.float32,
        torch.float32,
    )
    torch.library.opcheck(torch.ops.jsa_fast.joint_slot_attention.default, args)
    # The backward operator has no double backward: it is checked on plain tensors.
    out = torch.ops.jsa_fast.joint_slot_attention.default(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:5]),
                                                     [p.detach() for p in params], *args[6:])  # fmt: skip
    grads = [torch.randn_like(o) if i % 3 else None for i, o in enumerate(out[:10])]
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:5]]
    torch.library.opcheck(
        torch.ops.jsa_fast.joint_slot_attention_backward.default,
        (grads, *plain, [p.detach() for p in params], out[10:], 1, 1e-8, [1e-5, 1e-5, 1e-5]),
    )


def test_operator_rejects_bad_arguments():
    x_img, x_aud, mask_img, _, slots_init, params = operator_arguments(dtype=torch.float32)
    with pytest.raises(ValueError, match="mask_aud"):
        joint_slot_attention(
            x_img, x_aud, mask_img, None, slots_init, params, 2, 1e-8, (1e-5,) * 3, torch.float32, torch.float32
        )
    with pytest.raises(ValueError, match="params"):
        joint_slot_attention(
            x_img, x_aud, None, None, slots_init, params[:-1], 2, 1e-8, (1e-5,) * 3, torch.float32, torch.float32
        )


class TinyModel(nn.Module):
    """A projection in front of the fused module, as in JSAModel."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.jsa = FusedJointSlotAttention(dim=dim, num_slots=2, iters=2, mlp_hidden=24, backend="triton")

    def forward(self, x_img, x_aud, mask_img, mask_aud):
        out = self.jsa(self.proj(x_img), self.proj(x_aud), mask_img, mask_aud)
        return out.slots_img.sum() + out.slots_aud.sum() + (out.ca_img * out.ia_img).sum() + out.ca_aud.sum()


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = TinyModel(16).to(DEVICE).eval()
    inputs = make_inputs(2, 5, 3, 16)
    # Inductor's CPU code generation adds minutes here and nothing to what is checked:
    # that the graph captures without breaks and AOT autograd traces the backward.
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    want = model(*inputs)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    got = compiled(*inputs)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------
# Paper shapes on a GPU
# ----------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype,out_atol,grad_rtol", [(torch.float32, 1e-4, 1e-3), (torch.bfloat16, 0.1, 0.08)])
def test_fused_matches_reference_paper_shapes(dtype, out_atol, grad_rtol):
    reference, fused = make_pair(512, 2, 5, mlp_hidden=1024, dtype=dtype)
    inputs = make_inputs(64, 49, 16, 512, dtype=dtype)
    assert_fused_matches_reference(reference.train(), fused.train(), inputs, out_atol=out_atol, grad_rtol=grad_rtol)


# ----------------------------------------------------------------------------------
# Any strides
# ----------------------------------------------------------------------------------


def with_layout(t, layout):
    """The same values as `t` in another memory layout: "sliced" (every other element of
    a wider buffer along the last dimension), "transposed" (the first two dimensions
    swapped in memory) or "expanded" (item 0 repeated with stride 0 over the batch)."""
    if layout == "sliced":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "transposed":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    assert layout == "expanded"
    return t[:1].expand(t.shape)


@pytest.mark.parametrize("layout", ["sliced", "transposed", "expanded"])
@pytest.mark.parametrize("which", ["masks", "tokens"])
def test_fused_matches_reference_on_any_strides(layout, which):
    reference, fused = make_pair(16, 2, 2)
    x_img, x_aud, mask_img, mask_aud = make_inputs(3, 5, 4, 16)
    if which == "masks":
        mask_img, mask_aud = with_layout(mask_img, layout), with_layout(mask_aud, layout)
        assert not mask_img.is_contiguous()
    else:
        x_img, x_aud = with_layout(x_img, layout), with_layout(x_aud, layout)
        assert not x_img.is_contiguous()
    assert_fused_matches_reference(
        reference.train(), fused.train(), [x_img, x_aud, mask_img, mask_aud], out_atol=1e-4, grad_rtol=1e-4
    )


# ----------------------------------------------------------------------------------
# The GPU registration's body, traced as torch.compile lowers it
# ----------------------------------------------------------------------------------

TRACE_GPU_BODIES = """
import json, sys
import torch, triton
from collections import Counter
from functorch.compile import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
import jsa_fast.kernels as kernels
from jsa_fast import JointSlotAttention
from jsa_fast.kernels.joint_slot_attention import PARAMETERS

class Sm90:  # what Inductor's analysis of which kernel arguments are written needs of a driver
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cuda")

triton.runtime.driver.set_active(Sm90())
assert not kernels.INTERPRET  # the ops are triton_op's
shape = json.loads(sys.argv[1])
reference = JointSlotAttention(dim=shape["dim"], num_slots=shape["slots"], iters=shape["iters"], mlp_hidden=shape["hidden"])
stacked = [torch.stack([reference.image.get_parameter(n), reference.audio.get_parameter(n)]).detach() for n in PARAMETERS]
graphs = []

def capture(gm, inputs):
    graphs.append(gm)
    return gm

args = (shape["iters"], 1e-8, [1e-5] * 3)

def forward(x_img, x_aud, mask_img, mask_aud, slots_init, *params):
    return torch.ops.jsa_fast.joint_slot_attention(x_img, x_aud, mask_img, mask_aud, slots_init, list(params), *args,
        torch.float32, torch.float32)

def backward(x_img, x_aud, mask_img, mask_aud, slots_init, *rest):
    grads, params, saved = rest[:10], rest[10:10 + len(PARAMETERS)], rest[10 + len(PARAMETERS):]
    return torch.ops.jsa_fast.joint_slot_attention_backward(list(grads), x_img, x_aud, mask_img, mask_aud, slots_init,
        list(params), list(saved), *args)

# Each operator traced on its own (the autograd engine's CUDA paths need a real device).
with FakeTensorMode(allow_non_fake_inputs=True):
    b, d = shape["batch"], shape["dim"]
    inputs = (torch.empty(b, shape["l_img"], d, device="cuda"), torch.empty(b, shape["l_aud"], d, device="cuda"),
              torch.zeros(b, shape["l_img"], device="cuda", dtype=torch.bool),
              torch.zeros(b, shape["l_aud"], device="cuda", dtype=torch.bool),
              torch.empty(shape["slots"], d, device="cuda"))
    params = [p.to("cuda") for p in stacked]
    out = aot_function(forward, fw_compiler=capture)(*inputs, *params)
    grads = aot_function(backward, fw_compiler=capture)(*inputs, *[torch.empty_like(o) for o in out[:10]], *params,
                                                         *out[10:])
report = {
    "outputs": [[list(o.shape), list(o.stride()), str(o.dtype)] for o in out[:10]],
    "grads": [[list(g.shape), str(g.dtype)] for g in grads[:3]],
    "graphs": [dict(Counter(str(n.target) for n in g.graph.nodes if n.op == "call_function")) for g in graphs],
}
print(json.dumps(report))
"""


def test_gpu_registration_traces_into_kernels_without_view_mutation():
    # On a GPU the operators are triton_op's that torch.compile traces into their kernels.
    # AOT autograd does that here to both operators on fake CUDA tensors (Inductor's
    # analysis of which kernel arguments are written compiles each kernel's IR for sm_90,
    # no GPU needed): every kernel writes only whole buffers, so functionalization adds no
    # scatter; the outputs and gradients have the interpreter's shapes, strides and dtypes.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    shape = dict(batch=3, l_img=7, l_aud=5, dim=16, slots=2, iters=2, hidden=24)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", TRACE_GPU_BODIES, json.dumps(shape)],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    forward_graph, backward_graph = report["graphs"]
    for graph in (forward_graph, backward_graph):
        assert graph.get("triton_kernel_wrapper_functional", 0) > 0
        assert not any("scatter" in op or "copy_" in op for op in graph), graph
    assert "jsa_fast.joint_slot_attention.default" not in forward_graph  # traced into its kernels

    reference, fused = make_pair(shape["dim"], shape["slots"], shape["iters"], mlp_hidden=shape["hidden"])
    x_img, x_aud, mask_img, mask_aud = make_inputs(shape["batch"], shape["l_img"], shape["l_aud"], shape["dim"])
    x_img.requires_grad_(), x_aud.requires_grad_()
    out = fused(x_img, x_aud, torch.zeros_like(mask_img), torch.zeros_like(mask_aud))
    assert report["outputs"] == [[list(o.shape), list(o.stride()), str(o.dtype)] for o in out]
    sum(o.sum() for o in out).backward()
    assert report["grads"] == [[list(t.grad.shape), str(t.grad.dtype)] for t in (x_img, x_aud)] + [
        [[shape["slots"], shape["dim"]], "torch.float32"]
    ]
