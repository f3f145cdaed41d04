"""Reading a job: YAML file, `--set` overrides, validation into `JobConfig` with errors naming the
field, file and line; and writing a resolved job back as YAML."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rl_service.config.job import JobConfig
from rl_service.config.algorithm import ALGORITHMS
from rl_service.errors import ConfigError


def _from_override(field: str, overrides: list[str], unknown_key: bool) -> str:
    """" (from --set …)" when a `--set` wrote the field or a section above it, or (for an unknown key)
    a key below it, else "". A section's own check (its fields together) names no `--set` inside it."""
    for override in overrides:
        written = override.split("=", 1)[0].strip()
        if field == written or field.startswith(written + ".") or (unknown_key and written.startswith(field + ".")):
            return f" (from --set {override})"
    return ""


def _format_validation_error(source: str, error: ValidationError, overrides: list[str] = ()) -> str:
    problems = []
    for item in error.errors():
        loc, algorithm = list(item["loc"]), None
        if loc[:1] == ["algorithm"] and len(loc) > 1 and loc[1] in ALGORITHMS:
            algorithm = loc.pop(1)   # the union's tag: the user wrote algorithm.X, not algorithm.grpo.X
        field = ".".join(str(part) for part in loc) or "(top level)"
        message = re.sub(r" or instance of \w+$", "", item["msg"])  # pydantic's class names mean nothing to a user
        if item["type"] in ("union_tag_invalid", "union_tag_not_found"):
            names = ", ".join(ALGORITHMS)
            value = item["input"]
            problems.append(f"{field}.name: {value.get('name')!r} is not one of {names}" if isinstance(value, dict)
                            else f"{field}: expected a section whose name is one of {names}, got {value!r}")
            continue
        if item["type"] == "extra_forbidden":
            message = "unknown key"
            if algorithm is not None:
                settings = [name for name in ALGORITHMS[algorithm].model_fields if name != "name"]
                message = (f"not a setting of algorithm.name {algorithm!r} "
                           + (f"(its settings: {', '.join(settings)})" if settings else "(its settings are the `preference:` section)"))
        elif item["type"] == "value_error":
            # Our validators' messages name their fields already; drop pydantic's "Value error, " prefix.
            message = str(item.get("ctx", {}).get("error", message))
            if field == "(top level)" or field in message:
                problems.append(message)
                continue
        elif not isinstance(item.get("input"), (dict, list)):
            message += f" (got {item.get('input')!r})"  # the value as parsed, e.g. 'many' for an integer
            if item["type"] == "string_type" and isinstance(item.get("input"), (int, float)):
                message += "; quote it to mean text"   # `job_name: 123` in a file: YAML read a number
        problems.append(f"{field}: {message}{_from_override(field, list(overrides), item['type'] == 'extra_forbidden')}")
    return f"{source}: " + "; ".join(problems)


def parse_override(override: str) -> tuple[list[str], Any]:
    """`a.b=c` → (['a', 'b'], c) with `c` parsed as a YAML scalar/list (so `1e-5`, `true`, `[1,2]` work)."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. learner.lr=1e-5")
    key, raw_value = override.split("=", 1)
    path = [part for part in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"--set {override!r}: empty field name in {key!r}")
    try:
        value = _load_yaml(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {override!r}: value is not valid YAML ({exc.problem})") from None
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for override in overrides:
        path, value = parse_override(override)
        node = raw
        for depth, part in enumerate(path[:-1]):
            if node.get(part) is None:   # absent, or null (`lora: null`): the override makes the section
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"--set {override!r}: {'.'.join(path[:depth + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return raw


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` (no dot) as a float, as YAML 1.2 and every user do, and
    refuses a key written twice in one mapping (PyYAML keeps the last silently, so a second
    `learner:` section would quietly drop the first one's settings)."""

    def compose_mapping_node(self, anchor):
        # Checked as written, before construction: merge keys (`<<`) are flattened into a mapping's
        # node only when it is constructed, and an explicit key may override a merged one.
        node = super().compose_mapping_node(anchor)
        first_line: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r} (first on line {first_line[key]})", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return node


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job file (or defaults when `path` is None), apply `--set` overrides, validate."""
    source = str(path) if path is not None else "(defaults)"
    raw: dict = {}
    if path is not None:
        if not str(path).strip():   # Path("") is the working directory
            raise ConfigError("the config path is empty: name a YAML job file (e.g. configs/quickstart.yaml)")
        file = Path(path)
        try:
            if file.is_dir():
                raise ConfigError(f"{source}: is a directory, not a config file")
            if not file.is_file():
                raise ConfigError(f"{source}: config file not found")
            raw_bytes = file.read_bytes()
        except OSError as exc:   # unreadable (permissions, or a directory above it that cannot be entered)
            raise ConfigError(f"{source}: cannot read ({exc.strerror or exc})") from None
        try:
            text = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw_bytes.count(b"\n", 0, exc.start) + 1
            raise ConfigError(f"{source}: line {line} is not UTF-8 text (byte 0x{raw_bytes[exc.start]:02x}); "
                              "save the file as UTF-8") from None
        try:
            loaded = _load_yaml(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = str(getattr(exc, "problem", exc))
            if problem.startswith("duplicate key"):
                raise ConfigError(f"{source}:{where}: {problem}") from None
            raise ConfigError(f"{source}:{where} not valid YAML ({problem})") from None
        if loaded is None:   # a truncated or wrong file would otherwise train the default job, silently
            raise ConfigError(f"{source}: holds no settings (empty, or only comments); a job file names at least "
                              "one, e.g. `job_name: my_job` (configs/quickstart.yaml is a complete job)")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    raw = apply_overrides(raw, overrides or [])
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        if not _overrides_as_text(raw, exc, overrides or []):
            raise ConfigError(_format_validation_error(source, exc, overrides or [])) from None
    try:   # once more, with the numbers a --set wrote to text fields read as the text written
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc, overrides or [])) from None


def _overrides_as_text(raw: dict, error: ValidationError, overrides: list[str]) -> bool:
    """Put back, as written, each `--set` value that YAML read as a number but whose field takes text
    (`--set job_name=123`, `data.hf.train_split=2024`): on a command line there is no quoting to ask
    for, and the text as typed keeps "007" and "1.10" that int/float would not. True if any was."""
    written = {}
    for override in overrides:
        key, text = override.split("=", 1)
        written[tuple(part for part in key.strip().split("."))] = text.strip()
    changed = False
    for item in error.errors():
        value = item.get("input")
        if item["type"] != "string_type" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        loc = [str(part) for part in item["loc"]]
        if loc[:1] == ["algorithm"] and len(loc) > 1 and loc[1] in ALGORITHMS:
            loc.pop(1)   # the union's tag, not a key the user wrote
        if tuple(loc) not in written:
            continue
        node = raw
        for part in loc[:-1]:
            node = node[part]
        node[loc[-1]] = written[tuple(loc)]
        changed = True
    return changed


def dump_config(config: JobConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
