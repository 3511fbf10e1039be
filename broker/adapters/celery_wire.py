"""A Celery task message, written by hand so the webhook edge never imports Celery.

Celery's `apply_async` in the request path was measured by the team at ~0.2 of the
durable floor (issue 2); building the message here and pushing it in the same Redis call
as the delivery record makes the accept atomic and fast. The envelope is kombu's
Redis transport format carrying Celery's task protocol v2. tests/adapters/test_taskmessage.py
holds it to what Celery itself produces and runs it on a real worker.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import orjson

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _uuid4() -> str:
    """A random (version 4) UUID as text, like str(uuid.uuid4()) at a third of its cost (the edge's hot path)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


def task_message(*, task: str, task_id: str, args: list[Any], queue: str, origin: str) -> str:
    """JSON text to LPUSH onto the Redis list named `queue` (priority 0)."""
    body = orjson.dumps([args, {}, _EMBED])
    headers = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr(args),
        "kwargsrepr": "{}",
        "origin": origin,
        "ignore_result": False,
    }
    envelope = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": _uuid4(),
        },
    }
    return orjson.dumps(envelope).decode()


_MARK = "~~cibroker-%s~~"  # plain ASCII markers: JSON and repr() leave them as they are


class MessageTemplate:
    """`task_message` for one task, queue and origin whose only argument is the task id (the edge's case).

    The envelope is serialised once, by `task_message` itself, with markers where the per-message
    values go, and cut at them; a message is then one join of the pieces and the values. The
    result is byte for byte what `task_message` writes (tests/adapters/test_taskmessage.py holds both to
    Celery's own output).
    """

    def __init__(self, *, task: str, queue: str, origin: str) -> None:
        marks = {name: _MARK % name for name in ("id", "body", "tag")}
        if any(m in task + queue + origin for m in marks.values()):
            raise ValueError("task, queue and origin cannot hold the template's markers")
        text = task_message(task=task, task_id=marks["id"], args=[marks["id"]], queue=queue, origin=origin)
        envelope = orjson.loads(text)
        text = text.replace(envelope["body"], marks["body"]).replace(envelope["properties"]["delivery_tag"], marks["tag"])
        pieces: list[str] = []
        self._slots: list[str] = []
        rest = text
        while True:
            found = [(rest.find(m), name) for name, m in marks.items() if rest.find(m) >= 0]
            if not found:
                break
            at, name = min(found)
            pieces.append(rest[:at])
            self._slots.append(name)
            rest = rest[at + len(marks[name]):]
        pieces.append(rest)
        self._pieces = pieces

    def render(self, task_id: str) -> str:
        """The message for `task_id` (a delivery id: lower-case hex, so nothing in it needs escaping)."""
        values = {"id": task_id, "body": base64.b64encode(orjson.dumps([[task_id], {}, _EMBED])).decode("ascii"),
                  "tag": _uuid4()}
        out = [self._pieces[0]]
        for slot, piece in zip(self._slots, self._pieces[1:]):
            out.append(values[slot])
            out.append(piece)
        return "".join(out)
