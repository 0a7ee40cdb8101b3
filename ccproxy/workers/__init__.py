"""More than one process on one listening socket: socket activation, handover, workers.

`activation` takes listening sockets from systemd (or from a predecessor) or binds one; `handover`
starts a successor that takes the socket over while this process drains; `supervisor` and `worker`
run `server.workers` processes on one socket.
"""
