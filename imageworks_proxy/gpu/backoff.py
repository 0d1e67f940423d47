"""Start-failure backoff: a tenant that failed to start is not relaunched in a tight loop."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from imageworks_proxy.errors import ProxyError
from imageworks_proxy.gpu.tenancy import Tenant

_MAX_BACKOFF_FACTOR = 32


@attrs.define
class _Failure:
    at: float
    count: int
    error: ProxyError
    revision: str | None


class StartBackoff:
    """Remembers each tenant's last start failure; the wait doubles per consecutive failure (up to 32×
    ``backoff_s``) and is forgotten when the tenant's registry ``revision`` changes or a start succeeds."""

    def __init__(self, backoff_s: float, clock: Callable[[], float]) -> None:
        self.backoff_s = backoff_s
        self._clock = clock
        self._failures: dict[str, _Failure] = {}

    def record(self, tenant: Tenant, error: ProxyError) -> None:
        prev = self._failures.get(tenant.key)
        count = prev.count + 1 if prev is not None and prev.revision == tenant.revision else 1
        self._failures[tenant.key] = _Failure(self._clock(), count, error, tenant.revision)

    def clear(self, key: str) -> None:
        self._failures.pop(key, None)

    def error_for(self, tenant: Tenant) -> ProxyError | None:
        """The error to answer with while ``tenant`` is backing off, else ``None`` (it may start)."""
        f = self._failures.get(tenant.key)
        if f is None:
            return None
        if f.revision != tenant.revision:
            self._failures.pop(tenant.key, None)
            return None
        wait = self.backoff_s * min(2 ** (f.count - 1), _MAX_BACKOFF_FACTOR)
        left = f.at + wait - self._clock()
        if left <= 0:
            return None
        e = f.error
        return ProxyError(
            e.status,
            e.code,
            f"{e.message} (not retried for another {left:.0f}s after {f.count} failed start(s))",
            hint=e.hint,
            headers={**e.headers, "Retry-After": str(max(1, round(left)))},
        )
