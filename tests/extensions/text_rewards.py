"""Rewards registered by name from a user module (``imports: [tests.extensions.text_rewards]`` in a config).

- ``word_share``: a host reward on decoded text, the share of a response's words equal to ``word`` (a kwarg);
- ``echoes_prompt``: a host reward that also reads the prompts, 1 where the response repeats the prompt's last word;
- ``count_of_token``: a jittable reward, the number of real tokens equal to ``token`` (a kwarg);
- ``one_score_short``: a host reward that returns one score too few (its error is checked at call time).
"""

import jax.numpy as jnp

import ppojax.rl.rewards as rewards


@rewards.register_reward("word_share", host=True)
def word_share(responses, *, word="good"):
    return [sum(w == word for w in r.split()) / max(len(r.split()), 1) for r in responses]


@rewards.register_reward("echoes_prompt", host=True)
def echoes_prompt(responses, prompts):
    return [float(bool(p.split()) and p.split()[-1] in r.split()) for r, p in zip(responses, prompts)]


@rewards.register_reward("count_of_token")
def count_of_token(tokens, mask, *, token=3):
    return jnp.sum((tokens == token) & (mask > 0), axis=-1).astype(jnp.float32)


@rewards.register_reward("one_score_short", host=True)
def one_score_short(responses):
    return [0.0] * (len(responses) - 1)


@rewards.register_reward("vowel_share", host=True)
def vowel_share(responses, *, vowels="aeiou"):
    """The share of a response's letters that are vowels: dense on any text, even a random policy's."""
    def share(text):
        letters = [c for c in text.lower() if c.isalpha()]
        return sum(c in vowels for c in letters) / max(len(letters), 1)

    return [share(r) for r in responses]
