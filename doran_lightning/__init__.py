"""doran_lightning: LoRA, DoRA and DoRAN fine-tuning with PyTorch Lightning."""

__version__ = "0.1.0"
