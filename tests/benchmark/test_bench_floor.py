"""FLOP count and floor of a write, against hand computations and the performance guide."""
import pytest
import torch

from gradmem_fast.benchmark import cases, floor


def _counted_matrix_params(config):
    """Weights of every nn.Linear and GPT-2 Conv1D of the model built on the meta device."""
    import transformers as tf
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    return sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, (torch.nn.Linear, Conv1D)))


def test_gpt2_small_step_flops_by_hand():
    config = cases.gpt2_small_config()
    # per layer: c_attn 768x2304, attn c_proj 768x768, c_fc 768x3072, mlp c_proj 3072x768; head 50257x768
    per_layer = 768 * 2304 + 768 * 768 + 768 * 3072 + 3072 * 768
    P = 12 * per_layer + 50257 * 768
    assert P == 123_532_032
    assert floor.matrix_params(config) == P
    # gpt2-latency: B 1, T 512, m 16 -> N = 528 tokens
    A = 2 * 1 * 528 ** 2 * 768 * 12
    expected = 4 * 528 * P + 3.5 * A
    assert floor.step_flops(config, B=1, T=512, m=16) == expected
    assert expected == pytest.approx(2.7888e11, rel=1e-4)


@pytest.mark.parametrize("name", ["gpt2-small", "llama1b", "kv"])
def test_matrix_params_match_the_built_model(name):
    config = cases.CONFIGS[name]()
    assert floor.matrix_params(config) == _counted_matrix_params(config)


# floor ms at R = 770 TFLOP/s, as printed in PERFORMANCE.md (rounded there to 3 significant digits)
@pytest.mark.parametrize("case_name, printed_ms", [
    ("gpt2-latency", 1.81), ("gpt2-batch", 59.6), ("llama1b-latency", 35.0), ("llama1b-batch", 581.0),
])
def test_floor_of_standard_cases(case_name, printed_ms):
    case = cases.get_case(case_name)
    got = floor.floor_ms(cases.build_config(case), case.B, case.T, case.m, case.K, 770.0)
    assert got == pytest.approx(printed_ms, rel=5e-3)


def test_floor_arithmetic():
    config = cases.kv_config()
    one = floor.floor_ms(config, 2, 30, 4, 1, 100.0)
    assert one == pytest.approx(floor.step_flops(config, 2, 30, 4) / 100e12 * 1e3, rel=1e-12)
    assert floor.floor_ms(config, 2, 30, 4, 5, 100.0) == pytest.approx(5 * one, rel=1e-12)
    assert floor.floor_ms(config, 2, 30, 4, 1, 200.0) == pytest.approx(one / 2, rel=1e-12)
    assert floor.floor_ms(config, 2, 30, 4, 1, None) is None


def test_unsupported_config_names_its_type():
    import transformers as tf

    with pytest.raises(ValueError, match="gpt_neox"):
        floor.matrix_params(tf.GPTNeoXConfig())


@pytest.mark.gpu
def test_matmul_rate_is_plausible():
    rate = floor.measure_matmul_tflops("cuda", n=4096, repeats=5)
    assert 50.0 < rate < 2000.0
