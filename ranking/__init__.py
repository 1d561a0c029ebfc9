"""TorchRec DLRM ranker: batches from Feast rows, model, torchrun trainer, metrics."""
