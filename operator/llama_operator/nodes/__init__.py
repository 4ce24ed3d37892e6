"""Real Kubernetes nodes on this machine (issue #19): containerd, the kubelet, kube-proxy and the cluster add-ons,
from the node kit (`make node-kit`), for the sandbox and the e2e tests."""
