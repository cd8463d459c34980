"""Which metadata store owns a node: so that a copy of a home never deletes the original's blocks.

The danger: `cp -a home copy` makes a second metadata store with the same
filesystem uuid whose ring names the same nodes (their absolute paths or
URLs).  Each store takes the blocks only the other knows for strays, and the
blocks only it dropped for garbage, so a repair, a rebalance or a garbage
collection run from either deletes blocks the other still uses.

The scheme (DESIGN: a node directory holds a small identity file):

- Every metadata store has an owner token (random: `new_token`), given at mkfs
  and anew by `hafs node adopt`.  Each node records the token of the store that
  owns it ("owner" in a backing directory's identity file, the same in a `hafs
  node`'s directory), and "owner_where", where that store is, for messages.
- An SQLite store also records the identity of its own file (device, inode,
  path) when it gets its token, so a copy of meta.db, another file, knows
  itself a copy (hafs.meta.sqlite); every command that changes the nodes
  refuses a copy (hafs.home.owner_claim).  A move of the home on its disk
  keeps the file's inode: that is still the store (the new path is recorded).
- A store opening its nodes to change things presents an `OwnerClaim`.  A node
  that records its token is its own.  One that records none (made before
  owners were recorded: the first store that claims it adopts it) or a token
  the store held before (`previous`: a node that was down while the store was
  adopted) is switched to it.  One that records another token belongs to
  another store: opening it is refused (NodeOwnedElsewhere).  `hafs node
  adopt` switches every node unconditionally: the user says that this store is
  the filesystem, so every other store of those nodes is refused from then on.
- Deletes are what a non-owner must never make: a DirStore given a claim
  checks the identity file before each delete (a stat; read again only when it
  changed), and a `hafs node` refuses a DELETE whose ``Hafs-Owner`` header is
  not its owner (403), so a store that lost its nodes to an adopted copy while
  mounted cannot delete either (NotOwner).  Reads and writes are not refused: a
  read-only mount of a copy reads the nodes, and a block written is harmless.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what a node accepts as an owner token
WHERE_MAX = 1024  # the longest "owner_where" a node keeps


def new_token() -> str:
    """A new owner token: 128 random bits in hex."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class OwnerClaim:
    """What a metadata store presents to its nodes (see the module docstring)."""

    token: str
    where: str = ""  # the store's location, for the messages of those it locks out
    previous: frozenset[str] = frozenset()  # tokens the store held before

    def takes(self, recorded: str | None) -> bool:
        """Whether a node recording `recorded` as its owner is switched to this store."""
        return recorded is None or recorded in self.previous


def foreign(what: str, where: str | None) -> str:
    """The message for a node (`what`) that belongs to the store at `where`."""
    return (
        f"{what} belongs to another metadata store of this filesystem"
        f" ({where or 'location unknown'}): this one must not change it. If this store is the"
        " filesystem to keep (the other a copy, or gone), make it the owner with 'hafs node"
        " adopt'"
    )
