"""Configuration: every error names its key path; check-config never shows a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {"clouds": [{"name": "a", "image_id": "ami-1"}]}


def errors_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.errors


def check_config(path: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "core.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_example_config_is_valid_and_documents_every_option() -> None:
    config = load_config(ROOT / "config.example.yaml")
    assert config.queue.kind == "builtin"
    text = (ROOT / "config.example.yaml").read_text()
    sections = {
        "clouds": type(config.clouds[0]),
        "pool": type(config.pool),
        "queue": type(config.queue),
        "state": type(config.state),
        "web": type(config.web),
        "admin": type(config.admin),
        "contextualisation": type(config.contextualisation),
        "contextualisation.alien": type(config.contextualisation.alien),
    }
    for section, model in sections.items():
        for key in model.model_fields:
            assert f"{key}:" in text, f"config.example.yaml does not document {section}.{key}"


def test_minimal_config_gets_documented_defaults() -> None:
    config = parse_config(MINIMAL)
    assert (config.pool.min_vms, config.pool.max_vms) == (0, 10)
    assert config.clouds[0].effective_retry_mode == "adaptive"  # AWS: no endpoint_url
    assert config.state.path == "/var/lib/alienec2/state.db"


def test_max_below_min_names_both_keys_and_values() -> None:
    data = {**MINIMAL, "pool": {"min_vms": 5, "max_vms": 2}}
    assert errors_of(data) == ["pool.max_vms: must be >= pool.min_vms (got 2 < 5)"]


CLOUD = MINIMAL["clouds"][0]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"pool": {"max_vms": True}}, "pool.max_vms: must be a number, not yes/no (got True)"),
        (
            {"pool": {"idle_timeout_s": False}},
            "pool.idle_timeout_s: must be a number, not yes/no (got False)",
        ),
        (
            {"clouds": [{**CLOUD, "price_per_hour": {"m5.large": True}}]},
            "clouds[0].price_per_hour.m5.large: must be a number, not yes/no (got True)",
        ),
        (
            {"pool": {"max_vms": 10**26}},
            "pool.max_vms: Input should be less than or equal to 1000000",
        ),
    ],
)
def test_a_number_is_never_a_yes_or_no_and_a_pool_bound_is_bounded(
    data: dict[str, object], error: str
) -> None:
    assert errors_of({**MINIMAL, **data}) == [error]
    pool = parse_config({**MINIMAL, "pool": {"idle_timeout_s": 60, "max_vms": "10"}}).pool
    assert (pool.idle_timeout_s, pool.max_vms) == (60.0, 10)  # as every release read them


def test_a_key_named_like_a_type_is_named_in_its_path() -> None:
    """Only price_per_hour's union members ("float", "dict[...]") leave the path."""
    assert errors_of({**MINIMAL, "pool": {"int": 1}}) == ["pool.int: unknown key"]
    tags = {"clouds": [{**CLOUD, "tags": {"float": 1}}]}
    assert errors_of(tags)[0].startswith("clouds[0].tags.float: ")


def test_a_yaml_alias_chain_is_quoted_in_bounded_time_and_length(tmp_path: Path) -> None:
    """A "billion laughs" under a wrong-typed key: small as parsed, exponential as written."""
    chain = "".join(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 12))
    path = tmp_path / "config.yaml"
    path.write_text(
        "clouds: [{name: a, image_id: x}]\npool:\n  z:\n    l0: &l0 [a, b, c, d, e, f, g, h, i]\n"
        f"{chain}  max_vms: *l11\nqueue: {{kind: *l11}}\n"  # pydantic quotes a union's tag
    )
    result = check_config(path)  # 9**11 strings if written out: it would not end
    assert result.returncode == 2
    [bound, unknown, kind] = sorted(result.stderr.strip().splitlines())
    assert bound.startswith("error: pool.max_vms: Input should be a valid integer (got [")
    assert kind.startswith("error: queue.kind: must be one of builtin, command, htcondor (got ")
    assert max(len(bound), len(kind)) < 200 and unknown == "error: pool.z: unknown key"


def test_every_error_is_listed_at_once_with_its_path() -> None:
    data = {
        "clouds": [{"name": "a", "image_id": "x", "imageid": "typo", "max_instances": -1}],
        "pool": {"idle_timeout_s": "soon"},
        "queue": {"kind": "slurm"},
        "web": {"allowed_networks": ["10.0.0.0/33"]},
        "extra": 1,
    }
    errors = errors_of(data)
    assert "clouds[0].imageid: unknown key" in errors
    assert any(e.startswith("clouds[0].max_instances: ") for e in errors)
    assert any(e.startswith("pool.idle_timeout_s: ") and "'soon'" in e for e in errors)
    assert "queue.kind: must be one of builtin, command, htcondor (got 'slurm')" in errors
    assert "web.allowed_networks: not a CIDR network: '10.0.0.0/33'" in errors
    assert "extra: unknown key" in errors


def test_queue_options_are_checked_per_kind() -> None:
    errors = errors_of({**MINIMAL, "queue": {"kind": "command", "command": [], "timeout": 3}})
    assert any(e.startswith("queue.command: ") for e in errors)
    assert "queue.timeout: unknown key" in errors


def test_duplicate_cloud_names_and_reserved_tags_are_refused() -> None:
    clouds = [{"name": "a", "image_id": "x"}, {"name": "a", "image_id": "y"}]
    assert errors_of({"clouds": clouds}) == ["clouds: duplicate cloud name 'a'"]
    tagged = [{"name": "a", "image_id": "x", "tags": {"alienec2:pool": "x"}}]
    assert errors_of({"clouds": tagged})[0].startswith("clouds[0].tags: tag keys starting with")


def test_missing_clouds_and_non_mapping_files_are_clear() -> None:
    assert errors_of({}) == ["clouds: required key is missing"]
    assert errors_of([1, 2]) == ["(top level): must be a mapping of sections (got list)"]
    assert errors_of(None) == ["(top level): the file is empty"]


def test_check_config_prints_one_line_summary_and_exits_0() -> None:
    result = check_config(ROOT / "config.example.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: pool 'default' min 1 max 10")
    assert len(result.stdout.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "file not found"),
        ("pool: [\n", "invalid YAML at line 2, column 1"),
        ("clouds: [{name: a}]\npool: {min_vms: 5, max_vms: 2}\n", "pool.max_vms: must be >="),
        ("clouds: [{name: a, image_id: x, max_instances: lots}]\n", "clouds[0].max_instances:"),
        ("\xff\xfe", "not UTF-8 text"),
        (
            "clouds: [{name: a, image_id: x}]\npool:\n  min_vms: 1\n  min_vms: 3\n",
            "pool.min_vms: written twice (lines 3 and 4)",
        ),
        (
            "clouds: [{name: a, image_id: x, name: b}]\n",
            "clouds[0].name: written twice (line 1, columns 11 and 33)",
        ),
        ("clouds: [{name: a, image_id: x}]\npool: 3\n", "pool: must be a mapping of keys (got 3)"),
        (
            "clouds: [{name: a, image_id: x}]\npool: {idle_timeout_s: 1e400}\n",
            "pool.idle_timeout_s: Input should be a finite number",
        ),
        (  # the key written twice, and the other problems with it
            "clouds: [{name: a, image_id: x, imageid: y}]\npool: {min_vms: 1, min_vms: 3}\n",
            "clouds[0].imageid: unknown key",
        ),
        (
            "clouds: [{name: a, image_id: x}]\nweb: {public_url: ftp//x}\n",
            "web.public_url: must be an http:// or https:// URL with a host",
        ),
        (  # YAML's hex has no length limit; Python writes no int past 4,300 digits
            f"core_id: 0x{'f' * 5000}\nclouds: [{{name: a, image_id: x}}]\n",
            "core_id: Input should be a valid string (got a number of 20000 bits)",
        ),
        (f"clouds: [{{name: a, image_id: x}}]\nqueue: {{kind: 0x{'f' * 5000}}}\n", "queue.kind:"),
        (f"pool: {{max_vms: {'9' * 5000}}}\n", "invalid YAML: Exceeds the limit (4300 digits)"),
    ],
)
def test_check_config_exits_2_with_a_clear_line_and_no_traceback(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_bytes(content.encode("latin-1"))
    result = check_config(path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert all(line.startswith("error: ") for line in result.stderr.strip().splitlines())


def test_anchors_and_merge_keys_are_not_keys_written_twice(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "clouds:\n"
        "  - &base {name: a, image_id: ami-1, tags: {team: x}}\n"
        "  - <<: *base\n"
        "    name: b\n"
        "    tags: {team: y}\n"
    )
    config = load_config(path)
    assert [(c.name, c.image_id, c.tags) for c in config.clouds] == [
        ("a", "ami-1", {"team": "x"}),
        ("b", "ami-1", {"team": "y"}),
    ]


def test_slots_above_one_serve_the_builtin_queue_and_alien_pilots_and_zero_is_refused() -> None:
    cloud = {"name": "a", "image_id": "ami-1"}
    assert parse_config({"clouds": [cloud], "pool": {"slots_per_vm": 4}}).pool.slots_per_vm == 4
    alien = {"template": "alien", "alien": {"pilot_command": ["jobagent"]}}
    config = parse_config(
        {"clouds": [cloud], "pool": {"slots_per_vm": 4}, "contextualisation": alien}
    )
    assert config.pool.slots_per_vm == 4
    with pytest.raises(ConfigError) as caught:
        parse_config({"clouds": [cloud], "pool": {"slots_per_vm": 0}})
    assert caught.value.errors[0].startswith("pool.slots_per_vm:")
