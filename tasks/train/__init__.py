"""Training: one loop (loop.py) that Phase I (pretrain), II (adapters) and III (estimator) drive."""
