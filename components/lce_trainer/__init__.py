"""LceTrainer: trains the new (compatible) model with lce_tf; a standard Model artifact."""
