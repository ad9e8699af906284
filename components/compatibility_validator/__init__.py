"""CompatibilityValidator: the compatibility matrix and the blessing (standard ModelBlessing)."""
