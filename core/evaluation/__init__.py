"""Offline checks of a model: gate calibration, int8 agreement, heatmap and smear checks,
the report."""
