"""Training on good images only.

data.py        the MVTec layout: train, validation and test images, masks, reading and resizing (no torch)
synthesis.py   synthetic anomalies made offline: Perlin regions, sources, foreground estimation (no torch)
trainer.py     `diffad train`: crops, precision, EMA, the validation signal and what it chooses
demo_data.py   a synthetic woven-texture category for the demo and the tests (no torch)
"""
