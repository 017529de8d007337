"""The embedded `TransformersEngine`: its per-token log-probs equal a teacher-forced recomputation
with the same HF model, its captured experts equal the gates' choices on the full sequence, and
sampling controls (seed, top-k, stop ids/strings, length) behave as SGLang's do."""

from __future__ import annotations

import pytest
import torch

from megatron_rl.rollout.engine import EngineError, RolloutEngine
from megatron_rl.rollout.transformers_engine import TransformersEngine, _truncate
from megatron_rl.rollout.types import SamplingParams

VOCAB = 96


def _model():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_intermediate_size=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, eos_token_id=None,
        max_position_embeddings=128)
    model = tf.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # spread the random weights so logits and routing are not flat
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "gate.weight" in name:
                p.normal_(0.0, 1.0)
            else:
                p.mul_(5.0)
    return model


class CharTokenizer:
    """Token i is the letter chr(97 + i % 26): enough to test stop strings."""

    eos_token_id = None
    pad_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) - 97 for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def engine() -> TransformersEngine:
    return TransformersEngine(_model(), tokenizer=CharTokenizer(), max_batch_tokens=4096)


PROMPTS = [[5, 17, 33, 2, 9], [70, 1], [11, 12, 13, 14, 15, 16, 17, 18]]


def _teacher(model, prompt: list[int], out: list[int], temperature: float):
    """Log-probs of `out` after `prompt` (one unpadded forward) and the experts per layer."""
    experts: list[torch.Tensor] = []
    gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    hooks = [g.register_forward_hook(lambda _m, _i, o: experts.append(o[2])) for g in gates]
    ids = torch.tensor([prompt + out])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    for h in hooks:
        h.remove()
    lp = logits.log_softmax(-1)[len(prompt) - 1 : -1].gather(-1, torch.tensor(out)[:, None])[:, 0]
    return lp, torch.stack(experts, dim=1)  # [P + T, L, K]


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, -1), (0.7, 0.9, 20)])
def test_logprobs_and_experts_match_teacher_forcing(engine, temperature, top_p, top_k):
    assert isinstance(engine, RolloutEngine)
    sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=12,
                        n=2, seed=3)
    outs = engine.generate(input_ids=PROMPTS, sampling_params=sp, return_routed_experts=True)
    assert [len(o) for o in outs] == [2, 2, 2]
    for prompt, group in zip(PROMPTS, outs, strict=True):
        for o in group:
            assert o.prompt_ids == prompt and len(o.output_ids) == 12
            assert o.finish_reason == "length"
            want_lp, want_ex = _teacher(engine.model, prompt, o.output_ids, temperature)
            torch.testing.assert_close(torch.tensor(o.output_logprobs), want_lp,
                                       rtol=1e-5, atol=1e-5)
            assert o.routed_experts.shape == (len(prompt) + 12, 2, 2)
            # Same experts as a set per token (top-k order may differ for equal scores).
            assert torch.equal(o.routed_experts.sort(-1).values, want_ex.sort(-1).values)
    # The two samples of a prompt differ (they are independent rows).
    assert outs[0][0].output_ids != outs[0][1].output_ids


def test_rows_stopping_at_different_steps_keep_their_logprobs_and_experts(engine, monkeypatch):
    """Rows that finish early leave the decode batch (and its KV cache); the ones still running
    must see exactly their own history: log-probs and experts equal teacher forcing."""
    from transformers import DynamicCache

    select = DynamicCache.batch_select_indices
    calls = []
    monkeypatch.setattr(DynamicCache, "batch_select_indices",
                        lambda self, index: calls.append(len(index)) or select(self, index))
    vocab = engine.model.config.vocab_size
    sp = SamplingParams(max_new_tokens=16, n=4, seed=5,
                        stop_token_ids=list(range(1, vocab, 9)))  # ~11% of tokens stop a row
    outs = engine.generate(input_ids=PROMPTS, sampling_params=sp, return_routed_experts=True)
    lengths = [len(o.output_ids) for g in outs for o in g]
    assert len(set(lengths)) > 3 and min(lengths) < 8  # rows did stop at different steps
    assert calls  # and the batch shrank
    for prompt, group in zip(PROMPTS, outs, strict=True):
        for o in group:
            want_lp, want_ex = _teacher(engine.model, prompt, o.output_ids, 1.0)
            torch.testing.assert_close(torch.tensor(o.output_logprobs), want_lp,
                                       rtol=1e-5, atol=1e-5)
            assert o.routed_experts.shape == (len(prompt) + len(o.output_ids), 2, 2)
            assert torch.equal(o.routed_experts.sort(-1).values, want_ex.sort(-1).values)
            stopped = o.output_ids[-1] in sp.stop_token_ids
            assert o.finish_reason == ("stop" if stopped else "length")


def test_draw_samples_the_given_distribution():
    """The inverse-CDF draw against the probabilities it is given (unnormalised, with zeros):
    frequencies within 4 standard errors, and a zero-probability token never drawn."""
    from megatron_rl.rollout.transformers_engine import draw

    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0]) * 3.0  # unnormalised
    n = 200_000
    tokens = draw(probs.expand(n, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=6).double() / n
    p = probs.double() / probs.sum()
    assert freq[p == 0].sum() == 0
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4 * se + 1e-12).all(), (freq, p)


def test_seed_determinism_and_top_k(engine):
    sp = SamplingParams(max_new_tokens=8, n=3, seed=11, top_k=3)
    a = engine.generate(input_ids=PROMPTS, sampling_params=sp)
    b = engine.generate(input_ids=PROMPTS, sampling_params=sp)
    c = engine.generate(input_ids=PROMPTS, sampling_params=SamplingParams(
        max_new_tokens=8, n=3, seed=12, top_k=3))
    ids = lambda outs: [o.output_ids for g in outs for o in g]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    # Every sampled token is among the 3 most likely under the teacher.
    for prompt, group in zip(PROMPTS, a, strict=True):
        for o in group:
            ctx = torch.tensor([prompt + o.output_ids])
            with torch.no_grad():
                logits = engine.model(ctx).logits[0, len(prompt) - 1 : -1]
            top3 = logits.topk(3, -1).indices
            assert all(t in top3[i].tolist() for i, t in enumerate(o.output_ids))


def test_truncation_keeps_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = _truncate(logits, -1, 0.7).isfinite()[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert _truncate(logits, 1, 1.0).isfinite()[0].tolist() == [True, False, False, False]


def test_stops_and_batch_chunking(engine):
    base = SamplingParams(max_new_tokens=10, n=1, seed=5)
    ref = engine.generate(input_ids=PROMPTS[:1], sampling_params=base)[0][0]
    stop_tok = ref.output_ids[4]
    first = ref.output_ids.index(stop_tok)
    hit = engine.generate(input_ids=PROMPTS[:1], sampling_params=SamplingParams(
        max_new_tokens=10, n=1, seed=5, stop_token_ids=[stop_tok]))[0][0]
    assert hit.output_ids == ref.output_ids[: first + 1] and hit.finish_reason == "stop"
    assert hit.output_logprobs == pytest.approx(ref.output_logprobs[: first + 1], abs=1e-6)
    # Stop string: the letters of two consecutive output tokens (kept in the output).
    word = CharTokenizer().decode(ref.output_ids[5:7])
    s = engine.generate(prompt=["fri"], sampling_params=SamplingParams(
        max_new_tokens=10, seed=5, stop=[word]))[0][0]
    assert s.finish_reason in ("stop", "length")
    if s.finish_reason == "stop":
        assert s.text.endswith(word) and s.text.count(word) == 1
    # Chunking rows by max_batch_tokens does not change the samples of a fixed seed... only the
    # RNG stream differs, so compare log-probs by teacher forcing instead of ids.
    small = TransformersEngine(engine.model, max_batch_tokens=20)
    outs = small.generate(input_ids=PROMPTS, sampling_params=SamplingParams(
        max_new_tokens=6, n=2, seed=1))
    for prompt, group in zip(PROMPTS, outs, strict=True):
        for o in group:
            want, _ = _teacher(engine.model, prompt, o.output_ids, 1.0)
            torch.testing.assert_close(torch.tensor(o.output_logprobs), want, rtol=1e-5,
                                       atol=1e-5)


def test_errors_and_lifecycle(engine):
    with pytest.raises(EngineError, match="exactly one of"):
        engine.generate(sampling_params=SamplingParams())
    bare = TransformersEngine(engine.model)
    with pytest.raises(EngineError, match="stop strings need a tokenizer"):
        bare.generate(input_ids=[[1]], sampling_params=SamplingParams(stop=["x"]))
    engine.release_memory_occupation()
    with pytest.raises(EngineError, match="embedded.*resume_memory_occupation"):
        engine.generate(input_ids=[[1]])
    engine.resume_memory_occupation()
    engine.flush_cache()
    assert engine.health()
    assert len(engine.generate(input_ids=[[1]], sampling_params=SamplingParams(
        max_new_tokens=2))[0][0].output_ids) == 2
    with pytest.raises(EngineError, match="exceeded its 0 s timeout"):
        TransformersEngine(engine.model, timeout_s=0.0).generate(input_ids=[[1]])


def test_update_weights_from_disk_and_tensor(engine, tmp_path):
    """A checkpoint written by `save_pretrained` (per-expert names) loads into a fresh model's
    fused experts exactly; a wrong name or shape fails naming the tensor."""
    engine.model.save_pretrained(tmp_path)
    import transformers as tf

    fresh = TransformersEngine(tf.Qwen3MoeForCausalLM(engine.model.config).eval())
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        assert not torch.allclose(fresh.model(ids).logits, engine.model(ids).logits)
        fresh.update_weights_from_disk(str(tmp_path))
        assert torch.equal(fresh.model(ids).logits, engine.model(ids).logits)
    with pytest.raises(EngineError, match="mystery.*no counterpart"):
        fresh.update_weights_from_tensor([("model.mystery.weight", torch.zeros(1))])
    with pytest.raises(EngineError, match="experts.9.up_proj.*expert 9"):
        fresh.update_weights_from_tensor([("model.layers.0.mlp.experts.9.up_proj.weight",
                                           torch.zeros(16, 32))])


def test_update_group_that_never_forms_times_out(engine):
    from megatron_rl.actor.parallel import free_port

    slow = TransformersEngine(engine.model, timeout_s=1.0)
    with pytest.raises(EngineError, match="did not form within 1 s"):
        slow.init_weights_update_group("127.0.0.1", free_port(), 1, 2, backend="gloo")
    with pytest.raises(EngineError, match="no weight update group"):
        slow.update_weights_from_distributed(["x"], ["float32"], [[1]])
