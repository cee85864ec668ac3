"""Topologies of the mesh simulator: builders, the benchmark's generator, JSON files, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tools.mesh.topology import (
    Link,
    Topology,
    TopologyError,
    bench_hops,
    from_spec,
    generate,
    grid,
    line,
    load,
    positions,
)


def loss(t: Topology, a: int, b: int) -> float:
    link = t.link(a, b)
    assert link is not None and link.latency_ms == 2.0
    return link.loss


def test_line_has_the_root_at_one_end() -> None:
    t = line(7, loss=0.1, latency_ms=3.0)
    assert t.root == 1 and sorted(t.nodes) == list(range(1, 8))
    assert len(t.links) == 6
    assert t.hops_from_root() == {i: i - 1 for i in range(1, 8)}
    assert t.link(3, 4) == Link(0.1, 3.0) and t.link(3, 5) is None
    assert t.neighbours(4) == [3, 5] and t.neighbours(1) == [2]


def test_grid_four_and_eight_neighbours() -> None:
    g = grid(3, 3)
    assert len(g.nodes) == 9 and len(g.links) == 12
    assert g.hops_from_root()[9] == 4  # the far corner
    assert g.neighbours(5) == [2, 4, 6, 8]
    d = grid(3, 3, diagonals=True)
    assert len(d.links) == 20 and d.hops_from_root()[9] == 2
    part = grid(3, 3, n=7)  # a partial last row
    assert sorted(part.nodes) == list(range(1, 8))
    assert all(n <= 7 for pair in part.links for n in pair)
    assert part.hops_from_root()[7] == 2


def test_positions_distance_loss_model() -> None:
    t = positions({1: (0, 0), 2: (5, 0), 3: (10, 0), 4: (30, 0)}, 10.0, 0.4, base_loss=0.1)
    assert loss(t, 1, 2) == pytest.approx(0.1 + 0.3 * 0.25)
    assert loss(t, 1, 3) == pytest.approx(0.4)  # exactly at the range: the edge loss
    assert t.link(3, 4) is None and t.neighbours(4) == []
    assert 4 not in t.hops_from_root()  # out of range of everyone
    listed = positions([(0, 0), (3, 4)], 10.0)  # ids 1, 2 in order
    assert loss(listed, 1, 2) == pytest.approx(0.3 * 0.25)
    with pytest.raises(TopologyError, match="radio_range"):
        positions([(0, 0)], 0.0)


def test_asymmetric_loss() -> None:
    t = Topology({1: (0, 0), 2: (1, 0)}, {frozenset((1, 2)): Link(0.1, 1.0, loss_back=0.6)})
    assert t.loss(1, 2) == 0.1 and t.loss(2, 1) == 0.6 and t.loss(1, 3) is None


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_generator_depth_backup_parents_and_determinism(seed: int) -> None:
    t = generate(30, hops=5, loss=0.1, seed=seed)
    hops = t.hops_from_root()
    assert len(t.nodes) == 30 and len(hops) == 30  # every node reachable
    assert max(hops.values()) == 5
    for n in t.nodes:
        if hops[n] >= 2:  # a layer before with two nodes: a backup parent exists
            closer = [m for m in t.neighbours(n) if hops[m] == hops[n] - 1]
            assert len(closer) >= 2, (n, closer)
        assert len(t.neighbours(n)) <= 19  # ESP-NOW's peer table (20 with broadcast)
    assert all(link.loss == 0.1 for link in t.links.values())
    again = generate(30, hops=5, loss=0.1, seed=seed)
    assert again.links == t.links and again.nodes == t.nodes
    assert generate(30, hops=5, seed=seed + 100).links != t.links


def test_generator_small_meshes_and_errors() -> None:
    t = generate(4, hops=3)
    assert max(t.hops_from_root().values()) == 3  # a line: backups are not possible
    assert bench_hops(30) == 5 and bench_hops(5) == 2 and bench_hops(2) == 1
    with pytest.raises(TopologyError, match="cannot span"):
        generate(3, hops=5)
    with pytest.raises(TopologyError, match="at least 2"):
        generate(1)


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    t = generate(12, hops=3, loss=0.2, seed=3)
    t.links[frozenset((1, 2))] = Link(0.05, 4.0, loss_back=0.5)
    path = tmp_path / "t.json"
    t.dump(path)
    back = load(path)
    assert back.nodes == t.nodes and back.links == t.links and back.root == t.root
    assert back.loss(2, 1) == 0.5


def test_load_positions_file_and_link_orientation(tmp_path: Path) -> None:
    p = tmp_path / "pos.json"
    p.write_text(
        json.dumps(
            {
                "root": 2,
                "positions": {"1": [0, 0], "2": [6, 8], "3": [100, 0]},
                "radio_range": 20,
                "loss_at_edge": 0.4,
            }
        )
    )
    t = load(p)
    assert t.root == 2 and loss(t, 1, 2) == pytest.approx(0.4 * 0.25)
    assert t.neighbours(3) == []
    q = tmp_path / "links.json"
    # "loss_back" is always the higher id -> lower id direction, whichever order a, b come in
    q.write_text(
        json.dumps({"nodes": [1, 2], "links": [{"a": 2, "b": 1, "loss": 0.3, "loss_back": 0.7}]})
    )
    t2 = load(q)
    assert t2.loss(2, 1) == 0.3 and t2.loss(1, 2) == 0.7


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([], "expected a JSON object"),
        ({"nodes": "x"}, "nodes: expected"),
        ({"nodes": {"a": [0, 0]}}, "node id 'a' is not an integer"),
        ({"nodes": {"0": [0, 0]}}, "not in 1..65534"),
        ({"nodes": {"1": [0]}}, r"nodes.1: expected \[x, y\]"),
        ({"nodes": {"1": [0, 0]}, "links": [{"a": 1, "b": 2}]}, "node 2 is not in nodes"),
        ({"nodes": {"1": [0, 0]}, "links": [{"a": 1, "b": 1}]}, "to itself"),
        ({"nodes": [1, 2], "links": [{"a": 1, "b": 2, "loss": 1.5}]}, r"links\[0\]\.loss"),
        ({"nodes": [1, 2], "links": [{"a": 1, "b": 2, "loss": "x"}]}, "expected a number"),
        ({"nodes": [1, 2], "links": [{"a": 1, "b": 2, "latency_ms": 500}]}, "latency_ms"),
        ({"nodes": [1, 2], "links": [{"a": 1, "b": 2, "lose": 0.1}]}, "unknown keys"),
        ({"nodes": [1, 2], "links": [{"a": 1, "b": 2}, {"a": 2, "b": 1}]}, "a second link"),
        ({"nodes": [1, 2], "links": {"a": 1}}, "links: expected a list"),
        ({"root": 5, "nodes": [1, 2]}, "root: node 5"),
        ({"root": "one", "nodes": [1, 2]}, "root: expected a node id"),
        ({"positions": {"1": [0, 0]}}, "radio_range: required"),
    ],
)
def test_bad_topology_files_name_the_problem(tmp_path: Path, obj: object, message: str) -> None:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(obj))
    with pytest.raises(TopologyError, match=message) as info:
        load(p)
    assert str(p) in str(info.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="No such file"):
        load(tmp_path / "missing.json")
    p = tmp_path / "bad.json"
    p.write_text("{nope")
    with pytest.raises(TopologyError, match="not JSON"):
        load(p)


def test_builders_reject_bad_values() -> None:
    with pytest.raises(TopologyError, match="at least 1 node"):
        line(0)
    with pytest.raises(TopologyError, match="loss"):
        line(3, loss=2.0)
    with pytest.raises(TopologyError, match="does not fit"):
        grid(2, 2, n=5)
    with pytest.raises(TopologyError, match="unknown node"):
        Topology({1: (0.0, 0.0)}, {frozenset((1, 2)): Link()})


def test_from_spec(tmp_path: Path) -> None:
    assert len(from_spec("line", 5).links) == 4
    g = from_spec("grid", 10, 0.2)
    assert len(g.nodes) == 10 and math.isclose(next(iter(g.links.values())).loss, 0.2)
    b = from_spec("bench", 30, 0.1, seed=2)
    assert max(b.hops_from_root().values()) == 5
    path = tmp_path / "t.json"
    line(3, loss=0.5).dump(path)
    assert from_spec(str(path), 99).link(1, 2) == Link(0.5, 2.0)  # a file keeps its losses
    assert from_spec(str(path), 99, 0.0).link(1, 2) == Link(0.0, 2.0)  # unless told
    with pytest.raises(TopologyError, match=r"loss must be in 0\.\.1"):
        from_spec("line", 3, 1.5)
    with pytest.raises(TopologyError, match="not line, grid, bench or a topology file"):
        from_spec("ring", 3)
