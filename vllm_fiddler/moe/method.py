"""The FusedMoE integration: any vLLM model's routed experts, as a hybrid layer.

vLLM builds every MoE block of every model through ``FusedMoE``: a router, a
``RoutedExperts`` holding the expert weights, and a ``MoERunner`` that runs
gate, shared experts, routing and the routed experts inside one custom op.
While a model is built with ``model_impl="fiddler"`` (``building()``), each
``RoutedExperts`` gets a ``FiddlerMoEMethod`` as its quant method instead of
vLLM's ``UnquantizedFusedMoEMethod``. In vLLM's own terms the GPU-resident
experts are an expert-parallel rank's local experts, and the host is one more
rank:

  route            vLLM's router, untouched: softmax or sigmoid, grouped top-k,
                   correction bias, scaling, renormalisation, custom functions
  create_weights   zero-size stand-ins; nothing is allocated until the whole
                   model is built and its placement is known (vllm_fiddler.moe.model)
  weight_loader    each checkpoint tensor goes to its expert's device slot and/or
                   host slot (vLLM's own loaders call it, per expert or fused)
  apply            the hybrid layer (vllm_fiddler.moe.layer.HybridMoE)

Shared experts, gates, routed-input transforms and dense layers stay vLLM's
and stay on the GPU. The runner's custom op becomes ours (``ops``), whose
output the caller allocates, so vLLM's piecewise CUDA graphs split at it and
its host-side work runs every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any

import torch

from vllm_fiddler import compat
from vllm_fiddler.config import FiddlerConfigError

# The expert math the hybrid layer computes, by vLLM's activation name.
SUPPORTED_ACTIVATIONS = ("silu", "swigluoai")


@dataclasses.dataclass
class MoELayerSpec:
    """One FusedMoE layer as vLLM built it (read in create_weights)."""

    prefix: str
    layer_index: int  # the decoder layer's index in the model
    num_experts: int  # E
    top_k: int  # K
    hidden_size: int  # H
    intermediate_size: int  # I
    dtype: torch.dtype
    activation: str
    has_bias: bool
    apply_router_weight_on_input: bool
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None


class ModelBuild:
    """What one model's construction gathered: its FusedMoE layers, in build order."""

    def __init__(self) -> None:
        self.methods: list[FiddlerMoEMethod] = []


_local = threading.local()


@contextlib.contextmanager
def building():
    """FusedMoE layers built inside get FiddlerMoEMethod (compat.patch_quant_method_selection)."""
    previous = getattr(_local, "build", None)
    _local.build = build = ModelBuild()
    try:
        yield build
    finally:
        _local.build = previous


def choose_method(routed_experts: Any, prefix: str, quant_config: Any, moe_config: Any):
    """compat.patch_quant_method_selection's hook: our method while a fiddler model is built."""
    build = getattr(_local, "build", None)
    if build is None:
        return None
    expert_format = None
    if quant_config is not None:
        found = compat.expert_quantization(quant_config, prefix, routed_experts)
        if found is not None:
            from vllm_fiddler.moe.quantized import ExpertFormat

            expert_format = ExpertFormat(*found)
    method = FiddlerMoEMethod(moe_config, prefix, expert_format)
    build.methods.append(method)
    return method


class FiddlerMoEMethod(compat.fused_moe_method_base()):
    """vLLM's FusedMoE method contract for a hybrid layer (module docstring)."""

    tp_rank, tp_size = 0, 1  # this process's tensor-parallel rank and their number (set per method)
    expert_format = None  # moe.quantized.ExpertFormat, or None: unquantized experts (set per method)

    def __init__(self, moe_config: Any, prefix: str, expert_format: Any = None):
        super().__init__(moe_config)
        self.prefix = prefix
        self.expert_format = expert_format
        self.spec: MoELayerSpec | None = None
        self.hybrid = None  # HybridMoE, attached by the model once placement is known
        self.runner = None  # the MoERunner holding this method (moe.model)
        self.dummy_init_seed: int | None = None  # set where vLLM's dummy loader fills the model
        self.tp_rank, self.tp_size = compat.tensor_parallel()  # this rank holds 1 / tp_size of each expert

    # ---- construction -----------------------------------------------------
    def create_weights(self, layer: Any, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        moe = self.moe
        activation = compat.activation_name(moe.activation)
        if activation not in SUPPORTED_ACTIVATIONS:
            raise FiddlerConfigError(
                f"fiddler: layer {self.prefix} uses the {activation!r} expert activation; the hybrid "
                f"layer computes {list(SUPPORTED_ACTIVATIONS)}")
        if num_experts != moe.num_experts:
            raise FiddlerConfigError(f"fiddler: layer {self.prefix} holds {num_experts} of "
                                     f"{moe.num_experts} experts (expert parallelism), which fiddler "
                                     "does not support yet")
        if layer.apply_router_weight_on_input and layer.top_k != 1:
            raise FiddlerConfigError(f"fiddler: layer {self.prefix} applies router weights to the input "
                                     f"with top-{layer.top_k} routing; vLLM only defines that for top-1")
        self.spec = MoELayerSpec(
            prefix=self.prefix, layer_index=compat.extract_layer_index(self.prefix),
            num_experts=num_experts, top_k=layer.top_k, hidden_size=hidden_size,
            intermediate_size=intermediate_size_per_partition, dtype=params_dtype, activation=activation,
            has_bias=bool(moe.has_bias), apply_router_weight_on_input=bool(layer.apply_router_weight_on_input),
            swiglu_alpha=layer.swiglu_alpha, swiglu_limit=layer.swiglu_limit)
        names = {"w13_weight": params_dtype, "w2_weight": params_dtype}
        if self.expert_format is not None:  # as vLLM's method for the format names them
            try:
                self.expert_format.check_layer(self.prefix, hidden_size, intermediate_size_per_partition)
            except ValueError as e:
                raise FiddlerConfigError(f"fiddler: {e}") from None
            names = self.expert_format.param_dtypes()
        if moe.has_bias:
            names.update(w13_bias=params_dtype, w2_bias=params_dtype)
        for name, dtype in names.items():
            sink = ExpertSink(torch.empty((num_experts, 0), dtype=dtype), self, name)
            sink.weight_loader = self.weight_loader
            layer.register_parameter(name, sink)

    def weight_loader(self, param: "ExpertSink", loaded_weight: torch.Tensor, weight_name: str = "",
                      shard_id: str | None = None, expert_id: int | None = None,
                      return_success: bool = False) -> bool | None:
        """vLLM's expert loader signature: one expert's w1 / w3 ([I, H]) or w2 ([H, I]) of
        `param` (w13_weight / w2_weight), or a bias."""
        if expert_id is None or shard_id is None:  # a whole tensor, as vLLM's default loader gives
            param.load_all(loaded_weight)
        else:
            kind = param.kind()  # "w13", "w2", "b13", "b2", "s13", "s2"
            name = kind[0] + shard_id[1:]
            experts = [(int(expert_id), loaded_weight)]
            if self.expert_format is None and loaded_weight.dim() == (3 if name[0] == "w" else 2):
                # one shard of every expert at once, as vLLM's loader takes it whatever the
                # expert id (Llama-4's fused checkpoints: w1 / w3 [E, I, H], w2 [E, H, I])
                experts = list(enumerate(loaded_weight))
            for e, weight in experts:
                if self.expert_format is None or name[0] == "b":  # a quantized layer shards its own layouts
                    weight = self._tp_share(name, weight)
                self._hybrid().load_expert(e, name, weight)
        return True if return_success else None

    def _tp_share(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """This rank's share of one expert's tensor, as vLLM's FusedMoE loader splits it under
        tensor parallelism: w1 / w3 [I, H] and b1 / b3 [I] by rows of the intermediate size,
        w2 [H, I] by its columns; b2 [H] is added once, by rank 0 (the ranks' outputs are
        summed). A tensor already of this rank's size (a model loader that splits it itself)
        is taken as is."""
        if self.tp_size == 1 or name[0] not in "wb":
            return weight
        if name == "b2":
            return weight if self.tp_rank == 0 else torch.zeros_like(weight)
        dim, I = (1 if name == "w2" else 0), self.spec.intermediate_size
        if weight.shape[dim] == I:
            return weight
        if weight.shape[dim] != I * self.tp_size:
            raise ValueError(f"fiddler: {self.prefix}'s {name} has {weight.shape[dim]} intermediate rows, not "
                             f"{I} x {self.tp_size} tensor-parallel ranks")
        return weight.narrow(dim, self.tp_rank * I, I)

    def _hybrid(self):
        if self.hybrid is None:
            raise RuntimeError(f"fiddler: layer {self.prefix} was loaded before its model placed its experts")
        return self.hybrid

    def get_fused_moe_quant_config(self, layer: Any):
        return None

    def process_weights_after_loading(self, layer: Any) -> None:
        if self.dummy_init_seed is not None:
            # vLLM's dummy loader fills Parameters only: the experts are fiddler's own tensors
            self._hybrid().init_random(seed=self.dummy_init_seed)

    # ---- compute ------------------------------------------------------------
    @property
    def is_monolithic(self) -> bool:
        # vLLM's routers run CUDA kernels; on its CPU platform the method routes, as vLLM's own
        # CPU MoE method does (apply_monolithic)
        return compat.on_cpu_platform()

    def apply_monolithic(self, layer: Any, x: torch.Tensor, router_logits: torch.Tensor,
                         input_ids: torch.Tensor | None = None) -> torch.Tensor:
        topk_weights, topk_ids = compat.cpu_platform_routing(layer, x, router_logits)
        return self.apply(layer, x, topk_weights, topk_ids)

    def apply(self, layer: Any, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts: Any = None, shared_experts_input: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H], topk_weights / topk_ids [T, K] from vLLM's router -> [T, H]."""
        hybrid = self.hybrid
        out = ops.take_output(x)
        if self.spec.apply_router_weight_on_input:  # top-1: the weight scales the input instead
            x = (x.float() * topk_weights.float()).to(x.dtype)
            topk_weights = torch.ones_like(topk_weights, dtype=torch.float32)
        hybrid.forward_into(x, topk_weights, topk_ids, out)
        return out


class ExpertSink(torch.nn.Parameter):
    """A zero-size stand-in for one of a layer's expert tensors (w13_weight, w2_weight, biases):
    vLLM's loaders find it by name, and what they write goes to the hybrid layer's device and
    host slots instead. A loader that copies the whole tensor in (``param.copy_(full)``, as
    gpt-oss's does) is caught here too."""

    def __new__(cls, data: torch.Tensor, method: FiddlerMoEMethod, name: str):
        sink = torch.Tensor._make_subclass(cls, data, False)
        sink.fiddler_method, sink.tensor_name = method, name
        return sink

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def kind(self) -> str:
        """The tensor as HybridMoE.load_expert names it: w13 / w2 weights, b13 / b2 biases, s13 /
        s2 scales of quantized weights, k13 / k2 their checkpoint's [N, K], z13 / z2 and g13 /
        g2 AutoGPTQ's zero points and group indices."""
        proj = self.tensor_name.split("_")[0]  # w13 / w2
        for suffix, kind in (("_bias", "b"), ("_shape", "k"), ("_qzeros", "z"), ("_g_idx", "g")):
            if self.tensor_name.endswith(suffix):
                return kind + proj[1:]
        return ("s" if "scale" in self.tensor_name else "w") + proj[1:]

    def load_all(self, full: torch.Tensor) -> None:
        """full [E, ...]: every expert's tensor at once, in vLLM's layout for this activation."""
        hybrid = self.fiddler_method._hybrid()
        kind = self.kind()
        if full.shape[0] != hybrid.num_experts:
            raise ValueError(f"fiddler: {self.fiddler_method.prefix}.{self.tensor_name} got {full.shape[0]} experts, "
                             f"the layer has {hybrid.num_experts}")
        for e in range(full.shape[0]):
            hybrid.load_expert(e, kind, full[e])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_ and args and isinstance(args[0], ExpertSink):
            args[0].load_all(args[1])
            return args[0]
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def __reduce_ex__(self, proto):  # never pickled with its method
        return torch.nn.Parameter.__reduce_ex__(torch.nn.Parameter(self.data, False), proto)


from vllm_fiddler.moe import ops  # noqa: E402  (ops imports this module's names lazily)
