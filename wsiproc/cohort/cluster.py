"""Where the tiles are computed: this process (threads), a local dask cluster, or an existing one.

`--scheduler local` starts a `LocalCluster` of worker processes bound to 127.0.0.1 (no dashboard, nothing
listening beyond this machine); `--scheduler tcp://host:8786` joins a cluster that is already running,
e.g. one started with dask-jobqueue on SLURM. Without it, tiles run in threads of this process.

Workers load TensorFlow as quietly as the CLI's own process does (`wsiproc._tensorflow`): the hook is installed on
every worker of the cluster, also those that join later, by a worker plugin registered with the client.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from .. import _tensorflow


@contextlib.contextmanager
def dask_client(scheduler: str | None, n_workers: int = 2, threads_per_worker: int = 1) -> Iterator[object | None]:
    if not scheduler:
        yield None
        return
    from distributed import Client, LocalCluster  # lazy: dask.distributed takes a second to import; only --scheduler needs it

    if scheduler == "local":
        with LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                          host="127.0.0.1", dashboard_address=None) as cluster, Client(cluster) as client:
            client.register_plugin(quiet_tensorflow_plugin())
            yield client
        return
    with Client(scheduler) as client:
        client.register_plugin(quiet_tensorflow_plugin())
        yield client


def quiet_tensorflow_plugin():
    """A dask worker plugin that installs `wsiproc._tensorflow`'s hook in each worker process as it starts (or at
    once, on the workers already running).

    The class is made here, not at module level, because it subclasses distributed's `WorkerPlugin` and this module
    must not import distributed on its own; the client ships it to the workers by value (cloudpickle)."""
    from distributed.diagnostics.plugin import WorkerPlugin  # lazy: dask.distributed takes a second to import

    class QuietTensorFlow(WorkerPlugin):
        name = "wsiproc-quiet-tensorflow"
        idempotent = True  # one per worker, however many clients register it

        def setup(self, worker) -> None:
            _tensorflow.install()

    return QuietTensorFlow()
