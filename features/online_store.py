"""Feast's sqlite online store, touching only the database of the repository it serves.

Feast's stock ``sqlite`` store records every table in the registry as "infra"
together with the *absolute* path of its database file, and ``feast apply``
diffs that record against the new plan: a recorded table whose path differs
counts as changed and is torn down (``DROP TABLE``) at the recorded path. A
copied repository carries its original's record in ``data/registry.db``, so
applying the copy dropped every online table of the original
(tests/test_feature_repo.py applies one copy and reads the other back).

This store records no infra objects. Feast then applies through the
provider's ``update``, which creates and drops tables in the database that
this repository's ``feature_store.yaml`` names (a relative path taken from the
repository folder, as the stock store does), and nowhere else. Reads, writes
and ``feast teardown`` are the stock store's.

Selected in ``feature_repo/feature_store.yaml``::

    online_store:
        type: features.online_store.RepoSqliteOnlineStore
        path: data/online_store.db
"""

from __future__ import annotations

from typing import Literal

from feast.infra.infra_object import InfraObject
from feast.infra.online_stores.sqlite import SqliteOnlineStore, SqliteOnlineStoreConfig
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
from feast.repo_config import RepoConfig

STORE_TYPE = "features.online_store.RepoSqliteOnlineStore"


class RepoSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    """The stock sqlite options (``path`` relative to the repository or absolute)."""

    type: Literal["features.online_store.RepoSqliteOnlineStore"] = STORE_TYPE


class RepoSqliteOnlineStore(SqliteOnlineStore):
    """Sqlite online store whose tables are managed through the configured path only (see module doc)."""

    def plan(self, config: RepoConfig, desired_registry_proto: RegistryProto) -> list[InfraObject]:
        # No infra record: nothing in the registry can later name another copy's database file.
        return []
