"""PiSSA: factors that rebuild the weight, span its top subspace and equal PEFT's; the rank-2r export."""

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from weightkit.adapt.pissa import pissa_to_lora, principal_factors
from weightkit.errors import WeightkitError
from weightkit.testing import tiny_llama


def _weight(out=16, inp=24, seed=0, gap=False):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=generator)
    if gap:  # a clear spectral gap after 4 directions, where the randomised SVD is accurate
        low_rank = torch.randn(out, 4, generator=generator) @ torch.randn(4, inp, generator=generator)
        weight = 0.05 * weight + 3 * low_rank
    return weight


@pytest.mark.parametrize("niter", [None, 4])
def test_residual_plus_scaled_factors_is_the_weight_and_the_factors_span_the_top_subspace(niter):
    weight, rank, scaling = _weight(gap=True), 4, 2.5
    A, B, residual = principal_factors(weight, rank, scaling, niter=niter)
    assert A.shape == (rank, 24) and B.shape == (16, rank) and residual.shape == weight.shape
    torch.testing.assert_close(residual + scaling * B @ A, weight, rtol=0, atol=1e-5)
    # Reference subspaces from the eigenvectors of W W^T and W^T W (not an SVD).
    left = torch.linalg.eigh(weight.double() @ weight.double().T).eigenvectors[:, -rank:]
    right = torch.linalg.eigh(weight.double().T @ weight.double()).eigenvectors[:, -rank:]
    projector_b = B.double() @ torch.linalg.pinv(B.double())
    projector_a = torch.linalg.pinv(A.double()) @ A.double()
    torch.testing.assert_close(projector_b, left @ left.T, rtol=0, atol=1e-4)
    torch.testing.assert_close(projector_a, right @ right.T, rtol=0, atol=1e-4)
    # scaling * B @ A is the best rank-r approximation, and A, B share the singular values evenly.
    S = torch.linalg.svdvals(weight)
    residual_spectrum = torch.cat([S[rank:], torch.zeros(rank)])
    torch.testing.assert_close(torch.linalg.svdvals(residual), residual_spectrum, rtol=0, atol=1e-4)
    torch.testing.assert_close(scaling * A.norm(dim=1) ** 2, S[:rank], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scaling * B.norm(dim=0) ** 2, S[:rank], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rslora", [False, True])
def test_matches_peft_pissa_init_on_tiny_llama(rslora):
    base = tiny_llama(seed=0)
    originals = {
        n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))
    }
    config = PeftLoraConfig(
        r=4, lora_alpha=8, use_rslora=rslora, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"]
    )
    peft_model = get_peft_model(base, config)
    scaling = 8 / (2 if rslora else 4)
    for name, weight in originals.items():  # bit for bit: same float32 ops in the same order
        layer = peft_model.base_model.model.get_submodule(name)
        A, B, residual = principal_factors(weight, 4, scaling)
        torch.testing.assert_close(A, layer.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(B, layer.lora_B["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(residual, layer.base_layer.weight, rtol=0, atol=0)


def test_fast_svd_is_seeded_like_peft_and_leaves_the_global_rng_alone():
    weight = _weight()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = principal_factors(weight, 3, 0.5, niter=2, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    second = principal_factors(weight, 3, 0.5, niter=2, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    # PEFT's "pissa_niter_2": torch.svd_lowrank(W, r, niter=2) from the RNG state it finds (here: seed 7).
    torch.manual_seed(7)
    U, S, V = torch.svd_lowrank(weight, q=3, niter=2)
    root = torch.sqrt(S / 0.5)
    torch.testing.assert_close(first[0], torch.diag(root) @ V.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(first[1], U @ torch.diag(root), rtol=0, atol=1e-6)


def test_a_half_precision_weight_keeps_its_dtype_and_float32_factors_rebuild_it_up_to_the_residual_rounding():
    weight = _weight().to(torch.bfloat16)
    A, B, residual = principal_factors(weight, 4, 1.0)
    assert residual.dtype == torch.bfloat16 and A.dtype == B.dtype == torch.float32
    # Only the residual was rounded: the error is at most half a bf16 unit in the last place of each entry.
    rebuilt = residual.float() + B @ A
    half_ulp = residual.float().abs() * 2.0**-8
    assert ((rebuilt - weight.float()).abs() <= half_ulp + 1e-6).all()


def test_pissa_to_lora_is_the_trained_change_as_a_rank_2r_lora_on_the_original_weight():
    weight, rank, alpha = _weight(), 3, 6.0
    scaling = alpha / rank
    A0, B0, residual = principal_factors(weight, rank, scaling)
    generator = torch.Generator().manual_seed(1)
    A = A0 + 0.1 * torch.randn(A0.shape, generator=generator)  # "trained"
    B = B0 + 0.1 * torch.randn(B0.shape, generator=generator)
    A2, B2 = pissa_to_lora(A, B, A0, B0)
    assert A2.shape == (2 * rank, 24) and B2.shape == (16, 2 * rank)
    torch.testing.assert_close(B2 @ A2, B @ A - B0 @ A0, rtol=0, atol=1e-5)
    # With r and alpha doubled (same scaling), the LoRA on the original weight is the trained PiSSA model.
    torch.testing.assert_close(
        weight + (2 * alpha) / (2 * rank) * B2 @ A2, residual + scaling * B @ A, rtol=0, atol=1e-5
    )


def test_bad_inputs_are_refused():
    weight = _weight()
    with pytest.raises(WeightkitError, match=r"rank must be an integer in \[1, 16\]"):
        principal_factors(weight, 17, 1.0)
    with pytest.raises(WeightkitError, match="scaling must be > 0"):
        principal_factors(weight, 2, 0.0)
    with pytest.raises(WeightkitError, match="niter"):
        principal_factors(weight, 2, 1.0, niter=-1)
    with pytest.raises(WeightkitError, match="float32/float16/bfloat16 matrix"):
        principal_factors(weight.to(torch.int8), 2, 1.0)
    with pytest.raises(WeightkitError, match="cannot convert"):
        pissa_to_lora(torch.zeros(2, 24), torch.zeros(16, 2), torch.zeros(3, 24), torch.zeros(16, 3))
