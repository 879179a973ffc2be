"""Order the stages of a pipeline and compute their fingerprints."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from pipeline import stage as stage_registry
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.fingerprint import stage_fingerprint
from pipeline.stage import StageSpec


@dataclass(frozen=True)
class Node:
    """A stage of this pipeline with its resolved inputs and fingerprint."""

    name: str
    spec: StageSpec
    config: BaseModel
    inputs: tuple[str, ...]
    fingerprint: str

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.fingerprint}"


def order(cfg: PipelineConfig) -> list[Node]:
    """Topological order (ties broken by file order); raises ConfigError on a cycle."""
    models = cfg.stage_configs()
    present = set(models)
    inputs = {n: stage_registry.get(n).inputs(present) for n in models}
    done: list[str] = []
    visiting: list[str] = []

    def visit(n: str) -> None:
        if n in done:
            return
        if n in visiting:
            cycle = " -> ".join([*visiting[visiting.index(n) :], n])
            raise ConfigError("stages", f"stages form a cycle: {cycle}")
        visiting.append(n)
        for dep in inputs[n]:
            visit(dep)
        visiting.pop()
        done.append(n)

    for n in models:
        visit(n)
    nodes: dict[str, Node] = {}
    for n in done:
        spec = stage_registry.get(n)
        ups = {d: nodes[d].fingerprint for d in inputs[n]}
        fp = stage_fingerprint(spec.version, models[n], ups)
        nodes[n] = Node(n, spec, models[n], tuple(inputs[n]), fp)
    return [nodes[n] for n in done]


def downstream(nodes: list[Node], start: str) -> set[str]:
    """``start`` and every stage that (transitively) consumes it."""
    out = {start}
    for node in nodes:  # topological order: one pass suffices
        if any(i in out for i in node.inputs):
            out.add(node.name)
    return out
