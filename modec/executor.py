"""Run a canonical graph: dense segments in onnxruntime, ``ai.modec::MoE`` nodes in numpy.

Nodes are partitioned into stages: a node's stage is the largest stage of its inputs'
producers, plus one after a MoE node. Each stage becomes one onnxruntime session whose inputs
and outputs are the values crossing stages; the MoE nodes of stage ``s`` run after dense stage
``s``. Sessions are built once per executor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from modec.errors import BadInputError, ModelError
from modec.moe._graph import GraphIndex
from modec.moe.canonical import DOMAIN, is_moe_node
from modec.moe.reference import MoEParams, MoEResult, Replacement, Routing, moe_forward

log = logging.getLogger(__name__)

_RANDOM = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"})


def _nm(v: ir.Value | None) -> str:
    return "" if v is None or v.name is None else v.name


@dataclass(frozen=True, eq=False)
class ExecResult:
    """What one run produced.

    Attributes:
        outputs: graph outputs by name.
        routing: per MoE layer (execution order), its routing (when recorded).
        expert_inputs: per MoE layer, expert → (token indices, rows) (when collected).
        taps: tapped intermediate values by name.
        cache: values crossing into the stages from the requested layer on (when asked).
    """

    outputs: dict[str, np.ndarray]
    routing: dict[int, Routing] = field(default_factory=dict)
    expert_inputs: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    taps: dict[str, np.ndarray] = field(default_factory=dict)
    cache: LayerCache | None = None


@dataclass(frozen=True, eq=False)
class LayerCache:
    """The inputs of MoE layer ``layer`` and of every later stage, to re-run layers l..L."""

    layer: int
    values: dict[str, np.ndarray]


@dataclass
class _Stage:
    nodes: list[ir.Node]
    inputs: list[str]
    outputs: list[str]
    session: object = None


class Executor:
    """Run a canonical model with hooks into its MoE layers.

    Args:
        model: a model whose MoE layers are canonical ``ai.modec::MoE`` nodes (a model
            without them runs as one onnxruntime session).
        taps: names of intermediate values to return (e.g. attention probabilities).
        intra_op_threads: onnxruntime intra-op threads per session.
    """

    def __init__(
        self, model: ir.Model, *, taps: Sequence[str] = (), intra_op_threads: int = 2
    ) -> None:
        import onnxruntime as ort

        self.graph = model.graph
        index = GraphIndex(model.graph)
        self.taps = list(taps)
        stage: dict[ir.Node, int] = {}
        self.moe: list[ir.Node] = []
        for n in index.nodes:
            s = 0
            for v in index.all_inputs(n):
                p = index.producer(v)
                if p is not None:
                    s = max(s, stage[p] + (1 if is_moe_node(p) else 0))
            stage[n] = s
            if is_moe_node(n):
                self.moe.append(n)
        self.moe_stage = [stage[n] for n in self.moe]
        self.params = [MoEParams.from_node(n) for n in self.moe]
        n_stages = max(stage.values(), default=0) + 1
        # Constant nodes are copied into every stage that reads them instead of crossing.
        consts: set[ir.Node] = set()
        for n in index.nodes:
            cins = index.all_inputs(n)
            if (
                not is_moe_node(n)
                and n.op_type not in _RANDOM
                and all(v.is_initializer() or index.producer(v) in consts for v in cins)
                and not any(v.is_graph_input() for v in cins)
            ):
                consts.add(n)
        dense = [
            [n for n in index.nodes if stage[n] == s and not is_moe_node(n) and n not in consts]
            for s in range(n_stages)
        ]
        graph_outputs = {v.name for v in model.graph.outputs}
        tapset = set(self.taps)
        known = {v.name for v in model.graph.inputs} | {
            v.name for n in index.nodes for v in n.outputs
        }  # fmt: skip
        missing = tapset - known
        if missing:
            raise BadInputError(f"executor: tapped values {sorted(missing)} are not in the graph")
        proto = ir.to_proto(model)
        # TorchScript exports carry few value types: infer them (the MoE outputs are typed).
        proto = onnx.shape_inference.infer_shapes(proto)
        self._value_info = {vi.name: vi for vi in proto.graph.value_info}
        for vi in list(proto.graph.input) + list(proto.graph.output):
            self._value_info[vi.name] = vi
        self._inits = {t.name: t for t in proto.graph.initializer}
        node_protos = {n: p for n, p in zip(index.nodes, proto.graph.node, strict=True)}
        self.stages: list[_Stage] = []
        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        for s, nodes in enumerate(dense):
            needed: set[ir.Node] = set()
            stack = [index.producer(v) for n in nodes for v in index.all_inputs(n)]
            while stack:
                p = stack.pop()
                if p is None or p in needed or p not in consts:
                    continue
                needed.add(p)
                stack.extend(index.producer(v) for v in index.all_inputs(p))
            nodes = [n for n in index.nodes if n in needed] + nodes
            produced = {v.name for n in nodes for v in n.outputs}
            ins: dict[str, None] = {}
            for n in nodes:
                for v in index.all_inputs(n):
                    if v.name not in produced and v.name not in self._inits:
                        ins[_nm(v)] = None
            outs = [
                _nm(v) for n in nodes for v in n.outputs
                if v.name in graph_outputs or v.name in tapset
                or (n not in consts and any(
                    stage.get(c, -1) != s or is_moe_node(c) for c in index.consumers(v)))
            ]  # fmt: skip
            st = _Stage(nodes, list(ins), outs)
            if nodes and outs:
                sub = self._sub_model(proto, [node_protos[n] for n in nodes], st, index, nodes)
                st.session = ort.InferenceSession(
                    sub.SerializeToString(), so, providers=["CPUExecutionProvider"]
                )
            self.stages.append(st)
        self.output_names = [_nm(v) for v in model.graph.outputs]
        log.info("executor: %d dense stage(s), %d MoE node(s)", len(self.stages), len(self.moe))

    def _sub_model(
        self, proto: onnx.ModelProto, nodes: list[onnx.NodeProto], st: _Stage,
        index: GraphIndex, ir_nodes: list[ir.Node],
    ) -> onnx.ModelProto:  # fmt: skip
        used = {v.name for n in ir_nodes for v in index.all_inputs(n)}
        inits = [self._inits[n] for n in used if n in self._inits]
        g = onnx.helper.make_graph(
            nodes, "stage", [self._vi(n) for n in st.inputs], [self._vi(n) for n in st.outputs],
            initializer=inits,
        )  # fmt: skip
        opsets = [o for o in proto.opset_import if o.domain != DOMAIN]
        m = onnx.helper.make_model(g, opset_imports=opsets, ir_version=proto.ir_version)
        return m

    def _vi(self, name: str) -> onnx.ValueInfoProto:
        vi = self._value_info.get(name)
        if vi is None or not vi.type.HasField("tensor_type") or vi.type.tensor_type.elem_type == 0:
            v = self._find_value(name)
            if v is None or v.dtype is None:
                raise ModelError(
                    f"executor: value {name!r} crosses stages but has no known type; run shape "
                    "inference on the model first"
                )
            return onnx.helper.make_tensor_value_info(name, int(v.dtype), None)
        return onnx.helper.make_tensor_value_info(name, vi.type.tensor_type.elem_type, None)

    def _find_value(self, name: str) -> ir.Value | None:
        for v in self.graph.inputs:
            if v.name == name:
                return v
        for n in self.graph:
            for v in n.outputs:
                if v.name == name:
                    return v
        return None

    # ------------------------------------------------------------------ running

    def run(
        self, inputs: Mapping[str, np.ndarray], *, record_routing: bool = False,
        collect_expert_inputs: bool = False, replace: Mapping[int, Replacement] | None = None,
        cache_layer: int | None = None,
    ) -> ExecResult:  # fmt: skip
        """Run the whole model.

        Args:
            inputs: graph inputs by name.
            record_routing: return router scores, chosen experts and weights per layer.
            collect_expert_inputs: return the token indices and rows each expert received.
            replace: per MoE layer, one expert's replacement weights on chosen tokens.
            cache_layer: also return a `LayerCache` to re-run layers ``cache_layer..L``.
        """
        env: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in inputs.items()}
        return self._execute(
            env, 0, False, record_routing, collect_expert_inputs, replace or {}, cache_layer
        )

    def run_from(
        self, cache: LayerCache, *, record_routing: bool = False,
        collect_expert_inputs: bool = False, replace: Mapping[int, Replacement] | None = None,
    ) -> ExecResult:  # fmt: skip
        """Re-run only MoE layers ``cache.layer..L`` and the stages after them."""
        env = dict(cache.values)
        return self._execute(
            env, cache.layer, True, record_routing, collect_expert_inputs, replace or {}, None
        )

    def _execute(
        self, env: dict[str, np.ndarray], first_layer: int, resume: bool, record: bool,
        collect: bool, replace: Mapping[int, Replacement], cache_layer: int | None,
    ) -> ExecResult:  # fmt: skip
        res = ExecResult(outputs={})
        start_stage = self.moe_stage[first_layer] if resume else 0
        cache = None
        for s, st in enumerate(self.stages):
            if resume and s <= start_stage:
                pass
            elif st.session is not None:
                feeds = {n: env[n] for n in st.inputs if n in env}
                missing = [n for n in st.inputs if n not in env]
                if missing:
                    raise BadInputError(f"executor: missing inputs {missing}")
                outs = st.session.run(st.outputs, feeds)  # type: ignore[attr-defined]
                env.update(zip(st.outputs, outs, strict=True))
            for li, node in enumerate(self.moe):
                if self.moe_stage[li] != s or li < first_layer:
                    continue
                if cache_layer is not None and li == cache_layer:
                    cache = LayerCache(li, self._needed_from(li, env))
                hidden = env[_nm(node.inputs[0])]
                r: MoEResult = moe_forward(
                    self.params[li], hidden, replacement=replace.get(li), collect_inputs=collect
                )
                env[_nm(node.outputs[0])] = r.output
                if record:
                    res.routing[li] = r.routing
                if collect:
                    res.expert_inputs[li] = r.expert_inputs
        res.outputs.update({n: env[n] for n in self.output_names})
        res.taps.update({n: env[n] for n in self.taps if n in env})
        if cache is not None:
            return ExecResult(res.outputs, res.routing, res.expert_inputs, res.taps, cache)
        return res

    def _needed_from(self, layer: int, env: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        s0 = self.moe_stage[layer]
        names: set[str] = set()
        for li in range(layer, len(self.moe)):
            names.add(_nm(self.moe[li].inputs[0]))
        for s, st in enumerate(self.stages):
            if s > s0:
                names.update(st.inputs)
        names.update(n for n in self.output_names if n in env)
        return {n: env[n] for n in names if n in env}
