"""Apache Beam code of lce-tf that needs no TFX (docs/design.md, "Architecture"; docs/scale-out.md).

    options.py      the Beam flags of the runners lce-tf supports (DirectRunner, Dask) and the dask
                    scheduler address check; pure Python, imports no Beam
    centers.py      the two-pass class-center extraction as Beam transforms (the ClassCenterExtractor's
                    job and `lce-tf centers --beam-runner`); imports apache_beam
    dask_runner.py  Beam's DaskRunner with the fixes the center extraction needs; imports apache_beam
                    and dask

Importing this package imports nothing: `import lce_tf` never loads Beam. `centers` and `dask_runner`
are imported only by code that runs a Beam pipeline (the `centers` command, the ClassCenterExtractor's
executor, Beam's workers, the benchmarks and tests).
"""
