"""Hessian-vector products, Lanczos and SLQ against the dense Hessian of a tiny model; the loss barrier on
paths whose answer is known."""

import math

import pytest
import torch
from torch import nn

from weightkit.errors import WeightkitError
from weightkit.inspect.hessian import (
    hessian_density,
    hessian_eigenvalues,
    hessian_operator,
    lanczos,
    lanczos_tridiagonal,
    loss_barrier,
    ritz,
    slq_density,
)
from weightkit.testing import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mlp_problem():
    """A 212-parameter MLP (float64) with a cross-entropy loss on fixed random data, and its dense Hessian
    computed independently (torch.autograd.functional.hessian over the flattened parameters)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x = torch.randn(64, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (64,))

    def loss_fn(m):
        return nn.functional.cross_entropy(m(x), y)

    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def flat_loss(flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    dense = torch.autograd.functional.hessian(flat_loss, flat)
    return model, loss_fn, dense


@pytest.fixture(scope="module")
def mlp_problem():
    return _mlp_problem()


def test_hessian_vector_products_equal_the_dense_hessian_times_the_vector(mlp_problem):
    model, loss_fn, dense = mlp_problem
    operator = hessian_operator(model, loss_fn)
    assert operator.dim == dense.shape[0] == 212
    vector = torch.randn(operator.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(operator(vector), dense @ vector, rtol=1e-10, atol=1e-12)
    # The products leave the model's parameters and gradients alone.
    assert all(p.grad is None for p in model.parameters())


def test_lanczos_top_eigenvalues_equal_the_dense_hessians(mlp_problem):
    model, loss_fn, dense = mlp_problem
    expected = torch.linalg.eigvalsh(dense).flip(0)[:5]
    top = hessian_eigenvalues(model, loss_fn, k=5, iterations=40, seed=0)
    scale = float(expected.abs().max())
    torch.testing.assert_close(top, expected, rtol=0, atol=1e-10 * scale)
    # Few iterations already pin the largest (the outlier converges first), not yet the fifth.
    early = hessian_eigenvalues(model, loss_fn, k=5, iterations=20, seed=0)
    assert abs(float(early[0] - expected[0])) < 1e-9 * scale
    assert abs(float(early[4] - expected[4])) > 1e-6 * scale


def test_on_a_tiny_llama_lanczos_agrees_with_the_dense_hessian():
    # 1,112 parameters, eager attention, float64 (transformers still computes the attention softmax in
    # float32, so both Hessians carry float32 rounding: agreement to 1e-6 of the largest eigenvalue).
    sizes = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    model = tiny_llama(
        **sizes, num_key_value_heads=1, vocab_size=32, max_position_embeddings=16, attn_implementation="eager"
    ).double()
    ids = torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(0))
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def flat_loss(flat):
        params = dict(
            zip(
                names,
                (
                    part.view(s)
                    for part, s in zip(flat.split([s.numel() for s in shapes]), shapes, strict=True)
                ),
                strict=True,
            )
        )
        return torch.func.functional_call(model, params, (), {"input_ids": ids, "labels": ids}).loss

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = torch.linalg.eigvalsh(torch.autograd.functional.hessian(flat_loss, flat, vectorize=True)).flip(
        0
    )
    top = hessian_eigenvalues(model, lambda m: m(input_ids=ids, labels=ids).loss, k=5, iterations=60)
    assert flat.numel() == 1112
    torch.testing.assert_close(top, expected[:5], rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_lanczos_is_seeded_and_refuses_what_it_cannot_answer(mlp_problem):
    model, loss_fn, _ = mlp_problem
    first = hessian_eigenvalues(model, loss_fn, k=3, iterations=15, seed=3)
    assert torch.equal(first, hessian_eigenvalues(model, loss_fn, k=3, iterations=15, seed=3))
    with pytest.raises(WeightkitError, match="k must be"):
        hessian_eigenvalues(model, loss_fn, k=20, iterations=15)
    with pytest.raises(WeightkitError, match="exceed the dimension"):
        hessian_eigenvalues(model, loss_fn, k=3, iterations=500)


def test_a_closed_krylov_subspace_gives_exact_eigenvalues_and_refuses_more():
    # diag(3, 3, 1, 1, 1, 0): three distinct eigenvalues, so the Krylov subspace closes after 3 steps.
    matrix = torch.diag(torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    alpha, beta = lanczos_tridiagonal(lambda v: matrix @ v, torch.ones(6, dtype=torch.float64), 6)
    assert alpha.numel() == 3 and beta.numel() == 2
    values, weights = ritz(alpha, beta)
    torch.testing.assert_close(values, torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64))
    # Gauss quadrature of the start vector (1, ..., 1)/sqrt(6): its squared components per eigenvalue.
    torch.testing.assert_close(weights, torch.tensor([1 / 6, 3 / 6, 2 / 6], dtype=torch.float64))
    assert lanczos(lambda v: matrix @ v, 6, k=2, iterations=6).tolist() == pytest.approx([3.0, 1.0])
    with pytest.raises(WeightkitError, match="distinct eigenvalues"):
        lanczos(lambda v: matrix @ v, 6, k=4, iterations=6)


def test_slq_density_integrates_to_one_and_sits_where_the_dense_eigenvalues_are(mlp_problem):
    model, loss_fn, dense = mlp_problem
    eigenvalues = torch.linalg.eigvalsh(dense)
    density = hessian_density(model, loss_fn, probes=8, iterations=60, seed=0)
    assert float(torch.trapezoid(density.density, density.grid)) == pytest.approx(1.0, abs=1e-6)
    assert (density.density >= 0).all()
    # Each probe's quadrature is exact for v^T H v (Gauss quadrature with m nodes integrates polynomials of
    # degree < 2m), so the density's mean is the mean over probes of v^T H v, computed here densely.
    probes = []
    for seed in range(8):
        v = torch.randn(dense.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        v = v / v.norm()
        probes.append(float(v @ dense @ v))
    step = density.grid[1] - density.grid[0]
    mean = float((density.grid * density.density).sum() * step)
    assert mean == pytest.approx(sum(probes) / len(probes), abs=1e-6)
    # The mass: the density's CDF follows the dense eigenvalues' empirical CDF (Kolmogorov distance).
    cdf = torch.cumsum(density.density, 0) * step
    empirical = torch.searchsorted(eigenvalues, density.grid, right=True).double() / eigenvalues.numel()
    assert float((cdf - empirical).abs().max()) < 0.15
    # The extreme eigenvalues are nodes of the quadrature.
    nodes = density.nodes[~density.nodes.isnan()]
    assert float(nodes.max()) == pytest.approx(float(eigenvalues[-1]), rel=1e-8)
    assert float(nodes.min()) == pytest.approx(float(eigenvalues[0]), rel=1e-6)
    assert len(density.curve()) == density.grid.numel()


def test_slq_of_a_bulk_plus_outliers_shows_both():
    # 200 eigenvalues near zero and two outliers at 10 and 20: the density has its mass at 0 and two small
    # bumps of 1/202 each at the outliers.
    generator = torch.Generator().manual_seed(0)
    spectrum = torch.cat([0.05 * torch.randn(200, generator=generator, dtype=torch.float64),
                          torch.tensor([10.0, 20.0], dtype=torch.float64)])  # fmt: skip
    q, _ = torch.linalg.qr(torch.randn(202, 202, generator=generator, dtype=torch.float64))
    matrix = q @ torch.diag(spectrum) @ q.T
    density = slq_density(lambda v: matrix @ v, 202, probes=10, iterations=30, seed=0)
    step = float(density.grid[1] - density.grid[0])
    near = lambda lo, hi: float(density.density[(density.grid > lo) & (density.grid < hi)].sum() * step)  # noqa: E731
    assert near(-1, 1) > 0.95
    assert near(9, 11) == pytest.approx(1 / 202, rel=0.6) and near(19, 21) == pytest.approx(1 / 202, rel=0.6)
    assert near(2, 8) + near(12, 18) < 1e-4


def test_a_loss_that_is_not_a_finite_scalar_is_refused(mlp_problem):
    model, _, _ = mlp_problem
    with pytest.raises(WeightkitError, match="scalar"):
        hessian_operator(model, lambda m: m(torch.zeros(2, 8, dtype=torch.float64)))
    with pytest.raises(WeightkitError, match="nan"):
        hessian_operator(model, lambda m: m(torch.zeros(1, 8, dtype=torch.float64)).sum() * math.nan)
    with torch.no_grad(), pytest.raises(WeightkitError, match="no_grad"):
        hessian_operator(model, lambda m: m(torch.zeros(1, 8, dtype=torch.float64)).sum())


# -- loss barrier ----------------------------------------------------------------------------------------


def _states(seed_a: int, seed_b: int):
    torch.manual_seed(seed_a)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    state_a = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(seed_b)
    state_b = {
        k: v.clone()
        for k, v in nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict().items()
    }
    return model, state_a, state_b


def test_the_barrier_between_a_model_and_itself_is_exactly_zero():
    model, state_a, _ = _states(0, 1)
    x = torch.randn(16, 4)
    with torch.no_grad():
        result = loss_barrier(model, state_a, state_a, lambda m: float(m(x).square().mean()), points=7)
    assert result.barrier == 0.0
    assert len(set(result.losses)) == 1 and result.ts[0] == 0.0 and result.ts[-1] == 1.0


def test_a_convex_loss_never_rises_above_the_chord():
    model, state_a, state_b = _states(0, 1)
    target = {k: torch.randn_like(v) for k, v in state_a.items()}

    def quadratic(m):  # convex in the weights
        return float(sum((p - target[n]).square().sum() for n, p in m.state_dict().items()))

    result = loss_barrier(model, state_a, state_b, quadratic, points=11)
    chord = [(1 - t) * result.losses[0] + t * result.losses[-1] for t in result.ts]
    assert all(loss <= c + 1e-9 for loss, c in zip(result.losses[1:-1], chord[1:-1], strict=True))
    assert result.barrier == 0.0 and result.barrier_t in (0.0, 1.0)


def test_a_known_bump_gives_its_height_and_place():
    # Loss = 1 - (w - 0.5)^2 in one weight that moves from 0 to 1: the chord is flat at 0.75, the path
    # peaks at 1 at t = 0.5, so the barrier is 0.25 there.
    model = nn.Linear(1, 1, bias=False)
    state_a, state_b = {"weight": torch.zeros(1, 1)}, {"weight": torch.ones(1, 1)}
    result = loss_barrier(
        model, state_a, state_b, lambda m: 1 - (float(m.weight.detach()) - 0.5) ** 2, points=5
    )
    assert result.barrier == pytest.approx(0.25) and result.barrier_t == 0.5
    assert result.curve()[2] == pytest.approx((0.5, 1.0))


def test_the_barrier_moves_only_parameters_restores_the_weights_and_checks_states():
    model, state_a, state_b = _states(0, 1)
    model.register_buffer("steps", torch.tensor(7))
    model.register_buffer("running", torch.zeros(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_a["steps"], state_b["steps"] = torch.tensor(1), torch.tensor(2)
    state_a["running"], state_b["running"] = torch.ones(2), torch.full((2,), 3.0)
    seen = []

    def record(m):
        seen.append((int(m.steps), m.running.tolist(), float(m[0].weight[0, 0].detach())))
        return 0.0

    loss_barrier(model, state_a, state_b, record, points=3)
    # Buffers (integer or not) stay state_a's; the parameters move from a to b.
    assert [(steps, running) for steps, running, _ in seen] == [(1, [1.0, 1.0])] * 3
    w_a, w_b = float(state_a["0.weight"][0, 0]), float(state_b["0.weight"][0, 0])
    assert [w for _, _, w in seen] == pytest.approx([w_a, (w_a + w_b) / 2, w_b])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name

    def fails(m):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        loss_barrier(model, state_a, state_b, fails)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    del state_b["0.weight"]
    with pytest.raises(WeightkitError, match=r"state_b .*missing \['0.weight'\]"):
        loss_barrier(model, state_a, state_b, lambda m: 0.0)
    with pytest.raises(WeightkitError, match="nan"):
        loss_barrier(model, state_a, state_a, lambda m: math.nan)
