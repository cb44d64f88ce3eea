"""Local training: the federated ``Client`` and the trainers it runs on its data (by gradient,
black-box by CMA-ES or SPSA, ATPFL's contrastive objective), with batching, image augmentation
and the device every client uses."""
