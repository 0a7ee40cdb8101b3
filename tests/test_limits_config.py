"""`security.rate_limiting`, `security.ip_blacklist.auto_block` and `state:` as the config accepts them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ccproxy.config import ConfigError, parse
from ccproxy.config.limits import FAIL_CLOSED, REDIS, TierLimits, WindowLimits

ROOT = Path(__file__).resolve().parents[1]

SEED = {
    "enabled": True,
    "global": {"requests_per_minute": 6000, "requests_per_hour": 100000, "burst": 100},
    "per_ip": {"requests_per_minute": 60, "requests_per_hour": 1000, "burst": 10},
    "per_key": {
        "default": {"requests_per_minute": 100, "daily_quota": 10000},
        "premium": {"requests_per_minute": 1000, "daily_quota": 100000},
    },
}


def config(security: dict[str, Any] | None = None, state: dict[str, Any] | None = None) -> Any:
    data: dict[str, Any] = {"server": {"tls": {"enabled": False}}, "security": security or {}}
    if state is not None:
        data["state"] = state
    return parse(data).limits


def refused(security: dict[str, Any] | None = None, state: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        config(security, state)
    return str(caught.value)


def test_seed_keys_are_accepted() -> None:
    limits = config({"rate_limiting": SEED,
                     "ip_blacklist": {"enabled": False, "auto_block": {"enabled": True, "threshold": 100,
                                                                       "duration": "1h"}}})
    assert limits.enabled
    assert limits.global_ == WindowLimits(6000, 100000, 100)
    assert limits.per_ip == WindowLimits(60, 1000, 10)
    assert limits.per_key == (TierLimits("default", 100, 10000), TierLimits("premium", 1000, 100000))
    assert (limits.auto_block.enabled, limits.auto_block.threshold, limits.auto_block.duration) == (True, 100, 3600.0)
    assert limits.daily_reset == 0.0
    assert limits.state.backend == "memory"


def test_defaults_are_off() -> None:
    limits = config()
    assert not limits.enabled and not limits.auto_block.enabled and not limits.active


def test_redis_state_and_secret_url() -> None:
    limits = config({"rate_limiting": SEED},
                    {"backend": "redis", "redis": {"url": "redis://:s3cret-pass@10.0.0.5:6380/2", "timeout": "20ms",
                                                   "on_error": "fail_closed"}})
    redis = limits.state.redis
    assert limits.state.backend == REDIS
    assert (redis.host, redis.port, redis.db, redis.timeout, redis.on_error) == ("10.0.0.5", 6380, 2, 0.02, FAIL_CLOSED)
    assert redis.password is not None and redis.password.reveal() == "s3cret-pass"
    assert "s3cret" not in repr(limits)


@pytest.mark.parametrize(
    ("security", "state", "message"),
    [
        ({"rate_limiting": {"per_ip": {"requests_per_minute": 0}}}, None,
         "security.rate_limiting.per_ip.requests_per_minute: must be at least 1"),
        ({"rate_limiting": {"per_ip": {"burst": 5}}}, None,
         "security.rate_limiting.per_ip: give requests_per_minute, requests_per_hour or both"),
        ({"rate_limiting": {"per_ip": {"requests_per_minute": 5, "brust": 2}}}, None, "did you mean burst?"),
        ({"rate_limiting": {"per_key": {"default": {"daily_quota": "many"}}}}, None,
         "security.rate_limiting.per_key.default.daily_quota: expected an integer"),
        ({"rate_limiting": {"daily_reset": "24:00"}}, None, "security.rate_limiting.daily_reset: expected a UTC time"),
        ({"ip_blacklist": {"enabled": False, "auto_block": {"threshold": 0}}}, None,
         "security.ip_blacklist.auto_block.threshold: must be at least 1"),
        (None, {"backend": "etcd"}, "state.backend: must be one of memory, redis"),
        (None, {"backend": "redis", "redis": {"url": "http://x"}}, "state.redis.url: expected redis://"),
        (None, {"backend": "redis", "redis": {"on_error": "retry"}}, "state.redis.on_error: must be one of"),
        (None, {"backend": "redis", "redis": {"timeout": "1h"}}, "state.redis.timeout: must be at most"),
    ],
)
def test_faults_name_their_path(security: Any, state: Any, message: str) -> None:
    assert message in refused(security, state)


def test_a_secret_in_the_redis_url_never_reaches_an_error() -> None:
    message = refused(None, {"backend": "redis", "redis": {"url": "redis://:hunter2-secret@host:99999/0"}})
    assert "hunter2" not in message and "state.redis.url" in message


def test_daily_reset_time() -> None:
    assert config({"rate_limiting": {"daily_reset": "07:30", **SEED}}).daily_reset == 7.5 * 3600


def test_shipped_example_config_is_valid() -> None:
    result = subprocess.run([sys.executable, "-m", "ccproxy.cli", "check-config", "etc/ccproxy/config.yaml"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "per_ip" in result.stdout and "auto_block" in result.stdout


def test_shipped_example_config_has_no_repeated_keys() -> None:
    """PyYAML keeps the last of two equal keys silently: a second `security:` would drop the first."""
    import yaml

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader: Strict, node: yaml.MappingNode) -> dict[Any, Any]:
        keys = [loader.construct_object(k) for k, _ in node.value]
        repeated = {k for k in keys if keys.count(k) > 1}
        assert not repeated, f"repeated keys at line {node.start_mark.line + 1}: {repeated}"
        return loader.construct_mapping(node)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    data = yaml.load((ROOT / "etc/ccproxy/config.yaml").read_text(), Loader=Strict)  # Strict is a SafeLoader
    assert {"auth", "rate_limiting", "ip_blacklist"} <= set(data["security"])


def test_token_budgets_per_tier() -> None:
    limits = config({"rate_limiting": {"per_key": {"default": {"tokens_per_minute": 40000,
                                                               "daily_token_quota": 2000000}}}})
    tier = limits.tier("default")
    assert tier is not None and (tier.tokens_per_minute, tier.daily_token_quota) == (40000, 2000000)
    assert "security.rate_limiting.per_key.default.tokens_per_minute" in refused(
        {"rate_limiting": {"per_key": {"default": {"tokens_per_minute": 0}}}})
