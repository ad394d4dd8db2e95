"""Readers to the canonical record schema, and the synthetic SynthShift world."""
