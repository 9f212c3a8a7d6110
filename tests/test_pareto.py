"""The Pareto maths against brute force, the frontier advantage, and the selection rules."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wus_tune.errors import UsageError
from wus_tune.pareto import (
    Candidate,
    analyse,
    dominates,
    frontier_advantage,
    hypervolume,
    hypervolume_history,
    knee,
    parse_rule,
    pareto_front,
    reference_point,
    select,
)

AT = ["maximize", "minimize"]  # (accuracy, time)


def brute_front(points, directions):
    return [i for i, p in enumerate(points) if not any(dominates(q, p, directions) for q in points)]


def brute_hv_2d(points, directions, ref, grid=None):
    """Exact area by the union of rectangles on the grid of all coordinates (inclusion by cells)."""
    s = [-1 if d == "maximize" else 1 for d in directions]
    loss = [tuple(x * v for x, v in zip(s, p)) for p in points]
    r = tuple(x * v for x, v in zip(s, ref))
    loss = [p for p in loss if p[0] < r[0] and p[1] < r[1]]
    xs = sorted({p[0] for p in loss} | {r[0]})
    ys = sorted({p[1] for p in loss} | {r[1]})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:]):
        for y0, y1 in zip(ys, ys[1:]):
            if any(p[0] <= x0 and p[1] <= y0 for p in loss):
                area += (x1 - x0) * (y1 - y0)
    return area


points_2d = st.lists(
    st.tuples(st.integers(0, 12).map(lambda v: v / 12), st.integers(1, 12).map(float)), min_size=0, max_size=25
)


@settings(max_examples=200, deadline=None)
@given(points_2d, st.sampled_from([AT, ["minimize", "minimize"], ["maximize", "maximize"]]))
def test_front_matches_brute_force_2d(points, directions):
    assert pareto_front(points, directions) == brute_front(points, directions)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(*[st.integers(0, 5)] * 3), max_size=20))
def test_front_matches_brute_force_3d(points):
    d = ["maximize", "minimize", "minimize"]
    assert pareto_front(points, d) == brute_front(points, d)


def test_random_fronts_and_hypervolume_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 30)
        pts = [(round(rng.random(), 2), round(rng.uniform(1, 10), 1)) for _ in range(n)]
        assert pareto_front(pts, AT) == brute_front(pts, AT)
        ref = (0.1, 9.0)
        assert hypervolume(pts, AT, ref) == pytest.approx(brute_hv_2d(pts, AT, ref), abs=1e-9)


def test_hypervolume_3d_agrees_with_2d_slab():
    # A constant third objective at distance 1 from the reference multiplies the 2-D area by 1.
    pts = [(0.9, 10.0, 0.0), (0.8, 5.0, 0.0), (0.85, 12.0, 0.0)]
    d = AT + ["minimize"]
    hv3 = hypervolume(pts, d, (0.7, 20.0, 1.0))
    hv2 = hypervolume([p[:2] for p in pts], AT, (0.7, 20.0))
    assert hv3 == pytest.approx(hv2)


def brute_hv(points, directions, ref):
    """Exact volume by the cells of the grid of all coordinates, any number of objectives."""
    s = [-1 if d == "maximize" else 1 for d in directions]
    loss = [tuple(x * v for x, v in zip(s, p)) for p in points]
    r = tuple(x * v for x, v in zip(s, ref))
    loss = [p for p in loss if all(a < b for a, b in zip(p, r))]
    axes = [sorted({p[k] for p in loss} | {r[k]}) for k in range(len(r))]
    volume = 0.0
    for cell in itertools.product(*[list(zip(a, a[1:])) for a in axes]):
        if any(all(p[k] <= lo for k, (lo, _) in enumerate(cell)) for p in loss):
            volume += math.prod(hi - lo for lo, hi in cell)
    return volume


@settings(max_examples=150, deadline=None)
@given(st.integers(3, 4).flatmap(lambda d: st.tuples(
    st.just(d), st.lists(st.tuples(*[st.integers(0, 6).map(lambda v: v / 6)] * d), max_size=9))))
def test_hypervolume_of_three_and_four_objectives_against_brute_force(case):
    d, points = case
    directions = ["maximize"] + ["minimize"] * (d - 1)
    ref = (0.1,) + (0.9,) * (d - 1)
    assert hypervolume(points, directions, ref) == pytest.approx(brute_hv(points, directions, ref), abs=1e-12)
    history = hypervolume_history(points, directions, ref)
    assert history == pytest.approx([brute_hv(points[: k + 1], directions, ref) for k in range(len(points))], abs=1e-12)


def test_hypervolume_small_cases():
    assert hypervolume([], AT, (0.0, 1.0)) == 0.0
    assert hypervolume([(0.9, 10.0)], AT, (0.7, 20.0)) == pytest.approx(0.2 * 10)
    # Outside the reference box: nothing.
    assert hypervolume([(0.6, 10.0), (0.9, 25.0)], AT, (0.7, 20.0)) == 0.0
    # Dominated points add nothing.
    assert hypervolume([(0.9, 10.0), (0.8, 12.0)], AT, (0.7, 20.0)) == pytest.approx(2.0)


def test_hypervolume_history_is_monotone_and_matches_prefixes():
    rng = random.Random(1)
    pts = [(rng.random(), rng.uniform(1, 10)) for _ in range(25)]
    ref = (0.0, 11.0)
    hist = hypervolume_history(pts, AT, ref)
    assert all(b >= a for a, b in itertools.pairwise(hist))
    assert hist == pytest.approx([hypervolume(pts[: k + 1], AT, ref) for k in range(len(pts))])


def test_reference_point_from_baseline():
    assert reference_point((0.9, 100.0), ["accuracy", "time"]) == pytest.approx((0.85, 125.0))
    assert reference_point((0.9, 1e12), ["accuracy", "cost"], accuracy_margin=0.1, cost_factor=2) == pytest.approx(
        (0.8, 2e12)
    )


def test_frontier_advantage_interpolates():
    plain = [(50.0, 0.80), (70.0, 0.85), (100.0, 0.88), (60.0, 0.70)]  # (60, 0.70) is dominated
    adv = frontier_advantage(60.0, 0.86, plain)
    # acc_f(60) = 0.80 + (0.85 - 0.80) * 10/20 = 0.825; t_f(0.86) = 70 + 30 * (0.01/0.03) = 80
    assert adv.acc_gain == pytest.approx(0.035)
    assert adv.time_saved == pytest.approx(20.0)
    assert adv.time_saved_fraction == pytest.approx(0.25)
    slower = frontier_advantage(120.0, 0.87, plain)  # beyond the slowest point: frontier stays flat
    assert slower.acc_gain == pytest.approx(-0.01)
    assert slower.time_saved == pytest.approx(90.0 - 120.0)  # t_f(0.87) = 70 + 30 * 2/3
    assert frontier_advantage(40.0, 0.9, plain) == type(adv)(None, None, None)  # faster and more accurate than all
    assert frontier_advantage(10.0, 0.5, []).acc_gain is None


def test_knee_on_a_convex_front():
    # Accuracy rises steeply then flattens: the knee is the bend at (0.88, 4).
    pts = [(0.50, 1.0), (0.80, 2.0), (0.88, 4.0), (0.90, 8.0), (0.91, 16.0)]
    assert knee(pts, AT) == 2
    # Dominated points never win.
    assert knee(pts + [(0.85, 10.0)], AT) == 2
    # Two points: nearest the utopia point after normalisation -> a tie broken by index.
    assert knee([(0.9, 10.0), (0.5, 1.0)], AT) in (0, 1)


def test_selection_rules():
    pts = [(0.90, 100.0), (0.897, 60.0), (0.88, 40.0), (0.70, 10.0)]
    base = pts[0]
    obj = ["accuracy", "time"]
    assert select(pts, obj, "fastest-within:0.5", base) == 1
    assert select(pts, obj, "fastest-within:2", base) == 2
    assert select(pts, obj, "fastest-within:0", base) == 0
    assert select(pts, obj, "most-accurate-under:50", base) == 2
    assert select(pts, obj, "most-accurate-under:60%", base) == 1
    with pytest.raises(UsageError, match="no trial has time"):
        select(pts, obj, "most-accurate-under:5", base)
    with pytest.raises(UsageError, match="baseline"):
        select(pts, obj, "fastest-within:1", None)


@pytest.mark.parametrize("bad", ["", "knees", "fastest-within", "fastest-within:x", "most-accurate-under:-1", "knee:1"])
def test_bad_rules(bad):
    with pytest.raises(UsageError, match="selection rule"):
        parse_rule(bad)


def test_parse_rule_roundtrip():
    for text in ("knee", "fastest-within:0.5", "most-accurate-under:120", "most-accurate-under:60%"):
        assert str(parse_rule(text)) == text


def test_analyse_uses_baseline_frontier_and_feasibility():
    cands = [
        Candidate(0, "COMPLETE", (0.90, 100.0), role="baseline", uses_method=False),
        Candidate(1, "COMPLETE", (0.80, 50.0), role="baseline-frontier", uses_method=False),
        Candidate(2, "COMPLETE", (0.89, 60.0), role="search"),
        Candidate(3, "FAIL", None, role="search"),
        Candidate(4, "COMPLETE", (0.95, 10.0), role="search", feasible=False),
    ]
    a = analyse(cands, ["accuracy", "time"])
    assert a.baseline.number == 0
    assert a.front == [0, 1, 2]
    assert [c.number for c in a.frontier] == [1, 0]
    assert a.reference == pytest.approx((0.85, 125.0))
    assert a.advantages[2].acc_gain == pytest.approx(0.89 - 0.82)
    assert a.select("fastest-within:1").number == 2
    assert [n for n, _ in a.hv_history] == [0, 1, 2]
    assert math.isclose(a.hv_history[-1][1], hypervolume([c.values for c in cands if c.ok], AT, a.reference))
