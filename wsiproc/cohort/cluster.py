"""Where the tiles are computed: this process (threads), a local dask cluster, or an existing one.

`--scheduler local` starts a `LocalCluster` of worker processes bound to 127.0.0.1 (no dashboard, nothing
listening beyond this machine); `--scheduler tcp://host:8786` joins a cluster that is already running,
e.g. one started with dask-jobqueue on SLURM. Without it, tiles run in threads of this process.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def dask_client(scheduler: str | None, n_workers: int = 2, threads_per_worker: int = 1) -> Iterator[object | None]:
    if not scheduler:
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler == "local":
        with LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                          host="127.0.0.1", dashboard_address=None) as cluster, Client(cluster) as client:
            yield client
        return
    with Client(scheduler) as client:
        yield client
