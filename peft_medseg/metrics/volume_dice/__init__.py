"""The `volume_dice` evaluate module: load it with `peft_medseg.metrics.load_metric("volume_dice")`; a package so wheels ship it."""
