"""The official SDKs pointed at a running ccproxy, trusting the test CA."""

from __future__ import annotations

import importlib
import ssl
from typing import Any

import anthropic
import openai

# The SDKs moved from httpx to its fork httpx2; take whichever this SDK release uses.
try:
    _httpx: Any = importlib.import_module("httpx2")
except ImportError:  # pragma: no cover - older SDK releases
    _httpx = importlib.import_module("httpx")


def http_client(daemon: Any) -> Any:
    """The HTTP client the SDKs use (httpx or httpx2), trusting the test CA: for requests no SDK makes."""
    verify: Any = ssl.create_default_context(cafile=daemon.ca_file) if daemon.tls else False
    if daemon.tls and daemon.ca_file is None:
        verify = ssl.create_default_context()
        verify.check_hostname = False
        verify.verify_mode = ssl.CERT_NONE
    return _httpx.Client(verify=verify, timeout=30)


def anthropic_client(daemon: Any, api_key: str = "test-client-key", **kw: Any) -> anthropic.Anthropic:
    kw.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=daemon.url, api_key=api_key, http_client=http_client(daemon), **kw)


def openai_client(daemon: Any, api_key: str = "test-client-key", **kw: Any) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=daemon.url + "/openai/v1", api_key=api_key,
                         http_client=http_client(daemon), **kw)
