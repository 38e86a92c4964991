"""`grpo keys create / list / revoke` on PostgreSQL, and `grpo serve` refusing to listen beyond
loopback with authentication disabled."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import pytest
import typer
from click.testing import Result
from sqlalchemy import select
from typer.testing import CliRunner

from api.cli import app, refuse_open_unauthenticated
from api.keycache import KeyCache
from jobs.db import transaction
from jobs.errors import InvalidRequest
from jobs.keys import issue_key
from jobs.models import ApiKey
from jobs.settings import get_settings
from tests.service.factories import bearer


@pytest.fixture
def grpo(settings, monkeypatch) -> Iterator[Callable[..., Result]]:
    """``grpo(*args)``: the command line, on the test database."""
    monkeypatch.setenv("GRPO_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    runner = CliRunner()
    yield lambda *args: runner.invoke(app, list(args))
    get_settings.cache_clear()


def stored_keys(settings) -> list[ApiKey]:
    with transaction(settings.database_url) as session:
        return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def test_create_prints_the_secret_once_and_stores_only_its_hash(grpo, client, settings) -> None:
    created = grpo("keys", "create", "ci", "--owner", "bob")
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip()  # alone on stdout: KEY=$(grpo keys create ci)
    assert secret.startswith("grpo_") and len(secret) >= 45
    assert "shown only this once" in created.stderr
    key = next(k for k in stored_keys(settings) if k.name == "ci")
    assert (key.owner, key.token_hash, key.revoked_at) == (
        "bob",
        hashlib.sha256(secret.encode()).hexdigest(),
        None,
    )
    assert secret not in {key.id, key.prefix, key.token_hash} and secret.startswith(key.prefix)

    response = client.get("/v1/datasets", headers=bearer(secret))
    assert response.status_code == 200 and response.json()["data"] == []  # bob's, not alice's

    listed = grpo("keys", "list")
    assert listed.exit_code == 0
    row = next(line for line in listed.stdout.splitlines() if line.startswith(key.id))
    assert row.split()[1:5] == ["ci", "bob", f"{key.prefix}…", key.created_at.strftime("%Y-%m-%d")]
    assert row.endswith("active") and secret not in listed.output


def test_the_owner_defaults_to_the_name_and_an_owner_may_hold_several_keys(grpo, client, settings) -> None:
    first = grpo("keys", "create", "carol").stdout.strip()
    second = grpo("keys", "create", "carol-laptop", "--owner", "carol").stdout.strip()
    dataset = client.post(
        "/v1/datasets", headers=bearer(first), files={"file": ("d.jsonl", b'{"prompt": "p"}\n')}
    )
    assert client.get(f"/v1/datasets/{dataset.json()['id']}", headers=bearer(second)).status_code == 200
    assert {k.owner for k in stored_keys(settings) if k.name.startswith("carol")} == {"carol"}


def test_revoke_makes_the_next_request_a_401(grpo, client, settings) -> None:
    client.app.state.key_cache = KeyCache(
        0
    )  # GRPO_API_KEY_CACHE_S=0: no process trusts a key it checked earlier
    secret = grpo("keys", "create", "temp").stdout.strip()
    key_id = next(k.id for k in stored_keys(settings) if k.name == "temp")
    assert client.get("/v1/jobs", headers=bearer(secret)).status_code == 200

    revoked = grpo("keys", "revoke", key_id)
    assert revoked.exit_code == 0 and f"revoked {key_id}" in revoked.stdout
    response = client.get("/v1/jobs", headers=bearer(secret))
    assert response.status_code == 401 and "revoked" in response.json()["error"]["message"]
    assert "revoked" in next(
        line for line in grpo("keys", "list").stdout.splitlines() if line.startswith(key_id)
    )
    assert grpo("keys", "revoke", key_id).exit_code == 0  # again: nothing changes


@pytest.mark.parametrize(
    "args",
    [("keys", "revoke", "key_nope"), ("keys", "create", " "), ("keys", "create", "x", "--owner", "o" * 256)],
)
def test_bad_key_commands_fail_with_a_message(grpo, args) -> None:
    result = grpo(*args)
    assert result.exit_code != 0
    assert "no API key with id 'key_nope'" in result.output or "255 characters" in result.output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("keys", "create", "ci\nkey_forged  x  y"), "U+000A"),  # a newline would forge a row of `keys list`
        (("keys", "create", "ci\x1b[2J"), "U+001B"),  # ESC: clears the operator's terminal
        (("keys", "create", "ci\x00"), "U+0000"),
        (("keys", "create", "ci\u202etxt.exe"), "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        (("keys", "create", "ci\u2066x"), "U+2066 (LEFT-TO-RIGHT ISOLATE)"),
        (("keys", "create", "a\u2028b"), "U+2028 (LINE SEPARATOR)"),
        (("keys", "create", "ci", "--owner", "bob\tx"), "U+0009"),
        (("keys", "create", "n" * 256), "255 characters"),
    ],
)
def test_a_name_that_would_print_as_something_else_is_refused(grpo, settings, args, says) -> None:
    result = grpo(*args)
    assert result.exit_code == 2, result.output
    assert says in result.output, result.output
    assert ("--owner" if "--owner" in args else "NAME") in result.output  # the field it is about
    assert stored_keys(settings) == []


@pytest.mark.parametrize(
    ("name", "owner", "param"),
    [("ci\x1b]0;pwned\x07", None, "name"), ("ci", "bo\rb", "owner"), ("ci", "b\udc00b", "owner")],
)
def test_every_way_of_issuing_a_key_checks_its_name_and_owner(settings, name, owner, param) -> None:
    """`grpo keys create` is one caller of issue_key (the demo is another): the check is issue_key's own."""
    with pytest.raises(InvalidRequest) as refused, transaction(settings.database_url) as session:
        issue_key(session=session, name=name, owner=owner)
    assert refused.value.param == param and "U+" in refused.value.message
    assert stored_keys(settings) == []


def test_keys_stored_before_the_check_list_with_their_odd_characters_escaped(grpo, settings) -> None:
    """Keys stored before names and owners were checked (written here past ``issue_key``, as the
    database layer takes them) list one row each, each character that would print as something
    else (a newline forging a row, ESC restyling the terminal, a bidi override reordering the
    line, a line separator) shown as ``\\uXXXX``; the rest of the name as it is."""
    from jobs.queries.keys import create_api_key

    odd = [
        ("ci\nkey_forged", "bob"),
        ("ci\x1b[2J", "caf\u00e9"),
        ("report\u202etxt.exe", "eve\u2066x\u2069"),
        ("a\u2028b\u2029c", "tab\tbed"),
    ]
    with transaction(settings.database_url) as session:
        ids = [
            create_api_key(
                session=session, name=name, owner=owner, token_hash=f"h{index}", prefix=f"grpo_odd{index}"
            ).id
            for index, (name, owner) in enumerate(odd)
        ]
    listed = grpo("keys", "list")
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert len(lines) == 1 + len(odd), lines  # the header, then one line a key: no forged row
    assert not any(char in listed.stdout for char in "\x1b\u202e\u2066\u2069\u2028\u2029\t"), listed.stdout
    rows = {line.split()[0]: line.split()[1:3] for line in lines[1:]}
    assert [rows[key_id] for key_id in ids] == [
        ["ci\\u000akey_forged", "bob"],
        ["ci\\u001b[2J", "caf\u00e9"],
        ["report\\u202etxt.exe", "eve\\u2066x\\u2069"],
        ["a\\u2028b\\u2029c", "tab\\u0009bed"],
    ]


def test_an_unmigrated_database_is_reported_not_a_traceback(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GRPO_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["keys", "list"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1 and "grpo migrate" in result.stderr


def test_serve_refuses_to_listen_beyond_loopback_with_auth_disabled(monkeypatch) -> None:
    monkeypatch.setenv("GRPO_AUTH", "disabled")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "9"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    assert "refusing to listen on 0.0.0.0 with GRPO_AUTH=disabled" in result.stderr


@pytest.mark.parametrize(
    ("host", "auth", "refused"),
    [
        ("127.0.0.1", "disabled", False),
        ("localhost", "disabled", False),
        ("::1", "disabled", False),
        ("0.0.0.0", "disabled", True),
        ("192.168.1.5", "disabled", True),
        ("example.org", "disabled", True),
        ("0.0.0.0", "required", False),
    ],
)
def test_which_interfaces_need_authentication(host, auth, refused) -> None:
    if refused:
        with pytest.raises(typer.Exit):
            refuse_open_unauthenticated(host, auth)
    else:
        refuse_open_unauthenticated(host, auth)
