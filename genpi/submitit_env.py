"""Lightning's view of the ranks submitit's local executor starts (one task per rank), used by
:func:`genpi.launching.cluster_plugins`. A module of its own so that importing :mod:`genpi.launching` (every entry
point does, before its config is checked) does not import Lightning."""

from __future__ import annotations

import os

from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.plugins.environments import ClusterEnvironment

from genpi.launching import _submitit_local
from genpi.utils.errors import GenpiError


class SubmititLocalEnvironment(ClusterEnvironment):
    """The ranks of a job run by submitit's local executor: one task per rank, all started by submitit."""

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return os.environ.get("MASTER_ADDR", "127.0.0.1")

    @property
    def main_port(self) -> int:
        # every task of a job must agree on the port without talking: derive it from the job id (the pid of
        # submitit's controller, distinct for jobs that run at the same time), as Lightning does for Slurm
        if os.environ.get("MASTER_PORT", "").isdigit():
            return int(os.environ["MASTER_PORT"])
        return 20000 + int(os.environ.get("SUBMITIT_LOCAL_JOB_ID", "0")) % 20000

    @staticmethod
    def detect() -> bool:
        return _submitit_local()

    def world_size(self) -> int:
        tasks, nodes = os.environ.get("SUBMITIT_LOCAL_NTASKS", "1"), os.environ.get("SUBMITIT_LOCAL_JOB_NUM_NODES", "1")
        return int(tasks) * int(nodes)

    def set_world_size(self, size: int) -> None:
        pass  # fixed by the launcher

    def global_rank(self) -> int:
        return int(os.environ.get("SUBMITIT_LOCAL_GLOBALID", "0"))

    def set_global_rank(self, rank: int) -> None:
        rank_zero_only.rank = self.global_rank()

    def local_rank(self) -> int:
        return int(os.environ.get("SUBMITIT_LOCAL_LOCALID", "0"))

    def node_rank(self) -> int:
        return int(os.environ.get("SUBMITIT_LOCAL_NODEID", "0"))

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        if num_devices * num_nodes != self.world_size():
            raise GenpiError(f"trainer.devices x trainer.num_nodes = {num_devices * num_nodes} ranks, but submitit "
                             f"started {self.world_size()} task(s): set hydra.launcher.tasks_per_node to "
                             "trainer.devices")
