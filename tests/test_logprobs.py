"""Log-prob plumbing (trace_ray.logprobs) against a naive full log-softmax on a tiny LLaMA."""

from __future__ import annotations

import copy

import pytest
import torch

from trace_ray import losses as L
from trace_ray.logprobs import (
    encode_pairs,
    logits_mask,
    reference_logps,
    response_lengths,
    select_rows,
    sequence_logps,
)

RECORDS = [
    {"prompt": "How do I bake bread?", "chosen": "Mix flour, water and yeast, then bake.", "rejected": "I can't help."},
    {"prompt": "Weather?", "chosen": "Sunny with a light breeze and no rain expected.", "rejected": "No.",
     "corrected": "Please check the forecast."},
    {"prompt": "Tell me the steps.", "chosen": "Step 1: gather the tools.", "rejected": "Here is a detailed answer.",
     "corrected": ""},
]


def naive_logps(model, batch):
    """Σ over response tokens of log_softmax(logits)[label], from the model's own forward (no
    position ids given: right padding only)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (lp * batch["loss_mask"][:, 1:]).sum(-1)


def test_encode_pairs_layout_masks_and_chat_template(tiny_tokenizer):
    b = encode_pairs(tiny_tokenizer, RECORDS, max_length=128)
    B = len(RECORDS)
    assert b["input_ids"].shape[0] == 2 * B and b["loss_mask"].shape == b["input_ids"].shape
    T = b["input_ids"].shape[1]
    assert T == int(b["attention_mask"].sum(-1).max())  # dynamic padding: as long as the longest row
    for n in range(2 * B):
        rec, key = RECORDS[n % B], ("chosen", "rejected")[n // B]
        ids, m = b["input_ids"][n], b["loss_mask"][n].bool()
        resp = tiny_tokenizer.decode(ids[m])
        assert resp == rec[key] + tiny_tokenizer.eos_token  # response + eos, nothing else
        prompt = tiny_tokenizer.decode(ids[b["attention_mask"][n].bool() & ~m])
        assert prompt == f"<|user|>\n{rec['prompt']}\n<|assistant|>\n"  # chat template applied
        assert not (m & ~b["attention_mask"][n].bool()).any()
    torch.testing.assert_close(response_lengths(b), b["loss_mask"].sum(-1))


def test_encode_pairs_with_corrected_and_truncation(tiny_tokenizer):
    b = encode_pairs(tiny_tokenizer, RECORDS, max_length=128, with_corrected=True)
    assert b["input_ids"].shape[0] == 9
    assert b["has_corrected"].tolist() == [False, True, False]
    assert tiny_tokenizer.decode(b["input_ids"][7][b["loss_mask"][7].bool()]).startswith("Please check")
    short = encode_pairs(tiny_tokenizer, RECORDS, max_length=12)
    assert short["input_ids"].shape[1] <= 12
    # the prompt of a pair is cut identically for chosen and rejected
    for i in range(3):
        p = [short["input_ids"][r][short["attention_mask"][r].bool() & ~short["loss_mask"][r].bool()] for r in (i, i + 3)]
        assert torch.equal(p[0], p[1]) and len(p[0]) >= 1
    assert (short["loss_mask"].sum(-1) >= 1).all()
    with pytest.raises(ValueError, match=r"records\[0\]\.chosen"):
        encode_pairs(tiny_tokenizer, [{"prompt": "x", "rejected": "y"}], 32)


def test_sequence_logps_matches_naive_and_padding_side(tiny_tokenizer, tiny_model):
    b = encode_pairs(tiny_tokenizer, RECORDS, max_length=128)
    lp = sequence_logps(tiny_model, b)
    assert lp.dtype == torch.float32 and lp.shape == (6,)
    torch.testing.assert_close(lp, naive_logps(tiny_model, b), rtol=1e-5, atol=1e-4)
    # each row alone (no padding) gives the same value as inside the padded batch
    alone = torch.cat([sequence_logps(tiny_model, encode_pairs(tiny_tokenizer, [r], 128)) for r in RECORDS])
    torch.testing.assert_close(alone.view(3, 2).T.reshape(-1), lp, rtol=1e-5, atol=1e-4)
    left_tok = copy.deepcopy(tiny_tokenizer)
    left_tok.padding_side = "left"
    bl = encode_pairs(left_tok, RECORDS, max_length=128)
    assert (bl["attention_mask"][:, -1] == 1).all() and (bl["attention_mask"][:, 0] == 0).any()
    torch.testing.assert_close(sequence_logps(tiny_model, bl), lp, rtol=1e-5, atol=1e-4)


def test_no_full_vocab_log_softmax(tiny_tokenizer, tiny_model, monkeypatch):
    """DPO/NPO log-probs must not build the [N, T, V] log-softmax: make every log_softmax raise."""
    b = encode_pairs(tiny_tokenizer, RECORDS, max_length=128)
    expected = sequence_logps(tiny_model, b)

    def boom(*a, **k):
        raise AssertionError("full-vocab log_softmax called")

    monkeypatch.setattr(torch, "log_softmax", boom)
    monkeypatch.setattr(torch.nn.functional, "log_softmax", boom)
    monkeypatch.setattr(torch.Tensor, "log_softmax", boom)
    torch.testing.assert_close(sequence_logps(tiny_model, b), expected)


def test_chunked_kl_equals_forward_kl_on_full_logits(tiny_tokenizer, tiny_model, monkeypatch):
    """kl_and_logps (hidden states through the head a few positions at a time, each chunk
    checkpointed) = losses.forward_kl on the full [N, T, V] logits, in value and in gradient, for a
    frozen-copy reference and for the adapter-disabled base; KL = 0 at θ = θ_ref."""
    import trace_ray.logprobs as LP
    from peft import LoraConfig, get_peft_model

    from trace_ray.logprobs import kl_and_logps

    b = encode_pairs(tiny_tokenizer, RECORDS, max_length=128)
    rows = select_rows(b, [0, 2])  # chosen rows of pairs 0 and 2
    mask = logits_mask(rows["loss_mask"])
    kl0, lp0 = kl_and_logps(tiny_model, rows, copy.deepcopy(tiny_model))
    torch.testing.assert_close(kl0, torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(lp0, sequence_logps(tiny_model, b)[[0, 2]], rtol=1e-5, atol=1e-4)

    ref = copy.deepcopy(tiny_model).eval()
    with torch.no_grad():
        ref.lm_head.weight.add_(0.3 * torch.randn_like(ref.lm_head.weight))
        ref.model.layers[0].mlp.up_proj.weight.add_(0.3 * torch.randn_like(ref.model.layers[0].mlp.up_proj.weight))
    params = [p for p in tiny_model.parameters()]

    def full():
        logits = tiny_model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
        with torch.no_grad():
            ref_logits = ref(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
        return L.forward_kl(ref_logits, logits, mask)

    def grads(fn):
        tiny_model.zero_grad()
        kl = fn()
        (kl * torch.tensor([1.0, 2.0])).sum().backward()
        return kl.detach(), [p.grad.clone() for p in params]

    want, g_want = grads(full)
    assert (want > 0).all()
    monkeypatch.setattr(LP, "CHUNK_ELEMENTS", 3 * 320)  # 3 positions per chunk: many checkpointed chunks
    got, g_got = grads(lambda: kl_and_logps(tiny_model, rows, ref)[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, c in zip(g_want, g_got):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)

    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    with torch.no_grad():
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
        pol_logits = peft_model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    kl, _ = kl_and_logps(peft_model, rows)  # the head is LoRA-wrapped too: p_ref from the base head
    torch.testing.assert_close(kl.detach(), L.forward_kl(base_logits, pol_logits, mask), rtol=1e-5, atol=1e-6)
    assert (kl > 0).all()


def test_chunked_kl_never_builds_full_logits(tiny_tokenizer, tiny_model, monkeypatch):
    """With chunks of 3 positions, no tensor with more than a chunk's worth of vocabulary rows is
    made by the LM head: the head's outputs are all [≤ 3, V]."""
    import trace_ray.logprobs as LP
    from trace_ray.logprobs import kl_and_logps

    rows = select_rows(encode_pairs(tiny_tokenizer, RECORDS, max_length=128), [0, 1, 2])
    shapes = []
    tiny_model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    monkeypatch.setattr(LP, "CHUNK_ELEMENTS", 3 * 320)
    kl, lp = kl_and_logps(tiny_model, rows, copy.deepcopy(tiny_model))
    (kl.sum() + lp.sum()).backward()
    n_pos = int(logits_mask(rows["loss_mask"]).sum())
    assert shapes and max(s[0] for s in shapes) == 3 and len(shapes) >= 2 * (-(-n_pos // 3))  # forward + recompute


def test_peft_reference_is_base_and_gradients_flow(tiny_tokenizer, tiny_model):
    from peft import LoraConfig, get_peft_model

    b = encode_pairs(tiny_tokenizer, RECORDS, max_length=128)
    base_lp = sequence_logps(tiny_model, b).detach()
    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lp = sequence_logps(peft_model, b)
    assert not torch.allclose(lp, base_lp)
    torch.testing.assert_close(reference_logps(peft_model, b), base_lp)
    lp.sum().backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_gpt2_without_chat_template(tiny_model_dir):
    """The shared fake GPT-2 (real GPT-2 tokenizer, no chat template) through the same path."""
    from conftest import SHARED
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = SHARED / "models" / "fake_gpt2_lm_buddy"
    if not path.exists():
        pytest.fail(f"shared model missing: {path}")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.chat_template = None
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    b = encode_pairs(tok, RECORDS[:2], max_length=64)
    assert tok.decode(b["input_ids"][0][b["attention_mask"][0].bool() & ~b["loss_mask"][0].bool()]) == RECORDS[0]["prompt"]
    torch.testing.assert_close(sequence_logps(model, b), naive_logps(model, b), rtol=1e-5, atol=1e-3)


def test_chunked_checkpointed_logps_match_in_value_and_gradient(tiny_tokenizer, tiny_model, monkeypatch):
    """Tiny chunks (3 positions of a 320-word vocab) force many checkpointed chunks: same log-probs
    and the same parameter gradient as one chunk."""
    import trace_ray.logprobs as LP

    b = encode_pairs(tiny_tokenizer, RECORDS, max_length=128)

    def grads():
        tiny_model.zero_grad()
        lp = sequence_logps(tiny_model, b)
        (lp * torch.arange(1.0, 7.0)).sum().backward()
        return lp.detach(), [p.grad.clone() for p in tiny_model.parameters()]

    lp1, g1 = grads()
    monkeypatch.setattr(LP, "CHUNK_ELEMENTS", 3 * 320)
    lp2, g2 = grads()
    torch.testing.assert_close(lp2, lp1, rtol=1e-6, atol=1e-5)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)
