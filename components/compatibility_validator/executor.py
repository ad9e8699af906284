"""Executor of CompatibilityValidator: `lce_tf.comparison.compare_models` + the blessing decision."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional

from tfx.dsl.components.base import base_executor

from components import util

# Keys of the inputs, the output and the parameters (component.py re-exports them).
MODEL_KEY = "model"
EXAMPLES_KEY = "examples"
OLD_MODEL_KEY = "old_model"
INDEPENDENT_MODEL_KEY = "independent_model"
BLESSING_KEY = "blessing"
QUERY_SPLIT_KEY = "query_split"
GALLERY_SPLIT_KEY = "gallery_split"
MARGIN_TOP1_KEY = "margin_top1"
MARGIN_MAP_KEY = "margin_map"
MIN_TOP1_KEY = "min_top1"
MIN_MAP_KEY = "min_map"
BATCH_SIZE_KEY = "batch_size"

# Files written into the ModelBlessing directory.
BLESSED_FILE = "BLESSED"
NOT_BLESSED_FILE = "NOT_BLESSED"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"

# Custom properties of the ModelBlessing (the names the stock Evaluator uses; `blessed` gates the Pusher and
# `current_model_id` is what LatestBlessedModelStrategy matches Models with).
BLESSED_PROPERTY = "blessed"
CURRENT_MODEL_PROPERTY = "current_model"
CURRENT_MODEL_ID_PROPERTY = "current_model_id"
BASELINE_MODEL_PROPERTY = "baseline_model"
BASELINE_MODEL_ID_PROPERTY = "baseline_model_id"

_LOG = logging.getLogger(__name__)


def _names(candidate, old, independent) -> tuple[str, Optional[str], Optional[str]]:
    """Readable, distinct matrix names from the models' version labels (e.g. v2, v1, v2-independent)."""
    new_name = str(candidate.metadata.get("version") or "new")
    old_name = None if old is None else str(old.metadata.get("version") or "old")
    if old_name is not None and old_name == new_name:
        new_name, old_name = f"{new_name}-new", f"{old_name}-old"
    ind_name = None if independent is None else f"{new_name}-independent"
    return new_name, old_name, ind_name


def decide(report: dict[str, Any], results: dict, *, new: str, old: Optional[str], margin_top1: float,
           margin_map: float, min_top1: float, min_map: float, declared_compatible: bool) -> tuple[bool, list[str]]:
    """The blessing rule, one reason line per check; blessed when every check passes.

    Checks:
      own accuracy   M(new, new).top1 >= min_top1 and M(new, new).mAP >= min_map;
      with an old model:
        declared       the candidate's metadata declares compatibility with the old model's space (else a
                       query could not be served against the old index);
        criterion      M(new, old).top1 > M(old, old).top1 + margin_top1 and
                       M(new, old).mAP  > M(old, old).mAP  + margin_map   (BCT empirical criterion, by margins).
    """
    checks: list[tuple[bool, str]] = []
    own = results.get((new, new))
    for metric, floor in (("top1", min_top1), ("mAP", min_map)):
        value = float(getattr(own, metric))
        checks.append((value >= floor, f"own accuracy: {metric} M({new}, {new}) = {value:.4f} >= floor {floor:.4f}"))
    if old is not None:
        checks.append((declared_compatible, f"{new} declares compatibility with {old}'s embedding space"))
        new_old, old_old = results.get((new, old)), results[(old, old)]
        for metric, margin in (("top1", margin_top1), ("mAP", margin_map)):
            if new_old is None:
                skipped = [s for s in report["skipped"] if s.startswith(f"{new}/{old}:")]
                checks.append((False, f"criterion {metric}: M({new}, {old}) cannot be computed "
                                      f"({'; '.join(skipped) or 'no result'})"))
                continue
            a, b = float(getattr(new_old, metric)), float(getattr(old_old, metric))
            checks.append((a > b + margin, f"criterion {metric}: M({new}, {old}) = {a:.4f} > M({old}, {old}) = {b:.4f} "
                                           f"+ margin {margin:.4f}"))
    return all(ok for ok, _ in checks), [f"{text}: {'yes' if ok else 'NO'}" for ok, text in checks]


class Executor(base_executor.BaseExecutor):
    """Evaluates the candidate (and the old / independent models) on the query and gallery splits."""

    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        from lce_tf.comparison import EvalData, compare_models
        from lce_tf.report import write_html_report
        from lce_tf.serving import load_embedding_model

        candidate_artifact = util.single(input_dict, MODEL_KEY)
        examples = util.single(input_dict, EXAMPLES_KEY)
        old_artifact = util.single(input_dict, OLD_MODEL_KEY, optional=True)
        independent_artifact = util.single(input_dict, INDEPENDENT_MODEL_KEY, optional=True)
        blessing = util.single(output_dict, BLESSING_KEY)
        params = {key: float(exec_properties.get(key) or 0.0)
                  for key in (MARGIN_TOP1_KEY, MARGIN_MAP_KEY, MIN_TOP1_KEY, MIN_MAP_KEY)}
        for key, value in params.items():
            if not math.isfinite(value):
                raise ValueError(f"parameter {key} must be finite; received {value}")
        for key in (MIN_TOP1_KEY, MIN_MAP_KEY):
            if not 0.0 <= params[key] <= 1.0:
                raise ValueError(f"parameter {key} must be in [0, 1]; received {params[key]}")
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
        new_name, old_name, ind_name = _names(candidate, old, independent)
        models = {}
        if old is not None:
            models[old_name] = old
        models[new_name] = candidate
        if independent is not None:
            models[ind_name] = independent
        report, results = compare_models(models, splits[QUERY_SPLIT_KEY], splits[GALLERY_SPLIT_KEY],
                                         old=old_name or new_name, independent=ind_name, batch_size=batch_size,
                                         progress=lambda line: _LOG.info("CompatibilityValidator: %s", line))
        declared = old is not None and candidate.signature_for_space(old.metadata["embedding_space"]) is not None
        blessed, reasons = decide(report, results, new=new_name, old=old_name, declared_compatible=declared,
                                  margin_top1=params[MARGIN_TOP1_KEY], margin_map=params[MARGIN_MAP_KEY],
                                  min_top1=params[MIN_TOP1_KEY], min_map=params[MIN_MAP_KEY])
        if old is None:
            reasons.insert(0, f"no old model (first run of the pipeline): {new_name} is judged on its own accuracy")
        verdict = "BLESSED" if blessed else "NOT_BLESSED"

        blessing_dir = util.path(blessing)
        os.makedirs(blessing_dir, exist_ok=True)
        ids = {name: m.model_id for name, m in models.items()}
        payload = {
            "verdict": verdict, "blessed": blessed, "reasons": reasons,
            "candidate": new_name, "old": old_name, "independent": ind_name, "model_ids": ids,
            "thresholds": params, "splits": {k: splits[k].name for k in splits},
            **{k: v for k, v in report.items() if k not in ("old", "independent")},
        }
        util.write_json(os.path.join(blessing_dir, METRICS_FILE), payload)
        rows = [{"query": p["query"], "gallery": p["gallery"], "signature": p["signature"], "top1": p["top1"],
                 "top5": p["top5"], "mAP": p["mAP"],
                 "top1 95% CI": f"[{p['top1_ci95'][0]:.3f}, {p['top1_ci95'][1]:.3f}]",
                 "mAP 95% CI": f"[{p['mAP_ci95'][0]:.3f}, {p['mAP_ci95'][1]:.3f}]", "queries": p["num_queries"]}
                for p in report["pairs"]]
        details = {f"model {name}": f"{ids[name]} ({m.model_dir})" for name, m in models.items()}
        details.update({"query split": splits[QUERY_SPLIT_KEY].name, "gallery split": splits[GALLERY_SPLIT_KEY].name,
                        "examples": examples_dir, **{k: f"{v:g}" for k, v in params.items()}})
        for note in report["skipped"]:
            details[f"skipped {note.split(':')[0]}"] = note.split(":", 1)[1].strip()
        title = (f"Compatibility validation of {new_name} against {old_name}" if old_name
                 else f"Validation of {new_name} (first model of the pipeline)")
        write_html_report(os.path.join(blessing_dir, REPORT_FILE), title=title, verdict=verdict, reasons=reasons,
                          matrix=results, models=list(models), metrics_table=rows, details=details)
        marker = BLESSED_FILE if blessed else NOT_BLESSED_FILE
        util.write_text(os.path.join(blessing_dir, marker), "\n".join(reasons) + "\n")

        blessing.set_int_custom_property(BLESSED_PROPERTY, 1 if blessed else 0)
        blessing.set_string_custom_property(CURRENT_MODEL_PROPERTY, candidate_artifact.uri)
        blessing.set_int_custom_property(CURRENT_MODEL_ID_PROPERTY, candidate_artifact.id)
        if old_artifact is not None:
            blessing.set_string_custom_property(BASELINE_MODEL_PROPERTY, old_artifact.uri)
            blessing.set_int_custom_property(BASELINE_MODEL_ID_PROPERTY, old_artifact.id)
        for (q, g), result in results.items():
            role = {new_name: "new", old_name: "old", ind_name: "independent"}
            for metric in ("top1", "mAP"):
                blessing.set_float_custom_property(f"{metric}_{role[q]}_{role[g]}", float(getattr(result, metric)))
        _LOG.info("CompatibilityValidator: %s\n%s\n%s", verdict, report["table"], "\n".join(reasons))
