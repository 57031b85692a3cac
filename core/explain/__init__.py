"""Heatmaps: class activation maps, their overlays, and where the stained parasite is."""
