# The Kubernetes release the project builds, in one place: sourced by scripts/build-control-plane.sh (the API
# server and friends) and scripts/build-node-kit.sh (kubelet, kube-proxy), so the control plane and the nodes can
# never report different versions. The wrapper module hack/control-plane/kubernetes/go.mod pins the same release.
# shellcheck shell=bash

KUBERNETES_VERSION=v1.35.4

# -ldflags that stamp KUBERNETES_VERSION into a command built from the wrapper module (a `go build` of a module
# dependency carries no version of its own: without them `--version` prints v0.0.0-master).
k8s_version_ldflags() {
  local minor=${KUBERNETES_VERSION#v1.}
  minor=${minor%%.*}
  echo "-X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION" \
    "-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor" \
    "-X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION" \
    "-X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
}
