"""Method-agnostic machinery: adapter layers, the tuner that injects them, targeting and dispatch."""
