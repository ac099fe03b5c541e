"""Fixtures every test folder can use: the real PostgreSQL and Redis servers (see tests/services.py)."""

from tests.services import pg_url, redis_url

__all__ = ["pg_url", "redis_url"]
