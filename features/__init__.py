"""Feature stage: causal behaviour and static item/user features, the Feast publish step, the as-of
offline store and the online store."""
