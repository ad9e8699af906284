"""ImageFolderExampleGen: image folders -> TFRecord Examples (train / query / gallery splits)."""
