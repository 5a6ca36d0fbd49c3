"""From a checkpoint directory to tensors on a device: safetensors, compressed-tensors, the tiny
test checkpoint, and the loader that builds a rank's model."""
