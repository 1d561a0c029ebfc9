"""The one interface every semantic-ID tokenizer implements.

RQ-KMeans, RQ-VAE, MM-RQ-VAE and MMQ are :class:`Tokenizer` modules, so the
training stage, the benchmarks and the tests drive them alike:

* :meth:`~Tokenizer.fit` on the fit items (k-means initialisation, then the
  learned methods' epochs); :meth:`~Tokenizer.init_codebooks` alone is the
  k-means part;
* :meth:`~Tokenizer.encode` items to SIDs [N, P], batch by batch and
  nearest-code, so an item's SID never depends on the other items;
* :meth:`~Tokenizer.decode` SIDs back to the input space, and
  :meth:`~Tokenizer.reconstruct` items through their SIDs;
* :meth:`~Tokenizer.metrics`: the mean of every loss term of the method
  (:meth:`forward` returns them as the 0-d tensor fields of a NamedTuple,
  ``loss`` among them);
* what a published version keeps: :attr:`~Tokenizer.codebooks` (one [K, d]
  per SID position, used to initialise the ranker's SID tables),
  :meth:`~Tokenizer.position_names` and :meth:`~Tokenizer.settings`.

The interface is generic in what a method reads, ``X``
(:data:`tokenizer.inputs.Items`): one matrix [N, D] for the single-input
methods (``Tokenizer[Tensor]``), name -> [N, D_m] for the multimodal ones
(``Tokenizer[Mapping[str, Tensor]]``); reconstructions come back in the same form.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from tokenizer.defaults import BATCH_SIZE, ENCODE_BATCH_SIZE, EPOCHS, LR
from tokenizer.inputs import Items, n_rows, take
from tokenizer.quantizer import ResidualQuantizer

X = TypeVar("X", bound=Items)  # what a tokenizer reads: [N, D] or name -> [N, D_m]


def scalar_terms(out: NamedTuple) -> dict[str, Tensor]:
    """The 0-d tensor fields of a forward output: the loss terms, ``loss`` among them."""
    return {k: v for k, v in out._asdict().items() if isinstance(v, Tensor) and v.ndim == 0}


class Tokenizer(nn.Module, ABC, Generic[X]):
    """A semantic-ID tokenizer: items ``X`` -> P codes in [0, K) -> reconstructions ``X``.

    Shapes: inputs [N, D] or name -> [N, D_m] (:data:`~tokenizer.inputs.Items`),
    codes [N, P] int64, codebooks P x [K, d].
    """

    # what each method implements

    @abstractmethod
    def quantizers(self) -> list[ResidualQuantizer]:
        """The residual quantizers whose levels are the SID positions, in SID order."""

    @abstractmethod
    def check_inputs(self, x: X) -> X:
        """``x`` as this tokenizer reads it (float32); DataError when it does not fit the model."""

    @abstractmethod
    def init_codebooks(self, x: X, *, seed: int = 0) -> None:
        """k-means initialise every codebook on ``x`` (for RQ-KMeans the whole fit)."""

    @abstractmethod
    def fit(
        self, x: X, *, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LR, seed: int = 0
    ) -> list[float]:
        """Fit on ``x``; returns the mean loss of each epoch (RQ-KMeans: one, its reconstruction error)."""

    @abstractmethod
    def encode(self, x: X, *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
        """SIDs [N, P] int64 of ``x``, ``batch_size`` items at a time."""

    @abstractmethod
    def decode(self, codes: Tensor) -> X:
        """Reconstruction of SIDs ``codes`` [N, P], in the form of the inputs."""

    @abstractmethod
    def forward(self, x: X) -> NamedTuple:
        """Loss terms of a batch (the 0-d tensor fields, ``loss`` the optimised total)."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-ready settings that rebuild this model (saved in a version's config.json)."""

    # shared by every method

    @property
    def codebooks(self) -> list[Tensor]:
        """One [K, d] codebook per SID position, in SID order (detached views of the parameters)."""
        return [rq.codebooks[level].detach() for rq in self.quantizers() for level in range(rq.levels)]

    @property
    def codebook_size(self) -> int:
        """K, codes per position."""
        return self.quantizers()[0].codebook_size

    @property
    def n_positions(self) -> int:
        """P, code positions per SID."""
        return sum(rq.levels for rq in self.quantizers())

    def position_names(self) -> list[str]:
        """Human name of each SID position in SID order (``level0``, ``level1``, ...)."""
        return [f"level{p}" for p in range(self.n_positions)]

    def reconstruct(self, x: X) -> X:
        """``x`` through its SIDs: :meth:`decode` of :meth:`encode`."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def metrics(self, x: X, *, batch_size: int = ENCODE_BATCH_SIZE) -> dict[str, float]:
        """Mean over the items of ``x`` of every loss term of :meth:`forward`, in eval mode (no
        usage tracking or dead-code resets) and batches of ``batch_size`` items, in order (so
        batch-level terms such as MMD see training-sized batches)."""
        x = self.check_inputs(x)
        n, sums = n_rows(x), dict[str, float]()
        was_training = self.training
        self.eval()
        try:
            for batch in torch.arange(n).split(batch_size):
                for key, value in scalar_terms(self(take(x, batch))).items():
                    sums[key] = sums.get(key, 0.0) + value.item() * len(batch)
        finally:
            self.train(was_training)
        return {key: value / n for key, value in sums.items()}
