"""FiddlerMixtralForCausalLM: vLLM's Mixtral with a hybrid MoE block.

Everything but the MoE block is vLLM's own (attention, decoder layer,
embeddings, logits, weight loading, torch.compile). ``MixtralMoE`` is swapped
for ``FiddlerMixtralMoE`` only while the model is built; the subclass keeps
vLLM's ``isinstance`` checks and the checkpoint names (``block_sparse_moe.gate``,
``block_sparse_moe.experts.{e}.w{1,2,3}``) working.
"""

from __future__ import annotations


import threading

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models import mixtral as vllm_mixtral
from vllm.model_executor.models.utils import extract_layer_index

from vllm_fiddler.config import FiddlerConfig
from vllm_fiddler.layers import custom_op
from vllm_fiddler.layers.hybrid_moe import HybridMoE, expert_chunks
from vllm_fiddler.logger import logger
from vllm_fiddler.metrics import StatsWriter
from vllm_fiddler.placement import MoEShape, Placement
from vllm_fiddler.preflight import check_streamed_chunks
from vllm_fiddler.runtime import device_wait, graph_jobs
from vllm_fiddler.runtime.cpu_experts import CPUExpertRuntime, get_cpu_runtime
from vllm_fiddler.runtime.graph_jobs import GraphJobs
from vllm_fiddler.runtime.host_view import device_view
from vllm_fiddler.runtime.kernel_warmup import warm_up_kernels
from vllm_fiddler.runtime.moe_graphs import MoEGraphs
from vllm_fiddler.runtime.replacer import ExpertCopier, ExpertReplacer, is_real_step
from vllm_fiddler.runtime.setup import resolve_model_placement
from vllm_fiddler.runtime.weight_stager import WeightStager


# The placement and runtime of the model being built; FiddlerMixtralMoE reads
# them because vLLM's decoder layer constructs it with Mixtral's arguments only.
_building = threading.local()


class FiddlerMixtralMoE(vllm_mixtral.MixtralMoE):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 params_dtype: torch.dtype | None = None, quant_config=None, tp_size=None,
                 dp_size=None, prefix: str = "", enable_eplb: bool = False):
        nn.Module.__init__(self)  # not MixtralMoE.__init__: FusedMoE would allocate every expert
        if quant_config is not None or enable_eplb:
            raise ValueError("fiddler: quantised experts and EPLB are not supported")
        placement: Placement = _building.placement
        runtime: CPUExpertRuntime = _building.runtime
        host_backing: bool = _building.host_backing
        vllm_config = get_current_vllm_config()
        self.hidden_size = hidden_size
        self.layer_name = prefix
        self.enable_eplb = False
        self.n_routed_experts = self.n_logical_experts = num_experts
        self.n_physical_experts = self.n_local_physical_experts = num_experts
        self.n_redundant_experts = 0
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False, params_dtype=params_dtype,
                                     quant_config=None, prefix=f"{prefix}.gate")
        layer_index = extract_layer_index(prefix)
        device = torch.get_default_device()
        self.experts = HybridMoE(
            num_experts=num_experts, top_k=top_k, hidden_size=hidden_size,
            intermediate_size=intermediate_size, gpu_experts=placement.on_gpu(layer_index),
            dtype=vllm_config.model_config.dtype, device=device, cpu_runtime=runtime,
            pin_memory=device.type == "cuda", host_backing=host_backing)
        if vllm_config.load_config.load_format == "dummy":
            # vLLM's dummy loader only fills Parameters; experts are plain tensors.
            self.experts.init_random(seed=1234 + layer_index)
        ctx = vllm_config.compilation_config.static_forward_context
        if prefix in ctx:
            raise ValueError(f"Duplicate layer name: {prefix}")
        ctx[prefix] = self

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        orig_shape = hidden_states.shape
        x = hidden_states.view(-1, self.hidden_size)  # [T, H]
        router_logits, _ = self.gate(x)  # [T, E]
        out = torch.empty_like(x)
        torch.ops.vllm_fiddler.hybrid_moe(x, router_logits, out, self.layer_name)
        return out.view(orig_shape)


class FiddlerMixtralForCausalLM(vllm_mixtral.MixtralForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        custom_op.register_op()
        cfg = FiddlerConfig.from_additional_config(vllm_config.additional_config)
        hf = vllm_config.model_config.hf_config
        shape = MoEShape.from_hf_config(hf, dtype_bytes=vllm_config.model_config.dtype.itemsize)
        if cfg.streamed_chunks is not None:
            check_streamed_chunks(cfg.streamed_chunks, shape.top_k, expert_chunks(shape.intermediate_size))
        placement, staging_slots, adapt = resolve_model_placement(cfg, shape, vllm_config)
        device = torch.get_default_device()
        on_cuda = device.type == "cuda"
        runtime = get_cpu_runtime(cfg.resolved_cpu_threads(), inline=not on_cuda, pin_memory=on_cuda,
                                  wait_on_device=cfg.wait_on_device)
        if on_cuda and cfg.blocking_sync and device_wait.block_on_host_syncs():
            logger.info("fiddler: the engine thread's GPU waits sleep instead of spinning (blocking_sync)")
        stager = None
        if staging_slots:
            stager = WeightStager(staging_slots, hf.hidden_size, hf.intermediate_size,
                                  expert_chunks(hf.intermediate_size), vllm_config.model_config.dtype, device)
        cc = vllm_config.compilation_config
        if cc.splitting_ops is not None and custom_op.SPLITTING_OP not in cc.splitting_ops:
            cc.splitting_ops.append(custom_op.SPLITTING_OP)
        _building.placement, _building.runtime, _building.host_backing = placement, runtime, adapt
        original, vllm_mixtral.MixtralMoE = vllm_mixtral.MixtralMoE, FiddlerMixtralMoE
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            vllm_mixtral.MixtralMoE = original
            del _building.placement, _building.runtime, _building.host_backing
        self.placement = placement
        self.fiddler_shape = shape
        self._stats_writer = StatsWriter()
        for experts in self.moe_layers:
            experts.stager = stager
            experts.routed_max_tokens = cfg.routed_max_tokens if on_cuda else 0
            if on_cuda and cfg.routed_max_tokens and stager is not None:  # on CUDA host experts are pinned
                experts.host_views = (device_view(experts.w13_cpu_chunks), device_view(experts.w2_cpu_chunks))
                if cfg.streamed_chunks is not None:
                    experts.set_streamed_chunks(cfg.streamed_chunks)
        if on_cuda and cfg.streamed_chunks is not None and self.moe_layers and self.moe_layers[0].host_views:
            logger.info("fiddler: routed steps' GPU reads %s of each cold expert's %d chunks from host memory "
                        "(streamed_chunks)", cfg.streamed_chunks, self.moe_layers[0].chunks)
        self.kernel_warmup = {}
        self.cuda_graphs = {}
        if on_cuda:
            self.kernel_warmup = warm_up_kernels(self.moe_layers, stager,
                                                 vllm_config.scheduler_config.max_num_batched_tokens)
            if cfg.cuda_graph_max_tokens and placement.num_cpu:
                graphs = MoEGraphs(cfg.cuda_graph_max_tokens, hf.hidden_size, hf.num_experts_per_tok,
                                   vllm_config.model_config.dtype, device)
                self.cuda_graphs = graphs.capture(self.moe_layers, stager,
                                                  streamed_max_tokens=self.moe_layers[0].routed_max_tokens)
                if cfg.routed_graphs and cfg.routed_max_tokens:
                    from vllm_fiddler.runtime.replacer import HEAT_TABLE_TOKENS

                    routed = graphs.capture_routed(self.moe_layers, cfg.routed_max_tokens,
                                                   vllm_config.model_config.dtype, HEAT_TABLE_TOKENS + 1)
                    self.cuda_graphs = {"graphs": self.cuda_graphs["graphs"] + routed["graphs"],
                                        "seconds": self.cuda_graphs["seconds"] + routed["seconds"],
                                        "routed_graphs": routed["graphs"]}
                for experts in self.moe_layers:
                    experts.graphs = graphs
        self.graph_jobs = self._graph_steps(cfg, vllm_config, on_cuda, hf)
        self._forward_ran = False  # this step's forward ran in Python (not a FULL graph replay)
        self.replacer = None
        if adapt:
            copier = None
            if on_cuda:
                copier = ExpertCopier(hf.hidden_size, hf.intermediate_size, expert_chunks(hf.intermediate_size),
                                      vllm_config.model_config.dtype, device)
            self.replacer = ExpertReplacer(self.moe_layers, cfg.adaptation, copier)

    def _graph_steps(self, cfg: FiddlerConfig, vllm_config: VllmConfig, on_cuda: bool, hf) -> GraphJobs | None:
        """Which steps vLLM's FULL decode graphs may take (graph_jobs.set_full_graph_max_tokens,
        read by vllm_hooks): every size when no layer needs the CPU, else steps of up to
        routed_max_tokens as graph steps, whose GraphJobs this returns (None: none)."""
        graph_jobs.set_full_graph_max_tokens(0)  # until this model says otherwise
        cc = vllm_config.compilation_config
        if not (on_cuda and cfg.full_cuda_graphs and not vllm_config.model_config.enforce_eager
                and cc.cudagraph_mode is not None and cc.cudagraph_mode.has_full_cudagraphs()):
            return None
        layers = [m for m in self.moe_layers if m.cpu_experts or m.host_backing]
        if not layers:  # the op is GPU work only: any capture replays it
            graph_jobs.set_full_graph_max_tokens(vllm_config.scheduler_config.max_num_batched_tokens)
            return None
        from vllm_fiddler.kernels import cpu as cpu_kernels
        from vllm_fiddler.runtime.replacer import HEAT_TABLE_TOKENS

        if not (cfg.routed_max_tokens and vllm_config.model_config.dtype == torch.bfloat16
                and cpu_kernels.isa() != "torch" and layers[0].cpu_runtime.takes_routed_jobs()
                and graph_jobs.available()):
            logger.info("fiddler: the MoE op stays out of FULL CUDA graphs here (it needs routed steps, bf16, "
                        "the native CPU kernels and stream memory operations in graphs); piecewise graphs only")
            return None
        jobs = GraphJobs(cfg.routed_max_tokens, hf.hidden_size, hf.num_experts_per_tok)
        for experts in layers:
            # made before any capture: the graphs read them where they are (rewritten in place)
            if experts.heat_table is None:
                experts.set_heat_table([0.0] * (HEAT_TABLE_TOKENS + 1))
            experts.streamed_below()
        for experts in self.moe_layers:  # all of them: each counts the graph's steps
            experts.graph_jobs = jobs
        graph_jobs.set_full_graph_max_tokens(cfg.routed_max_tokens)
        logger.info("fiddler: steps of up to %d tokens run inside vLLM's FULL CUDA graphs, which hand the CPU "
                    "experts their jobs themselves (graph steps)", cfg.routed_max_tokens)
        return jobs

    def forward(self, *args, **kwargs):
        # vLLM compiles self.model, not this method: the stats file is written
        # in plain Python, at most once a second (vllm_fiddler.metrics).
        self._forward_ran = True
        hidden_states = super().forward(*args, **kwargs)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return hidden_states
        if self.replacer is not None and is_real_step():
            self.replacer.on_step()  # between steps: re-placement (runtime/replacer.py)
        self._stats_writer.maybe_write(self)
        return hidden_states

    def compute_logits(self, hidden_states: torch.Tensor, *args, **kwargs):
        # Runs every real step, outside the forward (and its FULL graph): a step whose forward
        # did not run in Python was a graph replay, and gets the housekeeping forward does.
        logits = super().compute_logits(hidden_states, *args, **kwargs)
        if self._forward_ran:
            self._forward_ran = False
        elif self.graph_jobs is not None and not torch.cuda.is_current_stream_capturing():
            for experts in self.moe_layers:
                experts.after_graph_step()
            if self.replacer is not None:
                self.replacer.on_step()
            self._stats_writer.maybe_write(self)
        return logits
