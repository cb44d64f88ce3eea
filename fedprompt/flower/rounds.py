"""What the server's two kinds of Flower round share, plain rounds (``flower.strategy``) and
securely aggregated ones (``flower.secure_round``): the host a round runs for, the error that
stops a run with too few clients, the matching of replies to the messages sent, and the note of
the round whose once-only uploads were asked for."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from flwr.app import Message

from fedprompt.federation.server import RoundRecord, Server
from fedprompt.files import write_text_atomically

log = logging.getLogger("fedprompt.flower")


class NotEnoughClientsError(RuntimeError):
    """A round ended with fewer valid updates than ``federation.min_clients``."""


class RoundHost(Protocol):
    """What a round reads and writes on the strategy that runs it: the fedprompt server, the node
    hosting each client's partition, the messages' time to live, and the last round's record."""

    server: Server
    nodes: dict[int, int]
    message_ttl: float | None
    last_record: RoundRecord | None
    before_uploads: Callable[[int], None] | None
    """Called with the round just before it asks sites for what their ledgers answer once per round
    (masked inputs; local-DP updates): the ServerApp notes it in the run folder, and a resumed run
    skips that round rather than ask again."""


def match_replies(messages: dict[int, Message], replies: Iterable[Message]) -> dict[int, Message | None]:
    """Client id -> its reply (None when none came), matched on the id of the message replied to.

    Matching on the message id, not the sender, also places the errors the SuperLink writes for
    nodes that went offline (they come from the SuperLink's own node id).
    """
    by_message = {message.metadata.message_id: cid for cid, message in messages.items()}
    matched: dict[int, Message | None] = dict.fromkeys(messages)
    for reply in replies:
        cid = by_message.get(reply.metadata.reply_to_message_id)
        if cid is None or matched[cid] is not None:
            log.warning("ignoring a reply to unknown message %r", reply.metadata.reply_to_message_id)
            continue
        matched[cid] = reply
    return matched


UPLOADS_FILE = "uploads-round.json"
"""Run-folder file naming the round whose once-only uploads (masked inputs, local-DP updates) were
last asked for."""


def note_uploads(folder: Path, round_num: int) -> None:
    """Note in the run folder that round ``round_num``'s once-only uploads are being asked for."""
    write_text_atomically(folder / UPLOADS_FILE, json.dumps({"round": round_num}) + "\n")


def uploads_round(folder: Path) -> int | None:
    """The round whose once-only uploads were last asked for (None: no note)."""
    path = folder / UPLOADS_FILE
    if not path.is_file():
        return None
    return int(json.loads(path.read_text())["round"])
