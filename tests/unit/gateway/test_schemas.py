"""Request validation says what to fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.schemas import (
    ChatRequest,
    SessionConfig,
    SessionCreate,
    SpawnRequest,
    WorkspaceSpec,
)


def test_a_persistent_workspace_needs_an_id_and_an_ephemeral_one_takes_none() -> None:
    with pytest.raises(ValidationError, match="needs an id"):
        WorkspaceSpec(type="persistent")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="takes no id"):
        WorkspaceSpec(type="ephemeral", id="x")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        WorkspaceSpec(type="persistent", id="../etc")  # type: ignore[arg-type]


def test_reserved_and_malformed_environment_names_are_refused() -> None:
    with pytest.raises(ValidationError, match="reserved"):
        SessionConfig(env={"CCGATE_REDIS_URL": "x"})
    with pytest.raises(ValidationError, match="reserved"):
        SessionConfig(env={"HOME": "/"})
    with pytest.raises(ValidationError, match="not a valid"):
        SessionConfig(env={"1BAD": "x"})
    assert SessionConfig(env={"MY_FLAG": "1"}).env == {"MY_FLAG": "1"}


def test_unknown_fields_and_bad_permission_modes_are_refused() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        SessionCreate.model_validate({"config": {"modle": "x"}})
    with pytest.raises(ValidationError, match="permission_mode"):
        SessionConfig.model_validate({"permission_mode": "yolo"})


def test_blank_prompts_are_refused() -> None:
    with pytest.raises(ValidationError, match="non-whitespace"):
        ChatRequest(prompt="  \n ")
    assert ChatRequest(prompt="hi").stream is True


def test_spawn_requests_take_inherit_clone_or_ephemeral_and_a_real_callback_url() -> None:
    from gateway.schemas import SpawnRequest

    assert SpawnRequest(prompt="p").workspace.type.value == "ephemeral"
    assert SpawnRequest.model_validate({"prompt": "p", "workspace": {"type": "clone"}})
    with pytest.raises(ValidationError):
        SpawnRequest.model_validate({"prompt": "p", "workspace": {"type": "persistent"}})
    with pytest.raises(ValidationError):
        SpawnRequest.model_validate({"prompt": "p", "callback": "not a url"})
    with pytest.raises(ValidationError, match="non-whitespace"):
        SpawnRequest(prompt=" ")


def test_a_callback_longer_than_its_column_is_refused_on_every_database() -> None:
    with pytest.raises(ValidationError, match="at most 2000"):
        SpawnRequest.model_validate(
            {"prompt": "hi", "callback": "https://example.test/" + "a" * 2050}
        )


def test_one_workspace_enum_with_the_types_each_request_allows() -> None:
    with pytest.raises(ValidationError, match="'ephemeral' or 'persistent'"):
        WorkspaceSpec.model_validate({"type": "clone"})
    with pytest.raises(ValidationError, match="'inherit', 'clone' or 'ephemeral'"):
        SpawnRequest.model_validate({"prompt": "hi", "workspace": {"type": "persistent"}})
    assert SpawnRequest.model_validate({"prompt": "hi", "workspace": {"type": "clone"}})
