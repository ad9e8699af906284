"""TFX components of the lce-tf pipeline (docs/design.md, "Architecture"), one folder each.

    image_example_gen/        image folders -> TFRecord Examples (splits train / query / gallery)
    class_center_extractor/   Beam: old-model class centers and boundaries -> ClassCenters
    lce_trainer/              LCE (or baseline) training -> a standard Model artifact
    gallery_transform_fitter/ the forward route's T12 (old -> new) fitted on the training split
                              -> GalleryTransformation
    compatibility_validator/  compatibility matrix + criterion -> a standard ModelBlessing + HTML report
    index_builder/            the served gallery index (any registered backend) -> RetrievalIndex
    atomic_pusher/            the executor of the stock Pusher: copies the blessed model atomically

Every component wraps lce_tf functions; none re-implements them (the ClassCenterExtractor's Beam
transforms are `lce_tf.beam.centers`, so Beam workers unpickle its DoFns without a TFX import).
Importing this package imports neither tfx nor TensorFlow.
"""
