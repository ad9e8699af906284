"""The scenarios S1-S5 and cross-model on one Split (`Benchmark`).

Part of scripts/bench_compat.py (`make bench`); see its docstring for the scenarios and outputs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import numpy as np

from bench.settings import (CROSS_MODEL, DIRECT_MODES, FORWARD_METHODS, INDEPENDENT, LCE, LCE_INSTANCE, METHODS,
                            METRICS, NEW_LOSS_METHODS, UPGRADE_METHODS, Profile, Spec, _log)
from bench.data import Split
from bench.zoo import ModelZoo, fit_forward, fit_objective, fit_settings, forward_result
from bench.evaluation import Evaluator, _matrix_entries, _metric_entry, _row


# ---------------------------------------------------------------------------------------------------
# Scenarios


class Benchmark:
    """The scenarios on one Split."""

    def __init__(self, split: Split, profile: Profile, seed: int, out_dir: str, verbose: int = 0):
        self.profile, self.seed, self.out_dir = profile, seed, out_dir
        self.zoo = ModelZoo(split, profile, seed, verbose)
        self.ev = Evaluator(self.zoo)
        self.used_in: dict[Spec, list[str]] = {}
        p = profile
        self.new_star = Spec(p.new_arch, p.dim, "arcface", "all", p.epochs, learning_rate=p.learning_rate)
        self.zoo.name(self.new_star, "new* (independent)")
        self.transforms: dict[tuple[Spec, Spec, str], Any] = {}  # (old, new, objective) -> fitted T12
        self.transform_records: list[dict[str, Any]] = []
        self._forward: dict[tuple, Any] = {}
        self.objective = fit_objective(fit_settings(seed))  # the library's default T12 fit objective

    def transform(self, old: Spec, new: Spec, objective: Optional[str] = None):
        """T12 old -> new fitted on the new model's training pairs with the library's defaults, or with the fit
        objective `objective` (cached per pair of embedding spaces and objective)."""
        old, new = self.space_of(old), self.space_of(new)
        settings = fit_settings(self.seed, objective)
        key = (old, new, fit_objective(settings))
        if key not in self.transforms:
            fitted, seconds = fit_forward(self.zoo, old, new, settings)
            self.transforms[key] = fitted
            self.transform_records.append({"old": self.zoo.names.get(old), "new": self.zoo.names.get(new),
                                           "objective": fit_objective(settings), "part": self.zoo.part,
                                           "pairs": fitted.num_pairs, "fit_loss": round(fitted.fit_loss["old_to_new"], 4),
                                           "seconds": round(seconds, 1)})
            _log(f"fitted T12 {self.zoo.names.get(old)} -> {self.zoo.names.get(new)} ({fit_objective(settings)}) on "
                 f"{fitted.num_pairs} pairs in {seconds:.0f} s (loss {fitted.fit_loss['old_to_new']:.4f})")
        return self.transforms[key]

    @staticmethod
    def space_of(spec: Spec) -> Spec:
        """The model whose embeddings `spec` produces in its own space: a cross-model bridge embeds with its frozen
        new model (its partner), so the T12 fitted for the partner is reused instead of fitted again."""
        return spec.partner if spec.compat == CROSS_MODEL and spec.partner is not None else spec

    def forward(self, new: Spec, old: Spec, through: Sequence[Spec] = (), objective: Optional[str] = None):
        """M(new, T(old)): the old gallery moved by fitted T12s along old -> *through -> new (composed)."""
        chain = tuple(self.space_of(s) for s in (old, *through, new))
        key = (chain, fit_objective(fit_settings(self.seed, objective)))
        if key not in self._forward:
            self._forward[key] = forward_result(self.zoo, chain[-1], chain[0], *(
                self.transform(a, b, objective) for a, b in zip(chain, chain[1:])))
        return self._forward[key]

    def forward_measured(self, new: Spec, old: Spec) -> bool:
        """Whether M(new, T12(old)) was measured (default objective)."""
        return ((self.space_of(old), self.space_of(new)), self.objective) in self._forward

    def spec(self, method: str, old: Spec, *, arch: Optional[str] = None, dim: Optional[int] = None,
             loss: str = "arcface", classes: str = "all", **overrides) -> Spec:
        """The new model of `method` against `old` (independent ignores `old`)."""
        p = self.profile
        base = Spec(arch or p.new_arch, dim or p.dim, loss, classes, p.epochs, learning_rate=p.learning_rate)
        if method == INDEPENDENT:
            return base
        return dataclasses.replace(base, compat=method, parent=old, boundary=p.boundary, lambda_align=p.lambda_align,
                                   lambda_boundary=p.lambda_boundary, lambda_compat=p.lambda_compat,
                                   lambda_instance=p.lambda_instance, instance_temperature=p.instance_temperature,
                                   **overrides)

    def old(self, label: str, *, arch: Optional[str] = None, dim: Optional[int] = None, loss: str = "arcface",
            classes: str = "0:50%") -> Spec:
        p = self.profile
        spec = Spec(arch or p.new_arch, dim or p.dim, loss, classes, p.old_epochs, learning_rate=p.old_learning_rate)
        self.zoo.name(spec, label)
        return spec

    def _uses(self, key: str, specs) -> None:
        for spec in specs:
            if key not in self.used_in.setdefault(spec, []):
                self.used_in[spec].append(key)

    def _heatmap(self, key: str, matrix: dict, models: Sequence[str], title: str,
                 galleries: Optional[Sequence[str]] = None) -> str:
        from lce_tf.report import plot_compatibility_heatmap

        name = f"{key}_heatmap.png"
        plot_compatibility_heatmap(matrix, list(models), metric="top1", title=title,
                                   path=os.path.join(self.out_dir, name), galleries=galleries)
        return name

    def upgrade_scenario(self, key: str, title: str, description: str, old: Spec, new_kwargs: dict,
                         extra_rows: Sequence[tuple[str, Spec, str]] = (),
                         forward_methods: Sequence[str] = FORWARD_METHODS, cosine: bool = False,
                         methods: Sequence[str] = METHODS) -> dict[str, Any]:
        """S1-S4: old model, `methods` (where applicable) and extra rows.

        forward_methods: the rows whose forward route goes through a fitted T12 (the others: not measured).
        cosine: the lce-instance row also gets the forward route through a cosine-only T12.
        """
        zoo = self.zoo
        old_dim = old.dim
        rows_specs: dict[str, Spec] = {}
        not_applicable = {}
        for method in methods:
            spec = self.spec(method, old, **new_kwargs)
            if method in DIRECT_MODES and spec.dim != old_dim:
                not_applicable[method] = (f"{method} compares new and old embeddings directly; the new model is "
                                          f"{spec.dim}-d and the old one {old_dim}-d")
                continue
            zoo.name(spec, f"{key} {method}" if method != INDEPENDENT else zoo.names.get(spec, f"{key} new*"))
            rows_specs[method] = spec
        for label, spec, _ in extra_rows:
            zoo.name(spec, f"{key} {label}")
            rows_specs[label] = spec
        independent = rows_specs[INDEPENDENT]
        for spec in rows_specs.values():
            zoo.model(spec)
        rows = [{"method": "old", "model": zoo.names[old], "new_new": _metric_entry(self.ev.m(old, old))}]
        notes = {label: note for label, _, note in extra_rows}
        for method, spec in rows_specs.items():
            note = notes.get(method, "")
            if method == INDEPENDENT and zoo.names[spec] != f"{key} independent":
                note = f"new* = the model '{zoo.names[spec]}' (identical settings and seed; trained once)"
            rows.append(_row(self, method, spec, old, independent, note, forward=method in forward_methods,
                             cosine=cosine and method == LCE_INSTANCE))
            _log(f"{key} {method}: " + "; ".join(  # in the log too, so a run stopped early still tells its rows
                f"{route} {r['new_old']['top1']:.4f} / {r['new_old']['mAP']:.4f}"
                for route, r in rows[-1].items() if route.startswith(("backward", "forward")) and r["new_old"])
                + f"; new/new {rows[-1]['new_new']['top1']:.4f} / {rows[-1]['new_new']['mAP']:.4f}")
        models = {"old": old, **rows_specs}
        self._uses(key, models.values())
        matrix, pairs = _matrix_entries(self, models, old)
        heatmap = self._heatmap(key, matrix, list(models), f"{key}: {title} (top-1; rows: query model)",
                                galleries=["old", "T12(old)", "own"])
        return {"title": title, "description": description, "old": {"model": zoo.names[old], **old.describe()},
                "new": {k: v for k, v in independent.describe().items() if k != "compat"},
                "rows": rows, "not_applicable": not_applicable, "matrix": pairs, "heatmap": heatmap,
                "forward_methods": [m for m in rows_specs if m in forward_methods], "objective": self.objective}

    def s1(self):
        p = self.profile
        old = self.old("S1 old (50% classes)")
        return self.upgrade_scenario(
            "S1", "more classes", f"old: {p.new_arch} {p.dim}-d ArcFace on 50% of the training classes; new: the same "
            "network on 100%", old, {}, cosine=True, methods=UPGRADE_METHODS)

    def s2(self):
        p = self.profile
        old = self.old(f"S2 old ({p.small_arch})", arch=p.small_arch)
        return self.upgrade_scenario(
            "S2", "new architecture", f"old: {p.small_arch} (small) {p.dim}-d ArcFace on 50% of the classes; new: "
            f"{p.large_arch} (larger) on 100%", old, {"arch": p.large_arch}, cosine=True, methods=UPGRADE_METHODS)

    def s3(self):
        p = self.profile
        old = self.old("S3 old (NormSoftmax)", loss="normsoftmax")
        triplet = self.spec(LCE, old, loss="triplet")
        note = ("new model with the semi-hard triplet loss (P x K batches) instead of ArcFace; LCE has no "
                "classifier rows to align here, so only the boundary loss applies; sacrifice is against new* (ArcFace)")
        return self.upgrade_scenario(
            "S3", "new loss", f"old: {p.new_arch} {p.dim}-d NormSoftmax on 50% of the classes; new: {p.new_arch} "
            f"{p.dim}-d ArcFace on 100% (plus one LCE row with a triplet-loss new model)", old, {},
            extra_rows=[("lce (triplet)", triplet, note)], forward_methods=(LCE, LCE_INSTANCE), methods=NEW_LOSS_METHODS)

    def s4(self):
        p = self.profile
        old = self.old(f"S4 old ({p.small_dim}-d)", dim=p.small_dim)
        return self.upgrade_scenario(
            "S4", "new dimension", f"old: {p.new_arch} {p.small_dim}-d ArcFace on 50% of the classes; new: "
            f"{p.new_arch} {p.dim}-d on 100%; only the transformation method can map between the dimensions (lce-instance "
            "is direct, like lce: not applicable)", old, {}, forward_methods=(INDEPENDENT,))

    def s5(self):
        """Chain v1 -> v2 -> v3, each LCE against its predecessor: the backward matrix and AC (no transformation), and
        the forward route through fitted transformations: T12 (v1 -> v2) and T23 (v2 -> v3), and for v1's gallery
        either composed (T23·T12) or direct (T13, fitted on the pairs (φ_v1(x), φ_v3(x)) and applied to v1's own
        vectors: a single-step upgrade)."""
        from lce_tf import evaluation

        v1 = self.old("S1 old (50% classes)")
        v2 = self.spec(LCE, v1, classes="0:75%")
        v3 = self.spec(LCE, v2)
        for spec, label in ((v2, "S5 v2 (lce vs v1, 75%)"), (v3, "S5 v3 (lce vs v2, 100%)")):
            self.zoo.name(spec, label)
        versions = {"v1": v1, "v2": v2, "v3": v3}
        self._uses("S5", versions.values())
        matrix, pairs = {}, []
        for qn, qs in versions.items():
            for gn, gs in versions.items():
                result = self.ev.m(qs, gs)
                matrix[(qn, gn)] = result
                pairs.append({"query": qn, "gallery": gn, **_metric_entry(result)})
        names = list(versions)
        # label: (new, old, the versions the old gallery passes through, "composed" / "direct" / both)
        routes = {"T12(v1)": ("v2", "v1", (), ("composed", "direct")),
                  "T23(v2)": ("v3", "v2", (), ("composed", "direct")),
                  "T23.T12(v1)": ("v3", "v1", (v2,), ("composed",)),
                  "T13(v1)": ("v3", "v1", (), ("direct",))}
        forward_pairs, forward = [], {}
        for label, (t, k, through, chains) in routes.items():
            result = self.forward(versions[t], versions[k], through)
            forward[(t, label)] = result
            forward_pairs.append({"new": t, "old": k, "via": label, "chains": list(chains), **_metric_entry(result),
                                  "pass": {m: bool(result.metric(m) > matrix[(k, k)].metric(m)) for m in METRICS}})
        ac = {m: round(evaluation.average_compatibility(matrix, names, metric=m), 4) for m in METRICS}

        def chain_ac(chain):  # average compatibility (design.md): the share of (new, old) pairs meeting the criterion
            return {m: round(float(np.mean([p["pass"][m] for p in forward_pairs if chain in p["chains"]])), 4)
                    for m in METRICS}

        compatible_pairs = [{"new": t, "old": k, **{m: bool(matrix[(t, k)].metric(m) > matrix[(k, k)].metric(m))
                                                    for m in METRICS}}
                            for i, t in enumerate(names) for k in names[:i]]
        heat = {**matrix, **forward}
        galleries = names + list(routes)
        heatmap = self._heatmap("S5", heat, names, "S5: chain v1 -> v2 -> v3 (top-1; rows: query model)",
                                galleries=galleries)
        return {"title": "chain v1 -> v2 -> v3",
                "description": f"v1 = S1's old model ({self.profile.new_arch}, 50% of the classes); v2: LCE against v1 "
                               "on 75%; v3: LCE against v2 (not v1) on 100%. Forward: T12 (v1 -> v2) and T23 (v2 -> v3) "
                               "fitted on the training pairs; v1's gallery reaches v3's space either composed, through "
                               "T12 then T23 (T23.T12), or directly, through T13 fitted on the pairs (φ_v1(x), φ_v3(x)) "
                               "of v3's training images and applied to v1's own vectors",
                "versions": {k: {"model": self.zoo.names[s], **s.describe()} for k, s in versions.items()},
                "matrix": pairs, "pairs": compatible_pairs, "average_compatibility": ac,
                "forward_pairs": forward_pairs, "average_compatibility_forward": chain_ac("composed"),
                "average_compatibility_direct": chain_ac("direct"), "heatmap": heatmap}

    def cross(self):
        """Cross-model: S1's old model and new*, both independent, bridged by T12/T21 only."""
        p = self.profile
        old = self.old("S1 old (50% classes)")
        new = self.new_star
        bridge = Spec(p.new_arch, p.dim, "arcface", "all", p.epochs, compat=CROSS_MODEL, parent=old, partner=new,
                      boundary=p.boundary, lambda_align=p.lambda_align, lambda_boundary=p.lambda_boundary,
                      learning_rate=p.learning_rate)
        self.zoo.name(bridge, "cross T12/T21 (new* frozen)")
        self._uses("cross", (old, new, bridge))
        ev = self.ev
        rows = [{"method": "old", "model": self.zoo.names[old], "new_new": _metric_entry(ev.m(old, old))},
                _row(self, "independent new*", new, old, new,
                     "backward: new* queries against the old gallery as they are; forward: through a T12 fitted on "
                     "the training pairs"),
                _row(self, "cross-model T12/T21", bridge, old, new,
                     "backward: new* queries mapped by the jointly trained T21; forward: a T12 fitted on the training "
                     "pairs; forward_own: the jointly trained T12 (from both models' class centers)")]
        matrix = {("old", "old"): ev.m(old, old), ("new*", "new*"): ev.m(new, new), ("new* via T21", "old"): ev.m(bridge, old, old),
                  ("new*", "old"): ev.m(new, old, old), ("new*", "joint T12(old)"): ev.m(bridge, old, old, gallery_through_t12=bridge),
                  ("new*", "fitted T12(old)"): self.forward(new, old)}
        heat = {(q, g): r for (q, g), r in matrix.items() if r is not None}
        heatmap = self._heatmap("cross", heat, ["old", "new*", "new* via T21"],
                                "cross-model: T12/T21 between two frozen models (top-1)",
                                galleries=["old", "new*", "joint T12(old)", "fitted T12(old)"])
        return {"title": "cross-model compatibility",
                "description": "old = S1's old model, new = new*; both trained independently and frozen; only "
                               "T12/T21 are trained (jointly from both models' class centers and the boundary loss on "
                               "T21(new features)), or T12 fitted on the training pairs (the forward route)",
                "old": {"model": self.zoo.names[old], **old.describe()}, "rows": rows,
                "matrix": [{"query": q, "gallery": g, **_metric_entry(r)} for (q, g), r in heat.items()],
                "heatmap": heatmap}
