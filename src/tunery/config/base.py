"""Shared pydantic base: unknown keys are errors, values are validated on assignment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every config section; `extra="forbid"` turns typos into errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
