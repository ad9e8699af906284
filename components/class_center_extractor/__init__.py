"""ClassCenterExtractor: the old model's class centers and boundaries, computed with Apache Beam."""
