"""Executor of CompatibilityValidator: `lce_tf.comparison.compare_models`, then `lce_tf.gate.decide` (the blessing
decision, with the collapse guard on the candidate's gallery embeddings), recorded in the ModelBlessing."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional

from tfx.dsl.components.base import base_executor

from components import artifacts, util
from components.artifacts import (BLESSED_PROPERTY, BLESSED_ROUTE_PROPERTY, TRANSFORM_ID_PROPERTY,
                                  TRANSFORMATION_DIR_PROPERTY)
from lce_tf import modes
from lce_tf.gate import COMPATIBILITY_ROUTES, Decision, decide

# Keys of the inputs, the output and the parameters (component.py re-exports them).
MODEL_KEY = "model"
EXAMPLES_KEY = "examples"
OLD_MODEL_KEY = "old_model"
INDEPENDENT_MODEL_KEY = "independent_model"
TRANSFORMATION_KEY = "transformation"
BLESSING_KEY = "blessing"
QUERY_SPLIT_KEY = "query_split"
GALLERY_SPLIT_KEY = "gallery_split"
MARGIN_TOP1_KEY = "margin_top1"
MARGIN_MAP_KEY = "margin_map"
MIN_TOP1_KEY = "min_top1"
MIN_MAP_KEY = "min_map"
BATCH_SIZE_KEY = "batch_size"
COMPATIBILITY_KEY = "compatibility"

# The name of the fitted old -> new transformation in the matrix ("T12(v1)": v1's gallery moved by it).
TRANSFORM_NAME = "T12"

# Files written into the ModelBlessing directory.
BLESSED_FILE = "BLESSED"
NOT_BLESSED_FILE = "NOT_BLESSED"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"

# Custom properties of the ModelBlessing (the names the stock Evaluator uses; `blessed` gates the Pusher and
# `current_model_id` is what LatestBlessedModelStrategy matches Models with). The ones other components read
# (`blessed`, `blessed_route`, `transformation_dir`, `transform_id`) are in components/artifacts.py.
CURRENT_MODEL_PROPERTY = "current_model"
CURRENT_MODEL_ID_PROPERTY = "current_model_id"
BASELINE_MODEL_PROPERTY = "baseline_model"
BASELINE_MODEL_ID_PROPERTY = "baseline_model_id"
# The routes whose checks pass (the route that blessed is artifacts.BLESSED_ROUTE_PROPERTY).
PASSED_ROUTES_PROPERTY = "passed_routes"

_LOG = logging.getLogger(__name__)


def _names(candidate, old, independent) -> tuple[str, Optional[str], Optional[str]]:
    """Readable, distinct matrix names from the models' version labels (e.g. v2, v1, v2-independent)."""
    new_name = str(candidate.metadata.get("version") or "new")
    old_name = None if old is None else str(old.metadata.get("version") or "old")
    if old_name is not None and old_name == new_name:
        new_name, old_name = f"{new_name}-new", f"{old_name}-old"
    ind_name = None if independent is None else f"{new_name}-independent"
    return new_name, old_name, ind_name


def _route_rows(report: dict[str, Any], results: dict, new: str, old: str, forward_gallery: Optional[str],
                decision: Decision, compatibility: str) -> list[dict[str, Any]]:
    """The report's "upgrade routes" table: one row per route, side by side with the old model's bar."""
    old_old = results[(old, old)]
    rows = []
    for route, pair, what in (("backward", (new, old), "new queries against the untouched old gallery"),
                              ("forward", (new, forward_gallery), "new queries against the old gallery moved by T12")):
        result = results.get(pair) if pair[1] else None
        ug = report["update_gain"].get(new if route == "backward" else f"{new} via {TRANSFORM_NAME}", {})
        rows.append({
            "route": route, "pair": f"M({pair[0]}, {pair[1] or 'T12(' + old + ')'})", "what": what,
            "top1": float(result.top1) if result else "n/a", "mAP": float(result.mAP) if result else "n/a",
            "bar M(old, old) top1 / mAP": f"{old_old.top1:.4f} / {old_old.mAP:.4f}",
            "update gain top1 / mAP": f"{ug['top1']:.3f} / {ug['mAP']:.3f}" if ug else "n/a",
            "passes": "yes" if route in decision.passed_routes else "no",
            "allowed": "yes" if compatibility in (route, "either") else "no",
            "blessed by": "this route" if decision.route == route else ""})
    return rows


class Executor(base_executor.BaseExecutor):
    """Evaluates the candidate (and the old / independent models, and the forward route through the fitted
    transformation) on the query and gallery splits, and blesses by the `compatibility` parameter."""

    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        from lce_tf.comparison import EvalData, compare_models, transformed_label
        from lce_tf.report import write_html_report
        from lce_tf.serving import load_embedding_model
        from lce_tf.transformation import load_transformation

        candidate_artifact = util.single(input_dict, MODEL_KEY)
        examples = util.single(input_dict, EXAMPLES_KEY)
        old_artifact = util.single(input_dict, OLD_MODEL_KEY, optional=True)
        independent_artifact = util.single(input_dict, INDEPENDENT_MODEL_KEY, optional=True)
        transform_dir = artifacts.transformation_dir(util.single(input_dict, TRANSFORMATION_KEY, optional=True))
        blessing = util.single(output_dict, BLESSING_KEY)
        params = {key: float(exec_properties.get(key) or 0.0)
                  for key in (MARGIN_TOP1_KEY, MARGIN_MAP_KEY, MIN_TOP1_KEY, MIN_MAP_KEY)}
        for key, value in params.items():
            if not math.isfinite(value):
                raise ValueError(f"parameter {key} must be finite; received {value}")
        for key in (MIN_TOP1_KEY, MIN_MAP_KEY):
            if not 0.0 <= params[key] <= 1.0:
                raise ValueError(f"parameter {key} must be in [0, 1]; received {params[key]}")
        compatibility = util.check_choice(COMPATIBILITY_KEY, str(exec_properties.get(COMPATIBILITY_KEY) or "backward"),
                                          COMPATIBILITY_ROUTES)
        batch_size = int(exec_properties.get(BATCH_SIZE_KEY) or 256)
        examples_dir = util.path(examples)
        info = util.read_examples_info(examples_dir)
        splits = {}
        for key in (QUERY_SPLIT_KEY, GALLERY_SPLIT_KEY):
            name = str(exec_properties.get(key) or "")
            entry = util.split_info(info, name, examples_dir, key)
            util.check_split_records(examples_dir, name, entry)
            splits[key] = EvalData.from_tfrecords(util.split_pattern(examples_dir, name), entry["class_names"],
                                                  name=f"split {name}", num_images=entry["num_examples"])

        candidate = load_embedding_model(util.model_dir(util.path(candidate_artifact), MODEL_KEY))
        old = load_embedding_model(util.model_dir(util.path(old_artifact), OLD_MODEL_KEY)) if old_artifact else None
        independent = (load_embedding_model(util.model_dir(util.path(independent_artifact), INDEPENDENT_MODEL_KEY))
                       if independent_artifact else None)
        transformation = load_transformation(transform_dir) if transform_dir and old is not None else None
        new_name, old_name, ind_name = _names(candidate, old, independent)
        models = {}
        if old is not None:
            models[old_name] = old
        models[new_name] = candidate
        if independent is not None:
            models[ind_name] = independent
        if transformation is not None:  # it must map the old model's space into the candidate's
            transformation.check_source_space(old.metadata["embedding_space"], f"old model {old.model_id}")
            transformation.check_target_space(candidate.metadata["embedding_space"], f"candidate {candidate.model_id}")
        report, results = compare_models(models, splits[QUERY_SPLIT_KEY], splits[GALLERY_SPLIT_KEY],
                                         old=old_name or new_name, independent=ind_name,
                                         transforms={TRANSFORM_NAME: transformation} if transformation else None,
                                         batch_size=batch_size,
                                         progress=lambda line: _LOG.info("CompatibilityValidator: %s", line))
        declared = old is not None and candidate.signature_for_space(old.metadata["embedding_space"]) is not None
        forward_gallery = transformed_label(TRANSFORM_NAME, old_name) if transformation is not None else None
        decision = decide(report, results, new=new_name, old=old_name, declared_compatible=declared,
                          margin_top1=params[MARGIN_TOP1_KEY], margin_map=params[MARGIN_MAP_KEY],
                          min_top1=params[MIN_TOP1_KEY], min_map=params[MIN_MAP_KEY], compatibility=compatibility,
                          forward_gallery=forward_gallery,
                          collapse_cosine=report["collapse"][new_name]["mean_pairwise_cosine"])
        reasons = list(decision.reasons)
        if old is None:
            reasons.insert(0, f"no old model (first run of the pipeline): {new_name} is judged on its own accuracy")
        verdict = "BLESSED" if decision.blessed else "NOT_BLESSED"

        blessing_dir = util.path(blessing)
        os.makedirs(blessing_dir, exist_ok=True)
        ids = {name: m.model_id for name, m in models.items()}
        payload = {
            "verdict": verdict, "blessed": decision.blessed, "route": decision.route,
            "passed_routes": list(decision.passed_routes), "compatibility": compatibility, "reasons": reasons,
            "candidate": new_name, "old": old_name, modes.INDEPENDENT.name: ind_name, "model_ids": ids,
            "transformation": ({"name": TRANSFORM_NAME, "transform_id": transformation.transform_id,
                                "dir": transform_dir} if transformation else None),
            "thresholds": params, "splits": {k: splits[k].name for k in splits},
            **{k: v for k, v in report.items() if k not in ("old", modes.INDEPENDENT.name)},
        }
        util.write_json(os.path.join(blessing_dir, METRICS_FILE), payload)
        rows = [{"query": p["query"], "gallery": p["gallery"], "via": p["via"] or "", "signature": p["signature"],
                 "top1": p["top1"], "top5": p["top5"], "mAP": p["mAP"],
                 "top1 95% CI": f"[{p['top1_ci95'][0]:.3f}, {p['top1_ci95'][1]:.3f}]",
                 "mAP 95% CI": f"[{p['mAP_ci95'][0]:.3f}, {p['mAP_ci95'][1]:.3f}]", "queries": p["num_queries"]}
                for p in report["pairs"]]
        details = {f"model {name}": f"{ids[name]} ({m.model_dir})" for name, m in models.items()}
        if transformation is not None:
            details[f"transformation {TRANSFORM_NAME}"] = transformation.describe()
        details.update({"query split": splits[QUERY_SPLIT_KEY].name, "gallery split": splits[GALLERY_SPLIT_KEY].name,
                        "examples": examples_dir, "compatibility": compatibility, **{k: f"{v:g}" for k, v in params.items()}})
        for note in report["skipped"]:
            details[f"skipped {note.split(':')[0]}"] = note.split(":", 1)[1].strip()
        title = (f"Compatibility validation of {new_name} against {old_name}" if old_name
                 else f"Validation of {new_name} (first model of the pipeline)")
        galleries = list(models) + ([forward_gallery] if forward_gallery else [])
        write_html_report(os.path.join(blessing_dir, REPORT_FILE), title=title, verdict=verdict, reasons=reasons,
                          matrix=results, models=list(models), galleries=galleries, metrics_table=rows,
                          routes_table=(_route_rows(report, results, new_name, old_name, forward_gallery, decision,
                                                    compatibility) if old_name else ()),
                          details=details)
        marker = BLESSED_FILE if decision.blessed else NOT_BLESSED_FILE
        util.write_text(os.path.join(blessing_dir, marker), "\n".join(reasons) + "\n")

        blessing.set_int_custom_property(BLESSED_PROPERTY, 1 if decision.blessed else 0)
        blessing.set_string_custom_property(BLESSED_ROUTE_PROPERTY, decision.route)
        blessing.set_string_custom_property(PASSED_ROUTES_PROPERTY, ",".join(decision.passed_routes))
        blessing.set_string_custom_property(COMPATIBILITY_KEY, compatibility)
        if transformation is not None:
            blessing.set_string_custom_property(TRANSFORMATION_DIR_PROPERTY, transform_dir)
            blessing.set_string_custom_property(TRANSFORM_ID_PROPERTY, transformation.transform_id)
        blessing.set_string_custom_property(CURRENT_MODEL_PROPERTY, candidate_artifact.uri)
        blessing.set_int_custom_property(CURRENT_MODEL_ID_PROPERTY, candidate_artifact.id)
        if old_artifact is not None:
            blessing.set_string_custom_property(BASELINE_MODEL_PROPERTY, old_artifact.uri)
            blessing.set_int_custom_property(BASELINE_MODEL_ID_PROPERTY, old_artifact.id)
        role = {new_name: "new", old_name: "old", ind_name: modes.INDEPENDENT.name}
        if forward_gallery:
            role[forward_gallery] = "T12old"
            role[transformed_label(TRANSFORM_NAME, new_name, "new_to_old")] = "T21new"
        for (q, g), result in results.items():
            for metric in ("top1", "mAP"):
                blessing.set_float_custom_property(f"{metric}_{role[q]}_{role[g]}", float(getattr(result, metric)))
        _LOG.info("CompatibilityValidator: %s%s\n%s\n%s", verdict,
                  f" (route {decision.route})" if decision.route else "", report["table"], "\n".join(reasons))
