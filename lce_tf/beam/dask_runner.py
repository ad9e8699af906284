"""Beam's DaskRunner with the fixes the ClassCenterExtractor needs (docs/scale-out.md, "Beam on Dask").

    --runner=lce_tf.beam.dask_runner.DaskRunner --dask_client_address=tcp://HOST:8786

(`lce_tf.beam.options.dask_beam_args` writes these flags.)

apache-beam 2.74 ships `apache_beam.runners.dask.dask_runner.DaskRunner` (not registered under a short
name), which translates a pipeline into dask.bag operations. Run as it is on the center extraction,
it fails or loses data (found on a LocalCluster of 2 worker processes, tests/test_beam_dask.py):

1. ParDo drops what a DoFn emits in `finish_bundle`: `apply_dofn_to_bundle` collects the outputs
   before it calls `invoke_finish_bundle`. `beam.BatchElements` emits the last batch of every bundle
   there and the component's `SpillBatchesFn` its last shard, so rows vanish (pass 1 and pass 2 then
   count different numbers of samples).
2. The output receivers of a ParDo are created once, when the pipeline is translated, and shared by
   every partition that runs in the same process: a side input computed inside a task (below) appends
   to the list of an earlier computation, so a singleton side input ("CentersFromSums") holds two
   elements ("PCollection of size 2 with more than one element accessed as a singleton view").
3. A side input is a dask.bag that every task reading it computes again (`list(bag)` inside the task,
   with the local scheduler of the worker), so pass 1 runs once per partition of pass 2.
4. `beam.io.Read` (ReadFromTFRecord, every file-based source) has no translation: it becomes a no-op
   whose output is None.
5. Only the bag of the last transform visited is computed; a branch that does not lead to it never runs.

This runner keeps the stock translation of GroupByKey and Flatten and replaces the rest:
ParDo runs a fresh copy of the DoFn per partition (unpickled from the bytes Beam's pickler made of it),
with its own receivers, and returns the outputs of `process` AND `finish_bundle`; every side input is
one node of the dask graph (the concatenated partitions of its bag, computed once by the cluster and
passed to the tasks that read it); Create makes one partition per item, up to 2 per worker (the stock
runner puts up to 128 items in one partition, so a few file names would be read by one worker); Read splits a bounded source into bundles in the driver (file
names and offsets only) and reads each bundle in a task; every leaf of the pipeline is computed. The
dask client is closed when the run finishes.

Workers import this module and the DoFns' modules (`lce_tf.beam.centers`; the DoFns are pickled by
reference), so they must run with lce-tf installed (`pip install lce-tf[dask]`, or this checkout on
PYTHONPATH); they need neither TFX nor the pipeline package.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import apache_beam as beam
import dask.bag as db
from apache_beam import pvalue
from apache_beam.internal import pickler
from apache_beam.pipeline import AppliedPTransform, PipelineVisitor
from apache_beam.runners.common import DoFnContext, DoFnInvoker, DoFnSignature, _OutputHandler
from apache_beam.runners.dask import dask_runner as stock
from apache_beam.runners.dask import transform_evaluator as stock_ops
from apache_beam.runners.dask.overrides import _Create, _Read
from apache_beam.runners.runner import PipelineState
from apache_beam.transforms.sideinputs import SideInputMap

# The runner's import path, for --runner (the DaskRunner has no registered short name; = options.DASK_RUNNER).
RUNNER = f"{__name__}.DaskRunner"
# Bytes of a bundle when a bounded source is split (Read); a TFRecord file is never split.
DESIRED_BUNDLE_BYTES = 64 << 20
# Seconds to wait for the scheduler (the pre-flight check and the runner's client).
CONNECT_TIMEOUT = 10.0


def _windowed(values, window_fn=None):
    return [stock_ops.get_windowed_value(v, window_fn) for v in values]


def _run_dofn_on_partition(items, *side_values, spec: bytes):
    """One partition = one bundle: a fresh DoFn and receivers; outputs of process and finish_bundle.

    `spec` is Beam's pickle of (DoFn, window_fn, label, args, kwargs, side input specs): unpickled here,
    so every partition gets its own DoFn, and dask never sees the tuples (it would run them as tasks).
    """
    fn, window_fn, label, args, kwargs, side_specs = pickler.loads(spec)
    receivers = stock_ops.OneReceiver()
    side_inputs = [SideInputMap(view_class, view_options, _windowed(values, mapping_fn))
                   for (view_class, view_options, mapping_fn), values in zip(side_specs, side_values)]
    handler = _OutputHandler(window_fn=window_fn, main_receivers=receivers[None], tagged_receivers=receivers,
                             per_element_output_counter=None, output_batch_converter=None,
                             process_yields_batches=False, process_batch_yields_elements=False)
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(fn), handler, context=DoFnContext(label, state=None), side_inputs=side_inputs,
        input_args=list(args), input_kwargs=dict(kwargs), user_state_context=None,
        bundle_finalizer_param=beam.DoFn.BundleFinalizerParam())
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(stock_ops.get_windowed_value(item, window_fn))
    invoker.invoke_finish_bundle()  # before collecting: BatchElements and SpillBatchesFn emit here
    invoker.invoke_teardown()
    return [v.value for v in receivers.values]


def _concat_partitions(*partitions) -> list:
    return [item for part in partitions for item in part]


def _read_bundle(bundles) -> list:
    out = []
    for bundle in bundles:
        source = bundle.source
        out.extend(source.read(source.get_range_tracker(bundle.start_position, bundle.stop_position)))
    return out


def _drain(partition) -> list:
    """A leaf's partition computed on the worker; nothing is sent back but the fact that it ran."""
    for _ in partition:
        pass
    return []


@dataclasses.dataclass
class _Translation:
    """dask.bag of every applied transform, plus which outputs some transform reads."""

    bags: dict = dataclasses.field(default_factory=dict)
    consumed: set = dataclasses.field(default_factory=set)


class _Visitor(PipelineVisitor):
    def __init__(self, bag_kwargs: dict, num_workers: int):
        self.bag_kwargs = bag_kwargs
        self.num_workers = max(1, num_workers)
        self.t = _Translation()
        self._side_values: dict = {}   # producer -> Delayed list of the side input's elements

    def _bag_of(self, value):
        producer = value.producer
        self.t.consumed.add(producer)
        return self.t.bags.get(producer)

    def _side_value(self, producer):
        import dask  # pylint: disable=import-outside-toplevel

        if producer not in self._side_values:
            bag = self.t.bags[producer]
            self._side_values[producer] = dask.delayed(_concat_partitions, pure=True)(*bag.to_delayed(
                optimize_graph=False))
        return self._side_values[producer]

    def visit_transform(self, node: AppliedPTransform) -> None:
        transform = node.transform
        inputs = [self._bag_of(v) for v in node.inputs if not isinstance(v, pvalue.PBegin)]
        if transform.__class__ is beam.ParDo:  # as the stock runner: subclasses (_GroupAlsoByWindow) are no-ops
            self.t.bags[node] = self._par_do(node, inputs[0])
        elif isinstance(transform, _Read):
            self.t.bags[node] = self._read(transform)
        elif isinstance(transform, _Create) and not self.bag_kwargs:
            # The stock default puts up to 128 items in one partition, so a Create of a few file names
            # (ReadEmbeddingShards) would run on one worker: here one partition per item, up to 2 per worker.
            items = list(transform.values)
            self.t.bags[node] = db.from_sequence(items, npartitions=max(1, min(len(items), 2 * self.num_workers)))
        else:
            op = stock_ops.TRANSLATIONS.get(transform.__class__, stock_ops.NoOp)(node, bag_kwargs=self.bag_kwargs)
            if not node.inputs or all(isinstance(v, pvalue.PBegin) for v in node.inputs):
                input_bag = None
            elif isinstance(op, stock_ops.Flatten) or len(inputs) != 1:
                input_bag = inputs
            else:
                input_bag = inputs[0]
            self.t.bags[node] = op.apply(input_bag=input_bag, side_inputs=None)

    def _par_do(self, node: AppliedPTransform, input_bag):
        transform = node.transform
        main_input = next(iter(node.main_inputs.values()))
        window_fn = main_input.windowing.windowfn if hasattr(main_input, "windowing") else None
        args, kwargs = transform.raw_side_inputs
        side_specs, side_values = [], []
        for si in node.side_inputs:
            self.t.consumed.add(si.pvalue.producer)
            side_specs.append((type(si), si._view_options(), si._window_mapping_fn))  # pylint: disable=protected-access
            side_values.append(self._side_value(si.pvalue.producer))
        spec = pickler.dumps((transform.fn, window_fn, transform.label, tuple(args), dict(kwargs), side_specs))
        return input_bag.map_partitions(_run_dofn_on_partition, *side_values, spec=spec)

    def _read(self, transform: _Read):
        bundles = list(transform.source.split(desired_bundle_size=DESIRED_BUNDLE_BYTES))
        if not bundles:
            return db.from_sequence([], npartitions=1)
        return db.from_sequence(bundles, npartitions=len(bundles)).map_partitions(_read_bundle)

    def leaves(self) -> list:
        return [bag for node, bag in self.t.bags.items() if node not in self.t.consumed and bag is not None]


@dataclasses.dataclass
class DaskRunnerResult(stock.DaskRunnerResult):
    """The stock result; the client is closed once the run has finished (or failed)."""

    def wait_until_finish(self, duration=None) -> str:
        try:
            return super().wait_until_finish(duration)
        finally:
            if self._state in (PipelineState.DONE, PipelineState.FAILED):
                self.client.close()


class DaskRunner(stock.DaskRunner):
    """Beam's DaskRunner with ParDo, side inputs, Read and the computed leaves fixed (module docstring)."""

    def run_pipeline(self, pipeline, options):
        import dask  # pylint: disable=import-outside-toplevel
        import dask.distributed as ddist  # pylint: disable=import-outside-toplevel

        from apache_beam.runners.dask.overrides import dask_overrides  # pylint: disable=import-outside-toplevel

        dask_options = options.view_as(stock.DaskOptions).get_all_options(drop_default=True, current_only=True)
        bag_kwargs = stock.DaskOptions._extract_bag_kwargs(dask_options)  # pylint: disable=protected-access
        dask_options.setdefault("timeout", CONNECT_TIMEOUT)
        client = ddist.Client(**dask_options)
        try:
            pipeline.replace_all(dask_overrides())
            visitor = _Visitor(bag_kwargs, len(client.scheduler_info().get("workers", {})))
            pipeline.visit(visitor)
            leaves = [bag.map_partitions(_drain) for bag in visitor.leaves()]
            futures = client.compute(list(dask.optimize(*leaves)))
        except BaseException:
            client.close()
            raise
        return DaskRunnerResult(client, futures)


# ----------------------------------------------------------------------------------------------
# The scheduler
# ----------------------------------------------------------------------------------------------

def check_scheduler(address: str, timeout: Optional[float] = None) -> int:
    """Connects to a dask scheduler and returns its number of workers (a pre-flight check of a run).

    Raises:
      ValueError: one line: the address cannot be reached within `timeout` seconds, or the scheduler
        has no worker.
    """
    import dask.distributed as ddist  # pylint: disable=import-outside-toplevel

    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    try:
        with ddist.Client(address, timeout=timeout, set_as_default=False) as client:
            workers = len(client.scheduler_info().get("workers", {}))
    except (OSError, TimeoutError) as e:
        raise ValueError(f"dask scheduler {address}: cannot connect within {timeout:g} s "
                         f"({' '.join(str(e).split()) or type(e).__name__})") from None
    if workers == 0:
        raise ValueError(f"dask scheduler {address}: has no worker (start some with `dask worker {address}`)")
    return workers


def close_cluster(cluster, timeout: float = 60.0) -> None:
    """Closes a LocalCluster; a worker process slow to exit (a busy machine) does not fail the caller.

    The nanny has already sent SIGKILL when its wait for the process times out (asyncio.TimeoutError,
    not the builtin TimeoutError on Python 3.10), so the processes go away either way.
    """
    import asyncio  # pylint: disable=import-outside-toplevel
    import logging  # pylint: disable=import-outside-toplevel

    try:
        cluster.close(timeout=timeout)
    except (asyncio.TimeoutError, TimeoutError) as e:
        logging.getLogger(__name__).warning("dask cluster close: a worker was slow to exit (%s); it was killed",
                                            type(e).__name__)
