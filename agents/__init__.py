"""The faust app and its stage agents: thin wiring from streams to `pipeline` calls."""
