"""The placement ring: determinism, distinct nodes and zones, spread, minimal movement."""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from collections.abc import Iterator

import pytest
from blake3 import blake3

from hafs.store.ring import NodeSpec, Ring


def keys(n: int, seed: int = 0) -> Iterator[str]:
    """`n` deterministic block ids shaped like real ones (64 lower-case hex chars)."""
    rng = random.Random(seed)
    for _ in range(n):
        yield f"{rng.getrandbits(256):064x}"


def nodes(n: int, **kw: object) -> list[NodeSpec]:
    return [NodeSpec(f"n{i}", f"/srv/hafs/n{i}", **kw) for i in range(1, n + 1)]  # type: ignore[arg-type]


def primary_counts(ring: Ring, n_keys: int, seed: int = 0) -> Counter[str]:
    return Counter(ring.replicas(k, 1)[0] for k in keys(n_keys, seed))


# --- determinism -------------------------------------------------------------------------


def test_same_nodes_same_replicas_whatever_the_order() -> None:
    specs = nodes(6)
    a = Ring(specs)
    shuffled = specs[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != specs
    b = Ring(shuffled)
    c = Ring(list(reversed(specs)), version=9)  # the version does not change placement
    for k in keys(5000, seed=1):
        ra = a.replicas(k, 3)
        assert ra == b.replicas(k, 3) == c.replicas(k, 3)
        assert list(a.walk(k)) == list(b.walk(k))
    assert list(a.nodes) == list(b.nodes) == [f"n{i}" for i in range(1, 7)]


def test_placement_is_pinned() -> None:
    # A change of the hash scheme moves every block: catch it here, not in production.
    ring = Ring(nodes(5))
    got = [ring.replicas(blake3(str(i).encode()).hexdigest(), 2) for i in range(4)]
    assert got == PINNED


PINNED = [["n4", "n3"], ["n2", "n5"], ["n3", "n1"], ["n2", "n4"]]


def test_key_position_uses_the_first_16_hex_digits() -> None:
    ring = Ring(nodes(4))
    k = "0123456789abcdef" + "0" * 48
    assert ring.replicas(k, 4) == ring.replicas("0123456789abcdef" + "f" * 48, 4)


# --- distinct nodes, r, zones ------------------------------------------------------------


def test_replicas_are_distinct_and_primary_first() -> None:
    ring = Ring(nodes(5))
    for k in keys(10_000, seed=2):
        reps = ring.replicas(k, 3)
        assert len(reps) == 3 == len(set(reps))
        assert ring.replicas(k, 1) == reps[:1]
        assert ring.replicas(k, 2) == reps[:2]
        assert reps == list(ring.walk(k))[:3]  # no zones, all up: the walk's head


def test_r_larger_than_node_count_returns_all_nodes() -> None:
    ring = Ring(nodes(3))
    for k in keys(1000, seed=3):
        reps = ring.replicas(k, 5)
        assert sorted(reps) == ["n1", "n2", "n3"]
    assert ring.replicas(next(keys(1)), 0) == []


def test_three_zones_of_two_nodes_r3_uses_three_zones() -> None:
    specs = [
        NodeSpec(f"n{i}", f"/d{i}", zone=z)
        for i, z in enumerate(["a", "a", "b", "b", "c", "c"], start=1)
    ]
    ring = Ring(specs)
    zone = {n.id: n.zone for n in specs}
    per_node: Counter[str] = Counter()
    for k in keys(20_000, seed=4):
        reps = ring.replicas(k, 3)
        assert len(set(reps)) == 3
        assert {zone[n] for n in reps} == {"a", "b", "c"}
        two = ring.replicas(k, 2)
        assert two == reps[:2] and zone[two[0]] != zone[two[1]]
        per_node.update(reps)
    # Both nodes of each zone share that zone's load (each holds 1/2 of the keys).
    for n in zone:
        assert abs(per_node[n] / 20_000 - 0.5) < 0.05, per_node


def test_two_zones_r3_covers_both_zones() -> None:
    specs = [
        NodeSpec(f"n{i}", f"/d{i}", zone=z) for i, z in enumerate(["a", "a", "b", "b"], start=1)
    ]
    ring = Ring(specs)
    zone = {n.id: n.zone for n in specs}
    for k in keys(20_000, seed=5):
        reps = ring.replicas(k, 3)
        assert len(set(reps)) == 3
        assert {zone[n] for n in reps} == {"a", "b"}
        assert zone[reps[0]] != zone[reps[1]]  # the first pass takes one node per zone


def test_unzoned_nodes_count_as_their_own_zone() -> None:
    specs = [
        NodeSpec("n1", "/d1", zone="a"),
        NodeSpec("n2", "/d2", zone="a"),
        NodeSpec("n3", "/d3"),
    ]
    ring = Ring(specs)
    for k in keys(5000, seed=6):
        reps = ring.replicas(k, 2)
        assert "n3" in reps and len(set(reps)) == 2


# --- load spread -------------------------------------------------------------------------


def test_spread_ten_equal_nodes_one_million_keys() -> None:
    n_keys = 1_000_000
    counts = primary_counts(Ring(nodes(10)), n_keys, seed=10)
    mean = n_keys / 10
    assert sum(counts.values()) == n_keys and len(counts) == 10
    spread = max(counts.values()) / mean
    assert spread <= 1.10, (spread, counts)
    assert min(counts.values()) / mean >= 0.90, counts
    assert statistics.pstdev(counts.values()) / mean <= 0.04, counts  # measured: 0.015


def test_weighted_node_gets_its_share() -> None:
    specs = nodes(10)
    specs[0] = NodeSpec("n1", "/d1", weight=2)
    n_keys = 300_000
    counts = primary_counts(Ring(specs), n_keys, seed=11)
    unit = n_keys / 11  # weights sum to 11
    assert abs(counts["n1"] / (2 * unit) - 1) <= 0.10, counts
    others = [counts[f"n{i}"] for i in range(2, 11)]
    assert counts["n1"] / statistics.mean(others) == pytest.approx(2, rel=0.10)
    assert all(abs(c / unit - 1) <= 0.10 for c in others), counts


def test_weight_zero_gets_nothing_but_is_walked_last() -> None:
    specs = [*nodes(3), NodeSpec("n4", "/d4", weight=0)]
    ring = Ring(specs)
    for k in keys(2000, seed=12):
        assert "n4" not in ring.replicas(k, 3)
        assert list(ring.walk(k))[-1] == "n4"


# --- minimal movement --------------------------------------------------------------------


def test_adding_a_node_moves_a_quarter_and_only_to_the_new_node() -> None:
    old = Ring(nodes(3), version=1)
    new = Ring(nodes(4), version=2)
    n_keys, r = 100_000, 2
    moved = 0
    for k in keys(n_keys, seed=20):
        before, after = set(old.replicas(k, r)), set(new.replicas(k, r))
        gained, lost = after - before, before - after
        # Every change involves the new node: nothing moves between two old nodes.
        assert gained <= {"n4"}, (k, before, after)
        assert len(lost) == len(gained)
        moved += len(lost)
    fraction = moved / (n_keys * r)
    assert abs(fraction / 0.25 - 1) <= 0.10, fraction  # measured: 0.247


def test_removing_a_node_moves_only_its_assignments() -> None:
    old = Ring(nodes(4))
    new = Ring(nodes(3))
    for k in keys(20_000, seed=21):
        before, after = old.replicas(k, 2), new.replicas(k, 2)
        if "n4" not in before:
            assert after == before
        else:
            assert set(before) - {"n4"} <= set(after)


def test_draining_node_gets_nothing_but_is_still_walked() -> None:
    specs = nodes(4)
    drained = Ring([*specs[:3], NodeSpec("n4", "/srv/hafs/n4", state="draining")])
    removed = Ring(specs[:3])
    saw_n4_first = 0
    for k in keys(20_000, seed=22):
        reps = drained.replicas(k, 2)
        assert "n4" not in reps
        assert reps == removed.replicas(k, 2)  # draining places exactly as removal would
        assert drained.replicas(k, 9) == removed.replicas(k, 9)
        walked = list(drained.walk(k))
        assert sorted(walked) == ["n1", "n2", "n3", "n4"]
        saw_n4_first += walked[0] == "n4"
    assert saw_n4_first > 0.2 * 20_000  # it keeps its place in the walk for failover reads


def test_all_nodes_draining_places_nowhere() -> None:
    ring = Ring(nodes(2, state="draining"))
    k = next(keys(1))
    assert ring.replicas(k, 2) == []
    assert sorted(ring.walk(k)) == ["n1", "n2"]


# --- JSON and validation -----------------------------------------------------------------


def test_json_round_trip() -> None:
    specs = [
        NodeSpec("n1", "/d1"),
        NodeSpec("n2", "http://10.0.0.2:7070", weight=2, zone="b"),
        NodeSpec("n3", "/d3", weight=0.5, zone="a", state="draining"),
    ]
    ring = Ring(specs, version=7)
    d = json.loads(json.dumps(ring.to_json()))
    assert d["version"] == 7
    assert [n["id"] for n in d["nodes"]] == ["n1", "n2", "n3"]
    assert d["nodes"][1] == {
        "id": "n2",
        "address": "http://10.0.0.2:7070",
        "weight": 2.0,
        "zone": "b",
        "state": "up",
    }
    back = Ring.from_json(d)
    assert back == ring and back.version == 7 and back.nodes == ring.nodes
    for k in keys(2000, seed=30):
        assert back.replicas(k, 2) == ring.replicas(k, 2)
        assert list(back.walk(k)) == list(ring.walk(k))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Ring([]), "at least one node"),
        (lambda: Ring([NodeSpec("n1", "/a"), NodeSpec("n1", "/b")]), "duplicate node id 'n1'"),
        (lambda: NodeSpec("n1", "/a", weight=-1), "weight must be finite and >= 0"),
        (lambda: NodeSpec("n1", "/a", weight=float("nan")), "weight must be finite"),
        (lambda: NodeSpec("n1", "/a", state="down"), "state must be one of"),
        (lambda: NodeSpec("", "/a"), "non-empty string"),
        (lambda: Ring(nodes(2, weight=0)), "no node has a positive weight"),
        (lambda: Ring(nodes(2), version=-1), "version"),
        (lambda: Ring.from_json({"nodes": []}), "'version' and 'nodes'"),
        (lambda: Ring.from_json({"version": 1, "nodes": []}), "at least one node"),
        (
            lambda: Ring.from_json({"version": 1, "nodes": [{"id": "n1", "addr": "/a"}]}),
            "bad node entry",
        ),
        (
            lambda: Ring.from_json(
                {"version": 1, "nodes": [{"id": "n1", "address": "/a", "weight": -2}]}
            ),
            "weight must be finite and >= 0",
        ),
        (lambda: Ring(nodes(2)).replicas("abc", 2), "64 hex characters"),
        (lambda: Ring(nodes(2)).replicas("x" * 64, 2), "invalid literal"),
    ],
)
def test_bad_input_is_a_clear_value_error(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
