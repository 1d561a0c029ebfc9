"""Semantic-ID tokenizers: residual quantizer core, RQ-KMeans, RQ-VAE, metrics."""
