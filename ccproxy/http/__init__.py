"""The HTTP/1.1 engine: our own server side and upstream client.

- `http1`: sans-IO parsing and validation of heads and chunked bodies, for both directions.
- `server`: the hardened server-side channel, which reads each request whole before anything acts on it.
- `request`: the request object the resource receives, and the writer of its response.
- `client`: the upstream client and its connection pool.
- `sockets`: socket-level helpers (immediate sends, TCP_NODELAY, queued bytes).

Nothing here knows about policies: the channel is handed its resource through the site.
"""
