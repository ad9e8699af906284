"""IndexBuilder: a relocatable ScaNN index of the gallery split (RetrievalIndex artifact)."""
