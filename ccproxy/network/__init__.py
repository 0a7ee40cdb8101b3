"""Connection-level hardening: what is decided before HTTP.

- `gate.Gate`: the accept gate (IP lists, auto-blocks, connection caps, optional PROXY protocol).
- `listener.listener_factory`: the listening side, outermost first: the gate, TLS, then the site with
  its HTTP/1.1 channel (`ccproxy.http.server`).
- `layer.NetworkLayer`: the policy layer that adds the configured security headers to every response.
- `addresses`: address parsing, networks and the trusted-proxy reading of X-Forwarded-For.
"""
