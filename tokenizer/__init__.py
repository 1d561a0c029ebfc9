"""Semantic-ID tokenizers: item content -> P discrete codes per item (its SID).

Methods (:data:`tokenizer.methods.METHODS`), each a :class:`tokenizer.interface.Tokenizer`:

* ``rqkmeans``: residual k-means on the concatenated modalities (:mod:`tokenizer.rqkmeans`);
* ``rqvae``: RQ-VAE, encoder -> residual quantizer -> decoder (:mod:`tokenizer.rqvae`);
* ``mm_rqvae``: MM-RQ-VAE, one RQ-VAE per modality (:mod:`tokenizer.mm_rqvae`);
* ``mmq``: MMQ, shared and modality-specific experts (:mod:`tokenizer.mmq`), and its
  behaviour-aware fine-tuning (:mod:`tokenizer.finetune`).

Building blocks: :mod:`tokenizer.quantizer` (the residual quantizer),
:mod:`tokenizer.settings` (the setting groups, one declaration per default),
:mod:`tokenizer.fitting` (the one training loop), :mod:`tokenizer.metrics`,
:mod:`tokenizer.versions` (publishing a SID version). Stages:
``python -m tokenizer.modalities``, ``python -m tokenizer.train``,
``python -m tokenizer.finetune``.
"""
