"""Any vLLM MoE model with hybrid layers: one wrapper class, no class per model.

``fiddler_model_class(cls)`` is what the worker builds for ``--model-impl
fiddler`` (vllm_fiddler.plugin): vLLM's own class for the architecture, with
``FiddlerModel`` in front. Its ``__init__`` builds vLLM's model while every
FusedMoE layer takes a ``FiddlerMoEMethod`` (moe.method), which allocates no
expert. Once the model is built, every MoE layer and the non-expert weights
are known exactly, so the budget and the placement are decided then, before
any expert is allocated; each layer then gets its HybridMoE, and its runner
our custom op. Weight loading comes after, through vLLM's own loaders.

Between steps (``forward`` and ``compute_logits``, outside vLLM's compiled
code and its FULL graphs) the wrapper runs re-placement and writes stats.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from vllm_fiddler import compat
from vllm_fiddler.config import FiddlerConfig, FiddlerConfigError
from vllm_fiddler.kernels.reference import ExpertMath
from vllm_fiddler.logger import logger
from vllm_fiddler.metrics import StatsWriter
from vllm_fiddler.moe import method as moe_method
from vllm_fiddler.moe import ops
from vllm_fiddler.moe.layer import HybridMoE, expert_chunks
from vllm_fiddler.moe.quantized import QuantizedHybridMoE
from vllm_fiddler.placement import MoEShape
from vllm_fiddler.preflight import check_streamed_chunks
from vllm_fiddler.runtime import device_wait, graph_jobs
from vllm_fiddler.runtime.cpu_experts import get_cpu_runtime
from vllm_fiddler.runtime.graph_jobs import GraphJobs
from vllm_fiddler.runtime.host_view import device_view
from vllm_fiddler.runtime.kernel_warmup import warm_up_kernels
from vllm_fiddler.runtime.moe_graphs import MoEGraphs
from vllm_fiddler.runtime.replacer import HEAT_TABLE_TOKENS, ExpertCopier, ExpertReplacer
from vllm_fiddler.runtime.setup import resolve_model_placement
from vllm_fiddler.runtime.weight_stager import WeightStager


@functools.cache
def fiddler_model_class(base: type) -> type:
    """vLLM's model class `base` with hybrid MoE layers (cached: one class per base)."""
    return type(f"Fiddler{base.__name__}", (FiddlerModel, base),
                {"__doc__": f"{base.__name__} with fiddler's hybrid MoE layers.", "__module__": __name__})


class FiddlerModel:
    """Put in front of a vLLM model class by fiddler_model_class (module docstring)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any):
        ops.register_ops()
        cfg = FiddlerConfig.from_additional_config(vllm_config.additional_config)
        with moe_method.building() as build:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        methods = build.methods
        arch = type(self).__mro__[2].__name__
        if not methods:
            raise FiddlerConfigError(
                f"fiddler: {arch} built no FusedMoE layer: it is a dense model, which --model-impl fiddler "
                "has nothing to offload in; use --model-impl auto")
        self._attach_runners(methods)
        dtype = vllm_config.model_config.dtype
        shape = MoEShape.from_layers([m.spec for m in methods], dtype_bytes=dtype.itemsize,
                                     non_expert_bytes=_non_expert_bytes(self),
                                     kv_bytes_per_token=compat.kv_cache_bytes_per_token(self, vllm_config),
                                     expert_format=_expert_format(methods))
        self.fiddler_shape = shape
        self._setup(cfg, vllm_config, methods, shape)

    def _attach_runners(self, methods: list) -> None:
        """Each method's MoERunner (runs our op from now on); rejects routings fiddler cannot
        split (a zero expert, shared experts fused into the routed ones)."""
        by_method = {id(m): m for m in methods}
        for module in self.modules():
            if not isinstance(module, compat.moe_runner_class()):
                continue
            method = by_method.get(id(module.routed_experts.quant_method))
            if method is None:
                continue
            router = type(module.router).__name__
            if router == "ZeroExpertRouter" or module.expert_map_manager.num_fused_shared_experts:
                raise FiddlerConfigError(f"fiddler: layer {method.prefix} routes to zero or fused shared "
                                         f"experts ({router}), which fiddler does not split yet")
            method.runner = module
            compat.set_runner_entry(module, ops.make_entry(module))
        missing = [m.prefix for m in methods if m.runner is None]
        if missing:
            raise FiddlerConfigError(f"fiddler: no MoE runner holds layers {missing}")

    def _setup(self, cfg: FiddlerConfig, vllm_config: Any, methods: list, shape: MoEShape) -> None:
        spec = methods[0].spec
        math = ExpertMath(activation=spec.activation, has_bias=spec.has_bias,
                          alpha=spec.swiglu_alpha if spec.swiglu_alpha is not None else 1.702,
                          limit=spec.swiglu_limit if spec.swiglu_limit is not None else 7.0)
        device = torch.get_default_device()
        on_cuda = device.type == "cuda"
        quantized = shape.expert_format is not None
        # the quantized path computes gpt-oss's math on both sides; the bf16 one's copies,
        # streamed chunks and native CPU jobs are SiLU-only
        if on_cuda and not math.plain_silu and not quantized:
            raise FiddlerConfigError(
                f"fiddler: bf16 experts with the {math.activation!r} activation"
                f"{' and biases' if math.has_bias else ''} (gpt-oss) run on vLLM's CPU platform only so far; "
                "the CUDA kernels compute SiLU-gated experts without biases")
        from vllm_fiddler.kernels import cpu as cpu_kernels

        dtype = vllm_config.model_config.dtype
        native_dtypes = cpu_kernels.activation_dtypes(quantized)  # GPTQ and AWQ checkpoints run in fp16
        native_dtype = dtype in native_dtypes
        if not native_dtype:
            logger.warning("fiddler: the model runs in %s; the native CPU expert kernels take %s activations, "
                           "so host experts run on torch's path, many times slower. Pass --dtype bfloat16 to "
                           "run them at the host's memory bandwidth", str(dtype).removeprefix("torch."),
                           " or ".join(str(d).removeprefix("torch.") for d in native_dtypes))
        if quantized:
            logger.info("fiddler: experts stay %s on both sides; host experts run %s, device experts the "
                        "Triton MoE kernels, which read the stored format; weight copies, streamed chunks "
                        "and online re-placement, which move bf16 experts, are off",
                        shape.expert_format.describe(),
                        "the AVX512 quantized-expert kernels" if cpu_kernels.quantized_available()
                        and native_dtype else "torch's dequantize-per-expert path")
        C = expert_chunks(shape.intermediate_size)
        if cfg.streamed_chunks is not None:
            check_streamed_chunks(cfg.streamed_chunks, shape.top_k, C)
        placement, staging_slots, adapt = resolve_model_placement(cfg, shape, vllm_config)
        tp_rank, tp_size = compat.tensor_parallel()
        # tensor-parallel ranks each compute their shard of the cold experts: together, once a host
        runtime = get_cpu_runtime(cfg.resolved_cpu_threads(tp_size if on_cuda else 1), inline=not on_cuda,
                                  pin_memory=on_cuda, wait_on_device=True)
        dtype = vllm_config.model_config.dtype
        stager = None
        if staging_slots:
            stager = WeightStager(staging_slots, shape.hidden_size, shape.intermediate_size, C, dtype, device)
        cc = vllm_config.compilation_config
        if cc.splitting_ops is not None:
            cc.splitting_ops.extend(op for op in ops.SPLITTING_OPS if op not in cc.splitting_ops)
        dummy = compat.is_dummy_load(vllm_config)
        layers = []
        for ordinal, method in enumerate(methods):
            kwargs = dict(
                num_experts=shape.num_experts, top_k=shape.top_k, hidden_size=shape.hidden_size,
                intermediate_size=shape.intermediate_size, gpu_experts=placement.on_gpu(ordinal),
                dtype=method.spec.dtype, device=device, cpu_runtime=runtime, pin_memory=on_cuda,
                host_backing=adapt, math=math)
            hybrid = QuantizedHybridMoE(expert_format=shape.expert_format, tp=(tp_rank, tp_size), **kwargs) \
                if quantized else HybridMoE(**kwargs)
            method.hybrid = hybrid
            if dummy:  # vLLM's dummy loader fills Parameters only: the experts are plain tensors
                method.dummy_init_seed = 1234 + method.spec.layer_index
            layers.append(hybrid)
        self.fiddler_layers = layers
        self.placement = placement
        self._stats_writer = StatsWriter() if tp_rank == 0 else None  # the ranks route alike
        # decode-sized steps hand the native job thread their routing (bf16 or quantized experts alike)
        routed_max_tokens = ROUTED_MAX_TOKENS if on_cuda and layers[0].native_jobs else 0
        for experts in layers:
            experts.stager = stager
            experts.routed_max_tokens = routed_max_tokens
            # on CUDA host experts are pinned; a layer holding none (every expert on the GPU, no
            # host backing) has nothing to stream
            if on_cuda and routed_max_tokens and stager is not None and experts.num_host_slots:
                experts.host_views = (device_view(experts.w13_cpu_chunks), device_view(experts.w2_cpu_chunks))
                if cfg.streamed_chunks is not None:
                    experts.set_streamed_chunks(cfg.streamed_chunks)
        self.kernel_warmup: dict = {}
        self.cuda_graphs: dict = {}
        if on_cuda:
            self.kernel_warmup = warm_up_kernels(layers, stager, vllm_config.scheduler_config.max_num_batched_tokens)
            if placement.num_cpu:
                graphs = MoEGraphs(CUDA_GRAPH_MAX_TOKENS, shape.hidden_size, shape.top_k, dtype, device)
                captured = graphs.capture(layers, stager)
                routed = graphs.capture_routed(layers, routed_max_tokens, HEAT_TABLE_TOKENS + 1)
                self.cuda_graphs = {"graphs": captured["graphs"] + routed["graphs"],
                                    "seconds": captured["seconds"] + routed["seconds"],
                                    "routed_graphs": routed["graphs"]}
                for experts in layers:
                    experts.graphs = graphs
        self.graph_jobs = self._graph_steps(cfg, vllm_config, on_cuda, shape, routed_max_tokens)
        self._forward_ran = False  # this step's forward ran in Python (not a FULL graph replay)
        self.replacer = None
        if adapt:
            copier = None
            if on_cuda:
                copier = ExpertCopier(shape.hidden_size, shape.intermediate_size, C, dtype, device)
            self.replacer = ExpertReplacer(layers, cfg.adaptation, copier)

    def _graph_steps(self, cfg: FiddlerConfig, vllm_config: Any, on_cuda: bool, shape: MoEShape,
                     routed_max_tokens: int) -> GraphJobs | None:
        """Which steps vLLM's FULL decode graphs may take (graph_jobs.set_full_graph_max_tokens,
        read by the plugin's CUDA-graph hook): every size when no layer needs the CPU, else
        steps of up to routed_max_tokens as graph steps, whose GraphJobs this returns (None: none)."""
        graph_jobs.set_full_graph_max_tokens(0)  # until this model says otherwise
        cc = vllm_config.compilation_config
        if not (on_cuda and not vllm_config.model_config.enforce_eager
                and cc.cudagraph_mode is not None and cc.cudagraph_mode.has_full_cudagraphs()):
            return None
        layers = [m for m in self.fiddler_layers if m.cpu_experts or m.host_backing]
        if not layers:  # the op is GPU work only: any capture replays it
            graph_jobs.set_full_graph_max_tokens(vllm_config.scheduler_config.max_num_batched_tokens)
            return None
        from vllm_fiddler.kernels import cpu as cpu_kernels

        if not (routed_max_tokens  # 0 where the native job thread does not take the layers' experts
                and cpu_kernels.isa() != "torch" and layers[0].cpu_runtime.takes_routed_jobs()
                and graph_jobs.available()):
            logger.info("fiddler: the MoE op stays out of FULL CUDA graphs here (it needs the native CPU kernels "
                        "in the model's dtype and stream memory operations in graphs); piecewise graphs only")
            return None
        jobs = GraphJobs(routed_max_tokens, shape.hidden_size, shape.top_k, vllm_config.model_config.dtype)
        for experts in layers:
            # made before any capture: the graphs read them where they are (rewritten in place)
            if experts.heat_table is None:
                experts.set_heat_table([0.0] * (HEAT_TABLE_TOKENS + 1))
            experts.streamed_below()
        for experts in self.fiddler_layers:  # all of them: each counts the graph's steps
            experts.graph_jobs = jobs
        graph_jobs.set_full_graph_max_tokens(routed_max_tokens)
        logger.info("fiddler: steps of up to %d tokens run inside vLLM's FULL CUDA graphs, which hand the CPU "
                    "experts their jobs themselves (graph steps)", routed_max_tokens)
        return jobs

    def forward(self, *args: Any, **kwargs: Any):
        # vLLM compiles the inner model, not this method: this runs in plain Python every
        # step that is not a FULL graph replay
        self._forward_ran = True
        hidden_states = super().forward(*args, **kwargs)
        if compat.is_real_step():
            self._between_steps()
        return hidden_states

    def compute_logits(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        # Runs every real step, outside the forward (and its FULL graph): a step whose forward
        # did not run in Python was a graph replay, and gets the housekeeping forward does.
        logits = super().compute_logits(hidden_states, *args, **kwargs)
        if self._forward_ran:
            self._forward_ran = False
        elif self.graph_jobs is not None and not torch.cuda.is_current_stream_capturing():
            for experts in self.fiddler_layers:
                experts.after_graph_step()
            self._between_steps()
        return logits

    def _between_steps(self) -> None:
        if self.replacer is not None:
            self.replacer.on_step()  # re-placement (runtime/replacer.py)
        if self._stats_writer is not None:
            self._stats_writer.maybe_write(self)


# Decode-sized steps (batch-1 to 4) take the routed path: the stream hands the CPU its
# routing, so the engine thread never waits (moe.steps.routed, runtime.graph_jobs). Measured on
# the H100 box (Mixtral-8x7B shapes, 8 layers, greedy on random weights, one run): batch-1
# decode 64.4 tok/s as graph steps, 54.9 eager (benchmarks/results/e2e-h100.json).
ROUTED_MAX_TOKENS = 4
# Steps of up to this many tokens replay the hot and copied experts' launches from CUDA
# graphs (runtime.moe_graphs): an eager fused_moe is ~0.5 ms of engine-thread time.
CUDA_GRAPH_MAX_TOKENS = 16


def _expert_format(methods: list):
    """The experts' quantized format (moe.quantized.ExpertFormat), None where unquantized;
    raises for a checkpoint whose MoE layers differ in it."""
    formats = {}
    for m in methods:
        formats.setdefault(m.expert_format, []).append(m.spec.layer_index)
    if len(formats) > 1:
        raise FiddlerConfigError("fiddler: the MoE layers' experts come in different formats (" + "; ".join(
            f"layers {ids}: {f.describe() if f else 'unquantized'}" for f, ids in formats.items())
            + "); fiddler runs one expert format per model")
    return next(iter(formats))


def _non_expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of the built model's weights other than routed experts (which are not allocated
    yet): attention, norms, gates, shared experts, dense layers, embeddings."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if isinstance(tensor, moe_method.ExpertSink) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
