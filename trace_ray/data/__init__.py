"""Where preference data comes from (sources), how its rows become canonical records (formats,
readers), the held-out split, and the synthetic SynthShift world."""
