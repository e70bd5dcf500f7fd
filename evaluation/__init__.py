"""Evaluation of a trained run on a test set.

metrics.py    image and pixel AUROC, AUPRO, pixel AP, F1-max, thresholds (scikit-learn, scikit-image)
evaluate.py   `diffad evaluate`: inference over the test set, the metrics, per defect type, calibration
"""
