"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

The binaries come from `make control-plane` (scripts/build-control-plane.sh); this package finds them,
makes the certificates, starts the processes on free loopback ports and writes an admin kubeconfig. The test
suite starts one per session; the sandbox reuses it.
"""

from .binaries import BinariesMissing, ControlPlaneBinaries, find_binaries
from .cluster import ControlPlane, ControlPlaneError

__all__ = ["BinariesMissing", "ControlPlane", "ControlPlaneBinaries", "ControlPlaneError", "find_binaries"]
