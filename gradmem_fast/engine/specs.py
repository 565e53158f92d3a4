"""ModelSpec per model, cached: describe() walks every module, which costs milliseconds per call."""
import weakref

_SPECS = weakref.WeakKeyDictionary()


def param_signature(model):
    """Addresses and dtypes of the parameters: changes when they are replaced, moved or cast."""
    return tuple((p.data_ptr(), p.dtype) for p in model.parameters())


def spec_of(model):
    """(ModelSpec, parameter signature); raises models.UnsupportedModel."""
    from ..models import describe

    try:
        signature = param_signature(model)
    except AttributeError:  # not a module: describe() says why
        return describe(model), None
    try:
        cached = _SPECS.get(model)
    except TypeError:  # not weak-referenceable
        return describe(model), signature
    if cached is not None and cached[0] == signature:
        return cached[1], signature
    spec = describe(model)
    _SPECS[model] = (signature, spec)
    return spec, signature


def length_reason(spec, seq_len):
    """Why seq_len = m memory rows + T tokens is past what the fast engine covers (the model's position table or
    sliding window), else None: the one statement of that limit, a fallback reason for dispatch."""
    if spec.max_positions is not None and seq_len > spec.max_positions:
        return (f"memory rows + tokens = {seq_len} exceeds the model's limit {spec.max_positions} "
                "(position table or sliding window), which the fast engine does not cover")
    return None


def check_length(spec, m, T):
    """ValueError (length_reason) when the fast engine is called past that limit directly."""
    reason = length_reason(spec, m + T)
    if reason is not None:
        raise ValueError(reason)
