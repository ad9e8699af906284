"""The default LCE settings, in one place (imported by the library, the CLI, the components and the pipeline).

Chosen on a validation split of the TRAINING classes of the glyph benchmark, never on its test classes
(`scripts/bench_compat.py --validate`; the table is benchmarks/results/validation.md). With the
classifier rows initialised at the old centers (`CompatibilityConfig.init_from_old_centers`), the
reference settings of the paper scored best: the minimum cosine as the boundary (docs/design.md, the method,
item 1), λ_a = 100 (item 3) and λ_b = 1 (item 4). Tighter boundaries (20th, 50th, 80th percentile with
λ_b = 10; the 20th was an early trial's choice without that initialisation) lost 2.7-4.5 points of
new/old top-1 there, and λ_a = 3000 lost 3.
"""

EMBEDDING_DIM = 128
"""The embedding size D of a new model: `lce-tf train --dim`, TrainConfig, the pipeline's embedding_dim."""

BOUNDARY_RULE = "min"
LAMBDA_ALIGN = 100.0
LAMBDA_BOUNDARY = 1.0

LAMBDA_INSTANCE = 0.3
INSTANCE_TEMPERATURE = 0.05
"""lce-instance's per-image InfoNCE term (docs/design.md item 9): its weight λ_i and temperature τ.
Chosen on 400 held-out TRAINING classes of the S2 upgrade (`scripts/bench_compat.py --validate-instance
--setting S2`, benchmarks/results/instance_validation.md) by the rule of --validate (backward criterion
first, then update gain + new-model sacrifice): no candidate met the backward criterion there; λ_i = 1,
τ = 0.1 came closest on top-1 (0.783 against the bar 0.800) but cost the new model 9% of its own mAP,
while λ_i = 0.3, τ = 0.05 kept 98.6% of it and still gained on both routes over lce."""

IMPORT_CHECK_MIN_COSINE = 0.999
IMPORT_CHECK_SAMPLE = 256
"""`lce-tf model import --check` (lce_tf.model_import): the images re-embedded (evenly spread over the stored
vectors) and the cosine to its stored vector every one of them must reach. A wrongly declared pixel scaling
gives cosines near 0 (issue 28's trial: min -0.38, mean -0.08); the right one about 1 - 1e-6 (float32 kernels)."""

COLLAPSE_MAX_COSINE = 0.99
"""The collapse guard's threshold (`lce_tf.collapse`, docs/design.md "Known traps"): a model whose embeddings of
a sample have a mean pairwise cosine above it is refused by `lce-tf train`'s export, `lce-tf evaluate` and the
CompatibilityValidator. Measured: short runs of the built-in backbones on 16 px synthetic data gave 0.996-0.9997
(small_cnn after 2, 4, 10 or 18 steps, cnn after 1 or 9), untrained models 0.97-1.00 (issue 28 saw 1.000 after a
short keras.applications fine-tune); 40 steps 0.89, 60-80 steps 0.04-0.18 (the tests' v1 after 75: 0.048), the
quickstart's v1 0.246, so the bar leaves room for models whose classes are genuinely close."""
