"""The benchmark's runs: the scenarios with their seeds (`run_benchmark`), --validate, --validate-transform,
--epoch-study, --annotate.

Part of scripts/bench_compat.py (`make bench`); see its docstring for the scenarios and outputs.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Any, Optional, Sequence

import numpy as np

from bench.settings import (BCT, INDEPENDENT, LCE, LCE_INSTANCE, LCE_TRANSFORM, METRICS, EXTRA_SEED_METHODS, TARGET_METHODS, Profile,
                            SCENARIOS, _log)
from bench.data import Split, ensure_dataset, load_split, validation_split
from bench.zoo import fit_forward, forward_result
from bench.evaluation import _metric_entry, _row
from bench.scenarios import Benchmark
from bench.report import (SEED_SCENARIOS, _fmt, _read_validation_choice, _write_text, _yn, check_targets, cost_parts,
                          machine_info, plot_training_curves, read_with_analysis, seed_summary, write_markdown)


def use_one_inter_op_thread() -> None:
    """One TensorFlow inter-op thread (before TensorFlow starts; a no-op after). Results are bit-identical
    either way. On 2 cores it is about neutral: in two runs of the full profile on 2026-11-30 (S1 and S2 up
    to BCT with the default, then with one thread) the T12 fits took 202 s instead of 220 s, the cnn models
    the same time within 5%, and l2 (whose frozen old network can run beside the new one) 169 s instead
    of 148 s. A micro-benchmark of one fit alone had shown 1.7x, which the full runs did not reproduce."""
    import tensorflow as tf

    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already running (e.g. called from the test suite): keep its setting
        pass


# ---------------------------------------------------------------------------------------------------
# Entry points


def run_seeds(split: Split, profile: Profile, seeds: Sequence[int], out_dir: str, main: Optional["Benchmark"] = None,
              verbose: int = 0) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows that decide the targets (old, independent, lce, lce-instance of S1 and S2, both routes) for every
    seed.

    Seed `main.seed` reuses the main run's models and fitted T12s; every other seed trains its own (same data and
    settings).

    Returns:
      (summaries {scenario: seed_summary}, per-seed rows {scenario: {seed: {"old", <TARGET_METHODS>}}},
       model records, transformation records) of the extra seeds.
    """
    rows: dict[str, dict[int, dict[str, Any]]] = {key: {} for key in SEED_SCENARIOS}
    records, transforms = [], []
    for seed in seeds:
        bench = main if main is not None and seed == main.seed else Benchmark(split, profile, seed, out_dir, verbose)
        if bench is not main:
            bench.zoo.part = f"seed {seed}"
        for key in SEED_SCENARIOS:
            arch = {"old": profile.small_arch, "new": profile.large_arch} if key == "S2" else {}
            old = bench.old(f"{key} old ({arch['old']})" if arch else "S1 old (50% classes)", arch=arch.get("old"))
            independent = bench.spec(INDEPENDENT, old, arch=arch.get("new"))
            methods = TARGET_METHODS if bench is main else EXTRA_SEED_METHODS
            _log(f"seed {seed}, {key}: old, {', '.join(methods)}, both routes")
            rows[key][seed] = {"old": _metric_entry(bench.ev.m(old, old))}
            for method in methods:
                spec = bench.spec(method, old, arch=arch.get("new"))
                if method != INDEPENDENT:
                    bench.zoo.name(spec, f"{key} {method}")
                rows[key][seed][method] = _row(bench, method, spec, old, independent)
        if bench is not main:
            records += list(bench.zoo.records.values())
            transforms += [{**t, "seed": seed} for t in bench.transform_records]
    return {key: seed_summary(per_seed) for key, per_seed in rows.items()}, rows, records, transforms


def run_benchmark(data_dir: Optional[str], out_dir: str, profile: Profile, *, seed: int = 0,
                  scenarios: Sequence[str] = SCENARIOS, work: str = "build/bench", verbose: int = 0,
                  command: str = "", seeds: Sequence[int] = ()) -> dict[str, Any]:
    """Runs the scenarios and writes compat.json, compat.md, the heatmaps and the training curves into `out_dir`.

    Args:
      data_dir: a dataset with train/, query/, gallery/ image folders, or None to generate glyphs.
      out_dir: results directory.
      profile: sizes and settings.
      seed: seed of the data generation and of every model of the scenarios.
      scenarios: a subset of SCENARIOS, run in that order.
      work: where generated data is cached.
      verbose: Keras fit verbosity.
      command: the command line recorded in the results.
      seeds: the seeds of the rows that decide the targets (S1 and S2: old, independent, lce, lce-instance, both
        routes); `seed` among them reuses the scenarios' models and fits. Empty: judged on `seed` alone.

    Returns:
      The report dict written to compat.json.
    """
    import lce_tf
    from lce_tf.training import seed_everything

    start = time.perf_counter()
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"--scenarios: unknown {', '.join(unknown)}; expected some of {', '.join(SCENARIOS)}")
    os.makedirs(out_dir, exist_ok=True)
    machine = machine_info()
    data_dir, summary = ensure_dataset(data_dir, work, profile, seed)
    split = load_split(data_dir, summary)
    _log(f"data: {split.description}")
    seed_everything(seed)
    bench = Benchmark(split, profile, seed, out_dir, verbose)
    results: dict[str, Any] = {}
    scenario_seconds = {}
    for key in scenarios:
        t = time.perf_counter()
        _log(f"== scenario {key}")
        bench.zoo.part = key
        results[key] = getattr(bench, key.lower())()
        scenario_seconds[key] = round(time.perf_counter() - t, 1)
    seed_summaries, seed_rows, seed_records, seed_transforms = {}, {}, [], []
    if seeds and all(k in scenarios for k in SEED_SCENARIOS):
        t = time.perf_counter()
        _log(f"== seeds {', '.join(map(str, seeds))}")
        seed_summaries, seed_rows, seed_records, seed_transforms = run_seeds(split, profile, seeds, out_dir, bench,
                                                                             verbose)
        scenario_seconds["seeds"] = round(time.perf_counter() - t, 1)
    machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    models = [{**rec, "used_in": bench.used_in.get(spec, [])} for spec, rec in bench.zoo.records.items()]
    models += [{**rec, "used_in": ["seeds"]} for rec in seed_records]
    curves = plot_training_curves(models, os.path.join(out_dir, "training_curves.png")) if models else None
    wall = time.perf_counter() - start
    report = {
        "benchmark": "lce-tf compatibility benchmark", "lce_tf_version": lce_tf.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or f"python scripts/bench_compat.py --profile {profile.name}",
        "seed": seed, "machine": machine, "profile": dataclasses.asdict(profile), "dataset": split.description,
        "wall_time_seconds": round(wall, 1),
        "training_seconds": round(sum(r["seconds"] for r in models), 1),
        "transform_seconds": round(sum(t["seconds"] for t in bench.transform_records + seed_transforms), 1),
        "scenario_seconds": scenario_seconds, "scenarios": results, "seeds": seed_summaries,
        "seed_rows": {k: {str(s): v for s, v in rows.items()} for k, rows in seed_rows.items()},
        "targets": check_targets(results, seed_summaries or None), "models": models,
        "cost": cost_parts(models, bench.transform_records + seed_transforms, scenario_seconds, wall),
        "transforms": bench.transform_records + seed_transforms, "curves": curves,
        "validation": _read_validation_choice(out_dir),
    }
    _write_text(os.path.join(out_dir, "compat.json"), json.dumps(report, indent=1) + "\n")
    write_markdown(os.path.join(out_dir, "compat.md"), report)
    _log(f"wrote {out_dir}/compat.json, compat.md, {len(results)} heatmaps and the training curves in {wall / 60:.1f} min")
    return report


# (method, settings): the reference defaults, then ever tighter boundaries (an early trial chose the 20th
# percentile with λ_b = 10). bct and l2 are not candidates (the benchmark runs them at weight 1).
VALIDATION_CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    (LCE, {"boundary": "min", "lambda_align": 100.0, "lambda_boundary": 1.0}),
    (LCE, {"boundary": "percentile:20", "lambda_align": 100.0, "lambda_boundary": 10.0}),
    (LCE, {"boundary": "percentile:50", "lambda_align": 100.0, "lambda_boundary": 10.0}),
    (LCE, {"boundary": "percentile:80", "lambda_align": 100.0, "lambda_boundary": 10.0}))

# lce-instance's InfoNCE weight λ_i and temperature τ (--validate-instance), beside the paper's lce: the probes of
# issue 20 (weight 1 and 5, τ 0.05) and RACT's lower temperature.
INSTANCE_CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    (LCE, {}),
    (LCE_INSTANCE, {"lambda_instance": 1.0, "instance_temperature": 0.05}),
    (LCE_INSTANCE, {"lambda_instance": 1.0, "instance_temperature": 0.1}),
    (LCE_INSTANCE, {"lambda_instance": 3.0, "instance_temperature": 0.05}),
    (LCE_INSTANCE, {"lambda_instance": 1.0, "instance_temperature": 0.02}),
    (LCE_INSTANCE, {"lambda_instance": 0.3, "instance_temperature": 0.05}))

_SETTING_SYMBOLS = {"boundary": "boundary ", "lambda_align": "λa=", "lambda_boundary": "λb=",
                    "lambda_instance": "λi=", "instance_temperature": "τ="}

VALIDATION_SETTINGS = {
    "S1": "old on 50% of the classes, new: the same network on 100%",
    "S2": "old: the small network on 50% of the classes, new: the larger network on 100% (the pipeline demo's upgrade)",
}


def _validation_benchmark(data_dir: Optional[str], work: str, out_dir: str, profile: Profile, seed: int,
                          verbose: int, label: str) -> Benchmark:
    """The scenarios' Benchmark on a validation split of the training classes (--validate, --validate-transform)."""
    os.makedirs(out_dir, exist_ok=True)
    data_dir, summary = ensure_dataset(data_dir, work, profile, seed)
    split = validation_split(load_split(data_dir, summary), profile.val_classes, seed)
    _log(f"{label} data (training classes only): {split.description}")
    return Benchmark(split, profile, seed, out_dir, verbose)


def _held_out(split: Split) -> str:
    d = split.description
    return (f"{d['test_classes']} of the training classes held out (query/gallery split by {d['split_by']}); the "
            f"models train on the other {d['train_classes']}.")


def _settings_label(settings: dict[str, Any]) -> str:
    return " ".join(f"{_SETTING_SYMBOLS.get(k, k + '=')}{v:g}" if isinstance(v, float) else
                    f"{_SETTING_SYMBOLS.get(k, k + '=')}{v}" for k, v in settings.items()) or "defaults"


def run_validation(data_dir: Optional[str], out_dir: str, profile: Profile, *, seed: int = 0,
                   work: str = "build/bench",
                   candidates: Sequence[tuple[str, dict[str, Any]]] = VALIDATION_CANDIDATES, choose: str = LCE,
                   setting: str = "S1", name: str = "validation", verbose: int = 0,
                   command: str = "") -> dict[str, Any]:
    """Chooses a method's settings on a validation split of the training classes.

    Each candidate is (method, Spec fields); the best candidate of method `choose` is chosen (--validate: LCE's
    boundary rule and weights; --validate-instance: lce-instance's λ_i and τ). `setting` is the upgrade ("S1" or
    "S2", VALIDATION_SETTINGS); results go to OUT_DIR/NAME.{json,md}.
    """
    if setting not in VALIDATION_SETTINGS:
        raise ValueError(f"validation setting {setting!r}: expected one of {', '.join(VALIDATION_SETTINGS)}")
    start = time.perf_counter()
    bench = _validation_benchmark(data_dir, work, out_dir, profile, seed, verbose, "validation")
    split = bench.zoo.split
    arch = {"old": profile.small_arch, "new": profile.large_arch} if setting == "S2" else {}
    old = bench.old("old (50% classes)", arch=arch.get("old"))
    ind = bench.spec(INDEPENDENT, old, arch=arch.get("new"))
    bench.zoo.name(ind, "new* (independent)")
    ev = bench.ev
    rows = []
    for method, settings in candidates:
        spec = dataclasses.replace(bench.spec(method, old, arch=arch.get("new")), **settings)
        label = f"{method} {_settings_label(settings)}"
        bench.zoo.name(spec, label)
        row = _row(bench, method, spec, old, ind)
        rows.append({"settings": dict(settings), **row})
        back, fwd = row["backward"], row["forward"]
        _log(f"validation {label}: new/old top-1 {back['new_old']['top1']:.4f} mAP {back['new_old']['mAP']:.4f} "
             f"(old/old {ev.m(old, old).top1:.4f} / {ev.m(old, old).mAP:.4f}), forward {fwd['new_old']['top1']:.4f} / "
             f"{fwd['new_old']['mAP']:.4f}, new/new {row['new_new']['top1']:.4f} "
             f"(new* {ev.m(ind, ind).top1:.4f} / {ev.m(ind, ind).mAP:.4f})")

    def score(row):  # backward criterion first, then update gain + sacrifice, averaged over top-1 and mAP
        back = row["backward"]
        return (back["criterion"]["pass"], np.mean([back["update_gain"][m] + row["new_model_sacrifice"][m] for m in METRICS]))

    best = max((r for r in rows if r["method"] == choose), key=score)
    chosen = {"method": choose, **best["settings"]}
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "seed": seed,
              "command": command, "machine": machine_info(),
              "setting": setting, "profile": dataclasses.asdict(profile), "dataset": split.description,
              "rule": "the backward criterion on top-1 and mAP first, then the mean over top-1/mAP of update gain + "
                      "sacrifice",
              "old_old": _metric_entry(ev.m(old, old)), "independent_new_new": _metric_entry(ev.m(ind, ind)),
              "candidates": rows, "chosen": chosen, "wall_time_seconds": round(time.perf_counter() - start, 1),
              "models": list(bench.zoo.records.values())}
    _write_text(os.path.join(out_dir, f"{name}.json"), json.dumps(report, indent=1) + "\n")
    lines = [f"# {choose} settings chosen on a validation split of the training classes", "",
             f"- date: {report['date']}; command: `{command}`" if command else f"- date: {report['date']}",
             f"- {_held_out(split)} The benchmark's test classes are not used.",
             f"- setting: {setting} ({VALIDATION_SETTINGS[setting]}); epochs: old {profile.old_epochs}, new "
             f"{profile.epochs}; {profile.size} px; seed {seed}.", "",
             f"old/old top-1 {report['old_old']['top1']:.4f}, mAP {report['old_old']['mAP']:.4f}; new*/new* top-1 "
             f"{report['independent_new_new']['top1']:.4f}, mAP {report['independent_new_new']['mAP']:.4f}", "",
             "| method | settings | backward new/old top-1 | mAP | criterion | UG top-1 / mAP | forward top-1 | mAP | "
             "new/new top-1 | mAP | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    seconds = {r["name"]: r["seconds"] for r in report["models"]}
    for r in rows:
        back, fwd = r["backward"], r["forward"]
        lines.append(f"| {r['method']} | {_settings_label(r['settings'])} | {_fmt(back['new_old'], 'top1')} | "
                     f"{_fmt(back['new_old'], 'mAP')} | {_yn(back['criterion']['pass'])} | "
                     f"{back['update_gain']['top1']:.2f} / {back['update_gain']['mAP']:.2f} | "
                     f"{_fmt(fwd['new_old'], 'top1')} | {_fmt(fwd['new_old'], 'mAP')} | "
                     f"{r['new_new']['top1']:.4f} | {r['new_new']['mAP']:.4f} | {seconds.get(r['model'], '')} |")
    lines += ["", f"Rule: {report['rule']}. Chosen: {choose} {_settings_label(best['settings'])}. Wall time "
              f"{report['wall_time_seconds'] / 60:.1f} min (training seconds per model in the last column)."]
    _write_text(os.path.join(out_dir, f"{name}.md"), "\n".join(lines) + "\n")
    return report


# The fit objectives of the forward route's transformation T12 tried by --validate-transform, at the width
# and epochs settled by the earlier width study (128, 30: the library's defaults): (objective, {weights}),
# lce_tf.transform_fit.TransformFitSettings fields. The earlier study's conclusion is kept in
# benchmarks/results/transform_validation.md.
TRANSFORM_CANDIDATES: tuple[tuple[str, dict[str, float]], ...] = (
    ("cosine", {}),
    ("cosine+classify", {"classify_weight": 0.1}),
    ("cosine+classify", {"classify_weight": 1.0}),
    ("cosine+supcon", {"supcon_weight": 0.1}),
    ("cosine+supcon", {"supcon_weight": 1.0}),
    ("classify", {}),
)

# The earlier width/epoch study (2026-11-30, cosine objective), summarised in transform_validation.md.
_WIDTH_STUDY = ("Width and epochs were settled by the earlier study (2026-11-30, same data and models, cosine "
                "objective; its rows are in git history): widths 16, 64 and 128 with 10 or 30 epochs all met the "
                "criterion in both upgrades; width 128 / 30 epochs scored highest (S1 0.938 / 0.713, S2 0.681 / "
                "0.397), 0.2-0.7 points above width 64 / 30 epochs (inside the bootstrap intervals) at about 1.5x "
                "its fit time, and became the default. This run keeps width 128 / 30 epochs fixed.")


def _candidate_label(objective: str, weights: dict[str, float]) -> str:
    return objective + "".join(f" {k.split('_')[0]}={v:g}" for k, v in weights.items())


def run_transform_validation(data_dir: Optional[str], out_dir: str, profile: Profile, *, seed: int = 0,
                             work: str = "build/bench",
                             candidates: Sequence[tuple[str, dict[str, float]]] = TRANSFORM_CANDIDATES,
                             name: str = "transform_validation", verbose: int = 0,
                             command: str = "python scripts/bench_compat.py --validate-transform") -> dict[str, Any]:
    """Chooses the forward route's fit objective on a validation split of the TRAINING classes.

    For both upgrades of VALIDATION_SETTINGS (S1: same network, more classes; S2: small -> larger network,
    the demo's), the old model and the LCE new model are trained on the kept training classes; T12 is fitted
    with every candidate objective (the library's default width and epochs) on their training pairs and
    M(new, T12(old)) is measured on the held-out training classes (query/gallery by font, as the test split).
    Rule: the mean of top-1 and mAP over both settings (the criterion is reported beside it). Results:
    OUT_DIR/NAME.{json,md}.
    """
    from lce_tf.evaluation import empirical_criterion
    from lce_tf.transform_fit import TransformFitSettings

    start = time.perf_counter()
    bench = _validation_benchmark(data_dir, work, out_dir, profile, seed, verbose, "transform validation")
    split = bench.zoo.split
    base = TransformFitSettings(seed=seed, objective="cosine")
    settings_rows: dict[str, dict[str, Any]] = {}
    rows = []
    for setting in VALIDATION_SETTINGS:
        arch = {"old": profile.small_arch, "new": profile.large_arch} if setting == "S2" else {}
        old = bench.old(f"{setting} old (50% classes)", arch=arch.get("old"))
        new = bench.spec(LCE, old, arch=arch.get("new"))
        bench.zoo.name(new, f"{setting} lce")
        old_old, backward = bench.ev.m(old, old), bench.ev.m(new, old, old)
        settings_rows[setting] = {"description": VALIDATION_SETTINGS[setting], "old_old": _metric_entry(old_old),
                                  "backward": _metric_entry(backward), "new_new": _metric_entry(bench.ev.m(new, new))}
        for objective, weights in candidates:
            label = _candidate_label(objective, weights)
            settings = dataclasses.replace(base, objective=objective, **weights)
            fitted, seconds = fit_forward(bench.zoo, old, new, settings)
            result = forward_result(bench.zoo, new, old, fitted)
            verdict = empirical_criterion(result, old_old)
            rows.append({"setting": setting, "candidate": label, "objective": objective,
                         "weights": {k: float(v) for k, v in weights.items()}, "width": settings.width,
                         "epochs": settings.epochs, "forward": _metric_entry(result),
                         "criterion": {**{m: bool(verdict[m]) for m in METRICS}, "pass": all(verdict.values())},
                         "fit_loss": round(fitted.fit_loss["old_to_new"], 4), "fit_seconds": round(seconds, 1)})
            _log(f"{setting} T12 {label}: forward top-1 {result.top1:.4f} mAP {result.mAP:.4f} "
                 f"(old/old {old_old.top1:.4f} / {old_old.mAP:.4f}; backward {backward.top1:.4f} / {backward.mAP:.4f}); "
                 f"1 - cos {fitted.fit_loss['old_to_new']:.4f} in {seconds:.0f} s")

    labels = [_candidate_label(objective, weights) for objective, weights in candidates]

    def score(label):
        mine = [r for r in rows if r["candidate"] == label]
        return float(np.mean([(r["forward"]["top1"] + r["forward"]["mAP"]) / 2 for r in mine]))

    scores = {label: round(score(label), 4) for label in labels}
    chosen_label = max(labels, key=lambda label: scores[label])
    objective, weights = candidates[labels.index(chosen_label)]
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "seed": seed,
              "profile": dataclasses.asdict(profile), "dataset": split.description, "settings": settings_rows,
              "fit": {"width": base.width, "epochs": base.epochs, "batch_size": base.batch_size,
                      "learning_rate": base.learning_rate, "scale": base.scale, "temperature": base.temperature},
              "rule": "the mean of top-1 and mAP of M(new, T12(old)) over both settings",
              "command": command, "candidates": rows, "scores": scores,
              "chosen": {"candidate": chosen_label, "objective": objective, **weights},
              "width_study": _WIDTH_STUDY,
              "wall_time_seconds": round(time.perf_counter() - start, 1), "machine": machine_info(),
              "models": list(bench.zoo.records.values())}
    _write_text(os.path.join(out_dir, f"{name}.json"), json.dumps(report, indent=1) + "\n")
    lines = ["# Forward route: the fit objective of T12 chosen on a validation split of the training classes", "",
             f"{_held_out(split)} The test classes are not used. Epochs: old {profile.old_epochs}, new {profile.epochs}; "
             f"{profile.size} px; T12 = CompatibilityTransform (4 paths of width {base.width}), Adam "
             f"{base.learning_rate:g}, batch {base.batch_size}, {base.epochs} epochs, fitted on the new model's training "
             f"pairs with each objective (lce_tf.transform_fit.OBJECTIVES; classify: s = {base.scale:g} against the new "
             f"model's class centers of the training classes; supcon: τ = {base.temperature:g}).", ""]
    for setting, info in settings_rows.items():
        lines.append(f"- {setting} ({info['description']}): old/old {_fmt(info['old_old'], 'top1', False)} / "
                     f"{_fmt(info['old_old'], 'mAP', False)}; backward M(new, old) {_fmt(info['backward'], 'top1', False)} / "
                     f"{_fmt(info['backward'], 'mAP', False)}; new/new {_fmt(info['new_new'], 'top1', False)} / "
                     f"{_fmt(info['new_new'], 'mAP', False)}")
    lines += ["", "| setting | objective | forward top-1 | forward mAP | criterion | 1 − cos | fit s |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['candidate']} | {_fmt(r['forward'], 'top1')} | "
                     f"{_fmt(r['forward'], 'mAP')} | {_yn(r['criterion']['pass'])} | {r['fit_loss']:.4f} | "
                     f"{r['fit_seconds']:.0f} |")
    lines += ["", "| objective | mean of top-1 and mAP over S1 and S2 |", "|---|---|"]
    lines += [f"| {label} | {scores[label]:.4f} |" for label in labels]
    lines += ["", f"Rule: {report['rule']}. Chosen: {chosen_label}. Machine: {report['machine'].get('cpu', '')}; "
              f"wall time {report['wall_time_seconds'] / 60:.1f} min; command: `{command}`.", "", _WIDTH_STUDY]
    _write_text(os.path.join(out_dir, f"{name}.md"), "\n".join(lines) + "\n")
    return report


def _epoch_probe(split: Split, records: list[dict[str, Any]], label: str, old_gallery: Optional[np.ndarray] = None):
    """A Keras callback that measures, after every epoch, M(model, model) on the validation split and, with
    `old_gallery` (the old model's gallery embeddings), M(model, old): appended to `records`."""
    import tensorflow as tf

    from lce_tf import evaluation

    def embed(model, images):
        return np.concatenate([model(images[i:i + 512], training=False).numpy() for i in range(0, len(images), 512)])

    class Probe(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            q, g = embed(self.model, split.query_images), embed(self.model, split.gallery_images)
            own = evaluation.retrieval_metrics(q, split.query_labels, g, split.gallery_labels)
            entry = {"model": label, "epoch": epoch + 1, "loss": round(float((logs or {}).get("loss", np.nan)), 4),
                     "own": {m: round(float(own.metric(m)), 4) for m in METRICS}}
            if old_gallery is not None:
                cross = evaluation.retrieval_metrics(q, split.query_labels, old_gallery, split.gallery_labels)
                entry["backward"] = {m: round(float(cross.metric(m)), 4) for m in METRICS}
            records.append(entry)
            _log(f"epoch study: {label} epoch {epoch + 1}: loss {entry['loss']}, own top-1 {entry['own']['top1']}, "
                 f"mAP {entry['own']['mAP']}" + (f"; backward top-1 {entry['backward']['top1']}" if "backward" in entry
                                                 else ""))

    return Probe()


def run_epoch_study(data_dir: Optional[str], out_dir: str, profile: Profile, *, max_epochs: int = 8, seed: int = 0,
                    work: str = "build/bench", name: str = "epochs", verbose: int = 0,
                    command: str = "python scripts/bench_compat.py --epoch-study") -> dict[str, Any]:
    """How many epochs the benchmark's models need, measured on a validation split of the TRAINING classes.

    Trains S1's old model (the new network on 50% of the kept training classes), S2's old model (the small
    network) and S1's LCE model for `max_epochs` epochs each, measuring after every epoch M(model, model) and,
    for the LCE model, M(new, old) on held-out training classes (the test classes are not used). Rule: the
    first epoch after which one more epoch adds less than 1 point of own top-1 (a plateau at this learning
    rate). Results: OUT_DIR/NAME.{json,md,png}.
    """
    from lce_tf.report import plot_curves

    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    data_dir, summary = ensure_dataset(data_dir, work, profile, seed)
    split = validation_split(load_split(data_dir, summary), profile.val_classes, seed)
    study = dataclasses.replace(profile, epochs=max_epochs, old_epochs=max_epochs)
    bench = Benchmark(split, study, seed, out_dir, verbose)
    records: list[dict[str, Any]] = []
    old_s1 = bench.old("S1 old", arch=study.new_arch)
    old_s2 = bench.old("S2 old", arch=study.small_arch)
    for label, spec in (("S1 old", old_s1), ("S2 old", old_s2)):
        bench.zoo.callbacks = [_epoch_probe(split, records, label)]
        bench.zoo.model(spec)
    lce = bench.spec(LCE, old_s1)
    bench.zoo.name(lce, "S1 lce")
    bench.zoo.callbacks = [_epoch_probe(split, records, "S1 lce", bench.zoo.embed(old_s1, "gallery"))]
    bench.zoo.model(lce)
    bench.zoo.callbacks = []

    def plateau(label: str) -> int:
        tops = [r["own"]["top1"] for r in records if r["model"] == label]
        return next((e + 1 for e in range(len(tops) - 1) if tops[e + 1] - tops[e] < 0.01), len(tops))

    chosen = {label: plateau(label) for label in ("S1 old", "S2 old", "S1 lce")}
    curves = {f"{label} (own top-1)": ([r["epoch"] for r in records if r["model"] == label],
                                       [r["own"]["top1"] for r in records if r["model"] == label])
              for label in chosen}
    curves["S1 lce (backward top-1)"] = ([r["epoch"] for r in records if r["model"] == "S1 lce"],
                                         [r["backward"]["top1"] for r in records if r["model"] == "S1 lce"])
    plot_curves(curves, xlabel="epoch", ylabel="top-1 on held-out training classes",
                title="Epoch study (validation split of the training classes)", path=os.path.join(out_dir, f"{name}.png"))
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "seed": seed,
              "command": command, "machine": machine_info(), "profile": dataclasses.asdict(study),
              "dataset": split.description, "records": records, "plateau_epochs": chosen,
              "rule": "the first epoch after which one more epoch adds less than 1 point of own top-1",
              "wall_time_seconds": round(time.perf_counter() - start, 1),
              "models": list(bench.zoo.records.values())}
    _write_text(os.path.join(out_dir, f"{name}.json"), json.dumps(report, indent=1) + "\n")
    lines = ["# Epochs: how long the benchmark's models train", "",
             f"Measured on {split.description['test_classes']} held-out TRAINING classes (query/gallery by "
             f"{split.description['split_by']}), the models trained on the other {split.description['train_classes']}; "
             f"batch {study.batch_size}, Adam 1e-3, {study.size} px. The test classes are not used.", "",
             "| model | epoch | training loss | own top-1 | own mAP | backward top-1 | backward mAP |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        back = r.get("backward")
        lines.append(f"| {r['model']} | {r['epoch']} | {r['loss']} | {r['own']['top1']:.3f} | {r['own']['mAP']:.3f} | "
                     + (f"{back['top1']:.3f} | {back['mAP']:.3f} |" if back else " | |"))
    lines += ["", f"Rule: {report['rule']}. Plateau: " + ", ".join(f"{k} {v}" for k, v in chosen.items()) + ".", "",
              f"![epoch study]({name}.png)", "",
              f"Machine: {report['machine']['cpu']}; wall time {report['wall_time_seconds'] / 60:.1f} min; command: "
              f"`{command}`."]
    _write_text(os.path.join(out_dir, f"{name}.md"), "\n".join(lines) + "\n")
    return report


def annotate(out_dir: str, notes_path: str) -> dict[str, Any]:
    """Adds a written analysis (markdown lines from `notes_path`) to existing results; numbers are untouched.

    compat.json gets an "analysis" field and compat.md is re-rendered from compat.json with an
    "Analysis" section, so the analysis of a run lives next to that run's numbers.
    """
    path = os.path.join(out_dir, "compat.json")
    report = read_with_analysis(path, notes_path)
    report["validation"] = _read_validation_choice(out_dir) or report.get("validation")
    _write_text(path, json.dumps(report, indent=1) + "\n")
    write_markdown(os.path.join(out_dir, "compat.md"), report)
    return report
