"""Periodic TensorFlow retraining, the evaluation gate, model specs and the versioned model registry writer."""
