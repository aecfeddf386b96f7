"""Which content parts a session's model can read: ``input_image`` only reaches a vision model.

Local llama.cpp models are text-only, and a remote provider reads images only when it is
configured ``vision = true``. An image the model cannot see is never dropped silently (the model
would answer as if the user had sent nothing, or only the text beside it): the client gets an
``error`` (``invalid_request_error`` / ``unsupported_content``, ``param`` naming the content
part). ``check_item`` refuses such an item at ``conversation.item.create`` (nothing is stored);
``check_items`` refuses a response whose input still holds one (an item stored while a vision
model served the session, or given inline in ``response.input``), before anything is generated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..protocol.errors import ProtocolError
from ..protocol.items import Item

UNSUPPORTED_CONTENT = "unsupported_content"


def image_parts(item: Item) -> list[int]:
    """Indices of the item's ``input_image`` content parts."""
    return [i for i, part in enumerate(item.content or []) if part.type == "input_image"]


def accepts_images(check: Callable[[str | None], bool] | None, model: str | None) -> bool:
    """Whether the model serving ``model`` reads images (no check configured: text-only)."""
    if check is None:
        return False
    try:
        return bool(check(model))
    except Exception:  # an unknown model is reported elsewhere (model_not_found); it reads no images
        return False


def _refusal(model: str | None, param: str, item_id: str | None, at_create: bool) -> ProtocolError:
    message = (f"The model '{model or 'default'}' is text-only: it cannot read input_image content "
               "(on this server only a remote provider configured with vision = true reads images).")
    if not at_create:
        message += f" Item '{item_id}' holds an image: delete it (conversation.item.delete) to go on."
    return ProtocolError(message, code=UNSUPPORTED_CONTENT, param=param)


def check_item(item: Item, check: Callable[[str | None], bool] | None, model: str | None,
               param: str = "item") -> None:
    """Raise ProtocolError for an item with an image the session's model cannot read."""
    images = image_parts(item)
    if images and not accepts_images(check, model):
        raise _refusal(model, f"{param}.content[{images[0]}]", item.id, at_create=True)


def check_items(items: Iterable[Item], check: Callable[[str | None], bool] | None, model: str | None,
                param: Callable[[int, Item], str] | None = None) -> None:
    """Raise ProtocolError when a response's input holds an image its model cannot read.

    ``param(index, item)`` names the item for the client (default: ``item.content[N]``).
    """
    allowed: bool | None = None
    for n, item in enumerate(items):
        images = image_parts(item) if item.type == "message" else []
        if not images:
            continue
        if allowed is None:
            allowed = accepts_images(check, model)
        if not allowed:
            where = param(n, item) if param is not None else "item"
            raise _refusal(model, f"{where}.content[{images[0]}]", item.id, at_create=False)
