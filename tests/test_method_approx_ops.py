"""Approximate tensor operations (wus_tune.methods.approx_ops): maths, layers, Method hooks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wus_tune.errors import ConfigError
from wus_tune.methods import RunInfo, StepContext, build_methods, registry
from wus_tune.methods.approx_ops import (
    SAMPLERS,
    ApproxConv2d,
    ApproxLinear,
    ApproxOps,
    apply_approx_ops,
    approx_conv2d,
    exact_products,
    recalibrate_batchnorm,
    approx_linear,
    num_pairs,
    remove_approx_ops,
    select_pairs,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def ctx() -> RunInfo:
    return RunInfo(config=None, device=torch.device("cpu"), steps_per_epoch=2, total_steps=4, batch_size=16)

def step_of(run, model, opt, x, y, step=0):
    """The trainer's StepContext for one hand-driven step."""
    return StepContext(run=run, model=model, optimizer=opt, inputs=x, targets=y, step=step, epoch=0, forward=model,
                       loss_fn=F.cross_entropy)



# ---- k and pair selection ----------------------------------------------------------------------


def test_num_pairs_rounds_up_to_a_multiple_and_never_exceeds_n():
    assert num_pairs(64, sample_ratio=0.3) == 24  # floor(19.2) = 19 -> 24
    assert num_pairs(64, sample_ratio=0.3, round_to=1) == 19
    assert num_pairs(64, sample_ratio=0.01, minimal_k=5, round_to=1) == 5
    assert num_pairs(3, sample_ratio=0.5) == 3  # round_to capped at n
    assert num_pairs(20, sample_ratio=0.5) == 16
    assert num_pairs(20, sample_ratio=0.9) == 20  # 18 -> 24 -> capped at n
    for n in range(1, 70):
        for r in (0.1, 0.3, 0.5, 1.0):
            assert 1 <= num_pairs(n, sample_ratio=r) <= n


def test_topk_picks_the_largest_scores():
    scores = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2, 3.0, 0.0, 2.5])
    idx, scale = select_pairs(scores, 3, "topk")
    assert idx.tolist() == [1, 3, 5]
    assert scale is None


def test_k_equal_n_keeps_every_pair_unscaled():
    scores = torch.rand(10)
    for sampler in SAMPLERS:
        idx, scale = select_pairs(scores, 10, sampler)
        assert idx.tolist() == list(range(10)) and scale is None


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_k_equal_n_reproduces_the_exact_product(sampler):
    torch.manual_seed(1)
    x, w, b = torch.randn(5, 12), torch.randn(7, 12), torch.randn(7)
    assert torch.allclose(approx_linear(x, w, b, sample_ratio=1.0, sampler=sampler), F.linear(x, w, b))
    # minimal_k >= n also means "exact"
    assert torch.allclose(approx_linear(x, w, b, sample_ratio=0.1, minimal_k=12, sampler=sampler), F.linear(x, w, b))
    xc, wc = torch.randn(2, 6, 5, 5), torch.randn(4, 6, 3, 3)
    exact = F.conv2d(xc, wc, None, 1, 1)
    assert torch.allclose(approx_conv2d(xc, wc, None, 1, 1, sample_ratio=1.0, sampler=sampler), exact)


def test_crs_and_bernoulli_scales_are_inverse_keep_probabilities():
    scores = torch.tensor([4.0, 1.0, 1.0, 2.0, 0.0, 0.0])
    g = torch.Generator().manual_seed(0)
    idx, scale = select_pairs(scores, 2, "bernoulli", g)
    p = (2 * scores / scores.sum()).clamp(max=1)
    assert torch.allclose(scale, 1 / p[idx])
    assert 4 not in idx.tolist() and 5 not in idx.tolist()  # zero score: never kept (it adds nothing)
    idx, scale = select_pairs(scores, 2, "crs", g)
    assert idx.numel() <= 2
    counts = scale * (2 * scores[idx] / scores.sum())  # scale_i * k p_i = number of draws of pair i
    assert torch.allclose(counts, torch.round(counts)) and counts.sum().round() == 2


def _sample_mean_and_stderr(sampler: str, x: torch.Tensor, w: torch.Tensor, draws: int):
    g = torch.Generator().manual_seed(1234)
    samples = torch.stack([
        approx_linear(x, w, None, sample_ratio=0.25, round_to=1, sampler=sampler, generator=g) for _ in range(draws)
    ]).double()
    return samples.mean(0), samples.std(0) / draws**0.5


@pytest.mark.parametrize("sampler", ["bernoulli", "crs"])
def test_random_samplers_are_unbiased(sampler):
    """The mean of many sampled products is within 5 standard errors of the exact product, entry by entry.

    A statistical bound: with a fixed seed it is deterministic, and the topk control below shows that a
    biased estimator fails it. Per entry a 5-sigma excursion has probability ~6e-7 (CLT), so a correct
    sampler fails this test with probability below 1e-4 for any seed.
    """
    torch.manual_seed(2)
    x = torch.randn(6, 32) * torch.linspace(0.2, 2.0, 32)  # unequal column norms: non-uniform probabilities
    w = torch.randn(5, 32)
    exact = F.linear(x, w).double()
    mean, stderr = _sample_mean_and_stderr(sampler, x, w, draws=3000)
    assert (stderr > 0).all()
    assert ((mean - exact).abs() <= 5 * stderr + 1e-6).all(), ((mean - exact).abs() / stderr).max()
    # and the approximation is a real one: single samples differ from the exact product
    g = torch.Generator().manual_seed(0)
    single = approx_linear(x, w, None, sample_ratio=0.25, round_to=1, sampler=sampler, generator=g)
    assert not torch.allclose(single.double(), exact, atol=1e-3)


def test_topk_is_biased_and_fails_the_unbiasedness_bound():
    torch.manual_seed(2)
    x = torch.randn(6, 32) * torch.linspace(0.2, 2.0, 32)
    w = torch.randn(5, 32)
    exact = F.linear(x, w).double()
    mean, _ = _sample_mean_and_stderr("topk", x, w, draws=3)
    assert (mean - exact).abs().max() > 0.1


def test_bernoulli_conv_is_unbiased():
    torch.manual_seed(3)
    x = torch.randn(2, 16, 4, 4) * torch.linspace(0.2, 2.0, 16).view(1, -1, 1, 1)
    w = torch.randn(3, 16, 3, 3)
    exact = F.conv2d(x, w, None, 1, 1).double()
    g = torch.Generator().manual_seed(7)
    draws = 2000
    s = torch.stack([
        approx_conv2d(x, w, None, 1, 1, sample_ratio=0.25, round_to=1, sampler="bernoulli", generator=g)
        for _ in range(draws)
    ]).double()
    stderr = s.std(0) / draws**0.5
    assert ((s.mean(0) - exact).abs() <= 5 * stderr + 1e-6).all()


def test_nothing_drawn_gives_a_zero_product_of_the_right_shape():
    from wus_tune.methods.approx_ops import _gather

    x, w = torch.randn(2, 16, 4, 4), torch.randn(3, 16, 3, 3)
    xs, ws = _gather(x, w, 1, torch.empty(0, dtype=torch.long), torch.empty(0))
    y = F.conv2d(xs, ws, torch.ones(3), 1, 1)
    assert y.shape == (2, 3, 4, 4) and torch.equal(y, torch.ones_like(y))


# ---- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_gradients_flow_with_the_right_shapes(sampler):
    torch.manual_seed(4)
    x = torch.randn(8, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    approx_linear(x, w, b, sample_ratio=0.25, sampler=sampler).square().sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    used = (w.grad.abs().sum(0) > 0).sum().item()
    assert 0 < used < 32  # only the sampled columns get a gradient this step
    xc = torch.randn(2, 16, 6, 6, requires_grad=True)
    wc = torch.randn(8, 16, 3, 3, requires_grad=True)
    approx_conv2d(xc, wc, None, 2, 1, sample_ratio=0.5, sampler=sampler).sum().backward()
    assert xc.grad.shape == xc.shape and wc.grad.shape == wc.shape


def test_topk_gradient_matches_the_gradient_of_the_reduced_product():
    torch.manual_seed(5)
    x = torch.randn(4, 16)
    w = torch.randn(3, 16, requires_grad=True)
    approx_linear(x, w, None, sample_ratio=0.5, sampler="topk").sum().backward()
    scores = x.norm(dim=0) * w.detach().norm(dim=0)
    keep = torch.topk(scores, 8).indices
    expected = torch.zeros(3, 16)
    expected[:, keep] = x[:, keep].sum(0).expand(3, -1)
    assert torch.allclose(w.grad, expected)


def test_step_flops_fall_with_the_sample_ratio():
    """Machine-independent check that the products really shrink (forward and both backward products)."""
    from torch.utils.flop_counter import FlopCounterMode

    def step_flops(model):
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
        return counter.get_total_flops()

    exact = step_flops(small_cnn())
    half = small_cnn()
    apply_approx_ops(half, sample_ratio=0.5, sampler="topk")
    assert step_flops(half) < 0.85 * exact


# ---- layers and model surgery --------------------------------------------------------------------


def test_apply_keeps_first_and_last_layers_and_parameters():
    model = small_cnn()
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict().keys())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    names = apply_approx_ops(model, sample_ratio=0.5)
    assert names == ["3", "6", "10"]
    assert type(model[0]) is nn.Conv2d and type(model[12]) is nn.Linear  # first and last stay exact
    assert isinstance(model[3], ApproxConv2d) and isinstance(model[10], ApproxLinear)
    assert list(model.state_dict().keys()) == keys_before
    for name, p in model.named_parameters():
        assert p is params_before[name]
    assert opt.param_groups[0]["params"][0] is model[0].weight


def test_first_and_last_layers_compute_exactly_in_training():
    model = small_cnn()
    reference = copy.deepcopy(model)
    apply_approx_ops(model, sample_ratio=0.3)
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(model[0](x), reference[0](x))
    h = torch.randn(4, 64)
    assert torch.equal(model[12](h), reference[12](h))


def test_eval_mode_is_bitwise_exact():
    model = small_cnn()
    reference = copy.deepcopy(model)
    apply_approx_ops(model, sample_ratio=0.3, sampler="bernoulli")
    model.eval()
    reference.eval()
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(model(x), reference(x))
    h = torch.randn(4, 32)
    assert torch.equal(model[10](h), reference[10](h))
    # and in training the approximated layers really differ
    model.train()
    reference.train()
    assert not torch.allclose(model[10](h), reference[10](h))


def test_ineligible_layers_are_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=4), nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular"),
        nn.Conv2d(16, 16, 1), nn.Linear(16, 4),
    )
    assert apply_approx_ops(model, sample_ratio=0.5) == ["3"]
    assert type(model[1]) is nn.Conv2d and type(model[2]) is nn.Conv2d


def test_remove_restores_exact_layers():
    model = small_cnn()
    apply_approx_ops(model, sample_ratio=0.5)
    assert remove_approx_ops(model) == 3
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_deepcopy_and_pickle_of_an_approximated_model():
    import pickle

    model = small_cnn()
    apply_approx_ops(model, sample_ratio=0.5)
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    assert isinstance(clone[3], ApproxConv2d)
    clone.eval()
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(clone(x), model(x))


def test_exact_products_context_and_batchnorm_recalibration():
    model = small_cnn()
    reference = copy.deepcopy(model)
    apply_approx_ops(model, sample_ratio=0.3)
    x = torch.randn(8, 3, 8, 8)
    with exact_products(model):
        assert torch.allclose(model(x), reference(x), atol=1e-6)  # training mode, yet exact
    assert model[3].approx_k < 16  # restored
    # running statistics from approximated training forwards differ from the exact ones ...
    for _ in range(3):
        model(x)
        reference(x)
    assert not torch.allclose(model[4].running_var, reference[4].running_var, rtol=1e-3)
    # ... and recalibration recomputes them with exact products (a plain average over the batches)
    for m in (model, reference):
        m.eval()
        assert recalibrate_batchnorm(m, [x, x * 2]) == 2
        assert not m.training and m[4].momentum == 0.1
    assert torch.allclose(model[4].running_mean, reference[4].running_mean, atol=1e-5)
    assert torch.allclose(model[4].running_var, reference[4].running_var, atol=1e-5)
    assert torch.allclose(model(x), reference(x), atol=1e-5)


# ---- the Method ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"sample_ratio": 0.0}, "sample_ratio"),
        ({"sample_ratio": 1.5}, "sample_ratio"),
        ({"sample_ratio": True}, "sample_ratio"),
        ({"minimal_k": 0}, "minimal_k"),
        ({"minimal_k": 2.5}, "minimal_k"),
        ({"sampler": "random"}, "sampler"),
        ({"round_to": 0}, "round_to"),
        ({"bn_batches": -1}, "bn_batches"),
        ({"until": 0.0}, "until"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ApproxOps(**kwargs)


def test_registered_and_validated_through_the_registry():
    assert registry()["approx_ops"] is ApproxOps
    (method,) = build_methods({"approx_ops": {"sample_ratio": 0.5, "sampler": "crs"}})
    assert method.params == {
        "sample_ratio": 0.5, "minimal_k": 1, "sampler": "crs", "round_to": 8, "bn_batches": 4, "until": 1.0,
    }
    assert type(method)(**method.params).params == method.params  # round-trips
    with pytest.raises(ConfigError, match="approx_ops"):
        build_methods({"approx_ops": {"sample_ratio": 2.0}})
    with pytest.raises(ConfigError, match="approx_ops.ratio"):
        build_methods({"approx_ops": {"ratio": 0.5}})


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_method_in_a_hand_written_loop(sampler):
    torch.manual_seed(0)
    model = small_cnn()
    method = ApproxOps(sample_ratio=0.5, sampler=sampler)
    c = ctx()
    model = method.setup(model, c)
    opt = method.make_optimizer(model, c) or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    losses = []
    for epoch in range(2):
        model.train()
        for step in range(2):
            s = step_of(c, model, opt, x, y, epoch * 2 + step)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            method.before_step(s)
            opt.step()
            method.after_step(s)
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        metrics = method.end_epoch(model, c)
        assert metrics["approx_ops/layers"] == 3
        assert 0.2 < metrics["approx_ops/kept_fraction"] < 0.9
    assert all(torch.isfinite(torch.tensor(losses)))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_method_recalibrates_batchnorm_at_each_epoch_end_and_stops_at_until():
    torch.manual_seed(0)
    model = small_cnn()
    method = ApproxOps(sample_ratio=0.5, bn_batches=2, until=0.75)
    c = ctx()
    model = method.setup(model, c)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    calls = []
    import wus_tune.methods.approx_ops as ao

    original = ao.recalibrate_batchnorm
    current = [0]
    ao.recalibrate_batchnorm = lambda m, batches: calls.append((current[0], len(batches))) or original(m, batches)
    try:
        for step in range(4):
            current[0] = step
            x = torch.randn(8, 3, 8, 8)
            y = torch.randint(0, 10, (8,))
            F.cross_entropy(model(x), y).backward()
            s = step_of(c, model, opt, x, y, step)
            method.before_step(s)
            opt.step()
            method.after_step(s)
            opt.zero_grad(set_to_none=True)
            if step == 2:
                assert not any(isinstance(m, (ApproxLinear, ApproxConv2d)) for m in model.modules())
    finally:
        ao.recalibrate_batchnorm = original
    assert calls == [(1, 2), (2, 1)]  # end of epoch 1 (2 batches); at until (3 of 4 steps), once more
    assert method.end_epoch(model, c)["approx_ops/layers"] == 0
