"""The ordered list of conversation items, addressed by id."""

from __future__ import annotations

from ..protocol.errors import ProtocolError
from ..protocol.items import Item


class Conversation:
    """Items in order; `previous_item_id` semantics of the Realtime API ("root" = the start)."""

    def __init__(self, conversation_id: str):
        self.id = conversation_id
        self._items: list[Item] = []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(list(self._items))

    def get(self, item_id: str) -> Item | None:
        for item in self._items:
            if item.id == item_id:
                return item
        return None

    def require(self, item_id: str, param: str = "item_id") -> Item:
        item = self.get(item_id)
        if item is None:
            raise ProtocolError(f"Item with item_id '{item_id}' not found in the conversation.",
                                code="item_not_found", param=param)
        return item

    def last_id(self) -> str | None:
        return self._items[-1].id if self._items else None

    def previous_id(self, item_id: str) -> str | None:
        for i, item in enumerate(self._items):
            if item.id == item_id:
                return self._items[i - 1].id if i else None
        return None

    def insert(self, item: Item, previous_item_id: str | None = None) -> str | None:
        """Insert after `previous_item_id` (end when None, start when "root"); returns the actual previous id."""
        if item.id is not None and self.get(item.id) is not None:
            raise ProtocolError(f"Item with id '{item.id}' already exists in the conversation.",
                                code="item_already_exists", param="item.id")
        if previous_item_id is None:
            index = len(self._items)
        elif previous_item_id == "root":
            index = 0
        else:
            self.require(previous_item_id, "previous_item_id")
            index = next(i for i, it in enumerate(self._items) if it.id == previous_item_id) + 1
        self._items.insert(index, item)
        return self._items[index - 1].id if index else None

    def delete(self, item_id: str) -> Item:
        item = self.require(item_id)
        self._items.remove(item)
        return item
