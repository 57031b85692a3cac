"""Offline jobs that make models: recipes, training, folds, the LR range test, the study, the
label audit."""
