"""Synthetic data for offline runs: the generated mini-VTAB tasks (`minivtab`) and the small upstream
ViT pretrained on them once (`upstream`), used by the demo, the tests and the fidelity study."""
