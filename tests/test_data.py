"""Data: prompt files (verl/slime rows), templates, the resumable sampler, reasoning-gym splits and
the demo tokenizer."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import reasoning_gym

from megatron_rl.data import (
    DataConfig,
    DataError,
    PromptRecord,
    PromptSampler,
    apply_template,
    build_dataset,
    build_tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from megatron_rl.data.synthetic import generate, task_names, task_splits
from megatron_rl.data.tokenizer import SPECIAL_SYMBOLS, tokenizer_texts

VERL_ROW = {
    "data_source": "openai/gsm8k",
    "prompt": [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "What is 2+2?"}],
    "reward_model": {"style": "rule", "ground_truth": "4"},
    "extra_info": {"split": "train", "index": 7},
}
SLIME_ROW = {"prompt": "What is 3*3?", "label": "9", "metadata": {"level": 1}}


def write_jsonl(path: Path, rows: list) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def file_cfg(path: str, source: str = "jsonl", **kw) -> DataConfig:
    return DataConfig(source=source, path=path, **kw)


# ---- files ---------------------------------------------------------------------------------


def test_jsonl_verl_and_slime_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mix.jsonl", [VERL_ROW, "", SLIME_ROW])
    ds = build_dataset(file_cfg(path))
    assert len(ds) == 2 and ds.skipped == 0
    verl, slime = ds.records
    assert verl == PromptRecord(prompt=VERL_ROW["prompt"], label="4", data_source="openai/gsm8k",
                                metadata={"split": "train", "index": 7}, index=0)
    # slime: text prompt, `label` used as the fallback of reward_model.ground_truth
    assert slime == PromptRecord(prompt="What is 3*3?", label="9", data_source="mix",
                                 metadata={"level": 1}, index=1)


def test_nested_keys(tmp_path: Path) -> None:
    row = {"q": {"text": "1+1?"}, "ans": {"value": {"final": 2}}}
    path = write_jsonl(tmp_path / "n.jsonl", [row])
    ds = build_dataset(file_cfg(path, prompt_key="q.text", label_key="ans.value.final"))
    assert ds[0].prompt == "1+1?" and ds[0].label == 2


def test_parquet_verl_rows_and_eval_limit(tmp_path: Path) -> None:
    rows = [dict(VERL_ROW, reward_model={"style": "rule", "ground_truth": str(i)})
            for i in range(5)]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ds = build_dataset(file_cfg(str(path), "parquet"))
    assert [r.label for r in ds] == ["0", "1", "2", "3", "4"]
    assert ds[0].prompt == VERL_ROW["prompt"] and ds[0].data_source == "openai/gsm8k"
    ev = build_dataset(file_cfg(str(path), "parquet", eval_path=str(path), eval_size=2), "eval")
    assert len(ev) == 2
    assert len(build_dataset(file_cfg(str(path), "parquet"), "eval")) == 0  # no eval_path


BAD_ROWS = [
    SLIME_ROW,
    '{"prompt": "unterminated',                                  # line 2: bad JSON
    {"label": "1"},                                              # line 3: no prompt
    {"prompt": 12, "label": "1"},                                # line 4: wrong type
    {"prompt": [{"role": "user"}], "label": "1"},                # line 5: message w/o content
    {"prompt": "ok but no label"},                               # line 6: no label
    SLIME_ROW,
]


@pytest.mark.parametrize("line, what", [(2, "bad JSON"), (3, "no prompt"), (4, "is a int"),
                                         (5, "no string 'content'"), (6, "no label")])
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, line: int, what: str) -> None:
    rows = [SLIME_ROW] * (line - 1) + [BAD_ROWS[line - 1]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"bad\.jsonl:{line}: .*{what}"):
        build_dataset(file_cfg(path))


def test_malformed_rows_skipped_and_counted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    ds = build_dataset(file_cfg(path, skip_malformed=True))
    assert len(ds) == 2 and ds.skipped == 5
    assert [r.index for r in ds] == [0, 1]


def test_malformed_parquet_names_row(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "label": "1"},
                                         {"prompt": None, "label": "2"}]), path)
    with pytest.raises(DataError, match=r"bad\.parquet: row 1: no prompt"):
        build_dataset(file_cfg(str(path), "parquet"))
    assert build_dataset(file_cfg(str(path), "parquet", skip_malformed=True)).skipped == 1


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jsonl: prompt file not found"):
        build_dataset(file_cfg(str(tmp_path / "nope.jsonl")))
    path = write_jsonl(tmp_path / "text.parquet", [SLIME_ROW])
    with pytest.raises(DataError, match="text.parquet: cannot read as parquet"):
        build_dataset(file_cfg(path, "parquet"))


# ---- templates -----------------------------------------------------------------------------

R1_ZERO_EXPECTED = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: What is 2+2?. Assistant:"
)


def test_r1_zero_template() -> None:
    assert apply_template("r1_zero", "What is 2+2?") == R1_ZERO_EXPECTED
    assert apply_template("r1_zero", VERL_ROW["prompt"]) == R1_ZERO_EXPECTED  # system dropped
    calc = apply_template("r1_zero", "Calculate 5 - 3.")
    assert calc.endswith("User: Calculate 5 - 3. Assistant:")  # the period is not doubled


def test_none_and_tokenizer_templates(tiny_tokenizer) -> None:
    assert apply_template("none", "2+2=") == "2+2="
    assert apply_template("none", VERL_ROW["prompt"]) == "Be brief.\n\nWhat is 2+2?"
    assert (apply_template("tokenizer", VERL_ROW["prompt"], tiny_tokenizer)
            == "System: Be brief.\nUser: What is 2+2?\nAssistant:")
    assert apply_template("tokenizer", "hi", tiny_tokenizer) == "User: hi\nAssistant:"
    with pytest.raises(DataError, match="needs a tokenizer"):
        apply_template("tokenizer", "hi")
    with pytest.raises(DataError, match="unknown chat template"):
        apply_template("chatml", "hi")


# ---- sampler -------------------------------------------------------------------------------


def records(n: int) -> list[PromptRecord]:
    return [PromptRecord(prompt=f"q{i}", label=i, data_source="t", index=i) for i in range(n)]


def draw(sampler: PromptSampler, steps: int) -> list[list[int]]:
    return [[r.index for r in sampler.next_batch()] for _ in range(steps)]


def test_sampler_seeded_epochs() -> None:
    a, b = PromptSampler(records(10), 5, seed=3), PromptSampler(records(10), 5, seed=3)
    first = draw(a, 6)
    assert first == draw(b, 6)  # same seed, same order
    epochs = [sorted(first[0] + first[1]), sorted(first[2] + first[3])]
    assert epochs == [list(range(10))] * 2  # each epoch visits every prompt once
    assert first[0] + first[1] != first[2] + first[3]  # epochs are shuffled differently
    assert draw(PromptSampler(records(10), 5, seed=4), 2) != first[:2]
    assert draw(PromptSampler(records(10), 5, seed=3, shuffle=False), 2) == [[0, 1, 2, 3, 4],
                                                                           [5, 6, 7, 8, 9]]


# mid-epoch, a batch straddling the epoch boundary, and exactly at the end of an epoch
@pytest.mark.parametrize("batch, steps_before", [(4, 1), (4, 2), (4, 3), (4, 7), (5, 2)])
def test_sampler_exact_resumption(batch: int, steps_before: int) -> None:
    uninterrupted = PromptSampler(records(10), batch, seed=7)
    expected = draw(uninterrupted, steps_before + 6)
    first = PromptSampler(records(10), batch, seed=7)
    assert draw(first, steps_before) == expected[:steps_before]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = PromptSampler(records(10), batch, seed=7)
    resumed.load_state_dict(state)
    assert draw(resumed, 6) == expected[steps_before:]


def test_sampler_refuses_foreign_state() -> None:
    state = PromptSampler(records(10), 4, seed=7).state_dict()
    with pytest.raises(ValueError, match="seed=7"):
        PromptSampler(records(10), 4, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="num_prompts=10"):
        PromptSampler(records(11), 4, seed=7).load_state_dict(state)


# ---- reasoning-gym -------------------------------------------------------------------------

OFFLINE_TASKS = ["basic_arithmetic", "chain_sum", "countdown", "gsm_symbolic"]


def test_reasoning_gym_tasks_installed() -> None:
    assert set(OFFLINE_TASKS) <= set(task_names())


@pytest.mark.parametrize("task", OFFLINE_TASKS)
def test_reasoning_gym_labels_score_with_its_scorer(task: str) -> None:
    score = reasoning_gym.get_score_answer_fn(task)
    for rec in generate(task, size=3, seed=5):
        assert rec.data_source == task and set(rec.metadata) == {"task", "entry"}
        entry = rec.metadata["entry"]
        assert json.loads(json.dumps(entry)) == entry  # JSON-serialisable
        assert rec.label == entry["answer"] and rec.prompt == entry["question"]
        assert score(rec.label, entry) == 1.0
        assert score("wrong", entry) < 0.5


def test_reasoning_gym_splits_disjoint_and_deterministic() -> None:
    # tiny knobs: 1-digit sums of 2 terms repeat often, so some eval items collide with train
    knobs = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    cfg = DataConfig(task="basic_arithmetic", task_kwargs=knobs, train_size=300, eval_size=50,
                     seed=11)
    train, ev = build_dataset(cfg, "train"), build_dataset(cfg, "eval")
    assert len(train) == 300 and ev.eval_dropped > 0 and len(ev) == 50 - ev.eval_dropped
    assert not {r.prompt for r in train} & {r.prompt for r in ev}
    assert [r.index for r in ev] == list(range(len(ev)))
    again = task_splits("basic_arithmetic", 300, 50, 11, dict(knobs))
    assert again.train == train.records and again.eval == ev.records
    other = task_splits("basic_arithmetic", 300, 50, 12, dict(knobs))
    assert [r.prompt for r in other.train] != [r.prompt for r in train]


def test_reasoning_gym_bad_task_or_knob() -> None:
    with pytest.raises(DataError, match="unknown reasoning-gym task 'nope'"):
        generate("nope", 2, 1)
    with pytest.raises(DataError, match="rejects task_kwargs"):
        generate("basic_arithmetic", 2, 1, {"max_flavour": 3})


# ---- tokenizer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_train() -> list[PromptRecord]:
    return build_dataset(DataConfig(task="basic_arithmetic", train_size=500, eval_size=0)).records


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory, tiny_train):
    cfg = DataConfig(tokenizer_cache=str(tmp_path_factory.mktemp("tok")))
    from megatron_rl.data import PromptDataset

    return build_tokenizer(cfg, 512, PromptDataset(tiny_train, "train"))


def test_tokenizer_vocab_specials_round_trip(tiny_tokenizer, tiny_train) -> None:
    tok = tiny_tokenizer
    assert len(tok) <= 512
    ids = [tok.convert_tokens_to_ids(s) for s in SPECIAL_SYMBOLS]
    assert len(set(ids)) == 4 and tok.unk_token_id not in ids
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    response = " <think> 5 - 3 = 2 </think> <answer>-4</answer>"
    assert tok.encode(response, add_special_tokens=False).count(ids[0]) == 1
    for s in SPECIAL_SYMBOLS:
        assert len(tok.encode(s, add_special_tokens=False)) == 1
    texts = [apply_template("r1_zero", r.prompt) + response for r in tiny_train[:20]]
    texts += ["unseen: é 中文 ∑\ttabs  and\nnewlines ", " leading space"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert max(ids) < 512 and tok.unk_token_id not in ids  # byte fallback, never <unk>


def test_tokenizer_save_load_and_cache(tiny_tokenizer, tiny_train, tmp_path: Path) -> None:
    tiny_tokenizer.save_pretrained(tmp_path / "hf")
    loaded = load_tokenizer(tmp_path / "hf")
    text = apply_template("r1_zero", tiny_train[0].prompt) + " <think> x </think>"
    assert loaded.encode(text) == tiny_tokenizer.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.chat_template == tiny_tokenizer.chat_template
    texts = tokenizer_texts(tiny_train[:50])
    first = train_tokenizer(texts, 400, tmp_path / "cache")
    assert train_tokenizer(texts, 400, tmp_path / "cache") == first  # cache hit by hash
    assert train_tokenizer(texts[:-1], 400, tmp_path / "cache") != first
    assert len(load_tokenizer(first)) <= 400


def test_tokenizer_too_small_vocab(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="model.vocab_size"):
        train_tokenizer(["abc def"], 100, tmp_path)
