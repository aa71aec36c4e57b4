"""Cluster mode: N gateways and M workers coordinated through Redis (see CLUSTER.md).

``roles.py`` runs a role (``latent-upscaler gateway`` / ``worker``); ``keys.py`` names
every key; ``scripts.py`` holds the atomic steps; ``link.py`` is a process's Redis
connection; ``state.py``, ``images.py`` and ``queue.py`` are the Redis implementations
of the gateway's state, image store and engine client; ``worker.py`` pulls work into
an engine; ``webhooks.py`` posts webhooks from their durable queue.
"""
