"""The `hd95` evaluate module: load it with `peft_medseg.metrics.load_metric("hd95")`; a package so wheels ship it."""
