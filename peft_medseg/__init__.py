"""peft_medseg: visual prompt tuning for multi-center medical image segmentation, as a PEFT method."""
