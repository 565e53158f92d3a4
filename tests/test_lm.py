"""GradMemLM against an independent autograd loop in float64, learning, Trainer, save/load, bad input."""
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err, tiny_model

import gradmem_fast
from gradmem_fast import GradMemLM
from gradmem_fast.tasks import kv_retrieval as kv



FLOAT64_ATTENTION = "float64_eager_for_tests"


def float64_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(q k^T * scale + mask) v in the inputs' dtype: Hugging Face's eager attention runs its softmax
    in float32, which would make a float64 comparison only float32-exact. (B, H, S, D) in, (B, S, H, D) out."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]].to(scores.dtype)
    weights = scores.softmax(dim=-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def trainable_lm(dtype=torch.float64, seed=0, **overrides):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(FLOAT64_ATTENTION, float64_attention)
    AttentionMaskInterface.register(FLOAT64_ATTENTION, eager_mask)
    model = tiny_model("llama", dtype=dtype, seed=seed, attn=FLOAT64_ATTENTION, **overrides)
    return model.requires_grad_(True).train()


def wrapped(dtype=torch.float64, seed=0, memory_size=3, perturb=True, **options):
    options = {"steps": 2, "lr": 0.3, "write_head": True, "memory_proj": True, **options}
    module = GradMemLM(trainable_lm(dtype, seed), memory_size, **options)
    if perturb:  # move the head copy and the identity projection off their initial values
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in module.own_state_dict().values():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return module


def batch(V, B=3, Tc=9, Tq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(0, V, (B, Tc), generator=g)
    context_mask = torch.ones(B, Tc, dtype=torch.long)
    context_mask[1, 5:] = 0
    query = torch.randint(0, V, (B, Tq), generator=g)
    query_mask = torch.ones(B, Tq, dtype=torch.long)
    query_mask[2, 4:] = 0
    labels = query.clone()
    labels[:, :2] = -100
    labels[query_mask == 0] = -100
    return dict(context_ids=context, input_ids=query, labels=labels, context_mask=context_mask,
                attention_mask=query_mask)


def plain_loop(module, b, steps, second_order_steps=None, inner_loss_weight=0.0):
    """The GradMem write and read written out with model calls and torch.autograd, nothing shared."""
    lm, m = module.model, module.memory_size
    proj, head = module.memory_proj, module.write_head.weight
    B = b["context_ids"].shape[0]

    def hidden(memory, ids, mask):
        x = torch.cat([proj(memory), lm.get_input_embeddings()(ids)], dim=1)
        full = torch.cat([torch.ones(B, m, dtype=mask.dtype), mask], dim=1)
        positions = torch.arange(x.shape[1]).expand(B, -1)
        h = lm.model(inputs_embeds=x, attention_mask=full, position_ids=positions).last_hidden_state
        return h[:, m - 1 : -1]

    memory, inner = module.memory.expand(B, -1, -1), []
    ctx, cmask = b["context_ids"], b["context_mask"]
    first_order = steps - (steps if second_order_steps is None else second_order_steps)
    for k in range(steps):
        logits = hidden(memory, ctx, cmask) @ head.T  # (B, Tc, V), row i predicting ctx[:, i]
        ce = F.cross_entropy(logits.transpose(1, 2), ctx, reduction="none")
        per_sample = (ce * cmask).sum(1) / cmask.sum(1)
        inner.append(per_sample)
        # a first-order step keeps its graph: its loss stays differentiable w.r.t. the weights
        grad, = torch.autograd.grad(per_sample.sum(), memory, create_graph=k >= first_order, retain_graph=True)
        memory = memory - module.lr * (grad.detach() if k < first_order else grad)
    logits = lm.lm_head(hidden(memory, b["input_ids"], b["attention_mask"]))
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, V), b["labels"].reshape(-1), ignore_index=-100)
    inner = torch.stack(inner, dim=1)
    return loss + inner_loss_weight * inner[:, -1].mean(), logits, memory, inner


def gradients(module, loss):
    names = [n for n, p in module.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in module.named_parameters()], allow_unused=True)
    return dict(zip(names, grads))


@pytest.mark.parametrize("clip_norm", [None, 2.0])
def test_forward_loss_and_every_gradient_match_plain_autograd_float64(clip_norm):
    module = wrapped(clip_norm=clip_norm)
    b = batch(module.model.config.vocab_size)
    out = module(**b)
    ours = gradients(module, out.loss)
    if clip_norm is None:
        ref_loss, ref_logits, ref_memory, ref_inner = plain_loop(module, b, module.steps)
    else:  # the plain loop has no clip: compare against the reference write itself, differentiated
        ref_memory, ref_inner = gradmem_fast.reference.write(
            module.model, module.memory, b["context_ids"], b["context_mask"], steps=module.steps, lr=module.lr,
            write_head=module.write_head, memory_proj=module.memory_proj, clip_norm=clip_norm,
            grad_mode="second", return_losses=True)
        ref_logits = gradmem_fast.reference.read(module.model, ref_memory, b["input_ids"], b["attention_mask"],
                                                 memory_proj=module.memory_proj)
        ref_loss = F.cross_entropy(ref_logits.reshape(-1, ref_logits.shape[-1]), b["labels"].reshape(-1))
    reference = gradients(module, ref_loss)
    assert out.logits.shape == (3, 6, module.model.config.vocab_size)
    assert out.memory.shape == (3, 3, module.model.config.hidden_size)
    assert out.inner_losses.shape == (3, 2)
    assert rel_err(out.loss, ref_loss) < 1e-12
    assert rel_err(out.logits, ref_logits) < 1e-12
    assert rel_err(out.memory, ref_memory) < 1e-12
    assert rel_err(out.inner_losses, ref_inner) < 1e-6  # the write reports its losses in float32
    assert set(ours) == set(reference) and len(ours) > 20
    for name, grad in ours.items():
        assert grad is not None and reference[name] is not None, name
        assert torch.count_nonzero(grad) > 0, name
        assert rel_err(grad, reference[name]) < 1e-9, name


def test_inner_loss_weight_adds_the_mean_last_inner_loss():
    module = wrapped(inner_loss_weight=0.5)
    b = batch(module.model.config.vocab_size)
    out = module(**b)
    ref_loss, _, _, ref_inner = plain_loop(module, b, module.steps, inner_loss_weight=0.5)
    assert rel_err(out.loss, ref_loss) < 1e-7  # the inner losses come back in float32
    answer_loss = plain_loop(module, b, module.steps)[0]
    assert rel_err(out.loss - 0.5 * out.inner_losses[:, -1].mean(), answer_loss) < 1e-12


def test_inner_loss_weight_gradients_match_plain_autograd():
    module = wrapped(inner_loss_weight=0.5)
    b = batch(module.model.config.vocab_size)
    ours = gradients(module, module(**b).loss)
    reference = gradients(module, plain_loop(module, b, module.steps, inner_loss_weight=0.5)[0])
    for name, grad in ours.items():
        assert rel_err(grad, reference[name]) < 1e-6, name


def test_second_order_steps_match_a_truncated_plain_loop():
    module = wrapped(steps=3, second_order_steps=1)
    b = batch(module.model.config.vocab_size)
    ours = gradients(module, module(**b).loss)
    reference = gradients(module, plain_loop(module, b, 3, second_order_steps=1)[0])
    for name, grad in ours.items():
        assert rel_err(grad, reference[name]) < 1e-9, name


def test_steps_override_and_write_give_the_same_memory():
    module = wrapped()
    b = batch(module.model.config.vocab_size)
    out = module(**b, steps=4)
    assert out.inner_losses.shape == (3, 4)
    ref_memory = plain_loop(module, b, 4)[2]
    assert rel_err(out.memory, ref_memory) < 1e-12
    written = module.write(b["context_ids"], b["context_mask"], steps=4)
    assert rel_err(written, ref_memory) < 1e-12


def test_initialisation():
    lm = trainable_lm(torch.float32)
    module = GradMemLM(lm, 8, steps=1, lr=0.1, write_head=True, memory_proj=True)
    d = lm.config.hidden_size
    assert module.memory.shape == (8, d) and isinstance(module.memory, torch.nn.Parameter)
    assert 0.005 < module.memory.std().item() < 0.05
    assert torch.equal(module.write_head.weight, lm.lm_head.weight)
    assert module.write_head.weight.data_ptr() != lm.lm_head.weight.data_ptr()
    assert torch.equal(module.memory_proj.weight, torch.eye(d)) and torch.equal(module.memory_proj.bias, torch.zeros(d))
    bare = GradMemLM(lm, 2, steps=1, lr=0.1)
    assert bare.write_head is None and bare.memory_proj is None and bare.grad_mode == "second"


def kv_batch(n_pairs=1, size=16, seed=0):
    data = kv.KVRetrievalDataset(n_pairs, size, seed=seed)
    return kv.collate([data[i] for i in range(size)])


def kv_lm(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(kv.VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(config)


def test_overfits_one_batch_with_adamw():
    torch.manual_seed(0)
    module = GradMemLM(kv_lm(), 4, steps=1, lr=0.1, write_head=True, memory_proj=True)
    b = kv_batch(size=8)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = module(**b).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_three_steps_under_transformers_trainer(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    module = GradMemLM(kv_lm(), 4, steps=1, lr=0.1, write_head=True, memory_proj=True)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    data = kv.KVRetrievalDataset(1, 12, seed=3)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=3,
                             per_device_train_batch_size=4, learning_rate=1e-3, save_strategy="no",
                             logging_steps=1, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=module, args=args, train_dataset=data, data_collator=kv.collate)
    result = trainer.train()
    assert trainer.state.global_step == 3
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(logged)))
    assert result.training_loss > 0
    changed = [n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert {"memory", "write_head.weight", "memory_proj.weight", "model.lm_head.weight"} <= set(changed)


def test_save_and_load_round_trip(tmp_path):
    module = wrapped(torch.float32, steps=3, lr=0.2, clip_value=0.5, inner_loss_weight=0.25)
    module.save_pretrained(tmp_path)
    assert (tmp_path / "gradmem.safetensors").is_file() and (tmp_path / "model.safetensors").is_file()
    loaded = GradMemLM.from_pretrained(tmp_path, attn_implementation=FLOAT64_ATTENTION)  # as the saved model ran
    assert loaded.settings() == module.settings()
    for name, tensor in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    b = batch(module.model.config.vocab_size)
    assert torch.equal(loaded(**b).logits, module(**b).logits)
    again = GradMemLM.from_pretrained(tmp_path, model=module.model)
    assert again.model is module.model and torch.equal(again.memory, module.memory)


def test_bf16_weights_give_bf16_module_tensors_and_finite_gradients():
    lm = kv_lm().to(torch.bfloat16)
    module = GradMemLM(lm, 4, steps=1, lr=0.1, write_head=True, memory_proj=True)
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    out = module(**kv_batch(size=4))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    assert module.memory.grad is not None and module.memory.grad.abs().sum() > 0


def test_generate_goes_through_gradmem_fast_generate():
    module = wrapped(torch.float32)
    b = batch(module.model.config.vocab_size)
    memory = module.write(b["context_ids"], b["context_mask"])
    ours = module.generate(memory, b["input_ids"][:, :3], max_new_tokens=3, do_sample=False)
    ref = gradmem_fast.generate(module.model, memory, b["input_ids"][:, :3], memory_proj=module.memory_proj,
                                max_new_tokens=3, do_sample=False)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("kwargs, match", [
    (dict(memory_size=0), "memory_size"),
    (dict(memory_size=2.5), "memory_size"),
    (dict(steps=-1), "steps"),
    (dict(lr=float("nan")), "lr"),
    (dict(grad_mode="third"), "grad_mode"),
    (dict(backend="gpu"), "backend"),
    (dict(clip_norm=0.0), "clip_norm"),
    (dict(inner_loss_weight=-1.0), "inner_loss_weight"),
    (dict(write_head="yes"), "write_head"),
    (dict(grad_mode="first", second_order_steps=1), "second_order_steps"),
    (dict(second_order_steps=5), "second_order_steps"),
])
def test_bad_settings_raise_value_error(kwargs, match):
    options = {"memory_size": 2, "steps": 2, "lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        GradMemLM(trainable_lm(torch.float32), options.pop("memory_size"), **options)


def test_bad_batches_raise_value_error():
    module = wrapped(torch.float32)
    V = module.model.config.vocab_size
    good = batch(V)
    cases = [
        (dict(labels=torch.full_like(good["labels"], -100)), "no target"),
        (dict(labels=good["labels"][:, :-1]), "labels shape"),
        (dict(labels=good["labels"].float()), "integer dtype"),
        (dict(labels=torch.full_like(good["labels"], V)), f"label {V}"),
        (dict(input_ids=good["input_ids"][:2], labels=None, attention_mask=None), "batch"),
        (dict(context_ids=good["context_ids"][0]), "context_ids"),
        (dict(context_ids=good["context_ids"] + V), "outside"),
        (dict(context_mask=good["context_mask"][:, :-1]), "attention_mask shape"),
        (dict(attention_mask=good["attention_mask"][:, :-1]), "attention_mask shape"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            module(**{**good, **change})
    with pytest.raises(ValueError, match="steps"):
        module(**good, steps=-2)


def test_bf16_autocast_with_fp32_weights_trains():
    module = GradMemLM(kv_lm(), 4, steps=1, lr=0.1, write_head=True, memory_proj=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(**kv_batch(size=4))
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert module.memory.dtype == torch.float32 and module.memory.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
