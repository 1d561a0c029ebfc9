"""Dataset ingestion, modality embedding and causal behaviour-feature pipelines."""
