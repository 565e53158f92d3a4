"""Tasks with generated data for training and evaluating writers."""
from . import kv_retrieval

__all__ = ["kv_retrieval"]
