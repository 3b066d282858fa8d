"""Stage 1: trace a model with torch.fx and infer its permutation groups."""
from .coupling import trace_permutation_spec
from .tracer import trace_model

__all__ = ["trace_permutation_spec", "trace_model"]
