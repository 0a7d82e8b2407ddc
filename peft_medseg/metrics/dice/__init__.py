"""The `dice` evaluate module: load it with `peft_medseg.metrics.load_metric("dice")`; a package so wheels ship it."""
