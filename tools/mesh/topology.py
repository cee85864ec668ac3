"""Mesh topologies for the simulator: node ids, positions and lossy links, their builders and
their JSON files (docs/mesh-sim.md "Topologies").

Links are symmetric by default (`Link.loss` both ways); `Link.loss_back`, when set, is the loss
from the higher id to the lower one, so a link can be asymmetric. The root is node 1 unless
told otherwise.
"""

from __future__ import annotations

import json
import math
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from gateway.errors import FogmeshError

__all__ = [
    "DEFAULT_LATENCY_MS",
    "Link",
    "Topology",
    "TopologyError",
    "bench_hops",
    "from_spec",
    "generate",
    "grid",
    "line",
    "load",
    "positions",
]

DEFAULT_LATENCY_MS: Final = 2.0
MAX_LATENCY_MS: Final = 50.0  # a radio waits 100 ms for its ACK, which comes after one latency
MAX_ID: Final = 0xFFFE


class TopologyError(FogmeshError, ValueError):
    """A topology that cannot be built or a topology file that is not valid."""


@dataclass(frozen=True, slots=True)
class Link:
    loss: float = 0.0  # probability that one transmission (or its ACK) is lost
    latency_ms: float = DEFAULT_LATENCY_MS
    loss_back: float | None = None  # loss from the higher id to the lower one, if different

    def check(self, where: str) -> None:
        for name, p in (("loss", self.loss), ("loss_back", self.loss_back)):
            if p is not None and not (isinstance(p, int | float) and 0.0 <= p <= 1.0):
                raise TopologyError(f"{where}.{name}: must be a number in 0..1, got {p!r}")
        lat = self.latency_ms
        if not (isinstance(lat, int | float) and 0.0 <= lat <= MAX_LATENCY_MS):
            raise TopologyError(
                f"{where}.latency_ms: must be a number in 0..{MAX_LATENCY_MS:g}, got {lat!r}"
            )


def _pair(a: int, b: int) -> frozenset[int]:
    return frozenset((a, b))


@dataclass(slots=True)
class Topology:
    nodes: dict[int, tuple[float, float]]
    links: dict[frozenset[int], Link] = field(default_factory=dict)
    root: int = 1

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if not self.nodes:
            raise TopologyError("nodes: a topology needs at least one node")
        for n in self.nodes:
            if not (isinstance(n, int) and 1 <= n <= MAX_ID):
                raise TopologyError(f"nodes: id {n!r} is not an integer in 1..{MAX_ID}")
        if self.root not in self.nodes:
            raise TopologyError(f"root: node {self.root} is not among the nodes")
        for pair, link in self.links.items():
            ends = sorted(pair)
            if len(ends) != 2:
                raise TopologyError(f"links: a link needs two different nodes, got {ends}")
            for n in ends:
                if n not in self.nodes:
                    raise TopologyError(f"links[{ends[0]}-{ends[1]}]: unknown node {n}")
            link.check(f"links[{ends[0]}-{ends[1]}]")

    # --- queries -------------------------------------------------------------------------

    def link(self, a: int, b: int) -> Link | None:
        return self.links.get(_pair(a, b))

    def loss(self, src: int, dst: int) -> float | None:
        """Loss from src to dst, None if there is no link."""
        link = self.links.get(_pair(src, dst))
        if link is None:
            return None
        if src > dst and link.loss_back is not None:
            return link.loss_back
        return link.loss

    def neighbours(self, node: int) -> list[int]:
        return sorted(n for pair in self.links if node in pair for n in pair if n != node)

    def hops_from_root(self) -> dict[int, int]:
        """Hop count of every node reachable from the root (BFS over the links)."""
        adj: dict[int, list[int]] = {n: [] for n in self.nodes}
        for pair in self.links:
            a, b = sorted(pair)
            adj[a].append(b)
            adj[b].append(a)
        hops = {self.root: 0}
        todo = deque([self.root])
        while todo:
            n = todo.popleft()
            for m in adj[n]:
                if m not in hops:
                    hops[m] = hops[n] + 1
                    todo.append(m)
        return hops

    def with_loss(self, loss: float) -> Topology:
        """The same graph with every link's loss set to `loss` (both ways)."""
        links = {p: Link(loss, link.latency_ms) for p, link in self.links.items()}
        return Topology(dict(self.nodes), links, self.root)

    # --- files ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The explicit form: positions and a link table (what `load` reads back)."""
        links: list[dict[str, Any]] = []
        for pair, link in sorted(self.links.items(), key=lambda kv: sorted(kv[0])):
            a, b = sorted(pair)
            entry: dict[str, Any] = {"a": a, "b": b, "loss": link.loss}
            entry["latency_ms"] = link.latency_ms
            if link.loss_back is not None:
                entry["loss_back"] = link.loss_back
            links.append(entry)
        return {
            "root": self.root,
            "nodes": {str(n): list(xy) for n, xy in sorted(self.nodes.items())},
            "links": links,
        }

    def dump(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_json(), indent=1) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, obj: Any, source: str = "topology") -> Topology:
        if not isinstance(obj, dict):
            raise TopologyError(f"{source}: expected a JSON object")
        root = obj.get("root", 1)
        if not isinstance(root, int):
            raise TopologyError(f"{source}: root: expected a node id, got {root!r}")
        try:
            if "positions" in obj:
                return _from_positions(obj, root)
            return _from_links(obj, root)
        except TopologyError as exc:
            raise TopologyError(f"{source}: {exc}") from None


def _node_id(key: Any, where: str) -> int:
    try:
        n = int(key)
    except (TypeError, ValueError):
        raise TopologyError(f"{where}: node id {key!r} is not an integer") from None
    if not 1 <= n <= MAX_ID:
        raise TopologyError(f"{where}: node id {n} is not in 1..{MAX_ID}")
    return n


def _xy(value: Any, where: str) -> tuple[float, float]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int | float) for v in value)
    ):
        raise TopologyError(f"{where}: expected [x, y], got {value!r}")
    return float(value[0]), float(value[1])


def _number(obj: Mapping[str, Any], key: str, where: str, default: float) -> float:
    v = obj.get(key, default)
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise TopologyError(f"{where}.{key}: expected a number, got {v!r}")
    return float(v)


def _from_links(obj: dict[str, Any], root: int) -> Topology:
    raw_nodes = obj.get("nodes")
    if not isinstance(raw_nodes, dict | list):
        raise TopologyError("nodes: expected {id: [x, y]} or a list of ids")
    nodes: dict[int, tuple[float, float]] = {}
    if isinstance(raw_nodes, dict):
        for k, v in raw_nodes.items():
            nodes[_node_id(k, "nodes")] = _xy(v, f"nodes.{k}")
    else:
        for i, k in enumerate(raw_nodes):
            nodes[_node_id(k, f"nodes[{i}]")] = (float(i), 0.0)
    raw_links = obj.get("links", [])
    if not isinstance(raw_links, list):
        raise TopologyError("links: expected a list of {a, b, loss, latency_ms}")
    links: dict[frozenset[int], Link] = {}
    for i, e in enumerate(raw_links):
        where = f"links[{i}]"
        if not isinstance(e, dict):
            raise TopologyError(f"{where}: expected an object with a, b, loss, latency_ms")
        unknown = set(e) - {"a", "b", "loss", "latency_ms", "loss_back"}
        if unknown:
            raise TopologyError(f"{where}: unknown keys {sorted(unknown)}")
        a, b = _node_id(e.get("a"), f"{where}.a"), _node_id(e.get("b"), f"{where}.b")
        if a == b:
            raise TopologyError(f"{where}: a link from node {a} to itself")
        for n in (a, b):
            if n not in nodes:
                raise TopologyError(f"{where}: node {n} is not in nodes")
        if _pair(a, b) in links:
            raise TopologyError(f"{where}: a second link between {a} and {b}")
        back = e.get("loss_back")
        link = Link(
            _number(e, "loss", where, 0.0),
            _number(e, "latency_ms", where, DEFAULT_LATENCY_MS),
            None if back is None else _number(e, "loss_back", where, 0.0),
        )
        if back is not None and a > b:  # loss_back is always higher id -> lower id
            link = Link(link.loss_back or 0.0, link.latency_ms, link.loss)
        link.check(where)
        links[_pair(a, b)] = link
    return Topology(nodes, links, root)


def _from_positions(obj: dict[str, Any], root: int) -> Topology:
    raw = obj["positions"]
    if not isinstance(raw, dict):
        raise TopologyError("positions: expected {id: [x, y]}")
    points = {_node_id(k, "positions"): _xy(v, f"positions.{k}") for k, v in raw.items()}
    if "radio_range" not in obj:
        raise TopologyError("radio_range: required with positions")
    return positions(
        points,
        radio_range=_number(obj, "radio_range", "topology", 0.0),
        loss_at_edge=_number(obj, "loss_at_edge", "topology", 0.3),
        base_loss=_number(obj, "base_loss", "topology", 0.0),
        latency_ms=_number(obj, "latency_ms", "topology", DEFAULT_LATENCY_MS),
        root=root,
    )


def load(path: str | Path) -> Topology:
    """A topology file: the explicit link table or positions + radio range."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(f"{path}: {exc.strerror or exc}") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TopologyError(f"{path}: not JSON ({exc})") from exc
    return Topology.from_json(obj, str(path))


# --- builders ------------------------------------------------------------------------------


def line(n: int, loss: float = 0.0, latency_ms: float = DEFAULT_LATENCY_MS) -> Topology:
    """Nodes 1..n in a row, 10 m apart; the root (1) at one end: node n is n-1 hops away."""
    if n < 1:
        raise TopologyError(f"line: needs at least 1 node, got {n}")
    nodes = {i: (10.0 * (i - 1), 0.0) for i in range(1, n + 1)}
    links = {_pair(i, i + 1): Link(loss, latency_ms) for i in range(1, n)}
    return Topology(nodes, links)


def grid(
    w: int,
    h: int,
    loss: float = 0.0,
    latency_ms: float = DEFAULT_LATENCY_MS,
    *,
    diagonals: bool = False,
    n: int | None = None,
) -> Topology:
    """A w × h grid, ids row by row from the root (1) in a corner; 4-neighbour links (8 with
    `diagonals`). `n` keeps only the first n ids (a partial last row)."""
    if w < 1 or h < 1:
        raise TopologyError(f"grid: needs w, h >= 1, got {w} x {h}")
    total = w * h if n is None else n
    if not 1 <= total <= w * h:
        raise TopologyError(f"grid: n={n} does not fit a {w} x {h} grid")

    def nid(x: int, y: int) -> int:
        return y * w + x + 1

    nodes = {nid(x, y): (10.0 * x, 10.0 * y) for y in range(h) for x in range(w)}
    nodes = {k: v for k, v in nodes.items() if k <= total}
    steps = [(1, 0), (0, 1)] + ([(1, 1), (-1, 1)] if diagonals else [])
    links: dict[frozenset[int], Link] = {}
    for y in range(h):
        for x in range(w):
            for dx, dy in steps:
                x2, y2 = x + dx, y + dy
                if 0 <= x2 < w and y2 < h:
                    a, b = nid(x, y), nid(x2, y2)
                    if a <= total and b <= total:
                        links[_pair(a, b)] = Link(loss, latency_ms)
    return Topology(nodes, links)


def positions(
    points: Mapping[int, tuple[float, float]] | Iterable[tuple[float, float]],
    radio_range: float,
    loss_at_edge: float = 0.3,
    *,
    base_loss: float = 0.0,
    latency_ms: float = DEFAULT_LATENCY_MS,
    root: int = 1,
) -> Topology:
    """Links between nodes within `radio_range` of each other, with the loss growing with the
    square of the distance (received power falls with d²):

        loss(d) = base_loss + (loss_at_edge - base_loss) * (d / radio_range) ** 2,  d <= range

    and no link beyond the range. A list of points gets ids 1, 2, ... in order."""
    pts = dict(points) if isinstance(points, Mapping) else dict(enumerate(points, start=1))
    if not radio_range > 0:
        raise TopologyError(f"radio_range: must be > 0, got {radio_range}")
    for name, p in (("loss_at_edge", loss_at_edge), ("base_loss", base_loss)):
        if not 0.0 <= p <= 1.0:
            raise TopologyError(f"{name}: must be in 0..1, got {p}")
    ids = sorted(pts)
    links: dict[frozenset[int], Link] = {}
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            d = math.dist(pts[a], pts[b])
            if d <= radio_range:
                p = base_loss + (loss_at_edge - base_loss) * (d / radio_range) ** 2
                links[_pair(a, b)] = Link(round(p, 6), latency_ms)
    nodes = {n: (float(x), float(y)) for n, (x, y) in pts.items()}
    return Topology(nodes, links, root)


def generate(
    n: int,
    hops: int = 5,
    loss: float = 0.0,
    latency_ms: float = DEFAULT_LATENCY_MS,
    *,
    seed: int = 0,
    parents: int = 2,
) -> Topology:
    """The benchmark's topology: the root and n-1 nodes in `hops` layers (layer k is k hops from
    the root), every node linked to `parents` nodes of the layer before it (the least loaded
    first, ties broken by the seed), so each has a backup parent wherever its layer before has
    two nodes. Layers get at least two nodes while n allows. Deterministic per seed."""
    if n < 2:
        raise TopologyError(f"generate: needs at least 2 nodes, got {n}")
    if not 1 <= hops <= n - 1:
        raise TopologyError(f"generate: {n} nodes cannot span {hops} hops")
    if parents < 1:
        raise TopologyError(f"generate: parents must be >= 1, got {parents}")
    rng = random.Random(seed)
    rest = n - 1
    sizes = [rest // hops] * hops
    for i in rng.sample(range(hops), rest % hops):
        sizes[i] += 1
    layers: list[list[int]] = [[1]]
    next_id = 2
    for size in sizes:
        layers.append(list(range(next_id, next_id + size)))
        next_id += size
    nodes: dict[int, tuple[float, float]] = {}
    for k, layer in enumerate(layers):
        for i, node in enumerate(layer):
            nodes[node] = (20.0 * k, 15.0 * (i - (len(layer) - 1) / 2))
    links: dict[frozenset[int], Link] = {}
    children: dict[int, int] = dict.fromkeys(nodes, 0)
    for k in range(1, len(layers)):
        for node in layers[k]:
            ups = sorted(layers[k - 1], key=lambda m: (children[m], rng.random()))
            for up in ups[:parents]:
                children[up] += 1
                links[_pair(node, up)] = Link(loss, latency_ms)
    return Topology(nodes, links)


def bench_hops(n: int) -> int:
    """Hops the benchmark's topology spans for n nodes: 5 from 11 nodes on (the issue's
    ">= 5 hops for 30 nodes"), fewer for smaller meshes so each layer keeps two nodes."""
    return max(1, min(5, (n - 1) // 2))


def from_spec(spec: str, nodes: int, loss: float | None = None, seed: int = 0) -> Topology:
    """`line`, `grid`, `bench` (the generator) with `nodes` nodes, or a topology FILE;
    `loss` (when given) replaces every link's loss."""
    p = 0.0 if loss is None else loss
    if not 0.0 <= p <= 1.0:
        raise TopologyError(f"loss must be in 0..1, got {p}")
    if spec == "line":
        return line(nodes, p)
    if spec == "grid":
        if nodes < 1:
            raise TopologyError(f"grid: needs at least 1 node, got {nodes}")
        w = math.ceil(math.sqrt(nodes))
        return grid(w, math.ceil(nodes / w), p, n=nodes)
    if spec == "bench":
        return generate(nodes, bench_hops(nodes), p, seed=seed)
    if not Path(spec).is_file():
        raise TopologyError(f"topology {spec!r}: not line, grid, bench or a topology file")
    topo = load(spec)
    return topo if loss is None else topo.with_loss(loss)
