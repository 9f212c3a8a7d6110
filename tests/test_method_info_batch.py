"""InfoBatch: the per-epoch draw (who is pruned, who is rescaled, unbiased), the annealing, the loaders drawing
a subset with each sample's position, the trainer's shorter epochs on an unchanged schedule, device-resident
and streamed data, snapshots, a slowed draw that moves relative time, and a digits study that searches it."""

from __future__ import annotations

import pytest
import torch

from wus_tune import TrainConfig, fit
from wus_tune.data import DeviceLoader, StreamLoader
from wus_tune.errors import ConfigError
from wus_tune.methods import build_methods
from wus_tune.methods import info_batch as ib
from wus_tune.schedules import lr_multiplier
from wus_tune.testing import burn

DIGITS = {"model": {"name": "mlp", "width": 1.0, "depth": 3}, "device": "cpu", "epochs": 8,
          "data": {"name": "digits", "val_fraction": 0.2}, "optim": {"lr": 0.05, "batch_size": 64}}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


# ---- the pure functions ----------------------------------------------------------------------------


def test_prune_leaves_out_a_ratio_of_the_well_learned_and_rescales_the_rest():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 5.0, 6.0, 0.05, 0.15, 7.0, 0.25])  # mean 1.945: seven below
    kept, weights = ib.prune(scores, 0.5, torch.Generator().manual_seed(0))
    low = set(torch.nonzero(scores < scores.mean()).flatten().tolist())
    pruned = set(range(10)) - set(kept.tolist())
    assert pruned <= low and len(pruned) == round(0.5 * 7)  # only well-learned samples are left out
    assert {4, 5, 8} <= set(kept.tolist()) and kept.tolist() == sorted(kept.tolist())
    for i in kept.tolist():
        assert weights[i] == (2.0 if i in low else 1.0)
    assert ib.prune(scores, 0.0)[0].tolist() == list(range(10))
    assert ib.prune(torch.ones(6), 0.5)[0].tolist() == list(range(6))  # all equal: nothing is below the mean


def test_the_rescaled_draw_is_unbiased():
    """E[sum over kept of w_i l_i] = sum of l_i: the epoch's expected gradient is the full one's."""
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(40, generator=g) ** 3
    total = 0.0
    draws = 4000
    for _ in range(draws):
        kept, weights = ib.prune(scores, 0.5, g)
        total += float((scores[kept] * weights[kept]).sum())
    assert total / draws == pytest.approx(float(scores.sum()), rel=0.01)


def test_only_the_epochs_before_anneal_prune_and_never_the_first():
    assert [ib.prunes_in(e, 8, 0.875) for e in range(8)] == [False] + [True] * 6 + [False]
    assert not any(ib.prunes_in(e, 8, 0.0) for e in range(8))


def test_weighted_loss_is_the_weighted_mean():
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert ib.weighted_loss(losses, None) == 2.0
    assert ib.weighted_loss(losses, torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(7 / 3)


@pytest.mark.parametrize("args, key", [({"prune_ratio": 1.0}, "prune_ratio"), ({"prune_ratio": -0.1}, "prune_ratio"),
                                       ({"anneal": 1.5}, "anneal"), ({"anneal": "x"}, "anneal")])
def test_bad_knobs_are_refused_naming_them(args, key):
    with pytest.raises(ConfigError, match=f"methods.info_batch: {key}: expected"):
        build_methods({"info_batch": args})


# ---- the loaders: a subset per epoch, each batch with its positions ------------------------------------


class _Items(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("streamed", [False, True])
def test_a_loader_draws_the_subset_once_each_with_its_positions(streamed):
    x = torch.arange(50, dtype=torch.float32).view(50, 1).repeat(1, 3)
    y = torch.arange(50) % 7
    options = {"batch_size": 8, "train": True, "seed": 2, "mean": (0.0,) * 3, "std": (1.0,) * 3}
    loader = StreamLoader(_Items(x, y), num_workers=0, **options) if streamed else DeviceLoader(x, y, **options)
    assert len(loader) == 6 and loader.split_size == 50
    subset = torch.tensor([3, 5, 8, 13, 21, 34, 1, 2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 0])
    loader.use_samples(subset)
    assert len(loader) == 19 // 8
    seen = []
    for xb, yb, index in loader.indexed():
        assert torch.equal(xb[:, 0], index.float()) and torch.equal(yb, index % 7)  # the positions are the samples'
        seen += index.tolist()
    assert len(seen) == 16 and len(set(seen)) == 16 and set(seen) <= set(subset.tolist())
    loader.use_samples(torch.tensor([7, 9]))
    assert [b.tolist() for _, _, b in loader.indexed()] in ([[7, 9]], [[9, 7]])  # smaller than a batch: one partial
    loader.use_samples(None)
    assert len(loader) == 6 and len({i for _, _, b in loader.indexed() for i in b.tolist()}) == 48
    with pytest.raises(ValueError, match="use_samples: expected 1 or more positions in"):
        loader.use_samples(torch.tensor([50]))


# ---- in the trainer ---------------------------------------------------------------------------------------


def _run(streamed: bool = False, **method):
    config = TrainConfig.from_dict(DIGITS)
    if streamed:
        config = config.replace({"data.memory_budget_mb": 0, "data.num_workers": 0})
    return fit(config.replace({"methods.info_batch": method})), fit(config)


@pytest.mark.parametrize("streamed", [False, True])
def test_pruned_epochs_are_shorter_on_the_same_schedule(streamed):
    result, baseline = _run(streamed, prune_ratio=0.5, anneal=0.75)
    full = baseline.epochs[0].steps
    steps = [e.steps for e in result.epochs]
    assert steps[0] == full and steps[6:] == [full, full]  # the first records the scores; from 0.75 on, all data
    assert all(s < 0.9 * full for s in steps[1:6])  # about a quarter of the samples pruned
    kept = [e.extra["info_batch/kept_fraction"] for e in result.epochs]
    well = [e.extra["info_batch/well_learned_fraction"] for e in result.epochs]
    assert kept[0] == 1.0 and kept[-1] == 1.0 and all(0.5 < k < 0.9 for k in kept[1:6])
    assert all(k == pytest.approx(1 - 0.5 * w, abs=0.01) for k, w in zip(kept[1:6], well[1:6]))
    # the schedule follows the epochs: an epoch of n batches steps through its stretch in n even steps, so
    # its last step stands one of them before the epoch's end, and the full epochs match the baseline's
    schedule, peak = TrainConfig.from_dict(DIGITS).schedule, DIGITS["optim"]["lr"]
    for epoch, (mine, theirs) in enumerate(zip(result.epochs, baseline.epochs)):
        last = (epoch + 1) * full - full / mine.steps
        assert mine.lr == pytest.approx(peak * lr_multiplier(schedule, last, 8 * full), rel=1e-9)
    assert [e.lr for e in result.epochs[6:]] == [e.lr for e in baseline.epochs[6:]]
    assert result.flops_fraction == pytest.approx(sum(steps) / (8 * full), rel=1e-6)
    assert result.val_acc > baseline.val_acc - 0.05


def test_relative_time_counts_the_fewer_steps_and_the_draw():
    config = TrainConfig.from_dict(DIGITS)
    result = fit(config.replace({"methods.info_batch": {}}), relative_to=config)
    steps = sum(e.steps for e in result.epochs)
    assert result.work_counts["step:full"] == steps < result.total_steps
    assert result.work_seconds["one-off:samples"]["seconds"] > 0  # the draws, charged
    assert 0.5 < result.relative_time < 1.0


SLOW = {"seconds": 0.0}


def _slowed_prune(scores, prune_ratio, generator=None):
    burn(SLOW["seconds"])
    return _PRUNE(scores, prune_ratio, generator)


_PRUNE = ib.prune


def test_a_slower_draw_moves_the_relative_time(monkeypatch):
    """The per-epoch draw is the method's selection work, charged to the run: slowing it (real CPU work) raises
    the relative time as much as the measured work grew (the trial only; the baseline never draws)."""
    from test_time_truth import slowed_ratios

    monkeypatch.setattr(ib, "prune", _slowed_prune)
    baseline = TrainConfig.from_dict({**DIGITS, "data": {"name": "digits", "val_fraction": 0.0}})
    trial = baseline.replace({"methods.info_batch": {}})
    work, relative = slowed_ratios(trial, baseline, SLOW, 0.05)
    assert work > 1.5, f"the slowed draw did not slow the trial: work ratio {work:.2f}"
    assert relative == pytest.approx(work, rel=0.25), (relative, work)


def test_a_run_resumed_inside_a_pruned_epoch_goes_on_as_the_uninterrupted_one(tmp_path):
    from wus_tune.run_state import RecordingPlan, snapshot_path

    config = TrainConfig.from_dict({**DIGITS, "epochs": 4}).replace({"methods.info_batch": {}})
    steps = [e.steps for e in fit(config).epochs]
    assert steps[1] < steps[0] and steps[2] > 3
    plan = RecordingPlan(every=steps[0] + steps[1] + 3, val=False, save_dir=str(tmp_path), save_at=(1,))  # in epoch 3
    whole = fit(config, recording=plan)
    resumed = fit(config, resume_from=snapshot_path(tmp_path, 1))
    assert resumed.resumed_from["epoch"] == 2 and resumed.resumed_from["batch"] == 3
    assert [e.steps for e in resumed.epochs] == [e.steps for e in whole.epochs]
    assert resumed.val_acc == whole.val_acc
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)


def test_a_digits_study_searching_it_completes_with_priced_trials(study_dir):
    from wus_tune._study.spec import StudySpec
    from wus_tune.study import run_study

    spec = StudySpec.from_dict({
        "name": "ib-digits", "train": {**DIGITS, "epochs": 4}, "methods": ["info_batch"],
        "baseline_fractions": [0.5], "tracking_uri": "none", "objectives": "accuracy,relative_time",
        "sampler_options": {"n_startup_trials": 2},
    }, source="test")  # fmt: skip
    outcome = run_study(spec, n_trials=5, echo=None)
    done = outcome.analysis.complete
    assert len(done) == 5
    chosen = [c for c in done if c.attrs.get("method") == "info_batch"]
    assert len(chosen) >= 2 and all(c.uses_method for c in chosen)
    assert {"prune_ratio": 0.5, "anneal": 0.875} in [c.config["methods"]["info_batch"] for c in chosen]
    for c in chosen:
        result = c.attrs["result"]
        assert 0 < result["relative_time"] < 1.1 and result["hook_time_s"] > 0  # the draws, charged
        assert result["work_counts"]["step:full"] < result["total_steps"]  # the pruned epochs' fewer steps
