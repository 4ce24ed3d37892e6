"""Reconcile: observe the cluster, build the desired objects, apply them, and compute status."""
