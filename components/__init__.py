"""TFX components of the lce-tf pipeline (docs/design.md, "Architecture"), one folder each.

    image_example_gen/        image folders -> TFRecord Examples (splits train / query / gallery)
    class_center_extractor/   Beam: old-model class centers and boundaries -> ClassCenters
    lce_trainer/              LCE (or baseline) training -> a standard Model artifact
    compatibility_validator/  compatibility matrix + criterion -> a standard ModelBlessing + HTML report
    index_builder/            ScaNN index of the gallery -> RetrievalIndex

Every component wraps lce_tf functions; none re-implements them (the ClassCenterExtractor's Beam
transforms are `lce_tf.beam.centers`, so Beam workers unpickle its DoFns without a TFX import).
Importing this package imports neither tfx nor TensorFlow.
"""
