"""Real Kubernetes nodes on this machine (issue #19): containerd, the kubelet, kube-proxy and the cluster add-ons,
from the node kit (`make node-kit`), for the sandbox and the e2e tests. `RealNodes` (cluster.py) is the entry;
docs/real-nodes.md says how it is used and what it measured."""

from .cluster import RealNodes
from .kit import KitMissing, NodeKit, find_kit
from .processes import NodesError

__all__ = ["KitMissing", "NodeKit", "NodesError", "RealNodes", "find_kit"]
