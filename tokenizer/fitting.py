"""The one training loop: fixed epochs of Adam steps over a seeded random order.

:func:`run_epochs` is the loop itself (batches, the mean of every loss term
per epoch, a progress bar and a hook after each epoch); it trains the
learned tokenizers through :class:`LearnedTokenizer` and MMQ's stage-2
fine-tuning (:mod:`tokenizer.click_model`). :class:`LearnedTokenizer` is the
part of the :class:`~tokenizer.interface.Tokenizer` interface that RQ-VAE,
MM-RQ-VAE and MMQ share: ``fit`` = k-means initialisation of the codebooks,
then :meth:`~LearnedTokenizer.train_epochs`, which logs the loss terms and
the codebook usage about ten times per run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from tqdm import tqdm

from tokenizer.defaults import BATCH_SIZE, EPOCHS, LR
from tokenizer.inputs import n_rows, take
from tokenizer.interface import Tokenizer, X, scalar_terms
from tokenizer.metrics import level_usage

logger = logging.getLogger(__name__)

EpochHook = Callable[[int, dict[str, float]], Mapping[str, float] | None]


def run_epochs(
    step: Callable[[Tensor], Mapping[str, Tensor]],
    n: int,
    parameters: Iterable[nn.Parameter],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str,
    after_epoch: EpochHook | None = None,
) -> list[dict[str, float]]:
    """Train with Adam for ``epochs`` passes over ``n`` examples; returns one record per epoch.

    Args:
        step: positions [B] of a batch -> its 0-d loss terms; ``"loss"`` is
            the one optimised (it carries the gradient).
        n: examples per epoch.
        parameters: what Adam updates.
        epochs: passes, each over the examples in a fresh random order.
        batch_size: examples per step (the last batch of an epoch may be smaller).
        lr: Adam learning rate.
        seed: seed of the example order (its own generator: the global RNG
            is left to the models, e.g. for dead-code resets).
        desc: progress bar label.
        after_epoch: ``(epoch, means) -> extra figures or None``, called after
            each epoch; what it returns joins that epoch's record.

    Returns:
        Per epoch, the mean over examples of each loss term, plus the hook's figures.
    """
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    history: list[dict[str, float]] = []
    bar = tqdm(range(epochs), desc=desc, unit="epoch")
    for epoch in bar:
        sums: dict[str, float] = {}
        for batch in torch.randperm(n, generator=gen).split(batch_size):
            terms = step(batch)
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value.item() * len(batch)
        record = {key: value / n for key, value in sums.items()}
        extra = after_epoch(epoch, record) if after_epoch else None
        record.update(extra or {})
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
    return history


class LearnedTokenizer(Tokenizer[X]):
    """A tokenizer trained by gradient steps after its k-means initialisation (RQ-VAE, MM-RQ-VAE, MMQ).

    Attributes:
        history: per epoch of the last :meth:`train_epochs`, the mean of every loss term.
    """

    history: list[dict[str, float]]

    def fit(
        self, x: X, *, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LR, seed: int = 0
    ) -> list[float]:
        """:meth:`init_codebooks`, then :meth:`train_epochs`; returns the mean loss of each epoch."""
        self.init_codebooks(x, seed=seed)
        return self.train_epochs(x, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)

    def train_epochs(
        self, x: X, *, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LR, seed: int = 0
    ) -> list[float]:
        """Train on ``x`` with Adam from the current codebooks; returns the mean loss of each epoch
        (every loss term per epoch is kept in :attr:`history`). Ends in eval mode."""
        x = self.check_inputs(x)
        name = type(self).__name__
        log_every = max(1, epochs // 10)

        def log_progress(epoch: int, means: dict[str, float]) -> None:
            # the quantization terms grow with the latent's spread while reconstruction
            # keeps falling, so every term is logged, and the codebook usage beside them
            if (epoch + 1) % log_every == 0 or epoch == epochs - 1:
                usage = level_usage(self.encode(x).cpu().numpy(), self.codebook_size)
                terms = " ".join(f"{k} {v:.4f}" for k, v in means.items())
                logger.info("%s epoch %d/%d %s usage %s", name, epoch + 1, epochs, terms, "/".join(f"{u:.2f}" for u in usage))

        self.train()
        self.history = run_epochs(
            lambda batch: scalar_terms(self(take(x, batch))),
            n_rows(x),
            self.parameters(),
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            desc=name,
            after_epoch=log_progress,
        )
        self.eval()
        return [record["loss"] for record in self.history]
