"""Which decode requests read the same cached prefix, found from the radix tree.

A request's row of the request-to-token table begins with the slots of its path in the tree (root →
last_node), so two requests whose paths share a node hold identical slots up to that node's end. Each
request joins the group of the deepest node on its path that another request of the batch also
passes through, if that node ends at least `min_shared` tokens in; cascade attention then reads that
prefix once for the whole group.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rlserve.engine.request import Request

MIN_SHARED_TOKENS = 256     # shorter shared prefixes save too little to pay for a second kernel


@dataclass
class PrefixGroups:
    members: list[list[int]]    # batch indices of each group's requests
    lengths: list[int]          # tokens of each group's shared prefix
    rows: list[int]             # a member's table row, to read the shared slots from
    starts: list[int]           # per batch index: where its own part begins (0: in no group)

    @property
    def saved_tokens(self) -> int:
        """KV tokens per layer that this step doesn't read again."""
        return sum((len(m) - 1) * n for m, n in zip(self.members, self.lengths))


def _path(req: Request) -> list[tuple[object, int]]:
    """(node, tokens from the root to the node's end) along req's cached path, root side first."""
    nodes = []
    node = req.last_node
    while node is not None and node.parent is not None:
        nodes.append(node)
        node = node.parent
    out, depth = [], 0
    for n in reversed(nodes):
        depth += len(n.key)
        out.append((n, depth))
    return out


def find_prefix_groups(reqs: Sequence[Request], max_members: int,
                       min_shared: int = MIN_SHARED_TOKENS) -> PrefixGroups | None:
    paths = [_path(r) for r in reqs]
    users: dict[int, int] = {}
    for path in paths:
        for node, _ in path:
            users[id(node)] = users.get(id(node), 0) + 1
    by_node: dict[int, tuple[int, list[int]]] = {}
    for i, path in enumerate(paths):
        for node, depth in reversed(path):
            if depth < min_shared:
                break
            if users[id(node)] >= 2:
                by_node.setdefault(id(node), (depth, []))[1].append(i)
                break
    groups = PrefixGroups([], [], [], [0] * len(reqs))
    for depth, members in by_node.values():
        for at in range(0, len(members), max_members):
            chunk = members[at:at + max_members]
            if len(chunk) < 2:
                continue
            groups.members.append(chunk)
            groups.lengths.append(depth)
            groups.rows.append(reqs[chunk[0]].row)  # type: ignore[arg-type]  # running requests hold a row
            for i in chunk:
                groups.starts[i] = depth
    return groups if groups.members else None
