"""Route dependencies: the app's shared objects (set by create_app) and the API-key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from .metrics import ServiceMetrics
from .models import ModelRegistry
from .settings import Settings

API_KEY_HEADER = "X-API-Key"
_api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="one of DIFFAD_API_KEYS")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]


def api_key_accepted(settings: Settings, api_key: str | None) -> bool:
    """True when no keys are configured or api_key is one of them."""
    if not settings.api_keys:
        return True
    given = (api_key or "").encode()
    # Compare with every key, in constant time each, so timing tells nothing about which or how close.
    matched = False
    for key in settings.api_keys:
        matched |= hmac.compare_digest(given, key.get_secret_value().encode())
    return matched


def require_api_key(settings: SettingsDep, api_key: Annotated[str | None, Security(_api_key_header)]) -> None:
    """401 unless the X-API-Key header holds one of the configured keys (no keys: open)."""
    if not api_key_accepted(settings, api_key):
        raise HTTPException(401, f"missing or invalid {API_KEY_HEADER} header",
                            headers={"WWW-Authenticate": API_KEY_HEADER})
