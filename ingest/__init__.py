"""Ingest: raw datasets (MovieLens, GroupLens files, Amazon JSON, synthetic) to the events/items/users contract."""
