"""Batched KV-cache generation: equals transformers' greedy generate and unbatched runs; sampling settings,
stop tokens, streaming, LoRA without merging, the transformers fallback."""

from __future__ import annotations

import pytest
import torch

from tunery.generate import Generator, SamplingParams, TextStream, generate, stop_token_ids
from tunery.generate.sampling import BatchSampler
from tunery.models import load_model

PROMPTS = ["What is 2+2?", "Write a haiku about the sea, please, in English.", "Hi", "Natalia sold clips to 48 of"]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(str(tiny_llama))


def _ids(tok, texts):
    return [tok(t).input_ids for t in texts]


_HF: dict[str, torch.nn.Module] = {}


def _hf_greedy(path, prompt, n, stops=None):
    from transformers import AutoModelForCausalLM

    if str(path) not in _HF:
        _HF[str(path)] = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    hf = _HF[str(path)]
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=stops,
                      pad_token_id=0, **({} if stops else {"min_new_tokens": n}))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("static", [False, True])
def test_batched_greedy_equals_transformers(tiny, tiny_llama, static):
    prompts = _ids(tiny.tokenizer, PROMPTS)
    gen = Generator(tiny.model, tiny.tokenizer, static_cache=static)
    out = gen.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for p, o in zip(prompts, out):
        assert o.token_ids == _hf_greedy(tiny_llama, p, 12)
        assert o.finish_reason == "length" and o.prompt_tokens == len(p)
    single = [gen.generate([p], SamplingParams(max_new_tokens=12, ignore_eos=True))[0].token_ids for p in prompts]
    assert single == [o.token_ids for o in out]
    assert gen.last_stats.new_tokens == 12 and gen.last_stats.batch == 1


def test_sliding_window_and_softcap_family(tmp_path, tiny_llama):
    """Gemma 2 (soft-capping, sliding window shorter than the prompt, GQA) against transformers."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                       max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    Gemma2ForCausalLM(cfg).save_pretrained(str(tmp_path))
    AutoTokenizer.from_pretrained(str(tiny_llama)).save_pretrained(str(tmp_path))
    lm = load_model(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (11, 4)]
    out = generate(lm.model, prompts, SamplingParams(max_new_tokens=10, ignore_eos=True), stop_ids=[], pad_id=0)
    for p, o in zip(prompts, out):
        assert o.token_ids == _hf_greedy(tmp_path, p, 10)


def test_stop_tokens_and_finish_reason(tiny):
    prompts = _ids(tiny.tokenizer, PROMPTS[:2])
    free = generate(tiny.model, prompts, SamplingParams(max_new_tokens=8, ignore_eos=True), tiny.tokenizer)
    stop_at = free[0].token_ids[3]
    out = generate(tiny.model, prompts, [SamplingParams(max_new_tokens=8, stop_token_ids=[stop_at], ignore_eos=True),
                                         SamplingParams(max_new_tokens=5, ignore_eos=True)], tiny.tokenizer)
    first = free[0].token_ids.index(stop_at)
    assert out[0].token_ids == free[0].token_ids[:first] and out[0].finish_reason == "stop"
    assert out[0].stop_token_id == stop_at
    assert out[1].token_ids == free[1].token_ids[:5] and out[1].finish_reason == "length"


def test_end_of_turn_tokens(tiny):
    ids = stop_token_ids(tiny.tokenizer)
    vocab = tiny.tokenizer.get_vocab()
    assert vocab["<|im_end|>"] in ids and tiny.tokenizer.eos_token_id in ids


def test_sampling_settings(tiny):
    prompts = _ids(tiny.tokenizer, PROMPTS)
    greedy = generate(tiny.model, prompts, SamplingParams(max_new_tokens=6, ignore_eos=True), tiny.tokenizer)
    top1 = generate(tiny.model, prompts, SamplingParams(max_new_tokens=6, temperature=1.5, top_k=1, ignore_eos=True),
                    tiny.tokenizer, seed=1)
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]
    a = generate(tiny.model, prompts, SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True), seed=7)
    b = generate(tiny.model, prompts, SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True), seed=7)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in greedy]
    # mixed rows in one batch: greedy rows stay greedy
    mixed = generate(tiny.model, prompts, [SamplingParams(max_new_tokens=6, ignore_eos=True),
                                           SamplingParams(max_new_tokens=6, temperature=2.0, top_p=0.9, ignore_eos=True)] * 2,
                     seed=3)
    assert mixed[0].token_ids == greedy[0].token_ids and mixed[2].token_ids == greedy[2].token_ids


def test_sampler_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    k2 = BatchSampler([SamplingParams(temperature=1.0, top_k=2)] * 2000, 5, torch.device("cpu"), g)(logits)
    assert set(k2.tolist()) == {0, 1}
    p = BatchSampler([SamplingParams(temperature=1.0, top_p=0.5)] * 2000, 5, torch.device("cpu"), g)(logits)
    assert set(p.tolist()) == {0}  # token 0 alone holds ~64% of the mass
    seen = torch.zeros(1, 5, dtype=torch.bool)
    seen[0, 0] = True
    pen = BatchSampler([SamplingParams(repetition_penalty=3.0)], 5, torch.device("cpu"))(logits[:1], seen)
    assert pen.tolist() == [1]  # 4/3 < 3
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_repetition_penalty_reduces_repeats(tiny):
    prompt = _ids(tiny.tokenizer, ["the the the the the"])
    plain = generate(tiny.model, prompt, SamplingParams(max_new_tokens=16, ignore_eos=True))[0].token_ids
    pen = generate(tiny.model, prompt, SamplingParams(max_new_tokens=16, repetition_penalty=5.0, ignore_eos=True))[0].token_ids
    assert len(set(pen)) >= len(set(plain))
    assert not set(pen) & set(prompt[0]) or len(set(pen)) > len(set(plain))


def test_streaming_and_stopping_a_row(tiny):
    prompts = _ids(tiny.tokenizer, PROMPTS[:3])
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def stream(row, tok):
        seen[row].append(tok)
        return row == 1 and len(seen[1]) == 3  # the client of row 1 hangs up after 3 tokens

    out = generate(tiny.model, prompts, SamplingParams(max_new_tokens=7, ignore_eos=True), stream=stream)
    assert [seen[i] for i in range(3)] == [o.token_ids for o in out]
    assert len(out[1].token_ids) == 3 and out[1].finish_reason == "stop"
    assert len(out[0].token_ids) == 7 and out[0].finish_reason == "length"


def test_lora_unmerged_equals_merged(tiny_llama):
    from tunery.adapters import inject_lora, merge_lora

    lm = load_model(str(tiny_llama))
    inject_lora(lm.model, ["q_proj", "v_proj", "up_proj", "down_proj"], r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    for p in lm.model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    lm.model.train()  # GRPO calls it on the training model; generation runs it in eval mode
    prompts = _ids(lm.tokenizer, PROMPTS)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    unmerged = [o.token_ids for o in generate(lm.model, prompts, params)]
    assert lm.model.training
    from tunery.adapters import adapters_disabled

    with adapters_disabled(lm.model):
        base = [o.token_ids for o in generate(lm.model, prompts, params)]
    merge_lora(lm.model)
    merged = [o.token_ids for o in generate(lm.model, prompts, params)]
    assert unmerged == merged and unmerged != base


def test_transformers_fallback_uses_hf_generate(tiny_llama):
    lm = load_model(str(tiny_llama), own_decoder=False)
    assert not lm.own
    prompts = _ids(lm.tokenizer, PROMPTS[:2])
    out = generate(lm.model, prompts, SamplingParams(max_new_tokens=6, ignore_eos=True), lm.tokenizer)
    for p, o in zip(prompts, out):
        assert o.token_ids == _hf_greedy(tiny_llama, p, 6)
    streamed: list[tuple[int, int]] = []
    generate(lm.model, prompts, SamplingParams(max_new_tokens=4, ignore_eos=True), stream=lambda r, t: streamed.append((r, t)))
    assert len(streamed) == 8


def test_text_stream_matches_full_decode(smol_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_path))
    text = "Grüße aus Köln — 東京 🙂 and    spaces\nnew line"
    ids = tok(text).input_ids
    s = TextStream(tok)
    pieces = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(pieces) == tok.decode(ids)


def test_chat_session_keeps_history(tiny):
    from tunery.generate.chat import ChatSession, chat_prompt_ids

    chunks: list[str] = []
    s = ChatSession(tiny.model, tiny.tokenizer, system="Be brief.",
                    params=SamplingParams(max_new_tokens=5, ignore_eos=True))
    reply = s.send("Hello there", chunks.append)
    assert "".join(chunks).strip() == reply
    s.send("And again?")
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    ids = chat_prompt_ids(tiny.tokenizer, s.messages[:2])
    assert tiny.tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.")
    s.reset()
    assert [m["role"] for m in s.messages] == ["system"]


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager(tiny_llama):
    lm = load_model(str(tiny_llama), device="cuda")
    prompts = _ids(lm.tokenizer, PROMPTS)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    eager = Generator(lm.model, lm.tokenizer, cuda_graphs=False).generate(prompts, params)
    graphed = Generator(lm.model, lm.tokenizer, cuda_graphs=True)
    first = graphed.generate(prompts, params)
    again = graphed.generate(prompts[:3] + prompts[:1], params)  # the captured graph is reused
    assert graphed.last_stats.cuda_graph
    assert [o.token_ids for o in first] == [o.token_ids for o in eager]
    assert [o.token_ids for o in again] == [o.token_ids for o in eager[:3] + eager[:1]]


@pytest.mark.gpu
def test_cuda_graphs_with_lora_toggle_and_bf16(tiny_llama):
    """GRPO's use: LoRA layers on (policy) and off (reference) give different graphs; bf16 weights."""
    from tunery.adapters import adapters_disabled, inject_lora

    lm = load_model(str(tiny_llama), dtype=torch.bfloat16, device="cuda")
    inject_lora(lm.model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    prompts = _ids(lm.tokenizer, PROMPTS * 3)  # 12 rows: padded to a batch of 16
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    eager = Generator(lm.model, lm.tokenizer, cuda_graphs=False)
    graphed = Generator(lm.model, lm.tokenizer, cuda_graphs=True)
    on = graphed.generate(prompts, params)
    with adapters_disabled(lm.model):
        off = graphed.generate(prompts, params)
        off_eager = eager.generate(prompts, params)
    on_eager = eager.generate(prompts, params)
    assert len(graphed._graphs) == 2 and len(on) == 12
    agree = sum(a.token_ids == b.token_ids for a, b in zip(on, on_eager)) + sum(
        a.token_ids == b.token_ids for a, b in zip(off, off_eager))
    assert agree >= 20  # bf16: a rare near-tie may flip one row
