"""The compatibility benchmark (`python scripts/bench_compat.py`, `make bench`), one job per module:

    settings    methods, scenarios, metrics, run profiles (`Profile`), one model to train (`Spec`)
    data        the dataset and its in-memory `Split`; the validation split of the training classes
    zoo         `ModelZoo`: each Spec trained once (lce_tf.training.prepare_training + train), embeddings,
                centers and fitted T12s cached
    evaluation  M(Q, G) per model pair (`Evaluator`), routes, criterion, one row per method
    scenarios   `Benchmark`: the scenarios S1-S5 and cross-model
    report      targets, seeds' summary, compat.md tables, the README table, training curves
    runs        the entry points: run_benchmark, run_validation, run_transform_validation, run_epoch_study,
                annotate
    yours       scenario S6 "your model" (scripts/bench_yours.py, `make bench-yours`): a plain-Keras v1 imported
                with lce_tf.model_import, v2 by the zoo, measured by `Benchmark.upgrade_scenario`

scripts/bench_compat.py is the command line and re-exports these names.
"""
