"""The blessing rule (`lce_tf.gate.decide`, what the CompatibilityValidator blesses by) on hand-written numbers.

No TFX, TensorFlow or model: `results` maps (query, gallery) names to objects with `top1` and `mAP`, as
`lce_tf.comparison.compare_models` returns them.
"""

import types

import pytest

from lce_tf.gate import decide


class _Result(types.SimpleNamespace):
    pass


def test_blessing_rule_margins_floors_and_declaration():
    # M(old, old) = (top1 0.70, mAP 0.50); M(new, old) = (0.72, 0.51); M(new, new) = (0.90, 0.80).
    results = {("v1", "v1"): _Result(top1=0.70, mAP=0.50), ("v2", "v1"): _Result(top1=0.72, mAP=0.51),
               ("v2", "v2"): _Result(top1=0.90, mAP=0.80)}
    report = {"skipped": []}
    common = dict(new="v2", old="v1", min_top1=0.5, min_map=0.0, declared_compatible=True)
    decision = decide(report, results, margin_top1=0.0, margin_map=0.0, **common)
    assert decision.blessed and decision.route == "backward" and decision.passed_routes == ("backward",)
    backward = [r for r in decision.reasons if r.startswith("backward route")]
    assert len(backward) == 3 and all(r.endswith("yes") for r in backward)
    # 0.72 > 0.70 + 0.01 holds, 0.51 > 0.50 + 0.02 does not.
    decision = decide(report, results, margin_top1=0.01, margin_map=0.02, **common)
    assert not decision.blessed and decision.route == ""
    assert any(r.startswith("backward route: criterion mAP") and r.endswith("NO") for r in decision.reasons)
    # Equal is not better (the criterion is strict).
    results_equal = {**results, ("v2", "v1"): _Result(top1=0.70, mAP=0.51)}
    assert not decide(report, results_equal, margin_top1=0.0, margin_map=0.0, **common).blessed
    # Own accuracy below the floor.
    assert not decide(report, results, margin_top1=0.0, margin_map=0.0, **{**common, "min_top1": 0.95}).blessed
    # Not declared compatible: refused even when the numbers pass.
    assert not decide(report, results, margin_top1=0.0, margin_map=0.0,
                      **{**common, "declared_compatible": False}).blessed
    # M(new, old) missing (different dimensions): refused, with the reason.
    missing = {k: v for k, v in results.items() if k != ("v2", "v1")}
    decision = decide({"skipped": ["v2/v1: dimensions 32 and 16 differ"]}, missing, margin_top1=0.0,
                      margin_map=0.0, **common)
    assert not decision.blessed
    assert any("dimensions 32 and 16 differ" in r for r in decision.reasons if r.startswith("backward route"))
    # First run: no old model, the floors only.
    first = {("v1", "v1"): _Result(top1=0.6, mAP=0.4)}
    decision = decide({"skipped": []}, first, new="v1", old=None, margin_top1=0.0, margin_map=0.0,
                      min_top1=0.5, min_map=0.0, declared_compatible=False)
    assert decision.blessed and decision.route == "first-model" and len(decision.reasons) == 2


@pytest.mark.parametrize("backward, forward, compatibility, route", [
    # (M(v2, v1) top1/mAP, M(v2, T12(v1)) top1/mAP) against M(v1, v1) = (0.70, 0.50)
    ((0.60, 0.55), (0.80, 0.60), "backward", ""),            # backward misses top-1: refused
    ((0.60, 0.55), (0.80, 0.60), "forward", "forward"),
    ((0.60, 0.55), (0.80, 0.60), "either", "forward"),
    ((0.72, 0.51), (0.69, 0.60), "forward", ""),             # forward misses top-1
    ((0.72, 0.51), (0.69, 0.60), "either", "backward"),
    ((0.72, 0.51), (0.80, 0.60), "either", "forward"),       # both pass: forward is named
    ((0.72, 0.51), (0.80, 0.60), "backward", "backward"),
    ((0.60, 0.55), (0.80, 0.50), "either", ""),              # forward mAP equal: not better
])
def test_blessing_rule_by_route(backward, forward, compatibility, route):
    results = {("v1", "v1"): _Result(top1=0.70, mAP=0.50), ("v2", "v2"): _Result(top1=0.90, mAP=0.80),
               ("v2", "v1"): _Result(top1=backward[0], mAP=backward[1]),
               ("v2", "T12(v1)"): _Result(top1=forward[0], mAP=forward[1])}
    decision = decide({"skipped": []}, results, new="v2", old="v1", margin_top1=0.0, margin_map=0.0, min_top1=0.5,
                      min_map=0.0, declared_compatible=True, compatibility=compatibility, forward_gallery="T12(v1)")
    assert decision.route == route and decision.blessed == bool(route)
    expected_passing = tuple(r for r, (t, m) in (("backward", backward), ("forward", forward)) if t > 0.70 and m > 0.50)
    assert decision.passed_routes == expected_passing
    forward_lines = [r for r in decision.reasons if r.startswith("forward route: criterion")]
    assert [line.split(" = ")[1].split(" ")[0] for line in forward_lines] == [f"{v:.4f}" for v in forward]
    assert decision.reasons[-1].startswith(f"compatibility {compatibility!r}: routes passing")


def test_forward_route_needs_a_fitted_transformation():
    results = {("v1", "v1"): _Result(top1=0.70, mAP=0.50), ("v2", "v2"): _Result(top1=0.90, mAP=0.80),
               ("v2", "v1"): _Result(top1=0.60, mAP=0.40)}
    decision = decide({"skipped": []}, results, new="v2", old="v1", margin_top1=0.0, margin_map=0.0, min_top1=0.5,
                      min_map=0.0, declared_compatible=True, compatibility="forward", forward_gallery=None)
    assert not decision.blessed and "forward route: a transformation T12 (v1 -> v2) was fitted: NO" in decision.reasons
    with pytest.raises(ValueError, match="parameter compatibility: unknown value 'sideways'"):
        decide({"skipped": []}, results, new="v2", old="v1", margin_top1=0.0, margin_map=0.0, min_top1=0.5,
               min_map=0.0, declared_compatible=True, compatibility="sideways")



@pytest.mark.parametrize("old", ["v1", None])
def test_a_collapsed_candidate_fails_the_gate_with_the_reason(old):
    """The collapse guard (lce_tf.collapse): a candidate whose gallery embeddings have a mean pairwise cosine
    above 0.99 is refused whatever its measured accuracy; at or below it the other checks decide."""
    results = {("v1", "v1"): _Result(top1=0.70, mAP=0.50), ("v2", "v1"): _Result(top1=0.72, mAP=0.51),
               ("v2", "v2"): _Result(top1=0.90, mAP=0.80)}
    common = dict(new="v2", old=old, margin_top1=0.0, margin_map=0.0, min_top1=0.5, min_map=0.0,
                  declared_compatible=True)
    healthy = decide({"skipped": []}, results, collapse_cosine=0.31, **common)
    assert healthy.blessed and healthy.route == ("backward" if old else "first-model")
    assert "not collapsed: mean pairwise cosine of v2's gallery embeddings = 0.3100 <= 0.99: yes" in healthy.reasons
    assert decide({"skipped": []}, results, collapse_cosine=0.99, **common).blessed  # the bar itself passes
    collapsed = decide({"skipped": []}, results, collapse_cosine=0.99953, **common)
    assert not collapsed.blessed and collapsed.route == ""
    assert "not collapsed: mean pairwise cosine of v2's gallery embeddings = 0.9995 <= 0.99: NO" in collapsed.reasons
    refusal = [r for r in collapsed.reasons if r.startswith("refused:")]
    assert refusal and refusal[0].startswith("refused: v2's embeddings collapsed into one cone (mean pairwise cosine "
                                             "0.9995 > 0.99); likely cause: BatchNorm moving statistics")
    if old:  # the routes are still measured and reported; the conclusion names the collapse
        assert collapsed.passed_routes == ("backward",) and collapsed.reasons[-1].endswith("embeddings collapsed")
