"""Helpers for testing and benchmarking lce-tf, shipped with the library as tf.test and TFX's test
utilities are: `milvus_server` starts a Milvus standalone server on free ports of 127.0.0.1 for
tests/test_milvus_server.py and scripts/bench_ann.py. No lce-tf command imports this package, and
importing it imports nothing.
"""
