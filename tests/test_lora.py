"""lora.py's shared math: WeightedSquaredDrift (the HLoRA and EWC penalties) in float64 against autograd of the
direct formula, for each way of giving the reference; WorkBuffers reuse."""
import pytest
import torch

from hlora.lora import WeightedSquaredDrift, WorkBuffers, update_delta_w


def _factors(n=3, out=5, inn=7, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, inn, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    B = [torch.randn(out, r, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    omega = torch.rand(n, out, inn, generator=g, dtype=torch.float64)
    weight = torch.rand(n, 1, 1, generator=g, dtype=torch.float64)
    scale = torch.tensor([2.0, 0.5, 4.0][:n], dtype=torch.float64).view(-1, 1, 1)
    Bn = torch.randn(n, out, r, generator=g, dtype=torch.float64)
    An = torch.randn(n, r, inn, generator=g, dtype=torch.float64)
    return A, B, omega, weight, scale, Bn, An


@pytest.mark.parametrize("mode", ["factors", "whole", "none"])
def test_weighted_squared_drift_matches_direct_formula(mode):
    A, B, omega, weight, scale, Bn, An = _factors()
    n = len(A)
    ref_full = scale * torch.bmm(Bn, An)
    ref, ref_b, ref_a = {"factors": (None, scale * Bn, An), "whole": (ref_full, None, None),
                         "none": (None, None, None)}[mode]
    want_ref = torch.zeros_like(ref_full) if mode == "none" else ref_full
    want = sum(weight[k, 0, 0] * (omega[k] * (scale[k] * B[k] @ A[k] - want_ref[k]) ** 2).sum() for k in range(n))
    got = WeightedSquaredDrift.apply(WorkBuffers(), 0, weight, scale, omega, ref, ref_b, ref_a, n, *A, *B)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for g, w in zip(torch.autograd.grad(got, A + B), torch.autograd.grad(want, A + B)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_update_delta_w_is_the_change_of_s_b_a():
    A, B, _, _, scale, Bn, An = _factors()
    A0, B0 = torch.stack([a.detach() for a in A]), torch.stack([b.detach() for b in B])
    want = scale * (torch.bmm(Bn, An) - torch.bmm(B0, A0))
    buf = WorkBuffers()
    out = buf.get("d", want.shape, want.dtype, "cpu")
    got = update_delta_w(scale, A0, B0, An, Bn, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_work_buffers_are_kept_until_the_shape_changes():
    buf = WorkBuffers()
    a = buf.get("x", (2, 3), torch.float32, "cpu")
    assert buf.get("x", (2, 3), torch.float32, "cpu").data_ptr() == a.data_ptr()
    assert buf.get("x", (3, 3), torch.float32, "cpu").shape == (3, 3)
    assert buf.get("x", (3, 3), torch.float64, "cpu").dtype == torch.float64
