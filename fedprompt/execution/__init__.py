"""The run machinery: the in-process runtime, the results folder a run writes, the metrics it
records, and what reads runs afterwards (reports, plots, PEFT export)."""
