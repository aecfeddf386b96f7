"""Conversation items and their content parts, validated per item type and role."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ItemStatus = Literal["completed", "incomplete", "in_progress"]

_PART_TYPES_BY_ROLE = {
    "system": {"input_text"},
    "user": {"input_text", "input_audio", "input_image"},
    "assistant": {"output_text", "output_audio"},
}
# Beta-era / spec-document aliases accepted from clients, stored under the GA names.
_PART_ALIASES = {"text": "output_text", "audio": "output_audio"}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text", "input_audio", "input_image", "output_text", "output_audio", "text", "audio"]
    text: str | None = None
    audio: str | None = None
    transcript: str | None = None
    image_url: str | None = None
    detail: Literal["auto", "low", "high"] | None = None

    def wire(self, *, with_audio: bool = False) -> dict[str, Any]:
        """The fields the hosted API sends for this part type (`transcript: null` until known)."""
        if self.type in ("input_text", "output_text", "text"):
            return {"type": self.type, "text": self.text or ""}
        if self.type == "input_image":
            return {"type": self.type, "image_url": self.image_url, "detail": self.detail or "auto"}
        data: dict[str, Any] = {"type": self.type, "transcript": self.transcript}
        if with_audio and self.audio is not None:
            data["audio"] = self.audio
        return data


ItemType = Literal["message", "function_call", "function_call_output", "mcp_list_tools", "mcp_call",
                   "mcp_approval_request", "mcp_approval_response"]
# MCP items the server writes itself (listing, calls, approval requests): a client only answers them.
SERVER_MCP_ITEMS = ("mcp_list_tools", "mcp_call", "mcp_approval_request")
_MCP_FIELDS = ("server_label", "tools", "error", "approval_request_id", "approve", "reason")


class Item(BaseModel):
    """A conversation item: message, function_call, function_call_output, or one of the MCP items."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, min_length=1, max_length=64)
    type: ItemType
    object: Literal["realtime.item"] | None = None
    status: ItemStatus | None = None
    role: Literal["system", "user", "assistant"] | None = None
    content: list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None
    # MCP items (see SERVER_MCP_ITEMS and mcp_approval_response).
    server_label: str | None = None
    tools: list[dict[str, Any]] | None = None
    error: dict[str, Any] | None = None
    approval_request_id: str | None = None
    approve: bool | None = None
    reason: str | None = None

    @model_validator(mode="after")
    def _check_shape(self) -> Item:
        if self.type.startswith("mcp_"):
            return self._check_mcp_shape()
        for field in _MCP_FIELDS:
            if getattr(self, field) is not None:
                raise ValueError(f"'{field}' is not valid on {self.type} items")
        if self.type == "message":
            if self.role is None:
                raise ValueError("message items need a role: 'system', 'user' or 'assistant'")
            if self.content is None:
                raise ValueError("message items need a content array")
            allowed = _PART_TYPES_BY_ROLE[self.role]
            for i, part in enumerate(self.content):
                if part.type in _PART_ALIASES and self.role == "assistant":
                    part.type = _PART_ALIASES[part.type]  # type: ignore[assignment]
                if part.type not in allowed:
                    raise ValueError(
                        f"content[{i}].type '{part.type}' is not allowed for role '{self.role}'; "
                        f"use one of {sorted(allowed)}"
                    )
                if part.type in ("input_text", "output_text") and part.text is None:
                    raise ValueError(f"content[{i}] of type '{part.type}' needs 'text'")
            for field in ("call_id", "name", "arguments", "output"):
                if getattr(self, field) is not None:
                    raise ValueError(f"'{field}' is not valid on message items")
        else:
            if self.role is not None or self.content is not None:
                raise ValueError(f"'{self.type}' items take no role or content")
            if not self.call_id:
                raise ValueError(f"'{self.type}' items need a call_id")
            if self.type == "function_call" and (self.name is None or self.arguments is None):
                raise ValueError("function_call items need 'name' and 'arguments'")
            if self.type == "function_call_output" and self.output is None:
                raise ValueError("function_call_output items need 'output'")
        return self

    def _check_mcp_shape(self) -> Item:
        if self.role is not None or self.content is not None or self.call_id is not None:
            raise ValueError(f"'{self.type}' items take no role, content or call_id")
        if self.type == "mcp_approval_response":
            if not self.approval_request_id or self.approve is None:
                raise ValueError("mcp_approval_response items need 'approval_request_id' and 'approve'")
        elif not self.server_label:
            raise ValueError(f"'{self.type}' items need a 'server_label'")
        elif self.type == "mcp_list_tools" and self.tools is None:
            raise ValueError("mcp_list_tools items need 'tools'")
        elif self.type in ("mcp_call", "mcp_approval_request") and (self.name is None or self.arguments is None):
            raise ValueError(f"{self.type} items need 'name' and 'arguments'")
        return self

    def _mcp_wire(self) -> dict[str, Any]:
        """The MCP item shapes of `openai.types.realtime` (the JS SDK needs `output` even when null)."""
        data: dict[str, Any] = {"id": self.id, "type": self.type}
        if self.type == "mcp_approval_response":
            data.update(approval_request_id=self.approval_request_id, approve=bool(self.approve))
            if self.reason is not None:
                data["reason"] = self.reason
        elif self.type == "mcp_list_tools":
            data.update(server_label=self.server_label, tools=self.tools or [])
        else:
            data.update(server_label=self.server_label, name=self.name or "", arguments=self.arguments or "")
            if self.type == "mcp_call":
                data.update(approval_request_id=self.approval_request_id, error=self.error, output=self.output)
        return data

    def wire(self, *, with_audio: bool = False) -> dict[str, Any]:
        """The item as the hosted API sends it: every field of its type present, `null` if not known yet.

        Strict clients (the `@openai/agents` JS SDK's zod schemas) require keys such as an audio
        part's `transcript` even before the transcript exists. Audio bytes are left out unless
        `with_audio` (only `conversation.item.retrieved` carries them).
        """
        if self.type.startswith("mcp_"):
            return self._mcp_wire()
        data: dict[str, Any] = {"id": self.id, "type": self.type, "object": "realtime.item"}
        if self.type == "message":
            data["status"] = self.status or "completed"
            data["role"] = self.role
            data["content"] = [part.wire(with_audio=with_audio) for part in self.content or []]
        elif self.type == "function_call":
            data.update(status=self.status or "completed", name=self.name or "", call_id=self.call_id or "",
                        arguments=self.arguments or "")
        else:
            data.update(call_id=self.call_id or "", output=self.output or "")
        return data

    def text_for_model(self) -> str:
        """What the LLM sees of this message: text, or the transcript of audio."""
        out = []
        for part in self.content or []:
            value = part.text if part.type in ("input_text", "output_text") else part.transcript
            if value:
                out.append(value)
        return "".join(out) if self.role == "assistant" else "\n".join(out)
