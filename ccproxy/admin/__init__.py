"""The operator's side of the daemon (docs/incident-response.md): the admin socket that
`ccproxy security ...` talks to (`server`, `cli`), the incident state it keeps (`state`: blocks and
emergency mode), emergency mode on the request path (`emergency`), the HTTP layer's refusals
counted towards auto-blocking (`refusals`), and `service.start`, which sets it all up."""
