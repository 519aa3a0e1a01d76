"""Tools run from the CLI: the demo, the benchmarks, the simulator."""
