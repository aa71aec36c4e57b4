"""A batch client for the gateway: stream images through one WebSocket, write each result once.

``latent-upscaler upscale`` (:mod:`gateway.cli_upscale`) is its command line. The parts:

- :mod:`client.inputs`: INPUT arguments → a lazy stream of :class:`~client.inputs.Job`
  (folders walked as they are consumed, stdin read line by line) and where each output goes;
- :mod:`client.files`: reading an input for sending, writing an output atomically;
- :mod:`client.stream`: :class:`~client.stream.BatchClient`, the protocol side (window,
  resume, getResponse, retries), exactly one outcome per job;
- :mod:`client.report`: the progress bar, ``--json`` lines and the closing summary.

It speaks only the wire protocol (PROTOCOL.md): it imports nothing from ``engine`` or
``gateway``, so it works against any server or cluster that speaks it.
"""
