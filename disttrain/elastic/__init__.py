"""Elastic membership: the coordinator (control plane), the worker agent, and group rebuilds."""
