"""YAML configuration → validated pydantic models.

Every error names its key path (``pool.max_vms: must be >= pool.min_vms (got 2 < 5)``) so an
admin can fix a file without reading a traceback. Unknown keys are errors: a typo must not
silently fall back to a default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import reprlib
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` holds one ``path: message`` line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# The most VMs a bound may name (the admin API's resize allows as many).
MAX_VMS = 1_000_000


def _not_yes_or_no(value: Any) -> Any:
    """YAML reads `yes`, `on` and `true` as True, which pydantic would take for 1: a number
    key given one is a mistake to name. (Quoted numbers, "10", are still numbers, as they
    were: a configuration that loaded before an upgrade loads after it.)"""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not yes/no (got {value})")
    return value


Int = Annotated[int, BeforeValidator(_not_yes_or_no)]
Float = Annotated[float, BeforeValidator(_not_yes_or_no)]


class _Section(BaseModel):
    """Numbers are ``Int`` and ``Float``: never a yes/no."""

    # allow_inf_nan: `idle_timeout_s: 1e400` is YAML's infinity, no number of seconds.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LaunchTemplateConfig(_Section):
    """An EC2 launch template, named or by id; what it sets need not be repeated here."""

    name: Annotated[str, Field(min_length=1)] | None = None
    id: Annotated[str, Field(min_length=1)] | None = None
    version: str = "$Default"  # a number, $Default or $Latest

    @model_validator(mode="after")
    def _one_of_name_or_id(self) -> LaunchTemplateConfig:
        if (self.name is None) == (self.id is None):
            raise ValueError("give exactly one of name or id")
        return self


DEFAULT_INSTANCE_TYPE = "t3.medium"


class CloudConfig(_Section):
    """One EC2-compatible endpoint the pool may launch into."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    endpoint_url: str | None = None
    region: str = "us-east-1"
    profile: str | None = None
    image_id: Annotated[str, Field(min_length=1)] | None = None
    instance_type: str | None = None  # the one-type form of instance_types
    # Tried in order: a capacity or unsupported-type error moves to the next in the same cycle.
    instance_types: list[Annotated[str, Field(min_length=1)]] = []
    launch_template: LaunchTemplateConfig | None = None
    market: Literal["on-demand", "spot"] = "on-demand"
    spot_max_price: Annotated[Float, Field(gt=0)] | None = None  # $/h; None: the on-demand price
    # Spot interruptions of one (cloud, type) within the window that back the type off.
    spot_interruptions_before_backoff: Annotated[Int, Field(ge=1)] = 3
    spot_interruption_window_s: Annotated[Float, Field(gt=0)] = 600.0
    # $/h per instance type: {type: price} or {type: {on-demand: p, spot: p}}.
    price_per_hour: dict[
        str,
        Annotated[
            float | dict[Literal["on-demand", "spot"], Float], BeforeValidator(_not_yes_or_no)
        ],
    ] = {}
    iam_instance_profile: str | None = None  # a name, or an ARN (arn:...)
    root_volume_size_gb: Annotated[Int, Field(ge=1)] | None = None
    root_volume_type: Literal["gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"] | None = None
    root_device_name: str = "/dev/xvda"
    imds_tokens: Literal["required", "optional"] = "required"  # "required": IMDSv2 only
    key_name: str | None = None
    security_group_ids: list[str] = []
    subnet_id: str | None = None  # the one-subnet form of subnet_ids
    subnet_ids: list[Annotated[str, Field(min_length=1)]] = []
    max_instances: Annotated[Int, Field(ge=0, le=MAX_VMS)] = 100
    priority: Int = 100
    tags: dict[str, str] = {}
    exact_count: bool = False
    # None: adaptive (a client-side rate limiter) on AWS, standard on other endpoints.
    retry_mode: Literal["standard", "adaptive"] | None = None
    max_attempts: Annotated[Int, Field(ge=1, le=20)] = 5  # total attempts per call
    read_timeout_s: Annotated[Float, Field(gt=0)] = 120.0
    call_timeout_s: Annotated[Float, Field(gt=0)] = 300.0
    call_backoff_initial_s: Annotated[Float, Field(gt=0)] = 15.0
    backoff_initial_s: Annotated[Float, Field(gt=0)] = 60.0
    backoff_max_s: Annotated[Float, Field(gt=0)] = 1800.0
    boot_failures_before_backoff: Annotated[Int, Field(ge=1)] = 3
    billing_period_s: Annotated[Float, Field(gt=0)] = 1.0
    min_billed_s: Annotated[Float, Field(ge=0)] = 60.0

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https:// (got {value!r})")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = [key for key in value if key.startswith("alienec2:")]
        if reserved:
            raise ValueError(
                f"tag keys starting with 'alienec2:' are reserved (got {reserved[0]!r})"
            )
        return value

    @field_validator("backoff_max_s")
    @classmethod
    def _backoff(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("backoff_initial_s")
        if initial is not None and value < initial:
            raise ValueError(f"must be >= backoff_initial_s (got {value:g} < {initial:g})")
        return value

    @model_validator(mode="after")
    def _launch_settings(self) -> CloudConfig:
        """Name conflicts between the one-value and list forms, and with a template."""
        errors = []
        if self.instance_type is not None and self.instance_types:
            errors.append("instance_type and instance_types: give one or the other")
        if self.subnet_id is not None and self.subnet_ids:
            errors.append("subnet_id and subnet_ids: give one or the other")
        if self.launch_template is None and self.image_id is None:
            errors.append("image_id: required key is missing (or give a launch_template)")
        if self.launch_template is not None and self.image_id is not None:
            errors.append("launch_template and image_id: the template names the image")
        if self.spot_max_price is not None and self.market != "spot":
            errors.append("spot_max_price: only for market: spot")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def types(self) -> list[str | None]:
        """Instance types in the order tried; None: the launch template's own type."""
        if self.instance_types:
            return list(self.instance_types)
        if self.instance_type is not None:
            return [self.instance_type]
        return [None] if self.launch_template is not None else [DEFAULT_INSTANCE_TYPE]

    @property
    def subnets(self) -> list[str | None]:
        """Subnets in the order tried; None: the endpoint's (or template's) default."""
        if self.subnet_ids:
            return list(self.subnet_ids)
        return [self.subnet_id]

    @property
    def effective_retry_mode(self) -> Literal["standard", "adaptive"]:
        if self.retry_mode is not None:
            return self.retry_mode
        return "adaptive" if self.endpoint_url is None else "standard"

    def price(self, instance_type: str | None) -> float:
        """$/h of one instance of this type in this cloud's market; 0 when not configured."""
        entry = self.price_per_hour.get(instance_type or "")
        if entry is None:
            return 0.0
        if isinstance(entry, dict):
            return float(entry.get(self.market, 0.0))
        return float(entry)


class PoolConfig(_Section):
    """Bounds and timers of the VM pool; see the scaling policy in DESIGN.md."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] = "default"
    min_vms: Annotated[Int, Field(ge=0, le=MAX_VMS)] = 0
    max_vms: Annotated[Int, Field(ge=0, le=MAX_VMS)] = 10
    idle_timeout_s: Annotated[Float, Field(gt=0)] = 600.0
    boot_timeout_s: Annotated[Float, Field(gt=0)] = 900.0
    heartbeat_timeout_s: Annotated[Float, Field(gt=0)] = 300.0
    max_launch_per_cycle: Annotated[Int, Field(ge=1)] = 50
    cycle_interval_s: Annotated[Float, Field(gt=0)] = 15.0
    slots_per_vm: Annotated[Int, Field(ge=1, le=1024)] = 1  # the agent API names slots 0-1023
    reconcile_interval_s: Annotated[Float, Field(gt=0)] = 300.0
    adaptive_warm: bool = True
    arrival_window_s: Annotated[Float, Field(gt=0)] = 600.0
    boot_time_guess_s: Annotated[Float, Field(ge=0)] = 120.0
    warm_history_s: Annotated[Float, Field(ge=0)] = 86400.0
    warm_margin: Annotated[Float, Field(ge=0)] = 1.0
    max_lifetime_s: Annotated[Float, Field(ge=0)] = 0.0  # 0: VMs live as long as needed
    max_replace_per_cycle: Annotated[Int, Field(ge=1)] = 1
    # $/h the pool may run at (from clouds[].price_per_hour); None: no cap.
    max_cost_per_hour: Annotated[Float, Field(ge=0)] | None = None

    @field_validator("max_vms")
    @classmethod
    def _max_vms(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_vms")
        if low is not None and value < low:
            raise ValueError(f"must be >= pool.min_vms (got {value} < {low})")
        return value


class BuiltinQueueConfig(_Section):
    """The core's own FIFO task queue, served to agents through the agent API."""

    kind: Literal["builtin"] = "builtin"
    max_attempts: Annotated[Int, Field(ge=1)] = 3


class CommandQueueConfig(_Section):
    """Demand from any command that prints one integer (e.g. an AliEn/jAliEn CLI query)."""

    kind: Literal["command"]
    command: Annotated[list[str], Field(min_length=1)]
    timeout_s: Annotated[Float, Field(gt=0)] = 30.0


class HTCondorQueueConfig(_Section):
    """Demand from the idle jobs that ``condor_q`` lists, as elastiq counted them."""

    kind: Literal["htcondor"]
    condor_q: Annotated[list[str], Field(min_length=1)] = ["condor_q"]
    constraint: str | None = None
    timeout_s: Annotated[Float, Field(gt=0)] = 30.0


def _kind_as_text(value: Any) -> Any:
    """A queue whose ``kind`` is no string has it quoted (bounded) first: pydantic writes the
    tag it refuses into its message whole, and a YAML alias chain is exponential written."""
    kind = value.get("kind") if isinstance(value, dict) else None
    if isinstance(kind, list | dict) or (isinstance(kind, int) and kind.bit_length() > 64):
        return {**value, "kind": _shown(kind)}
    return value


QueueConfig = Annotated[
    BuiltinQueueConfig | CommandQueueConfig | HTCondorQueueConfig,
    Field(discriminator="kind"),
    BeforeValidator(_kind_as_text),
]


class StateConfig(_Section):
    path: str = "/var/lib/alienec2/state.db"
    synchronous: Literal["full", "normal"] = "full"
    retention_days: Annotated[Float, Field(ge=0)] = 14.0  # 0 keeps history for ever


def _networks(values: list[str]) -> list[str]:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"not a CIDR network: {value!r}") from None
    return values


class WebConfig(_Section):
    """The agent API listener that VMs reach."""

    host: str = "0.0.0.0"
    port: Annotated[Int, Field(ge=0, le=65535)] = 8470
    public_url: str | None = None
    allowed_networks: list[str] = ["0.0.0.0/0", "::/0"]
    trusted_proxies: list[str] = []
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # Open connections at once; None: per VM of pool.max_vms one for the heartbeat and one per
    # slot's long poll (agents keep them open), plus 256 for registrations and retries. Idle
    # kept-alive connections count, but a newcomer at the cap displaces one of them.
    max_connections: Annotated[Int, Field(ge=1)] | None = None
    # A connection must deliver a complete request (headers and body) within this time.
    header_timeout_s: Annotated[Float, Field(gt=0, le=300)] = 10.0
    # An idle kept-alive connection is closed after this; keep it above the agents' heartbeat
    # period and their 60 s bound on reusing an idle connection, or every heartbeat reconnects.
    keep_alive_s: Annotated[Float, Field(gt=0, le=3600)] = 75.0

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        """The address written into every VM's user data: a typo here strands the fleet."""
        if value is None:
            return value
        parsed = urllib.parse.urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host (got {value!r})")
        return value

    @field_validator("allowed_networks", "trusted_proxies")
    @classmethod
    def _cidrs(cls, values: list[str]) -> list[str]:
        return _networks(values)


# Linux keeps a Unix socket's path in 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH_BYTES = 107


def socket_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a Unix socket's address, if it cannot: bind() would fail with
    "AF_UNIX path too long" only when the core starts."""
    size = len(os.fsencode(path))
    if size <= MAX_SOCKET_PATH_BYTES:
        return None
    return (
        f"{path} is {size} bytes long; a Unix socket's path holds at most "
        f"{MAX_SOCKET_PATH_BYTES}: choose a shorter path"
    )


class AdminConfig(_Section):
    """The admin API: a unix socket by default, TCP only with a bearer token."""

    socket: str = "/run/alienec2/admin.sock"
    tcp_host: str | None = None
    tcp_port: Annotated[Int, Field(ge=0, le=65535)] = 8471
    token: str | None = None
    token_env: str = "ALIENEC2_ADMIN_TOKEN"
    # A token for watchers on TCP: GETs and the event stream only.
    readonly_token_env: str = "ALIENEC2_ADMIN_READONLY_TOKEN"
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    max_connections: Annotated[Int, Field(ge=1)] = 256  # per admin listener

    @field_validator("socket")
    @classmethod
    def _fits(cls, value: str) -> str:
        if problem := socket_path_problem(value):
            raise ValueError(problem)
        return value

    def resolved_token(self) -> str | None:
        return self.token or os.environ.get(self.token_env) or None

    def resolved_readonly_token(self) -> str | None:
        return os.environ.get(self.readonly_token_env) or None


class AlienConfig(_Section):
    """The AliEn variant: CVMFS settings and the site's JobAgent command."""

    pilot_command: list[str] = []
    cvmfs_repositories: list[str] = ["alice.cern.ch", "alice-ocdb.cern.ch", "grid.cern.ch"]
    cvmfs_http_proxy: str = "DIRECT"
    cvmfs_quota_mb: Annotated[Int, Field(ge=1000)] = 20000
    # A short pause between runs; idleness comes from idle_run_s, not from the pause.
    pilot_pause_s: Annotated[Float, Field(ge=0)] = 10.0
    # A run shorter than this, or ending with one of no_job_exit_codes, found no job (idle).
    idle_run_s: Annotated[Float, Field(ge=0)] = 150.0
    no_job_exit_codes: list[Annotated[Int, Field(ge=0, le=255)]] = []
    # The AliEn job id in a run's output: group 1 (or the whole match) is reported.
    job_id_regex: str = r"(?i)\bjob(?:\s*id)?[ =:#]+(\d+)"

    @field_validator("job_id_regex")
    @classmethod
    def _regex_compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value


class ContextualisationConfig(_Section):
    """How a VM is told to start its job agent (the cloud-init user-data)."""

    template: Literal["builtin", "alien"] = "builtin"
    agent_heartbeat_s: Annotated[Float, Field(gt=0)] = 30.0
    fetch_wait_s: Annotated[Float, Field(gt=0, le=60)] = 20.0
    ca_file: str | None = None
    extra_env: dict[str, str] = {}
    launch_key_rotation_days: Annotated[Float, Field(ge=0)] = 30.0
    # Jobs (and JobAgents) run as this unprivileged user, created by the templates;
    # "" runs them as the agent's own user (sandboxes and tests only: they could act as the VM).
    job_user: Annotated[str, Field(pattern=r"^([a-z_][a-z0-9_-]{0,31})?$")] = "alienec2-job"
    # How often the agent polls IMDS for Spot notices; 0 turns the watch off.
    spot_poll_s: Annotated[Float, Field(ge=0)] = 5.0
    alien: Annotated[AlienConfig, Field(validate_default=True)] = AlienConfig()

    @field_validator("alien")
    @classmethod
    def _alien_needs_a_command(cls, value: AlienConfig, info: ValidationInfo) -> AlienConfig:
        if info.data.get("template") == "alien" and not value.pilot_command:
            raise ValueError(
                "pilot_command: required when template is 'alien' (the site's JobAgent command)"
            )
        return value


class Config(_Section):
    core_id: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] = "alienec2"
    clouds: Annotated[list[CloudConfig], Field(min_length=1)]
    pool: PoolConfig = PoolConfig()
    queue: QueueConfig = BuiltinQueueConfig()
    state: StateConfig = StateConfig()
    web: WebConfig = WebConfig()
    admin: AdminConfig = AdminConfig()
    contextualisation: ContextualisationConfig = ContextualisationConfig()

    @model_validator(mode="after")
    def _unique_cloud_names(self) -> Config:
        seen: set[str] = set()
        for cloud in self.clouds:
            if cloud.name in seen:
                raise ValueError(f"clouds: duplicate cloud name {cloud.name!r}")
            seen.add(cloud.name)
        return self

    @model_validator(mode="after")
    def _user_data_fits(self) -> Config:
        """Render the user data once as a launch would, so an oversized one (EC2 allows
        16 KiB) is reported by check-config, not by the first launch."""
        from core import userdata

        url = self.web.public_url or f"https://{'x' * 60}:{self.web.port}"
        settings = userdata.agent_settings(url, "0" * 16, "0" * 64, self.contextualisation)
        size = len(userdata.render_unchecked(settings, self.contextualisation).encode())
        if size > userdata.USER_DATA_LIMIT:
            raise ValueError(
                f"contextualisation: the rendered user data is {size} bytes, EC2 allows "
                f"{userdata.USER_DATA_LIMIT} (shorten extra_env or the pilot command)"
            )
        return self


# The member of price_per_hour's union that pydantic names in an error's path after the
# instance type ("float", "dict[...]"): no key the admin wrote.
_UNION_MEMBER = re.compile(r"(?:float|int|str|bool|(?:dict|list|function-\w+)\[.*\])$")


def _path(loc: tuple[int | str, ...]) -> str:
    if len(loc) > 1 and loc[0] == "queue":
        loc = ("queue", *loc[2:])  # drop the union tag pydantic inserts: queue.command.x
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i >= 2 and loc[i - 2] == "price_per_hour" and _UNION_MEMBER.fullmatch(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        return (
            f"must be one of builtin, command, htcondor (got {_shown(error['input'].get('kind'))})"
        )
    if kind == "union_tag_not_found":
        return "required key is missing (builtin, command or htcondor)"
    if kind in ("model_type", "dict_type"):
        return f"must be a mapping of keys (got {_shown(error['input'])})"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if kind.endswith(("_type", "_parsing")) or kind == "literal_error":
        message += f" (got {_shown(error['input'])})"
    return message


# Bounded at every level, not cut after: a YAML alias chain (a "billion laughs") is small
# as parsed but exponential as written out.
_QUOTE = reprlib.Repr()  # keyword arguments need Python 3.12
_QUOTE.maxlevel = 3
_QUOTE.maxdict = _QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxset = 4
_QUOTE.maxstring = _QUOTE.maxother = 60


def _shown(value: Any, limit: int = 60) -> str:
    """A wrong value as the error line quotes it: cut short, as it reaches logs and events."""
    try:
        text = _QUOTE.repr(value)
    except ValueError:  # an int past the 4,300 digits Python writes out (YAML's 0xfff...)
        text = f"a number of {value.bit_length()} bits" if isinstance(value, int) else "?"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors():
        message = _message(error)
        # A model-level check already names its path in the message.
        if not error["loc"] and ": " in message:
            lines.append(message)
        else:
            path = _path(error["loc"])
            if error["type"].startswith("union_tag"):
                path += ".kind"
            lines.append(f"{path}: {message}")
    return lines


def parse_config(data: Any) -> Config:
    """Validate already-loaded YAML data; raise ConfigError listing every problem."""
    if data is None:
        raise ConfigError(["(top level): the file is empty"])
    if not isinstance(data, dict):
        raise ConfigError(
            [f"(top level): must be a mapping of sections (got {type(data).__name__})"]
        )
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc)) from None


def _duplicate_keys(node: yaml.Node, path: str = "", seen: set[int] | None = None) -> list[str]:
    """Keys written twice in one mapping, by key path: YAML loaders keep the last one, so an
    admin's earlier line would be silently ignored."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias: its anchor was walked already
        return []
    seen.add(id(node))
    found: list[str] = []
    if isinstance(node, yaml.MappingNode):
        marks: dict[tuple[str, str], yaml.Mark] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            where = f"{path}.{key}" if path else key
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            typed = (key_node.tag, key)  # 1 and "1" are two keys
            if typed in marks:
                first, again = marks[typed], key_node.start_mark
                if first.line == again.line:  # a flow mapping: {a: 1, a: 2}
                    places = f"line {again.line + 1}, columns {first.column + 1} and "
                    places += f"{again.column + 1}"
                else:
                    places = f"lines {first.line + 1} and {again.line + 1}"
                found.append(f"{where}: written twice ({places})")
            marks[typed] = key_node.start_mark
            found += _duplicate_keys(value_node, where, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found += _duplicate_keys(item, f"{path}[{index}]", seen)
    return found


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML file; every failure becomes a ConfigError with a readable line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a file"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: permission denied"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: invalid YAML at {where}{problem}"]) from None
    except ValueError as exc:  # a number past Python's 4,300 digits for int(); no line known
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    twice = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
    try:
        config = parse_config(data)
    except ConfigError as exc:
        raise ConfigError(twice + exc.errors) from None  # every problem in one go
    if twice:
        raise ConfigError(twice)
    return resolve_paths(config, path.absolute().parent)


def _against(base: Path, value: str | None) -> str | None:
    if value is None or value == ":memory:":
        return value
    return os.path.normpath(base / Path(value).expanduser())


def resolve_paths(config: Config, base: Path) -> Config:
    """Relative paths of files on this machine, made absolute against ``base`` (the config
    file's directory), so a command given ``--config FILE`` works from any directory.

    ``contextualisation.ca_file`` is left as written: it names a file on the VM."""
    socket = _against(base, config.admin.socket) or config.admin.socket
    if problem := socket_path_problem(socket):
        raise ConfigError([f"admin.socket: {problem}"])
    return config.model_copy(
        update={
            "state": config.state.model_copy(update={"path": _against(base, config.state.path)}),
            "admin": config.admin.model_copy(update={"socket": socket}),
            "web": config.web.model_copy(
                update={
                    "ssl_certfile": _against(base, config.web.ssl_certfile),
                    "ssl_keyfile": _against(base, config.web.ssl_keyfile),
                }
            ),
        }
    )


def summary(config: Config) -> str:
    """One line an admin can eyeball after check-config."""
    clouds = ", ".join(f"{c.name}(max {c.max_instances})" for c in config.clouds)
    pool = config.pool
    return (
        f"ok: pool {pool.name!r} min {pool.min_vms} max {pool.max_vms}, "
        f"queue {config.queue.kind}, clouds {clouds}, state {config.state.path}"
    )
