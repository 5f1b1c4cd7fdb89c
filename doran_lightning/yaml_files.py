"""YAML read with its alias expansion bounded: a 1 kB file of nested aliases (a "billion laughs") or lists nested
100,000 deep is refused in one line naming the file, before anything walks the expanded document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# More nodes than any config or hparams file holds once its aliases are expanded (a real one: a few hundred).
MAX_EXPANDED_NODES = 100_000


class YamlBoundError(yaml.YAMLError):
    """A YAML document whose expansion is larger, deeper or more self-referential than any settings file."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def expanded_size(node: yaml.Node, limit: int = MAX_EXPANDED_NODES) -> int:
    """Nodes of the document with every alias written out, counted without writing them out (memoised per node);
    raises YamlBoundError past `limit` or on an alias to its own ancestor."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        current, children_done = stack.pop()
        key = id(current)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(current))
            if sizes[key] > limit:
                raise YamlBoundError(f"its aliases expand to more than {limit:,} values (nested YAML aliases)")
            continue
        if key in sizes:
            continue
        open_nodes.add(key)
        stack.append((current, True))
        for child in _children(current):
            if id(child) in open_nodes:
                raise YamlBoundError("an alias refers to a value that contains it (a recursive YAML alias)")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(node)]


def load_yaml(text: str, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """`yaml.load(text, Loader=loader)` with the expansion bounded (`expanded_size`) before any value is built."""
    reader = loader(text)
    try:
        try:
            node = reader.get_single_node()
        except RecursionError:
            raise YamlBoundError("it is nested too deeply") from None
        if node is None:
            return None
        expanded_size(node)
        try:
            return reader.construct_document(node)
        except RecursionError:
            raise YamlBoundError("it is nested too deeply") from None
    finally:
        reader.dispose()


def read_yaml(path: Path, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """The YAML file at `path`, bounded (`load_yaml`)."""
    return load_yaml(Path(path).read_text(encoding="utf-8"), loader)
