"""One process-wide budget for bytes held in memory on behalf of clients (request bodies, and
response bodies buffered whole for masking).

Each connection may hold up to `max_request_size` of body, and there may be `max_connections` of
them: without a shared budget the product, not the machine, bounds memory. Whoever buffers asks
first (`acquire`), and gives back (`release`) when the bytes are let go; a refusal is answered
`503 overloaded_error` with `retry-after`, before the bytes are read. The limit is
`security.ddos_protection.max_buffered_bytes`.
"""

from __future__ import annotations

from collections.abc import Callable


class Budget:
    """Bytes buffered now across every connection, against a limit read from the live config."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self.used = 0
        # Refusals since start, for benches and tests.
        self.refused = 0

    def acquire(self, size: int) -> bool:
        """Take `size` bytes of the budget; False (and nothing taken) if that would pass the limit."""
        if size and self.used + size > self.limit():
            self.refused += 1
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used = max(0, self.used - size)
