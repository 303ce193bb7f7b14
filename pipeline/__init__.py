"""gradbench: see, measure and fix vanishing and exploding gradients in deep MLPs on MNIST."""

__version__ = "0.1.0"
