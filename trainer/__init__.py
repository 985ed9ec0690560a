"""The trainer: mining, datasets, augmentation, training, evaluation. Runs beside the node, never inside it."""
