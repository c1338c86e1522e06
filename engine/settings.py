"""EngineConfig read from arguments and BENTO_LLM_* environment variables, with pydantic-settings.

The settings model is built from EngineConfig's own fields, so every engine setting is also an
environment variable and a server argument (`bentoml serve --arg NAME=VALUE`) with no second list
to keep in step: pydantic coerces each value to the field's type (strings from the environment
and from --arg alike) and EngineConfig.__post_init__ checks the ranges. Sizes are pydantic's
ByteSize ("2GiB", "512MB" or a byte count). The server adds its own fields in bento_llm/settings.py.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Annotated, Any

from pydantic import AliasChoices, BeforeValidator, ByteSize, Field, TypeAdapter, ValidationError, create_model
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.config import EngineConfig

ENV_PREFIX = "BENTO_LLM_"
_BYTES = TypeAdapter(ByteSize)


def _gib(value: Any) -> Any:
    """swap_space is in GiB as in vLLM ("4"); a size with a unit ("512MiB") also works."""
    if isinstance(value, str) and re.search(r"[A-Za-z]", value):
        return _BYTES.validate_python(value) / 2**30
    return value


def _names(*names: str) -> AliasChoices:
    # An alias replaces the field's own name and its BENTO_LLM_ variable: list both spellings.
    return AliasChoices(*names, *(ENV_PREFIX + name.upper() for name in names))


# Fields whose type or names differ from EngineConfig's annotation.
_SPECIAL: dict[str, tuple[Any, Any]] = {
    # "2GiB" as well as a byte count; `kv_cache_memory` is the server's older name for it.
    "kv_cache_memory_bytes": (ByteSize | None, Field(None, validation_alias=_names("kv_cache_memory_bytes", "kv_cache_memory"))),
    "swap_space": (Annotated[float, BeforeValidator(_gib)], EngineConfig.swap_space),
}


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", protected_namespaces=(), populate_by_name=True)

    def engine_config(self, **overrides: Any) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        values = {name: int(v) if isinstance(v := getattr(self, name), ByteSize) else v for name in names}
        return EngineConfig(**{**values, **overrides})


def _engine_fields() -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(EngineConfig)
    return {f.name: _SPECIAL.get(f.name, (hints[f.name], f.default)) for f in dataclasses.fields(EngineConfig)}


EngineSettings = create_model("EngineSettings", __base__=_Base, __doc__="Every EngineConfig field as a setting.", **_engine_fields())


def settings_error(e: ValidationError) -> ValueError:
    """One line per bad setting, naming it the way the user gives it."""
    problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})" for err in e.errors())
    return ValueError(f"invalid bento-llm settings (--arg NAME=VALUE or {ENV_PREFIX}NAME): {problems}")


def engine_config_from_env(**overrides: Any) -> EngineConfig:
    """EngineConfig from BENTO_LLM_<NAME> environment variables, explicit overrides winning (the
    offline API's way to read the server's variables)."""
    try:
        return EngineSettings(**{k: v for k, v in overrides.items() if v is not None}).engine_config()
    except ValidationError as e:
        raise settings_error(e) from None
