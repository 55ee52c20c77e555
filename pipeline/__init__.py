"""Training pipeline package: data, model and DeepSpeed training code."""
