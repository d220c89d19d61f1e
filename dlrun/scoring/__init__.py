"""Measuring instruments more than one task uses: sample-quality metrics for generators (FID, KID,
mode coverage) and dlrun classifier checkpoints loaded as feature extractors or teachers."""
