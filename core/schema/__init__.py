"""The bottom layer: what a model card, a result row and a label are; metrics. No PyTorch."""
