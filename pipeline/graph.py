"""Order the stage instances of a pipeline and compute their fingerprints."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.fingerprint import stage_fingerprint
from pipeline.stage import StageSpec


@dataclass(frozen=True)
class Node:
    """A stage instance of this pipeline with its bound inputs and fingerprint."""

    name: str
    type: str
    spec: StageSpec
    config: BaseModel
    bound: dict[str, tuple[str, ...]]
    fingerprint: str

    @property
    def inputs(self) -> tuple[str, ...]:
        """Upstream instances, each once."""
        return tuple(dict.fromkeys(n for names in self.bound.values() for n in names))

    @property
    def dirname(self) -> str:
        """The store entry: ``<type>-<fingerprint>`` (instance names are not part of it, so two runs
        or two instances with the same config and inputs share one entry)."""
        return f"{self.type}-{self.fingerprint}"


def order(cfg: PipelineConfig) -> list[Node]:
    """Topological order (ties broken by file order); raises ConfigError on a cycle."""
    instances = cfg.instances()
    done: list[str] = []
    visiting: list[str] = []

    def visit(n: str) -> None:
        if n in done:
            return
        if n in visiting:
            cycle = " -> ".join([*visiting[visiting.index(n) :], n])
            raise ConfigError("stages", f"stages form a cycle: {cycle}")
        visiting.append(n)
        for dep in instances[n].deps:
            visit(dep)
        visiting.pop()
        done.append(n)

    for n in instances:
        visit(n)
    nodes: dict[str, Node] = {}
    pipeline_eval = None
    for n in done:
        inst = instances[n]
        ups: dict[str, object] = {slot: [nodes[d].fingerprint for d in names]
                                  for slot, names in inst.bound.items() if names}
        for slot, names in inst.bound.items():
            key = inst.spec.inputs[slot].config_key
            value = getattr(inst.config, key, None) if key else None
            if isinstance(value, dict) and names:  # {instance: weight}: the weights count, not the names
                ups[f"{slot}.weights"] = [value[n] for n in names]
        reads_eval = getattr(inst.config, "uses_pipeline_eval_data", None)
        if callable(reads_eval) and reads_eval():
            # Its output depends on other stages' evaluation files (decontamination): they are inputs too.
            if pipeline_eval is None:
                from pipeline.preflight import eval_data

                pipeline_eval = eval_data({k: v.config for k, v in instances.items()})
            ups["eval_data"] = dict(sorted(pipeline_eval.items()))
        named = {inst.spec.inputs[slot].config_key for slot, names in inst.bound.items() if names}
        fp = stage_fingerprint(inst.spec.version, inst.config, ups, type_=inst.type,
                               neutral=named - {None})
        nodes[n] = Node(n, inst.type, inst.spec, inst.config, inst.bound, fp)
    return [nodes[n] for n in done]


def downstream(nodes: list[Node], start: str) -> set[str]:
    """``start`` and every stage that (transitively) consumes it."""
    out = {start}
    for node in nodes:  # topological order: one pass suffices
        if any(i in out for i in node.inputs):
            out.add(node.name)
    return out


def lineage(nodes: list[Node], name: str) -> dict[str, str]:
    """``{instance: fingerprint}`` of every instance ``name`` depends on, directly or not."""
    by_name = {n.name: n for n in nodes}
    out: dict[str, str] = {}
    todo = list(by_name[name].inputs)
    while todo:
        dep = todo.pop()
        if dep not in out:
            out[dep] = by_name[dep].fingerprint
            todo += by_name[dep].inputs
    return dict(sorted(out.items()))
