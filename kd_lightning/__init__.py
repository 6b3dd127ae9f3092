"""kd-lightning: a PyTorch Lightning research template for knowledge distillation."""

__version__ = "0.1.0"
