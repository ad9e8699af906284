"""--validate-side-info: what side information (lce_tf.side_info, FCT) buys the forward route, per byte stored.

Part of scripts/bench_compat.py (`make bench`); see its docstring for the scenarios and outputs.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
import time
from typing import Any, Optional, Sequence

import numpy as np

from bench.settings import LCE, METRICS, Profile, _log
from bench.zoo import fit_forward, forward_result
from bench.evaluation import _metric_entry, _route
from bench.report import _fmt, _write_text, _yn, machine_info
from bench.runs import VALIDATION_SETTINGS, _held_out, _validation_benchmark

SIDE_DIMS = (16, 32)


def _side_fit(zoo, old, new, side, settings):
    """T12 fitted on [f̂1; ψ̂] -> f̂2 pairs of the new model's training images, then applied to the old gallery
    with its side vectors; returns (RetrievalResult, fitted, fit seconds, side-embedding seconds of the gallery)."""
    from lce_tf import evaluation, transform_fit
    from lce_tf.side_info import append_side

    rows, folder = zoo._train_rows(new.classes)  # pylint: disable=protected-access
    train_side = side.embed(zoo.split.train_images[rows])
    start = time.perf_counter()
    gallery_side = side.embed(zoo.split.gallery_images)
    embed_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="bench-side-pairs-") as pair_dir:
        pairs = transform_fit.PairStore.from_arrays(pair_dir, append_side(zoo.embed(old, "train")[rows], train_side),
                                                    zoo.embed(new, "train")[rows], folder.labels)
        start = time.perf_counter()
        fitted = transform_fit.fit_transformation(pairs, dataclasses.replace(settings, side_dim=side.settings.dim))
        fit_seconds = time.perf_counter() - start
    moved = fitted.apply("old_to_new", append_side(zoo.embed(old, "gallery"), gallery_side))
    result = evaluation.retrieval_metrics(zoo.embed(new, "query"), zoo.split.query_labels, moved,
                                          zoo.split.gallery_labels)
    return result, fitted, fit_seconds, embed_seconds


def run_side_info_validation(data_dir: Optional[str], out_dir: str, profile: Profile, *, seed: int = 0,
                             work: str = "build/bench", settings_keys: Sequence[str] = ("S2", "S1"),
                             side_dims: Sequence[int] = SIDE_DIMS, side_epochs: int = 10,
                             untrained_control: bool = False,
                             name: str = "side_info_validation", verbose: int = 0,
                             command: str = "python scripts/bench_compat.py --validate-side-info") -> dict[str, Any]:
    """M(new, T12(old)) with and without side information, on a validation split of the TRAINING classes.

    For each upgrade of `settings_keys` (VALIDATION_SETTINGS), the old model, the LCE new model and new* (the
    independent new model, for the update gain) are trained on the kept training classes. T12 is fitted with the
    library's defaults on the new model's training pairs, once on f̂1 alone and once per D_s in `side_dims` on
    [f̂1; ψ̂] (lce_tf.side_info: ψ trained label-free, SimCLR InfoNCE, on the OLD model's training images, for
    `side_epochs` epochs; shared by the settings whose old models train on the same classes). Measured on the
    held-out training classes (query/gallery by font): forward top-1/mAP, criterion, update gain, the bytes a
    gallery entry stores and the time each part takes. With `untrained_control`, every D_s also gets a row whose ψ
    is the same network left at its random initialisation (same bytes, no training): what the InfoNCE training adds
    over random features of the image. The results are rewritten after every setting.
    Results: OUT_DIR/NAME.{json,md}.
    """
    from lce_tf import evaluation
    from lce_tf.side_info import (BYTES_PER_VALUE, SideModelSettings, TrainedSideModel, build_side_model,
                                  bytes_per_entry, train_side_model)
    from lce_tf.training import seed_everything
    from lce_tf.transform_fit import TransformFitSettings

    unknown = [k for k in settings_keys if k not in VALIDATION_SETTINGS]
    if unknown:
        raise ValueError(f"--setting: unknown {', '.join(unknown)}; expected some of {', '.join(VALIDATION_SETTINGS)}")
    start = time.perf_counter()
    machine = machine_info()
    bench = _validation_benchmark(data_dir, work, out_dir, profile, seed, verbose, "side-info validation")
    zoo, split = bench.zoo, bench.zoo.split
    base = TransformFitSettings(seed=seed)
    side_models: dict[tuple[str, int], Any] = {}
    side_records: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "seed": seed,
        "command": command, "machine": machine, "profile": dataclasses.asdict(profile), "dataset": split.description,
        "fit": dataclasses.asdict(base), "side_epochs": side_epochs, "settings": {}, "rows": [],
        "side_models": side_records}
    ind = bench.new_star
    for key in settings_keys:
        arch = {"old": profile.small_arch, "new": profile.large_arch} if key == "S2" else {}
        old = bench.old(f"{key} old (50% classes)", arch=arch.get("old"))
        new = bench.spec(LCE, old, arch=arch.get("new"))
        bench.zoo.name(new, f"{key} lce")
        old_old, ind_ind = bench.ev.m(old, old), bench.ev.m(ind, ind)
        old_dim = zoo.embed(old, "gallery").shape[1]
        report["settings"][key] = {"description": VALIDATION_SETTINGS[key], "old_old": _metric_entry(old_old),
                                   "independent_new_new": _metric_entry(ind_ind),
                                   "backward": _metric_entry(bench.ev.m(new, old, old)),
                                   "new_new": _metric_entry(bench.ev.m(new, new)), "old_dim": int(old_dim)}

        def add_row(side_dim: int, result, fitted, fit_seconds: float, extra: dict[str, Any]) -> None:
            route = _route(result, old_old, ind_ind)
            row = {"setting": key, "side_dim": side_dim, "forward": route["new_old"], "criterion": route["criterion"],
                   "update_gain": route["update_gain"], "fit_loss": round(fitted.fit_loss["old_to_new"], 4),
                   "fit_seconds": round(fit_seconds, 1),
                   "side_bytes_per_entry": {d: bytes_per_entry(side_dim, d) for d in BYTES_PER_VALUE},
                   "old_bytes_per_entry_float32": int(old_dim) * 4, **extra}
            report["rows"].append(row)
            report["wall_time_seconds"] = round(time.perf_counter() - start, 1)
            _write_side_report(out_dir, name, report, split)  # partial results survive an interrupted run
            _log(f"{key} T12 side_dim {side_dim}: forward top-1 {result.top1:.4f} mAP {result.mAP:.4f} (old/old "
                 f"{old_old.top1:.4f} / {old_old.mAP:.4f}, new* {ind_ind.top1:.4f} / {ind_ind.mAP:.4f}); UG "
                 f"{route['update_gain']['top1']:.3f} / {route['update_gain']['mAP']:.3f}; fit {fit_seconds:.0f} s")

        fitted, seconds = fit_forward(zoo, old, new, base)
        add_row(0, forward_result(zoo, new, old, fitted), fitted, seconds, {})
        for side_dim in side_dims:
            cache_key = (old.classes, int(side_dim))
            if cache_key not in side_models:
                rows, _ = zoo._train_rows(old.classes)  # pylint: disable=protected-access
                side_settings = SideModelSettings(dim=int(side_dim), epochs=side_epochs, seed=seed)
                _log(f"training the side model (D_s {side_dim}, {side_settings.architecture}) label-free on the "
                     f"{len(rows)} training images of the old models ({old.classes} of the kept classes)")
                side = train_side_model(split.train_images[rows], side_settings, progress=_log)
                side_models[cache_key] = side
                own = evaluation.retrieval_metrics(side.embed(split.query_images), split.query_labels,
                                                   side.embed(split.gallery_images), split.gallery_labels)
                side_records.append({"dim": int(side_dim), "classes": old.classes, "images": len(rows),
                                     "settings": dataclasses.asdict(side_settings), "history": side.history,
                                     "seconds": round(side.seconds, 1),
                                     "diagnostic_side_alone": _metric_entry(own)})
                _log(f"side model D_s {side_dim}: {side.seconds:.0f} s, InfoNCE {side.history[0]:.3f} -> "
                     f"{side.history[-1]:.3f}; alone (diagnostic) top-1 {own.top1:.4f} mAP {own.mAP:.4f}")
            side = side_models[cache_key]
            result, fitted, fit_seconds, embed_seconds = _side_fit(zoo, old, new, side, base)
            add_row(int(side_dim), result, fitted, fit_seconds,
                    {"side_model_seconds": round(side.seconds, 1),
                     "side_embed_seconds_per_1000": round(1000 * embed_seconds / len(split.gallery_images), 3)})
            if untrained_control:
                seed_everything(seed)
                untrained = TrainedSideModel(build_side_model(split.input_shape, side.settings)[0], side.settings, [],
                                             0.0, 0)
                result, fitted, fit_seconds, _ = _side_fit(zoo, old, new, untrained, base)
                add_row(int(side_dim), result, fitted, fit_seconds, {"side_model": "untrained (control)"})
        report["wall_time_seconds"] = round(time.perf_counter() - start, 1)
        report["models"] = list(zoo.records.values())
        _write_side_report(out_dir, name, report, split)
    report["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    _write_side_report(out_dir, name, report, split)
    return report


def _write_side_report(out_dir: str, name: str, report: dict[str, Any], split) -> None:
    _write_text(os.path.join(out_dir, f"{name}.json"), json.dumps(report, indent=1) + "\n")
    fit = report["fit"]
    lines = ["# Forward route with side information (FCT), on a validation split of the training classes", "",
             f"{_held_out(split)} The test classes are not used. Epochs: old {report['profile']['old_epochs']}, new "
             f"{report['profile']['epochs']}; {report['profile']['size']} px. T12 = the library's default fit "
             f"(objective {fit['objective']}, classify weight {fit['classify_weight']:g}, width {fit['width']}, "
             f"{fit['epochs']} epochs), on f̂1 alone (D_s 0) or on [f̂1; ψ̂] (lce_tf.side_info). ψ: "
             f"{report['side_models'][0]['settings']['architecture'] if report['side_models'] else 'small_cnn'}, "
             f"SimCLR InfoNCE on two augmented views, trained WITHOUT labels on the old models' training images for "
             f"{report['side_epochs']} epochs. UG = update gain against new* (the independent new model).", ""]
    for key, info in report["settings"].items():
        lines.append(f"- {key} ({info['description']}): old/old {_fmt(info['old_old'], 'top1', False)} / "
                     f"{_fmt(info['old_old'], 'mAP', False)}; new*/new* {_fmt(info['independent_new_new'], 'top1', False)}"
                     f" / {_fmt(info['independent_new_new'], 'mAP', False)}; backward M(new, old) "
                     f"{_fmt(info['backward'], 'top1', False)} / {_fmt(info['backward'], 'mAP', False)}; LCE new/new "
                     f"{_fmt(info['new_new'], 'top1', False)} / {_fmt(info['new_new'], 'mAP', False)}")
    lines += ["", "| setting | D_s | forward top-1 | forward mAP | criterion | UG top-1 | UG mAP | side bytes/entry "
              "f32 / f16 / i8 | 1 − cos | fit s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        b = r["side_bytes_per_entry"]
        size = f"{r['side_dim']}{' untrained ψ' if 'side_model' in r else ''}"
        lines.append(f"| {r['setting']} | {size} | {_fmt(r['forward'], 'top1')} | {_fmt(r['forward'], 'mAP')} | "
                     f"{_yn(r['criterion']['pass'])} | {r['update_gain']['top1']:.3f} | {r['update_gain']['mAP']:.3f} | "
                     f"{b['float32']} / {b['float16']} / {b['int8']} (old vector {r['old_bytes_per_entry_float32']}) | "
                     f"{r['fit_loss']:.4f} | {r['fit_seconds']:.0f} |")
    per_byte = []
    for r in report["rows"]:
        base = next((b for b in report["rows"] if b["setting"] == r["setting"] and b["side_dim"] == 0), None)
        if r["side_dim"] and base and "side_model" not in r:
            gains = {m: r["forward"][m] - base["forward"][m] for m in METRICS}
            per_byte.append(f"| {r['setting']} | {r['side_dim']} | {100 * gains['top1']:+.1f} | {100 * gains['mAP']:+.1f} "
                            f"| {100 * gains['top1'] / r['side_bytes_per_entry']['float32']:+.3f} | "
                            f"{100 * gains['mAP'] / r['side_bytes_per_entry']['float32']:+.3f} |")
    if per_byte:
        lines += ["", "| setting | D_s | Δ top-1 (points) | Δ mAP (points) | Δ top-1 per float32 byte | Δ mAP per "
                  "float32 byte |", "|---|---|---|---|---|---|"] + per_byte
    if report["side_models"]:
        lines += ["", "| side model | images (no labels) | InfoNCE first → last epoch | train s | alone top-1 / mAP "
                  "(diagnostic) |", "|---|---|---|---|---|"]
        for s in report["side_models"]:
            alone = s["diagnostic_side_alone"]
            lines.append(f"| D_s {s['dim']} ({s['classes']} classes) | {s['images']} | {s['history'][0]:.3f} → "
                         f"{s['history'][-1]:.3f} | {s['seconds']:.0f} | {alone['top1']:.3f} / {alone['mAP']:.3f} |")
    embed = [r["side_embed_seconds_per_1000"] for r in report["rows"] if "side_embed_seconds_per_1000" in r]
    if embed:
        lines += ["", f"Embedding side vectors: {min(embed):.2f}-{max(embed):.2f} s per 1,000 gallery images (in memory, "
                  "batch 512), paid once when the gallery is indexed."]
    lines += ["", f"Machine: {report['machine'].get('cpu', '')} ({report['machine'].get('cpus_available', '?')} cores, "
              f"load average at start {report['machine'].get('load_average_start')}); wall time "
              f"{report.get('wall_time_seconds', 0) / 60:.1f} min; date {report['date']}; command: `{report['command']}`."]
    _write_text(os.path.join(out_dir, f"{name}.md"), "\n".join(lines) + "\n")
