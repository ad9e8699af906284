"""The blessing decision: does a candidate model pass, and through which upgrade route?

docs/design.md, "The forward path" and "How compatibility is measured". The measurements come from
`lce_tf.comparison.compare_models` (M(Q, G) per pair); this module only judges them, so the rule is
testable on a few hand-written numbers. The pipeline's CompatibilityValidator
(components/compatibility_validator) measures, calls `decide` and records the verdict.

Pure Python: imports neither TensorFlow nor NumPy (pipeline.config reads `COMPATIBILITY_ROUTES`; the
collapse rule, `lce_tf.collapse`, imports NumPy only to measure).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from lce_tf import collapse

# The values of the `compatibility` setting: which upgrade route may bless the candidate.
COMPATIBILITY_ROUTES = ("backward", "forward", "either")
# The route of a candidate blessed without an old model (the pipeline's first run).
FIRST_MODEL_ROUTE = "first-model"


@dataclasses.dataclass(frozen=True)
class Decision:
    """The verdict on a candidate.

    Attributes:
      blessed: the own-accuracy floors, the collapse check (when measured) and one allowed route passed.
      route: the route that blessed: "backward", "forward", "first-model" (no old model), or "" (refused).
      passed_routes: the routes whose checks all pass, whether or not `compatibility` allows them.
      reasons: one line per check ("...: yes" / "...: NO"), then the conclusion.
    """

    blessed: bool
    route: str
    passed_routes: tuple[str, ...]
    reasons: list[str]


def _criterion_checks(route: str, pair: Optional[tuple[str, str]], results: Mapping, old: str, margin_top1: float,
                      margin_map: float, missing: str) -> list[tuple[bool, str]]:
    """M(pair) > M(old, old) + margin on top-1 and mAP, or one failed check per metric saying why it is missing."""
    checks = []
    old_old = results[(old, old)]
    for metric, margin in (("top1", margin_top1), ("mAP", margin_map)):
        if pair is None or pair not in results:
            checks.append((False, f"{route} route: criterion {metric}: M({pair[0] if pair else '?'}, "
                                  f"{pair[1] if pair else '?'}) cannot be computed ({missing})"))
            continue
        a, b = float(getattr(results[pair], metric)), float(getattr(old_old, metric))
        checks.append((a > b + margin, f"{route} route: criterion {metric}: M({pair[0]}, {pair[1]}) = {a:.4f} > "
                                       f"M({old}, {old}) = {b:.4f} + margin {margin:.4f}"))
    return checks


def decide(report: Mapping[str, Any], results: Mapping, *, new: str, old: Optional[str], margin_top1: float,
           margin_map: float, min_top1: float, min_map: float, declared_compatible: bool,
           compatibility: str = "backward", forward_gallery: Optional[str] = None,
           collapse_cosine: Optional[float] = None) -> Decision:
    """The blessing rule: own-accuracy floors and the collapse guard, then the upgrade routes that
    `compatibility` allows.

    Checks:
      own accuracy     M(new, new).top1 >= min_top1 and M(new, new).mAP >= min_map;
      not collapsed    when measured: the mean pairwise cosine of the candidate's gallery embeddings is at
                       most `lce_tf.defaults.COLLAPSE_MAX_COSINE` (`lce_tf.collapse`; docs/design.md "Known
                       traps"); a collapsed candidate is refused whatever its measured accuracy;
      with an old model, two routes (both are measured and reported; docs/design.md "The forward path"):
        backward       the candidate declares compatibility with the old model's space (else its queries
                       could not be served against the old index), and M(new, old) > M(old, old) + margin
                       on top-1 and on mAP (the BCT empirical criterion, the paper's);
        forward        a transformation T12 old -> new was fitted (`forward_gallery` is the matrix label of
                       the old gallery moved through it, e.g. "T12(v1)"), and M(new, T12(old)) >
                       M(old, old) + margin on top-1 and on mAP.
      compatibility    "backward" or "forward": that route must pass; "either": one of them must pass. When
                       both pass under "either" the blessing names the forward route: the served index
                       then moves into the new model's own space, where later backfills take it.

    Without an old model (the pipeline's first run) only the floors and the collapse check apply (route
    "first-model").

    Args:
      report: `compare_models`' report; its "skipped" notes explain a missing M(new, old).
      results: (query name, gallery name) -> a result with float attributes `top1` and `mAP`; holds
        (new, new), and with an old model (old, old), (new, old) and (new, forward_gallery) when measured.
      new: the candidate's name in `results`.
      old: the old model's name, or None on the first run.
      margin_top1: required lead of a route's top-1 over M(old, old) (negative: a tolerated loss).
      margin_map: the same for mAP.
      min_top1: floor of M(new, new).top1.
      min_map: floor of M(new, new).mAP.
      declared_compatible: the candidate's metadata declares compatibility with the old model's space.
      compatibility: the route that may bless, one of `COMPATIBILITY_ROUTES`.
      forward_gallery: the name of the old gallery moved by a fitted T12, or None when none was fitted.
      collapse_cosine: the mean pairwise cosine of the candidate's gallery embeddings (`compare_models`'
        report["collapse"][new]), or None when not measured (no check line).

    Returns:
      The `Decision`.

    Raises:
      ValueError: an unknown `compatibility`.
    """
    if compatibility not in COMPATIBILITY_ROUTES:
        raise ValueError(f"parameter compatibility: unknown value {compatibility!r}; expected one of "
                         f"{', '.join(COMPATIBILITY_ROUTES)}")
    own = results.get((new, new))
    own_checks = [(float(getattr(own, m)) >= floor, f"own accuracy: {m} M({new}, {new}) = "
                                                    f"{float(getattr(own, m)):.4f} >= floor {floor:.4f}")
                  for m, floor in (("top1", min_top1), ("mAP", min_map))]
    if collapse_cosine is not None:
        own_checks.append((not collapse.is_collapsed(collapse_cosine),
                       f"not collapsed: mean pairwise cosine of {new}'s gallery embeddings = {collapse_cosine:.4f} "
                       f"<= {collapse.COLLAPSE_MAX_COSINE:g}"))
    lines = [f"{text}: {'yes' if ok else 'NO'}" for ok, text in own_checks]
    own_ok = all(ok for ok, _ in own_checks)
    collapsed = collapse.is_collapsed(collapse_cosine)
    if collapsed:
        lines.append(f"refused: {new}'s embeddings collapsed into one cone (mean pairwise cosine "
                     f"{collapse_cosine:.4f} > {collapse.COLLAPSE_MAX_COSINE:g}); {collapse.LIKELY_CAUSE}")
    if old is None:
        return Decision(own_ok, FIRST_MODEL_ROUTE if own_ok else "", (), lines)
    skipped = "; ".join(s for s in report.get("skipped", []) if s.startswith(f"{new}/{old}:")) or "no result"
    routes = {
        "backward": [(declared_compatible, f"backward route: {new} declares compatibility with {old}'s embedding space")]
        + _criterion_checks("backward", (new, old), results, old, margin_top1, margin_map, skipped),
        "forward": [(forward_gallery is not None, f"forward route: a transformation T12 ({old} -> {new}) was fitted")]
        + _criterion_checks("forward", (new, forward_gallery) if forward_gallery else None, results, old, margin_top1,
                            margin_map, "no fitted transformation"),
    }
    for checks in routes.values():
        lines += [f"{text}: {'yes' if ok else 'NO'}" for ok, text in checks]
    passed = tuple(route for route, checks in routes.items() if all(ok for ok, _ in checks))
    allowed = ("forward", "backward") if compatibility == "either" else (compatibility,)
    route = next((r for r in allowed if r in passed), "") if own_ok else ""
    lines.append(f"compatibility {compatibility!r}: routes passing: {', '.join(passed) or 'none'}; "
                 + (f"blessed through the {route} route" if route else "no allowed route passes" if own_ok
                    else "embeddings collapsed" if collapsed else "own accuracy below the floor"))
    return Decision(bool(route), route, passed, lines)
