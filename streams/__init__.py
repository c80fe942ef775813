"""Stream processing on faust-streaming: validation, per-sensor state, the worker agent."""
