"""Validation: cross-dataset stability, perplexity gaps, architecture risks, gates, reports."""
