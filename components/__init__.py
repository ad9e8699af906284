"""TFX components of the lce-tf pipeline (docs/design.md, "Architecture"), one folder each.

    image_example_gen/        image folders -> TFRecord Examples (splits train / query / gallery)
    class_center_extractor/   Beam: old-model class centers and boundaries -> ClassCenters
    lce_trainer/              LCE (or baseline) training -> a standard Model artifact
    gallery_transform_fitter/ the forward route's T12 (old -> new) fitted on the training split
                              -> GalleryTransformation
    compatibility_validator/  compatibility matrix + criterion -> a standard ModelBlessing + HTML report
    index_builder/            the served gallery index (any registered backend) -> RetrievalIndex
    atomic_pusher/            the executor of the stock Pusher: copies the blessed model atomically

Every component wraps lce_tf functions; none re-implements them. Importing this package (or a
component's Beam helpers) imports neither tfx nor TensorFlow: Beam worker processes unpickle the
DoFns of `class_center_extractor.centers_beam` without paying for a TFX import.
"""
