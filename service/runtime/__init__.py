"""The training runtime: one Ray job per training job (``python -m zerotrain.service.runtime``)."""
