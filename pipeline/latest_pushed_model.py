"""LatestPushedModelStrategy: the old model is the Model of the latest push, not merely the latest blessing.

TFX's LatestBlessedModelStrategy picks the latest Model whose ModelBlessing says blessed = 1. A blessed
model is not necessarily a pushed one: a run killed (or a Pusher failing) after the validator blessed
its candidate and before the Pusher copied it leaves a blessed model that serving never received. The
rerun would then resolve that candidate as its own old model: the validator compares it with itself
(its cached verdict is not reused), and in an LCE run a new model would be trained compatible with a
model that was never served. This strategy follows the Pusher instead: the latest PushedModel with
pushed = 1, and the Model that the Pusher execution which wrote it read.

    Resolver(strategy_class=LatestPushedModelStrategy, model=Channel(type=Model),
             pushed_model=Channel(type=PushedModel), index=Channel(type=RetrievalIndex))

With the optional `index` channel it also resolves the index that serving holds with that model: the
latest RetrievalIndex with `built` = 1 written by an IndexBuilder execution that read that Model (so the
forward route upgrades the gallery of the model actually served, even after a run that died between
building its index and pushing its model).

The KFP v2 compiler only accepts TFX's two stock strategies, so the pipeline compiled for KFP v2 keeps
LatestBlessedModelStrategy (see `pipeline.create_pipeline`).
"""

from __future__ import annotations

from typing import Optional

from tfx import types
from tfx.dsl.components.common import resolver
from tfx.types import standard_artifacts

from components import artifacts

MODEL_KEY = "model"
PUSHED_MODEL_KEY = "pushed_model"
INDEX_KEY = "index"
BUILT_PROPERTY = artifacts.BUILT_PROPERTY  # components.index_builder: 1 when the index was built
INDEX_BUILDER_MODEL_INPUT = "model"  # the IndexBuilder's input key of the model it indexes
PUSHED_PROPERTY = "pushed"  # set to 1 by the Pusher when it pushed (tfx.components.pusher.executor)
PUSHER_MODEL_INPUT = "model"  # the Pusher's input key of the model it pushes


class LatestPushedModelStrategy(resolver.ResolverStrategy):
    """Resolves the latest pushed Model (and its PushedModel); both lists empty when nothing was pushed."""

    def resolve_artifacts(self, store, input_dict: dict[str, list[types.Artifact]]
                          ) -> Optional[dict[str, list[types.Artifact]]]:
        from ml_metadata.proto import metadata_store_pb2  # pylint: disable=import-outside-toplevel

        if set(input_dict) - {INDEX_KEY} != {MODEL_KEY, PUSHED_MODEL_KEY}:
            raise ValueError(f"LatestPushedModelStrategy expects the inputs {MODEL_KEY!r} (Model) and "
                             f"{PUSHED_MODEL_KEY!r} (PushedModel), optionally {INDEX_KEY!r} (RetrievalIndex); "
                             f"received {sorted(input_dict)}")
        empty = {key: [] for key in input_dict}
        models = {a.id: a for a in input_dict[MODEL_KEY] if isinstance(a, standard_artifacts.Model)}
        pushes = sorted((a for a in input_dict[PUSHED_MODEL_KEY]
                         if a.get_int_custom_property(PUSHED_PROPERTY) == 1), key=lambda a: a.id, reverse=True)
        for pushed in pushes:
            producers = [e.execution_id for e in store.get_events_by_artifact_ids([pushed.id])
                         if e.type == metadata_store_pb2.Event.OUTPUT]
            model_id = _input_artifact_id(store, producers, PUSHER_MODEL_INPUT, models)
            if model_id is not None:
                resolved = {MODEL_KEY: [models[model_id]], PUSHED_MODEL_KEY: [pushed]}
                if INDEX_KEY in input_dict:
                    resolved[INDEX_KEY] = _index_of_model(store, input_dict[INDEX_KEY], model_id)
                return resolved
        return empty


def _input_artifact_id(store, execution_ids: list[int], input_key: str, candidates) -> Optional[int]:
    """The id of the artifact among `candidates` that one of the executions read as input `input_key`."""
    from ml_metadata.proto import metadata_store_pb2  # pylint: disable=import-outside-toplevel

    for event in store.get_events_by_execution_ids(execution_ids):
        if (event.type == metadata_store_pb2.Event.INPUT and event.path.steps
                and event.path.steps[0].key == input_key and event.artifact_id in candidates):
            return event.artifact_id
    return None


def _index_of_model(store, indexes: list[types.Artifact], model_id: int) -> list[types.Artifact]:
    """[the latest built index whose IndexBuilder execution read Model `model_id`] or []."""
    from ml_metadata.proto import metadata_store_pb2  # pylint: disable=import-outside-toplevel

    for index in sorted((a for a in indexes if a.get_int_custom_property(BUILT_PROPERTY) == 1),
                        key=lambda a: a.id, reverse=True):
        producers = [e.execution_id for e in store.get_events_by_artifact_ids([index.id])
                     if e.type == metadata_store_pb2.Event.OUTPUT]
        if _input_artifact_id(store, producers, INDEX_BUILDER_MODEL_INPUT, {model_id}) is not None:
            return [index]
    return []
