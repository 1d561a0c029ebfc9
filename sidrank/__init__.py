"""Shared base of sidrank: atomic IO, schema checks, the cross-stage contract, the protocol and the metrics.

Every stage imports this package; it imports no stage.
"""
