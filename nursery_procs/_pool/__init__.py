"""Pools of children: prespawned ones handed out once (:func:`open_pool`), and
reusable workers for calls (:func:`open_worker_pool`)."""

from ._prespawn import Pool as Pool
from ._prespawn import open_pool as open_pool
from ._prespawn import pools_of as pools_of
from ._settings import PoolSettings as PoolSettings
from ._settings import PoolStatistics as PoolStatistics
from ._workers import WorkerPool as WorkerPool
from ._workers import open_worker_pool as open_worker_pool
