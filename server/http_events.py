"""``/v1/models/global/events`` and ``/rollout``: the serving plane's history and state.

Read-only views of the registry's event log and of the rollout state file the
ServerApp writes (``server.rollout_state``); both are public like every read.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from server.http_deps import SettingsDep
from server.http_models import PREFIX, AliasName, ErrorBody
from server.registry import RegistryEvent
from server.rollout_state import RolloutState, read_state

router = APIRouter(prefix=PREFIX, tags=["serving plane"])


class EventPage(BaseModel):
    items: list[RegistryEvent]
    total: int = Field(description="Events matching the filter.")
    offset: int
    limit: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")


@router.get("/events", response_model=EventPage, summary="Alias moves and rollout verdicts")
def list_events(
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    alias: Annotated[AliasName | None, Query(description="Only this alias's events.")] = None,
) -> Any:
    events = settings.registry.events()
    if alias is not None:
        events = [e for e in events if e.alias == alias]
    page = events[offset : offset + limit]
    return EventPage(
        items=page,
        total=len(events),
        offset=offset,
        limit=limit,
        next_offset=offset + limit if offset + limit < len(events) else None,
    )


@router.get(
    "/rollout",
    response_model=RolloutState,
    responses={404: {"model": ErrorBody, "description": "No rollout is active"}},
    summary="The rollout in progress: candidate, step, share, last analysis",
)
def rollout_state(settings: SettingsDep) -> Any:
    state = read_state(settings.registry.root)
    if state is None:
        return JSONResponse(
            {
                "detail": "no rollout is active: this run serves under the 'immediate' policy "
                "(or has not started); set [rollout] policy = 'canary' to roll out gradually"
            },
            status_code=404,
        )
    if not state.active:
        last = state.note or state.phase
        return JSONResponse(
            {
                "detail": f"no rollout is active (policy {state.policy}, {state.phase}: {last}); "
                f"serving is version {state.serving_version}"
            },
            status_code=404,
        )
    return state
