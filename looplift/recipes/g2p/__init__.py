"""Grapheme-to-phoneme conversion on the CMU Pronouncing Dictionary."""
