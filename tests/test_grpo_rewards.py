"""GRPO rewards: the built-ins, loading user functions from the config, and misbehaving functions."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from tunery.methods.rewards import (
    Reward,
    RewardError,
    call_reward,
    final_answer,
    gsm8k_answer,
    load_rewards,
    make_format_reward,
    make_length_reward,
    normalize_number,
    score,
)


def _grpo(**kw):
    base = dict(reward_funcs=["gsm8k_answer"], reward_weights=None, format_pattern=None, length_target=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_normalize_number():
    assert normalize_number("$1,234.50") == "1234.5"
    assert normalize_number(" 72.") == "72"
    assert normalize_number("72.0") == "72"
    assert normalize_number("-5 apples") == "-5"
    assert normalize_number("\\$18") == "18"
    assert normalize_number("-0.0") == "0"
    assert normalize_number("none") is None


def test_final_answer():
    assert final_answer("so 24 + 48 = 72\n#### 72") == "72"
    assert final_answer("#### $1,000\nmore text") == "1000"
    assert final_answer("first #### 3 then #### 4") == "4"
    assert final_answer("The answer is \\boxed{1,234}.") == "1234"
    assert final_answer("\\boxed{\\frac{1}{2}} then \\boxed{18}") == "18"
    assert final_answer("####\n  42") == "42"
    assert final_answer("the answer is 72") is None


def test_gsm8k_answer():
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    comps = ["48 + 24 = 72\n#### 72", "#### 72.00", "\\boxed{72}", "#### 71", "72", "#### $72"]
    assert gsm8k_answer([""] * 6, comps, answer=[ref] * 6) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert gsm8k_answer(["", ""], ["#### 1,500", "#### 1500"], answer=["1500", "$1,500"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="answer"):
        gsm8k_answer([""], ["#### 1"])


def test_format_and_length():
    fmt = make_format_reward(r"####\s*-?\d+")
    assert fmt(["", ""], ["so #### 12", "12"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="format_pattern"):
        make_format_reward(None)
    with pytest.raises(ValueError, match="regular expression"):
        make_format_reward("([")
    length = make_length_reward(4)
    assert length(["", "", ""], ["a", "b", "c"], completion_ids=[[1] * 3, [1] * 6, [1] * 20]) == [0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="length_target"):
        make_length_reward(None)


def test_load_builtins_and_weights():
    rw = load_rewards(_grpo(reward_funcs=["gsm8k_answer", "format", "length"], reward_weights=[1, 0.5, 0.1],
                            format_pattern="####", length_target=10))
    assert [(r.name, r.weight) for r in rw] == [("gsm8k_answer", 1.0), ("format", 0.5), ("length", 0.1)]
    with pytest.raises(ValueError, match="neither a built-in"):
        load_rewards(_grpo(reward_funcs=["gsm8k"]))


def test_load_user_functions(tmp_path, monkeypatch):
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "mine.py").write_text(
        "def brevity(prompts, completions, **kw):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    (tmp_path / "my_reward_mod.py").write_text(
        "def exact(prompts, completions, answer):\n    return [float(c == a) for c, a in zip(completions, answer)]\n")
    rw = load_rewards(_grpo(reward_funcs=["rewards/mine.py:brevity", "my_reward_mod:exact"]), base_dir=tmp_path)
    assert [r.name for r in rw] == ["brevity", "exact"]
    # `exact` takes no **kwargs: it gets only the columns it names (not completion_ids or others)
    out = score(rw, ["p", "p"], ["x", "yy"], {"answer": ["x", "z"], "completion_ids": [[1], [2, 3]], "id": [1, 2]})
    assert out.tolist() == [[0.5, 1.0], [pytest.approx(1 / 3), 0.0]]

    with pytest.raises(ValueError, match="not found"):
        load_rewards(_grpo(reward_funcs=["nope.py:f"]), base_dir=tmp_path)
    with pytest.raises(ValueError, match="no function"):
        load_rewards(_grpo(reward_funcs=["rewards/mine.py:missing"]), base_dir=tmp_path)
    with pytest.raises(ValueError, match="cannot import module"):
        load_rewards(_grpo(reward_funcs=["no_such_module_xyz:f"]), base_dir=tmp_path)
    monkeypatch.setenv("TUNERY_ALLOW_USER_REWARDS", "0")
    with pytest.raises(ValueError, match="disabled"):
        load_rewards(_grpo(reward_funcs=["rewards/mine.py:brevity"]), base_dir=tmp_path)
    assert load_rewards(_grpo())[0].name == "gsm8k_answer"  # built-ins still load


def test_misbehaving_reward_functions_name_themselves():
    def raises(prompts, completions, **kw):
        raise KeyError("solution")

    def short(prompts, completions, **kw):
        return [1.0]

    def nan(prompts, completions, **kw):
        return [0.0, math.nan]

    def text(prompts, completions, **kw):
        return ["good", "bad"]

    def nothing(prompts, completions, **kw):
        return None

    prompts, comps = ["p", "p"], ["a", "b"]
    for fn, msg in [(raises, "raised KeyError"), (short, "returned 1 values for 2 completions"),
                    (nan, "nan"), (text, "not a number"), (nothing, "expected a list")]:
        with pytest.raises(RewardError, match=msg) as e:
            call_reward(Reward(fn.__name__, fn), prompts, comps, {})
        assert repr(fn.__name__) in str(e.value)
