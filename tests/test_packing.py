"""Shared-prompt rows for K rollouts per prompt: every role's outputs and the policy's gradients equal the unpacked
rows'; packing is declined where it does not apply (no groups, K = 1, sliding windows) or would cost more."""

from __future__ import annotations

import random

import pytest
import torch
from tests.test_fastforward import _causal_lm

from flywheel.train.ppo.packing import pack_rollouts
from flywheel.train.ppo.roles import Actor, Critic, Reference
from flywheel.train.ppo.rollout import build_sequences


def _rollouts(k=4, groups=3, seed=0, prompt_lens=(9, 14, 4), max_response=7, vocab=97):
    rng = random.Random(seed)
    prompts, responses = [], []
    for g in range(groups):
        prompt = [rng.randrange(1, vocab) for _ in range(prompt_lens[g % len(prompt_lens)])]
        for j in range(k):
            n = 0 if (g, j) == (1, 2) else rng.randint(1, max_response)  # one empty response
            prompts.append(prompt)
            responses.append([rng.randrange(1, vocab) for _ in range(n)])
    s = build_sequences(prompts, responses, [True] * len(prompts), pad_id=0)
    return s, (s.sequences, s.attention_mask, s.position_ids, s.prompt_len)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_packed_roles_equal_the_unpacked_rows_with_their_gradients(kind):
    s, args = _rollouts()
    model = _causal_lm(kind)
    packed = pack_rollouts(*args[:3], s.prompt_len, 4, model.config)
    assert packed is not None and packed.ids.shape[0] == 3 and packed.applies(model)
    assert packed.ids.numel() < s.sequences.numel()  # each prompt once instead of K times
    mask = s.response_mask.bool()
    actor = Actor(model, temperature=0.7)
    outs = []
    for p in (None, packed):
        model.zero_grad()
        logprobs, entropy = actor.forward(*args, p)
        ((logprobs * mask).sum() + 0.3 * (entropy * mask).sum()).backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters()}
        outs.append((logprobs.detach(), entropy.detach(), grads, actor.logprobs(*args, p).detach()))
    (lp0, ent0, g0, only0), (lp1, ent1, g1, only1) = outs
    torch.testing.assert_close(lp1[mask], lp0[mask], rtol=0, atol=2e-5)
    torch.testing.assert_close(ent1[mask], ent0[mask], rtol=0, atol=2e-5)
    torch.testing.assert_close(only1[mask], only0[mask], rtol=0, atol=2e-5)
    assert torch.isfinite(lp1).all() and torch.isfinite(ent1).all()  # padding slots: finite, dropped by the mask
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)
    ref = Reference(_causal_lm(kind), temperature=0.7)
    torch.testing.assert_close(ref.forward(*args, packed)[mask], ref.forward(*args)[mask], rtol=0, atol=2e-5)


def test_packed_critic_equals_the_unpacked_rows():
    from transformers import AutoModelForSequenceClassification

    s, args = _rollouts()
    body = _causal_lm("llama")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(
        body.config.__class__(**{**body.config.to_dict(), "num_labels": 1})
    )
    critic = Critic(model, bias=0.5)
    packed = pack_rollouts(*args[:3], s.prompt_len, 4, model.config)
    assert packed is not None and packed.applies(model)
    mask = s.response_mask.bool()
    torch.testing.assert_close(critic.forward(*args, packed)[mask], critic.forward(*args)[mask], rtol=0, atol=2e-5)


def test_packing_is_declined_where_it_does_not_apply_or_would_cost_more():
    s, args = _rollouts()
    model = _causal_lm("llama")
    assert pack_rollouts(*args[:3], s.prompt_len, 1, model.config) is None  # K = 1
    assert pack_rollouts(*args[:3], s.prompt_len, 5, model.config) is None  # 12 rows are not groups of 5
    shuffled = [args[0][[1, 0] + list(range(2, 12))], *args[1:3]]
    shuffled[0][0, : s.prompt_len] = args[0][5, : s.prompt_len]  # row 0 now holds another group's prompt
    assert pack_rollouts(*shuffled, s.prompt_len, 4, model.config) is None
    # a 2-token prompt and long answers: the shared row's attention would cost more than the prompt saves
    s2, args2 = _rollouts(k=8, groups=2, prompt_lens=(2,), max_response=120)
    assert s2.response_mask.shape[1] >= 100
    assert pack_rollouts(*args2[:3], s2.prompt_len, 8, model.config) is None
    # sliding-window layers: the custom 4-D mask cannot express the window here, so the roles run the rows
    mistral = _causal_lm("mistral")
    packed = pack_rollouts(*args[:3], s.prompt_len, 4, mistral.config)
    assert packed is not None and not packed.applies(mistral)
    actor = Actor(mistral, temperature=1.0)
    mask = s.response_mask.bool()
    torch.testing.assert_close(actor.logprobs(*args, packed)[mask], actor.logprobs(*args)[mask], rtol=0, atol=0)
