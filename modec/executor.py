"""Run a canonical graph: dense segments in onnxruntime, ``ai.modec::MoE`` nodes in numpy.

Nodes are partitioned into stages: a node's stage is the largest stage of its inputs'
producers, plus one after a MoE node. Each stage becomes one onnxruntime session whose inputs
and outputs are the values crossing stages; the MoE nodes of stage ``s`` run after dense stage
``s``. Sessions are built once per executor.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import onnx
import onnx_ir as ir

from modec import kv_cache
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
    #: (node protos, initializer names) to build the session from; None: nothing to run.
    build: tuple[list[onnx.NodeProto], list[str]] | None = None
    session: object = None


#: 16-bit float element types that the executor runs in float32.
_HALF = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_HALF_PROTO = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})

#: Initializers above this size are left out of `weightless_proto` (smaller ones stay: shape
#: inference reads small constants such as Reshape targets).
_WEIGHTLESS_MIN_BYTES = 4096


def weightless_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a ModelProto whose large initializers are external references that
    point nowhere: the graph structure and types without reading (or computing) a weight.

    Lazily computed tensors (the canonical expert stacks) and memory-mapped ones stay
    untouched; small initializers are kept inline for shape inference.
    """
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is None or isinstance(t, ir.ExternalTensor) or t.nbytes < _WEIGHTLESS_MIN_BYTES:
            continue
        v.const_value = ir.ExternalTensor(
            "modec-weightless",
            0,
            t.nbytes,
            t.dtype,
            shape=ir.Shape(t.shape.numpy()),
            name=t.name or v.name or "",
        )
        swapped.append((v, t))
    try:
        return ir.to_proto(model)
    finally:
        for v, t in swapped:
            v.const_value = t


def _float32_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    arr = onnx.numpy_helper.to_array(t).astype(np.float32)
    return onnx.numpy_helper.from_array(arr, t.name)


def upcast_float16(m: onnx.ModelProto) -> None:
    """Make a (stage) graph compute in float32 where it computed in fp16/bf16, in place.

    Initializers, ``Constant``/``ConstantOfShape`` values, ``Cast`` targets and the declared
    value types of 16-bit floats become float32. Used on models stored in fp16/bf16: the
    analysis then measures the float32 model of the stored weights.
    """
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type in _HALF_PROTO:
            g.initializer[i].CopyFrom(_float32_tensor(t))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        if tt.elem_type in _HALF_PROTO:
            tt.elem_type = onnx.TensorProto.FLOAT
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i in _HALF_PROTO:
                a.i = onnx.TensorProto.FLOAT
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type in _HALF_PROTO:
                a.t.CopyFrom(_float32_tensor(a.t))


class _LazyParams(Sequence[MoEParams]):
    """The `MoEParams` of each MoE node, read on first use; `release` drops one layer."""

    def __init__(self, nodes: list[ir.Node]) -> None:
        self._nodes = nodes
        self._cache: dict[int, MoEParams] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    @overload
    def __getitem__(self, i: int) -> MoEParams: ...

    @overload
    def __getitem__(self, i: slice) -> list[MoEParams]: ...

    def __getitem__(self, i: int | slice) -> MoEParams | list[MoEParams]:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        if i < 0:
            i += len(self)
        if i not in self._cache:
            self._cache[i] = MoEParams.from_node(self._nodes[i])
        return self._cache[i]

    def release(self, i: int) -> None:
        """Forget layer ``i``'s arrays (read again on next use)."""
        self._cache.pop(i, None)


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
        self.params = _LazyParams(self.moe)
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
        # A KV-cache model's updated cache is not an output here (`kv_cache.analysis_outputs`).
        wanted = kv_cache.analysis_outputs(
            [_nm(v) for v in model.graph.inputs], [_nm(v) for v in model.graph.outputs]
        )
        graph_outputs = {v.name for v in model.graph.outputs if _nm(v) in wanted}
        tapset = set(self.taps)
        known = {v.name for v in model.graph.inputs} | {
            v.name for n in index.nodes for v in n.outputs
        }  # fmt: skip
        missing = tapset - known
        if missing:
            raise BadInputError(f"executor: tapped values {sorted(missing)} are not in the graph")
        # A weightless copy: large initializers (memory-mapped or lazily computed, e.g. the
        # canonical expert stacks) are never read to build the stage graphs; each stage reads
        # only its own dense initializers, when its session is first needed.
        proto = weightless_proto(model)
        # TorchScript exports carry few value types: infer them (the MoE outputs are typed).
        proto = onnx.shape_inference.infer_shapes(proto)
        self._value_info = {vi.name: vi for vi in proto.graph.value_info}
        for vi in list(proto.graph.input) + list(proto.graph.output):
            self._value_info[vi.name] = vi
        self._init_values: dict[str, ir.Value] = dict(model.graph.initializers)
        # 16-bit float models run in float32 (onnxruntime's CPU kernels lack most fp16/bf16
        # ops, and the reference MoE is float32): see `upcast_float16`.
        self.upcast = any(
            v.const_value is not None and v.const_value.dtype in _HALF
            for v in self._init_values.values()
        )
        node_protos = {n: p for n, p in zip(index.nodes, proto.graph.node, strict=True)}
        self._opsets = [o for o in proto.opset_import if o.domain != DOMAIN]
        self._ir_version = proto.ir_version
        self._threads = intra_op_threads
        self.stages: list[_Stage] = []
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
                    if v.name not in produced and v.name not in self._init_values:
                        ins[_nm(v)] = None
            outs = [
                _nm(v) for n in nodes for v in n.outputs
                if v.name in graph_outputs or v.name in tapset
                or (n not in consts and any(
                    stage.get(c, -1) != s or is_moe_node(c) for c in index.consumers(v)))
            ]  # fmt: skip
            st = _Stage(nodes, list(ins), outs)
            if nodes and outs:
                used = {_nm(v) for n in nodes for v in index.all_inputs(n)}
                st.build = (
                    [node_protos[n] for n in nodes],
                    sorted(n for n in used if n in self._init_values),
                )
            self.stages.append(st)
        self.output_names = wanted
        log.info("executor: %d dense stage(s), %d MoE node(s)", len(self.stages), len(self.moe))

    def stage_session(self, s: int) -> Any:
        """Stage ``s``'s onnxruntime session (built on first use), or None: nothing to run."""
        st = self.stages[s]
        if st.session is None and st.build is not None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = self._threads
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            # No arena: its regions outlive the session while any output array of the
            # session is alive (a streamed run keeps some, e.g. masks, until the last layer),
            # so each stage's arena stayed resident and a compile's peak RSS grew by
            # ~0.3 GiB per layer (docs/scale.md); the run time is the same without it.
            so.enable_cpu_mem_arena = False
            st.session = ort.InferenceSession(
                self._sub_model(st).SerializeToString(), so,
                providers=["CPUExecutionProvider"],
            )  # fmt: skip
        return st.session

    def release_stage(self, s: int) -> None:
        """Drop stage ``s``'s session (rebuilt on next use): bounds memory in streamed runs."""
        self.stages[s].session = None

    def _sub_model(self, st: _Stage) -> onnx.ModelProto:
        assert st.build is not None
        nodes, init_names = st.build
        inits = []
        for name in init_names:
            t = self._init_values[name].const_value
            assert t is not None
            proto = ir.serde.serialize_tensor(ir.tensor(np.asarray(t.numpy()), name=name))
            if isinstance(t, ir.ExternalTensor):
                with contextlib.suppress(BufferError):  # a view is alive elsewhere: keep it
                    t.release()  # the session holds its own copy
            inits.append(proto)
        g = onnx.helper.make_graph(
            nodes, "stage", [self._vi(n) for n in st.inputs], [self._vi(n) for n in st.outputs],
            initializer=inits,
        )  # fmt: skip
        m = onnx.helper.make_model(g, opset_imports=self._opsets, ir_version=self._ir_version)
        if self.upcast:
            upcast_float16(m)
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

    def stage_feed(self, x: np.ndarray) -> np.ndarray:
        """A stage input as the stage expects it (16-bit floats as float32 when upcast)."""
        if self.upcast and x.dtype.name in ("float16", "bfloat16"):
            return np.asarray(x, dtype=np.float32)
        return x

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
            elif st.build is not None:
                session = self.stage_session(s)
                feeds = {n: self.stage_feed(env[n]) for n in st.inputs if n in env}
                missing = [n for n in st.inputs if n not in env]
                if missing:
                    raise BadInputError(f"executor: missing inputs {missing}")
                outs = session.run(st.outputs, feeds)
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

    # ------------------------------------------------------------------ stepping

    def steps_from(self, layer: int) -> list[tuple[str, int]]:
        """What `run_from` does from a layer-``layer`` cache, as steps: ``("moe", li)`` runs
        MoE layer ``li``, ``("dense", s)`` dense stage ``s``. Running the steps in order on a
        copy of the cache's values with `apply_step` gives `run_from`'s outputs bit for bit;
        callers that run many variants of one cache step them all through each stage in
        turn, so each stage's session and each layer's weights are needed once."""
        s0 = self.moe_stage[layer]
        steps: list[tuple[str, int]] = []
        for s in range(s0, len(self.stages)):
            if s > s0 and self.stages[s].build is not None:
                steps.append(("dense", s))
            steps += [
                ("moe", li) for li, st in enumerate(self.moe_stage) if st == s and li >= layer
            ]
        return steps

    def apply_step(
        self, step: tuple[str, int], env: dict[str, np.ndarray],
        replace: Replacement | None = None, params: MoEParams | None = None,
    ) -> None:  # fmt: skip
        """Run one step of `steps_from` on ``env`` in place. For a MoE step, ``replace``
        swaps one expert on chosen tokens and ``params`` runs the layer with other weights
        than the model's (e.g. every expert quantized)."""
        kind, i = step
        if kind == "dense":
            st = self.stages[i]
            feeds = {n: self.stage_feed(env[n]) for n in st.inputs}
            outs = self.stage_session(i).run(st.outputs, feeds)
            env.update(zip(st.outputs, outs, strict=True))
        else:
            node = self.moe[i]
            p = self.params[i] if params is None else params
            r = moe_forward(p, env[_nm(node.inputs[0])], replacement=replace)
            env[_nm(node.outputs[0])] = r.output

    def cache_at(self, layer: int, env: Mapping[str, np.ndarray]) -> LayerCache:
        """The `LayerCache` of ``layer`` from an environment holding its inputs."""
        return LayerCache(layer, self._needed_from(layer, env))

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
