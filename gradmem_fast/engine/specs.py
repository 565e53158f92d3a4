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


def check_length(spec, m, T):
    """ValueError when m memory rows + T tokens pass the model's position table or sliding window."""
    if spec.max_positions is not None and m + T > spec.max_positions:
        raise ValueError(f"memory rows + tokens = {m} + {T} exceeds the model's limit {spec.max_positions} "
                         "(position table or sliding window), which the fast engine does not cover")
