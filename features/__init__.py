"""Feature stage: causal behaviour and static item/user features, the Feast publish step and the as-of offline store."""
