"""How the ledger's records are stored: msgpack, one decoder per stored type, shared by both backends.

A stored blob is written by one backend version and read back by the same or a later one, so the
types here are the on-disk format: a field may be added with a default, never renamed or removed.
"""

from __future__ import annotations

import msgspec

from runtime.economy.buckets import BucketState
from runtime.economy.ledger import JournalEntry, Op, PostOffer, RecordUsage, Standing, TaskState
from runtime.economy.ledger.checkpoint import Checkpoint

encode = msgspec.msgpack.Encoder().encode
entry = msgspec.msgpack.Decoder(JournalEntry)
op = msgspec.msgpack.Decoder(Op)
usage = msgspec.msgpack.Decoder(RecordUsage)
buckets = msgspec.msgpack.Decoder(dict[str, BucketState])
offer = msgspec.msgpack.Decoder(PostOffer)
task = msgspec.msgpack.Decoder(TaskState)
standing: msgspec.msgpack.Decoder[Standing] = msgspec.msgpack.Decoder(Standing)
checkpoint = msgspec.msgpack.Decoder(Checkpoint)
