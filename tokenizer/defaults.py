"""The tokenizers' shared default values, one name each.

The setting groups of :mod:`tokenizer.settings` (which the command line, the
model classes and their configs all read) and the fit signatures take their
defaults from these names, so a model built in Python without options is the
model the CLI builds. Settings of one method only (MM-RQ-VAE's loss weights,
MMQ's experts) keep their defaults in that method's setting group.
"""

from __future__ import annotations

LEVELS = 3  # P, code positions per SID (residual levels of RQ-KMeans / RQ-VAE)
# K = 64 on MovieLens-100K keeps every level fully used and the full-code
# collision rate near 4% (K = 32 collides ~20% of the 1682 items).
CODEBOOK_SIZE = 64
LATENT_DIM = 32  # latent and codeword width of the learned tokenizers
HIDDEN_DIMS = (256, 128)  # encoder hidden widths; decoders mirror them
BETA = 0.25  # commitment weight (VQ-VAE)
KMEANS_ITERS = 50  # Lloyd iterations per level: RQ-KMeans fit and codebook init
DEAD_CODE_WINDOW = 50  # training steps between dead-code resets (0 = never)
EPOCHS = 200
BATCH_SIZE = 256  # training batch size of the learned tokenizers
LR = 1e-3  # Adam
# Items per encode batch: bounds encode memory at batch x (widest layer + K)
# floats whatever the number of items, and a batch's residuals stay in cache
# through every level; benchmarks/tokenizer_speed.py times 256 and 8192 beside it.
ENCODE_BATCH_SIZE = 1024
