"""Shared base of sidrank: atomic IO, schema checks, the cross-stage contract and path resolver, the
evaluation protocols, the metrics, command lines from config dataclasses and the environment check.

Every stage imports this package; it imports no stage.
"""
