"""The hybrid layer's step paths, each a mixin of moe.layer.HybridMoE: host (vLLM's CPU
platform), synced (CUDA, the host plans), routed (CUDA decode: the stream hands the CPU its
routing; graph steps inside vLLM's FULL graphs); trace (their op timeline)."""
