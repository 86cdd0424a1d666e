"""JSON Schema of one line of ``benchmarks/results/e2e.jsonl``, and a small validator for it.

The runner validates every record before appending it, so a field that drifts from this schema
fails the smoke run instead of silently breaking the plots. The validator covers the keywords the
schema uses (type, enum, required, properties, additionalProperties, minimum, if/then) so no
extra package is needed; the tests also check the schema with ``jsonschema`` when it is installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RESULT_SCHEMA", "SCHEMA_VERSION", "SchemaError", "validate"]

SCHEMA_VERSION = 1

_NUMBER = {"type": "number", "minimum": 0}
_COUNT = {"type": "integer", "minimum": 1}
_BYTES = {"type": "integer", "minimum": 0}
_TEXT = {"type": "string"}
_OPTIONAL_TEXT = {"type": ["string", "null"]}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": sorted(properties),
        "properties": properties,
        "additionalProperties": False,
    }


def _nullable(properties: dict[str, Any]) -> dict[str, Any]:
    """An object with exactly these fields, or null where the run had nothing to measure."""
    return {**_object(properties), "type": ["object", "null"]}


def _with_optional(
    required: dict[str, Any], optional: dict[str, Any], nullable: bool = False
) -> dict[str, Any]:
    """Like :func:`_object`, plus fields that records written before they existed lack."""
    schema = _object(required)
    schema["properties"] = {**required, **optional}
    if nullable:
        schema["type"] = ["object", "null"]
    return schema


RESULT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "dreamblend end-to-end benchmark record",
    **_object(
        {
            "schema_version": {"enum": [SCHEMA_VERSION]},
            "run_id": _TEXT,
            "date": _TEXT,
            "git_revision": _TEXT,
            "smoke": {"type": "boolean"},
            "device": _with_optional(
                {
                    "type": {"enum": ["cuda", "cpu"]},
                    "name": _TEXT,
                    "total_memory_bytes": {**_BYTES, "type": ["integer", "null"]},
                },
                {
                    # CPU runs: logical CPUs of the machine and the intra-op threads torch used
                    "cpu_count": _COUNT,
                    "threads": _COUNT,
                },
            ),
            "versions": _object(
                {
                    "python": _TEXT,
                    "torch": _TEXT,
                    "triton": _OPTIONAL_TEXT,
                    "diffusers": _TEXT,
                    "cuda": _OPTIONAL_TEXT,
                }
            ),
            "model": _TEXT,
            "resolution": _COUNT,
            "latent_size": _COUNT,
            "text_tokens": _COUNT,
            "dtype": {"enum": ["float16", "bfloat16", "float32"]},
            "batch": _COUNT,
            "peer": _TEXT,
            "backend": _OPTIONAL_TEXT,
            "workload": {"enum": ["step", "image"]},
            "steps": _COUNT,
            "guidance_scale": _NUMBER,
            "alpha": _NUMBER,
            "status": {"enum": ["ok", "oom", "error", "unavailable"]},
            "error": _OPTIONAL_TEXT,
            "timing": _nullable(
                {
                    **{f"{stat}_ms": _NUMBER for stat in ("median", "min", "max", "p25", "p75")},
                    "warmup": {"type": "integer", "minimum": 0},
                    "repeats": _COUNT,
                    "timer": {"enum": ["cuda_events", "perf_counter"]},
                }
            ),
            "memory": _with_optional(
                {
                    "peak_allocated_bytes": _BYTES,
                    "static_allocated_bytes": _BYTES,
                    "unet_weight_bytes": _BYTES,
                },
                {
                    # what "allocated" means: the CUDA caching allocator's counters, or (CPU) the
                    # resident set of a process that ran this one configuration
                    "source": {"enum": ["cuda_allocator", "peak_rss"]},
                    # CPU steps: the most tensor memory a step held at once (benchmarks.tensor_peak)
                    "step_tensor_peak_bytes": _BYTES,
                },
                nullable=True,
            ),
            "images_per_s": {"type": ["number", "null"], "minimum": 0},
        }
    ),
    # A measured record carries its timing; a failed or skipped one says why.
    "if": {"properties": {"status": {"enum": ["ok"]}}},
    "then": {"properties": {"timing": {"type": "object"}, "error": {"type": "null"}}},
    "else": {"properties": {"timing": {"type": "null"}, "error": {"type": "string"}}},
}

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
    "null": (type(None),),
}


class SchemaError(ValueError):
    """A record does not match :data:`RESULT_SCHEMA`; the message names the field."""


def _is_type(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False
    return isinstance(value, _TYPES[name])


def _check(value: Any, schema: dict[str, Any], path: str) -> None:
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_is_type(value, name) for name in names):
            raise SchemaError(f"{path}: expected {' or '.join(names)}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and _is_type(value, "number") and value < schema["minimum"]:
        raise SchemaError(f"{path}: {value!r} is below {schema['minimum']}")
    if isinstance(value, dict):
        missing = [key for key in schema.get("required", ()) if key not in value]
        if missing:
            raise SchemaError(f"{path}: missing {missing}")
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is False and (extra := sorted(set(value) - set(properties))):
            raise SchemaError(f"{path}: unexpected {extra}")
        for key, sub in properties.items():
            if key in value:
                _check(value[key], sub, f"{path}.{key}")
    if "if" in schema:
        try:
            _check(value, schema["if"], path)
        except SchemaError:
            branch = schema.get("else")
        else:
            branch = schema.get("then")
        if branch is not None:
            _check(value, branch, path)


def validate(record: dict[str, Any]) -> None:
    """Raise :class:`SchemaError` unless ``record`` matches :data:`RESULT_SCHEMA`."""
    _check(record, RESULT_SCHEMA, "record")
