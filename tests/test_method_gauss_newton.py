"""Sketched Gauss-Newton for two-layer ReLU networks: products, transforms, steps, optimizer, method."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wus_tune.methods import RunInfo, StepContext, build_methods, registry
from wus_tune.methods.gauss_newton import (
    GaussNewton,
    SketchedGaussNewton,
    exact_ggn_step,
    fwht,
    sketch_two_layer_jacobian,
    sketched_ggn_step,
    srht_sketch,
    two_layer_forward,
    two_layer_gram,
    two_layer_jvp,
    two_layer_parts,
    two_layer_vjp,
)

D = torch.float64


def _problem(n=12, m=48, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, d, generator=g, dtype=D)
    a = (2 * torch.randint(0, 2, (m, k), generator=g) - 1).to(D)
    X = torch.randn(n, d, generator=g, dtype=D)
    X = X / X.norm(dim=1, keepdim=True)
    y = torch.randn(n, k, generator=g, dtype=D)
    return W, a, X, y


def _dense_hadamard(n):
    h = torch.ones(1, 1, dtype=D)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_jvp_and_vjp_are_adjoint_and_match_autograd():
    W, a, X, _ = _problem()
    g = torch.Generator().manual_seed(1)
    V = torch.randn(W.shape, generator=g, dtype=D)
    U = torch.randn(X.shape[0], a.shape[1], generator=g, dtype=D)
    jv, jtu = two_layer_jvp(W, a, X, V), two_layer_vjp(W, a, X, U)
    assert float((jv * U).sum()) == pytest.approx(float((V * jtu).sum()), rel=1e-12)

    f = lambda w: two_layer_forward(w, a, X)  # noqa: E731
    _, jv_ref = torch.func.jvp(f, (W,), (V,))
    torch.testing.assert_close(jv, jv_ref)
    jac = torch.func.jacrev(f)(W)  # (n, K, m, d)
    torch.testing.assert_close(jtu, torch.einsum("nkmd,nk->md", jac, U))
    # the structured Gram is J J^T (rows output-major: k * n + i)
    jm = jac.permute(1, 0, 2, 3).reshape(-1, W.numel())
    torch.testing.assert_close(two_layer_gram(W, a, X), jm @ jm.T)


@pytest.mark.parametrize("n", [1, 2, 8, 128, 256, 1024])
def test_fwht_matches_dense_hadamard(n):
    x = torch.randn(3, 2, n, dtype=D)
    torch.testing.assert_close(fwht(x), x @ _dense_hadamard(n))
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(3, 6))


def test_srht_is_exact_at_full_size_and_unbiased():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(100, 7, dtype=D, generator=g)  # rows padded to 128
    full = srht_sketch(A, 128, generator=g)
    torch.testing.assert_close(full.T @ full, A.T @ A)
    grams = [srht_sketch(A, 64, generator=g) for _ in range(200)]
    mean = sum(s.T @ s for s in grams) / len(grams)
    assert float((mean - A.T @ A).norm() / (A.T @ A).norm()) < 0.05
    # the tensor sketch of J^T is an SRHT too: exact at the full padded size
    W, a, X, _ = _problem(n=6, m=10, d=3, k=2)
    sk = sketch_two_layer_jacobian(W, a, X, 16 * 4, generator=g)
    torch.testing.assert_close(sk.T @ sk, two_layer_gram(W, a, X))


@pytest.mark.parametrize("damping", [0.0, 1e-2])
@pytest.mark.parametrize("k", [1, 3])
def test_sketched_step_matches_exact_step(damping, k):
    W, a, X, y = _problem(n=16, m=96, d=6, k=k)
    exact = exact_ggn_step(W, a, X, y, damping=damping)
    for factorization in ("cholesky", "qr"):
        g = torch.Generator().manual_seed(0)
        sk = sketched_ggn_step(W, a, X, y, sketch_size=4 * 16 * k, cg_tol=1e-10, cg_max_iter=200,
                               damping=damping, generator=g, factorization=factorization)
        assert sk.rel_residual < 1e-9
        assert float((sk.direction - exact.direction).norm() / exact.direction.norm()) < 1e-6
        assert sk.loss == pytest.approx(exact.loss)
    # the undamped step solves J J^T z = r: the linearised outputs hit the targets
    if damping == 0:
        lin = two_layer_forward(W, a, X) - two_layer_jvp(W, a, X, exact.direction)
        torch.testing.assert_close(lin, y, atol=1e-8, rtol=0)


def test_loss_falls_geometrically_when_overparametrised():
    n, d = 32, 8
    W, a, X, y = _problem(n=n, m=64 * n, d=d, k=1, seed=3)
    g = torch.Generator().manual_seed(0)
    losses = [0.5 * float(((two_layer_forward(W, a, X) - y) ** 2).sum())]
    for _ in range(6):
        step = sketched_ggn_step(W, a, X, y, damping=1e-6, cg_tol=1e-8, cg_max_iter=100, generator=g)
        W = W - step.direction
        losses.append(0.5 * float(((two_layer_forward(W, a, X) - y) ** 2).sum()))
    for i in range(0, len(losses) - 2, 2):  # at least halves every two steps
        assert losses[i + 2] < 0.5 * losses[i]
    assert losses[-1] < 1e-3 * losses[0]


def test_optimizer_step_uses_the_batch_and_trains_the_bias():
    torch.manual_seed(0)
    first = nn.Linear(5, 200).double()
    signs = (2 * torch.randint(0, 2, (200, 3)) - 1).double()
    opt = SketchedGaussNewton(first.weight, signs, bias=first.bias, damping=1e-6, cg_tol=1e-10, cg_max_iter=200)
    x = torch.randn(10, 5, dtype=D)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    with pytest.raises(RuntimeError, match="set_batch"):
        opt.step()

    @torch.no_grad()
    def sq_loss():
        f = torch.relu(first(x)) @ signs / math.sqrt(200)
        return float(((f - nn.functional.one_hot(y, 3).double()) ** 2).sum())

    before, bias0 = sq_loss(), first.bias.detach().clone()
    for _ in range(3):  # PyTorch's small init: many ReLUs switch, so a step gains about 2x, not the linear 1e-6
        opt.set_batch(x, y)
        opt.step()
    assert sq_loss() < 0.15 * before
    assert not torch.equal(first.bias, bias0)
    assert opt.last["cg_iters"] >= 1


def _ctx(x, y):
    return RunInfo(config=None, device=torch.device("cpu"), steps_per_epoch=1, total_steps=3, batch_size=24)


def test_method_trains_a_two_layer_mlp_with_frozen_output_layer():
    assert registry()["gauss_newton"] is GaussNewton
    (method,) = build_methods({"gauss_newton": {"step_size": 1.0, "damping": 1e-4, "seed": 0}})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 256), nn.ReLU(inplace=True), nn.Linear(256, 4))
    x = torch.randn(24, 1, 4, 4)
    y = torch.randint(0, 4, (24,))
    ctx = _ctx(x, y)
    model = method.setup(model, ctx)
    out_layer = model[3]
    assert not out_layer.weight.requires_grad and not out_layer.bias.requires_grad
    assert set(out_layer.weight.detach().abs().flatten().tolist()) == {1 / math.sqrt(256)}
    frozen = out_layer.weight.detach().clone()
    opt = method.make_optimizer(model, ctx)
    accs = []
    assert method.owns_step()
    for step in range(3):
        cost = method.train_step(StepContext(run=ctx, model=model, optimizer=opt, inputs=x, targets=y, step=step,
                                             epoch=0, forward=model, loss_fn=nn.functional.cross_entropy))
        assert cost.logits.shape == (24, 4) and torch.isfinite(cost.loss)
        assert model[1].weight.grad is None  # no backward: the GN solve needs no gradient
        accs.append(float((model(x).argmax(1) == y).float().mean()))
    assert accs[-1] == 1.0
    assert torch.equal(out_layer.weight, frozen)
    metrics = method.end_epoch(model, ctx)
    assert set(metrics) == {"gauss_newton/cg_iters", "gauss_newton/rel_residual", "gauss_newton/sq_loss"}
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
        nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)),
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)),
        nn.Sequential(nn.Linear(4, 2)),
        nn.Sequential(nn.ReLU(), nn.Linear(4, 8), nn.Linear(8, 2)),
    ],
)
def test_method_rejects_other_models(model):
    (method,) = build_methods({"gauss_newton": {}})
    with pytest.raises(ValueError, match="two-layer|ReLU"):
        method.setup(model, _ctx(None, None))
    assert two_layer_parts(nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))


def test_method_validates_arguments():
    from wus_tune.errors import ConfigError

    for bad in ({"step_size": 0}, {"bias": "sgd"}, {"cg_max_iter": 0}, {"sketch_size": -3}, {"exact": "yes"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build_methods({"gauss_newton": bad})
