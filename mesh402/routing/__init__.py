"""Pure request routing: classification (classify.py), model scoring (models.py), and the
choice of a replica within a model (affinity.py). No I/O: callers pass typed snapshots."""
