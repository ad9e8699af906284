"""GalleryTransformFitter: the fitted old -> new transformation of the forward upgrade route."""
