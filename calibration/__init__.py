"""Offline calibration: the `kvpress-calibrate` command and its per-method procedures."""
