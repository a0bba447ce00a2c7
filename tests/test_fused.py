"""The fused Triton kernels and FusedJointSlotAttention against jsa_fast/reference.py.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) at tiny shapes;
tests marked gpu repeat the comparison at the paper's shapes when CUDA is present.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jsa_fast.fused
from jsa_fast import FusedJointSlotAttention, JointSlotAttention
from jsa_fast.reference import JSAOutput
from jsa_fast.reference import slot_attention as reference_slot_attention
from kernels import gru_gates, slot_attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


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
    loss = sum((o.float() * w).sum() for o, w in zip(out, weights))
    grads = torch.autograd.grad(loss, [x_img, x_aud, *module.parameters()])
    return [o.float() for o in out], [g.float() for g in grads]


def assert_fused_matches_reference(reference, fused, inputs, out_atol, grad_rtol):
    """Every JSAOutput field within out_atol of the fp32 reference, every gradient within
    grad_rtol of the largest entry of the reference gradient."""
    fp32_inputs = [t.float() if t.is_floating_point() else t for t in inputs]
    with torch.no_grad():
        weights = [torch.randn_like(o) for o in reference(*fp32_inputs)]
    ref_out, ref_grads = outputs_and_grads(reference, *fp32_inputs, weights)
    out, grads = outputs_and_grads(fused, *inputs, weights)
    for name, got, want in zip(JSAOutput._fields, out, ref_out):
        torch.testing.assert_close(got, want, atol=out_atol, rtol=0, msg=lambda m: f"{name}: {m}")
    names = ["x_img", "x_aud", *(n for n, _ in reference.named_parameters())]
    for name, got, want in zip(names, grads, ref_grads):
        # Relative to the gradient's scale: parameters see sums over B*L*N terms.
        scale = want.abs().max().clamp_min(1e-3)
        torch.testing.assert_close(got / scale, want / scale, atol=grad_rtol, rtol=0, msg=lambda m: f"grad {name}: {m}")


# ----------------------------------------------------------------------------------
# The ops on their own
# ----------------------------------------------------------------------------------


def attention_inputs(batch, length, num_slots, dim, dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, length, dim, generator=gen, dtype=torch.float64)
    q = torch.randn(batch, num_slots, dim, generator=gen, dtype=torch.float64)
    w_k = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    b_k = torch.randn(dim, generator=gen, dtype=torch.float64)
    return [t.to(DEVICE, dtype) for t in (x, q, w_k, b_k)]


@pytest.mark.parametrize("batch,length,num_slots,dim", [(2, 7, 2, 40), (1, 1, 1, 8), (3, 5, 3, 33), (2, 16, 2, 64)])
def test_slot_attention_op_matches_reference(batch, length, num_slots, dim):
    x, q, w_k, b_k = (t.requires_grad_() for t in attention_inputs(batch, length, num_slots, dim, torch.float32))
    scale = 1 / math.sqrt(dim)
    attn, context = slot_attention(x, q @ w_k * scale, q @ b_k * scale, 1e-8)
    want_attn = reference_slot_attention(q, x @ w_k.T + b_k, 1e-8)
    want_context = torch.einsum("bls,bld->bsd", want_attn, x)
    torch.testing.assert_close(attn, want_attn, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(context, want_context, atol=1e-5, rtol=1e-5)
    g_attn, g_context = torch.randn_like(attn), torch.randn_like(context)
    got = torch.autograd.grad((attn * g_attn).sum() + (context * g_context).sum(), (x, q, w_k, b_k))
    want = torch.autograd.grad((want_attn * g_attn).sum() + (want_context * g_context).sum(), (x, q, w_k, b_k))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(CUDA, reason="on a GPU the GPU tiles are what every test runs")
def test_kernels_with_the_gpu_tiles_under_the_interpreter(monkeypatch):
    # The interpreter normally runs one strip over d and one GRU program; a GPU runs d in
    # 64-wide (forward) and 32-wide (backward) strips and 1024-element GRU programs. Here the
    # GPU configurations run under the interpreter, tails included (d = 100, 1,200 elements).
    import importlib

    for name in ("kernels.slot_attention", "kernels.gru"):
        module = importlib.import_module(name)
        gpu_config = module.launch_config
        monkeypatch.setattr(module, "launch_config", lambda *args, _config=gpu_config: _config(*args, interpret=False))
    assert importlib.import_module("kernels.slot_attention").launch_config(49, 100, 2, torch.float32, "backward")["BLOCK_D"] == 32
    test_slot_attention_op_matches_reference(2, 49, 2, 100)
    test_gru_gates_match_grucell(6, 200)


def test_slot_attention_op_eps_keeps_an_empty_slot_uniform():
    # A slot that loses every key gets A = eps everywhere: after key normalisation 1/L.
    x = torch.full((1, 4, 1), 100.0, device=DEVICE)
    attn, _ = slot_attention(x, torch.tensor([[[1.0], [-1.0]]], device=DEVICE), torch.zeros(1, 2, device=DEVICE), 1e-8)
    torch.testing.assert_close(attn[0, :, 1], torch.full((4,), 0.25, device=DEVICE))


@pytest.mark.parametrize("rows,dim", [(6, 40), (1, 3)])
def test_gru_gates_match_grucell(rows, dim):
    torch.manual_seed(0)
    cell = nn.GRUCell(dim, dim).to(DEVICE)
    u = torch.randn(rows, dim, device=DEVICE, requires_grad=True)
    h = torch.randn(rows, dim, device=DEVICE, requires_grad=True)
    got = gru_gates(F.linear(u, cell.weight_ih, cell.bias_ih), F.linear(h, cell.weight_hh, cell.bias_hh), h)
    want = cell(u, h)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(want)
    params = (u, h, *cell.parameters())
    for a, b in zip(torch.autograd.grad((got * g).sum(), params), torch.autograd.grad((want * g).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_ops_gradcheck_fp64():
    x, q, w_k, b_k = attention_inputs(1, 3, 2, 5, torch.float64)
    qk, c = q @ w_k, q @ b_k
    inputs = [t.detach().requires_grad_() for t in (x, qk, c)]
    assert torch.autograd.gradcheck(lambda *a: slot_attention(*a, 1e-3), inputs)
    gen = torch.Generator().manual_seed(3)
    gates = [torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_() for shape in ((2, 9), (2, 9), (2, 3))]
    assert torch.autograd.gradcheck(gru_gates, gates)


def test_opcheck_custom_ops():
    x, q, w_k, b_k = attention_inputs(2, 5, 2, 8, torch.float32)
    qk, c = q @ w_k, q @ b_k
    args = (x.requires_grad_(), qk.requires_grad_(), c.requires_grad_(), 1e-8)
    torch.library.opcheck(torch.ops.jsa.slot_attention.default, args)
    # The backward ops have no double backward: they are checked on plain tensors.
    attn, context = (t.detach() for t in slot_attention(*args))
    torch.library.opcheck(
        torch.ops.jsa.slot_attention_backward.default,
        (x.detach(), qk.detach(), c.detach(), torch.randn_like(attn), torch.randn_like(context), 1e-8),
    )
    gi, gh, h = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((4, 18), (4, 18), (4, 6)))
    torch.library.opcheck(torch.ops.jsa.gru_gates.default, (gi, gh, h))
    torch.library.opcheck(
        torch.ops.jsa.gru_gates_backward.default, (gi.detach(), gh.detach(), h.detach(), torch.randn(4, 6, device=DEVICE))
    )


def test_ops_reject_bad_shapes():
    x = torch.randn(2, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="qk"):
        slot_attention(x, torch.randn(2, 2, 7, device=DEVICE), torch.randn(2, 2, device=DEVICE), 1e-8)
    with pytest.raises(ValueError, match="gi"):
        gru_gates(torch.randn(3, 12, device=DEVICE), torch.randn(3, 12, device=DEVICE), torch.randn(3, 5, device=DEVICE))


# ----------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch,l_img,l_aud,dim,num_slots,iters",
    [(2, 7, 5, 40, 2, 3), (1, 3, 1, 24, 1, 1), (3, 5, 4, 36, 3, 2)],
)
@pytest.mark.parametrize("training", [False, True])
def test_fused_matches_reference_fp32(batch, l_img, l_aud, dim, num_slots, iters, training):
    reference, fused = make_pair(dim, num_slots, iters)
    reference.train(training), fused.train(training)
    inputs = make_inputs(batch, l_img, l_aud, dim)
    assert_fused_matches_reference(reference, fused, inputs, out_atol=1e-4, grad_rtol=1e-4)


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


def test_fused_training_draws_masks_and_eval_does_not():
    reference, fused = make_pair(16, 2, 1)
    x_img, x_aud, _, _ = make_inputs(2, 6, 4, 16)
    fused.eval()
    for got, want in zip(fused(x_img, x_aud), reference.eval()(x_img, x_aud)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    fused.train()
    fused.mask_prob = 0.5
    torch.manual_seed(4)
    first = fused(x_img, x_aud).slots_img
    torch.manual_seed(5)
    assert not torch.allclose(first, fused(x_img, x_aud).slots_img)


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
