"""MedFedPure training side: data, models, diffusion, objectives, one training loop."""

__version__ = "0.1.0"
