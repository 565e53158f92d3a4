"""The README's Usage block runs as written (here on the CPU) and gives what its comments say."""
import os
import re
import warnings

import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def usage_block():
    text = open(README).read()
    section = text[text.index("## Usage"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_usage_runs_as_written(capfd):
    code = usage_block()
    assert "gradmem_fast.generate(" in code and "torch_dtype" not in code
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation or fallback warning from the example
        exec(compile(code, README + ":Usage", "exec"), namespace)
    out, err = capfd.readouterr()
    assert "deprecat" not in (out + err).lower()
    memory, logits, tokens, query = (namespace[k] for k in ("memory", "logits", "tokens", "query"))
    B, Tq = query.shape
    assert memory.shape == (B, 8, namespace["d"]) and torch.isfinite(memory).all()
    assert not torch.equal(memory, namespace["m0"].expand_as(memory))  # the write moved the memory
    assert logits.shape == (B, Tq, namespace["V"])
    assert tokens.shape == (B, Tq + 16) and torch.equal(tokens[:, :Tq], query)
    if namespace["device"] == "cpu":  # fp32: greedy tokens are the argmax of read() over query + new tokens
        import gradmem_fast

        again = gradmem_fast.read(namespace["model"], memory, tokens)
        assert torch.equal(tokens[:, Tq:], again[:, Tq:].argmax(-1))
    assert "backend" in out
